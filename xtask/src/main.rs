//! Project automation, reached as `cargo xtask <command>` (alias in .cargo/config.toml).
//!
//! - `ci`: what CI runs, cheapest first: `cargo fmt --check`, clippy with `-D warnings`, the whole
//!   test suite, and the policy files check (every file under policies/ must parse and validate,
//!   which the tests do).
//! - `bench plan`: builds the release binaries and times `flexgen-plan` for every shipped hardware
//!   profile × OPT-6.7B/30B/175B, printing a markdown table for docs/benchmarks.md.
//! - `bench gpu`: builds what the GPU machine runs (release binaries and the check programs,
//!   stripped) into `.gpu/bin` and packed as `.gpu/pack/bin.tar.xz`, copies the anchor scripts
//!   (`xtask/anchors`) into `.gpu/flex` and `.gpu/anchors`, and checks that FlexLLMGen's source is
//!   in `.gpu/flex/src`; then, there:
//!   `xtask/scripts/gpu_executor_check.sh`, `gpu_runtime_bench.sh`, `gpu_suite.sh`
//!   (docs/benchmarks.md says which part gives what).
//! - `plot --input SWEEP.jsonl --out FIG.png [--title TEXT]`: the latency–throughput figure
//!   (`plot.rs`).

#![expect(clippy::print_stdout, reason = "xtask prints tables for the docs")]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{Context, bail};

mod plot;

const USAGE: &str = "usage: cargo xtask ci | cargo xtask bench plan | cargo xtask bench gpu | \
     cargo xtask plot --input SWEEP.jsonl[,MORE.jsonl] --out FIG.png [--title TEXT]\n\
     (the module documentation of xtask/src/main.rs says what each does)";

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("xtask lives in the workspace")?
        .to_path_buf();
    match args.iter().map(String::as_str).collect::<Vec<_>>().as_slice() {
        ["ci"] => ci(&root),
        ["bench", "plan"] => bench_plan(&root),
        ["bench", "gpu"] => stage_gpu(&root),
        ["plot", "--input", input, "--out", out, rest @ ..] => {
            let title = match rest {
                ["--title", t] => (*t).to_string(),
                [] => "throughput against latency".to_string(),
                _ => bail!(
                    "usage: cargo xtask plot --input SWEEP.jsonl --out FIG.png [--title TEXT]"
                ),
            };
            let mut points = Vec::new();
            for part in input.split(',') {
                points.extend(plot::read(Path::new(part))?);
            }
            plot::draw(&points, &title, Path::new(out))
        }
        [] | ["help" | "--help" | "-h", ..] | [_, "--help" | "-h"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => {
            eprintln!("{USAGE}");
            bail!("unknown command {args:?}")
        }
    }
}

fn cargo(root: &Path, args: &[&str]) -> anyhow::Result<()> {
    eprintln!("$ cargo {}", args.join(" "));
    let status = Command::new(env!("CARGO"))
        .args(args)
        .current_dir(root)
        .status()
        .context("running cargo")?;
    if !status.success() {
        bail!("cargo {} failed ({status})", args.join(" "));
    }
    Ok(())
}

fn ci(root: &Path) -> anyhow::Result<()> {
    let started = Instant::now();
    cargo(root, &["fmt", "--all", "--check"])?;
    cargo(root, &["clippy", "--workspace", "--all-targets", "--", "-D", "warnings"])?;
    cargo(root, &["test", "--workspace"])?;
    eprintln!("ci passed in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn stage_gpu(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["build", "--release", "--bins", "--examples"])?;
    cargo(root, &["build", "--release", "-p", "xtask"])?; // `xtask plot` draws the sweeps there
    let dest = root.join(".gpu/bin");
    std::fs::create_dir_all(&dest)?;
    let rel = root.join("target/release");
    for (dir, name) in [
        ("", "flexgen-run"),
        ("", "flexgen-plan"),
        ("", "flexgen-profile"),
        ("", "flexgen-serve"),
        ("examples", "cuda_check"),
        ("examples", "gpu_check"),
        ("examples", "executor_check"),
        ("examples", "host_attention_bench"),
        ("examples", "gemv4_bench"),
        ("", "xtask"),
    ] {
        let to = dest.join(name);
        std::fs::copy(rel.join(dir).join(name), &to)
            .with_context(|| format!("copying {name} (did the build make it?)"))?;
        let ok = Command::new("strip").arg(&to).status().is_ok_and(|s| s.success());
        println!("{}{}", to.display(), if ok { "" } else { " (not stripped: no `strip`)" });
    }
    // What the binaries were built from (the device's copy of the tree may carry a stale git
    // HEAD): the commit and whether the tree differed from it.
    let described = Command::new("git")
        .args(["describe", "--always", "--dirty", "--abbrev=12"])
        .current_dir(root)
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map_or_else(
            || "unknown (no git)".to_owned(),
            |o| String::from_utf8_lossy(&o.stdout).trim().to_owned(),
        );
    std::fs::write(dest.join("BUILT_FROM"), format!("{described}\n"))?;
    // The anchor scripts (xtask/anchors) go where gpu_suite.sh looks for them.
    for (name, dir) in [
        ("flexllmgen.sh", ".gpu/flex"),
        ("run_flexllmgen.py", ".gpu/flex"),
        ("hf_accel_opt.py", ".gpu/anchors"),
        ("pcie_bw.py", ".gpu/anchors"),
    ] {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(root.join("xtask/anchors").join(name), dir.join(name))
            .with_context(|| format!("copying xtask/anchors/{name} to {}", dir.display()))?;
    }
    if !root.join(".gpu/flex/src/flexllmgen").exists() {
        println!(
            "missing .gpu/flex/src/flexllmgen: FlexLLMGen's package (fetch \
             github:FMInference/FlexLLMGen, then `git --git-dir=<snapshot> archive HEAD flexllmgen \
             | tar x -C .gpu/flex/src`); the FlexLLMGen parts of the suite need it"
        );
    }
    // The working tree and the binaries no longer fit the device tool's 64 MiB together: the
    // binaries also travel packed, to be unpacked there.
    let pack = root.join(".gpu/pack");
    std::fs::create_dir_all(&pack)?;
    let packed = Command::new("sh")
        .arg("-c")
        .arg("tar cf - -C .gpu/bin . | xz -T0 -6 > .gpu/pack/bin.tar.xz")
        .current_dir(root)
        .status()
        .is_ok_and(|s| s.success());
    if packed {
        println!(
            "carry [\".gpu/pack\", \".gpu/flex\", \".gpu/anchors\"] and unpack there first: \
             `mkdir -p .gpu/bin && tar xJf .gpu/pack/bin.tar.xz -C .gpu/bin` (`/.gpu/` is in \
             .gitignore)"
        );
    } else {
        println!("carry `.gpu` (keep it under 64 MiB; packing needs tar and xz)");
    }
    Ok(())
}

fn bench_plan(root: &Path) -> anyhow::Result<()> {
    cargo(root, &["build", "--release", "--bin", "flexgen-plan"])?;
    let bin = root.join("target/release/flexgen-plan");
    let mut hw: Vec<PathBuf> = std::fs::read_dir(root.join("policies/hardware"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .collect();
    hw.sort();
    println!(
        "| hardware | model | tok/s predicted | policy (w g/c/d, cache g/c/d, act) | block | cpu attn | compress w/c | binding | solve s (wall) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for h in &hw {
        for model in ["opt-6.7b", "opt-30b", "opt-175b"] {
            let out = std::env::temp_dir().join("flexgen-bench-plan.toml");
            let t = Instant::now();
            let o = Command::new(&bin)
                .args(["--hardware"])
                .arg(h)
                .args(["--model", model, "--prompt-len", "512", "--gen-len", "32", "--out"])
                .arg(&out)
                .output()?;
            let wall = t.elapsed().as_secs_f64();
            if !o.status.success() {
                println!(
                    "| {} | {model} | infeasible | {} | | | | | {wall:.3} |",
                    stem(h),
                    String::from_utf8_lossy(&o.stderr).trim().replace('\n', " ")
                );
                continue;
            }
            let text = std::fs::read_to_string(&out)?;
            let v: toml::Table = toml::from_str(&text)?;
            let pl = &v["placement"];
            let tiers = |t: &toml::Value| format!("{}/{}/{}", t["gpu"], t["cpu"], t["disk"]);
            let act =
                if pl["activations"]["gpu"].as_float() == Some(100.0) { "gpu" } else { "cpu" };
            let pred = &v["prediction"];
            println!(
                "| {} | {model} | {:.2} | {}, {}, {act} | {}x{} | {} | {}/{} | {} | {wall:.3} |",
                stem(h),
                pred["throughput_tokens_per_s"].as_float().unwrap_or(0.0),
                tiers(&pl["weights"]),
                tiers(&pl["kv_cache"]),
                v["gpu_batch_size"],
                v["num_gpu_batches"],
                v["cpu_cache_compute"],
                v["compress_weight"]["enabled"],
                v["compress_cache"]["enabled"],
                pred["binding"].as_str().unwrap_or("?"),
            );
        }
    }
    Ok(())
}

fn stem(p: &Path) -> String {
    p.file_stem().map_or_else(String::new, |s| s.to_string_lossy().into_owned())
}
