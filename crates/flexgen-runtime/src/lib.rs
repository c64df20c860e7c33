//! The generation engine: a [`Generator`] runs a model under a [`flexgen_policy::Policy`] on a
//! [`Device`] — requests cut into blocks of `gpu_batch_size × num_gpu_batches`, each block run
//! with the zig-zag schedule (every micro-batch through a layer before the next layer), a KV
//! cache per layer and micro-batch, left padding with the matching attention mask and positions,
//! sampling, EOS and stop strings per sequence, and streaming.
//!
//! One schedule (`schedule.rs`) drives a device stage (`stage.rs`): the host stage
//! (`host_stage.rs`, the tiered CPU executor: the "GPU" tier is host memory under a budget, the
//! disk tier real) or the CUDA stage (`gpu/`). Each places weights, KV cache and activations on
//! three tiers by the policy's shares and refuses a policy that does not fit before anything is
//! allocated.

mod disk;
mod error;
mod generate;
mod gpu;
mod host_stage;
pub mod memory;
mod ranks;
mod sampling;
mod schedule;
mod stage;
mod stream;
mod tiers;

pub use error::{Error, Result};
pub use generate::{
    Completion, Device, Event, FinishReason, GenerationConfig, Generator, HostTimes, Prompt,
    Request, RunStats, serve_rank,
};
pub use gpu::{CudaStage, GpuCapacity, LayerSource};
pub use ranks::{RankLink, RankSpec};
pub use sampling::{Sampling, argmax, choose};
pub use tiers::{Budgets, TierBytes, TierReport, Traffic, split_counts};
