//! The fused 4-bit products (`Gpu::gemv4_dim0`, scalar, and `Gpu::gemm4_tc`, on the tensor cores:
//! x × Wᵀ straight from W's packed codes) against cuBLAS's fp16 GEMM on the same shapes, and
//! against today's path for a packed layer (dequantize W to fp16 with `dequant_dim0`, then the
//! fp16 GEMM), for decode batches of 1 to 128 rows. First checks both kernels against the
//! dequantize-then-GEMM result. Run on a GPU machine:
//! `cargo run --release -p flexgen-tensor --example gemv4_bench` (`GEMV4_GROUP=128`: groups of
//! 128 inputs, Marlin's size, instead of FlexGen's 64). The tensor-core kernel reads W in the
//! tensor-core order (`quant::TcOrder`), the others `quantize`'s layout. Figures only, no verdict
//! but the check (exit 1 if it fails).

#![expect(clippy::print_stdout, reason = "a benchmark prints its table")]
#![expect(clippy::cast_precision_loss, reason = "rates")]

use flexgen_tensor::cuda::Gpu;
use flexgen_tensor::cuda::exec::{Gemm, Store4, Weight4, addr, gemm4_tc_done_len, gemv4_plan};
use flexgen_tensor::quant::{QuantSpec, TcOrder, quantize};
use half::f16;

fn values(n: usize, seed: u64, scale: f32) -> Vec<f32> {
    let mut z = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    (0..n)
        .map(|_| {
            z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            (((z >> 40) as u32) as f32 / (1u32 << 24) as f32 - 0.5) * 2.0 * scale
        })
        .collect()
}

fn half(v: &[f32]) -> Vec<f16> {
    v.iter().map(|&x| f16::from_f32(x)).collect()
}

fn main() {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("no GPU: {e}");
            std::process::exit(2);
        }
    };
    let s = gpu.stream.clone();
    // GEMV4_GROUP=128: the codes' groups of 128 inputs (one (min, scale) pair each, as a policy's
    // `compress_weight.group_size = 128` makes them); FlexGen's 64 by default.
    let group = match std::env::var("GEMV4_GROUP").as_deref() {
        Err(_) | Ok("64") => 64,
        Ok("128") => 128,
        Ok(v) => {
            println!("GEMV4_GROUP={v}: the fused products take groups of 64 or 128");
            std::process::exit(2);
        }
    };
    println!("groups of {group} inputs");
    // Checks: 4-bit weights, both kernels against dequantize + fp16 GEMM (the tensor-core one on
    // W in its order, which `dequant_tc` expands the same as `dequant_dim0`); every tile of the
    // tensor-core kernel (13 rows: 16; 32 rows; 70 rows: 64 then 8), inputs that end inside its
    // step.
    let mut ok = true;
    for (outs, ins, ldx, nb) in
        [(3000usize, 1024usize, 1024usize, 13usize), (3000, 1008, 1016, 32), (3000, 1008, 1016, 70)]
    {
        let p = quantize(
            &values(outs * ins, 1, 0.1),
            &[outs, ins],
            QuantSpec { bits: 4, group, dim: 0 },
        );
        let codes = s.clone_htod(&p.data).unwrap();
        let params = s.clone_htod(&p.params).unwrap();
        let x = s.clone_htod(&half(&values(nb * ldx, 2, 1.0))).unwrap();
        let w16 = s.alloc_zeros::<f16>(outs * ins).unwrap();
        let y16 = s.alloc_zeros::<f16>(nb * outs).unwrap();
        let (y32, yt) =
            (s.alloc_zeros::<f32>(nb * outs).unwrap(), s.alloc_zeros::<f32>(nb * outs).unwrap());
        let (c, pr, xa) = (addr(&codes), addr(&params), addr(&x));
        let wt = Weight4 { codes: c, params: pr, outs, ins, group, tc: false };
        let order = TcOrder::new((outs, ins), group).expect("the tensor-core order applies");
        let (tc, tp) = order.permute(&p.data, &p.params, false);
        let (tc, tp) = (s.clone_htod(&tc).unwrap(), s.clone_htod(&tp).unwrap());
        let wtc = Weight4 { codes: addr(&tc), params: addr(&tp), tc: true, ..wt };
        let w16tc = s.alloc_zeros::<f16>(outs * ins).unwrap();
        // SAFETY: buffers allocated above for these shapes.
        let ran = unsafe {
            gpu.dequant_dim0(c, pr, addr(&w16), (outs, ins), 0..outs, group, 4).unwrap();
            // The same values from the tensor-core order, in two slices of outputs.
            let half = outs / 2 / group * group;
            gpu.dequant_tc((addr(&tc), addr(&tp), addr(&w16tc)), (outs, ins), 0..half, group)
                .unwrap();
            let rest = addr(&w16tc) + (half * ins * 2) as u64;
            gpu.dequant_tc((addr(&tc), addr(&tp), rest), (outs, ins), half..outs, group).unwrap();
            let gm =
                Gemm { lda: ldx, ..Gemm::linear(nb, outs, ins, xa, addr(&w16), addr(&y16), false) };
            gpu.gemm(&gm).unwrap();
            gpu.gemv4_dim0(wt, (xa, ldx), (addr(&y32), false), nb).unwrap();
            gpu.gemm4_tc(wtc, (xa, ldx), (addr(&yt), false), nb, None).unwrap()
        };
        let same = s.clone_dtoh(&w16).unwrap() == s.clone_dtoh(&w16tc).unwrap();
        ok &= same;
        println!(
            "check dequant_tc {outs}×{ins}, two slices, against dequant_dim0: {}",
            if same { "the same values" } else { "FAIL" }
        );
        let want: Vec<f32> = s.clone_dtoh(&y16).unwrap().iter().map(|v| v.to_f32()).collect();
        let max_ref = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        for (name, y) in [("scalar", &y32), ("tensor-core", &yt)] {
            let got = s.clone_dtoh(y).unwrap();
            let max_err = got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g - w).abs()));
            let good = max_err <= 1e-2 * max_ref && (name == "scalar" || ran.is_some());
            ok &= good;
            println!(
                "check {name} {nb}×{ins} · ({outs}×{ins})ᵀ: max |fused − dequantize+GEMM| {max_err:.3e} of max {max_ref:.3e}: {}",
                if good { "ok" } else { "FAIL" }
            );
        }
        ok &= check_store(&gpu, wtc, (xa, ldx), nb);
    }
    // Timing: OPT-175B's four matrices, OPT-30B's fc1, OPT-6.7B's (random codes: the kernel's time does not
    // depend on them).
    println!(
        "| weight (outs × ins) | rows | kernel (words/thread, inputs/slice) | fp16 GEMM ms | dequantize + GEMM ms | fused 4-bit ms | fused GB/s | fused / fp16 GEMM | fused / dequantize + GEMM | tensor-core 4-bit ms (slices) | its GB/s | its / fp16 GEMM | with its store ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, outs, ins) in [
        ("OPT-175B fc1", 49152usize, 12288usize),
        ("OPT-175B qkv", 36864, 12288),
        ("OPT-175B out", 12288, 12288),
        ("OPT-175B fc2", 12288, 49152),
        ("OPT-30B fc1", 28672, 7168),
        ("OPT-6.7B qkv", 12288, 4096),
        ("OPT-6.7B out", 4096, 4096),
        ("OPT-6.7B fc2", 4096, 16384),
    ] {
        let n = outs * ins;
        let codes = s
            .clone_htod(
                &values(n / 2, 3, 1.0)
                    .iter()
                    .map(|v| v.to_bits().to_le_bytes()[1])
                    .collect::<Vec<u8>>(),
            )
            .unwrap();
        let params = s.clone_htod(&half(&values(n / group * 2, 4, 0.01))).unwrap();
        let w16 = s.clone_htod(&half(&values(n, 5, 0.02))).unwrap();
        let x = s.clone_htod(&half(&values(128 * ins, 6, 1.0))).unwrap();
        let y16 = s.alloc_zeros::<f16>(128 * outs).unwrap();
        let y32 = s.alloc_zeros::<f32>(128 * outs).unwrap();
        let bias = s.clone_htod(&half(&values(outs, 7, 0.1))).unwrap();
        let done = s.alloc_zeros::<u32>(gemm4_tc_done_len(outs)).unwrap();
        for nb in [1usize, 2, 4, 8, 16, 32, 64, 128] {
            let (xa, wa, ya, y3) = (addr(&x), addr(&w16), addr(&y16), addr(&y32));
            let wt =
                Weight4 { codes: addr(&codes), params: addr(&params), outs, ins, group, tc: false };
            // The tensor-core product on the same random bytes, taken as that order.
            let wtc = Weight4 { tc: true, ..wt };
            // SAFETY: buffers allocated above for these shapes.
            let fp16 = &gpu.time_ms(7, || unsafe {
                gpu.gemm(&Gemm::linear(nb, outs, ins, xa, wa, ya, false)).unwrap();
            });
            let deq = &gpu.time_ms(7, || unsafe {
                gpu.dequant_dim0(addr(&codes), addr(&params), wa, (outs, ins), 0..outs, group, 4)
                    .unwrap();
                gpu.gemm(&Gemm::linear(nb, outs, ins, xa, wa, ya, false)).unwrap();
            });
            let fused = &gpu.time_ms(7, || unsafe {
                gpu.gemv4_dim0(wt, (xa, ins), (y3, false), nb).unwrap();
            });
            let tc = &gpu.time_ms(7, || unsafe {
                gpu.gemm4_tc(wtc, (xa, ins), (y3, false), nb, None)
                    .unwrap()
                    .expect("a layout gemm4_tc takes");
            });
            // With its store folded in (y left zeroed by each run: the first run's store clears
            // what the run above left), as decode runs it: bias, ReLU.
            let store = Store4 {
                out: ya,
                bias: addr(&bias),
                accumulate: false,
                relu: true,
                done: addr(&done),
            };
            let tcs = &gpu.time_ms(7, || unsafe {
                gpu.gemm4_tc(wtc, (xa, ins), (y3, true), nb, Some(store)).unwrap();
            });
            let bytes =
                n as f64 / 2.0 + (n / group * 4) as f64 + (nb * (ins * 2 + outs * 4)) as f64;
            let plan = gemv4_plan(nb.min(8), (outs, ins), group, addr(&codes), 132);
            let tplan = gpu.gemm4_tc_plan(nb.min(64), (outs, ins));
            println!(
                "| {name} ({outs} × {ins}) | {nb} | {} ({}, {}) | {fp16:.3} | {deq:.3} | {fused:.3} | {:.0} | {:.2}× | {:.2}× | {tc:.3} ({}) | {:.0} | {:.2}× | {tcs:.3} |",
                ["1-row", "2-row", "4-row", "8-row"][plan.kernel],
                plan.words,
                plan.per_slice,
                bytes / fused / 1e6,
                fp16 / fused,
                deq / fused,
                tplan.slices,
                bytes / tc / 1e6,
                fp16 / tc
            );
        }
    }
    if !ok {
        std::process::exit(1);
    }
}

/// `gemm4_tc` with its store folded in (into an fp16 output holding values, accumulated, with a
/// bias and ReLU), twice in a row, against the product alone then `store_f32`: the same fp16
/// values up to the fp32 sums' order, y and the counters left zeroed.
fn check_store(gpu: &Gpu, wt: Weight4, (xa, ldx): (u64, usize), nb: usize) -> bool {
    let s = &gpu.stream;
    let outs = wt.outs;
    let old = half(&values(nb * outs, 8, 1.0));
    let bias = s.clone_htod(&half(&values(outs, 9, 0.5))).unwrap();
    let (want, got) = (s.clone_htod(&old).unwrap(), s.clone_htod(&old).unwrap());
    let (y, y2) =
        (s.alloc_zeros::<f32>(nb * outs).unwrap(), s.alloc_zeros::<f32>(nb * outs).unwrap());
    let done = s.alloc_zeros::<u32>(gemm4_tc_done_len(outs)).unwrap();
    let store = Store4 {
        out: addr(&got),
        bias: addr(&bias),
        accumulate: true,
        relu: true,
        done: addr(&done),
    };
    // SAFETY: buffers allocated above for these shapes.
    let stored = unsafe {
        for _ in 0..2 {
            gpu.gemm4_tc(wt, (xa, ldx), (addr(&y), true), nb, None).unwrap();
            gpu.store_f32(
                (addr(&y), addr(&want)),
                (nb * outs, outs),
                (true, true),
                (addr(&bias), true),
            )
            .unwrap();
        }
        (0..2).all(|_| {
            gpu.gemm4_tc(wt, (xa, ldx), (addr(&y2), true), nb, Some(store)).unwrap() == Some(true)
        })
    };
    let (want, got) = (s.clone_dtoh(&want).unwrap(), s.clone_dtoh(&got).unwrap());
    let max_ref = want.iter().fold(0f32, |m, v| m.max(v.to_f32().abs()));
    let max_err =
        got.iter().zip(&want).fold(0f32, |m, (g, w)| m.max((g.to_f32() - w.to_f32()).abs()));
    let y_zero = s.clone_dtoh(&y2).unwrap().iter().all(|&v| v == 0.0);
    let done_zero = s.clone_dtoh(&done).unwrap().iter().all(|&v| v == 0);
    let good = stored && max_err <= 2e-3 * max_ref && y_zero && done_zero;
    println!(
        "check tensor-core with its store, {nb} rows × {outs}, twice: max |folded − store_f32| {max_err:.3e} of max {max_ref:.3e}, sums cleared {y_zero}, counters back to 0 {done_zero}: {}",
        if good { "ok" } else { "FAIL" }
    );
    good
}
