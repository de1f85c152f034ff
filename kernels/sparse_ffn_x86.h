/*
sparse_ffn_x86.h: paths for one CPU family (x86 with AVX-512 VNNI, and with AMX), each exact as fp32 x is
and tested like the rest; elsewhere they compile to nothing and the micro-kernels of sparse_ffn_simd.h run.
SFFN_VNNI, SFFN_AMX and SFFN_AMX_I8 say which were built. Included by kernels/sparse_ffn_tuned.c only: its
static functions (quantize_x, amx_granted, ...) are that unit's.
*/
#ifndef SPARSE_FFN_X86_H
#define SPARSE_FFN_X86_H
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <math.h>
#include "sparse_ffn.h"  // INLINE, the dtypes, SFFN_MAX_B
#include "sparse_ffn_simd.h"  // SFFN_AVX2, VW, PF_HINT, max_abs, prefetch_lines

// batch 1, int8 weights: x as a 24-bit integer, AVX-512 VNNI (vpdpbusd: 64 u8 x s8 products a step)
//
// Widening int8 weights to fp32 costs two conversions per 16 weights. With VNNI the weights stay
// bytes: x is rounded once per call to q = round(x / sx), 24 bits (sx = max|x| / QMAX), split into
// three signed bytes q = 65536 hi + 256 mid + lo, and w . q is three integer dot products, exact.
// vpdpbusd wants one operand unsigned: w + 128 (a xor), whose extra 128 * sum(part) is subtracted at
// the end. x is then as exact as fp32 holds it (2^-24 of its largest |x|), so results match the fp32
// path to fp32's own rounding. x with nan or inf takes the fp32 path (nan must propagate). Batch 1
// only: each batch row costs 3 integer dots, all on the one port that runs vpdpbusd, where fp32 FMAs
// have two ports and convert each weight once for all the rows.
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
#define AMX_MIN_B 8  // a tile multiply does 16 batch rows' work (3 times: x in 3 parts) whatever B is
#endif
#ifndef AMX_PF_MAX
// the W1 pass prefetches the next block of rows (16 per tile) as it reads one, where a block is at most
// this many bytes; further ahead the prefetches only crowd the hardware prefetcher's, which follows
// the rows of a large block on its own
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
// Vectorized, bf16 rounded to nearest even in every lane: it runs on one thread before the parallel region,
// the others waiting, on every call
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
#define AMX_MIN_B_I8 5  // fewer rows than bf16's: the vector path it replaces widens every int8 weight to fp32
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
#endif
