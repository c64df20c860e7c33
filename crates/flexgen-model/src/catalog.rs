//! Named model specs: every published OPT size, as in the original's `get_opt_config`, and the
//! Llama-family models of issue 17 (shapes from their published config.json files), for dummy
//! runs and the planner.

use flexgen_policy::{Family, MlpKind, ModelSpec, NormKind, PositionKind, RopeScaling};

use crate::{Error, Result};

/// (name, layers, hidden, heads) of the OPT family; ffn = 4·hidden, vocab 50272, 2048 positions.
const OPT_SIZES: [(&str, u32, u32, u32); 9] = [
    ("opt-125m", 12, 768, 12),
    ("opt-350m", 24, 1024, 16),
    ("opt-1.3b", 24, 2048, 32),
    ("opt-2.7b", 32, 2560, 32),
    ("opt-6.7b", 32, 4096, 32),
    ("opt-13b", 40, 5120, 40),
    ("opt-30b", 48, 7168, 56),
    ("opt-66b", 64, 9216, 72),
    ("opt-175b", 96, 12288, 96),
];

/// An OPT spec with OPT's fixed choices (learned positions with offset 2, pre-LayerNorm, `ReLU`,
/// biases, tied LM head, `</s>` = 2 as BOS and EOS, pad = 1).
pub fn opt_spec(
    name: &str,
    layers: u32,
    hidden: u32,
    heads: u32,
    ffn: u32,
    vocab: u32,
    max_positions: u32,
) -> ModelSpec {
    ModelSpec {
        name: name.to_string(),
        family: Family::Opt,
        num_layers: layers,
        hidden_size: hidden,
        num_heads: heads,
        num_kv_heads: heads,
        ffn_size: ffn,
        vocab_size: vocab,
        max_positions,
        norm: NormKind::LayerNorm { eps: 1e-5 },
        mlp: MlpKind::Relu,
        positions: PositionKind::Learned { offset: 2 },
        pre_norm: true,
        bias: true,
        qkv_bias: false,
        tie_embeddings: true,
        embed_dim: None,
        bos_token_id: Some(2),
        eos_token_id: Some(2),
        more_eos_token_ids: Vec::new(),
        pad_token_id: Some(1),
    }
}

/// A Llama-family model's published shape.
struct LlamaShape {
    name: &'static str,
    /// Hub names that mean it.
    aliases: &'static [&'static str],
    layers: u32,
    hidden: u32,
    heads: u32,
    kv_heads: u32,
    ffn: u32,
    vocab: u32,
    max_positions: u32,
    theta: f64,
    llama3: bool,
    rms_eps: f64,
    qkv_bias: bool,
    tie: bool,
    bos: u32,
    eos: u32,
}

/// Llama 2 (meta-llama/Llama-2-*-hf), Llama 3.1 (meta-llama/Llama-3.1-*), Mistral 7B v0.3
/// (mistralai/Mistral-7B-v0.3) and Qwen2.5 (Qwen/Qwen2.5-*), from their config.json files.
const LLAMA_SIZES: [LlamaShape; 8] = {
    const L2: LlamaShape = LlamaShape {
        name: "",
        aliases: &[],
        layers: 32,
        hidden: 4096,
        heads: 32,
        kv_heads: 32,
        ffn: 11008,
        vocab: 32000,
        max_positions: 4096,
        theta: 10_000.0,
        llama3: false,
        rms_eps: 1e-5,
        qkv_bias: false,
        tie: false,
        bos: 1,
        eos: 2,
    };
    const L31: LlamaShape = LlamaShape {
        kv_heads: 8,
        ffn: 14336,
        vocab: 128_256,
        max_positions: 131_072,
        theta: 500_000.0,
        llama3: true,
        bos: 128_000,
        eos: 128_001,
        ..L2
    };
    const Q25: LlamaShape = LlamaShape {
        layers: 28,
        hidden: 3584,
        heads: 28,
        kv_heads: 4,
        ffn: 18944,
        vocab: 152_064,
        max_positions: 131_072,
        theta: 1_000_000.0,
        rms_eps: 1e-6,
        qkv_bias: true,
        bos: 151_643,
        eos: 151_643,
        ..L2
    };
    [
        LlamaShape { name: "llama-2-7b", aliases: &["meta-llama/llama-2-7b-hf"], ..L2 },
        LlamaShape {
            name: "llama-2-13b",
            aliases: &["meta-llama/llama-2-13b-hf"],
            layers: 40,
            hidden: 5120,
            heads: 40,
            kv_heads: 40,
            ffn: 13824,
            ..L2
        },
        LlamaShape {
            name: "llama-2-70b",
            aliases: &["meta-llama/llama-2-70b-hf"],
            layers: 80,
            hidden: 8192,
            heads: 64,
            kv_heads: 8,
            ffn: 28672,
            ..L2
        },
        LlamaShape { name: "llama-3.1-8b", aliases: &["meta-llama/llama-3.1-8b"], ..L31 },
        LlamaShape {
            name: "llama-3.1-70b",
            aliases: &["meta-llama/llama-3.1-70b"],
            layers: 80,
            hidden: 8192,
            heads: 64,
            ffn: 28672,
            ..L31
        },
        LlamaShape {
            name: "mistral-7b",
            aliases: &["mistralai/mistral-7b-v0.3"],
            kv_heads: 8,
            ffn: 14336,
            vocab: 32768,
            max_positions: 32768,
            theta: 1_000_000.0,
            ..L2
        },
        LlamaShape { name: "qwen2.5-7b", aliases: &["qwen/qwen2.5-7b"], ..Q25 },
        LlamaShape {
            name: "qwen2.5-72b",
            aliases: &["qwen/qwen2.5-72b"],
            layers: 80,
            hidden: 8192,
            heads: 64,
            kv_heads: 8,
            ffn: 29568,
            rms_eps: 1e-5,
            ..Q25
        },
    ]
};

impl LlamaShape {
    fn spec(&self) -> ModelSpec {
        ModelSpec {
            name: self.name.to_string(),
            family: Family::Llama,
            num_layers: self.layers,
            hidden_size: self.hidden,
            num_heads: self.heads,
            num_kv_heads: self.kv_heads,
            ffn_size: self.ffn,
            vocab_size: self.vocab,
            max_positions: self.max_positions,
            norm: NormKind::RmsNorm { eps: self.rms_eps },
            mlp: MlpKind::SwiGlu,
            positions: PositionKind::Rope {
                theta: self.theta,
                scaling: self.llama3.then_some(RopeScaling {
                    factor: 8.0,
                    low_freq_factor: 1.0,
                    high_freq_factor: 4.0,
                    original_max_positions: 8192,
                }),
            },
            pre_norm: true,
            bias: false,
            qkv_bias: self.qkv_bias,
            tie_embeddings: self.tie,
            embed_dim: None,
            bos_token_id: Some(self.bos),
            eos_token_id: Some(self.eos),
            more_eos_token_ids: Vec::new(),
            pad_token_id: None,
        }
    }
}

/// Names accepted by [`spec_by_name`].
pub fn known_names() -> Vec<&'static str> {
    OPT_SIZES.iter().map(|s| s.0).chain(LLAMA_SIZES.iter().map(|s| s.name)).collect()
}

/// The spec of a published model, by name (`opt-30b`, also `facebook/opt-30b`, any case).
/// OPT-350M is refused: it projects embeddings (512 → 1024) and normalizes after attention.
pub fn spec_by_name(name: &str) -> Result<ModelSpec> {
    let key = name.trim().to_ascii_lowercase();
    if let Some(l) = LLAMA_SIZES.iter().find(|s| s.name == key || s.aliases.contains(&key.as_str()))
    {
        return Ok(l.spec());
    }
    let key = key.strip_prefix("facebook/").unwrap_or(&key);
    let Some(&(n, layers, hidden, heads)) = OPT_SIZES.iter().find(|s| s.0 == key) else {
        return Err(Error::UnknownModel {
            name: name.to_string(),
            known: known_names().join(", "),
        });
    };
    let mut spec = opt_spec(n, layers, hidden, heads, 4 * hidden, 50272, 2048);
    if n == "opt-350m" {
        // Unlike every other size: 512-wide embeddings projected in and out, and LayerNorm after
        // each residual with no final LayerNorm.
        spec.embed_dim = Some(512);
        spec.pre_norm = false;
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Parameter counts of the published checkpoints (their model cards), within 1 %.
    #[test]
    fn llama_family_specs_count_their_published_parameters() {
        for (name, billions) in [
            ("llama-2-7b", 6.74),
            ("llama-2-13b", 13.0),
            ("llama-2-70b", 69.0),
            ("llama-3.1-8b", 8.03),
            ("llama-3.1-70b", 70.6),
            ("mistral-7b", 7.25),
            ("qwen2.5-7b", 7.62),
            ("qwen2.5-72b", 72.7),
        ] {
            let s = spec_by_name(name).unwrap();
            #[expect(clippy::cast_precision_loss, reason = "a count")]
            let p = (u64::from(s.num_layers) * s.layer_params() + s.embedding_params()) as f64;
            assert!((p / 1e9 / billions - 1.0).abs() < 0.01, "{name}: {:.3} B", p / 1e9);
        }
        assert_eq!(spec_by_name("meta-llama/Llama-3.1-70B").unwrap().name, "llama-3.1-70b");
    }

    #[test]
    fn every_size_has_a_spec_and_350m_its_projection_and_post_norm() {
        for name in known_names() {
            let s = spec_by_name(name).unwrap();
            s.validate().unwrap();
            assert_eq!(s.hidden_size % s.num_heads, 0);
            assert_eq!(s.pre_norm, name != "opt-350m", "{name}");
        }
        let s = spec_by_name("opt-350m").unwrap();
        assert_eq!((s.embed_dim, s.hidden_size), (Some(512), 1024));
        // 331 M parameters, as the published checkpoint has.
        assert_eq!(s.total_params(), 331_196_416);
    }

    #[test]
    fn parameter_counts_match_the_published_sizes() {
        // Published sizes in billions, with 5 % slack for the rounding in the names.
        for (name, billions) in
            [("opt-125m", 0.125), ("opt-6.7b", 6.7), ("opt-30b", 30.0), ("opt-175b", 175.0)]
        {
            let p = spec_by_name(name).unwrap().total_params() as f64 / 1e9;
            assert!((p / billions - 1.0).abs() < 0.05, "{name}: {p}");
        }
    }

    #[test]
    fn hub_style_names_resolve() {
        assert_eq!(spec_by_name("facebook/OPT-30B").unwrap().name, "opt-30b");
        assert!(matches!(spec_by_name("gpt2"), Err(Error::UnknownModel { .. })));
    }
}
