/// Errors from running a generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request cannot be run as given (too long, empty, needs a tokenizer, ...).
    #[error("request {index}: {message}")]
    Request { index: usize, message: String },
    /// A setting (a policy key, a generation setting, the model, the offload folder) cannot be
    /// run as given; `field` names it.
    #[error("`{field}`: {message}")]
    Config { field: &'static str, message: String },
    /// A tier cannot hold what the policy puts there; nothing was allocated. The one capacity
    /// error of every device: the tier, both sizes, what the need is made of, and the policy
    /// fields to change.
    #[error(
        "the {tier} tier needs {} but has {}{detail}: short by {} ({} bytes); {fix}",
        size(*needed_bytes), size(*available_bytes), size(needed_bytes - available_bytes),
        needed_bytes - available_bytes
    )]
    Capacity {
        tier: flexgen_policy::Tier,
        needed_bytes: u64,
        available_bytes: u64,
        /// What the need is made of, or where the available figure comes from (may be empty;
        /// starts with a space when not).
        detail: String,
        fix: &'static str,
    },
    /// Reading or writing the offload directory failed.
    #[error("{}: {message}", path.display())]
    Io { path: std::path::PathBuf, message: String },
    /// A rank of a pipeline over processes failed or stopped; `message` says how.
    #[error("rank {rank}: {message}")]
    Rank { rank: u32, message: String },
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

/// Bytes in GiB (from 1 GiB) or MiB, one decimal.
fn size(b: u64) -> String {
    let gib = b as f64 / f64::from(1u32 << 30);
    if gib >= 1.0 { format!("{gib:.1} GiB") } else { format!("{:.1} MiB", gib * 1024.0) }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
