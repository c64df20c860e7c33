//! The run buffers: hidden states, scratch, the KV cache's rows on every tier, and the pinned
//! staging, allocated once for the capacity.

#[allow(clippy::wildcard_imports)]
use super::*;

/// One (layer, batch) of a compressed cache: codes of k and v, and their (min, scale) pairs.
pub(super) type PackedKv = ([CudaSlice<u8>; 2], [CudaSlice<f16>; 2]);

/// Per-run buffers: the hidden state of every GPU batch, shared scratch, the KV cache.
pub(super) struct RunBuffers {
    /// Hidden states: one per GPU batch on the GPU, or the staging of those kept on the CPU (two
    /// when prefetched, indexed by the visit's slot).
    pub(super) x: Vec<CudaSlice<f16>>,
    pub(super) hn: CudaSlice<f16>,
    pub(super) qkv: CudaSlice<f16>,
    pub(super) q: CudaSlice<f16>,
    pub(super) scores: CudaSlice<f16>,
    pub(super) ctx: CudaSlice<f16>,
    pub(super) att: CudaSlice<f16>,
    /// The attention output of odd GPU batches' decode visits (`[b, h]`).
    pub(super) att_odd: CudaSlice<f16>,
    pub(super) f1: CudaSlice<f16>,
    pub(super) last: CudaSlice<f16>,
    pub(super) logits: CudaSlice<f16>,
    /// `[layer][batch]` → (k, v) of the GPU rows, each `[gpu_rows, cap, hd]`.
    pub(super) kv: Vec<Vec<(CudaSlice<f16>, CudaSlice<f16>)>>,
    /// With a compressed cache: `[layer][batch]` → codes (k, v) and params (k, v) of the GPU rows.
    pub(super) kvq: Vec<Vec<PackedKv>>,
    /// … of the CPU rows, pinned: codes (k, v) as pairs of bytes, params (k, v).
    pub(super) kvq_cpu: Vec<Vec<[HostMem; 4]>>,
    /// The CPU rows' packed cache on its way through the GPU (one (layer, batch) at a time; two
    /// when prefetched; none without CPU rows).
    pub(super) kvq_stage: Vec<PackedKv>,
    /// The disk rows' cache: one file, `[layer][batch][k|v]` regions of `[disk_rows, cap, hd]`,
    /// and two pinned staging regions for the (layer, batch) in use.
    pub(super) disk_cache: Option<DiskCache>,
    /// `[layer][batch]` → (k, v) of the CPU rows, each `[cpu_rows, cap, hd]`, pinned.
    pub(super) kv_cpu: Vec<Vec<(HostMem, HostMem)>>,
    /// k and v of the CPU rows on the GPU: the new positions (CPU attention, `[cpu_rows, t, hd]`)
    /// or the whole working cache of one (layer, batch) (`[cpu_rows, cap, hd]`; every row when
    /// packed); two when the fp16 cache is prefetched, indexed by the visit's slot.
    pub(super) work: Vec<(CudaSlice<f16>, CudaSlice<f16>)>,
    /// Hidden states of each GPU batch when activations live on the CPU (`[b·t, h]`, pinned).
    pub(super) x_host: Vec<HostMem>,
    /// The last positions' logits of each GPU batch (`[b, vocab]`, pinned).
    pub(super) logits_host: Vec<HostMem>,
    /// Pinned staging of CPU attention, two sets (by GPU batch parity): q, new k, new v, output
    /// (`[cpu_rows, hd]` each, q and output `rep` times that).
    pub(super) cpu_att: Vec<HostMem>,
    pub(super) ids: Vec<CudaSlice<u32>>,
    pub(super) pos: Vec<CudaSlice<u32>>,
    pub(super) start: Vec<CudaSlice<i32>>,
    pub(super) tok: Vec<CudaSlice<u32>>,
}

impl CudaStage<'_> {
    pub(super) fn alloc_run(&self, t: usize) -> Result<RunBuffers> {
        let s = &self.model.spec;
        let (h, nh, nkv, hd) = self.dims();
        let (b, k) = (self.policy.gpu_batch_size as usize, self.policy.num_gpu_batches as usize);
        let cap = self.cap();
        let rows = b * t;
        let cpu_rows = b * nkv - self.gpu_rows;
        let st = &self.gpu.stream;
        // SAFETY: every buffer is written by a kernel or copy before it is read.
        let f = |n: usize| unsafe { st.alloc::<f16>(n.max(1)) }.map_err(drv);
        // A compressed cache keeps no fp16 rows: every row is packed, and the working area holds
        // one (layer, batch) in fp16 while it is used.
        let gr = if self.cache_quant.is_some() { 0 } else { self.gpu_rows };
        let kvq = match self.cache_quant {
            Some((bits, group)) => {
                let q = CacheQuant { rows: self.gpu_rows, cap, hd, group, bits };
                let (cb, pv) = q.sizes();
                // SAFETY: written by `quant_cache` before `dequant_cache` reads a position.
                let u8s = |n: usize| unsafe { st.alloc::<u8>(n.max(1)) }.map_err(drv);
                self.range
                    .clone()
                    .map(|_| {
                        (0..k)
                            .map(|_| Ok(([u8s(cb)?, u8s(cb)?], [f(pv)?, f(pv)?])))
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?
            }
            None => Vec::new(),
        };
        let kv = self
            .range
            .clone()
            .map(|_| (0..k).map(|_| Ok((f(gr * cap * hd)?, f(gr * cap * hd)?))).collect())
            .collect::<Result<Vec<Vec<_>>>>()?;
        // Pinned host memory of n values, mapped into the device's address space: what goes
        // to the GPU from it is read by kernels (`CudaStage::copy_from_host`), not copy engines.
        let pinned = |n: usize| -> Result<HostMem> {
            let mut m = HostMem::new_f16(n.max(1)).map_err(cuda)?;
            m.zero_parallel();
            m.pin_mapped(&self.gpu.ctx).map_err(cuda)?;
            Ok(m)
        };
        let (kvq_cpu, kvq_stage) = match self.cache_quant {
            Some((bits, group)) if cpu_rows > 0 => {
                let q = CacheQuant { rows: cpu_rows, cap, hd, group, bits };
                let (cb, pv) = q.sizes();
                let host = self
                    .range
                    .clone()
                    .map(|_| {
                        (0..k)
                            .map(|_| {
                                Ok([pinned(cb / 2)?, pinned(cb / 2)?, pinned(pv)?, pinned(pv)?])
                            })
                            .collect::<Result<Vec<_>>>()
                    })
                    .collect::<Result<Vec<_>>>()?;
                // SAFETY: filled by a copy or by `quant_cache` before each read.
                let u8s = |n: usize| unsafe { st.alloc::<u8>(n.max(1)) }.map_err(drv);
                let stage = (0..Prefetch::slots(self.prefetch.cache))
                    .map(|_| Ok(([u8s(cb)?, u8s(cb)?], [f(pv)?, f(pv)?])))
                    .collect::<Result<Vec<_>>>()?;
                (host, stage)
            }
            _ => (Vec::new(), Vec::new()),
        };
        let dr = self.disk_rows;
        let host_rows = cpu_rows - dr; // rows whose home is pinned CPU memory
        let disk_cache = if dr > 0 {
            let dir = self.policy.offload_dir.as_deref().expect("checked in new");
            let io = |e: std::io::Error| io_err(dir, &e);
            std::fs::create_dir_all(dir).map_err(io)?;
            let path =
                dir.join(format!("flexgen-kv-{}-{}.bin", std::process::id(), self.range.start));
            let file = DirectFile::create(&path).map_err(io)?;
            let layers = self.range.len();
            Some(DiskCache::new(file, (dr, cap, hd), (layers, k), pinned)?)
        } else {
            None
        };
        let kv_cpu = if host_rows > 0 && self.cache_quant.is_none() {
            self.range
                .clone()
                .map(|_| {
                    (0..k)
                        .map(|_| Ok((pinned(host_rows * cap * hd)?, pinned(host_rows * cap * hd)?)))
                        .collect()
                })
                .collect::<Result<Vec<Vec<_>>>>()?
        } else {
            Vec::new()
        };
        // The working area: the CPU rows' new positions or cache, or every row when compressed
        // (where CPU attention's new positions use the CPU rows' part of it).
        let ncap = if self.cpu_attention && self.cache_quant.is_none() { t } else { cap };
        let work_rows = if self.cache_quant.is_some() { b * nkv } else { cpu_rows };
        let x_count = if self.act_on_gpu { k } else { Prefetch::slots(self.prefetch.act) };
        // Packed, the copy stream stages packed rows (above), not this fp16 working area.
        let work_slots =
            if self.cache_quant.is_some() { 1 } else { Prefetch::slots(self.prefetch.cache) };
        // SAFETY: as above.
        let u = |n: usize| unsafe { st.alloc::<u32>(n.max(1)) }.map_err(drv);
        Ok(RunBuffers {
            x: (0..x_count).map(|_| f(rows * h)).collect::<Result<_>>()?,
            hn: f(rows * h)?,
            qkv: f(rows * (h + 2 * nkv * hd))?,
            q: f(rows * h)?,
            // Prefill attends as many cache rows at a time as this holds.
            scores: f(micro_batch_scores_len(s, b, t))?,
            ctx: f(rows * h)?,
            att: f(rows * h)?,
            att_odd: f(b * h)?,
            f1: f(rows * usize::try_from(s.mlp_inner_width()).expect("fits"))?,
            last: f(b * h)?,
            logits: f(b * s.vocab_size as usize)?,
            kv,
            kv_cpu,
            work: (0..work_slots)
                .map(|_| Ok((f(work_rows * ncap * hd)?, f(work_rows * ncap * hd)?)))
                .collect::<Result<_>>()?,
            kvq,
            kvq_cpu,
            kvq_stage,
            disk_cache,
            x_host: if self.act_on_gpu {
                Vec::new()
            } else {
                (0..k).map(|_| pinned(rows * h)).collect::<Result<_>>()?
            },
            logits_host: (0..k)
                .map(|_| pinned(b * s.vocab_size as usize))
                .collect::<Result<_>>()?,
            cpu_att: if self.cpu_attention {
                // q, new k, new v, output: q and output have rep query rows per cache row.
                let rep = nh / nkv;
                [rep, 1, 1, rep, rep, 1, 1, rep]
                    .into_iter()
                    .map(|r| pinned(r * cpu_rows * hd))
                    .collect::<Result<_>>()?
            } else {
                Vec::new()
            },
            ids: (0..k).map(|_| u(rows)).collect::<Result<_>>()?,
            pos: (0..k).map(|_| u(rows)).collect::<Result<_>>()?,
            // SAFETY: as above.
            start: (0..k)
                .map(|_| unsafe { st.alloc::<i32>(b) }.map_err(drv))
                .collect::<Result<_>>()?,
            tok: (0..k).map(|_| u(b)).collect::<Result<_>>()?,
        })
    }
}

impl RunBuffers {
    /// The attention output of GPU batch `kb`'s visit of `t` new positions: decode visits of odd
    /// batches use the second one, so that a deferred visit's output survives the next visit.
    pub(super) fn att_of(&self, kb: usize, t: usize) -> u64 {
        if t == 1 && kb % 2 == 1 { addr(&self.att_odd) } else { addr(&self.att) }
    }

    /// The family math's view of a visit's buffers (`x`: the hidden state of `rows` rows).
    /// `kb` names the GPU batch whose positions the rows hold; `inv_freq` the rotary table, if any.
    pub(super) fn visit(
        &self,
        x: u64,
        rows: usize,
        kb: usize,
        inv_freq: Option<&CudaSlice<f32>>,
    ) -> fused::Visit {
        fused::Visit {
            rows,
            x,
            hn: addr(&self.hn),
            qkv: addr(&self.qkv),
            att: addr(&self.att),
            ffn: addr(&self.f1),
            pos: addr(&self.pos[kb]),
            inv_freq: inv_freq.map_or(0, addr),
        }
    }
}
