use std::path::PathBuf;

/// Errors from reading, parsing or validating a policy, profile or spec.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: std::io::Error },
    /// The TOML text is malformed or has unknown / mistyped keys (the message gives line and key).
    #[error("{0}")]
    Parse(String),
    /// A value is out of range or inconsistent with another one.
    #[error("`{field}` = {value}: {problem}; {fix}")]
    Invalid { field: String, value: String, problem: String, fix: String },
    /// Another error, in the file at `path`.
    #[error("{}: {source}", path.display())]
    WithPath { path: PathBuf, source: Box<Error> },
}

impl Error {
    pub(crate) fn invalid(
        field: impl Into<String>,
        value: impl std::fmt::Display,
        problem: impl Into<String>,
        fix: impl Into<String>,
    ) -> Self {
        Self::Invalid {
            field: field.into(),
            value: value.to_string(),
            problem: problem.into(),
            fix: fix.into(),
        }
    }

    /// Names the pipeline stage an invalid value belongs to: `stage[i].` before the keys a stage
    /// has (`placement…`, `cpu_cache_compute`); the others are the policy's own.
    #[must_use]
    pub fn in_stage(self, i: usize) -> Self {
        match self {
            Self::Invalid { field, value, problem, fix }
                if field.starts_with("placement") || field == "cpu_cache_compute" =>
            {
                Self::Invalid { field: format!("stage[{i}].{field}"), value, problem, fix }
            }
            other => other,
        }
    }

    /// Wraps the error with the file it came from.
    #[must_use]
    pub fn with_path(self, path: &std::path::Path) -> Self {
        match self {
            e @ (Self::Io { .. } | Self::WithPath { .. }) => e,
            e => Self::WithPath { path: path.to_path_buf(), source: Box::new(e) },
        }
    }

    /// The innermost error, without path wrappers.
    pub fn root(&self) -> &Error {
        match self {
            Self::WithPath { source, .. } => source.root(),
            e => e,
        }
    }
}

/// Result with this crate's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;
