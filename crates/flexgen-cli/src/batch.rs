//! `flexgen-run batch`: a resumable JSONL batch job.
//!
//! Input: one JSON object per line, `{"id": …, "prompt": "…", "max_new_tokens": N,
//! "temperature": T, "stop": ["…"]}` (only `prompt` is required; `id` defaults to the line
//! number). Output: one object per finished request, `{"id", "text", "tokens",
//! "finish_reason", "prompt_tokens"}`, appended as each block completes and synced to disk.
//!
//! Resuming: the same command again reads the output first. Complete lines are requests done;
//! a torn last line (the process was killed while writing it) is cut off; every other request
//! runs. The lines of the requests that finished in a block are written by one `write` when the
//! block ends, and synced, so a kill at any moment loses at most the requests in flight, and
//! they are redone, never written twice. Sampled requests draw from a seed made of `--seed` and
//! their id, so a rerun gives them the same tokens.
//!
//! Order: longest `max_new_tokens` first, longest prompts first within one, and blocks refill:
//! once half a block has finished, its unfinished requests move to the next block beside new ones
//! (`GenerationConfig::refill`; `--no-refill` runs each block to its end).

use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use flexgen_model::Model;
use flexgen_runtime::{Event, GenerationConfig, Generator, Prompt, Request, Sampling};
use serde::{Deserialize, Serialize};

/// What to do with an input line that is not a valid request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnError {
    /// Stop before generating anything, naming the line.
    Stop,
    /// Write the line and its error to the errors file and go on.
    Skip,
}

/// Settings of one batch job.
#[derive(Debug, Clone)]
pub struct BatchJob {
    pub input: PathBuf,
    pub output: PathBuf,
    /// Where skipped lines go (default: the output path with `.errors.jsonl`).
    pub errors: Option<PathBuf>,
    pub on_error: OnError,
    /// Defaults for requests that do not set them.
    pub max_new_tokens: usize,
    pub temperature: Option<f32>,
    pub top_k: Option<usize>,
    pub top_p: Option<f32>,
    pub seed: u64,
    pub stop_on_eos: bool,
    /// Refill blocks from the queue ([`GenerationConfig::refill`]).
    pub refill: bool,
    pub progress: bool,
}

/// One input line.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InputLine {
    id: Option<serde_json::Value>,
    prompt: String,
    max_new_tokens: Option<usize>,
    temperature: Option<f32>,
    stop: Option<StopField>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum StopField {
    One(String),
    Many(Vec<String>),
}

/// One output line.
#[derive(Debug, Serialize, Deserialize)]
pub struct OutputLine {
    pub id: serde_json::Value,
    pub text: String,
    pub tokens: Vec<u32>,
    pub finish_reason: String,
    pub prompt_tokens: usize,
}

/// What a job did.
#[derive(Debug, Clone, Copy, Default)]
pub struct BatchReport {
    pub total: usize,
    pub already_done: usize,
    pub generated_requests: usize,
    pub generated_tokens: usize,
    pub skipped_lines: usize,
    /// Wall time of the whole job.
    pub seconds: f64,
    /// Seconds from the start to the generator being ready (reading, tokenizing, set-up).
    pub setup_s: f64,
    /// Seconds inside `generate`, all blocks together.
    pub generate_s: f64,
    /// Blocks run.
    pub blocks: usize,
    /// Context tokens prefilled again for requests moved to a later block (refill).
    pub recomputed_tokens: usize,
    /// Seconds of prefill and decode steps inside `generate` (the rest of `generate_s` is the
    /// device's one-time set-up on first use and the work between blocks).
    pub steps_s: f64,
}

/// The largest request of the job's remaining work, which the generator is sized for.
#[derive(Debug, Clone, Copy)]
pub struct JobShape {
    pub max_prompt_tokens: usize,
    pub max_new_tokens: usize,
}

/// An input line that is not a valid request: its number, the error, the line.
type BadLine = (usize, String, String);

struct Pending {
    id: serde_json::Value,
    request: Request,
    order: usize,
    /// The input line, for the errors file.
    line: String,
}

/// The canonical text of an id (numbers and strings as JSON), for matching done lines.
fn id_key(id: &serde_json::Value) -> String {
    id.to_string()
}

/// A seed per request: the job seed mixed with the id (`SplitMix64` of an FNV hash).
fn seed_for(seed: u64, id: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in id.bytes() {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    let mut z = seed ^ h;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

impl BatchJob {
    /// Reads and checks every input line. Bad lines stop the job (`OnError::Stop`) or are
    /// returned with their line number and message.
    fn read_input(&self) -> anyhow::Result<(Vec<Pending>, Vec<BadLine>)> {
        let file = File::open(&self.input)
            .with_context(|| format!("opening the input {}", self.input.display()))?;
        let mut pending = Vec::new();
        let mut bad = Vec::new();
        let mut seen = HashSet::new();
        for (i, bytes) in BufReader::new(file).split(b'\n').enumerate() {
            let n = i + 1;
            let mut bytes =
                bytes.with_context(|| format!("{}:{n}: reading", self.input.display()))?;
            if bytes.last() == Some(&b'\r') {
                bytes.pop();
            }
            // A line that is not UTF-8 is a bad line like any other (named, or skipped).
            let (line, text) = match String::from_utf8(bytes) {
                Ok(line) => (line, Ok(())),
                Err(e) => {
                    let at = e.utf8_error().valid_up_to();
                    let lossy = String::from_utf8_lossy(e.as_bytes()).into_owned();
                    (lossy, Err(format!("not UTF-8 text (invalid byte at column {})", at + 1)))
                }
            };
            if line.trim().is_empty() && text.is_ok() {
                continue;
            }
            let checked = text
                .and_then(|()| self.check_line(n, &line, &mut seen))
                .map(|(id, request)| Pending { id, request, order: n, line: line.clone() });
            match checked {
                Ok(p) => pending.push(p),
                Err(e) if self.on_error == OnError::Stop => bail!(
                    "{}:{n}: {e}\n(use --on-error skip to write bad lines to an errors file and go on)",
                    self.input.display()
                ),
                Err(e) => bad.push((n, e, line)),
            }
        }
        Ok((pending, bad))
    }

    /// Checks input line `n` (`line`, one JSON object) into its id and request; `seen` holds
    /// the ids of earlier lines. The message names what is wrong.
    fn check_line(
        &self,
        n: usize,
        line: &str,
        seen: &mut HashSet<String>,
    ) -> Result<(serde_json::Value, Request), String> {
        let l: InputLine = serde_json::from_str(line).map_err(|e| e.to_string())?;
        let id = l.id.clone().unwrap_or_else(|| serde_json::Value::from(n));
        if !(id.is_string() || id.is_u64() || id.is_i64()) {
            return Err("`id` must be a string or an integer".to_string());
        }
        if !seen.insert(id_key(&id)) {
            return Err(format!("duplicate id {id}"));
        }
        if l.prompt.is_empty() {
            return Err("`prompt` is empty".into());
        }
        if l.max_new_tokens == Some(0) {
            return Err("`max_new_tokens` is 0".into());
        }
        let temperature = l.temperature.or(self.temperature).filter(|t| *t > 0.0);
        let sampling = match temperature {
            Some(t) if t.is_finite() => Sampling::Random {
                temperature: t,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: seed_for(self.seed, &id_key(&id)),
            },
            Some(_) => return Err("`temperature` must be finite".into()),
            None => Sampling::Greedy,
        };
        let stop = match l.stop {
            Some(StopField::One(s)) => Some(vec![s]),
            Some(StopField::Many(v)) => Some(v),
            None => None,
        };
        let mut request = Request::text(l.prompt);
        request.max_new_tokens = Some(l.max_new_tokens.unwrap_or(self.max_new_tokens));
        request.stop = stop;
        request.sampling = Some(sampling);
        Ok((id, request))
    }

    /// Checks one input line as the job does (for fuzzing the format): `Err` names the fault.
    pub fn check_input_line(&self, line: &str) -> Result<(), String> {
        self.check_line(1, line, &mut HashSet::new()).map(|_| ())
    }

    fn errors_path(&self) -> PathBuf {
        self.errors.clone().unwrap_or_else(|| {
            let mut p = self.output.clone().into_os_string();
            p.push(".errors.jsonl");
            PathBuf::from(p)
        })
    }

    /// Runs the job, resuming from what `output` already holds: reads and tokenizes the
    /// remaining requests, then asks `make` for a generator sized for the largest of them.
    pub fn run<'m>(
        &self,
        model: &'m Model,
        make: impl FnOnce(JobShape) -> anyhow::Result<Generator<'m>>,
    ) -> anyhow::Result<BatchReport> {
        let started = std::time::Instant::now();
        let tokenizer = model.tokenizer.as_ref().context(
            "a batch job needs a tokenizer for its text prompts; this model has none \
             (with --dummy, give --tokenizer PATH)",
        )?;
        let (pending, mut bad) = self.read_input()?;
        // One job per output file: a second one would write the same requests again.
        let mut out = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.output)
            .with_context(|| format!("opening the output {}", self.output.display()))?;
        if let Err(e) = out.try_lock() {
            bail!(
                "{} is being written by another batch job ({e}); wait for it to finish or stop it",
                self.output.display()
            );
        }
        let done = resume_output(&self.output)?;
        let total = pending.len() + bad.len();
        let mut todo: Vec<(Pending, usize, usize)> = Vec::new();
        let positions = model.spec.max_positions as usize;
        for mut p in pending {
            if done.contains(&id_key(&p.id)) {
                continue;
            }
            let Prompt::Text(text) = &p.request.prompt else { unreachable!("lines are text") };
            let checked = tokenizer.encode(text).map_err(|e| e.to_string()).and_then(|ids| {
                let max_new = p.request.max_new_tokens.unwrap_or(self.max_new_tokens);
                if ids.len().saturating_add(max_new) > positions {
                    return Err(format!(
                        "the prompt ({} tokens) + max_new_tokens ({max_new}) exceeds the model's \
                         {positions} positions",
                        ids.len()
                    ));
                }
                Ok((ids, max_new))
            });
            match checked {
                Ok((ids, max_new)) => {
                    let n = ids.len();
                    p.request.prompt = Prompt::Tokens(ids);
                    todo.push((p, n, max_new));
                }
                Err(e) if self.on_error == OnError::Stop => bail!(
                    "{}:{}: {e}\n(use --on-error skip to write bad lines to an errors file and go on)",
                    self.input.display(),
                    p.order
                ),
                Err(e) => bad.push((p.order, e, p.line)),
            }
        }
        let mut report = BatchReport { total, skipped_lines: bad.len(), ..BatchReport::default() };
        if !bad.is_empty() {
            let path = self.errors_path();
            let mut f = File::create(&path)
                .with_context(|| format!("creating the errors file {}", path.display()))?;
            for (n, e, raw) in &bad {
                let line = serde_json::json!({ "line": n, "error": e, "input": raw });
                writeln!(f, "{line}")?;
            }
            f.sync_all()?;
            eprintln!(
                "{} bad input line(s) skipped, listed with their errors in {}",
                bad.len(),
                path.display()
            );
        }
        report.already_done = report.total - report.skipped_lines - todo.len();
        // Longest first, and within a length budget the longest prompts first: short requests
        // then fill the slots that finished sequences free (refill), and the sequences that move
        // to a later block are the shorter prompts, whose context fits the widest block.
        todo.sort_by_key(|(p, n, max_new)| {
            (std::cmp::Reverse(*max_new), std::cmp::Reverse(*n), p.order)
        });
        if todo.is_empty() {
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        let shape = JobShape {
            max_prompt_tokens: todo.iter().map(|t| t.1).max().unwrap_or(1),
            max_new_tokens: todo.iter().map(|t| t.2).max().unwrap_or(1),
        };
        let generator = make(shape)?;
        report.setup_s = started.elapsed().as_secs_f64();
        let todo: Vec<Pending> = todo.into_iter().map(|t| t.0).collect();
        let bar = if self.progress {
            let b = indicatif::ProgressBar::new(todo.len() as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:40} {pos}/{len} requests  {per_sec}  {msg}  ETA {eta}",
                )
                .expect("a valid template"),
            );
            b
        } else {
            indicatif::ProgressBar::hidden()
        };
        let config = GenerationConfig {
            max_new_tokens: self.max_new_tokens,
            stop_on_eos: self.stop_on_eos,
            refill: self.refill,
            stream_text: false,
            ..GenerationConfig::default()
        };
        let requests: Vec<Request> = todo.iter().map(|p| p.request.clone()).collect();
        let generating = std::time::Instant::now();
        // Lines of the requests completed in the block that just ended; written with one write
        // and made durable at the block's end, before the next block starts.
        let mut lines = String::new();
        let mut write_error: Option<anyhow::Error> = None;
        let mut on_event = |e: Event<'_>| match e {
            Event::Completed { request, completion: c } => {
                report.generated_tokens += c.tokens.len();
                report.generated_requests += 1;
                let line = OutputLine {
                    id: todo[request].id.clone(),
                    text: c.text.clone().unwrap_or_default(),
                    tokens: c.tokens.clone(),
                    finish_reason: c.finish.as_str().into(),
                    prompt_tokens: c.prompt_tokens.len(),
                };
                lines.push_str(&serde_json::to_string(&line).expect("output lines serialize"));
                lines.push('\n');
                bar.inc(1);
            }
            Event::BlockEnd => {
                report.blocks += 1;
                if write_error.is_none() {
                    // The file's durable length before the block: a write that fails part way
                    // (a full file system) is cut back to it, so the file never ends in a torn
                    // line and holds only whole blocks.
                    let before = out.metadata().map(|m| m.len());
                    let written = out.write_all(lines.as_bytes()).and_then(|()| out.sync_data());
                    if let Err(e) = written {
                        let cut = before.and_then(|len| {
                            out.set_len(len)?;
                            out.sync_data()
                        });
                        let kept = if cut.is_ok() {
                            "the file ends at the last complete block"
                        } else {
                            "its last line may be torn (the next run cuts it)"
                        };
                        write_error = Some(anyhow::Error::new(e).context(format!(
                            "writing {}: the lines of this block were not written and {kept}; \
                             make room and run the same command again to go on",
                            self.output.display()
                        )));
                    }
                }
                lines.clear();
                #[expect(clippy::cast_precision_loss, reason = "a rate")]
                let tps = report.generated_tokens as f64 / started.elapsed().as_secs_f64();
                bar.set_message(format!("{tps:.1} tok/s"));
            }
            _ => {}
        };
        let generated = generator.generate(&requests, &config, &mut on_event);
        report.generate_s = generating.elapsed().as_secs_f64();
        let (_, stats) = generated.context("generating the batch")?;
        report.recomputed_tokens = stats.recomputed_tokens;
        report.steps_s = stats.prefill_s + stats.decode_s;
        if let Some(e) = write_error {
            return Err(e);
        }
        bar.finish_and_clear();
        report.seconds = started.elapsed().as_secs_f64();
        Ok(report)
    }
}

/// Cuts a torn last line off the JSONL file `path` (the bytes after its last newline: a process
/// killed while writing it), so that the next line appended starts a line of its own. Returns
/// the file's whole lines and how many bytes were cut; no file is no lines.
pub fn cut_torn_line(path: &Path) -> std::io::Result<(Vec<u8>, usize)> {
    let Ok(mut f) = OpenOptions::new().read(true).write(true).open(path) else {
        return Ok((Vec::new(), 0));
    };
    let mut bytes = Vec::new();
    f.read_to_end(&mut bytes)?;
    let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let cut = bytes.len() - whole;
    if cut > 0 {
        f.set_len(whole as u64)?;
        f.sync_all()?;
        bytes.truncate(whole);
    }
    Ok((bytes, cut))
}

/// The ids already in `output`, after cutting off a torn last line. A complete line that is not
/// valid output is an error naming the line (the file is not ours, or was edited).
pub fn resume_output(output: &Path) -> anyhow::Result<HashSet<String>> {
    let mut done = HashSet::new();
    let (bytes, cut) = cut_torn_line(output)?;
    if cut > 0 {
        eprintln!(
            "{}: cut a torn last line ({cut} bytes) left by an interrupted run",
            output.display()
        );
    }
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        if line.is_empty() {
            continue;
        }
        let parsed: OutputLine = serde_json::from_slice(line).with_context(|| {
            format!(
                "{}:{}: not a flexgen batch output line; move the file away to start afresh",
                output.display(),
                i + 1
            )
        })?;
        done.insert(id_key(&parsed.id));
    }
    Ok(done)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_torn_last_line_is_cut_and_complete_lines_count_as_done() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out.jsonl");
        let good = r#"{"id":1,"text":"a","tokens":[1],"finish_reason":"length","prompt_tokens":2}"#;
        std::fs::write(&p, format!("{good}\n{{\"id\":2,\"te")).unwrap();
        let done = resume_output(&p).unwrap();
        assert_eq!(done, HashSet::from(["1".to_string()]));
        assert_eq!(std::fs::read_to_string(&p).unwrap(), format!("{good}\n"));
        std::fs::write(&p, "garbage\n").unwrap();
        let err = resume_output(&p).unwrap_err().to_string();
        assert!(err.contains(":1: not a flexgen batch output line"), "{err}");
    }

    #[test]
    fn seeds_differ_by_id_and_repeat() {
        assert_eq!(seed_for(1, "\"a\""), seed_for(1, "\"a\""));
        assert_ne!(seed_for(1, "\"a\""), seed_for(1, "\"b\""));
        assert_ne!(seed_for(1, "\"a\""), seed_for(2, "\"a\""));
    }
}
