//! Mutation fuzzing of every input format a user hands us (issue 22), on stable Rust, in CI:
//! policy TOML, hardware TOML, config.json, safetensors files and their index, batch JSONL lines.
//! Each format gets `FUZZ_INPUTS` inputs (default 10,000) made from the committed examples by
//! byte flips, cuts, insertions, splices and (structure-aware) numbers replaced by extremes. A
//! finding is a panic: every input must parse or be refused with an error. A longer run:
//! `FUZZ_INPUTS=1000000 FUZZ_SEED=7 cargo test --release -p flexgen-cli --test fuzz`.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

#[path = "fuzz_support/mod.rs"]
mod fuzz_support;
use fuzz_support::fuzz;

fn read_all(paths: &[PathBuf]) -> Vec<Vec<u8>> {
    paths.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

fn files_in(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == ext))
        .collect();
    v.sort();
    v
}

#[test]
fn policy_toml() {
    let seeds = read_all(&files_in(&root().join("policies"), "toml"));
    fuzz("policy TOML", 1, &seeds, |b| {
        if let Ok(p) = flexgen_policy::Policy::from_toml_str(&String::from_utf8_lossy(b)) {
            let _ = p.validate();
        }
    });
}

#[test]
fn hardware_toml() {
    let seeds = read_all(&files_in(&root().join("policies/hardware"), "toml"));
    fuzz("hardware TOML", 2, &seeds, |b| {
        let _ = flexgen_policy::HardwareProfile::from_toml_str(&String::from_utf8_lossy(b));
    });
}

#[test]
fn config_json() {
    let data = root().join("crates/flexgen-model/test_data");
    let paths: Vec<PathBuf> = [
        "tiny-random-opt",
        "tiny-random-opt-350m",
        "tiny-random-llama",
        "tiny-random-mistral",
        "tiny-random-qwen2",
    ]
    .iter()
    .map(|m| data.join(m).join("config.json"))
    .collect();
    let seeds = read_all(&paths);
    fuzz("config.json", 3, &seeds, |b| {
        if let Ok(spec) = flexgen_model::spec_from_config_json(
            &String::from_utf8_lossy(b),
            Path::new("config.json"),
            "fuzz",
        ) {
            // A spec that parses must describe what the runtime can plan.
            let _ = flexgen_model::layer_shapes(&spec);
        }
    });
}

/// A small safetensors file: two f32 tensors and an f16 one.
fn tiny_safetensors() -> Vec<u8> {
    let header = r#"{"a":{"dtype":"F32","shape":[2,3],"data_offsets":[0,24]},"b":{"dtype":"F16","shape":[4],"data_offsets":[24,32]},"__metadata__":{"format":"pt"}}"#;
    let mut v = (header.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(header.as_bytes());
    v.extend((0..32u8).map(|i| i.wrapping_mul(37)));
    v
}

#[test]
fn safetensors_header() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.safetensors");
    let seeds = vec![tiny_safetensors()];
    fuzz("safetensors", 4, &seeds, |b| {
        std::fs::write(&path, b).unwrap();
        if let Ok(store) = flexgen_model::SafetensorsStore::open(std::slice::from_ref(&path)) {
            let _ = store.names().count();
        }
    });
}

#[test]
fn safetensors_index() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("model-1.safetensors"), tiny_safetensors()).unwrap();
    let index = dir.path().join("model.safetensors.index.json");
    let seeds = vec![
        br#"{"metadata":{"total_size":32},"weight_map":{"a":"model-1.safetensors","b":"model-1.safetensors"}}"#.to_vec(),
    ];
    fuzz("safetensors index", 5, &seeds, |b| {
        std::fs::write(&index, b).unwrap();
        let _ = flexgen_model::SafetensorsStore::open_files(&flexgen_model::WeightFiles::Sharded(
            index.clone(),
        ));
    });
}

#[test]
fn batch_jsonl_lines() {
    let job = flexgen_cli::batch::BatchJob {
        input: PathBuf::new(),
        output: PathBuf::new(),
        errors: None,
        on_error: flexgen_cli::batch::OnError::Skip,
        max_new_tokens: 32,
        temperature: None,
        top_k: None,
        top_p: None,
        seed: 0,
        stop_on_eos: true,
        refill: true,
        progress: false,
    };
    let seeds: Vec<Vec<u8>> = [
        r#"{"id": "q1", "prompt": "In the beginning", "max_new_tokens": 32, "temperature": 0.7, "stop": ["\n"]}"#,
        r#"{"prompt": "And God said", "stop": " the"}"#,
        r#"{"id": 7, "prompt": "Jesus wept", "max_new_tokens": 2}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect();
    fuzz("batch JSONL", 6, &seeds, |b| {
        let _ = job.check_input_line(&String::from_utf8_lossy(b));
    });
}

/// Small tokenizer.json files (a byte-level BPE as OPT's and Llama 3's, a word-level one): the
/// `tokenizers` crate parses them; what parses must encode and decode text.
#[test]
fn tokenizer_json() {
    let seeds = read_all(&files_in(&root().join("crates/flexgen-cli/tests/fuzz_seeds"), "json"));
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tokenizer.json");
    fuzz("tokenizer.json", 7, &seeds, |b| {
        std::fs::write(&path, b).unwrap();
        if let Ok(t) = flexgen_model::Tokenizer::from_file(&path, Some(1)) {
            if let Ok(ids) = t.encode("In the beginning God created the heaven, 1 2 3 ünïcode") {
                let _ = t.decode(&ids);
            }
            let _ = t.decode(&[0, 1, 2, 299, 300, u32::MAX]);
        }
    });
}

/// Run reports of `flexgen-run --json` (the device runs in docs/runs), as `flexgen-plan
/// --calibrate` reads them; what parses is calibrated against the H200 profile.
#[test]
fn calibration_reports() {
    let runs = root().join("docs/runs");
    let mut paths = Vec::new();
    for d in std::fs::read_dir(&runs).unwrap().flatten() {
        if d.path().is_dir() {
            paths.extend(files_in(&d.path(), "json"));
        }
    }
    let seeds: Vec<Vec<u8>> = read_all(&paths)
        .into_iter()
        .filter(|b| String::from_utf8_lossy(b).contains("\"calibration\""))
        .take(6)
        .collect();
    let hw = flexgen_policy::HardwareProfile::from_toml_str(
        &std::fs::read_to_string(root().join("policies/hardware/h200.toml")).unwrap(),
    )
    .unwrap();
    let mut calibrated = 0usize;
    fuzz("run report", 8, &seeds, |b| {
        if let Ok(obs) =
            flexgen_planner::Observation::from_run_report(&String::from_utf8_lossy(b), "fuzz")
        {
            // Calibrating is slow next to parsing: every 50th accepted report.
            calibrated += 1;
            if calibrated % 50 == 1 {
                let _ = flexgen_planner::calibrate(&hw, &[obs]);
            }
        }
    });
}
