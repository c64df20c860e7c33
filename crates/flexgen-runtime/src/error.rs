/// Errors from running a generation.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A request cannot be run as given (too long, empty, needs a tokenizer, ...).
    #[error("request {index}: {message}")]
    Request { index: usize, message: String },
    /// The generation settings are inconsistent.
    #[error("generation settings: `{field}`: {message}")]
    Config { field: &'static str, message: String },
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

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
