//! The fused operations of the offloading executor, on raw device addresses: the executor owns
//! its buffers (layer arenas, a preallocated KV cache, activation scratch) and orders its streams
//! with events itself, so these take addresses and sizes, allocate nothing and launch on the
//! compute stream. The kernels are those of `kernels.cu`; each writes every element of its output.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::ops::rows;
use super::{CudaError, Gpu, dim};

/// The device address of a buffer (the executor manages its lifetime and stream order).
pub fn addr<T>(s: &CudaSlice<T>) -> u64 {
    s.device_ptr(s.stream()).0
}

/// `a` advanced by `elems` fp16 values.
pub fn at(a: u64, elems: usize) -> u64 {
    a + 2 * elems as u64
}

/// Shapes of one attention call: `b` sequences of `t` new positions after `past` cached ones, in
/// caches of `cap` positions per sequence and head.
#[derive(Debug, Clone, Copy)]
pub struct AttnDims {
    pub b: usize,
    pub t: usize,
    pub nh: usize,
    pub nkv: usize,
    pub hd: usize,
    pub cap: usize,
    pub past: usize,
}

/// One row-major fp16 GEMM (batched when `batch` > 1): `c[m, n] = a[m, k] · op(b) + beta·c`,
/// where `b` is `[n, k]` used transposed (`b_t`) or `[k, n]`; `ld*` are row strides and
/// `s*` the strides between batch entries, in elements.
#[derive(Debug, Clone, Copy)]
pub struct Gemm {
    pub batch: usize,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub a: u64,
    pub lda: usize,
    pub sa: usize,
    pub b: u64,
    pub ldb: usize,
    pub sb: usize,
    pub b_t: bool,
    pub c: u64,
    pub ldc: usize,
    pub sc: usize,
    pub beta: f32,
}

impl Gemm {
    /// `y[m, n] = x[m, k] · w[n, k]ᵀ` (+ `y` when `accumulate`), all contiguous.
    pub fn linear(m: usize, n: usize, k: usize, x: u64, w: u64, y: u64, accumulate: bool) -> Self {
        Self {
            batch: 1,
            m,
            n,
            k,
            a: x,
            lda: k,
            sa: 0,
            b: w,
            ldb: k,
            sb: 0,
            b_t: true,
            c: y,
            ldc: n,
            sc: 0,
            beta: if accumulate { 1.0 } else { 0.0 },
        }
    }
}

fn i64_of(v: usize) -> i64 {
    i64::try_from(v).expect("stride fits in i64")
}

impl Gpu {
    /// Runs `g` on the compute stream (fp32 accumulation).
    pub fn gemm(&self, g: &Gemm) -> Result<(), CudaError> {
        let alpha = 1.0f32;
        let beta = g.beta;
        // Column-major view: cᵀ[n, m] = op(b)ᵀ · aᵀ, so b is cuBLAS's first operand.
        let transa =
            if g.b_t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let h = *self.blas.handle();
        let f16 = cudaDataType::CUDA_R_16F;
        // SAFETY: the executor sizes every buffer for the shapes it passes; all live on this
        // device and are ordered on the compute stream the handle is bound to.
        unsafe {
            if g.batch == 1 {
                cudarc::cublas::result::gemm_ex(
                    h,
                    transa,
                    cublasOperation_t::CUBLAS_OP_N,
                    dim(g.n),
                    dim(g.m),
                    dim(g.k),
                    (&raw const alpha).cast(),
                    g.b as *const _,
                    f16,
                    dim(g.ldb),
                    g.a as *const _,
                    f16,
                    dim(g.lda),
                    (&raw const beta).cast(),
                    g.c as *mut _,
                    f16,
                    dim(g.ldc),
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?;
            } else {
                cudarc::cublas::result::gemm_strided_batched_ex(
                    h,
                    transa,
                    cublasOperation_t::CUBLAS_OP_N,
                    dim(g.n),
                    dim(g.m),
                    dim(g.k),
                    (&raw const alpha).cast(),
                    g.b as *const _,
                    f16,
                    dim(g.ldb),
                    i64_of(g.sb),
                    g.a as *const _,
                    f16,
                    dim(g.lda),
                    i64_of(g.sa),
                    (&raw const beta).cast(),
                    g.c as *mut _,
                    f16,
                    dim(g.ldc),
                    i64_of(g.sc),
                    dim(g.batch),
                    cublasComputeType_t::CUBLAS_COMPUTE_32F,
                    cublasGemmAlgo_t::CUBLAS_GEMM_DEFAULT,
                )?;
            }
        }
        Ok(())
    }

    /// Token (+ position) embedding of `n` tokens: `ids`, `pos` (u32 on the device) → `out [n, h]`.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub fn embed_raw(
        &self,
        ids: u64,
        pos: u64,
        tok: u64,
        pos_table: Option<u64>,
        out: u64,
        n: usize,
        h: usize,
    ) -> Result<(), CudaError> {
        let has_pos = i32::from(pos_table.is_some());
        let pos_table = pos_table.unwrap_or(tok);
        let hi = dim(h);
        let mut l = self.stream.launch_builder(&self.embed);
        l.arg(&ids).arg(&pos).arg(&tok).arg(&pos_table).arg(&out).arg(&hi).arg(&has_pos);
        // SAFETY: one block per token; the tables hold every row an id or position names.
        unsafe { l.launch(rows(n))? };
        Ok(())
    }

    /// LayerNorm of `n` rows of `h` values: `x` → `y`.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub fn layer_norm_raw(
        &self,
        x: u64,
        w: u64,
        b: u64,
        y: u64,
        n: usize,
        h: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        let hi = dim(h);
        let mut l = self.stream.launch_builder(&self.layer_norm);
        l.arg(&x).arg(&w).arg(&b).arg(&y).arg(&hi).arg(&eps);
        // SAFETY: one block per row of h values.
        unsafe { l.launch(rows(n))? };
        Ok(())
    }

    /// `y[r, c] += b[c]` over `n` rows of `cols`, then ReLU if `relu`.
    pub fn bias_act_raw(
        &self,
        y: u64,
        b: u64,
        n: usize,
        cols: usize,
        relu: bool,
    ) -> Result<(), CudaError> {
        let (ci, ri) = (dim(cols), i32::from(relu));
        let mut l = self.stream.launch_builder(&self.bias_act);
        l.arg(&y).arg(&b).arg(&ci).arg(&ri);
        // SAFETY: one block per row of cols values; b holds cols values.
        unsafe { l.launch(rows(n))? };
        Ok(())
    }

    /// Splits the fused q/k/v GEMM output `y [b·t, h + 2·kv]` (adding `bias`): q·`scale` to
    /// `q [b, nh, t, hd]`, k and v to positions `past..past + t` of the caches `[b, nkv, cap, hd]`.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub fn qkv_split(
        &self,
        y: u64,
        bias: u64,
        q: u64,
        kc: u64,
        vc: u64,
        d: AttnDims,
        scale: f32,
    ) -> Result<(), CudaError> {
        assert!(d.past + d.t <= d.cap, "the cache holds every position");
        let (t, nh, nkv, hd, cap, past) =
            (dim(d.t), dim(d.nh), dim(d.nkv), dim(d.hd), dim(d.cap), dim(d.past));
        let mut l = self.stream.launch_builder(&self.qkv_split);
        l.arg(&y).arg(&bias).arg(&q).arg(&kc).arg(&vc);
        l.arg(&t).arg(&nh).arg(&nkv).arg(&hd).arg(&cap).arg(&past).arg(&scale);
        // SAFETY: one block per row of y; every write lands inside q or the caches (checked).
        unsafe { l.launch(rows(d.b * d.t))? };
        Ok(())
    }

    /// Attention of `t` new positions per sequence over the cache (prefill): scores by a batched
    /// GEMM into `scores` (`b·nh·t·(past + t)` values), the causal, left-padding softmax
    /// (`start[b]` = first real position), the context by a second GEMM into `ctx`
    /// (`b·nh·t·hd`), then `out [b·t, nh·hd]` with the heads merged.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one attention")]
    pub fn attention_prefill(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        start: u64,
        scores: u64,
        ctx: u64,
        out: u64,
        d: AttnDims,
    ) -> Result<(), CudaError> {
        assert_eq!(d.nh, d.nkv, "grouped-query attention is not implemented in prefill");
        let s = d.past + d.t;
        let bh = d.b * d.nh;
        self.gemm(&Gemm {
            batch: bh,
            m: d.t,
            n: s,
            k: d.hd,
            a: q,
            lda: d.hd,
            sa: d.t * d.hd,
            b: kc,
            ldb: d.hd,
            sb: d.cap * d.hd,
            b_t: true,
            c: scores,
            ldc: s,
            sc: d.t * s,
            beta: 0.0,
        })?;
        let (nh, t, cols, past) = (dim(d.nh), dim(d.t), dim(s), dim(d.past));
        let mut l = self.stream.launch_builder(&self.causal_softmax);
        l.arg(&scores).arg(&start).arg(&nh).arg(&t).arg(&cols).arg(&past);
        // SAFETY: one block per (sequence, head, query) row of s scores.
        unsafe { l.launch(rows(bh * d.t))? };
        self.gemm(&Gemm {
            batch: bh,
            m: d.t,
            n: d.hd,
            k: s,
            a: scores,
            lda: s,
            sa: d.t * s,
            b: vc,
            ldb: d.hd,
            sb: d.cap * d.hd,
            b_t: false,
            c: ctx,
            ldc: d.hd,
            sc: d.t * d.hd,
            beta: 0.0,
        })?;
        let (d0, d1, d2, d3) = (dim(d.b), dim(d.nh), dim(d.t), dim(d.hd));
        let mut l = self.stream.launch_builder(&self.swap12);
        l.arg(&ctx).arg(&out).arg(&d0).arg(&d1).arg(&d2).arg(&d3);
        // SAFETY: one block per row of hd values; out has the size of ctx.
        unsafe { l.launch(rows(bh * d.t))? };
        Ok(())
    }

    /// Attention of one new position per sequence (decode) over `past + 1` cached positions:
    /// `q [b, nh, hd]` → `out [b, nh·hd]`.
    pub fn attention_decode(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        start: u64,
        out: u64,
        d: AttnDims,
    ) -> Result<(), CudaError> {
        assert!(
            d.t == 1 && d.hd <= 256 && d.nh.is_multiple_of(d.nkv),
            "one query, head size ≤ 256"
        );
        let s = d.past + 1;
        let warps = 4;
        let shared = u32::try_from((s + warps * d.hd) * 4).expect("fits");
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(d.b * d.nh).expect("fits"), 1, 1),
            block_dim: (32 * u32::try_from(warps).expect("4"), 1, 1),
            shared_mem_bytes: shared,
        };
        let (nh, nkv, hd, cap, si) = (dim(d.nh), dim(d.nkv), dim(d.hd), dim(d.cap), dim(s));
        let mut l = self.stream.launch_builder(&self.decode_attention);
        l.arg(&q).arg(&kc).arg(&vc).arg(&start).arg(&out);
        l.arg(&nh).arg(&nkv).arg(&hd).arg(&cap).arg(&si);
        // SAFETY: one block per (sequence, head); reads s ≤ cap positions of its cache rows.
        unsafe { l.launch(cfg)? };
        Ok(())
    }

    /// Row `t − 1` of each of `b` sequences of `x [b, t, h]` → `y [b, h]`.
    pub fn last_rows(&self, x: u64, y: u64, b: usize, t: usize, h: usize) -> Result<(), CudaError> {
        let (ai, ni, si, li, ci) = (dim(b), dim(t), dim(t - 1), 1i32, dim(h));
        let mut l = self.stream.launch_builder(&self.slice_axis1);
        l.arg(&x).arg(&y).arg(&ai).arg(&ni).arg(&si).arg(&li).arg(&ci);
        // SAFETY: one block per sequence, reading its last row.
        unsafe { l.launch(rows(b))? };
        Ok(())
    }

    /// The index of the largest value of each of `n` rows of `cols` → `out` (u32).
    pub fn argmax_rows(&self, x: u64, out: u64, n: usize, cols: usize) -> Result<(), CudaError> {
        let ci = dim(cols);
        let mut l = self.stream.launch_builder(&self.argmax_rows);
        l.arg(&x).arg(&out).arg(&ci);
        // SAFETY: one block of 256 threads per row (the kernel's reduction needs exactly that).
        unsafe { l.launch(rows(n))? };
        Ok(())
    }
}
