//! Finding a model's files: a plain Hugging Face model directory, a Hugging Face cache entry
//! (`models--org--name`, resolved through `refs/main`), or one of its snapshots.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// The files of one model.
#[derive(Debug, Clone)]
pub struct ModelFiles {
    pub dir: PathBuf,
    pub config: PathBuf,
    /// `model.safetensors`, or the shards listed by `model.safetensors.index.json`.
    pub weights: WeightFiles,
    pub tokenizer: Option<PathBuf>,
}

/// Where the weights are.
#[derive(Debug, Clone)]
pub enum WeightFiles {
    Single(PathBuf),
    /// The index file; shards are read from it.
    Sharded(PathBuf),
}

/// Resolves `path` to a model directory and lists its files.
pub fn resolve(path: &Path) -> Result<ModelFiles> {
    let dir = resolve_dir(path)?;
    let config = dir.join("config.json");
    let single = dir.join("model.safetensors");
    let index = dir.join("model.safetensors.index.json");
    let weights = if index.is_file() {
        WeightFiles::Sharded(index)
    } else if single.is_file() {
        WeightFiles::Single(single)
    } else {
        let has_bin = dir.join("pytorch_model.bin").exists()
            || dir.join("pytorch_model.bin.index.json").exists();
        return Err(Error::NotAModel {
            path: dir,
            hint: if has_bin {
                "it has PyTorch .bin weights only; convert them to safetensors (e.g. with \
                 transformers: model.save_pretrained(dir, safe_serialization=True))"
                    .into()
            } else {
                "no model.safetensors or model.safetensors.index.json".into()
            },
        });
    };
    let tokenizer = Some(dir.join("tokenizer.json")).filter(|p| p.is_file());
    Ok(ModelFiles { dir, config, weights, tokenizer })
}

fn resolve_dir(path: &Path) -> Result<PathBuf> {
    if !path.exists() {
        return Err(Error::NotAModel {
            path: path.to_path_buf(),
            hint: "no such file or directory".into(),
        });
    }
    if path.join("config.json").is_file() {
        return Ok(path.to_path_buf());
    }
    // A Hugging Face cache entry: models--org--name/{refs/main, snapshots/<rev>/...}.
    let snapshots = path.join("snapshots");
    if snapshots.is_dir() {
        let main = path.join("refs").join("main");
        if let Ok(rev) = std::fs::read_to_string(&main) {
            let snap = snapshots.join(rev.trim());
            if snap.join("config.json").is_file() {
                return Ok(snap);
            }
        }
        let io = |source| Error::Io { path: snapshots.clone(), source };
        let mut snaps: Vec<PathBuf> = std::fs::read_dir(&snapshots)
            .map_err(io)?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.join("config.json").is_file())
            .collect();
        snaps.sort();
        return match snaps.len() {
            1 => Ok(snaps.remove(0)),
            0 => Err(Error::NotAModel {
                path: path.to_path_buf(),
                hint: "a Hugging Face cache entry without a complete snapshot (no config.json)"
                    .into(),
            }),
            _ => Err(Error::NotAModel {
                path: path.to_path_buf(),
                hint: format!(
                    "several snapshots and no refs/main; pass one of them: {}",
                    snaps.iter().map(|p| p.display().to_string()).collect::<Vec<_>>().join(", ")
                ),
            }),
        };
    }
    Err(Error::NotAModel {
        path: path.to_path_buf(),
        hint: "no config.json here (expected a Hugging Face model directory or cache entry)".into(),
    })
}
