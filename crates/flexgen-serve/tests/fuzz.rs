//! Mutation fuzzing of the server's request bodies (issue 22), in CI: `FUZZ_INPUTS` (default
//! 10,000) mutations each of `/v1/completions` and `/v1/chat/completions` bodies go through the
//! handlers' own checks (`completion_requests`, `chat_requests`, with both chat templates); a
//! finding is a panic. Then a sample goes to the running server over HTTP: every answer must be
//! 200 or 400 with a JSON body, and the server must stay up.

#[path = "../../flexgen-cli/tests/fuzz_support/mod.rs"]
mod fuzz_support;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};

use flexgen_serve::{ChatTemplate, chat_requests, completion_requests};
use fuzz_support::{Rng, fuzz, mutate};

fn completion_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"prompt": "In the beginning", "max_tokens": 8, "temperature": 0}"#,
        r#"{"model": "opt-kjv", "prompt": ["a", "b c"], "max_tokens": 4, "temperature": 0.7, "top_p": 0.9, "seed": 3, "stop": ["\n", "."]}"#,
        r#"{"prompt": "x", "stream": true, "n": 1, "stop": "z", "max_tokens": 1024}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

fn chat_seeds() -> Vec<Vec<u8>> {
    [
        r#"{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8, "temperature": 0}"#,
        r#"{"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who?"}, {"role": "assistant", "content": "Me."}, {"role": "user", "content": "Why?"}], "stream": true, "seed": 9, "top_p": 0.5, "temperature": 1.5}"#,
    ]
    .iter()
    .map(|s| s.as_bytes().to_vec())
    .collect()
}

#[test]
fn request_bodies_are_parsed_or_refused() {
    fuzz("completions body", 101, &completion_seeds(), |b| {
        let _ = completion_requests(b, 1024);
    });
    let jinja = ChatTemplate::Jinja {
        source:
            "{{ bos_token }}{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}\
                 {% if add_generation_prompt %}<assistant>{% endif %}"
                .into(),
        bos: "<s>".into(),
        eos: "</s>".into(),
    };
    for (name, t) in [("chat body (chatbot)", ChatTemplate::Chatbot), ("chat body (jinja)", jinja)]
    {
        fuzz(name, 102, &chat_seeds(), |b| {
            let _ = chat_requests(b, &t, 1024);
        });
    }
}

#[test]
fn the_server_answers_mutated_bodies_with_200_or_400() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_flexgen-serve"))
        .args(["--port", "0", "--batch-wait-ms", "0", "--max-tokens-limit", "16"])
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut err = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let addr = loop {
        line.clear();
        assert!(err.read_line(&mut line).unwrap() > 0, "the server stopped before listening");
        if let Some(rest) = line.split("http://").nth(1) {
            break rest.split_whitespace().next().unwrap().to_string();
        }
    };
    std::thread::spawn(move || std::io::copy(&mut err, &mut std::io::sink()));
    let mut rng = Rng::new(103);
    let n = (fuzz_support::inputs() / 50).max(20);
    let mut answered = [0usize; 2];
    for i in 0..n {
        let (path, seeds) = if i % 2 == 0 {
            ("/v1/completions", completion_seeds())
        } else {
            ("/v1/chat/completions", chat_seeds())
        };
        let body = mutate(&seeds[i % seeds.len()], &mut rng, &seeds);
        let mut c = TcpStream::connect(&addr).unwrap();
        write!(
            c,
            "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .unwrap();
        c.write_all(&body).unwrap();
        let mut out = Vec::new();
        c.read_to_end(&mut out).unwrap();
        let out = String::from_utf8_lossy(&out);
        let status: u16 = out.split_whitespace().nth(1).unwrap_or("0").parse().unwrap_or(0);
        assert!(
            status == 200 || status == 400,
            "{path} answered {status} to {:?}: {out}",
            String::from_utf8_lossy(&body)
        );
        answered[usize::from(status == 400)] += 1;
    }
    assert!(child.try_wait().unwrap().is_none(), "the server stopped");
    let _ = child.kill();
    let _ = child.wait();
    eprintln!("server: {n} mutated bodies, {} answered 200, {} 400", answered[0], answered[1]);
}
