//! Pipeline stages: the model split over `stages` GPUs of one host. The layers are split by bytes;
//! each stage is planned by the one-GPU cost model on its layers and its share of the host (the
//! CPU memory, disk, cores and, where the profile says the links are shared, the host-to-device
//! bandwidth); the stages' times are combined as the runtime runs a pipeline.
//!
//! The runtime splits a block's micro-batches into one group per stage and passes each group from
//! stage to stage: group g runs on stage s while g − 1 runs on stage s + 1. Each stage holds the
//! cache of every group and computes one group at a time, so a stage is planned with the group as
//! its block (`Choice::groups` = stages). The prefill, one step, ends when the last group leaves
//! the last stage: the first group's way through every stage and then one slowest stage per
//! further group, `Σ Tₛ + (S − 1) · max Tₛ`. In decode each group's next tokens come as soon as
//! it leaves the last stage, so the first stage starts the group's next step while the others
//! finish this one: a step takes every group through the slowest stage, `S · max Tₛ`, unless one
//! group's way through every stage is longer, `Σ Tₛ`. Plus the hidden states' crossings of a
//! group.

use std::ops::Range;

use flexgen_policy::{HardwareProfile, ModelSpec, Policy, Stage, Workload};

use crate::{Error, Plan, PlanOptions, Result, plan};

/// Contiguous layer ranges for `stages` stages, balanced by bytes: a stage's layers plus the
/// tables it holds (the first the embeddings, the last the final norm and LM head). Every stage
/// gets at least one layer.
///
/// # Panics
/// If `stages` is 0 or exceeds the model's layers.
pub fn split_layers(spec: &ModelSpec, stages: u32) -> Vec<Range<u32>> {
    let n = spec.num_layers;
    assert!((1..=n).contains(&stages), "1 to {n} stages");
    #[expect(clippy::cast_precision_loss, reason = "parameter counts far below 2^52")]
    let (layer, (first, last)) = {
        let (f, l) = spec.table_params();
        (spec.layer_params() as f64, (f as f64, l as f64))
    };
    let total = first + f64::from(n) * layer + last;
    let mut out = Vec::with_capacity(stages as usize);
    let mut start = 0u32;
    for i in 0..stages {
        let left = stages - i - 1; // stages after this one, one layer each at least
        let end = if left == 0 {
            n
        } else {
            // Where the cumulative bytes reach this stage's share.
            let target = total * f64::from(i + 1) / f64::from(stages);
            #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "≤ n")]
            let at = ((target - first) / layer).round().max(0.0) as u32;
            at.clamp(start + 1, n - left)
        };
        out.push(start..end);
        start = end;
    }
    out
}

/// The share of the host one of `stages` stages may count on: its memory, disk and cores divided
/// evenly, and its host-to-device rate as the profile measured with every GPU copying at once.
fn host_share(hw: &HardwareProfile, stages: u32) -> HardwareProfile {
    let mut h = hw.clone();
    let s = f64::from(stages);
    let div = |v: u64| v / u64::from(stages);
    h.cpu.memory_bytes = div(h.cpu.memory_bytes);
    h.cpu.gemm_flops_per_s /= s;
    for r in h.cpu.attention_rates_mut() {
        *r /= s;
    }
    h.disk.capacity_bytes = div(h.disk.capacity_bytes);
    h.disk.read_bytes_per_s /= s;
    h.disk.write_bytes_per_s /= s;
    if let Some(g) = h.gpu.as_mut() {
        let each = g.h2d_pinned_each(stages);
        let ratio = each / g.h2d_pinned_bytes_per_s;
        g.h2d_pinned_bytes_per_s = each;
        g.d2h_pinned_bytes_per_s *= ratio;
    }
    h
}

/// Plans a pipeline of `stages` stages, one GPU each, on a host that `hw` describes (its
/// `gpu.count` GPUs alike). One stage is [`plan`]. The policy's top-level placement is the first
/// stage's; every stage is a `[[stage]]` entry with its layers, placement and CPU attention; the
/// block holds one group of the planned shape per stage.
pub fn plan_pipeline(
    spec: &ModelSpec,
    hw: &HardwareProfile,
    workload: &Workload,
    opts: &PlanOptions,
    stages: u32,
) -> Result<Plan> {
    if stages <= 1 {
        return plan(spec, hw, workload, opts);
    }
    let gpu = hw.gpu.as_ref().ok_or_else(|| Error::NoGpu { profile: hw.name.clone() })?;
    if stages > gpu.count {
        return Err(Error::Invalid {
            field: "stages",
            message: format!(
                "{stages} stages need {stages} GPUs; the profile {} has gpu.count = {}: profile \
                 the machine with all its GPUs (flexgen-profile counts them), or plan fewer \
                 stages (at most {})",
                hw.name, gpu.count, gpu.count
            ),
        });
    }
    if stages > spec.num_layers {
        return Err(Error::Invalid {
            field: "stages",
            message: format!(
                "{stages} stages for {}'s {} layers: a stage holds at least one layer",
                spec.name, spec.num_layers
            ),
        });
    }
    let ranges = split_layers(spec, stages);
    let share = host_share(hw, stages);
    let sub = |r: &Range<u32>| ModelSpec { num_layers: r.end - r.start, ..spec.clone() };
    // Each stage runs a group (a block of the sub-plan's shape) at a time; the job's prompts are
    // spread over one group per stage.
    let per_group =
        Workload { num_prompts: workload.num_prompts.map(|n| n.div_ceil(stages)), ..*workload };
    let staged = PlanOptions { groups: stages, ..opts.clone() };
    // The stage with the most layers chooses the block shape and compression; the others are
    // planned with them.
    let widest = ranges.iter().max_by_key(|r| r.end - r.start).expect("at least two stages");
    let lead = plan(&sub(widest), &share, &per_group, &staged)?;
    let shape = PlanOptions {
        gpu_batch_size: Some(lead.policy.gpu_batch_size),
        num_gpu_batches: Some(lead.policy.num_gpu_batches),
        compress_weight: Some(lead.policy.compress_weight.enabled),
        compress_cache: Some(lead.policy.compress_cache.enabled),
        keep: 1,
        ..staged
    };
    let plans = ranges
        .iter()
        .map(|r| {
            if r.end - r.start == widest.end - widest.start {
                Ok(lead.clone())
            } else {
                plan(&sub(r), &share, &per_group, &shape)
            }
        })
        .collect::<Result<Vec<Plan>>>()?;
    Ok(combine(spec, hw, workload, &ranges, &plans, &lead))
}

/// The pipeline's policy and prediction from its stages' plans.
fn combine(
    spec: &ModelSpec,
    hw: &HardwareProfile,
    workload: &Workload,
    ranges: &[Range<u32>],
    plans: &[Plan],
    lead: &Plan,
) -> Plan {
    let s = plans.len();
    let sf = f64::from(u32::try_from(s).expect("stages fit in u32"));
    let best: Vec<_> = plans.iter().map(|p| &p.candidates[0]).collect();
    let b = f64::from(lead.policy.gpu_batch_size);
    let k = f64::from(lead.policy.num_gpu_batches);
    let group = b * k; // sequences per group
    let blocks = workload.num_prompts.map_or(1.0, |n| (f64::from(n) / (group * sf)).ceil());
    // Hidden states crossing a stage boundary: GPU to GPU, or through the host.
    let g = hw.gpu.as_ref().expect("checked by plan_pipeline");
    let link = g
        .p2p_bytes_per_s
        .unwrap_or_else(|| 1.0 / (1.0 / g.d2h_pinned_bytes_per_s + 1.0 / g.h2d_pinned_bytes_per_s));
    let h = f64::from(spec.hidden_size);
    let prompt = f64::from(workload.prompt_len);
    let steps = f64::from(workload.gen_len.saturating_sub(1));
    let crossings = (sf - 1.0) * blocks / link;
    let max = |t: &[f64]| t.iter().copied().fold(0.0, f64::max);
    let filled = |t: Vec<f64>| t.iter().sum::<f64>() + (sf - 1.0) * max(&t);
    let streamed = |t: Vec<f64>| (sf * max(&t)).max(t.iter().sum::<f64>());
    let prefill =
        filled(best.iter().map(|c| c.prefill_s).collect()) + crossings * 2.0 * h * group * prompt;
    let decode =
        streamed(best.iter().map(|c| c.decode_s).collect()) + crossings * 2.0 * h * group * steps;
    let sequences = workload.num_prompts.map_or(group * sf, f64::from);
    let tokens_per_s = sequences * f64::from(workload.gen_len) / (prefill + decode);
    let slowest = (0..s)
        .max_by(|&i, &j| {
            let t = |c: &crate::Candidate| c.prefill_s + c.decode_s;
            t(best[i]).total_cmp(&t(best[j]))
        })
        .expect("stages");
    let mut policy: Policy = lead.policy.clone();
    policy.num_gpu_batches = lead.policy.num_gpu_batches * u32::try_from(s).expect("fits");
    policy.placement = plans[0].policy.placement;
    policy.cpu_cache_compute = plans[0].policy.cpu_cache_compute;
    policy.offload_dir = plans.iter().find_map(|p| p.policy.offload_dir.clone());
    policy.stages = ranges
        .iter()
        .zip(plans)
        .map(|(r, p)| Stage {
            layers: [r.start, r.end],
            placement: Some(p.policy.placement),
            cpu_cache_compute: Some(p.policy.cpu_cache_compute),
        })
        .collect();
    if let Some(pred) = policy.prediction.as_mut() {
        #[expect(clippy::cast_possible_truncation, clippy::cast_sign_loss, reason = "bytes")]
        let bytes = |v: f64| v.round() as u64;
        pred.throughput_tokens_per_s = tokens_per_s;
        pred.prefill_s = prefill;
        pred.decode_s = decode;
        pred.total_s = prefill + decode;
        // Per GPU, the largest stage's; the host's and the disk's, every stage's.
        pred.peak_gpu_bytes = bytes(best.iter().map(|c| c.peak_gpu_bytes).fold(0.0, f64::max));
        pred.peak_cpu_bytes = bytes(best.iter().map(|c| c.peak_cpu_bytes).sum());
        pred.peak_disk_bytes = bytes(best.iter().map(|c| c.disk_bytes).sum());
        pred.binding = format!("stage {slowest}: {}", best[slowest].binding);
    }
    let candidates = vec![crate::Candidate {
        tokens_per_s,
        prefill_s: prefill,
        decode_s: decode,
        ..best[0].clone()
    }];
    Plan {
        policy,
        candidates,
        solved: plans.iter().map(|p| p.solved).sum(),
        solve_s: plans.iter().map(|p| p.solve_s).sum(),
    }
}
