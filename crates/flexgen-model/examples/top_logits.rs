//! Prints the most likely next tokens of a prompt, and of the prompt followed by each prefix of
//! some generated token ids, from the CPU's f32 forward pass: how close greedy's choice was at
//! each step (a near tie is where fp16 on the GPU and f32 on the CPU may pick differently).
//! `cargo run --release -p flexgen-model --example top_logits MODEL_DIR PROMPT [ID ...]`.

#![expect(clippy::print_stdout, reason = "a diagnostic program prints its findings")]

use flexgen_model::Model;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [dir, prompt, ids @ ..] = args.as_slice() else {
        return Err("usage: top_logits MODEL_DIR PROMPT [GENERATED_ID ...]".into());
    };
    let generated: Vec<u32> = ids.iter().map(|s| s.parse()).collect::<Result<_, _>>()?;
    let model = Model::load(std::path::Path::new(dir))?;
    let tokenizer = model.tokenizer.as_ref().ok_or("the model directory has no tokenizer.json")?;
    let prompt_ids = tokenizer.encode(prompt)?;
    println!("prompt ids {prompt_ids:?}");
    for step in 0..=generated.len() {
        let mut seq = prompt_ids.clone();
        seq.extend(&generated[..step]);
        let n = seq.len();
        let logits: Vec<f32> =
            model.forward_all(&[seq], &[vec![true; n]])?.flatten_all()?.to_vec1()?;
        let last = &logits[logits.len() - logits.len() / n..];
        let mut order: Vec<usize> = (0..last.len()).collect();
        order.sort_by(|a, b| last[*b].total_cmp(&last[*a]));
        let top: Vec<String> = order[..4].iter().map(|&i| format!("{i} {:.5}", last[i])).collect();
        let margin = last[order[0]] - last[order[1]];
        println!("step {step}: {} (top-2 margin {margin:.5})", top.join(", "));
    }
    Ok(())
}
