//! The interface between the one schedule (`schedule.rs`) and a device stage: the schedule hands
//! a stage a block of left-padded micro-batches; the stage runs them through every layer in the
//! zig-zag order (every micro-batch through a layer before the next layer), step after step, and
//! after each step reports every row's greedy pick (and the logits of the rows that asked for
//! them); the schedule answers with the tokens to feed next, or ends the block. Sampling, EOS,
//! stop strings, streaming and completions stay in the schedule, so every device behaves alike.
//!
//! Two stages implement it: the host stage (`host_stage.rs`: the tiered CPU executor) and the
//! CUDA stage (`gpu/`).

use flexgen_model::layers;
use flexgen_policy::ModelSpec;

use crate::{Result, RunStats};

/// One block of work: micro-batches of at most `gpu_batch_size` prompts each, left-padded to the
/// block's longest prompt.
#[derive(Debug, Clone)]
pub(crate) struct BlockInput {
    /// Per micro-batch: its rows' token ids, row-major `[rows, width]` (padding first).
    pub ids: Vec<Vec<u32>>,
    /// Per micro-batch and row: padding positions before the prompt.
    pub starts: Vec<Vec<usize>>,
    /// Per micro-batch and row: whether the schedule needs the row's logits each step.
    pub want_logits: Vec<Vec<bool>>,
    /// Prompt width (the longest prompt of the block).
    pub width: usize,
    /// Steps to run at most: the first is the prefill, each later one feeds one token per row.
    pub steps: usize,
    /// The padding token (fed to finished rows as well).
    pub pad: u32,
}

impl BlockInput {
    /// Left-pads `batches` (prompts per micro-batch) to the longest prompt of the block.
    pub(crate) fn new(
        batches: &[Vec<&[u32]>],
        want_logits: Vec<Vec<bool>>,
        steps: usize,
        pad: u32,
    ) -> Self {
        let width = batches.iter().flatten().map(|p| p.len()).max().unwrap_or(0);
        let mut ids = Vec::with_capacity(batches.len());
        let mut starts = Vec::with_capacity(batches.len());
        for mb in batches {
            let mut row_ids = Vec::with_capacity(mb.len() * width);
            let mut row_starts = Vec::with_capacity(mb.len());
            for p in mb {
                let n = width - p.len();
                row_ids.extend(std::iter::repeat_n(pad, n).chain(p.iter().copied()));
                row_starts.push(n);
            }
            ids.push(row_ids);
            starts.push(row_starts);
        }
        Self { ids, starts, want_logits, width, steps, pad }
    }

    /// Rows of micro-batch `k`.
    pub(crate) fn rows(&self, k: usize) -> usize {
        self.starts[k].len()
    }
}

/// The real-token mask of a row with `start` padding positions, over its first `len` positions.
pub(crate) fn mask(start: usize, len: usize) -> Vec<bool> {
    (0..len).map(|i| i >= start).collect()
}

/// The position-table indices of positions `past..past + t` of a row with `start` padding
/// positions (`flexgen_model::layers::position_indices` of its mask: the n-th real token gets
/// `n + offset`, padding `offset − 1`). Every stage takes its positions from here.
pub(crate) fn positions(spec: &ModelSpec, start: usize, past: usize, t: usize) -> Vec<u32> {
    layers::position_indices(spec, &mask(start, past + t))[past..].to_vec()
}

/// What a stage computed at one step for one micro-batch.
#[derive(Debug, Default)]
pub(crate) struct Picks {
    /// The most likely next token of every row (the first on ties).
    pub greedy: Vec<u32>,
    /// The logits of the rows whose `want_logits` is set (f32), `None` for the others.
    pub logits: Vec<Option<Vec<f32>>>,
}

/// The schedule's answer after a step: the token each row of each micro-batch is fed next, or
/// `None` to end the block (every sequence has finished).
pub(crate) type Feed = Option<Vec<Vec<u32>>>;

/// A device stage: runs blocks of micro-batches through the model's layers.
pub(crate) trait Stage {
    /// Runs `block`: the prefill, then decode steps, calling `after_step(step, first, picks)`
    /// after each step (one [`Picks`] per micro-batch from `first` on: the whole block at once,
    /// or a pipeline's groups of micro-batches in order, each as soon as it is through) and
    /// feeding what it returns for those micro-batches. `None` ends the block; it comes only
    /// from a step's last group. Adds the phase
    /// times, decode step times and bytes moved to `stats`.
    fn run_block(
        &self,
        block: &BlockInput,
        stats: &mut RunStats,
        after_step: &mut dyn FnMut(usize, usize, Vec<Picks>) -> Result<Feed>,
    ) -> Result<()>;

    /// The widest block (prompt positions) this stage can run; `None`: any width.
    /// The schedule moves a sequence to a later block only if its context stays within it.
    fn max_width(&self) -> Option<usize> {
        None
    }

    /// Adds what the stage holds for the whole run (memory per tier, bytes moved outside the
    /// blocks, host timings) to `stats`, once, at the end of a `generate` call.
    fn finish(&self, stats: &mut RunStats) -> Result<()>;
}

/// Adds a step's wall time to the prefill (step 0) or the decode steps.
pub(crate) fn record_step(stats: &mut RunStats, step: usize, secs: f64) {
    if step == 0 {
        stats.prefill_s += secs;
    } else {
        stats.decode_s += secs;
        stats.decode_steps.push(secs);
    }
}
