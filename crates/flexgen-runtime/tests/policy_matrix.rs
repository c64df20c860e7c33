//! The executor's central invariant: offloading moves bytes, it never changes results. The tiny
//! model generates the same greedy tokens under every policy of a generated matrix (weights,
//! KV cache and activations on every tier and mixes of them, CPU attention on and off, several batch
//! splits, pinned and not), with the disk tier real. Policies that do not fit are refused before
//! anything is allocated, naming the tier and the shortfall.

use std::path::Path;

use flexgen_model::Model;
use flexgen_policy::{Placement, Policy, Tier, TierShares};
use flexgen_runtime::{Budgets, Error, GenerationConfig, Generator, Request};

fn tiny() -> Model {
    load("tiny-random-opt")
}

fn load(name: &str) -> Model {
    Model::load(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("../flexgen-model/test_data").join(name),
    )
    .unwrap()
}

fn requests() -> Vec<Request> {
    [
        "In the beginning God created",
        "And the earth was",
        "Jesus wept.",
        "The LORD is my shepherd; I shall not want.",
        "Amen",
        "And God said, Let there be light: and there was light.",
    ]
    .iter()
    .map(|p| Request::text(*p))
    .collect()
}

fn config() -> GenerationConfig {
    GenerationConfig { max_new_tokens: 6, stop_on_eos: false, ..GenerationConfig::default() }
}

fn shares(g: f64, c: f64) -> TierShares {
    TierShares::from_gpu_cpu(g, c)
}

/// At least 20 policies covering every tier for each kind of data.
fn matrix(offload: &Path) -> Vec<Policy> {
    let weights = [
        shares(100.0, 0.0),
        shares(0.0, 100.0),
        shares(0.0, 0.0),
        shares(20.0, 50.0),
        shares(50.0, 50.0),
        shares(0.0, 70.0),
    ];
    let caches = [
        shares(100.0, 0.0),
        shares(0.0, 100.0),
        shares(0.0, 0.0),
        shares(34.0, 33.0),
        shares(50.0, 0.0),
    ];
    let acts = [Tier::Gpu, Tier::Cpu, Tier::Disk];
    let splits = [(1, 6), (2, 3), (3, 2), (6, 1), (4, 2), (5, 1)];
    let mut out = Vec::new();
    for i in 0..30 {
        let (b, k) = splits[i % splits.len()];
        let mut p = Policy {
            gpu_batch_size: b,
            num_gpu_batches: k,
            cpu_cache_compute: i % 2 == 1,
            pin_weight: i % 3 != 0,
            placement: Placement {
                weights: weights[i % weights.len()],
                kv_cache: caches[(i / 2) % caches.len()],
                activations: TierShares::all_on(acts[i % acts.len()]),
            },
            offload_dir: Some(offload.to_path_buf()),
            ..Policy::default()
        };
        p.validate().unwrap();
        if i == 0 {
            p.offload_dir = None; // the all-GPU policy needs no disk
            p.placement = Placement::all_gpu();
        }
        out.push(p);
    }
    out
}

#[test]
fn every_policy_in_the_matrix_gives_the_same_greedy_tokens() {
    // OPT, OPT-350M's structure (projections around the tables, post-LayerNorm), and a
    // Llama-shaped model (grouped-query attention: its cache has half the rows).
    for name in ["tiny-random-opt", "tiny-random-opt-350m", "tiny-random-llama"] {
        matrix_agrees(&load(name));
    }
}

fn matrix_agrees(model: &Model) {
    let dir = tempfile::tempdir().unwrap();
    let reference = Generator::new(model, Policy::default())
        .unwrap()
        .generate(&requests(), &config(), &mut |_| {})
        .unwrap()
        .0;
    let policies = matrix(dir.path());
    assert!(policies.len() >= 20);
    let mut disk_used = 0;
    for (i, p) in policies.iter().enumerate() {
        let generator = Generator::new(model, p.clone()).unwrap();
        let (out, stats) = generator.generate(&requests(), &config(), &mut |_| {}).unwrap();
        for (r, (a, b)) in out.iter().zip(&reference).enumerate() {
            assert_eq!(
                a.tokens,
                b.tokens,
                "{}: policy {i} ({:?}, {}x{}, cpu attention {}), request {r}",
                model.spec.name,
                p.placement.to_percent(),
                p.gpu_batch_size,
                p.num_gpu_batches,
                p.cpu_cache_compute
            );
        }
        let on_disk = p.placement.weights.disk > 0.0
            || p.placement.kv_cache.disk > 0.0
            || p.placement.activations.disk > 0.0;
        let t = stats.tiers.traffic;
        assert_eq!(
            on_disk,
            t.disk_read > 0,
            "policy {i}: disk placement and disk reads disagree: {t:?}"
        );
        if p.placement.weights.disk > 0.0 {
            assert!(stats.tiers.required.disk > 0 && stats.direct_io.is_some());
        }
        if p.placement == Placement::all_gpu() {
            assert_eq!((t.cpu_to_gpu, t.gpu_to_cpu), (0, 0), "all on the GPU moves nothing");
        }
        disk_used += usize::from(on_disk);
        drop(generator);
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "policy {i} left files in the offload dir"
        );
    }
    assert!(disk_used >= 10, "the matrix must exercise the disk tier");
}

#[test]
fn cpu_attention_keeps_the_cache_off_pcie() {
    let model = tiny();
    let run = |cpu_cache_compute| {
        let p = Policy {
            cpu_cache_compute,
            placement: Placement::from_percent([100.0, 0.0, 0.0, 100.0, 100.0, 0.0]).unwrap(),
            gpu_batch_size: 3,
            num_gpu_batches: 2,
            ..Policy::default()
        };
        Generator::new(&model, p).unwrap().generate(&requests(), &config(), &mut |_| {}).unwrap()
    };
    let (a, sa) = run(false);
    let (b, sb) = run(true);
    assert_eq!(
        a.iter().map(|c| &c.tokens).collect::<Vec<_>>(),
        b.iter().map(|c| &c.tokens).collect::<Vec<_>>()
    );
    // Without CPU attention the whole cache comes up every step; with it, nothing of the cache does.
    assert!(sa.tiers.traffic.cpu_to_gpu > 0);
    assert_eq!(sb.tiers.traffic.cpu_to_gpu, 0);
}

#[test]
fn a_policy_that_does_not_fit_is_refused_before_allocating() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    // All weights on the "GPU" with a budget far below their size.
    let p = Policy { offload_dir: Some(dir.path().to_path_buf()), ..Policy::default() };
    let err = Generator::with_budgets(
        &model,
        p,
        Budgets { gpu_bytes: Some(100_000), ..Budgets::default() },
    )
    .err()
    .unwrap();
    let Error::Capacity { tier, needed_bytes, available_bytes, .. } = &err else { panic!("{err}") };
    assert_eq!((*tier, *available_bytes), (Tier::Gpu, 100_000));
    assert!(*needed_bytes > 1_000_000, "{err}");
    assert!(err.to_string().contains("short by"), "{err}");
    // Weights fit, but a large block's KV cache on the CPU does not.
    let p = Policy {
        placement: Placement::from_percent([100.0, 0.0, 0.0, 100.0, 100.0, 0.0]).unwrap(),
        gpu_batch_size: 6,
        offload_dir: Some(dir.path().to_path_buf()),
        ..Policy::default()
    };
    let g = Generator::with_budgets(
        &model,
        p,
        Budgets { cpu_bytes: Some(10_000), ..Budgets::default() },
    )
    .unwrap();
    let err = g.generate(&requests(), &config(), &mut |_| {}).err().unwrap();
    assert!(matches!(err, Error::Capacity { tier: Tier::Cpu, .. }), "{err}");
    assert_eq!(
        std::fs::read_dir(dir.path()).unwrap().count(),
        0,
        "nothing may be allocated on refusal"
    );
}

fn compressed(mut p: Policy, weights: bool, cache: bool) -> Policy {
    p.compress_weight.enabled = weights;
    p.compress_cache.enabled = cache;
    p
}

#[test]
fn compressed_weights_and_cache_give_the_same_tokens_under_every_placement() {
    for name in ["tiny-random-opt", "tiny-random-llama"] {
        compressed_placements_agree(&load(name));
    }
}

fn compressed_placements_agree(model: &Model) {
    let dir = tempfile::tempdir().unwrap();
    let run = |p: Policy| {
        Generator::new(model, p).unwrap().generate(&requests(), &config(), &mut |_| {}).unwrap()
    };
    let reference = run(compressed(Policy { gpu_batch_size: 6, ..Policy::default() }, true, true));
    let placements = [
        [0.0, 100.0, 0.0, 100.0, 100.0, 0.0],
        [20.0, 50.0, 34.0, 33.0, 0.0, 100.0],
        [0.0, 0.0, 0.0, 0.0, 100.0, 0.0],
        [50.0, 50.0, 50.0, 0.0, 0.0, 0.0],
    ];
    for (i, pct) in placements.iter().enumerate() {
        let (b, k) = [(1, 6), (2, 3), (3, 2), (6, 1)][i];
        let p = compressed(
            Policy {
                placement: Placement::from_percent(*pct).unwrap(),
                gpu_batch_size: b,
                num_gpu_batches: k,
                cpu_cache_compute: i % 2 == 0,
                offload_dir: Some(dir.path().to_path_buf()),
                ..Policy::default()
            },
            true,
            true,
        );
        let (out, stats) = run(p);
        for (r, (a, b)) in out.iter().zip(&reference.0).enumerate() {
            assert_eq!(a.tokens, b.tokens, "{}: placement {pct:?}, request {r}", model.spec.name);
        }
        if pct[1] + pct[0] < 100.0 {
            assert!(stats.tiers.traffic.disk_read > 0, "{pct:?} reads packed bytes from disk");
        }
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "scratch files removed");
}

#[test]
fn compressed_weights_cross_in_packed_bytes() {
    let model = tiny();
    let on_cpu = Placement::from_percent([0.0, 100.0, 100.0, 0.0, 100.0, 0.0]).unwrap();
    let run = |weights: bool| {
        let p = compressed(Policy { placement: on_cpu, ..Policy::default() }, weights, false);
        let (_, stats) = Generator::new(&model, p)
            .unwrap()
            .generate(&requests(), &config(), &mut |_| {})
            .unwrap();
        (stats.tiers.traffic.cpu_to_gpu, stats.tiers.required.cpu)
    };
    let (plain_moved, plain_held) = run(false);
    let (packed_moved, packed_held) = run(true);
    // 4-bit codes plus an fp16 pair per 64 values, against f32: about 7× fewer bytes for the
    // matrices; the vectors stay f32.
    assert!(packed_moved * 5 < plain_moved, "{packed_moved} vs {plain_moved}");
    assert!(packed_held * 5 < plain_held, "{packed_held} vs {plain_held}");
}
