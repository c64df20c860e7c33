use std::path::PathBuf;

/// Errors from finding, reading and checking a model.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The path is not a model directory, a Hugging Face cache entry or a snapshot.
    #[error("{}: not a model directory ({hint})", path.display())]
    NotAModel { path: PathBuf, hint: String },
    /// `config.json` is malformed or a field has a value we cannot use.
    #[error("{}: `{field}`: {message}", path.display())]
    Config { path: PathBuf, field: String, message: String },
    /// A model or variant this build does not run.
    #[error("{what}")]
    Unsupported { what: String },
    /// `--model NAME` names no known spec.
    #[error("unknown model `{name}`; known: {known}")]
    UnknownModel { name: String, known: String },
    /// A safetensors file or its index is malformed.
    #[error("{}: {message}", path.display())]
    Safetensors { path: PathBuf, message: String },
    /// A tensor the model needs is in none of the weight files.
    #[error("tensor `{name}` is missing from {searched}")]
    MissingTensor { name: String, searched: String },
    /// A tensor has the wrong shape.
    #[error("tensor `{name}` in {}: shape {found:?}, expected {expected:?} (from config.json)", path.display())]
    Shape { name: String, path: PathBuf, expected: Vec<usize>, found: Vec<usize> },
    /// A tensor has a dtype we do not load.
    #[error("tensor `{name}` in {}: dtype {dtype} is not supported (use F32, F16 or BF16)", path.display())]
    Dtype { name: String, path: PathBuf, dtype: String },
    /// `tokenizer.json` could not be loaded or used.
    #[error("{}: {message}", path.display())]
    Tokenizer { path: PathBuf, message: String },
    /// A tensor operation failed.
    #[error("tensor operation: {0}")]
    Tensor(#[from] flexgen_tensor::Error),
    /// A GPU operation failed.
    #[error("GPU: {0}")]
    Gpu(#[from] flexgen_tensor::cuda::CudaError),
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
