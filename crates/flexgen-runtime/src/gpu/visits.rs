//! The visit order (every batch through a layer before the next layer) and what the copy
//! stream stages one visit ahead: hidden states kept on the CPU and the past positions of cache
//! rows kept off the GPU.

#[allow(clippy::wildcard_imports)]
use super::*;

/// What the copy stream stages one (layer, batch) visit ahead while the compute stream works on
/// the current visit, into the other of two buffers: the hidden states kept on the CPU (with two
/// or more GPU batches, so that the next visit's input is not the current one's output), and the
/// past positions of the cache rows kept on the CPU when the GPU attends them (fp16 or packed; not
/// with rows on disk, whose staging the host fills). Without it these copies run on the compute
/// stream between a visit's kernels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Prefetch {
    pub(crate) act: bool,
    pub(crate) cache: bool,
}

impl Prefetch {
    pub(crate) fn of(policy: &Policy, gpu_rows: usize, rows: usize, disk_rows: usize) -> Self {
        let cpu_rows = rows - gpu_rows;
        Self {
            act: policy.placement.activations.single_tier() == Some(Tier::Cpu)
                && policy.num_gpu_batches >= 2,
            cache: cpu_rows > 0 && disk_rows == 0 && !cpu_attention(policy, gpu_rows, rows),
        }
    }

    /// Buffers of a kind: two when the kind is prefetched.
    pub(crate) fn slots(on: bool) -> usize {
        if on { 2 } else { 1 }
    }

    /// What is staged ahead in a step whose visits have `past` cached positions (no cache to copy
    /// in during prefill).
    pub(super) fn in_step(self, past: usize) -> Self {
        Self { act: self.act, cache: self.cache && past > 0 }
    }
}

/// Visit (layer `j`, batch `kb`) of a step of `layers` × `k` visits, in the executor's order
/// (every batch through a layer before the next layer): its buffer slot, whether it is the step's
/// first (staged in place; each later visit is staged by the one before it), and the visit after
/// it in the step, whose inputs it stages.
pub(super) fn visit_order(
    (j, kb): (usize, usize),
    (layers, k): (usize, usize),
) -> (usize, bool, Option<(usize, usize)>) {
    let v = j * k + kb;
    let next = if kb + 1 < k { Some((j, kb + 1)) } else { (j + 1 < layers).then_some((j + 1, 0)) };
    (v % 2, v == 0, next)
}

impl CudaStage<'_> {
    /// The GPU address of GPU batch `kb`'s hidden state: its own buffer when activations live on
    /// the GPU, else staging `slot`, into which it is copied from the CPU here unless the copy
    /// stream staged it already (`staged`).
    pub(super) fn hidden_in(
        &self,
        buf: &RunBuffers,
        kb: usize,
        n: usize,
        slot: usize,
        staged: bool,
    ) -> Result<u64> {
        if self.act_on_gpu {
            return Ok(addr(&buf.x[kb]));
        }
        let x = addr(&buf.x[slot % buf.x.len()]);
        if !staged {
            self.copy_from_host(&self.gpu.stream, &buf.x_host[kb], x, Copy2d::contiguous(n * 2))?;
        }
        Ok(x)
    }

    /// Copies GPU batch `kb`'s hidden state (staging `slot`) back to the CPU when activations
    /// live there.
    pub(super) fn hidden_out(
        &self,
        buf: &RunBuffers,
        kb: usize,
        n: usize,
        slot: usize,
    ) -> Result<()> {
        if self.act_on_gpu {
            return Ok(());
        }
        let dst = buf.x_host[kb].ptr();
        // SAFETY: pinned destination of n values; stream-ordered before its next use.
        unsafe {
            copy_2d(
                &self.gpu.stream,
                Mem::Device(addr(&buf.x[slot % buf.x.len()])),
                Mem::Host(dst.cast_const().cast()),
                Copy2d::contiguous(n * 2),
            )
        }
        .map_err(cuda)
    }

    /// Copies the `past` positions of off-GPU cache rows (`homes`, rows of `cap` positions) into
    /// the working cache (`kn`, `vn`) on `stream`.
    pub(super) fn copy_homes_in(
        &self,
        homes: &[(usize, usize, &HostMem, &HostMem)],
        (kn, vn): (u64, u64),
        past: usize,
        stream: &CudaStream,
    ) -> Result<()> {
        let (cap, hd) = (self.cap(), self.dims().3);
        let row_bytes = cap * hd * 2;
        for &(off, n, hk, hv) in homes {
            for (src, dst) in [(hk, kn), (hv, vn)] {
                // Rows of `cap` positions on both sides.
                let rows = Copy2d {
                    width: past * hd * 2,
                    height: n,
                    src_pitch: row_bytes,
                    dst_pitch: row_bytes,
                };
                self.copy_from_host(stream, src, at(dst, off * cap * hd), rows)?;
            }
        }
        Ok(())
    }

    /// Stages visit (layer `j`, batch `kb`)'s inputs that `ahead` names (its hidden state, `n`
    /// values, and the `past` positions of its CPU cache rows) into buffers `slot` on the copy
    /// stream, after everything issued so far on the compute stream — the visit that last used
    /// those buffers and the one that wrote that hidden state — then records `staged[slot]`.
    pub(super) fn prefetch_visit(
        &self,
        buf: &RunBuffers,
        (j, kb): (usize, usize),
        (n, past): (usize, usize),
        slot: usize,
        ahead: Prefetch,
    ) -> Result<()> {
        if ahead == Prefetch::default() {
            return Ok(());
        }
        let c = &self.copy;
        self.mark.record(&self.gpu.stream).map_err(drv)?;
        c.wait(&self.mark).map_err(drv)?;
        if ahead.act {
            self.copy_from_host(c, &buf.x_host[kb], addr(&buf.x[slot]), Copy2d::contiguous(n * 2))?;
        }
        if ahead.cache {
            if self.cache_quant.is_some() {
                self.copy_packed_in(buf, (j, kb), &buf.kvq_stage[slot], c)?;
            } else {
                let (k, v) = &buf.work[slot];
                let homes = self.homes(buf, j, kb, past)?;
                self.copy_homes_in(&homes, (addr(k), addr(v)), past, c)?;
            }
        }
        self.staged[slot].record(c).map_err(drv)
    }

    /// Copies (layer `j`, batch `kb`)'s packed CPU rows into the packed staging `stage` on
    /// `stream`.
    pub(super) fn copy_packed_in(
        &self,
        buf: &RunBuffers,
        (j, kb): (usize, usize),
        stage: &PackedKv,
        stream: &CudaStream,
    ) -> Result<()> {
        let ([sck, scv], [spk, spv]) = stage;
        let dst = [addr(sck), addr(scv), addr(spk), addr(spv)];
        for (host, dst) in buf.kvq_cpu[j][kb].iter().zip(dst) {
            self.copy_from_host(stream, host, dst, Copy2d::contiguous(host.as_f16().len() * 2))?;
        }
        Ok(())
    }

    /// Copies the rows of `c` from the start of pinned, mapped host memory `host` to `dst` on
    /// `stream`, by a kernel reading over the link rather than a copy engine: these copies stage
    /// what the next visit needs, and a copy engine would serve them only after the weight
    /// stream's copy of a whole layer, issued before them (`Gpu::copy_sm`).
    pub(super) fn copy_from_host(
        &self,
        stream: &CudaStream,
        host: &HostMem,
        dst: u64,
        c: Copy2d,
    ) -> Result<()> {
        let src = host.device_addr().expect("the run buffers' host memory is mapped");
        debug_assert!(c.src_pitch * (c.height.max(1) - 1) + c.width <= host.as_f16().len() * 2);
        // SAFETY: the rows lie in `host` (checked above in debug builds); the callers' device
        // buffers are sized for them and stream-ordered after their last reader.
        unsafe { self.gpu.copy_sm(stream, src, dst, c) }.map_err(cuda)
    }
}
