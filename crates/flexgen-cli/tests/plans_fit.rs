//! Every policy `flexgen-plan` writes must pass the CUDA stage's memory checks, GPU and CPU, as the
//! one memory plan (`flexgen_runtime::memory::plan`) computes them: the planner's memory terms and
//! the runtime's plan are two computations of one thing, and a
//! plan the runtime refuses is a planner bug (session 5: the planner wrote a 48×8 plan for 16 GiB
//! that the executor, needing 16.4 GiB, refused).

use std::path::Path;

use flexgen_planner::{PlanOptions, plan};
use flexgen_policy::{HardwareProfile, Workload};
use flexgen_runtime::memory::{self, Capacity, Compute};

const GIB: u64 = 1 << 30;

fn profile(name: &str) -> HardwareProfile {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies/hardware");
    HardwareProfile::from_toml_file(&root.join(name)).expect("a committed profile")
}

#[test]
fn every_planned_policy_fits_the_cuda_executors_memory_plans() {
    let machines = [
        ("h200.toml", Some(16 * GIB)),
        ("h200.toml", Some(24 * GIB)),
        ("h200.toml", None),
        ("t4-16gb.toml", None),
        ("rtx3090.toml", None),
    ];
    let blocks: [(Option<u32>, Option<u32>); 4] =
        [(None, None), (Some(48), Some(8)), (Some(8), Some(48)), (Some(12), Some(6))];
    let (mut checked, mut failures) = (0, Vec::new());
    for model in ["opt-6.7b", "opt-30b", "opt-175b"] {
        let spec = flexgen_model::spec_by_name(model).expect("a catalog model");
        for (hw_name, limit) in machines {
            let hw = profile(hw_name);
            for (prompt_len, gen_len) in [(512, 32), (256, 128)] {
                let workload = Workload { prompt_len, gen_len, num_prompts: None };
                for allow_compression in [false, true] {
                    for (gpu_batch_size, num_gpu_batches) in blocks {
                        let opts = PlanOptions {
                            gpu_mem_limit_bytes: limit,
                            allow_compression,
                            gpu_batch_size,
                            num_gpu_batches,
                            keep: 1,
                            ..PlanOptions::default()
                        };
                        let Ok(p) = plan(&spec, &hw, &workload, &opts) else { continue };
                        let memory = limit.unwrap_or(hw.gpu.as_ref().expect("a GPU").memory_bytes);
                        let capacity = Capacity {
                            max_prompt: prompt_len as usize,
                            max_new: gen_len as usize,
                            sequences: None,
                        };
                        let layers = 0..spec.num_layers;
                        let runtime =
                            memory::plan(&spec, &p.policy, capacity, layers, Compute::Cuda)
                                .expect("the executor runs every planned policy");
                        let needs = runtime.gpu;
                        checked += 1;
                        // The executor wants MemAvailable less 2 GiB; the profile's CPU memory is
                        // what was available when it was measured.
                        let host = runtime.cpu.total();
                        let host_memory = hw.cpu.memory_bytes.saturating_sub(2 * GIB);
                        if host > host_memory {
                            failures.push(format!(
                                "{model} on {hw_name} ({limit:?}) {prompt_len}+{gen_len} \
                                 compression {allow_compression} {}x{}: runtime needs {:.2} GiB \
                                 of CPU memory, planner said {:.2} GiB, available {:.2} GiB",
                                p.policy.gpu_batch_size,
                                p.policy.num_gpu_batches,
                                host as f64 / GIB as f64,
                                p.candidates[0].peak_cpu_bytes / GIB as f64,
                                host_memory as f64 / GIB as f64,
                            ));
                        }
                        if needs.total() > memory {
                            failures.push(format!(
                                "{model} on {hw_name} ({limit:?}) {prompt_len}+{gen_len} \
                                 compression {allow_compression} {}x{}: runtime needs {:.2} GiB \
                                 ({needs:?}), planner said {:.2} GiB, memory {:.2} GiB",
                                p.policy.gpu_batch_size,
                                p.policy.num_gpu_batches,
                                needs.total() as f64 / GIB as f64,
                                p.candidates[0].peak_gpu_bytes / GIB as f64,
                                memory as f64 / GIB as f64,
                            ));
                        }
                    }
                }
            }
        }
    }
    assert!(checked >= 100, "only {checked} plans were checked");
    assert!(
        failures.is_empty(),
        "{} of {checked} plans do not fit:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

/// Every stage of a planned pipeline fits its GPU, and the stages together fit the host, by the
/// runtime's memory plan of the stage's layers under its own placement with the whole block.
#[test]
fn every_planned_pipeline_stage_fits_its_gpu_and_the_stages_the_host() {
    let (mut checked, mut failures) = (0, Vec::new());
    for model in ["opt-30b", "opt-175b", "llama-3.1-70b"] {
        let spec = flexgen_model::spec_by_name(model).expect("a catalog model");
        for limit in [16 * GIB, 24 * GIB, 80 * GIB] {
            let mut hw = profile("h200.toml");
            hw.gpu.as_mut().expect("a GPU").count = 4;
            for stages in [2, 4] {
                for allow_compression in [false, true] {
                    let opts = PlanOptions {
                        gpu_mem_limit_bytes: Some(limit),
                        allow_compression,
                        keep: 1,
                        ..PlanOptions::default()
                    };
                    let workload = Workload { prompt_len: 512, gen_len: 32, num_prompts: None };
                    let Ok(p) =
                        flexgen_planner::plan_pipeline(&spec, &hw, &workload, &opts, stages)
                    else {
                        continue;
                    };
                    let capacity = Capacity { max_prompt: 512, max_new: 32, sequences: None };
                    let mut host = 0;
                    for (layers, policy) in p.policy.pipeline(spec.num_layers) {
                        let runtime =
                            memory::plan(&spec, &policy, capacity, layers.clone(), Compute::Cuda)
                                .expect("the executor plans every stage");
                        host += runtime.cpu.total();
                        checked += 1;
                        if runtime.gpu.total() > limit {
                            failures.push(format!(
                                "{model} {stages} stages ({limit} B, compression \
                                 {allow_compression}): stage {layers:?} needs {} B of GPU memory",
                                runtime.gpu.total()
                            ));
                        }
                    }
                    if host > hw.cpu.memory_bytes.saturating_sub(2 * GIB) {
                        failures.push(format!(
                            "{model} {stages} stages ({limit} B, compression {allow_compression}): \
                             the stages need {host} B of host memory"
                        ));
                    }
                }
            }
        }
    }
    assert!(checked >= 40, "only {checked} stages were checked");
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
