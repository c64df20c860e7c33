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
    /// The weights in memory; for a lazy model ([`Model::open_lazy`], [`Model::dummy_lazy`])
    /// empty placeholders: its tables come from [`Model::tables`] and its layers from
    /// [`Model::layer`].
    pub weights: Weights,
    pub tokenizer: Option<Tokenizer>,
    /// The directory it was loaded from; `None` for dummy weights.
    pub dir: Option<PathBuf>,
    /// Its files, where a lazy model's tables and decoder layers are read when asked.
    store: Option<weights::SafetensorsStore>,
    /// A lazy dummy model's values.
    lazy_dummy: Option<DummyInit>,
}

impl Model {
    /// Loads a Hugging Face model directory, cache entry or snapshot, without network access.
    pub fn load(path: &Path) -> Result<Self> {
        Self::open(path, true)
    }

    /// As [`Model::load`], but every tensor stays in the files (memory-mapped; each one's name,
    /// shape and dtype checked now) until an executor asks for the tables ([`Model::tables`],
    /// in fp16) or a layer ([`Model::layer`]): the CUDA executor uploads the tables and places
    /// each layer in fp16 or packed form itself, so that a large model never exists as f32
    /// tensors in host memory, and its tables are not kept there once uploaded.
    pub fn open_lazy(path: &Path) -> Result<Self> {
        Self::open(path, false)
    }

    fn open(path: &Path, eager: bool) -> Result<Self> {
        let files = resolve(path)?;
        let text = std::fs::read_to_string(&files.config)
            .map_err(|source| Error::Io { path: files.config.clone(), source })?;
        let name = files
            .dir
            .file_name()
            .map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned());
        let spec = spec_from_config_json(&text, &files.config, &name)?;
        let store = SafetensorsStore::open_files(&files.weights)?;
        let weights = if eager {
            Weights::from_safetensors(&spec, &store)?
        } else {
            Weights::check_safetensors(&spec, &store)?
        };
        let tokenizer = match &files.tokenizer {
            Some(p) => Some(Tokenizer::for_spec(p, &spec)?),
            None => None,
        };
        tracing::info!(model = %spec.name, params = spec.total_params(), "loaded");
        let store = (!eager).then_some(store);
        Ok(Self { spec, weights, tokenizer, dir: Some(files.dir), store, lazy_dummy: None })
    }

    /// Whether the weights are made when an executor asks ([`Model::open_lazy`],
    /// [`Model::dummy_lazy`]) rather than held in [`Model::weights`].
    pub fn is_lazy(&self) -> bool {
        self.store.is_some() || self.lazy_dummy.is_some()
    }

    /// The embeddings, final norm and LM head (no layers): those held, or for a lazy model read
    /// from the files or made now, in fp16, for the caller to upload and drop.
    pub fn tables(&self) -> Result<std::borrow::Cow<'_, Weights>> {
        use std::borrow::Cow;
        match (&self.store, self.lazy_dummy) {
            (Some(store), _) => {
                Ok(Cow::Owned(Weights::tables_from_safetensors(&self.spec, store)?))
            }
            (None, Some(init)) => Ok(Cow::Owned(Weights::dummy_tables(&self.spec, init)?)),
            (None, None) => Ok(Cow::Borrowed(&self.weights)),
        }
    }

    /// Decoder layer `i`: the loaded one, or read from the files now ([`Model::open_lazy`]).
    /// `None` where the model has neither (a lazy dummy model: the executor fills the layers
    /// itself) or no layer `i`.
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
        Ok(Self { spec, weights, tokenizer: None, dir: None, store: None, lazy_dummy: None })
    }

    /// A lazy model of `spec` with dummy weights: nothing is made until an executor asks for the
    /// tables ([`Model::tables`], see [`Weights::dummy_tables`]); the CUDA executor fills the
    /// layers with [`LayerLayout::fill_dummy`] where they are placed.
    pub fn dummy_lazy(spec: ModelSpec, init: DummyInit) -> Result<Self> {
        let weights = Weights::placeholder(&spec)?;
        Ok(Self { spec, weights, tokenizer: None, dir: None, store: None, lazy_dummy: Some(init) })
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
        if self.is_lazy() {
            return Err(Error::Unsupported {
                what: "the reference pass of a lazy model (its weights are read when an executor \
                       places them): load it with Model::load or Model::dummy"
                    .into(),
            });
        }
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
