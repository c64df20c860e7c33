//! The CUDA device, through cudarc with the CUDA libraries loaded at run time: builds need no
//! CUDA, and a machine without it gets an error that says which library is missing, not a panic.
//! The fp16 GEMMs here (cuBLAS, fp32 accumulation) are the ones the GPU backend computes with.

pub mod exec;
mod lt;
mod nccl;
mod ops;

use std::sync::Arc;

pub use nccl::{LinkId, NcclLink, link_id};
pub use ops::{Gpu, GpuTensor};

use cudarc::cublas::CudaBlas;
pub use cudarc::driver::{CudaContext, CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use half::f16;

/// Errors from the CUDA backend.
#[derive(Debug, thiserror::Error)]
pub enum CudaError {
    /// A CUDA library could not be found on this machine.
    #[error("CUDA library {0} not found (no NVIDIA driver/CUDA here, or not on the library path)")]
    Missing(&'static str),
    /// A driver call failed.
    #[error("CUDA driver: {hint}{0}", hint = driver_hint(.0))]
    Driver(#[from] cudarc::driver::DriverError),
    /// A cuBLAS call failed.
    #[error("cuBLAS: {0}")]
    Blas(#[from] cudarc::cublas::result::CublasError),
    /// A cuBLASLt call failed.
    #[error("cuBLASLt: {0}")]
    BlasLt(cudarc::cublaslt::result::CublasError),
    /// NVRTC could not compile the kernels.
    #[error("compiling the CUDA kernels: {0}")]
    Compile(String),
    /// A host-side tensor could not be read or built.
    #[error("host tensor: {0}")]
    Host(String),
    /// An NCCL call failed.
    #[error("NCCL: {0}")]
    Nccl(String),
    /// The machine has no CUDA device with this ordinal.
    #[error("no CUDA device {ordinal} (found {count})")]
    NoDevice { ordinal: usize, count: i32 },
}

/// What to do about a driver error a user can act on.
#[expect(clippy::trivially_copy_pass_by_ref, reason = "thiserror passes fields by reference")]
fn driver_hint(e: &cudarc::driver::DriverError) -> &'static str {
    use cudarc::driver::sys::CUresult;
    match e.0 {
        CUresult::CUDA_ERROR_OUT_OF_MEMORY => {
            "the GPU ran out of memory. Another process may hold GPU memory (see nvidia-smi), or \
             --gpu-mem-limit is above what is free; free the GPU, or lower the plan's GPU use \
             (placement.weights.gpu, placement.kv_cache.gpu, gpu_batch_size or num_gpu_batches): "
        }
        _ => "",
    }
}

/// That the driver library can be loaded.
fn driver_present() -> Result<(), CudaError> {
    // SAFETY: only tries to dlopen the library.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(CudaError::Missing("libcuda"))
    }
}

/// Opens device `ordinal`, checking first that the driver and cuBLAS libraries can be loaded.
pub fn open(ordinal: usize) -> Result<Arc<CudaContext>, CudaError> {
    driver_present()?;
    // SAFETY: only tries to dlopen the library.
    if !unsafe { cudarc::cublas::sys::is_culib_present() } {
        return Err(CudaError::Missing("libcublas"));
    }
    let count = CudaContext::device_count()?;
    if usize::try_from(count).unwrap_or(0) <= ordinal {
        return Err(CudaError::NoDevice { ordinal, count });
    }
    Ok(CudaContext::new(ordinal)?)
}

/// The CUDA devices this process can see (the driver library checked first).
pub fn device_count() -> Result<usize, CudaError> {
    driver_present()?;
    Ok(usize::try_from(CudaContext::device_count()?).unwrap_or(0))
}

/// Whether the NCCL library can be loaded.
pub fn nccl_present() -> bool {
    // SAFETY: only tries to dlopen the library.
    unsafe { cudarc::nccl::sys::is_culib_present() }
}

/// cuBLAS bound to one stream.
pub fn blas(stream: &Arc<CudaStream>) -> Result<CudaBlas, CudaError> {
    Ok(CudaBlas::new(stream.clone())?)
}

/// Row-major `c[m, n] = a[m, k] · b[n, k]ᵀ` in fp16 with fp32 accumulation (the layout of
/// `x · Wᵀ` with Hugging Face weights).
pub fn gemm_f16_nt(
    blas: &CudaBlas,
    m: usize,
    n: usize,
    k: usize,
    a: &CudaSlice<f16>,
    b: &CudaSlice<f16>,
    c: &mut CudaSlice<f16>,
) -> Result<(), CudaError> {
    gemm_f16_nt_batched(blas, 1, m, n, k, a, b, c)
}

/// `batch` independent row-major products `c_i[m, n] = a_i[m, k] · b_i[n, k]ᵀ` (attention scores).
#[expect(clippy::too_many_arguments, reason = "a GEMM has this many parameters")]
pub fn gemm_f16_nt_batched(
    blas: &CudaBlas,
    batch: usize,
    m: usize,
    n: usize,
    k: usize,
    a: &CudaSlice<f16>,
    b: &CudaSlice<f16>,
    c: &mut CudaSlice<f16>,
) -> Result<(), CudaError> {
    gemm_f16_batched(blas, batch, (m, n, k), a, b, c, true)
}

/// `batch` row-major products `c_i[m, n] = a_i[m, k] · b_i`, where `b_i` is `[n, k]` used
/// transposed (`b_transposed`) or `[k, n]` used as is; fp16 with fp32 accumulation.
pub(crate) fn gemm_f16_batched(
    blas: &CudaBlas,
    batch: usize,
    (m, n, k): (usize, usize, usize),
    a: &CudaSlice<f16>,
    b: &CudaSlice<f16>,
    c: &mut CudaSlice<f16>,
    b_transposed: bool,
) -> Result<(), CudaError> {
    assert!(
        a.len() >= batch * m * k && b.len() >= batch * n * k && c.len() >= batch * m * n,
        "gemm operands too small"
    );
    let g = exec::Gemm {
        batch,
        m,
        n,
        k,
        a: exec::addr(a),
        lda: k,
        sa: m * k,
        b: exec::addr(b),
        ldb: if b_transposed { k } else { n },
        sb: n * k,
        b_t: b_transposed,
        c: exec::addr(c),
        ldc: n,
        sc: m * n,
        beta: 0.0,
    };
    // SAFETY: sizes checked above; all buffers live on the blas handle's context and stream.
    unsafe { exec::gemm_raw(blas, &g) }
}

pub(crate) fn dim(v: usize) -> i32 {
    i32::try_from(v).expect("GEMM dimension fits in i32")
}

/// Page-locked host memory that the CPU reads and writes at full speed (not write-combined).
pub fn alloc_pinned(ctx: &Arc<CudaContext>, len: usize) -> Result<PinnedHostSlice<u8>, CudaError> {
    // SAFETY: the memory is uninitialized until written; callers write before reading.
    Ok(unsafe { ctx.alloc_pinned_with_flags::<u8>(len, 0)? })
}

/// Page-locked host memory for `len` fp16 values (weights staged for copies to the GPU).
pub fn alloc_pinned_f16(
    ctx: &Arc<CudaContext>,
    len: usize,
) -> Result<PinnedHostSlice<f16>, CudaError> {
    // SAFETY: the memory is uninitialized until written; callers fill it before any copy.
    Ok(unsafe { ctx.alloc_pinned_with_flags::<f16>(len.max(1), 0)? })
}

/// Page-aligned host memory for weights: an anonymous mapping (transparent huge pages where the
/// kernel allows) that the caller fills, on all cores, and then [`HostMem::pin`]s with the driver.
/// For tens of gigabytes this is several times faster than the driver's pinned allocation, which
/// faults and zeroes every page on one thread; unpinned, it is ordinary pageable memory.
pub struct HostMem {
    map: memmap2::MmapMut,
    pinned: Option<Arc<CudaContext>>,
    /// The device's address of the memory, where [`HostMem::pin_mapped`] mapped it.
    device: Option<u64>,
}

// SAFETY: plain memory, uniquely owned; the registration is process-wide.
unsafe impl Send for HostMem {}
unsafe impl Sync for HostMem {}

impl HostMem {
    /// `len` fp16 values, not yet touched (pages are made on first write).
    pub fn new_f16(len: usize) -> Result<Self, CudaError> {
        let map = memmap2::MmapOptions::new()
            .len((len * 2).max(1))
            .map_anon()
            .map_err(|e| CudaError::Host(format!("mapping {} bytes: {e}", len * 2)))?;
        // Huge pages make faulting and pinning far cheaper; where they are off this is a no-op.
        let _ = map.advise(memmap2::Advice::HugePage);
        Ok(Self { map, pinned: None, device: None })
    }

    /// The values.
    pub fn as_f16(&self) -> &[f16] {
        // SAFETY: the mapping is page-aligned and holds len·2 bytes.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().cast(), self.map.len() / 2) }
    }

    /// The values, writable.
    pub fn as_f16_mut(&mut self) -> &mut [f16] {
        // SAFETY: as above, uniquely borrowed.
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().cast(), self.map.len() / 2) }
    }

    /// The first value's address, for copies and for threads that write disjoint parts while
    /// no reference to the memory is live.
    pub fn ptr(&self) -> *mut f16 {
        self.map.as_ptr().cast_mut().cast()
    }

    /// The whole mapping as bytes, writable (for direct I/O: page-aligned).
    pub fn as_bytes_mut(&mut self) -> &mut [u8] {
        &mut self.map[..]
    }

    /// Writes zeros on all cores: faults every page in parallel, so that [`HostMem::pin`] only
    /// has to lock pages that exist (the driver faults missing ones on one thread).
    pub fn zero_parallel(&mut self) {
        let bytes = &mut self.map[..];
        let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
        let chunk = bytes.len().div_ceil(threads).max(1 << 20);
        std::thread::scope(|s| {
            for part in bytes.chunks_mut(chunk) {
                s.spawn(move || part.fill(0));
            }
        });
    }

    /// Page-locks the memory so the GPU copies it at full link speed.
    pub fn pin(&mut self, ctx: &Arc<CudaContext>) -> Result<(), CudaError> {
        self.register(ctx, 0)
    }

    /// [`HostMem::pin`], and maps the memory into the device's address space, so that kernels
    /// read and write it over the link ([`HostMem::device_addr`]): small transfers that then
    /// need no copy engine.
    pub fn pin_mapped(&mut self, ctx: &Arc<CudaContext>) -> Result<(), CudaError> {
        self.register(ctx, cudarc::driver::sys::CU_MEMHOSTREGISTER_DEVICEMAP)?;
        let mut dev = 0;
        // SAFETY: registered with DEVICEMAP just above; `dev` receives the address.
        unsafe {
            cudarc::driver::sys::cuMemHostGetDevicePointer_v2(
                &raw mut dev,
                self.map.as_mut_ptr().cast(),
                0,
            )
            .result()?;
        }
        self.device = Some(dev);
        Ok(())
    }

    fn register(&mut self, ctx: &Arc<CudaContext>, flags: u32) -> Result<(), CudaError> {
        if self.pinned.is_some() {
            return Ok(());
        }
        ctx.bind_to_thread()?;
        // SAFETY: the mapping is valid for its length and outlives the registration (Drop).
        unsafe {
            cudarc::driver::sys::cuMemHostRegister_v2(
                self.map.as_mut_ptr().cast(),
                self.map.len(),
                flags,
            )
            .result()?;
        }
        self.pinned = Some(ctx.clone());
        Ok(())
    }

    /// The device's address of memory pinned with [`HostMem::pin_mapped`].
    pub fn device_addr(&self) -> Option<u64> {
        self.device
    }

    /// Whether [`HostMem::pin`] succeeded.
    pub fn is_pinned(&self) -> bool {
        self.pinned.is_some()
    }
}

impl Drop for HostMem {
    fn drop(&mut self) {
        if let Some(ctx) = &self.pinned {
            let _ = ctx.bind_to_thread();
            // SAFETY: registered in `pin`; no copy reads it once its owner is dropped.
            let _ =
                unsafe { cudarc::driver::sys::cuMemHostUnregister(self.map.as_mut_ptr().cast()) };
        }
    }
}

/// A timing event.
pub fn timing_event(stream: &Arc<CudaStream>) -> Result<CudaEvent, CudaError> {
    Ok(stream.record_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))?)
}

/// Copies `bytes` from `src` on `src_ctx`'s device to `dst` on `dst_ctx`'s, in `stream`'s order.
///
/// # Safety
/// Both regions must hold `bytes` on their devices and stay alive until the copy completes.
pub unsafe fn copy_peer(
    stream: &CudaStream,
    (dst, dst_ctx): (u64, &CudaContext),
    (src, src_ctx): (u64, &CudaContext),
    bytes: usize,
) -> Result<(), CudaError> {
    // SAFETY: the caller's regions, on their own contexts.
    unsafe {
        cudarc::driver::result::memcpy_peer_async(
            dst_ctx.cu_ctx(),
            dst,
            src_ctx.cu_ctx(),
            src,
            bytes,
            stream.cu_stream(),
        )
    }?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn without_cuda_open_is_an_error_not_a_panic() {
        // On machines with a GPU this opens it; without one it must say what is missing.
        match super::open(0) {
            Ok(ctx) => assert_eq!(ctx.ordinal(), 0),
            Err(e) => assert!(
                matches!(e, super::CudaError::Missing(_) | super::CudaError::NoDevice { .. }),
                "{e}"
            ),
        }
    }

    #[test]
    fn an_out_of_memory_driver_error_says_what_to_do() {
        // The hint only: the driver error's own text comes from libcuda, absent here.
        use cudarc::driver::{DriverError, sys::CUresult};
        let oom = super::driver_hint(&DriverError(CUresult::CUDA_ERROR_OUT_OF_MEMORY));
        for part in ["ran out of memory", "nvidia-smi", "--gpu-mem-limit", "gpu_batch_size"] {
            assert!(oom.contains(part), "{part} missing: {oom}");
        }
        assert_eq!(super::driver_hint(&DriverError(CUresult::CUDA_ERROR_INVALID_VALUE)), "");
    }
}
