//! `flexgen-run chat`: an interactive chat in the style of the original's chatbot app. A
//! conversation template (a preamble and one example exchange), the history of this session
//! appended turn by turn, the assistant's reply streamed token by token and ended at the next
//! line. The oldest turns are dropped when the prompt and the reply would not fit the model's
//! positions. `/reset` clears the history; end of input (Ctrl-D) leaves.

use std::io::{BufRead, Write};

use anyhow::Context;
use flexgen_runtime::{Event, GenerationConfig, Generator, Request};

/// The conversation's opening, as in the original chatbot.
pub const PREAMBLE: &str = "A chat between a curious human and a knowledgeable artificial \
intelligence assistant.\nHuman: Hello! What can you do?\nAssistant: As an AI assistant, I can \
answer questions and chat with you.\n";

/// Chat settings.
#[derive(Debug, Clone)]
pub struct ChatOptions {
    pub config: GenerationConfig,
}

/// Tokens a prompt of `text` takes (characters when the model has no tokenizer).
fn tokens_of(generator: &Generator<'_>, text: &str) -> usize {
    generator
        .model()
        .tokenizer
        .as_ref()
        .and_then(|t| t.encode(text).ok())
        .map_or(text.len(), |v| v.len())
}

/// Runs the chat over `input` and `out` until end of input.
pub fn run(
    generator: &Generator<'_>,
    options: &ChatOptions,
    input: &mut dyn BufRead,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let max_positions = generator.model().spec.max_positions as usize;
    let mut history: Vec<String> = Vec::new();
    let mut config = options.config.clone();
    config.stop = vec!["\nHuman:".into(), "\n".into()];
    writeln!(out, "flexgen chat: type a message, /reset to clear the history, Ctrl-D to leave.")?;
    loop {
        write!(out, "Human: ")?;
        out.flush()?;
        let mut line = String::new();
        if input.read_line(&mut line).context("reading the next message")? == 0 {
            writeln!(out)?;
            return Ok(());
        }
        let message = line.trim();
        if message.is_empty() {
            continue;
        }
        if message == "/reset" {
            history.clear();
            writeln!(out, "(history cleared)")?;
            continue;
        }
        history.push(format!("Human: {message}\n"));
        // Drop the oldest turns until the prompt and the reply fit the positions.
        let prompt = loop {
            let p = format!("{PREAMBLE}{}Assistant:", history.concat());
            if tokens_of(generator, &p) + config.max_new_tokens < max_positions
                || history.len() <= 1
            {
                break p;
            }
            history.remove(0);
        };
        write!(out, "Assistant:")?;
        out.flush()?;
        let mut on_event = |e: Event<'_>| {
            if let Event::Token { text, .. } = e {
                let _ = write!(out, "{text}");
                let _ = out.flush();
            }
        };
        let (done, _) = generator.generate(&[Request::text(prompt)], &config, &mut on_event)?;
        writeln!(out)?;
        let reply = done[0].text.clone().unwrap_or_default();
        history.push(format!("Assistant:{}\n", reply.trim_end()));
    }
}
