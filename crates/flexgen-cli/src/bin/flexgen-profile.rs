//! `flexgen-profile`: measure this machine and write a hardware profile for flexgen-plan.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use flexgen_cli::{human_bytes, parse_bytes};
use flexgen_profiler::{Mode, Options, STEPS};

const LONG_ABOUT: &str = "\
Measure what the cost model needs on this machine and write it as a hardware profile (TOML) that
flexgen-plan reads: CPU model, cores and available memory; the CPU backend's GEMM and attention
rates; and sequential write/read bandwidth of the offload directory with direct I/O, so that the
page cache cannot make the disk look faster than it is. The probe file is removed afterwards, also
on error or Ctrl-C.

GPU probes (NVML inventory, pinned and pageable copies, fp16 GEMM) come with the CUDA backend; this
build records that no GPU was measured, and flexgen-plan then refuses to plan for the profile
until a GPU section is present (take one from policies/hardware/ as a model).";

#[derive(Parser, Debug)]
#[command(name = "flexgen-profile", version, about = "Measure this machine for flexgen-plan.", long_about = LONG_ABOUT)]
struct Cli {
    /// Write the profile here.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
    /// Folder whose disk the disk tier would use.
    #[arg(long, value_name = "DIR", default_value = "/tmp/flexgen-offload")]
    offload_dir: PathBuf,
    /// Measure for seconds instead of a minute (smaller sizes, one repetition).
    #[arg(long)]
    quick: bool,
    /// Name written into the profile (default: the host name).
    #[arg(long)]
    name: Option<String>,
    /// Record at most this much GPU memory for planning (e.g. 16GiB).
    #[arg(long, value_name = "SIZE", value_parser = parse_bytes)]
    gpu_mem_limit: Option<u64>,
}

fn main() -> ExitCode {
    flexgen_cli::init_logging();
    match run(&Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let probe = flexgen_profiler::disk_probe_path(&cli.offload_dir);
    ctrlc::set_handler(move || {
        let _ = std::fs::remove_file(&probe);
        eprintln!("\ninterrupted; probe file removed");
        std::process::exit(130);
    })
    .context("installing the Ctrl-C handler")?;
    let name = cli.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map_or_else(|_| "this-machine".into(), |h| h.trim().to_string())
    });
    let opts = Options {
        mode: if cli.quick { Mode::Quick } else { Mode::Full },
        offload_dir: cli.offload_dir.clone(),
        name,
    };
    let bar = indicatif::ProgressBar::new(STEPS.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let (mut profile, inv, direct) = flexgen_profiler::profile(&opts, &mut |i| {
        bar.set_position(i as u64);
        bar.set_message(STEPS[i]);
    })
    .with_context(|| format!("profiling (offload dir {})", cli.offload_dir.display()))?;
    bar.finish_and_clear();
    let mut err = std::io::stderr().lock();
    writeln!(
        err,
        "no GPU measured: this build has no CUDA backend; the profile has no [gpu] section"
    )?;
    if let (Some(limit), Some(g)) = (cli.gpu_mem_limit, profile.gpu.as_mut()) {
        g.memory_bytes = g.memory_bytes.min(limit);
    }
    writeln!(
        err,
        "CPU {} ({} cores), memory {} total / {} available",
        inv.cpu_model,
        inv.cores,
        human_bytes(inv.memory_total_bytes),
        human_bytes(inv.memory_available_bytes)
    )?;
    writeln!(
        err,
        "CPU GEMM {:.1} GFLOP/s, CPU attention {:.1} GFLOP/s",
        profile.cpu.gemm_flops_per_s / 1e9,
        profile.cpu.attention_flops_per_s / 1e9
    )?;
    writeln!(
        err,
        "disk {} ({}, {} free): write {:.2} GB/s, read {:.2} GB/s{}",
        cli.offload_dir.display(),
        inv.fs_type,
        human_bytes(inv.disk_free_bytes),
        profile.disk.write_bytes_per_s / 1e9,
        profile.disk.read_bytes_per_s / 1e9,
        if direct { " (direct I/O)" } else { " (buffered: O_DIRECT refused by this file system)" }
    )?;
    profile.write_toml_file(&cli.out).with_context(|| format!("writing {}", cli.out.display()))?;
    writeln!(err, "wrote {}", cli.out.display())?;
    Ok(())
}
