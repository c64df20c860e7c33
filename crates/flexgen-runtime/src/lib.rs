//! The generation engine: a [`Generator`] runs a model under a [`flexgen_policy::Policy`] —
//! requests cut into blocks of `gpu_batch_size × num_gpu_batches`, each block run with the zig-zag
//! schedule (every micro-batch through a layer before the next layer), a KV cache per layer and
//! micro-batch, left padding with the matching attention mask and positions, and sampling.
//!
//! The executor places weights, KV cache and activations on three tiers by the policy's shares
//! (`tiers.rs`): on the CPU backend the compute device is the CPU, the "GPU" tier is host memory
//! under a budget (`Budgets::gpu_bytes`, `--gpu-mem-limit`), and the disk tier is real (direct I/O
//! in `offload_dir`). A policy whose tiers cannot hold it is refused before anything is allocated.
//! The CUDA backend is the next layer of this crate.

mod disk;
mod error;
mod generate;
mod gpu;
mod sampling;
mod stream;
mod tiers;

pub use error::{Error, Result};
pub use generate::{
    Completion, Event, FinishReason, GenerationConfig, Generator, HostTimes, Prompt, Request,
    RunStats,
};
pub use gpu::{GpuBytes, GpuCapacity, GpuGenerator, LayerSource, StepLogits};
pub use sampling::{Sampling, argmax, choose};
pub use tiers::{Budgets, TierBytes, TierReport, Traffic, split_counts};
