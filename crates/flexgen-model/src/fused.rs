//! The family-specific math of a decoder layer on the GPU, as fused kernels over one layer's
//! arena ([`LayerLayout`]): the CUDA counterpart of `layers.rs`, matched on the spec's norm, MLP
//! and position kinds the same way.
//!
//! The CUDA stage (flexgen-runtime) owns a visit: where the cache rows live, attention over
//! them, buffers, streams and copies. It calls [`attention_in`] for what comes before attention
//! (norm, the q/k/v projection, and how the q/k/v split finishes it), [`attention_out_and_mlp`]
//! for what comes after (output projection and residual, norm, MLP and residual), and
//! [`embed`] and [`norm`] (the final norm) around the layers. A new family adds its arms here and its
//! kernels in flexgen-tensor; the runtime does not change.

use flexgen_policy::{MlpKind, ModelSpec, NormKind, PositionKind};
use flexgen_tensor::cuda::Gpu;
use flexgen_tensor::cuda::exec::{Gemm, at};

use crate::layout::LayerLayout;
use crate::{Error, Result};

/// The device buffers of one visit (one layer, one micro-batch of `rows` = sequences × new
/// positions), as addresses: `x` the hidden state `[rows, h]` (updated in place), `hn` the
/// normed input `[rows, h]`, `qkv` the projection `[rows, h + 2·kv]`, `att` the attention output
/// with heads merged `[rows, h]`, `ffn` the MLP's inner activations `[rows, ffn]`.
#[derive(Debug, Clone, Copy)]
pub struct Visit {
    pub rows: usize,
    pub x: u64,
    pub hn: u64,
    pub qkv: u64,
    pub att: u64,
    pub ffn: u64,
}

/// How the q/k/v split finishes the projection as it moves q to its buffer and k, v to the
/// cache: the bias to add (learned positions need no rotation).
#[derive(Debug, Clone, Copy)]
pub struct QkvEpilogue {
    pub bias: u64,
}

fn unsupported(spec: &ModelSpec, what: &str) -> Error {
    Error::Unsupported {
        what: format!("{}: {what} on the GPU is not implemented yet (issue 17)", spec.name),
    }
}

/// The norm of `spec` over `rows` rows of `h` values: `x` → `y`, with the weight at `w` and, for
/// `LayerNorm`, the bias at `b`.
///
/// # Safety
/// As [`Gpu::layer_norm_raw`]: every address names device memory holding the elements the
/// shapes imply, alive until the compute stream has run the kernel.
pub unsafe fn norm(
    g: &Gpu,
    spec: &ModelSpec,
    (w, b): (u64, u64),
    x: u64,
    y: u64,
    rows: usize,
    h: usize,
) -> Result<()> {
    match spec.norm {
        NormKind::LayerNorm { eps } => {
            #[expect(clippy::cast_possible_truncation, reason = "an epsilon")]
            let eps = eps as f32;
            // SAFETY: the caller's contract.
            unsafe { g.layer_norm_raw(x, w, b, y, rows, h, eps) }?;
            Ok(())
        }
        NormKind::RmsNorm { .. } => Err(unsupported(spec, "RMSNorm")),
    }
}

/// Token embedding of `n` tokens (`ids`, and `pos` indices into the position table where the
/// family has a learned one) into `out [n, h]`.
///
/// # Safety
/// As [`Gpu::embed_raw`]: the tables hold every row an id or position names; every address names
/// device memory alive until the compute stream has run the kernel.
#[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
pub unsafe fn embed(
    g: &Gpu,
    spec: &ModelSpec,
    (ids, pos): (u64, u64),
    tokens: u64,
    positions: Option<u64>,
    out: u64,
    n: usize,
    h: usize,
) -> Result<()> {
    let table = match spec.positions {
        PositionKind::Learned { .. } => Some(positions.ok_or_else(|| Error::Unsupported {
            what: format!("{}: learned positions without a position table", spec.name),
        })?),
        // Rotary positions enter in the q/k/v split, not here.
        PositionKind::Rope { .. } => None,
    };
    // SAFETY: the caller's contract.
    unsafe { g.embed_raw(ids, pos, tokens, table, out, n, h) }?;
    Ok(())
}

/// Before attention: the attention norm of `v.x` into `v.hn` and the fused q/k/v projection into
/// `v.qkv`, with the layer's arena at `w`. Returns how the split must finish q, k and v.
///
/// # Safety
/// `w` is a whole layer arena laid out by `l` in device memory; the visit's buffers hold
/// `v.rows` rows of their widths; all stay alive until the compute stream has run the kernels.
pub unsafe fn attention_in(
    g: &Gpu,
    spec: &ModelSpec,
    l: &LayerLayout,
    w: u64,
    v: &Visit,
) -> Result<QkvEpilogue> {
    let h = l.hidden;
    let wide = l.qkv_b.len();
    let epilogue = match spec.positions {
        PositionKind::Learned { .. } => QkvEpilogue { bias: at(w, l.qkv_b.start) },
        PositionKind::Rope { .. } => return Err(unsupported(spec, "rotary positions")),
    };
    let norm_w = (at(w, l.attn_norm_w.start), at(w, l.attn_norm_b.start));
    // SAFETY: the caller's contract.
    unsafe { norm(g, spec, norm_w, v.x, v.hn, v.rows, h) }?;
    // SAFETY: the caller's contract.
    unsafe { g.gemm(&Gemm::linear(v.rows, wide, h, v.hn, at(w, l.qkv_w.start), v.qkv, false)) }?;
    Ok(epilogue)
}

/// After attention (`v.att`): the output projection and its residual into `v.x`, then the MLP
/// norm, the MLP and its residual, in place on `v.x`.
///
/// # Safety
/// As [`attention_in`].
pub unsafe fn attention_out_and_mlp(
    g: &Gpu,
    spec: &ModelSpec,
    l: &LayerLayout,
    w: u64,
    v: &Visit,
) -> Result<()> {
    let h = l.hidden;
    let f = spec.ffn_size as usize;
    let rows = v.rows;
    let wq = |r: &std::ops::Range<usize>| at(w, r.start);
    // SAFETY (every call below): the caller's contract.
    unsafe {
        g.gemm(&Gemm::linear(rows, h, h, v.att, wq(&l.o_w), v.x, true))?;
        g.bias_act_raw(v.x, wq(&l.o_b), rows, h, false)?;
        norm(g, spec, (wq(&l.mlp_norm_w), wq(&l.mlp_norm_b)), v.x, v.hn, rows, h)?;
    }
    match spec.mlp {
        MlpKind::Relu => {
            // SAFETY (every call below): the caller's contract.
            unsafe {
                g.gemm(&Gemm::linear(rows, f, h, v.hn, wq(&l.fc1_w), v.ffn, false))?;
                g.bias_act_raw(v.ffn, wq(&l.fc1_b), rows, f, true)?;
                g.gemm(&Gemm::linear(rows, h, f, v.ffn, wq(&l.fc2_w), v.x, true))?;
                g.bias_act_raw(v.x, wq(&l.fc2_b), rows, h, false)?;
            }
            Ok(())
        }
        MlpKind::SwiGlu => Err(unsupported(spec, "the SwiGLU MLP")),
    }
}
