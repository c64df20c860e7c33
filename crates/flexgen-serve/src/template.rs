//! Chat prompts: the model's own template (`chat_template` in its `tokenizer_config.json`,
//! rendered with minijinja as transformers renders it), or, for models without one (OPT), the
//! original chatbot's conversation format.

use std::path::Path;

use minijinja::{Environment, Error as JinjaError, ErrorKind, context};

/// How a conversation becomes a prompt.
#[derive(Debug, Clone)]
pub enum ChatTemplate {
    /// A Jinja template with the tokenizer's special tokens.
    Jinja { source: String, bos: String, eos: String },
    /// The original chatbot's: a preamble, `Human:` and `Assistant:` turns, one line each.
    Chatbot,
}

/// A special token as `tokenizer_config.json` spells it: a string or `{"content": ...}`.
fn token(v: Option<&serde_json::Value>) -> String {
    match v {
        Some(serde_json::Value::String(s)) => s.clone(),
        Some(o) => o.get("content").and_then(|c| c.as_str()).unwrap_or_default().to_string(),
        None => String::new(),
    }
}

impl ChatTemplate {
    /// The template of the model in `dir` (`tokenizer_config.json`'s `chat_template`, a string
    /// or a list of named templates of which `default` is taken), or the chatbot's when it has
    /// none. A file that is there but unreadable is an error naming it.
    pub fn of_model_dir(dir: Option<&Path>) -> anyhow::Result<Self> {
        let Some(path) = dir.map(|d| d.join("tokenizer_config.json")).filter(|p| p.exists()) else {
            return Ok(Self::Chatbot);
        };
        let text = std::fs::read_to_string(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)
            .map_err(|e| anyhow::anyhow!("{}: not JSON: {e}", path.display()))?;
        let source = match v.get("chat_template") {
            Some(serde_json::Value::String(s)) => s.clone(),
            Some(serde_json::Value::Array(list)) => list
                .iter()
                .find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default"))
                .or_else(|| list.first())
                .and_then(|t| t.get("template")?.as_str())
                .unwrap_or_default()
                .to_string(),
            _ => return Ok(Self::Chatbot),
        };
        let t =
            Self::Jinja { source, bos: token(v.get("bos_token")), eos: token(v.get("eos_token")) };
        // A template that does not compile is refused at start-up, not at the first request.
        t.render(&[("user".into(), "hello".into())])
            .map_err(|e| anyhow::anyhow!("{}: chat_template: {e}", path.display()))?;
        Ok(t)
    }

    /// The prompt for `turns` (role, content), ending where the assistant's reply starts.
    pub fn render(&self, turns: &[(String, String)]) -> Result<String, String> {
        match self {
            Self::Chatbot => {
                let mut p = flexgen_cli::chat::PREAMBLE.to_string();
                for (role, content) in turns {
                    let who = match role.as_str() {
                        "assistant" => "Assistant",
                        "system" => {
                            p.push_str(content.trim());
                            p.push('\n');
                            continue;
                        }
                        _ => "Human",
                    };
                    p.push_str(who);
                    p.push_str(": ");
                    p.push_str(content.trim());
                    p.push('\n');
                }
                p.push_str("Assistant:");
                Ok(p)
            }
            Self::Jinja { source, bos, eos } => {
                let mut env = Environment::new();
                env.add_function("raise_exception", |msg: String| -> Result<String, JinjaError> {
                    Err(JinjaError::new(ErrorKind::InvalidOperation, msg))
                });
                env.add_template("chat", source).map_err(|e| e.to_string())?;
                let messages: Vec<serde_json::Value> = turns
                    .iter()
                    .map(|(r, c)| serde_json::json!({"role": r, "content": c}))
                    .collect();
                env.get_template("chat")
                    .and_then(|t| {
                        t.render(context! {
                            messages => messages,
                            add_generation_prompt => true,
                            bos_token => bos,
                            eos_token => eos,
                        })
                    })
                    .map_err(|e| e.to_string())
            }
        }
    }

    /// Strings at which a reply ends (the next turn's start), besides the model's EOS token.
    pub fn turn_ends(&self) -> &'static [String] {
        static CHATBOT: std::sync::LazyLock<Vec<String>> =
            std::sync::LazyLock::new(|| vec!["\nHuman:".into(), "\n".into()]);
        match self {
            Self::Chatbot => &CHATBOT,
            Self::Jinja { .. } => &[],
        }
    }
}
