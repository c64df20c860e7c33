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
        let err = |message: String| Error::Tokenizer { path: path.to_path_buf(), message };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        // Not JSON at all: say so here (the tokenizers crate panics on some malformed parts).
        serde_json::from_str::<serde::de::IgnoredAny>(&text)
            .map_err(|e| err(format!("not valid JSON: {e}")))?;
        // Valid JSON whose parts have the wrong shape can still make the tokenizers crate panic
        // (a decoder that is not an object): such a file is refused like any other.
        let parsed = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            text.parse::<tokenizers::Tokenizer>()
        }));
        let inner = match parsed {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => return Err(err(e.to_string())),
            Err(_) => {
                return Err(err(
                    "the tokenizers library could not read it (a part has the wrong shape); \
                     is this a Hugging Face tokenizer.json?"
                        .into(),
                ));
            }
        };
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

#[cfg(test)]
mod tests {
    use super::*;

    /// Fuzzing found the tokenizers crate panicking on a decoder that is not an object; a file
    /// that is not JSON is named as such. Both are errors naming the file.
    #[test]
    fn a_malformed_tokenizer_json_is_an_error_not_a_panic() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokenizer.json");
        let good = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],
            "normalizer":null,"pre_tokenizer":{"type":"Whitespace"},"post_processor":null,
            "decoder":null,"model":{"type":"WordLevel","vocab":{"<unk>":0,"in":1},
            "unk_token":"<unk>"}}"#;
        std::fs::write(&path, good).unwrap();
        assert_eq!(Tokenizer::from_file(&path, None).unwrap().encode("in").unwrap(), [1]);
        for (bad, says) in [
            (good.replace("\"decoder\":null", "\"decoder\":5"), "did not match"),
            (good.replace("\"decoder\":null", "\"decoder\":lull"), "not valid JSON"),
        ] {
            std::fs::write(&path, bad).unwrap();
            let e = Tokenizer::from_file(&path, None).err().unwrap().to_string();
            assert!(e.contains("tokenizer.json") && e.contains(says), "{e}");
        }
    }
}
