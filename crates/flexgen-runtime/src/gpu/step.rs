//! The block's steps (the `Stage` the schedule drives): embedding, the visits of every layer,
//! the next tokens and the logits the schedule asked for, and the warm-up.

#[allow(clippy::wildcard_imports)]
use super::*;

impl Stage for CudaStage<'_> {
    fn run_block(
        &self,
        input: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()> {
        self.run_linked(input, stats, after_step, &Link::default())
    }

    fn max_width(&self) -> Option<usize> {
        Some(self.capacity.max_prompt)
    }

    fn finish(&self, stats: &mut RunStats) -> Result<()> {
        let (free, total) = self.gpu.ctx.mem_get_info().map_err(drv)?;
        stats.tiers.required.gpu = (total - free) as u64;
        stats.tiers.required.cpu = self.pinned_bytes + self.pageable_bytes;
        stats.tiers.required.disk = self.disk_bytes() + self.disk_cache_bytes();
        stats.host = self.host_times.take();
        let (read, written) = self.cache_disk_io.take();
        stats.tiers.traffic.disk_read += read;
        stats.tiers.traffic.disk_write += written;
        Ok(())
    }
}

impl CudaStage<'_> {
    /// Runs `block` on this stage's layers: from the embedding, or the hidden states `link.prev`
    /// hands over, to the next tokens (which `after_step` gets and answers), or to `link.next`
    /// (the feed then comes from `link.feed_in`).
    pub(crate) fn run_linked(
        &self,
        input: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
        link: &Link<'_>,
    ) -> Result<()> {
        let (b, k) = (self.policy.gpu_batch_size as usize, self.policy.num_gpu_batches as usize);
        if input.ids.len() > k || (0..input.ids.len()).any(|kb| input.rows(kb) > b) {
            return Err(Error::Config {
                field: "gpu_batch_size",
                message: format!("a block larger than the executor's {b}×{k}"),
            });
        }
        if input.width > self.capacity.max_prompt || input.steps > self.capacity.max_new {
            return Err(Error::Config {
                field: "capacity",
                message: format!(
                    "prompts of up to {} tokens and {} new tokens exceed what the CUDA executor \
                     was sized for ({} and {}); size it for the longest request",
                    input.width, input.steps, self.capacity.max_prompt, self.capacity.max_new
                ),
            });
        }
        if input.steps == 0 || input.ids.is_empty() {
            return Ok(());
        }
        stats.direct_io = self.direct_io;
        let buf = self.run_buffers()?;
        let passes = input.steps * groups(k, link.groups).len() * self.layers.len();
        std::thread::scope(|s| -> Result<()> {
            let reader = self.disk.as_ref().map(|d| Reader::spawn(s, d, &self.gpu, passes));
            self.run_block_on(input, &buf, reader.as_ref(), stats, after_step, link)
        })
    }

    /// Embeds GPU batch `kb`'s `n` input tokens into its hidden state.
    pub(super) fn embed_batch(&self, buf: &RunBuffers, kb: usize, n: usize) -> Result<()> {
        let h = self.dims().0;
        let embed = self.embed.as_ref().expect("the first stage holds the embedding");
        let tables = fused::Tables {
            tokens: addr(&embed.data),
            positions: self.pos_embed.as_ref().map(|p| addr(&p.data)),
            project_in: self.project.as_ref().map(|(i, _)| addr(&i.data)),
        };
        let x = addr(&buf.x[if self.act_on_gpu { kb } else { 0 }]);
        let (ids, pos, scratch) = (addr(&buf.ids[kb]), addr(&buf.pos[kb]), addr(&buf.hn));
        // SAFETY: this executor's weights and buffers, sized for these shapes (`hn` holds n rows
        // of h ≥ the embedding's width).
        unsafe {
            fused::embed(&self.gpu, &self.model.spec, (ids, pos), &tables, scratch, x, n, h)
        }?;
        self.hidden_out(buf, kb, n * h, 0)
    }

    /// Final norm, LM head and argmax of GPU batch `kb`'s last positions (`x` holds `b·t` rows):
    /// the most likely next token of each of its `b` sequences, copied to `out`; with `logits`,
    /// the logits of the last positions (`b × vocab` fp16) to `buf.logits_host[kb]` too. Both
    /// copies land by the stream's next synchronization.
    pub(super) fn next_tokens(
        &self,
        buf: &RunBuffers,
        kb: usize,
        (b, t): (usize, usize),
        out: &mut [u32],
        logits: bool,
    ) -> Result<()> {
        let g = &self.gpu;
        let (h, ..) = self.dims();
        let vocab = self.model.spec.vocab_size as usize;
        let x = self.hidden_in(buf, kb, b * t * h, 0, false)?;
        let xs = if t == 1 {
            x
        } else {
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.last_rows(x, addr(&buf.last), b, t, h) }.map_err(cuda)?;
            addr(&buf.last)
        };
        // The final norm (pre-norm models), the projection out (OPT-350M), the LM head.
        let mut rows = xs;
        if let Some((nw, nb)) = &self.final_norm {
            let (nw, nb) = (addr(&nw.data), nb.as_ref().map_or(0, |b| addr(&b.data)));
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { fused::norm(g, &self.model.spec, (nw, nb), rows, addr(&buf.hn), b, h) }?;
            rows = addr(&buf.hn);
        }
        let e = self.model.spec.embed_width() as usize;
        if let Some((_, out)) = &self.project {
            // Into `qkv` (b rows of h + 2·kv ≥ e values), apart from either source.
            // SAFETY: this executor's weights and buffers, sized for these shapes.
            unsafe { g.gemm(&Gemm::linear(b, e, h, rows, addr(&out.data), addr(&buf.qkv), false)) }
                .map_err(cuda)?;
            rows = addr(&buf.qkv);
        }
        let head = self.lm_head.as_ref().or(self.embed.as_ref()).expect("the last stage's head");
        let head = addr(&head.data);
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.gemm(&Gemm::linear(b, vocab, e, rows, head, addr(&buf.logits), false)) }
            .map_err(cuda)?;
        if logits {
            let dst = buf.logits_host[kb].ptr();
            let bytes = b * vocab * 2;
            // SAFETY: a pinned destination of b·vocab values, read only after the stream's next
            // synchronization.
            unsafe {
                copy_2d(
                    &g.stream,
                    Mem::Device(addr(&buf.logits)),
                    Mem::Host(dst.cast_const().cast()),
                    Copy2d::contiguous(bytes),
                )
            }
            .map_err(cuda)?;
        }
        // SAFETY: this executor's weights and buffers, sized for these shapes.
        unsafe { g.argmax_rows(addr(&buf.logits), addr(&buf.tok[kb]), b, vocab) }.map_err(cuda)?;
        // SAFETY: b tokens into a pageable slice of b (the call returns once copied).
        unsafe {
            cudarc::driver::result::memcpy_dtoh_async(
                &mut out[..b],
                addr(&buf.tok[kb]),
                g.stream.cu_stream(),
            )
        }
        .map_err(drv)
    }

    /// Runs every kernel shape of a block once on layer 0 (prefill of `t` positions and one
    /// decode step) so that module loading and cuBLAS's first-call set-up stay out of the
    /// timings, as the original's warm-up generation does. The cache positions it writes are
    /// overwritten by the real prefill.
    pub(super) fn warm_up(&self, buf: &RunBuffers, t: usize) -> Result<()> {
        let b = self.policy.gpu_batch_size as usize;
        let st = &self.gpu.stream;
        if self.g_end < self.unit_len {
            // Only the resident and CPU parts: the disk tier is warmed by the reader itself.
            if let Some(m) = &self.layers[0].cpu {
                htod(&self.load, at(addr(&self.stage[0]), self.g_end), m.as_f16())?;
            }
            self.loaded[0].record(&self.load).map_err(drv)?;
        }
        let w = self.layer_weights(0, 0, false)?;
        // A decode step of a stage that fuses its packed products runs them from the codes.
        let w_decode =
            if self.fused_scratch.is_some() { self.layer_weights(0, 0, true)? } else { w };
        let zeros = vec![0u32; b * t];
        let starts = vec![0i32; b];
        htod(st, addr(&buf.ids[0]), &zeros)?;
        htod(st, addr(&buf.pos[0]), &zeros)?;
        htod(st, addr(&buf.start[0]), &starts)?;
        let mut out = vec![0u32; b];
        for (tt, past, w) in [(t, 0, w), (1, t, w_decode)] {
            if self.range.start == 0 {
                self.embed_batch(buf, 0, b * tt)?;
            }
            self.layer(w, 0, 0, buf, &starts, b, tt, past, (0, Prefetch::default()), false)?;
            if self.range.end == self.model.spec.num_layers {
                self.next_tokens(buf, 0, (b, tt), &mut out, false)?;
            }
        }
        self.freed[0].record(st).map_err(drv)?;
        st.synchronize().map_err(drv)?;
        Ok(())
    }

    /// The run buffers, allocated for the longest prompt and warmed up on first use, then kept
    /// for every later block and call.
    pub(super) fn run_buffers(&self) -> Result<std::cell::Ref<'_, RunBuffers>> {
        if self.run.borrow().is_none() {
            let t = self.capacity.max_prompt;
            let buf = self.alloc_run(t)?;
            self.warm_up(&buf, t)?;
            self.host_times.take(); // the warm-up's
            *self.run.borrow_mut() = Some(buf);
        }
        Ok(std::cell::Ref::map(self.run.borrow(), |b| b.as_ref().expect("allocated above")))
    }

    /// One block: every GPU batch holds `b` rows (a short block is padded with copies of its
    /// first prompt, whose picks are dropped); prefill, then decode steps as long as the schedule
    /// feeds them, layer by layer, every GPU batch through a layer before the next layer.
    pub(super) fn run_block_on(
        &self,
        input: &BlockInput,
        buf: &RunBuffers,
        reader: Option<&Reader>,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
        link: &Link<'_>,
    ) -> Result<()> {
        let spec = &self.model.spec;
        let vocab = spec.vocab_size as usize;
        let (b, k) = (self.policy.gpu_batch_size as usize, self.policy.num_gpu_batches as usize);
        let n_layers = self.layers.len();
        let st = &self.gpu.stream;
        let offloaded = self.g_end < self.unit_len;
        let t = input.width;
        let mut traffic = Traffic::default();
        // Row r of GPU batch kb is row r of the block's micro-batch kb, or a copy of the block's
        // first row (padding rows: computed, never reported).
        let real_rows: Vec<usize> =
            (0..k).map(|kb| if kb < input.ids.len() { input.rows(kb) } else { 0 }).collect();
        let mut starts_host: Vec<Vec<i32>> = Vec::with_capacity(k);
        let mut row_starts: Vec<Vec<usize>> = Vec::with_capacity(k);
        for (kb, &n) in real_rows.iter().enumerate() {
            let mut ids = Vec::with_capacity(b * t);
            let mut pos = Vec::with_capacity(b * t);
            let mut starts = Vec::with_capacity(b);
            for r in 0..b {
                let (src_kb, src_r) = if r < n { (kb, r) } else { (0, 0) };
                let start = input.starts[src_kb][src_r];
                ids.extend_from_slice(&input.ids[src_kb][src_r * t..(src_r + 1) * t]);
                pos.extend(stage::positions(spec, start, 0, t));
                starts.push(start);
            }
            htod(st, addr(&buf.ids[kb]), &ids)?;
            htod(st, addr(&buf.pos[kb]), &pos)?;
            starts_host.push(starts.iter().map(|&s| i32::try_from(s).expect("fits")).collect());
            htod(st, addr(&buf.start[kb]), &starts_host[kb])?;
            row_starts.push(starts);
        }
        let max_new = input.steps;
        // A pipeline's stages pass the block's GPU batches on in groups, so that group g runs on
        // this stage while g − 1 runs on the next; each group visits the layers in the zig-zag
        // order (weights not resident are streamed once per group and layer).
        let groups = groups(k, link.groups);
        let passes = max_new * groups.len() * n_layers;
        if offloaded {
            // Copies of the decode steps' layers are timed (passes after the prefill's).
            let prefill = groups.len() * n_layers;
            self.issue_load((0, 0), reader, &mut traffic, false)?;
            if passes > 1 {
                self.issue_load((1 % n_layers, 1), reader, &mut traffic, 1 >= prefill)?;
            }
        }
        let mut pass = 0usize;
        let mut host_tok = vec![vec![0u32; b]; k];
        // GPU batches with rows whose logits the schedule needs.
        let want_logits: Vec<bool> = real_rows
            .iter()
            .enumerate()
            .map(|(kb, &n)| n > 0 && input.want_logits[kb].iter().any(|&w| w))
            .collect();
        // Each group's next inputs, once the schedule has answered its last step.
        let set_inputs = |grp: &std::ops::Range<usize>, feed: &[Vec<u32>], step: usize| {
            for kb in grp.clone() {
                let n = real_rows[kb];
                let toks: Vec<u32> = (0..b)
                    .map(|r| if r < n { feed[kb - grp.start][r] } else { input.pad })
                    .collect();
                let pos: Vec<u32> = row_starts[kb]
                    .iter()
                    .flat_map(|&s| stage::positions(spec, s, t + step, 1))
                    .collect();
                htod(st, addr(&buf.ids[kb]), &toks)?;
                htod(st, addr(&buf.pos[kb]), &pos)?;
            }
            Ok::<(), Error>(())
        };
        let mut ended = false;
        // Decode steps take their products straight from packed 4-bit weights where the policy
        // says so (`Policy::fuses_decode`; the scratch is allocated then).
        let fuses = self.fused_scratch.is_some();
        'steps: for step in 0..max_new {
            let started = Instant::now();
            let (tt, past) = if step == 0 { (t, 0) } else { (1, t + step - 1) };
            let h = self.dims().0;
            for grp in &groups {
                // A stage before the last: the group's feed from the step before (the first stage
                // embeds it; every one learns whether the block goes on).
                if step > 0
                    && let Some(feed_in) = link.feed_in
                {
                    let Some(feed) = feed_in.recv().map_err(|_| stopped())? else {
                        ended = true;
                        break 'steps;
                    };
                    set_inputs(grp, &feed, step - 1)?;
                }
                match link.prev {
                    None => {
                        for kb in grp.clone() {
                            self.embed_batch(buf, kb, b * tt)?;
                        }
                    }
                    Some(prev) => {
                        self.take_hidden(buf, &prev.recv().map_err(|_| stopped())?, link.nccl)?;
                    }
                }
                // Visits (layer, batch) of this group: each stages the next one's inputs on the
                // copy stream (`Prefetch`), alternating between two buffers; the first is staged
                // in place. A group of one batch stages no hidden state ahead (the next visit's
                // input is this one's output).
                let kg = grp.len();
                let ahead = self.prefetch.in_step(past);
                let ahead = Prefetch { act: ahead.act && kg >= 2, ..ahead };
                for j in 0..n_layers {
                    let slot = pass % 2;
                    let w = self.layer_weights(j, slot, tt == 1 && fuses)?;
                    // A deferred visit is finished once the next one is queued (CPU attention of
                    // batch kb beside the GPU's work on batch kb + 1).
                    let mut pending: Option<Deferred> = None;
                    let defer = tt == 1 && self.defers_cpu_attention();
                    for kb in grp.clone() {
                        let starts = &starts_host[kb];
                        let (vs, first, next) = visit_order((j, kb - grp.start), (n_layers, kg));
                        let staged = if first { Prefetch::default() } else { ahead };
                        if staged != Prefetch::default() {
                            st.wait(&self.staged[vs]).map_err(drv)?;
                        }
                        if let Some((nj, nk)) = next {
                            let at = (nj, nk + grp.start);
                            self.prefetch_visit(buf, at, (b * tt * h, past), 1 - vs, ahead)?;
                        }
                        let rest =
                            self.layer(w, j, kb, buf, starts, b, tt, past, (vs, staged), defer)?;
                        if let Some(d) = pending.take() {
                            let kd = d.kb;
                            self.finish_visit(buf, &d, &starts_host[kd], None)?;
                        }
                        pending = rest;
                    }
                    if let Some(d) = pending.take() {
                        let kd = d.kb;
                        self.finish_visit(buf, &d, &starts_host[kd], None)?;
                    }
                    if offloaded {
                        self.freed[slot].record(st).map_err(drv)?;
                        // Prefetch two layers ahead into the arena just released; across group
                        // and step boundaries those are the next group's first layers.
                        if pass + 2 < passes {
                            let p = pass + 2;
                            let timed = p >= groups.len() * n_layers;
                            self.issue_load((p % n_layers, slot), reader, &mut traffic, timed)?;
                        }
                    }
                    pass += 1;
                }
                if let Some(next) = link.next {
                    // A stage before the last: hand the group's hidden states on.
                    st.synchronize().map_err(drv)?;
                    next.send(self.hidden_handoff(buf, grp.clone(), b * tt * h))
                        .map_err(|_| stopped())?;
                    continue;
                }
                for kb in grp.clone() {
                    self.next_tokens(buf, kb, (b, tt), &mut host_tok[kb], want_logits[kb])?;
                }
                st.synchronize().map_err(drv)?;
                let picks: Vec<Picks> = grp
                    .clone()
                    .filter(|&kb| kb < input.ids.len())
                    .map(|kb| {
                        let host = buf.logits_host[kb].as_f16();
                        let n = real_rows[kb];
                        let logits = (0..n)
                            .into_par_iter()
                            .map(|r| {
                                input.want_logits[kb][r].then(|| {
                                    let mut row = vec![0f32; vocab];
                                    host[r * vocab..(r + 1) * vocab].convert_to_f32_slice(&mut row);
                                    row
                                })
                            })
                            .collect();
                        Picks { greedy: host_tok[kb][..n].to_vec(), logits }
                    })
                    .collect();
                let feed = after_step(step, grp.start, picks)?;
                for tx in link.feed_out {
                    tx.send(feed.clone()).map_err(|_| stopped())?;
                }
                match feed {
                    // The next step's inputs (none after the last step).
                    Some(feed) if step + 1 < max_new => set_inputs(grp, &feed, step)?,
                    Some(_) => {}
                    None => {
                        ended = true;
                        stage::record_step(stats, step, started.elapsed().as_secs_f64());
                        break 'steps;
                    }
                }
            }
            stage::record_step(stats, step, started.elapsed().as_secs_f64());
        }
        // A stage before the last takes the last step's feeds (the last stage sends one per
        // group), unless the block ended before.
        if let (Some(feed_in), false) = (link.feed_in, ended) {
            for _ in &groups {
                if feed_in.recv().map_err(|_| stopped())?.is_none() {
                    break;
                }
            }
        }
        // Groups the stage before sent on after the block ended (it ran the next step's first
        // groups while this one finished the step) are taken in and dropped, so that no link is
        // left holding them (an NCCL send waits for its receive).
        if let Some(prev) = link.prev {
            while let Ok(h) = prev.recv() {
                self.take_hidden(buf, &h, link.nccl)?;
            }
        }
        self.load.synchronize().map_err(drv)?;
        self.account_copies()?;
        stats.tiers.traffic.cpu_to_gpu += traffic.cpu_to_gpu;
        stats.tiers.traffic.disk_read += traffic.disk_read;
        Ok(())
    }
}

/// The block's `k` GPU batches in `n` contiguous groups (at most one per batch, at least one),
/// the first ones a batch larger where they do not divide.
pub(super) fn groups(k: usize, n: usize) -> Vec<std::ops::Range<usize>> {
    let n = n.clamp(1, k.max(1));
    let mut start = 0;
    (0..n)
        .map(|g| {
            let end = start + k / n + usize::from(g < k % n);
            let r = start..end;
            start = end;
            r
        })
        .collect()
}
