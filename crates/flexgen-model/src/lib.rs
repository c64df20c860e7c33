//! Models: named specs (every OPT size), loading a Hugging Face model directory offline
//! (`config.json`, `model.safetensors` or a sharded index, memory-mapped; `tokenizer.json`),
//! dummy weights for any spec, and the decoder's forward functions.
//!
//! A model is a [`ModelSpec`] (the decoder-layer description: norm kind, MLP kind, position
//! encoding, attention heads) plus [`Weights`] in that description's shape. A new family (Llama:
//! `RMSNorm`, `SwiGLU`, `RoPE`, grouped-query attention) is new values of the same description and new
//! tensor names in `weights.rs`, not a new runtime.

mod catalog;
mod config;
mod error;
pub mod layers;
mod source;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};

pub use catalog::{known_names, opt_spec, spec_by_name};
pub use config::spec_from_config_json;
pub use error::{Error, Result};
pub use flexgen_policy::ModelSpec;
pub use source::{ModelFiles, WeightFiles, resolve};
pub use tokenizer::Tokenizer;
pub use weights::{DummyInit, LayerWeights, Linear, Mlp, Norm, SafetensorsStore, Weights};

use flexgen_tensor::{Device, Tensor};

/// A model ready to run: its spec, weights and (for real checkpoints) tokenizer.
pub struct Model {
    pub spec: ModelSpec,
    pub weights: Weights,
    pub tokenizer: Option<Tokenizer>,
    /// The directory it was loaded from; `None` for dummy weights.
    pub dir: Option<PathBuf>,
}

impl Model {
    /// Loads a Hugging Face model directory, cache entry or snapshot, without network access.
    pub fn load(path: &Path) -> Result<Self> {
        let files = resolve(path)?;
        let text = std::fs::read_to_string(&files.config)
            .map_err(|source| Error::Io { path: files.config.clone(), source })?;
        let name = files
            .dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let spec = spec_from_config_json(&text, &files.config, &name)?;
        let store = SafetensorsStore::open_files(&files.weights)?;
        let weights = Weights::from_safetensors(&spec, &store)?;
        let tokenizer = match &files.tokenizer {
            Some(p) => Some(Tokenizer::from_file(p, spec.bos_token_id)?),
            None => None,
        };
        if let Some(t) = &tokenizer
            && t.vocab_size() > spec.vocab_size as usize
        {
            return Err(Error::Tokenizer {
                path: files.tokenizer.clone().unwrap_or_default(),
                message: format!(
                    "{} tokens, more than the model's vocab_size {} in config.json",
                    t.vocab_size(),
                    spec.vocab_size
                ),
            });
        }
        tracing::info!(model = %spec.name, params = spec.total_params(), "loaded");
        Ok(Self { spec, weights, tokenizer, dir: Some(files.dir) })
    }

    /// A model of `spec` with dummy weights and no tokenizer.
    pub fn dummy(spec: ModelSpec, init: DummyInit) -> Result<Self> {
        let weights = Weights::dummy(&spec, init)?;
        Ok(Self { spec, weights, tokenizer: None, dir: None })
    }

    /// Logits at every position of left-padded `ids` (`mask[b][t]` = real token), computed in one
    /// pass without a cache. The reference path that the runtime's cached generation must match.
    pub fn forward_all(&self, ids: &[Vec<u32>], mask: &[Vec<bool>]) -> Result<Tensor> {
        let b = ids.len();
        let t = ids.first().map_or(0, Vec::len);
        let flat: Vec<u32> = ids.iter().flatten().copied().collect();
        let pos: Vec<u32> =
            mask.iter().flat_map(|m| layers::position_indices(&self.spec, m)).collect();
        let ids_t = Tensor::from_vec(flat, (b, t), &Device::Cpu)?;
        let pos_t = Tensor::from_vec(pos, (b, t), &Device::Cpu)?;
        let allowed: Vec<Vec<Vec<bool>>> = mask
            .iter()
            .map(|m| (0..t).map(|q| (0..t).map(|k| k <= q && m[k]).collect()).collect())
            .collect();
        let bias = flexgen_tensor::attention_bias(&allowed, &Device::Cpu)?;
        let mut x = layers::embed(&self.weights, &ids_t, &pos_t)?;
        for w in &self.weights.layers {
            x = layers::decoder_layer(&self.spec, w, &x, None, &bias)?.0;
        }
        layers::logits(&self.spec, &self.weights, &x)
    }
}
