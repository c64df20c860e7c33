//! `cargo run --release -p flexgen-tensor --example host_attention_bench [ROWS] [POSITIONS] [REP]
//! [CALLS]`:
//! times the CPU decode attention (`host_attention::decode`, every core) over an fp16 cache of
//! ROWS (sequence, kv head) rows (default 512) of POSITIONS positions (default 512) of 128 values,
//! each attended by REP query heads (default 1; 8 for Llama-3.1-70B's grouped-query attention),
//! and prints the best of CALLS calls (default 7) as the rate in the planner's measure (4·rows·rep·positions·hd FLOPs) and in bytes of
//! cache read per second. A benchmark command, not a test: its figures go to docs/benchmarks.md.

#![expect(clippy::print_stdout, reason = "a benchmark program prints its figures")]

use std::time::Instant;

use flexgen_tensor::host_attention::{Dims, decode};
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
    let mut times = Vec::new();
    for _ in 0..reps {
        let t = Instant::now();
        decode(&q, &kv_new, &kv_new, &mut k, &mut v, &mut out, &starts, d);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let best = times[0];
    let values = (rows * cap * hd) as f64;
    let checksum: f32 = out.iter().map(|x| x.to_f32()).sum();
    // One line, so that `| head -1` does not cut a second one off.
    println!(
        "{rows} rows × {cap} positions × {hd}, {rep} query heads per row, {} threads: best of {reps} {:.2} ms (median {:.2} ms), {:.2} GFLOP/s, {:.2} GB/s of cache read (checksum {checksum:.4})",
        rayon::current_num_threads(),
        best * 1e3,
        times[reps / 2] * 1e3,
        4.0 * values * rep as f64 / best / 1e9,
        2.0 * 2.0 * values / best / 1e9
    );
}
