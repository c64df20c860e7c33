//! Pipeline stages in one process (issue 18): the model split into 1, 2 or 3 contiguous layer
//! ranges, each stage placing its weights, KV cache and activations by its own policy, hidden
//! states crossing an in-process link. The greedy tokens equal one stage's under every split and
//! mix of placements, on the bundled 4-layer OPT and the tiny Llama (grouped-query attention).

use std::ops::Range;
use std::path::Path;

use flexgen_policy::{Placement, Policy, Tier, TierShares};
use flexgen_runtime::{Budgets, Error, Generator};

mod common;
use common::{config, load, requests};

fn shape() -> Policy {
    Policy { gpu_batch_size: 2, num_gpu_batches: 2, ..Policy::default() }
}

/// Placements a stage may have: all on the GPU tier; weights on the CPU and disk; the cache split
/// over the three tiers with activations on the CPU; weights and cache half off, activations on
/// disk.
fn placements(offload: &Path) -> Vec<Policy> {
    let s = TierShares::from_gpu_cpu;
    [
        (s(100.0, 0.0), s(100.0, 0.0), Tier::Gpu),
        (s(0.0, 60.0), s(100.0, 0.0), Tier::Gpu),
        (s(100.0, 0.0), s(34.0, 33.0), Tier::Cpu),
        (s(50.0, 25.0), s(50.0, 50.0), Tier::Disk),
    ]
    .into_iter()
    .map(|(weights, kv_cache, act)| Policy {
        placement: Placement { weights, kv_cache, activations: TierShares::all_on(act) },
        offload_dir: Some(offload.to_path_buf()),
        ..shape()
    })
    .collect()
}

/// The greedy tokens, and the bytes read from disk.
fn tokens(g: &Generator<'_>) -> (Vec<Vec<u32>>, u64) {
    let (done, stats) = g.generate(&requests(4), &config(), &mut |_| {}).unwrap();
    (done.into_iter().map(|c| c.tokens).collect(), stats.tiers.traffic.disk_read)
}

#[test]
fn stages_give_one_stages_tokens_under_every_split_and_placement() {
    let dir = tempfile::tempdir().unwrap();
    let places = placements(dir.path());
    for (model_dir, splits) in [
        (
            "models/opt-kjv",
            vec![vec![0..4], vec![0..2, 2..4], vec![0..1, 1..3, 3..4], vec![0..3, 3..4]],
        ),
        ("test_data/tiny-random-llama", vec![vec![0..2], vec![0..1, 1..2]]),
    ] {
        let model = load(model_dir);
        let (want, _) = tokens(&Generator::new(&model, shape()).unwrap());
        let mut runs = 0;
        for split in &splits {
            for first in 0..places.len() {
                // Stage i takes placement first + i: neighbouring stages differ.
                let stages: Vec<(Range<u32>, Policy)> = split
                    .iter()
                    .enumerate()
                    .map(|(i, r)| (r.clone(), places[(first + i) % places.len()].clone()))
                    .collect();
                let g =
                    Generator::host_pipeline(&model, shape(), &stages, Budgets::default()).unwrap();
                let (got, disk_read) = tokens(&g);
                assert_eq!(got, want, "{model_dir}: stages {stages:?}");
                // Each stage's own placement is in force: what it puts on disk is read back.
                let on_disk = stages.iter().any(|(_, p)| {
                    let pl = &p.placement;
                    pl.weights.disk + pl.kv_cache.disk + pl.activations.disk > 0.0
                });
                assert_eq!(disk_read > 0, on_disk, "{model_dir}: stages {stages:?}");
                runs += 1;
            }
        }
        assert!(runs >= 8, "{model_dir}: {runs} pipelines");
    }
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0, "no offload file left");
}

#[test]
fn stages_must_cover_the_layers_in_order() {
    let model = load("test_data/tiny-random-opt");
    let p = shape();
    for bad in [
        vec![(0..1, p.clone())],
        vec![(0..1, p.clone()), (0..2, p.clone())],
        vec![(1..2, p.clone()), (0..1, p.clone())],
        vec![(0..0, p.clone()), (0..2, p.clone())],
        vec![(0..3, p.clone())],
    ] {
        let Err(e) = Generator::host_pipeline(&model, p.clone(), &bad, Budgets::default()) else {
            panic!("{bad:?} accepted")
        };
        assert!(matches!(&e, Error::Config { field: "stage", .. }), "{bad:?}: {e}");
    }
}

/// A stage that fails in the middle of a block (its weights' disk file cut short under it) stops
/// the pipeline with its own error, naming the file; the other stages' threads end (no hang) and
/// nothing is reported as generated.
#[cfg(target_os = "linux")]
#[test]
fn a_failing_stage_stops_the_pipeline_with_its_error() {
    let model = load("models/opt-kjv");
    let dir = tempfile::tempdir().unwrap();
    let on_disk = Policy {
        placement: Placement { weights: TierShares::from_gpu_cpu(0.0, 0.0), ..shape().placement },
        offload_dir: Some(dir.path().to_path_buf()),
        ..shape()
    };
    for failing in [0, 1, 2] {
        let stages: Vec<(Range<u32>, Policy)> = [0..1, 1..3, 3..4]
            .into_iter()
            .enumerate()
            .map(|(i, r)| (r, if i == failing { on_disk.clone() } else { shape() }))
            .collect();
        let g = Generator::host_pipeline(&model, shape(), &stages, Budgets::default()).unwrap();
        // The offload files are unlinked once open: reach them through this process's fds.
        let cut = cut_open_files_under(dir.path());
        assert!(!cut.is_empty(), "stage {failing} put its weights on disk");
        let Err(e) = g.generate(&requests(4), &config(), &mut |_| {}) else {
            panic!("stage {failing}: a cut weight file went unnoticed")
        };
        let msg = e.to_string();
        assert!(cut.iter().any(|f| msg.contains(f.as_str())), "stage {failing}: {msg}");
    }
}

/// Truncates every file this process holds open under `dir` (unlinked or not) to one byte;
/// their paths as the fd links name them.
#[cfg(target_os = "linux")]
fn cut_open_files_under(dir: &Path) -> Vec<String> {
    let mut cut = Vec::new();
    for fd in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(fd.path()) else { continue };
        let name = target.to_string_lossy().into_owned();
        if !target.starts_with(dir) {
            continue;
        }
        let f = std::fs::OpenOptions::new().write(true).open(fd.path()).unwrap();
        f.set_len(1).unwrap();
        cut.push(name.trim_end_matches(" (deleted)").to_string());
    }
    cut
}
