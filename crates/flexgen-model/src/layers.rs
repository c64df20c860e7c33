//! The forward pass, one function per stage of the decoder, written once against
//! `flexgen-tensor`. The runtime decides where tensors live and in which order micro-batches run;
//! these functions only compute.

use flexgen_policy::{ModelSpec, NormKind, PositionKind};
use flexgen_tensor as ft;
use flexgen_tensor::Tensor;

use crate::Result;
use crate::weights::{LayerWeights, Linear, Mlp, Norm, Weights};

/// Keys and values of some positions of one layer: `[b, nh_kv, s, hd]` each.
#[derive(Debug, Clone)]
pub struct Kv {
    pub k: Tensor,
    pub v: Tensor,
}

impl Kv {
    /// `self` followed by `new` along the position axis.
    pub fn append(&self, new: &Kv) -> Result<Kv> {
        Ok(Kv { k: Tensor::cat(&[&self.k, &new.k], 2)?, v: Tensor::cat(&[&self.v, &new.v], 2)? })
    }

    /// Number of positions held.
    pub fn len(&self) -> usize {
        self.k.dim(2).unwrap_or(0)
    }

    /// Whether no position is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Position-table indices of one sequence, from its attention mask over all positions so far
/// (`true` = real token). For OPT: the n-th real token (from 0) gets `n + offset`; padding gets
/// `offset − 1`, exactly as Hugging Face computes `cumsum(mask)·mask − 1 + offset`.
pub fn position_indices(spec: &ModelSpec, mask: &[bool]) -> Vec<u32> {
    let offset = match spec.positions {
        PositionKind::Learned { offset } => offset,
        PositionKind::Rope { .. } => 0,
    };
    let mut seen = 0u32;
    mask.iter()
        .map(|&real| {
            if real {
                seen += 1;
                seen - 1 + offset
            } else {
                offset.saturating_sub(1)
            }
        })
        .collect()
}

/// Token (+ position) embedding of `ids` (`[b, t]` u32) at table indices `positions` (`[b, t]`).
pub fn embed(weights: &Weights, ids: &Tensor, positions: &Tensor) -> Result<Tensor> {
    let x = ft::embedding(ids, &weights.token_embedding)?;
    Ok(match &weights.position_embedding {
        Some(table) => (x + ft::embedding(positions, table)?)?,
        None => x,
    })
}

fn norm(spec: &ModelSpec, n: &Norm, x: &Tensor) -> Result<Tensor> {
    match (spec.norm, &n.bias) {
        (NormKind::LayerNorm { eps }, Some(b)) => Ok(ft::layer_norm(x, &n.weight, b, eps)?),
        _ => Err(crate::Error::Unsupported {
            what: format!("{}: RMSNorm is not implemented yet", spec.name),
        }),
    }
}

fn linear(l: &Linear, x: &Tensor) -> Result<Tensor> {
    Ok(ft::linear(x, &l.weight, l.bias.as_ref())?)
}

/// The attention half of a layer: `x + out_proj(attention(norm(x)))`. `past` holds the keys and
/// values of earlier positions; `bias` (`[b, 1, t, s]`, `s` = past + t) masks what each query may
/// see. Returns the new hidden state and the keys/values of the `t` new positions.
pub fn attention_block(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    past: Option<&Kv>,
    bias: &Tensor,
) -> Result<(Tensor, Kv)> {
    let nh = spec.num_heads as usize;
    let nkv = spec.num_kv_heads as usize;
    let h = norm(spec, &w.attn_norm, x)?;
    let q = ft::split_heads(&linear(&w.q, &h)?, nh)?;
    let new = Kv {
        k: ft::split_heads(&linear(&w.k, &h)?, nkv)?,
        v: ft::split_heads(&linear(&w.v, &h)?, nkv)?,
    };
    let all = match past {
        Some(p) => p.append(&new)?,
        None => new.clone(),
    };
    let scale = 1.0 / f64::from(spec.head_dim()).sqrt();
    let a = ft::attention(&q, &all.k, &all.v, bias, scale)?;
    let out = linear(&w.o, &ft::merge_heads(&a)?)?;
    Ok(((x + out)?, new))
}

/// The MLP half of a layer: `x + mlp(norm(x))`.
pub fn mlp_block(spec: &ModelSpec, w: &LayerWeights, x: &Tensor) -> Result<Tensor> {
    let h = norm(spec, &w.mlp_norm, x)?;
    let y = match &w.mlp {
        Mlp::Relu { fc1, fc2 } => linear(fc2, &ft::relu(&linear(fc1, &h)?)?)?,
    };
    Ok((x + y)?)
}

/// A whole decoder layer: attention block then MLP block.
pub fn decoder_layer(
    spec: &ModelSpec,
    w: &LayerWeights,
    x: &Tensor,
    past: Option<&Kv>,
    bias: &Tensor,
) -> Result<(Tensor, Kv)> {
    let (x, kv) = attention_block(spec, w, x, past, bias)?;
    Ok((mlp_block(spec, w, &x)?, kv))
}

/// Final norm and LM head: `[b, t, h]` → logits `[b, t, vocab]`.
pub fn logits(spec: &ModelSpec, weights: &Weights, x: &Tensor) -> Result<Tensor> {
    let h = norm(spec, &weights.final_norm, x)?;
    let head = weights.lm_head.as_ref().unwrap_or(&weights.token_embedding);
    Ok(ft::linear(&h, head, None)?)
}
