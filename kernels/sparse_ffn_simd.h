/*
sparse_ffn_simd.h: the tuned kernel's vectors and micro-kernels (dot products of a few weight rows against
a few x rows, axpys), AVX-512 or AVX2+FMA+F16C where the compiler targets them, portable loops otherwise;
SFFN_AVX2 and VW say which. All static inline: included by kernels/sparse_ffn_tuned.c (and by
sparse_ffn_x86.h, whose paths use max_abs and prefetch_lines).
*/
#ifndef SPARSE_FFN_SIMD_H
#define SPARSE_FFN_SIMD_H
#include <stddef.h>
#include <math.h>
#include "sparse_ffn.h"  // INLINE, the dtypes, ES, ld1, SFFN_MAX_B

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SFFN_AVX2 1
#else
#define SFFN_AVX2 0
#endif

#ifndef PF_HINT
// the software prefetches' target: L2, not L1 (T0), whose few KB the rows prefetched ahead would take
// from x, y and the rows being read
#define PF_HINT _MM_HINT_T1
#endif

#if SFFN_AVX2 && defined(__AVX512F__) && defined(__AVX512BW__)
// AVX-512: 16 lanes, twice the work per instruction, and 32 registers
#define VW 16
typedef __m512 vec;
INLINE vec ldw(const void* w, size_t i, int dt) {  // VW weights from i, as fp32
    if (dt == F32) return _mm512_loadu_ps((const float*)w + i);
    if (dt == I8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128((const __m128i*)((const int8_t*)w + i))));
    __m256i v = _mm256_loadu_si256((const __m256i*)((const uint16_t*)w + i));
    if (dt == F16) return _mm512_cvtph_ps(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
#define vzero() _mm512_setzero_ps()
#define vset1(v) _mm512_set1_ps(v)
#define vload(p) _mm512_loadu_ps(p)
#define vstore(p, v) _mm512_storeu_ps(p, v)
#define vfma(a, b, c) _mm512_fmadd_ps(a, b, c)
#define vadd(a, b) _mm512_add_ps(a, b)
INLINE float vhsum(vec v) { return _mm512_reduce_add_ps(v); }
#elif SFFN_AVX2
#define VW 8
typedef __m256 vec;
INLINE vec ldw(const void* w, size_t i, int dt) {  // VW weights from i, as fp32
    if (dt == F32) return _mm256_loadu_ps((const float*)w + i);
    if (dt == I8) return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)((const int8_t*)w + i))));
    __m128i v = _mm_loadu_si128((const __m128i*)((const uint16_t*)w + i));
    if (dt == F16) return _mm256_cvtph_ps(v);
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
#define vzero() _mm256_setzero_ps()
#define vset1(v) _mm256_set1_ps(v)
#define vload(p) _mm256_loadu_ps(p)
#define vstore(p, v) _mm256_storeu_ps(p, v)
#define vfma(a, b, c) _mm256_fmadd_ps(a, b, c)
#define vadd(a, b) _mm256_add_ps(a, b)
INLINE float vhsum(vec v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
#else
#define VW 8  // the portable loops' lanes
#endif

// at offset i of NR rows being read, prefetch NR lines of the NR rows at pf: keeps pace with the reads
INLINE void prefetch_lines(const char* pf, size_t i, int es, const int NR) {
    if (!pf || ((i * es) & 63) != 0) return;
    for (int r = 0; r < NR; r++) {
#if SFFN_AVX2
        _mm_prefetch(pf + NR * i * es + 64 * r, PF_HINT);
#elif defined(__GNUC__)
        __builtin_prefetch(pf + NR * i * es + 64 * r, 0, 3);
#endif
    }
}

// x vector v stays in a register: otherwise gcc folds its load into each of the 4 FMAs that use it,
// and a 4 x 4 block issues 17 loads per 16 FMAs instead of 8. Used by the batched dot (B > 4), fp32
// only: with 16-bit and int8 weights the conversions bind before the loads do
#define IN_REG(v) __asm__("" : "+v"(v))

// ----------------------------------------------------------------------------
// micro-kernels: NR weight rows against NB inputs (NR * NB <= 8), and one row into NB outputs

// out[r * NB + b] = w[r] . x[b] over d elements
INLINE void dot_k(const void* const* w, const float* const* x, int d, int dt, const char* pf,
                  float* out, const int NR, const int NB) {
    const int es = ES(dt);
    int i = 0;
#if SFFN_AVX2
    enum { U = 4 };  // up to 4 accumulators per (row, input) pair, to hide the FMA latency
    const int u_n = NR * NB <= 2 ? 4 : NR * NB <= 4 ? 2 : 1;
    vec acc[U][4][4];
    for (int u = 0; u < u_n; u++)
        for (int r = 0; r < NR; r++)
            for (int b = 0; b < NB; b++) acc[u][r][b] = vzero();
    for (; i + VW * u_n <= d; i += VW * u_n) {
        for (int u = 0; u < u_n; u++) {  // each weight and each x vector loaded once: NR + NB loads
            prefetch_lines(pf, i + VW * u, es, NR);
            vec wv[4];
            for (int r = 0; r < NR; r++) wv[r] = ldw(w[r], i + VW * u, dt);
            for (int b = 0; b < NB; b++) {
                vec xv = vload(x[b] + i + VW * u);
                for (int r = 0; r < NR; r++) acc[u][r][b] = vfma(wv[r], xv, acc[u][r][b]);
            }
        }
    }
    for (; i + VW <= d; i += VW) {
        vec wv[4];
        for (int r = 0; r < NR; r++) wv[r] = ldw(w[r], i, dt);
        for (int b = 0; b < NB; b++) {
            vec xv = vload(x[b] + i);
            for (int r = 0; r < NR; r++) acc[0][r][b] = vfma(wv[r], xv, acc[0][r][b]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) {
            vec s = acc[0][r][b];
            for (int u = 1; u < u_n; u++) s = vadd(s, acc[u][r][b]);
            out[r * NB + b] = vhsum(s);
        }
#else
    float acc[4][4][8] = {{{0}}};  // 8 lanes the compiler can vectorize
    for (; i + 8 <= d; i += 8) {
        prefetch_lines(pf, i, es, NR);
        for (int r = 0; r < NR; r++)
            for (int b = 0; b < NB; b++)
                for (int l = 0; l < 8; l++) acc[r][b][l] += ld1(w[r], i + l, dt) * x[b][i + l];
    }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) {
            float s = 0.0f;
            for (int l = 0; l < 8; l++) s += acc[r][b][l];
            out[r * NB + b] = s;
        }
#endif
    for (; i < d; i++)  // the tail when d is not a multiple of 8
        for (int r = 0; r < NR; r++) {
            float wv = ld1(w[r], i, dt);
            for (int b = 0; b < NB; b++) out[r * NB + b] += wv * x[b][i];
        }
}

// y[b] += g[b] * w over d elements, for NB outputs
INLINE void axpy_k(const void* w, const float* g, float* const* y, int d, int dt, const char* pf,
                   const int NB) {
    const int es = ES(dt);
    int i = 0;
#if SFFN_AVX2
    vec gv[4];
    for (int b = 0; b < NB; b++) gv[b] = vset1(g[b]);
    for (; i + VW <= d; i += VW) {
        prefetch_lines(pf, i, es, 1);
        vec wv = ldw(w, i, dt);
        for (int b = 0; b < NB; b++) vstore(y[b] + i, vfma(gv[b], wv, vload(y[b] + i)));
    }
#endif
    for (; i < d; i++) {
        prefetch_lines(pf, i, es, 1);
        float wv = ld1(w, i, dt);
        for (int b = 0; b < NB; b++) y[b][i] += g[b] * wv;
    }
}

// calls K(NR, NB) with constants for nr in 1..4, nb in 1..4, so the micro-kernels unroll fully
#define SWITCH_NR_NB(nr, nb, K) switch ((nr) * 4 + (nb)) { \
    case 5: K(1, 1); break; case 6: K(1, 2); break; case 7: K(1, 3); break; case 8: K(1, 4); break; \
    case 9: K(2, 1); break; case 10: K(2, 2); break; case 11: K(2, 3); break; case 12: K(2, 4); break; \
    case 13: K(3, 1); break; case 14: K(3, 2); break; case 15: K(3, 3); break; case 16: K(3, 4); break; \
    case 17: K(4, 1); break; case 18: K(4, 2); break; case 19: K(4, 3); break; case 20: K(4, 4); break; }

INLINE void dot(const void* const* w, int nr, const float* const* x, int nb, int d, int dt,
                const char* pf, float* out) {
#define DOT_K(NR, NB) dot_k(w, x, d, dt, pf, out, NR, NB)
    SWITCH_NR_NB(nr, nb, DOT_K)
#undef DOT_K
}
INLINE void axpy(const void* w, const float* g, float* const* y, int nb, int d, int dt, const char* pf) {
    switch (nb) {
    case 1: axpy_k(w, g, y, d, dt, pf, 1); break;
    case 2: axpy_k(w, g, y, d, dt, pf, 2); break;
    case 3: axpy_k(w, g, y, d, dt, pf, 3); break;
    case 4: axpy_k(w, g, y, d, dt, pf, 4); break;
    }
}

// y[b] += sum_r g[r * B + b] w[r] over d elements, for NR <= UB weight rows and the B rows of y set
// in `rows`: each weight vector is loaded (and converted) once for all the batch rows, and each y
// vector is loaded and stored once per NR rows instead of once per row. pf: NPF rows (2 pointers
// each, as far as d) to prefetch at the same pace, or none
#ifndef UB
#define UB 8  // units per block of the blocked pass 2: UB weight vectors + 1 accumulator in registers
#endif
INLINE void axpy_block_k(const void* const* w, const float* g, float* const* y, int B, unsigned rows, int d,
                         int dt, const char* const* pf, int npf, const int NR) {
    const int es = ES(dt);
    int i = 0;
#if SFFN_AVX2
    for (; i + VW <= d; i += VW) {
        if (((i * es) & 63) == 0)
            for (int r = 0; r < npf; r++) _mm_prefetch(pf[r] + i * es, PF_HINT);
        vec wv[UB];
        for (int r = 0; r < NR; r++) wv[r] = ldw(w[r], i, dt);
        for (int b = 0; b < B; b++) {
            if (!(rows >> b & 1)) continue;
            vec acc = vload(y[b] + i);
            for (int r = 0; r < NR; r++) acc = vfma(vset1(g[r * B + b]), wv[r], acc);
            vstore(y[b] + i, acc);
        }
    }
#else
    (void)pf; (void)npf; (void)es;
#endif
    for (; i < d; i++)
        for (int b = 0; b < B; b++) {
            if (!(rows >> b & 1)) continue;
            float s = y[b][i];
            for (int r = 0; r < NR; r++) s += g[r * B + b] * ld1(w[r], i, dt);
            y[b][i] = s;
        }
}
INLINE void axpy_block(const void* const* w, int nr, const float* g, float* const* y, int B, unsigned rows, int d,
                       int dt, const char* const* pf, int npf) {
#define AXPY_BLOCK_K(NR) axpy_block_k(w, g, y, B, rows, d, dt, pf, npf, NR)
    switch (nr) {
    case 1: AXPY_BLOCK_K(1); break; case 2: AXPY_BLOCK_K(2); break; case 3: AXPY_BLOCK_K(3); break;
    case 4: AXPY_BLOCK_K(4); break; case 5: AXPY_BLOCK_K(5); break; case 6: AXPY_BLOCK_K(6); break;
    case 7: AXPY_BLOCK_K(7); break; default: AXPY_BLOCK_K(8); break;
    }
#undef AXPY_BLOCK_K
}

#if SFFN_AVX2
// the batched dot's blocks, rows x inputs of accumulators: with AVX-512's 32 registers 4 x 4 (4 weight
// and 4 x loads per 16 FMAs, where 2 x 8 needs 10) over 512-element slices; AVX2's 16 hold 2 x 4. The
// prefetch below keeps the next rows coming from memory while the FMAs run
// acc[r * SFFN_MAX_B + b] += w[r] . x[b] over elements [i0, i1), a multiple of VW long, prefetching
// the npf lines from pf spread evenly over the steps
INLINE void dot_acc_k(const void* const* w, const float* const* x, int i0, int i1, int dt,
                      const char* pf, int npf, vec* acc, const int NR, const int NB) {
    vec a[4][4];
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) a[r][b] = acc[r * SFFN_MAX_B + b];
    const int steps = (i1 - i0) / VW, rate = (npf + steps - 1) / steps;
    for (int i = i0, l = 0; i < i1; i += VW) {
        for (int k = 0; k < rate && l < npf; k++, l++) _mm_prefetch(pf + 64 * l, PF_HINT);
        vec wv[4];
        for (int r = 0; r < NR; r++) wv[r] = ldw(w[r], i, dt);
        for (int b = 0; b < NB; b++) {
            vec xv = vload(x[b] + i);
            if (dt == F32) IN_REG(xv);
            for (int r = 0; r < NR; r++) a[r][b] = vfma(wv[r], xv, a[r][b]);
        }
    }
    for (int r = 0; r < NR; r++)
        for (int b = 0; b < NB; b++) acc[r * SFFN_MAX_B + b] = a[r][b];
}
#endif

// out[r * nb + b] = w[r] . x[b] for nr <= 4 rows and any nb <= SFFN_MAX_B inputs. Past 4 inputs
// the accumulators cannot hold them all: the inputs go in blocks over slices of IB elements, so
// that the slice of every x row stays near (L1 or L2) while the blocks reread it
#ifndef IB
#define IB (VW == 16 ? 512 : 256)
#endif
#if SFFN_AVX2
INLINE void dot_blocks(const void* const* w, int nr, const float* const* x, int nb, int d, int dt,
                       const char* pf, float* out, const int BR, const int BI) {
    for (int r0 = 0; r0 < nr; r0 += BR) {
        const int nr2 = nr - r0 < BR ? nr - r0 : BR;
        const void* const* wr = w + r0;
        vec acc[4 * SFFN_MAX_B];
        for (int k = 0; k < 4 * SFFN_MAX_B; k++) acc[k] = vzero();
        const int dv = d / VW * VW;
        for (int i0 = 0; i0 < dv; i0 += IB) {
            const int i1 = i0 + IB < dv ? i0 + IB : dv;
            // the nr2 rows at pf (adjacent) are prefetched in step with this slice, spread over the input
            // blocks rather than all in the first, so that the memory is kept busy through the whole slice
            const size_t rb = (size_t)nr2 * ES(dt);
            const char* p = pf ? pf + (size_t)r0 * d * ES(dt) + rb * i0 : NULL;
            const int lines = p ? (int)((rb * (i1 - i0) + 63) / 64) : 0, ng = (nb + BI - 1) / BI;
            for (int b0 = 0, g = 0; b0 < nb; b0 += BI, g++) {
                const int n = nb - b0 < BI ? nb - b0 : BI, l0 = lines * g / ng, l1 = lines * (g + 1) / ng;
                const char* pg = p ? p + 64 * l0 : NULL;
#define DOT_ACC_K(NR, NB) dot_acc_k(wr, x + b0, i0, i1, dt, pg, l1 - l0, acc + b0, NR, NB)
                if (nr2 == BR && n == BI) DOT_ACC_K(BR, BI);  // the common case, without the switch
                else { SWITCH_NR_NB(nr2, n, DOT_ACC_K) }
#undef DOT_ACC_K
            }
        }
        for (int r = 0; r < nr2; r++)
            for (int b = 0; b < nb; b++) {
                float s = vhsum(acc[r * SFFN_MAX_B + b]);
                for (int i = dv; i < d; i++) s += ld1(wr[r], i, dt) * x[b][i];
                out[(r0 + r) * nb + b] = s;
            }
    }
}
#endif
INLINE void dot_batch(const void* const* w, int nr, const float* const* x, int nb, int d, int dt,
                      const char* pf, float* out) {
#if SFFN_AVX2
    if (nb > 4) {
        if (VW == 16) dot_blocks(w, nr, x, nb, d, dt, pf, out, 4, 4);
        else dot_blocks(w, nr, x, nb, d, dt, pf, out, 2, 4);
        return;
    }
#endif
    for (int b0 = 0; b0 < nb; b0 += 4) {  // portable: blocks of 4 over the whole row
        const int n = nb - b0 < 4 ? nb - b0 : 4;
        float o[16];
        dot(w, nr, x + b0, n, d, dt, b0 ? NULL : pf, o);
        for (int r = 0; r < nr; r++)
            for (int b = 0; b < n; b++) out[r * nb + b0 + b] = o[r * n + b];
    }
}

// max |x| over d floats, or -1 where x has nan or inf (the integer and AMX paths then leave x to fp32)
INLINE float max_abs(const float* x, int d) {
    float m = 0.0f;
    int i = 0;
#if SFFN_AVX2 && VW == 16
    __m512 mv = _mm512_setzero_ps();  // the max is exact in any order
    for (; i + 16 <= d; i += 16) {
        __m512 v = _mm512_abs_ps(_mm512_loadu_ps(x + i));
        if (_mm512_cmp_ps_mask(v, _mm512_set1_ps(3.4e38f), _CMP_LE_OQ) != 0xffff) return -1.0f;  // nan, inf
        mv = _mm512_max_ps(mv, v);
    }
    m = _mm512_reduce_max_ps(mv);
#endif
    for (; i < d; i++) {
        float v = fabsf(x[i]);
        if (!(v <= 3.4e38f)) return -1.0f;
        m = v > m ? v : m;
    }
    return m;
}
#endif
