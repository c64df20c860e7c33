//! The dequantizing CUDA kernels, run on the CPU: their source is taken from `kernels.cu`, compiled
//! with the host's C++ compiler inside a small harness that plays every thread of the grid in turn
//! (these kernels share nothing between threads: no shared memory, no warp shuffles), and their
//! outputs are compared with `quant::dequantize` (the cache kernel on both its vector path and its
//! value-by-value one). This checks the kernels' indexing in CI, which has no GPU; the GPU machine checks them
//! again (`examples/cuda_check.rs`).

use std::path::Path;
use std::process::Command;

use flexgen_tensor::quant::{QuantSpec, dequantize, quantize};
use half::f16;

const KERNELS: &str = include_str!("../src/cuda/kernels.cu");

/// The text of kernel `name` (from its signature to the next blank-line-separated comment).
fn kernel(name: &str) -> &'static str {
    let start = KERNELS
        .find(&format!("extern \"C\" __global__ void {name}("))
        .unwrap_or_else(|| panic!("{name} in kernels.cu"));
    let end = KERNELS[start..].find("\n}\n").expect("the kernel's closing brace") + start + 3;
    &KERNELS[start..end]
}

const PRELUDE: &str = r#"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include <algorithm>
typedef unsigned short half_t;
struct D3 { unsigned x, y, z; };
static D3 blockIdx, threadIdx, blockDim, gridDim;
struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
#define __global__
static inline float h2f(half_t h) { _Float16 f; memcpy(&f, &h, 2); return (float)f; }
static inline half_t f2h(float x) { _Float16 f = (_Float16)x; half_t h; memcpy(&h, &f, 2); return h; }
using std::min;
static std::vector<unsigned char> slurp(const char* p) {
    FILE* f = fopen(p, "rb"); std::vector<unsigned char> v;
    if (!f) { perror(p); exit(2); }
    int c; while ((c = fgetc(f)) != EOF) v.push_back((unsigned char)c);
    fclose(f); return v;
}
static void dump(const char* p, const std::vector<half_t>& v) {
    FILE* f = fopen(p, "wb"); fwrite(v.data(), 2, v.size(), f); fclose(f);
}
// Runs every thread of a grid of gx × gy blocks of 256.
template <class F> static void grid(unsigned gx, unsigned gy, F f) {
    blockDim = {256, 1, 1}; gridDim = {gx, gy, 1};
    for (unsigned by = 0; by < gy; by++) for (unsigned bx = 0; bx < gx; bx++)
        for (unsigned tx = 0; tx < 256; tx++) { blockIdx = {bx, by, 0}; threadIdx = {tx, 0, 0}; f(); }
}
"#;

/// Compiles `main` with the kernels named, in `dir`; returns the program.
fn build(dir: &Path, kernels: &[&str], main: &str) -> std::path::PathBuf {
    let src = dir.join("harness.cpp");
    let mut text = PRELUDE.to_string();
    for k in kernels {
        text.push_str(kernel(k));
    }
    text.push_str(main);
    std::fs::write(&src, text).unwrap();
    let exe = dir.join("harness");
    let out = Command::new("c++")
        .args(["-std=c++17", "-O1", "-o"])
        .arg(&exe)
        .arg(&src)
        .output()
        .expect("a C++ compiler (c++) on PATH: CI installs build-essential");
    assert!(
        out.status.success(),
        "compiling the harness: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    exe
}

fn write_bytes(path: &Path, b: &[u8]) {
    std::fs::write(path, b).unwrap();
}

fn params_bytes(p: &[f16]) -> Vec<u8> {
    p.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn read_f16(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32())
        .collect()
}

/// Within one fp16 rounding of the reference (the GPU may fuse min + code·scale).
fn assert_close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: sizes");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = f32::from(f16::EPSILON) * w.abs().max(1.0);
        assert!((g - w).abs() <= tol, "{label}: value {i}: kernel {g}, reference {w}");
    }
}

fn data(n: usize, seed: u64) -> Vec<f32> {
    let mut z = seed;
    (0..n)
        .map(|_| {
            z = z.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            #[expect(clippy::cast_precision_loss, reason = "test data")]
            let u = (z >> 40) as f32 / (1u64 << 24) as f32;
            f16::from_f32((u - 0.4) * 3.0).to_f32()
        })
        .collect()
}

#[test]
fn dequant_dim0_matches_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build(
        dir.path(),
        &["dequant_dim0"],
        r"
int main(int argc, char** argv) {
    int rows = atoi(argv[1]), cols = atoi(argv[2]), gs = atoi(argv[3]), bits = atoi(argv[4]);
    auto codes = slurp(argv[5]); auto pb = slurp(argv[6]);
    std::vector<half_t> params(pb.size() / 2); memcpy(params.data(), pb.data(), pb.size());
    std::vector<half_t> out(rows * cols, 0);
    grid(3, 1, [&] { dequant_dim0(codes.data(), params.data(), out.data(), rows, cols, gs, bits); });
    dump(argv[7], out);
}
",
    );
    for (rows, cols, group, bits) in
        [(200, 40, 64, 4u8), (130, 16, 64, 8), (64, 8, 64, 4), (1000, 24, 32, 4), (77, 37, 16, 8)]
    {
        let x = data(rows * cols, (rows * cols) as u64);
        let p = quantize(&x, &[rows, cols], QuantSpec { bits, group, dim: 0 });
        let want = dequantize(&p);
        let (c, pa) = (dir.path().join("codes"), dir.path().join("params"));
        write_bytes(&c, &p.data);
        write_bytes(&pa, &params_bytes(&p.params));
        let o = dir.path().join("out");
        let st = Command::new(&exe)
            .args([rows, cols, group, usize::from(bits)].map(|v| v.to_string()))
            .args([&c, &pa, &o])
            .status()
            .unwrap();
        assert!(st.success());
        assert_close(&format!("{rows}×{cols}, group {group}, {bits}-bit"), &read_f16(&o), &want);
    }
}

#[test]
fn dequant_cache_matches_the_reference_on_both_paths() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build(
        dir.path(),
        &["dequant_cache"],
        r"
int main(int argc, char** argv) {
    int rows = atoi(argv[1]), cap = atoi(argv[2]), hd = atoi(argv[3]), gs = atoi(argv[4]), bits = atoi(argv[5]);
    int p0 = atoi(argv[6]), np = atoi(argv[7]);
    auto codes = slurp(argv[8]); auto pb = slurp(argv[9]);
    std::vector<half_t> params(pb.size() / 2); memcpy(params.data(), pb.data(), pb.size());
    for (int vec = 0; vec < 2; vec++) {
        std::vector<half_t> out(rows * cap * hd, 0);
        grid(2, rows, [&] { dequant_cache(codes.data(), params.data(), out.data(), rows, cap, hd, gs, bits, p0, np, vec); });
        dump(argv[10 + vec], out);
    }
}
",
    );
    let (p0, np) = (2, 4);
    for (rows, cap, hd, group, bits) in
        [(5, 7, 40, 16, 4u8), (5, 7, 40, 16, 8), (3, 9, 128, 64, 4), (4, 7, 36, 64, 4)]
    {
        let x = data(rows * cap * hd, (rows * cap * hd) as u64);
        let p = quantize(&x, &[rows, cap, hd], QuantSpec { bits, group, dim: 2 });
        let full = dequantize(&p);
        let want: Vec<f32> = (0..full.len())
            .map(|i| if (p0..p0 + np).contains(&(i / hd % cap)) { full[i] } else { 0.0 })
            .collect();
        let (c, pa) = (dir.path().join("codes"), dir.path().join("params"));
        write_bytes(&c, &p.data);
        write_bytes(&pa, &params_bytes(&p.params));
        let (o0, o1) = (dir.path().join("out0"), dir.path().join("out1"));
        let st = Command::new(&exe)
            .args([rows, cap, hd, group, usize::from(bits), p0, np].map(|v| v.to_string()))
            .args([&c, &pa, &o0, &o1])
            .status()
            .unwrap();
        assert!(st.success());
        let label = format!("{rows} rows × {cap} × {hd}, group {group}, {bits}-bit");
        assert_close(&format!("{label}, value by value"), &read_f16(&o0), &want);
        if group % 8 == 0 && hd % 8 == 0 {
            assert_close(&format!("{label}, 8 values a thread"), &read_f16(&o1), &want);
        }
    }
}
