//! `flexgen-serve`: serves a model over an OpenAI-compatible HTTP API, concurrent requests
//! sharing the engine's blocks.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use flexgen_cli::PolicyArgs;
use flexgen_model::Model;
use flexgen_runtime::{Budgets, Device, Generator, GpuCapacity, LayerSource};

use flexgen_serve::{ChatTemplate, Engine, ServeOptions, router};

const LONG_ABOUT: &str = "\
Serve a model over an OpenAI-compatible HTTP API: GET /health, GET /v1/models,
POST /v1/completions (prompt or list of prompts, max_tokens, temperature, top_p, stop, seed),
POST /v1/chat/completions (messages, rendered with the model's chat_template from its
tokenizer_config.json, or the original chatbot's format for models without one), both streamed
as server-sent events with \"stream\": true, and Prometheus metrics at GET /metrics.

One engine runs every request through the policy's block schedule: requests that arrive within
--batch-wait-ms of each other share a block (up to gpu-batch-size × num-gpu-batches prompts), so
many concurrent clients get offloading's throughput. Any OpenAI client works: point its base URL
at http://HOST:PORT/v1.";

const EXAMPLES: &str = "\
Examples:
  flexgen-serve --port 8000
  curl -s localhost:8000/v1/completions -H 'Content-Type: application/json' \\
       -d '{\"prompt\": \"In the beginning\", \"max_tokens\": 16, \"temperature\": 0}'
  flexgen-serve --model ~/models/Llama-3.1-8B-Instruct --device cuda --policy p.toml --api-key KEY";

#[derive(Parser, Debug)]
#[command(name = "flexgen-serve", version, about = "Serve a model over an OpenAI-compatible HTTP API.", long_about = LONG_ABOUT, after_long_help = EXAMPLES)]
struct Cli {
    /// Hugging Face model directory; with --dummy, a spec name such as opt-30b. Default: the
    /// bundled model.
    #[arg(long, value_name = "PATH|NAME")]
    model: Option<String>,
    /// Dummy weights of the named spec (for trying the API on large shapes), with --tokenizer
    /// for text: `ones` (FlexGen's convention, the default) or `random` (seeded), as in flexgen-run.
    #[arg(long, value_name = "KIND", num_args = 0..=1, default_missing_value = "ones", requires = "model")]
    dummy: Option<flexgen_cli::DummyKind>,
    /// With --dummy: a tokenizer.json, or a model directory holding one.
    #[arg(long, value_name = "PATH", requires = "dummy")]
    tokenizer: Option<PathBuf>,
    #[command(flatten)]
    policy: PolicyArgs,
    /// Plan the policy at start-up from this hardware profile (flexgen-profile's TOML), as
    /// flexgen-plan does, for prompts of --max-prompt-tokens and --max-tokens-limit new tokens
    /// under --gpu-mem-limit; the policy flags above then apply on top of the plan.
    #[arg(long, value_name = "FILE", conflicts_with = "policy", help_heading = "Policy")]
    profile: Option<PathBuf>,
    /// Compute device: cpu (the tiered executor) or cuda (GPU 0).
    #[arg(long, default_value = "cpu", value_parser = ["cpu", "cuda"])]
    device: String,
    /// Memory the GPU tier may use (e.g. 16GiB).
    #[arg(long, value_name = "SIZE", value_parser = flexgen_cli::parse_bytes)]
    gpu_mem_limit: Option<u64>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1")]
    host: String,
    /// Port to listen on (0: any free port; the address is printed).
    #[arg(long, default_value_t = 8000)]
    port: u16,
    /// Require `Authorization: Bearer KEY` on every request.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// How long a request waits for others to share its block, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 20)]
    batch_wait_ms: u64,
    /// The most tokens a request may generate (its `max_tokens`).
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_tokens_limit: usize,
    /// Folder of the batch API's files and batches (/v1/files, /v1/batches); unfinished batches
    /// resume when the server starts again with it. Without it the batch API is off.
    #[arg(long, value_name = "DIR")]
    state_dir: Option<PathBuf>,
    /// The most requests waiting for the engine; more get 429.
    #[arg(long, value_name = "N", default_value_t = 4096)]
    max_queue: usize,
    /// The largest batch input upload (/v1/files), e.g. 200MiB; other bodies are limited to 2 MiB.
    #[arg(long, value_name = "SIZE", value_parser = flexgen_cli::parse_bytes, default_value = "200MiB")]
    max_upload: u64,
    /// With --device cuda: the longest prompt in tokens the GPU buffers are sized for.
    #[arg(long, value_name = "N", default_value_t = 1024)]
    max_prompt_tokens: usize,
}

/// The policy flexgen-plan would write for this model on `profile`, for the server's limits, with
/// the policy flags applied.
fn planned(
    cli: &Cli,
    profile: &std::path::Path,
    dir: Option<&std::path::Path>,
) -> anyhow::Result<flexgen_policy::Policy> {
    let hw = flexgen_policy::HardwareProfile::from_toml_file(profile)
        .context("reading the hardware profile (--profile)")?;
    let model = match dir {
        Some(d) => d.to_string_lossy().into_owned(),
        None => cli.model.clone().context("--dummy needs --model NAME")?,
    };
    let spec = flexgen_cli::model_spec(&model)?;
    let workload = flexgen_policy::Workload {
        prompt_len: u32::try_from(cli.max_prompt_tokens).context("--max-prompt-tokens")?,
        gen_len: u32::try_from(cli.max_tokens_limit).context("--max-tokens-limit")?,
        num_prompts: None,
    };
    let opts = flexgen_planner::PlanOptions {
        gpu_mem_limit_bytes: cli.gpu_mem_limit,
        offload_dir: cli.policy.offload_dir.clone(),
        ..flexgen_planner::PlanOptions::default()
    };
    let plan = flexgen_planner::plan(&spec, &hw, &workload, &opts).with_context(|| {
        format!(
            "planning {} on {} for prompts of {} tokens and {} new (--max-prompt-tokens, \
             --max-tokens-limit)",
            spec.name, hw.name, workload.prompt_len, workload.gen_len
        )
    })?;
    let p = &plan.policy;
    let pred = p.prediction.as_ref().map_or(0.0, |x| x.throughput_tokens_per_s);
    eprintln!(
        "flexgen-serve: planned on {}: percent {:?}, {}x{}, compress weights {} cache {}, \
         {pred:.2} tok/s predicted for full blocks",
        hw.name,
        p.placement.to_percent(),
        p.gpu_batch_size,
        p.num_gpu_batches,
        p.compress_weight.enabled,
        p.compress_cache.enabled
    );
    cli.policy.apply(plan.policy, &format!("the plan from {}", profile.display()))
}

fn main() -> ExitCode {
    flexgen_cli::main_with(&Cli::parse(), serve)
}

fn serve(cli: &Cli) -> anyhow::Result<()> {
    let dummy = cli.dummy.map(|k| k.init(0));
    let dir: Option<PathBuf> = if dummy.is_some() {
        None
    } else {
        Some(cli.model.as_ref().map_or_else(flexgen_cli::bundled_model_dir, PathBuf::from))
    };
    let policy = match &cli.profile {
        Some(profile) => planned(cli, profile, dir.as_deref())?,
        None => cli.policy.resolve()?,
    };
    let template = ChatTemplate::of_model_dir(dir.as_deref())?;
    let cuda = cli.device == "cuda";
    let model_name = match (&cli.model, &dir) {
        (Some(m), None) => m.clone(),
        (_, Some(d)) => {
            d.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into())
        }
        (None, None) => "model".into(),
    };
    let options = ServeOptions {
        model_name,
        api_key: cli.api_key.clone(),
        batch_wait: Duration::from_millis(cli.batch_wait_ms),
        block_size: policy.block_size(),
        max_tokens_limit: cli.max_tokens_limit,
        max_queue: cli.max_queue,
        max_upload_bytes: usize::try_from(cli.max_upload).unwrap_or(usize::MAX),
    };
    let (name, tokenizer) = (cli.model.clone(), cli.tokenizer.clone());
    let load = move || -> anyhow::Result<Model> {
        if let Some(init) = dummy {
            let name = name.context("--dummy needs --model NAME")?;
            let spec = flexgen_model::spec_by_name(&name)?;
            let m = flexgen_cli::dummy_model(spec, init, cuda)?;
            return match tokenizer {
                Some(t) => m.with_tokenizer(&t).context("--tokenizer"),
                None => Ok(m),
            };
        }
        let dir = dir.expect("a directory without --dummy");
        flexgen_cli::load_model_dir(&dir, cuda)
    };
    let (gpu_limit, max_prompt, max_new) =
        (cli.gpu_mem_limit, cli.max_prompt_tokens, cli.max_tokens_limit);
    let build = flexgen_serve::generator_builder(move |model: &Model| {
        if model.tokenizer.is_none() {
            anyhow::bail!("serving text needs a tokenizer: with --dummy, give --tokenizer PATH");
        }
        let device = if cuda {
            Device::Cuda {
                source: dummy.map_or(LayerSource::Loaded, LayerSource::Dummy),
                capacity: GpuCapacity { max_prompt, max_new, gpu_limit },
            }
        } else {
            Device::Cpu(Budgets { gpu_bytes: gpu_limit, ..Budgets::default() })
        };
        Generator::on(model, policy, device).context("setting up the engine")
    });
    let engine = Engine::start(load, build, &options)?;
    let app = router(engine, options, template, cli.state_dir.as_deref())?;
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    rt.block_on(async {
        let addr = format!("{}:{}", cli.host, cli.port);
        let listener = tokio::net::TcpListener::bind(&addr)
            .await
            .with_context(|| format!("listening at {addr} (--host, --port)"))?;
        let bound = listener.local_addr()?;
        eprintln!("flexgen-serve: listening on http://{bound} (OpenAI base URL http://{bound}/v1)");
        // Ctrl-C or SIGTERM: stop taking connections, answer the requests in flight, exit 0.
        // An unfinished batch resumes when the server starts again with its --state-dir.
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .context("installing the SIGTERM handler")?;
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                let name = tokio::select! {
                    _ = tokio::signal::ctrl_c() => "Ctrl-C",
                    _ = term.recv() => "SIGTERM",
                };
                eprintln!(
                    "flexgen-serve: {name}: no new connections; answering the requests in flight"
                );
            })
            .await
            .context("serving")?;
        eprintln!("flexgen-serve: stopped");
        Ok(())
    })
}
