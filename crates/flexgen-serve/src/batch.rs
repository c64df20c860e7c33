//! The batch API: `/v1/files` (JSONL uploads, purpose `batch`) and `/v1/batches` (create,
//! retrieve, list, cancel), as `OpenAI` has them, on the engine's block schedule. Everything lives
//! in the state directory: `files/ID.jsonl` with `files/ID.json` beside it, and `batches/ID.json`.
//! One worker thread runs batches in the order they were created, a block's worth of lines per
//! engine job, appending each result line to the output (or error) file and syncing it before the
//! counts move on. A restarted server resumes every batch that was not finished, skipping the
//! `custom_id`s its output and error files already hold after cutting a torn last line (a server
//! killed mid-append): nothing is lost or written twice.

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use axum::Json;
use axum::extract::{Multipart, Path as UrlPath, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::{ApiError, AppState, authorize, chat_json, chat_requests, completion_json};
use crate::{completion_requests, now};

/// The state directory and the worker's doorbell.
pub(crate) struct Store {
    dir: PathBuf,
    bell: Mutex<mpsc::Sender<()>>,
    /// Serializes writes of a batch's record between the worker and `cancel`.
    records: Mutex<()>,
}

static NEXT: AtomicU64 = AtomicU64::new(0);

fn new_id(prefix: &str) -> String {
    let n = NEXT.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_micros());
    format!("{prefix}{t:x}{n:x}")
}

/// Writes `text` to `path` atomically (a temporary beside it, synced, renamed).
fn write_atomic(path: &Path, text: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    std::fs::rename(tmp, path)
}

fn server(e: impl std::fmt::Display) -> ApiError {
    ApiError::server(&format!("the state directory: {e}"))
}

fn not_found(what: &str, id: &str) -> ApiError {
    ApiError {
        status: StatusCode::NOT_FOUND,
        message: format!("no {what} `{id}`"),
        kind: "invalid_request_error",
        param: None,
    }
}

/// An id as it may name a file here: letters, digits, `_` and `-` only.
fn safe(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 64
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

impl Store {
    /// Opens (making) the state directory.
    pub(crate) fn open(dir: &Path) -> anyhow::Result<(Self, mpsc::Receiver<()>)> {
        for sub in ["files", "batches"] {
            std::fs::create_dir_all(dir.join(sub))
                .map_err(|e| anyhow::anyhow!("{}: {e} (--state-dir)", dir.join(sub).display()))?;
        }
        let (tx, rx) = mpsc::channel();
        Ok((Self { dir: dir.to_path_buf(), bell: Mutex::new(tx), records: Mutex::new(()) }, rx))
    }

    fn file_meta(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(format!("{id}.json"))
    }

    fn file_data(&self, id: &str) -> PathBuf {
        self.dir.join("files").join(format!("{id}.jsonl"))
    }

    fn batch_path(&self, id: &str) -> PathBuf {
        self.dir.join("batches").join(format!("{id}.json"))
    }

    fn read_json(path: &Path) -> Option<Value> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }

    /// A new file of `bytes` (an output or error file when `purpose` says so).
    fn add_file(&self, name: &str, purpose: &str, bytes: &[u8]) -> std::io::Result<Value> {
        let id = new_id("file-");
        write_atomic(&self.file_data(&id), &String::from_utf8_lossy(bytes))?;
        let meta = json!({"id": id, "object": "file", "bytes": bytes.len(), "created_at": now(),
                          "filename": name, "purpose": purpose});
        write_atomic(&self.file_meta(&id), &meta.to_string())?;
        Ok(meta)
    }

    fn save_batch(&self, b: &Value) -> std::io::Result<()> {
        let id = b["id"].as_str().unwrap_or_default();
        write_atomic(&self.batch_path(id), &b.to_string())
    }

    fn ring(&self) {
        let _ = self.bell.lock().expect("the doorbell").send(());
    }
}

pub(crate) async fn upload(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    mut form: Multipart,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    let store = store(&s)?;
    let (mut data, mut name, mut purpose) = (None, String::from("upload.jsonl"), None);
    while let Some(field) =
        form.next_field().await.map_err(|e| ApiError::invalid(&format!("the form: {e}"), None))?
    {
        match field.name() {
            Some("file") => {
                if let Some(n) = field.file_name() {
                    name = n.to_string();
                }
                let bytes = field
                    .bytes()
                    .await
                    .map_err(|e| ApiError::invalid(&format!("file: {e}"), Some("file")))?;
                data = Some(bytes);
            }
            Some("purpose") => {
                purpose =
                    Some(field.text().await.map_err(|e| {
                        ApiError::invalid(&format!("purpose: {e}"), Some("purpose"))
                    })?);
            }
            _ => {}
        }
    }
    let data = data.ok_or_else(|| ApiError::invalid("file: missing", Some("file")))?;
    if purpose.as_deref() != Some("batch") {
        return Err(ApiError::invalid("purpose: only `batch` is served", Some("purpose")));
    }
    Ok(Json(store.add_file(&name, "batch", &data).map_err(server)?))
}

fn store(s: &AppState) -> Result<&Store, ApiError> {
    s.store.as_ref().ok_or_else(|| {
        ApiError::invalid(
            "the batch API needs a state directory: start flexgen-serve with --state-dir DIR",
            None,
        )
    })
}

/// The JSON record of file or batch (`what`) `id`, at `path` in the store, or 404.
fn record(
    s: &AppState,
    headers: &HeaderMap,
    (what, id): (&str, &str),
    path: fn(&Store, &str) -> PathBuf,
) -> Result<Json<Value>, ApiError> {
    authorize(s, headers)?;
    let store = store(s)?;
    let v = safe(id).then(|| Store::read_json(&path(store, id))).flatten();
    v.map(Json).ok_or_else(|| not_found(what, id))
}

pub(crate) async fn file(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    record(&s, &headers, ("file", &id), Store::file_meta)
}

pub(crate) async fn file_content(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let store = store(&s)?;
    let data = safe(&id).then(|| std::fs::read(store.file_data(&id)).ok()).flatten();
    let data = data.ok_or_else(|| not_found("file", &id))?;
    Ok(([("content-type", "application/jsonl")], data).into_response())
}

pub(crate) async fn create(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    let store = store(&s)?;
    let b: Value = serde_json::from_slice(&body)
        .map_err(|e| ApiError::invalid(&format!("the request body is not JSON: {e}"), None))?;
    let input = b["input_file_id"].as_str().unwrap_or_default().to_string();
    if !safe(&input) || !store.file_data(&input).exists() {
        return Err(ApiError::invalid(
            &format!("input_file_id: no file `{input}`; upload one to /v1/files first"),
            Some("input_file_id"),
        ));
    }
    let endpoint = b["endpoint"].as_str().unwrap_or_default();
    if !matches!(endpoint, "/v1/completions" | "/v1/chat/completions") {
        return Err(ApiError::invalid(
            &format!("endpoint `{endpoint}`: give /v1/completions or /v1/chat/completions"),
            Some("endpoint"),
        ));
    }
    let total = std::fs::read_to_string(store.file_data(&input))
        .map_err(server)?
        .lines()
        .filter(|l| !l.trim().is_empty())
        .count();
    let batch = json!({
        "id": new_id("batch_"), "object": "batch", "endpoint": endpoint, "errors": null,
        "input_file_id": input, "completion_window": b["completion_window"].as_str().unwrap_or("24h"),
        "status": "in_progress", "output_file_id": null, "error_file_id": null,
        "created_at": now(), "in_progress_at": now(), "completed_at": null, "cancelled_at": null,
        "request_counts": {"total": total, "completed": 0, "failed": 0},
        "metadata": b.get("metadata").cloned().unwrap_or(Value::Null),
    });
    store.save_batch(&batch).map_err(server)?;
    store.ring();
    Ok(Json(batch))
}

pub(crate) async fn retrieve(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    record(&s, &headers, ("batch", &id), Store::batch_path)
}

pub(crate) async fn list(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    let store = store(&s)?;
    let mut all = batches(store);
    all.reverse(); // newest first
    Ok(Json(json!({"object": "list", "data": all, "has_more": false})))
}

pub(crate) async fn cancel(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    let store = store(&s)?;
    let _guard = store.records.lock().expect("batch records");
    let path = store.batch_path(&id);
    let mut b = safe(&id)
        .then(|| Store::read_json(&path))
        .flatten()
        .ok_or_else(|| not_found("batch", &id))?;
    if b["status"] == "in_progress" {
        b["status"] = json!("cancelling");
        store.save_batch(&b).map_err(server)?;
        store.ring();
    }
    Ok(Json(b))
}

/// Every batch record, oldest first.
fn batches(store: &Store) -> Vec<Value> {
    let mut all: Vec<Value> = std::fs::read_dir(store.dir.join("batches"))
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
                .filter_map(|e| Store::read_json(&e.path()))
                .collect()
        })
        .unwrap_or_default();
    all.sort_by_key(|b| (b["created_at"].as_u64(), b["id"].as_str().map(String::from)));
    all
}

/// The worker: runs unfinished batches, oldest first, until the server stops.
pub(crate) fn work(state: &AppState, bell: &mpsc::Receiver<()>) {
    let Some(store) = &state.store else { return };
    loop {
        let next = batches(store)
            .into_iter()
            .find(|b| matches!(b["status"].as_str(), Some("in_progress" | "cancelling")));
        match next {
            Some(b) => {
                if let Err(e) = run_batch(state, store, b) {
                    tracing::error!("batch: {e}");
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
            None => {
                if matches!(
                    bell.recv_timeout(Duration::from_secs(5)),
                    Err(mpsc::RecvTimeoutError::Disconnected)
                ) {
                    return;
                }
            }
        }
    }
}

/// The `custom_id`s a result file already holds, after cutting off a torn last line (a server
/// killed while appending): the lines appended next start lines of their own, and the torn
/// line's request runs again.
fn done_ids(path: &Path) -> std::io::Result<HashSet<String>> {
    let (bytes, cut) = flexgen_cli::batch::cut_torn_line(path)?;
    if cut > 0 {
        tracing::warn!(path = %path.display(), bytes = cut, "cut a torn last line");
    }
    Ok(String::from_utf8_lossy(&bytes)
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| v["custom_id"].as_str().map(String::from))
        .collect())
}

/// Appends `lines` to `path` and syncs it.
fn append(path: &Path, lines: &[Value]) -> std::io::Result<()> {
    if lines.is_empty() {
        return Ok(());
    }
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(path)?;
    let mut text = String::new();
    for l in lines {
        text.push_str(&l.to_string());
        text.push('\n');
    }
    f.write_all(text.as_bytes())?;
    f.sync_data()
}

/// Runs (or resumes) batch `b` to its end, or until it is cancelled.
fn run_batch(state: &AppState, store: &Store, mut b: Value) -> std::io::Result<()> {
    let id = b["id"].as_str().unwrap_or_default().to_string();
    // The output and error files get their ids once, at the start, and keep them.
    for key in ["output_file_id", "error_file_id"] {
        if b[key].is_null() {
            let purpose = if key == "output_file_id" { "batch_output" } else { "batch_errors" };
            let meta = store.add_file(&format!("{id}_{purpose}.jsonl"), purpose, b"")?;
            b[key] = meta["id"].clone();
        }
    }
    store.save_batch(&b)?;
    let out = store.file_data(b["output_file_id"].as_str().unwrap_or_default());
    let err = store.file_data(b["error_file_id"].as_str().unwrap_or_default());
    let (written, refused) = (done_ids(&out)?, done_ids(&err)?);
    // Counted as lines are appended below, not by reading the files again.
    let (mut completed, mut failed) = (written.len(), refused.len());
    let seen: HashSet<String> = written.union(&refused).cloned().collect();
    let input =
        std::fs::read_to_string(store.file_data(b["input_file_id"].as_str().unwrap_or_default()))?;
    let endpoint = b["endpoint"].as_str().unwrap_or_default().to_string();
    let lines: Vec<(usize, &str)> =
        input.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()).collect();
    let block = state.options.block_size.max(1);
    let limit = state.options.max_tokens_limit;
    let mut pending = Vec::new();
    for (n, line) in lines {
        let parsed: Result<(String, Vec<u8>), String> = serde_json::from_str::<Value>(line)
            .map_err(|e| format!("line {}: not JSON: {e}", n + 1))
            .and_then(|v| {
                let cid = v["custom_id"]
                    .as_str()
                    .ok_or_else(|| format!("line {}: custom_id: missing", n + 1))?
                    .to_string();
                if v["url"].as_str().is_some_and(|u| u != endpoint) {
                    return Err(format!("line {}: url: the batch's endpoint is {endpoint}", n + 1));
                }
                Ok((cid, serde_json::to_vec(&v["body"]).unwrap_or_default()))
            });
        match parsed {
            Ok((cid, _)) if seen.contains(&cid) => {}
            Ok((cid, body)) => pending.push((cid, body)),
            Err(m) => {
                let cid = format!("line-{}", n + 1);
                if !seen.contains(&cid) {
                    append(
                        &err,
                        &[json!({"id": new_id("batch_req_"), "custom_id": cid, "response": null,
                                          "error": {"code": "invalid_request", "message": m}})],
                    )?;
                    failed += 1;
                }
            }
        }
    }
    // Chunks of as many lines as the engine takes in one call; lines are written, in input
    // order, a block's worth at a time as they complete.
    for chunk in pending.chunks(crate::CALL_BLOCKS * block) {
        // A cancellation lands between chunks.
        if let Some(cur) = Store::read_json(&store.batch_path(&id))
            && cur["status"] == "cancelling"
        {
            b["status"] = json!("cancelled");
            b["cancelled_at"] = json!(now());
            break;
        }
        let mut ok_lines = Vec::new();
        let mut bad_lines = Vec::new();
        let mut runnable = Vec::new();
        for (cid, body) in chunk {
            let r = if endpoint == "/v1/completions" {
                completion_requests(body, limit)
            } else {
                chat_requests(body, &state.template, limit)
            };
            match r {
                Ok((requests, _)) => runnable.push((cid.clone(), requests)),
                Err(e) => bad_lines.push(json!({"id": new_id("batch_req_"), "custom_id": cid,
                    "response": {"status_code": 400, "request_id": new_id("req_"), "body": e.body()}, "error": null})),
            }
        }
        // Appends the lines gathered so far and records the counts.
        let mut flush = |ok: &mut Vec<Value>, bad: &mut Vec<Value>| -> std::io::Result<()> {
            if ok.is_empty() && bad.is_empty() {
                return Ok(());
            }
            append(&out, ok)?;
            append(&err, bad)?;
            (completed, failed) = (completed + ok.len(), failed + bad.len());
            ok.clear();
            bad.clear();
            let _guard = store.records.lock().expect("batch records");
            let cur = Store::read_json(&store.batch_path(&id)).unwrap_or_else(|| b.clone());
            b["status"] = cur["status"].clone();
            b["request_counts"]["completed"] = json!(completed);
            b["request_counts"]["failed"] = json!(failed);
            store.save_batch(&b)
        };
        // One engine job per line, all queued at once: the engine runs them in shared blocks,
        // and a line it refuses fails alone.
        let handles = state.engine.submit_all(runnable.iter().map(|(_, r)| r.clone()));
        for ((cid, _), pending) in runnable.into_iter().zip(handles) {
            let line = match pending.wait() {
                Ok(done) => {
                    let body = if endpoint == "/v1/completions" {
                        completion_json(&done, &state.options.model_name)
                    } else {
                        chat_json(&done, &state.options.model_name)
                    };
                    json!({"id": new_id("batch_req_"), "custom_id": cid,
                           "response": {"status_code": 200, "request_id": new_id("req_"), "body": body}, "error": null})
                }
                Err(m) => json!({"id": new_id("batch_req_"), "custom_id": cid, "response": null,
                                 "error": {"code": "invalid_request", "message": m}}),
            };
            if line["error"].is_null() {
                ok_lines.push(line);
            } else {
                bad_lines.push(line);
            }
            if ok_lines.len() + bad_lines.len() >= block {
                flush(&mut ok_lines, &mut bad_lines)?;
            }
        }
        flush(&mut ok_lines, &mut bad_lines)?;
    }
    let _guard = store.records.lock().expect("batch records");
    if b["status"] != "cancelled" {
        let cur = Store::read_json(&store.batch_path(&id)).unwrap_or_else(|| b.clone());
        let cancelled = cur["status"] == "cancelling";
        b["status"] = json!(if cancelled { "cancelled" } else { "completed" });
        b[if cancelled { "cancelled_at" } else { "completed_at" }] = json!(now());
    }
    b["request_counts"]["completed"] = json!(completed);
    b["request_counts"]["failed"] = json!(failed);
    store.save_batch(&b)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A server killed while appending leaves a torn last line: resuming cuts it (its request
    /// runs again), so the next lines appended are whole lines of their own.
    #[test]
    fn a_torn_last_line_is_cut_before_lines_are_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        let whole = json!({"custom_id": "line-0", "response": {"status_code": 200}});
        std::fs::write(&path, format!("{whole}\n{{\"custom_id\": \"line-1\", \"resp")).unwrap();
        let done = done_ids(&path).unwrap();
        assert_eq!(done, HashSet::from(["line-0".to_string()]));
        append(&path, &[json!({"custom_id": "line-1"}), json!({"custom_id": "line-2"})]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let ids: Vec<String> = text
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("every line whole JSON"))
            .map(|v| v["custom_id"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(ids, ["line-0", "line-1", "line-2"]);
        // A complete line that lost only its newline is cut as well (it would glue to the next).
        std::fs::write(&path, format!("{whole}\n{whole}")).unwrap();
        assert_eq!(done_ids(&path).unwrap().len(), 1);
        assert!(std::fs::read_to_string(&path).unwrap().ends_with('\n'));
        assert!(done_ids(&dir.path().join("missing.jsonl")).unwrap().is_empty());
    }
}
