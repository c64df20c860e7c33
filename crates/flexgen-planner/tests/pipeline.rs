//! Pipeline stages in the planner (issue 18): layers split by bytes, each stage planned on its
//! share of the host, the stages' times combined as the runtime's pipeline runs them.

use flexgen_planner::{Error, PlanOptions, plan, plan_pipeline, split_layers};
use flexgen_policy::{HardwareProfile, Workload};
use proptest::prelude::*;

fn h200(count: u32) -> HardwareProfile {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies/hardware/h200.toml");
    let mut hw = HardwareProfile::from_toml_file(std::path::Path::new(path)).unwrap();
    hw.gpu.as_mut().unwrap().count = count;
    hw
}

fn workload() -> Workload {
    Workload { prompt_len: 512, gen_len: 32, num_prompts: None }
}

proptest! {
    #[test]
    fn a_split_covers_every_layer_once_in_order(layers in 1u32..130, hidden in 1u32..200, s in 1u32..20) {
        let h = 64 * hidden;
        let spec = flexgen_model::opt_spec("r", layers, h, hidden, 4 * h, 50272, 2048);
        let stages = s.min(layers);
        let split = split_layers(&spec, stages);
        prop_assert_eq!(split.len(), stages as usize);
        prop_assert_eq!(split[0].start, 0);
        prop_assert_eq!(split.last().unwrap().end, layers);
        for w in split.windows(2) {
            prop_assert_eq!(w[0].end, w[1].start);
        }
        prop_assert!(split.iter().all(|r| r.end > r.start));
    }
}

#[test]
fn a_split_balances_bytes_with_the_tables() {
    // OPT-175B: 96 layers of 1.8 GB; the tables are far smaller than a layer, so 24 each.
    let opt = flexgen_model::spec_by_name("opt-175b").unwrap();
    let split = split_layers(&opt, 4);
    assert!(split.iter().all(|r| (23..=25).contains(&(r.end - r.start))), "{split:?}");
    // A token table as large as about four layers (tied LM head): the first stage takes fewer.
    let spec = flexgen_model::opt_spec("wide-vocab", 16, 512, 8, 2048, 24_576, 2048);
    let split = split_layers(&spec, 2);
    assert_eq!(split, vec![0..6, 6..16]);
}

#[test]
fn four_stages_plan_each_stage_and_beat_one_gpu() {
    let spec = flexgen_model::spec_by_name("llama-3.1-70b").unwrap();
    let opts = PlanOptions { gpu_mem_limit_bytes: Some(24 << 30), ..PlanOptions::default() };
    let one = plan(&spec, &h200(4), &workload(), &opts).unwrap();
    let four = plan_pipeline(&spec, &h200(4), &workload(), &opts, 4).unwrap();
    let p = &four.policy;
    p.validate().unwrap();
    assert_eq!(p.stages.len(), 4);
    assert_eq!(p.pipeline(spec.num_layers).len(), 4);
    assert_eq!(p.stages[0].layers[0], 0);
    assert_eq!(p.stages[3].layers[1], spec.num_layers);
    assert_eq!(p.num_gpu_batches % 4, 0, "one group per stage");
    assert!(p.stages.iter().all(|s| s.placement.is_some() && s.cpu_cache_compute.is_some()));
    let pred = p.prediction.as_ref().unwrap();
    assert!(pred.binding.starts_with("stage "), "{}", pred.binding);
    let t1 = one.policy.prediction.as_ref().unwrap().throughput_tokens_per_s;
    assert!(pred.throughput_tokens_per_s > 1.5 * t1, "{} vs {t1}", pred.throughput_tokens_per_s);
    // Each GPU holds a quarter of the layers: within its cap.
    assert!(pred.peak_gpu_bytes <= 24 << 30, "{}", pred.peak_gpu_bytes);
    // One stage is the one-GPU plan.
    let single = plan_pipeline(&spec, &h200(4), &workload(), &opts, 1).unwrap();
    assert_eq!(single.policy, one.policy);
}

#[test]
fn more_stages_than_gpus_or_layers_are_refused_by_name() {
    let spec = flexgen_model::spec_by_name("opt-125m").unwrap();
    let opts = PlanOptions::default();
    let Err(Error::Invalid { field, message }) =
        plan_pipeline(&spec, &h200(1), &workload(), &opts, 2)
    else {
        panic!("two stages on one GPU planned")
    };
    assert_eq!(field, "stages");
    assert!(message.contains("gpu.count = 1"), "{message}");
    let Err(Error::Invalid { field, message }) =
        plan_pipeline(&spec, &h200(64), &workload(), &opts, 13)
    else {
        panic!("13 stages of 12 layers planned")
    };
    assert_eq!(field, "stages");
    assert!(message.contains("at least one layer"), "{message}");
}
