/// Errors from running a generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request cannot be run as given (too long, empty, needs a tokenizer, ...).
    #[error("request {index}: {message}")]
    Request { index: usize, message: String },
    /// The generation settings are inconsistent.
    #[error("generation settings: `{field}`: {message}")]
    Config { field: &'static str, message: String },
    /// A tier cannot hold what the policy puts there; nothing was allocated.
    #[error(
        "the {tier} tier needs {:.1} MiB but has {:.1} MiB: short by {:.1} MiB ({} bytes); {fix}",
        mib(*needed_bytes), mib(*available_bytes), mib(needed_bytes - available_bytes), needed_bytes - available_bytes
    )]
    Capacity {
        tier: flexgen_policy::Tier,
        needed_bytes: u64,
        available_bytes: u64,
        fix: &'static str,
    },
    /// Reading or writing the offload directory failed.
    #[error("{}: {message}", path.display())]
    Io { path: std::path::PathBuf, message: String },
    /// The policy is invalid.
    #[error("policy: {0}")]
    Policy(#[from] flexgen_policy::Error),
    /// Loading or running the model failed.
    #[error(transparent)]
    Model(#[from] flexgen_model::Error),
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Tensor(#[from] flexgen_tensor::Error),
}

fn mib(b: u64) -> f64 {
    b as f64 / f64::from(1u32 << 20)
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
