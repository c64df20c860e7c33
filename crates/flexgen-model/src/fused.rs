//! The family-specific math of a decoder layer on the GPU, as fused kernels over one layer's
//! arena ([`LayerLayout`]): the CUDA counterpart of `layers.rs`, matched on the spec's norm, MLP
//! and position kinds the same way.
//!
//! The CUDA stage (flexgen-runtime) owns a visit: where the cache rows live, attention over
//! them, buffers, streams and copies. It calls [`attention_in`] for what comes before attention
//! (norm, the q/k/v projection, and how the q/k/v split finishes it), [`attention_out_and_mlp`]
//! for what comes after (output projection and residual, norm, MLP and residual), and
//! [`embed`] and [`norm`] (the final norm) around the layers. Post-norm layers (OPT-350M) norm
//! the hidden state in place after each residual instead of the sublayer's input. A new family
//! adds its arms here and its kernels in flexgen-tensor; the runtime does not change.

use flexgen_policy::{MlpKind, ModelSpec, NormKind, PositionKind, expand_slice_outputs};
use flexgen_tensor::cuda::Gpu;
use flexgen_tensor::cuda::exec::{Gemm, Store4, Weight4, at};

use crate::layout::LayerLayout;
use crate::{Error, Result};

/// The device buffers of one visit (one layer, one micro-batch of `rows` = sequences × new
/// positions), as addresses: `x` the hidden state `[rows, h]` (updated in place), `hn` the
/// normed input `[rows, h]`, `qkv` the projection `[rows, h + 2·kv]`, `att` the attention output
/// with heads merged `[rows, h]`, `ffn` the MLP's inner activations (`[rows, ffn]`, or
/// `[rows, 2·ffn]` for SwiGLU's gate and up); `pos` the rows' positions (u32) and `inv_freq`
/// the rotary inverse frequencies (`[hd/2]` f32; 0 where the family has learned positions).
#[derive(Debug, Clone, Copy)]
pub struct Visit {
    pub rows: usize,
    pub x: u64,
    pub hn: u64,
    pub qkv: u64,
    pub att: u64,
    pub ffn: u64,
    pub pos: u64,
    pub inv_freq: u64,
}

/// A layer's weights for a visit: its fp16 arena ([`LayerLayout`]: the matrices are read there),
/// the address its vectors' layout offsets count from (the arena's own, or, for a packed layer,
/// where the stored copy puts the same fp16 vectors: [`LayerWeights::vector`]) and, where the
/// stage runs the visit's products straight from packed 4-bit codes, where those are.
#[derive(Debug, Clone, Copy)]
pub struct LayerWeights {
    pub arena: u64,
    pub vectors: u64,
    pub packed: Option<Packed4>,
}

impl LayerWeights {
    /// The address of the vector (a norm's weight, a bias) at `r` of the layout.
    pub fn vector(&self, r: &std::ops::Range<usize>) -> u64 {
        self.vectors.wrapping_add(2 * r.start as u64)
    }
}

/// A layer's four matrices (q/k/v, o, fc1, fc2: [`crate::layout::PackedLayout::mats`]) as
/// `bits`-bit codes and fp16 (min, scale) pairs, groups of `group` outputs of one input, and how
/// the products use them.
#[derive(Debug, Clone, Copy)]
pub struct Packed4 {
    pub mats: [(u64, u64); 4],
    pub group: usize,
    pub bits: u8,
    /// In the tensor-core order (`crate::layout::PackedLayout::tc`).
    pub tc: bool,
    pub how: PackedUse,
}

/// How a visit's products read a packed layer's matrices.
#[derive(Debug, Clone, Copy)]
pub enum PackedUse {
    /// Each matrix dequantized to fp16 into `buf` a slice of its outputs at a time
    /// ([`expand_slice_outputs`]; room for the largest slice), each slice just before its
    /// product, which runs on cuBLAS: no fp16 copy of the layer, nor of a whole large matrix.
    Expand { buf: u64 },
    /// Straight from the 4-bit codes: `scratch` holds the visit's rows × the widest matrix's
    /// outputs as fp32, all zeros between products (each product sums into it and its store
    /// clears it again), and `done` the zeroed counters of the store the tensor-core product
    /// folds in (`gemm4_tc_done_len` of the widest matrix's outputs; 0: no folded store).
    Fused { scratch: u64, done: u64 },
}

const QKV: usize = 0;
const OUT: usize = 1;
const FC1: usize = 2;
const FC2: usize = 3;

/// `gm` (a linear layer's product `y = x·Wᵀ`, `+ y` when it accumulates) with W matrix `m` of the
/// layer: from its packed codes where `w` has them (the fused 4-bit product into the fp32
/// scratch, then stored as fp16), else cuBLAS on the fp16 arena.
///
/// # Safety
/// As [`attention_in`].
unsafe fn product(g: &Gpu, w: &LayerWeights, m: usize, gm: &Gemm) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { product_then(g, w, m, gm, (0, false)) }
}

/// [`product`], then `y[r, c] += b[c]` (`b` the bias's device address, or 0 for none) and ReLU
/// if `relu`: in the fused product's store where the products read the codes, in the GEMM's
/// epilogue where the weight is fp16 (or expanded to it) and has a bias ([`Gpu::gemm_bias`]),
/// else a row kernel after the product.
///
/// # Safety
/// As [`attention_in`]; `b` (unless 0) holds `gm.n` values.
unsafe fn product_then(
    g: &Gpu,
    w: &LayerWeights,
    m: usize,
    gm: &Gemm,
    (b, relu): (u64, bool),
) -> Result<()> {
    let (p, scratch, done) = match w.packed {
        // SAFETY (both): the caller's contract.
        None => return unsafe { gemm_then(g, gm, (b, relu)) },
        Some(p) => match p.how {
            PackedUse::Fused { scratch, done } => (p, scratch, done),
            PackedUse::Expand { buf } => {
                // SAFETY: the caller's contract.
                return unsafe { expanded_product(g, p, m, buf, gm, (b, relu)) };
            }
        },
    };
    debug_assert!(gm.batch == 1 && gm.ldc == gm.n, "a linear layer's contiguous output");
    let (codes, params) = p.mats[m];
    let w = Weight4 { codes, params, outs: gm.n, ins: gm.k, group: p.group, tc: p.tc };
    let x = (gm.a, gm.lda);
    // SAFETY: the caller's contract; the scratch holds m·n fp32 values.
    unsafe {
        // On the tensor cores where the device and layout allow (the faster from one row on:
        // session 16's gemv4_bench), else the CUDA-core product.
        // The scratch holds zeros between products (allocated so, cleared by the store). The
        // tensor-core product stores its sums itself where the layout allows.
        let accumulate = gm.beta != 0.0;
        let store = Some(Store4 { out: gm.c, bias: b, accumulate, relu, done });
        let store = store.filter(|_| done != 0);
        let stored = if let Some(stored) = g.gemm4_tc(w, x, (scratch, true), gm.m, store)? {
            stored
        } else {
            g.gemv4_dim0(w, x, (scratch, true), gm.m)?;
            false
        };
        if !stored {
            g.store_f32((scratch, gm.c), (gm.m * gm.n, gm.n), (accumulate, true), (b, relu))?;
        }
    }
    Ok(())
}

/// [`product_then`] of packed matrix `m` of `p` through fp16 `buf`: each slice of its outputs
/// ([`expand_slice_outputs`]) dequantized there, then multiplied into the same columns of the
/// output (rows `gm.ldc` apart), with the same columns of the bias.
///
/// # Safety
/// As [`product_then`]; `buf` holds the largest slice of a matrix of the layer in fp16.
unsafe fn expanded_product(
    g: &Gpu,
    p: Packed4,
    m: usize,
    buf: u64,
    gm: &Gemm,
    (b, relu): (u64, bool),
) -> Result<()> {
    debug_assert!(gm.batch == 1 && gm.b_t, "a linear layer's product x·Wᵀ");
    let (codes, params) = p.mats[m];
    let per = expand_slice_outputs(gm.n, gm.k, p.group);
    let mut o0 = 0;
    while o0 < gm.n {
        let o1 = (o0 + per).min(gm.n);
        let slice = Gemm { b: buf, ldb: gm.k, n: o1 - o0, c: at(gm.c, o0), ..*gm };
        let bias = if b == 0 { 0 } else { at(b, o0) };
        // SAFETY: the caller's contract; the slice's outputs are columns o0..o1 of the output
        // and of the bias, and `buf` holds (o1 − o0)·k values.
        unsafe {
            if p.tc {
                g.dequant_tc((codes, params, buf), (gm.n, gm.k), o0..o1, p.group)?;
            } else {
                g.dequant_dim0(codes, params, buf, (gm.n, gm.k), o0..o1, p.group, p.bits)?;
            }
            gemm_then(g, &slice, (bias, relu))?;
        }
        o0 = o1;
    }
    Ok(())
}

/// The fp16 GEMM `gm`, then the bias `b` (0 for none) and ReLU if `relu`: in cuBLASLt's epilogue
/// where there is a bias ([`Gpu::gemm_bias`]), else a row kernel after the product.
///
/// # Safety
/// As [`attention_in`]; `b` (unless 0) holds `gm.n` values.
unsafe fn gemm_then(g: &Gpu, gm: &Gemm, (b, relu): (u64, bool)) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe {
        if b != 0 {
            g.gemm_bias(gm, b, relu)?;
        } else {
            g.gemm(gm)?;
            if relu {
                g.bias_act_raw(gm.c, 0, (gm.m, gm.n, gm.ldc), relu)?;
            }
        }
    }
    Ok(())
}

/// How the q/k/v split finishes the projection as it moves q to its buffer and k, v to the
/// cache: the bias to add, if any, and the rotation of q and k (positions, inverse
/// frequencies), if the family rotates.
#[derive(Debug, Clone, Copy)]
pub struct QkvEpilogue {
    pub bias: Option<u64>,
    pub rope: Option<(u64, u64)>,
}

fn unsupported(spec: &ModelSpec, what: &str) -> Error {
    Error::Unsupported { what: format!("{}: {what} is not implemented on the GPU", spec.name) }
}

/// The norm of `spec` over `rows` rows of `h` values: `x` → `y`, with the weight at `w` and, for
/// `LayerNorm`, the bias at `b`.
///
/// # Safety
/// As [`Gpu::norm_raw`]: every address names device memory holding the elements the shapes
/// imply, alive until the compute stream has run the kernel.
pub unsafe fn norm(
    g: &Gpu,
    spec: &ModelSpec,
    (w, b): (u64, u64),
    x: u64,
    y: u64,
    rows: usize,
    h: usize,
) -> Result<()> {
    // SAFETY: the caller's contract.
    unsafe { bias_norm(g, spec, (w, b), (x, None), y, rows, h) }
}

/// [`norm`] of `x + pre_bias` where a bias is given (`x` keeps the sum): a sublayer's output
/// bias and the next norm in one kernel.
///
/// # Safety
/// As [`norm`]; `pre_bias` names `h` values.
unsafe fn bias_norm(
    g: &Gpu,
    spec: &ModelSpec,
    (w, b): (u64, u64),
    (x, pre_bias): (u64, Option<u64>),
    y: u64,
    rows: usize,
    h: usize,
) -> Result<()> {
    let (eps, bias) = match spec.norm {
        NormKind::LayerNorm { eps } => (eps, Some(b)),
        NormKind::RmsNorm { eps } => (eps, None),
    };
    #[expect(clippy::cast_possible_truncation, reason = "an epsilon")]
    let eps = eps as f32;
    // SAFETY: the caller's contract.
    unsafe { g.norm_raw(x, pre_bias, w, bias, y, rows, h, eps) }?;
    Ok(())
}

/// The embedding tables on the device: tokens (`[vocab, e]`), learned positions (`[positions,
/// h]`, where the family has them), and the projection from `e` to `h` (`[h, e]`, where the token
/// embedding is narrower than the hidden state: OPT-350M).
#[derive(Debug, Clone, Copy)]
pub struct Tables {
    pub tokens: u64,
    pub positions: Option<u64>,
    pub project_in: Option<u64>,
}

/// Token embedding of `n` tokens (`ids`, and `pos` indices into the position table where the
/// family has a learned one) into `out [n, h]`. With a projection, the `e`-wide token rows go
/// to `scratch` (`[n, e]`) first.
///
/// # Safety
/// As [`Gpu::embed_raw`]: the tables hold every row an id or position names; every address names
/// device memory alive until the compute stream has run the kernels.
#[expect(clippy::too_many_arguments, reason = "addresses and sizes of one step")]
pub unsafe fn embed(
    g: &Gpu,
    spec: &ModelSpec,
    (ids, pos): (u64, u64),
    t: &Tables,
    scratch: u64,
    out: u64,
    n: usize,
    h: usize,
) -> Result<()> {
    let table = match spec.positions {
        PositionKind::Learned { .. } => Some(t.positions.ok_or_else(|| Error::Unsupported {
            what: format!("{}: learned positions without a position table", spec.name),
        })?),
        // Rotary positions enter in the q/k/v split, not here.
        PositionKind::Rope { .. } => None,
    };
    let Some(project_in) = t.project_in else {
        // SAFETY: the caller's contract.
        unsafe { g.embed_raw(ids, pos, t.tokens, table, out, n, h) }?;
        return Ok(());
    };
    let e = spec.embed_width() as usize;
    // SAFETY (every call below): the caller's contract; `scratch` holds n·e values. The
    // positions first (the position indices looked up as ids), then the projected tokens added.
    unsafe {
        g.embed_raw(ids, pos, t.tokens, None, scratch, n, e)?;
        let positioned = if let Some(p) = table {
            g.embed_raw(pos, pos, p, None, out, n, h)?;
            true
        } else {
            false
        };
        g.gemm(&Gemm::linear(n, h, e, scratch, project_in, out, positioned))?;
    }
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
    w: &LayerWeights,
    v: &Visit,
) -> Result<QkvEpilogue> {
    let h = l.hidden;
    let wide = h + 2 * l.kv;
    let bias = (!l.qkv_b.is_empty()).then(|| w.vector(&l.qkv_b));
    let rope = match spec.positions {
        PositionKind::Learned { .. } => None,
        PositionKind::Rope { .. } if v.inv_freq == 0 => {
            return Err(unsupported(spec, "rotary positions without their frequency table"));
        }
        PositionKind::Rope { .. } => Some((v.pos, v.inv_freq)),
    };
    let epilogue = QkvEpilogue { bias, rope };
    // Pre-norm: the projection reads the normed input; post-norm: the hidden state itself.
    let input = if spec.pre_norm {
        let norm_w = (w.vector(&l.attn_norm_w), w.vector(&l.attn_norm_b));
        // SAFETY: the caller's contract.
        unsafe { norm(g, spec, norm_w, v.x, v.hn, v.rows, h) }?;
        v.hn
    } else {
        v.x
    };
    // SAFETY: the caller's contract.
    unsafe {
        product(
            g,
            w,
            QKV,
            &Gemm::linear(v.rows, wide, h, input, at(w.arena, l.qkv_w.start), v.qkv, false),
        )
    }?;
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
    w: &LayerWeights,
    v: &Visit,
) -> Result<()> {
    let h = l.hidden;
    let rows = v.rows;
    let wq = |r: &std::ops::Range<usize>| at(w.arena, r.start);
    let vq = |r: &std::ops::Range<usize>| w.vector(r);
    let (attn_norm, mlp_norm) =
        ((vq(&l.attn_norm_w), vq(&l.attn_norm_b)), (vq(&l.mlp_norm_w), vq(&l.mlp_norm_b)));
    // SAFETY (every call below): the caller's contract.
    unsafe {
        product(g, w, OUT, &Gemm::linear(rows, h, h, v.att, wq(&l.o_w), v.x, true))?;
        // The output projection's bias goes into the residual stream in the norm's kernel.
        let o_b = (!l.o_b.is_empty()).then(|| vq(&l.o_b));
        if spec.pre_norm {
            bias_norm(g, spec, mlp_norm, (v.x, o_b), v.hn, rows, h)?;
        } else {
            // Post-norm: the residual stream itself is normed (in place: the kernel reads a
            // row's values before its own thread writes them), and the MLP reads it.
            bias_norm(g, spec, attn_norm, (v.x, o_b), v.x, rows, h)?;
        }
    }
    let v = &Visit { hn: if spec.pre_norm { v.hn } else { v.x }, ..*v };
    // SAFETY: the caller's contract.
    unsafe { mlp(g, spec, l, w, v) }?;
    if !spec.pre_norm {
        // SAFETY: the caller's contract.
        unsafe { norm(g, spec, mlp_norm, v.x, v.x, rows, h) }?;
    }
    Ok(())
}

/// The MLP of `v.hn` added to `v.x` (with its bias).
///
/// # Safety
/// As [`attention_in`].
unsafe fn mlp(
    g: &Gpu,
    spec: &ModelSpec,
    l: &LayerLayout,
    w: &LayerWeights,
    v: &Visit,
) -> Result<()> {
    let h = l.hidden;
    let f = spec.ffn_size as usize;
    let rows = v.rows;
    let wq = |r: &std::ops::Range<usize>| at(w.arena, r.start);
    match spec.mlp {
        MlpKind::Relu => {
            // SAFETY (every call below): the caller's contract.
            unsafe {
                let fc1 = Gemm::linear(rows, f, h, v.hn, wq(&l.fc1_w), v.ffn, false);
                product_bias(g, w, (FC1, &fc1), &l.fc1_b, true)?;
                let fc2 = Gemm::linear(rows, h, f, v.ffn, wq(&l.fc2_w), v.x, true);
                product_bias(g, w, (FC2, &fc2), &l.fc2_b, false)
            }
        }
        MlpKind::SwiGlu => {
            if !l.fc1_b.is_empty() {
                return Err(unsupported(spec, "a SwiGLU MLP with biases"));
            }
            // One GEMM for gate and up ([rows, 2·ffn]); silu(gate)·up in place of gate; down
            // reads those first ffn columns of each row.
            // SAFETY (every call below): the caller's contract (ffn holds rows × 2·ffn).
            unsafe {
                product(
                    g,
                    w,
                    FC1,
                    &Gemm::linear(rows, 2 * f, h, v.hn, wq(&l.fc1_w), v.ffn, false),
                )?;
                g.silu_mul_raw(v.ffn, at(v.ffn, f), v.ffn, rows, f, 2 * f, 2 * f)?;
                let down =
                    Gemm { lda: 2 * f, ..Gemm::linear(rows, h, f, v.ffn, wq(&l.fc2_w), v.x, true) };
                product_bias(g, w, (FC2, &down), &l.fc2_b, false)
            }
        }
    }
}

/// [`product_then`] of W matrix `m` with `b` the layer range `bias` of the arena (none where the
/// range is empty: a bias the family does not have) and ReLU if `relu`.
///
/// # Safety
/// As [`attention_in`].
unsafe fn product_bias(
    g: &Gpu,
    w: &LayerWeights,
    (m, gm): (usize, &Gemm),
    bias: &std::ops::Range<usize>,
    relu: bool,
) -> Result<()> {
    let b = if bias.is_empty() { 0 } else { w.vector(bias) };
    // SAFETY: the caller's contract; the bias range holds gm.n values.
    unsafe { product_then(g, w, m, gm, (b, relu)) }
}
