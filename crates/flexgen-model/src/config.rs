//! Reading a Hugging Face `config.json` into a [`ModelSpec`].

use std::path::Path;

use flexgen_policy::{Family, MlpKind, ModelSpec, NormKind, PositionKind, RopeScaling};
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

/// The largest value each size field of config.json may take (`flexgen_policy::bounds`).
const BOUNDS: [(&str, u32); 9] = {
    use flexgen_policy::bounds::{FFN, HEADS, HIDDEN, LAYERS, POSITIONS, VOCAB};
    [
        ("num_hidden_layers", LAYERS),
        ("hidden_size", HIDDEN),
        ("word_embed_proj_dim", HIDDEN),
        ("num_attention_heads", HEADS),
        ("num_key_value_heads", HEADS),
        ("ffn_dim", FFN),
        ("intermediate_size", FFN),
        ("vocab_size", VOCAB),
        ("max_position_embeddings", POSITIONS),
    ]
};

/// Refuses a size field above its bound, naming the file and field.
fn check_bounds(path: &Path, fields: &[(&str, u32)]) -> Result<()> {
    for &(field, v) in fields {
        if let Some(&(_, max)) = BOUNDS.iter().find(|b| b.0 == field)
            && v > max
        {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: field.into(),
                message: format!(
                    "{v} is larger than any model this build runs (at most {max}); the file is \
                     damaged or not a model's config.json"
                ),
            });
        }
    }
    Ok(())
}

/// Refuses special token ids outside the vocabulary, naming the field.
fn check_special_ids(path: &Path, spec: &ModelSpec) -> Result<()> {
    for (field, id) in [
        ("bos_token_id", spec.bos_token_id),
        ("eos_token_id", spec.eos_token_id),
        ("pad_token_id", spec.pad_token_id),
        ("eos_token_id", spec.more_eos_token_ids.iter().copied().max()),
    ] {
        if let Some(id) = id
            && id >= spec.vocab_size
        {
            return Err(Error::Config {
                path: path.to_path_buf(),
                field: field.into(),
                message: format!("{id} is outside the vocabulary (vocab_size {})", spec.vocab_size),
            });
        }
    }
    Ok(())
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
    match model_type.as_deref() {
        None | Some("opt") => {}
        Some(t @ ("llama" | "mistral" | "qwen2")) => return llama_spec(text, path, name, t),
        Some(t) => {
            return Err(Error::Unsupported {
                what: format!(
                    "{}: model_type \"{t}\" is not supported yet; this build runs OPT, Llama, \
                     Mistral and Qwen2 models",
                    path.display()
                ),
            });
        }
    }
    let c: HfOptConfig = serde_json::from_str(text).map_err(|e| err("(fields)", e.to_string()))?;
    let proj = c.word_embed_proj_dim.unwrap_or(c.hidden_size);
    check_bounds(
        path,
        &[
            ("num_hidden_layers", c.num_hidden_layers),
            ("hidden_size", c.hidden_size),
            ("word_embed_proj_dim", proj),
            ("num_attention_heads", c.num_attention_heads),
            ("ffn_dim", c.ffn_dim),
            ("vocab_size", c.vocab_size),
            ("max_position_embeddings", c.max_position_embeddings),
        ],
    )?;
    debug_assert_eq!(c.model_type, model_type);
    if c.do_layer_norm_before && c.remove_final_layer_norm {
        return Err(err(
            "_remove_final_layer_norm",
            "pre-LayerNorm layers without a final LayerNorm are not an OPT variant this build \
             runs (OPT-350M normalizes after each residual: do_layer_norm_before false)"
                .into(),
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
        ("word_embed_proj_dim", proj),
        ("num_hidden_layers", c.num_hidden_layers),
        ("ffn_dim", c.ffn_dim),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        if v == 0 {
            return Err(err(field, "must be positive".into()));
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
    // OPT-350M: narrower embeddings projected in and out, LayerNorm after each residual.
    spec.embed_dim = (proj != c.hidden_size).then_some(proj);
    spec.pre_norm = c.do_layer_norm_before;
    spec.bos_token_id = c.bos_token_id;
    spec.eos_token_id = c.eos_token_id;
    spec.pad_token_id = c.pad_token_id;
    check_special_ids(path, &spec)?;
    Ok(spec)
}

/// The fields of a Llama, Mistral or Qwen2 `config.json` that matter.
#[derive(Deserialize)]
struct HfLlamaConfig {
    vocab_size: u32,
    hidden_size: u32,
    intermediate_size: u32,
    num_hidden_layers: u32,
    num_attention_heads: u32,
    num_key_value_heads: Option<u32>,
    head_dim: Option<u32>,
    max_position_embeddings: u32,
    #[serde(default = "rms_eps")]
    rms_norm_eps: f64,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    /// transformers 5 writes `rope_theta` and the scaling here.
    rope_parameters: Option<serde_json::Value>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    #[serde(default)]
    mlp_bias: bool,
    #[serde(default = "silu")]
    hidden_act: String,
    sliding_window: Option<u32>,
    use_sliding_window: Option<bool>,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
    pad_token_id: Option<TokenIds>,
}

/// A special token id, or a list of them (Llama 3 lists several EOS ids).
#[derive(Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    /// The first id (the one a single-id field stands for).
    fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }

    /// The ids after the first.
    fn rest(&self) -> Vec<u32> {
        match self {
            TokenIds::One(_) => Vec::new(),
            TokenIds::Many(ids) => ids.iter().skip(1).copied().collect(),
        }
    }
}

fn rms_eps() -> f64 {
    1e-6
}

fn silu() -> String {
    "silu".into()
}

/// A Llama-family spec (Llama 2/3, Mistral, Qwen2): rotary positions, RMSNorm, SwiGLU,
/// grouped-query attention; Qwen2's q/k/v biases.
fn llama_spec(text: &str, path: &Path, name: &str, model_type: &str) -> Result<ModelSpec> {
    let err = |field: &str, message: String| Error::Config {
        path: path.to_path_buf(),
        field: field.into(),
        message,
    };
    let c: HfLlamaConfig =
        serde_json::from_str(text).map_err(|e| err("(fields)", e.to_string()))?;
    check_bounds(
        path,
        &[
            ("num_hidden_layers", c.num_hidden_layers),
            ("hidden_size", c.hidden_size),
            ("num_attention_heads", c.num_attention_heads),
            ("num_key_value_heads", c.num_key_value_heads.unwrap_or(0)),
            ("intermediate_size", c.intermediate_size),
            ("vocab_size", c.vocab_size),
            ("max_position_embeddings", c.max_position_embeddings),
        ],
    )?;
    for (field, v) in [
        ("vocab_size", c.vocab_size),
        ("hidden_size", c.hidden_size),
        ("intermediate_size", c.intermediate_size),
        ("num_hidden_layers", c.num_hidden_layers),
        ("max_position_embeddings", c.max_position_embeddings),
    ] {
        if v == 0 {
            return Err(err(field, "must be positive".into()));
        }
    }
    let heads = c.num_attention_heads;
    if heads == 0 || !c.hidden_size.is_multiple_of(heads) {
        return Err(err(
            "num_attention_heads",
            format!("{heads} does not divide hidden_size {}", c.hidden_size),
        ));
    }
    let kv_heads = c.num_key_value_heads.unwrap_or(heads);
    if kv_heads == 0 || !heads.is_multiple_of(kv_heads) {
        return Err(err(
            "num_key_value_heads",
            format!("{kv_heads} does not divide num_attention_heads {heads}"),
        ));
    }
    if let Some(hd) = c.head_dim
        && hd != c.hidden_size / heads
    {
        return Err(err(
            "head_dim",
            format!(
                "{hd} differs from hidden_size / num_attention_heads = {}: not supported yet",
                c.hidden_size / heads
            ),
        ));
    }
    if c.hidden_act != "silu" {
        return Err(err(
            "hidden_act",
            format!("\"{}\" is not supported; use \"silu\"", c.hidden_act),
        ));
    }
    if c.mlp_bias {
        return Err(err("mlp_bias", "MLP biases are not supported".into()));
    }
    // The rotary settings: `rope_parameters` (transformers 5) or `rope_theta` + `rope_scaling`.
    let params = c.rope_parameters.as_ref();
    let theta = params
        .and_then(|p| p.get("rope_theta"))
        .and_then(serde_json::Value::as_f64)
        .or(c.rope_theta)
        .unwrap_or(10_000.0);
    let (scaling_field, scaling) = match (&c.rope_parameters, &c.rope_scaling) {
        (Some(p), _) => ("rope_parameters", Some(p)),
        (None, Some(s)) if !s.is_null() => ("rope_scaling", Some(s)),
        _ => ("rope_scaling", None),
    };
    let scaling = match scaling {
        None => None,
        Some(s) => {
            let kind = s
                .get("rope_type")
                .or_else(|| s.get("type"))
                .and_then(serde_json::Value::as_str)
                .unwrap_or("default");
            match kind {
                "default" => None,
                "llama3" => {
                    let num = |k: &str| {
                        s.get(k).and_then(serde_json::Value::as_f64).ok_or_else(|| {
                            err(scaling_field, format!("rope_type \"llama3\" needs `{k}`"))
                        })
                    };
                    let original = num("original_max_position_embeddings")?;
                    Some(RopeScaling {
                        factor: num("factor")?,
                        low_freq_factor: num("low_freq_factor")?,
                        high_freq_factor: num("high_freq_factor")?,
                        #[expect(
                            clippy::cast_possible_truncation,
                            clippy::cast_sign_loss,
                            reason = "a length"
                        )]
                        original_max_positions: original as u32,
                    })
                }
                other => {
                    return Err(err(
                        scaling_field,
                        format!(
                            "rope_type \"{other}\" is not supported yet (\"default\" and \"llama3\" are)"
                        ),
                    ));
                }
            }
        }
    };
    // A sliding window shorter than the positions would change attention for longer sequences:
    // sequences are held within it instead.
    let window = match (model_type, c.use_sliding_window) {
        ("qwen2", Some(false) | None) => None,
        _ => c.sliding_window,
    };
    let max_positions =
        window.map_or(c.max_position_embeddings, |w| w.min(c.max_position_embeddings));
    let spec = ModelSpec {
        name: name.to_string(),
        family: Family::Llama,
        num_layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        num_heads: heads,
        num_kv_heads: kv_heads,
        ffn_size: c.intermediate_size,
        vocab_size: c.vocab_size,
        max_positions,
        norm: NormKind::RmsNorm { eps: c.rms_norm_eps },
        mlp: MlpKind::SwiGlu,
        positions: PositionKind::Rope { theta, scaling },
        pre_norm: true,
        bias: false,
        qkv_bias: model_type == "qwen2" || c.attention_bias,
        tie_embeddings: c.tie_word_embeddings,
        embed_dim: None,
        bos_token_id: c.bos_token_id.as_ref().and_then(TokenIds::first),
        eos_token_id: c.eos_token_id.as_ref().and_then(TokenIds::first),
        more_eos_token_ids: c.eos_token_id.as_ref().map(TokenIds::rest).unwrap_or_default(),
        pad_token_id: c.pad_token_id.as_ref().and_then(TokenIds::first),
    };
    check_special_ids(path, &spec)?;
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
    fn reads_the_350m_variant() {
        let text = TINY.replace("\"do_layer_norm_before\":true", "\"do_layer_norm_before\":false");
        let s = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap();
        assert!(!s.pre_norm && s.embed_dim.is_none());
        let text = TINY.replace("\"word_embed_proj_dim\":8", "\"word_embed_proj_dim\":4");
        let s = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap();
        assert_eq!(s.embed_dim, Some(4));
        let text = TINY.replace("\"word_embed_proj_dim\":8", "\"word_embed_proj_dim\":0");
        let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
        assert!(matches!(&e, Error::Config { field, .. } if field == "word_embed_proj_dim"), "{e}");
        let text =
            TINY.replace("\"do_layer_norm_before\":true", "\"_remove_final_layer_norm\":true");
        let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
        assert!(
            matches!(&e, Error::Config { field, .. } if field == "_remove_final_layer_norm"),
            "{e}"
        );
    }

    #[test]
    fn refuses_other_architectures_by_name() {
        let text = TINY.replace("\"opt\"", "\"gpt2\"");
        let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
        assert!(e.to_string().contains("model_type \"gpt2\""), "{e}");
    }

    const LLAMA: &str = r#"{"model_type":"llama","vocab_size":100,"hidden_size":16,
        "intermediate_size":40,"num_hidden_layers":2,"num_attention_heads":4,
        "num_key_value_heads":2,"max_position_embeddings":64,"rms_norm_eps":1e-5,
        "rope_theta":500000.0,"rope_scaling":{"rope_type":"llama3","factor":8.0,
        "low_freq_factor":1.0,"high_freq_factor":4.0,"original_max_position_embeddings":32},
        "bos_token_id":1,"eos_token_id":[2,3],"tie_word_embeddings":false}"#;

    #[test]
    fn parses_llama_configs_in_both_spellings() {
        let s = spec_from_config_json(LLAMA, Path::new("c.json"), "t").unwrap();
        assert_eq!((s.family, s.num_heads, s.num_kv_heads, s.ffn_size), (Family::Llama, 4, 2, 40));
        assert_eq!((s.mlp, s.norm), (MlpKind::SwiGlu, NormKind::RmsNorm { eps: 1e-5 }));
        assert_eq!(s.eos_token_id, Some(2), "the first of a list");
        assert_eq!(s.more_eos_token_ids, [3], "and the others");
        assert!(s.is_eos(2) && s.is_eos(3) && !s.is_eos(1));
        let PositionKind::Rope { theta, scaling: Some(sc) } = s.positions else { panic!() };
        assert_eq!((theta, sc.factor, sc.original_max_positions), (500_000.0, 8.0, 32));
        // transformers 5: rope_parameters holds theta and the scaling.
        let v5 = LLAMA.replace(
            "\"rope_theta\":500000.0,\"rope_scaling\":{",
            "\"rope_parameters\":{\"rope_theta\":500000.0,",
        );
        assert_eq!(spec_from_config_json(&v5, Path::new("c.json"), "t").unwrap(), s);
        // Other rope types are named.
        let yarn = LLAMA.replace("\"llama3\"", "\"yarn\"");
        let e = spec_from_config_json(&yarn, Path::new("c.json"), "t").unwrap_err();
        assert!(
            matches!(&e, Error::Config { field, message, .. } if field == "rope_scaling" && message.contains("yarn")),
            "{e}"
        );
        let bad = LLAMA.replace("\"num_key_value_heads\":2", "\"num_key_value_heads\":3");
        let e = spec_from_config_json(&bad, Path::new("c.json"), "t").unwrap_err();
        assert!(matches!(&e, Error::Config { field, .. } if field == "num_key_value_heads"), "{e}");
    }

    #[test]
    fn qwen2_has_qkv_biases_and_mistral_is_held_within_its_window() {
        let q = LLAMA.replace("\"llama\"", "\"qwen2\"").replace(
            "\"max_position_embeddings\":64",
            "\"max_position_embeddings\":64,\"sliding_window\":16",
        );
        let s = spec_from_config_json(&q, Path::new("c.json"), "t").unwrap();
        assert!(s.qkv_bias && !s.bias);
        assert_eq!(s.max_positions, 64, "Qwen2 uses no window unless use_sliding_window");
        let m = q.replace("\"qwen2\"", "\"mistral\"");
        let s = spec_from_config_json(&m, Path::new("c.json"), "t").unwrap();
        assert!(!s.qkv_bias);
        assert_eq!(s.max_positions, 16);
    }

    #[test]
    fn sizes_beyond_any_model_are_refused_before_anything_is_allocated() {
        let text = TINY.replace("\"num_hidden_layers\":2", "\"num_hidden_layers\":4000000000");
        let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
        assert!(
            matches!(&e, Error::Config { field, message, .. }
            if field == "num_hidden_layers" && message.contains("at most 1024")),
            "{e}"
        );
        let text = LLAMA.replace("\"vocab_size\":100", "\"vocab_size\":4000000000");
        let e = spec_from_config_json(&text, Path::new("c.json"), "t").unwrap_err();
        assert!(matches!(&e, Error::Config { field, .. } if field == "vocab_size"), "{e}");
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
