//! CUDA stages over processes: one stage, and one GPU (rank r uses GPU r mod the GPUs it sees),
//! per rank, joined by the TCP ring of `crate::ranks`. Rank 0 owns the schedule: it sends each
//! block down the ranks, runs the first stage (the embedding), and answers the last rank's
//! picks with the feed, which goes down the ranks again. Each stage runs `run_linked` as a stage
//! of the in-process pipeline does; what differs is the link: hidden states cross to the next
//! rank through host memory over the ring, or GPU to GPU over a two-rank NCCL link (link r joins
//! rank r to r + 1), its ids made by rank 0 and sent round in the set-up.
//!
//! Set-up: rank 0 sends `Setup` (the requests the stages are sized for, the links' ids) down the
//! ranks; each builds its stage, then `Ready` goes round from rank 0 (a rank passes it on once
//! its stage is built), so no rank waits on an NCCL link whose other end failed to build. A
//! failure goes round the ring as `Failed`, and every rank stops at it.

#[allow(clippy::wildcard_imports)]
use super::*;

use std::ops::Range;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

use flexgen_tensor::cuda::{device_count, link_id, nccl_present};

use super::pipeline::{Handoff, check_shapes, first_error};
use crate::ranks::{self, Msg, RankLink, RankSpec, RankUsage, Wire};

/// This process's stage of a pipeline of CUDA ranks.
pub(crate) struct CudaRank<'m> {
    stage: Mutex<CudaStage<'m>>,
    wire: Wire,
    /// The NCCL link from the previous rank's GPU (none on rank 0, or over the ring).
    from_prev: Option<Mutex<NcclLink>>,
    /// The NCCL link to the next rank's GPU (none on the last rank, or over the ring).
    to_next: Option<Mutex<NcclLink>>,
    /// Set on rank 0 once a failure has stopped the ranks.
    broken: AtomicBool,
}

/// The GPU rank `rank` computes on.
fn ordinal(rank: u32) -> Result<usize> {
    let n = device_count().map_err(cuda)?;
    if n == 0 {
        return Err(cuda(CudaError::NoDevice { ordinal: 0, count: 0 }));
    }
    Ok(rank as usize % n)
}

/// An NCCL link that could not be joined, with what to do.
#[expect(clippy::needless_pass_by_value, reason = "used as map_err(link_error)")]
fn link_error(e: CudaError) -> Error {
    Error::Config {
        field: "link",
        message: format!(
            "{e}. NCCL needs each rank on a GPU of its own (ranks r and r + GPUs share one); \
             --link tcp passes hidden states through host memory instead"
        ),
    }
}

impl<'m> CudaRank<'m> {
    /// Rank 0: waits at the coordinator address until every rank has joined, chooses the link,
    /// builds the first stage while the others build theirs, and joins the NCCL link to rank 1.
    pub(crate) fn rank0(
        model: &'m Model,
        stages: &[(Range<u32>, Policy)],
        source: LayerSource,
        capacity: GpuCapacity,
        spec: &RankSpec,
    ) -> Result<Self> {
        crate::host_stage::check_ranks(stages, spec)?;
        check_shapes(model, stages)?;
        let wire = ranks::coordinate(spec)?;
        // From here on the other ranks wait for this one: a failure goes round to them.
        let fail = |e: Error| wire.fail(e);
        let gpus = device_count().map_err(cuda).map_err(fail)?;
        let act_on_gpu = |p: &Policy| p.placement.activations.single_tier() == Some(Tier::Gpu);
        let nccl = match spec.link {
            RankLink::Tcp => false,
            RankLink::Auto => {
                spec.world_size as usize <= gpus
                    && nccl_present()
                    && stages.iter().all(|(_, p)| act_on_gpu(p))
            }
            RankLink::Nccl => {
                if let Some(i) = stages.iter().position(|(_, p)| !act_on_gpu(p)) {
                    return Err(fail(Error::Config {
                        field: "placement.activations",
                        message: format!(
                            "stage {i} keeps its activations off the GPU: an NCCL link carries \
                             hidden states between GPUs; put them on the GPU or use --link tcp"
                        ),
                    }));
                }
                true
            }
        };
        let links = if nccl {
            (1..spec.world_size)
                .map(|_| link_id().map_err(cuda))
                .collect::<Result<Vec<_>>>()
                .map_err(fail)?
        } else {
            Vec::new()
        };
        let setup =
            Msg::Setup { max_prompt: capacity.max_prompt, max_new: capacity.max_new, links };
        wire.send(&setup)?;
        let Msg::Setup { links, .. } = setup else { unreachable!("made above") };
        let (range, policy) = &stages[0];
        let stage = CudaStage::part(model, policy.clone(), source, capacity, range.clone(), 0)
            .map_err(fail)?;
        tracing::info!(
            "rank 0 of {}: hidden states over {}",
            spec.world_size,
            if nccl { "NCCL" } else { "the TCP ring" }
        );
        wire.send(&Msg::Ready)?;
        match wire.recv()? {
            Msg::Ready => {}
            m => return Err(wire.not_due(m)),
        }
        let to_next = links
            .first()
            .map(|id| NcclLink::join(&stage.gpu.ctx, id, true).map(Mutex::new))
            .transpose()
            .map_err(link_error)?;
        Ok(Self {
            stage: Mutex::new(stage),
            wire,
            from_prev: None,
            to_next,
            broken: AtomicBool::new(false),
        })
    }

    /// Rank r > 0: joins the ring, builds stage r on GPU r mod the GPUs it sees (sized by rank
    /// 0's set-up; `capacity` gives the memory limit), and runs it on every block until rank 0
    /// is done. A failure here goes round the ring (rank 0 reports it) and is returned.
    pub(crate) fn serve(
        model: &'m Model,
        stages: &[(Range<u32>, Policy)],
        source: LayerSource,
        capacity: GpuCapacity,
        spec: &RankSpec,
    ) -> Result<()> {
        crate::host_stage::check_ranks(stages, spec)?;
        let wire = ranks::join(spec)?;
        let (rank, last) = (spec.rank, spec.rank + 1 == spec.world_size);
        let fail = |e: Error| wire.fail(e);
        check_shapes(model, stages).map_err(fail)?;
        let (max_prompt, max_new, links) = match wire.recv()? {
            Msg::Setup { max_prompt, max_new, links } => (max_prompt, max_new, links),
            m => return Err(wire.not_due(m)),
        };
        if !last {
            wire.send(&Msg::Setup { max_prompt, max_new, links: links.clone() })?;
        }
        let (range, policy) = &stages[rank as usize];
        let capacity = GpuCapacity { max_prompt, max_new, ..capacity };
        let gpu = ordinal(rank).map_err(fail)?;
        let stage = CudaStage::part(model, policy.clone(), source, capacity, range.clone(), gpu)
            .map_err(fail)?;
        match wire.recv()? {
            Msg::Ready => wire.send(&Msg::Ready)?,
            m => return Err(wire.not_due(m)),
        }
        let ctx = stage.gpu.ctx.clone();
        let join = |i: usize, upstream: bool| {
            links.get(i).map(|id| NcclLink::join(&ctx, id, upstream).map(Mutex::new)).transpose()
        };
        let from_prev = join(rank as usize - 1, false).map_err(link_error).map_err(fail)?;
        let to_next = if last {
            None
        } else {
            join(rank as usize, true).map_err(link_error).map_err(fail)?
        };
        let me = Self {
            stage: Mutex::new(stage),
            wire,
            from_prev,
            to_next,
            broken: AtomicBool::new(false),
        };
        loop {
            match me.wire.recv()? {
                Msg::Input(block) => {
                    if !last {
                        me.wire.send(&Msg::Input(block.clone()))?;
                    }
                    me.serve_block(&block)?;
                }
                Msg::Usage(mut ranks) => {
                    ranks.push(me.usage(gpu)?);
                    me.wire.send(&Msg::Usage(ranks))?;
                }
                Msg::Done => {
                    let _ = me.wire.send(&Msg::Done);
                    return Ok(());
                }
                m => return Err(me.wire.not_due(m)),
            }
        }
    }

    /// Sends a step's hidden states (`h`, this rank's, idle until the feed) to the next rank.
    fn send_hidden(&self, h: &Handoff) -> Result<()> {
        let Handoff::At { first, addrs, host, bytes } = h else {
            unreachable!("a stage hands on its own hidden states")
        };
        let first = *first;
        if let Some(link) = &self.to_next {
            self.wire.send(&Msg::Sent { first, count: addrs.len(), bytes: *bytes })?;
            let mut link = link.lock().expect("one sender");
            for &a in addrs {
                // SAFETY: a GPU batch's hidden state on this rank's GPU (NCCL links are chosen
                // only where activations live there), idle until the feed.
                unsafe { link.send(a, *bytes) }.map_err(cuda)?;
            }
            return Ok(());
        }
        let parts = addrs
            .iter()
            .map(|&a| {
                let mut v = vec![0u8; *bytes];
                if *host {
                    // SAFETY: pinned host memory of `bytes` bytes, idle until the feed.
                    v.copy_from_slice(unsafe {
                        std::slice::from_raw_parts(a as *const u8, *bytes)
                    });
                } else {
                    // SAFETY: device memory of `bytes` bytes, idle until the feed.
                    unsafe { cudarc::driver::result::memcpy_dtoh_sync(&mut v, a) }.map_err(drv)?;
                }
                Ok(v)
            })
            .collect::<Result<Vec<_>>>()?;
        self.wire.send(&Msg::Hidden { first, parts })
    }

    /// One block on this rank: the stage on a thread of its own (its hidden states from
    /// `hidden`, or the embedding on rank 0; the last rank sends its picks to rank 0 and takes
    /// the feed from `feed`), a thread that sends its hidden states on, and `main` on this
    /// thread, which reads the ring meanwhile. Returns the first real error of the three.
    fn run_threads(
        &self,
        input: &BlockInput,
        stats: &mut RunStats,
        (hidden, feed): (Option<mpsc::Receiver<Handoff>>, mpsc::Receiver<Feed>),
        main: impl FnOnce() -> Result<()>,
    ) -> Result<()> {
        let last = self.wire.rank as usize + 1 == self.wire.world();
        let (out_tx, out_rx) = mpsc::channel::<Handoff>();
        let ctx = self.stage.lock().expect("a stage's lock").gpu.ctx.clone();
        std::thread::scope(|s| {
            let stage = s.spawn(move || -> Result<()> {
                let stage = self.stage.lock().expect("a stage's lock");
                stage.gpu.ctx.bind_to_thread().map_err(drv)?;
                let wire = &self.wire;
                let mut to_rank0 = |_: usize, first: usize, picks: Vec<Picks>| -> Result<Feed> {
                    wire.send(&Msg::Picks { first, picks })?;
                    feed.recv().map_err(|_| stopped())
                };
                let link = Link {
                    prev: hidden.as_ref(),
                    next: (!last).then_some(&out_tx),
                    feed_in: (!last).then_some(&feed),
                    feed_out: &[],
                    nccl: self.from_prev.as_ref(),
                    groups: self.wire.world(),
                };
                let r = stage.run_linked(input, stats, &mut to_rank0, &link);
                match r {
                    Err(e) if !is_stopped(&e) => Err(wire.fail(e)),
                    r => r,
                }
            });
            let sender = s.spawn(move || -> Result<()> {
                ctx.bind_to_thread().map_err(drv)?;
                for h in out_rx {
                    self.send_hidden(&h)?;
                }
                Ok(())
            });
            let mine = main();
            let theirs = [stage.join(), sender.join()]
                .into_iter()
                .map(|r| r.expect("a rank's thread panicked"));
            first_error(std::iter::once(mine).chain(theirs))
        })
    }

    /// Rank r > 0: one block, its hidden states from the previous rank, its feed from rank 0
    /// (passed on down the ranks). Then the bytes ranks 1 … r moved go on towards rank 0.
    fn serve_block(&self, input: &BlockInput) -> Result<()> {
        let last = self.wire.rank as usize + 1 == self.wire.world();
        let (hid_tx, hid_rx) = mpsc::channel::<Handoff>();
        let (feed_tx, feed_rx) = mpsc::channel::<Feed>();
        let mut stats = RunStats::default();
        let wire = &self.wire;
        // Reads the ring until the previous rank's end of the block: hidden states go to the
        // stage, the feed to the stage and on down the ranks (a stage that has ended leaves
        // them unread).
        let dispatch = move || -> Result<crate::tiers::Traffic> {
            // Dropped on return (the closure runs once), which tells the stage the block's hidden
            // states have all come.
            let (hid_tx, feed_tx) = (hid_tx, feed_tx);
            loop {
                match wire.recv()? {
                    Msg::Hidden { first, parts } => {
                        let _ = hid_tx.send(Handoff::Owned { first, parts });
                    }
                    Msg::Sent { first, count, bytes } => {
                        let _ = hid_tx.send(Handoff::Nccl { first, count, bytes });
                    }
                    Msg::Feed(f) => {
                        if !last {
                            wire.send(&Msg::Feed(f.clone()))?;
                        }
                        let _ = feed_tx.send(f);
                    }
                    Msg::Traffic(t) => return Ok(t),
                    m => return Err(wire.not_due(m)),
                }
            }
        };
        let mut before = crate::tiers::Traffic::default();
        self.run_threads(input, &mut stats, (Some(hid_rx), feed_rx), || {
            before = dispatch()?;
            Ok(())
        })?;
        let mut traffic = stats.tiers.traffic;
        traffic.add(before);
        wire.send(&Msg::Traffic(traffic))
    }

    /// Rank 0: one block down the ranks, answering the last rank's picks with `after_step`.
    fn lead_block(
        &self,
        input: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()> {
        let wire = &self.wire;
        wire.send(&Msg::Input(input.clone()))?;
        let (feed_tx, feed_rx) = mpsc::channel::<Feed>();
        // The last rank's picks come group by group, step by step; each is answered at once.
        let k = self.stage.lock().expect("a stage's lock").policy.num_gpu_batches as usize;
        let groups = super::step::groups(k, wire.world()).len();
        // A block with nothing to run runs no step on any rank (`run_linked`).
        let steps = if input.ids.is_empty() { 0 } else { input.steps };
        let lead = move || -> Result<()> {
            let feed_tx = feed_tx; // dropped on return: the stage's feed ends
            for step in 0..steps {
                for _ in 0..groups {
                    let (first, picks) = match wire.recv()? {
                        Msg::Picks { first, picks } => (first, picks),
                        m => return Err(wire.not_due(m)),
                    };
                    let feed = after_step(step, first, picks).map_err(|e| wire.fail(e))?;
                    let end = feed.is_none();
                    wire.send(&Msg::Feed(feed.clone()))?;
                    let _ = feed_tx.send(feed);
                    if end {
                        return Ok(());
                    }
                }
            }
            Ok(())
        };
        self.run_threads(input, stats, (None, feed_rx), lead)?;
        // The end of the block on rank 0's side, then the others' bytes from the last rank.
        wire.send(&Msg::Traffic(crate::tiers::Traffic::default()))?;
        match wire.recv()? {
            Msg::Traffic(t) => stats.tiers.traffic.add(t),
            m => return Err(wire.not_due(m)),
        }
        Ok(())
    }
}

impl Stage for CudaRank<'_> {
    fn run_block(
        &self,
        input: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()> {
        if self.broken.load(Ordering::Relaxed) {
            return Err(Error::Config {
                field: "coordinator",
                message: "the ranks stopped after an earlier failure: start them again".into(),
            });
        }
        self.lead_block(input, stats, after_step)
            .inspect_err(|_| self.broken.store(true, Ordering::Relaxed))
    }

    fn max_width(&self) -> Option<usize> {
        self.stage.lock().expect("a stage's lock").max_width()
    }

    /// Rank 0's stage, then the other ranks' memory and bytes moved (`Msg::Usage` round the
    /// ring), so that the report covers the whole pipeline.
    fn finish(&self, stats: &mut RunStats) -> Result<()> {
        self.stage.lock().expect("a stage's lock").finish(stats)?;
        if self.broken.load(Ordering::Relaxed) {
            return Ok(()); // the other ranks have stopped
        }
        self.wire.send(&Msg::Usage(Vec::new()))?;
        match self.wire.recv()? {
            Msg::Usage(ranks) => add_usage(stats, &ranks),
            m => return Err(self.wire.not_due(m)),
        }
        Ok(())
    }
}

/// Adds the other ranks' usage to rank 0's `stats` (rank 0's GPU is ordinal 0): host memory,
/// disk and bytes moved add up; a GPU's use counts once, the largest reading of the ranks on it
/// (each reads the whole device's).
fn add_usage(stats: &mut RunStats, ranks: &[RankUsage]) {
    let mut gpus = std::collections::BTreeMap::from([(0usize, stats.tiers.required.gpu)]);
    for u in ranks {
        let g = gpus.entry(u.gpu).or_default();
        *g = (*g).max(u.required.gpu);
        stats.tiers.required.cpu += u.required.cpu;
        stats.tiers.required.disk += u.required.disk;
        stats.tiers.traffic.add(u.traffic);
    }
    stats.tiers.required.gpu = gpus.values().sum();
}

impl CudaRank<'_> {
    /// This rank's [`RankUsage`] (on GPU `gpu`): what its stage's `finish` reports.
    fn usage(&self, gpu: usize) -> Result<RankUsage> {
        let mut own = RunStats::default();
        self.stage.lock().expect("a stage's lock").finish(&mut own)?;
        Ok(RankUsage { gpu, required: own.tiers.required, traffic: own.tiers.traffic })
    }

    /// Rank 0: the other ranks stop once the end has gone round.
    pub(crate) fn stop_ranks(&self) {
        if self.wire.rank == 0 {
            let _ = self.wire.send(&Msg::Done);
        }
    }
}

impl Drop for CudaRank<'_> {
    fn drop(&mut self) {
        self.stop_ranks();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tiers::{TierBytes, Traffic};

    /// Ranks on their own GPUs add their devices' use; ranks that share rank 0's GPU (or
    /// another's) count it once, at the largest reading; host memory, disk and bytes moved add.
    #[test]
    fn the_ranks_usage_adds_up_each_gpu_once() {
        let mut stats = RunStats::default();
        stats.tiers.required = TierBytes { gpu: 100, cpu: 10, disk: 1 };
        stats.tiers.traffic.disk_read = 5;
        let rank = |gpu, g, c, d| RankUsage {
            gpu,
            required: TierBytes { gpu: g, cpu: c, disk: d },
            traffic: Traffic { disk_read: 1, disk_write: 2, ..Traffic::default() },
        };
        add_usage(&mut stats, &[rank(1, 40, 20, 2), rank(0, 120, 30, 3), rank(1, 50, 40, 4)]);
        assert_eq!(stats.tiers.required, TierBytes { gpu: 120 + 50, cpu: 100, disk: 10 });
        assert_eq!((stats.tiers.traffic.disk_read, stats.tiers.traffic.disk_write), (8, 6));
    }
}
