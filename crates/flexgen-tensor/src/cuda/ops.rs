//! The decoder's operations on the GPU, in fp16 with fp32 accumulation: cuBLAS for the GEMMs,
//! NVRTC-compiled kernels (`kernels.cu`) for embedding, LayerNorm, bias + ReLU, residual add, the
//! head split/merge and the masked softmax. Each matches the CPU operation of the same name in
//! `flexgen-tensor` (checked by `examples/cuda_check.rs` on a GPU machine).

use std::sync::Arc;

use cudarc::cublas::CudaBlas;
use cudarc::driver::{CudaFunction, CudaModule, LaunchConfig, PushKernelArg};
use half::f16;

use super::exec::{addr, i64_of};
use super::{CudaContext, CudaError, CudaSlice, CudaStream, dim};
use crate::Tensor;

/// A dense row-major fp16 tensor in device memory.
pub struct GpuTensor {
    pub data: CudaSlice<f16>,
    pub shape: Vec<usize>,
}

impl GpuTensor {
    /// Number of elements.
    pub fn elem_count(&self) -> usize {
        self.shape.iter().product()
    }

    /// The same data viewed with another shape of equal size.
    #[must_use]
    pub fn reshaped(self, shape: &[usize]) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            self.elem_count(),
            "reshape must keep the size"
        );
        Self { data: self.data, shape: shape.to_vec() }
    }
}

/// A device with its compute stream, cuBLAS handle and compiled kernels.
pub struct Gpu {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub(super) blas: CudaBlas,
    /// cuBLASLt, for GEMMs with their bias (and ReLU) fused (`None` without the library).
    pub(super) lt: Option<super::lt::Lt>,
    _module: Arc<CudaModule>,
    pub(super) embed: CudaFunction,
    pub(super) layer_norm: CudaFunction,
    pub(super) layer_norm_rows: CudaFunction,
    pub(super) bias_act: CudaFunction,
    add: CudaFunction,
    pub(super) swap12: CudaFunction,
    softmax: CudaFunction,
    cat_axis1: CudaFunction,
    pub(super) slice_axis1: CudaFunction,
    pub(super) qkv_split: CudaFunction,
    pub(super) causal_softmax: CudaFunction,
    pub(super) decode_attention: CudaFunction,
    pub(super) decode_attention_q4: CudaFunction,
    pub(super) argmax_rows: CudaFunction,
    pub(super) dequant_dim0: CudaFunction,
    pub(super) dequant_tc: CudaFunction,
    /// `gemv4_dim0_{1,2,4,8}`: tiles of at most that many rows.
    pub(super) gemv4_dim0: [CudaFunction; 4],
    /// `gemm4_tc_{1,2,4,8}`: tiles of at most 8, 16, 32, 64 rows (they run from compute
    /// capability 8.0 on: `tensor_cores`).
    pub(super) gemm4_tc: [CudaFunction; 4],
    /// Whether the device has the mma.sync m16n8k16 fp16 instructions (compute capability ≥ 8.0).
    pub(super) tensor_cores: bool,
    /// The device's multiprocessors.
    pub(super) sms: usize,
    /// Blocks of each `gemm4_tc` kernel that run at once on the device (a wave).
    pub(super) gemm4_tc_wave: [usize; 4],
    /// The bytes of each `gemm4_tc` kernel's ring (its dynamic shared memory), as kernels.cu's
    /// `gemm4_tc_ring` gives them for the defines it was built with.
    pub(super) gemm4_tc_ring: [u32; 4],
    pub(super) dequant_cache: CudaFunction,
    pub(super) quant_cache: CudaFunction,
    pub(super) silu_mul: CudaFunction,
    rotary: CudaFunction,
    repeat_heads: CudaFunction,
    pub(super) copy_bytes: CudaFunction,
    pub(super) store_f32: CudaFunction,
}

const KERNELS: &str = include_str!("kernels.cu");

/// The compute capabilities the kernels are compiled for, and NVRTC's name of each: 9.0 (H100,
/// H200) as `sm_90a`, whose warpgroup products (wgmma) the 4-bit product's 16- to 64-row tiles
/// take (kernels.cu, `GT_WGMMA`; the code runs on 9.0 only, the one device it is compiled for at
/// run time).
const ARCHS: [((i32, i32), &str); 7] = [
    ((7, 5), "compute_75"),
    ((8, 0), "compute_80"),
    ((8, 6), "compute_86"),
    ((8, 9), "compute_89"),
    ((9, 0), "compute_90a"),
    ((10, 0), "compute_100"),
    ((12, 0), "compute_120"),
];

fn arch(major: i32, minor: i32) -> Option<&'static str> {
    ARCHS.iter().find(|(cc, _)| *cc == (major, minor)).map(|(_, name)| *name)
}

pub(super) fn grid(n: usize) -> LaunchConfig {
    let blocks = u32::try_from(n.div_ceil(256).clamp(1, 1 << 30)).expect("clamped");
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Rows at or above which a row kernel gets one block per row (enough blocks to fill the device);
/// below, one block per 256 columns of each row (`kernels.cu`, `ROW_COLS`).
pub(super) const MANY_ROWS: usize = 256;

/// The launch of a `ROW_COLS` kernel over `n` rows of `cols` (`kernels.cu`): `blockIdx.x` the row,
/// `blockIdx.y` the block of 256 columns, one block per row from [`MANY_ROWS`] rows on.
pub(super) fn row_cols(n: usize, cols: usize) -> LaunchConfig {
    let col_blocks = if n >= MANY_ROWS { 1 } else { cols.div_ceil(256).max(1) };
    LaunchConfig {
        grid_dim: (
            u32::try_from(n.max(1)).expect("rows fit in u32"),
            u32::try_from(col_blocks).expect("columns fit in u32"),
            1,
        ),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

pub(super) fn rows(n: usize) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (u32::try_from(n).expect("rows fit in u32"), 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// `values` rounded to fp16, on all cores.
fn to_f16(values: &[f32]) -> Vec<f16> {
    let mut host = vec![f16::ZERO; values.len()];
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let chunk = values.len().div_ceil(threads).max(1 << 16);
    std::thread::scope(|scope| {
        for (src, dst) in values.chunks(chunk).zip(host.chunks_mut(chunk)) {
            scope.spawn(move || {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d = f16::from_f32(*s);
                }
            });
        }
    });
    host
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels for it.
    /// Milliseconds per call of `f` on the compute stream: the median of `runs` after a
    /// warm-up call (for the check and benchmark programs).
    ///
    /// # Panics
    /// If the stream cannot be synchronized.
    pub fn time_ms(&self, runs: usize, mut f: impl FnMut()) -> f64 {
        f();
        self.stream.synchronize().expect("synchronizing the compute stream");
        let mut v: Vec<f64> = (0..runs.max(1))
            .map(|_| {
                let t = std::time::Instant::now();
                f();
                self.stream.synchronize().expect("synchronizing the compute stream");
                t.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }

    pub fn new(ordinal: usize) -> Result<Self, CudaError> {
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(CudaError::Missing("libnvrtc"));
        }
        let ctx = super::open(ordinal)?;
        let (major, minor) = ctx.compute_capability()?;
        // FLEXGEN_NVRTC_DEFINES="NAME=VALUE …": a kernel's tuning constants overridden (the ones
        // kernels.cu leaves to `#ifndef`), for measuring variants without a rebuild.
        let defines = std::env::var("FLEXGEN_NVRTC_DEFINES").unwrap_or_default();
        let opts = cudarc::nvrtc::CompileOptions {
            arch: arch(major, minor),
            options: defines.split_whitespace().map(|d| format!("-D{d}")).collect(),
            ..Default::default()
        };
        let ptx = cudarc::nvrtc::compile_ptx_with_opts(KERNELS, opts)
            .map_err(|e| CudaError::Compile(e.to_string()))?;
        let module = ctx.load_module(ptx)?;
        let f = |name: &str| module.load_function(name);
        let stream = ctx.new_stream()?;
        let sms = usize::try_from(ctx.attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )?)
        .unwrap_or(1)
        .max(1);
        let gemm4_tc = [f("gemm4_tc_1")?, f("gemm4_tc_2")?, f("gemm4_tc_4")?, f("gemm4_tc_8")?];
        let ring_bytes = module.get_global("gemm4_tc_ring", &stream)?;
        let mut bytes = [0u8; 16];
        if ring_bytes.len() != bytes.len() {
            return Err(CudaError::Compile("kernels.cu's gemm4_tc_ring is not 4 values".into()));
        }
        stream.memcpy_dtoh(&ring_bytes, &mut bytes)?;
        let gemm4_tc_ring: [u32; 4] = std::array::from_fn(|i| {
            u32::from_le_bytes([bytes[4 * i], bytes[4 * i + 1], bytes[4 * i + 2], bytes[4 * i + 3]])
        });
        let mut gemm4_tc_wave = [sms; 4];
        for ((w, k), &ring) in gemm4_tc_wave.iter_mut().zip(&gemm4_tc).zip(&gemm4_tc_ring) {
            // A ring above the 48 KB a block gets unasked (only with FLEXGEN_NVRTC_DEFINES'
            // GT_STAGES or GT_K: the built-in rings fit in 48 KB).
            if ring > 48 << 10 {
                k.set_attribute(
                    cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
                    i32::try_from(ring).unwrap_or(i32::MAX),
                )
                .map_err(|e| {
                    CudaError::Compile(format!(
                        "gemm4_tc's ring of {ring} bytes of shared memory, more than this GPU \
                         gives a block? (FLEXGEN_NVRTC_DEFINES' GT_STAGES or GT_K): {e}"
                    ))
                })?;
            }
            let per_sm = k.occupancy_max_active_blocks_per_multiprocessor(
                super::exec::GEMM4_TC_THREADS,
                ring as usize,
                None,
            )?;
            *w = sms * usize::try_from(per_sm).unwrap_or(1).max(1);
        }
        Ok(Self {
            tensor_cores: major >= 8,
            sms,
            gemm4_tc_wave,
            gemm4_tc_ring,
            blas: CudaBlas::new(stream.clone())?,
            lt: super::lt::Lt::new(&stream, major)?,
            embed: f("embed")?,
            layer_norm: f("layer_norm")?,
            layer_norm_rows: f("layer_norm_rows")?,
            bias_act: f("bias_act")?,
            add: f("add")?,
            swap12: f("swap12")?,
            softmax: f("masked_softmax")?,
            cat_axis1: f("cat_axis1")?,
            slice_axis1: f("slice_axis1")?,
            qkv_split: f("qkv_split")?,
            causal_softmax: f("causal_softmax")?,
            decode_attention: f("decode_attention")?,
            decode_attention_q4: f("decode_attention_q4")?,
            argmax_rows: f("argmax_rows")?,
            dequant_dim0: f("dequant_dim0")?,
            dequant_tc: f("dequant_tc")?,
            gemv4_dim0: [
                f("gemv4_dim0_1")?,
                f("gemv4_dim0_2")?,
                f("gemv4_dim0_4")?,
                f("gemv4_dim0_8")?,
            ],
            gemm4_tc,
            dequant_cache: f("dequant_cache")?,
            quant_cache: f("quant_cache")?,
            silu_mul: f("silu_mul")?,
            rotary: f("rotary")?,
            repeat_heads: f("repeat_heads")?,
            copy_bytes: f("copy_bytes")?,
            store_f32: f("store_f32")?,
            _module: module,
            ctx,
            stream,
        })
    }

    /// Copies a CPU tensor (any float dtype) to the device as fp16, converting on all cores (an
    /// fp16 tensor as it is).
    pub fn upload(&self, t: &Tensor) -> Result<GpuTensor, CudaError> {
        let host = if t.dtype() == crate::DType::F16 {
            t.flatten_all().and_then(|f| f.to_vec1::<f16>())
        } else {
            t.flatten_all()
                .and_then(|f| f.to_dtype(crate::DType::F32))
                .and_then(|f| f.to_vec1())
                .map(|values: Vec<f32>| to_f16(&values))
        }
        .map_err(|e| CudaError::Host(e.to_string()))?;
        Ok(GpuTensor { data: self.stream.clone_htod(&host)?, shape: t.dims().to_vec() })
    }

    /// Copies a device tensor back as an f32 CPU tensor.
    pub fn download(&self, g: &GpuTensor) -> Result<Tensor, CudaError> {
        let host: Vec<f32> =
            self.stream.clone_dtoh(&g.data)?.into_iter().map(f16::to_f32).collect();
        Tensor::from_vec(host, g.shape.clone(), &crate::Device::Cpu)
            .map_err(|e| CudaError::Host(e.to_string()))
    }

    /// An uninitialized output; every operation here writes all of its output.
    fn output(&self, shape: &[usize]) -> Result<GpuTensor, CudaError> {
        let n = shape.iter().product::<usize>().max(1);
        // SAFETY: callers overwrite every element before it is read.
        Ok(GpuTensor { data: unsafe { self.stream.alloc::<f16>(n)? }, shape: shape.to_vec() })
    }

    /// Token (+ position) embedding: `ids` and `positions` are row-major `[b, t]`.
    pub fn embedding(
        &self,
        ids: &[u32],
        positions: &[u32],
        shape: (usize, usize),
        table: &GpuTensor,
        pos_table: Option<&GpuTensor>,
    ) -> Result<GpuTensor, CudaError> {
        let h = table.shape[1];
        let n = shape.0 * shape.1;
        assert_eq!((ids.len(), positions.len()), (n, n), "one id and one position per token");
        let ids = self.stream.clone_htod(ids)?;
        let pos = self.stream.clone_htod(positions)?;
        let out = self.output(&[shape.0, shape.1, h])?;
        let pos_table = pos_table.map(|p| addr(&p.data));
        // SAFETY: addresses of these tensors, whose shapes were checked above.
        unsafe {
            self.embed_raw(
                addr(&ids),
                addr(&pos),
                addr(&table.data),
                pos_table,
                addr(&out.data),
                n,
                h,
            )
        }?;
        Ok(out)
    }

    /// LayerNorm (with a bias) or RMSNorm (without) over the last dimension.
    pub fn norm(
        &self,
        x: &GpuTensor,
        w: &GpuTensor,
        b: Option<&GpuTensor>,
        eps: f64,
    ) -> Result<GpuTensor, CudaError> {
        let h = *x.shape.last().expect("non-empty shape");
        let y = self.output(&x.shape)?;
        #[expect(clippy::cast_possible_truncation, reason = "eps is a small float")]
        let eps = eps as f32;
        let (xa, wa, ya) = (addr(&x.data), addr(&w.data), addr(&y.data));
        let ba = b.map(|b| addr(&b.data));
        // SAFETY: addresses of these tensors; y has x's shape.
        unsafe { self.norm_raw(xa, None, wa, ba, ya, x.elem_count() / h, h, eps) }?;
        Ok(y)
    }

    /// `x · wᵀ + b`, then ReLU if `relu`: `x` is `[.., in]`, `w` is `[out, in]`.
    pub fn linear(
        &self,
        x: &GpuTensor,
        w: &GpuTensor,
        b: Option<&GpuTensor>,
        relu: bool,
    ) -> Result<GpuTensor, CudaError> {
        let k = *x.shape.last().expect("non-empty shape");
        let m = x.elem_count() / k;
        let n = w.shape[0];
        let mut shape = x.shape.clone();
        *shape.last_mut().expect("non-empty") = n;
        let mut y = self.output(&shape)?;
        super::gemm_f16_nt(&self.blas, m, n, k, &x.data, &w.data, &mut y.data)?;
        if b.is_some() || relu {
            // A null bias adds nothing; the kernel checks.
            // SAFETY: addresses of these tensors, whose shapes were checked above.
            unsafe {
                self.bias_act_raw(addr(&y.data), b.map_or(0, |b| addr(&b.data)), (m, n, n), relu)
            }?;
        }
        Ok(y)
    }

    /// `a + b`, elementwise.
    pub fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor, CudaError> {
        assert_eq!(a.shape, b.shape, "add needs equal shapes");
        let mut out = self.output(&a.shape)?;
        let n = i64_of(a.elem_count());
        let mut l = self.stream.launch_builder(&self.add);
        l.arg(&a.data).arg(&b.data).arg(&mut out.data).arg(&n);
        // SAFETY: grid-stride over n values of three equal buffers.
        unsafe { l.launch(grid(a.elem_count()))? };
        Ok(out)
    }

    /// Swaps axes 1 and 2 of a 4-d tensor: `[b, t, nh, hd]` ↔ `[b, nh, t, hd]`.
    pub fn swap12(&self, x: &GpuTensor) -> Result<GpuTensor, CudaError> {
        let dims = <[usize; 4]>::try_from(x.shape.as_slice()).expect("a 4-d tensor");
        self.swap12_dims(&x.data, dims)
    }

    /// [`Gpu::swap12`] of `data` read with the shape `dims`.
    fn swap12_dims(
        &self,
        data: &CudaSlice<f16>,
        [d0, d1, d2, d3]: [usize; 4],
    ) -> Result<GpuTensor, CudaError> {
        assert!(data.len() >= d0 * d1 * d2 * d3, "data holds the shape");
        let y = self.output(&[d0, d2, d1, d3])?;
        // SAFETY: addresses of these tensors, whose shapes were checked above.
        unsafe { self.swap12_raw(addr(data), addr(&y.data), [d0, d1, d2, d3]) }?;
        Ok(y)
    }

    /// `softmax(q·kᵀ·scale + bias)·v` for `q` `[b, nh, t, hd]`, `k`/`v` `[b, nh, s, hd]`, and an
    /// additive fp32 `bias` `[b, t, s]` (row-major, shared by the heads).
    pub fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        bias: &CudaSlice<f32>,
        scale: f64,
    ) -> Result<GpuTensor, CudaError> {
        let [b, nh, t, hd] = <[usize; 4]>::try_from(q.shape.as_slice()).expect("q is 4-d");
        let s = k.shape[2];
        assert_eq!(bias.len(), b * t * s, "bias is [b, t, s]");
        let mut scores = self.output(&[b, nh, t, s])?;
        super::gemm_f16_nt_batched(
            &self.blas,
            b * nh,
            t,
            s,
            hd,
            &q.data,
            &k.data,
            &mut scores.data,
        )?;
        #[expect(clippy::cast_possible_truncation, reason = "the scale is 1/sqrt(head size)")]
        let scale = scale as f32;
        let (heads, queries, cols) = (dim(nh), dim(t), dim(s));
        let mut l = self.stream.launch_builder(&self.softmax);
        l.arg(&mut scores.data).arg(bias).arg(&heads).arg(&queries).arg(&cols).arg(&scale);
        // SAFETY: one block per (b, head, query) row of s scores; bias holds b·t·s values.
        unsafe { l.launch(rows(b * nh * t))? };
        let mut out = self.output(&[b, nh, t, hd])?;
        super::gemm_f16_batched(
            &self.blas,
            b * nh,
            (t, hd, s),
            &scores.data,
            &v.data,
            &mut out.data,
            false,
        )?;
        Ok(out)
    }

    /// `[a, n1, c]` followed by `[a, n2, c]` along axis 1.
    pub fn cat_axis1(
        &self,
        x1: &GpuTensor,
        x2: &GpuTensor,
        a: usize,
        c: usize,
    ) -> Result<GpuTensor, CudaError> {
        let (n1, n2) = (x1.elem_count() / (a * c), x2.elem_count() / (a * c));
        let mut y = self.output(&[a, n1 + n2, c])?;
        let cfg = rows(a * (n1 + n2));
        let (ai, n1i, n2i, ci) = (dim(a), dim(n1), dim(n2), dim(c));
        let mut l = self.stream.launch_builder(&self.cat_axis1);
        l.arg(&x1.data).arg(&x2.data).arg(&mut y.data).arg(&ai).arg(&n1i).arg(&n2i).arg(&ci);
        // SAFETY: one block per row of c values of y; the inputs hold a·n1·c and a·n2·c.
        unsafe { l.launch(cfg)? };
        Ok(y)
    }

    /// Positions `start..start + len` of an `[a, n, c]` tensor.
    pub fn slice_axis1(
        &self,
        x: &GpuTensor,
        a: usize,
        c: usize,
        start: usize,
        len: usize,
    ) -> Result<GpuTensor, CudaError> {
        let n = x.elem_count() / (a * c);
        let y = self.output(&[a, len, c])?;
        // SAFETY: addresses of these tensors, whose shapes were checked above.
        unsafe {
            self.slice_axis1_raw(addr(&x.data), addr(&y.data), [a, n, c], start..start + len)
        }?;
        Ok(y)
    }
}

impl crate::backend::Backend for Gpu {
    type T = GpuTensor;
    type Bias = CudaSlice<f32>;
    type Error = CudaError;

    fn linear(
        &self,
        x: &GpuTensor,
        w: &GpuTensor,
        b: Option<&GpuTensor>,
        relu: bool,
    ) -> Result<GpuTensor, CudaError> {
        Gpu::linear(self, x, w, b, relu)
    }

    fn layer_norm(
        &self,
        x: &GpuTensor,
        w: &GpuTensor,
        b: &GpuTensor,
        eps: f64,
    ) -> Result<GpuTensor, CudaError> {
        self.norm(x, w, Some(b), eps)
    }

    fn rms_norm(&self, x: &GpuTensor, w: &GpuTensor, eps: f64) -> Result<GpuTensor, CudaError> {
        self.norm(x, w, None, eps)
    }

    fn rotary(
        &self,
        x: &GpuTensor,
        cos: &GpuTensor,
        sin: &GpuTensor,
    ) -> Result<GpuTensor, CudaError> {
        let [b, n, t, hd] = <[usize; 4]>::try_from(x.shape.as_slice()).expect("[b, n, t, hd]");
        assert!(cos.shape == [b, 1, t, hd] && sin.shape == cos.shape, "tables [b, 1, t, hd]");
        let mut y = self.output(&x.shape)?;
        let (ni, ti, hdi) = (dim(n), dim(t), dim(hd));
        let mut l = self.stream.launch_builder(&self.rotary);
        l.arg(&x.data).arg(&cos.data).arg(&sin.data).arg(&mut y.data);
        l.arg(&ni).arg(&ti).arg(&hdi);
        // SAFETY: one block per (b, n, t) row of hd values; the tables' shapes checked above.
        unsafe { l.launch(rows(b * n * t))? };
        Ok(y)
    }

    fn repeat_heads(&self, x: &GpuTensor, rep: usize) -> Result<GpuTensor, CudaError> {
        let [b, nkv, s, hd] = <[usize; 4]>::try_from(x.shape.as_slice()).expect("4-d");
        if rep == 1 {
            return Ok(GpuTensor { data: x.data.clone(), shape: x.shape.clone() });
        }
        let mut y = self.output(&[b, nkv * rep, s, hd])?;
        let (ni, ri, si, hdi) = (dim(nkv), dim(rep), dim(s), dim(hd));
        let mut l = self.stream.launch_builder(&self.repeat_heads);
        l.arg(&x.data).arg(&mut y.data).arg(&ni).arg(&ri).arg(&si).arg(&hdi);
        // SAFETY: one block per y row of hd values, reading a row of x.
        unsafe { l.launch(rows(b * nkv * rep * s))? };
        Ok(y)
    }

    fn silu_mul(&self, gate: &GpuTensor, up: &GpuTensor) -> Result<GpuTensor, CudaError> {
        assert_eq!(gate.shape, up.shape, "gate and up have one shape");
        let f = *gate.shape.last().expect("non-empty shape");
        let n = gate.elem_count() / f;
        let y = self.output(&gate.shape)?;
        let (g, u) = (addr(&gate.data), addr(&up.data));
        // SAFETY: n rows of f values in each buffer; y has gate's shape.
        unsafe { self.silu_mul_raw(g, u, addr(&y.data), n, f, f, f) }?;
        Ok(y)
    }

    fn tensor(&self, data: Vec<f32>, shape: &[usize]) -> Result<GpuTensor, CudaError> {
        let t = Tensor::from_vec(data, shape, &crate::Device::Cpu)
            .map_err(|e| CudaError::Host(e.to_string()))?;
        self.upload(&t)
    }

    fn add(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor, CudaError> {
        Gpu::add(self, a, b)
    }

    fn embed(
        &self,
        ids: &[u32],
        positions: &[u32],
        shape: (usize, usize),
        table: &GpuTensor,
        pos_table: Option<&GpuTensor>,
    ) -> Result<GpuTensor, CudaError> {
        self.embedding(ids, positions, shape, table, pos_table)
    }

    fn split_heads(&self, x: &GpuTensor, nh: usize) -> Result<GpuTensor, CudaError> {
        let [b, t, h] = <[usize; 3]>::try_from(x.shape.as_slice()).expect("a [b, t, h] tensor");
        self.swap12_dims(&x.data, [b, t, nh, h / nh])
    }

    fn merge_heads(&self, x: &GpuTensor) -> Result<GpuTensor, CudaError> {
        let [b, nh, t, hd] =
            <[usize; 4]>::try_from(x.shape.as_slice()).expect("a [b, nh, t, hd] tensor");
        Ok(self.swap12(x)?.reshaped(&[b, t, nh * hd]))
    }

    fn cat_positions(&self, a: &GpuTensor, b: &GpuTensor) -> Result<GpuTensor, CudaError> {
        let [bs, nh, s1, hd] = <[usize; 4]>::try_from(a.shape.as_slice()).expect("4-d");
        let s2 = b.shape[2];
        Ok(self.cat_axis1(a, b, bs * nh, hd)?.reshaped(&[bs, nh, s1 + s2, hd]))
    }

    fn attention_bias(&self, allowed: &[Vec<Vec<bool>>]) -> Result<CudaSlice<f32>, CudaError> {
        let host: Vec<f32> = allowed
            .iter()
            .flatten()
            .flatten()
            .map(|&ok| if ok { 0.0 } else { crate::MASKED })
            .collect();
        Ok(self.stream.clone_htod(&host)?)
    }

    fn attention(
        &self,
        q: &GpuTensor,
        k: &GpuTensor,
        v: &GpuTensor,
        bias: &CudaSlice<f32>,
        scale: f64,
    ) -> Result<GpuTensor, CudaError> {
        Gpu::attention(self, q, k, v, bias, scale)
    }

    fn last_position(&self, x: &GpuTensor) -> Result<GpuTensor, CudaError> {
        let [b, t, h] = <[usize; 3]>::try_from(x.shape.as_slice()).expect("a [b, t, h] tensor");
        Ok(self.slice_axis1(x, b, h, t - 1, 1)?.reshaped(&[b, 1, h]))
    }

    fn positions(&self, x: &GpuTensor) -> usize {
        x.shape[2]
    }

    fn to_cpu(&self, x: &GpuTensor) -> Result<Tensor, CudaError> {
        self.download(x)
    }
}

#[cfg(test)]
mod tests {
    /// kernels.cu compiles with NVRTC through to machine code for every architecture in
    /// `ARCHS` (`xtask/scripts/nvrtc_check.py`, with a Python that has NVIDIA's
    /// `nvidia-cuda-nvrtc` wheel: `FLEXGEN_NVRTC_PYTHON`, else `.ci/venv`'s). Without one the
    /// test says so and passes: then a kernel that does not compile fails on the GPU machine only.
    #[test]
    fn kernels_compile_for_every_architecture() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let py = std::env::var_os("FLEXGEN_NVRTC_PYTHON")
            .map_or_else(|| root.join("../../.ci/venv/bin/python"), std::path::PathBuf::from);
        let has_nvrtc = std::process::Command::new(&py)
            .args(["-m", "pip", "show", "-q", "nvidia-cuda-nvrtc"])
            .output()
            .is_ok_and(|o| o.status.success());
        if !has_nvrtc {
            eprintln!(
                "skipped: no Python with nvidia-cuda-nvrtc ({}; python3 -m venv .ci/venv && \
                 .ci/venv/bin/pip install nvidia-cuda-nvrtc, or set FLEXGEN_NVRTC_PYTHON)",
                py.display()
            );
            return;
        }
        let script = root.join("../../xtask/scripts/nvrtc_check.py");
        let src = root.join("src/cuda/kernels.cu");
        let archs: Vec<&str> =
            super::ARCHS.iter().map(|(_, n)| n.trim_start_matches("compute_")).collect();
        let out =
            std::process::Command::new(py).arg(script).arg(src).args(&archs).output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        eprintln!("{text}{}", String::from_utf8_lossy(&out.stderr));
        assert!(
            out.status.success(),
            "kernels.cu does not compile for every architecture:\n{text}"
        );
        assert_eq!(text.lines().filter(|l| l.contains(": ok")).count(), archs.len(), "{text}");
    }

    /// Every kernel `Gpu::new` loads is defined in kernels.cu (a missing one fails on the GPU
    /// machine only, at start-up, as "named symbol not found").
    #[test]
    fn every_loaded_kernel_is_defined() {
        let src = include_str!("ops.rs");
        let names: Vec<&str> =
            src.split("f(\"").skip(1).filter_map(|s| s.split('"').next()).collect();
        assert!(names.len() >= 18, "{names:?}");
        for n in names {
            // `extern "C" __global__ void NAME(`, launch bounds possibly between.
            let head = format!(" {n}(");
            assert!(
                super::KERNELS
                    .lines()
                    .any(|l| l.starts_with("extern \"C\" __global__ void") && l.contains(&head)),
                "kernel {n} is loaded but not defined in kernels.cu"
            );
        }
    }
}
