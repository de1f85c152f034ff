/*
sparse_ffn.c: the RELU-sparse gated FFN of "Stochastic activations" on the CPU, for decoding.

    y[b] = W2 (g_t(W1 x[b]) * (W3 x[b]))     x, y: [B, d] fp32;  W1, W3: [h, d];  W2: [d, h]
    g_t(u) = g(u) where |g(u)| > t, else 0    g = relu, or silu (CATS); t >= 0; t = 0 with relu is relu

A hidden unit j with g_t(W1_j . x) = 0 adds nothing, so only W1 is read in full; row j of W3 and
column j of W2 are read only for the active units (for B > 1: active for any row of the batch).
They are packed once, at load time, into one buffer W32 [h, 2d] with row j = [W3_j | W2^T_j], so an
active unit costs one contiguous read of 2d weights. A token moves d*h*b*(1 + 2(1 - s)) bytes at
sparsity s (b bytes per weight) where the dense FFN moves 3*d*h*b: the ideal speedup is 3 / (1 + 2(1 - s)).
Weights are fp32, fp16, bf16 or int8 (one fp32 scale per row of W1, W3 and W2^T); x, y and sums are fp32.

Two kernels compute it, with the same arguments and results (to fp32 rounding):
  sffn_forward_plain   the plain kernel, just below: the whole algorithm in portable C, one screen;
  sffn_forward         the tuned kernel (kernels/sparse_ffn_tuned.c): SIMD, prefetching, chunks, batches.
bench.py times them side by side ("C plain" and "C tuned" rows): what the tuning buys on your machine.

Build:  python build.py      (cffi -> _sparse_ffn_c; -O3 -march=native -fopenmp, with fallbacks it reports)
Run:    python bench.py      (timings);  python -m pytest -q tests/test_kernels.py  (both kernels vs model.FeedForward)
Files:  sparse_ffn.c (this: the plain kernel, and the entry points both kernels share: sffn_max_batch,
        sffn_openmp, sffn_advise_hugepages); sparse_ffn.h (what the C files share: the dtypes, ld1 (one
        weight as fp32), the gate, the argument checks, the API's prototypes); kernels/sparse_ffn_tuned.c
        (the tuned kernel sffn_forward, the dense GEMV sffn_gemv, sffn_scratch_floats, sffn_simd, sffn_amx),
        with kernels/sparse_ffn_simd.h (its AVX2 / AVX-512 micro-kernels) and kernels/sparse_ffn_x86.h
        (its AVX-512 VNNI int8 and AMX paths). build.py compiles the two .c files and decode.c into one module.
*/
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif
#include "sparse_ffn.h"  // dtypes, ld1 (one weight as fp32), the gate, bad_args, the API

// ----------------------------------------------------------------------------
// the plain kernel

// w . x and y += g w over d elements, weights as fp32 (ld1; int8: unscaled). One loop per dtype, so that the
// compiler vectorizes each (omp simd: the sum may be reordered)
INLINE float dot_dt(const void* w, const float* x, int d, const int dt) {
    float s = 0.0f;
#pragma omp simd reduction(+ : s)
    for (int i = 0; i < d; i++) s += ld1(w, i, dt) * x[i];
    return s;
}
INLINE void axpy_dt(float* y, float g, const void* w, int d, const int dt) {
#pragma omp simd
    for (int i = 0; i < d; i++) y[i] += g * ld1(w, i, dt);
}
static float dot_plain(const void* w, const float* x, int d, int dt) {
    return dt == F32 ? dot_dt(w, x, d, F32) : dt == F16 ? dot_dt(w, x, d, F16) : dt == BF16 ? dot_dt(w, x, d, BF16)
                                                                                           : dot_dt(w, x, d, I8);
}
static void axpy_plain(float* y, float g, const void* w, int d, int dt) {
    if (dt == F32) axpy_dt(y, g, w, d, F32); else if (dt == F16) axpy_dt(y, g, w, d, F16);
    else if (dt == BF16) axpy_dt(y, g, w, d, BF16); else axpy_dt(y, g, w, d, I8);
}

// floats of scratch the plain kernel needs: g(W1 x) for every unit and row, and one partial y per thread
size_t sffn_plain_scratch_floats(int B, int d, int h, int nthreads) { return (size_t)h * B + (size_t)nthreads * B * d; }

// y = W2 (g_t(W1 x) * (W3 x)) for B rows: the units split evenly over the threads, each thread in two passes
// over its units, into its own partial y; then the partial y's are summed. Returns the number of active
// units (the union over the batch), or -1 for arguments it cannot take.
int sffn_forward_plain(const float* x, int B, int d, int h, const void* w1, const void* w32, int dtype,
                       const float* scales, int gate, float t, float* y, float* scratch, size_t n_scratch, int nthreads) {
    if (bad_args(B, d, h, nthreads, dtype, scales, gate, t) || n_scratch < sffn_plain_scratch_floats(B, d, h, nthreads))
        return -1;
    const size_t row = (size_t)d * ES(dtype);  // bytes of one weight row
    float* u = scratch;  // [h, B]: g(W1_j . x_b)
    float* part = scratch + (size_t)h * B;  // [T, B, d]: each thread's partial y
    int active = 0, T = 1;
#pragma omp parallel num_threads(nthreads) reduction(+ : active)
    {
        int id = 0, n = 1;
#ifdef _OPENMP
        id = omp_get_thread_num(), n = omp_get_num_threads();
#endif
        if (id == 0) T = n;
        const int j0 = (int)((long long)h * id / n), j1 = (int)((long long)h * (id + 1) / n);  // this thread's units
        float* yp = part + (size_t)id * B * d;
        memset(yp, 0, (size_t)B * d * sizeof(float));
        for (int j = j0; j < j1; j++)  // pass 1: W1 in full
            for (int b = 0; b < B; b++) {
                const float s = dot_plain((const char*)w1 + j * row, x + (size_t)b * d, d, dtype);
                u[(size_t)j * B + b] = gate_value(scales ? s * scales[j] : s, gate);
            }
        for (int j = j0; j < j1; j++) {  // pass 2: [W3_j | W2^T_j] for the active units only
            const char* w3 = (const char*)w32 + 2 * j * row;
            int on = 0;
            for (int b = 0; b < B; b++) {
                const float g = u[(size_t)j * B + b];
                if (!is_on(g, t)) continue;  // this unit adds exactly 0 to y_b
                float s = dot_plain(w3, x + (size_t)b * d, d, dtype);  // W3_j . x_b
                if (scales) s = s * scales[h + j] * g * scales[2 * h + j]; else s *= g;  // in this order: see w3_scale
                axpy_plain(yp + (size_t)b * d, s, w3 + row, d, dtype);  // y_b += s W2^T_j
                on = 1;
            }
            active += on;
        }
    }
    for (size_t i = 0; i < (size_t)B * d; i++) {  // y = the sum of the T partial y's
        float s = part[i];
        for (int p = 1; p < T; p++) s += part[(size_t)p * B * d + i];
        y[i] = s;
    }
    return active;
}

// ----------------------------------------------------------------------------
// the API's shared entry points (the tuned kernel's are in kernels/sparse_ffn_tuned.c)

int sffn_max_batch(void) { return SFFN_MAX_B; }
int sffn_openmp(void) {  // 0 without OpenMP, else the most threads it would give
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
}

// ask for transparent huge pages on a buffer not yet touched: fewer TLB misses on random rows
void sffn_advise_hugepages(void* p, size_t bytes) {
#if defined(__linux__) && defined(MADV_HUGEPAGE)
    uintptr_t lo = ((uintptr_t)p + (1u << 21) - 1) & ~(uintptr_t)((1u << 21) - 1);
    uintptr_t hi = ((uintptr_t)p + bytes) & ~(uintptr_t)((1u << 21) - 1);
    if (hi > lo) madvise((void*)lo, hi - lo, MADV_HUGEPAGE);
#else
    (void)p; (void)bytes;
#endif
}
