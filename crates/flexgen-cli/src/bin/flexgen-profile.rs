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

On a GPU machine it also reads the GPU through NVML (name, memory, PCIe link, driver) and times,
with CUDA events on non-default streams: pinned and pageable host→device and device→host copies,
both directions at once, device-memory bandwidth, and fp16 GEMM (fp32 accumulation) and batched
attention with cuBLAS. The CUDA libraries are loaded at run time; without them (or without a GPU)
the profile has no [gpu] section, the run says why once, and flexgen-plan refuses to plan for it.";

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
    flexgen_cli::main_with(&Cli::parse(), run)
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    // Refuse an output that cannot be written before minutes of measuring, not after.
    if let Some(dir) = cli.out.parent().filter(|d| !d.as_os_str().is_empty())
        && !dir.is_dir()
    {
        anyhow::bail!(
            "--out {}: the directory {} does not exist (create it or choose another path)",
            cli.out.display(),
            dir.display()
        );
    }
    let name = cli.name.clone().unwrap_or_else(|| {
        std::fs::read_to_string("/etc/hostname")
            .map_or_else(|_| "this-machine".into(), |h| h.trim().to_string())
    });
    let opts = Options {
        mode: if cli.quick { Mode::Quick } else { Mode::Full },
        offload_dir: cli.offload_dir.clone(),
        name,
        gpu_mem_limit_bytes: cli.gpu_mem_limit,
    };
    let bar = indicatif::ProgressBar::new(STEPS.len() as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {msg}")
            .expect("valid template"),
    );
    let report = flexgen_profiler::profile(&opts, &mut |i| {
        bar.set_position(i as u64);
        bar.set_message(STEPS[i]);
    })
    .with_context(|| format!("profiling (offload dir {})", cli.offload_dir.display()))?;
    bar.finish_and_clear();
    let (profile, inv, direct) = (&report.profile, &report.inventory, report.direct_io);
    let mut err = std::io::stderr().lock();
    match (&report.gpu_inventory, &report.gpu_rates, &report.no_gpu_reason) {
        (Some(g), Some(r), _) => {
            writeln!(
                err,
                "GPU {} ({} total, {} free, compute capability {}, PCIe {}, driver {})",
                g.name,
                human_bytes(g.memory_total_bytes),
                human_bytes(g.memory_free_bytes),
                g.compute_capability.as_deref().unwrap_or("unknown"),
                g.pcie.as_deref().unwrap_or("unknown"),
                g.driver.as_deref().unwrap_or("unknown")
            )?;
            writeln!(
                err,
                "copies GB/s: pinned H2D {:.1}, D2H {:.1}, both at once {:.1}; pageable H2D {:.1}, D2H {:.1}; device memory {:.0}",
                r.h2d_pinned / 1e9,
                r.d2h_pinned / 1e9,
                r.bidirectional_pinned / 1e9,
                r.h2d_pageable / 1e9,
                r.d2h_pageable / 1e9,
                r.hbm / 1e9
            )?;
            writeln!(
                err,
                "fp16 GEMM {:.1} TFLOP/s, batched attention {:.1} TFLOP/s",
                r.gemm / 1e12,
                r.attention / 1e12
            )?;
            writeln!(
                err,
                "while CPU attention runs on every core: pinned H2D {:.1} GB/s, CPU attention \
                 meanwhile {:.1} GFLOP/s (alone: {:.1})",
                r.h2d_pinned_with_cpu_attention / 1e9,
                r.cpu_attention_with_h2d / 1e9,
                profile.cpu.attention_flops_per_s / 1e9
            )?;
        }
        (_, _, Some(why)) => {
            writeln!(err, "no GPU measured ({why}); the profile has no [gpu] section")?;
        }
        _ => {}
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
        "CPU GEMM {:.1} GFLOP/s, CPU attention {:.1} GFLOP/s (over a 4-bit cache {:.1})",
        profile.cpu.gemm_flops_per_s / 1e9,
        profile.cpu.attention_flops_per_s / 1e9,
        profile.cpu.packed_attention_flops_per_s.unwrap_or(0.0) / 1e9
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
    profile.write_toml_file(&cli.out).context("writing the profile (--out)")?;
    writeln!(err, "wrote {}", cli.out.display())?;
    Ok(())
}
