//! Reading a Hugging Face `config.json` into a [`ModelSpec`].

use std::path::Path;

use flexgen_policy::ModelSpec;
use serde::Deserialize;

use crate::{Error, Result};

/// The fields of an OPT `config.json` that matter; everything else is ignored.
#[derive(Deserialize)]
struct HfOptConfig {
    model_type: Option<String>,
    vocab_size: u32,
    hidden_size: u32,
    num_hidden_layers: u32,
    num_attention_heads: u32,
    ffn_dim: u32,
    max_position_embeddings: u32,
    word_embed_proj_dim: Option<u32>,
    #[serde(default = "yes")]
    do_layer_norm_before: bool,
    #[serde(default = "relu")]
    activation_function: String,
    #[serde(default = "yes")]
    enable_bias: bool,
    #[serde(default = "yes")]
    layer_norm_elementwise_affine: bool,
    #[serde(default = "yes")]
    tie_word_embeddings: bool,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    pad_token_id: Option<u32>,
    #[serde(default, rename = "_remove_final_layer_norm")]
    remove_final_layer_norm: bool,
}

fn yes() -> bool {
    true
}

fn relu() -> String {
    "relu".into()
}

/// Parses `config.json` text (from `path`, for messages) into a spec named `name`.
pub fn spec_from_config_json(text: &str, path: &Path, name: &str) -> Result<ModelSpec> {
    let err = |field: &str, message: String| Error::Config {
        path: path.to_path_buf(),
        field: field.into(),
        message,
    };
    let model_type = serde_json::from_str::<serde_json::Value>(text)
        .map_err(|e| err("(file)", format!("not valid JSON: {e}")))?
        .get("model_type")
        .and_then(|v| v.as_str().map(str::to_string));
    if let Some(t) = &model_type
        && t != "opt"
    {
        return Err(Error::Unsupported {
            what: format!(
                "{}: model_type \"{t}\" is not supported yet; this build runs OPT models (model_type \"opt\")",
                path.display()
            ),
        });
    }
    let c: HfOptConfig = serde_json::from_str(text).map_err(|e| err("(fields)", e.to_string()))?;
    debug_assert_eq!(c.model_type, model_type);
    let proj = c.word_embed_proj_dim.unwrap_or(c.hidden_size);
    if proj != c.hidden_size {
        return Err(err(
            "word_embed_proj_dim",
            format!(
                "{proj} differs from hidden_size {}: the embedding projection of OPT-350M is not supported",
                c.hidden_size
            ),
        ));
    }
    if !c.do_layer_norm_before || c.remove_final_layer_norm {
        return Err(err(
            "do_layer_norm_before",
            "post-LayerNorm layers (OPT-350M) are not supported; every other OPT size works".into(),
        ));
    }
    if c.activation_function != "relu" {
        return Err(err(
            "activation_function",
            format!("\"{}\" is not supported; OPT uses \"relu\"", c.activation_function),
        ));
    }
    if !c.enable_bias || !c.layer_norm_elementwise_affine {
        return Err(err(
            "enable_bias",
            "OPT variants without biases or LayerNorm weights are not supported".into(),
        ));
    }
    if c.num_attention_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attention_heads) {
        return Err(err(
            "num_attention_heads",
            format!("{} does not divide hidden_size {}", c.num_attention_heads, c.hidden_size),
        ));
    }
    for (field, v) in [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("ffn_dim", c.ffn_dim),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        if v == 0 {
            return Err(err(field, "must be positive".into()));
        }
    }
    for (field, id) in [
        ("bos_token_id", c.bos_token_id),
        ("eos_token_id", c.eos_token_id),
        ("pad_token_id", c.pad_token_id),
    ] {
        if let Some(id) = id
            && id >= c.vocab_size
        {
            return Err(err(
                field,
                format!("{id} is outside the vocabulary (vocab_size {})", c.vocab_size),
            ));
        }
    }
    let mut spec = crate::catalog::opt_spec(
        name,
        c.num_hidden_layers,
        c.hidden_size,
        c.num_attention_heads,
        c.ffn_dim,
        c.vocab_size,
        c.max_position_embeddings,
    );
    spec.tie_embeddings = c.tie_word_embeddings;
    spec.bos_token_id = c.bos_token_id;
    spec.eos_token_id = c.eos_token_id;
    spec.pad_token_id = c.pad_token_id;
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    const TINY: &str = r#"{"model_type":"opt","vocab_size":100,"hidden_size":8,"num_hidden_layers":2,
        "num_attention_heads":2,"ffn_dim":32,"max_position_embeddings":16,"word_embed_proj_dim":8,
        "do_layer_norm_before":true,"eos_token_id":2,"bos_token_id":2,"pad_token_id":1}"#;

    #[test]
    fn parses_an_opt_config() {
        let s = spec_from_config_json(TINY, Path::new("c.json"), "t").unwrap();
        assert_eq!((s.num_layers, s.hidden_size, s.num_heads, s.ffn_size), (2, 8, 2, 32));
        assert_eq!(s.eos_token_id, Some(2));
    }

    #[test]
    fn special_token_ids_outside_the_vocabulary_are_named() {
        for field in ["eos_token_id", "bos_token_id", "pad_token_id"] {
            let text =
                TINY.replace(&format!("\"{field}\":"), &format!("\"{field}\":100,\"x_{field}\":"));
            let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
            assert!(
                matches!(&e, Error::Config { field: f, message, .. }
                if f == field && message.contains("outside the vocabulary")),
                "{e}"
            );
        }
    }

    #[test]
    fn refuses_the_350m_variant() {
        let text = TINY.replace("\"do_layer_norm_before\":true", "\"do_layer_norm_before\":false");
        let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
        assert!(
            matches!(&e, Error::Config { field, message, .. }
            if field == "do_layer_norm_before" && message.contains("OPT-350M")),
            "{e}"
        );
        let text = TINY.replace("\"word_embed_proj_dim\":8", "\"word_embed_proj_dim\":4");
        let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
        assert!(matches!(&e, Error::Config { field, .. } if field == "word_embed_proj_dim"), "{e}");
    }

    #[test]
    fn refuses_other_architectures_by_name() {
        let text = TINY.replace("\"opt\"", "\"llama\"");
        let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
        assert!(e.to_string().contains("model_type \"llama\""), "{e}");
    }

    #[test]
    fn names_a_missing_field() {
        let text = TINY.replace("\"ffn_dim\":32,", "");
        let e = spec_from_config_json(&text, Path::new("dir/config.json"), "t").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("dir/config.json") && msg.contains("ffn_dim"), "{msg}");
    }

    #[test]
    fn names_heads_that_do_not_divide() {
        let text = TINY.replace("\"num_attention_heads\":2", "\"num_attention_heads\":3");
        let Error::Config { field, .. } =
            spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err()
        else {
            panic!()
        };
        assert_eq!(field, "num_attention_heads");
    }
}
