//! The one memory plan: from a model's spec, a policy, the requests it is sized for, a range of
//! layers and the stage that computes, to the bytes each tier holds, what they are made of, and
//! the splits the stages allocate by. Pure: no GPU, no allocation. Both stages check it before
//! they allocate anything (the host stage before each block, the CUDA stage once), the planner's
//! tests hold the cost model to it, and the capacity error of either stage is built from it.
//!
//! The placement rule (docs/policy-format.md, `tiers.rs`): weights are split by exact shares of
//! their elements (per tensor on the host stage, per layer arena on the CUDA stage), the KV cache
//! by (sequence, head) rows of each micro-batch, activations live whole on one tier.

use std::ops::Range;

use flexgen_model::{LayerLayout, PackedLayout, layer_shapes};
use flexgen_policy::{ModelSpec, Policy, Tier, expand_slice_outputs, micro_batch_scores_len};
use flexgen_tensor::cuda::exec::{CacheQuant, LT_WORKSPACE_MAX, gemm4_tc_done_len};
use flexgen_tensor::host::align_up;
use flexgen_tensor::quant::{QuantSpec, packed_len};

use crate::disk::disk_pos_bytes;
use crate::gpu::Prefetch;
use crate::tiers::{TierBytes, quant_spec, split_counts};
use crate::{Error, Result};

/// The requests a plan is sized for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capacity {
    /// The longest prompt (positions prefilled at once).
    pub max_prompt: usize,
    /// The most new tokens of a request.
    pub max_new: usize,
    /// Sequences of a block, when fewer than the policy's `gpu_batch_size × num_gpu_batches`
    /// (the host stage plans each block as it comes; the CUDA stage always runs whole blocks).
    pub sequences: Option<usize>,
}

impl Capacity {
    /// Positions of every cache row: the longest prompt and the new tokens.
    pub fn positions(&self) -> usize {
        self.max_prompt + self.max_new
    }
}

/// Which stage computes: the tiers and element sizes differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compute {
    /// The host stage: f32 tensors, the "GPU" tier is host memory under a budget.
    Host,
    /// The CUDA stage: fp16 layer arenas on GPU 0.
    Cuda,
}

/// What one tier holds, by use (bytes).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Use {
    /// The layers' weights placed on this tier.
    pub weights: u64,
    /// Buffers that stream weights and cache rows through this tier (staging arenas, the disk
    /// reader's ring, a dequantized arena).
    pub staging: u64,
    /// Embedding tables, final norm and LM head (on the compute device).
    pub tables: u64,
    /// KV-cache rows placed on this tier.
    pub cache: u64,
    /// Hidden states and the scratch of the visit in flight.
    pub activations: u64,
}

impl Use {
    pub fn total(&self) -> u64 {
        self.weights + self.staging + self.tables + self.cache + self.activations
    }
}

/// The plan of one (spec, policy, capacity, layers, compute).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemoryPlan {
    /// The layers it covers.
    pub layers: Range<u32>,
    pub gpu: Use,
    pub cpu: Use,
    pub disk: Use,
    /// A micro-batch's (sequence, head) cache rows on the GPU, the CPU and disk.
    pub kv_rows: [usize; 3],
    /// The tier that holds the activations.
    pub activations: Tier,
}

impl MemoryPlan {
    /// Bytes per tier.
    pub fn totals(&self) -> TierBytes {
        TierBytes { gpu: self.gpu.total(), cpu: self.cpu.total(), disk: self.disk.total() }
    }
}

/// The memory plan of `policy` for `spec` over `layers` on the `compute` stage, sized for
/// `capacity`. Refuses policies the stage cannot lay out (a family without an arena layout on the
/// CUDA stage).
pub fn plan(
    spec: &ModelSpec,
    policy: &Policy,
    capacity: Capacity,
    layers: Range<u32>,
    compute: Compute,
) -> Result<MemoryPlan> {
    if layers.end > spec.num_layers || layers.start > layers.end {
        return Err(Error::Config {
            field: "layers",
            message: format!(
                "layers {}..{} of a model with {}",
                layers.start, layers.end, spec.num_layers
            ),
        });
    }
    match compute {
        Compute::Host => Ok(host(spec, policy, capacity, layers)),
        Compute::Cuda => cuda(spec, policy, capacity, layers),
    }
}

/// A micro-batch's cache rows (sequence, head) and their split `[gpu, cpu, disk]`.
pub(crate) fn cache_rows(spec: &ModelSpec, policy: &Policy) -> (usize, [usize; 3]) {
    let rows = (policy.gpu_batch_size * spec.num_kv_heads) as usize;
    (rows, split_counts(rows, &policy.placement.kv_cache))
}

/// Table elements on the compute device for a stage holding `layers`: the token embedding and
/// positions with the first layer, the LM head with the last (a tied head is the embedding: a
/// stage holding both ends holds it once, a last stage alone holds its copy).
fn table_elems(spec: &ModelSpec, layers: &Range<u32>) -> (u64, u64) {
    let (first, last) = spec.table_params();
    let holds_embedding = layers.start == 0;
    let first = if holds_embedding { first } else { 0 };
    let last = if layers.end != spec.num_layers {
        0
    } else if spec.tie_embeddings && !holds_embedding {
        last + u64::from(spec.vocab_size) * u64::from(spec.embed_width())
    } else {
        last
    };
    (first, last)
}

/// The host stage: every tensor split by elements (matrices as packed bytes when compressed),
/// the streamed part double-buffered on the "GPU" tier, the tables there, the cache rows by their
/// shares, activations whole, and the scratch of one micro-batch in flight.
fn host(spec: &ModelSpec, policy: &Policy, c: Capacity, layers: Range<u32>) -> MemoryPlan {
    let p = &policy.placement;
    let elem = 4u64; // f32
    let n_layers = u64::from(layers.end - layers.start);
    let mut tiers = [Use::default(); 3];
    let wq = quant_spec(&policy.compress_weight);
    let mut off_gpu = 0u64;
    for dims in layer_shapes(spec) {
        let (units, unit) = match wq {
            Some(q) if dims.len() >= 2 => {
                let (d, pr) = packed_len(&dims, q);
                (d + pr, 1)
            }
            _ => (dims.iter().product(), elem),
        };
        let split = split_counts(units, &p.weights);
        for (u, n) in tiers.iter_mut().zip(split) {
            u.weights += n_layers * n as u64 * unit;
        }
        off_gpu += (split[1] + split[2]) as u64 * unit;
    }
    // Double buffer of streamed weights, and the tables that stay on the compute device (the
    // host stage keeps every table it has).
    tiers[0].staging += if n_layers > 0 { 2 * off_gpu } else { 0 };
    let (first, last) = table_elems(spec, &(0..spec.num_layers));
    tiers[0].tables += (first + last) * elem;
    let h = u64::from(spec.hidden_size);
    let hd = spec.head_dim() as usize;
    let heads = spec.num_kv_heads as usize;
    // K+V of one position of all heads, as the tiers hold it (packed when compressed).
    let kv_tok = match quant_spec(&policy.compress_cache) {
        Some(q) => {
            let (d, pr) = packed_len(&[hd], QuantSpec { dim: 0, ..q });
            2 * heads as u64 * (d + pr) as u64
        }
        None => 2 * heads as u64 * hd as u64 * elem,
    };
    let (b, k) = (policy.gpu_batch_size as usize, policy.num_gpu_batches as usize);
    let sequences = c.sequences.unwrap_or(b * k).min(b * k);
    let (width, max_len) = (c.max_prompt as u64, c.positions() as u64);
    let act_tier = p.activations.single_tier().unwrap_or(Tier::Gpu);
    let mut working = 0u64;
    let mut left = sequences;
    while left > 0 {
        let rows = left.min(b);
        left -= rows;
        let split = split_counts(rows * heads, &p.kv_cache);
        for (u, r) in tiers.iter_mut().zip(split) {
            u.cache += n_layers * r as u64 * max_len * kv_tok / heads as u64;
        }
        tiers[act_tier as usize].activations += rows as u64 * width * h * elem;
        // One micro-batch in flight: its cache gathered, scores, MLP intermediate, logits.
        let rb = rows as u64;
        let flight = rb * max_len * kv_tok
            + rb * u64::from(spec.num_heads) * width * max_len * elem
            + rb * width * (spec.mlp_inner_width() + 4 * h) * elem
            + rb * u64::from(spec.vocab_size) * elem;
        working = working.max(flight);
    }
    tiers[0].activations += working;
    let [gpu, cpu, disk] = tiers;
    MemoryPlan {
        layers,
        gpu,
        cpu,
        disk,
        kv_rows: cache_rows(spec, policy).1,
        activations: act_tier,
    }
}

/// A policy's layer arena on the CUDA stage: its layout, packed with `compress_weight`, its
/// length in fp16 units, and where its GPU and CPU parts end.
pub(crate) struct Arena {
    pub layout: LayerLayout,
    pub packed: Option<PackedLayout>,
    pub unit_len: usize,
    pub ends: [usize; 2],
}

/// The CUDA stage's layer arena of `policy`.
pub(crate) fn arena(spec: &ModelSpec, policy: &Policy) -> Result<Arena> {
    let layout = LayerLayout::new(spec)?;
    let c = &policy.compress_weight;
    let packed = c.enabled.then(|| layout.packed(c.bits, c.group_size as usize));
    let unit_len = packed.as_ref().map_or(layout.len, |p| p.len / 2);
    let [on_gpu, on_cpu, _] = split_counts(unit_len, &policy.placement.weights);
    Ok(Arena { layout, packed, unit_len, ends: [on_gpu, on_gpu + on_cpu] })
}

/// Bytes of one packed k (or v) cache of `rows` rows of `cap` positions: codes and parameters.
pub(crate) fn packed_cache_bytes(policy: &Policy, rows: usize, cap: usize, hd: usize) -> u64 {
    let q = CacheQuant {
        rows,
        cap,
        hd,
        group: policy.compress_cache.group_size as usize,
        bits: policy.compress_cache.bits,
    };
    let (codes, params) = q.sizes();
    (codes + 2 * params) as u64
}

/// fp16 values of the buffer a packed layer's matrices are dequantized into, a slice of outputs
/// before each product of it (prefill, and decode where the products do not read the codes): the
/// largest slice ([`expand_slice_outputs`]).
pub(crate) fn expand_len(p: &PackedLayout) -> usize {
    p.mats.iter().map(|m| expand_slice_outputs(m.rows, m.cols, p.group) * m.cols).max().unwrap_or(0)
}

/// The fused 4-bit product's fp32 output for a decode micro-batch (rows × the widest matrix),
/// then the `u32` counters of the store folded into the tensor-core product.
pub(crate) fn fused_scratch_bytes(policy: &Policy, packed: Option<&PackedLayout>) -> u64 {
    match packed {
        Some(p) if policy.fuses_decode() => {
            (fused_sums_len(policy, p) + gemm4_tc_done_len(widest_outputs(p))) as u64 * 4
        }
        _ => 0,
    }
}

/// The fp32 sums that [`fused_scratch_bytes`] starts with (its counters after them).
pub(crate) fn fused_sums_len(policy: &Policy, p: &PackedLayout) -> usize {
    policy.gpu_batch_size as usize * widest_outputs(p)
}

/// Outputs of a packed layer's widest matrix.
fn widest_outputs(p: &PackedLayout) -> usize {
    p.mats.iter().map(|m| m.rows).max().unwrap_or(0)
}

/// Pinned CPU memory for the last positions' logits of every GPU batch.
pub(crate) fn logits_host_bytes(spec: &ModelSpec, policy: &Policy) -> u64 {
    u64::from(policy.num_gpu_batches)
        * u64::from(policy.gpu_batch_size)
        * u64::from(spec.vocab_size)
        * 2
}

/// The CUDA stage: fp16 arenas split into a GPU prefix, a pinned (or pageable) CPU part and a
/// disk part read through a ring; staging arenas when any part streams; the cache rows by their
/// shares for `capacity.positions()` positions; the visit buffers, scratch and logits.
fn cuda(spec: &ModelSpec, policy: &Policy, c: Capacity, layers: Range<u32>) -> Result<MemoryPlan> {
    let a = arena(spec, policy)?;
    let [g_end, c_end] = a.ends;
    let unit_len = a.unit_len;
    let (all_rows, kv_rows) = cache_rows(spec, policy);
    let [gpu_rows, cpu_rows, disk_rows] = kv_rows;
    let n_layers = u64::from(layers.end - layers.start);
    let (h, ffn, v) =
        (u64::from(spec.hidden_size), spec.mlp_inner_width(), u64::from(spec.vocab_size));
    let hd = spec.head_dim() as usize;
    let hdu = hd as u64;
    let kvw = u64::from(spec.num_kv_heads) * hdu;
    let (b, k) = (u64::from(policy.gpu_batch_size), u64::from(policy.num_gpu_batches));
    let t = c.max_prompt as u64;
    let cap = c.positions();
    let capu = cap as u64;
    let rows = b * t;
    let act_tier = policy.placement.activations.single_tier().unwrap_or(Tier::Gpu);
    let act_on_gpu = act_tier == Tier::Gpu;
    let compressed = policy.compress_cache.enabled;
    // GPU.
    let mut staging = if g_end < unit_len { 4 * unit_len as u64 } else { 0 };
    if let Some(p) = &a.packed {
        staging += 2 * expand_len(p) as u64; // one slice of a matrix dequantized at a time
    }
    staging += fused_scratch_bytes(policy, a.packed.as_ref());
    let pf = Prefetch::of(policy, gpu_rows, all_rows, disk_rows);
    let slots = Prefetch::slots(pf.cache) as u64;
    let cpu_rows_all = (all_rows - gpu_rows) as u64;
    let new_kv = if compressed {
        // The fp16 working area of one (layer, batch), and the CPU rows' packed staging.
        let packed = packed_cache_bytes(policy, all_rows - gpu_rows, cap, hd);
        2 * all_rows as u64 * capu * hdu + slots * packed
    } else if cpu_rows_all == 0 {
        0
    } else if policy.cpu_cache_compute {
        2 * cpu_rows_all * t * hdu
    } else {
        slots * 2 * cpu_rows_all * capu * hdu
    };
    let scores = micro_batch_scores_len(spec, policy.gpu_batch_size as usize, c.max_prompt) as u64;
    let scratch = rows * h * 4 // hn, q, ctx, att
        + rows * (h + 2 * kvw)
        + scores
        + rows * ffn
        + 2 * b * h // last, and the odd batches' decode attention output
        + b * v
        + new_kv;
    let (first, last) = table_elems(spec, &layers);
    let gpu = Use {
        weights: n_layers * g_end as u64 * 2,
        staging,
        // The tables with the final norm (weight, and bias for LayerNorm) and projections.
        tables: 2 * (first + last),
        cache: if compressed {
            n_layers * k * 2 * packed_cache_bytes(policy, gpu_rows, cap, hd)
        } else {
            n_layers * k * 2 * gpu_rows as u64 * capu * hdu * 2
        },
        // With cuBLASLt's workspace (the GEMMs' scratch).
        activations: 2
            * (if act_on_gpu { k } else { Prefetch::slots(pf.act) as u64 } * rows * h + scratch)
            + LT_WORKSPACE_MAX as u64,
    };
    // CPU.
    let disk_stage = if disk_rows > 0 {
        // Row-major staging and two pairs of position-major I/O buffers, k and v.
        2 * (align_up(disk_rows * cap * hd * 2) + 2 * cap * disk_pos_bytes(disk_rows, hd)) as u64
    } else {
        0
    };
    let ring = if c_end < unit_len { 3 * align_up((unit_len - c_end) * 2) as u64 } else { 0 };
    let cpu = Use {
        weights: n_layers * (c_end - g_end) as u64 * 2,
        staging: ring + disk_stage + logits_host_bytes(spec, policy),
        // None: a lazy model's tables (`Model::open_lazy`, `dummy_lazy`: the CLI's and the
        // server's on CUDA) are made for their upload and dropped.
        tables: 0,
        cache: if compressed {
            n_layers * k * 2 * packed_cache_bytes(policy, cpu_rows, cap, hd)
        } else {
            n_layers * k * 2 * cpu_rows as u64 * capu * hdu * 2
        },
        activations: if act_on_gpu { 0 } else { k * b * t * h * 2 },
    };
    // Disk: the weights file (one aligned slot per layer) and the cache rows there.
    let disk = Use {
        weights: if c_end < unit_len {
            n_layers * align_up((unit_len - c_end) * 2) as u64
        } else {
            0
        },
        cache: n_layers * k * 2 * (cap * disk_pos_bytes(disk_rows, hd)) as u64,
        ..Use::default()
    };
    Ok(MemoryPlan { layers, gpu, cpu, disk, kv_rows, activations: act_tier })
}

#[cfg(test)]
mod tests {
    use flexgen_policy::{Placement, TierShares};

    use super::*;

    fn spec(name: &str) -> ModelSpec {
        flexgen_model::spec_by_name(name).unwrap()
    }

    const CAP: Capacity = Capacity { max_prompt: 512, max_new: 32, sequences: None };

    fn cuda_plan(spec: &ModelSpec, p: &Policy) -> MemoryPlan {
        plan(spec, p, CAP, 0..spec.num_layers, Compute::Cuda).unwrap()
    }

    fn policy(pct: [f64; 6], b: u32, k: u32) -> Policy {
        Policy {
            placement: Placement::from_percent(pct).unwrap(),
            gpu_batch_size: b,
            num_gpu_batches: k,
            ..Policy::default()
        }
    }

    /// S1: OPT-30B weights on the CPU, cache and activations on the GPU, 32×2.
    fn s1() -> Policy {
        policy([0.0, 100.0, 100.0, 0.0, 100.0, 0.0], 32, 2)
    }

    fn gib(b: u64) -> f64 {
        b as f64 / f64::from(1u32 << 30)
    }

    /// Bytes the prefill scores of `b` sequences of 512 positions take less than all of them at
    /// once (the plan before `prefill_scores_len`), in fp16.
    fn scores_cut(spec: &ModelSpec, b: usize) -> u64 {
        let all = b * spec.num_heads as usize * 512 * 512;
        let held = micro_batch_scores_len(spec, b, 512);
        assert!(held < all && held <= flexgen_policy::PREFILL_SCORES_VALUES);
        2 * (all - held) as u64
    }

    /// The GPU bytes the CUDA stage planned in the device runs of docs/benchmarks.md (S1).
    #[test]
    fn planned_gpu_bytes_match_the_device_reports() {
        let m = spec("opt-30b");
        let b = cuda_plan(&m, &s1()).gpu;
        // Reported: GPU 51.34 GiB (staging 2.30, KV cache 44.62, activations 3.72), before
        // cuBLASLt's 32 MiB workspace was counted and the prefill scores were held to 64 MiB.
        let want = 51.34 + 1.0 / 32.0 - gib(scores_cut(&m, 32));
        assert!((gib(b.total()) - want).abs() < 0.01, "{}", gib(b.total()));
        assert!((gib(b.cache) - 44.62).abs() < 0.01 && (gib(b.staging) - 2.30).abs() < 0.01);
        let host = cuda_plan(&m, &s1()).cpu.total();
        assert!((gib(host) - 55.13).abs() < 0.01, "{}", gib(host)); // 55.13 GiB pinned
        // With packed 4-bit weights the same run holds and moves about 0.28 of the bytes.
        let mut c = s1();
        c.compress_weight.enabled = true;
        let ratio = cuda_plan(&m, &c).cpu.total() as f64 / host as f64;
        assert!((0.26..0.30).contains(&ratio), "{ratio}");
    }

    /// S10 (OPT-175B 4-bit under a 15 GiB cap, session 18's 8×4 plan): its run reported 3.25 GB
    /// of staging with fc1 dequantized whole; a slice of outputs at a time, the largest slice
    /// (q/k/v's 5,312 of 36,864 outputs) takes fc1's place.
    #[test]
    fn large_matrices_are_dequantized_a_slice_at_a_time() {
        let m = spec("opt-175b");
        let mut p = policy([7.9, 92.1, 0.0, 100.0, 100.0, 0.0], 8, 4);
        p.compress_weight.enabled = true;
        p.compress_cache.enabled = true;
        p.cpu_cache_compute = true;
        let reported: u64 = 3_248_603_904; // docs/runs/2026-12-03-s18/call2/s10.json
        let (fc1, slice) = (49_152 * 12_288 * 2, 5_312 * 12_288 * 2);
        assert_eq!(cuda_plan(&m, &p).gpu.staging, reported - fc1 + slice);
        let packed = arena(&m, &p).unwrap().packed.unwrap();
        assert_eq!(expand_len(&packed), 5_312 * 12_288);
        // A model whose matrices fit the buffer expands each whole, as before.
        let small = LayerLayout::new(&spec("opt-1.3b")).unwrap().packed(4, 64);
        assert_eq!(expand_len(&small), 8_192 * 2_048);
    }

    /// The fused 4-bit decode's scratch is planned exactly where the stage takes that path: 4-bit
    /// packed weights, micro-batches of at most 128 rows, however many of them.
    #[test]
    fn the_fused_decode_scratch_is_planned_where_it_is_taken() {
        let m = spec("opt-6.7b");
        let staging = |b: u32, k: u32, bits: u8| {
            let mut p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], b, k);
            p.compress_weight.enabled = true;
            p.compress_weight.bits = bits;
            (p.fuses_decode(), cuda_plan(&m, &p).gpu.staging)
        };
        // Against the 8-bit plan of the same shape (no fused path): OPT-6.7B's widest matrix is
        // fc1's 16384 outputs (q/k/v: 12288), fp32 per row, then a u32 counter per 256 outputs.
        let extra = |b: u32, k: u32| {
            let ((on, four), (off, eight)) = (staging(b, k, 4), staging(b, k, 8));
            assert!(!off);
            (on, four - eight)
        };
        let counters = 16_384 / 256 * 4;
        assert_eq!(extra(1, 1), (true, 16_384 * 4 + counters), "one row's scratch");
        assert_eq!(extra(2, 4), (true, 2 * 16_384 * 4 + counters));
        assert_eq!(extra(64, 1), (true, 64 * 16_384 * 4 + counters), "64 rows, tensor cores");
        assert_eq!(extra(128, 1), (true, 128 * 16_384 * 4 + counters), "128 rows, two tiles");
        assert_eq!(extra(129, 1), (false, 0), "129 rows dequantize");
        assert_eq!(extra(1, 8), (true, 16_384 * 4 + counters), "eight micro-batches as well");
    }

    #[test]
    fn a_compressed_cache_plans_about_a_quarter_of_the_bytes() {
        let m = spec("opt-30b");
        let mut p = s1();
        let plain = cuda_plan(&m, &p).gpu;
        p.compress_cache.enabled = true;
        let packed = cuda_plan(&m, &p).gpu;
        // 4-bit codes and an fp16 pair per 64 values: (32 + 4) / 128 of the fp16 bytes.
        let ratio = packed.cache as f64 / plain.cache as f64;
        assert!((ratio - 36.0 / 128.0).abs() < 1e-9, "{ratio}");
        // One (layer, batch) in fp16 is the working area.
        assert_eq!(packed.activations - plain.activations, 2 * 2 * 32 * 56 * 544 * 128);
        // The original's compressed T4 policy: the packed cache on the CPU, none on the GPU.
        p.placement = Placement::from_percent([0.0, 100.0, 0.0, 100.0, 0.0, 100.0]).unwrap();
        let on_cpu = cuda_plan(&m, &p);
        assert_eq!(on_cpu.gpu.cache, 0);
        assert_eq!(on_cpu.cpu.cache, packed.cache, "the same packed bytes, on the CPU");
        let layout = LayerLayout::new(&m).unwrap();
        assert_eq!(on_cpu.cpu.weights, 48 * layout.len as u64 * 2);
        assert_eq!(on_cpu.cpu.activations, 2 * 32 * 512 * 7168 * 2);
    }

    #[test]
    fn cache_rows_split_three_ways_and_disk_rows_stay_off_the_cpu_plan() {
        let shares = TierShares::from_gpu_cpu(50.0, 25.0);
        assert_eq!(split_counts(64 * 32, &shares), [1024, 512, 512]);
        let m = spec("opt-6.7b");
        let mut p = policy([100.0, 0.0, 50.0, 50.0, 100.0, 0.0], 64, 1);
        p.offload_dir = Some("/unused".into()); // the plan names it only
        let cpu_only = cuda_plan(&m, &p);
        p.placement = Placement::from_percent([100.0, 0.0, 50.0, 25.0, 100.0, 0.0]).unwrap();
        let with_disk = cuda_plan(&m, &p);
        assert_eq!(with_disk.kv_rows, [1024, 512, 512]);
        // Half of the CPU rows moved to disk; the disk rows' row-major staging and two pairs of
        // position-major I/O buffers (k and v) stay on the CPU.
        assert_eq!(with_disk.cpu.cache, cpu_only.cpu.cache / 2);
        let stage = 2 * (align_up(512 * 544 * 128 * 2) + 2 * 544 * disk_pos_bytes(512, 128)) as u64;
        assert_eq!(with_disk.cpu.staging - cpu_only.cpu.staging, stage);
        assert_eq!(with_disk.disk.cache, 32 * 2 * (544 * disk_pos_bytes(512, 128)) as u64);
    }

    #[test]
    fn prefetched_copies_plan_a_second_buffer() {
        let m = spec("opt-6.7b");
        let plan = |pct: [f64; 6], k: u32, cpu_attn: bool| {
            let mut p = policy(pct, 8, k);
            p.cpu_cache_compute = cpu_attn;
            p.offload_dir = Some("/tmp".into());
            cuda_plan(&m, &p).gpu
        };
        // The cache on the CPU, attended on the GPU: two working caches of all 256 rows.
        let two = plan([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], 1, false);
        assert_eq!(
            Prefetch::of(&Policy::default(), 0, 256, 0),
            Prefetch { act: false, cache: true }
        );
        // With a share on disk the host fills the staging: one working cache.
        let one = plan([100.0, 0.0, 0.0, 50.0, 100.0, 0.0], 1, false);
        assert_eq!(two.activations - one.activations, 2 * 2 * 256 * 544 * 128);
        // CPU attention moves only new positions: no working cache to double.
        let attn = plan([100.0, 0.0, 0.0, 100.0, 100.0, 0.0], 1, true);
        assert_eq!(
            two.activations - attn.activations,
            2 * 2 * (2 * 256 * 544 * 128 - 256 * 512 * 128)
        );
        // Hidden states on the CPU: two staging buffers with two or more GPU batches.
        let act1 = plan([100.0, 0.0, 100.0, 0.0, 0.0, 100.0], 1, false);
        let act2 = plan([100.0, 0.0, 100.0, 0.0, 0.0, 100.0], 2, false);
        assert_eq!(act2.activations - act1.activations, 2 * 8 * 512 * 4096);
    }

    #[test]
    fn cache_rows_on_the_cpu_move_out_of_the_gpu_plan() {
        let m = spec("opt-6.7b");
        let all = cuda_plan(&m, &policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 64, 1));
        // Reported for S4: GPU 33.41 GiB (weights 12.00, KV cache 17.00, activations 4.01),
        // before cuBLASLt's 32 MiB workspace was counted and the prefill scores were held to
        // 64 MiB.
        let want = 33.41 + 1.0 / 32.0 - gib(scores_cut(&m, 64));
        assert!((gib(all.gpu.total()) - want).abs() < 0.01, "{}", gib(all.gpu.total()));
        let mut p = policy([100.0, 0.0, 25.0, 75.0, 100.0, 0.0], 64, 1);
        p.cpu_cache_compute = true;
        let quarter = cuda_plan(&m, &p);
        assert_eq!(quarter.gpu.cache * 4, all.gpu.cache, "a quarter of the rows on the GPU");
        assert_eq!(quarter.cpu.cache, all.gpu.cache * 3 / 4, "the rest on the CPU");
    }

    /// A pipeline stage's plan: its layers' share of the per-layer bytes, the embeddings with the
    /// first layer and the LM head with the last.
    #[test]
    fn a_layer_range_holds_its_layers_and_the_tables_at_its_ends() {
        let m = spec("opt-6.7b");
        let p = policy([50.0, 50.0, 100.0, 0.0, 100.0, 0.0], 16, 2);
        let whole = cuda_plan(&m, &p);
        let part = |r: Range<u32>| plan(&m, &p, CAP, r, Compute::Cuda).unwrap();
        let (front, back) = (part(0..16), part(16..32));
        assert_eq!(front.gpu.weights + back.gpu.weights, whole.gpu.weights);
        assert_eq!(front.cpu.weights + back.cpu.weights, whole.cpu.weights);
        assert_eq!(front.gpu.cache + back.gpu.cache, whole.gpu.cache);
        assert!(front.gpu.tables > 0 && back.gpu.tables > 0, "tied embeddings: both ends");
        assert_eq!(part(8..16).gpu.tables, 0, "a middle stage holds no table");
        let err = plan(&m, &p, CAP, 0..33, Compute::Cuda).unwrap_err().to_string();
        assert!(err.contains("0..33") && err.contains("32"), "{err}");
    }

    /// The host stage's weights split tensor by tensor as `tiers.rs` stores them: the plan's
    /// shapes are the loaded model's.
    #[test]
    fn the_host_plan_counts_the_tensors_the_model_has() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../flexgen-model/test_data/tiny-random-opt");
        let model = flexgen_model::Model::load(&dir).unwrap();
        let shapes: Vec<Vec<usize>> =
            model.weights.layers[0].tensors().iter().map(|t| t.dims().to_vec()).collect();
        assert_eq!(layer_shapes(&model.spec), shapes);
        let p = policy([100.0, 0.0, 100.0, 0.0, 100.0, 0.0], 2, 2);
        let weights_only = Capacity { max_prompt: 0, max_new: 0, sequences: Some(0) };
        let n = model.spec.num_layers;
        let w = plan(&model.spec, &p, weights_only, 0..n, Compute::Host).unwrap();
        let elems: usize = model
            .weights
            .layers
            .iter()
            .flat_map(|l| l.tensors())
            .map(flexgen_tensor::Tensor::elem_count)
            .sum();
        assert_eq!(w.gpu.weights, elems as u64 * 4);
        assert_eq!((w.gpu.cache, w.gpu.activations, w.gpu.staging), (0, 0, 0));
        // A block of three sequences plans two micro-batches (2 + 1 rows).
        let block = Capacity { max_prompt: 5, max_new: 3, sequences: Some(3) };
        let b = plan(&model.spec, &p, block, 0..n, Compute::Host).unwrap();
        let kv_pos = 2 * u64::from(model.spec.hidden_size) * 4; // k and v of all heads, f32
        assert_eq!(b.gpu.cache, u64::from(n) * 3 * 8 * kv_pos);
    }
}
