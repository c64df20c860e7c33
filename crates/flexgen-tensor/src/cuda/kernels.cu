// fp16 kernels of the decoder, compiled at run time with NVRTC. No CUDA headers are needed: halves
// are carried as 16-bit integers and converted with PTX instructions; all arithmetic is fp32.
typedef unsigned short half_t;

__device__ __forceinline__ float h2f(half_t h) { float f; asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h)); return f; }
__device__ __forceinline__ half_t f2h(float f) { half_t h; asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f)); return h; }

// Sum (or max) over the block; every thread gets the result. `sh` holds 32 floats.
__device__ float block_reduce(float v, float* sh, bool is_max) {
    for (int o = 16; o > 0; o >>= 1) {
        float u = __shfl_xor_sync(0xffffffff, v, o);
        v = is_max ? fmaxf(v, u) : v + u;
    }
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = (blockDim.x + 31) >> 5;
    if (lane == 0) sh[warp] = v;
    __syncthreads();
    v = threadIdx.x < warps ? sh[threadIdx.x] : (is_max ? -3.0e38f : 0.f);
    if (warp == 0) {
        for (int o = 16; o > 0; o >>= 1) {
            float u = __shfl_xor_sync(0xffffffff, v, o);
            v = is_max ? fmaxf(v, u) : v + u;
        }
        if (lane == 0) sh[0] = v;
    }
    __syncthreads();
    float r = sh[0];
    __syncthreads();
    return r;
}

// out[row, :] = tok[ids[row], :] (+ pos_table[pos[row], :]); one block per row.
extern "C" __global__ void embed(const unsigned int* ids, const unsigned int* pos, const half_t* tok,
                                 const half_t* pos_table, half_t* out, int h, int has_pos) {
    size_t row = blockIdx.x;
    for (int i = threadIdx.x; i < h; i += blockDim.x) {
        float v = h2f(tok[(size_t)ids[row] * h + i]);
        if (has_pos) v += h2f(pos_table[(size_t)pos[row] * h + i]);
        out[row * h + i] = f2h(v);
    }
}

// ROW_COLS: kernels over rows whose launch (ops.rs `row_cols`) gives a row one block of 256 threads
// when there are many rows, or a block per 256 columns when there are few (a decode step's
// micro-batch), so that either way the device is full; each thread strides over the columns.

// Values of a row each thread of layer_norm holds in registers: rows of up to LN_PER · blockDim
// values are read once, all loads in flight at once (a decode step's few rows leave most SMs idle,
// so each block's latency is the kernel's); wider rows take the loop below. At most 1024 threads,
// so at most 64 registers each: with the weight and bias loaded ahead (LN_PREFETCH; 0, through
// FLEXGEN_NVRTC_DEFINES, reads them after the reductions instead, to compare) 12 values fit.
// layer_norm_rows, for many rows (a prefill), holds LN_PER_ROWS = 16 and loads them after:
// there other blocks hide the latency. exec.rs's LN_PER and LN_PER_ROWS are the same numbers
// (its threads per row).
#define LN_PER 12
#define LN_PER_ROWS 16
#ifndef LN_PREFETCH
#define LN_PREFETCH 1
#endif

// LayerNorm (rms = 0: mean and variance, weight and bias) or RMSNorm (rms != 0: root mean square,
// weight only) of each row of h values; one block per row. With `pb` (else null), x += pb first
// (rounded to fp16 and stored, as bias_act would) and the sum is normed: a sublayer's output bias
// and the next norm in one kernel. Both paths sum in the same order (thread i: values i,
// i + blockDim, …), so they give the same bits, as do both kernels. In place (y = x) is allowed.
template <int PER, bool PREFETCH>
__device__ __forceinline__ void layer_norm_row(half_t* x, const half_t* w, const half_t* b, half_t* y, int h, float eps, int rms, const half_t* pb) {
    __shared__ float sh[32];
    half_t* xr = x + (size_t)blockIdx.x * h;
    half_t* yr = y + (size_t)blockIdx.x * h;
    if (h <= PER * (int)blockDim.x) {
        float v[PER];
        // The weight and bias loaded with x, ahead of the reductions (two fp16 a register).
        unsigned wb[PER / 2], bb[PER / 2];
#pragma unroll
        for (int k = 0; k < PER; k++) {
            int i = threadIdx.x + k * blockDim.x;
            v[k] = i < h ? h2f(xr[i]) : 0.f;
            const unsigned wi = PREFETCH && i < h ? (unsigned)w[i] : 0u, bi = PREFETCH && i < h && !rms ? (unsigned)b[i] : 0u;
            wb[k / 2] = k % 2 ? wb[k / 2] | wi << 16 : wi;
            bb[k / 2] = k % 2 ? bb[k / 2] | bi << 16 : bi;
        }
        if (pb) {
#pragma unroll
            for (int k = 0; k < PER; k++) {
                int i = threadIdx.x + k * blockDim.x;
                if (i < h) { half_t s = f2h(v[k] + h2f(pb[i])); xr[i] = s; v[k] = h2f(s); }
            }
        }
        float m = 0.f;
        if (!rms) {
            float s = 0.f;
#pragma unroll
            for (int k = 0; k < PER; k++)
                if (threadIdx.x + k * blockDim.x < h) s += v[k];
            m = block_reduce(s, sh, false) / h;
        }
        float q = 0.f;
#pragma unroll
        for (int k = 0; k < PER; k++)
            if (threadIdx.x + k * blockDim.x < h) { float d = v[k] - m; q += d * d; }
        float inv = rsqrtf(block_reduce(q, sh, false) / h + eps);
#pragma unroll
        for (int k = 0; k < PER; k++) {
            int i = threadIdx.x + k * blockDim.x;
            if (i >= h) continue;
            const half_t wk = PREFETCH ? (half_t)(wb[k / 2] >> (16 * (k % 2))) : w[i];
            const half_t bk = rms ? (half_t)0 : PREFETCH ? (half_t)(bb[k / 2] >> (16 * (k % 2))) : b[i];
            yr[i] = f2h((v[k] - m) * inv * h2f(wk) + (rms ? 0.f : h2f(bk)));
        }
        return;
    }
    if (pb)
        for (int i = threadIdx.x; i < h; i += blockDim.x) xr[i] = f2h(h2f(xr[i]) + h2f(pb[i]));
    float mean = 0.f;
    if (!rms) {
        float s = 0.f;
        for (int i = threadIdx.x; i < h; i += blockDim.x) s += h2f(xr[i]);
        mean = block_reduce(s, sh, false) / h;
    }
    float v = 0.f;
    for (int i = threadIdx.x; i < h; i += blockDim.x) { float d = h2f(xr[i]) - mean; v += d * d; }
    float inv = rsqrtf(block_reduce(v, sh, false) / h + eps);
    for (int i = threadIdx.x; i < h; i += blockDim.x)
        yr[i] = f2h((h2f(xr[i]) - mean) * inv * h2f(w[i]) + (rms ? 0.f : h2f(b[i])));
}
extern "C" __global__ void __launch_bounds__(1024) layer_norm(half_t* x, const half_t* w, const half_t* b, half_t* y, int h, float eps, int rms, const half_t* pb) {
    layer_norm_row<LN_PER, LN_PREFETCH != 0>(x, w, b, y, h, eps, rms, pb);
}
extern "C" __global__ void __launch_bounds__(1024) layer_norm_rows(half_t* x, const half_t* w, const half_t* b, half_t* y, int h, float eps, int rms, const half_t* pb) {
    layer_norm_row<LN_PER_ROWS, false>(x, w, b, y, h, eps, rms, pb);
}

// Rotary position embedding (Hugging Face's rotate_half convention) of value d of a head of hd
// values: v the value, p its partner (value d + hd/2 for the first half, d − hd/2 for the second),
// c and s the cosine and sine of its angle.
__device__ __forceinline__ float rotate(float v, float p, int d, int hd, float c, float s) {
    return d < hd / 2 ? v * c - p * s : v * c + p * s;
}

// y = x rotated by the tables cos, sin [b, 1, t, hd]: x [b, n, t, hd]. One block per (b, n, t) row.
extern "C" __global__ void rotary(const half_t* x, const half_t* cos_t, const half_t* sin_t, half_t* y, int n, int t, int hd) {
    size_t row = blockIdx.x;
    size_t ti = row % t, bi = row / ((size_t)n * t);
    const half_t* xr = x + row * hd;
    const half_t* cr = cos_t + (bi * t + ti) * hd;
    const half_t* sr = sin_t + (bi * t + ti) * hd;
    int half = hd / 2;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        int pd = d < half ? d + half : d - half;
        y[row * hd + d] = f2h(rotate(h2f(xr[d]), h2f(xr[pd]), d, hd, h2f(cr[d]), h2f(sr[d])));
    }
}

// y [b, nkv·rep, s, hd] from x [b, nkv, s, hd]: each head repeated rep times (grouped-query
// attention). One block per y row.
extern "C" __global__ void repeat_heads(const half_t* x, half_t* y, int nkv, int rep, int s, int hd) {
    size_t row = blockIdx.x;
    int si = row % s;
    size_t bh = row / s;
    int hh = bh % (nkv * rep);
    size_t bi = bh / (nkv * rep);
    const half_t* xr = x + ((bi * nkv + hh / rep) * s + si) * hd;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) y[row * hd + d] = xr[d];
}

// SwiGLU: out[r, j] = silu(g[r, j]) · u[r, j] for j < f, rows of g and u ld apart, of out ld_out
// apart. In place (out = g, ld_out = ld) is allowed: each value is read before it is written, by
// the same thread. Rows by blockIdx.x, columns strided over the blockIdx.y blocks (ROW_COLS).
extern "C" __global__ void silu_mul(const half_t* g, const half_t* u, half_t* out, int f, int ld, int ld_out) {
    size_t r = blockIdx.x;
    for (int j = blockIdx.y * blockDim.x + threadIdx.x; j < f; j += gridDim.y * blockDim.x) {
        float a = h2f(g[r * ld + j]);
        out[r * ld_out + j] = f2h(a / (1.f + __expf(-a)) * h2f(u[r * ld + j]));
    }
}

// y[r, c] = act(y[r, c] + b[c]); act = ReLU when relu != 0. Rows by blockIdx.x, columns strided
// over the blockIdx.y blocks (ROW_COLS).
// bias_act's step on one value of column c (store_f32 takes it too).
__device__ __forceinline__ half_t bias_act1(half_t y, const half_t* b, int c, int relu) {
    float v = h2f(y) + (b ? h2f(b[c]) : 0.f);
    if (relu && v < 0.f) v = 0.f;
    return f2h(v);
}
extern "C" __global__ void bias_act(half_t* y, const half_t* b, int cols, int ld, int relu) {
    half_t* yr = y + (size_t)blockIdx.x * ld;
    for (int c = blockIdx.y * blockDim.x + threadIdx.x; c < cols; c += gridDim.y * blockDim.x)
        yr[c] = bias_act1(yr[c], b, c, relu);
}

// Copies `height` rows of `width` bytes (rows `spitch` and `dpitch` bytes apart) with the SMs,
// 16 bytes at a time where addresses, width and pitches allow: device memory, or mapped pinned
// host memory through its device address, on either side. A copy engine serves copies in the
// order they were issued, so a copy the compute stream needs would wait behind the weight
// stream's whole-layer copies; this one does not.
struct alignas(16) bytes16 { unsigned long long lo, hi; };
extern "C" __global__ void copy_bytes(const unsigned char* src, unsigned char* dst, long long width,
                                      long long height, long long spitch, long long dpitch) {
    long long i0 = blockIdx.x * (long long)blockDim.x + threadIdx.x, step = (long long)gridDim.x * blockDim.x;
    if ((((unsigned long long)src | (unsigned long long)dst | (unsigned long long)width |
          (unsigned long long)spitch | (unsigned long long)dpitch) & 15) == 0) {
        long long w = width / 16, n = w * height;
        for (long long i = i0; i < n; i += step) {
            long long r = i / w, c = i - r * w;
            *(bytes16*)(dst + r * dpitch + c * 16) = *(const bytes16*)(src + r * spitch + c * 16);
        }
    } else {
        long long n = width * height;
        for (long long i = i0; i < n; i += step) {
            long long r = i / width, c = i - r * width;
            dst[r * dpitch + c] = src[r * spitch + c];
        }
    }
}

// out = a + b, elementwise.
extern "C" __global__ void add(const half_t* a, const half_t* b, half_t* out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = f2h(h2f(a[i]) + h2f(b[i]));
}

// y[p][r][q][d] = x[p][q][r][d]: swaps axes 1 and 2 of a 4-d tensor (split/merge heads).
// One block per (p, q, r) row of d3 values: blockIdx.x = (p·d1 + q)·d2 + r indexes x's rows.
extern "C" __global__ void swap12(const half_t* x, half_t* y, int d0, int d1, int d2, int d3) {
    unsigned int row = blockIdx.x;
    unsigned int r = row % d2, q = (row / d2) % d1, p = row / (d2 * d1);
    const half_t* xr = x + (size_t)row * d3;
    half_t* yr = y + (((size_t)p * d2 + r) * d1 + q) * d3;
    for (int d = threadIdx.x; d < d3; d += blockDim.x) yr[d] = xr[d];
}

// Row-wise softmax of scale·s + bias over `cols` keys, in place. Rows are (sequence, head, query);
// bias is fp32 [sequences, queries, cols], shared by the heads. One block per row.
extern "C" __global__ void masked_softmax(half_t* s, const float* bias, int heads, int queries, int cols, float scale) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    int q = row % queries;
    long long seq = row / ((long long)heads * queries);
    half_t* sr = s + row * cols;
    const float* br = bias + (seq * queries + q) * cols;
    float m = -3.0e38f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) m = fmaxf(m, h2f(sr[j]) * scale + br[j]);
    m = block_reduce(m, sh, true);
    float sum = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) sum += __expf(h2f(sr[j]) * scale + br[j] - m);
    float inv = 1.f / block_reduce(sum, sh, false);
    for (int j = threadIdx.x; j < cols; j += blockDim.x) sr[j] = f2h(__expf(h2f(sr[j]) * scale + br[j] - m) * inv);
}

// y[p, i, :] = x1[p, i, :] for i < n1, else x2[p, i − n1, :]: concatenation along axis 1 of
// [a, n, c] tensors (the KV cache's position axis, with a = batch·heads). One block per y row.
extern "C" __global__ void cat_axis1(const half_t* x1, const half_t* x2, half_t* y, int a, int n1, int n2, int c) {
    unsigned int row = blockIdx.x;
    unsigned int i = row % (n1 + n2), p = row / (n1 + n2);
    const half_t* src = i < (unsigned)n1 ? x1 + ((size_t)p * n1 + i) * c : x2 + ((size_t)p * n2 + i - n1) * c;
    half_t* dst = y + (size_t)row * c;
    for (int d = threadIdx.x; d < c; d += blockDim.x) dst[d] = src[d];
}

// y[p, i, :] = x[p, start + i, :] for i < len, from an [a, n, c] tensor. One block per y row.
extern "C" __global__ void slice_axis1(const half_t* x, half_t* y, int a, int n, int start, int len, int c) {
    unsigned int row = blockIdx.x;
    unsigned int i = row % len, p = row / len;
    const half_t* src = x + ((size_t)p * n + start + i) * c;
    half_t* dst = y + (size_t)row * c;
    for (int d = threadIdx.x; d < c; d += blockDim.x) dst[d] = src[d];
}

// ---- Fused operations of the offloading executor ----

__device__ __forceinline__ half_t f16_down(float x) {
    half_t h = f2h(x);
    if (h2f(h) > x) h = (h == 0) ? (half_t)0x8001 : ((h & 0x8000) ? h + 1 : h - 1);
    return h;
}
__device__ __forceinline__ half_t f16_up(float x) { // x >= 0
    half_t h = f2h(x);
    if (h2f(h) < x) h = h + 1;
    return h;
}
// The (min, scale) of a group whose values lie in [lo, hi], and a value's code: as
// flexgen_tensor::quant rounds them (min rounded down and scale rounded up to fp16, codes rounded
// to nearest). quant_cache and qkv_split's packing share them.
__device__ __forceinline__ void quant_pair(float lo, float hi, float levels, half_t* mn, half_t* sc) {
    *mn = f16_down(lo);
    *sc = f16_up((hi - h2f(*mn)) / levels);
}
__device__ __forceinline__ unsigned quant_code(float v, float m, float s, float levels) {
    return s > 0.f ? (unsigned)(int)fminf(fmaxf(roundf((v - m) / s), 0.f), levels) : 0u;
}

// Value c of row yr of the q/k/v projection: + bias, and q and k rotated by position p
// (inv_freq null: none).
__device__ __forceinline__ float qkv_value(const half_t* yr, const half_t* bias, const float* inv_freq, unsigned p,
                                           int c, int h, int kv, int hd) {
    float v = h2f(yr[c]) + (bias ? h2f(bias[c]) : 0.f);
    if (inv_freq && c < h + kv) {
        const int half = hd / 2, d = c % hd;
        const int pc = c - d + (d < half ? d + half : d - half);
        const float pv = h2f(yr[pc]) + (bias ? h2f(bias[pc]) : 0.f);
        float cs, sn;
        sincosf((float)p * inv_freq[d % half], &sn, &cs);
        v = rotate(v, pv, d, hd, cs, sn);
    }
    return v;
}

// y: the [rows = b·t, h + 2·kv] output of the fused q/k/v GEMM. Adds the bias (none when null),
// rotates q and k by their positions (pos [rows], inv_freq [hd/2]; no rotation when inv_freq is
// null), writes q·scale to q [b, nh, t, hd], and k and v of (sequence, kv head) row r = bi·nkv +
// head: rows r < gpu_rows into the caches [gpu_rows, cap, hd] at position past + (row % t), the
// other rows into kn/vn [rows − gpu_rows, ncap, hd] at position npast + (row % t). Two adjacent
// values a thread (hd even), rows of y by blockIdx.x, pairs of columns strided over the
// blockIdx.y blocks (ROW_COLS). With `kq` (else null), rows r < qrows are also packed to 4 bits
// into the packed caches (kq, kp) and (vq, vp) [qrows, cap, hd] at position past + (row % t), as
// quant_cache packs them, in groups of 64 values: a warp's 64 columns are one group of one head
// (hd a multiple of 64), each lane's two values one byte.
extern "C" __global__ void qkv_split(const half_t* y, const half_t* bias, const unsigned int* pos, const float* inv_freq,
                                     half_t* q, half_t* kc, half_t* vc,
                                     half_t* kn, half_t* vn, int gpu_rows, int ncap, int npast,
                                     int t, int nh, int nkv, int hd, int cap, int past, float scale,
                                     unsigned char* kq, half_t* kp, unsigned char* vq, half_t* vp, int qrows) {
    const int row = blockIdx.x, bi = row / t, ti = row % t;
    const int h = nh * hd, kv = nkv * hd, w = h + 2 * kv;
    const half_t* yr = y + (size_t)row * w;
    const unsigned int p = inv_freq ? pos[row] : 0;
    for (int c = 2 * (blockIdx.y * blockDim.x + threadIdx.x); c < w; c += 2 * gridDim.y * blockDim.x) {
        const float v0 = qkv_value(yr, bias, inv_freq, p, c, h, kv, hd);
        const float v1 = qkv_value(yr, bias, inv_freq, p, c + 1, h, kv, hd);
        const int d = c % hd;
        if (c < h) {
            *(unsigned*)(q + (((size_t)bi * nh + c / hd) * t + ti) * hd + d) = (unsigned)f2h(v0 * scale) | (unsigned)f2h(v1 * scale) << 16;
            continue;
        }
        const int c2 = c - h, is_v = c2 >= kv, r = bi * nkv + (c2 - is_v * kv) / hd;
        half_t* dst = r < gpu_rows ? (is_v ? vc : kc) + ((size_t)r * cap + past + ti) * hd + d
                                   : (is_v ? vn : kn) + ((size_t)(r - gpu_rows) * ncap + npast + ti) * hd + d;
        const half_t h0 = f2h(v0), h1 = f2h(v1);
        *(unsigned*)dst = (unsigned)h0 | (unsigned)h1 << 16;
        if (kq && r < qrows) { // the whole warp: one group of one head of one row
            const float a = h2f(h0), b = h2f(h1);
            float lo = fminf(a, b), hi = fmaxf(a, b);
            for (int o = 16; o > 0; o >>= 1) {
                lo = fminf(lo, __shfl_xor_sync(0xffffffff, lo, o));
                hi = fmaxf(hi, __shfl_xor_sync(0xffffffff, hi, o));
            }
            half_t mn, sc;
            quant_pair(lo, hi, 15.f, &mn, &sc);
            const float m = h2f(mn), s = h2f(sc);
            const size_t slot = (size_t)r * cap + past + ti;
            if ((threadIdx.x & 31) == 0) {
                half_t* pr = (is_v ? vp : kp) + 2 * (slot * (hd / 64) + d / 64);
                pr[0] = mn;
                pr[1] = sc;
            }
            (is_v ? vq : kq)[slot * (hd / 2) + d / 2] = (unsigned char)(quant_code(a, m, s, 15.f) | quant_code(b, m, s, 15.f) << 4);
        }
    }
}

// Softmax in place of scores [rows·t, cols] (q already scaled) of (sequence, head) rows
// row0, row0 + 1, …: query qi of sequence bi sees keys start[bi] <= j <= past + qi (left padding
// and causality). A row that sees no key (a padding query) becomes zeros. One block per row.
extern "C" __global__ void causal_softmax(half_t* s, const int* start, int nh, int t, int cols, int past, int row0) {
    __shared__ float sh[32];
    long long row = blockIdx.x;
    int qi = row % t, bi = (row0 + row / t) / nh;
    int lo = start[bi], hi = past + qi;
    half_t* sr = s + row * cols;
    float m = -3.0e38f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) if (j >= lo && j <= hi) m = fmaxf(m, h2f(sr[j]));
    m = block_reduce(m, sh, true);
    float sum = 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x) if (j >= lo && j <= hi) sum += __expf(h2f(sr[j]) - m);
    sum = block_reduce(sum, sh, false);
    float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int j = threadIdx.x; j < cols; j += blockDim.x)
        sr[j] = f2h((j >= lo && j <= hi) ? __expf(h2f(sr[j]) - m) * inv : 0.f);
}

// ---- Tensor-core and asynchronous-copy primitives ----
// The PTX instructions of the tensor-core kernels (the 4-bit product, decode attention over a
// 4-bit cache), one function each (the emulation test in CI replaces exactly these with C++ of
// the same meaning): byte permute, fp16x2 subtract and fused multiply-add (rounded to nearest),
// D += A·B of one m16n8k16 mma (fp16 in, fp32 sums), ldmatrix, the asynchronous copies to
// shared memory, and Hopper's warpgroup products (wgmma).
__device__ __forceinline__ unsigned prmt(unsigned a, unsigned b, unsigned sel) {
    unsigned d;
    asm("prmt.b32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(sel));
    return d;
}
__device__ __forceinline__ unsigned sub_f16x2(unsigned a, unsigned b) {
    unsigned d;
    asm("sub.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
}
__device__ __forceinline__ unsigned fma_f16x2(unsigned a, unsigned b, unsigned c) {
    unsigned d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
__device__ __forceinline__ void mma_16816(float* d, const unsigned* a, uint2 b) {
#if __CUDA_ARCH__ >= 800
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b.x), "r"(b.y));
#else
    __trap(); // no m16n8k16 before sm_80; the host does not launch it there
#endif
}
// ldmatrix .x4 (.x2): four (two) 8×8 fp16 matrices from shared memory, lane 8j + r giving the
// shared-space address of row r of matrix j (16 bytes; .x2: lanes 0–15); lane 4g + t receives
// row g's values 2t, 2t + 1 of matrix j in d[j].
__device__ __forceinline__ void ldsm_x4(unsigned* d, unsigned a) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n" : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3]) : "r"(a));
#else
    __trap();
#endif
}
__device__ __forceinline__ void ldsm_x2(unsigned* d, unsigned a) {
#if __CUDA_ARCH__ >= 800
    asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(d[0]), "=r"(d[1]) : "r"(a));
#else
    __trap();
#endif
}

// cp.async: n (0 to 16, or 0 or 4) bytes from global src to shared dst (a shared-space address,
// smem_u32 of a pointer to shared memory), the rest of the 16 (4) zeroed, in flight until a
// cp_async_wait; commit closes the copies issued since the last one into a group, and wait<N>
// returns when at most N groups are still in flight. The source is read only where n > 0 (it
// must still be a valid address).
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}
__device__ __forceinline__ void cp_async16(unsigned dst, const void* src, int n) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async4(unsigned dst, const void* src, int n) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(dst), "l"(src), "r"(n));
#else
    __trap();
#endif
}
__device__ __forceinline__ void cp_async_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;\n" ::);
#endif
}
// p[0..3] += a, b, c, d (p 16-byte aligned): one vector reduction from sm_90, four before.
__device__ __forceinline__ void red_add4(float* p, float a, float b, float c, float d) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"l"(p), "f"(a), "f"(b), "f"(c), "f"(d) : "memory");
#else
    atomicAdd(p, a); atomicAdd(p + 1, b); atomicAdd(p + 2, c); atomicAdd(p + 3, d);
#endif
}
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
#endif
}

// wgmma (sm_90a, NVRTC's compute_90a: Hopper's warpgroup products), N of 64, 32 or 16: the 128
// threads of a warpgroup (four warps) together add A·B to D = d[0 .. N/2) of each, A [64 × 16]
// fp16 from registers (warp i holding rows 16i … 16i + 15 in mma_16816's A layout), B [16 × N]
// fp16 read from shared memory as the descriptor `desc` places it (wg_desc, below: each of B's N
// columns 16 contiguous values, "K-major"), D fp32, warp i's rows 16i …, each 8 columns j in
// d[4j .. 4j + 3] as mma_16816's D. Asynchronous: wgmma_fence orders the registers written
// before it (A, D) ahead of the products issued after it; wgmma_commit closes the products issued
// since the last into a group; wgmma_wait<N> returns when at most N of the warp's groups are in
// flight. D and A are not to be touched, nor B's shared memory written, while a product that uses
// them is in flight. fence_proxy_async makes this thread's writes to shared memory (cp.async's among them)
// visible to the tensor cores' reads, ahead of the barrier that publishes them.
template <int N>
__device__ __forceinline__ void wgmma_64xn(float* d, const unsigned* a, unsigned long long desc);
template <>
__device__ __forceinline__ void wgmma_64xn<64>(float* d, const unsigned* a, unsigned long long desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %37, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n64k16.f32.f16.f16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, "
                 "{%32,%33,%34,%35}, %36, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
                   "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
                   "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
#else
    __trap(); // sm_90a only; kernels.cu takes it only where GT_WGMMA says
#endif
}
template <>
__device__ __forceinline__ void wgmma_64xn<32>(float* d, const unsigned* a, unsigned long long desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, "
                 "{%16,%17,%18,%19}, %20, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
                   "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
#else
    __trap(); // sm_90a only; kernels.cu takes it only where GT_WGMMA says
#endif
}
template <>
__device__ __forceinline__ void wgmma_64xn<16>(float* d, const unsigned* a, unsigned long long desc) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"
                 "wgmma.mma_async.sync.aligned.m64n16k16.f32.f16.f16 "
                 "{%0,%1,%2,%3,%4,%5,%6,%7}, "
                 "{%8,%9,%10,%11}, %12, p, 1, 1, 0;\n}\n"
                 : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc), "r"(1));
#else
    __trap(); // sm_90a only; kernels.cu takes it only where GT_WGMMA says
#endif
}
__device__ __forceinline__ void wgmma_fence() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}
__device__ __forceinline__ void wgmma_commit() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void wgmma_wait() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}
// The registers d[0..N) as the compiler must see them after a wgmma_wait: read and written at
// this point (an empty asm), so that no read of a product's D moves above the wait that ends it.
template <int N>
__device__ __forceinline__ void wgmma_keep(float* d) {
#pragma unroll
    for (int i = 0; i < N; i++) asm volatile("" : "+f"(d[i])::"memory");
}
__device__ __forceinline__ void fence_proxy_async() {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

// The codes in bits 0–3 and 16–19 of q as exact fp16x2 integers (1024 + code less 1024), and
// those in bits 4–7 and 20–23 without a shift (64 + code less 64, as 64's unit in the last place
// is 1/16). raw_* leave the offset on; `k` is the offset's bits (0x64006400, 0x54005400), passed
// by a caller that keeps them in a register.
__device__ __forceinline__ unsigned raw_lo(unsigned q, unsigned k = 0x64006400u) { return (q & 0x000F000Fu) | k; } // 1024 + code
__device__ __forceinline__ unsigned raw_hi(unsigned q, unsigned k = 0x54005400u) { return (q & 0x00F000F0u) | k; } // 64 + code
__device__ __forceinline__ unsigned codes_lo(unsigned q) { return sub_f16x2(raw_lo(q), 0x64006400u); }
__device__ __forceinline__ unsigned codes_hi(unsigned q) { return sub_f16x2(raw_hi(q), 0x54005400u); }

// PER fp16 values at p as floats: one 8-byte (PER 4) or 4-byte (PER 2) load (p aligned to it).
template <int PER>
__device__ __forceinline__ void load_per(const half_t* p, float* out) {
    if (PER == 4) {
        uint2 v = *(const uint2*)p;
        out[0] = h2f((half_t)(v.x & 0xffffu)); out[1] = h2f((half_t)(v.x >> 16));
        out[PER > 2 ? 2 : 0] = h2f((half_t)(v.y & 0xffffu)); out[PER > 3 ? 3 : 0] = h2f((half_t)(v.y >> 16));
    } else if (PER == 2) {
        unsigned int v = *(const unsigned int*)p;
        out[0] = h2f((half_t)(v & 0xffffu)); out[PER > 1 ? 1 : 0] = h2f((half_t)(v >> 16));
    } else {
        for (int i = 0; i < PER; i++) out[i] = h2f(p[i]);
    }
}

// decode_attention's two passes over the keys for a head of 32·PER values (lane l holds values
// l·PER…, one vector load per row), U keys per warp at a time so that U rows' loads are in flight
// before any is used: the scores of keys lo.. into sm, and (after the softmax) this warp's part
// of Σ_j p_j·v_j into acc.
#define DA_U 4
template <int PER>
__device__ __forceinline__ void da_scores(const half_t* K, const float* qv, float* sm, int lo, int s, int hd, int lane, int warp, int nw) {
    int j = lo + warp;
    for (; j + (DA_U - 1) * nw < s; j += DA_U * nw) {
        float kv[DA_U][PER];
#pragma unroll
        for (int u = 0; u < DA_U; u++) load_per<PER>(K + (size_t)(j + u * nw) * hd + lane * PER, kv[u]);
        float a[DA_U];
#pragma unroll
        for (int u = 0; u < DA_U; u++) {
            a[u] = 0.f;
#pragma unroll
            for (int i = 0; i < PER; i++) a[u] += qv[i] * kv[u][i];
        }
#pragma unroll
        for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
            for (int u = 0; u < DA_U; u++) a[u] += __shfl_xor_sync(0xffffffff, a[u], o);
        }
        if (lane == 0)
            for (int u = 0; u < DA_U; u++) sm[j + u * nw] = a[u];
    }
    for (; j < s; j += nw) {
        float kv[PER];
        load_per<PER>(K + (size_t)j * hd + lane * PER, kv);
        float a = 0.f;
        for (int i = 0; i < PER; i++) a += qv[i] * kv[i];
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
        if (lane == 0) sm[j] = a;
    }
}
template <int PER>
__device__ __forceinline__ void da_values(const half_t* V, const float* sm, float* acc, int lo, int s, int hd, int lane, int warp, int nw) {
    int j = lo + warp;
    for (; j + (DA_U - 1) * nw < s; j += DA_U * nw) {
        float vv[DA_U][PER];
#pragma unroll
        for (int u = 0; u < DA_U; u++) load_per<PER>(V + (size_t)(j + u * nw) * hd + lane * PER, vv[u]);
#pragma unroll
        for (int u = 0; u < DA_U; u++) {
            float p = sm[j + u * nw];
#pragma unroll
            for (int i = 0; i < PER; i++) acc[i] += p * vv[u][i];
        }
    }
    for (; j < s; j += nw) {
        float vv[PER];
        load_per<PER>(V + (size_t)j * hd + lane * PER, vv);
        float p = sm[j];
        for (int i = 0; i < PER; i++) acc[i] += p * vv[i];
    }
}

// The softmax of the scores sm[lo..s) in place (exponentials, the largest subtracted); returns
// their sum. Every thread of the block calls it.
__device__ __forceinline__ float da_softmax(float* sm, float* red, int lo, int s) {
    __syncthreads();
    float m = -3.0e38f;
    for (int j = lo + threadIdx.x; j < s; j += blockDim.x) m = fmaxf(m, sm[j]);
    m = block_reduce(m, red, true);
    float sum = 0.f;
    for (int j = lo + threadIdx.x; j < s; j += blockDim.x) { float e = __expf(sm[j] - m); sm[j] = e; sum += e; }
    return block_reduce(sum, red, false);
}

// The warps' parts acc (lane l's `per` ≤ N values from l·per) of the row summed through shared
// memory `part` [warps, hd], divided by sum, into out [hd]. (N a constant, so that acc stays in
// registers.)
template <int N>
__device__ __forceinline__ void da_finish(const float* acc, int per, float* part, float sum, half_t* out, int hd, int lane, int warp, int nw) {
#pragma unroll
    for (int i = 0; i < N; i++) { int d = lane * per + i; if (i < per && d < hd) part[warp * hd + d] = acc[i]; }
    __syncthreads();
    float inv = 1.f / sum;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float v = 0.f;
        for (int w = 0; w < nw; w++) v += part[w * hd + d];
        out[d] = f2h(v * inv);
    }
}

// Attention of one new token per sequence for the query (sequence, head) rows row0, row0 + 1, …:
// q [rows, hd] (already scaled; row r at q + r·hd), caches of (sequence, kv head) rows, rep query
// heads per kv head (grouped-query attention; query row r reads kv row r / rep), laid out
// [.., cap, hd] from kv row row0 / rep, holding s positions, of which sequence bi sees
// start[bi]..s-1; out row r at out + r·hd (heads merged).
// One block (a few warps) per row; warps take keys in turn, each lane `per` contiguous values of
// the head (hd of 64 or 128 with aligned caches: one vector load per row and lane, DA_U rows in
// flight; other heads value by value). Dynamic shared memory: s + warps·hd floats.
#define MAXPER 8
extern "C" __global__ void decode_attention(const half_t* q, const half_t* kc, const half_t* vc, const int* start,
                                            half_t* out, int nh, int hd, int cap, int s, int row0, int rep) {
    extern __shared__ float sm[];
    __shared__ float red[32];
    int bh = row0 + blockIdx.x, bi = bh / nh;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int per = (hd + 31) / 32;
    const half_t* qr = q + (size_t)bh * hd;
    const half_t* K = kc + (size_t)(blockIdx.x / rep) * cap * hd;
    const half_t* V = vc + (size_t)(blockIdx.x / rep) * cap * hd;
    // The vector path: a whole number of values per lane, rows aligned to the lanes' loads.
    int vec = (hd == 128 || hd == 64) && ((((unsigned long long)K) | ((unsigned long long)V)) & (2 * per - 1)) == 0;
    float qv[MAXPER];
#pragma unroll
    for (int i = 0; i < MAXPER; i++) { int d = lane * per + i; qv[i] = (i < per && d < hd) ? h2f(qr[d]) : 0.f; }
    int lo = start[bi];
    if (vec && per == 4) {
        da_scores<4>(K, qv, sm, lo, s, hd, lane, warp, nw);
    } else if (vec && per == 2) {
        da_scores<2>(K, qv, sm, lo, s, hd, lane, warp, nw);
    } else {
        for (int j = lo + warp; j < s; j += nw) {
            const half_t* kr = K + (size_t)j * hd;
            float acc = 0.f;
#pragma unroll
            for (int i = 0; i < MAXPER; i++) { int d = lane * per + i; if (i < per && d < hd) acc += qv[i] * h2f(kr[d]); }
            for (int o = 16; o > 0; o >>= 1) acc += __shfl_xor_sync(0xffffffff, acc, o);
            if (lane == 0) sm[j] = acc;
        }
    }
    float sum = da_softmax(sm, red, lo, s);
    float acc[MAXPER];
#pragma unroll
    for (int i = 0; i < MAXPER; i++) acc[i] = 0.f;
    if (vec && per == 4) {
        da_values<4>(V, sm, acc, lo, s, hd, lane, warp, nw);
    } else if (vec && per == 2) {
        da_values<2>(V, sm, acc, lo, s, hd, lane, warp, nw);
    } else {
        for (int j = lo + warp; j < s; j += nw) {
            const half_t* vr = V + (size_t)j * hd;
            float p = sm[j];
#pragma unroll
            for (int i = 0; i < MAXPER; i++) { int d = lane * per + i; if (i < per && d < hd) acc[i] += p * h2f(vr[d]); }
        }
    }
    da_finish<MAXPER>(acc, per, sm + s, sum, out + (size_t)bh * hd, hd, lane, warp, nw);
}

// decode_attention over a 4-bit packed cache (quant_cache's layout: per (kv row, position)
// code_b bytes of codes and `groups` (min, scale) pairs), read straight from its codes: positions
// 0..s−2 packed, the newest (s − 1) from the fp16 working areas kn/vn ([.., cap, hd], where the
// q/k/v split wrote it). A value is min + code·scale, so a lane's part of a score is
// min·Σq + scale·Σ q·code and its part of Σ p·v is Σ p·min + (p·scale)·code: one fma per value
// (the values are not rounded to fp16 first, as dequant_cache's are: the same result up to
// rounding). Eight lanes share a position (V = hd/8 values each: one 8- or 4-byte load of codes,
// one of its pair), so a warp takes four positions at a time, and Q4_U such sets are loaded
// (kept packed in registers) before any is used. The newest position is the first warp's first
// eight lanes'. hd 64 or 128, gs a multiple of V (the host checks). Dynamic shared memory:
// s + warps·hd floats.
#define Q4_U 8
struct Q4Raw {
    uint2 c; // V codes (V = 8: c.x only)
    unsigned p; // (min, scale)
};
template <int V>
__device__ __forceinline__ Q4Raw q4_load(const unsigned char* codes, const half_t* params, int j, int part, int code_b, int groups, int gs) {
    int d0 = part * V;
    Q4Raw r;
    r.p = *(const unsigned int*)(params + ((size_t)j * groups + d0 / gs) * 2);
    const unsigned char* c = codes + (size_t)j * code_b + d0 / 2;
    if (V == 16) r.c = *(const uint2*)c;
    else r.c = make_uint2(*(const unsigned*)c, 0);
    return r;
}
// The Q4_U positions j0 + 4·nw·u + sub (u < Q4_U) of this lane's set, packed; zeros from `past` on.
template <int V>
__device__ __forceinline__ void q4_load_set(const unsigned char* codes, const half_t* params, int j0, int nw, int sub, int past,
                                            int part, int code_b, int groups, int gs, Q4Raw* r) {
#pragma unroll
    for (int u = 0; u < Q4_U; u++) {
        int j = j0 + 4 * nw * u + sub;
        r[u] = j < past ? q4_load<V>(codes, params, j, part, code_b, groups, gs) : Q4Raw{make_uint2(0, 0), 0};
    }
}
__device__ __forceinline__ float q4_code(const Q4Raw& r, int i) { return (float)(((i < 8 ? r.c.x : r.c.y) >> (4 * (i % 8))) & 15); }
template <int V>
__device__ __forceinline__ void q4_attend(const half_t* qr, const unsigned char* kc, const half_t* kp, const half_t* kf,
                                          const unsigned char* vc, const half_t* vp, const half_t* vf, int lo, int s,
                                          int gs, float* sm, float* red, half_t* out) {
    const int hd = 8 * V, groups = (hd + gs - 1) / gs, code_b = groups * gs / 2;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5;
    int sub = lane >> 3, part = lane & 7, past = s - 1;
    const bool fresh = warp == 0 && sub == 0; // the lanes that take the newest position
    float qv[V], qsum = 0.f;
#pragma unroll
    for (int i = 0; i < V; i++) { qv[i] = h2f(qr[part * V + i]); qsum += qv[i]; }
    for (int j0 = lo + 4 * warp; j0 < past; j0 += 4 * nw * Q4_U) {
        Q4Raw r[Q4_U];
        q4_load_set<V>(kc, kp, j0, nw, sub, past, part, code_b, groups, gs, r);
#pragma unroll
        for (int u = 0; u < Q4_U; u++) {
            float a = 0.f;
#pragma unroll
            for (int i = 0; i < V; i++) a += qv[i] * q4_code(r[u], i);
            a = h2f((half_t)(r[u].p & 0xffffu)) * qsum + h2f((half_t)(r[u].p >> 16)) * a;
            for (int o = 1; o < 8; o <<= 1) a += __shfl_xor_sync(0xffffffff, a, o);
            int j = j0 + 4 * nw * u + sub;
            if (part == 0 && j < past) sm[j] = a;
        }
    }
    if (fresh) {
        float a = 0.f;
#pragma unroll
        for (int i = 0; i < V; i++) a += qv[i] * h2f(kf[part * V + i]);
        for (int o = 1; o < 8; o <<= 1) a += __shfl_xor_sync(0xffu, a, o);
        if (part == 0) sm[past] = a;
    }
    float sum = da_softmax(sm, red, lo, s);
    float acc[V], accm = 0.f;
#pragma unroll
    for (int i = 0; i < V; i++) acc[i] = 0.f;
    for (int j0 = lo + 4 * warp; j0 < past; j0 += 4 * nw * Q4_U) {
        Q4Raw r[Q4_U];
        q4_load_set<V>(vc, vp, j0, nw, sub, past, part, code_b, groups, gs, r);
#pragma unroll
        for (int u = 0; u < Q4_U; u++) {
            int j = j0 + 4 * nw * u + sub;
            float p = j < past ? sm[j] : 0.f;
            float ps = p * h2f((half_t)(r[u].p >> 16));
            accm += p * h2f((half_t)(r[u].p & 0xffffu));
#pragma unroll
            for (int i = 0; i < V; i++) acc[i] += ps * q4_code(r[u], i);
        }
    }
    if (fresh) {
        float p = sm[past];
#pragma unroll
        for (int i = 0; i < V; i++) acc[i] += p * h2f(vf[part * V + i]);
    }
    // The four positions' sums of each part; lanes 0..7 then hold values part·V… of this warp's.
#pragma unroll
    for (int i = 0; i < V; i++) {
        acc[i] += accm;
        acc[i] += __shfl_xor_sync(0xffffffff, acc[i], 8);
        acc[i] += __shfl_xor_sync(0xffffffff, acc[i], 16);
    }
    da_finish<V>(acc, V, sm + s, sum, out, hd, lane, warp, nw);
}
// decode_attention_q4 on the tensor cores, for heads of HD = 64 or 128 values in G = HD/gs ≤ 4
// whole groups (from sm_80). A warp takes 16 positions at a time; the codes go into m16n8k16
// products as exact small integers in fp16, and the groups' mins and scales are applied to the
// products' fp32 sums, so no value is rounded to fp16 on the way (as q4_attend).
// Keys: rows = positions g and g + 8 (lane g, t), k = the head's values, columns = the groups:
// lane t holds bytes t·HD/8 … of each row's codes, and k tile kk takes its bytes 2kk and 2kk + 1
// (values t·HD/4 + 4kk + 0..3), with B = q where the column is the values' group and 0 elsewhere;
// so C[pos][j] = Σ_{d in group j} q_d·code_d and a score is Σ_j min_j·Σ_{group j} q + scale_j·C[pos][j].
// Values: rows = the head's values, k = 16 positions, columns (2j, 2j + 1) = the fp16 high and
// low parts of 64·p·scale_j (their sum that to about 22 bits; 64 keeps the low parts normal); lane (g, t) holds positions
// 4t … 4t + 3, bytes g·HD/16 …, and m tile kk takes their byte kk (values g·HD/8 + 2kk, + 1).
// Σ p·min_j is summed apart. The newest position (s − 1) comes from the fp16 kf/vf.
#ifndef Q4T_U
#define Q4T_U 1 // 16-position sets a warp loads before using any (2 and 4 were slower, session 17)
#endif
template <int HD>
__device__ __forceinline__ void q4_attend_tc(const half_t* qr, const unsigned char* kc, const half_t* kp, const half_t* kf,
                                             const unsigned char* vc, const half_t* vp, const half_t* vf, int lo, int s,
                                             int gs, float* sm, float* red, half_t* out) {
    constexpr int CB = HD / 2, KT = HD / 16, KW = HD / 32, VW = HD / 64; // code bytes a position; tiles; words a lane
    const int G = HD / gs;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nw = blockDim.x >> 5, g = lane >> 2, t = lane & 3;
    const int past = s - 1, first = lo & ~15;
    // Σ q over each group (every lane), and lane t's B fragments of q.
    float qs[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
    for (int i = 0; i < HD / 32; i++) {
        const int d = lane * (HD / 32) + i;
        const float v = h2f(qr[d]);
#pragma unroll
        for (int j = 0; j < 4; j++) qs[j] += d / gs == j ? v : 0.f;
    }
#pragma unroll
    for (int j = 0; j < 4; j++)
        for (int o = 16; o > 0; o >>= 1) qs[j] += __shfl_xor_sync(0xffffffff, qs[j], o);
    unsigned bq[KT][2];
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
        const int d = t * (HD / 4) + 4 * kk;
        const bool in = d / gs == g;
        bq[kk][0] = in ? (unsigned)qr[d] | (unsigned)qr[d + 2] << 16 : 0u;
        bq[kk][1] = in ? (unsigned)qr[d + 1] | (unsigned)qr[d + 3] << 16 : 0u;
    }
    const float qa = 2 * t < G ? qs[2 * t] : 0.f, qb = 2 * t + 1 < G ? qs[2 * t + 1] : 0.f;
    for (int b0 = first + 16 * warp; b0 < past; b0 += 16 * nw * Q4T_U) {
        unsigned kw[Q4T_U][2][KW], pk[Q4T_U][2][2];
#pragma unroll
        for (int u = 0; u < Q4T_U; u++)
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const int j = b0 + 16 * nw * u + g + 8 * r;
                const bool ok = j < past;
                const unsigned* c = (const unsigned*)(kc + (size_t)j * CB + t * (HD / 8));
#pragma unroll
                for (int w = 0; w < KW; w++) kw[u][r][w] = 0u;
                if (ok) {
                    if (KW == 4) {
                        const uint4 v = *(const uint4*)c;
                        kw[u][r][0] = v.x; kw[u][r][1] = v.y; kw[u][r][KW > 2 ? 2 : 0] = v.z; kw[u][r][KW > 3 ? 3 : 0] = v.w;
                    } else {
                        const uint2 v = *(const uint2*)c;
                        kw[u][r][0] = v.x; kw[u][r][1] = v.y;
                    }
                }
                const unsigned* p = (const unsigned*)(kp + (size_t)j * G * 2);
                pk[u][r][0] = ok && 2 * t < G ? p[2 * t] : 0u;
                pk[u][r][1] = ok && 2 * t + 1 < G ? p[2 * t + 1] : 0u;
            }
#pragma unroll
        for (int u = 0; u < Q4T_U; u++) {
            float c[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
            for (int kk = 0; kk < KT; kk++) {
                // Bytes 2kk, 2kk + 1 of each row to bits 0–7 and 16–23.
                const unsigned sel = (kk & 1) ? 0x3322 : 0x1100;
                const unsigned x0 = prmt(kw[u][0][kk >> 1], 0u, sel), x1 = prmt(kw[u][1][kk >> 1], 0u, sel);
                const unsigned a[4] = {codes_lo(x0), codes_lo(x1), codes_hi(x0), codes_hi(x1)};
                mma_16816(c, a, make_uint2(bq[kk][0], bq[kk][1]));
            }
#pragma unroll
            for (int r = 0; r < 2; r++) {
                const unsigned pa = pk[u][r][0], pb = pk[u][r][1];
                float a = h2f((half_t)(pa & 0xffffu)) * qa + h2f((half_t)(pa >> 16)) * c[2 * r];
                a += h2f((half_t)(pb & 0xffffu)) * qb + h2f((half_t)(pb >> 16)) * c[2 * r + 1];
                a += __shfl_xor_sync(0xffffffff, a, 1);
                a += __shfl_xor_sync(0xffffffff, a, 2);
                const int j = b0 + 16 * nw * u + g + 8 * r;
                if (t == 0 && j >= lo && j < past) sm[j] = a;
            }
        }
    }
    if (warp == 0) {
        float a = 0.f;
#pragma unroll
        for (int i = 0; i < HD / 32; i++) a += h2f(qr[lane * (HD / 32) + i]) * h2f(kf[lane * (HD / 32) + i]);
        for (int o = 16; o > 0; o >>= 1) a += __shfl_xor_sync(0xffffffff, a, o);
        if (lane == 0) sm[past] = a;
    }
    const float sum = da_softmax(sm, red, lo, s);
    // Values. Column g of B: the high (g even) or low part of p·scale of group g/2.
    float acc[KT][4], accm = 0.f;
#pragma unroll
    for (int kk = 0; kk < KT; kk++) for (int i = 0; i < 4; i++) acc[kk][i] = 0.f;
    const int jg = g >> 1;
    for (int b0 = first + 16 * warp; b0 < past; b0 += 16 * nw * Q4T_U) {
        unsigned vw[Q4T_U][4][2], pv[Q4T_U][4];
        float pp[Q4T_U][4];
#pragma unroll
        for (int u = 0; u < Q4T_U; u++)
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const int j = b0 + 16 * nw * u + 4 * t + i;
                const bool ok = j < past;
                const unsigned char* c = vc + (size_t)j * CB + g * (HD / 16);
                vw[u][i][0] = vw[u][i][1] = 0u;
                if (ok) {
                    if (VW == 2) { uint2 v = *(const uint2*)c; vw[u][i][0] = v.x; vw[u][i][1] = v.y; }
                    else vw[u][i][0] = *(const unsigned*)c;
                }
                pv[u][i] = ok && jg < G ? *(const unsigned*)(vp + ((size_t)j * G + jg) * 2) : 0u;
                pp[u][i] = ok && j >= lo ? sm[j] : 0.f;
            }
#pragma unroll
        for (int u = 0; u < Q4T_U; u++) {
            unsigned short bh[4];
#pragma unroll
            for (int i = 0; i < 4; i++) {
                const float ps = pp[u][i] * h2f((half_t)(pv[u][i] >> 16)) * 64.f; // 2⁶: the low parts stay normal
                const half_t hi = f2h(ps);
                bh[i] = (g & 1) ? f2h(ps - h2f(hi)) : hi;
                if ((g & 1) == 0) accm += pp[u][i] * h2f((half_t)(pv[u][i] & 0xffffu));
            }
            const uint2 b = make_uint2((unsigned)bh[0] | (unsigned)bh[1] << 16, (unsigned)bh[2] | (unsigned)bh[3] << 16);
#pragma unroll
            for (int kk = 0; kk < KT; kk++) {
                // Byte kk of positions 4t, 4t + 1 (and 4t + 2, 4t + 3) to bits 0–7 and 16–23.
                const int w = kk >> 2;
                const unsigned sel = 0x4400 + 0x1111 * (kk & 3);
                const unsigned q01 = prmt(vw[u][0][w], vw[u][1][w], sel), q23 = prmt(vw[u][2][w], vw[u][3][w], sel);
                const unsigned a[4] = {codes_lo(q01), codes_hi(q01), codes_lo(q23), codes_hi(q23)};
                mma_16816(acc[kk], a, b);
            }
        }
    }
    // Σ p·min of group jg over this warp's positions (lanes 8·jg hold it), then each value's sum
    // from the lane whose t is its group, into part [warps, HD].
    accm += __shfl_xor_sync(0xffffffff, accm, 1);
    accm += __shfl_xor_sync(0xffffffff, accm, 2);
    const float mt = __shfl_sync(0xffffffff, accm, 8 * t);
    float* part = sm + s;
#pragma unroll
    for (int kk = 0; kk < KT; kk++) {
        const int d = g * (HD / 8) + 2 * kk;
        if (d / gs == t) {
            part[warp * HD + d] = (acc[kk][0] + acc[kk][1]) * (1.f / 64) + mt;
            part[warp * HD + d + 1] = (acc[kk][2] + acc[kk][3]) * (1.f / 64) + mt;
        }
    }
    __syncthreads();
    const float inv = 1.f / sum, pn = sm[past];
    for (int d = threadIdx.x; d < HD; d += blockDim.x) {
        float v = pn * h2f(vf[d]);
        for (int w = 0; w < nw; w++) v += part[w * HD + d];
        out[d] = f2h(v * inv);
    }
}
// To compare: FLEXGEN_NVRTC_DEFINES=Q4_MINB=8 compiles for eight blocks a multiprocessor (of
// Q4_MAXT threads, default 128: 64 registers); without it the compiler chooses (72 at sm_90).
#ifdef Q4_MINB
#ifndef Q4_MAXT
#define Q4_MAXT 128
#endif
#define Q4_BOUNDS __launch_bounds__(Q4_MAXT, Q4_MINB)
#else
#define Q4_BOUNDS
#endif
extern "C" __global__ void Q4_BOUNDS decode_attention_q4(const half_t* q, const unsigned char* kc, const half_t* kp,
                                               const unsigned char* vc, const half_t* vp, const half_t* kn,
                                               const half_t* vn, const int* start, half_t* out, int nh, int hd,
                                               int cap, int s, int rep, int gs) {
    extern __shared__ float sm[];
    __shared__ float red[32];
    int bh = blockIdx.x, bi = bh / nh;
    const int groups = (hd + gs - 1) / gs, code_b = groups * gs / 2;
    const size_t kv = blockIdx.x / rep;
    const size_t cb = kv * cap * code_b, pb = kv * cap * groups * 2, fr = (kv * cap + s - 1) * hd;
    const half_t* qr = q + (size_t)bh * hd;
    half_t* o = out + (size_t)bh * hd;
    int lo = start[bi];
#if __CUDA_ARCH__ >= 800
    if (hd % gs == 0 && hd / gs <= 4) { // whole groups, at most four: on the tensor cores
        if (hd == 128) q4_attend_tc<128>(qr, kc + cb, kp + pb, kn + fr, vc + cb, vp + pb, vn + fr, lo, s, gs, sm, red, o);
        else q4_attend_tc<64>(qr, kc + cb, kp + pb, kn + fr, vc + cb, vp + pb, vn + fr, lo, s, gs, sm, red, o);
        return;
    }
#endif
    if (hd == 128) q4_attend<16>(qr, kc + cb, kp + pb, kn + fr, vc + cb, vp + pb, vn + fr, lo, s, gs, sm, red, o);
    else q4_attend<8>(qr, kc + cb, kp + pb, kn + fr, vc + cb, vp + pb, vn + fr, lo, s, gs, sm, red, o);
}

// out[row] = the index of the largest value of x[row, 0..cols] (the lowest index among equals).
// One block of 256 threads per row.
extern "C" __global__ void argmax_rows(const half_t* x, unsigned int* out, int cols) {
    __shared__ float sv[256];
    __shared__ int si[256];
    const half_t* xr = x + (size_t)blockIdx.x * cols;
    float best = -3.0e38f;
    int bi = 0;
    // Eight loads in flight per thread, then compared in column order (the result of the plain
    // loop below, which finishes the row).
    int c = threadIdx.x, bd = blockDim.x;
    for (; c + 7 * bd < cols; c += 8 * bd) {
        float v[8];
#pragma unroll
        for (int k = 0; k < 8; k++) v[k] = h2f(xr[c + k * bd]);
#pragma unroll
        for (int k = 0; k < 8; k++) if (v[k] > best) { best = v[k]; bi = c + k * bd; }
    }
    for (; c < cols; c += bd) { float v = h2f(xr[c]); if (v > best) { best = v; bi = c; } }
    sv[threadIdx.x] = best; si[threadIdx.x] = bi;
    __syncthreads();
    for (int st = blockDim.x / 2; st > 0; st >>= 1) {
        if (threadIdx.x < st) {
            float v2 = sv[threadIdx.x + st]; int i2 = si[threadIdx.x + st];
            if (v2 > sv[threadIdx.x] || (v2 == sv[threadIdx.x] && i2 < si[threadIdx.x])) { sv[threadIdx.x] = v2; si[threadIdx.x] = i2; }
        }
        __syncthreads();
    }
    if (threadIdx.x == 0) out[blockIdx.x] = si[0];
}

// out[r, c] of a row-major [rows, cols] fp16 matrix from `bits`-bit codes grouped along the rows
// (flexgen_tensor::quant with dim 0): group g = c·⌈rows/gs⌉ + r/gs holds rows r of column c, value
// k = r % gs at code g·gs + k (4-bit: two per byte, the even one in the low nibble); params holds
// (min, scale) fp16 per group. Only rows r0..r1 (r0 a multiple of gs) are written, as the
// [r1 − r0, cols] matrix `out`: a slice of the outputs of a linear layer's weight. One thread per
// group, neighbouring threads on neighbouring columns of the same rows (so each output row is
// written coalesced); a thread reads its group's codes as 32-bit words when they are aligned (8
// codes a word at 4 bits, 4 at 8 bits).
extern "C" __global__ void dequant_dim0(const unsigned char* codes, const half_t* params, half_t* out,
                                        int rows, int cols, int gs, int bits, int r0, int r1) {
    long long chunks = (rows + gs - 1) / gs;
    long long ch0 = r0 / gs;
    long long n = ((r1 - r0 + gs - 1) / gs) * cols;
    for (long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x; t < n; t += (long long)gridDim.x * blockDim.x) {
        long long c = t % cols, ch = ch0 + t / cols;
        long long g = c * chunks + ch;
        float mn = h2f(params[2 * g]), sc = h2f(params[2 * g + 1]);
        int gr = (int)ch * gs, len = min(gs, r1 - gr);
        half_t* o = out + (long long)(gr - r0) * cols + c;
        long long first = g * gs; // code index of the group's first value
        const unsigned char* p = codes + first * bits / 8;
        int per_word = 32 / bits;
        if ((first * bits) % 8 == 0 && ((unsigned long long)p & 3) == 0 && gs % per_word == 0) {
            const unsigned int* w = (const unsigned int*)p;
            unsigned int mask = (1u << bits) - 1;
            for (int k0 = 0; k0 < len; k0 += per_word) {
                unsigned int word = w[k0 / per_word];
                for (int j = 0; j < per_word && k0 + j < len; j++) {
                    o[(long long)(k0 + j) * cols] = f2h(mn + (float)((word >> (bits * j)) & mask) * sc);
                }
            }
        } else {
            for (int k = 0; k < len; k++) {
                long long pos = first + k;
                int code = bits == 4 ? (codes[pos >> 1] >> (4 * (int)(pos & 1))) & 15 : codes[pos];
                o[(long long)k * cols] = f2h(mn + (float)code * sc);
            }
        }
    }
}

// dequant_dim0 for a 4-bit weight [outs, ins] in the tensor-core order (gemm4_tc's: ins a
// multiple of 16, gs 64 or 128): rows (outputs) r0..r1 (r0 a multiple of gs) written as the
// [r1 − r0, ins] matrix `out`, each value min + code·scale rounded as dequant_dim0 rounds it. One
// thread per 16 code bytes (a lane t's of word w and 16 inputs kq: 4 inputs of 8 outputs), lanes
// t then kq neighbouring, so that a warp writes 128 adjacent inputs of each of its 8 rows; two
// 4-byte stores a row (inputs 2t, 2t + 1 and 2t + 8, 2t + 9 of the kq).
extern "C" __global__ void dequant_tc(const unsigned char* codes, const unsigned* pairs, half_t* out,
                                      int outs, int ins, int gs, int r0, int r1) {
    const long long chunks = (outs + gs - 1) / gs, words = chunks * gs / 8, kqs = ins / 16;
    const long long w0 = r0 / 8, n = ((r1 + 7) / 8 - w0) * kqs * 4;
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)gridDim.x * blockDim.x) {
        const int t = (int)(e & 3);
        const long long kq = (e >> 2) % kqs, w = w0 + (e >> 2) / kqs;
        const uint4 cv = *(const uint4*)(codes + ((kq * words + w) * 4 + t) * 16);
        const uint4 p = *(const uint4*)(pairs + ((kq * chunks + 8 * w / gs) * 4 + t) * 4);
        const unsigned cw[4] = {cv.x, cv.y, cv.z, cv.w};
        // Inputs 2t, 2t + 1 (h = 0) and 2t + 8, 2t + 9 (h = 1): their mins and scales.
        const float mn[2][2] = {{h2f(p.x & 0xffff), h2f(p.x >> 16)}, {h2f(p.z & 0xffff), h2f(p.z >> 16)}};
        const float sc[2][2] = {{h2f(p.y & 0xffff), h2f(p.y >> 16)}, {h2f(p.w & 0xffff), h2f(p.w >> 16)}};
        for (int m = 0; m < 4; m++) {
            for (int h = 0; h < 2; h++) {
                // Byte m of the two inputs: bits 0–7 and 16–23 of the word, after the shift.
                const unsigned q = cw[2 * (m >> 1) + h] >> (8 * (m & 1));
                for (int hi = 0; hi < 2; hi++) {
                    const long long o = 8 * w + 2 * m + hi;
                    if (o >= r1) continue;
                    const int s = 4 * hi;
                    const half_t v0 = f2h(mn[h][0] + (float)((q >> s) & 15) * sc[h][0]);
                    const half_t v1 = f2h(mn[h][1] + (float)((q >> (16 + s)) & 15) * sc[h][1]);
                    *(unsigned*)(out + (o - r0) * ins + 16 * kq + 2 * t + 8 * h) = (unsigned)v0 | (unsigned)v1 << 16;
                }
            }
        }
    }
}

// Four fp16 values of x at p (n ≤ 4 of them real, the rest 0) as floats: one 8-byte load where p
// is aligned and all four are real.
__device__ __forceinline__ void x4(const half_t* p, int n, float* out) {
    if (n >= 4 && (((unsigned long long)p) & 7) == 0) {
        load_per<4>(p, out);
    } else {
        for (int j = 0; j < 4; j++) out[j] = j < n ? h2f(p[j]) : 0.f;
    }
}

// y[b, o] += Σ_i x[b, i] · W[o, i] for b < nb ≤ NB (NB at most 8; row b of x at x + b·ldx): a linear layer's product with
// its weight W [outs, ins] read straight from the 4-bit codes of dequant_dim0's layout (groups of gs
// outputs of one input column, an input's groups contiguous), with no fp16 copy of W. Thread t of
// the grid's x dimension owns 8·V neighbouring outputs of one group (V 32-bit words of codes per
// input, one load: a warp reads 128·V contiguous bytes per input), U inputs' words, (min, scale)
// pairs and x values loaded before any is used, so that U loads are in flight per thread. A code
// q becomes a float exactly by the 2^23 trick (no integer conversion), and Σ_i x·(min + q·scale)
// is split into Σ_i (x·scale)·q per output and Σ_i x·min per row. The y dimension splits the
// inputs into slices of `per_slice` (a multiple of 4), each slice's partial sums added to the
// fp32 `y` [nb, outs] (zeroed first) with atomicAdd. Needs gs % (8·V) == 0, codes aligned to
// 4·V bytes, params to 4.
template <int NB, int U, int V>
__device__ __forceinline__ void gemv4_tile(const unsigned char* codes, const half_t* params, const half_t* x,
                                           float* y, int outs, int ins, int ldx, int gs, int nb, int per_slice) {
    int wpc = gs / 8;                       // code words per group
    int tpc = wpc / V;                      // threads per group
    int chunks = (outs + gs - 1) / gs;
    long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= (long long)chunks * tpc) return;
    int ch = (int)(t / tpc), k = (int)(t % tpc);
    int o0 = ch * gs + 8 * V * k;
    if (o0 >= outs) return;
    int i0 = blockIdx.y * per_slice, i1 = min(ins, i0 + per_slice);
    float acc[NB][8 * V], base[NB];
    for (int b = 0; b < NB; b++) { base[b] = 0.f; for (int j = 0; j < 8 * V; j++) acc[b][j] = 0.f; }
    const unsigned int* words = (const unsigned int*)codes;
    const unsigned int* pairs = (const unsigned int*)params;
    for (int i = i0; i < i1; i += U) {
        int n = min(U, i1 - i);
        unsigned int w[U][V], p[U];
        float xv[NB][U];
#pragma unroll
        for (int u = 0; u < U; u++) {
            long long g = (long long)min(i + u, i1 - 1) * chunks + ch;
            const unsigned int* src = words + g * wpc + V * k;
            if (V == 4) {
                uint4 v = *(const uint4*)src;
                w[u][0] = v.x; w[u][V > 1 ? 1 : 0] = v.y; w[u][V > 2 ? 2 : 0] = v.z; w[u][V > 3 ? 3 : 0] = v.w;
            } else if (V == 2) {
                uint2 v = *(const uint2*)src;
                w[u][0] = v.x; w[u][V > 1 ? 1 : 0] = v.y;
            } else {
                w[u][0] = src[0];
            }
            p[u] = pairs[g];
        }
        for (int b = 0; b < NB; b++) {
            if (b >= nb) break;
            for (int u0 = 0; u0 < U; u0 += 4) x4(x + (long long)b * ldx + i + u0, n - u0, &xv[b][u0]);
        }
#pragma unroll
        for (int u = 0; u < U; u++) {
            if (u >= n) break;
            float mn = h2f((half_t)(p[u] & 0xffffu)), sc = h2f((half_t)(p[u] >> 16));
            float q[8 * V];
            for (int v = 0; v < V; v++)
                for (int j = 0; j < 8; j++)
                    q[8 * v + j] = __int_as_float(0x4B000000 | ((w[u][v] >> (4 * j)) & 15u)) - 8388608.f;
            for (int b = 0; b < NB; b++) {
                if (b >= nb) break;
                base[b] += xv[b][u] * mn;
                float xs = xv[b][u] * sc;
                for (int j = 0; j < 8 * V; j++) acc[b][j] += xs * q[j];
            }
        }
    }
    int n = min(8 * V, outs - o0);
    for (int b = 0; b < NB && b < nb; b++)
        for (int j = 0; j < n; j++) atomicAdd(y + (long long)b * outs + o0 + j, acc[b][j] + base[b]);
}

extern "C" __global__ void gemv4_dim0_1(const unsigned char* c, const half_t* p, const half_t* x, float* y, int outs, int ins, int ldx, int gs, int nb, int ps) {
    gemv4_tile<1, 4, 4>(c, p, x, y, outs, ins, ldx, gs, nb, ps);
}
extern "C" __global__ void gemv4_dim0_2(const unsigned char* c, const half_t* p, const half_t* x, float* y, int outs, int ins, int ldx, int gs, int nb, int ps) {
    gemv4_tile<2, 4, 2>(c, p, x, y, outs, ins, ldx, gs, nb, ps);
}
extern "C" __global__ void gemv4_dim0_4(const unsigned char* c, const half_t* p, const half_t* x, float* y, int outs, int ins, int ldx, int gs, int nb, int ps) {
    gemv4_tile<4, 4, 1>(c, p, x, y, outs, ins, ldx, gs, nb, ps);
}
extern "C" __global__ void gemv4_dim0_8(const unsigned char* c, const half_t* p, const half_t* x, float* y, int outs, int ins, int ldx, int gs, int nb, int ps) {
    gemv4_tile<8, 4, 1>(c, p, x, y, outs, ins, ldx, gs, nb, ps);
}

// y[i] = (accumulate ? y[i] : 0) + s[i] as fp16, i < n: a fused 4-bit product's fp32 result into
// its fp16 destination (a residual added in place); s[i] = 0 after where `clear`. Then, where b
// (a bias of `cols` values, row-major y) or relu is given, bias_act's step on that fp16 value
// (rounded twice, as the two kernels one after the other would).
extern "C" __global__ void store_f32(float* s, half_t* y, int n, int accumulate, int clear, const half_t* b,
                                     int cols, int relu) {
    for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
        const float v = s[i];
        if (clear) s[i] = 0.f;
        const half_t o = f2h((accumulate ? h2f(y[i]) : 0.f) + v);
        y[i] = b || relu ? bias_act1(o, b, i % cols, relu) : o;
    }
}

// ---- KV cache quantization (flexgen_tensor::quant with groups along the head dimension) ----
// A packed cache of `rows` (sequence, head) rows holds, per row and position, ⌈hd/gs⌉ groups:
// codes [rows, cap, groups·gs·bits/8] bytes and params [rows, cap, groups, 2] fp16 (min, scale).

// out[r, p, d] (fp16 [rows, cap, hd]) for positions p0 ≤ p < p0 + np, from the packed cache.
// One thread per 8 values of one (row, position); rows along the grid's y. With `vec` (the host
// checked: group and hd multiples of 8, codes and out aligned) the 8 codes are one 32-bit (4-bit)
// or 64-bit (8-bit) load and the 8 values one 16-byte store; otherwise value by value.
extern "C" __global__ void dequant_cache(const unsigned char* codes, const half_t* params, half_t* out,
                                         int rows, int cap, int hd, int gs, int bits, int p0, int np, int vec) {
    int groups = (hd + gs - 1) / gs, per = groups * gs;
    int oct = (hd + 7) / 8;
    int n = np * oct;
    for (int r = blockIdx.y; r < rows; r += gridDim.y) {
        for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
            int pp = i / oct;
            int d0 = (i - pp * oct) * 8;
            long long slot = (long long)r * cap + p0 + pp;  // (row, position)
            long long pos = slot * per + d0;                // code index of the first value
            half_t* o = out + slot * hd + d0;
            if (vec) {
                long long g = slot * groups + d0 / gs;
                float mn = h2f(params[2 * g]), sc = h2f(params[2 * g + 1]);
                unsigned int w[2];
                if (bits == 4) { w[0] = *(const unsigned int*)(codes + pos / 2); }
                else { uint2 u = *(const uint2*)(codes + pos); w[0] = u.x; w[1] = u.y; }
                half_t h[8];
#pragma unroll
                for (int k = 0; k < 8; k++) {
                    unsigned int c = bits == 4 ? (w[0] >> (4 * k)) & 15 : (w[k / 4] >> (8 * (k % 4))) & 255;
                    h[k] = f2h(mn + (float)c * sc);
                }
                *(uint4*)o = *(const uint4*)h;
            } else {
                for (int k = 0; k < 8 && d0 + k < hd; k++) {
                    long long g = slot * groups + (d0 + k) / gs;
                    long long q = pos + k;
                    int code = bits == 4 ? (codes[q >> 1] >> (4 * (int)(q & 1))) & 15 : codes[q];
                    o[k] = f2h(h2f(params[2 * g]) + (float)code * h2f(params[2 * g + 1]));
                }
            }
        }
    }
}

// Quantizes positions p0 ≤ p < p0 + np of x (fp16 [rows, cap, hd]) into the packed cache, exactly
// as flexgen_tensor::quant does (min rounded down and scale rounded up to fp16, codes rounded to
// nearest, padding of the last group with code 0). One warp per group. blockIdx.y 1 takes a
// second cache of the same shape (x1, codes1, params1: v beside k, one launch for both).
extern "C" __global__ void quant_cache(const half_t* x, unsigned char* codes, half_t* params,
                                       const half_t* x1, unsigned char* codes1, half_t* params1,
                                       int rows, int cap, int hd, int gs, int bits, int p0, int np) {
    if (blockIdx.y) { x = x1; codes = codes1; params = params1; }
    int groups = (hd + gs - 1) / gs, per = groups * gs;
    long long warp = (blockIdx.x * (long long)blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    long long total = (long long)rows * np * groups;
    if (warp >= total) return;
    int c = warp % groups;
    long long rp = warp / groups;
    int p = p0 + rp % np;
    long long r = rp / np;
    long long slot = r * cap + p;
    const half_t* xr = x + slot * hd;
    float lo = 3.0e38f, hi = -3.0e38f;
    for (int k = lane; k < gs; k += 32) {
        int d = c * gs + k;
        if (d < hd) { float v = h2f(xr[d]); lo = fminf(lo, v); hi = fmaxf(hi, v); }
    }
    for (int o = 16; o > 0; o >>= 1) {
        lo = fminf(lo, __shfl_xor_sync(0xffffffff, lo, o));
        hi = fmaxf(hi, __shfl_xor_sync(0xffffffff, hi, o));
    }
    float levels = (float)((1 << bits) - 1);
    half_t mn, sc;
    quant_pair(lo, hi, levels, &mn, &sc);
    float m = h2f(mn), s = h2f(sc);
    long long g = slot * groups + c;
    if (lane == 0) { params[2 * g] = mn; params[2 * g + 1] = sc; }
    unsigned char* cr = codes + (slot * per + (long long)c * gs) * bits / 8;
    int step = bits == 4 ? 2 : 1;  // values per byte
    for (int byte = lane; byte < gs / step; byte += 32) {
        unsigned int packed = 0;
        for (int j = 0; j < step; j++) {
            int k = byte * step + j, d = c * gs + k;
            float v = d < hd ? h2f(xr[d]) : m;
            packed |= quant_code(v, m, s, levels) << (4 * j * (bits == 4));
        }
        cr[byte] = (unsigned char)packed;
    }
}
// y[b, o] += Σ_i x[b, i] · W[o, i] for b < nb ≤ 8·NT, W's 4-bit codes and (min, scale) pairs
// in the tensor-core order (flexgen_tensor::quant::TcOrder: dequant_dim0's bytes permuted): per
// 16 inputs kq, per word w of 8 outputs (8w …), per lane t of a quad, 16 code bytes, the four
// 4-byte words the lane expands into its A fragments, in the mma's own k order (inputs a = 2t,
// b = 2t + 1, c = 2t + 8, d = 2t + 9 of the 16): bytes (a, 0), (a, 1), (b, 0), (b, 1); (c, 0),
// (c, 1), (d, 0), (d, 1); the same for bytes 2 and 3, where byte (i, m) is input i's codes of
// outputs 8w + 2m (low nibble) and 8w + 2m + 1 (high); the pairs per kq, per group, per t as
// four words: the mins of a and b, their scales, the mins of c and d, their scales. A block of
// 128 threads (4 warps of 64 outputs) takes GT_O = 256 outputs and a slice of the inputs (a
// segment: blockIdx.x's column and blockIdx.y's slice, gemm4_tc_tile), its partial sums added
// to the fp32 y [nb, outs] with atomicAdd, as gemv4's. The inputs go through shared memory K at
// a time (GT_K_OF) in a ring of S stages filled by cp.async, S − 1 in flight while one is used
// (GT_S: 4 of 32 inputs; of 64, 3, or 2 for 64 rows; FLEXGEN_NVRTC_DEFINES="GT_K=32" or 64 sets
// every tile's, GT_K8 the 64-row tile's, GT_STAGES every tile's stages), in dynamic shared
// memory (GT_RING bytes): the codes and pairs as they lie in memory (a kq's 2048 code bytes of
// the block's outputs lie together, and its groups' pairs), x by row then input, the 16-byte
// chunks of an x row placed with an XOR of the row (GT_XSW) so that the 8 rows of an ldmatrix
// matrix fall in distinct banks.
// Lane g of a quad owns word w = 8·warp + g: one 16-byte load gives it the codes of its A
// fragments of four m16 tiles (tile m: outputs 8w + 2m, low nibbles, in row g; 8w + 2m + 1, high,
// in row g + 8), another its group's pairs; the bytes of tiles 0 and 2 lie in bits 0–7 and 16–23
// of their words, those of tiles 1 and 3 a shift away, and one lop3 makes a pair of codes fp16
// offset + code, exactly (1024 + code for low nibbles, 64 + code for high ones, without a
// shift). x's B fragments come by ldmatrix, two row tiles a load. Tiles of up to 8 rows
// (SCALE_X) give the scales and mins to x instead: as a warp's 64 outputs lie in one group
// (gs ≥ 64), W·x = Σ (x·scale)·code + Σ x·min, so B is x·scale (one fp16x2 multiply per 8 rows
// and 4 inputs) and two more mma with A all ones sum x·scale and x·min over the inputs for the
// epilogue, which takes the offsets' share off (1024 or 64 times Σ x·scale) and adds Σ x·min.
// Each product of a code and x·scale is exact and the sums fp32 (x·scale and x·min rounded to
// fp16 once each, where dequant_dim0 rounds min + code·scale once). Tiles of 16 to 64 rows,
// where those extra mma cost more than they save, expand A to min + code·scale (the offset
// taken off, one fp16x2 fma: rounded once as dequant_dim0 rounds it) against x. mma.sync
// m16n8k16, ldmatrix. Needs gs ∈ {64, 128}, ins a multiple of 16, codes, pairs and x 16-byte
// aligned, ldx a multiple of 8 (the host checks). This order instead of dequant_dim0's: 5–11 %
// faster on OPT's matrices at 1 to 64 rows (session 24, call 1: no byte permutes, one load for
// the codes instead of four).
// On sm_90a the tiles of 16 to 64 rows take wgmma instead of mma.sync and ldmatrix (GT_WGMMA,
// below): the four m16 tiles of the block's warps are one m64 tile of a warpgroup product, x
// read from the ring by the tensor cores; on OPT-175B's matrices 15–21 % less time than mma.sync
// at 64 rows, 6–10 % at 32 (session 25, calls 2 and 3).
#ifndef GT_K
#define GT_K 0 // 32 or 64 for every tile; 0: each tile's own (GT_K_OF)
#endif
// Which tiles multiply by Hopper's warpgroup products (wgmma, asynchronous, B = x read by the
// tensor cores straight from the ring) instead of mma.sync: a mask of their 8·nt rows' nt (8:
// 64 rows, 4: 32, 2: 16; a tile that gives the scales to x, SCALE_X, cannot), where NVRTC
// compiles for sm_90a, every tile that can (GT_WGMMA=0: none, as before sm_90a; 8: 64 rows
// only). Such a tile's ring keeps a stage more than it refills a step (the stage it refills was
// read two steps before, by products retired since), four stages, and 1024 bytes of slack to
// align the stages to wgmma's swizzle (below).
#ifndef GT_WGMMA
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define GT_WGMMA 14
#else
#define GT_WGMMA 0
#endif
#endif
#define GT_WG(nt) (((GT_WGMMA) & (nt) & 14) != 0 && !((nt) == 2 && GT_SX2) && !((nt) == 4 && GT_SX4))
// Inputs a stage of the tile of 8·nt rows: 64 (three stages) up to 32 rows, 32 (four) for 64 rows,
// where two stages of 64 ran 7 % slower (session 21; 1 to 32 rows 1–3 % faster with 64), and
// three or four stages of 64 (GT_K8=64 GT_STAGES=3 or 4) 3–11 % slower on OPT-30B's and
// OPT-175B's matrices (session 23, call 3).
// With wgmma, 64 (four stages): 4–12 % less time than 32 on OPT-175B's and OPT-30B's matrices
// (session 25, call 2).
#ifndef GT_K8
#define GT_K8 (GT_WG(8) ? 64 : 32)
#endif
#define GT_K_OF(nt) (GT_K ? GT_K : (nt) == 8 ? GT_K8 : 64)
#define GT_O 256
// store_f32 folded into the product (where `done` is given): the block that adds the last slice's
// sums to a column of GT_O outputs (`done[blockIdx.x]` counts the column's finished slices, each
// after a fence that makes its sums visible) stores the column's rows into `out` (fp16 [nb, outs];
// flags bit 0: accumulate into it, bit 1: ReLU; `bias` of outs values or null), as store_f32
// would, clears them in y and sets its count back to 0 for the next product. Needs outs a
// multiple of 4 and `out` 8-byte aligned (the host checks).
struct Store4 {
    half_t* out;
    const half_t* bias;
    int flags;
    unsigned* done;
};
// `last`: a word of shared memory the block no longer reads (the product's ring, after its last
// step: a variable of its own would add to the shared memory the ring takes).
// `col`: the column's index (its counter), `n` of its `total` 64-input chunks added by this block.
__device__ __forceinline__ void gemm4_tc_store(float* y, int outs, int nb, int col, unsigned n, unsigned total,
                                               const Store4& st4, volatile int* last) {
    const int o_blk = col * GT_O;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) *last = atomicAdd(st4.done + col, n) + n == total;
    __syncthreads();
    if (!*last) return;
    __threadfence();
    const int accumulate = st4.flags & 1, relu = (st4.flags >> 1) & 1, quads = GT_O / 4;
    // Eight quads of four values a thread at a time: their loads all issued before any store.
    for (int i0 = threadIdx.x; i0 < nb * quads; i0 += 8 * blockDim.x) {
        float4 v[8];
        uint2 h[8];
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = i0 + u * blockDim.x, b = i / quads, c = o_blk + 4 * (i % quads);
            const bool in = i < nb * quads && c < outs;
            const long long at = (long long)b * outs + c;
            v[u] = in ? __ldcg((const float4*)(y + at)) : make_float4(0.f, 0.f, 0.f, 0.f);
            h[u] = in && accumulate ? *(const uint2*)(st4.out + at) : make_uint2(0u, 0u);
        }
#pragma unroll
        for (int u = 0; u < 8; u++) {
            const int i = i0 + u * blockDim.x, b = i / quads, c = o_blk + 4 * (i % quads);
            if (i >= nb * quads || c >= outs) continue;
            const long long at = (long long)b * outs + c;
            __stcg((float4*)(y + at), make_float4(0.f, 0.f, 0.f, 0.f));
            const float s[4] = {v[u].x, v[u].y, v[u].z, v[u].w};
            const half_t old[4] = {(half_t)(h[u].x & 0xffffu), (half_t)(h[u].x >> 16), (half_t)(h[u].y & 0xffffu), (half_t)(h[u].y >> 16)};
            half_t r[4];
#pragma unroll
            for (int k = 0; k < 4; k++) {
                const half_t o = f2h((accumulate ? h2f(old[k]) : 0.f) + s[k]);
                r[k] = st4.bias || relu ? bias_act1(o, st4.bias, c + k, relu) : o;
            }
            *(uint2*)(st4.out + at) = make_uint2((unsigned)r[0] | (unsigned)r[1] << 16, (unsigned)r[2] | (unsigned)r[3] << 16);
        }
    }
    if (threadIdx.x == 0) st4.done[col] = 0;
}
// Blocks per multiprocessor the kernels of up to 16 rows (GT_MINB) and of 32 (GT_MINB4) are
// compiled for (registers allowing). 32 rows at three (138 registers at sm_90, not 128): S3's
// decode 516.6 tok/s against 508.5 at four (session 18; two at 516.1, five spills).
#ifndef GT_MINB
#define GT_MINB 4
#endif
#ifndef GT_MINB4
#define GT_MINB4 3
#endif
// The same for 64 rows (GT_MINB8): two, its 128 sums a thread taking 208 registers.
#ifndef GT_MINB8
#define GT_MINB8 2
#endif
// Whether the 8-, 16- and 32-row tiles (GT_SX1, GT_SX2, GT_SX4) give the scales and mins to x
// (SCALE_X, above) rather than expanding the codes. 16 rows expanded ran 2–9 % faster on the
// H200 (session 22, call 2; 32 rows with SCALE_X up to 30 % slower, S3 450 tok/s against 569).
#ifndef GT_SX1
#define GT_SX1 1
#endif
#ifndef GT_SX2
#define GT_SX2 0
#endif
#ifndef GT_SX4
#define GT_SX4 0
#endif
// Stages of the ring (GT_STAGES: every tile's), its bytes a stage (the codes, the pairs, x) and in
// all: the block's dynamic shared memory, which the host reads from `gemm4_tc_ring` below. Four
// stages for 1 to 32 rows (GT_STAGES=4) measured within noise at 32 rows and up to 12 % slower at
// 16 (session 23, call 3).
#ifndef GT_STAGES
#define GT_STAGES 0
#endif
#define GT_S(k, nt) (GT_STAGES ? GT_STAGES : GT_WG(nt) || (k) == 32 ? 4 : (nt) == 8 ? 2 : 3)
#define GT_STAGE_BYTES(k, nt) ((k) * GT_O / 2 + GT_O / 16 * (k) * 4 + 8 * (nt) * (k) * 2)
#define GT_RING(nt) (GT_S(GT_K_OF(nt), nt) * GT_STAGE_BYTES(GT_K_OF(nt), nt) + 1024 * GT_WG(nt))
// The XOR that places x chunk c of row r (k / 8 chunks a row): the 8 rows of an ldmatrix
// matrix in distinct banks.
#define GT_XSW(k, r) ((k) == 32 ? (((r) >> 1) & 3) : ((r) & 7))
// The same placement is wgmma's 64-byte (k = 32: 16-byte chunk bits 4–5 of an address XOR its
// bits 7–8) and 128-byte swizzle (k = 64: bits 4–6 XOR bits 7–9) of rows of k·2 bytes, 8-row
// atoms of 512 or 1024 bytes aligned to their size. wg_desc: the shared-memory descriptor of B =
// x's 64 rows from shared-space address `a` (a stage's x plus the first input's bytes): the start
// address (bits 0–13, in 16 bytes), the leading byte offset (16–29; unused by a swizzled K-major
// operand: 1), the stride byte offset, from one 8-row atom to the next (32–45), the swizzle
// (62–63: 1 for 128 bytes, 2 for 64).
__device__ __forceinline__ unsigned long long wg_desc(unsigned a, int k) {
    return (unsigned long long)((a >> 4) & 0x3FFF) | 1ull << 16 | (unsigned long long)((16 * k) >> 4) << 32 |
           (unsigned long long)(k == 64 ? 1 : 2) << 62;
}

// A value the compiler must keep as it is (it cannot see through the empty asm): a copy's fixed
// offsets stay in registers instead of being rebuilt from the thread index every step.
__device__ __forceinline__ unsigned kept(unsigned v) { asm volatile("" : "+r"(v)); return v; }
__device__ __forceinline__ long long kept(long long v) { asm volatile("" : "+l"(v)); return v; }
// One segment of a block's work: column `col` (outputs col·GT_O …) over inputs [i0, i1), its
// sums added to y, and (with `done`) the column stored by whichever segment adds its last chunk.
template <int NT, bool SCALE_X>
__device__ __forceinline__ void gemm4_tc_seg(const unsigned char* codes, const unsigned* pairs, const half_t* x,
                                             float* y, int outs, int ldx, int gs, int nb, int col, int i0, int i1,
                                             unsigned chunks_here, unsigned chunks_all, const Store4& st4) {
    constexpr int K = GT_K_OF(NT), S = GT_S(K, NT);
    // WG: the products by wgmma (GT_WGMMA). L: the ring's stages not refilled ahead (the stage
    // refilled at a step was used L steps before: 2 with wgmma, whose last products of a step
    // may still read it at the next).
    constexpr bool WG = GT_WG(NT);
    constexpr int L = WG ? 2 : 1;
    static_assert(S > L && !(WG && SCALE_X), "a stage in flight; wgmma's A the expanded codes");
    // A stage of the ring, in bytes: the codes [kq][word][lane t] (K × GT_O / 2 bytes), the pairs
    // [kq][group][lane t] (room for GT_O / 16 groups), x [row][input] (8·NT × K halves).
    constexpr unsigned CS = K * GT_O / 2, PS = GT_O / 16 * K * 4, XS = 8 * NT * K * 2, STAGE = CS + PS + XS;
    static_assert(S * STAGE + 1024 * WG == GT_RING(NT), "the ring the host gives");
    static_assert(!WG || ((CS + PS) % 1024 == 0 && STAGE % 1024 == 0 && (K == 32 || K == 64)), "x's swizzle atoms aligned");
    extern __shared__ __align__(16) unsigned char gt_ring[];
    // With wgmma the ring starts at the next 1024-byte boundary of the shared space.
    const unsigned ring_at = smem_u32(gt_ring), pad = WG ? (0u - ring_at) & 1023u : 0u;
    unsigned char(*ring)[STAGE] = reinterpret_cast<unsigned char(*)[STAGE]>(gt_ring + pad);
    const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, g = lane >> 2, t = lane & 3;
    const int chunks = (outs + gs - 1) / gs, coded = chunks * gs;
    const long long per_input = (long long)coded / 2; // code bytes of one input
    const int o_blk = col * GT_O;
    const int gpb = GT_O / gs; // groups of the block's outputs (a power of two)
    const int steps = i1 > i0 ? (i1 - i0 + K - 1) / K : 0, full = i1 > i0 ? (i1 - i0) / K : 0;
    // Each thread's copies are the same every step, at addresses that move by a fixed amount a
    // step: 16 bytes of each kq's 2048 code bytes of the column (word tid/4's, lane tid mod 4's);
    // 16 bytes of the pairs of the stage's kq tid/(4·gpb) (while below K/16: the column's gpb
    // groups' pairs of a kq lie together, 64 bytes a group); x chunk xc (8 inputs) of rows
    // xr + u·(128/XC) at chunk xc ^ GT_XSW(K, xr) (xc = tid mod XC, xr = tid/XC, while below
    // 8·NT). A copy of size 0 (past the coded outputs, the groups or nb) fills zeros, its source
    // kept inside the buffer (row 0 for x). A whole step's copies take only their moving sources
    // from registers (`issue_full`: the rest fixed before the loop, so that the compiler need not
    // rebuild it every step); a step past whole steps (the slice's last, short one) has every copy
    // checked, with zeros past the slice.
    const unsigned ring0 = ring_at + pad;
    const int ch0 = o_blk / gs;
    const bool c_ok = o_blk + 8 * (tid >> 2) < coded;
    const unsigned c_dst = kept((unsigned)(16 * tid));
    const unsigned char* c_src = c_ok ? codes + (long long)i0 * per_input + 8LL * o_blk + 16 * tid : codes;
    const int c_n = kept(c_ok ? 16u : 0u);
    const long long c_step = kept(c_ok ? K * per_input : 0), c_u = kept(c_ok ? 16 * per_input : 0);
    // pr: the first input of the thread's kq less the stage's (K or more: no pair copy).
    const int pr = 16 * (tid / (4 * gpb));
    const bool p_ok = pr < K && ch0 + ((tid >> 2) & (gpb - 1)) < chunks;
    const int p_n = kept(p_ok ? 16u : 0u);
    const unsigned p_dst = kept(CS + 16 * tid);
    const unsigned* p_src = p_ok ? pairs + (long long)(i0 + pr) * chunks + 16 * ch0 + 4 * (tid & (4 * gpb - 1)) : pairs;
    const long long p_step = kept(p_ok ? (long long)K * chunks : 0);
    constexpr int XC = K / 8, XU = (8 * NT * XC + 127) / 128; // x chunks a row, copies a thread
    const int xc = tid % XC, xr = tid / XC;
    const unsigned x_dst = kept(CS + PS + xr * (K * 2) + 16 * (xc ^ GT_XSW(K, xr)));
    const half_t* x_src[XU];
    int x_n[XU];
#pragma unroll
    for (int u = 0; u < XU; u++) {
        const int r = xr + u * (128 / XC);
        x_src[u] = x + (long long)(r < nb ? r : 0) * ldx + i0 + 8 * xc;
        x_n[u] = kept(r < 8 * NT && r < nb ? 16u : 0u);
    }
    auto issue_full = [&](unsigned stage) {
        const unsigned char* cs = c_src;
#pragma unroll
        for (int u = 0; u < K / 16; u++, cs += c_u) cp_async16(stage + c_dst + u * 16 * (GT_O / 2), cs, c_n);
        c_src += c_step;
        if (pr < K) cp_async16(stage + p_dst, p_src, p_n);
        p_src += p_step;
#pragma unroll
        for (int u = 0; u < XU; u++) {
            if (xr + u * (128 / XC) < 8 * NT) cp_async16(stage + x_dst + u * (128 / XC) * K * 2, x_src[u], x_n[u]);
            x_src[u] += K;
        }
    };
    auto issue = [&](int step, unsigned stage) {
        if (step < full) {
            issue_full(stage);
            return;
        }
        const int k0 = i0 + step * K; // the short step: every copy checked
#pragma unroll
        for (int u = 0; u < K / 16; u++) {
            const bool ok = c_ok && k0 + 16 * u < i1;
            cp_async16(stage + c_dst + u * 16 * (GT_O / 2), ok ? c_src + u * c_u : codes, ok ? 16 : 0);
        }
        if (pr < K) {
            const bool ok = p_ok && k0 + pr < i1;
            cp_async16(stage + p_dst, ok ? p_src : pairs, ok ? 16 : 0);
        }
#pragma unroll
        for (int u = 0; u < XU; u++) {
            const int r = xr + u * (128 / XC), i = k0 + 8 * xc;
            const int n = x_n[u] ? 2 * max(0, min(8, i1 - i)) : 0;
            if (r < 8 * NT) cp_async16(stage + x_dst + u * (128 / XC) * K * 2, n ? x_src[u] : x, n);
        }
    };
    // acc: Σ (x·scale)·(offset + code) per output; corr and corm: Σ x·scale and Σ x·min over the
    // inputs (an mma with A all ones: every row the same, j = 0, 1 the lane's two columns).
    // acc[m] is tile m's D for all the row tiles: wgmma's 4·NT values where WG.
    float acc[4][NT][4], corr[NT][4], corm[NT][4];
#pragma unroll
    for (int n = 0; n < NT; n++) for (int j = 0; j < 4; j++) { corr[n][j] = corm[n][j] = 0.f; for (int m = 0; m < 4; m++) acc[m][n][j] = 0.f; }
    // The constants of the lop3s and the ones' fragments in registers the compiler cannot rebuild
    // (it would, before every use: an instruction each): `zero` is 0 (gs > 0) but not to ptxas.
    const unsigned zero = (unsigned)gs >> 31;
    const unsigned k1024 = 0x64006400u | zero, k64 = 0x54005400u | zero, one = 0x3C003C00u | zero;
    const unsigned ones[4] = {one, one, one, one};
    const unsigned f1024 = 0x64006400u, f64 = 0x54005400u; // the offsets as fp16x2
    const int w = 8 * warp + g, grp = 8 * w / gs; // this lane's code word and its outputs' group
#pragma unroll
    for (int st = 0; st < S - L; st++) {
        if (st < steps) issue(st, ring0 + st * STAGE);
        cp_async_commit();
    }
    // ldmatrix's addresses: lane 8j + r gives row r of matrix j, x's row 8·(n + j/2) + r (the
    // .x2 of an odd last tile: row r) and chunk kb/8 + j mod 2 of its inputs; the swizzle is the
    // same for every n.
    const int lr = lane & 7, lj = lane >> 3, x_sw = GT_XSW(K, lr);
    const unsigned x_row4 = (8 * (lj >> 1) + lr) * K * 2, x_row2 = lr * K * 2;
    int st = 0, fill = S - L; // the stage used, the stage filled next
    for (int step = 0; step < steps; step++) {
        cp_async_wait<S - L - 1>(); // this thread's copies of stage `step` are done
        if (WG) fence_proxy_async(); // and visible to the tensor cores
        __syncthreads();           // everyone's are, and the stage refilled next was used up
        if (step + S - L < steps) issue(step + S - L, ring0 + fill * STAGE);
        cp_async_commit();
        fill = fill == S - 1 ? 0 : fill + 1;
        const unsigned char* sb = ring[st];
        const unsigned xs_a = ring0 + st * STAGE + CS + PS; // x's shared-space address
        st = st == S - 1 ? 0 : st + 1;
#pragma unroll
        for (int kb = 0; kb < K; kb += 16) {
            // The lane's 16 code bytes and its group's pairs of kq = kb/16.
            const uint4 cv = *(const uint4*)(sb + (kb >> 4) * (GT_O * 8) + 64 * w + 16 * t);
            const uint4 p = *(const uint4*)(sb + CS + ((kb >> 4) * gpb + grp) * 64 + 16 * t);
            const unsigned mn01 = p.x, sc01 = p.y, mn23 = p.z, sc23 = p.w;
            const unsigned cw[4] = {cv.x, cv.y, cv.z, cv.w};
            unsigned a[4][4];
#pragma unroll
            for (int m = 0; m < 4; m++) {
                // Tile m's bytes of inputs a, b (c, d) to bits 0–7 and 16–23: a shift for m odd.
                const unsigned q01 = cw[2 * (m >> 1)] >> (8 * (m & 1)), q23 = cw[2 * (m >> 1) + 1] >> (8 * (m & 1));
                // A: a0/a2 row g (low nibbles, 1024 + code) at k 2t, 2t+1 / 2t+8, 2t+9; a1/a3 row g + 8
                // (high nibbles, 64 + code).
                a[m][0] = raw_lo(q01, k1024);
                a[m][1] = raw_hi(q01, k64);
                a[m][2] = raw_lo(q23, k1024);
                a[m][3] = raw_hi(q23, k64);
                if (!SCALE_X) { // min + code·scale, rounded once as dequant_dim0 rounds it
                    a[m][0] = fma_f16x2(sub_f16x2(a[m][0], f1024), sc01, mn01);
                    a[m][1] = fma_f16x2(sub_f16x2(a[m][1], f64), sc01, mn01);
                    a[m][2] = fma_f16x2(sub_f16x2(a[m][2], f1024), sc23, mn23);
                    a[m][3] = fma_f16x2(sub_f16x2(a[m][3], f64), sc23, mn23);
                }
            }
            // Row tile n's products with B = bb: x[8n + g] at the inputs of a0/a1 and a2/a3, times
            // the inputs' scales (bs) and mins (bm) under SCALE_X.
            auto tile = [&](int n, uint2 bb) {
                if (!SCALE_X) {
#pragma unroll
                    for (int m = 0; m < 4; m++) mma_16816(acc[m][n], a[m], bb);
                    return;
                }
                const uint2 bs = make_uint2(fma_f16x2(bb.x, sc01, 0x80008000u), fma_f16x2(bb.y, sc23, 0x80008000u));
                const uint2 bm = make_uint2(fma_f16x2(bb.x, mn01, 0x80008000u), fma_f16x2(bb.y, mn23, 0x80008000u));
#pragma unroll
                for (int m = 0; m < 4; m++) mma_16816(acc[m][n], a[m], bs);
                mma_16816(corr[n], ones, bs);
                mma_16816(corm[n], ones, bm);
            };
            if constexpr (WG) {
                // Tile m of every warp together: 64 outputs by x's 8·NT rows, B at input kb of
                // each row (within a swizzle atom's 16-byte chunks: the descriptor's start moves
                // by kb's bytes). The products of kb − 16 are retired after these are issued,
                // so that their A registers may take the next kb's codes.
                const unsigned long long desc = wg_desc(xs_a + 2 * kb, K);
                wgmma_fence();
#pragma unroll
                for (int m = 0; m < 4; m++) wgmma_64xn<8 * NT>(&acc[m][0][0], a[m], desc);
                wgmma_commit();
                wgmma_wait<1>();
                continue;
            }
            const unsigned xo = 16 * (((kb >> 3) + (lj & 1)) ^ x_sw);
#pragma unroll
            for (int n = 0; n < NT; n += 2) {
                unsigned d[4];
                if (n + 1 < NT) {
                    ldsm_x4(d, xs_a + n * 16 * K + x_row4 + xo);
                    tile(n, make_uint2(d[0], d[1]));
                    tile(n + 1, make_uint2(d[2], d[3]));
                } else {
                    ldsm_x2(d, xs_a + n * 16 * K + x_row2 + xo);
                    tile(n, make_uint2(d[0], d[1]));
                }
            }
        }
    }
    if (WG) {
        wgmma_wait<0>();
        wgmma_keep<4 * NT * 4>(&acc[0][0][0]);
    }
    // D: in tile m, rows g and g + 8 are outputs 8w + 2m and 8w + 2m + 1; columns (x rows)
    // 8n + 2t + {0, 1}. So a lane holds eight adjacent outputs of each of its rows: two
    // 4-value adds where they lie whole inside y and 16-byte aligned.
    const int o = o_blk + 8 * w;
#pragma unroll
    for (int n = 0; n < NT; n++) {
#pragma unroll
        for (int h = 0; h < 2; h++) {
            const int b = 8 * n + 2 * t + h;
            if (b >= nb) continue;
            // The offsets' share (1024 or 64 times Σ x·scale) off, Σ x·min on.
            const float sx = corr[n][h], mx = corm[n][h];
            float v[8];
#pragma unroll
            for (int m = 0; m < 4; m++) { v[2 * m] = acc[m][n][h] - 1024.f * sx + mx; v[2 * m + 1] = acc[m][n][2 + h] - 64.f * sx + mx; }
            float* yr = y + (long long)b * outs + o;
            if (o + 8 <= outs && (outs & 3) == 0) {
                red_add4(yr, v[0], v[1], v[2], v[3]);
                red_add4(yr + 4, v[4], v[5], v[6], v[7]);
            } else {
                for (int k = 0; k < 8; k++) if (o + k < outs) atomicAdd(yr + k, v[k]);
            }
        }
    }
    if (st4.done) gemm4_tc_store(y, outs, nb, col, chunks_here, chunks_all, st4, (volatile int*)ring[0]);
}

// The block's work: column blockIdx.x (outputs blockIdx.x·GT_O …) over the inputs of slice
// blockIdx.y (per_slice of them, a multiple of 64), one segment. (Marlin's partition, every block
// an equal share of all (column, 64 inputs) units, ran slower at 1 to 64 rows in session 22, call 1.)
template <int NT, bool SCALE_X>
__device__ __forceinline__ void gemm4_tc_tile(const unsigned char* codes, const unsigned* pairs, const half_t* x,
                                              float* y, int outs, int ins, int ldx, int gs, int nb, int per_slice,
                                              const Store4& st4) {
    const int kc = (ins + 63) / 64;
    const int k0 = min(kc, (int)blockIdx.y * (per_slice / 64)), k1 = min(kc, k0 + per_slice / 64);
    if (k0 < k1)
        gemm4_tc_seg<NT, SCALE_X>(codes, pairs, x, y, outs, ldx, gs, nb, blockIdx.x, 64 * k0, min(ins, 64 * k1),
                                  (unsigned)(k1 - k0), (unsigned)kc, st4);
}

extern "C" __global__ void __launch_bounds__(128, GT_MINB) gemm4_tc_1(const unsigned char* c, const unsigned* p, const half_t* x, float* y, int outs, int ins, int ldx, int gs, int nb, int ps,
                                                                                half_t* out, const half_t* bias, int flags, unsigned* done) {
    gemm4_tc_tile<1, GT_SX1>(c, p, x, y, outs, ins, ldx, gs, nb, ps, Store4{out, bias, flags, done});
}
extern "C" __global__ void __launch_bounds__(128, GT_MINB) gemm4_tc_2(const unsigned char* c, const unsigned* p, const half_t* x, float* y, int outs, int ins, int ldx, int gs, int nb, int ps,
                                                                                half_t* out, const half_t* bias, int flags, unsigned* done) {
    gemm4_tc_tile<2, GT_SX2>(c, p, x, y, outs, ins, ldx, gs, nb, ps, Store4{out, bias, flags, done});
}
extern "C" __global__ void __launch_bounds__(128, GT_MINB4) gemm4_tc_4(const unsigned char* c, const unsigned* p, const half_t* x, float* y, int outs, int ins, int ldx, int gs, int nb, int ps,
                                                                                half_t* out, const half_t* bias, int flags, unsigned* done) {
    gemm4_tc_tile<4, GT_SX4>(c, p, x, y, outs, ins, ldx, gs, nb, ps, Store4{out, bias, flags, done});
}
extern "C" __global__ void __launch_bounds__(128, GT_MINB8) gemm4_tc_8(const unsigned char* c, const unsigned* p, const half_t* x, float* y, int outs, int ins, int ldx, int gs, int nb, int ps,
                                                                                half_t* out, const half_t* bias, int flags, unsigned* done) {
    gemm4_tc_tile<8, false>(c, p, x, y, outs, ins, ldx, gs, nb, ps, Store4{out, bias, flags, done});
}
// The bytes of each tile's ring (the dynamic shared memory of gemm4_tc_1, _2, _4, _8).
extern "C" __constant__ unsigned gemm4_tc_ring[4] = {GT_RING(1), GT_RING(2), GT_RING(4), GT_RING(8)};
