//! A pipeline over processes (issue 18), its ranks here as threads joined over TCP on the
//! loopback: the greedy tokens equal one stage's for 2 and 3 ranks, with the policy's stages or
//! the layers split evenly; a rank that fails is named by rank 0, and no rank hangs.

use flexgen_model::Model;
use flexgen_policy::{Placement, Policy, Stage, TierShares};
use flexgen_runtime::{Device, Generator, RankLink, RankSpec, serve_rank};

mod common;
use common::{config, load, requests};

fn shape() -> Policy {
    Policy { gpu_batch_size: 2, num_gpu_batches: 3, ..Policy::default() }
}

fn free_port() -> String {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().to_string()
}

/// Rank 0's tokens and the bytes it reports moved between tiers (CPU→GPU, GPU→CPU, disk read,
/// disk write), or its error; and every other rank's result.
type Outcome = (Result<(Vec<Vec<u32>>, [u64; 4]), String>, Vec<Result<(), String>>);

fn moved(t: &flexgen_runtime::RunStats) -> [u64; 4] {
    let t = t.tiers.traffic;
    [t.cpu_to_gpu, t.gpu_to_cpu, t.disk_read, t.disk_write]
}

fn spec(rank: u32, world_size: u32, coordinator: &str) -> RankSpec {
    RankSpec {
        rank,
        world_size,
        coordinator: coordinator.into(),
        link: RankLink::Auto,
        bound: None,
    }
}

/// Runs `policy` over `world` ranks (threads).
fn over_ranks(model: &Model, policy: &Policy, world: u32) -> Outcome {
    let coordinator = free_port();
    std::thread::scope(|s| {
        let workers: Vec<_> = (1..world)
            .map(|rank| {
                let spec = spec(rank, world, &coordinator);
                s.spawn(move || {
                    serve_rank(model, policy, Device::default(), &spec).map_err(|e| e.to_string())
                })
            })
            .collect();
        let spec = spec(0, world, &coordinator);
        let tokens = Generator::rank0(model, policy.clone(), Device::default(), &spec)
            .and_then(|g| g.generate(&requests(5), &config(), &mut |_| {}))
            .map(|(done, stats)| (done.into_iter().map(|c| c.tokens).collect(), moved(&stats)))
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
            .generate(&requests(5), &config(), &mut |_| {})
            .unwrap()
            .0
            .into_iter()
            .map(|c| c.tokens)
            .collect();
        let n = model.spec.num_layers;
        for world in [2, 3].into_iter().filter(|&w| w <= n) {
            // Layers split evenly.
            let (got, rest) = over_ranks(&model, &shape(), world);
            assert_eq!(got.unwrap().0, want, "{dir}: {world} ranks");
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
        let (tokens, over_ranks_moved) = got.unwrap();
        assert_eq!(tokens, want, "{dir}: the policy's stages");
        assert!(rest.iter().all(Result::is_ok), "{dir}: {rest:?}");
        // Rank 0 reports what rank 1's stage moved too: the bytes one process's pipeline of
        // the same stages moves.
        let (_, stats) = Generator::on(&model, p.clone(), flexgen_runtime::Device::default())
            .unwrap()
            .generate(&requests(5), &config(), &mut |_| {})
            .unwrap();
        assert!(moved(&stats)[0] > 0, "the second stage's weights cross: {:?}", moved(&stats));
        assert_eq!(over_ranks_moved, moved(&stats), "{dir}: rank 0's report of the traffic");
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
