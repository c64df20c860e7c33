// Issue 20's anchor for the 4-bit product, measured on our machine: Marlin (IST-DASLab/marlin,
// Apache-2.0; its `marlin_cuda_kernel.cu`, not in this repository, is compiled beside this file by
// marlin_anchor.sh) against cuBLAS's fp16 GEMM on the shapes `gemv4_bench` times, timed as
// `gemv4_bench` times (the median of 7 runs, each launched alone and waited for, after one warm-up),
// so that the two tables compare kernel for kernel. Marlin's format is its own: 4-bit symmetric
// codes in groups of 128 inputs with an fp16 scale each (0.516 bytes a weight; ours, groups of 64
// with a min and a scale, 0.5625). Random codes and scales: the time does not depend on them.
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <cublas_v2.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

int marlin_cuda(const void* A, const void* B, void* C, void* s, int prob_m, int prob_n, int prob_k, void* workspace,
                int groupsize, int dev, cudaStream_t stream, int thread_k, int thread_n, int sms, int max_par);

#define CK(x)                                                                           \
    do {                                                                                \
        cudaError_t e_ = (x);                                                           \
        if (e_ != cudaSuccess) {                                                        \
            std::fprintf(stderr, "%s:%d: %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
            std::exit(1);                                                               \
        }                                                                               \
    } while (0)

static void fill(void* dev, size_t bytes, unsigned long long seed, bool halves) {
    std::vector<unsigned short> h((bytes + 1) / 2);
    unsigned long long z = seed * 6364136223846793005ull + 1;
    for (auto& v : h) {
        z = z * 6364136223846793005ull + 1442695040888963407ull;
        // fp16 values in ±0.03 (as halves), or any 16 bits (codes).
        v = halves ? __half_as_ushort(__float2half((float)((z >> 40) & 0xffffff) / 16777216.f * 0.06f - 0.03f))
                   : (unsigned short)(z >> 48);
    }
    CK(cudaMemcpy(dev, h.data(), bytes, cudaMemcpyHostToDevice));
}

template <class F>
static double median_ms(F f) {
    f();
    CK(cudaDeviceSynchronize());
    std::vector<double> v;
    for (int i = 0; i < 7; i++) {
        auto t = std::chrono::steady_clock::now();
        f();
        CK(cudaDeviceSynchronize());
        v.push_back(std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t).count());
    }
    std::sort(v.begin(), v.end());
    return v[v.size() / 2];
}

int main() {
    cublasHandle_t h;
    if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS) return 1;
    cudaDeviceProp prop;
    CK(cudaGetDeviceProperties(&prop, 0));
    std::printf("%s, %d multiprocessors\n", prop.name, prop.multiProcessorCount);
    struct Shape { const char* name; int outs, ins; };
    const Shape shapes[] = {{"OPT-175B fc1", 49152, 12288}, {"OPT-175B qkv", 36864, 12288},
                            {"OPT-175B out", 12288, 12288}, {"OPT-175B fc2", 12288, 49152},
                            {"OPT-30B fc1", 28672, 7168},   {"OPT-6.7B qkv", 12288, 4096},
                            {"OPT-6.7B out", 4096, 4096},   {"OPT-6.7B fc2", 4096, 16384}};
    const int group = 128, max_par = 16, max_rows = 128;
    std::printf("| weight (outs × ins) | rows | fp16 GEMM ms | Marlin ms | Marlin GB/s | Marlin / fp16 GEMM |\n");
    std::printf("|---|---|---|---|---|---|\n");
    int failed = 0;
    for (const Shape& sh : shapes) {
        const size_t n = sh.outs, k = sh.ins;
        void *a, *w, *b, *c, *s, *ws;
        CK(cudaMalloc(&a, max_rows * k * 2));
        CK(cudaMalloc(&w, n * k * 2));
        CK(cudaMalloc(&b, n * k / 2));
        CK(cudaMalloc(&c, max_rows * n * 2));
        CK(cudaMalloc(&s, k / group * n * 2));
        CK(cudaMalloc(&ws, n / 128 * max_par * 4));
        CK(cudaMemset(ws, 0, n / 128 * max_par * 4));
        fill(a, max_rows * k * 2, 1, true);
        fill(w, n * k * 2, 2, true);
        fill(b, n * k / 2, 3, false);
        fill(s, k / group * n * 2, 4, true);
        for (int m : {1, 2, 4, 8, 16, 32, 64, 128}) {
            const float one = 1.f, zero = 0.f;
            // Row-major C[m × n] = A[m × k] · W[n × k]ᵀ, fp32 accumulation (as gemv4_bench's).
            const double fp16 = median_ms([&] {
                cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, (int)n, m, (int)k, &one, w, CUDA_R_16F, (int)k, a, CUDA_R_16F,
                             (int)k, &zero, c, CUDA_R_16F, (int)n, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
            });
            int err = 0;
            const double ml = median_ms([&] {
                err |= marlin_cuda(a, b, c, s, m, (int)n, (int)k, ws, group, 0, 0, -1, -1, prop.multiProcessorCount,
                                   max_par);
            });
            CK(cudaGetLastError());
            if (err) {
                std::printf("| %s (%zu × %zu) | %d | %.3f | error %d | | |\n", sh.name, n, k, m, fp16, err);
                failed = 1;
                continue;
            }
            const double bytes = n * k / 2.0 + k / group * n * 2.0 + m * (k * 2.0 + n * 2.0);
            std::printf("| %s (%zu × %zu) | %d | %.3f | %.3f | %.0f | %.2f× |\n", sh.name, n, k, m, fp16, ml,
                        bytes / ml / 1e6, fp16 / ml);
        }
        for (void* p : {a, w, b, c, s, ws}) CK(cudaFree(p));
    }
    cublasDestroy(h);
    return failed;
}
