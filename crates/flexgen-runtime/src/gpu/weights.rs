//! Weight homes: each layer's arena filled and split by the policy's shares into a GPU prefix,
//! a CPU part (pinned or pageable) and a disk part, the disk tier's reader thread, and the copies
//! that stage a layer two passes ahead on the load stream.

#[allow(clippy::wildcard_imports)]
use super::*;

/// The disk reader of one block: a thread that reads every pass's disk part, in order, into
/// the pinned ring as buffers come free, running ahead of the GPU.
pub(super) struct Reader {
    /// Ring buffers filled, in pass order.
    pub(super) filled: mpsc::Receiver<Result<usize>>,
    /// Ring buffers whose copy has been issued (the reader waits for the copy's event).
    pub(super) free: mpsc::Sender<usize>,
}

impl Reader {
    pub(super) fn spawn<'scope>(
        s: &'scope std::thread::Scope<'scope, '_>,
        d: &'scope DiskPart,
        gpu: &'scope Gpu,
        passes: usize,
    ) -> Self {
        let (filled_tx, filled) = mpsc::sync_channel(d.ring.len());
        let (free, free_rx) = mpsc::channel::<usize>();
        for i in 0..d.ring.len() {
            let _ = free.send(i);
        }
        let n_layers = d.layers;
        let ring: Vec<(usize, usize)> =
            d.ring.iter().map(|m| (m.as_f16().as_ptr() as usize, d.slot_bytes)).collect();
        let ctx = gpu.ctx.clone();
        s.spawn(move || {
            let _ = ctx.bind_to_thread();
            for pass in 0..passes {
                let Ok(i) = free_rx.recv() else { return };
                let r = (|| -> Result<usize> {
                    d.copied[i].synchronize().map_err(drv)?;
                    // SAFETY: ring buffer i is not read by any copy now (its event fired) and
                    // the main thread reads it only after receiving i from `filled`.
                    let out =
                        unsafe { std::slice::from_raw_parts_mut(ring[i].0 as *mut u8, ring[i].1) };
                    let j = pass % n_layers;
                    read_parallel(&d.file, (j * d.slot_bytes) as u64, out, READ_THREADS)
                        .map_err(|e| io_err(d.file.path(), &e))?;
                    Ok(i)
                })();
                let failed = r.is_err();
                if filled_tx.send(r).is_err() || failed {
                    return;
                }
            }
        });
        Self { filled, free }
    }
}

impl CudaStage<'_> {
    /// Fills `out` with units `range` of layer `j`'s stored arena (fp16 values, or the packed
    /// bytes two to a unit). A layer that must be built whole (packed, or read from the model's
    /// files) is built once and kept until another layer is asked for: `place_weights` asks for
    /// a layer's parts one after another.
    pub(super) fn fill(
        &self,
        source: LayerSource,
        j: usize,
        range: std::ops::Range<usize>,
        out: &mut [f16],
    ) -> Result<()> {
        if let (None, LayerSource::Dummy(init)) = (&self.packed, source) {
            // Dummy values are made for any range directly.
            self.layout.fill_dummy(init, self.range.start as usize + j, range, out);
            return Ok(());
        }
        // `ones` dummy layers are all alike: one packing serves every layer.
        let key = if matches!(source, LayerSource::Dummy(DummyInit::Ones)) { 0 } else { j };
        let mut memo = self.layer_memo.borrow_mut();
        if memo.as_ref().is_none_or(|(l, _)| *l != key) {
            *memo = None; // the last layer's memory back before this one's is taken
            let mut arena = vec![f16::ZERO; self.layout.len];
            self.fill_arena(source, j, &mut arena)?;
            let units = match &self.packed {
                Some(p) => {
                    let mut units = vec![f16::ZERO; p.len / 2];
                    p.pack(&arena, bytemuck::cast_slice_mut(&mut units));
                    units
                }
                None => arena,
            };
            *memo = Some((key, units));
        }
        let (_, units) = memo.as_ref().expect("filled above");
        out.copy_from_slice(&units[range]);
        Ok(())
    }

    /// Fills `out` with this stage's layer `j`'s whole fp16 arena.
    fn fill_arena(&self, source: LayerSource, j: usize, out: &mut [f16]) -> Result<()> {
        match source {
            LayerSource::Dummy(init) => {
                self.layout.fill_dummy(init, self.range.start as usize + j, 0..out.len(), out);
                Ok(())
            }
            LayerSource::Loaded => {
                // The loaded layer, or read from the model's files now (`Model::open_lazy`).
                let i = self.range.start + u32::try_from(j).expect("a layer index");
                let layer = self.model.layer(i)?.ok_or_else(|| Error::Config {
                    field: "model",
                    message: LAYERS_NOT_LOADED.into(),
                })?;
                Ok(self.layout.fill_from(&layer, out)?)
            }
        }
    }

    /// Fills every layer's GPU, CPU and disk parts, one layer at a time (a packed layer, or one
    /// read from the model's files, is built once for its three parts). GPU parts go through two
    /// pinned buffers, each copied while the next layer is filled; CPU parts are filled on all
    /// cores and pinned by a second thread, one layer behind; disk parts are written with direct
    /// I/O through a pinned buffer. Measures the pinned copy and direct-read bandwidths when
    /// layers are offloaded.
    pub(super) fn place_weights(
        &mut self,
        source: LayerSource,
        disk_dir: Option<&std::path::Path>,
    ) -> Result<()> {
        let (len, g_end, c_end) = (self.unit_len, self.g_end, self.c_end);
        let n_layers = self.range.len();
        let stream = self.gpu.stream.clone();
        let fill_started = Instant::now();
        let mut disk = disk_dir.map(|dir| self.open_disk_tier(dir)).transpose()?;
        let mut disk_write_s = 0.0;
        // GPU parts: one pinned buffer filled while the other is copied.
        let mut host_stage: Vec<PinnedHostSlice<f16>> = if g_end > 0 {
            (0..2)
                .map(|_| flexgen_tensor::cuda::alloc_pinned_f16(&self.gpu.ctx, g_end).map_err(cuda))
                .collect::<Result<_>>()?
        } else {
            Vec::new()
        };
        let copied = [new_event(&self.gpu)?, new_event(&self.gpu)?];
        let pin = self.policy.pin_weight;
        let ctx = self.gpu.ctx.clone();
        let (tx, rx) = mpsc::sync_channel::<(usize, HostMem)>(1);
        let placed = std::thread::scope(|s| -> Result<(Vec<(usize, HostMem)>, f64)> {
            // CPU parts pinned (by the driver) one layer behind their fill.
            let pinner = s.spawn(move || -> Result<(Vec<(usize, HostMem)>, f64)> {
                let mut done = Vec::new();
                let mut secs = 0.0;
                for (j, mut m) in rx {
                    let t = Instant::now();
                    if pin {
                        m.pin(&ctx).map_err(cuda)?;
                    }
                    secs += t.elapsed().as_secs_f64();
                    done.push((j, m));
                }
                Ok((done, secs))
            });
            let filled = (|| -> Result<()> {
                for j in 0..n_layers {
                    let mut home = LayerHome { gpu: None, cpu: None };
                    if g_end > 0 {
                        let slot = j % 2;
                        copied[slot].synchronize().map_err(drv)?;
                        let buf = host_stage[slot].as_mut_slice().map_err(drv)?;
                        self.fill(source, j, 0..g_end, buf)?;
                        // SAFETY: written by the copy below before any use.
                        let dev = unsafe { stream.alloc::<f16>(g_end) }.map_err(drv)?;
                        // SAFETY: `buf` is pinned and stays alive and unwritten until
                        // `copied[slot]`.
                        unsafe {
                            cudarc::driver::result::memcpy_htod_async(
                                addr(&dev),
                                &buf[..],
                                stream.cu_stream(),
                            )
                        }
                        .map_err(drv)?;
                        copied[slot].record(&stream).map_err(drv)?;
                        home.gpu = Some(dev);
                    }
                    self.layers.push(home);
                    if c_end > g_end {
                        let mut m = HostMem::new_f16(c_end - g_end).map_err(cuda)?;
                        self.fill(source, j, g_end..c_end, m.as_f16_mut())?;
                        if tx.send((j, m)).is_err() {
                            return Ok(()); // the pinner failed; its error is returned below
                        }
                    }
                    if let Some(d) = &mut disk {
                        let t = Instant::now();
                        self.write_disk_part(source, j, d)?;
                        disk_write_s += t.elapsed().as_secs_f64();
                    }
                }
                Ok(())
            })();
            drop(tx);
            let pinned = pinner.join().expect("pinning thread");
            filled?;
            pinned
        });
        // The GPU parts' copies done before their pinned buffers are freed, on error as well.
        stream.synchronize().map_err(drv)?;
        let (cpu_parts, pin_s) = placed?;
        self.setup_times.pin_s = pin_s;
        for (j, m) in cpu_parts {
            let bytes = 2 * (c_end - g_end) as u64;
            if m.is_pinned() {
                self.pinned_bytes += bytes;
            } else {
                self.pageable_bytes += bytes;
            }
            self.layers[j].cpu = Some(m);
        }
        *self.layer_memo.borrow_mut() = None;
        self.setup_times.fill_s = fill_started.elapsed().as_secs_f64() - disk_write_s;
        if let Some(d) = disk {
            let t = Instant::now();
            self.probe_disk_tier(d)?;
            self.setup_times.disk_write_s = disk_write_s + t.elapsed().as_secs_f64();
        }
        if let Some(p) = &self.packed {
            // One slice of a matrix at a time, the largest: each fully written by its
            // dequantizing kernel before its product reads it.
            let len = memory::expand_len(p);
            // SAFETY: as above.
            self.expanded = Some(unsafe { stream.alloc::<f16>(len) }.map_err(drv)?);
        }
        let scratch = memory::fused_scratch_bytes(&self.policy, self.packed.as_ref()) / 4;
        let scratch = usize::try_from(scratch).expect("a buffer the plan counted");
        // Without the tensor-core order (a device before compute capability 8.0, or
        // FLEXGEN_TC_ORDER=0) the fused product is the CUDA-core one, faster than dequantizing
        // only up to FUSED_DECODE_OTHER_GROUP_ROWS rows, as for other groups.
        let fits = self.packed.as_ref().is_some_and(|p| self.policy.fuses_decode_on(p.tc));
        if scratch > 0 && fused_decode_on() && fits {
            // Zeros, as every fused product leaves it (its store clears what it reads and sets
            // its counters back), so that the products need not zero it first.
            self.fused_scratch = Some(stream.alloc_zeros::<f32>(scratch).map_err(drv)?);
        }
        if g_end < len {
            for _ in 0..2 {
                // SAFETY: every staging arena is fully written before each use.
                self.stage.push(unsafe { self.load.alloc::<f16>(len) }.map_err(drv)?);
            }
            self.h2d_bytes_per_s = Some(self.measure_h2d()?);
        }
        Ok(())
    }

    /// Creates the file in `dir` that holds every layer's disk part (written with direct I/O),
    /// and its ring of three pinned buffers.
    fn open_disk_tier(&self, dir: &std::path::Path) -> Result<DiskPart> {
        std::fs::create_dir_all(dir).map_err(|e| io_err(dir, &e))?;
        let path =
            dir.join(format!("flexgen-weights-{}-{}.bin", std::process::id(), self.range.start));
        let file = DirectFile::create(&path).map_err(|e| io_err(&path, &e))?;
        let slot_bytes = align_up((self.unit_len - self.c_end) * 2);
        let mut ring = Vec::new();
        let mut copied = Vec::new();
        for _ in 0..3 {
            let mut m = HostMem::new_f16(slot_bytes / 2).map_err(cuda)?;
            m.pin(&self.gpu.ctx).map_err(cuda)?;
            ring.push(m);
            copied.push(new_event(&self.gpu)?);
        }
        Ok(DiskPart { file, slot_bytes, layers: self.range.len(), ring, copied })
    }

    /// Writes layer `j`'s disk part to its slot of the disk tier's file.
    fn write_disk_part(&self, source: LayerSource, j: usize, d: &mut DiskPart) -> Result<()> {
        let elems = self.unit_len - self.c_end;
        self.fill(source, j, self.c_end..self.unit_len, &mut d.ring[0].as_f16_mut()[..elems])?;
        d.file
            .write_aligned((j * d.slot_bytes) as u64, d.ring[0].as_bytes_mut())
            .map_err(|e| io_err(d.file.path(), &e))
    }

    /// Times direct reads of up to three layers' disk parts (the page cache cannot serve them),
    /// and keeps the disk tier.
    fn probe_disk_tier(&mut self, mut d: DiskPart) -> Result<()> {
        let t = Instant::now();
        let probe = d.layers.min(3);
        for j in 0..probe {
            read_parallel(
                &d.file,
                (j * d.slot_bytes) as u64,
                d.ring[j % 3].as_bytes_mut(),
                READ_THREADS,
            )
            .map_err(|e| io_err(d.file.path(), &e))?;
        }
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let rate = (probe * d.slot_bytes) as f64 / t.elapsed().as_secs_f64();
        self.disk_bytes_per_s = Some(rate);
        self.direct_io = Some(d.file.is_direct());
        self.disk = Some(d);
        Ok(())
    }

    /// Times copies of the first offloaded layer part into a staging arena (pinned bandwidth
    /// of this link, in this process).
    pub(super) fn measure_h2d(&self) -> Result<f64> {
        let (src, dst): (&[f16], u64) = match (&self.layers[0].cpu, &self.disk) {
            (Some(m), _) => (m.as_f16(), at(addr(&self.stage[0]), self.g_end)),
            (None, Some(d)) => (d.ring[0].as_f16(), at(addr(&self.stage[0]), self.c_end)),
            (None, None) => return Ok(0.0),
        };
        let src = &src[..src.len().min(self.unit_len - self.g_end)];
        let t0 = new_timing_event(&self.gpu)?;
        let t1 = new_timing_event(&self.gpu)?;
        let reps = 3;
        t0.record(&self.load).map_err(drv)?;
        for _ in 0..reps {
            // SAFETY: the staging arena holds `len` elements from `dst`'s offset on.
            unsafe { cudarc::driver::result::memcpy_htod_async(dst, src, self.load.cu_stream()) }
                .map_err(drv)?;
        }
        t1.record(&self.load).map_err(drv)?;
        t1.synchronize().map_err(drv)?;
        let ms = f64::from(t0.elapsed_ms(&t1).map_err(drv)?);
        #[expect(clippy::cast_precision_loss, reason = "a rate")]
        let rate = (reps * src.len() * 2) as f64 / (ms / 1e3);
        Ok(rate)
    }

    /// Issues the copies of layer `j`'s CPU part, and its disk part once the reader has it, into
    /// staging arena `slot` on the load stream, after the layer that last used that arena has
    /// been computed. With `timed`, between two timing events kept in `copy_spans`.
    pub(super) fn issue_load(
        &self,
        (j, slot): (usize, usize),
        reader: Option<&Reader>,
        traffic: &mut Traffic,
        timed: bool,
    ) -> Result<()> {
        self.load.wait(&self.freed[slot]).map_err(drv)?;
        let started = if timed {
            Some(flexgen_tensor::cuda::timing_event(&self.load).map_err(cuda)?)
        } else {
            None
        };
        let stage = addr(&self.stage[slot]);
        if let Some(m) = &self.layers[j].cpu {
            let src = m.as_f16();
            // The arena holds `len` elements and the layer that used it is done (`freed`).
            htod(&self.load, at(stage, self.g_end), src)?;
            traffic.cpu_to_gpu += 2 * src.len() as u64;
        }
        if let (Some(d), Some(r)) = (&self.disk, reader) {
            let ring = r.filled.recv().map_err(|_| Error::Config {
                field: "offload_dir",
                message: "the disk reader stopped".into(),
            })??;
            let elems = self.unit_len - self.c_end;
            let src = &d.ring[ring].as_f16()[..elems];
            // The reader filled this ring buffer and touches it again only after `copied[ring]`
            // fires.
            htod(&self.load, at(stage, self.c_end), src)?;
            d.copied[ring].record(&self.load).map_err(drv)?;
            let _ = r.free.send(ring);
            traffic.cpu_to_gpu += 2 * elems as u64;
            traffic.disk_read += d.slot_bytes as u64;
        }
        self.loaded[slot].record(&self.load).map_err(drv)?;
        if let Some(t0) = started {
            let t1 = flexgen_tensor::cuda::timing_event(&self.load).map_err(cuda)?;
            self.copy_spans.borrow_mut().push((t0, t1));
        }
        Ok(())
    }

    /// Adds the timed copies' seconds to `host_times` once the load stream is idle.
    pub(super) fn account_copies(&self) -> Result<()> {
        let mut secs = 0.0;
        for (t0, t1) in self.copy_spans.borrow_mut().drain(..) {
            secs += f64::from(t0.elapsed_ms(&t1).map_err(drv)?) / 1e3;
        }
        let mut h = self.host_times.get();
        h.decode_weight_copy_s += secs;
        self.host_times.set(h);
        Ok(())
    }

    /// Layer `j`'s weights for this pass: its resident arena, or staging arena `slot` once the
    /// copies have landed and the GPU part has been copied in. Packed, each matrix is dequantized
    /// into the one fp16 buffer just before its product, or (`fused`, on a stage that fuses decode
    /// products) read as codes by the fused 4-bit product; its vectors are read where they are
    /// stored.
    pub(super) fn layer_weights(
        &self,
        j: usize,
        slot: usize,
        fused: bool,
    ) -> Result<fused::LayerWeights> {
        let home = &self.layers[j];
        let stored = if self.g_end == self.unit_len {
            addr(home.gpu.as_ref().expect("a resident layer"))
        } else {
            let st = &self.gpu.stream;
            st.wait(&self.loaded[slot]).map_err(drv)?;
            let dst = addr(&self.stage[slot]);
            if let Some(g) = &home.gpu {
                // By the SMs: a copy engine would queue it behind the next layer's copy.
                // SAFETY: the staging arena's first `g_end` units, from the resident part.
                unsafe { self.gpu.copy_raw(addr(g), dst, 2 * self.g_end) }.map_err(cuda)?;
            }
            dst
        };
        let Some(p) = &self.packed else {
            return Ok(fused::LayerWeights { arena: stored, vectors: stored, packed: None });
        };
        // Packed: each matrix dequantized before its product into the one fp16 buffer, or
        // (fused) read from its codes.
        let buf = addr(self.expanded.as_ref().expect("allocated with the packed layout"));
        // Each matrix's codes and (min, scale) pairs in the stored arena.
        let mats = p
            .mats
            .each_ref()
            .map(|m| (stored + m.codes.start as u64, stored + m.params.start as u64));
        let scratch = self.fused_scratch.as_ref().filter(|_| fused);
        let sums = memory::fused_sums_len(&self.policy, p) as u64;
        let how = scratch.map_or(fused::PackedUse::Expand { buf }, |s| fused::PackedUse::Fused {
            scratch: addr(s),
            done: if folded_store_on() { addr(s) + 4 * sums } else { 0 },
        });
        let packed = Some(fused::Packed4 { mats, group: p.group, bits: p.bits, tc: p.tc, how });
        // The vectors are read where the stored arena holds them, in fp16 as in the fp16
        // layout: layout offset o of the vectors at stored + vectors.start + 2·(o − vec_src.start).
        let vectors = (stored + p.vectors.start as u64).wrapping_sub(2 * p.vec_src.start as u64);
        // The matrices are read from `packed` alone: no fp16 arena.
        Ok(fused::LayerWeights { arena: 0, vectors, packed })
    }
}

/// Whether decode steps that may take the fused 4-bit product do (`Policy::fuses_decode`):
/// unless `FLEXGEN_FUSED4=0` is in the environment, which keeps the dequantizing path to measure
/// the two side by side.
fn fused_decode_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    knob_on("FLEXGEN_FUSED4", &ON)
}

/// Whether 4-bit weights are packed in the tensor-core order where the device and shapes allow
/// (`PackedLayout::tc`): unless `FLEXGEN_TC_ORDER=0`, which keeps `quantize`'s dim-0 layout (and
/// so the CUDA-core product up to `FUSED_DECODE_OTHER_GROUP_ROWS` rows, dequantizing beyond) to
/// measure the two side by side (read once).
pub(super) fn tc_order_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    knob_on("FLEXGEN_TC_ORDER", &ON)
}

/// Whether the tensor-core 4-bit product stores its own sums: unless `FLEXGEN_FUSED4_STORE=0`,
/// which runs the store as a kernel of its own to compare (read once).
fn folded_store_on() -> bool {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    knob_on("FLEXGEN_FUSED4_STORE", &ON)
}
