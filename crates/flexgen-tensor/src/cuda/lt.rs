//! GEMMs through cuBLASLt: `y = x·Wᵀ (+ y)`, with a bias and ReLU where asked in the epilogue
//! (an MLP's first product with its bias and activation in one kernel; its second with its bias
//! and the residual). Each shape's descriptors and the algorithm cuBLASLt's heuristic picks for
//! it are made once and kept; a call only sets the bias address.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::sync::{Arc, Mutex};

use cudarc::cublaslt::result as lt;
use cudarc::cublaslt::sys::{
    cublasComputeType_t, cublasLtEpilogue_t, cublasLtHandle_t, cublasLtMatmulAlgo_t,
    cublasLtMatmulDesc_t, cublasLtMatmulDescAttributes_t as Desc,
    cublasLtMatmulPreferenceAttributes_t as Pref, cublasLtMatrixLayout_t, cudaDataType,
};
use cudarc::driver::{CudaSlice, CudaStream};

use super::CudaError;
use super::exec::Gemm;

/// Workspace cuBLASLt may use: NVIDIA's recommendation for Hopper (32 MiB,
/// [`super::exec::LT_WORKSPACE_MAX`]), 4 MiB before.
fn workspace_bytes(major: i32) -> usize {
    if major >= 9 { super::exec::LT_WORKSPACE_MAX } else { 4 << 20 }
}

/// The largest power of two (at most 256) that divides `a`: the alignment cuBLASLt is told.
fn alignment(a: u64) -> u32 {
    if a == 0 { 256 } else { 1u32 << a.trailing_zeros().min(8) }
}

/// What a cached plan depends on: the shapes, strides, accumulation, epilogue and alignments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct Key {
    m: usize,
    n: usize,
    k: usize,
    lda: usize,
    ldb: usize,
    ldc: usize,
    b_t: bool,
    accumulate: bool,
    /// The epilogue: none (0), the bias (1), the bias then ReLU (2).
    epilogue: u8,
    /// Of W, x and the output (cuBLASLt's A, B, and C = D).
    align: [u32; 3],
}

/// One shape's descriptors and algorithm.
struct Plan {
    desc: cublasLtMatmulDesc_t,
    layouts: [cublasLtMatrixLayout_t; 3],
    algo: cublasLtMatmulAlgo_t,
}

impl Drop for Plan {
    fn drop(&mut self) {
        // SAFETY: made by `Lt::plan` and used nowhere else; failures here only leak.
        unsafe {
            let _ = lt::destroy_matmul_desc(self.desc);
            for l in self.layouts {
                let _ = lt::destroy_matrix_layout(l);
            }
        }
    }
}

/// A cuBLASLt handle bound to a stream, its workspace and the plans made so far.
pub(super) struct Lt {
    handle: cublasLtHandle_t,
    stream: Arc<CudaStream>,
    workspace: CudaSlice<u8>,
    /// The workspace's device address.
    ws: u64,
    /// Each shape's plan, `None` where cuBLASLt has no algorithm for it.
    plans: Mutex<HashMap<Key, Option<Plan>>>,
}

// SAFETY: the handle and descriptors are used under the plans' mutex or by one stream's calls;
// cuBLASLt handles may be used from any thread.
unsafe impl Send for Lt {}
// SAFETY: as above.
unsafe impl Sync for Lt {}

impl Drop for Lt {
    fn drop(&mut self) {
        self.plans.get_mut().map(HashMap::clear).ok();
        // SAFETY: made in `new`, destroyed once.
        unsafe {
            let _ = lt::destroy_handle(self.handle);
        }
    }
}

fn err(e: lt::CublasError) -> CudaError {
    CudaError::BlasLt(e)
}

impl Lt {
    /// A handle on `stream` of a device of compute capability `major`.x, or `None` where the
    /// cuBLASLt library is not on this machine (the GEMMs then take cuBLAS and separate bias
    /// kernels).
    pub(super) fn new(stream: &Arc<CudaStream>, major: i32) -> Result<Option<Self>, CudaError> {
        // SAFETY: only tries to load the library.
        if !unsafe { cudarc::cublaslt::sys::is_culib_present() } {
            return Ok(None);
        }
        let handle = lt::create_handle().map_err(err)?;
        // SAFETY: bytes cuBLASLt writes before it reads them.
        let workspace = unsafe { stream.alloc::<u8>(workspace_bytes(major)) }?;
        Ok(Some(Self {
            ws: super::exec::addr(&workspace),
            handle,
            stream: stream.clone(),
            workspace,
            plans: Mutex::new(HashMap::new()),
        }))
    }

    /// The descriptors of `key` and the algorithm the heuristic picks for them (fp16 operands,
    /// fp32 accumulation, the bias fp16), or `None` where no algorithm supports them.
    fn plan(&self, key: &Key) -> Result<Option<Plan>, CudaError> {
        let f16 = cudaDataType::CUDA_R_16F;
        let desc = lt::create_matmul_desc(
            cublasComputeType_t::CUBLAS_COMPUTE_32F,
            cudaDataType::CUDA_R_32F,
        )
        .map_err(err)?;
        // Column-major view, as `gemm_raw`: cᵀ[n, m] = op(b)ᵀ · aᵀ, so W is cuBLASLt's A.
        let (wr, wc) = if key.b_t { (key.k, key.n) } else { (key.n, key.k) };
        let layout = |r: usize, c: usize, ld: usize| {
            lt::create_matrix_layout(f16, r as u64, c as u64, super::exec::i64_of(ld)).map_err(err)
        };
        let mut plan = Plan {
            desc,
            layouts: [std::ptr::null_mut(); 3],
            algo: cublasLtMatmulAlgo_t { data: [0; 8] },
        };
        plan.layouts[0] = layout(wr, wc, key.ldb)?;
        plan.layouts[1] = layout(key.k, key.m, key.lda)?;
        plan.layouts[2] = layout(key.n, key.m, key.ldc)?;
        let set = |a: Desc, v: *const std::ffi::c_void, size: usize| {
            // SAFETY: `v` points at `size` bytes of the attribute's type.
            unsafe { lt::set_matmul_desc_attribute(plan.desc, a, v, size) }.map_err(err)
        };
        let transa = i32::from(key.b_t); // cublasOperation_t: CUBLAS_OP_N 0, CUBLAS_OP_T 1
        set(Desc::CUBLASLT_MATMUL_DESC_TRANSA, (&raw const transa).cast(), size_of_val(&transa))?;
        let epilogue = match key.epilogue {
            0 => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_DEFAULT,
            1 => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_BIAS,
            _ => cublasLtEpilogue_t::CUBLASLT_EPILOGUE_RELU_BIAS,
        };
        set(
            Desc::CUBLASLT_MATMUL_DESC_EPILOGUE,
            (&raw const epilogue).cast(),
            size_of_val(&epilogue),
        )?;
        if key.epilogue > 0 {
            let bias_type = f16;
            set(
                Desc::CUBLASLT_MATMUL_DESC_BIAS_DATA_TYPE,
                (&raw const bias_type).cast(),
                size_of_val(&bias_type),
            )?;
        }
        let pref = lt::create_matmul_pref().map_err(err)?;
        let picked = (|| {
            let ws = self.workspace.len();
            let prefs = [
                (
                    Pref::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                    (&raw const ws).cast(),
                    size_of_val(&ws),
                ),
                (
                    Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                    (&raw const key.align[0]).cast(),
                    4,
                ),
                (
                    Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                    (&raw const key.align[1]).cast(),
                    4,
                ),
                (
                    Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                    (&raw const key.align[2]).cast(),
                    4,
                ),
                (
                    Pref::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
                    (&raw const key.align[2]).cast(),
                    4,
                ),
            ];
            for (a, v, size) in prefs {
                // SAFETY: `v` points at `size` bytes of the attribute's type.
                unsafe { lt::set_matmul_pref_attribute(pref, a, v, size) }.map_err(err)?;
            }
            let [w, x, y] = plan.layouts;
            // SAFETY: the descriptors made above.
            match unsafe { lt::get_matmul_algo_heuristic(self.handle, plan.desc, w, x, y, y, pref) }
            {
                Ok(h) => Ok(Some(h.algo)),
                Err(lt::CublasError(
                    cudarc::cublaslt::sys::cublasStatus_t::CUBLAS_STATUS_NOT_SUPPORTED,
                )) => Ok(None),
                Err(e) => Err(err(e)),
            }
        })();
        // SAFETY: made above, used only by the heuristic.
        unsafe {
            let _ = lt::destroy_matmul_pref(pref);
        }
        Ok(picked?.map(|algo| {
            plan.algo = algo;
            plan
        }))
    }

    /// `g` (one GEMM, not batched), with `bias` = (`g.n` fp16 values, `relu`) added to each row
    /// of the product and ReLU after where given: `c = act(a·op(b) + beta·c + bias)` on the
    /// stream the handle is bound to. `Ok(false)` (nothing launched) where cuBLASLt has no
    /// algorithm for it.
    ///
    /// # Safety
    /// As [`super::exec::gemm_raw`]; a bias must name `g.n` fp16 values of this device.
    pub(super) unsafe fn gemm(
        &self,
        g: &Gemm,
        bias: Option<(u64, bool)>,
    ) -> Result<bool, CudaError> {
        assert_eq!(g.batch, 1, "cuBLASLt: one GEMM");
        let key = Key {
            m: g.m,
            n: g.n,
            k: g.k,
            lda: g.lda,
            ldb: g.ldb,
            ldc: g.ldc,
            b_t: g.b_t,
            accumulate: g.beta != 0.0,
            epilogue: bias.map_or(0, |(_, relu)| 1 + u8::from(relu)),
            align: [alignment(g.b), alignment(g.a), alignment(g.c)],
        };
        let mut plans = self.plans.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let p = match plans.entry(key) {
            Entry::Occupied(e) => e.into_mut(),
            Entry::Vacant(e) => e.insert(self.plan(&key)?),
        };
        let Some(p) = p else { return Ok(false) };
        if let Some((bias, _)) = bias {
            // SAFETY: the attribute is a device address.
            unsafe {
                lt::set_matmul_desc_attribute(
                    p.desc,
                    Desc::CUBLASLT_MATMUL_DESC_BIAS_POINTER,
                    (&raw const bias).cast(),
                    size_of_val(&bias),
                )
            }
            .map_err(err)?;
        }
        let (alpha, beta) = (1.0f32, g.beta);
        let [w, x, y] = p.layouts;
        // SAFETY: the caller's operands; the plan's descriptors; the workspace is this handle's.
        unsafe {
            lt::matmul(
                self.handle,
                p.desc,
                (&raw const alpha).cast(),
                (&raw const beta).cast(),
                g.b as *const _,
                w,
                g.a as *const _,
                x,
                g.c as *const _,
                y,
                g.c as *mut _,
                y,
                &raw const p.algo,
                self.ws as *mut _,
                self.workspace.len(),
                self.stream.cu_stream().cast(),
            )
        }
        .map_err(err)?;
        Ok(true)
    }
}
