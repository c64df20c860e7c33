//! The planner on the shipped hardware profiles against the `FlexGen` paper's measured throughput
//! (T4, prompt 512, 32 generated tokens): `FlexGen` reached 7.32 tok/s on OPT-30B and 0.69 on
//! OPT-175B. Our predictions for plans without compression (as those runs were) must land within
//! 2× of those, with feasible policies.

use std::path::Path;

use flexgen_model::spec_by_name;
use flexgen_planner::{PlanOptions, plan};
use flexgen_policy::{HardwareProfile, Workload};

fn profile(name: &str) -> HardwareProfile {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../policies/hardware")
        .join(format!("{name}.toml"));
    HardwareProfile::from_toml_file(&p).unwrap()
}

const PAPER: Workload = Workload { prompt_len: 512, gen_len: 32, num_prompts: None };

fn check(model: &str, paper_tokens_per_s: f64, allow_compression: bool) {
    let hw = profile("t4-16gb");
    let spec = spec_by_name(model).unwrap();
    let opts = PlanOptions { allow_compression, ..PlanOptions::default() };
    let plan = plan(&spec, &hw, &PAPER, &opts).unwrap();
    let pred = plan.policy.prediction.clone().unwrap();
    let p = &plan.policy;
    eprintln!(
        "{model} on t4-16gb: {:.2} tok/s predicted (paper {paper_tokens_per_s}); percent {:?}, {}x{}, cpu attention {}, compress w/c {}/{}, binding {}",
        pred.throughput_tokens_per_s,
        p.placement.to_percent(),
        p.gpu_batch_size,
        p.num_gpu_batches,
        p.cpu_cache_compute,
        p.compress_weight.enabled,
        p.compress_cache.enabled,
        pred.binding
    );
    let ratio = pred.throughput_tokens_per_s / paper_tokens_per_s;
    assert!(
        (0.5..=2.0).contains(&ratio),
        "{model}: predicted {} vs paper {paper_tokens_per_s}",
        pred.throughput_tokens_per_s
    );
    p.validate().unwrap();
    let gpu = hw.gpu.as_ref().unwrap().memory_bytes;
    assert!(pred.peak_gpu_bytes <= gpu, "{} > {gpu}", pred.peak_gpu_bytes);
    assert!(pred.peak_cpu_bytes <= hw.cpu.memory_bytes);
    assert!(pred.peak_disk_bytes <= hw.disk.capacity_bytes);
}

#[test]
fn opt_30b_on_t4_is_within_2x_of_the_paper() {
    check("opt-30b", 7.32, false);
}

#[test]
fn opt_175b_on_t4_is_within_2x_of_the_paper() {
    check("opt-175b", 0.69, false);
}

/// Allowing compression only widens the search: the prediction can only rise.
#[test]
fn allowing_compression_never_lowers_the_prediction() {
    let hw = profile("t4-16gb");
    for model in ["opt-6.7b", "opt-30b"] {
        let spec = spec_by_name(model).unwrap();
        let tps = |allow_compression| {
            let opts = PlanOptions { allow_compression, ..PlanOptions::default() };
            plan(&spec, &hw, &PAPER, &opts).unwrap().candidates[0].tokens_per_s
        };
        assert!(tps(true) >= tps(false), "{model}");
    }
}

/// The paper's own T4 policies, evaluated (not searched) by the cost model on the whole card
/// (margins 1.0), against what the paper measured with them. The original places whole tensors by
/// their midpoints: its "20 %" of OPT-30B's weights on the GPU was only `out_proj` of each layer,
/// 1/12 of the bytes (docs/cost-model.md), so that is what is evaluated. The original's 4-bit path
/// reaches only ~38 % of its PCIe roofline (`MISSION.md`), so for the compressed runs the model of our
/// runtime must predict at least what the original measured, not within 2× of it. This checks
/// time, not fit: our CUDA executor needs more than a T4's 15.0 GiB for the OPT-175B policies
/// (15.1 GiB fp16, 17.9 GiB 4-bit: it stages two whole 3.6 GB layers, expands a compressed layer
/// into one fp16 arena and sizes the attention scores for the whole prompt), so the card is given
/// 3 GiB more here; whether a plan fits is checked against the executor in flexgen-cli's tests.
#[test]
fn the_papers_t4_policies_are_predicted_within_2x() {
    let mut hw = profile("t4-16gb");
    if let Some(gpu) = hw.gpu.as_mut() {
        gpu.memory_bytes += 3 << 30;
    }
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    for (file, model, measured, compressed) in [
        ("opt-30b-t4.toml", "opt-30b", 7.32, false),
        ("opt-30b-t4-compressed.toml", "opt-30b", 8.38, true),
        ("opt-175b-t4.toml", "opt-175b", 0.69, false),
        ("opt-175b-t4-compressed.toml", "opt-175b", 1.12, true),
    ] {
        let mut policy = flexgen_policy::Policy::from_toml_file(&dir.join(file)).unwrap();
        if policy.placement.weights.gpu == 20.0 {
            policy.placement.weights = flexgen_policy::TierShares {
                gpu: 100.0 / 12.0,
                cpu: 100.0 - 100.0 / 12.0,
                disk: 0.0,
            };
        }
        let whole = flexgen_planner::Margins { gpu: 1.0, cpu: 1.0, disk: 1.0 };
        let c =
            flexgen_planner::predict(&spec_by_name(model).unwrap(), &hw, &PAPER, &policy, whole);
        match c {
            Ok(c) => {
                eprintln!(
                    "{file}: predicted {:.2} tok/s, paper measured {measured}, binding {}",
                    c.tokens_per_s, c.binding
                );
                let r = c.tokens_per_s / measured;
                let ok = if compressed { r >= 1.0 } else { (0.5..=2.0).contains(&r) };
                assert!(ok, "{file}: {} vs {measured}", c.tokens_per_s);
            }
            Err(e) => panic!("{file}: {e}"),
        }
    }
}

/// A compressed cache never goes to disk (the CUDA executor keeps packed rows on the GPU and the
/// CPU), and where time does not depend on it (a compute-bound plan) no byte is put on a slower
/// tier than needed: OPT-175B, 4-bit, on the H200 fits without disk.
#[test]
fn compressed_cache_stays_off_disk_and_ties_go_to_the_faster_tier() {
    let spec = spec_by_name("opt-175b").unwrap();
    for hw in [profile("t4-16gb"), profile("h200")] {
        let opts = PlanOptions {
            compress_weight: Some(true),
            compress_cache: Some(true),
            keep: 20,
            ..PlanOptions::default()
        };
        let plan = plan(&spec, &hw, &PAPER, &opts).unwrap();
        for c in &plan.candidates {
            assert!(c.fractions[5] < 1e-9, "{}: cache on disk {:?}", hw.name, c.fractions);
        }
        if hw.name == "h200" {
            let best = &plan.candidates[0];
            assert_eq!(
                best.fractions[2], 0.0,
                "weights on disk though they fit {:?}",
                best.fractions
            );
            assert_eq!(plan.policy.placement.weights.disk, 0.0);
        }
    }
}

/// S4's policy: OPT-6.7B all on the H200, 64×1.
fn s4() -> flexgen_policy::Policy {
    flexgen_policy::Policy::from_toml_file(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/opt-6.7b-h200-s4.toml"),
    )
    .unwrap()
}

/// Every tier's whole capacity.
const WHOLE: flexgen_planner::Margins = flexgen_planner::Margins { gpu: 1.0, cpu: 1.0, disk: 1.0 };

/// Compressed weights resident on the GPU cost device-memory time: beyond the fused product's
/// rows (`FUSED_DECODE_ROWS`) the runtime expands each layer to fp16 before its GEMMs, so S4's
/// placement (OPT-6.7B all on the GPU) at 256 rows with its weights compressed is predicted to
/// decode slower than without, by about one expansion of every layer per step.
#[test]
fn dequantizing_on_the_gpu_is_not_free() {
    let hw = profile("h200");
    let spec = spec_by_name("opt-6.7b").unwrap();
    let mut policy = s4();
    policy.gpu_batch_size = 256;
    let whole = WHOLE;
    let plain = flexgen_planner::predict(&spec, &hw, &PAPER, &policy, whole).unwrap();
    policy.compress_weight.enabled = true;
    let packed = flexgen_planner::predict(&spec, &hw, &PAPER, &policy, whole).unwrap();
    // One layer expanded per decode step: packed plus fp16 bytes through device memory.
    let gpu = hw.gpu.as_ref().unwrap();
    let w16 = 2.0 * spec.layer_params() as f64;
    let per_step = f64::from(spec.num_layers) * (w16 * 0.281_25 + w16) / gpu.hbm_bytes_per_s;
    let extra = packed.decode_s - plain.decode_s;
    assert!(
        extra > 0.5 * 31.0 * per_step,
        "decode {:.3} s vs {:.3} s",
        packed.decode_s,
        plain.decode_s
    );
}

/// Decode micro-batches of up to `FUSED_DECODE_ROWS` rows with packed 4-bit weights read the
/// codes straight (`Policy::fuses_decode`): no expansion per layer, a quarter of the bytes of the
/// fp16 weights per step. So OPT-6.7B at 1×1 and 1×8 decodes faster packed than fp16 by the
/// prediction; dequantizing instead (micro-batches of more rows) costs an expansion of every
/// layer per micro-batch, as the runtime does it (session 26: OPT-6.7B 4-bit at 1×4 decodes at
/// 323.9 tok/s fused against 75.0 dequantizing).
#[test]
fn a_fused_decode_skips_the_expansion() {
    let hw = profile("h200");
    let spec = spec_by_name("opt-6.7b").unwrap();
    let mut policy = s4();
    let whole = WHOLE;
    let decode = |b: u32, k: u32, packed: bool| {
        let mut p = policy.clone();
        p.gpu_batch_size = b;
        p.num_gpu_batches = k;
        p.compress_weight.enabled = packed;
        assert_eq!(p.fuses_decode(), packed && b <= 128);
        flexgen_planner::predict(&spec, &hw, &PAPER, &p, whole).unwrap().decode_s
    };
    assert!(decode(1, 1, true) < decode(1, 1, false), "1×1: the fused product reads less");
    assert!(decode(1, 8, true) < decode(1, 8, false), "1×8: fused per micro-batch as well");
    // Dequantizing, each micro-batch pays the expansion: 160×2 twice 160×1's.
    let expansion = |k| decode(160, k, true) - decode(160, k, false);
    let (one, two) = (expansion(1), expansion(2));
    assert!(one > 0.0 && (two / one - 2.0).abs() < 0.05, "{one:.4} s and {two:.4} s");
    policy.compress_weight.enabled = true;
    policy.gpu_batch_size = 256;
    assert!(!policy.fuses_decode(), "256-row micro-batches dequantize");
}

/// A GPU before compute capability 8.0 (the T4 profile's 7.5) has no tensor-core product: decode
/// micro-batches beyond `FUSED_DECODE_OTHER_GROUP_ROWS` rows dequantize each layer, as its CUDA
/// stage does, and the prediction pays for that; the same profile marked 8.0 reads the codes
/// straight. At 4 rows both read them straight.
#[test]
fn a_gpu_without_tensor_cores_fuses_only_a_few_rows() {
    let mut hw = profile("t4-16gb");
    assert_eq!(hw.gpu.as_ref().unwrap().compute_capability.as_deref(), Some("7.5"));
    let spec = spec_by_name("opt-6.7b").unwrap();
    let mut p = s4();
    p.compress_weight.enabled = true;
    p.num_gpu_batches = 1;
    let decode = |hw: &HardwareProfile, rows: u32| {
        let p = flexgen_policy::Policy { gpu_batch_size: rows, ..p.clone() };
        flexgen_planner::predict(&spec, hw, &PAPER, &p, WHOLE).unwrap().decode_s
    };
    let (t4_16, t4_4) = (decode(&hw, 16), decode(&hw, 4));
    hw.gpu.as_mut().unwrap().compute_capability = Some("8.0".into());
    let (tc_16, tc_4) = (decode(&hw, 16), decode(&hw, 4));
    assert!(t4_16 > 1.2 * tc_16, "16 rows: {t4_16:.3} s expanding against {tc_16:.3} s fused");
    assert!((t4_4 - tc_4).abs() <= 1e-9 * tc_4, "4 rows: {t4_4} against {tc_4}");
    p.gpu_batch_size = 16;
    assert!(p.fuses_decode() && !p.fuses_decode_on(false));
}

/// `--explain`'s larger blocks: one more micro-batch and the next micro-batch size, with the plan's
/// other choices. Each is predicted slower than the plan or refused with the tier it overfills;
/// on the T4 profile OPT-30B's next blocks need more CPU memory than the host has.
#[test]
fn the_next_larger_blocks_are_slower_or_do_not_fit() {
    let hw = profile("t4-16gb");
    let spec = spec_by_name("opt-30b").unwrap();
    let opts = PlanOptions::default();
    let plan = plan(&spec, &hw, &PAPER, &opts).unwrap();
    let best = &plan.candidates[0];
    let larger = flexgen_planner::larger_blocks(&spec, &hw, &PAPER, &opts, &best.choice).unwrap();
    let (b, k) = (best.choice.gpu_batch_size, best.choice.num_gpu_batches);
    assert_eq!(larger.len(), 2, "one more micro-batch and the next size");
    assert!(larger[0].gpu_batch_size == b && larger[0].num_gpu_batches > k);
    assert!(larger[1].gpu_batch_size > b && larger[1].num_gpu_batches == k);
    for l in &larger {
        match &l.outcome {
            Ok(c) => assert!(c.tokens_per_s <= best.tokens_per_s, "{l:?}"),
            Err(why) => assert!(why.contains("CPU needs"), "{why}"),
        }
    }
    assert!(larger.iter().any(|l| l.outcome.is_err()), "{larger:?}");
    // A fixed micro-batch count leaves only the larger micro-batch.
    let fixed = PlanOptions { num_gpu_batches: Some(k), ..PlanOptions::default() };
    let only = flexgen_planner::larger_blocks(&spec, &hw, &PAPER, &fixed, &best.choice).unwrap();
    assert_eq!(only.len(), 1);
    assert_eq!(only[0].num_gpu_batches, k);
}
