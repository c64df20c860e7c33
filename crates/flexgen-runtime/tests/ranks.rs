//! A pipeline over processes (issue 18), its ranks here as threads joined over TCP on the
//! loopback: the greedy tokens equal one stage's for 2 and 3 ranks, with the policy's stages or
//! the layers split evenly; a rank that fails is named by rank 0, and no rank hangs.

use std::path::Path;

use flexgen_model::Model;
use flexgen_policy::{Placement, Policy, Stage, TierShares};
use flexgen_runtime::{Budgets, GenerationConfig, Generator, RankSpec, Request, serve_rank};

fn load(dir: &str) -> Model {
    Model::load(&Path::new(env!("CARGO_MANIFEST_DIR")).join("../flexgen-model").join(dir)).unwrap()
}

fn requests() -> Vec<Request> {
    ["In the beginning God created", "Jesus wept.", "And the earth was", "Amen", "Blessed are"]
        .iter()
        .map(|p| Request::text(*p))
        .collect()
}

fn config() -> GenerationConfig {
    GenerationConfig { max_new_tokens: 8, stop_on_eos: false, ..GenerationConfig::default() }
}

fn shape() -> Policy {
    Policy { gpu_batch_size: 2, num_gpu_batches: 3, ..Policy::default() }
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Rank 0's tokens (or error), and every other rank's result.
type Outcome = (Result<Vec<Vec<u32>>, String>, Vec<Result<(), String>>);

/// Runs `policy` over `world` ranks (threads).
fn over_ranks(model: &Model, policy: &Policy, world: u32) -> Outcome {
    let coordinator = free_port();
    std::thread::scope(|s| {
        let workers: Vec<_> = (1..world)
            .map(|rank| {
                let spec = RankSpec { rank, world_size: world, coordinator: coordinator.clone() };
                s.spawn(move || {
                    serve_rank(model, policy, Budgets::default(), &spec).map_err(|e| e.to_string())
                })
            })
            .collect();
        let spec = RankSpec { rank: 0, world_size: world, coordinator: coordinator.clone() };
        let tokens = Generator::rank0(model, policy.clone(), Budgets::default(), &spec)
            .and_then(|g| g.generate(&requests(), &config(), &mut |_| {}))
            .map(|(done, _)| done.into_iter().map(|c| c.tokens).collect())
            .map_err(|e| e.to_string());
        let rest = workers.into_iter().map(|w| w.join().unwrap()).collect();
        (tokens, rest)
    })
}

#[test]
fn ranks_give_one_stages_tokens() {
    for dir in ["models/opt-kjv", "test_data/tiny-random-llama"] {
        let model = load(dir);
        let want: Vec<Vec<u32>> = Generator::new(&model, shape())
            .unwrap()
            .generate(&requests(), &config(), &mut |_| {})
            .unwrap()
            .0
            .into_iter()
            .map(|c| c.tokens)
            .collect();
        let n = model.spec.num_layers;
        for world in [2, 3].into_iter().filter(|&w| w <= n) {
            // Layers split evenly.
            let (got, rest) = over_ranks(&model, &shape(), world);
            assert_eq!(got.unwrap(), want, "{dir}: {world} ranks");
            assert!(rest.iter().all(Result::is_ok), "{dir}: {rest:?}");
        }
        // The policy's stages, the second with its cache and activations on the CPU tier.
        let cpu = TierShares::from_gpu_cpu(0.0, 100.0);
        let mut p = shape();
        p.stages = vec![
            Stage { layers: [0, 1], placement: None, cpu_cache_compute: None },
            Stage {
                layers: [1, n],
                placement: Some(Placement { weights: cpu, kv_cache: cpu, activations: cpu }),
                cpu_cache_compute: None,
            },
        ];
        let (got, rest) = over_ranks(&model, &p, 2);
        assert_eq!(got.unwrap(), want, "{dir}: the policy's stages");
        assert!(rest.iter().all(Result::is_ok), "{dir}: {rest:?}");
    }
}

#[test]
fn a_failing_rank_is_named_and_no_rank_hangs() {
    let model = load("models/opt-kjv");
    let dir = tempfile::tempdir().unwrap();
    // Stage 1 puts its weights on disk in a folder that cannot be made (a file is in the way).
    let blocker = dir.path().join("not-a-folder");
    std::fs::write(&blocker, "").unwrap();
    let mut p = shape();
    let on_disk = Placement { weights: TierShares::from_gpu_cpu(0.0, 0.0), ..shape().placement };
    p.offload_dir = Some(blocker.join("offload"));
    p.stages = vec![
        Stage { layers: [0, 1], placement: None, cpu_cache_compute: None },
        Stage { layers: [1, 3], placement: Some(on_disk), cpu_cache_compute: None },
        Stage { layers: [3, 4], placement: None, cpu_cache_compute: None },
    ];
    let started = std::time::Instant::now();
    let (got, rest) = over_ranks(&model, &p, 3);
    let err = got.expect_err("a rank failed");
    assert!(err.contains("rank 1") && err.contains("not-a-folder"), "{err}");
    assert!(rest[0].is_err() && rest[1].is_err(), "every rank stops: {rest:?}");
    assert!(started.elapsed().as_secs() < 60, "stopped in {:?}", started.elapsed());
}
