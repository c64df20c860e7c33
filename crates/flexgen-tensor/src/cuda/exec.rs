//! The fused operations of the offloading executor, on raw device addresses: the executor owns
//! its buffers (layer arenas, a preallocated KV cache, activation scratch) and orders its streams
//! with events itself, so these take addresses and sizes, allocate nothing and launch on the
//! compute stream. The kernels are those of `kernels.cu`; each writes every element of its output.

use cudarc::cublas::sys::{cublasComputeType_t, cublasGemmAlgo_t, cublasOperation_t, cudaDataType};
use cudarc::driver::{CudaFunction, CudaSlice, DevicePtr, LaunchConfig, PushKernelArg};

use super::ops::{MANY_ROWS, grid, row_cols, rows};
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

/// Where `qkv_split` puts k and v of the (sequence, head) rows past `gpu_rows`: `[rows −
/// gpu_rows, cap, hd]` buffers at position `past` (for rows whose cache lives off the GPU).
#[derive(Debug, Clone, Copy)]
pub struct NewKv {
    pub gpu_rows: usize,
    pub k: u64,
    pub v: u64,
    pub cap: usize,
    pub past: usize,
}

/// The shape of a packed KV cache: `rows` (sequence, head) rows of `cap` positions of `hd`
/// values, quantized to `bits` in groups of `group` along the head dimension.
#[derive(Debug, Clone, Copy)]
pub struct CacheQuant {
    pub rows: usize,
    pub cap: usize,
    pub hd: usize,
    pub group: usize,
    pub bits: u8,
}

/// The packed caches into which [`Gpu::qkv_split`] also packs the new k and v of cache rows
/// `0..quant.rows` (codes and (min, scale) pairs of `k` and of `v`, laid out as
/// [`Gpu::quant_cache`] lays them out), where [`Gpu::split_packs`] allows: so no `quant_cache`
/// launch follows.
#[derive(Debug, Clone, Copy)]
pub struct SplitPack {
    pub k: (u64, u64),
    pub v: (u64, u64),
    pub quant: CacheQuant,
}

impl CacheQuant {
    /// Bytes of codes and fp16 values of parameters of the whole cache.
    pub fn sizes(&self) -> (usize, usize) {
        let spec = crate::quant::QuantSpec { bits: self.bits, group: self.group, dim: 2 };
        let (codes, params) = crate::quant::packed_len(&[self.rows, self.cap, self.hd], spec);
        (codes, params / 2)
    }
}

/// A 2-D copy: `height` rows of `width` bytes, `src_pitch`/`dst_pitch` bytes apart.
#[derive(Debug, Clone, Copy)]
pub struct Copy2d {
    pub width: usize,
    pub height: usize,
    pub src_pitch: usize,
    pub dst_pitch: usize,
}

impl Copy2d {
    /// One contiguous run of `bytes`.
    pub fn contiguous(bytes: usize) -> Self {
        Self { width: bytes, height: 1, src_pitch: bytes, dst_pitch: bytes }
    }
}

/// Where a 2-D copy reads or writes.
#[derive(Debug, Clone, Copy)]
pub enum Mem {
    Device(u64),
    Host(*const u8),
}

/// Issues a 2-D copy on `stream` (device or host at each end).
///
/// # Safety
/// Both regions must be valid for the copy's rows and stay so until it completes; host memory
/// should be pinned for the copy to be asynchronous.
pub unsafe fn copy_2d(
    stream: &super::CudaStream,
    src: Mem,
    dst: Mem,
    c: Copy2d,
) -> Result<(), CudaError> {
    use cudarc::driver::sys::{CUDA_MEMCPY2D, CUmemorytype};
    let (src_type, src_host, src_device) = match src {
        Mem::Device(a) => (CUmemorytype::CU_MEMORYTYPE_DEVICE, std::ptr::null(), a),
        Mem::Host(h) => (CUmemorytype::CU_MEMORYTYPE_HOST, h.cast(), 0),
    };
    let (dst_type, dst_host, dst_device) = match dst {
        Mem::Device(a) => (CUmemorytype::CU_MEMORYTYPE_DEVICE, std::ptr::null_mut(), a),
        Mem::Host(h) => (CUmemorytype::CU_MEMORYTYPE_HOST, h.cast_mut().cast(), 0),
    };
    let p = CUDA_MEMCPY2D {
        srcXInBytes: 0,
        srcY: 0,
        srcMemoryType: src_type,
        srcHost: src_host,
        srcDevice: src_device,
        srcArray: std::ptr::null_mut(),
        srcPitch: c.src_pitch,
        dstXInBytes: 0,
        dstY: 0,
        dstMemoryType: dst_type,
        dstHost: dst_host,
        dstDevice: dst_device,
        dstArray: std::ptr::null_mut(),
        dstPitch: c.dst_pitch,
        WidthInBytes: c.width,
        Height: c.height,
    };
    // SAFETY: the caller guarantees the regions (see above).
    unsafe { cudarc::driver::sys::cuMemcpy2DAsync_v2(&raw const p, stream.cu_stream()).result()? };
    Ok(())
}

/// A linear layer's 4-bit weight W `[outs, ins]` in device memory: its codes and fp16
/// (min, scale) pairs, in groups of `group` outputs of one input, in `dequant_dim0`'s layout or,
/// with `tc`, in the tensor-core order ([`crate::quant::TcOrder`]). What the fused 4-bit
/// products read: [`Gpu::gemm4_tc`] the tensor-core order, [`Gpu::gemv4_dim0`] the other.
#[derive(Debug, Clone, Copy)]
pub struct Weight4 {
    pub codes: u64,
    pub params: u64,
    pub outs: usize,
    pub ins: usize,
    pub group: usize,
    pub tc: bool,
}

/// Where [`Gpu::gemm4_tc`] stores its fp32 sums itself, as [`Gpu::store_f32`] would (`out[r, c] =
/// (accumulate ? out[r, c] : 0) + y[r, c]`, then the bias and ReLU, y cleared): `out` fp16
/// `[nb, outs]`, `bias` (0 for none) `outs` values, and `done` zeroed `u32` counters, one per
/// block of [`GEMM4_TC_OUTPUTS`] outputs ([`gemm4_tc_done_len`]), that each product leaves zeroed
/// again.
#[derive(Debug, Clone, Copy)]
pub struct Store4 {
    pub out: u64,
    pub bias: u64,
    pub accumulate: bool,
    pub relu: bool,
    pub done: u64,
}

/// The `u32` counters [`Store4::done`] needs for products of up to `outs` outputs.
pub fn gemm4_tc_done_len(outs: usize) -> usize {
    outs.div_ceil(GEMM4_TC_OUTPUTS)
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

/// Which single GEMMs take cuBLASLt rather than cuBLAS: those with a bias in the epilogue (the
/// default), all (`FLEXGEN_LT=all`) or none (`FLEXGEN_LT=0`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LtUse {
    Off,
    Bias,
    All,
}

fn lt_use() -> LtUse {
    static USE: std::sync::OnceLock<LtUse> = std::sync::OnceLock::new();
    *USE.get_or_init(|| match std::env::var("FLEXGEN_LT").as_deref() {
        Ok("0") => LtUse::Off,
        Ok("all") => LtUse::All,
        _ => LtUse::Bias,
    })
}

pub(super) fn i64_of(v: usize) -> i64 {
    i64::try_from(v).expect("stride fits in i64")
}

/// Runs `g` with `blas` on the stream it is bound to (fp16 operands, fp32 accumulation): the one
/// cuBLAS call of every GEMM flexgen makes.
///
/// # Safety
/// The addresses in `g` must hold the operands its shapes and strides describe, on the device of
/// `blas`, and be ordered on its stream.
pub unsafe fn gemm_raw(blas: &cudarc::cublas::CudaBlas, g: &Gemm) -> Result<(), CudaError> {
    let alpha = 1.0f32;
    let beta = g.beta;
    // Column-major view: cᵀ[n, m] = op(b)ᵀ · aᵀ, so b is cuBLAS's first operand.
    let transa =
        if g.b_t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
    let h = *blas.handle();
    let f16 = cudaDataType::CUDA_R_16F;
    // SAFETY: the caller guarantees the operands (see above).
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

impl Gpu {
    /// Runs `g` on the compute stream (fp32 accumulation) through cuBLAS, or with `FLEXGEN_LT=all`
    /// in the environment a single GEMM through cuBLASLt (the algorithm its heuristic picks for
    /// the shape, kept; cuBLAS where it has none).
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn gemm(&self, g: &Gemm) -> Result<(), CudaError> {
        if let Some(lt) = self.lt.as_ref().filter(|_| g.batch == 1 && lt_use() == LtUse::All) {
            // SAFETY: the caller's contract.
            if unsafe { lt.gemm(g, None) }? {
                return Ok(());
            }
        }
        // SAFETY: the executor sizes every buffer for the shapes it passes; all live on this
        // device and are ordered on the compute stream the handle is bound to.
        unsafe { gemm_raw(&self.blas, g) }
    }

    /// `g` (one GEMM) with `bias` (`g.n` fp16 values) added to each row of its product, then
    /// ReLU where `relu`: `c = act(a·op(b) + beta·c + bias)`. One cuBLASLt kernel with the bias
    /// and activation in its epilogue where cuBLASLt is here and has an algorithm for the shape
    /// (and `FLEXGEN_LT` is not `0` in the environment, to compare), else the GEMM then
    /// [`Gpu::bias_act_raw`] (the product rounded to fp16 before the bias is added). The output's
    /// rows may be `g.ldc > g.n` apart (a slice of a wider output's columns).
    ///
    /// # Safety
    /// As [`Gpu::gemm`]; `bias` must name `g.n` fp16 values of this device.
    pub unsafe fn gemm_bias(&self, g: &Gemm, bias: u64, relu: bool) -> Result<(), CudaError> {
        if let Some(lt) = self.lt.as_ref().filter(|_| lt_use() != LtUse::Off) {
            // SAFETY: the caller's contract.
            if unsafe { lt.gemm(g, Some((bias, relu))) }? {
                return Ok(());
            }
        }
        // SAFETY: the caller's contract; `c` holds m rows of n, ldc apart.
        unsafe {
            self.gemm(g)?;
            self.bias_act_raw(g.c, bias, (g.m, g.n, g.ldc), relu)
        }
    }

    /// Token (+ position) embedding of `n` tokens: `ids`, `pos` (u32 on the device) → `out [n, h]`.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub unsafe fn embed_raw(
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

    /// The norm of `n` rows of `h` values, `x` → `y`: LayerNorm with weight `w` and bias `b`
    /// where given, RMSNorm with weight `w` where not. With `pre_bias` (`[h]`), `x += pre_bias`
    /// first (stored in `x` as fp16) and that sum is normed: a sublayer's output bias and the
    /// next norm in one kernel.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub unsafe fn norm_raw(
        &self,
        x: u64,
        pre_bias: Option<u64>,
        w: u64,
        b: Option<u64>,
        y: u64,
        n: usize,
        h: usize,
        eps: f32,
    ) -> Result<(), CudaError> {
        // SAFETY: as the caller promises.
        unsafe { self.norm_raw_threads((x, pre_bias), w, b, y, (n, h), eps, norm_threads(n, h)) }
    }

    /// [`Gpu::norm_raw`] with `threads` threads per row (a multiple of 32, at most 1024): for
    /// timing the choice `norm_raw` makes against others.
    ///
    /// # Safety
    /// As [`Gpu::norm_raw`].
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub unsafe fn norm_raw_threads(
        &self,
        (x, pre_bias): (u64, Option<u64>),
        w: u64,
        b: Option<u64>,
        y: u64,
        (n, h): (usize, usize),
        eps: f32,
        threads: usize,
    ) -> Result<(), CudaError> {
        assert!(threads.is_multiple_of(32) && (32..=1024).contains(&threads));
        let (hi, rms) = (dim(h), i32::from(b.is_none()));
        let (b, pb) = (b.unwrap_or(0), pre_bias.unwrap_or(0));
        let f = if n >= MANY_ROWS { &self.layer_norm_rows } else { &self.layer_norm };
        let mut l = self.stream.launch_builder(f);
        l.arg(&x).arg(&w).arg(&b).arg(&y).arg(&hi).arg(&eps).arg(&rms).arg(&pb);
        let mut cfg = rows(n);
        cfg.block_dim.0 = u32::try_from(threads).expect("at most 1024");
        // SAFETY: one block per row of h values (the kernel reads no bias for RMSNorm).
        unsafe { l.launch(cfg)? };
        Ok(())
    }

    /// Copies `bytes` from `src` to `dst` with the SMs on the compute stream: [`Gpu::copy_sm`].
    ///
    /// # Safety
    /// As [`Gpu::copy_sm`].
    pub unsafe fn copy_raw(&self, src: u64, dst: u64, bytes: usize) -> Result<(), CudaError> {
        // SAFETY: as the caller promises.
        unsafe { self.copy_sm(&self.stream, src, dst, Copy2d::contiguous(bytes)) }
    }

    /// Copies the rows of `c` from `src` to `dst` with the SMs, on `stream`: device memory, or
    /// mapped pinned host memory through its device address ([`super::HostMem::device_addr`]).
    /// No copy engine serves it, so it never waits behind copies issued on other streams (a
    /// copy engine serves them in the order they were issued).
    ///
    /// # Safety
    /// Both regions must be valid on the device for `c`'s rows and must not overlap; nothing
    /// else may write them until `stream` has run the copy.
    pub unsafe fn copy_sm(
        &self,
        stream: &super::CudaStream,
        src: u64,
        dst: u64,
        c: Copy2d,
    ) -> Result<(), CudaError> {
        if c.width == 0 || c.height == 0 {
            return Ok(());
        }
        let i = |v: usize| i64::try_from(v).expect("a copy fits in i64");
        let (w, h, sp, dp) = (i(c.width), i(c.height), i(c.src_pitch), i(c.dst_pitch));
        let mut l = stream.launch_builder(&self.copy_bytes);
        l.arg(&src).arg(&dst).arg(&w).arg(&h).arg(&sp).arg(&dp);
        // A grid-stride loop: enough blocks to fill the device, 16 bytes per thread per round.
        let cfg = grid((c.width * c.height).div_ceil(16).min(4096 * 256));
        // SAFETY: as the caller promises; the kernel touches only the rows of `c`.
        unsafe { l.launch(cfg)? };
        Ok(())
    }

    /// SwiGLU's product over `n` rows: `out[r, j] = silu(g[r, j]) · u[r, j]` for `j < f`, rows
    /// of `g` and `u` `ld` apart and of `out` `ld_out` apart (in place where `out = g`).
    ///
    /// # Safety
    /// As [`Gpu::norm_raw`].
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub unsafe fn silu_mul_raw(
        &self,
        g: u64,
        u: u64,
        out: u64,
        n: usize,
        f: usize,
        ld: usize,
        ld_out: usize,
    ) -> Result<(), CudaError> {
        let (fi, ldi, ldo) = (dim(f), dim(ld), dim(ld_out));
        let mut l = self.stream.launch_builder(&self.silu_mul);
        l.arg(&g).arg(&u).arg(&out).arg(&fi).arg(&ldi).arg(&ldo);
        // SAFETY: one thread per value; each value is read before the same thread writes it.
        unsafe { l.launch(row_cols(n, f))? };
        Ok(())
    }

    /// `y[r, c] += b[c]` over `n` rows of `cols` (`ld` values apart: `cols` where contiguous),
    /// then ReLU if `relu`.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn bias_act_raw(
        &self,
        y: u64,
        b: u64,
        (n, cols, ld): (usize, usize, usize),
        relu: bool,
    ) -> Result<(), CudaError> {
        assert!(ld >= cols, "bias_act: rows {ld} apart hold {cols} values");
        let (ci, li, ri) = (dim(cols), dim(ld), i32::from(relu));
        let mut l = self.stream.launch_builder(&self.bias_act);
        l.arg(&y).arg(&b).arg(&ci).arg(&li).arg(&ri);
        // SAFETY: one thread per value of n rows of cols; b holds cols values.
        unsafe { l.launch(row_cols(n, cols))? };
        Ok(())
    }

    /// Splits the fused q/k/v GEMM output `y [b·t, h + 2·kv]` (adding `bias` where given, rotating
    /// q and k by `rope` = (positions `[b·t]` u32, inverse frequencies `[hd/2]` f32) where given): q·`scale` to
    /// `q [b, nh, t, hd]`; k and v of the first `new.gpu_rows` (sequence, head) rows to positions
    /// `past..past + t` of the caches `[gpu_rows, cap, hd]`, of the other rows to positions
    /// `new.past..new.past + t` of `new.k`/`new.v` (`[rows − gpu_rows, new.cap, hd]`). With
    /// `packs`, the new positions of cache rows `0..packs.quant.rows` are also packed into its
    /// caches at `past..past + t`, as [`Gpu::quant_cache`] would pack them.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub unsafe fn qkv_split(
        &self,
        y: u64,
        (bias, rope): (Option<u64>, Option<(u64, u64)>),
        q: u64,
        kc: u64,
        vc: u64,
        new: NewKv,
        packs: Option<SplitPack>,
        d: AttnDims,
        scale: f32,
    ) -> Result<(), CudaError> {
        assert!(d.past + d.t <= d.cap, "the cache holds every position");
        assert!(d.hd.is_multiple_of(2), "two values a thread");
        if let Some(p) = packs {
            assert!(Self::split_packs(p.quant), "4 bits in groups of 64 of heads of 64·n values");
            assert!(p.quant.hd == d.hd && p.quant.cap == d.cap, "the packed caches' shape");
            assert!(p.quant.rows <= d.b * d.nkv, "packed rows among the visit's");
        }
        assert!(new.past + d.t <= new.cap.max(d.t), "the new-row buffer holds every position");
        let (t, nh, nkv, hd, cap, past) =
            (dim(d.t), dim(d.nh), dim(d.nkv), dim(d.hd), dim(d.cap), dim(d.past));
        let (gr, ncap, npast) = (dim(new.gpu_rows), dim(new.cap), dim(new.past));
        let bias = bias.unwrap_or(0);
        let (pos, inv_freq) = rope.unwrap_or((0, 0));
        let mut l = self.stream.launch_builder(&self.qkv_split);
        l.arg(&y)
            .arg(&bias)
            .arg(&pos)
            .arg(&inv_freq)
            .arg(&q)
            .arg(&kc)
            .arg(&vc)
            .arg(&new.k)
            .arg(&new.v);
        l.arg(&gr).arg(&ncap).arg(&npast);
        l.arg(&t).arg(&nh).arg(&nkv).arg(&hd).arg(&cap).arg(&past).arg(&scale);
        let ((kq, kp), (vq, vp), qrows) =
            packs.map_or(((0, 0), (0, 0), 0), |p| (p.k, p.v, dim(p.quant.rows)));
        l.arg(&kq).arg(&kp).arg(&vq).arg(&vp).arg(&qrows);
        let pairs = (d.nh + 2 * d.nkv) * d.hd / 2;
        // SAFETY: one thread per two values of y; every write lands inside q, the caches, the
        // new-row buffers or the packed caches (positions checked above; the executor sizes the
        // buffers by rows).
        unsafe { l.launch(row_cols(d.b * d.t, pairs))? };
        Ok(())
    }

    /// Prefill attention of the (sequence, kv head) cache rows `rows` (with their `nh / nkv` query
    /// heads each) over caches laid out
    /// `[rows.len(), stride, hd]` (relative to `rows.start`) that hold `past + t` positions:
    /// scores by a batched GEMM into `scores` (an address and its room in values: as many rows
    /// at a time as it holds, each row's `nh / nkv · t · (past + t)`), the causal, left-padding
    /// softmax (`start[b]` = first real position), the context into `ctx [b, nh, t, hd]` at
    /// those rows. [`Gpu::merge_heads_raw`] then merges the heads.
    ///
    /// # Panics
    /// If `scores` has no room for one row's scores.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one attention")]
    pub unsafe fn attention_prefill(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        stride: usize,
        start: u64,
        (scores, room): (u64, usize),
        ctx: u64,
        d: AttnDims,
        rows_: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        assert!(d.nkv > 0 && d.nh.is_multiple_of(d.nkv), "query heads in whole groups");
        if rows_.is_empty() {
            return Ok(());
        }
        let rep = d.nh / d.nkv;
        let s = d.past + d.t;
        // The rep query heads of one kv row are adjacent in q [b, nh, t, hd]: one GEMM of
        // rep·t query rows per kv row.
        let m = rep * d.t;
        let per = room / (m * s).max(1);
        assert!(per > 0, "attention_prefill: {room} values of scores hold no row of {m}×{s}");
        let mut r0 = rows_.start;
        while r0 < rows_.end {
            let r1 = (r0 + per).min(rows_.end);
            let (k, v) = (
                at(kc, (r0 - rows_.start) * stride * d.hd),
                at(vc, (r0 - rows_.start) * stride * d.hd),
            );
            // SAFETY: the caller's contract, for rows r0..r1 of its rows; the scores hold them.
            unsafe {
                self.attention_prefill_rows(q, (k, v), stride, start, scores, ctx, d, r0..r1)
            }?;
            r0 = r1;
        }
        Ok(())
    }

    /// [`Gpu::attention_prefill`] of rows (at least one) whose scores all fit `scores` at once
    /// (`kc`, `vc` at `rows.start`).
    ///
    /// # Safety
    /// As [`Gpu::attention_prefill`].
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one attention")]
    unsafe fn attention_prefill_rows(
        &self,
        q: u64,
        (kc, vc): (u64, u64),
        stride: usize,
        start: u64,
        scores: u64,
        ctx: u64,
        d: AttnDims,
        rows_: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        let rep = d.nh / d.nkv;
        let s = d.past + d.t;
        let n = rows_.len();
        let m = rep * d.t;
        let (q, ctx) = (at(q, rows_.start * m * d.hd), at(ctx, rows_.start * m * d.hd));
        // SAFETY: the caller's addresses, at the caller's shapes (this fn's contract).
        unsafe {
            self.gemm(&Gemm {
                batch: n,
                m,
                n: s,
                k: d.hd,
                a: q,
                lda: d.hd,
                sa: m * d.hd,
                b: kc,
                ldb: d.hd,
                sb: stride * d.hd,
                b_t: true,
                c: scores,
                ldc: s,
                sc: m * s,
                beta: 0.0,
            })
        }?;
        let (nh, t, cols, past, row0) =
            (dim(d.nh), dim(d.t), dim(s), dim(d.past), dim(rows_.start * rep));
        let mut l = self.stream.launch_builder(&self.causal_softmax);
        l.arg(&scores).arg(&start).arg(&nh).arg(&t).arg(&cols).arg(&past).arg(&row0);
        // SAFETY: one block per (query row, query) of s scores.
        unsafe { l.launch(rows(n * m))? };
        // SAFETY: the caller's addresses, at the caller's shapes (this fn's contract).
        unsafe {
            self.gemm(&Gemm {
                batch: n,
                m,
                n: d.hd,
                k: s,
                a: scores,
                lda: s,
                sa: m * s,
                b: vc,
                ldb: d.hd,
                sb: stride * d.hd,
                b_t: false,
                c: ctx,
                ldc: d.hd,
                sc: m * d.hd,
                beta: 0.0,
            })
        }
    }

    /// `ctx [b, nh, t, hd]` → `out [b·t, nh·hd]`.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn merge_heads_raw(&self, ctx: u64, out: u64, d: AttnDims) -> Result<(), CudaError> {
        // SAFETY: the caller's addresses, at the caller's shapes (this fn's contract).
        unsafe { self.swap12_raw(ctx, out, [d.b, d.nh, d.t, d.hd]) }
    }

    /// `y [d0, d2, d1, d3]` from `x [d0, d1, d2, d3]`: axes 1 and 2 swapped (heads split or
    /// merged).
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn swap12_raw(
        &self,
        x: u64,
        y: u64,
        [d0, d1, d2, d3]: [usize; 4],
    ) -> Result<(), CudaError> {
        let (a, b, c, d) = (dim(d0), dim(d1), dim(d2), dim(d3));
        let mut l = self.stream.launch_builder(&self.swap12);
        l.arg(&x).arg(&y).arg(&a).arg(&b).arg(&c).arg(&d);
        // SAFETY: one block per row of d3 values of x; y has the size of x.
        unsafe { l.launch(rows(d0 * d1 * d2))? };
        Ok(())
    }

    /// Attention of one new position per sequence (decode) for the (sequence, kv head) cache rows
    /// `rows` and their `nh / nkv` query heads each, over caches `[rows.len(), cap, hd]` (relative
    /// to `rows.start`) holding `past + 1` positions: `q [b·nh, hd]` → `out [b·nh, hd]` (=
    /// `[b, nh·hd]`), at those rows' query rows.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one attention")]
    pub unsafe fn attention_decode(
        &self,
        q: u64,
        kc: u64,
        vc: u64,
        cap: usize,
        start: u64,
        out: u64,
        d: AttnDims,
        rows_: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        assert!(d.t == 1 && d.hd <= 256, "one query, head size ≤ 256");
        assert!(d.nkv > 0 && d.nh.is_multiple_of(d.nkv), "query heads in whole groups");
        if rows_.is_empty() {
            return Ok(());
        }
        let (cfg, rep, s) = decode_attention_launch(rows_.len(), d, 4);
        let (nh, hd, capi, si) = (dim(d.nh), dim(d.hd), dim(cap), dim(s));
        let (row0, repi) = (dim(rows_.start * rep), dim(rep));
        let mut l = self.stream.launch_builder(&self.decode_attention);
        l.arg(&q).arg(&kc).arg(&vc).arg(&start).arg(&out);
        l.arg(&nh).arg(&hd).arg(&capi).arg(&si).arg(&row0).arg(&repi);
        // SAFETY: one block per query row; reads s ≤ cap positions of its kv row.
        unsafe { l.launch(cfg)? };
        Ok(())
    }

    /// Whether [`Gpu::qkv_split`] packs the new positions into a packed cache of this layout
    /// itself ([`SplitPack`]): 4-bit codes in groups of 64 along heads of a multiple of 64
    /// values, so that a warp's 64 columns are one group.
    pub fn split_packs(c: CacheQuant) -> bool {
        c.bits == 4 && c.group == 64 && c.hd.is_multiple_of(64)
    }

    /// Whether [`Gpu::attention_decode_q4`] reads a packed cache of this layout: 4-bit codes,
    /// heads of 64 or 128 values, groups a multiple of a lane's values (hd/8).
    pub fn attention_q4_fits(c: CacheQuant) -> bool {
        c.bits == 4 && matches!(c.hd, 64 | 128) && c.group.is_multiple_of(c.hd / 8)
    }

    /// [`Gpu::attention_decode`] of the kv rows `0..rows` over a 4-bit packed
    /// cache read straight from its codes (`packed` = k codes, k pairs, v codes, v pairs, in
    /// `quant_cache`'s layout for `cap` positions, groups of `group`): positions `0..d.past` from
    /// the codes, the new one (`d.past`) from the fp16 working areas `work` (`[rows, cap, hd]`,
    /// where the q/k/v split wrote it). The same result as expanding the cache with
    /// `dequant_cache` into `work` and calling `attention_decode`, up to rounding (the values are
    /// not rounded to fp16 on the way).
    ///
    /// # Safety
    /// As [`Gpu::attention_decode`]; the layout must be one [`Gpu::attention_q4_fits`] accepts.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub unsafe fn attention_decode_q4(
        &self,
        q: u64,
        packed: [u64; 4],
        (kn, vn): (u64, u64),
        cap: usize,
        start: u64,
        out: u64,
        d: AttnDims,
        (rows, group): (usize, usize),
    ) -> Result<(), CudaError> {
        assert!(d.t == 1, "one query");
        assert!(d.nkv > 0 && d.nh.is_multiple_of(d.nkv), "query heads in whole groups");
        let fits = Self::attention_q4_fits(CacheQuant { rows: 0, cap, hd: d.hd, group, bits: 4 });
        assert!(fits, "attention_decode_q4: head {} in groups of {group}", d.hd);
        if rows == 0 {
            return Ok(());
        }
        let (cfg, rep, s) = decode_attention_launch(rows, d, q4_attention_warps());
        let (nh, hd, capi, si, repi, gs) =
            (dim(d.nh), dim(d.hd), dim(cap), dim(s), dim(rep), dim(group));
        let [kc, kp, vc, vp] = packed;
        let mut l = self.stream.launch_builder(&self.decode_attention_q4);
        l.arg(&q).arg(&kc).arg(&kp).arg(&vc).arg(&vp).arg(&kn).arg(&vn).arg(&start).arg(&out);
        l.arg(&nh).arg(&hd).arg(&capi).arg(&si).arg(&repi).arg(&gs);
        // SAFETY: one block per query row; reads s ≤ cap positions of its kv row.
        unsafe { l.launch(cfg)? };
        Ok(())
    }

    /// Row `t − 1` of each of `b` sequences of `x [b, t, h]` → `y [b, h]`.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn last_rows(
        &self,
        x: u64,
        y: u64,
        b: usize,
        t: usize,
        h: usize,
    ) -> Result<(), CudaError> {
        // SAFETY: the caller's addresses, at the caller's shapes (this fn's contract).
        unsafe { self.slice_axis1_raw(x, y, [b, t, h], t - 1..t) }
    }

    /// Positions `range` of `x [a, n, c]` → `y [a, range.len(), c]`.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn slice_axis1_raw(
        &self,
        x: u64,
        y: u64,
        [a, n, c]: [usize; 3],
        range: std::ops::Range<usize>,
    ) -> Result<(), CudaError> {
        assert!(range.end <= n, "slice within bounds");
        let (ai, ni, si, li, ci) = (dim(a), dim(n), dim(range.start), dim(range.len()), dim(c));
        let mut l = self.stream.launch_builder(&self.slice_axis1);
        l.arg(&x).arg(&y).arg(&ai).arg(&ni).arg(&si).arg(&li).arg(&ci);
        // SAFETY: one block per row of c values of y, reading inside x (checked above).
        unsafe { l.launch(rows(a * range.len()))? };
        Ok(())
    }

    /// Dequantizes rows `slice` of a `[rows, cols]` matrix packed by `flexgen_tensor::quant`
    /// along dimension 0 (`codes`, fp16 `params` pairs) into fp16 `out` (`[slice.len(), cols]`):
    /// `0..rows` for the whole matrix; a slice starts at a multiple of `group`.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    #[expect(clippy::too_many_arguments, reason = "addresses and sizes of one kernel")]
    pub unsafe fn dequant_dim0(
        &self,
        codes: u64,
        params: u64,
        out: u64,
        (rows_, cols): (usize, usize),
        slice: std::ops::Range<usize>,
        group: usize,
        bits: u8,
    ) -> Result<(), CudaError> {
        assert!(
            slice.start.is_multiple_of(group) && slice.start < slice.end && slice.end <= rows_,
            "dequant_dim0: rows {slice:?} of {rows_} in groups of {group}"
        );
        let (r, c, g, b) = (dim(rows_), dim(cols), dim(group), i32::from(bits));
        let (r0, r1) = (dim(slice.start), dim(slice.end));
        let mut l = self.stream.launch_builder(&self.dequant_dim0);
        l.arg(&codes).arg(&params).arg(&out).arg(&r).arg(&c).arg(&g).arg(&b).arg(&r0).arg(&r1);
        // SAFETY: grid-stride over the slice's groups; the packed buffers hold every group and
        // `out` every row of the slice (checked above).
        unsafe { l.launch(grid(slice.len().div_ceil(group) * cols))? };
        Ok(())
    }

    /// [`Gpu::dequant_dim0`] for a 4-bit weight `[rows, cols]` (outputs, inputs) in the tensor-core
    /// order ([`crate::quant::TcOrder`], which `gemm4_tc` reads): rows `slice` into fp16 `out`
    /// (`[slice.len(), cols]`), each value as `dequant_dim0` makes it.
    ///
    /// # Safety
    /// As [`Gpu::dequant_dim0`]; `codes` and `params` 16-byte aligned, `out` 4-byte aligned.
    pub unsafe fn dequant_tc(
        &self,
        (codes, params, out): (u64, u64, u64),
        (rows_, cols): (usize, usize),
        slice: std::ops::Range<usize>,
        group: usize,
    ) -> Result<(), CudaError> {
        assert!(
            crate::quant::TcOrder::new((rows_, cols), group).is_some()
                && slice.start.is_multiple_of(group)
                && slice.start < slice.end
                && slice.end <= rows_
                && codes.is_multiple_of(16)
                && params.is_multiple_of(16)
                && out.is_multiple_of(4),
            "dequant_tc: rows {slice:?} of {rows_} × {cols} in groups of {group}"
        );
        let (r, c, g) = (dim(rows_), dim(cols), dim(group));
        let (r0, r1) = (dim(slice.start), dim(slice.end));
        let mut l = self.stream.launch_builder(&self.dequant_tc);
        l.arg(&codes).arg(&params).arg(&out).arg(&r).arg(&c).arg(&g).arg(&r0).arg(&r1);
        // SAFETY: grid-stride over the slice's words of 8 rows × 16 columns × 4 lanes, inside
        // the weight's packed buffers and `out`'s rows of the slice (checked above).
        unsafe { l.launch(grid(slice.len().div_ceil(8) * cols / 4))? };
        Ok(())
    }

    /// `y[i] = (accumulate ? y[i] : 0) + s[i]` for `n` fp32 values `s` into fp16 `y` (rows of
    /// `cols`), and `s[i] = 0` after where `clear` (so that the next 4-bit product into `s` need
    /// not zero it: one launch fewer a product); then, where `bias` is not 0 or `relu`,
    /// [`Gpu::bias_act_raw`]'s step on the stored value in the same pass (the same two roundings).
    ///
    /// # Safety
    /// `s` and `y` must name `n` values of this device's memory and `bias` (unless 0) `cols`,
    /// alive until the compute stream has run the kernel.
    pub unsafe fn store_f32(
        &self,
        (s, y): (u64, u64),
        (n, cols): (usize, usize),
        (accumulate, clear): (bool, bool),
        (bias, relu): (u64, bool),
    ) -> Result<(), CudaError> {
        let (ni, acc, clr) = (dim(n), i32::from(accumulate), i32::from(clear));
        let (ci, ri) = (dim(cols.max(1)), i32::from(relu));
        let mut l = self.stream.launch_builder(&self.store_f32);
        l.arg(&s).arg(&y).arg(&ni).arg(&acc).arg(&clr).arg(&bias).arg(&ci).arg(&ri);
        // SAFETY: a grid-stride loop over n values of both buffers.
        unsafe { l.launch(LaunchConfig::for_num_elems(u32::try_from(n.max(1)).expect("fits")))? };
        Ok(())
    }

    /// `y` (fp32 `[nb, outs]`, zeroed here unless `zeroed` says it holds zeros already, as a
    /// scratch that [`Gpu::store_f32`] clears does) = `x` (fp16 `[nb, ins]`, row b at
    /// `x + b·ldx`) × Wᵀ for a 4-bit weight `w` (`group` a multiple of 8), without an fp16 copy of
    /// W: row tiles of at most 8, each one kernel ([`gemv4_plan`]) that splits the inputs over
    /// enough thread blocks to fill the device.
    ///
    /// # Safety
    /// Every address must name memory of this device that holds the elements the shapes imply
    /// (`codes` and `params` 4-byte aligned) and stays alive until the compute stream has run the
    /// kernels; `y` must not be read or written by other work on other streams meanwhile.
    pub unsafe fn gemv4_dim0(
        &self,
        w: Weight4,
        (x, ldx): (u64, usize),
        y: (u64, bool),
        nb: usize,
    ) -> Result<(), CudaError> {
        let Weight4 { codes, params, outs, ins, group, tc } = w;
        if tc {
            return Err(CudaError::Host(format!(
                "gemv4_dim0 reads dequant_dim0's layout, not the tensor-core order of this \
                 {outs} × {ins} weight (gemm4_tc did not take it: x at {x}, {ldx} apart)"
            )));
        }
        assert!(
            group.is_multiple_of(8) && codes.is_multiple_of(4) && params.is_multiple_of(4),
            "gemv4_dim0: group {group}, codes at {codes}, params at {params}"
        );
        let tiles = |rows| {
            let plan = gemv4_plan(rows, (outs, ins), group, codes, self.sms);
            (&self.gemv4_dim0[plan.kernel], plan.blocks, plan.slices, plan.per_slice, 0)
        };
        // SAFETY: threads < ⌈outs/group⌉·group/(8·V) and inputs < ins of the packed buffers
        // (V and the alignment it needs checked by the plan); the caller's buffers.
        unsafe { self.product4(w, (x, ldx), y, nb, (8, 256, tiles), None) }
    }

    /// The launches of a 4-bit product kernel (`gemv4_dim0_*`, `gemm4_tc_*`: the same
    /// parameters): `y` zeroed (unless it holds zeros already), then the rows in tiles of at most
    /// `tile` rows, each tile the kernel, blocks (of `threads`), slices and inputs per slice that
    /// `plan` gives for its rows (and the bytes of dynamic shared memory a block takes). `store`
    /// (`gemm4_tc_*` only, which take four more parameters): the fp16 output, bias, flags and
    /// counters of the store folded into the kernel, each tile its rows of the output (all 0: no
    /// store).
    ///
    /// # Safety
    /// As [`Gpu::gemv4_dim0`]; `plan`'s kernels read and write only inside the shapes given.
    unsafe fn product4<'k>(
        &self,
        w: Weight4,
        (x, ldx): (u64, usize),
        (y, zeroed): (u64, bool),
        nb: usize,
        (tile, threads, plan): (
            usize,
            u32,
            impl Fn(usize) -> (&'k CudaFunction, usize, usize, usize, u32),
        ),
        store: Option<(u64, u64, i32, u64)>,
    ) -> Result<(), CudaError> {
        let Weight4 { codes, params, outs, ins, group, .. } = w;
        if !zeroed {
            // SAFETY: `y` holds nb·outs fp32 values.
            unsafe {
                cudarc::driver::result::memset_d8_async(
                    y,
                    0,
                    nb * outs * 4,
                    self.stream.cu_stream(),
                )
            }?;
        }
        for b0 in (0..nb).step_by(tile) {
            let rows = (nb - b0).min(tile);
            let (f, blocks, slices, per_slice, smem) = plan(rows);
            let (o, i, lx, g, ps, tr) =
                (dim(outs), dim(ins), dim(ldx), dim(group), dim(per_slice), dim(rows));
            let cfg = LaunchConfig {
                grid_dim: (
                    u32::try_from(blocks).expect("outputs fit"),
                    u32::try_from(slices).expect("slices fit"),
                    1,
                ),
                block_dim: (threads, 1, 1),
                shared_mem_bytes: smem,
            };
            let (xt, yt) = (x + (b0 * ldx * 2) as u64, y + (b0 * outs * 4) as u64);
            let mut l = self.stream.launch_builder(f);
            l.arg(&codes)
                .arg(&params)
                .arg(&xt)
                .arg(&yt)
                .arg(&o)
                .arg(&i)
                .arg(&lx)
                .arg(&g)
                .arg(&tr)
                .arg(&ps);
            let st = store.map(|(out, bias, flags, done)| {
                (if out == 0 { 0 } else { out + (b0 * outs * 2) as u64 }, bias, flags, done)
            });
            if let Some((out, bias, flags, done)) = &st {
                l.arg(out).arg(bias).arg(flags).arg(done);
            }
            // SAFETY: as the caller promises; the tile's rows of x and y (and of the output).
            unsafe { l.launch(cfg)? };
        }
        Ok(())
    }

    /// `y[b, o] = Σ_i x[b, i] · W[o, i]` (fp32 `y [nb, outs]`, zeroed here unless it holds zeros
    /// already, as for [`Gpu::gemv4_dim0`]) for `nb` rows of x (row b at `x + b·ldx`) with W read
    /// from its 4-bit codes on the tensor cores (`gemm4_tc_*` of kernels.cu: codes a ring of
    /// cp.async stages brings in; each warp takes four tiles of 16 outputs × 16 inputs, for up to
    /// 8 rows as exact fp16 integers against x times the inputs' scales with x times the mins
    /// added after, for more rows expanded to min + code·scale), faster than `gemv4_dim0` from one
    /// row on; row tiles of at most 64 ([`gemm4_tc_plan`]). `None` (nothing launched) where the
    /// layout does not allow it ([`gemm4_tc_fits`]) or the device has no mma.sync (before 8.0).
    /// With `store`, the kernel also stores y into its fp16 output where the layout allows (outs a
    /// multiple of 4, the output 8-byte aligned): `Some(true)`, y left zeroed; else `Some(false)`,
    /// the sums in y for the caller to store.
    ///
    /// # Safety
    /// As [`Gpu::gemv4_dim0`]; `store`'s buffers as [`Store4`] says.
    pub unsafe fn gemm4_tc(
        &self,
        w: Weight4,
        (x, ldx): (u64, usize),
        y: (u64, bool),
        nb: usize,
        store: Option<Store4>,
    ) -> Result<Option<bool>, CudaError> {
        let Weight4 { codes, params, outs, ins, group, tc } = w;
        // The kernel counts (column, 64-input) units in an int.
        let units = outs.div_ceil(GEMM4_TC_OUTPUTS).saturating_mul(ins.div_ceil(64));
        if !self.tensor_cores
            || !tc
            || !gemm4_tc_fits((outs, ins, group), (codes, params), (x, ldx))
            || nb == 0
            || units >= i32::MAX as usize
        {
            return Ok(None);
        }
        let tiles = |rows| {
            let plan = self.gemm4_tc_plan(rows, (outs, ins));
            let k = plan.kernel;
            (&self.gemm4_tc[k], plan.blocks, plan.slices, plan.per_slice, self.gemm4_tc_ring[k])
        };
        // SAFETY: blocks of 256 outputs within ⌈outs/group⌉·group coded ones, inputs < ins, the
        // alignment the kernel needs checked by gemm4_tc_fits; the caller's buffers.
        let store = store.filter(|s| outs.is_multiple_of(4) && s.out.is_multiple_of(8));
        let args = store.map_or((0, 0, 0, 0), |s| {
            (s.out, s.bias, i32::from(s.accumulate) | i32::from(s.relu) << 1, s.done)
        });
        // SAFETY: as above; the store's buffers as the caller promises.
        unsafe { self.product4(w, (x, ldx), y, nb, (64, GEMM4_TC_THREADS, tiles), Some(args)) }?;
        Ok(Some(store.is_some()))
    }

    /// Whether this device runs [`Gpu::gemm4_tc`] (mma.sync: compute capability 8.0 on), so that
    /// 4-bit weights meant for it are best kept in the tensor-core order.
    pub fn tensor_cores(&self) -> bool {
        self.tensor_cores
    }

    /// The [`Gemm4TcPlan`] [`Gpu::gemm4_tc`] takes for a tile of `rows` on this device.
    pub fn gemm4_tc_plan(&self, rows: usize, (outs, ins): (usize, usize)) -> Gemm4TcPlan {
        gemm4_tc_plan(rows, (outs, ins), self.gemm4_tc_wave[gemm4_tc_kernel(rows)])
    }

    /// Dequantizes positions `p0..p0 + np` of a packed KV cache (`codes`, fp16 `params`; groups
    /// of `c.group` along the head dimension, see `kernels.cu`) into `out` `[rows, cap, hd]`.
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn dequant_cache(
        &self,
        codes: u64,
        params: u64,
        out: u64,
        c: CacheQuant,
        (p0, np): (usize, usize),
    ) -> Result<(), CudaError> {
        if np == 0 || c.rows == 0 {
            return Ok(()); // nothing to do (and a grid of no blocks is invalid)
        }
        let (r, cap, hd, gs, b, p0i, npi) =
            (dim(c.rows), dim(c.cap), dim(c.hd), dim(c.group), i32::from(c.bits), dim(p0), dim(np));
        let vec = i32::from(
            c.group.is_multiple_of(8)
                && c.hd.is_multiple_of(8)
                && codes.is_multiple_of(8)
                && out.is_multiple_of(16),
        );
        let mut l = self.stream.launch_builder(&self.dequant_cache);
        l.arg(&codes).arg(&params).arg(&out).arg(&r).arg(&cap).arg(&hd).arg(&gs).arg(&b);
        l.arg(&p0i).arg(&npi).arg(&vec);
        assert!(p0 + np <= c.cap, "positions inside the cache");
        let per_row = np * c.hd.div_ceil(8); // threads per row
        let cfg = LaunchConfig {
            grid_dim: (
                u32::try_from(per_row.div_ceil(256).min(1 << 16)).expect("fits"),
                u32::try_from(c.rows.min(65_535)).expect("fits"),
                1,
            ),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: rows along y, (position, 8 values) along x, both grid-strided, inside
        // [rows, cap, hd]; p0 + np ≤ cap; the vector path only on aligned addresses.
        unsafe { l.launch(cfg)? };
        Ok(())
    }

    /// Quantizes positions `p0..p0 + np` of `x` `[rows, cap, hd]` into a packed KV cache
    /// (`codes`, `params`), exactly as `flexgen_tensor::quant` does, for each `(x, codes, params)`
    /// of `caches` (k and v: one launch).
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn quant_cache(
        &self,
        caches: &[(u64, u64, u64)],
        c: CacheQuant,
        (p0, np): (usize, usize),
    ) -> Result<(), CudaError> {
        assert!(caches.len() <= 2, "k and v at most");
        let (Some(&(x, codes, params)), Some(&(x1, codes1, params1))) =
            (caches.first(), caches.last())
        else {
            return Ok(()); // no cache
        };
        if np == 0 || c.rows == 0 {
            return Ok(()); // nothing to do (and a grid of no blocks is invalid)
        }
        assert!(p0 + np <= c.cap, "positions inside the cache");
        let groups = c.hd.div_ceil(c.group);
        let warps = c.rows * np * groups;
        let (r, cap, hd, gs, b, p0i, npi) =
            (dim(c.rows), dim(c.cap), dim(c.hd), dim(c.group), i32::from(c.bits), dim(p0), dim(np));
        let mut l = self.stream.launch_builder(&self.quant_cache);
        l.arg(&x).arg(&codes).arg(&params).arg(&x1).arg(&codes1).arg(&params1);
        l.arg(&r).arg(&cap).arg(&hd).arg(&gs).arg(&b).arg(&p0i).arg(&npi);
        let sets = u32::try_from(caches.len()).expect("fits");
        let cfg = LaunchConfig {
            grid_dim: (u32::try_from(warps.div_ceil(8)).expect("fits"), sets, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        // SAFETY: one warp per group of the positions, each writing its own codes and params.
        unsafe { l.launch(cfg)? };
        Ok(())
    }

    /// The index of the largest value of each of `n` rows of `cols` → `out` (u32).
    ///
    /// # Safety
    /// Every address must name memory of this device (or, where the kernel says so, mapped
    /// pinned host memory) that holds the elements the shapes imply and stays alive until the
    /// compute stream has run the kernel; buffers a kernel writes must not be read or written
    /// by other work on other streams meanwhile.
    pub unsafe fn argmax_rows(
        &self,
        x: u64,
        out: u64,
        n: usize,
        cols: usize,
    ) -> Result<(), CudaError> {
        let ci = dim(cols);
        let mut l = self.stream.launch_builder(&self.argmax_rows);
        l.arg(&x).arg(&out).arg(&ci);
        // SAFETY: one block of 256 threads per row (the kernel's reduction needs exactly that).
        unsafe { l.launch(rows(n))? };
        Ok(())
    }
}

/// The launch of a decode attention kernel over `rows` kv rows (`d.nh / d.nkv` query rows each, a
/// block of `warps` warps per query row, shared memory for the `d.past + 1` scores and each warp's
/// part of the output), with the query heads per kv head and the positions attended.
fn decode_attention_launch(rows: usize, d: AttnDims, warps: usize) -> (LaunchConfig, usize, usize) {
    let (rep, s) = (d.nh / d.nkv, d.past + 1);
    let cfg = LaunchConfig {
        grid_dim: (u32::try_from(rows * rep).expect("fits"), 1, 1),
        block_dim: (u32::try_from(32 * warps).expect("fits"), 1, 1),
        shared_mem_bytes: u32::try_from((s + warps * d.hd) * 4).expect("fits"),
    };
    (cfg, rep, s)
}

/// Warps of a `decode_attention_q4` block: 4, or `FLEXGEN_Q4_WARPS` (1 to 32) to compare.
fn q4_attention_warps() -> usize {
    static WARPS: std::sync::OnceLock<usize> = std::sync::OnceLock::new();
    *WARPS.get_or_init(|| {
        let v = std::env::var("FLEXGEN_Q4_WARPS").ok().and_then(|v| v.parse().ok());
        v.filter(|w| (1..=32).contains(w)).unwrap_or(4)
    })
}

/// The most device memory a [`Gpu`]'s cuBLASLt handle takes as its workspace (on Hopper; 4 MiB
/// before): the memory plan counts it.
pub const LT_WORKSPACE_MAX: usize = 32 << 20;

/// Values a thread of `layer_norm` holds in registers (kernels.cu's `LN_PER`): a row of up to
/// `LN_PER` × its threads is read once.
pub const LN_PER: usize = 12;

/// [`LN_PER`] of `layer_norm_rows`, the kernel [`Gpu::norm_raw`] takes for 256 rows
/// and more (kernels.cu's `LN_PER_ROWS`).
pub const LN_PER_ROWS: usize = 16;

/// Threads per row [`Gpu::norm_raw`] gives `n` rows of `h` values: many rows fill the device with
/// 256 threads a row, or as many more as hold a row in registers ([`LN_PER_ROWS`] values a
/// thread); a decode step's few rows get about eight values per thread, so that each block (and
/// so the kernel) is short.
pub fn norm_threads(n: usize, h: usize) -> usize {
    if n >= MANY_ROWS {
        h.div_ceil(LN_PER_ROWS).next_multiple_of(32).clamp(256, 1024)
    } else {
        h.div_ceil(8).next_multiple_of(32).clamp(128, 1024)
    }
}

/// Whether [`Gpu::gemm4_tc`] runs on a 4-bit weight `[outs, ins]` in groups of `group` (64 or
/// 128, so that a warp's 64 outputs share their scales; `ins` a multiple of 16: the tensor-core
/// order applies, [`crate::quant::TcOrder::new`]) whose codes and pairs are 16-byte aligned, with
/// x 16-byte aligned and `ldx` a multiple of 8.
pub fn gemm4_tc_fits(
    (outs, ins, group): (usize, usize, usize),
    (codes, params): (u64, u64),
    (x, ldx): (u64, usize),
) -> bool {
    crate::quant::TcOrder::new((outs, ins), group).is_some()
        && codes.is_multiple_of(16)
        && params.is_multiple_of(16)
        && x.is_multiple_of(16)
        && ldx.is_multiple_of(8)
}

/// Threads of a `gemm4_tc_*` block (four warps of 64 outputs).
pub const GEMM4_TC_THREADS: u32 = 128;

/// Outputs of a `gemm4_tc_*` block (`GT_O`).
pub const GEMM4_TC_OUTPUTS: usize = 256;

/// How [`Gpu::gemm4_tc`] runs a tile of `rows` (1 to 64): the kernel (`gemm4_tc_1`, `_2`, `_4`,
/// `_8` for 8, 16, 32, 64 rows; index 0 to 3), a block of [`GEMM4_TC_THREADS`] per 256 outputs, and the
/// inputs in slices of `per_slice` (a multiple of 64) over the grid's y.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemm4TcPlan {
    pub kernel: usize,
    pub blocks: usize,
    pub slices: usize,
    pub per_slice: usize,
}

/// The kernel index of [`Gemm4TcPlan`] for a tile of `rows`.
pub fn gemm4_tc_kernel(rows: usize) -> usize {
    match rows {
        0..=8 => 0,
        9..=16 => 1,
        17..=32 => 2,
        _ => 3,
    }
}

/// The [`Gemm4TcPlan`] for `rows` on a device where `wave` blocks of the kernel run at once
/// (blocks per multiprocessor × multiprocessors): the fewest slices among those that give the
/// least time in whole waves (a last wave that is mostly empty costs as much as a full one),
/// a block's time counted as its 64-input steps plus its sums added to the output (each slice
/// adds 256 × `rows` of them; taken as an eighth of a step per row: session 15, 39 slices of
/// OPT-175B's fc1 at 32 rows ran slower than 2).
pub fn gemm4_tc_plan(rows: usize, (outs, ins): (usize, usize), wave: usize) -> Gemm4TcPlan {
    let blocks = outs.div_ceil(GEMM4_TC_OUTPUTS);
    let steps = ins.div_ceil(64).max(1);
    let wave = wave.max(1);
    let cost = |sl: usize| (blocks * sl).div_ceil(wave) * (8 * steps.div_ceil(sl) + rows);
    let best = (1..=steps.min(64)).min_by_key(|&sl| (cost(sl), sl)).unwrap_or(1);
    let per_slice = steps.div_ceil(best) * 64;
    Gemm4TcPlan {
        kernel: gemm4_tc_kernel(rows),
        blocks,
        slices: ins.div_ceil(per_slice).max(1),
        per_slice,
    }
}

/// How [`Gpu::gemv4_dim0`] runs a tile of `rows` (1 to 8): the kernel (`gemv4_dim0_1`, `_2`, `_4`
/// or `_8` of kernels.cu, index 0 to 3), thread blocks of 256 over the outputs, and the inputs'
/// slices (`per_slice` inputs each, a multiple of 4) over the grid's y.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Gemv4Plan {
    pub kernel: usize,
    /// Code words each thread loads per input (V).
    pub words: usize,
    pub blocks: usize,
    pub slices: usize,
    pub per_slice: usize,
}

/// The [`Gemv4Plan`] for `rows` on a device of `sms` multiprocessors: the smallest kernel whose
/// tile holds the rows; the 1- and 2-row kernels load 4 and 2 code words per thread where the
/// weight is wide enough to keep the device busy that way (at least 32768 and 16384 outputs) and
/// `group` and `codes` allow it (a multiple of 32 or 16 values, 16- or 8-byte aligned), else one
/// word (the 4-row kernel). About four thread blocks per multiprocessor over outputs and slices,
/// each slice at least 128 inputs (every slice adds its sums to each output atomically).
pub fn gemv4_plan(
    rows: usize,
    (outs, ins): (usize, usize),
    group: usize,
    codes: u64,
    sms: usize,
) -> Gemv4Plan {
    let fits = |v: usize| group.is_multiple_of(8 * v) && codes.is_multiple_of(4 * v as u64);
    let (kernel, words) = match rows {
        1 if outs >= 32768 && fits(4) => (0, 4),
        1 | 2 if outs >= 16384 && fits(2) => (1, 2),
        1..=4 => (2, 1),
        _ => (3, 1),
    };
    let threads = outs.div_ceil(group) * (group / (8 * words));
    let blocks = threads.div_ceil(256);
    let slices = (4 * sms).div_ceil(blocks).clamp(1, (ins / 128).max(1));
    let per_slice = ins.div_ceil(slices).next_multiple_of(4).max(4);
    Gemv4Plan { kernel, words, blocks, slices: ins.div_ceil(per_slice).max(1), per_slice }
}
