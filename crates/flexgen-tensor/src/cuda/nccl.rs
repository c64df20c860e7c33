//! Point-to-point links between the GPUs of different processes (NCCL), for a pipeline's hidden
//! states: one two-rank communicator per link, so that each end is driven by one thread (a
//! communicator must not be used by two threads at once). NCCL is loaded at run time, as the
//! other CUDA libraries are.

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream};
use cudarc::nccl::{result, sys};

use super::CudaError;

/// The bytes both ends of a link exchange (through the pipeline's coordinator) to join it.
pub type LinkId = [u8; 128];

#[expect(clippy::needless_pass_by_value, reason = "used as map_err(|e| nccl(..., e))")]
fn nccl(what: &str, e: result::NcclError) -> CudaError {
    // SAFETY: NCCL returns a static string for every result code.
    let text = unsafe { std::ffi::CStr::from_ptr(sys::ncclGetErrorString(e.0)) };
    CudaError::Nccl(format!("{what}: {} ({:?})", text.to_string_lossy(), e.0))
}

fn present() -> Result<(), CudaError> {
    if super::nccl_present() { Ok(()) } else { Err(CudaError::Missing("libnccl")) }
}

/// A new link's id, made by one end (the pipeline's rank 0 makes every link's).
pub fn link_id() -> Result<LinkId, CudaError> {
    present()?;
    let id = result::get_uniqueid().map_err(|e| nccl("making a link id", e))?;
    Ok(id.internal.map(|c| c.to_ne_bytes()[0]))
}

/// One end of a link between two processes' GPUs: `send` on the upstream end, `recv` on the
/// downstream one, each on the link's own stream, returning once the bytes have moved.
pub struct NcclLink {
    comm: sys::ncclComm_t,
    /// The other end's rank in the two-rank communicator.
    peer: i32,
    stream: Arc<CudaStream>,
}

// SAFETY: the communicator is a handle NCCL allows any thread to use, one at a time; `&mut self`
// on every call keeps it to one.
unsafe impl Send for NcclLink {}

impl NcclLink {
    /// Joins link `id` on `ctx`'s device as its upstream (`upstream`, rank 0) or downstream end;
    /// returns once the other end has joined too.
    pub fn join(ctx: &Arc<CudaContext>, id: &LinkId, upstream: bool) -> Result<Self, CudaError> {
        present()?;
        ctx.bind_to_thread()?;
        let stream = ctx.new_stream()?;
        let id = sys::ncclUniqueId { internal: id.map(|b| std::ffi::c_char::from_ne_bytes([b])) };
        let mut comm = std::ptr::null_mut();
        let rank = i32::from(!upstream);
        // SAFETY: `comm` receives the communicator; the id came from `link_id` on the other end.
        unsafe { result::comm_init_rank(&raw mut comm, 2, id, rank) }
            .map_err(|e| nccl("joining the link", e))?;
        Ok(Self { comm, peer: 1 - rank, stream })
    }

    /// Sends `bytes` bytes at device address `src` to the other end.
    ///
    /// # Safety
    /// `src` must name `bytes` bytes of device memory of this link's device that nothing writes
    /// until this returns.
    pub unsafe fn send(&mut self, src: u64, bytes: usize) -> Result<(), CudaError> {
        let s = self.stream.cu_stream() as sys::cudaStream_t;
        let ty = sys::ncclDataType_t::ncclUint8;
        // SAFETY: the caller's promise; the stream is this link's.
        unsafe { result::send(src as *const _, bytes, ty, self.peer, self.comm, s) }
            .map_err(|e| nccl("sending a hidden state", e))?;
        Ok(self.stream.synchronize()?)
    }

    /// Receives `bytes` bytes from the other end into device address `dst`.
    ///
    /// # Safety
    /// `dst` must name `bytes` bytes of device memory of this link's device that nothing reads or
    /// writes until this returns.
    pub unsafe fn recv(&mut self, dst: u64, bytes: usize) -> Result<(), CudaError> {
        let s = self.stream.cu_stream() as sys::cudaStream_t;
        let ty = sys::ncclDataType_t::ncclUint8;
        // SAFETY: the caller's promise; the stream is this link's.
        unsafe { result::recv(dst as *mut _, bytes, ty, self.peer, self.comm, s) }
            .map_err(|e| nccl("receiving a hidden state", e))?;
        Ok(self.stream.synchronize()?)
    }
}

impl Drop for NcclLink {
    fn drop(&mut self) {
        // SAFETY: the communicator is this link's and no call on it is in flight (`&mut self`).
        let _ = unsafe { result::comm_destroy(self.comm) };
    }
}
