//! The planner: `FlexGen`'s cost model solved as a linear program. For each discrete choice
//! (`gpu_batch_size`, `num_gpu_batches`, weight and cache compression, CPU attention, activation
//! tier) an LP over the six placement fractions minimizes the time of one block; the choice with the
//! highest generated tokens per second of the whole workload wins and becomes a [`Policy`].
//!
//! Depends on `flexgen-policy` alone: it sees shapes and rates, never weights or devices.

mod calibrate;
pub mod cost;
mod lp;
mod pipeline;

use std::path::PathBuf;
use std::time::Instant;

use flexgen_policy::{
    HardwareProfile, ModelSpec, Placement, Policy, Prediction, Tier, TierShares, Workload,
};

pub use calibrate::{Calibration, Observation, Phases, calibrate};
pub use cost::{Choice, Lin, Margins, Terms};
pub use pipeline::{plan_pipeline, split_layers};

/// Errors from planning.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The profile describes a machine without a GPU.
    #[error(
        "hardware profile `{profile}` has no GPU; flexgen plans GPU offloading (run flexgen-profile on the GPU machine)"
    )]
    NoGpu { profile: String },
    /// No placement of any block shape fits the machine. `settings` names the options that
    /// narrowed the search (empty when none did); the shortfalls are those of the smallest plan
    /// they allow, and `fix` says what to change.
    #[error("{model} does not fit {profile}{settings}: {}; {fix}", describe(shortfalls))]
    Infeasible {
        model: String,
        profile: String,
        settings: String,
        shortfalls: Vec<Shortfall>,
        fix: String,
    },
    /// An argument is out of range.
    #[error("`{field}`: {message}")]
    Invalid { field: &'static str, message: String },
}

/// By how much a tier (or all tiers together) falls short for the smallest possible plan; a
/// shortfall with no bytes (`needed_bytes` 0) means that each tier alone could hold its least
/// share but no one split of weights and cache fits all of them at once.
#[derive(Debug, Clone, PartialEq)]
pub struct Shortfall {
    /// `None` for all tiers together.
    pub tier: Option<Tier>,
    pub needed_bytes: f64,
    pub available_bytes: f64,
}

impl Shortfall {
    /// The marker of "no split fits all tiers at once", with what they offer together.
    fn no_split(available_bytes: f64) -> Self {
        Self { tier: None, needed_bytes: 0.0, available_bytes }
    }
}

fn describe(s: &[Shortfall]) -> String {
    let gib = |b: f64| b / f64::from(1u32 << 30);
    s.iter()
        .map(|s| {
            let what =
                s.tier.map_or_else(|| "GPU+CPU+disk together".to_string(), |t| t.to_string());
            if s.needed_bytes <= s.available_bytes {
                return format!(
                    "each tier alone can hold its least share, but no split of weights and KV \
                     cache fits all of them at once ({what} offer {:.1} GiB)",
                    gib(s.available_bytes)
                );
            }
            format!(
                "{what} needs {:.1} GiB but offers {:.1} GiB (short by {:.1} GiB)",
                gib(s.needed_bytes),
                gib(s.available_bytes),
                gib(s.needed_bytes - s.available_bytes)
            )
        })
        .collect::<Vec<_>>()
        .join("; ")
}

/// Result type of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Knobs of the search.
#[derive(Debug, Clone)]
pub struct PlanOptions {
    /// Use at most this much GPU memory (emulate a smaller card).
    pub gpu_mem_limit_bytes: Option<u64>,
    /// Consider 4-bit compression of weights and cache.
    pub allow_compression: bool,
    /// Force weight compression on (`Some(true)`) or off (`Some(false)`).
    pub compress_weight: Option<bool>,
    /// Force cache compression on or off.
    pub compress_cache: Option<bool>,
    /// Largest `gpu_batch_size` to try.
    pub max_batch: u32,
    /// Only this `gpu_batch_size` / `num_gpu_batches`, if set.
    pub gpu_batch_size: Option<u32>,
    pub num_gpu_batches: Option<u32>,
    /// Evaluate this placement instead of searching for one.
    pub fixed_placement: Option<Placement>,
    pub margins: Margins,
    /// Candidates kept for `--explain`.
    pub keep: usize,
    /// The offload directory written into the policy when it uses the disk.
    pub offload_dir: Option<PathBuf>,
    /// Blocks whose cache the layers hold at once (`Choice::groups`): 1, except for the stages
    /// that [`plan_pipeline`] plans.
    pub groups: u32,
}

impl Default for PlanOptions {
    fn default() -> Self {
        Self {
            gpu_mem_limit_bytes: None,
            allow_compression: true,
            compress_weight: None,
            compress_cache: None,
            max_batch: 512,
            gpu_batch_size: None,
            num_gpu_batches: None,
            fixed_placement: None,
            margins: Margins::default(),
            keep: 5,
            offload_dir: None,
            groups: 1,
        }
    }
}

/// One evaluated choice with its best placement.
#[derive(Debug, Clone, PartialEq)]
pub struct Candidate {
    pub choice: Choice,
    /// `[wg, wc, wn, cg, cc, cn]`, each 0..1.
    pub fractions: [f64; 6],
    /// Generated tokens per second of the whole workload.
    pub tokens_per_s: f64,
    pub prefill_s: f64,
    pub decode_s: f64,
    pub binding: &'static str,
    pub peak_gpu_bytes: f64,
    pub peak_cpu_bytes: f64,
    pub disk_bytes: f64,
}

/// The chosen policy, its prediction, and the runners-up.
#[derive(Debug, Clone)]
pub struct Plan {
    pub policy: Policy,
    /// Best first.
    pub candidates: Vec<Candidate>,
    /// LPs solved.
    pub solved: usize,
    pub solve_s: f64,
}

const BATCHES: [u32; 16] = [1, 2, 4, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512];
const NUM_BATCHES: [u32; 11] = [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48];

/// Finds the policy with the highest predicted throughput.
pub fn plan(
    spec: &ModelSpec,
    hw: &HardwareProfile,
    workload: &Workload,
    opts: &PlanOptions,
) -> Result<Plan> {
    let started = Instant::now();
    let (hw, cap) = capacities(hw, opts)?;
    if workload.prompt_len == 0 || workload.gen_len == 0 {
        return Err(Error::Invalid {
            field: "workload",
            message: "prompt and generation lengths must be at least 1".into(),
        });
    }
    if workload.prompt_len + workload.gen_len > spec.max_positions {
        return Err(Error::Invalid {
            field: "workload",
            message: format!(
                "prompt {} + generation {} exceeds {}'s {} positions",
                workload.prompt_len, workload.gen_len, spec.name, spec.max_positions
            ),
        });
    }
    let fixed = opts.fixed_placement.map(|p| fractions_of(&p));
    let flags = |forced: Option<bool>| match forced {
        Some(v) => vec![v],
        None if opts.allow_compression => vec![false, true],
        None => vec![false],
    };
    let batches: Vec<u32> = match opts.gpu_batch_size {
        Some(b) => vec![b],
        None => BATCHES.iter().copied().filter(|&b| b <= opts.max_batch).collect(),
    };
    let nums: Vec<u32> = match opts.num_gpu_batches {
        Some(k) => vec![k],
        None => NUM_BATCHES.to_vec(),
    };
    // The discrete switches are independent searches: run them on all cores.
    let mut switches = Vec::new();
    for &cw in &flags(opts.compress_weight) {
        for &cc in &flags(opts.compress_cache) {
            for cpu_attention in [false, true] {
                for act_on_gpu in [true, false] {
                    switches.push((cw, cc, cpu_attention, act_on_gpu));
                }
            }
        }
    }
    let threads =
        std::thread::available_parallelism().map_or(1, std::num::NonZero::get).min(switches.len());
    let results: Vec<(usize, Vec<Candidate>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let (switches, batches, nums, hw) = (&switches, &batches, &nums, &hw);
                scope.spawn(move || {
                    let mut solved = 0;
                    let mut found = Vec::new();
                    for &(cw, cc, cpu_attention, act_on_gpu) in
                        switches.iter().skip(t).step_by(threads)
                    {
                        for &b in batches {
                            let mut any = false;
                            for &k in nums {
                                let choice = Choice {
                                    groups: opts.groups,
                                    gpu_batch_size: b,
                                    num_gpu_batches: k,
                                    compress_weight: cw,
                                    compress_cache: cc,
                                    cpu_attention,
                                    act_on_gpu,
                                };
                                if let Some(n) = workload.num_prompts
                                    && f64::from(n) <= choice.block() - f64::from(b)
                                {
                                    break; // a smaller block already holds every prompt
                                }
                                solved += 1;
                                let Some(c) =
                                    evaluate_choice(spec, hw, workload, &choice, cap, fixed)
                                else {
                                    break; // larger blocks need more memory
                                };
                                any = true;
                                found.push(c);
                            }
                            if !any {
                                break; // larger micro-batches need more memory
                            }
                        }
                    }
                    (solved, found)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().expect("planner thread panicked")).collect()
    });
    let solved = results.iter().map(|r| r.0).sum();
    let mut found: Vec<Candidate> = results.into_iter().flat_map(|r| r.1).collect();
    found.sort_by(|a, b| b.tokens_per_s.total_cmp(&a.tokens_per_s));
    found.truncate(opts.keep.max(1));
    let Some(best) = found.first() else {
        return Err(infeasible(spec, &hw, workload, cap, opts));
    };
    let policy = to_policy(spec, &hw, best, opts);
    Ok(Plan { policy, candidates: found, solved, solve_s: started.elapsed().as_secs_f64() })
}

/// Predicts the throughput of a given policy (its placement fixed) on `hw`.
pub fn predict(
    spec: &ModelSpec,
    hw: &HardwareProfile,
    workload: &Workload,
    policy: &Policy,
    margins: Margins,
) -> Result<Candidate> {
    let opts = PlanOptions { margins, ..PlanOptions::default() };
    let (hw, cap) = capacities(hw, &opts)?;
    let choice = Choice {
        groups: 1,
        gpu_batch_size: policy.gpu_batch_size,
        num_gpu_batches: policy.num_gpu_batches,
        compress_weight: policy.compress_weight.enabled,
        compress_cache: policy.compress_cache.enabled,
        cpu_attention: policy.cpu_cache_compute,
        act_on_gpu: policy.placement.activations.single_tier() == Some(Tier::Gpu),
    };
    let x = fractions_of(&policy.placement);
    evaluate_choice(spec, &hw, workload, &choice, cap, Some(x)).ok_or_else(|| {
        let t = cost::terms(spec, &hw, workload, &choice);
        let gpu = t.gpu_peak(&x);
        let shortfalls = [
            (Tier::Gpu, gpu, cap.gpu),
            (Tier::Cpu, t.cpu.eval(&x), cap.cpu),
            (Tier::Disk, t.disk.eval(&x), cap.disk),
        ]
        .into_iter()
        .filter(|(_, need, have)| need > have)
        .map(|(tier, needed_bytes, available_bytes)| Shortfall {
            tier: Some(tier),
            needed_bytes,
            available_bytes,
        })
        .collect::<Vec<_>>();
        let shortfalls = if shortfalls.is_empty() {
            vec![Shortfall::no_split(cap.gpu + cap.cpu + cap.disk)]
        } else {
            shortfalls
        };
        Error::Infeasible {
            model: spec.name.clone(),
            profile: hw.name.clone(),
            settings: " with this policy".into(),
            shortfalls,
            fix: "lower the shares placed on the tiers that fall short, gpu_batch_size or \
                  num_gpu_batches"
                .into(),
        }
    })
}

fn capacities(hw: &HardwareProfile, opts: &PlanOptions) -> Result<(HardwareProfile, lp::Capacity)> {
    let mut hw = hw.clone();
    let Some(gpu) = hw.gpu.as_mut() else {
        return Err(Error::NoGpu { profile: hw.name.clone() });
    };
    if let Some(limit) = opts.gpu_mem_limit_bytes {
        gpu.memory_bytes = gpu.memory_bytes.min(limit);
    }
    let cap = lp::Capacity {
        gpu: gpu.memory_bytes as f64 * opts.margins.gpu,
        cpu: hw.cpu.memory_bytes as f64 * opts.margins.cpu,
        disk: hw.disk.capacity_bytes as f64 * opts.margins.disk,
    };
    Ok((hw, cap))
}

fn fractions_of(p: &Placement) -> [f64; 6] {
    [p.weights.gpu, p.weights.cpu, p.weights.disk, p.kv_cache.gpu, p.kv_cache.cpu, p.kv_cache.disk]
        .map(|v| v / 100.0)
}

fn evaluate_choice(
    spec: &ModelSpec,
    hw: &HardwareProfile,
    workload: &Workload,
    choice: &Choice,
    cap: lp::Capacity,
    fixed: lp::Fixed,
) -> Option<Candidate> {
    let terms = cost::terms(spec, hw, workload, choice);
    let x = lp::solve(&terms, cap, fixed)?;
    let (prefill, decode) = terms.block_seconds(&x);
    let bls = choice.block();
    let (sequences, blocks) = match workload.num_prompts {
        Some(n) => (f64::from(n), (f64::from(n) / bls).ceil()),
        None => (bls, 1.0),
    };
    let total = blocks * (prefill + decode);
    Some(Candidate {
        choice: *choice,
        fractions: x,
        tokens_per_s: sequences * f64::from(workload.gen_len) / total,
        prefill_s: blocks * prefill,
        decode_s: blocks * decode,
        binding: terms.binding(&x),
        peak_gpu_bytes: terms.gpu_peak(&x),
        peak_cpu_bytes: terms.cpu.eval(&x),
        disk_bytes: terms.disk.eval(&x),
    })
}

/// Percentages from fractions, to 0.1 %, summing to exactly 100 (the largest share absorbs the
/// rounding, so a tier that the LP left empty stays empty).
fn shares(f: [f64; 3]) -> TierShares {
    let mut p = f.map(|v| (v * 1000.0).round() / 10.0 + 0.0); // + 0.0 turns −0.0 into 0.0
    let sum: f64 = p.iter().sum();
    let largest = (0..3).max_by(|&a, &b| p[a].total_cmp(&p[b])).unwrap_or(0);
    p[largest] = ((p[largest] + 100.0 - sum) * 10.0).round() / 10.0 + 0.0;
    TierShares { gpu: p[0], cpu: p[1], disk: p[2] }
}

fn to_policy(spec: &ModelSpec, hw: &HardwareProfile, c: &Candidate, opts: &PlanOptions) -> Policy {
    let x = c.fractions;
    let act = if c.choice.act_on_gpu { Tier::Gpu } else { Tier::Cpu };
    let placement = Placement {
        weights: shares([x[0], x[1], x[2]]),
        kv_cache: shares([x[3], x[4], x[5]]),
        activations: TierShares::all_on(act),
    };
    let mut policy = Policy {
        gpu_batch_size: c.choice.gpu_batch_size,
        num_gpu_batches: c.choice.num_gpu_batches,
        cpu_cache_compute: c.choice.cpu_attention,
        pin_weight: true,
        placement,
        ..Policy::default()
    };
    policy.compress_weight.enabled = c.choice.compress_weight;
    policy.compress_cache.enabled = c.choice.compress_cache;
    if placement.weights.disk > 0.0 || placement.kv_cache.disk > 0.0 {
        policy.offload_dir = Some(opts.offload_dir.clone().unwrap_or_else(|| hw.disk.path.clone()));
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "byte counts are positive and far below 2^64"
    )]
    let bytes = |v: f64| v.round() as u64;
    policy.prediction = Some(Prediction {
        throughput_tokens_per_s: c.tokens_per_s,
        prefill_s: c.prefill_s,
        decode_s: c.decode_s,
        total_s: c.prefill_s + c.decode_s,
        peak_gpu_bytes: bytes(c.peak_gpu_bytes),
        peak_cpu_bytes: bytes(c.peak_cpu_bytes),
        peak_disk_bytes: bytes(c.disk_bytes),
        binding: c.binding.to_string(),
        hardware: hw.name.clone(),
        model: spec.name.clone(),
        planner_version: env!("CARGO_PKG_VERSION").to_string(),
    });
    policy
}

/// Why nothing fits: the smallest plan the options allow (one sequence unless the block is
/// fixed, compressed unless compression is off, everything off the GPU) against each tier.
fn infeasible(
    spec: &ModelSpec,
    hw: &HardwareProfile,
    workload: &Workload,
    cap: lp::Capacity,
    opts: &PlanOptions,
) -> Error {
    let compress = |forced: Option<bool>| forced.unwrap_or(opts.allow_compression);
    let (cw, cc) = (compress(opts.compress_weight), compress(opts.compress_cache));
    let choice = Choice {
        groups: opts.groups,
        gpu_batch_size: opts.gpu_batch_size.unwrap_or(1),
        num_gpu_batches: opts.num_gpu_batches.unwrap_or(1),
        compress_weight: cw,
        compress_cache: cc,
        // CPU attention needs the least GPU memory; the runtime pairs it with an fp16 cache only.
        cpu_attention: !cc,
        act_on_gpu: false,
    };
    let mut settings = Vec::new();
    if opts.gpu_batch_size.is_some() || opts.num_gpu_batches.is_some() {
        settings.push(format!("block {}×{}", choice.gpu_batch_size, choice.num_gpu_batches));
    }
    settings.extend(
        match (cw, cc) {
            (true, true) => None,
            (false, false) => Some("no compression"),
            (false, true) => Some("no weight compression"),
            (true, false) => Some("no cache compression"),
        }
        .map(str::to_string),
    );
    let (settings, fix) = if settings.is_empty() {
        (String::new(), "offer more memory (GPU, CPU or offload disk)")
    } else {
        (
            format!(" with {}", settings.join(" and ")),
            "drop those options to let the planner search further, or offer more memory",
        )
    };
    let t = cost::terms(spec, hw, workload, &choice);
    Error::Infeasible {
        model: spec.name.clone(),
        profile: hw.name.clone(),
        settings,
        shortfalls: shortfalls(&t, cc, cap),
        fix: fix.to_string(),
    }
}

/// What keeps a choice's terms `t` (`cc`: a compressed cache) from fitting `cap`: each tier whose
/// least share, with everything else off it, is more than it offers; all tiers together; or, where
/// none of those is short, that no one split fits every tier at once.
fn shortfalls(t: &Terms, cc: bool, cap: lp::Capacity) -> Vec<Shortfall> {
    // Everything off the GPU: on disk, except a compressed cache, which only the CPU holds.
    let on_disk = [0.0, 0.0, 1.0, 0.0, f64::from(u8::from(cc)), f64::from(u8::from(!cc))];
    let mut shortfalls = Vec::new();
    let gpu_min = t.gpu_peak(&on_disk);
    if gpu_min > cap.gpu {
        shortfalls.push(Shortfall {
            tier: Some(Tier::Gpu),
            needed_bytes: gpu_min,
            available_bytes: cap.gpu,
        });
    }
    let cpu_min = t.cpu.eval(&on_disk);
    if cpu_min > cap.cpu {
        shortfalls.push(Shortfall {
            tier: Some(Tier::Cpu),
            needed_bytes: cpu_min,
            available_bytes: cap.cpu,
        });
    }
    // Weights and cache wherever they go, with the least each tier must hold besides.
    let all = t.disk.eval(&[0.0, 0.0, 1.0, 0.0, 0.0, 1.0]) + gpu_min + t.cpu.eval(&[0.0; 6]);
    if all > cap.gpu + cap.cpu + cap.disk {
        shortfalls.push(Shortfall {
            tier: None,
            needed_bytes: all,
            available_bytes: cap.gpu + cap.cpu + cap.disk,
        });
    }
    if shortfalls.is_empty() {
        shortfalls.push(Shortfall::no_split(cap.gpu + cap.cpu + cap.disk));
    }
    shortfalls
}

/// A block shape one step larger than a plan's, with the plan's other choices: what the cost model
/// predicts for it, or why no placement fits it (`--explain` prints these, so that a user sees
/// what holds the block back).
#[derive(Debug, Clone)]
pub struct Larger {
    pub gpu_batch_size: u32,
    pub num_gpu_batches: u32,
    pub outcome: std::result::Result<Candidate, String>,
}

/// The shapes one step larger than `best`'s in the planner's grid, one more micro-batch and the
/// next micro-batch size (unless `opts` fixes that one), each with `best`'s switches.
pub fn larger_blocks(
    spec: &ModelSpec,
    hw: &HardwareProfile,
    workload: &Workload,
    opts: &PlanOptions,
    best: &Choice,
) -> Result<Vec<Larger>> {
    let (hw, cap) = capacities(hw, opts)?;
    let fixed = opts.fixed_placement.map(|p| fractions_of(&p));
    let next = |grid: &[u32], v: u32| grid.iter().copied().find(|&g| g > v);
    let mut shapes = Vec::new();
    if opts.num_gpu_batches.is_none()
        && let Some(k) = next(&NUM_BATCHES, best.num_gpu_batches)
    {
        shapes.push((best.gpu_batch_size, k));
    }
    if opts.gpu_batch_size.is_none()
        && let Some(b) = next(&BATCHES, best.gpu_batch_size).filter(|&b| b <= opts.max_batch)
    {
        shapes.push((b, best.num_gpu_batches));
    }
    Ok(shapes
        .into_iter()
        .map(|(b, k)| {
            let choice = Choice { gpu_batch_size: b, num_gpu_batches: k, ..*best };
            let outcome =
                evaluate_choice(spec, &hw, workload, &choice, cap, fixed).ok_or_else(|| {
                    let t = cost::terms(spec, &hw, workload, &choice);
                    describe(&shortfalls(&t, choice.compress_cache, cap))
                });
            Larger { gpu_batch_size: b, num_gpu_batches: k, outcome }
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_round_to_a_tenth_and_sum_to_100() {
        let s = shares([0.123_44, 0.876_56, 0.0]);
        assert_eq!((s.gpu, s.cpu, s.disk), (12.3, 87.7, 0.0));
        let s = shares([1.0 / 3.0, 1.0 / 3.0, 1.0 / 3.0]);
        assert!((s.gpu + s.cpu + s.disk - 100.0).abs() < 1e-9);
    }
}
