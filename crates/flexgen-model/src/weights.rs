//! Model weights: the decoder-layer description filled from safetensors files (memory-mapped) or
//! with dummy values. Every tensor is fetched by name with the shape the spec requires, so a
//! missing or mis-shaped tensor is reported by name and file before anything runs.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use flexgen_policy::{Family, MlpKind, ModelSpec, NormKind, PositionKind};
use flexgen_tensor::{Device, Tensor};
use memmap2::Mmap;
use rand::{Rng, SeedableRng};
use safetensors::{Dtype, SafeTensors};

use crate::{Error, Result};

/// `y = x · Wᵀ + b`, weight in the Hugging Face `[out, in]` layout.
#[derive(Debug, Clone)]
pub struct Linear<T = Tensor> {
    pub weight: T,
    pub bias: Option<T>,
}

/// `LayerNorm` (weight and bias) or `RMSNorm` (weight only).
#[derive(Debug, Clone)]
pub struct Norm<T = Tensor> {
    pub weight: T,
    pub bias: Option<T>,
}

/// The feed-forward block of a layer.
#[derive(Debug, Clone)]
pub enum Mlp<T = Tensor> {
    /// OPT: fc1 → ReLU → fc2.
    Relu { fc1: Linear<T>, fc2: Linear<T> },
    /// Llama: down(silu(gate(x)) · up(x)).
    SwiGlu { gate: Linear<T>, up: Linear<T>, down: Linear<T> },
}

/// One decoder layer.
#[derive(Debug, Clone)]
pub struct LayerWeights<T = Tensor> {
    pub attn_norm: Norm<T>,
    pub q: Linear<T>,
    pub k: Linear<T>,
    pub v: Linear<T>,
    pub o: Linear<T>,
    pub mlp_norm: Norm<T>,
    pub mlp: Mlp<T>,
}

impl LayerWeights {
    /// Every tensor of the layer in a fixed order (norms, q, k, v, o, MLP; weights before biases).
    pub fn tensors(&self) -> Vec<&Tensor> {
        fn pair<'a>(v: &mut Vec<&'a Tensor>, w: &'a Tensor, b: Option<&'a Tensor>) {
            v.push(w);
            v.extend(b);
        }
        let mut v = Vec::with_capacity(16);
        pair(&mut v, &self.attn_norm.weight, self.attn_norm.bias.as_ref());
        for l in [&self.q, &self.k, &self.v, &self.o] {
            pair(&mut v, &l.weight, l.bias.as_ref());
        }
        pair(&mut v, &self.mlp_norm.weight, self.mlp_norm.bias.as_ref());
        match &self.mlp {
            Mlp::Relu { fc1, fc2 } => {
                pair(&mut v, &fc1.weight, fc1.bias.as_ref());
                pair(&mut v, &fc2.weight, fc2.bias.as_ref());
            }
            Mlp::SwiGlu { gate, up, down } => {
                for l in [gate, up, down] {
                    pair(&mut v, &l.weight, l.bias.as_ref());
                }
            }
        }
        v
    }

    /// A layer of the same structure as `self` with `tensors` (in [`LayerWeights::tensors`] order).
    #[must_use]
    pub fn with_tensors<U>(&self, tensors: Vec<U>) -> LayerWeights<U> {
        let mut it = tensors.into_iter();
        let mut next = || it.next().expect("as many tensors as the layer has");
        let mut norm = |n: &Norm| Norm { weight: next(), bias: n.bias.as_ref().map(|_| next()) };
        let attn_norm = norm(&self.attn_norm);
        let mut lin = |l: &Linear| Linear { weight: next(), bias: l.bias.as_ref().map(|_| next()) };
        let (q, k, v, o) = (lin(&self.q), lin(&self.k), lin(&self.v), lin(&self.o));
        let mut norm = |n: &Norm| Norm { weight: next(), bias: n.bias.as_ref().map(|_| next()) };
        let mlp_norm = norm(&self.mlp_norm);
        let mut lin = |l: &Linear| Linear { weight: next(), bias: l.bias.as_ref().map(|_| next()) };
        let mlp = match &self.mlp {
            Mlp::Relu { fc1, fc2 } => Mlp::Relu { fc1: lin(fc1), fc2: lin(fc2) },
            Mlp::SwiGlu { gate, up, down } => {
                Mlp::SwiGlu { gate: lin(gate), up: lin(up), down: lin(down) }
            }
        };
        LayerWeights { attn_norm, q, k, v, o, mlp_norm, mlp }
    }
}

/// The shapes of one decoder layer's tensors of `spec`, in [`LayerWeights::tensors`] order
/// (norms, q, k, v, o, MLP; weights before biases), without building them: what a memory plan
/// counts. A `SwiGLU` MLP lists gate, up and down.
pub fn layer_shapes(spec: &ModelSpec) -> Vec<Vec<usize>> {
    let (h, f) = (spec.hidden_size as usize, spec.ffn_size as usize);
    let kv = (spec.num_kv_heads * spec.head_dim()) as usize;
    let mut v = Vec::with_capacity(16);
    let norm = |v: &mut Vec<Vec<usize>>| {
        v.push(vec![h]);
        if matches!(spec.norm, NormKind::LayerNorm { .. }) {
            v.push(vec![h]);
        }
    };
    let linear = |v: &mut Vec<Vec<usize>>, out: usize, inp: usize| {
        v.push(vec![out, inp]);
        if spec.bias {
            v.push(vec![out]);
        }
    };
    norm(&mut v);
    for (out, inp) in [(h, h), (kv, h), (kv, h)] {
        v.push(vec![out, inp]);
        if spec.bias || spec.qkv_bias {
            v.push(vec![out]);
        }
    }
    linear(&mut v, h, h);
    norm(&mut v);
    match spec.mlp {
        MlpKind::Relu => {
            linear(&mut v, f, h);
            linear(&mut v, h, f);
        }
        MlpKind::SwiGlu => {
            linear(&mut v, f, h);
            linear(&mut v, f, h);
            linear(&mut v, h, f);
        }
    }
    v
}

/// All weights of a model.
#[derive(Debug, Clone)]
pub struct Weights<T = Tensor> {
    /// `[vocab, embed_dim]` (`embed_dim` = hidden size but for OPT-350M).
    pub token_embedding: T,
    /// Learned position table (OPT), absent for rotary models.
    pub position_embedding: Option<T>,
    /// OPT-350M's projections of the embeddings in (`[h, embed_dim]`) and of the last hidden
    /// state out (`[embed_dim, h]`).
    pub project_in: Option<T>,
    pub project_out: Option<T>,
    /// Absent where layers normalize after their residuals (OPT-350M).
    pub final_norm: Option<Norm<T>>,
    /// Separate LM head; `None` when tied to `token_embedding`.
    pub lm_head: Option<T>,
    pub layers: Vec<LayerWeights<T>>,
}

impl Weights {
    /// The same weights on another device: `put` copies one tensor there.
    pub fn to_device<U, E>(
        &self,
        mut put: impl FnMut(&Tensor) -> Result<U, E>,
    ) -> Result<Weights<U>, E> {
        let norm = |n: &Norm, put: &mut dyn FnMut(&Tensor) -> Result<U, E>| -> Result<Norm<U>, E> {
            Ok(Norm { weight: put(&n.weight)?, bias: n.bias.as_ref().map(&mut *put).transpose()? })
        };
        let layers = self
            .layers
            .iter()
            .map(|l| {
                Ok(l.with_tensors(
                    l.tensors().into_iter().map(&mut put).collect::<Result<Vec<U>, E>>()?,
                ))
            })
            .collect::<Result<Vec<_>, E>>()?;
        Ok(Weights {
            token_embedding: put(&self.token_embedding)?,
            position_embedding: self.position_embedding.as_ref().map(&mut put).transpose()?,
            project_in: self.project_in.as_ref().map(&mut put).transpose()?,
            project_out: self.project_out.as_ref().map(&mut put).transpose()?,
            final_norm: self.final_norm.as_ref().map(|n| norm(n, &mut put)).transpose()?,
            lm_head: self.lm_head.as_ref().map(&mut put).transpose()?,
            layers,
        })
    }
}

/// A norm's weight (and bias, for LayerNorm) called `name` from `src`.
fn norm(spec: &ModelSpec, src: &mut dyn TensorSource, name: &str) -> Result<Norm> {
    let h = spec.hidden_size as usize;
    Ok(Norm {
        weight: src.get(&format!("{name}.weight"), &[h])?,
        bias: match spec.norm {
            NormKind::LayerNorm { .. } => Some(src.get(&format!("{name}.bias"), &[h])?),
            NormKind::RmsNorm { .. } => None,
        },
    })
}

/// A linear layer's `[out, inp]` weight (and bias) called `name` from `src`.
fn linear(
    src: &mut dyn TensorSource,
    name: &str,
    (out, inp): (usize, usize),
    bias: bool,
) -> Result<Linear> {
    Ok(Linear {
        weight: src.get(&format!("{name}.weight"), &[out, inp])?,
        bias: if bias { Some(src.get(&format!("{name}.bias"), &[out])?) } else { None },
    })
}

/// Where tensors come from while [`Weights`] are built.
trait TensorSource {
    /// The tensor called `name` (Hugging Face naming, without the `model.` prefix), which must have
    /// `shape`, as f32 on the CPU.
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor>;
}

impl Weights {
    /// Builds the weights of `spec` from `src`, by the family's tensor names; without the layers
    /// (for the CUDA executor, which computes in fp16), the embedding-sized tables kept in fp16:
    /// the values it uploads, in half the host memory.
    fn build(spec: &ModelSpec, src: &mut dyn TensorSource, with_layers: bool) -> Result<Self> {
        let table = |t: Tensor| -> Result<Tensor> {
            Ok(if with_layers { t } else { t.to_dtype(flexgen_tensor::DType::F16)? })
        };
        let h = spec.hidden_size as usize;
        let v = spec.vocab_size as usize;
        let opt = spec.family == Family::Opt;
        let e = spec.embed_width() as usize;
        let token_embedding = table(src.get(
            if opt { "decoder.embed_tokens.weight" } else { "embed_tokens.weight" },
            &[v, e],
        )?)?;
        let project_in =
            spec.embed_dim.map(|_| src.get("decoder.project_in.weight", &[h, e])).transpose()?;
        let position_embedding = match spec.positions {
            PositionKind::Learned { offset } => Some(table(src.get(
                "decoder.embed_positions.weight",
                &[(spec.max_positions + offset) as usize, h],
            )?)?),
            PositionKind::Rope { .. } => None,
        };
        let mut layers = Vec::with_capacity(spec.num_layers as usize);
        for i in 0..if with_layers { spec.num_layers } else { 0 } {
            layers.push(Self::build_layer(spec, src, i)?);
        }
        let final_norm = spec
            .pre_norm
            .then(|| norm(spec, src, if opt { "decoder.final_layer_norm" } else { "norm" }))
            .transpose()?;
        let project_out =
            spec.embed_dim.map(|_| src.get("decoder.project_out.weight", &[e, h])).transpose()?;
        let lm_head = if spec.tie_embeddings {
            None
        } else {
            Some(table(src.get("lm_head.weight", &[v, e])?)?)
        };
        Ok(Self {
            token_embedding,
            position_embedding,
            project_in,
            project_out,
            final_norm,
            lm_head,
            layers,
        })
    }

    /// Decoder layer `i` of `spec` from `src`, by the family's tensor names.
    fn build_layer(spec: &ModelSpec, src: &mut dyn TensorSource, i: u32) -> Result<LayerWeights> {
        let h = spec.hidden_size as usize;
        let f = spec.ffn_size as usize;
        let kv = (spec.num_kv_heads * spec.head_dim()) as usize;
        let opt = spec.family == Family::Opt;
        let (b, qkv_b) = (spec.bias, spec.bias || spec.qkv_bias);
        let p = if opt { format!("decoder.layers.{i}") } else { format!("layers.{i}") };
        let mlp = match (spec.mlp, opt) {
            (MlpKind::Relu, _) => Mlp::Relu {
                fc1: linear(src, &format!("{p}.fc1"), (f, h), b)?,
                fc2: linear(src, &format!("{p}.fc2"), (h, f), b)?,
            },
            (MlpKind::SwiGlu, _) => Mlp::SwiGlu {
                gate: linear(src, &format!("{p}.mlp.gate_proj"), (f, h), b)?,
                up: linear(src, &format!("{p}.mlp.up_proj"), (f, h), b)?,
                down: linear(src, &format!("{p}.mlp.down_proj"), (h, f), b)?,
            },
        };
        let (attn_norm, mlp_norm, o) = if opt {
            ("self_attn_layer_norm", "final_layer_norm", "out_proj")
        } else {
            ("input_layernorm", "post_attention_layernorm", "o_proj")
        };
        Ok(LayerWeights {
            attn_norm: norm(spec, src, &format!("{p}.{attn_norm}"))?,
            q: linear(src, &format!("{p}.self_attn.q_proj"), (h, h), qkv_b)?,
            k: linear(src, &format!("{p}.self_attn.k_proj"), (kv, h), qkv_b)?,
            v: linear(src, &format!("{p}.self_attn.v_proj"), (kv, h), qkv_b)?,
            o: linear(src, &format!("{p}.self_attn.{o}"), (h, h), b)?,
            mlp_norm: norm(spec, src, &format!("{p}.{mlp_norm}"))?,
            mlp,
        })
    }

    /// Reads the weights of `spec` from safetensors files.
    pub fn from_safetensors(spec: &ModelSpec, store: &SafetensorsStore) -> Result<Self> {
        let mut src = store;
        Self::build(spec, &mut src, true)
    }

    /// Reads the embeddings, final norm and LM head of `spec` from safetensors files, in fp16,
    /// with no decoder layers (`layers` is empty): [`Weights::layer_from_safetensors`] reads a
    /// layer when it is needed.
    pub fn tables_from_safetensors(spec: &ModelSpec, store: &SafetensorsStore) -> Result<Self> {
        let mut src = store;
        Self::build(spec, &mut src, false)
    }

    /// Checks that every tensor of `spec` is in the files with its name, shape and dtype, reading
    /// none: the weights of a model whose tensors are read when an executor places them. Its
    /// tables are empty placeholders and it has no layers.
    pub(crate) fn check_safetensors(spec: &ModelSpec, store: &SafetensorsStore) -> Result<Self> {
        Self::build(spec, &mut Checked(store), true).map(Self::without_layers)
    }

    /// The weights of a model whose tables and layers are made when an executor places them:
    /// empty placeholder tables, no layers.
    pub(crate) fn placeholder(spec: &ModelSpec) -> Result<Self> {
        struct Empty;
        impl TensorSource for Empty {
            fn get(&mut self, _: &str, _: &[usize]) -> Result<Tensor> {
                Ok(Tensor::from_vec(Vec::<f32>::new(), &[0], &Device::Cpu)?)
            }
        }
        Self::build(spec, &mut Empty, false)
    }

    fn without_layers(mut self) -> Self {
        self.layers.clear();
        self
    }

    /// Decoder layer `i` of `spec` from safetensors files, as f32 tensors.
    pub fn layer_from_safetensors(
        spec: &ModelSpec,
        store: &SafetensorsStore,
        i: u32,
    ) -> Result<LayerWeights> {
        let mut src = store;
        Self::build_layer(spec, &mut src, i)
    }

    /// Dummy weights for `spec` without any file.
    pub fn dummy(spec: &ModelSpec, init: DummyInit) -> Result<Self> {
        let mut src = DummySource::new(spec, init);
        Self::build(spec, &mut src, true)
    }

    /// Dummy embeddings, final norm and LM head of `spec` with no decoder layers (`layers` is
    /// empty): for executors that build the layers themselves ([`crate::LayerLayout::fill_dummy`]),
    /// so that a 30B-parameter model never exists as f32 tensors.
    pub fn dummy_tables(spec: &ModelSpec, init: DummyInit) -> Result<Self> {
        let mut src = DummySource::new(spec, init);
        Self::build(spec, &mut src, false)
    }
}

/// Values of dummy weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DummyInit {
    /// Every value 1, `FlexGen`'s convention for benchmarks (it hides indexing bugs: not for tests).
    Ones,
    /// Seeded uniform values in ±0.1 (`LayerNorm` weights around 1).
    Random { seed: u64 },
}

impl DummyInit {
    fn seed(self) -> u64 {
        match self {
            DummyInit::Ones => 0,
            DummyInit::Random { seed } => seed,
        }
    }
}

/// Dummy values: embeddings and the final norm from a seeded stream; decoder-layer tensors by
/// [`crate::LayerLayout::fill_dummy`] (a hash of seed, layer and arena index), so that an executor
/// that builds layer arenas directly gets the same values as these tensors.
struct DummySource {
    init: DummyInit,
    rng: rand_chacha::ChaCha8Rng,
    layout: Option<crate::LayerLayout>,
}

impl DummySource {
    fn new(spec: &ModelSpec, init: DummyInit) -> Self {
        Self {
            init,
            rng: rand_chacha::ChaCha8Rng::seed_from_u64(init.seed()),
            layout: crate::LayerLayout::new(spec).ok(),
        }
    }
}

impl TensorSource for DummySource {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let n: usize = shape.iter().product();
        let layer_name =
            name.strip_prefix("decoder.layers.").or_else(|| name.strip_prefix("layers."));
        if let (Some(layout), Some(rest)) = (&self.layout, layer_name)
            && let Some((layer, suffix)) = rest.split_once('.')
            && let (Ok(layer), Some(start)) = (layer.parse::<usize>(), layout.offset_of(suffix))
        {
            let mut v = vec![half::f16::ZERO; n];
            layout.fill_dummy(self.init, layer, start..start + n, &mut v);
            let data: Vec<f32> = v.into_iter().map(half::f16::to_f32).collect();
            return Ok(Tensor::from_vec(data, shape, &Device::Cpu)?);
        }
        let data: Vec<f32> = match self.init {
            DummyInit::Ones => vec![1.0; n],
            DummyInit::Random { .. } => {
                let is_norm = name.contains("layer_norm.weight")
                    || name.ends_with("layernorm.weight")
                    || name == "norm.weight";
                let base = if is_norm { 1.0 } else { 0.0 };
                (0..n).map(|_| base + self.rng.random_range(-0.1f32..0.1)).collect()
            }
        };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}

/// Memory-mapped safetensors files with an index of every tensor they hold.
pub struct SafetensorsStore {
    files: Vec<(PathBuf, Mmap)>,
    index: HashMap<String, Entry>,
}

/// Where one tensor is: (file index, dtype, shape, absolute byte range in the file).
type Entry = (usize, Dtype, Vec<usize>, std::ops::Range<usize>);

impl SafetensorsStore {
    /// Maps the given files and indexes their tensors.
    pub fn open(paths: &[PathBuf]) -> Result<Self> {
        let mut files: Vec<(PathBuf, Mmap)> = Vec::with_capacity(paths.len());
        let mut index = HashMap::new();
        for path in paths {
            let file = std::fs::File::open(path)
                .map_err(|source| Error::Io { path: path.clone(), source })?;
            // SAFETY: the file is opened read-only; flexgen never writes model files while it runs.
            // If another process truncates it, reads fault, as with any mmap-based loader.
            let mmap = unsafe { Mmap::map(&file) }
                .map_err(|source| Error::Io { path: path.clone(), source })?;
            let bad = |message: String| Error::Safetensors { path: path.clone(), message };
            let (header_len, meta) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
            let data_start = 8 + header_len;
            for (name, info) in meta.tensors() {
                let (a, b) = info.data_offsets;
                if data_start + b > mmap.len() {
                    return Err(bad(format!(
                        "tensor `{name}` extends past the end of the file (truncated?)"
                    )));
                }
                let entry =
                    (files.len(), info.dtype, info.shape.clone(), data_start + a..data_start + b);
                if let Some((other, ..)) = index.insert(name.clone(), entry) {
                    let other: &PathBuf = &files[other].0;
                    return Err(bad(format!(
                        "tensor `{name}` is also in {}; each tensor must be in one file",
                        other.display()
                    )));
                }
            }
            files.push((path.clone(), mmap));
        }
        Ok(Self { files, index })
    }

    /// Opens `model.safetensors` or the shards of `model.safetensors.index.json`, checking that
    /// every tensor the index lists is in the shard it names.
    pub fn open_files(weights: &crate::WeightFiles) -> Result<Self> {
        match weights {
            crate::WeightFiles::Single(p) => Self::open(std::slice::from_ref(p)),
            crate::WeightFiles::Sharded(index_path) => {
                let bad =
                    |message: String| Error::Safetensors { path: index_path.clone(), message };
                let text = std::fs::read_to_string(index_path)
                    .map_err(|source| Error::Io { path: index_path.clone(), source })?;
                let json: serde_json::Value =
                    serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
                let map = json
                    .get("weight_map")
                    .and_then(|m| m.as_object())
                    .ok_or_else(|| bad("no \"weight_map\" object".into()))?;
                let dir = index_path.parent().unwrap_or(Path::new("."));
                let mut shards: Vec<String> =
                    map.values().filter_map(|v| v.as_str().map(str::to_string)).collect();
                shards.sort();
                shards.dedup();
                // A shard is a file name inside the model directory: nothing the index names
                // elsewhere (an absolute path, `..`, a subdirectory) is opened.
                for s in &shards {
                    let mut parts = Path::new(s).components();
                    let plain = matches!(
                        (parts.next(), parts.next()),
                        (Some(std::path::Component::Normal(_)), None)
                    );
                    if !plain {
                        return Err(bad(format!(
                            "shard \"{s}\" is not a file name in the model directory; an index \
                             may only name files beside it"
                        )));
                    }
                }
                let paths: Vec<PathBuf> = shards.iter().map(|s| dir.join(s)).collect();
                for p in &paths {
                    if !p.is_file() {
                        return Err(bad(format!("shard {} is listed but missing", p.display())));
                    }
                }
                let store = Self::open(&paths)?;
                for (name, shard) in map {
                    let shard = shard.as_str().unwrap_or_default();
                    match store.index.get(name) {
                        Some((i, ..)) if store.files[*i].0 == dir.join(shard) => {}
                        _ => {
                            return Err(bad(format!(
                                "the index puts tensor `{name}` in {shard}, which does not contain it"
                            )));
                        }
                    }
                }
                Ok(store)
            }
        }
    }

    /// Names of all tensors in the files.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.index.keys().map(String::as_str)
    }

    fn file_list(&self) -> String {
        self.files.iter().map(|(p, _)| p.display().to_string()).collect::<Vec<_>>().join(", ")
    }

    /// Finds `name` under the prefixes checkpoints use (`model.decoder…` or `decoder…`).
    fn find(&self, name: &str) -> Option<(&str, &Entry)> {
        [format!("model.{name}"), name.to_string()]
            .into_iter()
            .find_map(|n| self.index.get_key_value(n.as_str()).map(|(k, v)| (k.as_str(), v)))
    }
}

impl SafetensorsStore {
    /// The tensor called `name`, checked to have `shape` and a dtype that converts to f32: its
    /// full name, file and entry.
    fn locate(&self, name: &str, shape: &[usize]) -> Result<(&str, &Path, &Entry)> {
        let Some((full, entry)) = self.find(name) else {
            return Err(Error::MissingTensor {
                name: format!("model.{name}"),
                searched: self.file_list(),
            });
        };
        let (file, dtype, found, _) = entry;
        let path = &self.files[*file].0;
        if found != shape {
            return Err(Error::Shape {
                name: full.into(),
                path: path.clone(),
                expected: shape.to_vec(),
                found: found.clone(),
            });
        }
        if !matches!(dtype, Dtype::F32 | Dtype::F16 | Dtype::BF16) {
            return Err(Error::Dtype {
                name: full.into(),
                path: path.clone(),
                dtype: format!("{dtype:?}"),
            });
        }
        Ok((full, path, entry))
    }
}

/// A source that only checks each tensor ([`SafetensorsStore::locate`]) and gives an empty one.
struct Checked<'a>(&'a SafetensorsStore);

impl TensorSource for Checked<'_> {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        self.0.locate(name, shape)?;
        Ok(Tensor::from_vec(Vec::<f32>::new(), &[0], &Device::Cpu)?)
    }
}

impl TensorSource for &SafetensorsStore {
    fn get(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let (_, _, (file, dtype, _, range)) = self.locate(name, shape)?;
        let bytes = &self.files[*file].1[range.clone()];
        let data: Vec<f32> = match dtype {
            Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                .collect(),
            other => unreachable!("`locate` refuses {other:?}: f32, f16 and bf16 only"),
        };
        Ok(Tensor::from_vec(data, shape, &Device::Cpu)?)
    }
}
