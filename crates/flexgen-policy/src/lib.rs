//! The file formats and the vocabulary shared by every flexgen tool: the execution [`Policy`] that
//! `flexgen-plan` writes and `flexgen-run` executes, the [`HardwareProfile`] that `flexgen-profile`
//! writes and the planner reads, and the [`ModelSpec`] / [`Workload`] that describe what runs.
//!
//! This crate is pure data: serde types, validation with errors that name the field and the fix,
//! and TOML reading/writing. It does no I/O beyond reading and writing those files.

mod error;
mod hardware;
mod policy;
mod spec;

pub use error::{Error, Result};
pub use hardware::{
    CpuProfile, DiskProfile, GpuProfile, HardwareProfile, MAX_GPUS, PROFILE_VERSION,
};
pub use policy::{
    Compression, EXPAND_SLICE_VALUES, FUSED_DECODE_OTHER_GROUP_ROWS, FUSED_DECODE_ROWS,
    POLICY_VERSION, PREFILL_SCORES_VALUES, Placement, Policy, Prediction, Stage, Tier, TierShares,
    check_stage_layers, expand_slice_outputs, micro_batch_scores_len, prefill_scores_len,
};
pub use spec::{Family, MlpKind, ModelSpec, NormKind, PositionKind, RopeScaling, Workload, bounds};

use std::path::Path;

/// Reads a TOML file and parses it with `parse`, attaching the path to any error.
pub(crate) fn read_toml_file<T>(path: &Path, parse: impl FnOnce(&str) -> Result<T>) -> Result<T> {
    let text = std::fs::read_to_string(path)
        .map_err(|source| Error::Io { path: path.to_path_buf(), source })?;
    parse(&text).map_err(|e| e.with_path(path))
}

/// Writes `text` to `path` atomically (temporary file in the same folder, then rename), so an
/// interrupted write never leaves a half-written policy or profile behind.
pub(crate) fn write_file_atomic(path: &Path, text: &str) -> Result<()> {
    let io = |source| Error::Io { path: path.to_path_buf(), source };
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().map_or_else(|| "out".into(), |n| n.to_string_lossy().into_owned());
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    std::fs::write(&tmp, text).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}
