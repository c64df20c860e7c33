//! CUDA stages in a pipeline: each stage holds a contiguous range of layers under its own
//! placement and runs on its own thread. The block's GPU batches go through in groups, one per
//! stage: after a group's layers a stage hands that group's hidden states to the next stage, which
//! copies them into its own buffers (a device-to-device copy on one GPU; between processes NCCL or
//! the ranks' ring carries the same bytes, `ranks.rs`) while this one runs the next group. The last
//! stage picks each group's next tokens as soon as the group is through, asks the schedule, and
//! sends that group's feed back to every earlier stage.

#[allow(clippy::wildcard_imports)]
use super::*;

use std::ops::Range;
use std::sync::Mutex;

/// Where a stage's hidden states are after a step.
pub(crate) enum Handoff {
    /// GPU batches `first..`: one address each (device memory, or host memory), `bytes` each;
    /// the source stays as it is until the group's feed.
    At { first: usize, addrs: Vec<u64>, host: bool, bytes: usize },
    /// GPU batches `first..`: their bytes, as they came over the ring from the previous rank.
    Owned { first: usize, parts: Vec<Vec<u8>> },
    /// GPU batches `first..first + count`: the previous rank sends `bytes` each over the stage's
    /// NCCL link (`Link::nccl`); they are received straight into the stage's hidden states.
    Nccl { first: usize, count: usize, bytes: usize },
}

/// A stage's neighbours in a pipeline (all `None` for a stage that is the whole model).
#[derive(Default)]
pub(crate) struct Link<'a> {
    /// The previous stage's hidden states (none: this stage embeds the tokens).
    pub(crate) prev: Option<&'a mpsc::Receiver<Handoff>>,
    /// The next stage (none: this stage picks the tokens).
    pub(crate) next: Option<&'a mpsc::Sender<Handoff>>,
    /// A stage before the last: the last stage's feed after each step.
    pub(crate) feed_in: Option<&'a mpsc::Receiver<Feed>>,
    /// The last stage: every earlier stage's feed.
    pub(crate) feed_out: &'a [mpsc::Sender<Feed>],
    /// A rank of a pipeline over processes: the NCCL link from the previous rank's GPU.
    pub(crate) nccl: Option<&'a Mutex<NcclLink>>,
    /// The groups the block's GPU batches pass through the pipeline in (one per stage; 0 or 1:
    /// the whole block at once).
    pub(crate) groups: usize,
}

/// The error of a stage whose neighbour has stopped (the neighbour's own error is the one
/// reported).
pub(super) fn stopped() -> Error {
    Error::Config { field: "stage", message: STOPPED.into() }
}

const STOPPED: &str = "a neighbouring pipeline stage stopped";

/// Whether `e` is [`stopped`].
pub(super) fn is_stopped(e: &Error) -> bool {
    matches!(e, Error::Config { field: "stage", message } if message == STOPPED)
}

/// The first error of `results`, a stage's own before a neighbour's [`stopped`].
pub(super) fn first_error(results: impl IntoIterator<Item = Result<()>>) -> Result<()> {
    let mut errors: Vec<Error> = results.into_iter().filter_map(Result::err).collect();
    errors.sort_by_key(is_stopped);
    errors.into_iter().next().map_or(Ok(()), Err)
}

impl CudaStage<'_> {
    /// Where GPU batch `kb`'s hidden state lives between layers.
    fn hidden_home(&self, buf: &RunBuffers, kb: usize) -> u64 {
        if self.act_on_gpu { addr(&buf.x[kb]) } else { buf.x_host[kb].ptr() as u64 }
    }

    /// This stage's hidden states of GPU batches `group`, `n` values each, once its stream is
    /// idle.
    pub(super) fn hidden_handoff(
        &self,
        buf: &RunBuffers,
        group: Range<usize>,
        n: usize,
    ) -> Handoff {
        let first = group.start;
        let addrs = group.map(|kb| self.hidden_home(buf, kb)).collect();
        Handoff::At { first, addrs, host: !self.act_on_gpu, bytes: n * 2 }
    }

    /// Copies the previous stage's hidden states into this stage's, on its compute stream (the
    /// previous stage leaves them alone until the feed, which comes after this step).
    pub(super) fn take_hidden(
        &self,
        buf: &RunBuffers,
        h: &Handoff,
        nccl: Option<&Mutex<NcclLink>>,
    ) -> Result<()> {
        let mem =
            |a: u64, host: bool| if host { Mem::Host(a as *const u8) } else { Mem::Device(a) };
        // GPU batch `kb`'s hidden state from `src` into its home, on the compute stream.
        let copy_in = |kb: usize, src: Mem, bytes: usize| {
            let dst = mem(self.hidden_home(buf, kb), !self.act_on_gpu);
            // SAFETY: both ends hold a GPU batch's hidden state of this stage's shape (one block
            // shape for every stage); the callers keep the source as it is until it is copied.
            unsafe { copy_2d(&self.gpu.stream, src, dst, Copy2d::contiguous(bytes)) }.map_err(cuda)
        };
        match h {
            Handoff::At { first, addrs, host, bytes } => {
                // The previous stage leaves its source alone until the group's feed.
                for (kb, &src) in (*first..).zip(addrs) {
                    copy_in(kb, mem(src, *host), *bytes)?;
                }
            }
            Handoff::Owned { first, parts } => {
                for (kb, p) in (*first..).zip(parts) {
                    copy_in(kb, Mem::Host(p.as_ptr()), p.len())?;
                }
                // `parts` is dropped with the handoff: copied before that.
                self.gpu.stream.synchronize().map_err(drv)?;
            }
            Handoff::Nccl { first, count, bytes } => {
                let link = nccl.expect("an NCCL handoff comes over a stage's NCCL link");
                let mut link = link.lock().expect("one receiver");
                for kb in *first..first + count {
                    // SAFETY: the hidden homes are device memory when a rank's link is NCCL
                    // (checked at set-up), idle at the start of a step (the stream was
                    // synchronized at the end of the last), `bytes` ≤ their size.
                    unsafe { link.recv(self.hidden_home(buf, kb), *bytes) }.map_err(cuda)?;
                }
            }
        }
        Ok(())
    }
}

/// Stages over contiguous layer ranges, each placed by its own policy, all on GPU 0.
pub(crate) struct CudaPipeline<'m> {
    stages: Vec<Mutex<CudaStage<'m>>>,
}

impl<'m> CudaPipeline<'m> {
    /// Builds `stages` (checked to cover the model in order) one after the other on GPU 0.
    pub(crate) fn new(
        model: &'m Model,
        stages: &[(Range<u32>, Policy)],
        source: LayerSource,
        capacity: GpuCapacity,
    ) -> Result<Self> {
        check_shapes(model, stages)?;
        let stages = stages
            .iter()
            .map(|(r, p)| {
                CudaStage::part(model, p.clone(), source, capacity, r.clone(), 0).map(Mutex::new)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { stages })
    }
}

/// Stages must cover the model in order and run one block shape.
pub(super) fn check_shapes(model: &Model, stages: &[(Range<u32>, Policy)]) -> Result<()> {
    crate::host_stage::check_stages(model, stages)?;
    let shape = |p: &Policy| (p.gpu_batch_size, p.num_gpu_batches);
    if let Some((i, _)) =
        stages.iter().enumerate().find(|(_, s)| shape(&s.1) != shape(&stages[0].1))
    {
        return Err(Error::Config {
            field: "stage",
            message: format!(
                "stage {i}'s block shape differs from stage 0's: every stage runs the same \
                 gpu_batch_size × num_gpu_batches"
            ),
        });
    }
    Ok(())
}

impl Stage for CudaPipeline<'_> {
    fn run_block(
        &self,
        input: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()> {
        let n = self.stages.len();
        let mut feeds = Vec::with_capacity(n - 1);
        let results = std::thread::scope(|s| {
            let mut threads = Vec::with_capacity(n - 1);
            let mut prev: Option<mpsc::Receiver<Handoff>> = None;
            for stage in &self.stages[..n - 1] {
                let (to_next, from_this) = mpsc::channel();
                let (feed_tx, feed_rx) = mpsc::channel();
                feeds.push(feed_tx);
                let from_prev = prev.replace(from_this);
                threads.push(s.spawn(move || -> Result<RunStats> {
                    let stage = stage.lock().expect("a stage's lock");
                    stage.gpu.ctx.bind_to_thread().map_err(drv)?;
                    let mut own = RunStats::default();
                    let link = Link {
                        prev: from_prev.as_ref(),
                        next: Some(&to_next),
                        feed_in: Some(&feed_rx),
                        groups: n,
                        ..Link::default()
                    };
                    let mut never =
                        |_: usize, _: usize, _: Vec<Picks>| -> Result<Feed> { Ok(None) };
                    stage.run_linked(input, &mut own, &mut never, &link)?;
                    Ok(own)
                }));
            }
            let last = self.stages[n - 1].lock().expect("a stage's lock");
            let link = Link { prev: prev.as_ref(), feed_out: &feeds, groups: n, ..Link::default() };
            let mine = last
                .gpu
                .ctx
                .bind_to_thread()
                .map_err(drv)
                .and_then(|()| last.run_linked(input, stats, after_step, &link));
            feeds.clear(); // the earlier stages stop waiting for a feed
            let theirs: Vec<Result<RunStats>> =
                threads.into_iter().map(|t| t.join().expect("a pipeline stage panicked")).collect();
            // Kept until the others are done: a group the stage before sent on after the block
            // ended lands here unread.
            drop(prev);
            (mine, theirs)
        });
        let (mine, theirs) = results;
        let theirs =
            theirs.into_iter().map(|r| r.map(|own| stats.tiers.traffic.add(own.tiers.traffic)));
        first_error(std::iter::once(mine).chain(theirs.collect::<Vec<_>>()))
    }

    fn max_width(&self) -> Option<usize> {
        self.stages.iter().filter_map(|s| s.lock().expect("a stage's lock").max_width()).min()
    }

    fn finish(&self, stats: &mut RunStats) -> Result<()> {
        let mut required = crate::tiers::TierBytes::default();
        for stage in &self.stages {
            let mut own = RunStats::default();
            stage.lock().expect("a stage's lock").finish(&mut own)?;
            // One GPU: its use is the device's, counted once.
            required.gpu = own.tiers.required.gpu;
            required.cpu += own.tiers.required.cpu;
            required.disk += own.tiers.required.disk;
            stats.tiers.traffic.add(own.tiers.traffic);
            stats.host = own.host;
        }
        stats.tiers.required = required;
        Ok(())
    }
}
