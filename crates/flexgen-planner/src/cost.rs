//! The cost model: per-layer prefill and decode time and peak memory per tier, as functions of the
//! six placement fractions for one discrete choice (block shape, compression, CPU attention,
//! activation tier). Every term is linear in the fractions, so the planner can hand them to an LP;
//! the same terms evaluate numerically for a given policy. docs/cost-model.md gives each formula.

use std::ops::{Add, Mul};

use flexgen_policy::{
    Compression, HardwareProfile, MlpKind, ModelSpec, Policy, Workload, expand_slice_outputs,
    micro_batch_scores_len,
};

/// Index of each placement fraction in [`Lin::coef`].
pub const WG: usize = 0;
pub const WC: usize = 1;
pub const WN: usize = 2;
pub const CG: usize = 3;
pub const CC: usize = 4;
pub const CN: usize = 5;

/// `constant + Σ coef[i] · x[i]` over the fractions `x = [wg, wc, wn, cg, cc, cn]` (each 0..1).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Lin {
    pub constant: f64,
    pub coef: [f64; 6],
}

impl Lin {
    /// A constant.
    pub fn c(v: f64) -> Self {
        Self { constant: v, coef: [0.0; 6] }
    }

    /// `v · x[i]`.
    pub fn var(i: usize, v: f64) -> Self {
        let mut coef = [0.0; 6];
        coef[i] = v;
        Self { constant: 0.0, coef }
    }

    /// The value at `x`.
    pub fn eval(&self, x: &[f64; 6]) -> f64 {
        self.constant + self.coef.iter().zip(x).map(|(c, v)| c * v).sum::<f64>()
    }
}

impl Add for Lin {
    type Output = Lin;
    fn add(mut self, o: Lin) -> Lin {
        self.constant += o.constant;
        for (a, b) in self.coef.iter_mut().zip(o.coef) {
            *a += b;
        }
        self
    }
}

impl Mul<f64> for Lin {
    type Output = Lin;
    fn mul(mut self, k: f64) -> Lin {
        self.constant *= k;
        self.coef.iter_mut().for_each(|c| *c *= k);
        self
    }
}

/// The discrete part of a policy: what the planner enumerates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Choice {
    pub gpu_batch_size: u32,
    pub num_gpu_batches: u32,
    pub compress_weight: bool,
    pub compress_cache: bool,
    pub cpu_attention: bool,
    /// Activations on the GPU (else on the CPU; `FlexGen` never puts them on disk).
    pub act_on_gpu: bool,
    /// Blocks whose KV cache the layers keep at once: 1 on one GPU; a pipeline stage holds the
    /// cache of every group of micro-batches in flight through the pipeline (one per stage)
    /// while it computes one group at a time.
    pub groups: u32,
}

impl Choice {
    /// Sequences per block.
    pub fn block(&self) -> f64 {
        f64::from(self.gpu_batch_size) * f64::from(self.num_gpu_batches)
    }
}

/// Safety margins: the share of each tier's capacity the plan may fill.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Margins {
    pub gpu: f64,
    pub cpu: f64,
    pub disk: f64,
}

impl Default for Margins {
    fn default() -> Self {
        Self { gpu: 0.9, cpu: 0.85, disk: 0.95 }
    }
}

/// Bytes per value after group-wise quantization (relative to fp16): `bits` per value plus an
/// fp16 min and scale per group.
pub fn compression_ratio(c: &Compression) -> f64 {
    let g = f64::from(c.group_size);
    (f64::from(c.bits) * g + 32.0) / (16.0 * g)
}

/// Seconds of one micro-batch's visit of one layer that overlap no copy or kernel, measured on
/// the H200 (session 5): at the same bytes per step, OPT-30B S2 decode steps took 0.07 s longer
/// than the PCIe roofline over 8 micro-batches and 0.24–0.51 s over 48 (2,304 visits per step),
/// 0.10–0.22 ms per visit.
pub const VISIT_S: f64 = 0.15e-3;

/// CPU attention's rate over a 4-bit packed cache as a fraction of the profiled (fp16) rate, for
/// profiles that do not give it (`cpu.packed_attention_flops_per_s`). H200 host, 16 cores,
/// session 14: `host_attention_bench 1024 512 1 15 4` ran at 69.2 GFLOP/s against the profile's
/// 80.8; in OPT-30B runs with the packed cache attended on the cores, the compute-bound decode
/// step implied 66 GFLOP/s (docs/benchmarks.md).
pub const PACKED_CPU_ATTENTION: f64 = 0.85;

/// The rate of the fused 4-bit product (bytes of packed weights read per second) as a fraction
/// of the profiled HBM bandwidth, for a decode micro-batch of `rows` (at most
/// `FUSED_DECODE_ROWS`): `gemm4_tc`. Measured by `gemv4_bench` on the H200 (session 17, OPT-175B's
/// fc1: 3,055, 3,061, 3,001, 2,963, 2,340, 1,925 and 1,394 GB/s at 1, 2, 4, 8, 16, 32 and 64 rows,
/// against the profile's 4.03 TB/s; docs/benchmarks.md). More than 64 rows run in tiles of 64,
/// each reading the codes again (session 25: fc1 0.188 ms at 64 rows, 0.360 at 128).
pub fn fused4_hbm_share(rows: f64) -> f64 {
    match rows {
        r if r <= 8.0 => 0.73,
        r if r <= 16.0 => 0.58,
        r if r <= 32.0 => 0.48,
        r => 0.35 / (r / 64.0).ceil(),
    }
}

/// The rate of decode attention over a 4-bit cache in GPU memory read straight from its codes
/// (`attention_decode_q4`), in bytes of codes per second, as a fraction of the profiled HBM
/// bandwidth. Measured by `cuda_check` on the H200 (session 17, on the tensor cores: OPT-175B's
/// shape, 3,072 rows × 528 positions, 2,181 GB/s against the profile's 4.03 TB/s).
pub const Q4_ATTENTION_HBM_SHARE: f64 = 0.54;

/// Host memory the process needs beyond the tensors (allocator, tokenizer, buffers).
pub const CPU_OVERHEAD_BYTES: f64 = 1.0 * (1u64 << 30) as f64;

/// Every term of the model for one choice, per decoder layer.
#[derive(Debug, Clone)]
pub struct Terms {
    /// Named lower bounds of the prefill time of one layer (seconds).
    pub prefill: Vec<(&'static str, Lin)>,
    /// Named lower bounds of one decode step of one layer (seconds).
    pub decode: Vec<(&'static str, Lin)>,
    /// GPU bytes the CUDA executor allocates for the run (it sizes every buffer for the prefill
    /// and keeps them through decode), without the weight-streaming buffers...
    pub gpu: Lin,
    /// ...which it adds, two whole layers as stored, when any weight is off the GPU.
    pub gpu_streaming: f64,
    /// Peak CPU bytes.
    pub cpu: Lin,
    /// Disk bytes.
    pub disk: Lin,
    /// Seconds per block outside the decoder layers (embedding and LM head), all tokens.
    pub head_s: f64,
    pub num_layers: f64,
    pub gen_len: f64,
    /// Whether a search may put KV cache on disk (not for a compressed cache: the CUDA executor
    /// keeps packed rows on the GPU and the CPU only).
    pub cache_on_disk: bool,
}

/// The terms of `choice` for `spec` on `hw` with `workload`. `hw` must have a GPU.
pub fn terms(
    spec: &ModelSpec,
    hw: &HardwareProfile,
    workload: &Workload,
    choice: &Choice,
) -> Terms {
    let gpu = hw.gpu.as_ref().expect("the planner checks for a GPU first");
    let h1 = f64::from(spec.hidden_size);
    // The MLP's inner activations per row: ffn values, or gate and up (2·ffn) for SwiGLU.
    #[expect(clippy::cast_precision_loss, reason = "a width")]
    let h2 = spec.mlp_inner_width() as f64;
    let v = f64::from(spec.vocab_size);
    let s = f64::from(workload.prompt_len);
    let n = f64::from(workload.gen_len);
    let b = f64::from(choice.gpu_batch_size);
    let bls = choice.block();
    let ctx = s + n / 2.0; // average decode context
    let full = s + n; // longest context
    let layer_params = spec.layer_params() as f64;
    let matrix_params = spec.layer_matrix_params() as f64; // for FLOPs
    let rw = if choice.compress_weight {
        compression_ratio(&Compression::weights_default())
    } else {
        1.0
    };
    let rc =
        if choice.compress_cache { compression_ratio(&Compression::cache_default()) } else { 1.0 };
    let w = 2.0 * layer_params * rw; // bytes of one layer's weights as stored
    // Weights stream by sublayer (attention, then MLP), so a transfer buffer holds the larger one.
    let w_sub = 2.0 * largest_sublayer_params(spec) * rw;
    let w16 = 2.0 * layer_params; // the same in fp16, as used by the GEMMs
    let kv_tok = 2.0 * f64::from(spec.num_kv_heads * spec.head_dim()) * 2.0 * rc; // K+V, one token
    let act_cpu = if choice.act_on_gpu { 0.0 } else { 1.0 };
    let attn_cpu = if choice.cpu_attention { 1.0 } else { 0.0 };
    let hid_p = 2.0 * s * h1 * bls;
    let hid_g = 2.0 * h1 * bls;

    let h2d = gpu.h2d_pinned_bytes_per_s;
    let d2h = gpu.d2h_pinned_bytes_per_s;
    let dr = hw.disk.read_bytes_per_s;
    let dw = hw.disk.write_bytes_per_s;
    let gemm = gpu.gemm_flops_per_s;
    let gattn = gpu.attention_flops_per_s;
    let hbm = gpu.hbm_bytes_per_s;
    // CPU attention over a packed cache expands it on the cores as it goes: fewer bytes, more
    // arithmetic per FLOP counted. Its own rate where the profile measured it.
    let cattn = if choice.compress_cache {
        hw.cpu
            .packed_attention_flops_per_s
            .unwrap_or(hw.cpu.attention_flops_per_s * PACKED_CPU_ATTENTION)
    } else {
        hw.cpu.attention_flops_per_s
    };
    let off_w = Lin::var(WC, 1.0) + Lin::var(WN, 1.0);
    let off_c = Lin::var(CC, 1.0) + Lin::var(CN, 1.0);
    // The runtime expands a compressed layer's matrices into fp16 in device memory before their
    // GEMMs, each before its product, so once per micro-batch (read the packed bytes, write the
    // fp16 ones), and a compressed cache into an fp16 working area that attention then reads:
    // device-memory traffic, not arithmetic.
    let dequant_w = if choice.compress_weight {
        f64::from(choice.num_gpu_batches) * (w + w16) / hbm
    } else {
        0.0
    };
    // Decode steps of small micro-batches read the packed codes straight instead
    // (`Policy::fuses_decode_on`, of the planner's compression, 4 bits in groups of 64, on this
    // GPU: beyond a few rows only with the tensor-core product).
    let fused = Policy::fuses_decode_with(
        &Compression { enabled: choice.compress_weight, ..Compression::weights_default() },
        choice.gpu_batch_size,
        gpu.tensor_cores(),
    );
    // Bytes moved per byte of cache attended on the GPU: an fp16 cache is read once; a packed
    // one in GPU memory is read straight from its codes at decode (at its own rate); packed rows
    // brought from the CPU are expanded first (read, write and read again in fp16).
    let cache_read = 1.0 + if choice.compress_cache { 2.0 / rc } else { 0.0 };
    let gpu_cache_read = if choice.compress_cache { 1.0 / Q4_ATTENTION_HBM_SHARE } else { 1.0 };

    // Which copies cost compute time as well as link bandwidth. Weights stream ahead on their own
    // stream. A copy stream stages the next micro-batch's inputs while the current one computes:
    // hidden states kept on the CPU (with two or more micro-batches) and the past positions of
    // CPU cache rows that the GPU attends. Everything else is issued on the compute stream between
    // a micro-batch's kernels: results written back (new K and V, hidden states), CPU attention's
    // queries and outputs, and cache rows read from disk (their host staging is filled first).
    let hid_staged = if choice.num_gpu_batches >= 2 { 0.0 } else { 1.0 };
    let prefill_h2d = Lin::c(hid_p * act_cpu);
    let prefill_d2h = off_c * (kv_tok * s * bls) + Lin::c(hid_p * act_cpu);
    let prefill_stream_copies = prefill_h2d * (hid_staged / h2d) + prefill_d2h * (1.0 / d2h);
    let mut prefill = vec![
        ("cpu->gpu", (off_w * w + prefill_h2d) * (1.0 / h2d)),
        ("gpu->cpu", prefill_d2h * (1.0 / d2h)),
        ("disk->cpu", Lin::var(WN, w / dr)),
        ("cpu->disk", Lin::var(CN, kv_tok * s * bls / dw)),
        (
            "compute",
            Lin::c(
                bls * s * 2.0 * matrix_params / gemm + bls * 4.0 * s * s * h1 / gattn + dequant_w,
            ) + prefill_stream_copies,
        ),
    ];
    let cache_to_gpu = off_c * (kv_tok * ctx * bls * (1.0 - attn_cpu));
    let decode_h2d = Lin::c(hid_g * act_cpu) + cache_to_gpu + off_c * (2.0 * h1 * bls * attn_cpu);
    let decode_d2h = off_c * (kv_tok * bls + 2.0 * h1 * bls * attn_cpu) + Lin::c(hid_g * act_cpu);
    let decode_stream_copies = (Lin::c(hid_g * act_cpu * hid_staged)
        + Lin::var(CN, kv_tok * ctx * bls * (1.0 - attn_cpu))
        + off_c * (2.0 * h1 * bls * attn_cpu))
        * (1.0 / h2d)
        + decode_d2h * (1.0 / d2h);
    let mut decode = vec![
        ("cpu->gpu", (off_w * w + decode_h2d) * (1.0 / h2d)),
        ("gpu->cpu", decode_d2h * (1.0 / d2h)),
        ("disk->cpu", (Lin::var(WN, w) + Lin::var(CN, kv_tok * ctx * bls)) * (1.0 / dr)),
        ("cpu->disk", Lin::var(CN, kv_tok * bls / dw)),
        (
            "compute",
            // Decode GEMMs: FLOP-bound or, at small batch, bound by reading the fp16 weights from
            // device memory once per micro-batch. GPU attention reads the cache from device memory.
            Lin::c(if fused {
                f64::from(choice.num_gpu_batches) * w / (hbm * fused4_hbm_share(b))
            } else {
                (bls * 2.0 * matrix_params / gemm)
                    .max(f64::from(choice.num_gpu_batches) * w16 / hbm)
                    + dequant_w
            }) + (Lin::var(CG, gpu_cache_read) + off_c * ((1.0 - attn_cpu) * cache_read))
                * (kv_tok * ctx * bls / hbm)
                + off_c * (attn_cpu * 4.0 * ctx * h1 * bls / cattn)
                + decode_stream_copies,
        ),
    ];

    // Each micro-batch's visit of a layer costs a fixed time that overlaps nothing (launches,
    // event waits, the copy stream's hand-over between visits): added to every bound.
    let visits = f64::from(choice.num_gpu_batches) * VISIT_S;
    for t in prefill.iter_mut().chain(decode.iter_mut()) {
        t.1 = t.1 + Lin::c(visits);
    }

    let l = f64::from(spec.num_layers);
    // The GPU memory of a run, term for term as the CUDA executor plans it before allocating
    // (`flexgen_runtime::memory::plan`; a test in flexgen-cli checks every kind of plan against it).
    // Token table, position table (learned positions only), final norm, an untied LM head.
    let embeddings = 2.0 * spec.embedding_params() as f64;
    // The cache of every group in flight (one on one GPU).
    let held = l * kv_tok * full * bls * f64::from(choice.groups.max(1));
    let resident = Lin::var(WG, l * w) + Lin::var(CG, held);
    // A compressed layer's matrices are expanded a slice of outputs at a time into an fp16
    // buffer of the largest slice (`expand_slice_outputs`); the fused decode adds an fp32 output
    // of a micro-batch's rows × the widest matrix (q/k/v or fc1: that many outputs of h inputs)
    // and a counter per 256 of its outputs.
    let mats = spec.layer_matrices();
    let group = Compression::weights_default().group_size as usize;
    let slice = mats.iter().map(|&(o, i)| expand_slice_outputs(o, i, group) * i).max();
    let widest = mats.iter().map(|&(o, _)| o).max().unwrap_or(0) as f64;
    let unpacked = if choice.compress_weight { 2.0 * slice.unwrap_or(0) as f64 } else { 0.0 }
        + if fused { 4.0 * b * widest + 4.0 * (widest / 256.0).ceil() } else { 0.0 };
    let k = f64::from(choice.num_gpu_batches);
    // Hidden states: every micro-batch's on the GPU, or one staged from the CPU (two when the
    // next one is prefetched, with two or more micro-batches).
    // (A pipeline stage keeps every group's.)
    let groups = f64::from(choice.groups.max(1));
    let hidden = 2.0 * s * h1 * b * if choice.act_on_gpu { k * groups } else { k.min(2.0) };
    let kvw = f64::from(spec.num_kv_heads * spec.head_dim());
    let kv16 = 2.0 * kvw * 2.0; // K+V of one token in fp16
    // One micro-batch's prefill scratch: norms, q, context, attention output, fused qkv, MLP,
    // the last position's hidden state and logits; and the scores of as many cache rows as fit
    // their buffer (`prefill_scores_len`).
    let scores =
        micro_batch_scores_len(spec, choice.gpu_batch_size as usize, workload.prompt_len as usize);
    let scratch = 2.0 * b * (s * (5.0 * h1 + 2.0 * kvw) + s * h2 + h1 + v) + 2.0 * scores as f64;
    // Off-GPU cache rows on their way in: a compressed cache expands into an fp16 working area
    // of the whole micro-batch and stages the packed rows twice (prefetched); an fp16 one stages
    // the rows twice for GPU attention, or only the prompt's new rows for CPU attention.
    let staged_cache = if choice.compress_cache {
        Lin::c(kv16 * full * b) + off_c * (2.0 * kv_tok * full * b)
    } else if choice.cpu_attention {
        off_c * (kv16 * s * b)
    } else {
        off_c * (2.0 * kv16 * full * b)
    };
    let gpu = resident + Lin::c(unpacked + embeddings + hidden + scratch) + staged_cache;
    let gpu_streaming = 2.0 * w;
    let cpu = Lin::var(WC, l * w)
        + Lin::var(CC, held)
        + Lin::c(hid_p * act_cpu * groups)
        + Lin::var(WN, 2.0 * w_sub)
        + Lin::var(CN, 2.0 * kv_tok * full * b)
        + Lin::c(CPU_OVERHEAD_BYTES);
    let disk = Lin::var(WN, l * w) + Lin::var(CN, held);
    let head_s = n * bls * 2.0 * h1 * v / gemm;
    Terms {
        prefill,
        decode,
        gpu,
        gpu_streaming,
        cpu,
        disk,
        head_s,
        num_layers: l,
        gen_len: n,
        cache_on_disk: !choice.compress_cache,
    }
}

/// Elements of the larger sublayer (attention block or MLP block, each with its norm).
pub fn largest_sublayer_params(spec: &ModelSpec) -> f64 {
    let h = f64::from(spec.hidden_size);
    let kv = f64::from(spec.num_kv_heads * spec.head_dim());
    let f = f64::from(spec.ffn_size);
    let bias = if spec.bias { 1.0 } else { 0.0 };
    let norm = spec.norm_params() as f64;
    let attn = 2.0 * h * h + 2.0 * h * kv + bias * (2.0 * h + 2.0 * kv) + norm;
    let mlp = match spec.mlp {
        MlpKind::Relu => 2.0 * h * f + bias * (f + h),
        MlpKind::SwiGlu => 3.0 * h * f,
    } + norm;
    attn.max(mlp)
}

impl Terms {
    /// Seconds of one block at placement `x`: every layer's prefill, `gen_len − 1` decode steps,
    /// plus embedding and LM head.
    pub fn block_seconds(&self, x: &[f64; 6]) -> (f64, f64) {
        let max = |ts: &[(&str, Lin)]| ts.iter().map(|(_, t)| t.eval(x)).fold(0.0, f64::max);
        let prefill = self.num_layers * max(&self.prefill);
        let decode = (self.gen_len - 1.0).max(0.0) * self.num_layers * max(&self.decode);
        (
            prefill + self.head_s / self.gen_len.max(1.0),
            decode + self.head_s * (1.0 - 1.0 / self.gen_len.max(1.0)),
        )
    }

    /// GPU bytes at `x`: with the streaming buffers when any weight is off the GPU.
    pub fn gpu_peak(&self, x: &[f64; 6]) -> f64 {
        self.gpu.eval(x) + if x[WG] < 1.0 - 1e-9 { self.gpu_streaming } else { 0.0 }
    }

    /// The decode term that takes longest at `x`.
    pub fn binding(&self, x: &[f64; 6]) -> &'static str {
        self.decode
            .iter()
            .max_by(|a, b| a.1.eval(x).total_cmp(&b.1.eval(x)))
            .map_or("compute", |t| t.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use flexgen_policy::{CpuProfile, DiskProfile, GpuProfile};

    /// A toy machine with round numbers so that the terms can be checked by hand.
    fn hw() -> HardwareProfile {
        HardwareProfile {
            version: 1,
            name: "toy".into(),
            source: "test".into(),
            gpu: Some(GpuProfile {
                name: "toy".into(),
                memory_bytes: 1 << 30,
                pcie: None,
                h2d_pinned_bytes_per_s: 1e9,
                d2h_pinned_bytes_per_s: 2e9,
                h2d_pageable_bytes_per_s: 1e8,
                gemm_flops_per_s: 1e12,
                attention_flops_per_s: 1e11,
                hbm_bytes_per_s: 1e11,
                count: 1,
                h2d_pinned_all_bytes_per_s: None,
                p2p_bytes_per_s: None,
                compute_capability: None,
            }),
            cpu: CpuProfile {
                model: "toy".into(),
                cores: 1,
                memory_bytes: 1 << 34,
                gemm_flops_per_s: 1e10,
                attention_flops_per_s: 1e10,
                packed_attention_flops_per_s: None,
            },
            disk: DiskProfile {
                path: "/tmp".into(),
                capacity_bytes: 1 << 40,
                read_bytes_per_s: 1e8,
                write_bytes_per_s: 5e7,
            },
        }
    }

    /// h = 64, ffn = 256, 8 heads, vocab 1000, 2 layers, 100 positions.
    fn spec() -> ModelSpec {
        flexgen_model::opt_spec("toy", 2, 64, 8, 256, 1000, 100)
    }

    const WL: Workload = Workload { prompt_len: 10, gen_len: 5, num_prompts: None };

    fn choice() -> Choice {
        Choice {
            groups: 1,
            gpu_batch_size: 4,
            num_gpu_batches: 2,
            compress_weight: false,
            compress_cache: false,
            cpu_attention: false,
            act_on_gpu: true,
        }
    }

    /// A bound at `x` without the fixed cost of `choice()`'s two visits per layer.
    fn term(ts: &[(&str, Lin)], name: &str, x: &[f64; 6]) -> f64 {
        ts.iter().find(|t| t.0 == name).unwrap().1.eval(x) - 2.0 * VISIT_S
    }

    #[test]
    fn every_bound_pays_each_micro_batchs_visit() {
        let mut c = choice();
        let x = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0]; // nothing on disk: the disk bounds are the visits
        for k in [1, 2, 48] {
            c.num_gpu_batches = k;
            let t = terms(&spec(), &hw(), &WL, &c);
            for ts in [&t.prefill, &t.decode] {
                let disk = ts.iter().find(|t| t.0 == "disk->cpu").unwrap().1.eval(&x);
                assert!((disk - f64::from(k) * VISIT_S).abs() < 1e-15, "{k}: {disk}");
            }
        }
    }

    // layer params: 4·64² + 2·64·256 + biases (4·64 + 256 + 64) + norms 4·64 = 16384 + 32768 + 576 + 256
    const LAYER_PARAMS: f64 = 49_984.0;

    #[test]
    fn layer_params_are_counted_by_hand() {
        assert!((spec().layer_params() as f64 - LAYER_PARAMS).abs() < 0.5);
    }

    #[test]
    fn weight_reads_scale_with_the_off_gpu_share() {
        let t = terms(&spec(), &hw(), &WL, &choice());
        // All weights on the CPU: one layer's fp16 bytes over 1 GB/s.
        let x = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        assert!((term(&t.decode, "cpu->gpu", &x) - 2.0 * LAYER_PARAMS / 1e9).abs() < 1e-12);
        // Half on disk: the disk read is half a layer at 100 MB/s.
        let x = [0.0, 0.5, 0.5, 1.0, 0.0, 0.0];
        assert!((term(&t.decode, "disk->cpu", &x) - LAYER_PARAMS / 1e8).abs() < 1e-12);
        // On the GPU: nothing crosses PCIe.
        let x = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        assert_eq!(term(&t.decode, "cpu->gpu", &x), 0.0);
    }

    #[test]
    fn decode_compute_is_gemm_plus_attention_by_hand() {
        let t = terms(&spec(), &hw(), &WL, &choice());
        let x = [1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        // matrix params 49984 − 12·64 − 256 = 48960; block 8: 8·2·48960 / 1e12 = 7.8e-7 s, which
        // is below reading the fp16 weights twice (2 micro-batches) at 1e11 B/s: 2·2·49984 / 1e11.
        let gemm = (8.0 * 2.0 * 48_960.0 / 1e12f64).max(2.0 * 2.0 * LAYER_PARAMS / 1e11);
        assert!((gemm - 2.0 * 2.0 * LAYER_PARAMS / 1e11).abs() < 1e-18);
        // attention reads the cache: 256 bytes/token · ctx (10 + 2.5) · 8 sequences at 1e11 B/s.
        let attn = 256.0 * 12.5 * 8.0 / 1e11;
        assert!((term(&t.decode, "compute", &x) - (gemm + attn)).abs() < 1e-15);
    }

    #[test]
    fn cpu_attention_moves_attention_to_the_cpu_rate_and_only_unstaged_copies_cost_compute() {
        let mut c = choice();
        let x = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]; // cache on the CPU
        let gpu_attn = terms(&spec(), &hw(), &WL, &c);
        c.cpu_attention = true;
        let cpu_attn = terms(&spec(), &hw(), &WL, &c);
        // Without CPU attention the whole average context crosses PCIe each step:
        // 4 bytes·h (K+V fp16) · 12.5 · 8 sequences at 1 GB/s.
        let cache = 4.0 * 64.0 * 12.5 * 8.0 / 1e9;
        assert!((term(&gpu_attn.decode, "cpu->gpu", &x) - cache).abs() < 1e-12);
        // With it only the attention output comes back (2·h·8 bytes).
        assert!((term(&cpu_attn.decode, "cpu->gpu", &x) - 2.0 * 64.0 * 8.0 / 1e9).abs() < 1e-12);
        let attn_cpu = 4.0 * 12.5 * 64.0 * 8.0 / 1e10;
        let gemm = 2.0 * 2.0 * LAYER_PARAMS / 1e11;
        // The runtime issues cache copies on the compute stream, so they are compute time too: q
        // out and the output back (2·h·8 bytes each way), the new K+V out (256 bytes · 8) at 2 GB/s.
        let copies = 2.0 * 64.0 * 8.0 / 1e9 + (256.0 * 8.0 + 2.0 * 64.0 * 8.0) / 2e9;
        let compute = term(&cpu_attn.decode, "compute", &x);
        assert!((compute - (gemm + attn_cpu + copies)).abs() < 1e-15, "{compute}");
        // Without CPU attention the copy stream stages the cache's rows ahead, so only the new
        // K+V written back serializes with the GPU work: GEMMs, attention over the copied cache
        // (read from device memory), that copy.
        let attn_gpu = 256.0 * 12.5 * 8.0 / 1e11;
        let compute = term(&gpu_attn.decode, "compute", &x);
        assert!((compute - (gemm + attn_gpu + 256.0 * 8.0 / 2e9)).abs() < 1e-15, "{compute}");
        // Rows on disk are staged by the host, in line: their copy in is compute time again.
        let on_disk = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0];
        let compute = term(&gpu_attn.decode, "compute", &on_disk);
        assert!(
            (compute - (gemm + attn_gpu + cache + 256.0 * 8.0 / 2e9)).abs() < 1e-15,
            "{compute}"
        );
    }

    #[test]
    fn cpu_attention_over_a_packed_cache_runs_at_the_packed_rate_and_moves_no_cache() {
        let mut c = choice();
        c.cpu_attention = true;
        let x = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]; // cache on the CPU
        let fp16 = terms(&spec(), &hw(), &WL, &c);
        c.compress_cache = true;
        let packed = terms(&spec(), &hw(), &WL, &c);
        // Only the attention output comes back over PCIe, packed or not.
        let out = 2.0 * 64.0 * 8.0 / 1e9;
        assert!((term(&packed.decode, "cpu->gpu", &x) - out).abs() < 1e-12);
        // The attention itself at the packed fraction of the CPU rate; everything else in the
        // compute bound differs only by the smaller new K+V written back.
        let attn = 4.0 * 12.5 * 64.0 * 8.0 / 1e10;
        let kv = |t: &Terms| term(&t.decode, "gpu->cpu", &x);
        let rest = |t: &Terms, a: f64| term(&t.decode, "compute", &x) - a - kv(t);
        let (r16, rp) = (rest(&fp16, attn), rest(&packed, attn / PACKED_CPU_ATTENTION));
        assert!((r16 - rp).abs() < 1e-15, "{r16} vs {rp}");
        assert!(kv(&packed) < kv(&fp16));
        // A profile that measured the packed rate is planned with it, whatever the fp16 one.
        let mut measured = hw();
        measured.cpu.packed_attention_flops_per_s = Some(2.5e10);
        let own = terms(&spec(), &measured, &WL, &c);
        let ro = rest(&own, 4.0 * 12.5 * 64.0 * 8.0 / 2.5e10);
        assert!((r16 - ro).abs() < 1e-15, "{r16} vs {ro}");
    }

    #[test]
    fn compression_shrinks_bytes_by_the_packed_ratio() {
        assert!((compression_ratio(&Compression::weights_default()) - 0.281_25).abs() < 1e-12);
        let mut c = choice();
        c.compress_weight = true;
        let t = terms(&spec(), &hw(), &WL, &c);
        let x = [0.0, 1.0, 0.0, 1.0, 0.0, 0.0];
        assert!(
            (term(&t.decode, "cpu->gpu", &x) - 2.0 * LAYER_PARAMS * 0.281_25 / 1e9).abs() < 1e-12
        );
    }

    #[test]
    fn memory_terms_by_hand() {
        let t = terms(&spec(), &hw(), &WL, &choice());
        // Everything on disk: weights 2 layers · 2 bytes · params, cache 2 layers · 256 bytes · 15 · 8.
        let x = [0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        let disk = 2.0 * 2.0 * LAYER_PARAMS + 2.0 * 256.0 * 15.0 * 8.0;
        assert!((t.disk.eval(&x) - disk).abs() < 1e-6);
        // The larger sublayer is the MLP: fc1 + fc2 (2·64·256) + biases (256 + 64) + norm (128).
        assert!((largest_sublayer_params(&spec()) - 33_216.0).abs() < 1e-9);
        // CPU: staging for the larger sublayer double-buffered + one micro-batch's cache
        // double-buffered.
        let cpu = 2.0 * 2.0 * 33_216.0 + 2.0 * 256.0 * 15.0 * 4.0 + CPU_OVERHEAD_BYTES;
        assert!((t.cpu.eval(&x) - cpu).abs() < 1e-6);
        // GPU, as the CUDA executor plans it: embeddings (vocab 1000 + 102 positions) · 64 and
        // the final norm (2·64) in fp16; both micro-batches' hidden states (2·10·64·4 bytes
        // each); one micro-batch's scratch, 2·4·(10·(5·64 + 2·64) + 8·10·10 + 10·256 + 64 + 1000)
        // bytes.
        let fixed = 2.0 * (1102.0 * 64.0 + 128.0) + 2.0 * 2.0 * 10.0 * 64.0 * 4.0 + 8.0 * 8904.0;
        let cache = 2.0 * 256.0 * 15.0 * 8.0; // 2 layers, 256 bytes/token, 15 positions, block 8
        let resident = t.gpu_peak(&[1.0, 0.0, 0.0, 1.0, 0.0, 0.0]);
        assert!((resident - (2.0 * 2.0 * LAYER_PARAMS + cache + fixed)).abs() < 1e-6);
        // Half the weights resident (2 layers · 2 bytes · half), and streaming any share adds
        // two whole layers of staging.
        let streamed = t.gpu_peak(&[0.5, 0.5, 0.0, 1.0, 0.0, 0.0]);
        assert!(
            (streamed - (2.0 * LAYER_PARAMS + 2.0 * 2.0 * LAYER_PARAMS + cache + fixed)).abs()
                < 1e-6
        );
        // A CPU cache attended on the GPU stages one micro-batch's rows twice (prefetched).
        let cpu_cache = t.gpu_peak(&[1.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        let staged = 2.0 * 256.0 * 15.0 * 4.0;
        assert!((cpu_cache - (2.0 * 2.0 * LAYER_PARAMS + staged + fixed)).abs() < 1e-6);
    }
}
