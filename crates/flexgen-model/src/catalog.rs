//! Named model specs: every published OPT size, as in the original's `get_opt_config`.

use flexgen_policy::{Family, MlpKind, ModelSpec, NormKind, PositionKind};

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
        bos_token_id: Some(2),
        eos_token_id: Some(2),
        pad_token_id: Some(1),
    }
}

/// Names accepted by [`spec_by_name`].
pub fn known_names() -> Vec<&'static str> {
    OPT_SIZES.iter().map(|s| s.0).collect()
}

/// The spec of a published model, by name (`opt-30b`, also `facebook/opt-30b`, any case).
/// OPT-350M is refused: it projects embeddings (512 → 1024) and normalizes after attention.
pub fn spec_by_name(name: &str) -> Result<ModelSpec> {
    let key = name.trim().to_ascii_lowercase();
    let key = key.strip_prefix("facebook/").unwrap_or(&key);
    let Some(&(n, layers, hidden, heads)) = OPT_SIZES.iter().find(|s| s.0 == key) else {
        return Err(Error::UnknownModel {
            name: name.to_string(),
            known: known_names().join(", "),
        });
    };
    if n == "opt-350m" {
        return Err(opt_350m_refusal());
    }
    Ok(opt_spec(n, layers, hidden, heads, 4 * hidden, 50272, 2048))
}

pub(crate) fn opt_350m_refusal() -> Error {
    Error::Unsupported {
        what: "OPT-350M is not supported: unlike every other OPT size it projects embeddings \
               (word_embed_proj_dim 512 → hidden 1024) and applies LayerNorm after attention \
               (do_layer_norm_before = false); FlexGen refuses it too. Use opt-125m or opt-1.3b."
            .into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_size_but_350m_has_a_spec() {
        for name in known_names() {
            let r = spec_by_name(name);
            if name == "opt-350m" {
                assert!(matches!(r, Err(Error::Unsupported { .. })));
            } else {
                let s = r.unwrap();
                assert_eq!(s.hidden_size % s.num_heads, 0);
            }
        }
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
