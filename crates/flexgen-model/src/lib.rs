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
pub mod fused;
pub mod layers;
mod layout;
mod source;
mod tokenizer;
mod weights;

use std::path::{Path, PathBuf};

pub use catalog::{known_names, opt_spec, spec_by_name};
pub use config::spec_from_config_json;
pub use error::{Error, Result};
pub use flexgen_policy::ModelSpec;
pub use layout::{LayerLayout, PackedLayout, PackedMatrix};
pub use source::{ModelFiles, WeightFiles, resolve};
pub use tokenizer::Tokenizer;
pub use weights::{
    DummyInit, LayerWeights, Linear, Mlp, Norm, SafetensorsStore, Weights, layer_shapes,
};

use flexgen_tensor::Tensor;

/// A model ready to run: its spec, weights and (for real checkpoints) tokenizer.
pub struct Model {
    pub spec: ModelSpec,
    pub weights: Weights,
    pub tokenizer: Option<Tokenizer>,
    /// The directory it was loaded from; `None` for dummy weights.
    pub dir: Option<PathBuf>,
    /// Its files, where its decoder layers are read when asked ([`Model::load_tables`]).
    store: Option<weights::SafetensorsStore>,
}

impl Model {
    /// Loads a Hugging Face model directory, cache entry or snapshot, without network access.
    pub fn load(path: &Path) -> Result<Self> {
        Self::open(path, true)
    }

    /// As [`Model::load`], but the decoder layers stay in the files (memory-mapped; every
    /// tensor's name, shape and dtype checked now) until an executor reads one with
    /// [`Model::layer`]: the CUDA executor places each layer in fp16 or packed form itself, so
    /// that a large model never exists as f32 tensors in host memory.
    pub fn load_tables(path: &Path) -> Result<Self> {
        Self::open(path, false)
    }

    fn open(path: &Path, with_layers: bool) -> Result<Self> {
        let files = resolve(path)?;
        let text = std::fs::read_to_string(&files.config)
            .map_err(|source| Error::Io { path: files.config.clone(), source })?;
        let name = files
            .dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let spec = spec_from_config_json(&text, &files.config, &name)?;
        let store = SafetensorsStore::open_files(&files.weights)?;
        let weights = if with_layers {
            Weights::from_safetensors(&spec, &store)?
        } else {
            Weights::tables_from_safetensors(&spec, &store)?
        };
        let tokenizer = match &files.tokenizer {
            Some(p) => Some(Tokenizer::for_spec(p, &spec)?),
            None => None,
        };
        tracing::info!(model = %spec.name, params = spec.total_params(), "loaded");
        let store = (!with_layers).then_some(store);
        Ok(Self { spec, weights, tokenizer, dir: Some(files.dir), store })
    }

    /// Decoder layer `i`: the loaded one, or read from the files now ([`Model::load_tables`]).
    /// `None` where the model has neither (dummy tables: the executor fills the layers itself)
    /// or no layer `i`.
    pub fn layer(&self, i: u32) -> Result<Option<LayerWeights>> {
        if i >= self.spec.num_layers {
            return Ok(None);
        }
        if let Some(l) = self.weights.layers.get(i as usize) {
            return Ok(Some(l.clone()));
        }
        match &self.store {
            Some(store) => Weights::layer_from_safetensors(&self.spec, store, i).map(Some),
            None => Ok(None),
        }
    }

    /// Whether [`Model::layer`] has every decoder layer to give.
    pub fn has_layers(&self) -> bool {
        self.store.is_some() || self.weights.layers.len() == self.spec.num_layers as usize
    }

    /// A model of `spec` with dummy weights and no tokenizer.
    pub fn dummy(spec: ModelSpec, init: DummyInit) -> Result<Self> {
        let weights = Weights::dummy(&spec, init)?;
        Ok(Self { spec, weights, tokenizer: None, dir: None, store: None })
    }

    /// A model of `spec` whose decoder layers are not built: dummy tables only (see
    /// [`Weights::dummy_tables`]); the CUDA executor fills the layers with
    /// [`LayerLayout::fill_dummy`] where they are placed.
    pub fn dummy_tables(spec: ModelSpec, init: DummyInit) -> Result<Self> {
        let weights = Weights::dummy_tables(&spec, init)?;
        Ok(Self { spec, weights, tokenizer: None, dir: None, store: None })
    }

    /// This model with the tokenizer of `path` (a `tokenizer.json`, or a directory holding one):
    /// text prompts for dummy weights. Its vocabulary must fit the model's.
    pub fn with_tokenizer(mut self, path: &Path) -> Result<Self> {
        let file = if path.is_dir() { path.join("tokenizer.json") } else { path.to_path_buf() };
        if !file.is_file() {
            return Err(Error::Tokenizer {
                path: file,
                message: "no such file: give a tokenizer.json or a model directory holding one"
                    .into(),
            });
        }
        self.tokenizer = Some(Tokenizer::for_spec(&file, &self.spec)?);
        Ok(self)
    }

    /// Logits at every position of left-padded `ids` (`mask[b][t]` = real token), computed in one
    /// pass without a cache. The reference path that the runtime's cached generation must match.
    pub fn forward_all(&self, ids: &[Vec<u32>], mask: &[Vec<bool>]) -> Result<Tensor> {
        forward_all_on(&flexgen_tensor::Cpu, &self.spec, &self.weights, ids, mask)
    }
}

/// [`Model::forward_all`] on any backend, with the weights already there.
pub fn forward_all_on<B: flexgen_tensor::Backend>(
    be: &B,
    spec: &ModelSpec,
    weights: &Weights<B::T>,
    ids: &[Vec<u32>],
    mask: &[Vec<bool>],
) -> Result<Tensor>
where
    Error: From<B::Error>,
{
    let b = ids.len();
    let t = ids.first().map_or(0, Vec::len);
    let flat: Vec<u32> = ids.iter().flatten().copied().collect();
    let (pos, allowed) = layers::step_inputs(spec, mask, t);
    let step = layers::StepInputs::new(be, spec, &allowed, &pos)?;
    let mut x = layers::embed(be, weights, &flat, &pos, (b, t))?;
    for w in &weights.layers {
        x = layers::decoder_layer(be, spec, w, &x, None, &step)?.0;
    }
    Ok(be.to_cpu(&layers::logits(be, spec, weights, &x)?)?)
}
