//! The tensor operations of a decoder-only transformer, written once for the CPU backend on top of
//! `candle-core`. Every model in `flexgen-model` is built from these functions; nothing else in the
//! workspace does tensor arithmetic.
//!
//! Shapes use `b` for batch, `t` for query positions, `s` for key positions, `nh` for heads and `hd`
//! for the head size. All operations compute in the dtype of their inputs (f32 on the CPU).

pub mod backend;
pub mod cuda;
pub mod host;
pub mod host_attention;
pub mod math;
pub mod quant;

pub use backend::{Backend, Cpu};
pub use candle_core::{DType, Device, Error, Result, Tensor};

/// `x · wᵀ + b` over the last dimension: `x` is `[.., in]`, `w` is `[out, in]` (the Hugging Face
/// layout), `b` is `[out]`.
pub fn linear(x: &Tensor, w: &Tensor, b: Option<&Tensor>) -> Result<Tensor> {
    let dims = x.dims();
    let k = *dims.last().expect("linear input has at least one dimension");
    let rows = x.elem_count() / k;
    let y = x.reshape((rows, k))?.matmul(&w.t()?)?;
    let y = match b {
        Some(b) => y.broadcast_add(b)?,
        None => y,
    };
    let mut out_dims = dims.to_vec();
    *out_dims.last_mut().expect("non-empty") = w.dim(0)?;
    y.reshape(out_dims)
}

/// `LayerNorm` over the last dimension: `(x − mean) / sqrt(var + eps) · w + b`.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mean = x.mean_keepdim(candle_core::D::Minus1)?;
    let centered = x.broadcast_sub(&mean)?;
    let var = centered.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    let normed = centered.broadcast_div(&(var + eps)?.sqrt()?)?;
    normed.broadcast_mul(w)?.broadcast_add(b)
}

/// Softmax over the last dimension, stabilized by subtracting the row maximum.
/// RMSNorm over the last dimension: `x / sqrt(mean(x²) + eps) · w`.
pub fn rms_norm(x: &Tensor, w: &Tensor, eps: f64) -> Result<Tensor> {
    let ms = x.sqr()?.mean_keepdim(candle_core::D::Minus1)?;
    x.broadcast_div(&(ms + eps)?.sqrt()?)?.broadcast_mul(w)
}

/// Rotary position embedding of `x [b, n, t, hd]` with `cos`, `sin` `[b, 1, t, hd]` (the
/// frequencies repeated over both halves): `x·cos + rotate_half(x)·sin`, where
/// `rotate_half([x1, x2]) = [−x2, x1]`.
pub fn rotary(x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
    let hd = x.dim(3)?;
    let (x1, x2) = (x.narrow(3, 0, hd / 2)?, x.narrow(3, hd / 2, hd / 2)?);
    let rotated = Tensor::cat(&[&x2.neg()?, &x1], 3)?;
    x.broadcast_mul(cos)? + rotated.broadcast_mul(sin)?
}

/// `[b, nkv, s, hd]` → `[b, nkv·rep, s, hd]`, each head repeated `rep` times in place (grouped-
/// query attention: query head `i` reads key head `i / rep`).
pub fn repeat_heads(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, n, s, hd) = x.dims4()?;
    x.unsqueeze(2)?.broadcast_as((b, n, rep, s, hd))?.contiguous()?.reshape((b, n * rep, s, hd))
}

/// `silu(gate) · up`, the gated activation of a `SwiGLU` MLP.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    candle_core::Tensor::silu(gate)? * up
}

pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    let max = x.max_keepdim(candle_core::D::Minus1)?;
    let e = x.broadcast_sub(&max)?.exp()?;
    let sum = e.sum_keepdim(candle_core::D::Minus1)?;
    e.broadcast_div(&sum)
}

/// `max(x, 0)`.
pub fn relu(x: &Tensor) -> Result<Tensor> {
    x.relu()
}

/// Rows of `table` (`[n, h]`) picked by `ids` (`[b, t]`, u32): `[b, t, h]`.
pub fn embedding(ids: &Tensor, table: &Tensor) -> Result<Tensor> {
    let (b, t) = ids.dims2()?;
    let h = table.dim(1)?;
    table.index_select(&ids.flatten_all()?, 0)?.reshape((b, t, h))
}

/// Additive attention mask: 0 where a query may see a key, a large negative number elsewhere.
/// `allowed[b][t][s]` says whether query `t` of sequence `b` sees key `s`. Returns `[b, 1, t, s]`.
/// A finite value (not −∞) keeps rows that see nothing (padding queries) free of NaN.
pub fn attention_bias(allowed: &[Vec<Vec<bool>>], device: &Device) -> Result<Tensor> {
    let b = allowed.len();
    let t = allowed.first().map_or(0, Vec::len);
    let s = allowed.first().and_then(|r| r.first()).map_or(0, Vec::len);
    let mut data = Vec::with_capacity(b * t * s);
    for seq in allowed {
        for row in seq {
            data.extend(row.iter().map(|&ok| if ok { 0.0f32 } else { MASKED }));
        }
    }
    Tensor::from_vec(data, (b, 1, t, s), device)
}

/// The additive bias of a masked position: far below any real score, finite.
pub const MASKED: f32 = -1.0e9;

/// Scaled dot-product attention: `softmax(q·kᵀ · scale + bias) · v`.
/// `q` is `[b, nh, t, hd]`, `k` and `v` are `[b, nh, s, hd]`, `bias` is `[b, 1, t, s]`.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, bias: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    let probs = softmax_last_dim(&scores.broadcast_add(bias)?)?;
    probs.matmul(&v.contiguous()?)
}

/// `[b, t, nh·hd]` → `[b, nh, t, hd]`.
pub fn split_heads(x: &Tensor, nh: usize) -> Result<Tensor> {
    let (b, t, h) = x.dims3()?;
    x.reshape((b, t, nh, h / nh))?.transpose(1, 2)?.contiguous()
}

/// `[b, nh, t, hd]` → `[b, t, nh·hd]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, nh, t, hd) = x.dims4()?;
    x.transpose(1, 2)?.contiguous()?.reshape((b, t, nh * hd))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(data: &[f32], shape: &[usize]) -> Tensor {
        Tensor::from_slice(data, shape, &Device::Cpu).unwrap()
    }

    #[test]
    fn linear_matches_hand_computation() {
        // x = [1, 2], w = [[1, 0], [1, 1], [0, 2]], b = [0.5, 0, -1]
        let y = linear(
            &t(&[1.0, 2.0], &[1, 1, 2]),
            &t(&[1.0, 0.0, 1.0, 1.0, 0.0, 2.0], &[3, 2]),
            Some(&t(&[0.5, 0.0, -1.0], &[3])),
        )
        .unwrap();
        assert_eq!(y.dims(), &[1, 1, 3]);
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![1.5, 3.0, 3.0]);
    }

    #[test]
    fn layer_norm_normalizes_each_row() {
        let y =
            layer_norm(&t(&[1.0, 3.0], &[1, 2]), &t(&[2.0, 2.0], &[2]), &t(&[1.0, 1.0], &[2]), 0.0)
                .unwrap();
        // mean 2, var 1 → [-1, 1] · 2 + 1
        assert_eq!(y.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![-1.0, 3.0]);
    }

    #[test]
    fn softmax_ignores_masked_entries() {
        let y = softmax_last_dim(&t(&[0.0, 0.0, MASKED], &[1, 3])).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0.5, 0.5, 0.0]);
    }

    #[test]
    fn fully_masked_row_stays_finite() {
        let y = softmax_last_dim(&t(&[MASKED, MASKED], &[1, 2])).unwrap();
        let v = y.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(v, vec![0.5, 0.5]);
    }

    #[test]
    fn attention_with_one_visible_key_returns_its_value() {
        let q = t(&[1.0, 0.0], &[1, 1, 1, 2]);
        let k = t(&[1.0, 0.0, 0.0, 1.0], &[1, 1, 2, 2]);
        let v = t(&[10.0, 20.0, 30.0, 40.0], &[1, 1, 2, 2]);
        let bias = attention_bias(&[vec![vec![false, true]]], &Device::Cpu).unwrap();
        let o = attention(&q, &k, &v, &bias, 1.0).unwrap();
        assert_eq!(o.flatten_all().unwrap().to_vec1::<f32>().unwrap(), vec![30.0, 40.0]);
    }

    #[test]
    fn heads_split_and_merge_are_inverse() {
        let x = Tensor::arange(0f32, 24.0, &Device::Cpu).unwrap().reshape((1, 3, 8)).unwrap();
        let y = merge_heads(&split_heads(&x, 2).unwrap()).unwrap();
        assert_eq!(y.to_vec3::<f32>().unwrap(), x.to_vec3::<f32>().unwrap());
    }
}
