//! The dequantizing CUDA kernels, run on the CPU: their source is taken from `kernels.cu`, compiled
//! with the host's C++ compiler inside a small harness that plays every thread of the grid in turn
//! (these kernels share nothing between threads: no shared memory, no warp shuffles), and their
//! outputs are compared with `quant::dequantize` (the cache kernel on both its vector path and its
//! value-by-value one). This checks the kernels' indexing in CI, which has no GPU; the GPU machine checks them
//! again (`examples/cuda_check.rs`).

use std::path::Path;
use std::process::Command;

use flexgen_tensor::cuda::exec::gemv4_plan;
use flexgen_tensor::quant::{QuantSpec, dequantize, quantize};
use half::f16;

const KERNELS: &str = include_str!("../src/cuda/kernels.cu");

/// The text of kernels.cu from `signature` to the closing brace of what it opens.
fn section(signature: &str) -> &'static str {
    let start = KERNELS.find(signature).unwrap_or_else(|| panic!("{signature} in kernels.cu"));
    let end = KERNELS[start..].find("\n}\n").expect("the closing brace") + start + 3;
    &KERNELS[start..end]
}

/// The text of kernel `name`.
fn kernel(name: &str) -> &'static str {
    section(&format!("extern \"C\" __global__ void {name}("))
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
    build_with(dir, "", kernels, main)
}

/// [`build`] with `before` (definitions the kernels need) ahead of the kernels.
fn build_with(dir: &Path, before: &str, kernels: &[&str], main: &str) -> std::path::PathBuf {
    let src = dir.join("harness.cpp");
    let mut text = PRELUDE.to_string();
    text.push_str(before);
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

/// The fused 4-bit product (`gemv4_dim0`: x × Wᵀ straight from W's codes) against x × the
/// reference dequantization of W, with several row tiles, slices and a partial last group: every
/// kernel whose tile holds the rows and whose words per thread suit the group, and the one
/// `gemv4_plan` picks among them.
#[test]
fn gemv4_dim0_matches_x_times_the_dequantized_weight() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_with(
        dir.path(),
        &format!(
            "static inline void atomicAdd(float* p, float v) {{ *p += v; }}\n\
             static inline float __int_as_float(int v) {{ float f; memcpy(&f, &v, 4); return f; }}\n\
             #define __device__\n#define __forceinline__ inline\n{}",
            [
                section("template <int PER>\n__device__ __forceinline__ void load_per("),
                section("__device__ __forceinline__ void x4("),
                section("template <int NB, int U, int V>")
            ]
            .concat()
        ),
        &["gemv4_dim0_1", "gemv4_dim0_2", "gemv4_dim0_4", "gemv4_dim0_8"],
        r#"
int main(int argc, char** argv) {
    int outs = atoi(argv[1]), ins = atoi(argv[2]), gs = atoi(argv[3]), nb = atoi(argv[4]), per_slice = atoi(argv[5]);
    int kernel = atoi(argv[10]), words = atoi(argv[11]), ldx = atoi(argv[12]);
    auto codes = slurp(argv[6]); auto pb = slurp(argv[7]); auto xb = slurp(argv[8]);
    codes.resize(codes.size() + 16, 0);
    std::vector<half_t> params(pb.size() / 2); memcpy(params.data(), pb.data(), pb.size());
    std::vector<half_t> xd(xb.size() / 2); memcpy(xd.data(), xb.data(), xb.size());
    std::vector<half_t> x((size_t)nb * ldx, 0);  // rows ldx apart
    for (int b = 0; b < nb; b++) for (int i = 0; i < ins; i++) x[(size_t)b * ldx + i] = xd[(size_t)b * ins + i];
    std::vector<float> y(nb * outs, 0.f);
    int threads = (outs + gs - 1) / gs * (gs / (8 * words)), slices = (ins + per_slice - 1) / per_slice;
    decltype(&gemv4_dim0_1) kernels[] = {gemv4_dim0_1, gemv4_dim0_2, gemv4_dim0_4, gemv4_dim0_8};
    const int tiles[] = {1, 2, 4, 8};
    for (int b0 = 0; b0 < nb; b0 += tiles[kernel]) {
        int tile = std::min(tiles[kernel], nb - b0);
        auto k = kernels[kernel];
        grid((threads + 255) / 256, slices, [&] { k((const unsigned char*)codes.data(), params.data(), x.data() + b0 * ldx, y.data() + b0 * outs, outs, ins, ldx, gs, tile, per_slice); });
    }
    FILE* f = fopen(argv[9], "wb"); fwrite(y.data(), 4, y.size(), f); fclose(f);
}
"#,
    );
    let mut runs = [0usize; 4];
    for (outs, ins, group, nb, per_slice) in [
        (200, 40, 64, 3, 1),
        (1000, 24, 32, 16, 7),
        (130, 300, 64, 5, 64),
        (64, 8, 64, 1, 8),
        (100, 70, 64, 1, 12),
        (96, 33, 32, 2, 5),
        (300, 50, 16, 2, 16),
        (77, 37, 16, 11, 3),
        (2100, 20, 8, 2, 2),
    ] {
        let w = data(outs * ins, (outs * ins) as u64);
        let p = quantize(&w, &[outs, ins], QuantSpec { bits: 4, group, dim: 0 });
        let wq = dequantize(&p);
        let x = data(nb * ins, 7 + nb as u64);
        let mut want = vec![0f32; nb * outs];
        for b in 0..nb {
            for o in 0..outs {
                want[b * outs + o] = (0..ins).map(|i| x[b * ins + i] * wq[o * ins + i]).sum();
            }
        }
        let (c, pa, xs, o) = (
            dir.path().join("codes"),
            dir.path().join("params"),
            dir.path().join("x"),
            dir.path().join("out"),
        );
        write_bytes(&c, &p.data);
        write_bytes(&pa, &params_bytes(&p.params));
        let xh: Vec<f16> = x.iter().map(|&v| f16::from_f32(v)).collect();
        write_bytes(&xs, &params_bytes(&xh));
        // Every kernel that may run these rows (the plan's among them), as the plan slices them
        // and as the case does.
        let tile = nb.min(8);
        let plan = gemv4_plan(tile, (outs, ins), group, 16, 2);
        let mut kernels: Vec<(usize, usize, usize)> = [(0, 4), (1, 2), (2, 1), (3, 1)]
            .into_iter()
            .filter(|&(k, v)| [1, 2, 4, 8][k] >= tile.min(4) && group.is_multiple_of(8 * v))
            .map(|(k, v)| (k, v, per_slice))
            .collect();
        kernels.push((plan.kernel, plan.words, plan.per_slice));
        for (kernel, words, per_slice) in kernels {
            runs[kernel] += 1;
            // x's rows apart by more than a row, for every other run (a SwiGLU's down
            // projection reads the first half of each row).
            let ldx = ins + (runs.iter().sum::<usize>() % 2) * 5;
            let st = Command::new(&exe)
                .args([outs, ins, group, nb, per_slice].map(|v| v.to_string()))
                .args([&c, &pa, &xs, &o])
                .args([kernel, words, ldx].map(|v| v.to_string()))
                .status()
                .unwrap();
            assert!(st.success());
            let got: Vec<f32> = std::fs::read(&o)
                .unwrap()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
                .collect();
            let label = format!(
                "{nb}×{ins} · ({outs}×{ins})ᵀ, group {group}, slices of {per_slice}, kernel {kernel}, x rows {ldx} apart"
            );
            assert_eq!(got.len(), want.len(), "{label}");
            // Sums of `ins` products in another order.
            #[expect(clippy::cast_precision_loss, reason = "a tolerance")]
            let tol = 1e-5 * (ins as f32) * 16.0;
            for (i, (g, w)) in got.iter().zip(&want).enumerate() {
                assert!((g - w).abs() <= tol, "{label}: value {i}: kernel {g}, reference {w}");
            }
        }
    }
    assert!(runs.iter().all(|&n| n > 0), "every kernel ran: {runs:?}");
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

/// The text of device function `name` (a helper the kernels call).
fn device_fn(name: &str) -> &'static str {
    section(&format!("__device__ __forceinline__ float {name}("))
}

fn f16_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| f16::from_f32(*x).to_le_bytes()).collect()
}

/// The fused q/k/v split with Qwen2's bias and rotary positions (grouped-query attention: 4 query
/// heads on 2 kv heads; the first 3 kv rows cached on the GPU, the rest in the new-row buffers),
/// against a plain reference of Hugging Face's `rotate_half`; and SwiGLU's in-place product.
#[test]
fn qkv_split_with_rotation_and_silu_mul_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let before = format!(
        "#include <cmath>\n#define __device__\n#define __forceinline__ inline\n\
         #define __expf expf\n{}",
        device_fn("rotate")
    );
    let exe = build_with(
        dir.path(),
        &before,
        &["qkv_split", "silu_mul"],
        r"
int main(int argc, char** argv) {
    int b = 3, t = 5, nh = 4, nkv = 2, hd = 16, cap = 12, past = 4, gr = 3, ncap = 12, npast = 4;
    auto yb = slurp(argv[1]); auto bb = slurp(argv[2]); auto pb = slurp(argv[3]); auto fb = slurp(argv[4]);
    std::vector<half_t> y(yb.size() / 2), bias(bb.size() / 2);
    memcpy(y.data(), yb.data(), yb.size()); memcpy(bias.data(), bb.data(), bb.size());
    std::vector<unsigned> pos(pb.size() / 4); memcpy(pos.data(), pb.data(), pb.size());
    std::vector<float> inv(fb.size() / 4); memcpy(inv.data(), fb.data(), fb.size());
    std::vector<half_t> q(b * nh * t * hd, 0), kc(gr * cap * hd, 0), vc(gr * cap * hd, 0);
    std::vector<half_t> kn((b * nkv - gr) * ncap * hd, 0), vn((b * nkv - gr) * ncap * hd, 0);
    grid(b * t, 1, [&] { qkv_split(y.data(), bias.data(), pos.data(), inv.data(), q.data(), kc.data(), vc.data(),
                                   kn.data(), vn.data(), gr, ncap, npast, t, nh, nkv, hd, cap, past, 0.25f); });
    dump(argv[5], q); dump(argv[6], kc); dump(argv[7], vc); dump(argv[8], kn); dump(argv[9], vn);
    // SwiGLU in place over rows of [gate | up], f = 24.
    int rows = 7, f = 24;
    std::vector<half_t> g(rows * 2 * f);
    for (size_t i = 0; i < g.size(); i++) g[i] = y[i % y.size()];
    grid(rows, 1, [&] { silu_mul(g.data(), g.data() + f, g.data(), f, 2 * f, 2 * f); });
    dump(argv[10], g);
}
",
    );
    let (b, t, nh, nkv, hd, cap, past, gr, ncap, npast) = (3, 5, 4, 2, 16, 12, 4, 3, 12, 4);
    let (h, kv) = (nh * hd, nkv * hd);
    let w = h + 2 * kv;
    let y = data(b * t * w, 7);
    let bias = data(w, 9);
    let pos: Vec<u32> = (0..b * t).map(|i| u32::try_from(i * 977 % 5000).unwrap()).collect();
    #[expect(clippy::cast_precision_loss, reason = "small integers")]
    let inv: Vec<f32> =
        (0..hd / 2).map(|i| 1.0 / 500_000f32.powf((2 * i) as f32 / hd as f32)).collect();
    let p = |n: &str| dir.path().join(n);
    write_bytes(&p("y"), &f16_bytes(&y));
    write_bytes(&p("bias"), &f16_bytes(&bias));
    write_bytes(&p("pos"), &pos.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    write_bytes(&p("inv"), &inv.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let st = Command::new(&exe)
        .args([p("y"), p("bias"), p("pos"), p("inv"), p("q"), p("kc"), p("vc"), p("kn"), p("vn")])
        .arg(p("g"))
        .status()
        .unwrap();
    assert!(st.success());
    // The reference, in f64.
    let mut q = vec![0f32; b * nh * t * hd];
    let (mut kc, mut vc) = (vec![0f32; gr * cap * hd], vec![0f32; gr * cap * hd]);
    let (mut kn, mut vn) =
        (vec![0f32; (b * nkv - gr) * ncap * hd], vec![0f32; (b * nkv - gr) * ncap * hd]);
    for row in 0..b * t {
        let (bi, ti) = (row / t, row % t);
        let val = |c: usize| f64::from(y[row * w + c]) + f64::from(bias[c]);
        for c in 0..w {
            let d = c % hd;
            let mut v = val(c);
            if c < h + kv {
                let half = hd / 2;
                let partner = val(c - d + if d < half { d + half } else { d - half });
                let angle = f64::from(pos[row] as f32 * inv[d % half]);
                let (s, co) = angle.sin_cos();
                v = if d < half { v * co - partner * s } else { v * co + partner * s };
            }
            #[expect(clippy::cast_possible_truncation, reason = "compared in fp16")]
            let v = v as f32;
            if c < h {
                q[((bi * nh + c / hd) * t + ti) * hd + d] = v * 0.25;
            } else {
                let c2 = c - h;
                let (is_v, c2) = if c2 >= kv { (true, c2 - kv) } else { (false, c2) };
                let r = bi * nkv + c2 / hd;
                if r < gr {
                    let dst = if is_v { &mut vc } else { &mut kc };
                    dst[(r * cap + past + ti) * hd + d] = v;
                } else {
                    let dst = if is_v { &mut vn } else { &mut kn };
                    dst[((r - gr) * ncap + npast + ti) * hd + d] = v;
                }
            }
        }
    }
    // fp16 outputs of fp32 arithmetic: within a few fp16 roundings of the largest value.
    let close = |label: &str, got: &[f32], want: &[f32]| {
        assert_eq!(got.len(), want.len(), "{label}: sizes");
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!(
                (g - w).abs() <= 4e-3 * w.abs().max(1.0),
                "{label} {i}: kernel {g}, reference {w}"
            );
        }
    };
    close("q", &read_f16(&p("q")), &q);
    close("k cache", &read_f16(&p("kc")), &kc);
    close("v cache", &read_f16(&p("vc")), &vc);
    close("new k", &read_f16(&p("kn")), &kn);
    close("new v", &read_f16(&p("vn")), &vn);
    let (rows, f) = (7, 24);
    let g_in: Vec<f32> =
        (0..rows * 2 * f).map(|i| f16::from_f32(y[i % y.len()]).to_f32()).collect();
    let g_out = read_f16(&p("g"));
    for r in 0..rows {
        for j in 0..f {
            let (a, u) = (f64::from(g_in[r * 2 * f + j]), f64::from(g_in[r * 2 * f + f + j]));
            #[expect(clippy::cast_possible_truncation, reason = "compared in fp16")]
            let want = (a / (1.0 + (-a).exp()) * u) as f32;
            let got = g_out[r * 2 * f + j];
            assert!(
                (got - want).abs() <= 4e-3 * want.abs().max(1.0),
                "silu row {r} {j}: {got} vs {want}"
            );
            assert_eq!(g_out[r * 2 * f + f + j], g_in[r * 2 * f + f + j], "up untouched");
        }
    }
}
