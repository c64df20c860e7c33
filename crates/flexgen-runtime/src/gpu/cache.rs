//! KV-cache rows off the GPU: CPU attention over rows in pinned memory, and the rows on disk
//! (read ahead, new positions written back).

#[allow(clippy::wildcard_imports)]
use super::*;
use flexgen_tensor::host_attention::{Dims, PackedRows, Packing, decode_packed};

impl CudaStage<'_> {
    /// Blocks until the compute stream is idle, counting the wait in `host_times`.
    pub(super) fn wait_for_gpu(&self) -> Result<()> {
        let t = Instant::now();
        self.gpu.stream.synchronize().map_err(drv)?;
        let mut h = self.host_times.get();
        h.gpu_wait_s += t.elapsed().as_secs_f64();
        self.host_times.set(h);
        Ok(())
    }

    /// Decode attention of the CPU rows on the CPU, first half: q and the new k/v of those rows
    /// (`[cpu_rows, hd]` each at `new`) go to pinned staging `p` (of two) on the compute stream,
    /// and `cpu_in[p]` is recorded after them. [`CudaStage::cpu_attention_finish`] does the rest;
    /// GPU work queued in between (the next GPU batch's visit) runs while the cores compute. Only
    /// `(2·rep + 2) · rows · hd` values cross PCIe.
    pub(super) fn cpu_attention_issue(
        &self,
        buf: &RunBuffers,
        p: usize,
        new: (u64, u64),
    ) -> Result<()> {
        let (_, nh, nkv, hd) = self.dims();
        let gr = self.gpu_rows;
        let b = self.policy.gpu_batch_size as usize;
        let cpu_rows = b * nkv - gr;
        let st = &self.gpu.stream;
        // Cache rows, and query rows (rep per cache row, adjacent).
        let rep = nh / nkv;
        let n = cpu_rows * hd;
        let [qh, kh, vh] = [0, 1, 2].map(|i| buf.cpu_att[4 * p + i].ptr());
        for (src, dst, len) in
            [(at(addr(&buf.q), gr * rep * hd), qh, rep * n), (new.0, kh, n), (new.1, vh, n)]
        {
            // SAFETY: len contiguous values into pinned staging of len, which the cores read
            // only after `cpu_in[p]` and which is not written again before they are done (the
            // next issue into `p` comes after this one's finish).
            unsafe {
                copy_2d(
                    st,
                    Mem::Device(src),
                    Mem::Host(dst.cast_const().cast()),
                    Copy2d::contiguous(len * 2),
                )
            }
            .map_err(cuda)?;
        }
        self.cpu_in[p].record(st).map_err(drv)
    }

    /// Decode attention of the CPU rows on the CPU, second half: once staging `p` has landed,
    /// the new position is appended to the CPU cache, every core computes the rows' attention
    /// over the cache in place (fp16 values, fp32 arithmetic; a packed cache, (layer, batch)
    /// `jk`'s, is expanded row by row on the cores), and the output goes to the query rows of
    /// `att` on the compute stream.
    pub(super) fn cpu_attention_finish(
        &self,
        buf: &RunBuffers,
        (j, kb): (usize, usize),
        homes: &[(usize, usize, &HostMem, &HostMem)],
        starts: &[i32],
        past: usize,
        (p, att): (usize, u64),
    ) -> Result<()> {
        let (_, nh, nkv, hd) = self.dims();
        let gr = self.gpu_rows;
        let b = self.policy.gpu_batch_size as usize;
        let cpu_rows = b * nkv - gr;
        let cap = self.cap();
        let rep = nh / nkv;
        let n = cpu_rows * hd;
        let [qh, kh, vh, oh] = [0, 1, 2, 3].map(|i| buf.cpu_att[4 * p + i].ptr());
        let waited = Instant::now();
        self.cpu_in[p].synchronize().map_err(drv)?;
        let t = Instant::now();
        let mut h = self.host_times.get();
        h.gpu_wait_s += (t - waited).as_secs_f64();
        self.host_times.set(h);
        if let Some((bits, group)) = self.cache_quant {
            let (codes, params) = CacheQuant { rows: cpu_rows, cap, hd, group, bits }.sizes();
            let [ck, cv, pk, pv] = &buf.kvq_cpu[j][kb];
            // SAFETY: as below; the packed homes of this (layer, batch)'s CPU rows, `codes`
            // bytes (held as fp16 pairs) and `params` values each, which nothing else touches
            // until the next visit of this (layer, batch).
            let (q, k_new, v_new, out, k, v) = unsafe {
                (
                    std::slice::from_raw_parts(qh.cast_const(), rep * n),
                    std::slice::from_raw_parts(kh.cast_const(), n),
                    std::slice::from_raw_parts(vh.cast_const(), n),
                    std::slice::from_raw_parts_mut(oh, rep * n),
                    PackedRows {
                        codes: std::slice::from_raw_parts_mut(ck.ptr().cast::<u8>(), codes),
                        params: std::slice::from_raw_parts_mut(pk.ptr(), params),
                    },
                    PackedRows {
                        codes: std::slice::from_raw_parts_mut(cv.ptr().cast::<u8>(), codes),
                        params: std::slice::from_raw_parts_mut(pv.ptr(), params),
                    },
                )
            };
            let d = Dims { rows: cpu_rows, hd, cap, past, nkv, rep, row0: gr };
            decode_packed(q, k_new, v_new, k, v, out, starts, d, Packing { group, bits });
        }
        for &(off, rows, hk, hv) in homes {
            let r = off * hd..(off + rows) * hd;
            let rq = rep * r.start..rep * r.end;
            // SAFETY: the copies into this staging have landed (`cpu_in[p]`) and nothing writes
            // it until the next issue into `p`, after this call; the output staging `p` is read
            // by the copy below only; each home's rows are disjoint from the others', and no
            // copy touches the CPU cache rows of this (layer, batch) meanwhile.
            let (q, k_new, v_new, out, kcache, vcache) = unsafe {
                (
                    std::slice::from_raw_parts(qh.cast_const().add(rq.start), rq.len()),
                    std::slice::from_raw_parts(kh.cast_const().add(r.start), r.len()),
                    std::slice::from_raw_parts(vh.cast_const().add(r.start), r.len()),
                    std::slice::from_raw_parts_mut(oh.add(rq.start), rq.len()),
                    std::slice::from_raw_parts_mut(hk.ptr(), rows * cap * hd),
                    std::slice::from_raw_parts_mut(hv.ptr(), rows * cap * hd),
                )
            };
            let d = Dims { rows, hd, cap, past, nkv, rep, row0: gr + off };
            flexgen_tensor::host_attention::decode(q, k_new, v_new, kcache, vcache, out, starts, d);
        }
        let mut h = self.host_times.get();
        h.cpu_attention_s += t.elapsed().as_secs_f64();
        self.host_times.set(h);
        // Read over the link by a kernel on the compute stream, not by the host-to-device copy
        // engine, where it would wait behind the weight stream's copy of a whole layer. The
        // output staging holds rep·n values, written above, and is written again only after
        // the next issue into `p`, which follows this copy on the compute stream.
        let dst = at(att, gr * rep * hd);
        self.copy_from_host(
            &self.gpu.stream,
            &buf.cpu_att[4 * p + 3],
            dst,
            Copy2d::contiguous(rep * n * 2),
        )
    }

    /// The homes of (layer `j`, batch `kb`)'s off-GPU fp16 cache rows: (first row among the
    /// off-GPU rows, rows, k, v). CPU rows first, then disk rows, whose `past` positions are read
    /// into their (row-major) staging first. None for a packed cache: its rows stay in `kvq_cpu`,
    /// which their users take whole.
    pub(super) fn homes<'b>(
        &self,
        buf: &'b RunBuffers,
        j: usize,
        kb: usize,
        past: usize,
    ) -> Result<Vec<(usize, usize, &'b HostMem, &'b HostMem)>> {
        let load = past > 0;
        let b = self.policy.gpu_batch_size as usize;
        let host_rows = b * self.dims().2 - self.gpu_rows - self.disk_rows;
        let mut out = Vec::with_capacity(2);
        if host_rows > 0 && self.cache_quant.is_none() {
            let (k, v) = &buf.kv_cpu[j][kb];
            out.push((0, host_rows, k, v));
        }
        if let Some(dc) = &buf.disk_cache {
            if load {
                // The staging is free once earlier copies from and to it are done.
                let read = dc.load(j, kb, past, || self.wait_for_gpu())?;
                let (r, w) = self.cache_disk_io.get();
                self.cache_disk_io.set((r + read, w));
            }
            out.push((host_rows, self.disk_rows, &dc.stage[0], &dc.stage[1]));
        }
        Ok(out)
    }

    /// Appends (layer `j`, batch `kb`)'s new positions `past..past + t` of the disk rows to their
    /// regions, from the staging, once the copies of those positions into it have landed.
    pub(super) fn flush_disk(
        &self,
        buf: &RunBuffers,
        j: usize,
        kb: usize,
        past: usize,
        t: usize,
    ) -> Result<()> {
        let Some(dc) = &buf.disk_cache else { return Ok(()) };
        self.wait_for_gpu()?;
        let written = dc.append(j, kb, past, t)?;
        let (r, w) = self.cache_disk_io.get();
        self.cache_disk_io.set((r, w + written));
        Ok(())
    }
}
