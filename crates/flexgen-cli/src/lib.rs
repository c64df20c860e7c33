//! Shared pieces of the three binaries: logging set-up, the policy flags that mirror the original
//! `FlexGen`'s command line, and where the bundled model lives. Each binary's `main` stays thin.

pub mod batch;
pub mod chat;

use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use flexgen_policy::{Placement, Policy};

/// The `main` of every binary: logging, then `run`; an error is printed once with its chain and
/// the process exits with status 1.
pub fn main_with<A>(
    args: &A,
    run: impl FnOnce(&A) -> anyhow::Result<()>,
) -> std::process::ExitCode {
    init_logging();
    match run(args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", error_chain(&e));
            std::process::ExitCode::from(1)
        }
    }
}

/// A hint when `path` looks like the other kind of TOML file (it has a `marker` line, a table
/// only that kind has): where it belongs instead.
pub fn mixed_up(path: &std::path::Path, marker: &str, belongs: &str) -> String {
    let other = std::fs::read_to_string(path).is_ok_and(|t| t.lines().any(|l| l.trim() == marker));
    if other {
        let kind = if marker == "[gpu]" { "a hardware profile" } else { "a policy" };
        format!(" ({} is {kind}: give it to {belongs})", path.display())
    } else {
        String::new()
    }
}

/// `e` and its causes joined by ": ", leaving out a cause whose text the message so far already
/// ends with (error types that print their source inside their own message, as `GPU: {0}` does).
pub fn error_chain(e: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in e.chain() {
        let text = cause.to_string();
        if out.ends_with(&text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(&text);
    }
    out
}

/// Installs the tracing subscriber (`RUST_LOG`, default `warn`).
pub fn init_logging() {
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

/// The model that ships with flexgen: a 4-layer OPT trained on the King James Bible.
pub fn bundled_model_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../flexgen-model/models/opt-kjv")
}

/// A model directory loaded for its device: on CUDA its tensors stay in the files until the
/// executor uploads the tables and places each layer (`Model::open_lazy`: no f32 copy of the
/// model in host memory, and no tables kept there), on the CPU whole (`Model::load`).
pub fn load_model_dir(dir: &std::path::Path, cuda: bool) -> anyhow::Result<flexgen_model::Model> {
    let loaded =
        if cuda { flexgen_model::Model::open_lazy(dir) } else { flexgen_model::Model::load(dir) };
    loaded.with_context(|| format!("loading model {}", dir.display()))
}

/// Dummy weights of `spec` for its device: on CUDA made by the executor, the tables when it
/// uploads them and the layers in fp16 where the policy places them (`Model::dummy_lazy`).
pub fn dummy_model(
    spec: flexgen_policy::ModelSpec,
    init: flexgen_model::DummyInit,
    cuda: bool,
) -> flexgen_model::Result<flexgen_model::Model> {
    if cuda {
        flexgen_model::Model::dummy_lazy(spec, init)
    } else {
        flexgen_model::Model::dummy(spec, init)
    }
}

/// Policy flags. Each one overrides the same field of `--policy FILE` (or of the default policy).
#[derive(Debug, Clone, Args)]
pub struct PolicyArgs {
    /// Policy file (TOML) written by flexgen-plan or by hand; see policies/ and docs/policy-format.md.
    #[arg(long, value_name = "FILE", help_heading = "Policy")]
    pub policy: Option<PathBuf>,
    /// Placement as six percentages, as in the original `FlexGen`: weights GPU, weights CPU, KV cache
    /// GPU, KV cache CPU, activations GPU, activations CPU. What is left of 100 in each pair goes
    /// to disk (needs --offload-dir). Example: `0 100 100 0 100 0` = weights on the CPU, cache and
    /// activations on the GPU.
    #[arg(long, num_args = 6, value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"], help_heading = "Policy")]
    pub percent: Option<Vec<f64>>,
    /// Sequences per GPU micro-batch.
    #[arg(long, value_name = "N", help_heading = "Policy")]
    pub gpu_batch_size: Option<u32>,
    /// Micro-batches per block; the block (effective batch) is gpu-batch-size × num-gpu-batches.
    #[arg(long, value_name = "N", help_heading = "Policy")]
    pub num_gpu_batches: Option<u32>,
    /// Run decode attention on the CPU where the KV cache lives there.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Policy")]
    pub cpu_cache_compute: Option<bool>,
    /// Keep CPU-resident weights in pinned memory (0 saves host memory, costs bandwidth).
    #[arg(long, value_name = "0|1", value_parser = parse_flag, help_heading = "Policy")]
    pub pin_weight: Option<bool>,
    /// Compress weights to 4 bits in groups of 64.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Policy")]
    pub compress_weight: Option<bool>,
    /// Compress the KV cache to 4 bits in groups of 64.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL", help_heading = "Policy")]
    pub compress_cache: Option<bool>,
    /// Folder for the disk tier.
    #[arg(long, value_name = "DIR", help_heading = "Policy")]
    pub offload_dir: Option<PathBuf>,
}

fn parse_flag(s: &str) -> Result<bool, String> {
    match s {
        "1" | "true" => Ok(true),
        "0" | "false" => Ok(false),
        _ => Err(format!("`{s}`: expected 0 or 1")),
    }
}

impl PolicyArgs {
    /// The policy file (or the default) with the flags applied, validated.
    pub fn resolve(&self) -> anyhow::Result<Policy> {
        let p = match &self.policy {
            // The error names the file; the context names the flag. Validated below, once the
            // flags are applied.
            Some(path) => Policy::parse_toml_file(path).with_context(|| {
                format!(
                    "reading the policy (--policy){}",
                    mixed_up(path, "[gpu]", "flexgen-plan --hardware")
                )
            })?,
            None => Policy::default(),
        };
        let origin = self
            .policy
            .as_ref()
            .map_or_else(|| "the default policy".to_string(), |p| p.display().to_string());
        self.apply(p, &origin)
    }

    /// `p` (from `origin`, for the error) with the flags applied, validated.
    pub fn apply(&self, mut p: Policy, origin: &str) -> anyhow::Result<Policy> {
        if let Some(v) = &self.percent {
            let six: [f64; 6] = v.as_slice().try_into().context("--percent takes six numbers")?;
            p.placement = Placement::from_percent(six)?;
        }
        if let Some(v) = self.gpu_batch_size {
            p.gpu_batch_size = v;
        }
        if let Some(v) = self.num_gpu_batches {
            p.num_gpu_batches = v;
        }
        if let Some(v) = self.cpu_cache_compute {
            p.cpu_cache_compute = v;
        }
        if let Some(v) = self.pin_weight {
            p.pin_weight = v;
        }
        if let Some(v) = self.compress_weight {
            p.compress_weight.enabled = v;
        }
        if let Some(v) = self.compress_cache {
            p.compress_cache.enabled = v;
        }
        if let Some(v) = &self.offload_dir {
            p.offload_dir = Some(v.clone());
        }
        p.validate()
            .with_context(|| format!("policy from {origin} with the command-line overrides"))?;
        Ok(p)
    }
}

/// The spec of `model`: a Hugging Face model directory (its config.json; the weights need not be
/// there, so a config alone gives a shape to plan or to run with dummy weights) or a catalog name.
pub fn model_spec(model: &str) -> anyhow::Result<flexgen_policy::ModelSpec> {
    let path = std::path::PathBuf::from(model);
    let config = path.join("config.json");
    if config.is_file() {
        let text = std::fs::read_to_string(&config)
            .with_context(|| format!("reading {}", config.display()))?;
        let name = std::fs::canonicalize(&path)
            .ok()
            .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
            .unwrap_or_else(|| model.to_string());
        return Ok(flexgen_model::spec_from_config_json(&text, &config, &name)?);
    }
    if path.is_dir() {
        let files = flexgen_model::resolve(&path)?;
        let text = std::fs::read_to_string(&files.config)
            .with_context(|| format!("reading {}", files.config.display()))?;
        let name = files
            .dir
            .file_name()
            .map_or_else(|| model.to_string(), |n| n.to_string_lossy().into_owned());
        return Ok(flexgen_model::spec_from_config_json(&text, &files.config, &name)?);
    }
    Ok(flexgen_model::spec_by_name(model)?)
}

/// The values of dummy weights (`--dummy [ones|random]`).
#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum DummyKind {
    /// Every weight 1 (`FlexGen`'s convention).
    Ones,
    /// Seeded pseudo-random values.
    Random,
}

impl DummyKind {
    /// The values it names, random ones drawn from `seed`.
    pub fn init(self, seed: u64) -> flexgen_model::DummyInit {
        match self {
            DummyKind::Ones => flexgen_model::DummyInit::Ones,
            DummyKind::Random => flexgen_model::DummyInit::Random { seed },
        }
    }
}

/// Peak resident memory of this process in bytes (Linux `VmHWM`), if known.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb * 1024)
}

/// Bytes as a short human string (GiB/MiB/KiB).
pub fn human_bytes(b: u64) -> String {
    let b = b as f64;
    if b >= 1024.0 * 1024.0 * 1024.0 {
        format!("{:.2} GiB", b / (1024.0 * 1024.0 * 1024.0))
    } else if b >= 1024.0 * 1024.0 {
        format!("{:.1} MiB", b / (1024.0 * 1024.0))
    } else {
        format!("{:.1} KiB", b / 1024.0)
    }
}

/// Parses sizes like `16GiB`, `24GB`, `512MiB`, `1000000`.
pub fn parse_bytes(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 =
        num.parse().map_err(|_| format!("`{s}`: expected a size such as 16GiB or 24GB"))?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1e3,
        "mb" => 1e6,
        "gb" => 1e9,
        "tb" => 1e12,
        "kib" | "k" => 1024.0,
        "mib" | "m" => 1024.0 * 1024.0,
        "gib" | "g" => 1024.0 * 1024.0 * 1024.0,
        "tib" | "t" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        u => return Err(format!("`{s}`: unknown unit `{u}` (use B, KB, MB, GB, KiB, MiB, GiB)")),
    };
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "sizes are positive and far below 2^64"
    )]
    Ok((n * mult) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_with_units() {
        assert_eq!(parse_bytes("16GiB").unwrap(), 16 << 30);
        assert_eq!(parse_bytes("24GB").unwrap(), 24_000_000_000);
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert!(parse_bytes("16XB").unwrap_err().contains("unknown unit"));
    }

    #[derive(Debug, thiserror::Error)]
    enum Inner {
        #[error("CUDA library libnvrtc not found")]
        Missing,
    }

    #[derive(Debug, thiserror::Error)]
    enum Outer {
        #[error("GPU: {0}")]
        Gpu(#[from] Inner),
    }

    #[test]
    fn a_cause_already_in_its_parent_message_is_printed_once() {
        let e = anyhow::Error::from(Outer::from(Inner::Missing)).context("setting up");
        assert_eq!(error_chain(&e), "setting up: GPU: CUDA library libnvrtc not found");
        // A cause that its parent does not repeat stays.
        let e = anyhow::Error::from(Inner::Missing).context("loading");
        assert_eq!(error_chain(&e), "loading: CUDA library libnvrtc not found");
    }
}
