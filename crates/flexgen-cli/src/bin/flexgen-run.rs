//! `flexgen-run`: load a model and generate under a policy; report throughput and memory.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use flexgen_cli::{PolicyArgs, bundled_model_dir, human_bytes, peak_rss_bytes};
use flexgen_model::{DummyInit, Model};
use flexgen_runtime::{
    Budgets, Event, GenerationConfig, Generator, GpuCapacity, LayerSource, Request, Sampling,
};

const ABOUT: &str = "Generate text with a model under an offloading policy.";

const LONG_ABOUT: &str = "\
Generate text with a model under an offloading policy, and report prefill, decode and total
throughput.

With no arguments it runs the bundled model (a 4-layer OPT trained on the King James Bible) on a
default prompt. Point --model at any Hugging Face OPT directory (config.json, model.safetensors or a
sharded index, tokenizer.json) or cache entry; or give a spec name (opt-125m … opt-175b) with --dummy
to run without weight files, as FlexGen's benchmarks do.

The policy says where weights, KV cache and activations live (GPU / CPU / disk percentages), how
big the block is (gpu-batch-size × num-gpu-batches sequences share each transfer of a layer's
weights), and whether CPU attention, pinning and 4-bit compression are on. Write one with
flexgen-plan, take one from policies/, or set the fields with the flags below (they override the
file). docs/policy-format.md documents every field.

With --device cpu (the default) the tiered executor runs every policy: weights, KV cache and
activations are split across the tiers by the policy's shares, the disk tier is real (files in
--offload-dir read with direct I/O), and the GPU tier is host memory under --gpu-mem-limit. A
policy whose tiers cannot hold it is refused before anything is allocated. The report gives the
bytes each tier held and the bytes that crossed between tiers.

With --device cuda the CUDA executor runs on GPU 0 (greedy decoding, fp16): weights split by the
same exact shares across GPU, CPU (pinned unless --pin-weight 0) and disk (direct I/O), copied two
layers ahead on a separate stream; the KV cache split by (sequence, head) rows between GPU and CPU,
with CPU attention under --cpu-cache-compute; activations on the GPU or the CPU. The report gives
the memory held per tier, the bytes moved, and each decode step against the PCIe (and disk)
roofline measured in the same process. A KV cache on disk and 4-bit compression need --device cpu
for now.";

const EXAMPLES: &str = "\
Examples:
  flexgen-run                                    # bundled model, default prompt
  flexgen-run --prompt 'And God said' --max-new-tokens 40 --temperature 0.8 --seed 1
  flexgen-run --model ~/models/opt-125m --prompt-file prompts.txt --gpu-batch-size 8
  flexgen-run --model opt-1.3b --dummy --prompt-len 64 --max-new-tokens 8 --gpu-batch-size 4
  flexgen-run --policy policies/opt-30b-t4.toml --model opt-30b --dummy";

#[derive(Parser, Debug)]
#[command(name = "flexgen-run", version, about = ABOUT, long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
struct Cli {
    /// Hugging Face model directory or cache entry; with --dummy, a spec name such as opt-30b.
    /// Default: the bundled model.
    #[arg(long, value_name = "PATH|NAME")]
    model: Option<String>,
    /// Dummy weights instead of files: `ones` (FlexGen's convention) or `random` (seeded).
    #[arg(long, value_name = "KIND", num_args = 0..=1, default_missing_value = "ones")]
    dummy: Option<DummyKind>,
    /// A prompt; repeat for several.
    #[arg(long, value_name = "TEXT", help_heading = "Prompts")]
    prompt: Vec<String>,
    /// A file with one prompt per line.
    #[arg(long, value_name = "FILE", help_heading = "Prompts")]
    prompt_file: Option<PathBuf>,
    /// Synthetic prompts of N tokens (for dummy models and benchmarks).
    #[arg(long, value_name = "N", help_heading = "Prompts")]
    prompt_len: Option<usize>,
    /// Number of synthetic prompts (default: one block, gpu-batch-size × num-gpu-batches).
    #[arg(long, value_name = "N", help_heading = "Prompts")]
    num_prompts: Option<usize>,
    /// Tokens to generate per prompt.
    #[arg(
        long,
        alias = "gen-len",
        value_name = "N",
        default_value_t = 32,
        help_heading = "Generation"
    )]
    max_new_tokens: usize,
    /// Sample with this temperature (default: greedy).
    #[arg(long, value_name = "T", help_heading = "Generation")]
    temperature: Option<f32>,
    /// Sample only from the K most likely tokens.
    #[arg(long, value_name = "K", help_heading = "Generation")]
    top_k: Option<usize>,
    /// Sample only from the most likely tokens whose probability reaches P.
    #[arg(long, value_name = "P", help_heading = "Generation")]
    top_p: Option<f32>,
    /// Seed for sampling and for --dummy random.
    #[arg(long, default_value_t = 0, help_heading = "Generation")]
    seed: u64,
    /// Stop a sequence when its text contains this string (repeatable); the text is cut before it.
    #[arg(long, value_name = "TEXT", help_heading = "Generation")]
    stop: Vec<String>,
    /// Keep generating after the EOS token.
    #[arg(long, help_heading = "Generation")]
    ignore_eos: bool,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Compute device: `cpu` (tiered executor, every policy) or `cuda` (GPU 0; greedy decoding;
    /// every placement except a KV cache on disk; no compression yet).
    #[arg(long, value_enum, default_value = "cpu", help_heading = "Policy")]
    device: DeviceKind,
    /// Memory the GPU tier may use (e.g. 16GiB); a policy that needs more is refused up front.
    #[arg(long, value_name = "SIZE", value_parser = flexgen_cli::parse_bytes, help_heading = "Policy")]
    gpu_mem_limit: Option<u64>,
    /// Print the report as JSON on stdout instead of text.
    #[arg(long, help_heading = "Output")]
    json: bool,
    /// Do not print generated text.
    #[arg(long, short, help_heading = "Output")]
    quiet: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum DeviceKind {
    Cpu,
    Cuda,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum DummyKind {
    Ones,
    Random,
}

fn main() -> ExitCode {
    flexgen_cli::main_with(&Cli::parse(), run)
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let policy = cli.policy.resolve()?;
    let started = std::time::Instant::now();
    let model = load_model(cli)?;
    let load_s = started.elapsed().as_secs_f64();
    let requests = requests(cli, &model, policy.block_size())?;
    let sampling = match cli.temperature {
        Some(t) if t > 0.0 => {
            Sampling::Random { temperature: t, top_k: cli.top_k, top_p: cli.top_p, seed: cli.seed }
        }
        _ if cli.top_k.is_some() || cli.top_p.is_some() => {
            bail!("--top-k and --top-p need --temperature above 0")
        }
        _ => Sampling::Greedy,
    };
    let config = GenerationConfig {
        max_new_tokens: cli.max_new_tokens,
        sampling,
        stop: cli.stop.clone(),
        stop_on_eos: !cli.ignore_eos,
        output_logits: false,
        forced: None,
    };
    if cli.device == DeviceKind::Cuda {
        return run_cuda(cli, &model, &policy, &requests, load_s, started);
    }
    let budgets = Budgets { gpu_bytes: cli.gpu_mem_limit, ..Budgets::default() };
    let generator = Generator::with_budgets(&model, policy.clone(), budgets)?;
    let stream = !cli.quiet && !cli.json && requests.len() == 1 && model.tokenizer.is_some();
    let mut out = std::io::stdout().lock();
    if stream && let flexgen_runtime::Prompt::Text(p) = &requests[0].prompt {
        write!(out, "{p}")?;
    }
    let mut on_event = |e: Event<'_>| {
        if let Event::Token { text, .. } = e
            && stream
        {
            let _ = write!(out, "{text}");
            let _ = out.flush();
        }
    };
    let (completions, stats) = generator.generate(&requests, &config, &mut on_event)?;
    if stream {
        writeln!(out)?;
    }
    if !cli.quiet && !cli.json && !stream {
        for (i, (r, c)) in requests.iter().zip(&completions).enumerate() {
            let prompt = match &r.prompt {
                flexgen_runtime::Prompt::Text(t) => t.clone(),
                flexgen_runtime::Prompt::Tokens(t) => format!("<{} tokens>", t.len()),
            };
            let text = c.text.clone().unwrap_or_else(|| format!("{:?}", c.tokens));
            writeln!(out, "[{i}] {prompt}{text}")?;
        }
    }
    let p = &policy;
    let report = serde_json::json!({
        "model": model.spec.name,
        "weights": if model.dir.is_some() { "files" } else { "dummy" },
        "backend": "cpu",
        "policy": {
            "percent": p.placement.to_percent(),
            "gpu_batch_size": p.gpu_batch_size,
            "num_gpu_batches": p.num_gpu_batches,
            "cpu_cache_compute": p.cpu_cache_compute,
            "pin_weight": p.pin_weight,
            "compress_weight": p.compress_weight.enabled,
            "compress_cache": p.compress_cache.enabled,
        },
        "prompts": completions.len(),
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "blocks": stats.blocks,
        "load_s": load_s,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "prefill_tokens_per_s": stats.prefill_tokens_per_s(),
        "decode_tokens_per_s": stats.decode_tokens_per_s(completions.len()),
        "total_tokens_per_s": stats.total_tokens_per_s(),
        "peak_cpu_bytes": peak_rss_bytes(),
        "tier_bytes": { "gpu": stats.tiers.required.gpu, "cpu": stats.tiers.required.cpu, "disk": stats.tiers.required.disk },
        "bytes_moved": {
            "cpu_to_gpu": stats.tiers.traffic.cpu_to_gpu,
            "gpu_to_cpu": stats.tiers.traffic.gpu_to_cpu,
            "disk_read": stats.tiers.traffic.disk_read,
            "disk_write": stats.tiers.traffic.disk_write,
        },
        "direct_io": stats.direct_io,
        "projected": false,
        "predicted_tokens_per_s": p.prediction.as_ref().map(|x| x.throughput_tokens_per_s),
        "wall_s": started.elapsed().as_secs_f64(),
    });
    if cli.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    writeln!(
        err,
        "\nmodel {} ({} weights), {} prompts × {} new tokens, block {}×{}, backend cpu",
        model.spec.name,
        if model.dir.is_some() { "file" } else { "dummy" },
        completions.len(),
        cli.max_new_tokens,
        p.gpu_batch_size,
        p.num_gpu_batches
    )?;
    let (need, moved) = (stats.tiers.required, stats.tiers.traffic);
    writeln!(
        err,
        "tiers held: GPU {} | CPU {} | disk {}{}; moved: CPU→GPU {}, GPU→CPU {}, disk read {}, disk write {}",
        human_bytes(need.gpu),
        human_bytes(need.cpu),
        human_bytes(need.disk),
        match stats.direct_io {
            Some(true) => " (direct I/O)",
            Some(false) => " (buffered: O_DIRECT refused)",
            None => "",
        },
        human_bytes(moved.cpu_to_gpu),
        human_bytes(moved.gpu_to_cpu),
        human_bytes(moved.disk_read),
        human_bytes(moved.disk_write)
    )?;
    writeln!(
        err,
        "prefill {:.1} tok/s ({:.3} s) | decode {:.1} tok/s ({:.3} s) | total {:.1} tok/s | load {:.2} s",
        stats.prefill_tokens_per_s(),
        stats.prefill_s,
        stats.decode_tokens_per_s(completions.len()),
        stats.decode_s,
        stats.total_tokens_per_s(),
        load_s
    )?;
    let peak = peak_rss_bytes().map_or_else(|| "unknown".into(), human_bytes);
    write!(err, "peak memory: process RSS {peak} (CPU backend: the GPU tier is host memory)")?;
    match p.prediction.as_ref() {
        Some(pred) => writeln!(
            err,
            " | predicted {:.2} tok/s for {} on {}, measured {:.2}",
            pred.throughput_tokens_per_s,
            pred.model,
            pred.hardware,
            stats.total_tokens_per_s()
        )?,
        None => writeln!(err)?,
    }
    Ok(())
}

fn load_model(cli: &Cli) -> anyhow::Result<Model> {
    if let Some(kind) = cli.dummy {
        let name = cli.model.as_deref().context("--dummy needs --model NAME (e.g. opt-125m)")?;
        let spec = flexgen_model::spec_by_name(name)?;
        let init = match kind {
            DummyKind::Ones => DummyInit::Ones,
            DummyKind::Random => DummyInit::Random { seed: cli.seed },
        };
        // The CUDA executor fills the layers itself, in fp16, where the policy places them.
        let built = if cli.device == DeviceKind::Cuda {
            Model::dummy_tables(spec, init)
        } else {
            Model::dummy(spec, init)
        };
        return built.with_context(|| format!("building dummy weights for {name}"));
    }
    let dir = cli.model.as_ref().map_or_else(bundled_model_dir, PathBuf::from);
    if !dir.exists()
        && let Ok(spec) = flexgen_model::spec_by_name(&dir.to_string_lossy())
    {
        bail!(
            "{} is a model name, not a directory: add --dummy to run it with dummy weights",
            spec.name
        );
    }
    Model::load(&dir).with_context(|| format!("loading model {}", dir.display()))
}

fn requests(cli: &Cli, model: &Model, block: usize) -> anyhow::Result<Vec<Request>> {
    let mut texts = cli.prompt.clone();
    if let Some(f) = &cli.prompt_file {
        let body = std::fs::read_to_string(f)
            .with_context(|| format!("reading prompts from {}", f.display()))?;
        texts.extend(body.lines().filter(|l| !l.trim().is_empty()).map(str::to_string));
        if texts.is_empty() {
            bail!("{} has no prompts (one per line)", f.display());
        }
    }
    if let Some(len) = cli.prompt_len {
        if !texts.is_empty() {
            bail!(
                "--prompt-len makes synthetic prompts; do not combine it with --prompt or --prompt-file"
            );
        }
        if len == 0 {
            bail!("--prompt-len must be at least 1");
        }
        // Synthetic prompts: BOS then a fixed token pattern, as FlexGen pads one sentence to length.
        let bos = model.spec.bos_token_id.unwrap_or(0);
        let v = model.spec.vocab_size.max(8);
        let n = cli.num_prompts.unwrap_or(block);
        return Ok((0..n)
            .map(|i| {
                let ids = std::iter::once(bos)
                    .chain((1..len).map(|j| {
                        4 + u32::try_from((i * 7 + j * 13) % (v as usize - 4)).unwrap_or(0)
                    }))
                    .collect();
                Request::tokens(ids)
            })
            .collect());
    }
    if model.tokenizer.is_none() {
        bail!(
            "this model has no tokenizer (dummy weights): give --prompt-len N for synthetic prompts"
        );
    }
    if texts.is_empty() {
        texts.push("In the beginning".into());
    }
    let n = cli.num_prompts.unwrap_or(texts.len());
    Ok(texts.iter().cycle().take(n.max(texts.len())).map(|t| Request::text(t.clone())).collect())
}

/// Greedy generation on the CUDA executor, with the same report fields as the CPU path.
fn run_cuda(
    cli: &Cli,
    model: &Model,
    policy: &flexgen_policy::Policy,
    requests: &[Request],
    load_s: f64,
    started: std::time::Instant,
) -> anyhow::Result<()> {
    if cli.temperature.is_some() || !cli.stop.is_empty() {
        bail!(
            "--device cuda decodes greedily for now: drop --temperature and --stop, or use --device cpu"
        );
    }
    let prompts: Vec<Vec<u32>> = requests
        .iter()
        .map(|r| match &r.prompt {
            flexgen_runtime::Prompt::Tokens(t) => Ok(t.clone()),
            flexgen_runtime::Prompt::Text(t) => {
                Ok(model.tokenizer.as_ref().context("text prompts need a tokenizer")?.encode(t)?)
            }
        })
        .collect::<anyhow::Result<_>>()?;
    let setup = std::time::Instant::now();
    let source = match cli.dummy {
        Some(DummyKind::Ones) => LayerSource::Dummy(DummyInit::Ones),
        Some(DummyKind::Random) => LayerSource::Dummy(DummyInit::Random { seed: cli.seed }),
        None => LayerSource::Loaded,
    };
    let capacity = GpuCapacity {
        max_prompt: prompts.iter().map(Vec::len).max().unwrap_or(1),
        max_new: cli.max_new_tokens,
        gpu_limit: cli.gpu_mem_limit,
    };
    let generator = flexgen_runtime::GpuGenerator::new(model, policy.clone(), source, capacity)
        .context("setting up the CUDA executor")?;
    let setup_s = setup.elapsed().as_secs_f64();
    let (tokens, stats) = generator.generate(&prompts, cli.max_new_tokens)?;
    let mut out = std::io::stdout().lock();
    if !cli.quiet && !cli.json {
        for (i, (r, t)) in requests.iter().zip(&tokens).enumerate() {
            let prompt = match &r.prompt {
                flexgen_runtime::Prompt::Text(p) => p.clone(),
                flexgen_runtime::Prompt::Tokens(p) => format!("<{} tokens>", p.len()),
            };
            let text = match &model.tokenizer {
                Some(tok) => tok.decode(t)?,
                None => format!("{t:?}"),
            };
            writeln!(out, "[{i}] {prompt}{text}")?;
        }
    }
    let bytes = generator.gpu_bytes();
    let per_pass = generator.weight_bytes_per_pass();
    let decode = stats.decode_tokens_per_s(prompts.len());
    let block = policy.block_size() as f64;
    // The roofline of a decode step: the weights that must cross PCIe at the pinned bandwidth
    // measured in this process, overlapped with the disk part at the direct-read bandwidth
    // measured in this process (the slower of the two links bounds the step).
    let disk_per_pass = generator.disk_bytes_per_pass();
    let pcie_s = generator.h2d_bytes_per_s.filter(|_| per_pass > 0).map(|bw| per_pass as f64 / bw);
    let disk_s = generator
        .disk_bytes_per_s
        .filter(|_| disk_per_pass > 0)
        .map(|bw| disk_per_pass as f64 / bw);
    let seqs = block.min(prompts.len() as f64);
    let roofline = match (pcie_s, disk_s) {
        (Some(p), Some(d)) => Some(seqs / p.max(d)),
        (Some(p), None) => Some(seqs / p),
        _ => None,
    };
    let serial_roofline = match (pcie_s, disk_s) {
        (Some(p), Some(d)) => Some(seqs / (p + d)),
        _ => None,
    };
    let mut steps = stats.decode_steps.clone();
    steps.sort_by(f64::total_cmp);
    let median_step = steps.get(steps.len() / 2).copied();
    let report = serde_json::json!({
        "model": model.spec.name,
        "weights": if model.dir.is_some() { "files" } else { "dummy" },
        "backend": "cuda",
        "policy": {
            "percent": policy.placement.to_percent(),
            "gpu_batch_size": policy.gpu_batch_size,
            "num_gpu_batches": policy.num_gpu_batches,
            "pin_weight": policy.pin_weight,
        },
        "prompts": prompts.len(),
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "load_s": load_s,
        "gpu_setup_s": setup_s,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "median_decode_step_s": median_step,
        "prefill_tokens_per_s": stats.prefill_tokens_per_s(),
        "decode_tokens_per_s": decode,
        "total_tokens_per_s": stats.total_tokens_per_s(),
        "gpu_bytes": {
            "weights": bytes.weights, "staging": bytes.staging, "tables": bytes.tables,
            "kv_cache": bytes.cache, "activations": bytes.activations, "total": bytes.total(),
            "device_in_use": stats.tiers.required.gpu,
        },
        "cpu_bytes": { "pinned_weights": generator.pinned_bytes, "pageable_weights": generator.pageable_bytes, "peak_rss": peak_rss_bytes() },
        "bytes_moved": { "cpu_to_gpu": stats.tiers.traffic.cpu_to_gpu, "disk_read": stats.tiers.traffic.disk_read },
        "weight_bytes_per_decode_step": per_pass,
        "disk_weight_bytes_per_decode_step": disk_per_pass,
        "disk_bytes": generator.disk_bytes(),
        "direct_io": generator.direct_io,
        "measured_h2d_bytes_per_s": generator.h2d_bytes_per_s,
        "measured_disk_read_bytes_per_s": generator.disk_bytes_per_s,
        "roofline_decode_tokens_per_s": roofline,
        "roofline_fraction": roofline.map(|r| decode / r),
        "serial_roofline_decode_tokens_per_s": serial_roofline,
        "setup": {
            "fill_s": generator.setup_times.fill_s,
            "pin_s": generator.setup_times.pin_s,
            "disk_write_s": generator.setup_times.disk_write_s,
            "total_s": generator.setup_times.total_s,
        },
        "projected": false,
        "predicted_tokens_per_s": policy.prediction.as_ref().map(|x| x.throughput_tokens_per_s),
        "wall_s": started.elapsed().as_secs_f64(),
    });
    if cli.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        std::mem::forget(generator);
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    writeln!(
        err,
        "\nmodel {} ({} weights), {} prompts × {} new tokens, block {}×{}, backend cuda",
        model.spec.name,
        if model.dir.is_some() { "file" } else { "dummy" },
        prompts.len(),
        cli.max_new_tokens,
        policy.gpu_batch_size,
        policy.num_gpu_batches
    )?;
    writeln!(
        err,
        "GPU {} (weights {}, staging {}, KV cache {}, activations {}) | CPU weights {} pinned, {} pageable | CPU→GPU {}",
        human_bytes(bytes.total()),
        human_bytes(bytes.weights),
        human_bytes(bytes.staging),
        human_bytes(bytes.cache),
        human_bytes(bytes.activations),
        human_bytes(generator.pinned_bytes),
        human_bytes(generator.pageable_bytes),
        human_bytes(stats.tiers.traffic.cpu_to_gpu)
    )?;
    writeln!(
        err,
        "prefill {:.1} tok/s ({:.3} s) | decode {:.1} tok/s ({:.3} s) | total {:.1} tok/s | setup {:.1} s | wall {:.1} s",
        stats.prefill_tokens_per_s(),
        stats.prefill_s,
        decode,
        stats.decode_s,
        stats.total_tokens_per_s(),
        setup_s,
        started.elapsed().as_secs_f64()
    )?;
    if generator.disk_bytes() > 0 {
        writeln!(
            err,
            "disk tier: {} in {}{}, {} read per decode step, direct reads measured {:.2} GB/s",
            human_bytes(generator.disk_bytes()),
            policy.offload_dir.as_ref().map_or_else(String::new, |d| d.display().to_string()),
            if generator.direct_io == Some(false) {
                " (buffered: O_DIRECT refused)"
            } else {
                " (direct I/O)"
            },
            human_bytes(disk_per_pass),
            generator.disk_bytes_per_s.unwrap_or(0.0) / 1e9
        )?;
    }
    if let (Some(r), Some(bw)) = (roofline, generator.h2d_bytes_per_s) {
        writeln!(
            err,
            "roofline: {} of weights over PCIe per decode step at {:.1} GB/s (measured pinned){} = {:.1} tok/s; measured {:.1} ({:.1} %)",
            human_bytes(per_pass),
            bw / 1e9,
            disk_s.map_or_else(String::new, |d| format!(", disk part {d:.2} s per step")),
            r,
            decode,
            100.0 * decode / r
        )?;
    }
    let t = generator.setup_times;
    writeln!(
        err,
        "setup {:.1} s: weights filled and placed {:.1} s (pinning {:.1} s overlapped), disk tier written {:.1} s",
        t.total_s, t.fill_s, t.pin_s, t.disk_write_s
    )?;
    // Pinned memory is returned far faster by the kernel at exit than by freeing it piecewise.
    std::mem::forget(generator);
    Ok(())
}
