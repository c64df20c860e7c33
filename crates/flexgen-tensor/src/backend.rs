//! The operations a decoder needs, as one trait with one implementation per compute device: [`Cpu`]
//! (candle-core, f32) and [`crate::cuda::Gpu`] (cuBLAS + NVRTC kernels, fp16). Model layers are
//! written once against this trait.

use crate::{Device, Tensor};

/// One compute device's implementation of the decoder's operations.
pub trait Backend {
    /// A tensor on this device.
    type T;
    /// An additive attention mask prepared for this device.
    type Bias;
    /// The device's error.
    type Error;

    /// `x · wᵀ + b` over the last dimension, then ReLU if `relu`.
    fn linear(
        &self,
        x: &Self::T,
        w: &Self::T,
        b: Option<&Self::T>,
        relu: bool,
    ) -> Result<Self::T, Self::Error>;
    /// LayerNorm over the last dimension.
    fn layer_norm(
        &self,
        x: &Self::T,
        w: &Self::T,
        b: &Self::T,
        eps: f64,
    ) -> Result<Self::T, Self::Error>;
    /// RMSNorm over the last dimension.
    fn rms_norm(&self, x: &Self::T, w: &Self::T, eps: f64) -> Result<Self::T, Self::Error>;
    /// Rotary embedding of `x [b, n, t, hd]` by `cos`, `sin` `[b, 1, t, hd]`.
    fn rotary(&self, x: &Self::T, cos: &Self::T, sin: &Self::T) -> Result<Self::T, Self::Error>;
    /// Each of the heads of `[b, nkv, s, hd]` repeated `rep` times in place.
    fn repeat_heads(&self, x: &Self::T, rep: usize) -> Result<Self::T, Self::Error>;
    /// `silu(gate) · up`.
    fn silu_mul(&self, gate: &Self::T, up: &Self::T) -> Result<Self::T, Self::Error>;
    /// A tensor of `shape` holding `data` (f32), on this device.
    fn tensor(&self, data: Vec<f32>, shape: &[usize]) -> Result<Self::T, Self::Error>;
    /// `a + b`.
    fn add(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    /// Token (+ position) embedding of row-major `[b, t]` ids at table rows `positions`.
    fn embed(
        &self,
        ids: &[u32],
        positions: &[u32],
        shape: (usize, usize),
        table: &Self::T,
        pos_table: Option<&Self::T>,
    ) -> Result<Self::T, Self::Error>;
    /// `[b, t, nh·hd]` → `[b, nh, t, hd]`.
    fn split_heads(&self, x: &Self::T, nh: usize) -> Result<Self::T, Self::Error>;
    /// `[b, nh, t, hd]` → `[b, t, nh·hd]`.
    fn merge_heads(&self, x: &Self::T) -> Result<Self::T, Self::Error>;
    /// `a` followed by `b` along the position axis (2) of `[b, nh, s, hd]` tensors.
    fn cat_positions(&self, a: &Self::T, b: &Self::T) -> Result<Self::T, Self::Error>;
    /// The mask from `allowed[b][t][s]` (query `t` of sequence `b` may see key `s`).
    fn attention_bias(&self, allowed: &[Vec<Vec<bool>>]) -> Result<Self::Bias, Self::Error>;
    /// `softmax(q·kᵀ·scale + bias)·v`.
    fn attention(
        &self,
        q: &Self::T,
        k: &Self::T,
        v: &Self::T,
        bias: &Self::Bias,
        scale: f64,
    ) -> Result<Self::T, Self::Error>;
    /// The last position of `[b, t, h]`: `[b, 1, h]`.
    fn last_position(&self, x: &Self::T) -> Result<Self::T, Self::Error>;
    /// Positions held by a `[b, nh, s, hd]` tensor.
    fn positions(&self, x: &Self::T) -> usize;
    /// A copy on the CPU in f32.
    fn to_cpu(&self, x: &Self::T) -> Result<Tensor, Self::Error>;
}

/// The CPU backend: candle-core tensors in f32.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu;

impl Backend for Cpu {
    type T = Tensor;
    type Bias = Tensor;
    type Error = crate::Error;

    fn linear(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: Option<&Tensor>,
        relu: bool,
    ) -> crate::Result<Tensor> {
        let y = crate::linear(x, w, b)?;
        if relu { crate::relu(&y) } else { Ok(y) }
    }

    fn layer_norm(&self, x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> crate::Result<Tensor> {
        crate::layer_norm(x, w, b, eps)
    }

    fn add(&self, a: &Tensor, b: &Tensor) -> crate::Result<Tensor> {
        a + b
    }

    fn rms_norm(&self, x: &Tensor, w: &Tensor, eps: f64) -> crate::Result<Tensor> {
        crate::rms_norm(x, w, eps)
    }

    fn rotary(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> crate::Result<Tensor> {
        crate::rotary(x, cos, sin)
    }

    fn repeat_heads(&self, x: &Tensor, rep: usize) -> crate::Result<Tensor> {
        crate::repeat_heads(x, rep)
    }

    fn silu_mul(&self, gate: &Tensor, up: &Tensor) -> crate::Result<Tensor> {
        crate::silu_mul(gate, up)
    }

    fn tensor(&self, data: Vec<f32>, shape: &[usize]) -> crate::Result<Tensor> {
        Tensor::from_vec(data, shape, &Device::Cpu)
    }

    fn embed(
        &self,
        ids: &[u32],
        positions: &[u32],
        shape: (usize, usize),
        table: &Tensor,
        pos_table: Option<&Tensor>,
    ) -> crate::Result<Tensor> {
        let ids = Tensor::from_slice(ids, shape, table.device())?;
        let x = crate::embedding(&ids, table)?;
        match pos_table {
            Some(p) => {
                x + crate::embedding(&Tensor::from_slice(positions, shape, table.device())?, p)?
            }
            None => Ok(x),
        }
    }

    fn split_heads(&self, x: &Tensor, nh: usize) -> crate::Result<Tensor> {
        crate::split_heads(x, nh)
    }

    fn merge_heads(&self, x: &Tensor) -> crate::Result<Tensor> {
        crate::merge_heads(x)
    }

    fn cat_positions(&self, a: &Tensor, b: &Tensor) -> crate::Result<Tensor> {
        Tensor::cat(&[a, b], 2)
    }

    fn attention_bias(&self, allowed: &[Vec<Vec<bool>>]) -> crate::Result<Tensor> {
        crate::attention_bias(allowed, &crate::Device::Cpu)
    }

    fn attention(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        bias: &Tensor,
        scale: f64,
    ) -> crate::Result<Tensor> {
        crate::attention(q, k, v, bias, scale)
    }

    fn last_position(&self, x: &Tensor) -> crate::Result<Tensor> {
        let t = x.dim(1)?;
        x.narrow(1, t - 1, 1)
    }

    fn positions(&self, x: &Tensor) -> usize {
        x.dim(2).unwrap_or(0)
    }

    fn to_cpu(&self, x: &Tensor) -> crate::Result<Tensor> {
        Ok(x.clone())
    }
}
