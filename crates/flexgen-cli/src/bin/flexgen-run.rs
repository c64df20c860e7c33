//! `flexgen-run`: load a model and generate under a policy; report throughput and memory.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Parser, Subcommand};

/// mimalloc reuses freed memory on every thread: the host's per-step work (a vocabulary of
/// logits per sampled row, converted, drawn from, dropped) otherwise costs page faults each step
/// with the system allocator, which hands such blocks back to the kernel.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;
use flexgen_cli::{DummyKind, PolicyArgs, bundled_model_dir, human_bytes, peak_rss_bytes};
use flexgen_model::Model;
use flexgen_runtime::{
    Budgets, Device, Event, GenerationConfig, Generator, GpuCapacity, LayerSource, Request,
    Sampling,
};

const ABOUT: &str = "Generate text with a model under an offloading policy.";

const LONG_ABOUT: &str = "\
Generate text with a model under an offloading policy, and report prefill, decode and total
throughput.

With no arguments it runs the bundled model (a 4-layer OPT trained on the King James Bible) on a
default prompt. Point --model at any Hugging Face OPT, Llama, Mistral or Qwen2 directory (config.json,
model.safetensors or a sharded index, tokenizer.json) or cache entry; or give a spec name (opt-125m …
opt-175b, llama-2-7b/13b/70b, llama-3.1-8b/70b, mistral-7b, qwen2.5-7b/72b) with --dummy to run
without weight files, as FlexGen's benchmarks do.

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

With --device cuda (every subcommand: complete, batch, chat) the CUDA executor runs on GPU 0 (fp16;
greedy picks on the GPU, sampling, EOS and stop strings on the host, the same schedule as the CPU): weights split by the same exact shares across GPU, CPU (pinned unless --pin-weight 0) and
disk (direct I/O), copied two layers ahead on a separate stream; the KV cache split by (sequence,
head) rows between GPU, CPU and disk, with CPU attention under --cpu-cache-compute; activations on
the GPU or the CPU. The report gives the memory held per tier, the bytes moved, and each decode
step against the PCIe (and disk) roofline measured in the same process. Compressed weights travel
packed; decode steps of micro-batches up to 128 rows multiply straight from
their 4-bit codes (on the tensor cores from sm_80), and prefill dequantizes each layer on the GPU first; a
compressed cache is packed on the GPU and CPU
(not on disk) and attended on the GPU, or its CPU rows on the cores under --cpu-cache-compute;
KV-cache rows on disk are read ahead per layer and batch with direct I/O and only their new
positions are written.";

const EXAMPLES: &str = "\
Examples:
  flexgen-run                                    # bundled model, default prompt
  flexgen-run complete --prompt 'And God said' --temperature 0.7 --top-p 0.9
  flexgen-run batch --input prompts.jsonl --output results.jsonl --gpu-batch-size 16
  flexgen-run chat
  flexgen-run --prompt 'And God said' --max-new-tokens 40 --temperature 0.8 --seed 1
  flexgen-run --model ~/models/opt-125m --prompt-file prompts.txt --gpu-batch-size 8
  flexgen-run --model opt-1.3b --dummy --prompt-len 64 --max-new-tokens 8 --gpu-batch-size 4
  flexgen-run --policy policies/opt-30b-t4.toml --model opt-30b --dummy";

#[derive(Parser, Debug)]
#[command(
    name = "flexgen-run",
    version,
    about = ABOUT,
    long_about = LONG_ABOUT,
    after_long_help = EXAMPLES,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Complete prompts with the sampling options of the generate API (the same as giving no
    /// subcommand).
    Complete(RunArgs),
    /// Run a JSONL file of requests as a batch job that resumes where it stopped.
    #[command(long_about = BATCH_ABOUT)]
    Batch(BatchArgs),
    /// Chat with the model in the terminal (/reset clears the history, Ctrl-D leaves).
    Chat(ChatArgs),
}

const BATCH_ABOUT: &str = "\
Run a JSONL file of requests as a batch job that resumes where it stopped.

Each input line is a JSON object: {\"id\": \"q1\", \"prompt\": \"...\", \"max_new_tokens\": 32,
\"temperature\": 0.7, \"stop\": [\"\\n\"]}; only \"prompt\" is required, and \"id\" defaults to the line
number. Each output line is {\"id\", \"text\", \"tokens\", \"finish_reason\", \"prompt_tokens\"}, written
when the block it finished in ends, and synced to disk. Requests run longest first in blocks of
the policy's gpu-batch-size × num-gpu-batches; once half a block has finished, its unfinished
requests move on beside new ones (see --no-refill), so output lines come in no fixed order.

Interrupted (Ctrl-C, kill, power loss) and started again with the same command, the job reads the
output, cuts a torn last line, and runs only the requests not yet written: nothing is lost and
nothing is written twice. A bad input line stops the job before anything runs, naming the line,
or with --on-error skip goes to the errors file with its line number and error.";

/// Model selection shared by the subcommands.
#[derive(Args, Debug, Clone)]
struct ModelArgs {
    /// Hugging Face model directory or cache entry; with --dummy, a spec name such as opt-30b or a
    /// directory with a config.json alone (any shape, e.g. OPT-175B's with fewer layers).
    /// Default: the bundled model.
    #[arg(long, value_name = "PATH|NAME")]
    model: Option<String>,
    /// Dummy weights instead of files: `ones` (FlexGen's convention) or `random` (seeded).
    #[arg(long, value_name = "KIND", num_args = 0..=1, default_missing_value = "ones")]
    dummy: Option<DummyKind>,
    /// With --dummy: the tokenizer for text prompts (a tokenizer.json, or a model directory
    /// holding one, e.g. an OPT checkpoint's), so text and JSONL jobs run on dummy shapes.
    #[arg(long, value_name = "PATH", requires = "dummy")]
    tokenizer: Option<PathBuf>,
}

/// Where the model runs, shared by the subcommands.
#[derive(Args, Debug, Clone)]
struct DeviceArgs {
    /// Compute device: `cpu` (the tiered executor; the GPU tier is host memory) or `cuda` (GPU 0:
    /// cuBLAS and NVRTC kernels, CUDA loaded at run time). Both run every placement through the
    /// same schedule and give the same tokens.
    #[arg(long, value_enum, default_value = "cpu", help_heading = "Policy")]
    device: DeviceKind,
    /// Memory the GPU tier may use (e.g. 16GiB); a policy that needs more is refused up front.
    #[arg(long, value_name = "SIZE", value_parser = flexgen_cli::parse_bytes, help_heading = "Policy")]
    gpu_mem_limit: Option<u64>,
    /// Run the pipeline in N processes on this host, one stage each: this one (rank 0) and N − 1
    /// it starts. The stages are the policy's [[stage]] entries, one per process, or the layers
    /// split evenly. With --device cuda, rank r computes on GPU r mod the GPUs it sees.
    #[arg(long, value_name = "N", help_heading = "Pipeline",
          value_parser = clap::value_parser!(u32).range(2..=64), conflicts_with = "rank")]
    nproc: Option<u32>,
    /// This process's rank in a pipeline over processes started by hand (e.g. across hosts):
    /// rank 0 owns the prompts and the output and listens at --coordinator; every rank gives
    /// the same model, policy and --world-size.
    #[arg(long, value_name = "R", help_heading = "Pipeline", requires_all = ["world_size", "coordinator"])]
    rank: Option<u32>,
    /// Processes in the pipeline (with --rank).
    #[arg(long, value_name = "W", help_heading = "Pipeline", requires = "rank",
          value_parser = clap::value_parser!(u32).range(2..=64))]
    world_size: Option<u32>,
    /// HOST:PORT where rank 0 listens and the other ranks join (with --rank).
    #[arg(long, value_name = "HOST:PORT", help_heading = "Pipeline", requires = "rank")]
    coordinator: Option<String>,
    /// How CUDA ranks pass hidden states: `nccl` (GPU to GPU; one GPU per rank, activations on
    /// the GPU), `tcp` (through host memory over the ranks' TCP ring; ranks may share a GPU), or
    /// `auto` (NCCL where rank 0's host has a GPU per rank and every stage keeps its
    /// activations on the GPU). Rank 0's choice holds for all.
    #[arg(long, value_enum, default_value = "auto", help_heading = "Pipeline")]
    link: LinkKind,
    /// `--nproc`: rank 0's listener, bound before the other ranks start.
    #[arg(skip)]
    bound: Option<std::sync::Arc<std::net::TcpListener>>,
}

/// `--link`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum LinkKind {
    Auto,
    Tcp,
    Nccl,
}

impl DeviceArgs {
    /// The CPU executor's tier budgets: the GPU tier capped by --gpu-mem-limit.
    fn budgets(&self) -> Budgets {
        Budgets { gpu_bytes: self.gpu_mem_limit, ..Budgets::default() }
    }

    /// This process's place in a pipeline over processes, if it is in one.
    fn rank_spec(&self) -> anyhow::Result<Option<flexgen_runtime::RankSpec>> {
        let (Some(rank), Some(world_size), Some(coordinator)) =
            (self.rank, self.world_size, self.coordinator.clone())
        else {
            return Ok(None);
        };
        if rank >= world_size {
            bail!(
                "--rank {rank} with --world-size {world_size}: ranks are 0 to {}",
                world_size - 1
            );
        }
        let link = match self.link {
            LinkKind::Auto => flexgen_runtime::RankLink::Auto,
            LinkKind::Tcp => flexgen_runtime::RankLink::Tcp,
            LinkKind::Nccl => flexgen_runtime::RankLink::Nccl,
        };
        let bound = self.bound.clone();
        Ok(Some(flexgen_runtime::RankSpec { rank, world_size, coordinator, link, bound }))
    }
}

/// Rank r > 0 of a pipeline over processes: runs its stage until rank 0 is done, and prints
/// nothing (rank 0 owns the output). `Ok(false)`: this process is not such a rank.
fn serve_if_worker(
    margs: &ModelArgs,
    policy: &flexgen_policy::Policy,
    dargs: &DeviceArgs,
    seed: u64,
) -> anyhow::Result<bool> {
    let Some(spec) = dargs.rank_spec()?.filter(|s| s.rank > 0) else { return Ok(false) };
    let model = load_model(margs, dargs.device, seed)?;
    // Rank 0 says what the stage is sized for.
    let device = device(margs, dargs, seed, (1, 1));
    flexgen_runtime::serve_rank(&model, policy, device, &spec).map_err(|e| match e {
        // Another rank's failure, passed on: already named.
        e @ flexgen_runtime::Error::Rank { .. } => anyhow::Error::new(e),
        e => anyhow::Error::new(e).context(format!("rank {}", spec.rank)),
    })?;
    Ok(true)
}

/// `--nproc N`: starts ranks 1 … N − 1 as copies of this command (stdout discarded, stderr
/// shown) and makes this process rank 0 of their pipeline, at a free loopback port. The children
/// are waited for when the guard is dropped, and killed if they outlive rank 0 by a minute.
fn launch(dargs: &mut DeviceArgs) -> anyhow::Result<Option<Children>> {
    let Some(n) = dargs.nproc else { return Ok(None) };
    // Bound before the ranks start, and kept for rank 0: no other process can take the port.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("listening for the ranks")?;
    let port = listener.local_addr().context("listening for the ranks")?.port();
    let coordinator = format!("127.0.0.1:{port}");
    let exe = std::env::current_exe().context("finding this program to start the ranks")?;
    // The command line less --nproc and its value.
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    let mut skip = false;
    for a in std::env::args_os().skip(1) {
        if skip {
            skip = false;
            continue;
        }
        match a.to_str() {
            Some("--nproc") => skip = true,
            Some(t) if t.starts_with("--nproc=") => {}
            _ => args.push(a),
        }
    }
    let mut children = Children(Vec::new());
    for rank in 1..n {
        let child = std::process::Command::new(&exe)
            .args(&args)
            .args(["--rank", &rank.to_string(), "--world-size", &n.to_string()])
            .args(["--coordinator", &coordinator])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .with_context(|| format!("starting rank {rank}"))?;
        children.0.push((rank, child));
    }
    dargs.rank = Some(0);
    dargs.world_size = Some(n);
    dargs.coordinator = Some(coordinator);
    dargs.bound = Some(std::sync::Arc::new(listener));
    Ok(Some(children))
}

/// Ranks this process started.
struct Children(Vec<(u32, std::process::Child)>);

impl Children {
    /// Waits for the ranks to stop: a minute after a run that succeeded (they stop once the end
    /// has gone round), a few seconds after one that failed (a rank that has not heard of the
    /// failure is waiting for rank 0), then kills those left.
    fn finish(&mut self, succeeded: bool) {
        let grace = if succeeded { Duration::from_mins(1) } else { Duration::from_secs(3) };
        let deadline = std::time::Instant::now() + grace;
        for (rank, mut c) in self.0.drain(..) {
            loop {
                match c.try_wait() {
                    Ok(Some(_)) => break,
                    Ok(None) if std::time::Instant::now() < deadline => {
                        std::thread::sleep(Duration::from_millis(20));
                    }
                    _ => {
                        if succeeded {
                            eprintln!("rank {rank} did not stop: killing it");
                        }
                        let _ = c.kill();
                        let _ = c.wait();
                        break;
                    }
                }
            }
        }
    }
}

impl Drop for Children {
    /// Ranks not waited for (this process is leaving early): killed.
    fn drop(&mut self) {
        for (_, c) in &mut self.0 {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Sampling options shared by the subcommands.
#[derive(Args, Debug, Clone)]
struct SamplingArgs {
    /// Sample with this temperature (default: greedy).
    #[arg(long, value_name = "T", help_heading = "Generation")]
    temperature: Option<f32>,
    /// Sample only from the K most likely tokens.
    #[arg(long, value_name = "K", help_heading = "Generation")]
    top_k: Option<usize>,
    /// Sample only from the most likely tokens whose probability reaches P.
    #[arg(long, value_name = "P", help_heading = "Generation")]
    top_p: Option<f32>,
    /// Seed for sampling (and for --dummy random).
    #[arg(long, default_value_t = 0, help_heading = "Generation")]
    seed: u64,
}

impl SamplingArgs {
    fn sampling(&self) -> anyhow::Result<Sampling> {
        if let Some(t) = self.temperature
            && !(t.is_finite() && t >= 0.0)
        {
            bail!("--temperature {t}: give a finite number, 0 for greedy or above 0 to sample");
        }
        match self.temperature {
            Some(t) if t > 0.0 => Ok(Sampling::Random {
                temperature: t,
                top_k: self.top_k,
                top_p: self.top_p,
                seed: self.seed,
            }),
            _ if self.top_k.is_some() || self.top_p.is_some() => {
                bail!("--top-k and --top-p need --temperature above 0")
            }
            _ => Ok(Sampling::Greedy),
        }
    }
}

#[derive(Args, Debug)]
struct BatchArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Requests, one JSON object per line.
    #[arg(long, value_name = "FILE")]
    input: PathBuf,
    /// Results, one JSON object per line; an existing file is resumed.
    #[arg(long, value_name = "FILE")]
    output: PathBuf,
    /// What to do with a malformed input line: stop (before generating anything) or skip it into
    /// the errors file.
    #[arg(long, value_enum, default_value = "stop")]
    on_error: flexgen_cli::batch::OnError,
    /// Where skipped lines go (default: OUTPUT.errors.jsonl).
    #[arg(long, value_name = "FILE")]
    errors: Option<PathBuf>,
    /// Tokens to generate for requests that do not say.
    #[arg(long, value_name = "N", default_value_t = 32, help_heading = "Generation")]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Keep generating after the EOS token.
    #[arg(long, help_heading = "Generation")]
    ignore_eos: bool,
    /// Run each block until all its requests finish, instead of moving the unfinished ones to
    /// the next block beside new requests once half have finished (the default: more tokens/s
    /// for mixed lengths; a moved request's cache is recomputed, equal up to rounding)
    #[arg(long, help_heading = "Generation")]
    no_refill: bool,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    device: DeviceArgs,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct ChatArgs {
    #[command(flatten)]
    model: ModelArgs,
    /// Longest reply, in tokens.
    #[arg(long, value_name = "N", default_value_t = 48, help_heading = "Generation")]
    max_new_tokens: usize,
    #[command(flatten)]
    sampling: SamplingArgs,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    device: DeviceArgs,
}

#[derive(Args, Debug)]
struct RunArgs {
    #[command(flatten)]
    model: ModelArgs,
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
    #[command(flatten)]
    sampling: SamplingArgs,
    /// Stop a sequence when its text contains this string (repeatable); the text is cut before it.
    #[arg(long, value_name = "TEXT", help_heading = "Generation")]
    stop: Vec<String>,
    /// Keep generating after the EOS token.
    #[arg(long, help_heading = "Generation")]
    ignore_eos: bool,
    #[command(flatten)]
    policy: PolicyArgs,
    #[command(flatten)]
    device: DeviceArgs,
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

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    let dargs = match &mut cli.cmd {
        None => &mut cli.run.device,
        Some(Cmd::Complete(a)) => &mut a.device,
        Some(Cmd::Batch(a)) => &mut a.device,
        Some(Cmd::Chat(a)) => &mut a.device,
    };
    let children = match launch(dargs) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e:#}");
            return ExitCode::from(1);
        }
    };
    let code = flexgen_cli::main_with(&cli, |cli| match &cli.cmd {
        None => run(&cli.run),
        Some(Cmd::Complete(args)) => run(args),
        Some(Cmd::Batch(args)) => run_batch(args),
        Some(Cmd::Chat(args)) => run_chat(args),
    });
    if let Some(mut c) = children {
        // A failed rank 0 has said why; ranks that are still waiting for it are stopped at once.
        c.finish(code == ExitCode::SUCCESS);
    }
    code
}

fn run_batch(args: &BatchArgs) -> anyhow::Result<()> {
    let policy = args.policy.resolve()?;
    args.sampling.sampling()?;
    if serve_if_worker(&args.model, &policy, &args.device, args.sampling.seed)? {
        return Ok(());
    }
    let model = load_model(&args.model, args.device.device, args.sampling.seed)?;
    let job = flexgen_cli::batch::BatchJob {
        input: args.input.clone(),
        output: args.output.clone(),
        errors: args.errors.clone(),
        on_error: args.on_error,
        max_new_tokens: args.max_new_tokens,
        temperature: args.sampling.temperature,
        top_k: args.sampling.top_k,
        top_p: args.sampling.top_p,
        seed: args.sampling.seed,
        stop_on_eos: !args.ignore_eos,
        refill: !args.no_refill,
        progress: !args.quiet,
    };
    let r = job.run(&model, |shape| {
        make_generator(
            &model,
            &policy,
            &args.model,
            &args.device,
            args.sampling.seed,
            (shape.max_prompt_tokens, shape.max_new_tokens),
        )
    })?;
    #[expect(clippy::cast_precision_loss, reason = "rates")]
    let (rps, tps) = (
        r.generated_requests as f64 / r.seconds.max(1e-9),
        r.generated_tokens as f64 / r.seconds.max(1e-9),
    );
    eprintln!(
        "batch: {} requests in the input, {} already done, {} generated ({} tokens) in {:.1} s: {rps:.1} requests/s, {tps:.1} tokens/s; {} bad line(s) skipped",
        r.total,
        r.already_done,
        r.generated_requests,
        r.generated_tokens,
        r.seconds,
        r.skipped_lines
    );
    if r.generated_requests > 0 {
        eprintln!(
            "generation: {:.1} s in {} blocks ({:.1} s set-up before the first), {:.1} generated tokens/s while generating; steps {:.1} s ({:.1} tokens/s); {} context tokens prefilled again for requests moved to a later block",
            r.generate_s,
            r.blocks,
            r.setup_s,
            r.generated_tokens as f64 / r.generate_s.max(1e-9),
            r.steps_s,
            r.generated_tokens as f64 / r.steps_s.max(1e-9),
            r.recomputed_tokens
        );
    }
    Ok(())
}

fn run_chat(args: &ChatArgs) -> anyhow::Result<()> {
    let policy = args.policy.resolve()?;
    if serve_if_worker(&args.model, &policy, &args.device, args.sampling.seed)? {
        return Ok(());
    }
    let model = load_model(&args.model, args.device.device, args.sampling.seed)?;
    if model.tokenizer.is_none() {
        bail!("chat needs a model with a tokenizer (with --dummy, give --tokenizer PATH)");
    }
    // The conversation may fill every position the model has.
    let positions = model.spec.max_positions as usize;
    let max_new = args.max_new_tokens.min(positions.saturating_sub(1)).max(1);
    let generator = make_generator(
        &model,
        &policy,
        &args.model,
        &args.device,
        args.sampling.seed,
        (positions - max_new, max_new),
    )?;
    let options = flexgen_cli::chat::ChatOptions {
        config: GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            sampling: args.sampling.sampling()?,
            ..GenerationConfig::default()
        },
    };
    let stdin = std::io::stdin();
    flexgen_cli::chat::run(&generator, &options, &mut stdin.lock(), &mut std::io::stdout())
}

/// The chosen device; on the GPU sized for prompts of up to `max_prompt` tokens and `max_new`
/// new tokens.
fn device(
    margs: &ModelArgs,
    dargs: &DeviceArgs,
    seed: u64,
    (max_prompt, max_new): (usize, usize),
) -> Device {
    match dargs.device {
        DeviceKind::Cpu => Device::Cpu(dargs.budgets()),
        DeviceKind::Cuda => Device::Cuda {
            source: margs.dummy.map_or(LayerSource::Loaded, |k| LayerSource::Dummy(k.init(seed))),
            capacity: GpuCapacity {
                max_prompt: max_prompt.max(1),
                max_new: max_new.max(1),
                gpu_limit: dargs.gpu_mem_limit,
            },
        },
    }
}

/// The generator of `model` under `policy` on the chosen device; on the GPU sized for prompts of
/// up to `capacity.0` tokens and `capacity.1` new tokens.
fn make_generator<'m>(
    model: &'m Model,
    policy: &flexgen_policy::Policy,
    margs: &ModelArgs,
    dargs: &DeviceArgs,
    seed: u64,
    capacity: (usize, usize),
) -> anyhow::Result<Generator<'m>> {
    let device = device(margs, dargs, seed, capacity);
    let what = match dargs.device {
        DeviceKind::Cpu => "setting up the CPU executor",
        DeviceKind::Cuda => "setting up the CUDA executor",
    };
    if let Some(spec) = dargs.rank_spec()? {
        return Generator::rank0(model, policy.clone(), device, &spec).with_context(|| {
            format!("starting rank 0 of {} at {}", spec.world_size, spec.coordinator)
        });
    }
    Generator::on(model, policy.clone(), device).context(what)
}

fn run(cli: &RunArgs) -> anyhow::Result<()> {
    let policy = cli.policy.resolve()?;
    let sampling = cli.sampling.sampling()?;
    if serve_if_worker(&cli.model, &policy, &cli.device, cli.sampling.seed)? {
        return Ok(());
    }
    let started = std::time::Instant::now();
    let model = load_model(&cli.model, cli.device.device, cli.sampling.seed)?;
    let load_s = started.elapsed().as_secs_f64();
    let requests = requests(cli, &model, policy.block_size())?;
    let config = GenerationConfig {
        max_new_tokens: cli.max_new_tokens,
        sampling,
        stop: cli.stop.clone(),
        stop_on_eos: !cli.ignore_eos,
        ..GenerationConfig::default()
    };
    let longest = requests.iter().map(|r| prompt_tokens(&model, r)).max().unwrap_or(1);
    let setup = std::time::Instant::now();
    let generator = make_generator(
        &model,
        &policy,
        &cli.model,
        &cli.device,
        cli.sampling.seed,
        (longest, cli.max_new_tokens),
    )?;
    let setup_s = setup.elapsed().as_secs_f64();
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
    let result = if let Some(gpu) = generator.cuda() {
        let run = CudaRun { requests: &requests, load_s, setup_s, started, longest };
        report_cuda(cli, &model, &policy, gpu, &stats, &run, &mut out)
    } else {
        // The CPU executor, or a pipeline of CUDA stages (the tiers' figures, summed).
        let (backend, run) = (generator.backend(), (load_s, started));
        report_cpu(cli, backend, (&model, &policy), &requests, &stats, run, &mut out)
    };
    // Pinned memory is returned far faster by the kernel at exit than by freeing it piecewise;
    // a pipeline's rank 0 tells the other ranks first.
    if generator.backend() == "cuda" {
        generator.stop_ranks();
        std::mem::forget(generator);
    }
    result
}

/// Tokens of a request's prompt (characters when it cannot be tokenized: an estimate for sizing).
fn prompt_tokens(model: &Model, r: &Request) -> usize {
    match &r.prompt {
        flexgen_runtime::Prompt::Tokens(t) => t.len(),
        flexgen_runtime::Prompt::Text(t) => {
            model.tokenizer.as_ref().and_then(|k| k.encode(t).ok()).map_or(t.len(), |v| v.len())
        }
    }
}

/// The text and JSON report of a run on the CPU executor, or of a pipeline of CUDA stages
/// (`backend` "cuda": the GPU tier is the device's memory in use).
fn report_cpu(
    cli: &RunArgs,
    backend: &str,
    (model, p): (&Model, &flexgen_policy::Policy),
    requests: &[Request],
    stats: &flexgen_runtime::RunStats,
    (load_s, started): (f64, std::time::Instant),
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut report = common_report(backend, model, p, requests, cli.max_new_tokens, stats, load_s);
    extend(
        &mut report,
        serde_json::json!({
            "peak_cpu_bytes": peak_rss_bytes(),
            "tier_bytes": { "gpu": stats.tiers.required.gpu, "cpu": stats.tiers.required.cpu, "disk": stats.tiers.required.disk },
            "bytes_moved": {
                "cpu_to_gpu": stats.tiers.traffic.cpu_to_gpu,
                "gpu_to_cpu": stats.tiers.traffic.gpu_to_cpu,
                "disk_read": stats.tiers.traffic.disk_read,
                "disk_write": stats.tiers.traffic.disk_write,
            },
            "direct_io": stats.direct_io,
            "wall_s": started.elapsed().as_secs_f64(),
        }),
    );
    if cli.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    writeln!(err, "\n{}", header(model, p, requests.len(), cli.max_new_tokens, backend))?;
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
        stats.decode_tokens_per_s(requests.len()),
        stats.decode_s,
        stats.total_tokens_per_s(),
        load_s
    )?;
    let peak = peak_rss_bytes().map_or_else(|| "unknown".into(), human_bytes);
    if backend == "cuda" {
        write!(err, "peak memory: process RSS {peak}, GPU in use {}", human_bytes(need.gpu))?;
    } else {
        write!(err, "peak memory: process RSS {peak} (CPU backend: the GPU tier is host memory)")?;
    }
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

/// The report fields both executors give: model, policy, workload, phase times and rates, the
/// policy's prediction and the calibration record.
fn common_report(
    backend: &str,
    model: &Model,
    p: &flexgen_policy::Policy,
    requests: &[Request],
    max_new: usize,
    stats: &flexgen_runtime::RunStats,
    load_s: f64,
) -> serde_json::Value {
    serde_json::json!({
        "model": model.spec.name,
        "weights": if model.dir.is_some() { "files" } else { "dummy" },
        "backend": backend,
        "policy": {
            "percent": p.placement.to_percent(),
            "gpu_batch_size": p.gpu_batch_size,
            "num_gpu_batches": p.num_gpu_batches,
            "cpu_cache_compute": p.cpu_cache_compute,
            "pin_weight": p.pin_weight,
            "compress_weight": p.compress_weight.enabled,
            "compress_cache": p.compress_cache.enabled,
        },
        "prompts": requests.len(),
        "prompt_tokens": stats.prompt_tokens,
        "generated_tokens": stats.generated_tokens,
        "blocks": stats.blocks,
        "load_s": load_s,
        "prefill_s": stats.prefill_s,
        "decode_s": stats.decode_s,
        "prefill_tokens_per_s": stats.prefill_tokens_per_s(),
        "decode_tokens_per_s": stats.decode_tokens_per_s(requests.len()),
        "total_tokens_per_s": stats.total_tokens_per_s(),
        "projected": false,
        "predicted_tokens_per_s": p.prediction.as_ref().map(|x| x.throughput_tokens_per_s),
        "predicted": p.prediction.as_ref().map(|x| serde_json::json!({ "prefill_s": x.prefill_s, "decode_s": x.decode_s })),
        "calibration": calibration_record(model, p, requests, max_new),
    })
}

/// Adds the fields of `more` (an object) to `report` (an object).
fn extend(report: &mut serde_json::Value, more: serde_json::Value) {
    if let (Some(r), serde_json::Value::Object(m)) = (report.as_object_mut(), more) {
        r.extend(m);
    }
}

/// The first line of the text report.
fn header(
    model: &Model,
    p: &flexgen_policy::Policy,
    prompts: usize,
    max_new: usize,
    backend: &str,
) -> String {
    format!(
        "model {} ({} weights), {prompts} prompts × {max_new} new tokens, block {}×{}, backend {backend}",
        model.spec.name,
        if model.dir.is_some() { "file" } else { "dummy" },
        p.gpu_batch_size,
        p.num_gpu_batches
    )
}

/// What `flexgen-plan --calibrate` needs from a run: the model's spec, the whole policy and the
/// workload (measured phase times are the report's `prefill_s` and `decode_s`).
fn calibration_record(
    model: &Model,
    policy: &flexgen_policy::Policy,
    requests: &[Request],
    max_new: usize,
) -> serde_json::Value {
    let prompt_len = requests.iter().map(|r| prompt_tokens(model, r)).max().unwrap_or(0);
    serde_json::json!({
        "spec": model.spec,
        "policy": policy,
        "workload": { "prompt_len": prompt_len, "gen_len": max_new, "num_prompts": requests.len() },
    })
}

fn load_model(cli: &ModelArgs, device: DeviceKind, seed: u64) -> anyhow::Result<Model> {
    if let Some(kind) = cli.dummy {
        let name = cli.model.as_deref().context("--dummy needs --model NAME (e.g. opt-125m)")?;
        let spec = flexgen_cli::model_spec(name)?;
        let init = kind.init(seed);
        let model = flexgen_cli::dummy_model(spec, init, device == DeviceKind::Cuda)
            .with_context(|| format!("building dummy weights for {name}"))?;
        return match &cli.tokenizer {
            Some(t) => model.with_tokenizer(t).context("--tokenizer"),
            None => Ok(model),
        };
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
    flexgen_cli::load_model_dir(&dir, device == DeviceKind::Cuda)
}

fn requests(cli: &RunArgs, model: &Model, block: usize) -> anyhow::Result<Vec<Request>> {
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
        // Synthetic prompts are built in memory: bound them before building them.
        if n.saturating_mul(len) > MAX_SYNTHETIC_TOKENS {
            bail!(
                "--num-prompts {n} × --prompt-len {len} is more than {MAX_SYNTHETIC_TOKENS} prompt \
                 tokens; use a batch job (flexgen-run batch) for work of that size"
            );
        }
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
    if n > MAX_SYNTHETIC_TOKENS {
        bail!("--num-prompts {n} is more than {MAX_SYNTHETIC_TOKENS}; use a batch job for that");
    }
    Ok(texts.iter().cycle().take(n.max(texts.len())).map(|t| Request::text(t.clone())).collect())
}

/// The most prompt tokens `--num-prompts` may ask `flexgen-run` to build in memory.
const MAX_SYNTHETIC_TOKENS: usize = 1 << 28;

/// What the CUDA report needs of a run besides its stats.
struct CudaRun<'a> {
    requests: &'a [Request],
    load_s: f64,
    setup_s: f64,
    started: std::time::Instant,
    /// The longest prompt, in tokens.
    longest: usize,
}

/// The text and JSON report of a run on the CUDA executor: memory per use, bytes moved, and each
/// decode step against the PCIe (and disk) roofline measured in the same process.
fn report_cuda(
    cli: &RunArgs,
    model: &Model,
    policy: &flexgen_policy::Policy,
    generator: &flexgen_runtime::CudaStage<'_>,
    stats: &flexgen_runtime::RunStats,
    run: &CudaRun<'_>,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let CudaRun { requests, load_s, setup_s, started, longest: prompt_len } = *run;
    let bytes = generator.gpu_bytes();
    let per_pass = generator.weight_bytes_per_pass();
    let decode = stats.decode_tokens_per_s(requests.len());
    let block = policy.block_size() as f64;
    // The roofline of a decode step: the weights and KV cache that must cross PCIe (the cache at
    // the middle decode step's length) at the pinned bandwidth measured in this process,
    // overlapped with the disk part of the weights at the direct-read bandwidth measured in this
    // process (the slower of the two links bounds the step).
    let disk_per_pass = generator.disk_bytes_per_pass();
    let (cache_pcie, cache_disk) = generator
        .cache_bytes_per_decode_step(prompt_len + cli.max_new_tokens.saturating_sub(2) / 2);
    let pcie_bytes = per_pass + cache_pcie;
    let pcie_s =
        generator.h2d_bytes_per_s.filter(|_| pcie_bytes > 0).map(|bw| pcie_bytes as f64 / bw);
    let disk_s = generator
        .disk_bytes_per_s
        .filter(|_| disk_per_pass > 0)
        .map(|bw| disk_per_pass as f64 / bw);
    let seqs = block.min(requests.len() as f64);
    let roofline = match (pcie_s, disk_s) {
        (Some(p), Some(d)) => Some(seqs / p.max(d)),
        (Some(p), None) => Some(seqs / p),
        _ => None,
    };
    let serial_roofline = match (pcie_s, disk_s) {
        (Some(p), Some(d)) => Some(seqs / (p + d)),
        _ => None,
    };
    // The rate the weight copies ran at inside the decode steps (each step copies `per_pass`).
    let copy_s = stats.host.decode_weight_copy_s;
    #[expect(clippy::cast_precision_loss, reason = "a rate")]
    let in_run_h2d = (copy_s > 0.0 && per_pass > 0)
        .then(|| (per_pass as f64 * stats.decode_steps.len() as f64) / copy_s);
    let mut steps = stats.decode_steps.clone();
    steps.sort_by(f64::total_cmp);
    let median_step = steps.get(steps.len() / 2).copied();
    let mut report =
        common_report("cuda", model, policy, requests, cli.max_new_tokens, stats, load_s);
    extend(
        &mut report,
        serde_json::json!({
            "gpu_setup_s": setup_s,
            "median_decode_step_s": median_step,
            "host_s": {
                "cpu_attention": stats.host.cpu_attention_s,
                "gpu_wait": stats.host.gpu_wait_s,
                "decode_weight_copy": copy_s,
            },
            "decode_h2d_bytes_per_s": in_run_h2d,
            "gpu_bytes": {
                "weights": bytes.weights, "staging": bytes.staging, "tables": bytes.tables,
                "kv_cache": bytes.cache, "activations": bytes.activations, "total": bytes.total(),
                "device_in_use": stats.tiers.required.gpu,
            },
            "cpu_bytes": { "pinned_weights": generator.pinned_bytes, "pageable_weights": generator.pageable_bytes, "peak_rss": peak_rss_bytes() },
            "bytes_moved": {
                "cpu_to_gpu": stats.tiers.traffic.cpu_to_gpu,
                "disk_read": stats.tiers.traffic.disk_read,
                "disk_write": stats.tiers.traffic.disk_write,
            },
            "weight_bytes_per_decode_step": per_pass,
            "cache_pcie_bytes_per_decode_step": cache_pcie,
            "cache_disk_bytes_per_decode_step": cache_disk,
            "disk_weight_bytes_per_decode_step": disk_per_pass,
            "disk_bytes": generator.disk_bytes(),
            "disk_cache_bytes": generator.disk_cache_bytes(),
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
            "wall_s": started.elapsed().as_secs_f64(),
        }),
    );
    if cli.json {
        writeln!(out, "{}", serde_json::to_string_pretty(&report)?)?;
        return Ok(());
    }
    let mut err = std::io::stderr().lock();
    writeln!(err, "\n{}", header(model, policy, requests.len(), cli.max_new_tokens, "cuda"))?;
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
    if stats.host.cpu_attention_s + stats.host.gpu_wait_s > 0.0 {
        writeln!(
            err,
            "host: CPU attention {:.3} s, waiting for the GPU {:.3} s (the GPU idles during the first)",
            stats.host.cpu_attention_s, stats.host.gpu_wait_s
        )?;
    }
    if let Some(rate) = in_run_h2d {
        writeln!(
            err,
            "weight copies during decode: {:.3} s busy of {:.3} s, at {:.1} GB/s (alone: {})",
            copy_s,
            stats.decode_s,
            rate / 1e9,
            generator
                .h2d_bytes_per_s
                .map_or("not measured".into(), |r| format!("{:.1} GB/s", r / 1e9))
        )?;
    }
    if generator.disk_cache_bytes() > 0 {
        writeln!(
            err,
            "KV cache on disk: {} ({} read, {} written with direct I/O during the run)",
            human_bytes(generator.disk_cache_bytes()),
            human_bytes(stats.tiers.traffic.disk_read),
            human_bytes(stats.tiers.traffic.disk_write)
        )?;
    }
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
            "roofline: {} of weights{} over PCIe per decode step at {:.1} GB/s (measured pinned){} = {:.1} tok/s; measured {:.1} ({:.1} %)",
            human_bytes(per_pass),
            if cache_pcie > 0 {
                format!(" and {} of KV cache", human_bytes(cache_pcie))
            } else {
                String::new()
            },
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
    Ok(())
}
