//! The generate API: requests in, completions out, with streaming events, on the device the
//! caller chooses. One [`Generator`] serves every app (complete, batch, chat) on the CPU or the
//! GPU: the schedule (`schedule.rs`) is the same, only the device stage differs.

use flexgen_model::Model;
use flexgen_policy::Policy;

use crate::gpu::{CudaPipeline, CudaRank, CudaStage, GpuCapacity, LayerSource};
use crate::host_stage::HostStage;
use crate::sampling::Sampling;
use crate::stage::Stage;
use crate::tiers::{Budgets, TierReport};
use crate::{Result, schedule};

/// What to generate for one prompt.
#[derive(Debug, Clone, PartialEq)]
pub struct Request {
    pub prompt: Prompt,
    /// Overrides [`GenerationConfig::max_new_tokens`] for this request.
    pub max_new_tokens: Option<usize>,
    /// Overrides [`GenerationConfig::stop`] for this request.
    pub stop: Option<Vec<String>>,
    /// Overrides [`GenerationConfig::sampling`] for this request; its seed is used as is, so the
    /// request samples the same tokens whichever call or block it runs in.
    pub sampling: Option<Sampling>,
}

impl Request {
    /// A text prompt with the shared settings.
    pub fn text(prompt: impl Into<String>) -> Self {
        Self {
            prompt: Prompt::Text(prompt.into()),
            max_new_tokens: None,
            stop: None,
            sampling: None,
        }
    }

    /// A prompt of token ids (BOS included if the model expects one) with the shared settings.
    pub fn tokens(ids: Vec<u32>) -> Self {
        Self { prompt: Prompt::Tokens(ids), max_new_tokens: None, stop: None, sampling: None }
    }
}

/// A prompt as text (tokenized with the model's tokenizer) or as token ids.
#[derive(Debug, Clone, PartialEq)]
pub enum Prompt {
    Text(String),
    Tokens(Vec<u32>),
}

/// Settings shared by all requests of one `generate` call.
#[derive(Debug, Clone, PartialEq)]
pub struct GenerationConfig {
    /// Tokens to generate per request (the first one comes out of the prefill).
    pub max_new_tokens: usize,
    pub sampling: Sampling,
    /// Stop when the text contains one of these; the text is cut before it.
    pub stop: Vec<String>,
    /// Stop a sequence when it emits the model's EOS token.
    pub stop_on_eos: bool,
    /// Return the logits that chose each generated token (as Hugging Face's `output_logits`).
    pub output_logits: bool,
    /// Teacher forcing, for evaluation: per request, the tokens to feed back instead of the
    /// chosen ones (the chosen tokens and their logits are still reported). Requests or steps
    /// past its end feed the chosen token.
    pub forced: Option<Vec<Vec<u32>>>,
    /// Refill a block from the queue (for calls with more requests than a block holds): when at
    /// least half of a block's sequences have finished and the longest of the rest still has
    /// enough steps to go, the block ends, and its unfinished sequences move to the next block
    /// with new requests beside them, their prompt and the tokens fed so far prefilled again.
    /// Throughput for jobs of mixed lengths; the price is that a moved sequence's cache is
    /// recomputed, equal to the one it had up to the device's rounding (so on the GPU its later
    /// tokens can depend on when it moved where two candidates are within rounding of a tie).
    pub refill: bool,
    /// Decode every sequence's text at every step for [`Event::Token`]'s `text`. Off, only
    /// sequences with stop strings are decoded per step (the text of a completion is the same;
    /// a sequence's text then comes in its last event): for batch work nobody reads as it
    /// streams.
    pub stream_text: bool,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 32,
            sampling: Sampling::Greedy,
            stop: Vec::new(),
            stop_on_eos: true,
            output_logits: false,
            forced: None,
            refill: false,
            stream_text: true,
        }
    }
}

/// Why a sequence ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// It reached its `max_new_tokens`.
    Length,
    /// It emitted the EOS token.
    Eos,
    /// Its text reached a stop string.
    Stop,
}

impl FinishReason {
    /// The reason as a short lowercase word.
    pub fn as_str(self) -> &'static str {
        match self {
            FinishReason::Length => "length",
            FinishReason::Eos => "eos",
            FinishReason::Stop => "stop",
        }
    }
}

/// The result for one request.
#[derive(Debug, Clone, PartialEq)]
pub struct Completion {
    pub prompt_tokens: Vec<u32>,
    /// Generated tokens (EOS included when it ended the sequence).
    pub tokens: Vec<u32>,
    /// Generated text, cut before a stop string; `None` without a tokenizer.
    pub text: Option<String>,
    pub finish: FinishReason,
    /// With [`GenerationConfig::output_logits`], the logits row of each generated token.
    pub logits: Option<Vec<Vec<f32>>>,
}

/// Something that happened during generation, in order, for streaming.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Event<'a> {
    /// Request `request` produced `token`; `text` is the newly printable text (may be empty
    /// while a multi-byte character or a possible stop string is incomplete).
    Token { request: usize, token: u32, text: &'a str },
    /// Request `request` ended.
    Finished { request: usize, reason: FinishReason },
    /// A block ended and request `request`, which finished in it, is complete (emitted for each
    /// such request, in block order, before [`Event::BlockEnd`]).
    Completed { request: usize, completion: &'a Completion },
    /// A block ended: every request completed so far has had its [`Event::Completed`]; a caller
    /// that saves results (a batch job) can make them durable here.
    BlockEnd,
}

/// Timings and counts of one `generate` call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunStats {
    /// Prompt tokens processed (padding excluded), each request's once.
    pub prompt_tokens: usize,
    /// Tokens prefilled again for sequences moved to a later block ([`GenerationConfig::refill`]).
    pub recomputed_tokens: usize,
    /// Tokens generated, all requests together.
    pub generated_tokens: usize,
    /// Wall time of the prefill steps (which also produce the first token of each sequence).
    pub prefill_s: f64,
    /// Wall time of the decode steps.
    pub decode_s: f64,
    /// Blocks run.
    pub blocks: usize,
    /// Bytes each tier had to hold (the largest block) and the bytes moved between tiers.
    pub tiers: TierReport,
    /// Whether disk-resident weights were read with direct I/O (`None`: no weights on disk).
    pub direct_io: Option<bool>,
    /// Wall time of each decode step (seconds), in order.
    pub decode_steps: Vec<f64>,
    /// Where the host thread spent time inside the steps (CUDA executor; zero elsewhere).
    pub host: HostTimes,
}

/// Host-thread time inside the steps of the CUDA executor, for reading a run against its plan:
/// the GPU idles while the host computes CPU attention, and the host idles while it waits for
/// the GPU before one.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct HostTimes {
    /// Seconds computing CPU attention on the cores.
    pub cpu_attention_s: f64,
    /// Seconds blocked on the compute stream (before CPU attention, around disk cache rows).
    pub gpu_wait_s: f64,
    /// Seconds the load stream spent copying weights to the GPU during the decode steps (events
    /// around each layer's copies, from when the arena is free): with the bytes, the rate the
    /// copies ran at inside the run.
    pub decode_weight_copy_s: f64,
}

impl RunStats {
    /// Prompt tokens per second of prefill.
    pub fn prefill_tokens_per_s(&self) -> f64 {
        self.prompt_tokens as f64 / self.prefill_s.max(1e-12)
    }

    /// Tokens per second of the decode steps (tokens after each sequence's first).
    pub fn decode_tokens_per_s(&self, sequences: usize) -> f64 {
        self.generated_tokens.saturating_sub(sequences) as f64 / self.decode_s.max(1e-12)
    }

    /// Generated tokens per second over prefill and decode (the original's "total throughput").
    pub fn total_tokens_per_s(&self) -> f64 {
        self.generated_tokens as f64 / (self.prefill_s + self.decode_s).max(1e-12)
    }
}

/// Where a [`Generator`] computes.
#[derive(Debug, Clone, Copy)]
pub enum Device {
    /// The tiered CPU executor: the compute device is the CPU, the "GPU" tier is host memory
    /// under `Budgets::gpu_bytes`, the disk tier is real. Runs every policy.
    Cpu(Budgets),
    /// The CUDA executor on GPU 0, sized for `capacity` (the longest prompt and the most new
    /// tokens of any request it will be given); layer values come from `source`.
    Cuda { source: LayerSource, capacity: GpuCapacity },
}

impl Default for Device {
    fn default() -> Self {
        Device::Cpu(Budgets::default())
    }
}

/// The device stage a generator drives.
enum Executor<'m> {
    Host(Box<HostStage<'m>>),
    Cuda(Box<CudaStage<'m>>),
    CudaPipeline(Box<CudaPipeline<'m>>),
    CudaRank(Box<CudaRank<'m>>),
}

/// Runs a model under a policy on a device.
pub struct Generator<'m> {
    model: &'m Model,
    policy: Policy,
    executor: Executor<'m>,
}

impl<'m> Generator<'m> {
    /// A generator on the CPU for `model` under `policy` (validated here), with unlimited tiers.
    pub fn new(model: &'m Model, policy: Policy) -> Result<Self> {
        Self::on(model, policy, Device::default())
    }

    /// A generator on the CPU whose tiers may hold at most `budgets`.
    pub fn with_budgets(model: &'m Model, policy: Policy, budgets: Budgets) -> Result<Self> {
        Self::on(model, policy, Device::Cpu(budgets))
    }

    /// A generator on the CPU that runs the model as a pipeline of `stages`: contiguous layer
    /// ranges covering the model, each placing its weights, KV cache and activations by its own
    /// policy, hidden states crossing from one stage to the next through an in-process link.
    /// `policy` gives the block shape (`gpu_batch_size`, `num_gpu_batches`). Each stage's tiers
    /// may hold `budgets`.
    pub fn host_pipeline(
        model: &'m Model,
        policy: Policy,
        stages: &[(std::ops::Range<u32>, Policy)],
        budgets: Budgets,
    ) -> Result<Self> {
        policy.validate()?;
        let stage = HostStage::pipeline(model, stages, budgets)?;
        Ok(Self { model, policy, executor: Executor::Host(Box::new(stage)) })
    }

    /// A generator on `device`. The weights are placed here; a policy that does not fit is
    /// refused before anything is allocated.
    ///
    /// A policy with `[[stage]]` entries runs as that pipeline: on the CPU as
    /// [`Generator::host_pipeline`]; on the GPU each stage on its own thread, all on GPU 0, the
    /// hidden states crossing by device-to-device copies.
    pub fn on(model: &'m Model, policy: Policy, device: Device) -> Result<Self> {
        policy.validate()?;
        let executor = match device {
            Device::Cpu(budgets) if !policy.stages.is_empty() => {
                let stages = policy.pipeline(model.spec.num_layers);
                Executor::Host(Box::new(HostStage::pipeline(model, &stages, budgets)?))
            }
            Device::Cpu(budgets) => {
                Executor::Host(Box::new(HostStage::new(model, &policy, budgets)?))
            }
            Device::Cuda { source, capacity } if !policy.stages.is_empty() => {
                let stages = policy.pipeline(model.spec.num_layers);
                Executor::CudaPipeline(Box::new(CudaPipeline::new(
                    model, &stages, source, capacity,
                )?))
            }
            Device::Cuda { source, capacity } => {
                Executor::Cuda(Box::new(CudaStage::new(model, policy.clone(), source, capacity)?))
            }
        };
        Ok(Self { model, policy, executor })
    }

    /// Rank 0 of a pipeline over processes (`spec.world_size` ranks, one stage each, joined over
    /// TCP at `spec.coordinator`, where this rank listens): runs the first stage and the
    /// schedule; the other ranks run [`serve_rank`] on the same device kind. The stages are the
    /// policy's `[[stage]]` entries (one per rank) or, without any, the layers split evenly.
    /// Returns once every rank has joined (and, on the GPU, built its stage).
    ///
    /// On the CPU rank 0 also holds the embedding and the LM head, and the micro-batches go
    /// round the ring in groups. On the GPU each rank has a GPU (rank r: GPU r mod the GPUs it
    /// sees), the last rank holds the LM head, and hidden states cross by NCCL or through host
    /// memory (`spec.link`).
    pub fn rank0(
        model: &'m Model,
        policy: Policy,
        device: Device,
        spec: &crate::RankSpec,
    ) -> Result<Self> {
        policy.validate()?;
        let stages = rank_stages(model, &policy, spec);
        let executor = match device {
            Device::Cpu(budgets) => {
                Executor::Host(Box::new(HostStage::rank0(model, &stages, budgets, spec)?))
            }
            Device::Cuda { source, capacity } => Executor::CudaRank(Box::new(CudaRank::rank0(
                model, &stages, source, capacity, spec,
            )?)),
        };
        Ok(Self { model, policy, executor })
    }

    /// Rank 0 of a pipeline over processes: tells the other ranks that the run is over, so that
    /// they exit (dropping the generator does the same; this is for a caller that leaves it to
    /// the process's exit). Elsewhere, nothing.
    pub fn stop_ranks(&self) {
        match &self.executor {
            Executor::Host(h) => h.stop_ranks(),
            Executor::CudaRank(c) => c.stop_ranks(),
            Executor::Cuda(_) | Executor::CudaPipeline(_) => {}
        }
    }

    /// The model it runs.
    pub fn model(&self) -> &Model {
        self.model
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// The CUDA executor, when this generator runs on the GPU (its memory plan, set-up times and
    /// link rates, for reports).
    pub fn cuda(&self) -> Option<&CudaStage<'m>> {
        match &self.executor {
            Executor::Cuda(c) => Some(c),
            Executor::Host(_) | Executor::CudaPipeline(_) | Executor::CudaRank(_) => None,
        }
    }

    /// Where it computes: `cpu` (the tiered executor, one stage or a pipeline) or `cuda` (one
    /// stage, or a pipeline of CUDA stages).
    pub fn backend(&self) -> &'static str {
        match &self.executor {
            Executor::Host(_) => "cpu",
            Executor::Cuda(_) | Executor::CudaPipeline(_) | Executor::CudaRank(_) => "cuda",
        }
    }

    /// Generates completions for `requests`, calling `on_event` as tokens come.
    pub fn generate(
        &self,
        requests: &[Request],
        config: &GenerationConfig,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<(Vec<Completion>, RunStats)> {
        let stage: &dyn Stage = match &self.executor {
            Executor::Host(h) => h.as_ref(),
            Executor::Cuda(c) => c.as_ref(),
            Executor::CudaPipeline(c) => c.as_ref(),
            Executor::CudaRank(c) => c.as_ref(),
        };
        let shape = (self.policy.gpu_batch_size as usize, self.policy.block_size());
        schedule::run(self.model, stage, shape, requests, config, on_event)
    }
}

/// Rank `spec.rank` > 0 of a pipeline over processes ([`Generator::rank0`], on the same kind of
/// device): joins the ring, runs its stage on everything that comes round, and returns once
/// rank 0 is done; a failure here is reported round the ring to rank 0 and returned. On the
/// GPU, rank 0 says what requests the stage is sized for (`capacity`'s lengths are not used).
pub fn serve_rank(
    model: &Model,
    policy: &Policy,
    device: Device,
    spec: &crate::RankSpec,
) -> Result<()> {
    policy.validate()?;
    let stages = rank_stages(model, policy, spec);
    match device {
        Device::Cpu(budgets) => HostStage::serve(model, &stages, budgets, spec),
        Device::Cuda { source, capacity } => {
            CudaRank::serve(model, &stages, source, capacity, spec)
        }
    }
}

/// The stages of a pipeline over processes: the policy's, or its layers split evenly over the
/// ranks (the first ranks take one more where they do not divide).
fn rank_stages(
    model: &Model,
    policy: &Policy,
    spec: &crate::RankSpec,
) -> Vec<(std::ops::Range<u32>, Policy)> {
    if !policy.stages.is_empty() {
        return policy.pipeline(model.spec.num_layers);
    }
    let (n, w) = (model.spec.num_layers, spec.world_size.max(1));
    let mut start = 0;
    (0..w)
        .map(|r| {
            let end = start + n / w + u32::from(r < n % w);
            let range = start..end;
            start = end;
            (range, Policy { prediction: None, ..policy.clone() })
        })
        .collect()
}
