/*
sparse_ffn.h: what sparse_ffn.c and decode.c share: the weight dtypes, the gate g_t, and the kernels' API
(build.py hands the API block to cffi).
*/
#ifndef SPARSE_FFN_H
#define SPARSE_FFN_H
#include <stddef.h>
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
