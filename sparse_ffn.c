/*
sparse_ffn.c: the RELU-sparse gated FFN of "Stochastic activations" on the CPU, for decoding.

    y[b] = W2 (g_t(W1 x[b]) * (W3 x[b]))     x, y: [B, d] fp32;  W1, W3: [h, d];  W2: [d, h]
    g_t(u) = g(u) where |g(u)| > t, else 0    g = relu, or silu (CATS); t >= 0; t = 0 with relu is relu

A hidden unit j with g_t(W1_j . x) = 0 adds nothing, so only W1 is read in full; row j of W3 and
column j of W2 are read only for the active units (for B > 1: active for any row of the batch).
The threshold t is how a SILU model is made sparse without retraining (CATS, Lee et al. 2024) and how
a RELU model trades quality for more sparsity.
They are packed once, at load time, into one buffer W32 [h, 2d] with row j = [W3_j | W2^T_j], so an
active unit costs one contiguous read of 2d weights.

How: the hidden units are cut into chunks (about 4 per thread, up to 256 units) dealt round-robin to T OpenMP
threads. For each of its chunks a thread
  1. streams the chunk's W1 rows (software-prefetching ahead, into its next chunk at the end),
     computes u = W1_j . x for every row of the batch and lists the active units;
  2. for each active unit reads its W32 row, prefetching a later active unit's row (at least 4 KB
     ahead) while it works on this one (a data-dependent jump the hardware prefetcher cannot guess), and adds
     g_t(u) (W3_j . x) W2^T_j into its private partial y, for the batch rows where it is active only.
After the one join, the T partial y's are summed into y. One join and no other barrier: a thread
that the OS descheduled delays the others only once. The work each thread does, and the order of
every sum, depend only on (B, d, h, T), so results are the same from call to call.
Weights are fp32, fp16 (F16C), bf16 (a shift) or int8 (sign-extended; one fp32 scale per row of W1,
W3 and W2^T, applied once to each sum), converted to fp32 as they are loaded: the half types move half
the bytes, int8 a quarter. x, y and all sums are fp32. AVX-512 (16 lanes, 32 registers) where the
compiler targets it, else AVX2+FMA, else portable loops; without OpenMP it runs on one thread. Three
paths skip the conversion where the CPU allows (all as exact as fp32 x, all tested): int8 at batch 1
with AVX-512 VNNI (x as a 24-bit integer, byte-by-byte integer dots), and the W1 pass of bf16 batches
of 8+ rows and of int8 batches of 5+ rows on AMX tiles. All scratch memory is passed in by the caller
(sparse_ffn.py allocates it once), so a call allocates nothing.

Batches (B <= 16 rows a call): the W1 pass is register-blocked, NRW(dt) rows of W1 against up to 4
batch rows per step (past 4: 4 x 4 blocks over slices of IB elements, 2 x 4 with AVX2), so each weight
loaded serves every row of the batch; in pass 2 a unit's rows are read once for the batch rows where
it fires; from 8 rows with 16-bit or int8 weights, where units fire on few rows each (real text),
pass 2 goes batch row by batch row instead, x_b and y_b staying in L1; where they fire on at least
half the rows (dense text, 0% sparsity), UB units at a time, so that each y vector is loaded and
stored once per UB units (16-bit and int8 from 2 rows, fp32 from 8).
Where it stands (2-core Xeon with AVX-512, VNNI and AMX, d=2048 h=8192, 2 threads, 2026-11-24;
bench.py at 50-99% sparsity, against the read roof measured before each row on huge pages, as the
packed weights are, ~35 GB/s): batch 1 fp32 80-85%, bf16 72-77%, int8 65-75%; batch 4 fp32 72-80%,
bf16 63-67%, int8 47-56%; batch 16 fp32 59-65%, bf16 53-63%, int8 41-53% (the second pass,
scattered rows, is the rest). At 0% sparsity fp32 batch 1 reads what PyTorch's dense reads, a little
slower than MKL (0.97x); batch 16 is 1.72-2.48x of dense. On a 2-core AMD EPYC (Zen 4: AVX-512,
VNNI, no AMX; 2026-11-25, README, Speed), against a 32.1 GB/s 1 GiB read: batch 1 fp32 80-120%, bf16
81-109%, int8 80-102%; batch 4 fp32 85-97%, bf16 50-81%; batch 16 fp32 37-73% (a slow spell of the
host; its W1 pass alone runs at 67%), bf16 23-41%, int8 14-24%, bound there by the FMAs (16 per
weight, at ~115 G/s on the 2 cores), not the memory; PyTorch's dense runs slower there, every row
1.61x or more.
W1 is prefetched into L2 (PF_HINT): 5-20% faster than into L1 on that Xeon, for every dtype (AMX
batches leave blocks over AMX_PF_MAX to the hardware prefetcher).

Build:  python build.py      (cffi API mode -> _sparse_ffn_c; -O3 -march=native -fopenmp, with
                              fallbacks that it reports)
Run:    python bench.py      (timings);  python -m pytest -q test_kernels.py  (vs model.FeedForward)
*/
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define SFFN_AVX2 1
#else
#define SFFN_AVX2 0
#endif
#ifdef __linux__
#include <sys/mman.h>
#endif

#define SFFN_MAX_B 16       // rows per call; sparse_ffn.py splits larger batches
#define SFFN_MAX_CHUNK 256  // hidden units a thread takes at a time
#ifndef PF_BYTES
#define PF_BYTES 16384  // how far ahead to prefetch W1, at least (work() also keeps it a whole step ahead)
#endif
#ifndef PF2_BYTES
#define PF2_BYTES 4096  // pass 2 prefetches the active row at least this far ahead (d=192: 10% faster than 1 row)
#endif
#ifndef WARM_BYTES
#define WARM_BYTES 65536  // the blocked pass 2 prefetches its first block up to this far (d=192: h=512 has 2 blocks a chunk)
#endif
#ifndef P2_BY_ROW_MIN_B
#define P2_BY_ROW_MIN_B 8  // batches from which pass 2 goes row by row for 16-bit and int8 weights (work())
#endif
#ifndef PF_HINT
#define PF_HINT _MM_HINT_T1  // into L2: 5-20% faster than L1 (T0) on the 2-core Xeon, every dtype and batch
#endif
enum { F32 = 0, F16 = 1, BF16 = 2, I8 = 3 };
#define ES(dt) ((dt) == F32 ? 4 : (dt) == I8 ? 1 : 2)  // bytes per weight
enum { RELU = 0, SILU = 1 };
#define INLINE static inline __attribute__((always_inline))

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
    if (dt == F16) return f16_to_f32(v);
    uint32_t f = (uint32_t)v << 16; float r; memcpy(&r, &f, 4); return r;  // bf16: top half of fp32
}

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
// and a 4 x 4 block issues 17 loads per 16 FMAs instead of 8. Used by the batched dot (B > 4), fp32.
// Measured on a 2-core AMD EPYC (Zen 4): its W1 pass at batch 16 in cache 0.91 -> 0.69 ms (63% -> 85%
// of the FMA peak); d=2048 batch 16 at 50% 6.9 -> 6.1 ms, batch 8 5.4 -> 5.2. Batches of 4 and 16-bit
// weights (whose conversions bind first) gain nothing
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
// W1 rows per step of the W1 pass and of the GEMV: each x vector loaded serves NRW rows. 4 rows x 4
// inputs = 16 accumulators, which AVX-512's 32 registers hold and AVX2's 16 do not. Measured on a
// 2-core AVX-512 Xeon: 4 rows make fp32 batches of 4 15-20% faster; 16-bit and int8 weights, whose
// loads convert, gain nothing or lose, so they keep 2
#ifndef NRW
#define NRW(dt) (VW == 16 && ((dt) == F32 || ((dt) == I8 && SFFN_VNNI)) ? 4 : 2)  // VNNI int8: 4 (below)
#endif

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
// and 4 x loads per 16 FMAs) over 512-element slices; AVX2's 16 hold 2 x 4. Measured on the 2-core
// Xeon, in L2, batch 16: fp32 in 2 x 8 blocks reached 3.5 G FMA/s per core of its 7.3, in 4 x 4 5.3;
// from memory, with the prefetch below, d=2048 batch 16 at 90%: fp32 4.26 -> 3.61 ms, int8 3.01 -> 2.47
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
            // blocks rather than all in the first (fp32 W1 pass at batch 16, d=2048: 3.3 -> 3.0 ms)
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

// ----------------------------------------------------------------------------
// batch 1, int8 weights: x as a 24-bit integer, AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products a step)
//
// Widening int8 weights to fp32 costs two conversions per 16 weights. With VNNI the weights stay
// bytes: x is rounded once per call to q = round(x / sx), 24 bits (sx = max|x| / QMAX), split into
// three signed bytes q = 65536 hi + 256 mid + lo, and w . q is three integer dot products, exact.
// vpdpbusd wants one operand unsigned: w + 128 (a xor), whose extra 128 * sum(part) is subtracted at
// the end. x is then as exact as fp32 holds it (2^-24 of its largest |x|), so results match the fp32
// path to fp32's own rounding. x with nan or inf takes the fp32 path (nan must propagate). Batch 1
// only: 3 integer dots per batch row on the one VNNI port lose to fp32 FMAs on two ports from B = 4
// (B = 2 ties), measured on the 2-core Xeon; at B = 1 it is 5-10% faster.
#if SFFN_AVX2 && VW == 16 && defined(__AVX512VNNI__)
#define SFFN_VNNI 1
#define QMAX 8355711  // 127 * (65536 + 256 + 1): the largest q whose three balanced bytes are <= 127
#define QMAX_D 65536  // d at most, so no int32 sum overflows (|sum| <= 255 * 128 * d)
typedef struct { const int8_t* p; double s; int32_t sum[3]; } QRow;  // p: 3 parts, dq bytes apart
static int dq_of(int d) { return (d + 63) / 64 * 64; }
// 1 / the scale that maps x's largest |x| to QMAX (0 for x = 0), the scale itself in *s; -1 where x has
// nan or inf (the caller then takes the fp32 path)
static double q_inv(const float* x, int d, double* s) {
    const float m = max_abs(x, d);
    *s = m > 0.0f ? m / (double)QMAX : 0.0;
    return m < 0.0f ? -1.0 : m > 0.0f ? QMAX / (double)m : 0.0;
}
// |q| <= QMAX -> q = 65536 p[2] + 256 p[1] + p[0], each part in [-128, 127]
INLINE void split3(int32_t q, int8_t* p) {
    int32_t lo = ((q + 128) & 255) - 128, q1 = (q - lo) >> 8, mid = ((q1 + 128) & 255) - 128;
    p[0] = (int8_t)lo; p[1] = (int8_t)mid; p[2] = (int8_t)((q1 - mid) >> 8);
}

// x (d floats) -> the 3 byte parts of q at p (dq bytes each, zero-padded), sx and the parts' sums.
// Returns NULL where x has nan or inf or d is too large: the caller then takes the fp32 path.
static const QRow* quantize_x(const float* x, int d, QRow* r) {
    const double inv = q_inv(x, d, &r->s);
    if (inv < 0.0 || d > QMAX_D) return NULL;
    int8_t* p = (int8_t*)(r + 1);
    const int dq = dq_of(d);
    int32_t s0 = 0, s1 = 0, s2 = 0;
    for (int i = 0; i < d; i++) {
        int8_t v[3];
        split3((int32_t)lrint(x[i] * inv), v);
        p[i] = v[0]; p[dq + i] = v[1]; p[2 * dq + i] = v[2];
        s0 += v[0]; s1 += v[1]; s2 += v[2];
    }
    for (int k = 0; k < 3; k++) memset(p + k * dq + d, 0, (size_t)(dq - d));
    r->p = p;
    r->sum[0] = s0; r->sum[1] = s1; r->sum[2] = s2;
    return r;
}
static size_t q_floats(int d) { return (sizeof(QRow) + 3 * (size_t)dq_of(d) + 3) / 4; }

// out[r] = w[r] . x for NR int8 rows against x quantized
INLINE void dotq_k(const void* const* w, const QRow* q, int d, const char* pf, float* out, const int NR) {
    const int dq = dq_of(d);
    const __m512i flip = _mm512_set1_epi8((char)0x80);
    __m512i acc[4][3];
    for (int r = 0; r < NR; r++)
        for (int k = 0; k < 3; k++) acc[r][k] = _mm512_setzero_si512();
    for (int i = 0; i < dq; i += 64) {
        prefetch_lines(pf, i, 1, NR);
        const __mmask64 m = d - i >= 64 ? ~(__mmask64)0 : ((__mmask64)1 << (d - i)) - 1;  // a row ends at d
        __m512i wv[4];
        for (int r = 0; r < NR; r++)
            wv[r] = _mm512_xor_si512(_mm512_maskz_loadu_epi8(m, (const int8_t*)w[r] + i), flip);
        for (int k = 0; k < 3; k++) {
            __m512i xv = _mm512_loadu_si512((const void*)(q->p + k * dq + i));
            for (int r = 0; r < NR; r++) acc[r][k] = _mm512_dpbusd_epi32(acc[r][k], wv[r], xv);
        }
    }
    for (int r = 0; r < NR; r++) {
        int64_t v = 0;  // the parts' dots, less the 128 * sum(part) that w + 128 added
        for (int k = 2; k >= 0; k--)
            v = v * 256 + (int64_t)_mm512_reduce_add_epi32(acc[r][k]) - 128 * (int64_t)q->sum[k];
        out[r] = (float)((double)v * q->s);
    }
}
#else
#define SFFN_VNNI 0
typedef struct { int unused; } QRow;  // never filled: q stays NULL
static const QRow* quantize_x(const float* x, int d, QRow* r) { (void)x; (void)d; (void)r; return NULL; }
static size_t q_floats(int d) { (void)d; return 0; }
#endif

// ----------------------------------------------------------------------------
// batches, bf16 and int8 weights: the W1 pass on AMX tiles (Sapphire Rapids and later)
//
// At batch 16 the W1 pass needs 16 FMAs per weight, more than two vCPUs' AVX-512 units deliver at the
// memory's pace. An AMX tile multiply (tdpbf16ps) does 16 units x 16 batch rows x 32 elements in one
// instruction: C[unit][b] += sum_k W1[unit][k] x[b][k]. The W1 tile is loaded straight from the rows
// (16 rows x 64 bytes, row stride apart); x is split once per call into three bf16 parts,
// x = hi + mid + lo (24 bits, as exact as fp32 up to flushed denormals), laid out as AMX wants them
// (pairs of k side by side per batch row), and each W1 tile is multiplied by all three. Products of
// bf16 are exact in fp32 and sums are fp32, as in the AVX-512 path. Only for B >= AMX_MIN_B, d a
// multiple of 32 and finite x; the rest of a chunk (< 16 units) goes through the AVX-512 path.
#if SFFN_AVX2 && VW == 16 && defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#define SFFN_AMX 1
#ifndef AMX_MIN_B
#define AMX_MIN_B 8  // measured on the 2-core Xeon: AMX loses at B = 4, ties at 8, wins from 12
#endif
#ifndef AMX_PF_MAX
// the W1 pass prefetches the next block of rows (16 per tile) as it reads one, where a block is at most
// this many bytes; further ahead the prefetches only crowd the hardware prefetcher's. Measured on the
// 2-core Xeon, bf16 batch 16 at 90% (blocks of 48 rows), prefetching against not: d=1024 (96 KB) 0.58
// against 0.64 ms, d=1536 (144 KB) 1.17 against 1.09, d=2048 2.18 against 1.79, d=4096 5.5 against 3.8;
// int8 d=2048 (16 rows, 32 KB), W1 pass alone: 0.79 against 0.90
#define AMX_PF_MAX (128 << 10)
#endif
typedef struct { uint8_t palette, start_row, rsv[14]; uint16_t colsb[16]; uint8_t rows[16]; } TileCfg;

static int amx_granted(void) {  // Linux gives a process the 8 KB of AMX tile state only on request
    static int state = 0;  // 0: not asked yet, 1: granted, -1: refused (old kernel, or masked by a VM)
    if (!state) state = syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) == 0 ? 1 : -1;
    return state > 0;
}
// bf16: 3 parts x d/32 tiles x 1 KB; int8 half that, + 16 row scales and 64-byte alignment
static size_t amx_floats(int d) { return (size_t)d * 24 + 16; }

// x (B finite rows, d % 32 == 0) -> xt: for each 32-element block kb and part p, one 16 x 64-byte tile
// whose row r holds, for each batch row b, that part of x[b][32 kb + 2r] and x[b][32 kb + 2r + 1].
// Returns 0 (use the AVX-512 path) where x has nan or inf.
// Vectorized, bf16 rounded to nearest even in every lane: at batch 16, d=2048 a scalar loop took ~90 us, with
// the other thread waiting (the W1 pass is ~1.2 ms)
INLINE __m512i bf16_rne_v(__m512 v) {  // 16 lanes of bf16 bits, one in each 32-bit lane
    const __m512i b = _mm512_castps_si512(v);
    const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    return _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7fff))), 16);
}
INLINE __m512 bf16_f32_v(__m512i h) { return _mm512_castsi512_ps(_mm512_slli_epi32(h, 16)); }
// the 16 dwords v (one per tile row) into column b of the 16 x 16-dword tile at t
INLINE void tile_column(uint32_t* t, int b, __m512i v) {
    const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
    _mm512_i32scatter_epi32(t + b, rows, v, 4);
}
static int amx_pack_x(const float* const* xb, int B, int d, uint16_t* xt) {
    for (int b = 0; b < B; b++)
        if (max_abs(xb[b], d) < 0.0f) return 0;
    memset(xt, 0, (size_t)d * 96);  // batch rows past B stay 0
    for (int b = 0; b < B; b++)
        for (int kb = 0; kb < d / 32; kb++) {  // 32 elements: 16 pairs, one per tile row
            __m512i part[2][3];
            for (int h = 0; h < 2; h++) {
                const __m512 v = _mm512_loadu_ps(xb[b] + 32 * kb + 16 * h);
                const __m512i p0 = bf16_rne_v(v);
                const __m512 r = _mm512_sub_ps(v, bf16_f32_v(p0));
                const __m512i p1 = bf16_rne_v(r), p2 = bf16_rne_v(_mm512_sub_ps(r, bf16_f32_v(p1)));
                part[h][0] = p0; part[h][1] = p1; part[h][2] = p2;
            }
            uint32_t* t = (uint32_t*)(xt + (size_t)kb * 3 * 512);
            for (int p = 0; p < 3; p++)  // elements 0-15 and 16-31 as 16-bit, in order: 16 pairs
                tile_column(t + p * 256, b, _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi32_epi16(part[0][p])),
                                                               _mm512_cvtepi32_epi16(part[1][p]), 1));
        }
    return 1;
}

INLINE void amx_config(int B) {  // C tiles 0-2 (16 units x B), x parts 3-5 (16 k pairs x B), W1 tiles 6-7
    TileCfg c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int i = 0; i < 8; i++) { c.rows[i] = 16; c.colsb[i] = (uint16_t)(i < 6 ? 4 * B : 64); }
    _tile_loadconfig(&c);
}

// u[m * B + b] = W1 row m . x[b] for the 16 * NT rows at w (NT <= 3), prefetching the next block's
// rows (pf: as many contiguous bytes, or NULL) at the pace this block is read
INLINE void amx_block(const char* w, size_t rowb, int nkb, const uint16_t* xt, float* u, int B, const char* pf,
                      const int NT) {
    _tile_zero(0);
    if (NT > 1) _tile_zero(1);
    if (NT > 2) _tile_zero(2);
    const size_t lines = 16 * (size_t)NT;  // lines of the next block per 32-element step
    for (int kb = 0; kb < nkb; kb++) {
        if (pf)
            for (size_t l = 0; l < lines; l++) _mm_prefetch(pf + (kb * lines + l) * 64, PF_HINT);
        const uint16_t* t = xt + (size_t)kb * 3 * 512;
        _tile_loadd(3, t, 64);
        _tile_loadd(4, t + 512, 64);
        _tile_loadd(5, t + 1024, 64);
        _tile_loadd(6, w + kb * 64, (long)rowb);
        _tile_dpbf16ps(0, 6, 3); _tile_dpbf16ps(0, 6, 4); _tile_dpbf16ps(0, 6, 5);
        if (NT > 1) {
            _tile_loadd(7, w + 16 * rowb + kb * 64, (long)rowb);
            _tile_dpbf16ps(1, 7, 3); _tile_dpbf16ps(1, 7, 4); _tile_dpbf16ps(1, 7, 5);
        }
        if (NT > 2) {
            _tile_loadd(6, w + 32 * rowb + kb * 64, (long)rowb);
            _tile_dpbf16ps(2, 6, 3); _tile_dpbf16ps(2, 6, 4); _tile_dpbf16ps(2, 6, 5);
        }
    }
    _tile_stored(0, u, B * 4);
    if (NT > 1) _tile_stored(1, u + 16 * B, B * 4);
    if (NT > 2) _tile_stored(2, u + 32 * B, B * 4);
}

// int8 batches: the same on AMX-INT8 (tdpbssd: 16 units x 16 batch rows x 64 elements, int8 x int8 into
// int32). Each row of x is quantized as at batch 1 (24 bits against its own largest |x|, three signed bytes),
// so each W1 tile is multiplied by the three parts' tiles, and the three int32 sums are combined exactly in
// int64 (|sum| <= 128 * 128 * d fits int32 for d <= QMAX_D). One tile of 16 units a block: 3 sums + 3 x
// parts + W1 = 7 of the 8 tiles. Only for d a multiple of 64 (a tile row is 64 weights) and finite x.
#if SFFN_VNNI && defined(__AMX_INT8__)
#define SFFN_AMX_I8 1
#ifndef AMX_MIN_B_I8
#define AMX_MIN_B_I8 5  // measured on the 2-core Xeon, d=2048 at 90%: ties at 4, from 5 1.03 -> 0.78 ms, 16 2.38 -> 0.89
#endif
// x (B finite rows, d % 64 == 0) -> for each 64-element block kb and part p, one 16 x 64-byte tile whose
// row r holds, for each batch row b, that part of x[b][64 kb + 4r .. 64 kb + 4r + 3]; s[b]: the scale of
// row b (x[b] ~ q s[b]). Returns 0 (use the vector path) where x has nan or inf.
// Vectorized, as split3(lrint(x * inv)) lane by lane (x * inv in double, rounded to nearest even)
static int amx_pack_xq(const float* const* xb, int B, int d, int8_t* xt, double* s) {
    memset(xt, 0, (size_t)d * 48);  // batch rows past B stay 0
    const __m512i c128 = _mm512_set1_epi32(128), c255 = _mm512_set1_epi32(255);
    for (int b = 0; b < B; b++) {
        const double inv = q_inv(xb[b], d, &s[b]);
        if (inv < 0.0) return 0;
        const __m512d iv = _mm512_set1_pd(inv);
        for (int kb = 0; kb < d / 64; kb++) {  // 64 elements: 16 groups of 4, one per tile row
            __m128i part[3][4];
            for (int g = 0; g < 4; g++) {
                const float* x = xb[b] + 64 * kb + 16 * g;
                const __m256i qa = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x)), iv));
                const __m256i qb = _mm512_cvtpd_epi32(_mm512_mul_pd(_mm512_cvtps_pd(_mm256_loadu_ps(x + 8)), iv));
                const __m512i q = _mm512_inserti64x4(_mm512_castsi256_si512(qa), qb, 1);
                const __m512i lo = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q, c128), c255), c128);
                const __m512i q1 = _mm512_srai_epi32(_mm512_sub_epi32(q, lo), 8);
                const __m512i mid = _mm512_sub_epi32(_mm512_and_si512(_mm512_add_epi32(q1, c128), c255), c128);
                part[0][g] = _mm512_cvtepi32_epi8(lo);
                part[1][g] = _mm512_cvtepi32_epi8(mid);
                part[2][g] = _mm512_cvtepi32_epi8(_mm512_srai_epi32(_mm512_sub_epi32(q1, mid), 8));
            }
            uint32_t* t = (uint32_t*)(xt + (size_t)kb * 3 * 1024);
            for (int p = 0; p < 3; p++) {
                const __m512i v = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_set_m128i(part[p][1], part[p][0])),
                                                     _mm256_set_m128i(part[p][3], part[p][2]), 1);
                tile_column(t + p * 256, b, v);
            }
        }
    }
    return 1;
}

// u[m * B + b] = W1 row m . x[b] (before W1's row scale) for the 16 int8 rows at w, prefetching the
// next block (pf: 16 rows, contiguous, or NULL) at the pace this block is read
INLINE void amx_block_i8(const char* w, size_t rowb, int nkb, const int8_t* xt, const double* s, float* u,
                         int B, const char* pf) {
    _tile_zero(0); _tile_zero(1); _tile_zero(2);
    for (int kb = 0; kb < nkb; kb++) {
        if (pf)
            for (int l = 0; l < 16; l++) _mm_prefetch(pf + (kb * 16 + l) * 64, PF_HINT);
        const int8_t* t = xt + (size_t)kb * 3 * 1024;
        _tile_loadd(6, w + kb * 64, (long)rowb);
        _tile_loadd(3, t, 64);
        _tile_loadd(4, t + 1024, 64);
        _tile_loadd(5, t + 2048, 64);
        _tile_dpbssd(0, 6, 3); _tile_dpbssd(1, 6, 4); _tile_dpbssd(2, 6, 5);
    }
    int32_t c[3][16 * SFFN_MAX_B];
    _tile_stored(0, c[0], B * 4);
    _tile_stored(1, c[1], B * 4);
    _tile_stored(2, c[2], B * 4);
    for (int m = 0; m < 16; m++)
        for (int b = 0; b < B; b++) {
            const int i = m * B + b;
            u[i] = (float)((double)(((int64_t)c[2][i] * 256 + c[1][i]) * 256 + c[0][i]) * s[b]);
        }
}
#else
#define SFFN_AMX_I8 0
#endif
#else
#define SFFN_AMX 0
#define SFFN_AMX_I8 0
static size_t amx_floats(int d) { (void)d; return 0; }
#endif

// the W rows . x[b]: for int8 at batch 1 with x quantized (q != NULL), VNNI integer dots; else fp32
INLINE void dot_rows(const void* const* w, int nr, const float* const* x, const QRow* q, int nb, int d,
                     int dt, const char* pf, float* out) {
#if SFFN_VNNI
    if (dt == I8 && q && nb == 1) {
#define DOTQ_K(NR) dotq_k(w, q, d, pf, out, NR)
        switch (nr) { case 1: DOTQ_K(1); break; case 2: DOTQ_K(2); break; case 3: DOTQ_K(3); break; case 4: DOTQ_K(4); break; }
#undef DOTQ_K
        return;
    }
#endif
    (void)q;
    dot_batch(w, nr, x, nb, d, dt, pf, out);
}

// ----------------------------------------------------------------------------
// the work of one thread: its chunks of hidden units, into its own partial y

typedef struct {
    const float* x; int B, d, ld, h, chunk; const char* w1; const char* w32;  // x: [B, ld]
    float* part;  // [T, B, ld] partial y per thread
    int gate; float t;
    const float* scales;  // int8 only: per-row scales of W1, W3 and W2^T, h each; else NULL
    const QRow* q;  // int8 at batch 1 with VNNI: x quantized; else NULL
    const void* xt;  // bf16 and int8 batches with AMX: x in tiles (bf16 or int8 parts); else NULL
    const double* xs;  // int8 with AMX: the scale of each row of x
} Args;

// g(u) as model.py computes it: relu keeps nan; silu is clamped at -1e4 (which changes no value) so
// that -inf gives -0 and not -inf / inf = nan
INLINE float gate_value(float u, int gate) {
    if (gate == RELU) return u <= 0.0f ? 0.0f : u;
    u = u < -1e4f ? -1e4f : u;
    return u / (1.0f + expf(-u));
}
INLINE int is_on(float v, float t) { return !(fabsf(v) <= t); }  // nan is active: it must propagate

// prefetch the whole packed rows of units list[k0..k1), at most `most` bytes of them
INLINE void prefetch_units(const Args* a, const int* list, int k0, int k1, size_t rowb, size_t most) {
#if SFFN_AVX2
    for (int k = k0; k < k1 && (k - k0) * 2 * rowb < most; k++)
        for (size_t l = 0; l < 2 * rowb; l += 64) _mm_prefetch(a->w32 + 2 * list[k] * rowb + l, PF_HINT);
#else
    (void)a; (void)list; (void)k0; (void)k1; (void)rowb; (void)most;
#endif
}
// int8: the scale of W3_j (applied to its dot before g(u) multiplies it, so that g holds W3_j . x g(u) as in
// fp32 and overflows only where that does) and of W2^T_j (applied after); else 1
INLINE float w3_scale(const Args* a, int j) { return a->scales ? a->scales[a->h + j] : 1.0f; }
INLINE float w2_scale(const Args* a, int j) { return a->scales ? a->scales[2 * a->h + j] : 1.0f; }

// g(u) for the nr units from j whose W1 x are at ur (B each, overwritten), listing the active ones
INLINE int gate_rows(const Args* a, int j, int nr, float* ur, int* list, int n) {
    for (int r = 0; r < nr; r++, ur += a->B) {
        int on = 0;
        for (int b = 0; b < a->B; b++) {
            ur[b] = gate_value(a->scales ? ur[b] * a->scales[j + r] : ur[b], a->gate);
            on |= is_on(ur[b], a->t);
        }
        if (on) list[n++] = j + r;
    }
    return n;
}

INLINE int work(const Args* a, int t, int T, const int dt) {
    const int B = a->B, d = a->d, h = a->h, chunk = a->chunk, nchunks = (h + chunk - 1) / chunk;
    const int es = ES(dt);
    const size_t rowb = (size_t)d * es;  // bytes of one weight row
    // W1 rows ahead, even, and at least one whole step (NRW rows) past the step being read: fp32 d=2048
    // steps 4 rows of 8 KB, so PF_BYTES alone (2 rows) prefetched half of the current step. Measured on
    // a 2-core AMD EPYC (Zen 4), its W1 pass at batch 16: 3.37 -> 3.12 ms; d=1024 (already 4 rows) the same
    const int pf_rows = (int)((PF_BYTES + rowb - 1) / rowb + 1) & ~1;
    const int PF = pf_rows > 2 * NRW(dt) ? pf_rows : 2 * NRW(dt);
    const int ahead = (int)((PF2_BYTES + 2 * rowb - 1) / (2 * rowb));  // pass 2: active rows ahead, >= PF2_BYTES
    const float* xb[SFFN_MAX_B];
    for (int b = 0; b < B; b++) xb[b] = a->x + (size_t)b * a->ld;
    float* part = a->part + (size_t)t * B * a->ld;
    memset(part, 0, (size_t)B * a->ld * sizeof(float));
#if SFFN_AMX
    if (a->xt) amx_config(B);  // tile state is per thread
#endif
    float u[SFFN_MAX_CHUNK * SFFN_MAX_B];  // W1 x for this chunk's units, unit-major
    int list[SFFN_MAX_CHUNK], total = 0;
    int visit[SFFN_MAX_CHUNK * SFFN_MAX_B];  // pass 2 row by row: batch row << 16 | index in list

    // chunks round-robin over the threads: balanced even where active units cluster, and the same
    // sums in the same order on every call with the same thread count (deterministic)
    for (int c = t; c < nchunks; c += T) {
        const int j0 = c * chunk, j1 = j0 + chunk < h ? j0 + chunk : h;
        const char* next_chunk = c + T < nchunks ? a->w1 + (size_t)(c + T) * chunk * rowb : NULL;
        int n = 0, j = j0;
#if SFFN_AMX
        if (a->xt && dt == I8)  // int8 batches: AMX tiles of 16 units; the rest (< 16) below
            for (; j1 - j >= 16; j += 16) {
                const char* w = a->w1 + j * rowb;
                amx_block_i8(w, rowb, d / 64, (const int8_t*)a->xt, a->xs, u + (j - j0) * B, B,
                             16 * rowb > AMX_PF_MAX ? NULL : j1 - j >= 32 ? w + 16 * rowb : next_chunk);
                n = gate_rows(a, j, 16, u + (j - j0) * B, list, n);
            }
        if (a->xt && dt == BF16)  // bf16 batches: AMX tiles of 16 units, 3 tiles a block; the rest (< 16) below
            while (j1 - j >= 16) {
                const int nt = (j1 - j) / 16 < 3 ? (j1 - j) / 16 : 3;
                const char* w = a->w1 + j * rowb;
                const char* pf = 16 * nt * rowb > AMX_PF_MAX ? NULL  // one block ahead
                               : j1 - j - 16 * nt >= 16 ? w + 16 * nt * rowb : next_chunk;
                const uint16_t* xt = (const uint16_t*)a->xt;
                switch (nt) {
                case 1: amx_block(w, rowb, d / 32, xt, u + (j - j0) * B, B, pf, 1); break;
                case 2: amx_block(w, rowb, d / 32, xt, u + (j - j0) * B, B, pf, 2); break;
                default: amx_block(w, rowb, d / 32, xt, u + (j - j0) * B, B, pf, 3); break;
                }
                n = gate_rows(a, j, 16 * nt, u + (j - j0) * B, list, n);
                j += 16 * nt;
            }
#endif
        // u = W1 x over the chunk, NRW rows at a time;
        // prefetching PF rows ahead, into the thread's next chunk near the end of this one
        for (; j < j1; j += NRW(dt)) {
            const int nr = j1 - j < NRW(dt) ? j1 - j : NRW(dt);
            const void* w[4];
            for (int r = 0; r < 4; r++) w[r] = a->w1 + (j + (r < nr ? r : nr - 1)) * rowb;
            const char* pf = j + PF + NRW(dt) <= j1 ? a->w1 + (j + PF) * rowb
                           : next_chunk && j + PF - j1 + NRW(dt) <= chunk ? next_chunk + (j + PF - j1) * rowb : NULL;
            dot_rows(w, nr, xb, a->q, B, d, dt, pf, u + (j - j0) * B);  // rows j.. are adjacent in u
            n = gate_rows(a, j, nr, u + (j - j0) * B, list, n);
        }
        total += n;
        // 16-bit and int8 batches whose units fire on few rows each (real text: ~2 of 16): row by row, so
        // that x_b and y_b stay in L1 and the unit rows (a quarter to half the bytes) come from L2. Units
        // that fire on many rows (more than 4 on average) keep the unit-by-unit loop below, which converts
        // each weight once for all its rows. Measured on the 2-core Xeon: bf16 batch 16 5-12% faster;
        // fp32 rows do not fit L2
        int acts = 0;  // (unit, batch row) pairs that fire
        for (int k = 0; B > 1 && k < n; k++)
            for (int b = 0; b < B; b++) acts += is_on(u[(list[k] - j0) * B + b], a->t);
        if (B >= P2_BY_ROW_MIN_B && es <= 2 && acts <= 4 * n) {
            // the (row, unit) pairs that fire, row by row, so that the prefetch runs `ahead` pairs ahead
            // across rows too (a unit fires on ~1 row of 16 at 90%: most rows have 1-2 per chunk). As fast
            // as stopping at each row's end on the 2-core Xeon, as were prefetch distances of 4-32 KB
            int nv = 0;
            for (int b = 0; b < B; b++)
                for (int k = 0; k < n; k++)
                    if (is_on(u[(list[k] - j0) * B + b], a->t)) visit[nv++] = b << 16 | k;
            for (int v = 0; v < ahead && v < nv; v++)  // the rows the loop's prefetch does not reach
                prefetch_units(a, list, visit[v] & 0xffff, (visit[v] & 0xffff) + 1, rowb, (size_t)-1);
            for (int v = 0; v < nv; v++) {
                const int b = visit[v] >> 16, j = list[visit[v] & 0xffff];
                const float* xr[1] = {xb[b]};
                float* yr[1] = {part + (size_t)b * a->ld};
                const char* row = a->w32 + 2 * j * rowb;
                const char* next = v + ahead < nv ? a->w32 + 2 * list[visit[v + ahead] & 0xffff] * rowb : NULL;
                const void* w[1] = {row};
                float g;
                dot_rows(w, 1, xr, NULL, 1, d, dt, next, &g);
                g = g * w3_scale(a, j) * u[(j - j0) * B + b] * w2_scale(a, j);
                axpy(row + rowb, &g, yr, 1, d, dt, next ? next + rowb : NULL);
            }
            continue;
        }
        // batches whose units fire on at least half the rows (dense text, a low threshold, 0% sparsity): UB
        // units at a time, their W3 dots for every row, then one blocked axpy, so that each y vector is
        // loaded and stored once per UB units and each weight converted once. g is exactly 0 where a unit
        // does not fire. Measured on the 2-core Xeon at 0% sparsity: d=2048 batch 16 fp32 18.8 -> 12.0 ms, bf16
        // 15.8 -> 8.9 ms, int8 17.0 -> 9.2 ms; bf16 batch 4 5.5 -> 4.3 ms. fp32 batches of 4 gain nothing
        // (d=512: 12% slower), so fp32 takes it from 8 rows
        if (B > 1 && (es <= 2 || B >= 8) && 2 * acts >= n * B) {
            float* ys[SFFN_MAX_B];
            for (int b = 0; b < B; b++) ys[b] = part + (size_t)b * a->ld;
            prefetch_units(a, list, 0, UB < n ? UB : n, rowb, WARM_BYTES);  // no block before the first prefetches it
            for (int k0 = 0; k0 < n; k0 += UB) {
                const int nu = n - k0 < UB ? n - k0 : UB, npf = n - k0 - nu < UB ? n - k0 - nu : UB;
                const void* w3[UB]; const void* w2[UB]; const char* pf[2 * UB];
                for (int r = 0; r < nu; r++) { w3[r] = a->w32 + 2 * list[k0 + r] * rowb; w2[r] = (const char*)w3[r] + rowb; }
                for (int r = 0; r < npf; r++) {  // the next block's rows, prefetched during this block's axpy
                    pf[2 * r] = a->w32 + 2 * list[k0 + nu + r] * rowb;
                    pf[2 * r + 1] = pf[2 * r] + rowb;
                }
                float g[UB * SFFN_MAX_B];
                for (int r0 = 0; r0 < nu; r0 += 4)
                    dot_batch(w3 + r0, nu - r0 < 4 ? nu - r0 : 4, xb, B, d, dt, NULL, g + r0 * B);
                unsigned rows = 0;
                for (int r = 0; r < nu; r++) {
                    const int j = list[k0 + r];
                    const float s3 = w3_scale(a, j), s2 = w2_scale(a, j);
                    for (int b = 0; b < B; b++) {
                        const float uv = u[(j - j0) * B + b];
                        const int on = is_on(uv, a->t);
                        g[r * B + b] = on ? g[r * B + b] * s3 * uv * s2 : 0.0f;  // g(u), or nan, as in torch
                        rows |= (unsigned)on << b;
                    }
                }
                axpy_block(w2, nu, g, ys, B, rows, d, dt, pf, 2 * npf);
            }
            continue;
        }
        // the active units: part += g_t(u) (W3_j . x) W2^T_j, prefetching the active row `ahead`
        prefetch_units(a, list, 1, ahead < n ? ahead : n, rowb, (size_t)-1);  // the rows the loop's prefetch does not reach
        for (int k = 0; k < n; k++) {
            const int j = list[k];
            const char* row = a->w32 + 2 * j * rowb;
            const int kn = k + ahead < n ? k + ahead : n - 1;  // short rows: several ahead, as far as PF2_BYTES
            const char* next = kn > k ? a->w32 + 2 * list[kn] * rowb : NULL;
            const float* uj = u + (j - j0) * B;
            const float* xs[SFFN_MAX_B]; float* ys[SFFN_MAX_B]; float ub[SFFN_MAX_B], g[SFFN_MAX_B];
            int m = 0;  // the batch rows where unit j is active: the others add exactly 0
            for (int b = 0; b < B; b++)
                if (is_on(uj[b], a->t)) { xs[m] = xb[b]; ys[m] = part + (size_t)b * a->ld; ub[m++] = uj[b]; }
            const void* w[1] = {row};
            dot_rows(w, 1, xs, a->q, m, d, dt, next, g);
            const float s3 = w3_scale(a, j), s2 = w2_scale(a, j);
            for (int b = 0; b < m; b++) g[b] = g[b] * s3 * ub[b] * s2;  // g(u), or nan, as in torch
            for (int b0 = 0; b0 < m; b0 += 4) {
                const int nb = m - b0 < 4 ? m - b0 : 4;
                axpy(row + rowb, g + b0, ys + b0, nb, d, dt, b0 || !next ? NULL : next + rowb);
            }
        }
    }
#if SFFN_AMX
    if (a->xt) _tile_release();
#endif
    return total;
}

static int work_f32(const Args* a, int t, int T) { return work(a, t, T, F32); }
static int work_f16(const Args* a, int t, int T) { return work(a, t, T, F16); }
static int work_bf16(const Args* a, int t, int T) { return work(a, t, T, BF16); }
static int work_i8(const Args* a, int t, int T) { return work(a, t, T, I8); }

// ----------------------------------------------------------------------------
// the dense GEMV y[b] = W x[b] (W: [n, d]), for the attention projections and the output layer, so
// that they read 16-bit weights as the FFN does. Thread t takes a contiguous block of rows, two at a
// time, prefetching ahead as the FFN's W1 pass does; each y element is one dot: deterministic.

INLINE void gemv_rows(const float* const* xb, const QRow* q, int B, int d, int n, const char* w,
                      const float* sc, float* y, int t, int T, const int dt) {
    const size_t rowb = (size_t)d * ES(dt);
    // not floored at a whole step as work()'s W1 prefetch is: unmeasured here, so left as it was
    const int PF = (int)((PF_BYTES + rowb - 1) / rowb + 1);
    const int j0 = (int)((long long)n * t / T) & ~1, j1 = t + 1 == T ? n : (int)((long long)n * (t + 1) / T) & ~1;
    float o[4 * SFFN_MAX_B];
    for (int j = j0; j < j1; j += NRW(dt)) {
        const int nr = j1 - j < NRW(dt) ? j1 - j : NRW(dt);
        const void* rows[4];
        for (int r = 0; r < 4; r++) rows[r] = w + (j + (r < nr ? r : nr - 1)) * rowb;
        dot_rows(rows, nr, xb, q, B, d, dt, j + PF < j1 ? w + (j + PF) * rowb : NULL, o);
        for (int r = 0; r < nr; r++)
            for (int b = 0; b < B; b++) y[(size_t)b * n + j + r] = sc ? o[r * B + b] * sc[j + r] : o[r * B + b];
    }
}
#define GEMV(name, DT) static void name(const float* const* x, const QRow* q, int B, int d, int n, \
    const char* w, const float* sc, float* y, int t, int T) { gemv_rows(x, q, B, d, n, w, sc, y, t, T, DT); }
GEMV(gemv_f32, F32) GEMV(gemv_f16, F16) GEMV(gemv_bf16, BF16) GEMV(gemv_i8, I8)

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
    if (B < 1 || B > SFFN_MAX_B || d < 1 || n < 1 || nthreads < 1 || dtype < F32 || dtype > I8
        || (dtype == I8) != (scales != NULL) || n_scratch < sffn_scratch_floats(B, d, 0)) return -1;
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
    if (B < 1 || B > SFFN_MAX_B || d < 1 || h < 1 || nthreads < 1 || dtype < F32 || dtype > I8
        || (dtype == I8) != (scales != NULL) || (gate != RELU && gate != SILU) || !(t >= 0.0f) || isinf(t)
        || n_scratch < sffn_scratch_floats(B, d, nthreads))
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
