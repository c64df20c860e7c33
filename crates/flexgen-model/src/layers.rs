//! The forward pass, one function per stage of the decoder, written once against the
//! [`Backend`] trait of `flexgen-tensor`: the same code runs on the CPU ([`flexgen_tensor::Cpu`])
//! and on the GPU ([`flexgen_tensor::cuda::Gpu`]). The runtime decides where tensors live and in
//! which order micro-batches run; these functions only compute.

use flexgen_policy::{ModelSpec, NormKind, PositionKind};
use flexgen_tensor::{Backend, Tensor};

use crate::weights::{LayerWeights, Linear, Mlp, Norm, Weights};
use crate::{Error, Result};

/// Keys and values of some positions of one layer: `[b, nh_kv, s, hd]` each.
#[derive(Debug, Clone)]
pub struct Kv<T = Tensor> {
    pub k: T,
    pub v: T,
}

impl<T> Kv<T> {
    /// `self` followed by `new` along the position axis.
    pub fn append_on<B: Backend<T = T>>(&self, be: &B, new: &Kv<T>) -> Result<Kv<T>>
    where
        Error: From<B::Error>,
    {
        Ok(Kv { k: be.cat_positions(&self.k, &new.k)?, v: be.cat_positions(&self.v, &new.v)? })
    }
}

impl Kv {
    /// `self` followed by `new` along the position axis (CPU tensors).
    pub fn append(&self, new: &Kv) -> Result<Kv> {
        self.append_on(&flexgen_tensor::Cpu, new)
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

/// The position-table indices (row-major `[b, t]`) and the attention mask (`allowed[b][q][s]`:
/// causal and padding) of the last `t` positions of sequences whose real-token masks cover every
/// position so far.
pub fn step_inputs(
    spec: &ModelSpec,
    masks: &[Vec<bool>],
    t: usize,
) -> (Vec<u32>, Vec<Vec<Vec<bool>>>) {
    let total = masks.first().map_or(0, Vec::len);
    let past = total - t;
    let pos = masks.iter().flat_map(|m| position_indices(spec, m)[past..].to_vec()).collect();
    let allowed = masks
        .iter()
        .map(|m| (0..t).map(|q| (0..total).map(|s| s <= past + q && m[s]).collect()).collect())
        .collect();
    (pos, allowed)
}

/// Token (+ position) embedding of row-major `[b, t]` `ids` at table rows `positions`.
pub fn embed<B: Backend>(
    be: &B,
    weights: &Weights<B::T>,
    ids: &[u32],
    positions: &[u32],
    shape: (usize, usize),
) -> Result<B::T>
where
    Error: From<B::Error>,
{
    let Some(project_in) = &weights.project_in else {
        return Ok(be.embed(
            ids,
            positions,
            shape,
            &weights.token_embedding,
            weights.position_embedding.as_ref(),
        )?);
    };
    // OPT-350M: narrower token embeddings projected to the hidden size, then the positions.
    let tokens = be.embed(ids, positions, shape, &weights.token_embedding, None)?;
    let x = be.linear(&tokens, project_in, None, false)?;
    match &weights.position_embedding {
        Some(table) => Ok(be.add(&x, &be.embed(positions, positions, shape, table, None)?)?),
        None => Ok(x),
    }
}

fn norm<B: Backend>(be: &B, spec: &ModelSpec, n: &Norm<B::T>, x: &B::T) -> Result<B::T>
where
    Error: From<B::Error>,
{
    match (spec.norm, &n.bias) {
        (NormKind::LayerNorm { eps }, Some(b)) => Ok(be.layer_norm(x, &n.weight, b, eps)?),
        (NormKind::RmsNorm { eps }, None) => Ok(be.rms_norm(x, &n.weight, eps)?),
        _ => Err(Error::Unsupported {
            what: format!("{}: a norm whose bias does not match its kind", spec.name),
        }),
    }
}

/// What every layer of one step shares: the attention mask (`[b, 1, t, s]`, causal and padding)
/// and, for rotary positions, the cos and sin tables of the step's positions (`[b, 1, t, hd]`).
pub struct StepInputs<B: Backend> {
    pub bias: B::Bias,
    pub rotary: Option<(B::T, B::T)>,
}

impl<B: Backend> StepInputs<B> {
    /// The inputs of a step whose queries see `allowed[b][t][s]` and sit at the position-table
    /// indices `positions` (row-major `[b, t]`, from [`step_inputs`]).
    pub fn new(
        be: &B,
        spec: &ModelSpec,
        allowed: &[Vec<Vec<bool>>],
        positions: &[u32],
    ) -> Result<Self>
    where
        Error: From<B::Error>,
    {
        let bias = be.attention_bias(allowed)?;
        let inv_freq = spec.positions.inv_freq(spec.head_dim());
        let rotary = if inv_freq.is_empty() {
            None
        } else {
            let (b, t) = (allowed.len(), allowed.first().map_or(0, Vec::len));
            let hd = spec.head_dim() as usize;
            let (mut cos, mut sin) =
                (Vec::with_capacity(b * t * hd), Vec::with_capacity(b * t * hd));
            for &p in positions {
                // The frequencies over both halves of the head, as `rotate_half` pairs them.
                for _ in 0..2 {
                    for &f in &inv_freq {
                        // As Hugging Face: the angle in f32 (position × frequency), then cos/sin.
                        #[expect(clippy::cast_possible_truncation, reason = "f32 as the reference")]
                        let angle = (p as f32) * (f as f32);
                        cos.push(angle.cos());
                        sin.push(angle.sin());
                    }
                }
            }
            Some((be.tensor(cos, &[b, 1, t, hd])?, be.tensor(sin, &[b, 1, t, hd])?))
        };
        Ok(Self { bias, rotary })
    }
}

fn linear<B: Backend>(be: &B, l: &Linear<B::T>, x: &B::T, relu: bool) -> Result<B::T>
where
    Error: From<B::Error>,
{
    Ok(be.linear(x, &l.weight, l.bias.as_ref(), relu)?)
}

/// The attention half of a layer: `x + out_proj(attention(norm(x)))`, or for post-norm layers
/// (OPT-350M) `norm(x + out_proj(attention(x)))`. `past` holds the keys and
/// values of earlier positions; `step` masks what each query may see (`s` = past + t) and holds
/// the rotary tables where the family rotates q and k. Returns the new hidden state and the
/// keys/values of the `t` new positions (k rotated, as caches hold them).
pub fn attention_block<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    w: &LayerWeights<B::T>,
    x: &B::T,
    past: Option<&Kv<B::T>>,
    step: &StepInputs<B>,
) -> Result<(B::T, Kv<B::T>)>
where
    Error: From<B::Error>,
{
    let nh = spec.num_heads as usize;
    let nkv = spec.num_kv_heads as usize;
    let normed;
    let h = if spec.pre_norm {
        normed = norm(be, spec, &w.attn_norm, x)?;
        &normed
    } else {
        x
    };
    let mut q = be.split_heads(&linear(be, &w.q, h, false)?, nh)?;
    let mut k = be.split_heads(&linear(be, &w.k, h, false)?, nkv)?;
    if let Some((cos, sin)) = &step.rotary {
        q = be.rotary(&q, cos, sin)?;
        k = be.rotary(&k, cos, sin)?;
    }
    let new = Kv { k, v: be.split_heads(&linear(be, &w.v, h, false)?, nkv)? };
    let joined;
    let all = match past {
        Some(p) => {
            joined = p.append_on(be, &new)?;
            &joined
        }
        None => &new,
    };
    let scale = 1.0 / f64::from(spec.head_dim()).sqrt();
    let a = if nkv == nh {
        be.attention(&q, &all.k, &all.v, &step.bias, scale)?
    } else {
        let rep = nh / nkv;
        let (k, v) = (be.repeat_heads(&all.k, rep)?, be.repeat_heads(&all.v, rep)?);
        be.attention(&q, &k, &v, &step.bias, scale)?
    };
    let out = linear(be, &w.o, &be.merge_heads(&a)?, false)?;
    let y = be.add(x, &out)?;
    if spec.pre_norm { Ok((y, new)) } else { Ok((norm(be, spec, &w.attn_norm, &y)?, new)) }
}

/// The MLP half of a layer: `x + mlp(norm(x))`, or `norm(x + mlp(x))` for post-norm layers.
pub fn mlp_block<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    w: &LayerWeights<B::T>,
    x: &B::T,
) -> Result<B::T>
where
    Error: From<B::Error>,
{
    let normed;
    let h = if spec.pre_norm {
        normed = norm(be, spec, &w.mlp_norm, x)?;
        &normed
    } else {
        x
    };
    let y = match &w.mlp {
        Mlp::Relu { fc1, fc2 } => linear(be, fc2, &linear(be, fc1, h, true)?, false)?,
        Mlp::SwiGlu { gate, up, down } => {
            let g = be.silu_mul(&linear(be, gate, h, false)?, &linear(be, up, h, false)?)?;
            linear(be, down, &g, false)?
        }
    };
    let y = be.add(x, &y)?;
    if spec.pre_norm { Ok(y) } else { norm(be, spec, &w.mlp_norm, &y) }
}

/// A whole decoder layer: attention block then MLP block.
pub fn decoder_layer<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    w: &LayerWeights<B::T>,
    x: &B::T,
    past: Option<&Kv<B::T>>,
    step: &StepInputs<B>,
) -> Result<(B::T, Kv<B::T>)>
where
    Error: From<B::Error>,
{
    let (x, kv) = attention_block(be, spec, w, x, past, step)?;
    Ok((mlp_block(be, spec, w, &x)?, kv))
}

/// Final norm and LM head: `[b, t, h]` → logits `[b, t, vocab]`.
pub fn logits<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    weights: &Weights<B::T>,
    x: &B::T,
) -> Result<B::T>
where
    Error: From<B::Error>,
{
    let normed;
    let mut h = match &weights.final_norm {
        Some(n) => {
            normed = norm(be, spec, n, x)?;
            &normed
        }
        None => x,
    };
    let projected;
    if let Some(p) = &weights.project_out {
        projected = be.linear(h, p, None, false)?;
        h = &projected;
    }
    let head = weights.lm_head.as_ref().unwrap_or(&weights.token_embedding);
    Ok(be.linear(h, head, None, false)?)
}
