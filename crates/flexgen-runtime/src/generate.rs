//! The generate API: requests in, completions out, with streaming events. Requests are cut into
//! blocks of the policy's effective batch (`gpu_batch_size × num_gpu_batches`); each block runs the
//! zig-zag schedule — for every token step, for every layer, every micro-batch — so that a layer's
//! weights serve the whole block before the next layer is touched.

use std::time::Instant;

use flexgen_model::layers;
use flexgen_model::{LayerWeights, Model};
use flexgen_policy::Policy;
use flexgen_tensor::{Backend, Cpu, Device, Tensor};
use rand::SeedableRng;

use crate::sampling::{self, Sampling};
use crate::stream::TextStream;
use crate::tiers::{self, ActStore, Budgets, KvStore, TierReport, Traffic, WeightStore};
use crate::{Error, Result};

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
}

/// Timings and counts of one `generate` call.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct RunStats {
    /// Prompt tokens processed (padding excluded).
    pub prompt_tokens: usize,
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

/// Prompts left-padded with `pad` to the longest one, and their real-token masks.
pub(crate) fn left_pad<'a>(
    prompts: impl Iterator<Item = &'a [u32]> + Clone,
    pad: u32,
) -> (Vec<Vec<u32>>, Vec<Vec<bool>>) {
    let width = prompts.clone().map(<[u32]>::len).max().unwrap_or(0);
    prompts
        .map(|p| {
            let n = width - p.len();
            (
                std::iter::repeat_n(pad, n).chain(p.iter().copied()).collect(),
                (0..width).map(|i| i >= n).collect(),
            )
        })
        .unzip()
}

/// Runs a model under a policy.
pub struct Generator<'m> {
    model: &'m Model,
    policy: Policy,
    device: Device,
    budgets: Budgets,
    weights: WeightStore,
}

/// One sequence of a micro-batch.
struct Seq {
    request: usize,
    max_new: usize,
    stop: Vec<String>,
    sampling: Sampling,
    prompt: Vec<u32>,
    generated: Vec<u32>,
    finish: Option<FinishReason>,
    stream: TextStream,
    rng: rand_chacha::ChaCha8Rng,
    logits: Option<Vec<Vec<f32>>>,
}

/// The state of one micro-batch: its sequences, left-padded token grid, mask and KV cache.
struct MicroBatch {
    seqs: Vec<Seq>,
    /// Real-token mask over every position so far, per sequence.
    mask: Vec<Vec<bool>>,
    /// Token ids of the current step's input, `[b, t]`.
    input: Vec<Vec<u32>>,
}

impl<'m> Generator<'m> {
    /// A generator for `model` under `policy` (validated here), with unlimited tiers.
    pub fn new(model: &'m Model, policy: Policy) -> Result<Self> {
        Self::with_budgets(model, policy, Budgets::default())
    }

    /// A generator whose tiers may hold at most `budgets`. The weights are placed here; a policy
    /// whose weights do not fit is refused before anything is allocated.
    pub fn with_budgets(model: &'m Model, policy: Policy, budgets: Budgets) -> Result<Self> {
        policy.validate()?;
        tiers::check(&tiers::required_bytes(model, &policy, &[], 0), &budgets)?;
        let weights = WeightStore::build(
            model,
            &policy.placement.weights,
            policy.offload_dir.as_deref(),
            tiers::quant_spec(&policy.compress_weight),
        )?;
        Ok(Self { model, policy, device: Device::Cpu, budgets, weights })
    }

    /// The model it runs.
    pub fn model(&self) -> &Model {
        self.model
    }

    /// The policy in force.
    pub fn policy(&self) -> &Policy {
        &self.policy
    }

    /// Generates completions for `requests`, calling `on_event` as tokens come.
    pub fn generate(
        &self,
        requests: &[Request],
        config: &GenerationConfig,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<(Vec<Completion>, RunStats)> {
        config.sampling.validate()?;
        let seqs = self.prepare(requests, config)?;
        let mut stats = RunStats::default();
        let mut done: Vec<Option<Completion>> = vec![None; requests.len()];
        let mut seqs = seqs.into_iter().peekable();
        while seqs.peek().is_some() {
            let block: Vec<Seq> = seqs.by_ref().take(self.policy.block_size()).collect();
            stats.blocks += 1;
            for c in self.run_block(block, config, &mut stats, on_event)? {
                let (i, c) = c;
                done[i] = Some(c);
            }
        }
        Ok((done.into_iter().map(|c| c.expect("every request completes")).collect(), stats))
    }

    fn prepare(&self, requests: &[Request], config: &GenerationConfig) -> Result<Vec<Seq>> {
        let spec = &self.model.spec;
        let mut seqs = Vec::with_capacity(requests.len());
        for (index, r) in requests.iter().enumerate() {
            let bad = |message: String| Error::Request { index, message };
            let prompt = match &r.prompt {
                Prompt::Tokens(ids) => ids.clone(),
                Prompt::Text(text) => {
                    let tok = self.model.tokenizer.as_ref().ok_or_else(|| {
                        bad("a text prompt needs a tokenizer; this model has none (dummy weights): pass token ids".into())
                    })?;
                    tok.encode(text)?
                }
            };
            if prompt.is_empty() {
                return Err(bad("the prompt has no tokens".into()));
            }
            if let Some(&t) = prompt.iter().find(|&&t| t >= spec.vocab_size) {
                return Err(bad(format!(
                    "token id {t} is outside the vocabulary (size {})",
                    spec.vocab_size
                )));
            }
            let max_new = r.max_new_tokens.unwrap_or(config.max_new_tokens);
            if max_new == 0 {
                return Err(bad("max_new_tokens is 0: nothing to generate".into()));
            }
            if prompt.len() + max_new > spec.max_positions as usize {
                return Err(bad(format!(
                    "prompt ({} tokens) + max_new_tokens ({max_new}) exceeds the model's {} positions; \
                     shorten the prompt or lower max_new_tokens",
                    prompt.len(),
                    spec.max_positions
                )));
            }
            let stop = r.stop.clone().unwrap_or_else(|| config.stop.clone());
            if !stop.is_empty() && self.model.tokenizer.is_none() {
                return Err(bad("stop strings need a tokenizer; this model has none".into()));
            }
            let sampling = r.sampling.unwrap_or(config.sampling);
            sampling.validate()?;
            let seed = match (sampling, r.sampling.is_some()) {
                (Sampling::Random { seed, .. }, true) => seed,
                (Sampling::Random { seed, .. }, false) => {
                    seed ^ (index as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15)
                }
                (Sampling::Greedy, _) => 0,
            };
            seqs.push(Seq {
                request: index,
                max_new,
                stream: TextStream::new(&stop),
                stop,
                sampling,
                prompt,
                generated: Vec::new(),
                finish: None,
                rng: rand_chacha::ChaCha8Rng::seed_from_u64(seed),
                logits: config.output_logits.then(Vec::new),
            });
        }
        Ok(seqs)
    }

    /// Runs one block to completion with the zig-zag schedule.
    fn run_block(
        &self,
        block: Vec<Seq>,
        config: &GenerationConfig,
        stats: &mut RunStats,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<Vec<(usize, Completion)>> {
        let spec = &self.model.spec;
        let pad = spec.pad_token_id.unwrap_or(0);
        let num_layers = self.model.weights.layers.len();
        let templates = &self.model.weights.layers;
        let mut batches: Vec<MicroBatch> = Vec::new();
        let mut rest = block.into_iter().peekable();
        while rest.peek().is_some() {
            let seqs: Vec<Seq> = rest.by_ref().take(self.policy.gpu_batch_size as usize).collect();
            let (input, mask) = left_pad(seqs.iter().map(|s| s.prompt.as_slice()), pad);
            stats.prompt_tokens += seqs.iter().map(|s| s.prompt.len()).sum::<usize>();
            batches.push(MicroBatch { seqs, mask, input });
        }
        let steps =
            batches.iter().flat_map(|b| b.seqs.iter().map(|s| s.max_new)).max().unwrap_or(0);
        // Check every tier before allocating the block's cache and activations.
        let shapes: Vec<(usize, usize)> =
            batches.iter().map(|mb| (mb.seqs.len(), mb.input[0].len())).collect();
        let max_len = shapes.iter().map(|s| s.1).max().unwrap_or(0) + steps;
        let need = tiers::required_bytes(self.model, &self.policy, &shapes, max_len);
        tiers::check(&need, &self.budgets)?;
        let sizes: Vec<usize> = shapes.iter().map(|s| s.0).collect();
        let heads = spec.num_kv_heads as usize;
        let mut kv = KvStore::new(
            num_layers,
            &sizes,
            max_len,
            heads,
            spec.head_dim() as usize,
            &self.policy,
        )?;
        let act = ActStore::new(&self.policy, &shapes, spec.hidden_size as usize)?;
        let mut traffic = Traffic::default();
        stats.direct_io = self.weights.direct_io();
        for step in 0..steps {
            let started = Instant::now();
            // Embedding, for every micro-batch.
            let mut hidden: Vec<Tensor> = Vec::with_capacity(batches.len());
            let mut biases: Vec<Tensor> = Vec::with_capacity(batches.len());
            for mb in &batches {
                let (x, bias) = self.embed_step(mb)?;
                hidden.push(x);
                biases.push(bias);
            }
            // The zig-zag block schedule: a layer runs over every micro-batch before the next,
            // while the next layer's weights are loaded from their tiers on another thread.
            let (mut current, t) = self.weights.load(0, &templates[0], &self.device)?;
            traffic.cpu_to_gpu += t.cpu_to_gpu;
            traffic.disk_read += t.disk_read;
            for j in 0..num_layers {
                let next =
                    std::thread::scope(|scope| -> Result<Option<(LayerWeights, Traffic)>> {
                        let prefetch = (j + 1 < num_layers).then(|| {
                            scope
                                .spawn(|| self.weights.load(j + 1, &templates[j + 1], &self.device))
                        });
                        for k in 0..batches.len() {
                            let past = kv.gather(j, k, &self.device, &mut traffic)?;
                            let (x, new_kv) = layers::decoder_layer(
                                &Cpu,
                                spec,
                                &current,
                                &hidden[k],
                                past.as_ref(),
                                &biases[k],
                            )?;
                            kv.append(j, k, &new_kv, &self.device, &mut traffic)?;
                            hidden[k] = if j + 1 < num_layers {
                                act.round_trip(k, x, &mut traffic)?
                            } else {
                                x
                            };
                        }
                        prefetch
                            .map(|h| h.join().expect("weight prefetch thread panicked"))
                            .transpose()
                    })?;
                if let Some((w, t)) = next {
                    current = w;
                    traffic.cpu_to_gpu += t.cpu_to_gpu;
                    traffic.disk_read += t.disk_read;
                }
            }
            // LM head on the last position only, then the next token of each sequence.
            for (k, mb) in batches.iter_mut().enumerate() {
                let t = hidden[k].dim(1)?;
                let last = hidden[k].narrow(1, t - 1, 1)?;
                let logits = layers::logits(&Cpu, spec, &self.model.weights, &last)?
                    .squeeze(1)?
                    .to_vec2::<f32>()?;
                let mut next = Vec::with_capacity(mb.seqs.len());
                for (s, row) in mb.seqs.iter_mut().zip(&logits) {
                    let token = if s.finish.is_some() {
                        pad
                    } else {
                        sampling::choose(row, &s.sampling, &mut s.rng)
                    };
                    let fed = config
                        .forced
                        .as_ref()
                        .and_then(|f| f.get(s.request)?.get(s.generated.len()).copied())
                        .filter(|_| s.finish.is_none())
                        .unwrap_or(token);
                    if s.finish.is_none() {
                        if let Some(l) = &mut s.logits {
                            l.push(row.clone());
                        }
                        self.accept(s, token, config, stats, on_event)?;
                    }
                    next.push(fed);
                }
                for (row, m) in mb.mask.iter_mut().enumerate() {
                    m.push(true);
                    mb.input[row] = vec![next[row]];
                }
            }
            let elapsed = started.elapsed().as_secs_f64();
            if step == 0 {
                stats.prefill_s += elapsed;
            } else {
                stats.decode_s += elapsed;
            }
            if batches.iter().all(|mb| mb.seqs.iter().all(|s| s.finish.is_some())) {
                break;
            }
        }
        stats.tiers.merge(need, traffic);
        Ok(batches
            .into_iter()
            .flat_map(|mb| mb.seqs)
            .map(|s| {
                let text = self.model.tokenizer.as_ref().map(|_| s.stream.final_text().to_string());
                (
                    s.request,
                    Completion {
                        prompt_tokens: s.prompt,
                        tokens: s.generated,
                        text,
                        finish: s.finish.unwrap_or(FinishReason::Length),
                        logits: s.logits,
                    },
                )
            })
            .collect())
    }

    /// Embedding of this step's input and the attention bias of its queries.
    fn embed_step(&self, mb: &MicroBatch) -> Result<(Tensor, Tensor)> {
        let b = mb.input.len();
        let t = mb.input[0].len();
        let ids: Vec<u32> = mb.input.iter().flatten().copied().collect();
        let (pos, allowed) = layers::step_inputs(&self.model.spec, &mb.mask, t);
        let bias = Cpu.attention_bias(&allowed)?;
        Ok((layers::embed(&Cpu, &self.model.weights, &ids, &pos, (b, t))?, bias))
    }

    /// Records `token` for `s`, streams its text, and decides whether `s` is finished.
    fn accept(
        &self,
        s: &mut Seq,
        token: u32,
        config: &GenerationConfig,
        stats: &mut RunStats,
        on_event: &mut dyn FnMut(Event<'_>),
    ) -> Result<()> {
        s.generated.push(token);
        stats.generated_tokens += 1;
        let is_eos = config.stop_on_eos && self.model.spec.eos_token_id == Some(token);
        let mut finish = if is_eos {
            Some(FinishReason::Eos)
        } else if s.generated.len() >= s.max_new {
            Some(FinishReason::Length)
        } else {
            None
        };
        let delta = match &self.model.tokenizer {
            Some(tok) => {
                let text = if is_eos {
                    tok.decode(&s.generated[..s.generated.len() - 1])?
                } else {
                    tok.decode(&s.generated)?
                };
                let (delta, hit_stop) = s.stream.update(&text, finish.is_some());
                if hit_stop {
                    finish = Some(FinishReason::Stop);
                }
                delta
            }
            None => String::new(),
        };
        debug_assert!(s.stop.is_empty() || self.model.tokenizer.is_some());
        on_event(Event::Token { request: s.request, token, text: &delta });
        if let Some(reason) = finish {
            s.finish = Some(reason);
            on_event(Event::Finished { request: s.request, reason });
        }
        Ok(())
    }
}
