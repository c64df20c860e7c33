//! Using flexgen as a library, in the spirit of the original's Hugging Face-style API: load a
//! model, choose a policy, call `generate` with a batch of prompts and sampling options, stream
//! tokens as they come, and read the completions.
//!
//! `cargo run --release -p flexgen-runtime --example generate_api [MODEL_DIR]` (default: the
//! bundled model).

#![allow(clippy::print_stdout, reason = "an example prints what it generates")]

use std::path::PathBuf;

use flexgen_model::Model;
use flexgen_policy::{Placement, Policy};
use flexgen_runtime::{Event, GenerationConfig, Generator, Request, Sampling};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).map_or_else(
        || PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../flexgen-model/models/opt-kjv"),
        PathBuf::from,
    );
    // 1. The model: config.json, model.safetensors and tokenizer.json of a Hugging Face directory.
    let model = Model::load(&dir)?;
    // 2. The policy: half the weights on the "GPU" tier, the rest on the CPU; blocks of 2 × 2.
    let policy = Policy {
        placement: Placement::from_percent([50.0, 50.0, 100.0, 0.0, 100.0, 0.0])?,
        gpu_batch_size: 2,
        num_gpu_batches: 2,
        ..Policy::default()
    };
    let generator = Generator::new(&model, policy)?;
    // 3. Requests, each with its own settings where it needs them.
    let mut second = Request::text("And God said");
    second.max_new_tokens = Some(12);
    let requests = vec![Request::text("In the beginning"), second, Request::text("Jesus wept")];
    let config = GenerationConfig {
        max_new_tokens: 20,
        sampling: Sampling::Random {
            temperature: 0.8,
            top_k: Some(40),
            top_p: Some(0.95),
            seed: 7,
        },
        stop: vec!["\n".into()],
        ..GenerationConfig::default()
    };
    // 4. Generate, streaming the first request's text as it comes.
    print!("streaming request 0: In the beginning");
    let (completions, stats) = generator.generate(&requests, &config, &mut |e| {
        if let Event::Token { request: 0, text, .. } = e {
            print!("{text}");
        }
    })?;
    println!();
    for (r, c) in requests.iter().zip(&completions) {
        let flexgen_runtime::Prompt::Text(p) = &r.prompt else { unreachable!() };
        println!(
            "{p:?} → {:?} ({} tokens, {})",
            c.text.as_deref().unwrap_or(""),
            c.tokens.len(),
            c.finish.as_str()
        );
    }
    println!("{:.1} tokens/s total, {} blocks", stats.total_tokens_per_s(), stats.blocks);
    Ok(())
}
