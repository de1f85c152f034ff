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
  sffn_forward         the tuned kernel (sparse_ffn_tuned.h): SIMD, prefetching, chunks, batches.
bench.py times them side by side ("C plain" and "C tuned" rows): what the tuning buys on your machine.

Build:  python build.py      (cffi -> _sparse_ffn_c; -O3 -march=native -fopenmp, with fallbacks it reports)
Run:    python bench.py      (timings);  python -m pytest -q test_kernels.py  (both kernels vs model.FeedForward)
Files:  sparse_ffn.c (this: the plain kernel and the API), sparse_ffn_tuned.h (the tuned kernel),
        sparse_ffn_simd.h (its AVX2 / AVX-512 micro-kernels), sparse_ffn_x86.h (VNNI int8 and AMX paths).
*/
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif
#include "sparse_ffn.h"  // dtypes, the gate, the API

// ----------------------------------------------------------------------------
// loading weights as fp32

static float f16_to_f32(uint16_t v) {  // portable IEEE half -> float, subnormals, inf and nan too
    uint32_t s = (uint32_t)(v & 0x8000) << 16, e = (v >> 10) & 0x1f, m = v & 0x3ff, f;
    if (e == 0x1f) f = s | 0x7f800000u | (m << 13);
    else if (e) f = s | ((e + 112) << 23) | (m << 13);
    else if (m) {  // subnormal: shift the mantissa up until it is normal
        e = 113;
        while (!(m & 0x400)) { m <<= 1; e--; }
        f = s | (e << 23) | ((m & 0x3ff) << 13);
    } else f = s;
    float r; memcpy(&r, &f, 4); return r;
}

INLINE float ld1(const void* w, size_t i, int dt) {
    if (dt == F32) return ((const float*)w)[i];
    if (dt == I8) return (float)((const int8_t*)w)[i];  // its row's scale is applied to the sums
    uint16_t v = ((const uint16_t*)w)[i];
#ifdef __FLT16_MAX__
    if (dt == F16) return (float)((const _Float16*)w)[i];  // exact, and vectorized (F16C on x86)
#else
    if (dt == F16) return f16_to_f32(v);
#endif
    uint32_t f = (uint32_t)v << 16; float r; memcpy(&r, &f, 4); return r;  // bf16: top half of fp32
}

// the arguments both kernels refuse (sparse_ffn.py checks them first, with messages)
static int bad_args(int B, int d, int h, int nthreads, int dtype, const float* scales, int gate, float t) {
    return B < 1 || B > SFFN_MAX_B || d < 1 || h < 1 || nthreads < 1 || dtype < F32 || dtype > I8
        || (dtype == I8) != (scales != NULL) || (gate != RELU && gate != SILU) || !(t >= 0.0f) || isinf(t);
}

// ----------------------------------------------------------------------------
// the plain kernel

// w . x and y += g w over d elements, weights as fp32 (int8: unscaled). One loop per dtype, so that the
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
// the tuned kernel: work(), one thread's share of sffn_forward, and gemv_rows(), the dense GEMV's

#include "sparse_ffn_tuned.h"

// ----------------------------------------------------------------------------
// the API (declared in build.py's cdef)

int sffn_max_batch(void) { return SFFN_MAX_B; }
// 3: AVX-512 with VNNI int8 dots, 2: AVX-512, 1: AVX2+FMA+F16C, 0: portable loops
int sffn_simd(void) { return SFFN_AVX2 ? (VW == 16 ? 2 + SFFN_VNNI : 1) : 0; }
int sffn_amx(void) {  // 1 where bf16 (and int8) batches run their W1 pass on AMX tiles (built for it, and the OS allows it)
#if SFFN_AMX
    return amx_granted();
#else
    return 0;
#endif
}
int sffn_openmp(void) {  // 0 without OpenMP, else the most threads it would give
#ifdef _OPENMP
    return omp_get_max_threads();
#else
    return 0;
#endif
}

// the threads to use for `work` bytes of weights x batch rows: a thread per 256 KB at most (waking a
// thread for less costs more than it saves), and each row of the batch is another dot per weight. Per
// weight byte alone, d=192 h=512 16-bit batches ran on one thread; on two, on the 2-core Xeon at 0%:
// bf16 batch 16 131 -> 94 us, int8 121 -> 84, bf16 batch 4 61 -> 44; d=128 h=384 fp32 batch 8 77 -> 53
static int threads_for(size_t work, int nthreads) {
#ifdef _OPENMP
    return (size_t)nthreads > 1 + work / (256 << 10) ? (int)(1 + work / (256 << 10)) : nthreads;
#else
    (void)work; (void)nthreads;
    return 1;  // one thread without OpenMP
#endif
}

// Rows of x and of the partial y's are ld floats apart, not d: at d = 2048 (8 KB) the same element
// of every row would fall in the same L1 set, and 16 rows thrash its 8 ways
static size_t row_stride(int d) { return ((size_t)d + 15) / 16 * 16 + 16; }

// floats of scratch a call needs: a padded copy of x, one partial y per thread, and x quantized (VNNI)
size_t sffn_scratch_floats(int B, int d, int nthreads) {
    return (size_t)(1 + nthreads) * B * row_stride(d) + q_floats(d) + amx_floats(d);
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

// y = W x for B <= SFFN_MAX_B rows: W [n, d] fp32 / fp16 / bf16 / int8 (then scales: n floats, else NULL),
// x [B, d] and y [B, n] fp32. Returns 0, or -1 for arguments it cannot take.
// scratch: n_scratch floats, at least sffn_scratch_floats(B, d, 0) (the padded x; checked here).
int sffn_gemv(const float* x, int B, int d, int n, const void* w, int dtype, const float* scales, float* y,
              float* scratch, size_t n_scratch, int nthreads) {
    if (bad_args(B, d, n, nthreads, dtype, scales, RELU, 0.0f) || n_scratch < sffn_scratch_floats(B, d, 0)) return -1;
    nthreads = threads_for((size_t)n * d * ES(dtype) * B, nthreads);
    const size_t ld = row_stride(d);
    const float* xb[SFFN_MAX_B];
    for (int b = 0; b < B; b++) {
        memcpy(scratch + b * ld, x + (size_t)b * d, (size_t)d * sizeof(float));
        xb[b] = scratch + b * ld;
    }
    const QRow* q = dtype == I8 && B == 1 ? quantize_x(xb[0], d, (QRow*)(scratch + ld)) : NULL;
#pragma omp parallel num_threads(nthreads)
    {
        int t = 0, T = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), T = omp_get_num_threads();
#endif
        (dtype == F32 ? gemv_f32 : dtype == F16 ? gemv_f16 : dtype == BF16 ? gemv_bf16 : gemv_i8)
            (xb, q, B, d, n, (const char*)w, scales, y, t, T);  // scales: NULL unless int8 (checked above)
    }
    return 0;
}

// y = W2 (g_t(W1 x) * (W3 x)) for B <= SFFN_MAX_B rows, gate RELU or SILU, threshold t >= 0.
// int8 weights (dtype I8) take scales: 3h floats, the per-row scales of W1, then W3, then W2^T (the
// weight is q * scale); NULL for the other dtypes. Returns the number of active units (the union over
// the batch), or -1 for arguments it cannot take (sparse_ffn.py checks them first).
// scratch: n_scratch floats, at least sffn_scratch_floats(B, d, nthreads) (checked here).
int sffn_forward(const float* x, int B, int d, int h, const void* w1, const void* w32, int dtype,
                 const float* scales, int gate, float t, float* y, float* scratch, size_t n_scratch, int nthreads) {
    if (bad_args(B, d, h, nthreads, dtype, scales, gate, t) || n_scratch < sffn_scratch_floats(B, d, nthreads))
        return -1;
    nthreads = threads_for((size_t)h * d * ES(dtype) * B, nthreads);  // W1's bytes x rows
    // about 4 chunks per thread (at most SFFN_MAX_CHUNK units each): round-robin chunks balance the threads,
    // and each chunk costs a start-up (its second pass cannot prefetch before its W1 pass has listed the
    // active units). Against 16 a thread, on the 2-core Xeon, side by side: d=192 h=512 fp32 batch 1 at 90%
    // 17.6 -> 13.4 us, batch 4 at 0% 60.9 -> 49.7 us; d=512 h=2048 bf16 batch 16 at 90% 193 -> 152 us;
    // none slower. d=2048 h=8192 keeps its chunks of 256 units
    int chunk = (h + 4 * nthreads - 1) / (4 * nthreads);
    chunk = chunk < 2 ? 2 : chunk > SFFN_MAX_CHUNK ? SFFN_MAX_CHUNK : (chunk + 1) & ~1;
    const size_t ld = row_stride(d), N = (size_t)B * ld;
    float* xpad = scratch + (size_t)nthreads * N;
    for (int b = 0; b < B; b++) memcpy(xpad + b * ld, x + (size_t)b * d, (size_t)d * sizeof(float));
    float* extra = scratch + (size_t)(nthreads + 1) * N;
    const QRow* q = dtype == I8 && B == 1 ? quantize_x(xpad, d, (QRow*)extra) : NULL;
    const void* xt = NULL;
    const double* xs = NULL;
#if SFFN_AMX
    const float* xb[SFFN_MAX_B];
    for (int b = 0; b < B; b++) xb[b] = xpad + b * ld;
    if (dtype == BF16 && B >= AMX_MIN_B && d % 32 == 0 && amx_granted()) {
        uint16_t* tiles = (uint16_t*)(extra + q_floats(d));
        if (amx_pack_x(xb, B, d, tiles)) xt = tiles;
    }
#if SFFN_AMX_I8
    if (dtype == I8 && B >= AMX_MIN_B_I8 && d % 64 == 0 && d <= QMAX_D && amx_granted()) {
        // the row scales, then the tiles, 64-byte aligned (amx_floats leaves room for both)
        double* s = (double*)(((uintptr_t)(extra + q_floats(d)) + 63) & ~(uintptr_t)63);
        int8_t* tiles = (int8_t*)(s + 16);
        if (amx_pack_xq(xb, B, d, tiles, s)) xt = tiles, xs = s;
    }
#endif
#endif
    Args a = {xpad, B, d, (int)ld, h, chunk, (const char*)w1, (const char*)w32, scratch, gate, t, scales, q, xt, xs};
    int total = 0, T = 1;
#pragma omp parallel num_threads(nthreads) reduction(+ : total)
    {
        int t = 0, Tn = 1;
#ifdef _OPENMP
        t = omp_get_thread_num(), Tn = omp_get_num_threads();  // Tn may be fewer than asked
#endif
        if (t == 0) T = Tn;
        total += dtype == F32 ? work_f32(&a, t, Tn) : dtype == F16 ? work_f16(&a, t, Tn)
               : dtype == BF16 ? work_bf16(&a, t, Tn) : work_i8(&a, t, Tn);
    }
    // y = the sum of the partials: B*d floats per thread, small next to the weights
    for (int b = 0; b < B; b++)
        for (int i = 0; i < d; i++) {
            float s = scratch[b * ld + i];
            for (int p = 1; p < T; p++) s += scratch[p * N + b * ld + i];
            y[(size_t)b * d + i] = s;
        }
    return total;
}
