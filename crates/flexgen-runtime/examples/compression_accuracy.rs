//! Accuracy of 4-bit group-wise compression (docs/compression.md): for each model, greedy
//! generation without compression gives reference tokens and logits; the same prompts are then
//! run with compressed weights, compressed cache, and both, feeding the reference tokens back
//! (teacher forcing) so every step is compared on the same context. Prints, per model and mode,
//! the mean relative L2 error of the logits and the top-1 agreement with the reference.
//!
//! `cargo run --release -p flexgen-runtime --example compression_accuracy [MODEL…]`, where a
//! MODEL is a directory or a spec name (opt-125m, opt-1.3b: seeded random dummy weights).
//! Default: the tiny random model, the bundled model, and OPT-125M with random weights.

#![allow(clippy::print_stdout, reason = "an example that prints a report")]

use std::path::Path;

use flexgen_model::{DummyInit, Model};
use flexgen_policy::Policy;
use flexgen_runtime::{GenerationConfig, Generator, Request};

const NEW: usize = 16;

fn load(name: &str) -> Model {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    match name {
        "tiny" => Model::load(&root.join("flexgen-model/test_data/tiny-random-opt")).unwrap(),
        "bundled" => Model::load(&root.join("flexgen-model/models/opt-kjv")).unwrap(),
        dir if Path::new(dir).is_dir() => Model::load(Path::new(dir)).unwrap(),
        spec => Model::dummy(
            flexgen_model::spec_by_name(spec).expect("a directory or a spec name"),
            DummyInit::Random { seed: 1 },
        )
        .unwrap(),
    }
}

fn requests(model: &Model) -> Vec<Request> {
    let v = model.spec.vocab_size;
    (0..8u32)
        .map(|i| {
            let len = 8 + 3 * i;
            Request::tokens(
                std::iter::once(model.spec.bos_token_id.unwrap_or(2))
                    .chain((1..len).map(|j| 4 + (i * 131 + j * 17) % (v - 4)))
                    .collect(),
            )
        })
        .collect()
}

fn main() {
    let names: Vec<String> = std::env::args().skip(1).collect();
    let names = if names.is_empty() {
        vec!["tiny".into(), "bundled".into(), "opt-125m".into()]
    } else {
        names
    };
    println!("| model | compressed | mean relative logit error | top-1 agreement |");
    println!("|---|---|---|---|");
    for name in &names {
        let model = load(name);
        let reqs = requests(&model);
        let base = GenerationConfig {
            max_new_tokens: NEW,
            stop_on_eos: false,
            output_logits: true,
            ..GenerationConfig::default()
        };
        let policy = Policy { gpu_batch_size: 8, ..Policy::default() };
        let (reference, _) = Generator::new(&model, policy.clone())
            .unwrap()
            .generate(&reqs, &base, &mut |_| {})
            .unwrap();
        let forced = GenerationConfig {
            forced: Some(reference.iter().map(|c| c.tokens.clone()).collect()),
            ..base
        };
        let modes = [
            ("weights, 4-bit", true, false, 4),
            ("cache, 4-bit", false, true, 4),
            ("both, 4-bit", true, true, 4),
            ("both, 8-bit", true, true, 8),
        ];
        for (label, w, c, bits) in modes {
            let mut p = policy.clone();
            p.compress_weight.enabled = w;
            p.compress_cache.enabled = c;
            p.compress_weight.bits = bits;
            p.compress_cache.bits = bits;
            let (out, _) =
                Generator::new(&model, p).unwrap().generate(&reqs, &forced, &mut |_| {}).unwrap();
            let (mut err, mut agree, mut n) = (0.0f64, 0usize, 0usize);
            for (a, r) in out.iter().zip(&reference) {
                let (la, lr) = (a.logits.as_ref().unwrap(), r.logits.as_ref().unwrap());
                for (x, y) in la.iter().zip(lr) {
                    let d: f64 = x.iter().zip(y).map(|(p, q)| f64::from(p - q).powi(2)).sum();
                    let s: f64 = y.iter().map(|q| f64::from(*q).powi(2)).sum();
                    err += (d / s.max(1e-30)).sqrt();
                    agree += usize::from(flexgen_runtime::argmax(x) == flexgen_runtime::argmax(y));
                    n += 1;
                }
            }
            #[expect(clippy::cast_precision_loss, reason = "a report")]
            let (e, t) = (err / n as f64, 100.0 * agree as f64 / n as f64);
            println!("| {} | {label} | {e:.4} | {t:.1} % ({agree}/{n}) |", model.spec.name);
        }
    }
}
