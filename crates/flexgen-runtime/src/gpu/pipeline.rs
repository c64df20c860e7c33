//! CUDA stages in a pipeline: each stage holds a contiguous range of layers under its own
//! placement and runs on its own thread; after each step a stage hands its micro-batches' hidden
//! states to the next stage, which copies them into its own buffers (a device-to-device copy on
//! one GPU; between processes NCCL carries the same bytes), and the last stage picks the next
//! tokens, asks the schedule, and sends the feed back to every earlier stage.

#[allow(clippy::wildcard_imports)]
use super::*;

use std::ops::Range;
use std::sync::Mutex;

/// Where a stage's hidden states are after a step: one address per GPU batch (device memory, or
/// pinned host memory when activations live on the CPU), `bytes` each.
pub(crate) struct Handoff {
    addrs: Vec<u64>,
    host: bool,
    bytes: usize,
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
}

/// The error of a stage whose neighbour has stopped (the neighbour's own error is the one
/// reported).
pub(super) fn stopped() -> Error {
    Error::Config { field: "stage", message: "a neighbouring pipeline stage stopped".into() }
}

impl CudaStage<'_> {
    /// Where GPU batch `kb`'s hidden state lives between layers.
    fn hidden_home(&self, buf: &RunBuffers, kb: usize) -> u64 {
        if self.act_on_gpu { addr(&buf.x[kb]) } else { buf.x_host[kb].ptr() as u64 }
    }

    /// This stage's hidden states of every GPU batch, `n` values each, once its stream is idle.
    pub(super) fn hidden_handoff(&self, buf: &RunBuffers, n: usize) -> Handoff {
        let k = self.policy.num_gpu_batches as usize;
        let addrs = (0..k).map(|kb| self.hidden_home(buf, kb)).collect();
        Handoff { addrs, host: !self.act_on_gpu, bytes: n * 2 }
    }

    /// Copies the previous stage's hidden states into this stage's, on its compute stream (the
    /// previous stage leaves them alone until the feed, which comes after this step).
    pub(super) fn take_hidden(&self, buf: &RunBuffers, h: &Handoff) -> Result<()> {
        let mem =
            |a: u64, host: bool| if host { Mem::Host(a as *const u8) } else { Mem::Device(a) };
        for (kb, &src) in h.addrs.iter().enumerate() {
            let dst = mem(self.hidden_home(buf, kb), !self.act_on_gpu);
            // SAFETY: both stages' buffers hold a GPU batch's hidden state of the same shape
            // (one block shape for every stage), and the source is idle until the feed.
            unsafe {
                copy_2d(&self.gpu.stream, mem(src, h.host), dst, Copy2d::contiguous(h.bytes))
            }
            .map_err(cuda)?;
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
        let stages = stages
            .iter()
            .map(|(r, p)| {
                CudaStage::part(model, p.clone(), source, capacity, r.clone()).map(Mutex::new)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { stages })
    }
}

impl Stage for CudaPipeline<'_> {
    fn run_block(
        &self,
        input: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, Vec<Picks>) -> Result<Feed>,
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
                        feed_out: &[],
                    };
                    let mut never = |_: usize, _: Vec<Picks>| -> Result<Feed> { Ok(None) };
                    stage.run_linked(input, &mut own, &mut never, &link)?;
                    Ok(own)
                }));
            }
            let last = self.stages[n - 1].lock().expect("a stage's lock");
            let link = Link { prev: prev.as_ref(), next: None, feed_in: None, feed_out: &feeds };
            let mine = last
                .gpu
                .ctx
                .bind_to_thread()
                .map_err(drv)
                .and_then(|()| last.run_linked(input, stats, after_step, &link));
            feeds.clear(); // the earlier stages stop waiting for a feed
            drop(prev);
            let theirs: Vec<Result<RunStats>> =
                threads.into_iter().map(|t| t.join().expect("a pipeline stage panicked")).collect();
            (mine, theirs)
        });
        let (mine, theirs) = results;
        // A stage's own error, before the neighbours' "stopped".
        let stop = stopped().to_string();
        let mut errors: Vec<Error> = Vec::new();
        if let Err(e) = mine {
            errors.push(e);
        }
        for r in theirs {
            match r {
                Ok(own) => stats.tiers.traffic.add(own.tiers.traffic),
                Err(e) => errors.push(e),
            }
        }
        errors.sort_by_key(|e| e.to_string() == stop);
        errors.into_iter().next().map_or(Ok(()), Err)
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
