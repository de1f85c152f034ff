/*
sparse_ffn.h: what the plain kernel (sparse_ffn.c), the tuned kernel (kernels/sparse_ffn_tuned.c) and decode.c
share: the weight dtypes, loading one weight as fp32, the gate g_t, the arguments the kernels refuse, and
the kernels' API (build.py hands the API block to cffi).
*/
#ifndef SPARSE_FFN_H
#define SPARSE_FFN_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>

#define SFFN_MAX_B 16  // rows per call; sparse_ffn.py and decode.c split larger batches
enum { F32 = 0, F16 = 1, BF16 = 2, I8 = 3 };
#define ES(dt) ((dt) == F32 ? 4 : (dt) == I8 ? 1 : 2)  // bytes per weight
enum { RELU = 0, SILU = 1 };
#define INLINE static inline __attribute__((always_inline))

// g(u) as model.py computes it: relu keeps nan; silu is clamped at -1e4 (which changes no value) so
// that -inf gives -0 and not -inf / inf = nan
INLINE float gate_value(float u, int gate) {
    if (gate == RELU) return u <= 0.0f ? 0.0f : u;
    u = u < -1e4f ? -1e4f : u;
    return u / (1.0f + expf(-u));
}
INLINE int is_on(float v, float t) { return !(fabsf(v) <= t); }  // nan is active: it must propagate

static inline float f16_to_f32(uint16_t v) {  // portable IEEE half -> float, subnormals, inf and nan too
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

// weight i of a row of dtype dt, as fp32 (int8: unscaled; its row's scale is applied to the sums)
INLINE float ld1(const void* w, size_t i, int dt) {
    if (dt == F32) return ((const float*)w)[i];
    if (dt == I8) return (float)((const int8_t*)w)[i];
    uint16_t v = ((const uint16_t*)w)[i];
#ifdef __FLT16_MAX__
    if (dt == F16) return (float)((const _Float16*)w)[i];  // exact, and vectorized (F16C on x86)
#else
    if (dt == F16) return f16_to_f32(v);
#endif
    uint32_t f = (uint32_t)v << 16; float r; memcpy(&r, &f, 4); return r;  // bf16: top half of fp32
}

// the arguments both kernels refuse (sparse_ffn.py checks them first, with messages)
static inline int bad_args(int B, int d, int h, int nthreads, int dtype, const float* scales, int gate, float t) {
    return B < 1 || B > SFFN_MAX_B || d < 1 || h < 1 || nthreads < 1 || dtype < F32 || dtype > I8
        || (dtype == I8) != (scales != NULL) || (gate != RELU && gate != SILU) || !(t >= 0.0f) || isinf(t);
}

// API begin (build.py gives cffi these lines)
int sffn_max_batch(void);
int sffn_simd(void);
int sffn_amx(void);
int sffn_openmp(void);
size_t sffn_scratch_floats(int B, int d, int nthreads);
void sffn_advise_hugepages(void* p, size_t bytes);
size_t sffn_plain_scratch_floats(int B, int d, int h, int nthreads);
int sffn_forward_plain(const float* x, int B, int d, int h, const void* w1, const void* w32, int dtype,
                       const float* scales, int gate, float t, float* y, float* scratch, size_t n_scratch, int nthreads);
int sffn_forward(const float* x, int B, int d, int h, const void* w1, const void* w32, int dtype,
                 const float* scales, int gate, float t, float* y, float* scratch, size_t n_scratch, int nthreads);
int sffn_gemv(const float* x, int B, int d, int n, const void* w, int dtype, const float* scales, float* y,
              float* scratch, size_t n_scratch, int nthreads);
// API end
#endif
