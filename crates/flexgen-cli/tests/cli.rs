//! The three binaries as a user runs them: the README's main job on the bundled model, the
//! profile → plan path, and the errors for bad input.

use std::path::Path;
use std::process::{Command, Output};

fn bin(name: &str) -> Command {
    let path = match name {
        "flexgen-run" => env!("CARGO_BIN_EXE_flexgen-run"),
        "flexgen-plan" => env!("CARGO_BIN_EXE_flexgen-plan"),
        _ => env!("CARGO_BIN_EXE_flexgen-profile"),
    };
    Command::new(path)
}

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn root() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/../.."))
}

#[test]
fn run_on_the_bundled_model_prints_text_and_throughput() {
    let o = bin("flexgen-run")
        .args(["--prompt", "In the beginning", "--max-new-tokens", "12"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    // The bundled model was trained on the KJV: its greedy continuation is golden-tested; here we
    // check the user-facing output.
    assert!(out.starts_with("In the beginning of the reign of"), "{out}");
    for field in ["prefill", "decode", "total", "tok/s", "peak memory"] {
        assert!(err.contains(field), "{field} missing from: {err}");
    }
}

#[test]
fn run_json_report_has_the_throughput_fields() {
    let o = bin("flexgen-run")
        .args([
            "--prompt",
            "And God said",
            "--prompt",
            "Jesus wept.",
            "--max-new-tokens",
            "4",
            "--gpu-batch-size",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["prompts"], 2);
    assert_eq!(v["generated_tokens"], 8);
    assert_eq!(v["policy"]["gpu_batch_size"], 2);
    assert!(v["total_tokens_per_s"].as_f64().unwrap() > 0.0);
    assert_eq!(v["projected"], false);
}

#[test]
fn run_with_a_dummy_spec_and_synthetic_prompts() {
    let o = bin("flexgen-run")
        .args([
            "--model",
            "opt-125m",
            "--dummy",
            "random",
            "--prompt-len",
            "8",
            "--max-new-tokens",
            "2",
            "--gpu-batch-size",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["weights"].as_str(), v["prompts"].as_u64(), v["generated_tokens"].as_u64()),
        (Some("dummy"), Some(2), Some(4))
    );
}

#[test]
fn run_refuses_a_bad_model_directory_with_its_path() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin("flexgen-run").args(["--model"]).arg(dir.path()).output().unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        err.contains(&dir.path().display().to_string()) && err.contains("config.json"),
        "{err}"
    );
}

#[test]
fn run_refuses_a_bad_percent_naming_the_flag() {
    let o = bin("flexgen-run")
        .args(["--percent", "60", "50", "100", "0", "100", "0"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("--percent") && err.contains("110"), "{err}");
}

#[test]
fn run_overrides_a_policy_file_with_flags() {
    let o = bin("flexgen-run")
        .arg("--policy")
        .arg(root().join("policies/opt-30b-t4.toml"))
        .args([
            "--gpu-batch-size",
            "1",
            "--num-gpu-batches",
            "1",
            "--max-new-tokens",
            "2",
            "--json",
        ])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["policy"]["percent"][0], 20.0);
    assert_eq!(v["policy"]["gpu_batch_size"], 1);
    assert_eq!(v["policy"]["cpu_cache_compute"], true);
}

#[test]
fn plan_writes_a_policy_that_run_accepts() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("p.toml");
    let o = bin("flexgen-plan")
        .arg("--hardware")
        .arg(root().join("policies/hardware/t4-16gb.toml"))
        .args([
            "--model",
            "opt-30b",
            "--prompt-len",
            "512",
            "--gen-len",
            "32",
            "--explain",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("#1:") && err.contains("binds") && err.contains("LPs solved"), "{err}");
    // What holds the block back: on the T4 profile the next blocks overfill the host (and the
    // GPU).
    assert!(err.contains("larger blocks with #1's other choices:"), "{err}");
    assert!(err.contains("does not fit: ") && err.contains("CPU needs"), "{err}");
    let policy = flexgen_policy::Policy::from_toml_file(&out).unwrap();
    assert!(policy.prediction.unwrap().throughput_tokens_per_s > 0.0);
    let o = bin("flexgen-run")
        .arg("--policy")
        .arg(&out)
        .args([
            "--gpu-batch-size",
            "1",
            "--num-gpu-batches",
            "1",
            "--max-new-tokens",
            "2",
            "--quiet",
        ])
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
}

/// `--cpu-mem-limit` plans for less host memory than the profile's: OPT-175B under 15 GiB on
/// the H200 host, whose plan fills the host (0.85 of it), fits under 0.85 of the limit instead;
/// `--cpu-margin 0.95` fills 0.95 of it, with a larger block; a margin outside 0.5 to 1 is
/// refused, naming the flag.
#[test]
fn plan_keeps_its_host_memory_under_a_cpu_limit() {
    let dir = tempfile::tempdir().unwrap();
    let profile = root().join("policies/hardware/h200.toml");
    let plan = |extra: &[&str]| {
        let out = dir.path().join("p.toml");
        let mut cmd = bin("flexgen-plan");
        cmd.arg("--hardware").arg(&profile).args([
            "--model",
            "opt-175b",
            "--prompt-len",
            "512",
            "--gen-len",
            "32",
            "--gpu-mem-limit",
            "15GiB",
        ]);
        let o = cmd.args(extra).arg("--out").arg(&out).output().unwrap();
        (o.status.success().then(|| flexgen_policy::Policy::from_toml_file(&out).unwrap()), o)
    };
    let peak_cpu = |extra: &[&str]| {
        let (p, o) = plan(extra);
        let p = p.unwrap_or_else(|| panic!("{}", text(&o).1));
        (p.prediction.as_ref().unwrap().peak_cpu_bytes, p.block_size())
    };
    let memory =
        flexgen_policy::HardwareProfile::from_toml_file(&profile).unwrap().cpu.memory_bytes;
    let host = |share: u64| memory * share / 100 + 1;
    let ((whole, block), (limited, _)) = (peak_cpu(&[]), peak_cpu(&["--cpu-mem-limit", "100GB"]));
    assert!(whole > 85_000_000_000, "the unlimited plan uses more than the limit allows: {whole}");
    assert!(limited <= 85_000_000_000, "{limited}");
    let (fuller, larger) = peak_cpu(&["--cpu-margin", "0.95"]);
    assert!(whole <= host(85) && fuller > host(85) && fuller <= host(95), "{whole} {fuller}");
    assert!(larger > block, "a block of {larger} against {block}");
    let (none, o) = plan(&["--cpu-margin", "1.2"]);
    assert!(none.is_none() && text(&o).1.contains("--cpu-margin"), "{}", text(&o).1);
}

#[test]
fn plan_for_a_model_too_big_says_by_how_much() {
    let dir = tempfile::tempdir().unwrap();
    let hw = dir.path().join("small.toml");
    let t4 = std::fs::read_to_string(root().join("policies/hardware/t4-16gb.toml")).unwrap();
    let small = t4
        .replace("capacity_bytes = 1500000000000", "capacity_bytes = 1000000000")
        .replace("memory_bytes = 208000000000", "memory_bytes = 64000000000");
    std::fs::write(&hw, small).unwrap();
    let o = bin("flexgen-plan")
        .arg("--hardware")
        .arg(&hw)
        .args(["--model", "opt-175b", "--prompt-len", "512", "--gen-len", "32"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("does not fit") && err.contains("short by"), "{err}");
}

#[test]
fn a_profile_given_as_a_policy_and_a_policy_as_a_profile_say_where_they_belong() {
    let o = bin("flexgen-run")
        .arg("--policy")
        .arg(root().join("policies/hardware/h200.toml"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is a hardware profile: give it to flexgen-plan --hardware"), "{err}");
    let o = bin("flexgen-plan")
        .arg("--hardware")
        .arg(root().join("policies/opt-30b-t4.toml"))
        .args(["--model", "opt-30b", "--prompt-len", "8", "--gen-len", "8"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("is a policy: give it to flexgen-run --policy"), "{err}");
}

#[test]
fn profile_refuses_an_output_directory_that_does_not_exist_before_measuring() {
    let dir = tempfile::tempdir().unwrap();
    let o = bin("flexgen-profile")
        .args(["--quick", "--offload-dir"])
        .arg(dir.path().join("off"))
        .arg("--out")
        .arg(dir.path().join("missing/hw.toml"))
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("missing does not exist"), "{err}");
    assert!(!dir.path().join("off").exists(), "nothing measured: {err}");
}

#[test]
fn profile_then_plan_on_a_machine_without_gpu() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("hw.toml");
    let o = bin("flexgen-profile")
        .args(["--quick", "--offload-dir"])
        .arg(dir.path().join("off"))
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert_eq!(err.matches("no GPU").count(), 1, "say it once: {err}");
    assert!(
        std::fs::read_dir(dir.path().join("off")).unwrap().next().is_none(),
        "probe file left behind"
    );
    let o = bin("flexgen-plan")
        .arg("--hardware")
        .arg(&out)
        .args(["--model", "opt-1.3b", "--prompt-len", "64", "--gen-len", "8"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert_eq!(o.status.code(), Some(1));
    assert!(err.contains("has no GPU"), "{err}");
}

/// Issue 8's and issue 20's calibration goal, on the runs measured on the H200 and committed under
/// docs/runs (S3 and S4 on the fused 4-bit kernels, sessions 19 and 15; S2nc, OPT-30B fp16 under
/// 16 GiB with CPU attention, session 19; the planner's S2 plans of session 20, 4-bit 24×3 with
/// the cache split between GPU and CPU and fp16 24×3; session 5: copy-stream prefetch; the session-3 runs
/// predate it but copy no cache or activations from the CPU): the cost model refit to them
/// predicts every run within ±10 % of its measured time (issue 8 asks ±15 %), over eight kinds
/// of policy, and the profile refit to the *other* runs (leave-one-out) within ±15 % (issue 20).
/// Session 19's S2nc runs replace session 5's two of the same policy, whose CPU attention ran at a
/// third of the profiled rate (rows split once per thread); with those the refit scaled all CPU
/// attention down and the new runs fell 63–110 % out (docs/benchmarks.md gives each figure).
#[test]
fn calibrate_on_the_h200_runs_predicts_within_15_percent() {
    let s3 = root().join("docs/runs/2026-11-29");
    let s5 = root().join("docs/runs/2026-11-29-s5");
    let s19 = root().join("docs/runs/2026-12-03-s19");
    let mut runs: Vec<_> =
        ["s1c", "s1cc-32x2", "s1cc-128x2"].map(|r| s3.join(format!("{r}.json"))).to_vec();
    for r in ["s2-plan14", "s2-s4policy", "sw30-24x1"] {
        runs.push(s5.join(format!("{r}.json")));
    }
    // S4 on the session-15 runtime, S3 on session 19's (its 4-bit products and attention read
    // the codes straight on the tensor cores and store their own sums, its q/k/v split packs the
    // cache; session 5's sw175-32x1 ran the dequantizing path the model no longer plans for 32
    // rows), and session 19's S2nc.
    runs.push(root().join("docs/runs/2026-12-03-s15/call5/s4a.json"));
    runs.push(s19.join("call2/s3.json"));
    runs.push(s19.join("call5/s2nc_1.json"));
    runs.push(s19.join("call6/s2nc_3.json"));
    let s20 = root().join("docs/runs/2026-12-03-s20/call4");
    runs.extend(["s2.json", "s2nc.json"].map(|r| s20.join(r)));
    let out_toml = std::env::temp_dir().join(format!("flexgen-cal-{}.toml", std::process::id()));
    let o = bin("flexgen-plan")
        .arg("--calibrate")
        .args(&runs)
        .arg("--hardware")
        .arg(s5.join("profile.toml"))
        .arg("--out")
        .arg(&out_toml)
        .output()
        .unwrap();
    let (stdout, stderr) = text(&o);
    assert!(o.status.success(), "{stderr}");
    let mut checked = 0;
    for line in stdout.lines().filter(|l| l.contains(".json |")) {
        let cells: Vec<&str> = line.split('|').map(str::trim).collect();
        let pct = |i: usize| cells[i].trim_end_matches(" %").parse::<f64>().unwrap();
        let (refit, left_out) = (pct(6), pct(8));
        assert!(refit.abs() <= 10.0 && left_out.abs() <= 15.0, "{line}\n{stdout}");
        checked += 1;
    }
    assert_eq!(checked, 12, "{stdout}");
    assert!(std::fs::read_to_string(&out_toml).unwrap().contains("calibrated to 12 run(s)"));
    std::fs::remove_file(&out_toml).unwrap();
}

#[test]
fn dummy_weights_take_a_tokenizer_for_text_prompts_and_batch_jobs() {
    let kjv = root().join("crates/flexgen-model/models/opt-kjv");
    let o = bin("flexgen-run")
        .args(["--model", "opt-125m", "--dummy", "--tokenizer"])
        .arg(&kjv)
        .args(["--prompt", "In the beginning", "--max-new-tokens", "2", "--ignore-eos"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    assert!(out.starts_with("In the beginning"), "{out}");
    // A batch job of text prompts on the same dummy model.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(&input, "{\"id\": \"a\", \"prompt\": \"Jesus wept\", \"max_new_tokens\": 2}\n")
        .unwrap();
    let output = dir.path().join("out.jsonl");
    let o = bin("flexgen-run")
        .args(["batch", "-q", "--model", "opt-125m", "--dummy", "--tokenizer"])
        .arg(kjv.join("tokenizer.json"))
        .arg("--input")
        .arg(&input)
        .arg("--output")
        .arg(&output)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", text(&o).1);
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&output).unwrap().trim()).unwrap();
    assert_eq!(line["id"], "a");
    assert!(line["prompt_tokens"].as_u64() >= Some(2), "BOS and the prompt's tokens: {line}");
    assert_eq!(line["tokens"].as_array().map(Vec::len), Some(2), "{line}");
    // Without a tokenizer a batch job says what to add; a missing file is named.
    let o = bin("flexgen-run")
        .args(["batch", "-q", "--model", "opt-125m", "--dummy", "--input"])
        .arg(&input)
        .arg("--output")
        .arg(dir.path().join("none.jsonl"))
        .output()
        .unwrap();
    let err = text(&o).1;
    assert!(!o.status.success() && err.contains("--tokenizer PATH"), "{err}");
    let o = bin("flexgen-run")
        .args(["--model", "opt-125m", "--dummy", "--tokenizer", "/nonexistent/tok.json"])
        .output()
        .unwrap();
    let err = text(&o).1;
    assert!(!o.status.success() && err.contains("/nonexistent/tok.json"), "{err}");
}

/// `--dummy` runs any shape a config.json alone gives (here the bundled model's with two layers),
/// and a broken config.json is named.
#[test]
fn dummy_weights_take_the_shape_of_a_config_alone() {
    let dir = tempfile::tempdir().unwrap();
    let kjv = root().join("crates/flexgen-model/models/opt-kjv/config.json");
    let mut config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(kjv).unwrap()).unwrap();
    config["num_hidden_layers"] = 2.into();
    std::fs::write(dir.path().join("config.json"), config.to_string()).unwrap();
    let o = bin("flexgen-run")
        .args(["--model"])
        .arg(dir.path())
        .args(["--dummy", "--prompt-len", "4", "--max-new-tokens", "2", "--json"])
        .output()
        .unwrap();
    let (out, err) = text(&o);
    assert!(o.status.success(), "{err}");
    let report: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(report["calibration"]["spec"]["num_layers"], 2, "{report}");
    assert_eq!(report["generated_tokens"], 2, "{report}");
    std::fs::write(dir.path().join("config.json"), "{\"model_type\": \"opt\"").unwrap();
    let o = bin("flexgen-run").args(["--model"]).arg(dir.path()).arg("--dummy").output().unwrap();
    let err = text(&o).1;
    assert!(!o.status.success() && err.contains("config.json"), "{err}");
}

#[test]
fn a_batch_line_longer_than_the_model_is_named_or_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let long = "and ".repeat(3000);
    std::fs::write(
        &input,
        format!(
            "{{\"id\": 1, \"prompt\": \"Jesus wept\", \"max_new_tokens\": 2}}\n\
             {{\"id\": 2, \"prompt\": \"{long}\", \"max_new_tokens\": 2}}\n"
        ),
    )
    .unwrap();
    let output = dir.path().join("out.jsonl");
    let run = |extra: &[&str]| {
        bin("flexgen-run")
            .args(["batch", "-q", "--input"])
            .arg(&input)
            .arg("--output")
            .arg(&output)
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    let err = text(&o).1;
    assert!(!o.status.success(), "{err}");
    assert!(err.contains("in.jsonl:2:") && err.contains("positions"), "{err}");
    let o = run(&["--on-error", "skip"]);
    assert!(o.status.success(), "{}", text(&o).1);
    let out = std::fs::read_to_string(&output).unwrap();
    assert_eq!(out.lines().count(), 1, "{out}");
    let errors = std::fs::read_to_string(dir.path().join("out.jsonl.errors.jsonl")).unwrap();
    assert!(errors.contains("\"line\":2") && errors.contains("positions"), "{errors}");
}

#[test]
fn a_temperature_that_is_not_a_finite_number_is_refused() {
    for t in ["NaN", "-inf", "-1"] {
        let o = bin("flexgen-run")
            .args([
                "--prompt",
                "Jesus wept",
                "--max-new-tokens",
                "2",
                &format!("--temperature={t}"),
            ])
            .output()
            .unwrap();
        let err = text(&o).1;
        assert!(!o.status.success() && err.contains("--temperature"), "{t}: {err}");
    }
}

#[test]
fn a_policy_with_pipeline_stages_runs_them_and_names_a_bad_one() {
    let dir = tempfile::tempdir().unwrap();
    let one = "version = 1\ngpu_batch_size = 2\nnum_gpu_batches = 2\ncpu_cache_compute = false\n\
               pin_weight = false\n\n[placement.weights]\ngpu = 100.0\ncpu = 0.0\ndisk = 0.0\n\n\
               [placement.kv_cache]\ngpu = 100.0\ncpu = 0.0\ndisk = 0.0\n\n\
               [placement.activations]\ngpu = 100.0\ncpu = 0.0\ndisk = 0.0\n\n\
               [compress_weight]\nenabled = false\nbits = 4\ngroup_size = 64\ngroup_dim = 0\n\n\
               [compress_cache]\nenabled = false\nbits = 4\ngroup_size = 64\ngroup_dim = 2\n";
    // The bundled model's 4 layers as two stages; the second keeps its weights, cache and
    // activations on the CPU tier.
    let stages = "\n[[stage]]\nlayers = [0, 2]\n\n[[stage]]\nlayers = [2, 4]\n\n\
                  [stage.placement.weights]\ngpu = 0.0\ncpu = 100.0\ndisk = 0.0\n\n\
                  [stage.placement.kv_cache]\ngpu = 0.0\ncpu = 100.0\ndisk = 0.0\n\n\
                  [stage.placement.activations]\ngpu = 0.0\ncpu = 100.0\ndisk = 0.0\n";
    let run = |policy: &str| {
        let path = dir.path().join("p.toml");
        std::fs::write(&path, policy).unwrap();
        bin("flexgen-run")
            .arg("--policy")
            .arg(&path)
            .args(["--prompt", "In the beginning", "--prompt", "Jesus wept"])
            .args(["--max-new-tokens", "10", "--ignore-eos"])
            .output()
            .unwrap()
    };
    let want = run(one);
    assert!(want.status.success(), "{}", text(&want).1);
    let got = run(&format!("{one}{stages}"));
    assert!(got.status.success(), "{}", text(&got).1);
    assert_eq!(text(&got).0, text(&want).0, "two stages print one stage's text");
    // Stages that stop short of the model, and stages out of order, are named.
    let short = run(&format!("{one}\n[[stage]]\nlayers = [0, 3]\n"));
    let (_, err) = text(&short);
    assert!(!short.status.success() && err.contains("stage") && err.contains("at 4"), "{err}");
    let gap = run(&format!("{one}\n[[stage]]\nlayers = [0, 2]\n\n[[stage]]\nlayers = [3, 4]\n"));
    let (_, err) = text(&gap);
    assert!(!gap.status.success() && err.contains("stage[1].layers"), "{err}");
}

#[test]
fn planned_pipeline_stages_run_and_print_one_stages_text() {
    let dir = tempfile::tempdir().unwrap();
    // The H200 profile as a host with two of them.
    let hw = std::fs::read_to_string(root().join("policies/hardware/h200.toml")).unwrap();
    let two = dir.path().join("2xh200.toml");
    std::fs::write(&two, hw.replace("[gpu]\n", "[gpu]\ncount = 2\n")).unwrap();
    let kjv = root().join("crates/flexgen-model/models/opt-kjv");
    let plan = |hw: &Path, stages: &str, out: &Path| {
        bin("flexgen-plan")
            .arg("--hardware")
            .arg(hw)
            .arg("--model")
            .arg(&kjv)
            .args(["--prompt-len", "8", "--gen-len", "10", "--max-batch", "2", "--stages", stages])
            .arg("--out")
            .arg(out)
            .output()
            .unwrap()
    };
    let piped = dir.path().join("p2.toml");
    let o = plan(&two, "2", &piped);
    let (_, err) = text(&o);
    assert!(o.status.success() && err.contains("2 stages"), "{err}");
    let policy = flexgen_policy::Policy::from_toml_file(&piped).unwrap();
    assert_eq!(policy.pipeline(4).len(), 2, "two [[stage]] entries over the 4 layers");
    let run = |p: &Path| {
        let o = bin("flexgen-run")
            .arg("--policy")
            .arg(p)
            .args(["--prompt", "In the beginning", "--prompt", "Jesus wept"])
            .args(["--max-new-tokens", "10", "--ignore-eos"])
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o).1);
        text(&o).0
    };
    // The same policy without its stages prints the same text.
    let mut flat = policy.clone();
    flat.stages.clear();
    let flat_path = dir.path().join("p1.toml");
    flat.write_toml_file(&flat_path).unwrap();
    assert_eq!(run(&piped), run(&flat_path));
    // More stages than the profile's GPUs: named, with the fix.
    let o = plan(&root().join("policies/hardware/h200.toml"), "2", &dir.path().join("x.toml"));
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("gpu.count = 1"), "{err}");
}

#[test]
fn nproc_runs_the_pipeline_in_processes_and_names_a_failing_rank() {
    let run = |extra: &[&str]| {
        bin("flexgen-run")
            .args(["--prompt", "In the beginning", "--prompt", "Jesus wept"])
            .args(["--max-new-tokens", "10", "--ignore-eos", "--gpu-batch-size", "1"])
            .args(["--num-gpu-batches", "2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let want = run(&[]);
    assert!(want.status.success(), "{}", text(&want).1);
    for n in ["2", "3", "4"] {
        let started = std::time::Instant::now();
        let got = run(&["--nproc", n]);
        assert!(got.status.success(), "--nproc {n}: {}", text(&got).1);
        assert_eq!(text(&got).0, text(&want).0, "--nproc {n} prints one process's text");
        assert!(started.elapsed().as_secs() < 30, "--nproc {n}: {:?}", started.elapsed());
    }
    // A batch job over two processes writes what one process writes.
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": \"a\", \"prompt\": \"And God said\", \"max_new_tokens\": 6}\n\
                            {\"id\": \"b\", \"prompt\": \"Amen\", \"max_new_tokens\": 6}\n",
    )
    .unwrap();
    let batch = |out: &str, extra: &[&str]| {
        let out = dir.path().join(out);
        let o = bin("flexgen-run")
            .arg("batch")
            .arg("--input")
            .arg(&input)
            .arg("--output")
            .arg(&out)
            .args(["--ignore-eos", "-q"])
            .args(extra)
            .output()
            .unwrap();
        assert!(o.status.success(), "{}", text(&o).1);
        let mut lines: Vec<String> =
            std::fs::read_to_string(out).unwrap().lines().map(String::from).collect();
        lines.sort();
        lines
    };
    assert_eq!(batch("two.jsonl", &["--nproc", "2"]), batch("one.jsonl", &[]));
    // Stage 1's weights go to a folder that cannot be made: rank 0 names rank 1 and the path,
    // and every process stops.
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, "").unwrap();
    let mut p = flexgen_policy::Policy {
        offload_dir: Some(blocker.join("offload")),
        ..flexgen_policy::Policy::default()
    };
    let on_disk = flexgen_policy::Placement {
        weights: flexgen_policy::TierShares::from_gpu_cpu(0.0, 0.0),
        ..p.placement
    };
    p.stages = vec![
        flexgen_policy::Stage { layers: [0, 2], placement: None, cpu_cache_compute: None },
        flexgen_policy::Stage { layers: [2, 4], placement: Some(on_disk), cpu_cache_compute: None },
    ];
    // `flexgen-run --policy FILE ARGS…`.
    let run_policy = |policy: &Path, args: &[&str]| {
        bin("flexgen-run").arg("--policy").arg(policy).args(args).output().unwrap()
    };
    // With a folder that can be made: the report's memory over two processes is the two stages'
    // in one (rank 1's weights on disk counted by rank 0).
    let ok_policy = dir.path().join("ok.toml");
    flexgen_policy::Policy { offload_dir: Some(dir.path().join("offload")), ..p.clone() }
        .write_toml_file(&ok_policy)
        .unwrap();
    let tiers = |extra: &[&str]| {
        let args = [&["--prompt", "Amen", "--max-new-tokens", "4", "--json"], extra].concat();
        let o = run_policy(&ok_policy, &args);
        assert!(o.status.success(), "{}", text(&o).1);
        let v: serde_json::Value = serde_json::from_str(&text(&o).0).unwrap();
        v["tier_bytes"].clone()
    };
    let one = tiers(&[]);
    assert!(one["disk"].as_u64().unwrap() > 0, "{one}");
    assert_eq!(tiers(&["--nproc", "2"]), one);
    // A block too large for rank 1's stage (three layers, where rank 0's one fits) is refused
    // before it runs, as one process refuses it (rank 1 used to run it past the budget).
    let lopsided = dir.path().join("lopsided.toml");
    let stage = |layers| flexgen_policy::Stage { layers, placement: None, cpu_cache_compute: None };
    flexgen_policy::Policy {
        stages: vec![stage([0, 1]), stage([1, 4])],
        ..flexgen_policy::Policy::default()
    }
    .write_toml_file(&lopsided)
    .unwrap();
    let refused = |extra: &[&str]| {
        let args = [
            &["--prompt-len", "200", "--num-prompts", "16", "--gpu-batch-size", "16"][..],
            &["--max-new-tokens", "32", "--gpu-mem-limit", "70MB"],
            extra,
        ]
        .concat();
        let o = run_policy(&lopsided, &args);
        assert!(!o.status.success(), "{extra:?}: ran past the budget");
        let err = text(&o).1;
        err.lines().find(|l| l.contains("the GPU tier needs")).map(String::from).unwrap_or(err)
    };
    assert_eq!(refused(&["--nproc", "2"]), refused(&[]));
    // The folder cannot be made: rank 1 fails as described above.
    let policy = dir.path().join("p.toml");
    p.write_toml_file(&policy).unwrap();
    let started = std::time::Instant::now();
    let o = run_policy(&policy, &["--prompt", "Amen", "--max-new-tokens", "4", "--nproc", "2"]);
    let (_, err) = text(&o);
    assert!(!o.status.success(), "a failed rank went unnoticed");
    assert!(err.contains("rank 1") && err.contains("not-a-folder"), "{err}");
    assert!(started.elapsed().as_secs() < 30, "stopped after {:?}", started.elapsed());
    // Rank 0's own stage cannot be built: the ranks it started, waiting for it, stop at once
    // (they were given a minute before).
    p.placement = on_disk;
    p.stages.clear();
    p.write_toml_file(&policy).unwrap();
    let started = std::time::Instant::now();
    let o = run_policy(&policy, &["--prompt", "Amen", "--max-new-tokens", "4", "--nproc", "3"]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("not-a-folder"), "{err}");
    assert!(started.elapsed().as_secs() < 20, "stopped after {:?}", started.elapsed());
    // Ranks by hand: a rank outside the world is refused by name.
    let o = bin("flexgen-run")
        .args(["--rank", "2", "--world-size", "2", "--coordinator", "127.0.0.1:1"])
        .output()
        .unwrap();
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("--rank 2"), "{err}");
}

#[test]
fn offload_dir_on_the_command_line_completes_a_policy_file_without_one() {
    let dir = tempfile::tempdir().unwrap();
    let off = dir.path().join("offload");
    std::fs::create_dir(&off).unwrap();
    let policy = dir.path().join("p.toml");
    let mut p = flexgen_policy::Policy::default();
    p.placement.weights = flexgen_policy::TierShares::from_gpu_cpu(50.0, 0.0);
    p.offload_dir = Some(off.clone());
    // Written with a disk share and then without its folder, as a user might share it.
    let toml = p.to_toml();
    let lines: Vec<&str> = toml.lines().filter(|l| !l.starts_with("offload_dir")).collect();
    std::fs::write(&policy, lines.join("\n")).unwrap();
    let run = |extra: &[&str]| {
        bin("flexgen-run")
            .arg("--policy")
            .arg(&policy)
            .args(["--prompt", "In the beginning", "--max-new-tokens", "2"])
            .args(extra)
            .output()
            .unwrap()
    };
    let o = run(&[]);
    let (_, err) = text(&o);
    assert!(!o.status.success() && err.contains("offload_dir"), "{err}");
    let o = run(&["--offload-dir", off.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o).1);
    assert_eq!(std::fs::read_dir(&off).unwrap().count(), 0, "no offload file left");
}
