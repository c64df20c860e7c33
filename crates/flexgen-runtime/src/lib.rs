//! The generation engine: a [`Generator`] runs a model under a [`flexgen_policy::Policy`] —
//! requests cut into blocks of `gpu_batch_size × num_gpu_batches`, each block run with the zig-zag
//! schedule (every micro-batch through a layer before the next layer), a KV cache per layer and
//! micro-batch, left padding with the matching attention mask and positions, and sampling.
//!
//! This build executes on the CPU (candle-core); every tensor lives in host memory. The policy's
//! placement percentages are validated and reported but not yet executed: the tiered executor
//! (GPU/CPU/disk) and the CUDA backend are the next layer of this crate.

mod error;
mod generate;
mod sampling;
mod stream;

pub use error::{Error, Result};
pub use generate::{
    Completion, Event, FinishReason, GenerationConfig, Generator, Prompt, Request, RunStats,
};
pub use sampling::{Sampling, argmax, choose};
