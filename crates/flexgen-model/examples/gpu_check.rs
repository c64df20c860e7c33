//! Runs the model layers on the GPU backend and compares them with the CPU backend and with the
//! Hugging Face golden logits: prefill logits of the tiny model (single prompts and a left-padded
//! batch), greedy generation with the KV cache on the GPU, and a random OPT-125M-shape model.
//! Exits non-zero on a mismatch. On a GPU machine:
//! `cargo run --release -p flexgen-model --example gpu_check [TINY_MODEL_DIR]`.

#![expect(clippy::print_stdout, reason = "a check program prints its findings")]

use std::path::Path;

use flexgen_model::layers::{self, Kv};
use flexgen_model::{DummyInit, Model, ModelSpec, Weights, forward_all_on};
use flexgen_tensor::cuda::Gpu;
use flexgen_tensor::{Backend, Cpu, Tensor};

fn max_rel(a: &Tensor, b: &Tensor) -> f32 {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let scale = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

/// Greedy generation with the KV cache on backend `be`; returns the tokens.
fn greedy<B: Backend>(
    be: &B,
    spec: &ModelSpec,
    w: &Weights<B::T>,
    prompt: &[u32],
    n: usize,
) -> Vec<u32>
where
    flexgen_model::Error: From<B::Error>,
{
    let mut kv: Vec<Option<Kv<B::T>>> = (0..w.layers.len()).map(|_| None).collect();
    let mut ids = prompt.to_vec();
    let mut input = prompt.to_vec();
    let mut out = Vec::new();
    for _ in 0..n {
        let t = input.len();
        let total = ids.len();
        let past = total - t;
        let pos: Vec<u32> = layers::position_indices(spec, &vec![true; total])[past..].to_vec();
        let allowed = vec![(0..t).map(|q| (0..total).map(|s| s <= past + q).collect()).collect()];
        let step = layers::StepInputs::new(be, spec, &allowed, &pos).unwrap();
        let mut x = layers::embed(be, w, &input, &pos, (1, t)).unwrap();
        for (j, lw) in w.layers.iter().enumerate() {
            let (y, new) = layers::decoder_layer(be, spec, lw, &x, kv[j].as_ref(), &step).unwrap();
            kv[j] = Some(match kv[j].take() {
                Some(p) => p.append_on(be, &new).unwrap(),
                None => new,
            });
            x = y;
        }
        let last = be.last_position(&x).map_err(flexgen_model::Error::from).unwrap();
        let logits = layers::logits(be, spec, w, &last).unwrap();
        let row: Vec<f32> = be
            .to_cpu(&logits)
            .map_err(flexgen_model::Error::from)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        let next =
            u32::try_from((0..row.len()).fold(0, |b, i| if row[i] > row[b] { i } else { b }))
                .unwrap();
        out.push(next);
        ids.push(next);
        input = vec![next];
    }
    out
}

fn main() {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("no GPU: {e}");
            std::process::exit(2);
        }
    };
    let mut failed = false;
    let mut check = |what: &str, ok: bool, detail: String| {
        println!("{what:<58} {detail:<40} {}", if ok { "ok" } else { "FAIL" });
        failed |= !ok;
    };
    // The tiny model's directory: the first argument, or this crate's test data.
    let dir = std::env::args().nth(1).map_or_else(
        || Path::new(env!("CARGO_MANIFEST_DIR")).join("test_data/tiny-random-opt"),
        Into::into,
    );
    let model = Model::load(&dir).unwrap();
    let gw = model.weights.to_device(|t| gpu.upload(t)).unwrap();
    let golden: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("golden.json")).unwrap()).unwrap();
    let bytes = std::fs::read(dir.join("golden.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    for (i, p) in golden["prompts"].as_array().unwrap().iter().enumerate() {
        let ids: Vec<u32> = p["input_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
            .collect();
        let mask = vec![vec![true; ids.len()]];
        let g = forward_all_on(&gpu, &model.spec, &gw, std::slice::from_ref(&ids), &mask).unwrap();
        let c = model.forward_all(std::slice::from_ref(&ids), &mask).unwrap();
        let view = st.tensor(&format!("prompt{i}.prefill_logits")).unwrap();
        let hf: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let hf = Tensor::from_vec(hf, view.shape(), &flexgen_tensor::Device::Cpu).unwrap();
        let (vs_cpu, vs_hf) = (max_rel(&g, &c), max_rel(&g.squeeze(0).unwrap(), &hf));
        check(
            &format!("tiny prompt {i}: GPU prefill logits vs CPU / transformers"),
            vs_cpu < 2e-2 && vs_hf < 2e-2,
            format!("rel err {vs_cpu:.2e} / {vs_hf:.2e}"),
        );
        let want: Vec<u32> = p["greedy"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
            .collect();
        let got = greedy(&gpu, &model.spec, &gw, &ids, want.len());
        let same = got.iter().zip(&want).take_while(|(a, b)| a == b).count();
        // fp16 cannot separate candidates closer than its error: the tokens must agree up to the
        // first step where transformers' top two logits are within 1 % of the largest logit.
        let steps = st.tensor(&format!("prompt{i}.step_logits")).unwrap();
        let vocab = steps.shape()[1];
        let rows: Vec<f32> = steps
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        let near_tie = rows.chunks(vocab).position(|r| {
            let mut v = r.to_vec();
            v.sort_by(|a, b| b.total_cmp(a));
            v[0] - v[1] < 0.01 * v.iter().fold(0.0f32, |m, x| m.max(x.abs()))
        });
        let need = near_tie.unwrap_or(want.len());
        let detail = match near_tie {
            Some(s) if same < want.len() => {
                format!("{same}/{} equal; near tie at step {s}", want.len())
            }
            _ => format!("{same}/{} equal", want.len()),
        };
        check(
            &format!("tiny prompt {i}: GPU greedy tokens (KV cache on GPU) vs transformers"),
            same >= need,
            detail,
        );
    }
    // The left-padded batch.
    let batch = &golden["batch"];
    let ids: Vec<Vec<u32>> = batch["input_ids"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            r.as_array()
                .unwrap()
                .iter()
                .map(|v| u32::try_from(v.as_u64().unwrap()).unwrap())
                .collect()
        })
        .collect();
    let mask: Vec<Vec<bool>> = batch["attention_mask"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_array().unwrap().iter().map(|v| v.as_u64() == Some(1)).collect())
        .collect();
    let g = forward_all_on(&gpu, &model.spec, &gw, &ids, &mask).unwrap();
    let c = model.forward_all(&ids, &mask).unwrap();
    let t = ids[0].len();
    let last = |x: &Tensor| x.narrow(1, t - 1, 1).unwrap();
    let err = max_rel(&last(&g), &last(&c));
    check(
        "tiny left-padded batch: GPU last-position logits vs CPU",
        err < 2e-2,
        format!("rel err {err:.2e}"),
    );

    // A random model of OPT-125M's shape (12 layers, 768 wide), two layers to keep it quick.
    let mut spec = flexgen_model::spec_by_name("opt-125m").unwrap();
    spec.num_layers = 2;
    let big = Model::dummy(spec.clone(), DummyInit::Random { seed: 5 }).unwrap();
    let gw = big.weights.to_device(|t| gpu.upload(t)).unwrap();
    let prompt: Vec<u32> = (0..24).map(|i| 2 + i * 97 % 50000).collect();
    let g =
        forward_all_on(&gpu, &spec, &gw, std::slice::from_ref(&prompt), &[vec![true; 24]]).unwrap();
    let c = big.forward_all(std::slice::from_ref(&prompt), &[vec![true; 24]]).unwrap();
    let err = max_rel(&g, &c);
    check(
        "OPT-125M shape (2 of 12 layers), random: GPU vs CPU logits",
        err < 2e-2,
        format!("rel err {err:.2e}"),
    );
    let cpu_tokens = greedy(&Cpu, &spec, &big.weights, &prompt, 8);
    let gpu_tokens = greedy(&gpu, &spec, &gw, &prompt, 8);
    check(
        "OPT-125M shape: GPU vs CPU greedy tokens",
        cpu_tokens == gpu_tokens,
        format!("{gpu_tokens:?}"),
    );
    if failed {
        std::process::exit(1);
    }
    println!("the GPU backend matches the CPU backend and transformers");
}
