//! What the pipeline tests share: the models, the requests and the generation settings.

use std::path::Path;

use flexgen_model::Model;
use flexgen_runtime::{GenerationConfig, Request};

/// A committed model under `crates/flexgen-model` (`models/opt-kjv`, `test_data/…`).
pub(crate) fn load(dir: &str) -> Model {
    Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../flexgen-model").join(dir)).unwrap()
}

/// The first `n` of five prompts of different lengths.
pub(crate) fn requests(n: usize) -> Vec<Request> {
    ["In the beginning God created", "Jesus wept.", "And the earth was", "Amen", "Blessed are"]
        .iter()
        .take(n)
        .map(|p| Request::text(*p))
        .collect()
}

/// Eight greedy tokens, EOS ignored.
pub(crate) fn config() -> GenerationConfig {
    GenerationConfig { max_new_tokens: 8, stop_on_eos: false, ..GenerationConfig::default() }
}
