//! `tokenizer.json` through the `tokenizers` crate.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// A loaded tokenizer.
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    path: PathBuf,
    /// Prepended by [`Tokenizer::encode`] when the tokenizer's own post-processor does not add it
    /// (OPT always starts a prompt with `</s>`).
    bos: Option<u32>,
}

impl Tokenizer {
    /// Loads `tokenizer.json`.
    pub fn from_file(path: &Path, bos: Option<u32>) -> Result<Self> {
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| Error::Tokenizer { path: path.to_path_buf(), message: e.to_string() })?;
        Ok(Self { inner, path: path.to_path_buf(), bos })
    }

    /// Loads `tokenizer.json` for a model of `spec`: BOS from the spec, and a vocabulary that
    /// must fit the model's (every id it produces indexes the embedding).
    pub fn for_spec(path: &Path, spec: &crate::ModelSpec) -> Result<Self> {
        let t = Self::from_file(path, spec.bos_token_id)?;
        if t.vocab_size() > spec.vocab_size as usize {
            return Err(Error::Tokenizer {
                path: path.to_path_buf(),
                message: format!(
                    "{} tokens, more than the model's vocab_size {} ({})",
                    t.vocab_size(),
                    spec.vocab_size,
                    spec.name
                ),
            });
        }
        Ok(t)
    }

    /// Token ids of `text`, starting with BOS.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self.inner.encode(text, true).map_err(|e| self.err(e))?;
        let mut ids = enc.get_ids().to_vec();
        if let Some(bos) = self.bos
            && ids.first() != Some(&bos)
        {
            ids.insert(0, bos);
        }
        Ok(ids)
    }

    /// Text of `ids`, special tokens left out.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner.decode(ids, true).map_err(|e| self.err(e))
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    fn err(&self, e: impl std::fmt::Display) -> Error {
        Error::Tokenizer { path: self.path.clone(), message: e.to_string() }
    }
}
