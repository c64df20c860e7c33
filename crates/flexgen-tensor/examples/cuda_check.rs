//! Checks every GPU operation against the CPU operation of the same name on seeded random data and
//! prints the error; exits non-zero if one exceeds the fp16 tolerance. Run on a GPU machine:
//! `cargo run --release -p flexgen-tensor --example cuda_check`.

#![expect(clippy::print_stdout, reason = "a check program prints its table")]

use flexgen_tensor::cuda::Gpu;
use flexgen_tensor::{Device, Tensor};

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
        gpu.layer_norm(&gx, &gpu.upload(&lw).unwrap(), &gpu.upload(&lb).unwrap(), 1e-5).unwrap();
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

    if failures.is_empty() {
        println!("all GPU operations match the CPU within fp16 tolerance");
    } else {
        println!("FAILED: {failures:?}");
        std::process::exit(1);
    }
}
