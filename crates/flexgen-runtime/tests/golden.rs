//! Golden tests: the tiny random OPT, OPT-350M-structured (projected embeddings, post-LayerNorm),
//! Llama (GQA, llama3 rotary scaling), Mistral and Qwen2 models
//! and the bundled model against what Hugging Face transformers computed from the same files
//! (crates/flexgen-model/test_data/*/golden.*, made by `xtask/scripts/make_models.py` and
//! `xtask/scripts/make_llama_models.py`). Logits must agree within 1e-4 and greedy tokens exactly, for single
//! prompts, for a left-padded batch of mixed lengths, and under every batch split.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flexgen_model::Model;
use flexgen_policy::Policy;
use flexgen_runtime::{Completion, GenerationConfig, Generator, Request};

const TOL: f32 = 1e-4;

/// The tiny random models with full golden logits, one per family variant (and the Llama stored
/// in bfloat16, as published checkpoints are).
const TINY: [&str; 6] = [
    "test_data/tiny-random-opt",
    "test_data/tiny-random-opt-350m",
    "test_data/tiny-random-llama",
    "test_data/tiny-random-llama-bf16",
    "test_data/tiny-random-mistral",
    "test_data/tiny-random-qwen2",
];

fn data_dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../flexgen-model").join(name)
}

#[derive(serde::Deserialize)]
struct Golden {
    prompts: Vec<GoldenPrompt>,
    new_tokens: usize,
    batch: GoldenBatch,
}

#[derive(serde::Deserialize)]
struct GoldenPrompt {
    text: String,
    input_ids: Vec<u32>,
    greedy: Vec<u32>,
    greedy_text: String,
}

#[derive(serde::Deserialize)]
struct GoldenBatch {
    input_ids: Vec<Vec<u32>>,
    attention_mask: Vec<Vec<u8>>,
    greedy: Vec<Vec<u32>>,
}

struct Fixture {
    model: Model,
    golden: Golden,
    tensors: HashMap<String, (Vec<usize>, Vec<f32>)>,
}

fn load(dir: &str) -> Fixture {
    let dir = data_dir(dir);
    let model = Model::load(&dir).unwrap();
    let golden: Golden =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let mut tensors = HashMap::new();
    if let Ok(bytes) = std::fs::read(dir.join("golden.safetensors")) {
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        for (name, view) in st.tensors() {
            let data = view
                .data()
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect();
            tensors.insert(name, (view.shape().to_vec(), data));
        }
    }
    Fixture { model, golden, tensors }
}

fn assert_close(what: &str, ours: &[f32], theirs: &[f32]) {
    assert_eq!(ours.len(), theirs.len(), "{what}: lengths differ");
    let (i, diff) = ours
        .iter()
        .zip(theirs)
        .map(|(a, b)| (a - b).abs())
        .enumerate()
        .fold((0, 0.0f32), |m, (i, d)| if d > m.1 { (i, d) } else { m });
    assert!(
        diff <= TOL,
        "{what}: max |diff| {diff} at {i} (ours {}, transformers {})",
        ours[i],
        theirs[i]
    );
}

fn greedy(n: usize) -> GenerationConfig {
    GenerationConfig {
        max_new_tokens: n,
        stop_on_eos: false,
        output_logits: true,
        ..GenerationConfig::default()
    }
}

fn run(model: &Model, policy: Policy, requests: &[Request], n: usize) -> Vec<Completion> {
    Generator::new(model, policy).unwrap().generate(requests, &greedy(n), &mut |_| {}).unwrap().0
}

fn policy(gpu_batch_size: u32, num_gpu_batches: u32) -> Policy {
    Policy { gpu_batch_size, num_gpu_batches, ..Policy::default() }
}

#[test]
fn tokenizer_matches_transformers() {
    let f = load("test_data/tiny-random-opt");
    let tok = f.model.tokenizer.as_ref().unwrap();
    for p in &f.golden.prompts {
        assert_eq!(tok.encode(&p.text).unwrap(), p.input_ids, "{}", p.text);
        assert_eq!(tok.decode(&p.greedy).unwrap(), p.greedy_text);
    }
}

#[test]
fn prefill_logits_match_transformers_at_every_position() {
    for dir in TINY {
        prefill_matches(dir);
    }
}

fn prefill_matches(dir: &str) {
    let f = load(dir);
    for (i, p) in f.golden.prompts.iter().enumerate() {
        let logits = f
            .model
            .forward_all(std::slice::from_ref(&p.input_ids), &[vec![true; p.input_ids.len()]])
            .unwrap();
        let (shape, want) = &f.tensors[&format!("prompt{i}.prefill_logits")];
        assert_eq!(&logits.dims()[1..], &shape[..]);
        assert_close(
            &format!("{dir}: prompt {i} prefill"),
            &logits.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            want,
        );
    }
}

#[test]
fn cached_greedy_generation_matches_transformers_per_prompt() {
    for dir in TINY {
        cached_greedy_matches(dir);
    }
}

fn cached_greedy_matches(dir: &str) {
    let f = load(dir);
    let n = f.golden.new_tokens;
    for (i, p) in f.golden.prompts.iter().enumerate() {
        let out = run(&f.model, policy(1, 1), &[Request::text(p.text.clone())], n);
        assert_eq!(out[0].prompt_tokens, p.input_ids);
        assert_eq!(out[0].tokens, p.greedy, "{dir}: prompt {i}");
        let (shape, want) = &f.tensors[&format!("prompt{i}.step_logits")];
        assert_eq!(shape[0], n);
        let ours: Vec<f32> = out[0].logits.as_ref().unwrap().concat();
        assert_close(&format!("{dir}: prompt {i} step logits"), &ours, want);
    }
}

#[test]
fn left_padded_batch_matches_transformers_and_single_prompts() {
    for dir in TINY {
        left_padded_batch_matches(dir);
    }
}

fn left_padded_batch_matches(dir: &str) {
    let f = load(dir);
    let n = f.golden.new_tokens;
    // The golden batch is the prompts left-padded to one width; check we build the same grid.
    for (row, p) in f.golden.prompts.iter().enumerate() {
        let real: Vec<u32> = f.golden.batch.input_ids[row]
            .iter()
            .zip(&f.golden.batch.attention_mask[row])
            .filter(|(_, m)| **m == 1)
            .map(|(t, _)| *t)
            .collect();
        assert_eq!(real, p.input_ids);
    }
    let requests: Vec<Request> =
        f.golden.prompts.iter().map(|p| Request::text(p.text.clone())).collect();
    let out = run(&f.model, policy(4, 1), &requests, n);
    let (shape, want) = &f.tensors["batch.step_logits"]; // [n, b, vocab]
    let vocab = shape[2];
    for (row, c) in out.iter().enumerate() {
        assert_eq!(c.tokens, f.golden.batch.greedy[row], "{dir}: row {row}");
        assert_eq!(
            c.tokens, f.golden.prompts[row].greedy,
            "{dir}: row {row}: padding changed the output"
        );
        let theirs: Vec<f32> = (0..n)
            .flat_map(|s| {
                want[(s * shape[1] + row) * vocab..(s * shape[1] + row + 1) * vocab].to_vec()
            })
            .collect();
        assert_close(
            &format!("{dir}: batch row {row}"),
            &c.logits.as_ref().unwrap().concat(),
            &theirs,
        );
    }
}

#[test]
fn every_batch_split_gives_the_same_tokens() {
    for dir in TINY {
        every_split_agrees(dir);
    }
}

fn every_split_agrees(dir: &str) {
    let f = load(dir);
    let n = 8;
    let mut requests: Vec<Request> =
        f.golden.prompts.iter().map(|p| Request::text(p.text.clone())).collect();
    requests.extend(f.golden.prompts.iter().rev().map(|p| Request::text(p.text.clone())));
    let reference = run(&f.model, policy(1, 1), &requests, n);
    for (b, k) in [(2, 1), (3, 1), (8, 1), (2, 2), (1, 4), (3, 3), (5, 2)] {
        let out = run(&f.model, policy(b, k), &requests, n);
        for (i, (o, r)) in out.iter().zip(&reference).enumerate() {
            assert_eq!(o.tokens, r.tokens, "{dir}: request {i} under {b}x{k}");
        }
    }
}

#[test]
fn bundled_model_matches_transformers_greedy_text() {
    let f = load("models/opt-kjv");
    for p in &f.golden.prompts {
        let out =
            run(&f.model, policy(2, 1), &[Request::text(p.text.clone())], f.golden.new_tokens);
        assert_eq!(out[0].tokens, p.greedy, "{}", p.text);
        assert_eq!(out[0].text.as_deref(), Some(p.greedy_text.as_str()));
    }
}

/// A model with several EOS ids (Llama 3.1 lists three) ends a sequence at any of them: the
/// tiny Llama with its 5th greedy token of a prompt made a further EOS id stops right there.
#[test]
fn any_of_several_eos_ids_ends_a_sequence() {
    let mut f = load("test_data/tiny-random-llama");
    let p = &f.golden.prompts[0];
    let stop_at = p.greedy[4];
    assert!(!p.greedy[..4].contains(&stop_at), "the test needs a token new at step 5");
    f.model.spec.more_eos_token_ids = vec![stop_at];
    let config = GenerationConfig { stop_on_eos: true, ..greedy(p.greedy.len()) };
    let done = Generator::new(&f.model, Policy::default())
        .unwrap()
        .generate(&[Request::tokens(p.input_ids.clone())], &config, &mut |_| {})
        .unwrap()
        .0;
    assert_eq!(done[0].tokens, p.greedy[..5]);
    assert_eq!(done[0].finish, flexgen_runtime::FinishReason::Eos);
}

/// A model whose layers were left in its files (the CUDA executor's load) is refused by the host
/// stage with an error that says how to load it, not a panic.
#[test]
fn the_host_stage_refuses_a_model_whose_layers_are_in_its_files() {
    let dir =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../flexgen-model/test_data/tiny-random-opt");
    let model = Model::open_lazy(&dir).unwrap();
    let err = Generator::new(&model, policy(1, 1)).err().expect("refused");
    let text = err.to_string();
    assert!(text.contains("model") && text.contains("Model::load"), "{text}");
    assert!(!text.contains("  "), "one sentence, not a source line's indentation: {text}");
}
