//! `flexgen-plan`: choose a policy for a model, a workload and a machine by solving `FlexGen`'s cost
//! model as linear programs (`HiGHS`), and write it as policy TOML.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use clap::Parser;
use flexgen_cli::{human_bytes, model_spec, parse_bytes};
use flexgen_planner::{Candidate, Margins, PlanOptions, larger_blocks, plan_pipeline, predict};
use flexgen_policy::{HardwareProfile, Placement, Policy, Workload};

const LONG_ABOUT: &str = "\
Choose where weights, KV cache and activations live (GPU / CPU / disk), the block shape
(gpu-batch-size × num-gpu-batches) and whether to use CPU attention and 4-bit compression, so that
generated tokens per second of the whole workload is highest on the given machine.

For each discrete choice (batch size, number of micro-batches, compression of weights and cache,
CPU attention, activation tier) a linear program over the six placement fractions minimizes the time
of one block under the memory limits of every tier; the best choice is written as a policy file
that flexgen-run executes. The hardware profile comes from flexgen-profile, or from
policies/hardware/ (t4-16gb, rtx3090, h200). docs/cost-model.md explains every term.

With --percent (and optionally --gpu-batch-size / --num-gpu-batches) it evaluates that placement
instead of searching, as the original cost model's evaluation mode did.";

const EXAMPLES: &str = "\
Examples:
  flexgen-plan --hardware policies/hardware/t4-16gb.toml --model opt-30b --prompt-len 512 --gen-len 32 --out p.toml
  flexgen-plan --hardware hw.toml --model opt-175b --prompt-len 512 --gen-len 32 --explain
  flexgen-plan --hardware policies/hardware/h200.toml --model opt-30b --gpu-mem-limit 16GiB --no-compression --out p.toml
  flexgen-profile --out host.toml && flexgen-plan --hardware host.toml --model llama-3.1-70b \\
               --prompt-len 512 --gen-len 32 --stages 4 --out p.toml   # a host with 4 GPUs alike
  flexgen-plan --hardware policies/hardware/t4-16gb.toml --model opt-30b --percent 20 80 0 100 0 100 \\
               --gpu-batch-size 48 --num-gpu-batches 3";

#[derive(Parser, Debug)]
#[command(name = "flexgen-plan", version, about = "Choose an offloading policy with FlexGen's cost model and an LP solver.", long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
struct Cli {
    /// Hardware profile (TOML) from flexgen-profile or policies/hardware/.
    #[arg(long, value_name = "FILE")]
    hardware: PathBuf,
    /// Model: a name (opt-125m … opt-175b, llama-2-7b … qwen2.5-72b) or a Hugging Face model
    /// directory (its config.json).
    #[arg(long, value_name = "NAME|DIR", required_unless_present = "calibrate")]
    model: Option<String>,
    /// Prompt length in tokens.
    #[arg(long, value_name = "N", required_unless_present = "calibrate")]
    prompt_len: Option<u32>,
    /// Tokens generated per prompt.
    #[arg(long, value_name = "N", required_unless_present = "calibrate")]
    gen_len: Option<u32>,
    /// Refit the profile's rates to measured runs: the JSON reports of `flexgen-run --json`
    /// (any number, different policies). Prints predicted against measured before and after,
    /// and writes the refit profile to --out.
    #[arg(long, value_name = "RUN.json", num_args = 1..)]
    calibrate: Vec<PathBuf>,
    /// Number of prompts in the job (default: the planner picks the block size freely).
    #[arg(long, value_name = "N")]
    num_prompts: Option<u32>,
    /// Use at most this much GPU memory, e.g. 16GiB to plan for a T4-class card on a larger one.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    gpu_mem_limit: Option<u64>,
    /// Use at most this much CPU memory (of the profile's), e.g. 100GB to leave room for other
    /// jobs on a shared host, or to see what a smaller host would get. The plan keeps its margin
    /// (--cpu-margin) under it.
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    cpu_mem_limit: Option<u64>,
    /// The share of the CPU memory the plan may fill (0.5 to 1). The plan's host memory comes
    /// within 0.5 % of the measured peak (H200 host, 2026-12-04), so a host that runs nothing
    /// else can take 0.95: OPT-175B under a 15 GiB GPU cap on a 135 GB host then gets a block of
    /// 48 instead of 36 (22.1 tok/s measured instead of 18.8).
    #[arg(long, value_name = "FRACTION", default_value_t = Margins::default().cpu, value_parser = parse_margin)]
    cpu_margin: f64,
    /// Do not consider 4-bit compression.
    #[arg(long)]
    no_compression: bool,
    /// Force weight compression on.
    #[arg(long, conflicts_with = "no_compression")]
    compress_weight: bool,
    /// Force KV-cache compression on.
    #[arg(long, conflicts_with = "no_compression")]
    compress_cache: bool,
    /// Largest gpu-batch-size to try.
    #[arg(long, value_name = "N", default_value_t = 512)]
    max_batch: u32,
    /// Only this gpu-batch-size.
    #[arg(long, value_name = "N")]
    gpu_batch_size: Option<u32>,
    /// Only this number of micro-batches.
    #[arg(long, value_name = "N")]
    num_gpu_batches: Option<u32>,
    /// Evaluate this placement (six percentages as in flexgen-run) instead of searching.
    #[arg(long, num_args = 6, value_names = ["W_GPU", "W_CPU", "C_GPU", "C_CPU", "A_GPU", "A_CPU"])]
    percent: Option<Vec<f64>>,
    /// With --percent: evaluate CPU attention on.
    #[arg(long)]
    cpu_cache_compute: bool,
    /// Pipeline stages, one GPU each (at most the profile's gpu.count): the layers split by
    /// bytes, each stage planned on its share of the host, written as [[stage]] entries.
    #[arg(long, value_name = "N", default_value_t = 1, conflicts_with = "percent",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(flexgen_policy::MAX_GPUS)))]
    stages: u32,
    /// Offload directory written into the policy when it uses the disk (default: the profile's).
    #[arg(long, value_name = "DIR")]
    offload_dir: Option<PathBuf>,
    /// Write the policy here (TOML); without it the policy is printed.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Print the best candidates, their predicted throughput and the binding resource, then the
    /// next larger blocks with the best one's other choices: how fast they would be, or which
    /// tier they overfill (what holds the block back).
    #[arg(long)]
    explain: bool,
}

/// `--calibrate`: reads the runs, refits the profile, prints the table, writes the profile.
fn run_calibrate(cli: &Cli, hw: &HardwareProfile) -> anyhow::Result<()> {
    let mut obs = Vec::new();
    for path in &cli.calibrate {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading the run report {}", path.display()))?;
        let label = path.file_name().map_or_else(String::new, |n| n.to_string_lossy().into_owned());
        obs.push(
            flexgen_planner::Observation::from_run_report(&text, &label)
                .with_context(|| format!("reading the run report {}", path.display()))?,
        );
    }
    let cal = flexgen_planner::calibrate(hw, &obs)?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "| run | measured s | predicted s (profile) | error | predicted s (refit) | error | refit to the others | error |"
    )?;
    writeln!(out, "|---|---|---|---|---|---|---|---|")?;
    for (i, ((o, b), a)) in obs.iter().zip(&cal.before).zip(&cal.after).enumerate() {
        let m = o.prefill_s + o.decode_s;
        let left = cal.left_out.get(i).map_or_else(
            || "| – | –".to_string(),
            |l| format!("| {:.3} | {:+.1} %", l.total_s(), 100.0 * (l.total_s() / m - 1.0)),
        );
        writeln!(
            out,
            "| {} | {m:.3} | {:.3} | {:+.1} % | {:.3} | {:+.1} % {left} |",
            o.label,
            b.total_s(),
            100.0 * (b.total_s() / m - 1.0),
            a.total_s(),
            100.0 * (a.total_s() / m - 1.0)
        )?;
    }
    writeln!(
        out,
        "\n(\"refit to the others\": the run predicted by the profile refit to every other run, \
         a check that the refit generalizes)"
    )?;
    writeln!(out, "\nfactors applied to {}:", hw.name)?;
    for (name, f) in &cal.factors {
        if (f - 1.0).abs() > 1e-9 {
            writeln!(out, "  {name} × {f:.3}")?;
        }
    }
    if let Some(path) = &cli.out {
        let mut p = cal.profile.clone();
        p.source =
            format!("{} calibrated to {} run(s) by flexgen-plan --calibrate", hw.source, obs.len());
        p.write_toml_file(path).context("writing the calibrated profile (--out)")?;
        writeln!(out, "wrote {}", path.display())?;
    }
    Ok(())
}

fn main() -> ExitCode {
    flexgen_cli::main_with(&Cli::parse(), run)
}

/// A `--cpu-margin`: a share from 0.5 to 1.
fn parse_margin(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number; give a share such as 0.95"))?;
    if (0.5..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!(
            "{v} is outside 0.5 to 1: the share of the CPU memory the plan may fill, such as 0.95"
        ))
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    // The error names the file; the context names the flag.
    let mut hw = HardwareProfile::from_toml_file(&cli.hardware).with_context(|| {
        format!(
            "reading the hardware profile (--hardware){}",
            flexgen_cli::mixed_up(&cli.hardware, "[placement]", "flexgen-run --policy")
        )
    })?;
    if let Some(limit) = cli.cpu_mem_limit {
        hw.cpu.memory_bytes = hw.cpu.memory_bytes.min(limit);
    }
    if !cli.calibrate.is_empty() {
        return run_calibrate(cli, &hw);
    }
    let spec = model_spec(cli.model.as_deref().context("--model is required")?)?;
    let workload = Workload {
        prompt_len: cli.prompt_len.context("--prompt-len is required")?,
        gen_len: cli.gen_len.context("--gen-len is required")?,
        num_prompts: cli.num_prompts,
    };
    let opts = PlanOptions {
        gpu_mem_limit_bytes: cli.gpu_mem_limit,
        allow_compression: !cli.no_compression,
        compress_weight: cli.compress_weight.then_some(true),
        compress_cache: cli.compress_cache.then_some(true),
        max_batch: cli.max_batch,
        gpu_batch_size: cli.gpu_batch_size,
        num_gpu_batches: cli.num_gpu_batches,
        fixed_placement: None,
        keep: if cli.explain { 8 } else { 1 },
        offload_dir: cli.offload_dir.clone(),
        margins: Margins { cpu: cli.cpu_margin, ..Margins::default() },
        ..PlanOptions::default()
    };
    let mut err = std::io::stderr().lock();
    if let Some(p) = &cli.percent {
        let six: [f64; 6] = p.as_slice().try_into().context("--percent takes six numbers")?;
        let (Some(b), Some(k)) = (cli.gpu_batch_size, cli.num_gpu_batches) else {
            bail!(
                "--percent evaluates a given policy: also give --gpu-batch-size and --num-gpu-batches"
            );
        };
        let mut policy = Policy {
            gpu_batch_size: b,
            num_gpu_batches: k,
            cpu_cache_compute: cli.cpu_cache_compute,
            ..Policy::default()
        };
        policy.placement = Placement::from_percent(six)?;
        policy.compress_weight.enabled = cli.compress_weight;
        policy.compress_cache.enabled = cli.compress_cache;
        let mut hw = hw;
        if let (Some(g), Some(limit)) = (hw.gpu.as_mut(), cli.gpu_mem_limit) {
            g.memory_bytes = g.memory_bytes.min(limit);
        }
        let c = predict(&spec, &hw, &workload, &policy, opts.margins)
            .context("evaluating the given policy")?;
        writeln!(err, "{} on {}: given policy", spec.name, hw.name)?;
        print_candidate(&mut err, 1, &c)?;
        return Ok(());
    }
    let plan = plan_pipeline(&spec, &hw, &workload, &opts, cli.stages)
        .with_context(|| format!("planning {} on {}", spec.name, hw.name))?;
    if cli.explain {
        writeln!(
            err,
            "{} on {} (prompt {}, gen {}): {} LPs solved in {:.3} s; best candidates:",
            spec.name, hw.name, workload.prompt_len, workload.gen_len, plan.solved, plan.solve_s
        )?;
        for (i, c) in plan.candidates.iter().enumerate() {
            print_candidate(&mut err, i + 1, c)?;
        }
        if let (1, Some(best)) = (cli.stages, plan.candidates.first()) {
            // What holds the block back: the next larger shapes with #1's other choices.
            let larger = larger_blocks(&spec, &hw, &workload, &opts, &best.choice)
                .context("weighing larger blocks")?;
            if !larger.is_empty() {
                writeln!(err, "larger blocks with #1's other choices:")?;
            }
            for l in larger {
                let (b, k) = (l.gpu_batch_size, l.num_gpu_batches);
                match l.outcome {
                    Ok(c) => writeln!(
                        err,
                        "  {b}x{k}: {:.3} tok/s, weights {:.1} % on the GPU and {:.1} % on disk, \
                         binds {} | peak GPU {} CPU {}",
                        c.tokens_per_s,
                        c.fractions[0] * 100.0,
                        c.fractions[2] * 100.0,
                        c.binding,
                        human(c.peak_gpu_bytes),
                        human(c.peak_cpu_bytes)
                    )?,
                    Err(why) => writeln!(err, "  {b}x{k}: does not fit: {why}")?,
                }
            }
        }
    }
    let text = plan.policy.to_toml();
    match &cli.out {
        Some(path) => {
            plan.policy.write_toml_file(path).context("writing the policy (--out)")?;
            let pred = plan.policy.prediction.as_ref().expect("plans carry a prediction");
            writeln!(
                err,
                "wrote {}: {:.2} tok/s predicted, percent {:?}, {}x{}{}, binding {} (solved in {:.3} s)",
                path.display(),
                pred.throughput_tokens_per_s,
                plan.policy.placement.to_percent(),
                plan.policy.gpu_batch_size,
                plan.policy.num_gpu_batches,
                match plan.policy.stages.len() {
                    0 => String::new(),
                    n => format!(", {n} stages"),
                },
                pred.binding,
                plan.solve_s
            )?;
        }
        None => std::io::stdout().lock().write_all(text.as_bytes())?,
    }
    Ok(())
}

fn print_candidate(out: &mut impl Write, rank: usize, c: &Candidate) -> std::io::Result<()> {
    let pct = |v: f64| (v * 1000.0).round() / 10.0;
    let x = c.fractions;
    writeln!(
        out,
        "  #{rank}: {:.3} tok/s | {}x{} | weights {}/{}/{} cache {}/{}/{} act {} | cpu-attn {} | compress w/c {}/{} | prefill {:.1} s decode {:.1} s | binds {} | peak GPU {} CPU {} disk {}",
        c.tokens_per_s,
        c.choice.gpu_batch_size,
        c.choice.num_gpu_batches,
        pct(x[0]),
        pct(x[1]),
        pct(x[2]),
        pct(x[3]),
        pct(x[4]),
        pct(x[5]),
        if c.choice.act_on_gpu { "gpu" } else { "cpu" },
        c.choice.cpu_attention,
        c.choice.compress_weight,
        c.choice.compress_cache,
        c.prefill_s,
        c.decode_s,
        c.binding,
        human(c.peak_gpu_bytes),
        human(c.peak_cpu_bytes),
        human(c.disk_bytes)
    )
}

fn human(b: f64) -> String {
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "byte counts are positive and below 2^64"
    )]
    human_bytes(b.max(0.0) as u64)
}
