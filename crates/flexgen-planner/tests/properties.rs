//! Property tests: for random machines, models and workloads, every plan the planner returns fits
//! every tier, its percentages are valid, and impossible inputs give an error, never a panic.

use flexgen_planner::{Error, PlanOptions, plan};
use flexgen_policy::{CpuProfile, DiskProfile, GpuProfile, HardwareProfile, ModelSpec, Workload};
use proptest::prelude::*;

fn machine(
    gpu_gib: u64,
    cpu_gib: u64,
    disk_gib: u64,
    pcie: f64,
    disk_rate: f64,
) -> HardwareProfile {
    HardwareProfile {
        version: 1,
        name: "random".into(),
        source: "proptest".into(),
        gpu: Some(GpuProfile {
            name: "gpu".into(),
            memory_bytes: gpu_gib << 30,
            pcie: None,
            h2d_pinned_bytes_per_s: pcie,
            d2h_pinned_bytes_per_s: pcie,
            h2d_pageable_bytes_per_s: pcie / 4.0,
            gemm_flops_per_s: 1e14,
            attention_flops_per_s: 5e13,
            hbm_bytes_per_s: 1e12,
            count: 1,
            h2d_pinned_all_bytes_per_s: None,
            p2p_bytes_per_s: None,
            compute_capability: None,
        }),
        cpu: CpuProfile {
            model: "cpu".into(),
            cores: 8,
            memory_bytes: cpu_gib << 30,
            gemm_flops_per_s: 1e12,
            attention_flops_per_s: 5e10,
            packed_attention_flops_per_s: None,
        },
        disk: DiskProfile {
            path: "/tmp/offload".into(),
            capacity_bytes: disk_gib << 30,
            read_bytes_per_s: disk_rate,
            write_bytes_per_s: disk_rate / 2.0,
        },
    }
}

fn model(layers: u32, hidden_64ths: u32) -> ModelSpec {
    let h = 64 * hidden_64ths;
    flexgen_model::opt_spec(
        &format!("rand-{layers}x{h}"),
        layers,
        h,
        hidden_64ths,
        4 * h,
        50272,
        2048,
    )
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn plans_fit_every_tier_or_fail_cleanly(
        gpu_gib in 1u64..160, cpu_gib in 1u64..512, disk_gib in 0u64..4000,
        pcie in 1e9f64..6e10, disk_rate in 1e8f64..5e9,
        layers in 1u32..100, h in 4u32..160,
        prompt in 1u32..1024, gen_len in 1u32..512, prompts in proptest::option::of(1u32..2000),
        compression in any::<bool>(),
    ) {
        let hw = machine(gpu_gib, cpu_gib, disk_gib, pcie, disk_rate);
        let spec = model(layers, h);
        let wl = Workload { prompt_len: prompt, gen_len, num_prompts: prompts };
        let opts = PlanOptions { allow_compression: compression, max_batch: 128, ..PlanOptions::default() };
        match plan(&spec, &hw, &wl, &opts) {
            Ok(p) => {
                p.policy.validate().unwrap();
                let pred = p.policy.prediction.clone().unwrap();
                prop_assert!(pred.throughput_tokens_per_s > 0.0);
                prop_assert!(pred.peak_gpu_bytes as f64 <= (gpu_gib << 30) as f64 * 0.9 * 1.0001);
                prop_assert!(pred.peak_cpu_bytes as f64 <= (cpu_gib << 30) as f64 * 0.85 * 1.0001);
                prop_assert!(pred.peak_disk_bytes as f64 <= (disk_gib << 30) as f64 * 0.95 * 1.0001 + 1.0);
                for s in [p.policy.placement.weights, p.policy.placement.kv_cache, p.policy.placement.activations] {
                    prop_assert!((s.gpu + s.cpu + s.disk - 100.0).abs() < 1e-6);
                    prop_assert!(s.gpu >= 0.0 && s.cpu >= 0.0 && s.disk >= 0.0);
                }
                if let Some(n) = prompts {
                    // No block larger than needed: the last micro-batch holds at least one prompt.
                    prop_assert!(p.policy.block_size() - (p.policy.gpu_batch_size as usize) < (n as usize));
                }
            }
            Err(Error::Infeasible { shortfalls, .. }) => {
                prop_assert!(!shortfalls.is_empty());
                // Each a real shortfall, or the marker of "no split fits all tiers at once".
                prop_assert!(shortfalls.iter().all(|s| s.needed_bytes > s.available_bytes
                    || (s.tier.is_none() && s.needed_bytes == 0.0)));
            }
            Err(Error::Invalid { field, .. }) => prop_assert_eq!(field, "workload"),
            Err(e) => prop_assert!(false, "unexpected {e}"),
        }
    }
}

#[test]
fn a_model_larger_than_all_tiers_names_the_shortfall() {
    let hw = machine(16, 32, 10, 1e10, 1e9);
    let err = plan(
        &model(96, 192),
        &hw,
        &Workload { prompt_len: 512, gen_len: 32, num_prompts: None },
        &PlanOptions::default(),
    )
    .unwrap_err();
    let msg = err.to_string();
    let Error::Infeasible { shortfalls, .. } = err else { panic!("{msg}") };
    assert!(shortfalls.iter().any(|s| s.tier.is_none()), "{msg}");
    assert!(msg.contains("GPU+CPU+disk together needs") && msg.contains("short by"), "{msg}");
}

#[test]
fn a_fixed_block_that_cannot_fit_is_named_with_its_shortfall() {
    // The smallest plan fits (one sequence), but 64×8 sequences' cache does not.
    let hw = machine(16, 32, 10, 1e10, 1e9);
    let spec = model(8, 64);
    let wl = Workload { prompt_len: 512, gen_len: 32, num_prompts: None };
    assert!(plan(&spec, &hw, &wl, &PlanOptions::default()).is_ok());
    let opts = PlanOptions {
        gpu_batch_size: Some(4096),
        num_gpu_batches: Some(64),
        allow_compression: false,
        ..PlanOptions::default()
    };
    let msg = plan(&spec, &hw, &wl, &opts).unwrap_err().to_string();
    assert!(msg.contains("with block 4096×64 and no compression"), "{msg}");
    assert!(msg.contains("together needs") && msg.contains("short by"), "{msg}");
    assert!(msg.contains("drop those options"), "{msg}");
}

#[test]
fn a_machine_without_gpu_is_refused_by_name() {
    let mut hw = machine(16, 32, 10, 1e10, 1e9);
    hw.gpu = None;
    let err = plan(
        &model(2, 4),
        &hw,
        &Workload { prompt_len: 8, gen_len: 8, num_prompts: None },
        &PlanOptions::default(),
    )
    .unwrap_err();
    assert!(matches!(err, Error::NoGpu { .. }));
}
