//! One decoder layer on the GPU for one (layer, batch) visit: attention over the cache rows
//! wherever they live (GPU, pinned CPU memory, disk staging; packed or not; on the GPU or the
//! CPU). The family's math around it (norm, q/k/v projection; output projection, norm, MLP) is
//! flexgen-model's `fused` module.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The rest of a decode visit whose CPU rows attend on the CPU: queued once the GPU has the next
/// GPU batch's visit to run meanwhile ([`CudaStage::finish_visit`]).
pub(super) struct Deferred {
    j: usize,
    pub(super) kb: usize,
    w: fused::LayerWeights,
    x: u64,
    rows: usize,
    past: usize,
    slot: usize,
}

impl CudaStage<'_> {
    /// Whether decode visits with CPU attention are split so that the cores attend while the GPU
    /// runs the next GPU batch's visit: hidden states on the GPU (each batch its own), no cache
    /// rows on disk (their staging is shared), and a next batch to overlap with.
    pub(super) fn defers_cpu_attention(&self) -> bool {
        self.cpu_attention
            && self.act_on_gpu
            && self.disk_rows == 0
            && self.policy.num_gpu_batches >= 2
    }

    /// One layer for one GPU batch `kb` (`b` sequences of `t` new positions after `past`): its
    /// hidden state is updated in place; k and v of the new positions go to the cache. With
    /// `defer`, a decode visit whose CPU rows attend on the CPU stops after queuing their inputs'
    /// copies and returns the rest, for [`CudaStage::finish_visit`] after the next visit is
    /// queued.
    #[expect(clippy::too_many_arguments, reason = "one layer's inputs")]
    pub(super) fn layer(
        &self,
        w: fused::LayerWeights,
        j: usize,
        kb: usize,
        buf: &RunBuffers,
        starts: &[i32],
        b: usize,
        t: usize,
        past: usize,
        (slot, staged): (usize, Prefetch),
        defer: bool,
    ) -> Result<Option<Deferred>> {
        let l = &self.layout;
        let g = &self.gpu;
        let st = &g.stream;
        let (h, nh, nkv, hd) = self.dims();
        let rows = b * t;
        let cap = self.cap();
        let d = AttnDims { b, t, nh, nkv, hd, cap, past };
        let (gr, all_rows) = (self.gpu_rows, b * nkv);
        let cpu_rows = all_rows - gr;
        let gr_all = gr; // GPU rows of a compressed cache
        let att = buf.att_of(kb, t);
        let (qkv, q) = (addr(&buf.qkv), addr(&buf.q));
        let start = addr(&buf.start[kb]);
        let (kn, vn) = {
            let (k, v) = &buf.work[slot % buf.work.len()];
            (addr(k), addr(v))
        };
        let x = self.hidden_in(buf, kb, rows * h, slot, staged.act)?;
        let visit = fused::Visit { att, ..buf.visit(x, rows, kb, self.inv_freq.as_ref()) };
        let row_bytes = cap * hd * 2;
        // The off-GPU fp16 rows' homes (CPU rows, then disk rows read into their staging).
        let homes = if cpu_rows > 0 { self.homes(buf, j, kb, past)? } else { Vec::new() };
        // Without CPU attention the off-GPU rows attend on the GPU: bring their past positions in
        // (unless the copy stream did).
        if !self.cpu_attention && past > 0 && !staged.cache {
            self.copy_homes_in(&homes, (kn, vn), past, st)?;
        }
        // SAFETY: a whole layer arena at `w`; this executor's buffers, sized for these shapes.
        let epilogue = unsafe { fused::attention_in(g, &self.model.spec, l, &w, &visit) }?;
        #[expect(clippy::cast_precision_loss, clippy::cast_possible_truncation, reason = "1/√hd")]
        let scale = (1.0 / (hd as f64).sqrt()) as f32;
        if let Some((bits, group)) = self.cache_quant {
            // Every row packed (GPU rows in GPU memory, CPU rows in pinned memory): the past
            // positions are expanded into the working area, the new ones written there, attention
            // reads it, then the new positions are packed back to each row's home. With CPU
            // attention a decode visit leaves the CPU rows packed where they are: their new
            // positions go to the working area's CPU part (`[cpu_rows, 1, hd]`) and on to the
            // cores, which pack them into their homes and attend there.
            let cores = self.cpu_attention && t == 1 && cpu_rows > 0;
            let qg = CacheQuant { rows: gr_all, cap, hd, group, bits };
            let qc = CacheQuant { rows: cpu_rows, ..qg };
            let ([ck, cv], [pk, pv]) = &buf.kvq[j][kb];
            let (kn_c, vn_c) = (at(kn, gr_all * cap * hd), at(vn, gr_all * cap * hd));
            let packed_stage =
                buf.kvq_stage.get(slot % buf.kvq_stage.len().max(1)).filter(|_| !cores);
            // A decode step whose attending rows are all in GPU memory reads their codes straight
            // (`attention_decode_q4`); otherwise the past positions are expanded first.
            let direct = t == 1 && packed_stage.is_none() && Gpu::attention_q4_fits(qg);
            if !direct {
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.dequant_cache(addr(ck), addr(pk), kn, qg, (0, past)) }.map_err(cuda)?;
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.dequant_cache(addr(cv), addr(pv), vn, qg, (0, past)) }.map_err(cuda)?;
            }
            let packed = [addr(ck), addr(pk), addr(cv), addr(pv)];
            // SAFETY (when called): this executor's buffers; rows 0..n of the packed cache and
            // the working area, the new position written by the q/k/v split.
            let attend = |n: usize| unsafe {
                if direct {
                    g.attention_decode_q4(q, packed, (kn, vn), cap, start, att, d, (n, group))
                } else {
                    g.attention_decode(q, kn, vn, cap, start, att, d, 0..n)
                }
            };
            if let Some(ps @ ([sck, scv], [spk, spv])) = packed_stage {
                let stage = [addr(sck), addr(scv), addr(spk), addr(spv)];
                if past > 0 {
                    if !staged.cache {
                        self.copy_packed_in(buf, (j, kb), ps, st)?;
                    }
                    // SAFETY: this executor's weights and buffers, sized for these shapes.
                    unsafe { g.dequant_cache(stage[0], stage[2], kn_c, qc, (0, past)) }
                        .map_err(cuda)?;
                    // SAFETY: this executor's weights and buffers, sized for these shapes.
                    unsafe { g.dequant_cache(stage[1], stage[3], vn_c, qc, (0, past)) }
                        .map_err(cuda)?;
                }
            }
            let new = if cores {
                NewKv { gpu_rows: gr_all, k: kn_c, v: vn_c, cap: 1, past: 0 }
            } else {
                NewKv { gpu_rows: 0, k: kn, v: vn, cap, past }
            };
            // The split packs the GPU rows' new positions itself where it can.
            let packs = (Gpu::split_packs(qg) && split_pack_on()).then_some(SplitPack {
                k: (addr(ck), addr(pk)),
                v: (addr(cv), addr(pv)),
                quant: qg,
            });
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe {
                g.qkv_split(qkv, (epilogue.bias, epilogue.rope), q, kn, vn, new, packs, d, scale)
            }
            .map_err(cuda)?;
            if cores {
                if gr_all > 0 {
                    attend(gr_all).map_err(cuda)?;
                }
            } else if t > 1 {
                let (sc, cx) = ((addr(&buf.scores), buf.scores.len()), addr(&buf.ctx));
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.attention_prefill(q, kn, vn, cap, start, sc, cx, d, 0..all_rows) }
                    .map_err(cuda)?;
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.merge_heads_raw(cx, att, d) }.map_err(cuda)?;
            } else {
                attend(all_rows).map_err(cuda)?;
            }
            if packs.is_none() {
                let kv = [(kn, addr(ck), addr(pk)), (vn, addr(cv), addr(pv))];
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.quant_cache(&kv, qg, (past, t)) }.map_err(cuda)?;
            }
            if let Some(([sck, scv], [spk, spv])) = packed_stage {
                let kv = [(kn_c, addr(sck), addr(spk)), (vn_c, addr(scv), addr(spv))];
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.quant_cache(&kv, qc, (past, t)) }.map_err(cuda)?;
                // Only the new positions go back to the CPU rows' home.
                let groups = hd.div_ceil(group);
                let code_b = groups * group * usize::from(bits) / 8; // per (row, position)
                let par_b = groups * 4;
                let stage = [addr(sck), addr(scv), addr(spk), addr(spv)];
                for (i, (host, src)) in buf.kvq_cpu[j][kb].iter().zip(stage).enumerate() {
                    let per = if i < 2 { code_b } else { par_b };
                    let off = past * per;
                    // SAFETY: rows of `cap` positions on both sides; t positions from `past`.
                    unsafe {
                        copy_2d(
                            st,
                            Mem::Device(src + off as u64),
                            Mem::Host(host.ptr().cast::<u8>().add(off).cast_const()),
                            Copy2d {
                                width: t * per,
                                height: cpu_rows,
                                src_pitch: cap * per,
                                dst_pitch: cap * per,
                            },
                        )
                    }
                    .map_err(cuda)?;
                }
            }
            if cores {
                let rest = Deferred { j, kb, w, x, rows, past, slot };
                return self.attend_on_cores(buf, (kn_c, vn_c), rest, defer, starts, &homes);
            }
            // SAFETY: as `attention_in` above.
            unsafe { fused::attention_out_and_mlp(g, &self.model.spec, l, &w, &visit) }?;
            self.hidden_out(buf, kb, rows * h, slot)?;
            return Ok(None);
        }
        let (kc, vc) = (addr(&buf.kv[j][kb].0), addr(&buf.kv[j][kb].1));
        // Where the CPU rows' new k/v go on the GPU, and that buffer's positions per row.
        let (ncap, npast) = if self.cpu_attention { (t, 0) } else { (cap, past) };
        let new = NewKv { gpu_rows: gr, k: kn, v: vn, cap: ncap, past: npast };
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.qkv_split(qkv, (epilogue.bias, epilogue.rope), q, kc, vc, new, None, d, scale) }
            .map_err(cuda)?;
        if t > 1 {
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe {
                g.attention_prefill(
                    q,
                    kc,
                    vc,
                    cap,
                    start,
                    (addr(&buf.scores), buf.scores.len()),
                    addr(&buf.ctx),
                    d,
                    0..gr,
                )
            }
            .map_err(cuda)?;
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe {
                g.attention_prefill(
                    q,
                    kn,
                    vn,
                    ncap,
                    start,
                    (addr(&buf.scores), buf.scores.len()),
                    addr(&buf.ctx),
                    d,
                    gr..all_rows,
                )
            }
            .map_err(cuda)?;
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.merge_heads_raw(addr(&buf.ctx), att, d) }.map_err(cuda)?;
        } else {
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.attention_decode(q, kc, vc, cap, start, att, d, 0..gr) }.map_err(cuda)?;
            if cpu_rows > 0 && !self.cpu_attention {
                // SAFETY: this executor's weights and buffers, sized for these shapes.
                unsafe { g.attention_decode(q, kn, vn, cap, start, att, d, gr..all_rows) }
                    .map_err(cuda)?;
            }
        }
        if cpu_rows > 0 {
            if self.cpu_attention && t == 1 {
                let rest = Deferred { j, kb, w, x, rows, past, slot };
                return self.attend_on_cores(buf, (kn, vn), rest, defer, starts, &homes);
            }
            // Store the new positions of the off-GPU rows into their homes.
            for &(off, n, hk, hv) in &homes {
                for (src, dst) in [(kn, hk), (vn, hv)] {
                    // SAFETY: position `past` of the first row lies inside the buffer.
                    let dst = unsafe { dst.ptr().add(past * hd) }.cast_const();
                    // SAFETY: rows of `cap` positions in pinned memory; t positions from
                    // `past`; the source rows start at `off` in the working area.
                    unsafe {
                        copy_2d(
                            st,
                            Mem::Device(at(src, (off * ncap + npast) * hd)),
                            Mem::Host(dst.cast()),
                            Copy2d {
                                width: t * hd * 2,
                                height: n,
                                src_pitch: ncap * hd * 2,
                                dst_pitch: row_bytes,
                            },
                        )
                    }
                    .map_err(cuda)?;
                }
            }
            self.flush_disk(buf, j, kb, past, t)?;
        }
        // SAFETY: as `attention_in` above.
        unsafe { fused::attention_out_and_mlp(g, &self.model.spec, l, &w, &visit) }?;
        self.hidden_out(buf, kb, rows * h, slot)?;
        Ok(None)
    }

    /// A decode visit whose CPU rows attend on the cores, from where its GPU work stops: their
    /// query and new k/v (at `new`, `[cpu_rows, hd]` each) are queued to the host, then the visit
    /// is finished now, or returned to be finished once the next visit is queued (`defer`).
    fn attend_on_cores(
        &self,
        buf: &RunBuffers,
        new: (u64, u64),
        rest: Deferred,
        defer: bool,
        starts: &[i32],
        homes: &[(usize, usize, &HostMem, &HostMem)],
    ) -> Result<Option<Deferred>> {
        self.cpu_attention_issue(buf, rest.kb % 2, new)?;
        if defer {
            return Ok(Some(rest));
        }
        self.finish_visit(buf, &rest, starts, Some(homes))?;
        Ok(None)
    }

    /// The rest of visit `d`: its CPU rows' attention on the cores (their inputs' copies were
    /// queued), the output projection and MLP. `homes` are the rows' homes where the caller has
    /// them; a deferred visit (no disk rows) looks them up again.
    pub(super) fn finish_visit(
        &self,
        buf: &RunBuffers,
        d: &Deferred,
        starts: &[i32],
        homes: Option<&[(usize, usize, &HostMem, &HostMem)]>,
    ) -> Result<()> {
        let found;
        let homes = if let Some(h) = homes {
            h
        } else {
            found = self.homes(buf, d.j, d.kb, d.past)?;
            &found
        };
        let att = buf.att_of(d.kb, 1);
        self.cpu_attention_finish(buf, (d.j, d.kb), homes, starts, d.past, (d.kb % 2, att))?;
        self.flush_disk(buf, d.j, d.kb, d.past, 1)?;
        let visit = fused::Visit { att, ..buf.visit(d.x, d.rows, d.kb, None) };
        let h = self.dims().0;
        // SAFETY: the layer arena at `d.w` stays staged until the layer's `freed` event, which
        // is recorded after every visit of the layer is finished; this executor's buffers.
        unsafe {
            fused::attention_out_and_mlp(&self.gpu, &self.model.spec, &self.layout, &d.w, &visit)
        }?;
        self.hidden_out(buf, d.kb, d.rows * h, d.slot)
    }
}

/// Whether the q/k/v split packs a compressed cache's new positions itself
/// ([`Gpu::split_packs`]): unless `FLEXGEN_SPLIT_PACK=0`, which packs them with `quant_cache`
/// after attention to compare (read once).
fn split_pack_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    knob_on("FLEXGEN_SPLIT_PACK", &ON)
}
