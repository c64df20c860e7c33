//! `flexgen-serve` as a client sees it: the binary on a free port, plain HTTP/1.1 requests.
//! Completions equal the engine's own greedy output, concurrent clients sharing blocks get what
//! each would get alone, chat prompts come from the model's template, and bad requests get
//! OpenAI-style errors naming the field.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use serde_json::{Value, json};

struct Server {
    child: Child,
    addr: String,
    /// What it printed before listening.
    banner: Vec<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bundled() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../flexgen-model/models/opt-kjv")
}

/// Starts the server with `args` on a free port and waits for its address.
fn start(args: &[&str]) -> Server {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flexgen-serve"))
        .args(["--port", "0", "--batch-wait-ms", "200"])
        .args(args)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    // Killed and waited for on drop, whatever happens below.
    let mut server = Server { child, addr: String::new(), banner: Vec::new() };
    let mut line = String::new();
    loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "the server stopped before listening");
        server.banner.push(line.trim_end().to_string());
        if let Some(rest) = line.split("http://").nth(1) {
            server.addr = rest.split_whitespace().next().unwrap().to_string();
            // Keep draining its stderr so that it never blocks on a full pipe.
            std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
            return server;
        }
    }
}

/// One HTTP/1.1 request over a fresh connection: the whole raw response.
fn raw(s: &Server, method: &str, path: &str, body: &str, auth: Option<&str>) -> String {
    let mut c = TcpStream::connect(&s.addr).unwrap();
    let auth = auth.map(|k| format!("Authorization: Bearer {k}\r\n")).unwrap_or_default();
    write!(
        c,
        "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n{auth}\
         Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
        s.addr,
        body.len()
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    out
}

/// A streamed request: the `data:` payloads of its server-sent events, in order.
fn stream(s: &Server, path: &str, body: &str) -> Vec<String> {
    let out = raw(s, "POST", path, body, None);
    assert!(out.contains("text/event-stream"), "{out}");
    out.lines().filter_map(|l| l.strip_prefix("data: ")).map(str::to_string).collect()
}

/// One request; the status and the JSON body.
fn call(
    s: &Server,
    method: &str,
    path: &str,
    body: Option<&str>,
    auth: Option<&str>,
) -> (u16, Value) {
    let out = raw(s, method, path, body.unwrap_or(""), auth);
    let status: u16 = out.split_whitespace().nth(1).unwrap().parse().unwrap();
    let json = out.split("\r\n\r\n").nth(1).unwrap_or("");
    (status, serde_json::from_str(json).unwrap_or(Value::Null))
}

fn complete(s: &Server, prompt: &str, tokens: u32) -> String {
    let body = json!({"prompt": prompt, "max_tokens": tokens, "temperature": 0}).to_string();
    let (status, v) = call(s, "POST", "/v1/completions", Some(&body), None);
    assert_eq!(status, 200, "{v}");
    v["choices"][0]["text"].as_str().unwrap().to_string()
}

/// The engine's own greedy text for `prompt`.
fn engine_text(dir: &Path, prompt: &str, tokens: usize) -> String {
    let model = flexgen_model::Model::load(dir).unwrap();
    let g = flexgen_runtime::Generator::new(&model, flexgen_policy::Policy::default()).unwrap();
    let config = flexgen_runtime::GenerationConfig {
        max_new_tokens: tokens,
        ..flexgen_runtime::GenerationConfig::default()
    };
    let (done, _) =
        g.generate(&[flexgen_runtime::Request::text(prompt)], &config, &mut |_| {}).unwrap();
    done[0].text.clone().unwrap()
}

const PROMPTS: [&str; 6] =
    ["In the beginning", "Jesus wept", "And God said", "Blessed are the", "Amen", "The LORD is"];

#[test]
fn completions_equal_the_engine_and_concurrent_clients_share_blocks() {
    let s = start(&["--gpu-batch-size", "2", "--num-gpu-batches", "2"]);
    let (status, v) = call(&s, "GET", "/health", None, None);
    assert_eq!((status, v["status"].as_str()), (200, Some("ok")));
    let (status, v) = call(&s, "GET", "/v1/models", None, None);
    assert_eq!((status, v["data"][0]["id"].as_str()), (200, Some("opt-kjv")));
    let alone: Vec<String> = PROMPTS.iter().map(|p| complete(&s, p, 12)).collect();
    assert_eq!(alone[0], engine_text(&bundled(), PROMPTS[0], 12));
    // Six clients at once: their requests share blocks, and each gets what it got alone.
    let calls =
        |s: &Server| call(s, "GET", "/health", None, None).1["generate_calls"].as_u64().unwrap();
    let before = calls(&s);
    let together: Vec<String> = std::thread::scope(|sc| {
        let handles: Vec<_> = PROMPTS.iter().map(|p| sc.spawn(|| complete(&s, p, 12))).collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    assert_eq!(together, alone);
    assert!(
        calls(&s) - before < 6,
        "six concurrent requests took {} generate calls",
        calls(&s) - before
    );
    // Prometheus metrics count what was served.
    let metrics = raw(&s, "GET", "/metrics", "", None);
    let value = |name: &str| -> f64 {
        let line = metrics.lines().find(|l| l.starts_with(&format!("{name} "))).unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    assert!(value("flexgen_requests_total") >= 12.0, "{metrics}");
    assert!(value("flexgen_generated_tokens_total") >= 144.0, "{metrics}");
    assert!(value("flexgen_generate_seconds_total") > 0.0, "{metrics}");
    assert!((0.0..=1.0).contains(&value("flexgen_block_fill")), "{metrics}");
    assert_eq!(value("flexgen_queue_depth"), 0.0, "{metrics}");
    assert!(metrics.contains("flexgen_bytes_moved_total{direction=\"cpu_to_gpu\"}"), "{metrics}");
    // A list of prompts: a choice each, in order, with usage counted.
    let body = json!({"prompt": PROMPTS[..3], "max_tokens": 12, "temperature": 0}).to_string();
    let (status, v) = call(&s, "POST", "/v1/completions", Some(&body), None);
    assert_eq!(status, 200);
    for (i, c) in v["choices"].as_array().unwrap().iter().enumerate() {
        assert_eq!(c["index"], i);
        assert_eq!(c["text"].as_str().unwrap(), alone[i]);
        assert_eq!(c["finish_reason"], "length");
    }
    assert_eq!(v["usage"]["completion_tokens"], 36);
    // Streamed: the pieces add up to the same texts, each request ends with its reason, then
    // [DONE].
    let body = json!({"prompt": PROMPTS[..2], "max_tokens": 12, "temperature": 0, "stream": true});
    let events = stream(&s, "/v1/completions", &body.to_string());
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    let mut texts = [String::new(), String::new()];
    let mut ends = 0;
    for e in &events[..events.len() - 1] {
        let v: Value = serde_json::from_str(e).unwrap();
        let c = &v["choices"][0];
        let i = usize::try_from(c["index"].as_u64().unwrap()).unwrap();
        texts[i].push_str(c["text"].as_str().unwrap());
        if c["finish_reason"] == "length" {
            ends += 1;
        }
    }
    assert_eq!(
        (texts[0].as_str(), texts[1].as_str(), ends),
        (alone[0].as_str(), alone[1].as_str(), 2)
    );
    let body = json!({"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 6,
                      "temperature": 0, "stream": true});
    let events = stream(&s, "/v1/chat/completions", &body.to_string());
    let first: Value = serde_json::from_str(&events[0]).unwrap();
    assert_eq!(first["object"], "chat.completion.chunk");
    assert_eq!(first["choices"][0]["delta"]["role"], "assistant");
    assert_eq!(events.last().map(String::as_str), Some("[DONE]"));
    // Sampling with a seed repeats itself.
    let body = json!({"prompt": "And", "max_tokens": 8, "temperature": 0.9, "seed": 7}).to_string();
    let a = call(&s, "POST", "/v1/completions", Some(&body), None).1;
    let b = call(&s, "POST", "/v1/completions", Some(&body), None).1;
    assert_eq!(a["choices"][0]["text"], b["choices"][0]["text"]);
}

#[test]
fn bad_requests_name_the_field_and_keys_are_checked() {
    let s = start(&["--api-key", "sesame"]);
    let (status, v) = call(&s, "GET", "/v1/models", None, None);
    assert_eq!(status, 401, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--api-key"));
    let key = Some("sesame");
    for (body, param) in [
        (r#"{"prompt": "x", "max_tokens": 0}"#, "max_tokens"),
        (r#"{"prompt": "x", "max_tokens": 100000}"#, "max_tokens"),
        (r#"{"prompt": "x", "temperature": -1}"#, "temperature"),
        (r#"{"prompt": "x", "top_p": 0}"#, "top_p"),
        (r#"{"prompt": "x", "n": 2}"#, "n"),
        (r#"{"prompt": "x", "stop": ["a", "b", "c", "d", "e"]}"#, "stop"),
        (r#"{"prompt": []}"#, "prompt"),
    ] {
        let (status, v) = call(&s, "POST", "/v1/completions", Some(body), key);
        assert_eq!(status, 400, "{body}: {v}");
        assert_eq!(v["error"]["param"], param, "{body}: {v}");
        assert_eq!(v["error"]["type"], "invalid_request_error");
    }
    for body in ["", "{", r#"{"prompt": 3}"#, r#"{"max_tokens": 3}"#, "[1, 2]"] {
        let (status, v) = call(&s, "POST", "/v1/completions", Some(body), key);
        assert_eq!(status, 400, "{body}: {v}");
        assert!(v["error"]["message"].as_str().unwrap().contains("not a valid request"), "{v}");
    }
    let body = r#"{"messages": [{"role": "wizard", "content": "hi"}]}"#;
    let (status, v) = call(&s, "POST", "/v1/chat/completions", Some(body), key);
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("messages")), "{v}");
    // A prompt longer than the model's positions fails alone, with the engine's reason.
    let long = "And ".repeat(3000);
    let body = json!({"prompt": long, "max_tokens": 4}).to_string();
    let (status, v) = call(&s, "POST", "/v1/completions", Some(&body), key);
    assert_eq!(status, 400, "{v}");
    let (status, _) = call(&s, "GET", "/health", None, None);
    assert_eq!(status, 200, "health needs no key");
}

#[test]
fn chat_prompts_come_from_the_models_template() {
    // The bundled model with a chat template of its own: the turns' contents joined.
    let dir = tempfile::tempdir().unwrap();
    for f in std::fs::read_dir(bundled()).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join(f.file_name())).unwrap();
    }
    let config = json!({"chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }} {% endfor %}",
                        "bos_token": "", "eos_token": "</s>"});
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let s = start(&["--model", dir.path().to_str().unwrap()]);
    let body = json!({"messages": [{"role": "system", "content": "In the"},
                                   {"role": "user", "content": "beginning"}],
                      "max_tokens": 10, "temperature": 0})
    .to_string();
    let (status, v) = call(&s, "POST", "/v1/chat/completions", Some(&body), None);
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(v["choices"][0]["message"]["role"], "assistant");
    let want = engine_text(dir.path(), "In the beginning ", 10);
    assert_eq!(v["choices"][0]["message"]["content"].as_str().unwrap(), want.trim());
    // A template that does not compile is refused at start-up, naming the file.
    let bad = json!({"chat_template": "{% for %}"});
    std::fs::write(dir.path().join("tokenizer_config.json"), bad.to_string()).unwrap();
    let o = Command::new(env!("CARGO_BIN_EXE_flexgen-serve"))
        .args(["--port", "0", "--model", dir.path().to_str().unwrap()])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success()
            && err.contains("tokenizer_config.json")
            && err.contains("chat_template"),
        "{err}"
    );
}

/// A multipart upload of `data` to `/v1/files` with purpose `batch`: the file's id.
fn upload(s: &Server, data: &str) -> String {
    let b = "flexgenboundary";
    let form = format!(
        "--{b}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\nbatch\r\n\
         --{b}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"in.jsonl\"\r\n\
         Content-Type: application/jsonl\r\n\r\n{data}\r\n--{b}--\r\n"
    );
    let mut c = TcpStream::connect(&s.addr).unwrap();
    write!(
        c,
        "POST /v1/files HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary={b}\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n{form}",
        form.len()
    )
    .unwrap();
    let mut out = String::new();
    c.read_to_string(&mut out).unwrap();
    let v: Value = serde_json::from_str(out.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    v["id"].as_str().unwrap_or_else(|| panic!("{out}")).to_string()
}

/// Polls batch `id` until it is no longer in progress: its record.
fn wait_batch(s: &Server, id: &str) -> Value {
    for _ in 0..600 {
        let (status, v) = call(s, "GET", &format!("/v1/batches/{id}"), None, None);
        assert_eq!(status, 200, "{v}");
        if !matches!(v["status"].as_str(), Some("in_progress" | "cancelling")) {
            return v;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    panic!("batch {id} did not finish");
}

/// Uploads `lines` and runs them as a batch on `/v1/completions`: the ended batch's record.
fn run_lines(s: &Server, lines: &[String]) -> Value {
    let file = upload(s, &lines.join("\n"));
    let body =
        json!({"input_file_id": file, "endpoint": "/v1/completions", "completion_window": "24h"});
    let (status, b) = call(s, "POST", "/v1/batches", Some(&body.to_string()), None);
    assert_eq!(status, 200, "{b}");
    wait_batch(s, b["id"].as_str().unwrap())
}

/// The lines of file `id`, by `custom_id`.
fn results(s: &Server, id: &str) -> Vec<(String, Value)> {
    let out = raw(s, "GET", &format!("/v1/files/{id}/content"), "", None);
    let body = out.split("\r\n\r\n").nth(1).unwrap_or("");
    body.lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["custom_id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

fn batch_line(id: &str, prompt: &str, tokens: u32) -> String {
    json!({"custom_id": id, "method": "POST", "url": "/v1/completions",
           "body": {"prompt": prompt, "max_tokens": tokens, "temperature": 0}})
    .to_string()
}

#[test]
fn batches_run_on_the_engine_and_resume_after_a_restart() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let s = start(&["--state-dir", &dir, "--gpu-batch-size", "2", "--num-gpu-batches", "2"]);
    let mut lines: Vec<String> =
        PROMPTS.iter().enumerate().map(|(i, p)| batch_line(&format!("q{i}"), p, 10)).collect();
    lines.push(json!({"custom_id": "bad", "body": {"prompt": "x", "max_tokens": 0}}).to_string());
    lines.push("not json".into());
    let b = run_lines(&s, &lines);
    assert_eq!(b["status"], "completed", "{b}");
    assert_eq!(b["request_counts"], json!({"total": 8, "completed": 6, "failed": 2}));
    let out = results(&s, b["output_file_id"].as_str().unwrap());
    assert_eq!(out.len(), 6);
    for (cid, v) in &out {
        let i: usize = cid[1..].parse().unwrap();
        assert_eq!(v["response"]["status_code"], 200);
        let text = v["response"]["body"]["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, complete(&s, PROMPTS[i], 10), "{cid}");
    }
    let errors = results(&s, b["error_file_id"].as_str().unwrap());
    assert_eq!(errors.iter().map(|e| e.0.as_str()).collect::<Vec<_>>().len(), 2, "{errors:?}");
    let (status, list) = call(&s, "GET", "/v1/batches", None, None);
    assert_eq!((status, list["data"][0]["id"].clone()), (200, b["id"].clone()));
    let (status, _) = call(&s, "GET", "/v1/batches/batch_nope", None, None);
    assert_eq!(status, 404);
    let (status, v) = call(
        &s,
        "POST",
        "/v1/batches",
        Some(r#"{"input_file_id": "../x", "endpoint": "/v1/completions"}"#),
        None,
    );
    assert_eq!((status, v["error"]["param"].as_str()), (400, Some("input_file_id")), "{v}");
    drop(s);

    // A batch left in progress, one line already written: a restarted server finishes it and
    // writes every other line once, the written one not again.
    let root = state.path();
    let input: Vec<String> =
        PROMPTS[..3].iter().enumerate().map(|(i, p)| batch_line(&format!("r{i}"), p, 6)).collect();
    std::fs::write(root.join("files/file-in.jsonl"), input.join("\n")).unwrap();
    std::fs::write(root.join("files/file-in.json"), r#"{"id": "file-in", "object": "file"}"#)
        .unwrap();
    let kept = json!({"id": "batch_req_old", "custom_id": "r1", "response": {"status_code": 200, "body": {"kept": true}}, "error": null});
    std::fs::write(root.join("files/file-out.jsonl"), format!("{kept}\n")).unwrap();
    std::fs::write(root.join("files/file-err.jsonl"), "").unwrap();
    let left = json!({"id": "batch_left", "object": "batch", "endpoint": "/v1/completions",
                      "input_file_id": "file-in", "output_file_id": "file-out", "error_file_id": "file-err",
                      "status": "in_progress", "created_at": 1,
                      "request_counts": {"total": 3, "completed": 1, "failed": 0}});
    std::fs::write(root.join("batches/batch_left.json"), left.to_string()).unwrap();
    let s = start(&["--state-dir", &dir]);
    let b = wait_batch(&s, "batch_left");
    assert_eq!(b["status"], "completed", "{b}");
    let out = results(&s, "file-out");
    let ids: Vec<&str> = out.iter().map(|(c, _)| c.as_str()).collect();
    assert_eq!(ids.len(), 3, "{ids:?}");
    for want in ["r0", "r1", "r2"] {
        assert_eq!(ids.iter().filter(|&&c| c == want).count(), 1, "{ids:?}");
    }
    assert_eq!(out[0].1["response"]["body"]["kept"], true, "the written line is left as it was");
    assert_eq!(b["request_counts"]["completed"], 3);
}

#[test]
fn without_a_state_dir_the_batch_api_says_how_to_turn_it_on_and_a_full_queue_says_429() {
    let s = start(&["--max-queue", "0"]);
    let (status, v) = call(&s, "GET", "/v1/batches", None, None);
    assert_eq!(status, 400, "{v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("--state-dir"), "{v}");
    let body = json!({"prompt": "Amen", "max_tokens": 2}).to_string();
    let (status, v) = call(&s, "POST", "/v1/completions", Some(&body), None);
    assert_eq!((status, v["error"]["type"].as_str()), (429, Some("rate_limit_error")), "{v}");
}

/// The Python that has the `openai` package: `FLEXGEN_OPENAI_PYTHON`, or the virtual environment
/// `.ci/run` makes (`.ci/venv`). CI sets the variable, so there the client tests always run.
fn openai_python() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("FLEXGEN_OPENAI_PYTHON") {
        return Some(PathBuf::from(p));
    }
    let venv = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../.ci/venv/bin/python");
    venv.exists().then_some(venv)
}

/// Runs a phase of `tests/openai_client.py`; its JSON report line.
fn client(py: &Path, args: &[&str]) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/openai_client.py");
    let out = Command::new(py).arg(script).args(args).output().unwrap();
    let (stdout, stderr) =
        (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "openai client {args:?}: {stdout}\n{stderr}");
    eprintln!("openai client {:?}: {stdout}", &args[1..]);
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap()
}

fn skip_without_openai() -> Option<PathBuf> {
    let py = openai_python();
    if py.is_none() {
        eprintln!(
            "skipped: no Python with the openai package (python3 -m venv .ci/venv && \
             .ci/venv/bin/pip install openai, or set FLEXGEN_OPENAI_PYTHON)"
        );
    }
    py
}

#[test]
fn the_openai_client_runs_completions_chat_and_a_batch_that_survives_sigkill() {
    let Some(py) = skip_without_openai() else { return };
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let args = ["--state-dir", &dir, "--gpu-batch-size", "4", "--num-gpu-batches", "2"];
    let s = start(&args);
    let base = format!("http://{}/v1", s.addr);
    client(&py, &[&base, "basic"]);
    // Killed (SIGKILL) once some lines are written, long before the last. Where the machine is
    // busy (other tests share its cores) the batch can end between two looks at it: then a batch
    // four times as long is submitted, up to three times.
    let mut lines = 200;
    let id = 'submit: loop {
        let sub = client(&py, &[&base, "submit", &lines.to_string()]);
        let id = sub["batch"].as_str().unwrap().to_string();
        let t0 = std::time::Instant::now();
        loop {
            let (_, b) = call(&s, "GET", &format!("/v1/batches/{id}"), None, None);
            let done = b["request_counts"]["completed"].as_u64().unwrap_or(0);
            if done >= 16 {
                if done < lines {
                    eprintln!("killing the server with {done} of {lines} lines written");
                    break 'submit id;
                }
                assert!(lines < 200 * 64, "every batch ended before the kill: {b}");
                eprintln!("the batch of {lines} lines ended before the kill; a longer one");
                lines *= 4;
                break;
            }
            assert!(t0.elapsed().as_secs() < 300, "the batch makes no progress: {b}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    };
    drop(s); // Child::kill: SIGKILL
    let s = start(&args);
    let base = format!("http://{}/v1", s.addr);
    let done = client(&py, &[&base, "finish", &id, &lines.to_string()]);
    let n = Some(lines);
    assert_eq!((done["lines"].as_u64(), done["distinct"].as_u64()), (n, n));
}

#[test]
fn five_hundred_concurrent_clients_are_all_answered_in_bounded_time() {
    let Some(py) = skip_without_openai() else { return };
    let s = start(&["--gpu-batch-size", "32", "--num-gpu-batches", "2", "--max-queue", "1000"]);
    let base = format!("http://{}/v1", s.addr);
    let t0 = std::time::Instant::now();
    let v = client(&py, &[&base, "load", "500"]);
    assert_eq!(v["statuses"], json!({"200": 500}), "{v}");
    assert!(t0.elapsed().as_secs() < 600, "500 requests took {:?}", t0.elapsed());
}

#[test]
fn a_profile_plans_the_policy_at_start_up() {
    let hw = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/hardware/t4-16gb.toml");
    let hw = hw.to_str().unwrap();
    let s = start(&["--profile", hw, "--max-prompt-tokens", "64", "--max-tokens-limit", "16"]);
    // Limits beyond the model's positions are named.
    let out =
        Command::new(env!("CARGO_BIN_EXE_flexgen-serve")).args(["--profile", hw]).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("--max-prompt-tokens"), "{err}");
    let planned = s.banner.iter().find(|l| l.contains("planned on")).expect("a plan line");
    assert!(planned.contains("tok/s predicted"), "{planned}");
    assert!(!complete(&s, "In the beginning", 6).is_empty());
    drop(s);
    // A flag on top of the plan is applied; a policy file beside a profile is refused.
    let limits = ["--max-prompt-tokens", "64", "--max-tokens-limit", "16"];
    let s = start(
        &[&["--profile", hw, "--gpu-batch-size", "3", "--num-gpu-batches", "1"], &limits[..]]
            .concat(),
    );
    assert!(!complete(&s, "Jesus wept", 4).is_empty());
    let out = Command::new(env!("CARGO_BIN_EXE_flexgen-serve"))
        .args(["--profile", hw, "--policy", "p.toml"])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("cannot be used with"), "{err}");
}

#[test]
fn sigterm_answers_the_requests_in_flight_then_exits_0() {
    let mut s = start(&[]);
    let addr = s.addr.clone();
    // A long request, then SIGTERM while it generates.
    let long = std::thread::spawn(move || {
        let body = json!({"prompt": "In the beginning", "max_tokens": 200, "temperature": 0});
        let mut c = TcpStream::connect(&addr).unwrap();
        let body = body.to_string();
        write!(
            c,
            "POST /v1/completions HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut out = String::new();
        c.read_to_string(&mut out).unwrap();
        out
    });
    std::thread::sleep(std::time::Duration::from_millis(300));
    let pid = s.child.id().to_string();
    assert!(Command::new("kill").args(["-TERM", &pid]).status().unwrap().success());
    let out = long.join().unwrap();
    assert!(out.starts_with("HTTP/1.1 200"), "the request in flight is answered: {out}");
    let status = s.child.wait().unwrap();
    assert!(status.success(), "exit status after SIGTERM: {status}");
    assert!(TcpStream::connect(&s.addr).is_err(), "no connections after the shutdown");
}

/// A metric's value from `/metrics`.
fn metric(s: &Server, name: &str) -> f64 {
    let out = raw(s, "GET", "/metrics", "", None);
    out.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or_else(|| panic!("{name} in {out}"))
}

/// The `max_tokens` of the mixed-length batch's lines, by line number modulo 5.
const LENGTHS: [u32; 5] = [2, 4, 6, 8, 10];

#[test]
fn a_batchs_lines_share_one_engine_call_and_each_equals_its_own_completion() {
    let state = tempfile::tempdir().unwrap();
    let dir = state.path().to_str().unwrap().to_string();
    let s = start(&["--state-dir", &dir, "--gpu-batch-size", "2", "--num-gpu-batches", "2"]);
    // 40 lines of mixed lengths: ten blocks of four, one call (at most 32 blocks).
    let lines: Vec<String> = (0..40)
        .map(|i| batch_line(&format!("l{i}"), PROMPTS[i % PROMPTS.len()], LENGTHS[i % 5]))
        .collect();
    let b = run_lines(&s, &lines);
    assert_eq!(b["request_counts"], json!({"total": 40, "completed": 40, "failed": 0}), "{b}");
    let calls = metric(&s, "flexgen_generate_calls_total");
    assert!(calls <= 2.0, "40 lines in {calls} engine calls");
    // Run longest first and refilled, each line still gets its own greedy text.
    let out = results(&s, b["output_file_id"].as_str().unwrap());
    assert_eq!(out.len(), 40);
    for (cid, v) in out.iter().filter(|(c, _)| ["l0", "l7", "l13", "l39"].contains(&c.as_str())) {
        let i: usize = cid[1..].parse().unwrap();
        let text = v["response"]["body"]["choices"][0]["text"].as_str().unwrap();
        assert_eq!(text, complete(&s, PROMPTS[i % PROMPTS.len()], LENGTHS[i % 5]), "{cid}");
    }
}
