//! The shape of a decoder-only model and of a generation workload: what the planner's cost model
//! and the runtime both need to know, without any weights.

use serde::{Deserialize, Serialize};

/// Model family; each family is a set of choices for the same decoder-layer description.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Family {
    /// Meta's OPT: learned positions, `LayerNorm`, `ReLU` MLP, biases everywhere.
    Opt,
    /// The Llama family: `RoPE`, `RMSNorm`, `SwiGLU`, grouped-query attention, no biases.
    Llama,
}

/// Normalization used before (or after) attention and MLP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NormKind {
    /// `LayerNorm` with weight and bias.
    LayerNorm { eps: f64 },
    /// `RMSNorm` with weight only.
    RmsNorm { eps: f64 },
}

/// The feed-forward block.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MlpKind {
    /// fc1 → `ReLU` → fc2.
    Relu,
    /// gate/up → SiLU(gate)·up → down.
    SwiGlu,
}

/// How positions enter the model.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PositionKind {
    /// A learned table added to the token embedding; index = position + `offset`.
    Learned { offset: u32 },
    /// Rotary embedding of q and k (the halves rotated, as Hugging Face's Llama does).
    Rope {
        theta: f64,
        /// Llama 3's frequency scaling (`rope_type` "llama3"); `None`: plain frequencies.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        scaling: Option<RopeScaling>,
    },
}

/// Llama 3.1's rotary frequency scaling: wavelengths longer than the original context divided by
/// `factor`, shorter than `original_max_positions / high_freq_factor` kept, smoothed between.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RopeScaling {
    pub factor: f64,
    pub low_freq_factor: f64,
    pub high_freq_factor: f64,
    pub original_max_positions: u32,
}

impl PositionKind {
    /// The rotary inverse frequencies of a head of `head_dim` values (`head_dim / 2` of them), as
    /// Hugging Face computes them (f32 exponents, Llama 3 scaling); empty for learned positions.
    pub fn inv_freq(&self, head_dim: u32) -> Vec<f64> {
        let PositionKind::Rope { theta, scaling } = *self else { return Vec::new() };
        (0..head_dim / 2)
            .map(|i| {
                #[expect(clippy::cast_precision_loss, reason = "small integers")]
                let e = f64::from((2 * i) as f32 / head_dim as f32);
                let f = 1.0 / theta.powf(e);
                let Some(s) = scaling else { return f };
                let old = f64::from(s.original_max_positions);
                let (low, high) = (old / s.low_freq_factor, old / s.high_freq_factor);
                let wavelen = 2.0 * std::f64::consts::PI / f;
                if wavelen < high {
                    f
                } else if wavelen > low {
                    f / s.factor
                } else {
                    let smooth = (old / wavelen - s.low_freq_factor)
                        / (s.high_freq_factor - s.low_freq_factor);
                    (1.0 - smooth) * f / s.factor + smooth * f
                }
            })
            .collect()
    }
}

/// Shape and structure of a decoder-only transformer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub family: Family,
    pub num_layers: u32,
    pub hidden_size: u32,
    pub num_heads: u32,
    /// Key/value heads (= `num_heads` without grouped-query attention).
    pub num_kv_heads: u32,
    pub ffn_size: u32,
    pub vocab_size: u32,
    /// Longest sequence (prompt + generated) the position encoding supports.
    pub max_positions: u32,
    pub norm: NormKind,
    pub mlp: MlpKind,
    pub positions: PositionKind,
    /// Normalize before attention and MLP (with a final norm before the LM head); false for
    /// OPT-350M, which normalizes after each residual and has no final norm.
    pub pre_norm: bool,
    /// Linear layers carry biases.
    pub bias: bool,
    /// The q, k and v projections carry biases even where the other linear layers do not
    /// (Qwen2).
    #[serde(default)]
    pub qkv_bias: bool,
    /// The LM head reuses the token embedding.
    pub tie_embeddings: bool,
    /// The token embedding's width where it differs from `hidden_size` (OPT-350M's
    /// `word_embed_proj_dim`): embeddings are projected in to the hidden size, and the last
    /// hidden state out to this width before the LM head.
    #[serde(default)]
    pub embed_dim: Option<u32>,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
    /// Further ids that end a sequence (Llama 3.1's config.json lists three).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub more_eos_token_ids: Vec<u32>,
    pub pad_token_id: Option<u32>,
}

/// The largest value each size may take: beyond every published model by a wide margin, so that
/// a damaged file is refused where it is read instead of reaching an allocation.
pub mod bounds {
    pub const LAYERS: u32 = 1024;
    pub const HIDDEN: u32 = 65_536;
    pub const HEADS: u32 = 1024;
    pub const FFN: u32 = 262_144;
    pub const VOCAB: u32 = 4_194_304;
    pub const POSITIONS: u32 = 16_777_216;
}

impl ModelSpec {
    /// Checks that the sizes describe a model the planner and runtime can size: every count
    /// positive and bounded, heads dividing the hidden size, query heads in whole groups of
    /// key/value heads, finite positive epsilons and rotary settings, special ids inside the
    /// vocabulary. A spec read from a file (a run report's) must pass before it is used.
    pub fn validate(&self) -> crate::Result<()> {
        let fix = "the spec does not describe a model; take it from a flexgen-run --json report \
                   or a config.json";
        let bad = |field: &str, value: &dyn std::fmt::Display, problem: &str| {
            Err(crate::Error::invalid(format!("spec.{field}"), value, problem, fix))
        };
        for (field, v, max) in [
            ("num_layers", self.num_layers, bounds::LAYERS),
            ("hidden_size", self.hidden_size, bounds::HIDDEN),
            ("num_heads", self.num_heads, bounds::HEADS),
            ("num_kv_heads", self.num_kv_heads, bounds::HEADS),
            ("ffn_size", self.ffn_size, bounds::FFN),
            ("vocab_size", self.vocab_size, bounds::VOCAB),
            ("max_positions", self.max_positions, bounds::POSITIONS),
            ("embed_dim", self.embed_width(), bounds::HIDDEN),
        ] {
            if v == 0 || v > max {
                return bad(field, &v, &format!("must be between 1 and {max}"));
            }
        }
        if !self.hidden_size.is_multiple_of(self.num_heads) {
            return bad("num_heads", &self.num_heads, "must divide hidden_size");
        }
        if !self.num_heads.is_multiple_of(self.num_kv_heads) {
            return bad("num_kv_heads", &self.num_kv_heads, "must divide num_heads");
        }
        let (NormKind::LayerNorm { eps } | NormKind::RmsNorm { eps }) = self.norm;
        if !(eps.is_finite() && eps > 0.0) {
            return bad("norm.eps", &eps, "must be a positive number");
        }
        if let PositionKind::Rope { theta, scaling } = self.positions {
            if !(theta.is_finite() && theta > 1.0) {
                return bad("positions.theta", &theta, "must be a number above 1");
            }
            if let Some(s) = scaling {
                let ok = |x: f64| x.is_finite() && x > 0.0;
                if !(ok(s.factor) && ok(s.low_freq_factor) && ok(s.high_freq_factor))
                    || s.original_max_positions == 0
                {
                    return bad("positions.scaling", &s.factor, "factors must be positive");
                }
            }
        }
        for (field, id) in [
            ("bos_token_id", self.bos_token_id),
            ("eos_token_id", self.eos_token_id),
            ("pad_token_id", self.pad_token_id),
            ("more_eos_token_ids", self.more_eos_token_ids.iter().copied().max()),
        ] {
            if let Some(id) = id.filter(|&id| id >= self.vocab_size) {
                return bad(field, &id, "must be inside the vocabulary");
            }
        }
        Ok(())
    }

    /// Width of the token embedding: `embed_dim` where it differs from the hidden size.
    pub fn embed_width(&self) -> u32 {
        self.embed_dim.unwrap_or(self.hidden_size)
    }

    /// Whether `token` ends a sequence (the EOS id or one of the further ones).
    pub fn is_eos(&self, token: u32) -> bool {
        self.eos_token_id == Some(token) || self.more_eos_token_ids.contains(&token)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> u32 {
        self.hidden_size / self.num_heads
    }

    /// Elements of one decoder layer's weights (matrices and vectors).
    pub fn layer_params(&self) -> u64 {
        let h = u64::from(self.hidden_size);
        let kv = u64::from(self.num_kv_heads) * u64::from(self.head_dim());
        let f = u64::from(self.ffn_size);
        let attn = h * h * 2 + h * kv * 2;
        let mlp = match self.mlp {
            MlpKind::Relu => 2 * h * f,
            MlpKind::SwiGlu => 3 * h * f,
        };
        let biases = if self.bias {
            2 * h + 2 * kv + f + h
        } else if self.qkv_bias {
            h + 2 * kv
        } else {
            0
        };
        let norms = 2 * self.norm_params();
        attn + mlp + biases + norms
    }

    /// Elements of one norm: its weight, and a bias for `LayerNorm`.
    pub fn norm_params(&self) -> u64 {
        let h = u64::from(self.hidden_size);
        match self.norm {
            NormKind::LayerNorm { .. } => 2 * h,
            NormKind::RmsNorm { .. } => h,
        }
    }

    /// Elements of one decoder layer's weight matrices (what its GEMMs multiply by): q, o, k, v
    /// (k and v by key/value heads) and the MLP's two or three matrices.
    pub fn layer_matrix_params(&self) -> u64 {
        let h = u64::from(self.hidden_size);
        let kv = u64::from(self.num_kv_heads) * u64::from(self.head_dim());
        let f = u64::from(self.ffn_size);
        let mlp = match self.mlp {
            MlpKind::Relu => 2 * h * f,
            MlpKind::SwiGlu => 3 * h * f,
        };
        2 * h * h + 2 * h * kv + mlp
    }

    /// (outputs, inputs) of a decoder layer's four matrices as the executors pack them
    /// (`flexgen_model::PackedLayout::mats`): q, k and v as one, the attention output, the MLP's
    /// first (gate and up as one for SwiGLU) and its second.
    pub fn layer_matrices(&self) -> [(usize, usize); 4] {
        let h = self.hidden_size as usize;
        let kv = (self.num_kv_heads * self.head_dim()) as usize;
        let inner = usize::try_from(self.mlp_inner_width()).expect("a layer's width");
        [(h + 2 * kv, h), (h, h), (inner, h), (h, self.ffn_size as usize)]
    }

    /// Values per token of the MLP's inner activations: ffn, or 2·ffn for SwiGLU (gate and up,
    /// computed by one GEMM).
    pub fn mlp_inner_width(&self) -> u64 {
        let f = u64::from(self.ffn_size);
        match self.mlp {
            MlpKind::Relu => f,
            MlpKind::SwiGlu => 2 * f,
        }
    }

    /// Elements of the tables before the first layer (token and position embeddings, the
    /// projection in) and after the last (the final norm, the projection out, an untied LM
    /// head).
    pub fn table_params(&self) -> (u64, u64) {
        let h = u64::from(self.hidden_size);
        let v = u64::from(self.vocab_size);
        let e = u64::from(self.embed_width());
        let proj = if self.embed_dim.is_some() { e * h } else { 0 };
        let pos = match self.positions {
            PositionKind::Learned { offset } => {
                (u64::from(self.max_positions) + u64::from(offset)) * h
            }
            PositionKind::Rope { .. } => 0,
        };
        let head = if self.tie_embeddings { 0 } else { v * e };
        let final_norm = if self.pre_norm { self.norm_params() } else { 0 };
        (v * e + pos + proj, final_norm + proj + head)
    }

    /// Elements of the embeddings, the projections, the final norm and (if untied) the LM head.
    pub fn embedding_params(&self) -> u64 {
        let (first, last) = self.table_params();
        first + last
    }

    /// Elements of all weights.
    pub fn total_params(&self) -> u64 {
        u64::from(self.num_layers) * self.layer_params() + self.embedding_params()
    }

    /// Bytes of K and V for one token in one layer, at `elem_bytes` per value.
    pub fn kv_bytes_per_token_layer(&self, elem_bytes: u64) -> u64 {
        2 * u64::from(self.num_kv_heads) * u64::from(self.head_dim()) * elem_bytes
    }
}

/// What is generated: the prompt and generation lengths and how many prompts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Workload {
    pub prompt_len: u32,
    pub gen_len: u32,
    /// Number of prompts to process; `None` lets the planner choose the block size freely.
    pub num_prompts: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Llama-shaped spec: h 64, 4 heads of 16, 2 key/value heads, ffn 160, vocab 100, untied.
    fn llama() -> ModelSpec {
        ModelSpec {
            name: "t".into(),
            family: Family::Llama,
            num_layers: 2,
            hidden_size: 64,
            num_heads: 4,
            num_kv_heads: 2,
            ffn_size: 160,
            vocab_size: 100,
            max_positions: 128,
            norm: NormKind::RmsNorm { eps: 1e-5 },
            mlp: MlpKind::SwiGlu,
            positions: PositionKind::Rope { theta: 10_000.0, scaling: None },
            pre_norm: true,
            bias: false,
            qkv_bias: false,
            tie_embeddings: false,
            embed_dim: None,
            bos_token_id: None,
            eos_token_id: None,
            more_eos_token_ids: Vec::new(),
            pad_token_id: None,
        }
    }

    #[test]
    fn a_llama_layer_counts_three_mlp_matrices_and_kv_by_its_heads() {
        let s = llama();
        // q, o: 64·64 each; k, v: 64·32 each; gate, up, down: 64·160 each; two RMSNorms.
        let matrices = 2 * 64 * 64 + 2 * 64 * 32 + 3 * 64 * 160;
        assert_eq!(s.layer_matrix_params(), matrices);
        assert_eq!(s.layer_params(), matrices + 2 * 64);
        // Qwen2's q/k/v biases: 64 + 2·32.
        assert_eq!(ModelSpec { qkv_bias: true, ..s.clone() }.layer_params(), matrices + 128 + 128);
        // Token table, final norm and the untied head; no position table.
        assert_eq!(s.embedding_params(), 100 * 64 + 64 + 100 * 64);
    }

    #[test]
    fn llama3_scaling_divides_long_wavelengths_and_keeps_short_ones() {
        let plain = PositionKind::Rope { theta: 500_000.0, scaling: None };
        let scaling = RopeScaling {
            factor: 8.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_positions: 8192,
        };
        let scaled = PositionKind::Rope { theta: 500_000.0, scaling: Some(scaling) };
        let (a, b) = (plain.inv_freq(128), scaled.inv_freq(128));
        assert_eq!(a.len(), 64);
        assert_eq!(a[0], b[0], "the highest frequency is kept");
        assert!((a[63] / b[63] - 8.0).abs() < 1e-9, "the lowest is divided by the factor");
        // In between, every scaled frequency lies within [f / factor, f].
        assert!(a.iter().zip(&b).all(|(f, g)| *g <= *f && *g >= f / 8.0 - 1e-15));
        assert!(PositionKind::Learned { offset: 2 }.inv_freq(64).is_empty());
    }
}
