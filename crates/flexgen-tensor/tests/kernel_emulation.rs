//! The dequantizing CUDA kernels, run on the CPU: their source is taken from `kernels.cu`, compiled
//! with the host's C++ compiler inside a small harness that plays every thread of the grid in turn
//! (these kernels share nothing between threads: no shared memory, no warp shuffles), and their
//! outputs are compared with `quant::dequantize` (the cache kernel on both its vector path and its
//! value-by-value one). This checks the kernels' indexing in CI, which has no GPU; the GPU machine checks them
//! again (`examples/cuda_check.rs`).

use std::path::Path;
use std::process::Command;

use flexgen_tensor::cuda::exec::gemv4_plan;
use flexgen_tensor::quant::{QuantSpec, TcOrder, dequantize, quantize};
use half::f16;

const KERNELS: &str = include_str!("../src/cuda/kernels.cu");

/// The text of kernels.cu from `signature` to the closing brace of what it opens.
fn section(signature: &str) -> &'static str {
    let start = KERNELS.find(signature).unwrap_or_else(|| panic!("{signature} in kernels.cu"));
    &KERNELS[start..section_end(start)]
}

/// Where the top-level brace opened after `start` closes (past its line).
fn section_end(start: usize) -> usize {
    KERNELS[start..].find("\n}\n").expect("the closing brace") + start + 3
}

/// Where the line that declares kernel `name` starts.
fn kernel_start(name: &str) -> usize {
    let at = KERNELS
        .match_indices(&format!(" {name}("))
        .map(|(i, _)| KERNELS[..i].rfind('\n').map_or(0, |l| l + 1))
        .find(|&l| KERNELS[l..].starts_with("extern \"C\" __global__ void"));
    at.unwrap_or_else(|| panic!("kernel {name} in kernels.cu"))
}

/// kernels.cu's line `#define NAME …`.
fn define(name: &str) -> &'static str {
    let line = KERNELS
        .lines()
        .find(|l| l.strip_prefix("#define ").is_some_and(|r| r.starts_with(&format!("{name} "))));
    line.unwrap_or_else(|| panic!("#define {name} in kernels.cu"))
}

/// The text of kernel `name`.
fn kernel(name: &str) -> &'static str {
    let start = kernel_start(name);
    &KERNELS[start..section_end(start)]
}

/// kernels.cu's `codes_lo` and `codes_hi` (4-bit codes as fp16 integers), which the tensor-core
/// kernels share.
fn codes_as_halves() -> &'static str {
    let at = |s: &str| KERNELS.find(s).unwrap_or_else(|| panic!("{s} in kernels.cu"));
    &KERNELS[at("// The codes in bits 0–3")..at("// PER fp16 values at p")]
}

/// The text of kernels.cu from `from` through the end of kernel `last` (the helpers between).
fn span(from: &str, last: &str) -> &'static str {
    let start = KERNELS.find(from).unwrap_or_else(|| panic!("{from} in kernels.cu"));
    &KERNELS[start..section_end(kernel_start(last))]
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
static std::vector<half_t> slurp_halves(const char* p) {
    auto v = slurp(p);
    std::vector<half_t> h(v.size() / 2);
    memcpy(h.data(), v.data(), v.size());
    return h;
}
static void dump(const char* p, const std::vector<half_t>& v) {
    FILE* f = fopen(p, "wb"); fwrite(v.data(), 2, v.size(), f); fclose(f);
}
// nb rows of ins fp16 values (the bytes of `packed`, rows adjacent) laid ldx apart, `fill` between.
static std::vector<half_t> rows_apart(const std::vector<unsigned char>& packed, int nb, int ins, int ldx, half_t fill) {
    std::vector<half_t> x((size_t)nb * ldx, fill);
    for (int b = 0; b < nb; b++) memcpy(&x[(size_t)b * ldx], &packed[(size_t)b * ins * 2], (size_t)ins * 2);
    return x;
}
// Runs every thread of a grid of gx × gy blocks of 256.
template <class F> static void grid(unsigned gx, unsigned gy, F f) {
    blockDim = {256, 1, 1}; gridDim = {gx, gy, 1};
    for (unsigned by = 0; by < gy; by++) for (unsigned bx = 0; bx < gx; bx++)
        for (unsigned tx = 0; tx < 256; tx++) { blockIdx = {bx, by, 0}; threadIdx = {tx, 0, 0}; f(); }
}
"#;

/// What kernels that share data between threads need on top of [`PRELUDE`]: shared memory,
/// `__syncthreads`, warp shuffles and the tensor-core primitives of kernels.cu (`prmt`,
/// `sub_f16x2`, `fma_f16x2`, `mma_16816`, `ldsm_x4` and `ldsm_x2`, `smem_u32` and the `cp_async`
/// copies, `red_add4`)
/// with the meaning the PTX ISA gives them, and
/// `grid_warps`, which runs each thread of a block as a fiber.
const WARP_PRELUDE: &str = r#"
#include <ucontext.h>
#include <cmath>
#include <functional>
#include <map>
#define __device__
#define __forceinline__ inline
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static
#define __launch_bounds__(...)
#define __CUDA_ARCH__ 800
#define __expf expf
using std::max;
static inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }
static inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
static inline int __ffs(int v) { return __builtin_ffs(v); }
static inline void atomicAdd(float* p, float v) { *p += v; }
static inline unsigned atomicAdd(unsigned* p, unsigned v) { unsigned o = *p; *p += v; return o; }
static inline void __threadfence() {}
struct float4 { float x, y, z, w; };
static inline float4 make_float4(float x, float y, float z, float w) { return {x, y, z, w}; }
static inline float4 __ldcg(const float4* p) { return *p; }
static inline void __stcg(float4* p, float4 v) { *p = v; }
// Every thread of a block is a fiber; the block's fibers run in turn on one OS thread, each until
// it waits at a barrier (a barrier some threads never reach is reported as a deadlock rather than
// hanging).
namespace emu {
struct Fiber { ucontext_t ctx; std::vector<char> stack; bool done; };
static std::vector<Fiber> fibers;
static ucontext_t sched;
static int cur;
static unsigned long long progress;
static const std::function<void()>* body;
static std::vector<float> dyn_smem;
struct Bar { int count = 0; unsigned gen = 0; };
static Bar block_bar;
struct Warp { std::map<unsigned, Bar> bars; unsigned long long slot[32]; unsigned a[32][4]; uint2 b[32]; };
static std::vector<Warp> warps;
static void yield() { swapcontext(&fibers[cur].ctx, &sched); }
static void wait(Bar& b, int n) {
    unsigned g = b.gen;
    progress++;
    if (++b.count == n) { b.count = 0; b.gen++; return; }
    while (b.gen == g) yield();
}
static void entry() { (*body)(); fibers[cur].done = true; progress++; swapcontext(&fibers[cur].ctx, &sched); }
}
static inline void __syncthreads() { emu::wait(emu::block_bar, blockDim.x); }
static inline emu::Warp& this_warp() { return emu::warps[threadIdx.x >> 5]; }
template <class T> static T __shfl_xor_sync(unsigned mask, T v, int o) {
    emu::Warp& w = this_warp();
    unsigned lane = threadIdx.x & 31;
    if (!(mask >> lane & 1) || !(mask >> (lane ^ o) & 1)) { fprintf(stderr, "shuffle outside its mask\n"); exit(3); }
    memcpy(&w.slot[lane], &v, sizeof(T));
    emu::wait(w.bars[mask], __builtin_popcount(mask));
    T r; memcpy(&r, &w.slot[lane ^ o], sizeof(T));
    emu::wait(w.bars[mask], __builtin_popcount(mask));
    return r;
}
template <class T> static T __shfl_sync(unsigned mask, T v, int src) {
    emu::Warp& w = this_warp();
    unsigned lane = threadIdx.x & 31;
    if (!(mask >> lane & 1) || !(mask >> (src & 31) & 1)) { fprintf(stderr, "shuffle outside its mask\n"); exit(3); }
    memcpy(&w.slot[lane], &v, sizeof(T));
    emu::wait(w.bars[mask], __builtin_popcount(mask));
    T r; memcpy(&r, &w.slot[src & 31], sizeof(T));
    emu::wait(w.bars[mask], __builtin_popcount(mask));
    return r;
}
// PTX prmt.b32 (default mode): byte i of the result is byte sel[4i..4i+2] of {b, a}, its sign
// replicated where bit 4i + 3 is set.
static inline unsigned prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned long long ab = (unsigned long long)b << 32 | a;
    unsigned d = 0;
    for (int i = 0; i < 4; i++) {
        unsigned s = sel >> (4 * i) & 15, byte = ab >> (8 * (s & 7)) & 255;
        if (s & 8) byte = byte & 128 ? 255 : 0;
        d |= byte << (8 * i);
    }
    return d;
}
static inline _Float16 hlo(unsigned v, int h) { unsigned short u = v >> (16 * h); _Float16 f; memcpy(&f, &u, 2); return f; }
static inline unsigned hpack(_Float16 lo, _Float16 hi) { unsigned short a, b; memcpy(&a, &lo, 2); memcpy(&b, &hi, 2); return a | (unsigned)b << 16; }
// fp16x2 arithmetic rounded once to nearest (the exact result in double, then to fp16).
static inline unsigned sub_f16x2(unsigned a, unsigned b) {
    _Float16 r[2];
    for (int h = 0; h < 2; h++) r[h] = (_Float16)((double)hlo(a, h) - (double)hlo(b, h));
    return hpack(r[0], r[1]);
}
static inline unsigned fma_f16x2(unsigned a, unsigned b, unsigned c) {
    _Float16 r[2];
    for (int h = 0; h < 2; h++) r[h] = (_Float16)((double)hlo(a, h) * (double)hlo(b, h) + (double)hlo(c, h));
    return hpack(r[0], r[1]);
}
// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32, D = A·B + D, from the PTX ISA's fragment
// layouts (lane = 4g + t): A a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..);
// B b0 (k 2t..2t+1, n g), b1 (k 2t+8..2t+9, n g); D d0, d1 (g, 2t..2t+1), d2, d3 (g+8, 2t..).
static inline void mma_16816(float* d, const unsigned* a, uint2 b) {
    emu::Warp& w = this_warp();
    unsigned lane = threadIdx.x & 31;
    memcpy(w.a[lane], a, 16);
    w.b[lane] = b;
    emu::wait(w.bars[0xffffffffu], 32);
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; l++) {
        int g = l >> 2, t = l & 3;
        for (int h = 0; h < 2; h++) {
            A[g][2 * t + h] = (float)hlo(w.a[l][0], h);
            A[g + 8][2 * t + h] = (float)hlo(w.a[l][1], h);
            A[g][2 * t + 8 + h] = (float)hlo(w.a[l][2], h);
            A[g + 8][2 * t + 8 + h] = (float)hlo(w.a[l][3], h);
            B[2 * t + h][g] = (float)hlo(w.b[l].x, h);
            B[2 * t + 8 + h][g] = (float)hlo(w.b[l].y, h);
        }
    }
    emu::wait(w.bars[0xffffffffu], 32);
    int g = lane >> 2, t = lane & 3;
    for (int j = 0; j < 4; j++) {
        int r = g + 8 * (j >> 1), c = 2 * t + (j & 1);
        double s = 0;
        for (int k = 0; k < 16; k++) s += (double)A[r][k] * B[k][c];
        d[j] += (float)s;
    }
}
// cp.async: each thread's copies are held until a cp_async_wait lets their group land, so that a
// read of a stage before its wait sees what was there before.
namespace emu {
struct Copy { void* dst; const void* src; int n, size; };
static std::vector<std::vector<std::vector<Copy>>> landing; // [thread][group]
static std::vector<std::vector<Copy>> issued;                // [thread]: not yet in a group
}
// Shared-space addresses: offsets from an anchor among the kernels' static shared arrays (all
// in this program's data, well within ±2 GiB of it). The anchor is an arena of 256 KB, where
// gemm4_tc's ring lies (16 bytes in: not aligned to wgmma's 1024), so that its addresses fit a
// wgmma descriptor's 18 bits.
namespace emu { alignas(1024) static char anchor[1 << 18]; }
static inline unsigned smem_u32(const void* p) { return (unsigned)((const char*)p - emu::anchor); }
static inline void* smem_ptr(unsigned a) { return emu::anchor + (int)a; }
// ldmatrix (.x4, .x2): lane 8j + r gives the address of row r of matrix j (16 bytes, aligned);
// lane 4g + t receives row g's halves 2t, 2t + 1 of matrix j in d[j].
static inline void ldsm(unsigned* d, unsigned a, int nm) {
    emu::Warp& w = this_warp();
    unsigned lane = threadIdx.x & 31;
    w.slot[lane] = a;
    emu::wait(w.bars[0xffffffffu], 32);
    for (int l = 0; l < 8 * nm; l++) if (w.slot[l] % 16) { fprintf(stderr, "ldmatrix row address %llu not 16-byte aligned\n", w.slot[l]); exit(3); }
    unsigned g = lane >> 2, t = lane & 3;
    for (int j = 0; j < nm; j++) memcpy(&d[j], (const char*)smem_ptr((unsigned)w.slot[8 * j + g]) + 4 * t, 4);
    emu::wait(w.bars[0xffffffffu], 32);
}
static inline void ldsm_x4(unsigned* d, unsigned a) { ldsm(d, a, 4); }
static inline void ldsm_x2(unsigned* d, unsigned a) { ldsm(d, a, 2); }
// wgmma.mma_async m64nNk16 (A from registers, B by descriptor), done at issue (the asynchrony
// not modelled): the warpgroup's 128 threads meet, B is read from shared memory as the
// descriptor gives it (start: bits 0–13 in 16 bytes; stride byte offset from one 8-row atom to
// the next: bits 32–45; swizzle, bits 62–63: 1 for 128-byte rows, 2 for 64-byte ones, 16-byte
// chunk bits 4–6 (4–5) of the address XOR its bits 7–9 (7–8)); A's rows 16i … of warp i as
// mma_16816's; each thread adds its D values (8 columns j in d[4j .. 4j + 3], j < N/8).
namespace emu { struct Group { Bar bar; unsigned a[128][4]; unsigned long long desc[128]; }; static std::vector<Group> groups; }
template <int N> static void wgmma_64xn(float* d, const unsigned* a, unsigned long long desc) {
    emu::Group& G = emu::groups[threadIdx.x >> 7];
    unsigned i = threadIdx.x & 127;
    memcpy(G.a[i], a, 16);
    G.desc[i] = desc;
    emu::wait(G.bar, 128);
    for (int l = 0; l < 128; l++) if (G.desc[l] != G.desc[0]) { fprintf(stderr, "wgmma: the warpgroup's descriptors differ\n"); exit(3); }
    unsigned mode = desc >> 62, w = mode == 1 ? 128 : mode == 2 ? 64 : 0;
    if (!w) { fprintf(stderr, "wgmma: swizzle mode %u not emulated\n", mode); exit(3); }
    unsigned start = (unsigned)(desc & 0x3FFF) << 4, sbo = (unsigned)((desc >> 32) & 0x3FFF) << 4;
    float A[64][16], B[16][N];
    for (int l = 0; l < 128; l++) {
        int r = 16 * (l >> 5) + ((l & 31) >> 2), t = l & 3;
        for (int h = 0; h < 2; h++) {
            A[r][2 * t + h] = (float)hlo(G.a[l][0], h);
            A[r + 8][2 * t + h] = (float)hlo(G.a[l][1], h);
            A[r][2 * t + 8 + h] = (float)hlo(G.a[l][2], h);
            A[r + 8][2 * t + 8 + h] = (float)hlo(G.a[l][3], h);
        }
    }
    for (int n = 0; n < N; n++) for (int k = 0; k < 16; k++) {
        unsigned at = start + (n / 8) * sbo + (n % 8) * w + 2 * k;
        at ^= ((at >> 7) & (w / 16 - 1)) << 4;
        B[k][n] = (float)hlo(*(const unsigned*)smem_ptr(at & ~3u), (at >> 1) & 1);
    }
    emu::wait(G.bar, 128);
    int r0 = 16 * (i >> 5) + ((i & 31) >> 2), t = i & 3;
    for (int j = 0; j < N / 8; j++) for (int q = 0; q < 4; q++) {
        int r = r0 + 8 * (q >> 1), c = 8 * j + 2 * t + (q & 1);
        double s = 0;
        for (int k = 0; k < 16; k++) s += (double)A[r][k] * B[k][c];
        d[4 * j + q] += (float)s;
    }
}
static inline void wgmma_fence() {}
static inline void wgmma_commit() {}
template <int N> static void wgmma_wait() {}
static inline void fence_proxy_async() {}
template <int N> static void wgmma_keep(float*) {}
static inline void cp_async16(unsigned dst, const void* src, int n) { emu::issued[threadIdx.x].push_back({smem_ptr(dst), src, n, 16}); }
static inline void cp_async4(unsigned dst, const void* src, int n) { emu::issued[threadIdx.x].push_back({smem_ptr(dst), src, n, 4}); }
static inline void red_add4(float* p, float a, float b, float c, float d) { p[0] += a; p[1] += b; p[2] += c; p[3] += d; }
static inline void cp_async_commit() {
    emu::landing[threadIdx.x].push_back(emu::issued[threadIdx.x]);
    emu::issued[threadIdx.x].clear();
}
template <int N> static void cp_async_wait() {
    auto& l = emu::landing[threadIdx.x];
    while (l.size() > N) {
        for (auto& c : l.front()) {
            if (c.n < 0 || c.n > c.size) { fprintf(stderr, "cp.async of %d bytes into %d\n", c.n, c.size); exit(5); }
            memcpy(c.dst, c.src, c.n);
            memset((char*)c.dst + c.n, 0, c.size - c.n);
        }
        l.erase(l.begin());
    }
}
// Runs every thread of a grid of gx × gy blocks of `threads` (a multiple of 32), `smem` floats of
// dynamic shared memory each.
template <class F> static void grid_warps(unsigned gx, unsigned gy, unsigned threads, size_t smem, F f) {
    const std::function<void()> fn = f;
    emu::body = &fn;
    blockDim = {threads, 1, 1}; gridDim = {gx, gy, 1};
    emu::fibers.resize(threads);
    for (auto& fb : emu::fibers) fb.stack.resize(1 << 18);
    for (unsigned by = 0; by < gy; by++) for (unsigned bx = 0; bx < gx; bx++) {
        blockIdx = {bx, by, 0};
        emu::dyn_smem.assign(smem, NAN);
        emu::warps.assign(threads / 32, emu::Warp{});
        emu::groups.assign((threads + 127) / 128, emu::Group{});
        emu::block_bar = {};
        emu::landing.assign(threads, {});
        emu::issued.assign(threads, {});
        for (unsigned i = 0; i < threads; i++) {
            auto& fb = emu::fibers[i];
            fb.done = false;
            getcontext(&fb.ctx);
            fb.ctx.uc_stack.ss_sp = fb.stack.data();
            fb.ctx.uc_stack.ss_size = fb.stack.size();
            fb.ctx.uc_link = nullptr;
            makecontext(&fb.ctx, emu::entry, 0);
        }
        // The warps in an order of their own for each block, each run as far as it can go
        // before the next runs: a warp that gets ahead of the others where a barrier is missing
        // overwrites shared memory they have still to read.
        std::vector<unsigned> order(threads / 32);
        for (unsigned w = 0; w < order.size(); w++) order[w] = w;
        unsigned z = 7919u * (bx + 1) + 104729u * by;
        for (unsigned w = order.size(); w > 1; w--) { z = z * 1103515245u + 12345u; std::swap(order[w - 1], order[(z >> 8) % w]); }
        for (;;) {
            bool live = false;
            unsigned long long before = emu::progress;
            for (unsigned w : order) {
                for (;;) {
                    unsigned long long at = emu::progress;
                    bool any = false;
                    for (unsigned i = 32 * w; i < 32 * w + 32; i++) {
                        if (emu::fibers[i].done) continue;
                        live = any = true;
                        emu::cur = i;
                        threadIdx = {i, 0, 0};
                        swapcontext(&emu::sched, &emu::fibers[i].ctx);
                    }
                    if (!any || emu::progress == at) break;
                }
            }
            if (!live) break;
            if (emu::progress == before) { fprintf(stderr, "deadlock: block (%u, %u) waits at a barrier some threads never reach\n", bx, by); exit(4); }
        }
    }
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
    int r0 = atoi(argv[5]), r1 = atoi(argv[6]);
    auto codes = slurp(argv[7]); auto params = slurp_halves(argv[8]);
    std::vector<half_t> out((r1 - r0) * cols, 0);
    grid(3, 1, [&] { dequant_dim0(codes.data(), params.data(), out.data(), rows, cols, gs, bits, r0, r1); });
    dump(argv[9], out);
}
",
    );
    // Whole matrices, and slices of rows (from a multiple of the group; the last to the end).
    for (rows, cols, group, bits, (r0, r1)) in [
        (200, 40, 64, 4u8, (0, 200)),
        (130, 16, 64, 8, (0, 130)),
        (64, 8, 64, 4, (0, 64)),
        (1000, 24, 32, 4, (0, 1000)),
        (77, 37, 16, 8, (0, 77)),
        (200, 40, 64, 4, (64, 128)),
        (200, 40, 64, 4, (128, 200)),
        (1000, 24, 32, 4, (96, 480)),
        (77, 37, 16, 8, (48, 77)),
    ] {
        let x = data(rows * cols, (rows * cols) as u64);
        let p = quantize(&x, &[rows, cols], QuantSpec { bits, group, dim: 0 });
        let want = dequantize(&p);
        let (c, pa) = (dir.path().join("codes"), dir.path().join("params"));
        write_bytes(&c, &p.data);
        write_bytes(&pa, &params_bytes(&p.params));
        let o = dir.path().join("out");
        let st = Command::new(&exe)
            .args([rows, cols, group, usize::from(bits), r0, r1].map(|v| v.to_string()))
            .args([&c, &pa, &o])
            .status()
            .unwrap();
        assert!(st.success());
        assert_close(
            &format!("{rows}×{cols}, group {group}, {bits}-bit, rows {r0}..{r1}"),
            &read_f16(&o),
            &want[r0 * cols..r1 * cols],
        );
    }
}

/// A 4-bit product's case: W `[outs, ins]` packed in groups of `group` outputs (written to
/// `codes` and `pairs` in `dir`), `nb` rows of x (`seed`), and x × the reference dequantization
/// of W (`want [nb, outs]`, f32 sums).
struct ProductCase {
    x: Vec<f32>,
    want: Vec<f32>,
    /// The largest |min| + 15·|scale| of W's groups: how far a weight's parts reach.
    reach: f32,
    /// W packed (`dequant_dim0`'s layout, as written to `codes` and `pairs`).
    packed: flexgen_tensor::quant::Packed,
}

fn product_case(
    dir: &Path,
    (outs, ins, group): (usize, usize, usize),
    nb: usize,
    seed: u64,
) -> ProductCase {
    let w = data(outs * ins, (outs * ins) as u64);
    let p = quantize(&w, &[outs, ins], QuantSpec { bits: 4, group, dim: 0 });
    let wq = dequantize(&p);
    let x = data(nb * ins, seed);
    let mut want = vec![0f32; nb * outs];
    for b in 0..nb {
        for o in 0..outs {
            want[b * outs + o] = (0..ins).map(|i| x[b * ins + i] * wq[o * ins + i]).sum();
        }
    }
    write_bytes(&dir.join("codes"), &p.data);
    write_bytes(&dir.join("pairs"), &params_bytes(&p.params));
    let reach = p.params.chunks(2).map(|m| m[0].to_f32().abs() + 15.0 * m[1].to_f32().abs());
    ProductCase { x, want, reach: reach.fold(0.0, f32::max), packed: p }
}

/// A product's outputs against the reference: sums of `ins` products taken in another order.
fn assert_sums_close(label: &str, got: &[f32], want: &[f32], ins: usize) {
    assert_sums_within(label, (got, want), ins, |_| 0.0);
}

/// [`assert_sums_close`] with `extra(i)` more room for output `i`.
fn assert_sums_within(
    label: &str,
    (got, want): (&[f32], &[f32]),
    ins: usize,
    extra: impl Fn(usize) -> f32,
) {
    assert_eq!(got.len(), want.len(), "{label}: sizes");
    #[expect(clippy::cast_precision_loss, reason = "a tolerance")]
    let base = 1e-5 * (ins as f32) * 16.0;
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        let tol = base + extra(i);
        assert!((g - w).abs() <= tol, "{label}: value {i}: kernel {g}, reference {w} (±{tol})");
    }
}

/// [`assert_sums_close`] for `gemm4_tc`'s tiles of up to 16 rows, which round x·scale and x·min to
/// fp16 (2⁻¹¹ each, as dequantization rounds min + code·scale once): on top, 2⁻¹⁰ of
/// `Σ_i |x_i|` times `reach` per row (`x`: the rows of `got`).
fn assert_scaled_sums_close(
    label: &str,
    (got, want): (&[f32], &[f32]),
    x: &[f32],
    ins: usize,
    reach: f32,
) {
    let outs = got.len() / (x.len() / ins);
    let x1: Vec<f32> = x.chunks(ins).map(|r| r.iter().map(|v| v.abs()).sum()).collect();
    assert_sums_within(label, (got, want), ins, |i| x1[i / outs] * reach / 1024.0);
}

/// The fused 4-bit product (`gemv4_dim0`: x × Wᵀ straight from W's codes) against x × the
/// reference dequantization of W, with several row tiles, slices and a partial last group: every
/// kernel whose tile holds the rows and whose words per thread suit the group, and the one
/// `gemv4_plan` picks among them.
/// `dequant_tc` (a 4-bit weight in the tensor-core order) against `dequant_dim0` of the same
/// weight in `quantize`'s layout, bit for bit: whole matrices and slices of rows (from a
/// multiple of the group; the last to the end), groups of 64 and 128, rows not a multiple of 8.
#[test]
fn dequant_tc_matches_dequant_dim0() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build(
        dir.path(),
        &["dequant_dim0", "dequant_tc"],
        r#"
int main(int argc, char** argv) {
    int rows = atoi(argv[1]), cols = atoi(argv[2]), gs = atoi(argv[3]), r0 = atoi(argv[4]), r1 = atoi(argv[5]);
    auto codes = slurp(argv[6]); auto params = slurp_halves(argv[7]);
    auto tc = slurp(argv[8]); auto tp = slurp(argv[9]);
    std::vector<unsigned> pairs(tp.size() / 4); memcpy(pairs.data(), tp.data(), tp.size());
    std::vector<half_t> want((r1 - r0) * cols, 0), got((r1 - r0) * cols, 0x7e00);
    grid(3, 1, [&] { dequant_dim0(codes.data(), params.data(), want.data(), rows, cols, gs, 4, r0, r1); });
    grid(2, 1, [&] { dequant_tc(tc.data(), pairs.data(), got.data(), rows, cols, gs, r0, r1); });
    size_t bad = 0;
    for (size_t i = 0; i < got.size(); i++) bad += got[i] != want[i];
    printf("%zu\n", bad);
}
"#,
    );
    for (rows, cols, group, (r0, r1)) in [
        (200, 48, 64, (0, 200)),
        (256, 32, 128, (0, 256)),
        (200, 48, 64, (64, 128)),
        (200, 48, 64, (128, 200)),
        (300, 16, 128, (128, 300)),
        (1000, 80, 64, (448, 1000)),
    ] {
        let x = data(rows * cols, (rows * cols) as u64 + 3);
        let p = quantize(&x, &[rows, cols], QuantSpec { bits: 4, group, dim: 0 });
        let (tc, tp) =
            TcOrder::new((rows, cols), group).unwrap().permute(&p.data, &p.params, false);
        let f = |n: &str| dir.path().join(n);
        write_bytes(&f("codes"), &p.data);
        write_bytes(&f("params"), &params_bytes(&p.params));
        write_bytes(&f("tc"), &tc);
        write_bytes(&f("tp"), &params_bytes(&tp));
        let run = Command::new(&exe)
            .args([rows, cols, group, r0, r1].map(|v| v.to_string()))
            .args([f("codes"), f("params"), f("tc"), f("tp")])
            .output()
            .unwrap();
        assert!(run.status.success(), "the harness failed");
        let bad = String::from_utf8_lossy(&run.stdout);
        assert_eq!(
            bad.trim(),
            "0",
            "{rows}×{cols}, group {group}, rows {r0}..{r1}: values that differ"
        );
    }
}

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
    auto codes = slurp(argv[6]); auto params = slurp_halves(argv[7]); auto xb = slurp(argv[8]);
    codes.resize(codes.size() + 16, 0);
    auto x = rows_apart(xb, nb, ins, ldx, 0);
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
        let ProductCase { x, want, .. } =
            product_case(dir.path(), (outs, ins, group), nb, 7 + nb as u64);
        let (c, pa, xs, o) = (
            dir.path().join("codes"),
            dir.path().join("pairs"),
            dir.path().join("x"),
            dir.path().join("out"),
        );
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
            assert_sums_close(&label, &got, &want, ins);
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
    auto codes = slurp(argv[8]); auto params = slurp_halves(argv[9]);
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
    let exe = build_warps(
        dir.path(),
        &qkv_split_helpers(),
        &[kernel("qkv_split"), kernel("silu_mul")].concat(),
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
    grid_warps(b * t, 1, 256, 0, [&] { qkv_split(y.data(), bias.data(), pos.data(), inv.data(), q.data(), kc.data(), vc.data(),
                                   kn.data(), vn.data(), gr, ncap, npast, t, nh, nkv, hd, cap, past, 0.25f,
                                   nullptr, nullptr, nullptr, nullptr, 0); });
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

/// The quantizer's rounding helpers, which `quant_cache` and `qkv_split` share.
fn quant_helpers() -> String {
    [
        section("__device__ __forceinline__ half_t f16_down("),
        section("__device__ __forceinline__ half_t f16_up("),
        section("__device__ __forceinline__ void quant_pair("),
        section("__device__ __forceinline__ unsigned quant_code("),
    ]
    .concat()
}

/// What `qkv_split` calls: `rotate`, `qkv_value` and [`quant_helpers`].
fn qkv_split_helpers() -> String {
    [device_fn("rotate"), device_fn("qkv_value"), &quant_helpers()].concat()
}

/// `qkv_split` packing the new k and v of the first `qrows` cache rows itself (4 bits, groups of
/// 64; OPT's bias, no rotation): its codes and (min, scale) pairs equal `quant::quantize`'s of the
/// fp16 values it writes, at the new positions only, for rows written to the caches (`gpu_rows`)
/// and to the new-row buffers alike; heads of 64 and of 128 values.
#[test]
fn qkv_split_packs_the_new_positions_as_the_quantizer_does() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_warps(
        dir.path(),
        &qkv_split_helpers(),
        kernel("qkv_split"),
        r#"
int main(int argc, char** argv) {
    int b = atoi(argv[1]), t = atoi(argv[2]), nh = atoi(argv[3]), hd = atoi(argv[4]), cap = atoi(argv[5]);
    int past = atoi(argv[6]), gr = atoi(argv[7]), qrows = atoi(argv[8]), nkv = nh;
    auto y = slurp_halves(argv[9]); auto bias = slurp_halves(argv[10]);
    std::vector<half_t> q((size_t)b * nh * t * hd, 0), kc((size_t)gr * cap * hd, 0), vc = kc;
    std::vector<half_t> kn((size_t)(b * nkv - gr) * cap * hd, 0), vn = kn;
    std::vector<unsigned char> kq((size_t)qrows * cap * hd / 2, 0), vq = kq;
    std::vector<half_t> kp((size_t)qrows * cap * hd / 64 * 2, 0), vp = kp;
    grid_warps(b * t, 1, 256, 0, [&] { qkv_split(y.data(), bias.data(), nullptr, nullptr, q.data(), kc.data(), vc.data(),
        kn.data(), vn.data(), gr, cap, past, t, nh, nkv, hd, cap, past, 0.125f, kq.data(), kp.data(), vq.data(), vp.data(), qrows); });
    dump(argv[11], kc); dump(argv[12], vc); dump(argv[13], kn); dump(argv[14], vn);
    FILE* f = fopen(argv[15], "wb"); fwrite(kq.data(), 1, kq.size(), f); fclose(f);
    f = fopen(argv[16], "wb"); fwrite(vq.data(), 1, vq.size(), f); fclose(f);
    dump(argv[17], kp); dump(argv[18], vp);
}
"#,
    );
    // (sequences, positions, heads, head width, cap, past, rows in the caches, rows packed)
    for (b, t, nh, hd, cap, past, gr, qrows) in
        [(3, 1, 2, 64, 6, 3, 0, 6), (2, 3, 3, 128, 7, 2, 0, 4), (2, 2, 2, 64, 5, 1, 3, 3)]
    {
        let label = format!("{b}×{t}, {nh} heads of {hd}, {gr} cache rows, {qrows} packed");
        let w = 3 * nh * hd;
        let y = data(b * t * w, 11 + hd as u64);
        let bias = data(w, 5);
        let f = |n: &str| dir.path().join(n);
        write_bytes(&f("y"), &f16_bytes(&y));
        write_bytes(&f("bias"), &f16_bytes(&bias));
        let st = Command::new(&exe)
            .args([b, t, nh, hd, cap, past, gr, qrows].map(|v| v.to_string()))
            .args(["y", "bias", "kc", "vc", "kn", "vn", "kq", "vq", "kp", "vp"].map(f))
            .status()
            .unwrap();
        assert!(st.success(), "{label}: the harness failed");
        let spec = QuantSpec { bits: 4, group: 64, dim: 2 };
        let row_vals = hd * cap;
        for (which, cache, new, codes, pairs) in
            [("k", "kc", "kn", "kq", "kp"), ("v", "vc", "vn", "vq", "vp")]
        {
            // The fp16 rows the split wrote: cache rows first, then the new-row buffers'.
            let mut x = read_f16(&f(cache));
            x.extend(read_f16(&f(new)));
            let want = quantize(&x[..qrows * row_vals], &[qrows, cap, hd], spec);
            let (codes, pairs) =
                (std::fs::read(f(codes)).unwrap(), std::fs::read(f(pairs)).unwrap());
            let pb = params_bytes(&want.params);
            let (code_b, pair_b) = (hd / 2, hd / 64 * 4);
            for slot in 0..qrows * cap {
                let c = slot * code_b..(slot + 1) * code_b;
                let p = slot * pair_b..(slot + 1) * pair_b;
                if (past..past + t).contains(&(slot % cap)) {
                    assert_eq!(
                        codes[c.clone()],
                        want.data[c],
                        "{label}: {which} slot {slot} codes"
                    );
                    assert_eq!(pairs[p.clone()], pb[p], "{label}: {which} slot {slot} pairs");
                    let v = &x[slot * hd..(slot + 1) * hd];
                    assert!(v.iter().any(|&v| v != 0.0), "{label}: {which} slot {slot} written");
                } else {
                    let untouched = codes[c].iter().chain(&pairs[p]).all(|&b| b == 0);
                    assert!(untouched, "{label}: {which} slot {slot} untouched");
                }
            }
        }
    }
}

/// [`build_with`] for kernels that share data between threads: [`WARP_PRELUDE`] and `before`
/// ahead of `kernels` (any text of kernels.cu), its dynamic shared memory the runner's.
fn build_warps(dir: &Path, before: &str, kernels: &str, main: &str) -> std::path::PathBuf {
    let kernels = kernels
        .replace("extern __shared__ float sm[];", "float* sm = emu::dyn_smem.data();")
        .replace(
            "extern __shared__ __align__(16) unsigned char gt_ring[];",
            "unsigned char* const gt_ring = (unsigned char*)emu::anchor + 16;",
        );
    build_with(dir, &format!("{WARP_PRELUDE}{before}{kernels}"), &[], main)
}

fn read_f32(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        .collect()
}

/// The tensor-core 4-bit product (`gemm4_tc_*`: mma fragments expanded straight from W's codes)
/// against x × the reference dequantization of W: every row tile (8, 16, 32, 64 rows, one and two
/// rows as decode takes them, and the partial tiles of 70 rows), every group size it takes, a last
/// block of outputs and a last step of inputs that are partial, several input slices, x's rows
/// apart by more than a row; each tile as `gemm4_tc_plan` runs it on a device of `wave` blocks
/// at once; each tile's own stages (`GT_K` 0, as built) and every tile's of 32 inputs and of 64;
/// rings of four stages, the 64-row tile's of 64 inputs (`GT_STAGES=4`, `GT_K8=64`); and the 8-,
/// 16- and 32-row tiles each the other way (`GT_SX1=0`: codes expanded; `GT_SX2=1`, `GT_SX4=1`:
/// the scales and mins given to x); and the 16-, 32- and 64-row tiles by wgmma (`GT_WGMMA=14`),
/// x 64 and 32 inputs a stage.
#[test]
fn gemm4_tc_matches_x_times_the_dequantized_weight() {
    for inputs_a_stage in [0, 32, 64] {
        gemm4_tc_case(inputs_a_stage, [true, false, false], "");
    }
    gemm4_tc_case(0, [true, false, false], "#define GT_STAGES 4\n#define GT_K8 64\n");
    gemm4_tc_case(0, [false, true, true], "");
    // The 16-, 32- and 64-row tiles by wgmma, as NVRTC builds them for sm_90a: x by 64 inputs a
    // stage (128-byte swizzle) and by 32 (64-byte).
    gemm4_tc_case(0, [true, false, false], "#define GT_WGMMA 14\n");
    gemm4_tc_case(32, [true, false, false], "#define GT_WGMMA 14\n");
}

/// [`gemm4_tc_matches_x_times_the_dequantized_weight`] with `GT_K` inputs a stage (0: each tile's
/// own) and whether the 8-, 16- and 32-row tiles give the scales to x (`GT_SX1`, `GT_SX2`,
/// `GT_SX4`); `defines`: more `#define` lines.
fn gemm4_tc_case(inputs_a_stage: usize, scale_x: [bool; 3], defines: &str) {
    use flexgen_tensor::cuda::exec::gemm4_tc_plan;
    let dir = tempfile::tempdir().unwrap();
    let exe = build_warps(
        dir.path(),
        &format!(
            "{defines}#define GT_K {inputs_a_stage}\n#define GT_SX1 {}\n#define GT_SX2 {}\n#define GT_SX4 {}\n{}{}",
            u8::from(scale_x[0]),
            u8::from(scale_x[1]),
            u8::from(scale_x[2]),
            codes_as_halves(),
            section("__device__ __forceinline__ half_t bias_act1(")
        ),
        span("#ifndef GT_K", "gemm4_tc_8"),
        r#"
int main(int argc, char** argv) {
    int outs = atoi(argv[1]), ins = atoi(argv[2]), gs = atoi(argv[3]), nb = atoi(argv[4]), ldx = atoi(argv[5]);
    int kernel = atoi(argv[6]), blocks = atoi(argv[7]), slices = atoi(argv[8]), per_slice = atoi(argv[9]);
    auto codes = slurp(argv[10]); auto pb = slurp(argv[11]); auto xb = slurp(argv[12]);
    std::vector<unsigned> pairs(pb.size() / 4); memcpy(pairs.data(), pb.data(), pb.size());
    auto x = rows_apart(xb, nb, ins, ldx, 0x7e00);  // NaN between rows: never read
    std::vector<float> y((size_t)nb * outs, 0.f);
    decltype(&gemm4_tc_1) kernels[] = {gemm4_tc_1, gemm4_tc_2, gemm4_tc_4, gemm4_tc_8};
    auto k = kernels[kernel];
    grid_warps(blocks, slices, 128, 0, [&] { k(codes.data(), pairs.data(), x.data(), y.data(), outs, ins, ldx, gs, nb, per_slice, nullptr, nullptr, 0, nullptr); });
    FILE* f = fopen(argv[13], "wb"); fwrite(y.data(), 4, y.size(), f); fclose(f);
    // Again with the store folded in (outs a multiple of 4): into the fp16 `old` values
    // (accumulated, the bias, ReLU), then the output, and how many sums (to be cleared) and
    // counters are left.
    if (outs % 4) return 0;
    auto out = slurp_halves(argv[14]); auto bias = slurp_halves(argv[15]);
    std::vector<float> y2((size_t)nb * outs, 0.f);
    std::vector<unsigned> done((outs + 255) / 256, 0u);  // a counter per column of 256 outputs
    grid_warps(blocks, slices, 128, 0, [&] { k(codes.data(), pairs.data(), x.data(), y2.data(), outs, ins, ldx, gs, nb, per_slice, out.data(), bias.data(), 3, done.data()); });
    dump(argv[16], out);
    unsigned left = 0;
    for (float v : y2) left += v != 0.f;
    for (unsigned d : done) left += d != 0;
    printf("%u\n", left);
}
"#,
    );
    let (mut runs, mut stored_runs) = ([0usize; 4], 0);
    for (outs, ins, group, nb, wave) in [
        (256, 64, 64, 8, 1),
        (300, 208, 64, 13, 40),
        (200, 144, 128, 32, 2),
        (512, 256, 128, 3, 64),
        (90, 80, 64, 70, 6),
        (160, 112, 64, 24, 1000),
        (64, 48, 64, 1, 3),
        (320, 96, 128, 2, 100),
        // One slice of many steps: every stage of the ring filled and refilled.
        (256, 656, 64, 40, 1),
        (256, 528, 128, 20, 1),
    ] {
        let case = product_case(dir.path(), (outs, ins, group), nb, 11 + nb as u64);
        // W in the tensor-core order, which the kernel reads.
        let order = TcOrder::new((outs, ins), group).expect("the order applies");
        let (codes, pairs) = order.permute(&case.packed.data, &case.packed.params, false);
        write_bytes(&dir.path().join("codes"), &codes);
        write_bytes(&dir.path().join("pairs"), &params_bytes(&pairs));
        let x = &case.x;
        let ldx = ins.next_multiple_of(8) + 8;
        let f = |n: &str| dir.path().join(n);
        let label = format!(
            "{nb}×{ins} · ({outs}×{ins})ᵀ, group {group}, wave {wave}, {inputs_a_stage} inputs a stage {defines:?}"
        );
        for b0 in (0..nb).step_by(64) {
            let plan = gemm4_tc_plan((nb - b0).min(64), (outs, ins), wave);
            let rows = (nb - b0).min(64);
            runs[plan.kernel] += 1;
            write_bytes(&f("x"), &f16_bytes(&x[b0 * ins..(b0 + rows) * ins]));
            let old: Vec<f32> =
                (0..rows * outs).map(|i| ((i * 37 % 101) as f32 - 50.0) / 8.0).collect();
            let bias: Vec<f32> = (0..outs).map(|c| ((c * 13 % 29) as f32 - 14.0) / 4.0).collect();
            write_bytes(&f("old"), &f16_bytes(&old));
            write_bytes(&f("bias"), &f16_bytes(&bias));
            let run = Command::new(&exe)
                .args([outs, ins, group, rows, ldx].map(|v| v.to_string()))
                .args(
                    [plan.kernel, plan.blocks, plan.slices, plan.per_slice].map(|v| v.to_string()),
                )
                .args([f("codes"), f("pairs"), f("x"), f("y"), f("old"), f("bias"), f("out")])
                .output()
                .unwrap();
            let what = format!("{outs} outputs, {rows} rows, {plan:?}");
            assert!(run.status.success(), "the harness failed: {what}");
            let got = read_f32(&f("y"));
            if outs % 4 == 0 {
                // The folded store: store_f32's two roundings of the same sums, nothing left.
                let left = String::from_utf8_lossy(&run.stdout);
                assert_eq!(left.trim(), "0", "{what}: sums or counters left after the store");
                let stored = read_f16(&f("out"));
                for (i, (&s, &o)) in got.iter().zip(&old).enumerate() {
                    let sum = f16::from_f32(f16::from_f32(o).to_f32() + s).to_f32();
                    let want =
                        f16::from_f32((sum + f16::from_f32(bias[i % outs]).to_f32()).max(0.0));
                    assert_eq!(stored[i].to_bits(), want.to_f32().to_bits(), "{what}: stored {i}");
                }
                stored_runs += 1;
            }
            let (want, x) = (&case.want[b0 * outs..][..rows * outs], &x[b0 * ins..][..rows * ins]);
            let label = format!("{label}, rows {b0}..{}", b0 + rows);
            if scale_x.get(plan.kernel) == Some(&true) {
                assert_scaled_sums_close(&label, (&got, want), x, ins, case.reach);
            } else {
                // Codes expanded to min + code·scale as the reference does.
                assert_sums_close(&label, &got, want, ins);
            }
        }
    }
    assert!(runs.iter().all(|&n| n > 0), "every kernel ran: {runs:?}");
    assert!(stored_runs > 0, "the folded store ran");
}

/// Decode attention with the warps' shuffles and shared memory: `decode_attention` over an fp16
/// cache (heads of 128 and 64 on the vector paths, 40 value by value) and `decode_attention_q4`
/// over the 4-bit cache read from its codes (heads of 128 and 64, groups of a lane's values and
/// more), each with grouped-query attention (2 query heads per kv head) and sequences that see
/// different first positions, against softmax(q·Kᵀ)·V in f64 over the reference dequantization.
#[test]
fn decode_attention_kernels_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_warps(
        dir.path(),
        section("__device__ float block_reduce("),
        span("// The codes in bits 0–3", "decode_attention_q4"),
        r"
int main(int argc, char** argv) {
    int b = atoi(argv[1]), nh = atoi(argv[2]), rep = atoi(argv[3]), hd = atoi(argv[4]), cap = atoi(argv[5]);
    int s = atoi(argv[6]), gs = atoi(argv[7]), q4 = atoi(argv[8]);
    auto q = slurp_halves(argv[9]), kf = slurp_halves(argv[10]), vf = slurp_halves(argv[11]);
    auto kc = slurp(argv[12]), vc = slurp(argv[14]);
    auto kp = slurp_halves(argv[13]), vp = slurp_halves(argv[15]);
    auto sb = slurp(argv[16]);
    std::vector<int> start(b); memcpy(start.data(), sb.data(), 4 * b);
    std::vector<half_t> out((size_t)b * nh * hd, 0);
    size_t smem = s + 4 * hd;
    if (q4)
        grid_warps(b * nh, 1, 128, smem, [&] { decode_attention_q4(q.data(), kc.data(), kp.data(), vc.data(), vp.data(), kf.data(), vf.data(), start.data(), out.data(), nh, hd, cap, s, rep, gs); });
    else
        grid_warps(b * nh, 1, 128, smem, [&] { decode_attention(q.data(), kf.data(), vf.data(), start.data(), out.data(), nh, hd, cap, s, 0, rep); });
    dump(argv[17], out);
}
",
    );
    for (hd, group, q4) in [
        (128, 64, true),
        (128, 32, true),
        (128, 128, true),
        (64, 64, true),
        (64, 16, true),
        (64, 8, true),
        (128, 16, true),
        (128, 0, false),
        (64, 0, false),
        (40, 0, false),
    ] {
        let (b, nh, rep, cap, s) = (3, 4, 2, 45, 41);
        let kv_rows = b * nh / rep;
        let f = |n: &str| dir.path().join(n);
        let q = data(b * nh * hd, 3);
        let q: Vec<f32> = q.iter().map(|v| f16::from_f32(v * 0.2).to_f32()).collect();
        let (kf, vf) = (data(kv_rows * cap * hd, 5), data(kv_rows * cap * hd, 6));
        let starts = [0i32, 7, 39];
        // The cache as the kernel sees it: packed positions 0..s−1 dequantized, the newest fp16.
        let (kd, vd) = if q4 {
            let spec = QuantSpec { bits: 4, group, dim: 2 };
            let (pk, pv) = (
                quantize(&kf, &[kv_rows, cap, hd], spec),
                quantize(&vf, &[kv_rows, cap, hd], spec),
            );
            write_bytes(&f("kc"), &pk.data);
            write_bytes(&f("kp"), &params_bytes(&pk.params));
            write_bytes(&f("vc"), &pv.data);
            write_bytes(&f("vp"), &params_bytes(&pv.params));
            let (mut kd, mut vd) = (dequantize(&pk), dequantize(&pv));
            for r in 0..kv_rows {
                let at = (r * cap + s - 1) * hd;
                kd[at..at + hd].copy_from_slice(&kf[at..at + hd]);
                vd[at..at + hd].copy_from_slice(&vf[at..at + hd]);
            }
            (kd, vd)
        } else {
            for n in ["kc", "kp", "vc", "vp"] {
                write_bytes(&f(n), &[0; 4]);
            }
            (kf.clone(), vf.clone())
        };
        write_bytes(&f("q"), &f16_bytes(&q));
        write_bytes(&f("kf"), &f16_bytes(&kf));
        write_bytes(&f("vf"), &f16_bytes(&vf));
        write_bytes(&f("start"), &starts.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
        let st = Command::new(&exe)
            .args([b, nh, rep, hd, cap, s, group, usize::from(q4)].map(|v| v.to_string()))
            .args(["q", "kf", "vf", "kc", "kp", "vc", "vp", "start", "out"].map(f))
            .status()
            .unwrap();
        let label = format!(
            "head {hd}, {}",
            if q4 { format!("4-bit cache in groups of {group}") } else { "fp16 cache".into() }
        );
        assert!(st.success(), "{label}: the harness failed");
        let got = read_f16(&f("out"));
        for row in 0..b * nh {
            let (bi, kv) = (row / nh, row / rep);
            let lo = usize::try_from(starts[bi]).unwrap();
            let qr = &q[row * hd..(row + 1) * hd];
            let at = |j: usize| (kv * cap + j) * hd;
            let scores: Vec<f64> = (lo..s)
                .map(|j| (0..hd).map(|d| f64::from(qr[d]) * f64::from(kd[at(j) + d])).sum())
                .collect();
            let m = scores.iter().copied().fold(f64::MIN, f64::max);
            let e: Vec<f64> = scores.iter().map(|v| (v - m).exp()).collect();
            let sum: f64 = e.iter().sum();
            for d in 0..hd {
                let want: f64 =
                    (lo..s).map(|j| e[j - lo] * f64::from(vd[at(j) + d])).sum::<f64>() / sum;
                let g = f64::from(got[row * hd + d]);
                assert!(
                    (g - want).abs() <= 6e-4 * want.abs().max(1.0),
                    "{label}: row {row} value {d}: kernel {g}, reference {want}"
                );
            }
        }
    }
}

/// `layer_norm` (its block reductions through shuffles and shared memory) on both of its paths,
/// rows held in registers and rows too wide for them, as LayerNorm and as RMSNorm, with and without
/// a bias added to the residual first, against an f64 reference of the fp16 input, and
/// `layer_norm_rows` (the many-rows kernel: more values a thread, the weights read late) giving
/// the same bits; and `argmax_rows`' tree over 256 threads, ties going to the lowest column.
#[test]
fn layer_norm_and_argmax_match_the_reference() {
    use flexgen_tensor::cuda::exec::{LN_PER, LN_PER_ROWS};
    let dir = tempfile::tempdir().unwrap();
    for (name, n) in [("LN_PER", LN_PER), ("LN_PER_ROWS", LN_PER_ROWS)] {
        assert_eq!(define(name), format!("#define {name} {n}"), "exec.rs's {name} is kernels.cu's");
    }
    let exe = build_warps(
        dir.path(),
        &format!(
            "#define rsqrtf(v) (1.f / sqrtf(v))\n#define LN_PREFETCH 1\n{}\n{}\n{}",
            define("LN_PER"),
            define("LN_PER_ROWS"),
            section("__device__ float block_reduce(")
        ),
        &format!(
            "{}{}{}{}",
            section("template <int PER, bool PREFETCH>"),
            kernel("layer_norm"),
            kernel("layer_norm_rows"),
            kernel("argmax_rows")
        ),
        r#"
int main(int argc, char** argv) {
    int rows = atoi(argv[1]), h = atoi(argv[2]), threads = atoi(argv[3]), rms = atoi(argv[4]), pre = atoi(argv[5]);
    auto x = slurp_halves(argv[6]), w = slurp_halves(argv[7]), b = slurp_halves(argv[8]), pb = slurp_halves(argv[9]);
    std::vector<half_t> y((size_t)rows * h, 0), x1 = x, y1 = y;
    grid_warps(rows, 1, threads, 0, [&] { layer_norm(x.data(), w.data(), b.data(), y.data(), h, 1e-5f, rms, pre ? pb.data() : nullptr); });
    grid_warps(rows, 1, threads, 0, [&] { layer_norm_rows(x1.data(), w.data(), b.data(), y1.data(), h, 1e-5f, rms, pre ? pb.data() : nullptr); });
    if (x1 != x || y1 != y) { fprintf(stderr, "layer_norm_rows differs from layer_norm\n"); return 4; }
    dump(argv[10], y);
    dump(argv[11], x);
    auto t = slurp_halves(argv[13]);
    std::vector<unsigned> idx(rows);
    grid_warps(rows, 1, 256, 0, [&] { argmax_rows(t.data(), idx.data(), h); });
    FILE* f = fopen(argv[12], "wb"); fwrite(idx.data(), 4, idx.size(), f); fclose(f);
}
"#,
    );
    // (rows, h, threads): in registers (h ≤ 12·threads, and ≤ 16·threads for layer_norm_rows)
    // and past them (one kernel or both).
    for (rows, h, threads, rms, pre) in [
        (3, 300, 128, false, false),
        (2, 300, 128, true, true),
        (2, 2000, 128, false, true),
        (2, 4000, 128, false, true),
        (3, 2500, 64, true, false),
    ] {
        let f = |n: &str| dir.path().join(n);
        let x = data(rows * h, 21 + h as u64);
        let (w, b, pb) = (data(h, 22), data(h, 23), data(h, 24));
        // argmax's rows: the largest value at three columns (two held by one thread, 256 apart,
        // and the row's last), the first of them to be found.
        let mut t = data(rows * h, 25);
        for r in 0..rows {
            for c in [h - 1, 7 + 3 * r, 263 + 3 * r] {
                t[r * h + c] = 9.0;
            }
        }
        for (name, v) in [("x", &x), ("w", &w), ("b", &b), ("pb", &pb), ("t", &t)] {
            write_bytes(&f(name), &f16_bytes(v));
        }
        let st = Command::new(&exe)
            .args([rows, h, threads, usize::from(rms), usize::from(pre)].map(|v| v.to_string()))
            .args(["x", "w", "b", "pb", "y", "x2", "idx", "t"].map(f))
            .status()
            .unwrap();
        let label = format!("{rows} rows of {h}, {threads} threads, rms {rms}, pre-bias {pre}");
        assert!(st.success(), "{label}: the harness failed");
        let (y, x2) = (read_f16(&f("y")), read_f16(&f("x2")));
        let idx: Vec<u32> = std::fs::read(f("idx"))
            .unwrap()
            .chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect();
        for r in 0..rows {
            // The residual after the bias, rounded to fp16 as the kernel stores it.
            let xr: Vec<f64> = (0..h)
                .map(|i| {
                    let v = x[r * h + i] + if pre { pb[i] } else { 0.0 };
                    f64::from(if pre { f16::from_f32(v).to_f32() } else { v })
                })
                .collect();
            for i in 0..h {
                assert_eq!(f64::from(x2[r * h + i]), xr[i], "{label}: row {r} residual {i}");
            }
            #[expect(clippy::cast_precision_loss, reason = "row widths")]
            let n = h as f64;
            let mean = if rms { 0.0 } else { xr.iter().sum::<f64>() / n };
            let var = xr.iter().map(|v| (v - mean) * (v - mean)).sum::<f64>() / n;
            let inv = 1.0 / (var + 1e-5).sqrt();
            for i in 0..h {
                let want = (xr[i] - mean) * inv * f64::from(w[i])
                    + if rms { 0.0 } else { f64::from(b[i]) };
                let got = f64::from(y[r * h + i]);
                assert!(
                    (got - want).abs() <= 2e-3 * want.abs().max(1.0),
                    "{label}: row {r} value {i}: kernel {got}, reference {want}"
                );
            }
            assert_eq!(idx[r] as usize, 7 + 3 * r, "{label}: row {r} argmax, the first of three");
        }
    }
}

/// `quant_cache` (a warp per group, its min and max through shuffles) writes exactly the codes
/// and (min, scale) pairs of `quant::quantize` for the positions it is given, and nothing else.
#[test]
fn quant_cache_matches_the_reference_bit_for_bit() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_warps(
        dir.path(),
        &quant_helpers(),
        kernel("quant_cache"),
        r#"
int main(int argc, char** argv) {
    int rows = atoi(argv[1]), cap = atoi(argv[2]), hd = atoi(argv[3]), gs = atoi(argv[4]), bits = atoi(argv[5]);
    int p0 = atoi(argv[6]), np = atoi(argv[7]);
    auto x = slurp_halves(argv[8]);
    int groups = (hd + gs - 1) / gs;
    std::vector<unsigned char> codes((size_t)rows * cap * groups * gs * bits / 8, 0);
    std::vector<half_t> params((size_t)rows * cap * groups * 2, 0);
    // The second cache of the launch (blockIdx.y 1): x reversed.
    std::vector<half_t> x1(x.rbegin(), x.rend());
    auto codes1 = codes; auto params1 = params;
    long long warps = (long long)rows * np * groups;
    grid_warps((unsigned)((warps * 32 + 255) / 256), 2, 256, 0, [&] {
        quant_cache(x.data(), codes.data(), params.data(), x1.data(), codes1.data(), params1.data(), rows, cap, hd, gs, bits, p0, np); });
    FILE* f = fopen(argv[9], "wb"); fwrite(codes.data(), 1, codes.size(), f); fclose(f);
    dump(argv[10], params);
    f = fopen(argv[11], "wb"); fwrite(codes1.data(), 1, codes1.size(), f); fclose(f);
    dump(argv[12], params1);
}
"#,
    );
    let (p0, np) = (2, 4);
    for (rows, cap, hd, group, bits) in
        [(3, 7, 40, 16, 4u8), (3, 7, 40, 16, 8), (2, 9, 128, 64, 4), (4, 7, 36, 64, 4)]
    {
        let f = |n: &str| dir.path().join(n);
        let x = data(rows * cap * hd, 31 + (rows * cap * hd) as u64);
        write_bytes(&f("x"), &f16_bytes(&x));
        let st = Command::new(&exe)
            .args([rows, cap, hd, group, usize::from(bits), p0, np].map(|v| v.to_string()))
            .args(["x", "codes", "params", "codes1", "params1"].map(f))
            .status()
            .unwrap();
        assert!(st.success(), "{rows} rows × {cap} × {hd}: the harness failed");
        // The launch's two caches: x, and x reversed (blockIdx.y 1).
        let reversed: Vec<f32> = x.iter().rev().copied().collect();
        for (x, (codes, params), which) in
            [(&x, ("codes", "params"), "first"), (&reversed, ("codes1", "params1"), "second")]
        {
            let label = format!("{rows} rows × {cap} × {hd}, group {group}, {bits}-bit, {which}");
            let want = quantize(x, &[rows, cap, hd], QuantSpec { bits, group, dim: 2 });
            let (codes, params) =
                (std::fs::read(f(codes)).unwrap(), std::fs::read(f(params)).unwrap());
            let (groups, pb) = (hd.div_ceil(group), params_bytes(&want.params));
            let (code_b, pair_b) = (groups * group * usize::from(bits) / 8, groups * 4);
            let sizes = (want.data.len(), pb.len());
            assert_eq!((codes.len(), params.len()), sizes, "{label}: sizes");
            for slot in 0..rows * cap {
                let inside = (p0..p0 + np).contains(&(slot % cap));
                let c = slot * code_b..(slot + 1) * code_b;
                let p = slot * pair_b..(slot + 1) * pair_b;
                if inside {
                    assert_eq!(codes[c.clone()], want.data[c], "{label}: slot {slot} codes");
                    assert_eq!(params[p.clone()], pb[p], "{label}: slot {slot} pairs");
                } else {
                    assert!(
                        codes[c].iter().chain(&params[p]).all(|&b| b == 0),
                        "{label}: slot {slot} untouched"
                    );
                }
            }
        }
    }
}

/// The prefill softmaxes with their block reductions: `causal_softmax` (left padding from each
/// sequence's first position, causality from `past`, a query that sees no key all zeros, rows
/// from `row0`) and `masked_softmax` (scale and an additive fp32 mask shared by the heads),
/// against f64 references.
#[test]
fn prefill_softmaxes_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_warps(
        dir.path(),
        section("__device__ float block_reduce("),
        &[kernel("causal_softmax"), kernel("masked_softmax")].concat(),
        r"
int main(int argc, char** argv) {
    int nh = atoi(argv[1]), t = atoi(argv[2]), cols = atoi(argv[3]), past = atoi(argv[4]), row0 = atoi(argv[5]), rows = atoi(argv[6]);
    auto s = slurp_halves(argv[7]);
    auto sb = slurp(argv[8]);
    std::vector<int> start(sb.size() / 4); memcpy(start.data(), sb.data(), sb.size());
    auto s2 = s;
    grid_warps(rows * t, 1, 128, 0, [&] { causal_softmax(s.data(), start.data(), nh, t, cols, past, row0); });
    dump(argv[9], s);
    // masked_softmax over the same scores as [sequences = rows / nh, nh heads, t queries, cols].
    auto mb = slurp(argv[10]);
    std::vector<float> bias(mb.size() / 4); memcpy(bias.data(), mb.data(), mb.size());
    grid_warps(rows * t, 1, 64, 0, [&] { masked_softmax(s2.data(), bias.data(), nh, t, cols, 0.5f); });
    dump(argv[11], s2);
}
",
    );
    // Rows of (sequence, head) from row0 = 2: sequences 1 and 2 of nh = 2 heads.
    let (nh, t, cols, past, row0, rows) = (2usize, 3usize, 300usize, 297usize, 2usize, 4usize);
    let starts = [0i32, 5, 299];
    let f = |n: &str| dir.path().join(n);
    let s = data(rows * t * cols, 41);
    let bias: Vec<f32> =
        data(rows / nh * t * cols, 42).iter().map(|v| if *v > 0.6 { -1e4 } else { *v }).collect();
    write_bytes(&f("s"), &f16_bytes(&s));
    write_bytes(&f("start"), &starts.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    write_bytes(&f("bias"), &bias.iter().flat_map(|v| v.to_le_bytes()).collect::<Vec<u8>>());
    let st = Command::new(&exe)
        .args([nh, t, cols, past, row0, rows].map(|v| v.to_string()))
        .args(["s", "start", "out", "bias", "out2"].map(f))
        .status()
        .unwrap();
    assert!(st.success(), "the harness failed");
    let softmax = |v: Vec<(usize, f64)>| -> Vec<(usize, f64)> {
        let m = v.iter().map(|p| p.1).fold(f64::MIN, f64::max);
        let e: Vec<(usize, f64)> = v.iter().map(|&(j, x)| (j, (x - m).exp())).collect();
        let sum: f64 = e.iter().map(|p| p.1).sum();
        e.into_iter().map(|(j, x)| (j, x / sum)).collect()
    };
    let check = |label: &str, got: &[f32], row: usize, want: Vec<(usize, f64)>| {
        let mut full = vec![0f64; cols];
        for (j, p) in want {
            full[j] = p;
        }
        for (j, w) in full.iter().enumerate() {
            let g = f64::from(got[row * cols + j]);
            assert!(
                (g - w).abs() <= 1e-3 * w.max(1e-2),
                "{label}: row {row} key {j}: kernel {g}, reference {w}"
            );
        }
    };
    let (out, out2) = (read_f16(&f("out")), read_f16(&f("out2")));
    for row in 0..rows * t {
        let (qi, bi) = (row % t, (row0 + row / t) / nh);
        let (lo, hi) = (usize::try_from(starts[bi]).unwrap(), past + qi);
        let seen: Vec<(usize, f64)> =
            (lo..=hi.min(cols - 1)).map(|j| (j, f64::from(s[row * cols + j]))).collect();
        check("causal_softmax", &out, row, if seen.is_empty() { seen } else { softmax(seen) });
        let (q, seq) = (row % t, row / (nh * t));
        let masked = (0..cols)
            .map(|j| {
                (j, f64::from(s[row * cols + j]) * 0.5 + f64::from(bias[(seq * t + q) * cols + j]))
            })
            .collect();
        check("masked_softmax", &out2, row, softmax(masked));
    }
}

/// The data-movement kernels (threads share nothing): `copy_bytes` on its 16-byte path and its
/// byte path, `bias_act` with ReLU over column blocks, `swap12`, `repeat_heads`, `cat_axis1`,
/// `slice_axis1` and `embed` with a position table; `add`, `store_f32` (plain, accumulated with
/// its sums cleared, and accumulated then biased and ReLU'd) and `rotary`; against plain index arithmetic and f32 references.
#[test]
fn data_movement_kernels_match_the_reference() {
    let dir = tempfile::tempdir().unwrap();
    let exe = build_with(
        dir.path(),
        &format!(
            "struct alignas(16) bytes16 {{ unsigned long long lo, hi; }};\n#define __device__\n#define __forceinline__ inline\n{}{}",
            section("__device__ __forceinline__ float rotate("),
            section("__device__ __forceinline__ half_t bias_act1(")
        ),
        &[
            "copy_bytes",
            "bias_act",
            "swap12",
            "repeat_heads",
            "cat_axis1",
            "slice_axis1",
            "embed",
            "add",
            "store_f32",
            "rotary",
        ],
        r#"
int main(int argc, char** argv) {
    auto x = slurp_halves(argv[1]);
    auto xb = slurp(argv[1]);
    // copy_bytes: 5 rows of 48 bytes, pitches 64 → 80 (16-byte path), then 5 rows of 37 bytes
    // from an odd offset (byte path).
    std::vector<unsigned char> src(xb.begin(), xb.end()), d16(400, 0), d1(400, 0);
    grid(2, 1, [&] { copy_bytes(src.data(), d16.data(), 48, 5, 64, 80); });
    grid(2, 1, [&] { copy_bytes(src.data() + 3, d1.data() + 1, 37, 5, 41, 50); });
    FILE* f = fopen(argv[2], "wb"); fwrite(d16.data(), 1, d16.size(), f); fwrite(d1.data(), 1, d1.size(), f); fclose(f);
    // bias_act over 3 rows of 500 columns, 600 apart, in 2 column blocks of 256 (striding),
    // with ReLU.
    std::vector<half_t> y(x.begin(), x.begin() + 1800), b(x.begin() + 1800, x.begin() + 2400);
    grid(3, 2, [&] { bias_act(y.data(), b.data(), 500, 600, 1); });
    dump(argv[3], y);
    // swap12 of [2, 3, 4, 5] → [2, 4, 3, 5].
    std::vector<half_t> s(120, 0);
    grid(24, 1, [&] { swap12(x.data(), s.data(), 2, 3, 4, 5); });
    dump(argv[4], s);
    // repeat_heads: [2, 3, 4, 5] with each of the 3 heads twice → [2, 6, 4, 5].
    std::vector<half_t> r(240, 0);
    grid(48, 1, [&] { repeat_heads(x.data(), r.data(), 3, 2, 4, 5); });
    dump(argv[5], r);
    // cat_axis1 of [3, 2, 5] and [3, 4, 5]; slice_axis1 of positions 1..4 of [3, 6, 5].
    std::vector<half_t> c(90, 0), sl(45, 0);
    grid(18, 1, [&] { cat_axis1(x.data(), x.data() + 30, c.data(), 3, 2, 4, 5); });
    grid(9, 1, [&] { slice_axis1(x.data(), sl.data(), 3, 6, 1, 3, 5); });
    dump(argv[6], c); dump(argv[7], sl);
    // embed: 4 rows of width 300 from a 10-token table, positions from a 12-row table.
    unsigned ids[4] = {3, 9, 0, 3}, pos[4] = {11, 0, 5, 2};
    std::vector<half_t> e(1200, 0);
    grid(4, 1, [&] { embed(ids, pos, x.data(), x.data() + 3000, e.data(), 300, 1); });
    dump(argv[8], e);
    // add of 700 values; store_f32 of 700 sums, plain, then accumulated into fp16 and cleared.
    std::vector<half_t> ad(700, 0), st0(700, 0), st1(x.begin(), x.begin() + 700);
    std::vector<float> sums(700);
    for (int i = 0; i < 700; i++) sums[i] = h2f(x[2000 + i]) * 3.f;
    grid(2, 1, [&] { add(x.data(), x.data() + 700, ad.data(), 700); });
    // Then (st2) accumulated with a bias of 70 columns and ReLU in the same pass.
    std::vector<half_t> st2(x.begin(), x.begin() + 700), bias70(x.begin() + 1800, x.begin() + 1870);
    grid(2, 1, [&] { store_f32(sums.data(), st0.data(), 700, 0, 0, nullptr, 1, 0); });
    grid(2, 1, [&] { store_f32(sums.data(), st2.data(), 700, 1, 0, bias70.data(), 70, 1); });
    grid(2, 1, [&] { store_f32(sums.data(), st1.data(), 700, 1, 1, nullptr, 1, 0); });
    for (int i = 0; i < 700; i++) if (sums[i] != 0.f) { fprintf(stderr, "store_f32 left sum %d\n", i); exit(7); }
    st1.insert(st1.end(), st2.begin(), st2.end());
    dump(argv[9], ad); dump(argv[10], st0); dump(argv[11], st1);
    // rotary of x [2, 3, 4, 16] by tables [2, 1, 4, 16].
    std::vector<half_t> ro(384, 0);
    grid(24, 1, [&] { rotary(x.data(), x.data() + 4000, x.data() + 4200, ro.data(), 3, 4, 16); });
    dump(argv[12], ro);
}
"#,
    );
    let f = |n: &str| dir.path().join(n);
    let x = data(8000, 51);
    let xb = f16_bytes(&x);
    write_bytes(&f("x"), &xb);
    let st = Command::new(&exe)
        .args(["x", "copy", "bias", "swap", "rep", "cat", "slice", "embed"].map(f))
        .args(["add", "st0", "st1", "rot"].map(f))
        .status()
        .unwrap();
    assert!(st.success(), "the harness failed");
    let copy = std::fs::read(f("copy")).unwrap();
    let (d16, d1) = copy.split_at(400);
    for (r, c) in (0..5).flat_map(|r| (0..80).map(move |c| (r, c))) {
        let want = if c < 48 { xb[r * 64 + c] } else { 0 };
        assert_eq!(d16[r * 80 + c], want, "copy_bytes 16-byte path: row {r} byte {c}");
    }
    for (r, c) in (0..5).flat_map(|r| (0..50).map(move |c| (r, c))) {
        let want = if (1..38).contains(&c) { xb[3 + r * 41 + c - 1] } else { 0 };
        assert_eq!(d1[r * 50 + c], want, "copy_bytes byte path: row {r} byte {c}");
    }
    let h = |v: f32| f16::from_f32(v).to_f32();
    let bias = read_f16(&f("bias"));
    for i in 0..1800 {
        let want = if i % 600 < 500 { h((x[i] + x[1800 + i % 600]).max(0.0)) } else { x[i] };
        assert_eq!(bias[i], want, "bias_act {i}");
    }
    let swap = read_f16(&f("swap"));
    let rep = read_f16(&f("rep"));
    for (p, q, r, d) in (0..120).map(|i| (i / 60, i / 20 % 3, i / 5 % 4, i % 5)) {
        assert_eq!(swap[((p * 4 + r) * 3 + q) * 5 + d], x[((p * 3 + q) * 4 + r) * 5 + d], "swap12");
        for k in 0..2 {
            assert_eq!(
                rep[((p * 6 + q * 2 + k) * 4 + r) * 5 + d],
                x[((p * 3 + q) * 4 + r) * 5 + d],
                "repeat_heads"
            );
        }
    }
    let (cat, slice) = (read_f16(&f("cat")), read_f16(&f("slice")));
    for (p, i, d) in (0..90).map(|j| (j / 30, j / 5 % 6, j % 5)) {
        let want = if i < 2 { x[(p * 2 + i) * 5 + d] } else { x[30 + (p * 4 + i - 2) * 5 + d] };
        assert_eq!(cat[(p * 6 + i) * 5 + d], want, "cat_axis1 {p} {i} {d}");
    }
    for (p, i, d) in (0..45).map(|j| (j / 15, j / 5 % 3, j % 5)) {
        assert_eq!(
            slice[(p * 3 + i) * 5 + d],
            x[(p * 6 + 1 + i) * 5 + d],
            "slice_axis1 {p} {i} {d}"
        );
    }
    let emb = read_f16(&f("embed"));
    for (row, (id, pos)) in [(3, 11), (9, 0), (0, 5), (3, 2)].into_iter().enumerate() {
        for i in 0..300 {
            assert_eq!(
                emb[row * 300 + i],
                h(x[id * 300 + i] + x[3000 + pos * 300 + i]),
                "embed row {row} {i}"
            );
        }
    }
    let (add, st0, st1) = (read_f16(&f("add")), read_f16(&f("st0")), read_f16(&f("st1")));
    for i in 0..700 {
        let sum = x[2000 + i] * 3.0;
        assert_eq!(add[i], h(x[i] + x[700 + i]), "add {i}");
        assert_eq!(st0[i], h(sum), "store_f32 {i}");
        assert_eq!(st1[i], h(x[i] + sum), "store_f32 accumulated {i}");
        let then = (h(x[i] + sum) + x[1800 + i % 70]).max(0.0);
        assert_eq!(st1[700 + i], h(then), "store_f32 accumulated, then bias and ReLU {i}");
    }
    // Hugging Face's rotate_half: the first half's partner is d + 8 (negated), the second's d − 8.
    let rot = read_f16(&f("rot"));
    for (row, d) in (0..384).map(|i| (i / 16, i % 16)) {
        let (bi, ti) = (row / 12, row % 4);
        let (c, s) = (x[4000 + (bi * 4 + ti) * 16 + d], x[4200 + (bi * 4 + ti) * 16 + d]);
        let (v, p) = (x[row * 16 + d], x[row * 16 + (d + 8) % 16]);
        let want = if d < 8 { v * c - p * s } else { v * c + p * s };
        assert!(
            (rot[row * 16 + d] - want).abs() <= 2e-3 * want.abs().max(1.0),
            "rotary row {row} {d}"
        );
    }
}

/// Every kernel of kernels.cu runs in one of the tests above: a new kernel needs its emulation
/// (or its name here, with the reason it cannot have one).
#[test]
fn every_kernel_is_emulated() {
    let tests = include_str!("kernel_emulation.rs");
    let (mut missing, mut names) = (Vec::new(), Vec::new());
    for line in KERNELS.lines().filter(|l| l.starts_with("extern \"C\" __global__ void")) {
        // Past `__launch_bounds__(…)`, where it is given.
        let line = line.find("__launch_bounds__(").map_or(line, |at| {
            let close = line[at..].find(')').expect("launch bounds closed") + at;
            &line[close + 1..]
        });
        let name = line[..line.find('(').expect("a kernel's parameters")]
            .rsplit(' ')
            .next()
            .expect("a kernel's name");
        // The name in a harness or a kernel list, as a whole word.
        let launched = tests.match_indices(name).any(|(at, _)| {
            let next = tests[at + name.len()..].chars().next().unwrap_or(' ');
            let prev = tests[..at].chars().next_back().unwrap_or(' ');
            !(next.is_alphanumeric() || next == '_' || prev.is_alphanumeric() || prev == '_')
        });
        if !launched {
            missing.push(name.to_string());
        }
        names.push(name.to_string());
    }
    assert!(missing.is_empty(), "kernels no emulation test runs: {missing:?}");
    for k in ["gemm4_tc_8", "decode_attention_q4", "layer_norm", "embed"] {
        assert!(names.iter().any(|n| n == k), "{k} among the kernels found: {names:?}");
    }
    assert!(names.len() >= 25, "{names:?}");
}
