//! Checks every GPU operation against the CPU operation of the same name on seeded random data and
//! prints the error; exits non-zero if one exceeds the fp16 tolerance. Run on a GPU machine:
//! `cargo run --release -p flexgen-tensor --example cuda_check`. Then times the executor's
//! compression kernels at OPT-30B shapes (figures only, no verdict).

#![expect(clippy::print_stdout, reason = "a check program prints its table")]

use flexgen_tensor::cuda::Gpu;
use flexgen_tensor::cuda::exec::{
    AttnDims, CacheQuant, Gemm, NewKv, SplitPack, addr, at, norm_threads,
};
use flexgen_tensor::quant::{QuantSpec, dequantize, quantize};
use flexgen_tensor::{Device, Tensor};
use half::f16;

fn rand(shape: &[usize], seed: u64, scale: f32) -> Tensor {
    let n: usize = shape.iter().product();
    let mut x = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let data: Vec<f32> = (0..n)
        .map(|_| {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            let r = ((x >> 40) as u32) as f32 / (1u32 << 24) as f32;
            (r - 0.5) * 2.0 * scale
        })
        .collect();
    Tensor::from_vec(data, shape, &Device::Cpu).unwrap()
}

fn compare(name: &str, gpu: &Tensor, cpu: &Tensor, failures: &mut Vec<String>) {
    let a: Vec<f32> = gpu.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = cpu.flatten_all().unwrap().to_vec1().unwrap();
    assert_eq!(a.len(), b.len(), "{name}: sizes differ");
    let max_ref = b.iter().fold(0.0f32, |m, v| m.max(v.abs())).max(1e-6);
    let max_err = a.iter().zip(&b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    let rel = max_err / max_ref;
    let ok = rel < 1e-2;
    println!(
        "{name:<28} max |gpu − cpu| {max_err:>10.3e}  relative to max |cpu| {rel:>9.2e}  {}",
        if ok { "ok" } else { "FAIL" }
    );
    if !ok {
        failures.push(name.to_string());
    }
}

fn main() {
    let gpu = match Gpu::new(0) {
        Ok(g) => g,
        Err(e) => {
            println!("no GPU: {e}");
            std::process::exit(2);
        }
    };
    let mut failures = Vec::new();
    let (b, t, h, nh, f) = (3, 17, 256, 4, 1024);
    let x = rand(&[b, t, h], 1, 1.0);
    let gx = gpu.upload(&x).unwrap();

    let (w, bias) = (rand(&[f, h], 2, 0.1), rand(&[f], 3, 0.1));
    let y = gpu
        .linear(&gx, &gpu.upload(&w).unwrap(), Some(&gpu.upload(&bias).unwrap()), false)
        .unwrap();
    compare(
        "linear",
        &gpu.download(&y).unwrap(),
        &flexgen_tensor::linear(&x, &w, Some(&bias)).unwrap(),
        &mut failures,
    );
    let y =
        gpu.linear(&gx, &gpu.upload(&w).unwrap(), Some(&gpu.upload(&bias).unwrap()), true).unwrap();
    let cpu = flexgen_tensor::relu(&flexgen_tensor::linear(&x, &w, Some(&bias)).unwrap()).unwrap();
    compare("linear + relu", &gpu.download(&y).unwrap(), &cpu, &mut failures);

    let (lw, lb) = (rand(&[h], 4, 1.0), rand(&[h], 5, 0.5));
    let y =
        gpu.norm(&gx, &gpu.upload(&lw).unwrap(), Some(&gpu.upload(&lb).unwrap()), 1e-5).unwrap();
    compare(
        "layer_norm",
        &gpu.download(&y).unwrap(),
        &flexgen_tensor::layer_norm(&x, &lw, &lb, 1e-5).unwrap(),
        &mut failures,
    );

    let x2 = rand(&[b, t, h], 6, 1.0);
    let y = gpu.add(&gx, &gpu.upload(&x2).unwrap()).unwrap();
    compare("add", &gpu.download(&y).unwrap(), &(&x + &x2).unwrap(), &mut failures);

    let table = rand(&[1000, h], 7, 1.0);
    let pos_table = rand(&[300, h], 8, 1.0);
    let ids: Vec<u32> = (0..b * t).map(|i| u32::try_from(i * 37 % 1000).unwrap()).collect();
    let pos: Vec<u32> = (0..b * t).map(|i| u32::try_from(i % t + 2).unwrap()).collect();
    let y = gpu
        .embedding(
            &ids,
            &pos,
            (b, t),
            &gpu.upload(&table).unwrap(),
            Some(&gpu.upload(&pos_table).unwrap()),
        )
        .unwrap();
    let ids_t = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let pos_t = Tensor::from_vec(pos, (b, t), &Device::Cpu).unwrap();
    let cpu = (flexgen_tensor::embedding(&ids_t, &table).unwrap()
        + flexgen_tensor::embedding(&pos_t, &pos_table).unwrap())
    .unwrap();
    compare("embedding + positions", &gpu.download(&y).unwrap(), &cpu, &mut failures);

    // Attention with left padding and a causal mask, heads split and merged on the GPU.
    let (q, k, v) =
        (rand(&[b, t, h], 9, 1.0), rand(&[b, t, h], 10, 1.0), rand(&[b, t, h], 11, 1.0));
    let allowed: Vec<Vec<Vec<bool>>> = (0..b)
        .map(|s| (0..t).map(|qi| (0..t).map(|ki| ki <= qi && ki >= s * 3).collect()).collect())
        .collect();
    let bias_t = flexgen_tensor::attention_bias(&allowed, &Device::Cpu).unwrap();
    let bias_v = flexgen_tensor::Backend::attention_bias(&gpu, &allowed).unwrap();
    let split =
        |x: &Tensor| gpu.swap12(&gpu.upload(x).unwrap().reshaped(&[b, t, nh, h / nh])).unwrap();
    let scale = 1.0 / ((h / nh) as f64).sqrt();
    let o = gpu.attention(&split(&q), &split(&k), &split(&v), &bias_v, scale).unwrap();
    let o = gpu.swap12(&o).unwrap().reshaped(&[b, t, h]);
    let cpu = flexgen_tensor::merge_heads(
        &flexgen_tensor::attention(
            &flexgen_tensor::split_heads(&q, nh).unwrap(),
            &flexgen_tensor::split_heads(&k, nh).unwrap(),
            &flexgen_tensor::split_heads(&v, nh).unwrap(),
            &bias_t,
            scale,
        )
        .unwrap(),
    )
    .unwrap();
    compare("masked attention", &gpu.download(&o).unwrap(), &cpu, &mut failures);

    check_dequant(&gpu, &mut failures);
    check_cache_quant(&gpu, &mut failures);
    check_split_pack(&gpu, &mut failures);
    check_decode_attention(&gpu, &mut failures);
    check_prefill_attention(&gpu, &mut failures);
    check_bias_norm(&gpu, &mut failures);
    check_gemm_bias(&gpu, &mut failures);
    if failures.is_empty() {
        println!("all GPU operations match the CPU within fp16 tolerance");
    } else {
        println!("FAILED: {failures:?}");
        std::process::exit(1);
    }
    time_kernels(&gpu);
}

/// The weight-dequantizing kernel against `quant::dequantize`: 4 and 8 bits, rows that the
/// group does not divide, and codes at an odd byte offset (the kernel's unaligned path); the
/// matrix as two slices of rows (the first ending at row 128), each written where the whole
/// matrix has it.
fn check_dequant(gpu: &Gpu, failures: &mut Vec<String>) {
    for (bits, rows, cols, offset) in [(4u8, 200, 37, 0), (8, 130, 19, 0), (4, 128, 33, 1)] {
        let spec = QuantSpec { bits, group: 64, dim: 0 };
        let x: Vec<f32> = rand(&[rows, cols], u64::from(bits) + 20, 2.0).to_vec1_f32();
        let p = quantize(&x, &[rows, cols], spec);
        let want = dequantize(&p);
        let mut codes = vec![0u8; offset];
        codes.extend(&p.data);
        let codes = gpu.stream.clone_htod(&codes).unwrap();
        let params = gpu.stream.clone_htod(&p.params).unwrap();
        let out = gpu.stream.alloc_zeros::<f16>(rows * cols).unwrap();
        for slice in [0..128.min(rows), 128.min(rows)..rows] {
            if slice.is_empty() {
                continue;
            }
            let dst = at(addr(&out), slice.start * cols);
            // SAFETY: buffers allocated above for these shapes.
            unsafe {
                gpu.dequant_dim0(
                    addr(&codes) + offset as u64,
                    addr(&params),
                    dst,
                    (rows, cols),
                    slice,
                    64,
                    bits,
                )
            }
            .unwrap();
        }
        let got: Vec<f32> =
            gpu.stream.clone_dtoh(&out).unwrap().into_iter().map(f16::to_f32).collect();
        let name = format!("dequant dim 0, {bits}-bit, {rows}×{cols}, +{offset} B");
        let (a, b) = (
            Tensor::from_vec(got, (rows, cols), &Device::Cpu).unwrap(),
            Tensor::from_vec(want, (rows, cols), &Device::Cpu).unwrap(),
        );
        compare(&name, &a, &b, failures);
    }
}

/// The cache kernels against `quant` (groups along the head dimension): `quant_cache` must give
/// the CPU's bytes exactly (same fp16 inputs, same IEEE arithmetic), `dequant_cache` its values
/// (within fp16 rounding: the GPU fuses min + code·scale),
/// on the vector path (group and head size multiples of 8) and the value-by-value one.
fn check_cache_quant(gpu: &Gpu, failures: &mut Vec<String>) {
    for (bits, hd, group) in [(4u8, 40, 16), (8, 40, 16), (4, 36, 64), (4, 128, 64)] {
        let (rows, cap) = (5, 7);
        let spec = QuantSpec { bits, group, dim: 2 };
        let x: Vec<f16> = rand(&[rows, cap, hd], u64::from(bits) + hd as u64, 3.0)
            .to_vec1_f32()
            .into_iter()
            .map(f16::from_f32)
            .collect();
        let xf: Vec<f32> = x.iter().map(|v| v.to_f32()).collect();
        let want = quantize(&xf, &[rows, cap, hd], spec);
        let q = CacheQuant { rows, cap, hd, group, bits };
        let (cb, pv) = q.sizes();
        let s = &gpu.stream;
        let gx = s.clone_htod(&x).unwrap();
        let codes = s.alloc_zeros::<u8>(cb).unwrap();
        let params = s.alloc_zeros::<f16>(pv).unwrap();
        // SAFETY: buffers allocated above for these shapes.
        unsafe { gpu.quant_cache(&[(addr(&gx), addr(&codes), addr(&params))], q, (0, cap)) }
            .unwrap();
        let same = s.clone_dtoh(&codes).unwrap() == want.data
            && s.clone_dtoh(&params).unwrap() == want.params;
        let name = format!("quant_cache {bits}-bit, hd {hd}, group {group}");
        println!(
            "{name:<28} {}",
            if same { "same bytes as the CPU  ok" } else { "FAIL: bytes differ" }
        );
        if !same {
            failures.push(name);
        }
        // Positions 2..6 only: the others stay zero.
        let out = s.alloc_zeros::<f16>(rows * cap * hd).unwrap();
        // SAFETY: buffers allocated above for these shapes.
        unsafe { gpu.dequant_cache(addr(&codes), addr(&params), addr(&out), q, (2, 4)) }.unwrap();
        let got: Vec<f32> = s.clone_dtoh(&out).unwrap().into_iter().map(f16::to_f32).collect();
        let full = dequantize(&want);
        let want: Vec<f32> = (0..rows * cap * hd)
            .map(|i| {
                if (2..6).contains(&(i / hd % cap)) { f16::from_f32(full[i]).to_f32() } else { 0.0 }
            })
            .collect();
        let name = format!("dequant_cache {bits}-bit, hd {hd}, g {group}");
        let t = |v: Vec<f32>| Tensor::from_vec(v, (rows * cap, hd), &Device::Cpu).unwrap();
        compare(&name, &t(got), &t(want), failures);
    }
}

/// `qkv_split` packing the new positions of the first cache rows itself (`SplitPack`: 4 bits,
/// groups of 64): the same bytes as `quant` gives for the fp16 k and v it writes, at those
/// positions only; heads of 128 and 64 values, one new position and three.
fn check_split_pack(gpu: &Gpu, failures: &mut Vec<String>) {
    for (hd, t) in [(128usize, 1usize), (64, 3)] {
        let (b, nh, cap, past) = (5usize, 4usize, 9usize, 2usize);
        let (w, rows, qrows) = (3 * nh * hd, b * nh, b * nh - 3);
        let d = AttnDims { b, t, nh, nkv: nh, hd, cap, past };
        let quant = CacheQuant { rows: qrows, cap, hd, group: 64, bits: 4 };
        let half =
            |v: Tensor| -> Vec<f16> { v.to_vec1_f32().into_iter().map(f16::from_f32).collect() };
        let s = &gpu.stream;
        let y = s.clone_htod(&half(rand(&[b * t * w], 40 + hd as u64, 2.0))).unwrap();
        let bias = s.clone_htod(&half(rand(&[w], 41, 0.5))).unwrap();
        let q = s.alloc_zeros::<f16>(b * nh * t * hd).unwrap();
        let (kn, vn) = (
            s.alloc_zeros::<f16>(rows * cap * hd).unwrap(),
            s.alloc_zeros::<f16>(rows * cap * hd).unwrap(),
        );
        let (cb, pv) = quant.sizes();
        let (kq, vq) = (s.alloc_zeros::<u8>(cb).unwrap(), s.alloc_zeros::<u8>(cb).unwrap());
        let (kp, vp) = (s.alloc_zeros::<f16>(pv).unwrap(), s.alloc_zeros::<f16>(pv).unwrap());
        let new = NewKv { gpu_rows: 0, k: addr(&kn), v: addr(&vn), cap, past };
        let packs = SplitPack { k: (addr(&kq), addr(&kp)), v: (addr(&vq), addr(&vp)), quant };
        // SAFETY: buffers allocated above for these shapes.
        unsafe {
            gpu.qkv_split(
                addr(&y),
                (Some(addr(&bias)), None),
                addr(&q),
                0,
                0,
                new,
                Some(packs),
                d,
                0.125,
            )
        }
        .unwrap();
        let mut same = true;
        for (x, codes, pairs) in [(&kn, &kq, &kp), (&vn, &vq, &vp)] {
            let x: Vec<f32> = s.clone_dtoh(x).unwrap().into_iter().map(f16::to_f32).collect();
            let want = quantize(
                &x[..qrows * cap * hd],
                &[qrows, cap, hd],
                QuantSpec { bits: 4, group: 64, dim: 2 },
            );
            let (codes, pairs) = (s.clone_dtoh(codes).unwrap(), s.clone_dtoh(pairs).unwrap());
            let (code_b, pair_v) = (hd / 2, hd / 64 * 2);
            for slot in 0..qrows * cap {
                let (c, p) =
                    (slot * code_b..(slot + 1) * code_b, slot * pair_v..(slot + 1) * pair_v);
                same &= if (past..past + t).contains(&(slot % cap)) {
                    codes[c.clone()] == want.data[c] && pairs[p.clone()] == want.params[p]
                } else {
                    codes[c].iter().all(|&v| v == 0) && pairs[p].iter().all(|v| v.to_f32() == 0.0)
                };
            }
        }
        let name = format!("qkv_split packing, hd {hd}, t {t}");
        println!(
            "{name:<28} {}",
            if same { "same bytes as the CPU  ok" } else { "FAIL: bytes differ" }
        );
        if !same {
            failures.push(name);
        }
    }
}

/// Prefill attention (`Gpu::attention_prefill`) with room in its scores for a few cache rows at a
/// time against room for all of them: the same context, whether the rows come in one call or two
/// (as the CUDA stage attends GPU rows and the others apart), with left padding and grouped-query
/// heads.
fn check_prefill_attention(gpu: &Gpu, failures: &mut Vec<String>) {
    let s_ = gpu.stream.clone();
    let (b, t, nh, nkv, hd, cap) = (3usize, 20usize, 8usize, 2usize, 64usize, 24usize);
    let (rows, m) = (b * nkv, nh / nkv * t);
    let half = |x: Tensor| {
        let v: Vec<f16> = x.to_vec1_f32().into_iter().map(f16::from_f32).collect();
        s_.clone_htod(&v).unwrap()
    };
    let (q, k, v) = (
        half(rand(&[b * nh * t * hd], 41, 0.3)),
        half(rand(&[rows * cap * hd], 42, 1.0)),
        half(rand(&[rows * cap * hd], 43, 1.0)),
    );
    let starts = s_.clone_htod(&[0i32, 3, 11]).unwrap();
    let d = AttnDims { b, t, nh, nkv, hd, cap, past: 0 };
    let scores = s_.alloc_zeros::<f16>(rows * m * t).unwrap();
    let run = |room_rows: usize, split: usize| {
        let ctx = s_.alloc_zeros::<f16>(b * nh * t * hd).unwrap();
        let room = (addr(&scores), room_rows * m * t);
        for r in [0..split, split..rows] {
            let (kr, vr) = (at(addr(&k), r.start * cap * hd), at(addr(&v), r.start * cap * hd));
            // SAFETY: buffers allocated above for these shapes.
            unsafe {
                gpu.attention_prefill(addr(&q), kr, vr, cap, addr(&starts), room, addr(&ctx), d, r)
            }
            .unwrap();
        }
        let got: Vec<f32> = s_.clone_dtoh(&ctx).unwrap().iter().map(|x| x.to_f32()).collect();
        Tensor::from_vec(got, (b * nh * t, hd), &Device::Cpu).unwrap()
    };
    let whole = run(rows, 0);
    for (room, split) in [(2, 0), (1, 0), (4, 3), (2, 5)] {
        let name = format!("attention_prefill, scores {room} rows at a time, calls at row {split}");
        compare(&name, &run(room, split), &whole, failures);
    }
}

/// Decode attention (`Gpu::attention_decode`) against a plain loop: heads of 128 and 64 values
/// (the kernel's vector path, with grouped-query heads) and of 80 (value by value), rows with
/// left padding.
fn check_decode_attention(gpu: &Gpu, failures: &mut Vec<String>) {
    let s_ = gpu.stream.clone();
    for (hd, nh, nkv) in [(128usize, 4usize, 4usize), (64, 8, 2), (80, 2, 2)] {
        let (b, cap, past) = (3usize, 300usize, 280usize);
        let s = past + 1;
        let starts = [0i32, 5, 117];
        let rep = nh / nkv;
        let q = rand(&[b * nh, hd], 31, 0.3).to_vec1_f32();
        let k = rand(&[b * nkv, cap, hd], 32, 1.0).to_vec1_f32();
        let v = rand(&[b * nkv, cap, hd], 33, 1.0).to_vec1_f32();
        let half = |x: &[f32]| x.iter().map(|&v| f16::from_f32(v)).collect::<Vec<_>>();
        let mut want = vec![0f32; b * nh * hd];
        for r in 0..b * nh {
            let (bi, kvr) = (r / nh, r / rep);
            let lo = usize::try_from(starts[bi]).expect("a start");
            let score = |j: usize| -> f32 {
                (0..hd).map(|d| q[r * hd + d] * k[(kvr * cap + j) * hd + d]).sum()
            };
            let scores: Vec<f32> = (lo..s).map(score).collect();
            let m = scores.iter().fold(f32::MIN, |a, &x| a.max(x));
            let e: Vec<f32> = scores.iter().map(|x| (x - m).exp()).collect();
            let total: f32 = e.iter().sum();
            for d in 0..hd {
                let o: f32 = (lo..s).zip(&e).map(|(j, p)| p * v[(kvr * cap + j) * hd + d]).sum();
                want[r * hd + d] = o / total;
            }
        }
        let (gq, gk, gv) = (
            s_.clone_htod(&half(&q)).unwrap(),
            s_.clone_htod(&half(&k)).unwrap(),
            s_.clone_htod(&half(&v)).unwrap(),
        );
        let gs = s_.clone_htod(&starts).unwrap();
        let go = s_.alloc_zeros::<f16>(b * nh * hd).unwrap();
        let d = AttnDims { b, t: 1, nh, nkv, hd, cap, past };
        // SAFETY: buffers allocated above for these shapes.
        unsafe {
            gpu.attention_decode(
                addr(&gq),
                addr(&gk),
                addr(&gv),
                cap,
                addr(&gs),
                addr(&go),
                d,
                0..b * nkv,
            )
        }
        .unwrap();
        let got: Vec<f32> = s_.clone_dtoh(&go).unwrap().iter().map(|x| x.to_f32()).collect();
        let t = |v: Vec<f32>| Tensor::from_vec(v, (b * nh, hd), &Device::Cpu).unwrap();
        compare(&format!("attention_decode hd {hd} gqa {rep}"), &t(got), &t(want), failures);
        if hd != 80 {
            let (direct, expanded) = q4_and_expanded(gpu, (&gq, &gk, &gv, &gs), d);
            let name = format!("attention_decode_q4 hd {hd} gqa {rep} (against expanded)");
            compare(&name, &t(direct), &t(expanded), failures);
        }
    }
    time_q4_attention(gpu);
}

type Dev<T> = flexgen_tensor::cuda::CudaSlice<T>;

/// Packs positions 0..past of `k`, `v` (4 bits, groups of 64), then attends once from the codes
/// (`attention_decode_q4`, the new position from `k`, `v`) and once over the cache expanded by
/// `dequant_cache` into a copy of `k`, `v`: the two outputs.
fn q4_and_expanded(
    gpu: &Gpu,
    (q, k, v, starts): (&Dev<f16>, &Dev<f16>, &Dev<f16>, &Dev<i32>),
    d: AttnDims,
) -> (Vec<f32>, Vec<f32>) {
    let s = &gpu.stream;
    let rows = d.b * d.nkv;
    let c = CacheQuant { rows, cap: d.cap, hd: d.hd, group: 64, bits: 4 };
    let (cb, pb) = c.sizes();
    let (kc, vc) = (s.alloc_zeros::<u8>(cb).unwrap(), s.alloc_zeros::<u8>(cb).unwrap());
    let (kp, vp) = (s.alloc_zeros::<f16>(pb).unwrap(), s.alloc_zeros::<f16>(pb).unwrap());
    let (ke, ve) = (s.clone_dtod(k).unwrap(), s.clone_dtod(v).unwrap());
    let (o1, o2) = (
        s.alloc_zeros::<f16>(d.b * d.nh * d.hd).unwrap(),
        s.alloc_zeros::<f16>(d.b * d.nh * d.hd).unwrap(),
    );
    // SAFETY: buffers allocated above for these shapes.
    unsafe {
        let kv = [(addr(k), addr(&kc), addr(&kp)), (addr(v), addr(&vc), addr(&vp))];
        gpu.quant_cache(&kv, c, (0, d.past)).unwrap();
        gpu.dequant_cache(addr(&kc), addr(&kp), addr(&ke), c, (0, d.past)).unwrap();
        gpu.dequant_cache(addr(&vc), addr(&vp), addr(&ve), c, (0, d.past)).unwrap();
        gpu.attention_decode(
            addr(q),
            addr(&ke),
            addr(&ve),
            d.cap,
            addr(starts),
            addr(&o1),
            d,
            0..rows,
        )
        .unwrap();
        let packed = [addr(&kc), addr(&kp), addr(&vc), addr(&vp)];
        gpu.attention_decode_q4(
            addr(q),
            packed,
            (addr(k), addr(v)),
            d.cap,
            addr(starts),
            addr(&o2),
            d,
            (rows, 64),
        )
        .unwrap();
    }
    let f = |o: &Dev<f16>| s.clone_dtoh(o).unwrap().iter().map(|x| x.to_f32()).collect();
    (f(&o2), f(&o1))
}

/// Times decode attention over a 4-bit cache at OPT-175B's shape (32 sequences, 96 heads of 128,
/// 528 positions): from the codes, against expanding K and V then attending.
fn time_q4_attention(gpu: &Gpu) {
    let s = &gpu.stream;
    let (b, nh, hd, cap, past) = (32usize, 96usize, 128usize, 544usize, 527usize);
    let rows = b * nh;
    let c = CacheQuant { rows, cap, hd, group: 64, bits: 4 };
    let (cb, pb) = c.sizes();
    let (kc, kp) = (s.alloc_zeros::<u8>(cb).unwrap(), s.alloc_zeros::<f16>(pb).unwrap());
    let (kn, vn) = (
        s.alloc_zeros::<f16>(rows * cap * hd).unwrap(),
        s.alloc_zeros::<f16>(rows * cap * hd).unwrap(),
    );
    let q = s.alloc_zeros::<f16>(rows * hd).unwrap();
    let o = s.alloc_zeros::<f16>(rows * hd).unwrap();
    let st = s.alloc_zeros::<i32>(b).unwrap();
    let d = AttnDims { b, t: 1, nh, nkv: nh, hd, cap, past };
    let packed = [addr(&kc), addr(&kp), addr(&kc), addr(&kp)];
    // SAFETY (both): buffers allocated above for these shapes.
    let direct = gpu.time_ms(10, || unsafe {
        gpu.attention_decode_q4(
            addr(&q),
            packed,
            (addr(&kn), addr(&vn)),
            cap,
            addr(&st),
            addr(&o),
            d,
            (rows, 64),
        )
        .unwrap();
    });
    let expanded = gpu.time_ms(10, || unsafe {
        gpu.dequant_cache(addr(&kc), addr(&kp), addr(&kn), c, (0, past)).unwrap();
        gpu.dequant_cache(addr(&kc), addr(&kp), addr(&vn), c, (0, past)).unwrap();
        gpu.attention_decode(addr(&q), addr(&kn), addr(&vn), cap, addr(&st), addr(&o), d, 0..rows)
            .unwrap();
    });
    let gb = 2.0 * (cb + 2 * pb) as f64 * (past as f64 / cap as f64) / 1e9;
    println!(
        "time decode attention, 4-bit cache, {rows} rows × {} positions × {hd}: from the codes {direct:.3} ms ({:.0} GB/s of codes), expanded first {expanded:.3} ms",
        past + 1,
        gb / direct * 1e3
    );
}

trait ToVec {
    fn to_vec1_f32(&self) -> Vec<f32>;
}
impl ToVec for Tensor {
    fn to_vec1_f32(&self) -> Vec<f32> {
        self.flatten_all().unwrap().to_vec1().unwrap()
    }
}

/// Times the kernels a compressed OPT-30B decode step runs per layer (h 7168, 56 heads of 128,
/// 544 positions, a GPU batch of 32): dequantizing the layer's 12·h² weights, dequantizing the
/// past of a packed cache, packing one new position, and decode attention.
/// The norm with a pre-bias (`x += b`, then LayerNorm) against a plain f64 loop over the same fp16
/// sum, and bit for bit against `bias_act` then the norm, at decode and prefill row counts and a
/// row too wide for the registers (the kernel's loop).
fn check_bias_norm(gpu: &Gpu, failures: &mut Vec<String>) {
    let s = &gpu.stream;
    for (n, h) in [(5usize, 256usize), (300, 4096), (3, 12288), (2, 20000)] {
        let v = |seed, len, scale| -> Vec<f16> {
            let t = rand(&[len], seed, scale);
            t.to_vec1::<f32>().unwrap().into_iter().map(f16::from_f32).collect()
        };
        let (x, pb, w, b) = (v(11, n * h, 2.0), v(12, h, 0.5), v(13, h, 1.0), v(14, h, 0.2));
        let (dpb, dw, db) =
            (s.clone_htod(&pb).unwrap(), s.clone_htod(&w).unwrap(), s.clone_htod(&b).unwrap());
        let (x1, x2) = (s.clone_htod(&x).unwrap(), s.clone_htod(&x).unwrap());
        let (y1, y2) = (s.alloc_zeros::<f16>(n * h).unwrap(), s.alloc_zeros::<f16>(n * h).unwrap());
        let (pa, wa, ba) = (addr(&dpb), addr(&dw), addr(&db));
        // SAFETY: buffers allocated above for these shapes.
        unsafe {
            gpu.bias_act_raw(addr(&x1), pa, (n, h, h), false).unwrap();
            gpu.norm_raw(addr(&x1), None, wa, Some(ba), addr(&y1), n, h, 1e-5).unwrap();
            gpu.norm_raw(addr(&x2), Some(pa), wa, Some(ba), addr(&y2), n, h, 1e-5).unwrap();
        }
        let (x1, x2) = (s.clone_dtoh(&x1).unwrap(), s.clone_dtoh(&x2).unwrap());
        let (y1, y2) = (s.clone_dtoh(&y1).unwrap(), s.clone_dtoh(&y2).unwrap());
        let same = x1 == x2 && y1 == y2;
        let mut err = 0f64;
        for r in 0..n {
            let row: Vec<f64> = (0..h)
                .map(|i| f64::from(f16::from_f32(x[r * h + i].to_f32() + pb[i].to_f32()).to_f32()))
                .collect();
            let m = row.iter().sum::<f64>() / h as f64;
            let var = row.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / h as f64;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for i in 0..h {
                let want = (row[i] - m) * inv * f64::from(w[i].to_f32()) + f64::from(b[i].to_f32());
                err = err.max((f64::from(y2[r * h + i].to_f32()) - want).abs());
            }
        }
        let ok = same && err < 2e-2;
        println!(
            "bias + layer_norm {n}×{h}: same bits as bias_act then norm: {same}, max |gpu − f64| {err:.2e}  {}",
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(format!("bias + layer_norm {n}×{h}"));
        }
    }
}

/// `Gpu::gemm_bias` (cuBLASLt's bias and ReLU epilogue, accumulating into the output or not,
/// into contiguous rows or rows `pad` values longer: a slice of a wider output) against an f64
/// loop and against the GEMM then `bias_act_raw`, the padding left as it was; then, at OPT-6.7B's MLP shapes
/// for 64 rows, the time of each.
fn check_gemm_bias(gpu: &Gpu, failures: &mut Vec<String>) {
    let s = &gpu.stream;
    let v = |seed, len, scale| -> Vec<f16> {
        let t = rand(&[len], seed, scale);
        t.to_vec1::<f32>().unwrap().into_iter().map(f16::from_f32).collect()
    };
    let cases = [
        (64usize, 4096usize, 1024usize, true, false, 0usize),
        (64, 1024, 4096, false, true, 0),
        (7, 1000, 256, true, true, 0),
        (300, 512, 256, false, false, 0),
        (64, 1024, 512, true, false, 3072),
        (200, 512, 256, false, true, 64),
    ];
    for (m, n, k, relu, acc, pad) in cases {
        let ld = n + pad;
        let (x, w, b, c0) =
            (v(21, m * k, 1.0), v(22, n * k, 0.05), v(23, n, 0.5), v(24, m * ld, 1.0));
        let (dx, dw, db) =
            (s.clone_htod(&x).unwrap(), s.clone_htod(&w).unwrap(), s.clone_htod(&b).unwrap());
        let (y1, y2) = (s.clone_htod(&c0).unwrap(), s.clone_htod(&c0).unwrap());
        let g = |y| Gemm { ldc: ld, ..Gemm::linear(m, n, k, addr(&dx), addr(&dw), y, acc) };
        // SAFETY: buffers allocated above for these shapes.
        unsafe {
            gpu.gemm_bias(&g(addr(&y1)), addr(&db), relu).unwrap();
            gpu.gemm(&g(addr(&y2))).unwrap();
            gpu.bias_act_raw(addr(&y2), addr(&db), (m, n, ld), relu).unwrap();
        }
        let (y1, y2) = (s.clone_dtoh(&y1).unwrap(), s.clone_dtoh(&y2).unwrap());
        let (mut err, mut err2, mut top) = (0f64, 0f64, 0f64);
        let kept = (0..m).all(|r| (n..ld).all(|o| y1[r * ld + o] == c0[r * ld + o]));
        for r in 0..m {
            for o in 0..n {
                let mut want = f64::from(b[o].to_f32())
                    + if acc { f64::from(c0[r * ld + o].to_f32()) } else { 0.0 };
                for i in 0..k {
                    want += f64::from(x[r * k + i].to_f32()) * f64::from(w[o * k + i].to_f32());
                }
                if relu {
                    want = want.max(0.0);
                }
                top = top.max(want.abs());
                err = err.max((f64::from(y1[r * ld + o].to_f32()) - want).abs());
                err2 = err2.max((f64::from(y2[r * ld + o].to_f32()) - want).abs());
            }
        }
        let ok = kept && err <= 1e-2 * top.max(1.0) && err <= 2.0 * err2 + 1e-3 * top;
        println!(
            "gemm_bias {m}×{k}·({n}×{k})ᵀ relu {relu} accumulate {acc} rows of {ld}, padding kept {kept}: max |gpu − f64| {err:.2e} (GEMM then bias_act {err2:.2e}) of max {top:.2e}  {}",
            if ok { "ok" } else { "FAIL" }
        );
        if !ok {
            failures.push(format!("gemm_bias {m}×{n}×{k}"));
        }
    }
    for (n, k, relu, acc) in [(16384usize, 4096usize, true, false), (4096, 16384, false, true)] {
        let m = 64;
        let (x, w, y) = (
            s.alloc_zeros::<f16>(m * k).unwrap(),
            s.alloc_zeros::<f16>(n * k).unwrap(),
            s.alloc_zeros::<f16>(m * n).unwrap(),
        );
        let b = s.alloc_zeros::<f16>(n).unwrap();
        let g = Gemm::linear(m, n, k, addr(&x), addr(&w), addr(&y), acc);
        // SAFETY (both): buffers allocated above for these shapes.
        let fused = gpu.time_ms(20, || unsafe { gpu.gemm_bias(&g, addr(&b), relu) }.unwrap());
        let apart = gpu.time_ms(20, || unsafe {
            gpu.gemm(&g).unwrap();
            gpu.bias_act_raw(addr(&y), addr(&b), (m, n, n), relu).unwrap();
        });
        println!(
            "time gemm_bias {m}×{k}·({n}×{k})ᵀ relu {relu}: {fused:.4} ms; GEMM then bias_act {apart:.4} ms"
        );
    }
}

fn time_kernels(gpu: &Gpu) {
    let (h, nh, hd, cap, b) = (7168usize, 56, 128, 544, 32);
    let s = &gpu.stream;
    let bits = 4;
    // One layer's four matrices: 3h×h, h×h, 4h×h, h×4h (rows × cols), 12h² values.
    let elems = 12 * h * h;
    let codes = s.alloc_zeros::<u8>(elems / 2).unwrap();
    let params = s.alloc_zeros::<f16>(elems / 64 * 2).unwrap();
    let out = s.alloc_zeros::<f16>(elems).unwrap();
    let mats = [(3 * h, h), (h, h), (4 * h, h), (h, 4 * h)];
    let ms = gpu.time_ms(5, || {
        let mut off = 0;
        for (r, c) in mats {
            let (co, po) = (addr(&codes) + (off / 2) as u64, at(addr(&params), off / 32));
            // SAFETY: buffers allocated above for these shapes.
            unsafe { gpu.dequant_dim0(co, po, at(addr(&out), off), (r, c), 0..r, 64, bits) }
                .unwrap();
            off += r * c;
        }
    });
    let gb = (elems as f64 * 2.5625) / 1e9;
    println!(
        "time dequant_dim0, one OPT-30B layer (12h² = {elems} values): {ms:.3} ms ({:.0} GB/s read+written)",
        gb / ms * 1e3
    );
    let rows = b * nh;
    let q = CacheQuant { rows, cap, hd, group: 64, bits };
    let (cb, pb) = q.sizes();
    let cc = s.alloc_zeros::<u8>(cb).unwrap();
    let cp = s.alloc_zeros::<f16>(pb).unwrap();
    let kv = s.alloc_zeros::<f16>(rows * cap * hd).unwrap();
    let ms =
        // SAFETY: buffers allocated above for these shapes.
        gpu.time_ms(5, || unsafe { gpu.dequant_cache(addr(&cc), addr(&cp), addr(&kv), q, (0, 543)) }.unwrap());
    println!(
        "time dequant_cache, {rows} rows × 543 positions × {hd} (k or v of one layer, batch {b}): {ms:.3} ms"
    );
    let ms =
        // SAFETY: buffers allocated above for these shapes.
        gpu.time_ms(5, || unsafe { gpu.quant_cache(&[(addr(&kv), addr(&cc), addr(&cp))], q, (543, 1)) }.unwrap());
    println!("time quant_cache, one new position of {rows} rows: {ms:.3} ms");
    let qv = s.alloc_zeros::<f16>(rows * hd).unwrap();
    let start = s.alloc_zeros::<i32>(b).unwrap();
    let o = s.alloc_zeros::<f16>(rows * hd).unwrap();
    let d = AttnDims { b, t: 1, nh, nkv: nh, hd, cap, past: 543 };
    let ms = gpu.time_ms(5, || {
        // SAFETY: buffers allocated above for these shapes.
        unsafe {
            gpu.attention_decode(
                addr(&qv),
                addr(&kv),
                addr(&kv),
                cap,
                addr(&start),
                addr(&o),
                d,
                0..rows,
            )
        }
        .unwrap();
    });
    println!("time attention_decode, batch {b}, 544 positions: {ms:.3} ms");
    time_row_kernels(gpu);
}

/// Times the per-row kernels of a decode step (a norm, a bias and activation) at decode and
/// prefill row counts, 100 launches per timed call; the norm with the threads `norm_raw` picks
/// and with 256.
fn time_row_kernels(gpu: &Gpu) {
    let s = &gpu.stream;
    for (n, h) in [(64usize, 4096usize), (64, 7168), (64, 12288), (2048, 4096)] {
        let x = s.alloc_zeros::<f16>(n * h * 4).unwrap();
        let w = s.alloc_zeros::<f16>(h * 4).unwrap();
        let picked = norm_threads(n, h);
        for threads in [picked, 256] {
            let ms = gpu.time_ms(5, || {
                for _ in 0..100 {
                    // SAFETY: buffers allocated above for these shapes.
                    unsafe {
                        gpu.norm_raw_threads(
                            (addr(&x), None),
                            addr(&w),
                            Some(addr(&w)),
                            addr(&x),
                            (n, h),
                            1e-5,
                            threads,
                        )
                    }
                    .unwrap();
                }
            });
            println!("time layer_norm {n}×{h}, {threads} threads: {:.1} µs", ms * 10.0);
        }
        let ms = gpu.time_ms(5, || {
            for _ in 0..100 {
                // SAFETY: buffers allocated above for these shapes.
                unsafe { gpu.bias_act_raw(addr(&x), addr(&w), (n, 4 * h, 4 * h), true) }.unwrap();
            }
        });
        println!("time bias_act {n}×{}: {:.1} µs", 4 * h, ms * 10.0);
    }
}
