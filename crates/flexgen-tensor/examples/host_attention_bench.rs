//! `cargo run --release -p flexgen-tensor --example host_attention_bench [ROWS] [POSITIONS] [REP]
//! [CALLS] [BITS]`:
//! times the CPU decode attention (`host_attention::decode`, every core) over an fp16 cache of
//! ROWS (sequence, kv head) rows (default 512) of POSITIONS positions (default 512) of 128 values,
//! each attended by REP query heads (default 1; 8 for Llama-3.1-70B's grouped-query attention),
//! and prints the best of CALLS calls (default 7) as the rate in the planner's measure (4·rows·rep·positions·hd FLOPs) and in bytes of
//! cache read per second. With BITS 4 or 8 the cache is packed in groups of 64 along the head
//! dimension and `host_attention::decode_packed` attends it (the bytes read are the packed ones).
//! A benchmark command, not a test: its figures go to docs/benchmarks.md.

#![expect(clippy::print_stdout, reason = "a benchmark program prints its figures")]

use std::time::Instant;

use flexgen_tensor::host_attention::{Dims, PackedRows, Packing, decode, decode_packed};
use flexgen_tensor::quant::{QuantSpec, quantize_line};
use half::f16;

fn main() {
    let arg =
        |i: usize, d: usize| std::env::args().nth(i).and_then(|a| a.parse().ok()).unwrap_or(d);
    let (rows, s, hd, rep) = (arg(1, 512), arg(2, 512), 128, arg(3, 1).max(1));
    let cap = s + 1;
    let fill =
        |n: usize, f: fn(usize) -> f32| (0..n).map(|i| f16::from_f32(f(i))).collect::<Vec<_>>();
    let mut k = fill(rows * cap * hd, |i| ((i % 97) as f32 - 48.0) / 400.0);
    let mut v = fill(rows * cap * hd, |i| ((i % 89) as f32 - 44.0) / 50.0);
    let q = fill(rows * rep * hd, |i| ((i % 13) as f32 - 6.0) / 30.0);
    let mut out = vec![f16::ZERO; rows * rep * hd];
    let starts = vec![0i32; rows];
    let d = Dims { rows, hd, cap, past: s, nkv: 1, rep, row0: 0 };
    let kv_new = fill(rows * hd, |i| ((i % 11) as f32 - 5.0) / 40.0);
    let reps = arg(4, 7).max(1);
    let bits = u8::try_from(arg(5, 0)).unwrap_or(0);
    let packing = matches!(bits, 4 | 8).then_some(Packing { group: 64, bits });
    // The packed homes: every position of k and v quantized as the GPU's prefill stores it.
    let pack = |x: &[f16], p: Packing| {
        let (code_b, par) = p.per_position(hd);
        let mut codes = vec![0u8; rows * cap * code_b];
        let mut params = vec![f16::ZERO; rows * cap * par];
        let spec = QuantSpec { bits: p.bits, group: p.group, dim: 0 };
        let mut line = vec![0f32; hd];
        for (slot, vals) in x.chunks_exact(hd).enumerate() {
            for (l, h) in line.iter_mut().zip(vals) {
                *l = h.to_f32();
            }
            quantize_line(
                &line,
                spec,
                &mut codes[slot * code_b..][..code_b],
                &mut params[slot * par..][..par],
            );
        }
        (codes, params)
    };
    let mut packed = packing.map(|p| (pack(&k, p), pack(&v, p)));
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        match (&mut packed, packing) {
            (Some(((kc, kp), (vc, vp))), Some(p)) => decode_packed(
                &q,
                &kv_new,
                &kv_new,
                PackedRows { codes: kc, params: kp },
                PackedRows { codes: vc, params: vp },
                &mut out,
                &starts,
                d,
                p,
            ),
            _ => decode(&q, &kv_new, &kv_new, &mut k, &mut v, &mut out, &starts, d),
        }
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let best = times[0];
    let values = (rows * cap * hd) as f64;
    let checksum: f32 = out.iter().map(|x| x.to_f32()).sum();
    // One line, so that `| head -1` does not cut a second one off.
    // Bytes of k and v read: fp16 values, or the packed codes and (min, scale) pairs.
    let bytes = packing.map_or(2.0 * 2.0 * values, |p| {
        let (code_b, par) = p.per_position(hd);
        2.0 * ((rows * cap) * (code_b + 2 * par)) as f64
    });
    let form = packing.map_or("fp16".to_string(), |p| format!("{}-bit packed", p.bits));
    println!(
        "{rows} rows × {cap} positions × {hd} ({form}), {rep} query heads per row, {} threads: best of {reps} {:.2} ms (median {:.2} ms), {:.2} GFLOP/s, {:.2} GB/s of cache read (checksum {checksum:.4})",
        rayon::current_num_threads(),
        best * 1e3,
        times[reps / 2] * 1e3,
        4.0 * values * rep as f64 / best / 1e9,
        bytes / best / 1e9
    );
}
