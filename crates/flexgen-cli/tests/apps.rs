//! The apps through the real binary: a batch job killed with SIGKILL (twice, and once more with a
//! torn line planted at the end of its output) and restarted with the same command loses and
//! duplicates nothing and gives the same results as an uninterrupted run; bad input lines are
//! reported by number or skipped into the errors file; the chat runs in a pseudo-terminal.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_flexgen-run");

fn write_input(path: &Path, n: usize) {
    let prompts = ["In the beginning", "And God said", "Jesus wept", "The LORD is my shepherd"];
    let lines: Vec<String> = (0..n)
        .map(|i| {
            let p = format!("{}{}", prompts[i % 4], " and".repeat(i % 5));
            serde_json::json!({ "id": format!("r{i}"), "prompt": p, "max_new_tokens": 4 + i % 5 })
                .to_string()
        })
        .collect();
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

fn batch(input: &Path, output: &Path) -> Command {
    let mut c = Command::new(BIN);
    c.args(["batch", "--quiet", "--gpu-batch-size", "2", "--input"])
        .arg(input)
        .arg("--output")
        .arg(output);
    c
}

/// id → (text, tokens) of every line, checking that each line is whole and each id unique.
fn results(output: &Path) -> HashMap<String, (String, Vec<u64>)> {
    let text = std::fs::read_to_string(output).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "no torn last line");
    let mut out = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("line {} is not whole JSON ({e}): {line}", i + 1));
        let id = v["id"].as_str().map_or_else(|| v["id"].to_string(), str::to_string);
        let tokens = v["tokens"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap()).collect();
        let prev = out.insert(id.clone(), (v["text"].as_str().unwrap().to_string(), tokens));
        assert!(prev.is_none(), "id {id} written twice");
    }
    out
}

fn lines_in(path: &Path) -> usize {
    std::fs::read_to_string(path).map_or(0, |t| t.lines().count())
}

#[test]
fn a_killed_batch_job_resumes_with_nothing_lost_or_duplicated() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    let n = 60;
    write_input(&input, n);
    // Reference: one uninterrupted run.
    let clean = dir.path().join("clean.jsonl");
    assert!(batch(&input, &clean).status().unwrap().success());
    let reference = results(&clean);
    assert_eq!(reference.len(), n);

    let out = dir.path().join("out.jsonl");
    for (round, at_least) in [(0, 6), (1, 20)] {
        let mut child = batch(&input, &out).spawn().unwrap();
        let deadline = Instant::now() + Duration::from_mins(2);
        while lines_in(&out) < at_least && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if round == 0 {
            // A second job on the same output is refused while the first runs.
            let second = batch(&input, &out).output().unwrap();
            assert!(!second.status.success());
            let err = String::from_utf8_lossy(&second.stderr);
            assert!(err.contains("being written by another batch job"), "{err}");
        }
        child.kill().unwrap(); // SIGKILL: no chance to clean up
        child.wait().unwrap();
        let partial = results(&out);
        assert!(partial.len() < n, "round {round}: killed before the end ({})", partial.len());
        if round == 1 {
            // A power cut in the middle of a write leaves half a line.
            let mut f = std::fs::OpenOptions::new().append(true).open(&out).unwrap();
            std::io::Write::write_all(&mut f, b"{\"id\":\"r59\",\"text\":\"half").unwrap();
        }
    }
    let status = batch(&input, &out).status().unwrap();
    assert!(status.success());
    let resumed = results(&out);
    assert_eq!(resumed.len(), n, "nothing lost");
    assert_eq!(resumed, reference, "the same results as an uninterrupted run");
    // A further run has nothing left to do and writes nothing.
    let before = std::fs::read(&out).unwrap();
    assert!(batch(&input, &out).status().unwrap().success());
    assert_eq!(std::fs::read(&out).unwrap(), before);
}

#[test]
fn bad_input_lines_are_named_or_skipped_into_the_errors_file() {
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("in.jsonl");
    // Line 4 is not UTF-8 (bytes 0xff 0xfe inside the prompt).
    let mut text = b"{\"prompt\": \"In the beginning\", \"max_new_tokens\": 3}\n\
         {\"prompt\": \"Amen\", \"colour\": 1}\n\
         not json\n"
        .to_vec();
    text.extend_from_slice(b"{\"prompt\": \"\xff\xfe\"}\n");
    text.extend_from_slice(b"{\"id\": 7, \"prompt\": \"Jesus wept\", \"max_new_tokens\": 2}\n");
    std::fs::write(&input, text).unwrap();
    let out = dir.path().join("out.jsonl");
    let stop = batch(&input, &out).output().unwrap();
    assert!(!stop.status.success());
    let err = String::from_utf8_lossy(&stop.stderr);
    assert!(err.contains("in.jsonl:2:") && err.contains("colour"), "{err}");
    assert_eq!(lines_in(&out), 0, "nothing generated when stopping on a bad line");
    let skip = batch(&input, &out).args(["--on-error", "skip"]).output().unwrap();
    assert!(skip.status.success(), "{}", String::from_utf8_lossy(&skip.stderr));
    let done = results(&out);
    let ids: HashSet<&str> = done.keys().map(String::as_str).collect();
    assert_eq!(ids, HashSet::from(["1", "7"]), "lines 1 and 5 ran, by id");
    let errors = std::fs::read_to_string(dir.path().join("out.jsonl.errors.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> =
        errors.lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.iter().map(|l| l["line"].as_u64().unwrap()).collect::<Vec<_>>(), [2, 3, 4]);
    assert!(lines[2]["error"].as_str().unwrap().contains("not UTF-8"), "{}", lines[2]);
}

#[test]
fn chat_in_a_terminal_streams_replies_resets_and_leaves_on_ctrl_d() {
    use expectrl::{ControlCode, Eof};
    let mut p = expectrl::spawn(format!("{BIN} chat --max-new-tokens 6")).unwrap();
    p.set_expect_timeout(Some(Duration::from_mins(1)));
    p.expect("Human: ").unwrap();
    p.send_line("Who was Moses?").unwrap();
    p.expect("Assistant:").unwrap();
    p.expect("Human: ").unwrap();
    p.send_line("And Aaron?").unwrap();
    p.expect("Assistant:").unwrap();
    p.expect("Human: ").unwrap();
    p.send_line("/reset").unwrap();
    p.expect("(history cleared)").unwrap();
    p.expect("Human: ").unwrap();
    p.send(ControlCode::EndOfTransmission).unwrap();
    p.expect(Eof).unwrap();
}

#[test]
fn plan_calibrate_refits_a_profile_to_run_reports() {
    use flexgen_policy::{HardwareProfile, Placement, Policy, Workload};
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let hw_path = root.join("policies/hardware/h200.toml");
    let hw = HardwareProfile::from_toml_file(&hw_path).unwrap();
    // The "measured" runs: the profile's predictions with copies 25 % slower.
    let mut slow = hw.clone();
    slow.gpu.as_mut().unwrap().h2d_pinned_bytes_per_s *= 0.75;
    let spec = flexgen_model::spec_by_name("opt-30b").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let mut files = Vec::new();
    for (i, (pct, b, k)) in [
        ([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], 32, 2),
        ([50.0, 50.0, 100.0, 0.0, 100.0, 0.0], 32, 2),
        ([20.0, 80.0, 100.0, 0.0, 100.0, 0.0], 16, 2),
    ]
    .into_iter()
    .enumerate()
    {
        let policy = Policy {
            placement: Placement::from_percent(pct).unwrap(),
            gpu_batch_size: b,
            num_gpu_batches: k,
            ..Policy::default()
        };
        let w = Workload { prompt_len: 512, gen_len: 32, num_prompts: Some(b * k) };
        let margins = flexgen_planner::Margins { gpu: 1.0, cpu: 1.0, disk: 1.0 };
        let m = flexgen_planner::predict(&spec, &slow, &w, &policy, margins).unwrap();
        let report = serde_json::json!({
            "prefill_s": m.prefill_s,
            "decode_s": m.decode_s,
            "calibration": {
                "spec": spec,
                "policy": policy,
                "workload": { "prompt_len": 512, "gen_len": 32, "num_prompts": b * k },
            },
        });
        let f = dir.path().join(format!("run{i}.json"));
        std::fs::write(&f, report.to_string()).unwrap();
        files.push(f);
    }
    let out = dir.path().join("calibrated.toml");
    let res = Command::new(env!("CARGO_BIN_EXE_flexgen-plan"))
        .arg("--hardware")
        .arg(&hw_path)
        .arg("--calibrate")
        .args(&files)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{text}{}", String::from_utf8_lossy(&res.stderr));
    assert!(
        text.contains("| run0.json |") && text.contains("gpu.h2d_pinned_bytes_per_s ×"),
        "{text}"
    );
    let refit = HardwareProfile::from_toml_file(&out).unwrap();
    let ratio = refit.gpu.unwrap().h2d_pinned_bytes_per_s / hw.gpu.unwrap().h2d_pinned_bytes_per_s;
    assert!((ratio - 0.75).abs() < 0.05, "refit copy rate ratio {ratio}");
}

#[test]
fn a_run_report_is_accepted_by_plan_calibrate() {
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("run.json");
    let out = Command::new(BIN)
        .args(["--json", "-q", "--max-new-tokens", "4", "--prompt", "In the beginning"])
        .args(["--prompt", "Jesus wept", "--gpu-batch-size", "2"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    std::fs::write(&report, &out.stdout).unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["calibration"]["workload"]["gen_len"], 4);
    assert_eq!(v["calibration"]["policy"]["gpu_batch_size"], 2);
    let hw = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/hardware/h200.toml");
    let res = Command::new(env!("CARGO_BIN_EXE_flexgen-plan"))
        .arg("--hardware")
        .arg(&hw)
        .arg("--calibrate")
        .arg(&report)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&res.stdout);
    assert!(res.status.success(), "{text}{}", String::from_utf8_lossy(&res.stderr));
    assert!(text.contains("| run.json |"), "{text}");
}

/// Offload files have no name while they are held (removed as soon as they are opened), so a
/// process killed with SIGKILL mid-run leaves nothing in the offload directory.
#[test]
fn a_killed_run_leaves_no_offload_files() {
    let dir = tempfile::tempdir().unwrap();
    let offload = dir.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    let mut child = Command::new(BIN)
        .args(["--percent", "0", "0", "0", "0", "100", "0", "--max-new-tokens", "200", "-q"])
        .args(["--num-prompts", "8", "--ignore-eos", "--offload-dir"])
        .arg(&offload)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait until the process holds a file of the offload directory open.
    let fds = format!("/proc/{}/fd", child.id());
    let started = Instant::now();
    let mut held = false;
    while !held && started.elapsed() < Duration::from_mins(1) {
        held = std::fs::read_dir(&fds).into_iter().flatten().flatten().any(|fd| {
            std::fs::read_link(fd.path()).is_ok_and(|target| target.starts_with(&offload))
        });
        if !held {
            assert!(child.try_wait().unwrap().is_none(), "the run ended before holding a file");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    assert!(held, "the run never opened an offload file");
    // A name lives only between a file's open and its removal a moment later.
    let named = || std::fs::read_dir(&offload).unwrap().count();
    let since = Instant::now();
    while named() > 0 && since.elapsed() < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(named(), 0, "offload files have no name while held");
    child.kill().unwrap();
    child.wait().unwrap();
    assert_eq!(std::fs::read_dir(&offload).unwrap().count(), 0);
}

/// Runs `cmd` under a file-size limit of `kib` KiB with SIGXFSZ ignored, so that a write past
/// it fails (`EFBIG`) as a write to a full file system fails (`ENOSPC`): the same error path,
/// without mounting anything.
fn with_file_limit(cmd: &Command, kib: u32) -> std::process::Output {
    let mut args = vec![cmd.get_program().to_string_lossy().into_owned()];
    args.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    let quoted: Vec<String> =
        args.iter().map(|a| format!("'{}'", a.replace('\'', "'\\''"))).collect();
    Command::new("bash")
        .arg("-c")
        .arg(format!("ulimit -f {kib} && trap '' XFSZ && exec {}", quoted.join(" ")))
        .output()
        .unwrap()
}

/// A batch job whose output cannot grow (a full file system) stops with an error naming the
/// file, keeps only whole blocks (no torn line), and the same command finishes the job once
/// there is room: every id exactly once.
#[test]
fn a_batch_job_on_a_full_file_system_keeps_whole_blocks_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_input(&input, 60);
    let out = with_file_limit(&batch(&input, &output), 2);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "a full output must fail the job: {err}");
    assert!(err.contains(&output.display().to_string()) && err.contains("run the same command"));
    let text = std::fs::read_to_string(&output).unwrap();
    assert!(text.is_empty() || text.ends_with('\n'), "no torn last line");
    let kept = text.lines().count();
    for line in text.lines() {
        serde_json::from_str::<serde_json::Value>(line).expect("every kept line is whole");
    }
    assert!(kept < 60, "the limit stopped the job early ({kept} lines)");
    let done = batch(&input, &output).output().unwrap();
    assert!(done.status.success(), "{}", String::from_utf8_lossy(&done.stderr));
    let ids: Vec<String> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["id"].to_string())
        .collect();
    let unique: HashSet<&String> = ids.iter().collect();
    assert_eq!((ids.len(), unique.len()), (60, 60), "every id once");
}

/// Weights and KV cache offloaded to a directory that cannot hold them: a clear error naming
/// the file, a failed exit, and nothing left in the directory.
#[test]
fn an_offload_directory_that_fills_up_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let offload = dir.path().join("offload");
    std::fs::create_dir(&offload).unwrap();
    // Weights on disk (during set-up), then the KV cache on disk (during the run).
    for percent in [["0", "0", "100", "0", "100", "0"], ["100", "0", "0", "0", "100", "0"]] {
        let mut c = Command::new(BIN);
        c.arg("--percent").args(percent).args(["--max-new-tokens", "64", "--num-prompts", "4"]);
        c.args(["--ignore-eos", "-q", "--offload-dir"]).arg(&offload);
        let out = with_file_limit(&c, 16);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{percent:?}: {err}");
        assert!(err.contains(&offload.display().to_string()), "{percent:?}: names the file: {err}");
        assert!(err.contains("too large") || err.contains("No space"), "{percent:?}: {err}");
        assert!(out.stdout.is_empty(), "{percent:?}: nothing presented as generated");
        assert_eq!(std::fs::read_dir(&offload).unwrap().count(), 0, "{percent:?}: no files left");
    }
}
