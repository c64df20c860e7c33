//! `flexgen-serve`: an OpenAI-compatible HTTP server on the flexgen engine.
//!
//! One engine thread owns the model and the [`Generator`]; HTTP handlers (axum on tokio) turn
//! requests into engine jobs. The engine takes the first waiting job, gathers every job that
//! arrives within `batch_wait` (up to a block's worth of prompts), and runs them together through
//! the one generate API: concurrent clients share blocks, which is where offloading's throughput
//! comes from. A job whose requests the engine refuses (a prompt too long, say) fails alone: the
//! batch is then run job by job.
//!
//! Endpoints: `GET /health`, `GET /v1/models`, `POST /v1/completions`, `POST
//! /v1/chat/completions`, each of the last two also streamed (`"stream": true`: server-sent
//! events of each request's text as the engine makes it, then `[DONE]`). Errors are `OpenAI`'s
//! shape, `{"error": {"message", "type", "param"}}`, naming the field at fault.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::Json;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use flexgen_model::Model;
use flexgen_runtime::{Completion, FinishReason, GenerationConfig, Generator, Request, Sampling};
use serde::Deserialize;
use serde_json::{Value, json};

mod batch;
mod template;

pub use template::ChatTemplate;

/// Server settings.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    /// The model's name in responses and `/v1/models`.
    pub model_name: String,
    /// Bearer token every request must carry (none: open).
    pub api_key: Option<String>,
    /// How long the engine waits for more jobs to share a block with the first.
    pub batch_wait: Duration,
    /// Prompts per block (the policy's): the engine stops gathering at this many.
    pub block_size: usize,
    /// The most new tokens a request may ask for.
    pub max_tokens_limit: usize,
    /// The most requests waiting for the engine; more are refused with 429.
    pub max_queue: usize,
    /// The largest upload to `/v1/files`, in bytes (other bodies: 2 MiB).
    pub max_upload_bytes: usize,
}

/// One engine job: requests, where their completions go, and (streamed) where their tokens go
/// as they come.
struct Job {
    requests: Vec<Request>,
    /// Taken when the job is answered (as soon as its last request completes).
    reply: Option<tokio::sync::oneshot::Sender<Result<Vec<Completion>, String>>>,
    tokens: Option<tokio::sync::mpsc::UnboundedSender<Piece>>,
}

/// A queued job's answer, to wait for outside the async runtime.
struct Pending {
    sent: bool,
    done: tokio::sync::oneshot::Receiver<Result<Vec<Completion>, String>>,
}

impl Pending {
    fn wait(self) -> Result<Vec<Completion>, String> {
        if !self.sent {
            return Err("the engine has stopped".to_string());
        }
        self.done.blocking_recv().map_err(|_| "the engine stopped before answering".to_string())?
    }
}

/// A streamed job's progress: request `index` (within the job) printed `text`, or ended.
#[derive(Debug)]
enum Piece {
    Text { index: usize, text: String },
    End { index: usize, reason: FinishReason },
}

/// Gives a closure that builds a generator over the model it is lent the signature
/// [`Engine::start`] needs (the generator borrows that model).
pub fn generator_builder<F>(f: F) -> F
where
    F: for<'m> FnOnce(&'m Model) -> anyhow::Result<Generator<'m>>,
{
    f
}

/// The engine thread's inbox, and what it has done.
#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    counts: Arc<Counts>,
}

/// What the engine has done, for `/health` and `/metrics`: jobs answered and the generate calls
/// they took (fewer calls than jobs: jobs shared blocks), jobs waiting, tokens, seconds
/// generating, bytes moved between tiers, and the last call's block fill.
#[derive(Debug, Default)]
struct Counts {
    requests: AtomicU64,
    calls: AtomicU64,
    queued: AtomicU64,
    prompt_tokens: AtomicU64,
    generated_tokens: AtomicU64,
    /// Microseconds inside generate calls.
    generate_us: AtomicU64,
    cpu_to_gpu: AtomicU64,
    gpu_to_cpu: AtomicU64,
    disk_read: AtomicU64,
    disk_write: AtomicU64,
    /// Prompts of the last call per thousand slots of the blocks it filled.
    fill_permille: AtomicU64,
}

impl Counts {
    fn record(
        &self,
        stats: &flexgen_runtime::RunStats,
        seconds: f64,
        prompts: usize,
        block: usize,
    ) {
        let add = |c: &AtomicU64, v: u64| c.fetch_add(v, Ordering::Relaxed);
        add(&self.prompt_tokens, stats.prompt_tokens as u64);
        add(&self.generated_tokens, stats.generated_tokens as u64);
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "µs")]
        add(&self.generate_us, (seconds * 1e6) as u64);
        let t = stats.tiers.traffic;
        add(&self.cpu_to_gpu, t.cpu_to_gpu);
        add(&self.gpu_to_cpu, t.gpu_to_cpu);
        add(&self.disk_read, t.disk_read);
        add(&self.disk_write, t.disk_write);
        let slots = prompts.div_ceil(block.max(1)).max(1) * block.max(1);
        let fill = (prompts * 1000 / slots) as u64;
        self.fill_permille.store(fill, Ordering::Relaxed);
    }
}

impl Engine {
    /// Starts the engine thread: `load` makes the model, `build` its generator (both on that
    /// thread, which owns them). Returns once both have succeeded, or with the first error.
    pub fn start(
        load: impl FnOnce() -> anyhow::Result<Model> + Send + 'static,
        build: impl for<'m> FnOnce(&'m Model) -> anyhow::Result<Generator<'m>> + Send + 'static,
        options: &ServeOptions,
    ) -> anyhow::Result<Self> {
        let (tx, rx) = mpsc::channel::<Job>();
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<()>>();
        let (wait, block) = (options.batch_wait, options.block_size.max(1));
        let counts = Arc::new(Counts::default());
        let c = counts.clone();
        std::thread::Builder::new().name("flexgen-engine".into()).spawn(move || {
            let model = match load() {
                Ok(m) => m,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            let generator = match build(&model) {
                Ok(g) => g,
                Err(e) => return drop(ready_tx.send(Err(e))),
            };
            let _ = ready_tx.send(Ok(()));
            serve_jobs(&generator, &rx, wait, block, &c);
        })?;
        ready_rx
            .recv()
            .map_err(|_| anyhow::anyhow!("the engine thread stopped while starting"))??;
        Ok(Self { tx, counts })
    }

    /// Queues each of `jobs` as a job of its own, all at once, so that the engine gathers them
    /// into shared calls; from a thread outside the async runtime (the batch worker): a handle
    /// per job, in order, to wait for its completions or refusal.
    fn submit_all(&self, jobs: impl Iterator<Item = Vec<Request>>) -> Vec<Pending> {
        jobs.map(|requests| {
            let (reply, done) = tokio::sync::oneshot::channel();
            self.counts.queued.fetch_add(1, Ordering::Relaxed);
            let sent = self.tx.send(Job { requests, reply: Some(reply), tokens: None }).is_ok();
            Pending { sent, done }
        })
        .collect()
    }

    /// Counts a new waiting job, or refuses it when `limit` are waiting already.
    fn enqueue(&self, limit: usize) -> Result<(), ApiError> {
        let before = self.counts.queued.fetch_add(1, Ordering::Relaxed);
        if before >= limit as u64 {
            self.counts.queued.fetch_sub(1, Ordering::Relaxed);
            return Err(ApiError {
                status: StatusCode::TOO_MANY_REQUESTS,
                message: format!("{before} requests are waiting (--max-queue): retry later"),
                kind: "rate_limit_error",
                param: None,
            });
        }
        Ok(())
    }

    /// Runs `requests` (in the next block with whatever else is waiting).
    async fn run(&self, requests: Vec<Request>) -> Result<Vec<Completion>, ApiError> {
        let (reply, done) = tokio::sync::oneshot::channel();
        self.tx
            .send(Job { requests, reply: Some(reply), tokens: None })
            .map_err(|_| ApiError::server("the engine has stopped"))?;
        done.await
            .map_err(|_| ApiError::server("the engine stopped before answering"))?
            .map_err(|m| ApiError::invalid(&m, None))
    }
}

/// Blocks of requests one generate call takes at most from jobs already waiting: a batch's
/// 2,000 lines in one or two calls (each call's last blocks cannot be refilled); an online
/// request that comes meanwhile waits for the call.
pub(crate) const CALL_BLOCKS: usize = 32;

/// The engine loop: gather jobs into a block's worth, generate, answer each.
fn serve_jobs(
    generator: &Generator<'_>,
    rx: &mpsc::Receiver<Job>,
    wait: Duration,
    block: usize,
    counts: &Counts,
) {
    let config =
        GenerationConfig { stop_on_eos: true, refill: true, ..GenerationConfig::default() };
    while let Ok(first) = rx.recv() {
        let mut jobs = vec![first];
        let deadline = Instant::now() + wait;
        let gathered = |jobs: &[Job]| jobs.iter().map(|j| j.requests.len()).sum::<usize>();
        while gathered(&jobs) < block {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        // Jobs already waiting beyond the block (a batch's lines) join the call, up to
        // CALL_BLOCKS blocks, so that the schedule refills the slots of finished sequences
        // from them instead of running each block to its longest request.
        while gathered(&jobs) < CALL_BLOCKS * block {
            // A batch's lines are queued back to back: a pause of 2 ms means its chunk is in.
            match rx.recv_timeout(Duration::from_millis(2)) {
                Ok(j) => jobs.push(j),
                Err(_) => break,
            }
        }
        counts.queued.fetch_sub(jobs.len() as u64, Ordering::Relaxed);
        counts.requests.fetch_add(jobs.len() as u64, Ordering::Relaxed);
        let Err(e) = generate(generator, &config, &mut jobs, (counts, block)) else { continue };
        let message = e.to_string();
        let waiting = jobs.iter().filter(|j| j.reply.is_some()).count();
        for j in jobs.iter_mut().filter(|j| j.reply.is_some()) {
            // One job's request may be at fault: run each unanswered job alone so that only it
            // fails.
            let r = if waiting > 1 {
                generate(generator, &config, std::slice::from_mut(j), (counts, block))
                    .map_err(|e| e.to_string())
            } else {
                Err(message.clone())
            };
            if let (Err(m), Some(reply)) = (r, j.reply.take()) {
                let _ = reply.send(Err(m));
            }
        }
    }
}

/// One generate call over `jobs`' requests, their tokens sent to the jobs that stream them, each
/// job answered as soon as its last request completes (its stream then ends), counted in
/// `counts` (with the blocks' fill of `block` prompts each).
fn generate(
    generator: &Generator<'_>,
    config: &GenerationConfig,
    jobs: &mut [Job],
    (counts, block): (&Counts, usize),
) -> flexgen_runtime::Result<()> {
    // Request r of the call is request i of job j; the call runs them longest first (the most
    // new tokens, then the longest prompt), as `flexgen-run batch` does, so that a block's
    // sequences end together and finished slots are refilled by shorter ones.
    let mut owners: Vec<(usize, usize)> = jobs
        .iter()
        .enumerate()
        .flat_map(|(j, job)| (0..job.requests.len()).map(move |i| (j, i)))
        .collect();
    owners.sort_by_key(|&(j, i)| {
        let r = &jobs[j].requests[i];
        let prompt = match &r.prompt {
            flexgen_runtime::Prompt::Text(t) => t.len(),
            flexgen_runtime::Prompt::Tokens(t) => t.len(),
        };
        let new = r.max_new_tokens.unwrap_or(config.max_new_tokens);
        (std::cmp::Reverse(new), std::cmp::Reverse(prompt))
    });
    let all: Vec<Request> = owners.iter().map(|&(j, i)| jobs[j].requests[i].clone()).collect();
    let mut slots: Vec<Vec<Option<Completion>>> =
        jobs.iter().map(|j| vec![None; j.requests.len()]).collect();
    let mut left: Vec<usize> = jobs.iter().map(|j| j.requests.len()).collect();
    let mut on_event = |e: flexgen_runtime::Event<'_>| {
        let (request, piece) = match e {
            flexgen_runtime::Event::Token { request, text, .. } if !text.is_empty() => {
                (request, Piece::Text { index: 0, text: text.to_string() })
            }
            flexgen_runtime::Event::Finished { request, reason } => {
                (request, Piece::End { index: 0, reason })
            }
            flexgen_runtime::Event::Completed { request, completion } => {
                let Some(&(j, i)) = owners.get(request) else { return };
                slots[j][i] = Some(completion.clone());
                left[j] -= 1;
                if left[j] == 0 {
                    jobs[j].tokens = None; // its stream ends
                    let done = std::mem::take(&mut slots[j]).into_iter().flatten().collect();
                    if let Some(reply) = jobs[j].reply.take() {
                        let _ = reply.send(Ok(done));
                    }
                }
                return;
            }
            _ => return,
        };
        let Some(&(j, index)) = owners.get(request) else { return };
        if let Some(tx) = &jobs[j].tokens {
            let _ = tx.send(match piece {
                Piece::Text { text, .. } => Piece::Text { index, text },
                Piece::End { reason, .. } => Piece::End { index, reason },
            });
        }
    };
    counts.calls.fetch_add(1, Ordering::Relaxed);
    let started = Instant::now();
    let (_, stats) = generator.generate(&all, config, &mut on_event)?;
    counts.record(&stats, started.elapsed().as_secs_f64(), all.len(), block);
    // A job without requests completes with nothing.
    for (j, job) in jobs.iter_mut().enumerate() {
        if let Some(reply) = job.reply.take() {
            let _ = reply.send(Ok(std::mem::take(&mut slots[j]).into_iter().flatten().collect()));
        }
    }
    Ok(())
}

/// An OpenAI-style error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    kind: &'static str,
    param: Option<&'static str>,
}

impl ApiError {
    fn invalid(message: &str, param: Option<&'static str>) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            message: message.to_string(),
            kind: "invalid_request_error",
            param,
        }
    }

    fn server(message: &str) -> Self {
        Self {
            status: StatusCode::INTERNAL_SERVER_ERROR,
            message: message.to_string(),
            kind: "server_error",
            param: None,
        }
    }
}

impl ApiError {
    /// The error as `OpenAI`'s JSON body.
    fn body(&self) -> Value {
        json!({"error": {"message": self.message, "type": self.kind, "param": self.param, "code": null}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = self.body();
        (self.status, Json(body)).into_response()
    }
}

/// What the handlers share.
struct AppState {
    engine: Engine,
    options: ServeOptions,
    template: ChatTemplate,
    /// The batch API's state directory, when the server has one.
    store: Option<batch::Store>,
}

/// The server's routes over `engine`; with `state_dir`, the batch API too, its worker started
/// here (resuming the batches a previous server left unfinished).
pub fn router(
    engine: Engine,
    options: ServeOptions,
    template: ChatTemplate,
    state_dir: Option<&std::path::Path>,
) -> anyhow::Result<axum::Router> {
    let (store, bell) = match state_dir {
        Some(d) => {
            let (s, bell) = batch::Store::open(d)?;
            (Some(s), Some(bell))
        }
        None => (None, None),
    };
    let upload_limit = options.max_upload_bytes;
    let state = Arc::new(AppState { engine, options, template, store });
    if let Some(bell) = bell {
        let st = state.clone();
        std::thread::Builder::new()
            .name("flexgen-batches".into())
            .spawn(move || batch::work(&st, &bell))?;
    }
    Ok(axum::Router::new()
        .route(
            "/v1/files",
            post(batch::upload).layer(axum::extract::DefaultBodyLimit::max(upload_limit)),
        )
        .route("/v1/files/{id}", get(batch::file))
        .route("/v1/files/{id}/content", get(batch::file_content))
        .route("/v1/batches", post(batch::create).get(batch::list))
        .route("/v1/batches/{id}", get(batch::retrieve))
        .route("/v1/batches/{id}/cancel", post(batch::cancel))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .with_state(state))
}

/// Liveness, and how many requests the engine has answered in how many generate calls.
async fn health(State(s): State<Arc<AppState>>) -> Json<Value> {
    let c = &s.engine.counts;
    Json(json!({
        "status": "ok",
        "requests": c.requests.load(Ordering::Relaxed),
        "generate_calls": c.calls.load(Ordering::Relaxed),
    }))
}

/// Prometheus metrics (text format 0.0.4).
async fn metrics(State(s): State<Arc<AppState>>) -> Response {
    use std::fmt::Write as _;
    let c = &s.engine.counts;
    let v = |a: &AtomicU64| a.load(Ordering::Relaxed);
    #[expect(clippy::cast_precision_loss, reason = "metrics")]
    let (secs, fill) = (v(&c.generate_us) as f64 / 1e6, v(&c.fill_permille) as f64 / 1e3);
    let mut out = String::new();
    for (name, kind, help, value) in [
        (
            "flexgen_requests_total",
            "counter",
            "HTTP requests the engine answered",
            v(&c.requests).to_string(),
        ),
        (
            "flexgen_generate_calls_total",
            "counter",
            "generate calls (requests arriving together share one)",
            v(&c.calls).to_string(),
        ),
        (
            "flexgen_queue_depth",
            "gauge",
            "requests waiting for the engine",
            v(&c.queued).to_string(),
        ),
        (
            "flexgen_prompt_tokens_total",
            "counter",
            "prompt tokens prefilled",
            v(&c.prompt_tokens).to_string(),
        ),
        (
            "flexgen_generated_tokens_total",
            "counter",
            "tokens generated",
            v(&c.generated_tokens).to_string(),
        ),
        (
            "flexgen_generate_seconds_total",
            "counter",
            "seconds inside generate calls (tokens/s: rate of generated tokens over this)",
            format!("{secs:.6}"),
        ),
        (
            "flexgen_block_fill",
            "gauge",
            "prompts of the last generate call as a share of a block",
            format!("{fill:.3}"),
        ),
    ] {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}");
    }
    out.push_str(
        "# HELP flexgen_bytes_moved_total bytes moved between memory tiers (PCIe and disk)\n\
                  # TYPE flexgen_bytes_moved_total counter\n",
    );
    for (dir, a) in [
        ("cpu_to_gpu", &c.cpu_to_gpu),
        ("gpu_to_cpu", &c.gpu_to_cpu),
        ("disk_read", &c.disk_read),
        ("disk_write", &c.disk_write),
    ] {
        let _ = writeln!(out, "flexgen_bytes_moved_total{{direction=\"{dir}\"}} {}", v(a));
    }
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}

fn authorize(state: &AppState, headers: &HeaderMap) -> Result<(), ApiError> {
    let Some(key) = &state.options.api_key else { return Ok(()) };
    let given = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    // Compared in time independent of where the bytes differ.
    let same = given.is_some_and(|g| {
        g.len() == key.len()
            && g.bytes().zip(key.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
    });
    if same {
        return Ok(());
    }
    Err(ApiError {
        status: StatusCode::UNAUTHORIZED,
        message: "missing or wrong API key: send `Authorization: Bearer KEY` with the key the \
                  server was started with (--api-key)"
            .into(),
        kind: "invalid_request_error",
        param: None,
    })
}

async fn models(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Result<Json<Value>, ApiError> {
    authorize(&s, &headers)?;
    Ok(Json(json!({
        "object": "list",
        "data": [{"id": s.options.model_name, "object": "model", "created": 0, "owned_by": "flexgen"}],
    })))
}

/// One string or a list of strings.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

/// The sampling fields both endpoints take.
#[derive(Debug, Deserialize)]
struct Knobs {
    max_tokens: Option<usize>,
    temperature: Option<f32>,
    top_p: Option<f32>,
    stop: Option<OneOrMany>,
    seed: Option<u64>,
    n: Option<u32>,
    stream: Option<bool>,
}

#[derive(Debug, Deserialize)]
struct CompletionBody {
    #[allow(dead_code, reason = "accepted: one model is served")]
    model: Option<String>,
    prompt: OneOrMany,
    #[serde(flatten)]
    knobs: Knobs,
}

#[derive(Debug, Deserialize)]
struct Message {
    role: String,
    content: String,
}

#[derive(Debug, Deserialize)]
struct ChatBody {
    #[allow(dead_code, reason = "accepted: one model is served")]
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(flatten)]
    knobs: Knobs,
}

/// Parses a JSON body, naming the field at fault.
fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::invalid(&format!("the request body is not a valid request: {e}"), None)
    })
}

impl Knobs {
    /// Engine requests for `prompts` with these settings (`OpenAI`'s defaults: 16 tokens,
    /// temperature 1).
    fn requests(&self, prompts: Vec<String>, limit: usize) -> Result<Vec<Request>, ApiError> {
        if self.n.is_some_and(|n| n != 1) {
            return Err(ApiError::invalid("n: one choice per prompt is served", Some("n")));
        }
        let max = self.max_tokens.unwrap_or(16);
        if max == 0 || max > limit {
            return Err(ApiError::invalid(
                &format!("max_tokens {max}: give 1 to {limit}"),
                Some("max_tokens"),
            ));
        }
        let t = self.temperature.unwrap_or(1.0);
        if !(t.is_finite() && (0.0..=2.0).contains(&t)) {
            return Err(ApiError::invalid(
                &format!("temperature {t}: give 0 (greedy) to 2"),
                Some("temperature"),
            ));
        }
        if let Some(p) = self.top_p
            && !(p.is_finite() && p > 0.0 && p <= 1.0)
        {
            return Err(ApiError::invalid(&format!("top_p {p}: give above 0 to 1"), Some("top_p")));
        }
        let stop = self.stop.as_ref().map(|s| match s {
            OneOrMany::One(s) => vec![s.clone()],
            OneOrMany::Many(v) => v.clone(),
        });
        if stop.as_ref().is_some_and(|s| s.len() > 4 || s.iter().any(String::is_empty)) {
            return Err(ApiError::invalid("stop: up to 4 non-empty strings", Some("stop")));
        }
        if prompts.is_empty() {
            return Err(ApiError::invalid("prompt: give at least one", Some("prompt")));
        }
        let seed = self.seed.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() ^ u64::from(d.subsec_nanos()) << 20)
        });
        Ok(prompts
            .into_iter()
            .enumerate()
            .map(|(i, p)| {
                let sampling = if t == 0.0 {
                    Sampling::Greedy
                } else {
                    Sampling::Random {
                        temperature: t,
                        top_k: None,
                        top_p: self.top_p.filter(|&p| p < 1.0),
                        seed: seed.wrapping_add(i as u64),
                    }
                };
                Request {
                    max_new_tokens: Some(max),
                    stop: stop.clone(),
                    sampling: Some(sampling),
                    ..Request::text(p)
                }
            })
            .collect())
    }
}

/// A streamed response: server-sent events, one per piece of text or end of a request, shaped
/// by `shape` (told whether the piece is its request's first), then `[DONE]`, or an error event
/// if the engine refused the job.
fn stream_response(
    engine: &Engine,
    requests: Vec<Request>,
    mut shape: impl FnMut(&Piece, bool) -> Value + Send + 'static,
) -> Result<Response, ApiError> {
    use axum::response::sse::{Event, Sse};
    let n = requests.len();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let (reply, done) = tokio::sync::oneshot::channel();
    engine
        .tx
        .send(Job { requests, reply: Some(reply), tokens: Some(tx) })
        .map_err(|_| ApiError::server("the engine has stopped"))?;
    let (events, mut out) = tokio::sync::mpsc::unbounded_channel::<String>();
    tokio::spawn(async move {
        let mut started = vec![false; n];
        // The pieces end when the engine drops the job, after its reply.
        while let Some(p) = rx.recv().await {
            let (Piece::Text { index, .. } | Piece::End { index, .. }) = &p;
            let first = started.get_mut(*index).is_some_and(|s| !std::mem::replace(s, true));
            let _ = events.send(shape(&p, first).to_string());
        }
        let last = match done.await {
            Ok(Ok(_)) => "[DONE]".to_string(),
            Ok(Err(m)) => {
                json!({"error": {"message": m, "type": "invalid_request_error"}}).to_string()
            }
            Err(_) => json!({"error": {"message": "the engine stopped", "type": "server_error"}})
                .to_string(),
        };
        let _ = events.send(last);
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        out.poll_recv(cx)
            .map(|d| d.map(|d| Ok::<_, std::convert::Infallible>(Event::default().data(d))))
    });
    Ok(Sse::new(stream).into_response())
}

fn finish(c: &Completion) -> &'static str {
    finish_reason(c.finish)
}

/// `OpenAI`'s word for why a sequence ended.
fn finish_reason(r: FinishReason) -> &'static str {
    match r {
        FinishReason::Length => "length",
        FinishReason::Eos | FinishReason::Stop => "stop",
    }
}

fn usage(done: &[Completion]) -> Value {
    let p: usize = done.iter().map(|c| c.prompt_tokens.len()).sum();
    let g: usize = done.iter().map(|c| c.tokens.len()).sum();
    json!({"prompt_tokens": p, "completion_tokens": g, "total_tokens": p + g})
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn id(prefix: &str) -> String {
    let n = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_nanos());
    format!("{prefix}-{n:x}")
}

/// The engine requests of a `/v1/completions` body (at most `limit` new tokens each), and
/// whether it asks to be streamed; or the error naming the field at fault.
pub fn completion_requests(body: &[u8], limit: usize) -> Result<(Vec<Request>, bool), ApiError> {
    let b: CompletionBody = parse(body)?;
    Ok((b.knobs.requests(b.prompt.into_vec(), limit)?, b.knobs.stream == Some(true)))
}

/// The engine request of a `/v1/chat/completions` body, its prompt rendered by `template`, and
/// whether it asks to be streamed; or the error naming the field at fault.
pub fn chat_requests(
    body: &[u8],
    template: &ChatTemplate,
    limit: usize,
) -> Result<(Vec<Request>, bool), ApiError> {
    let b: ChatBody = parse(body)?;
    if b.messages.is_empty() {
        return Err(ApiError::invalid("messages: give at least one", Some("messages")));
    }
    if let Some(m) =
        b.messages.iter().find(|m| !matches!(m.role.as_str(), "system" | "user" | "assistant"))
    {
        return Err(ApiError::invalid(
            &format!("messages: role `{}`: give system, user or assistant", m.role),
            Some("messages"),
        ));
    }
    let turns: Vec<(String, String)> =
        b.messages.into_iter().map(|m| (m.role, m.content)).collect();
    let prompt = template.render(&turns).map_err(|e| ApiError::invalid(&e, Some("messages")))?;
    let mut requests = b.knobs.requests(vec![prompt], limit)?;
    // A reply ends where the template would start the next turn.
    for r in &mut requests {
        let mut stop = r.stop.take().unwrap_or_default();
        stop.extend(template.turn_ends().iter().cloned());
        r.stop = Some(stop);
    }
    Ok((requests, b.knobs.stream == Some(true)))
}

async fn completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let (requests, streamed) = completion_requests(&body, s.options.max_tokens_limit)?;
    if streamed {
        let (id, created, model) = (id("cmpl"), now(), s.options.model_name.clone());
        s.engine.enqueue(s.options.max_queue)?;
        return stream_response(&s.engine, requests, move |p, _| {
            let (index, text, reason) = match p {
                Piece::Text { index, text } => (*index, text.as_str(), None),
                Piece::End { index, reason } => (*index, "", Some(finish_reason(*reason))),
            };
            json!({"id": id, "object": "text_completion", "created": created, "model": model,
                   "choices": [{"text": text, "index": index, "logprobs": null, "finish_reason": reason}]})
        });
    }
    s.engine.enqueue(s.options.max_queue)?;
    let done = s.engine.run(requests).await?;
    Ok(Json(completion_json(&done, &s.options.model_name)).into_response())
}

/// A `/v1/completions` response for `done`.
fn completion_json(done: &[Completion], model: &str) -> Value {
    let choices: Vec<Value> = done
        .iter()
        .enumerate()
        .map(|(i, c)| {
            json!({"text": c.text.clone().unwrap_or_default(), "index": i, "logprobs": null,
                   "finish_reason": finish(c)})
        })
        .collect();
    json!({
        "id": id("cmpl"), "object": "text_completion", "created": now(),
        "model": model, "choices": choices, "usage": usage(done),
    })
}

/// A `/v1/chat/completions` response for `done` (one completion).
fn chat_json(done: &[Completion], model: &str) -> Value {
    let c = &done[0];
    json!({
        "id": id("chatcmpl"), "object": "chat.completion", "created": now(), "model": model,
        "choices": [{"index": 0, "finish_reason": finish(c),
                     "message": {"role": "assistant", "content": c.text.clone().unwrap_or_default().trim_start()}}],
        "usage": usage(done),
    })
}

async fn chat_completions(
    State(s): State<Arc<AppState>>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    authorize(&s, &headers)?;
    let (requests, streamed) = chat_requests(&body, &s.template, s.options.max_tokens_limit)?;
    if streamed {
        let (id, created, model) = (id("chatcmpl"), now(), s.options.model_name.clone());
        s.engine.enqueue(s.options.max_queue)?;
        // The reply without the whitespace it starts with, as the whole reply (`chat_json`).
        let mut spoken = false;
        return stream_response(&s.engine, requests, move |p, first| {
            let mut said = |text: &str| {
                let text = if spoken { text } else { text.trim_start() };
                spoken |= !text.is_empty();
                text.to_string()
            };
            let (delta, reason) = match p {
                Piece::Text { text, .. } if first => {
                    (json!({"role": "assistant", "content": said(text)}), None)
                }
                Piece::Text { text, .. } => (json!({"content": said(text)}), None),
                Piece::End { reason, .. } => (json!({}), Some(finish_reason(*reason))),
            };
            json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model,
                   "choices": [{"index": 0, "delta": delta, "finish_reason": reason}]})
        });
    }
    s.engine.enqueue(s.options.max_queue)?;
    let done = s.engine.run(requests).await?;
    Ok(Json(chat_json(&done, &s.options.model_name)).into_response())
}
