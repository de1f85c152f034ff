/*
sparse_ffn_tuned.c: the tuned kernel, sffn_forward, and the dense GEMV, sffn_gemv. Same arguments and results
as the plain kernel sffn_forward_plain in sparse_ffn.c (to fp32 rounding): read that one first. bench.py's
"C tuned" rows against its "C plain" rows show what the tuning, described here, buys on a given machine.

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
stored once per UB units and each weight converted once for all the rows (fp32 weights, which need
no conversion, from 8 rows only).

Files: this one holds the tuning constants, work() (one thread's share of sffn_forward), gemv_rows() (the
GEMV's) and the entry points sffn_forward, sffn_gemv, sffn_scratch_floats, sffn_simd and sffn_amx;
sparse_ffn_simd.h the vectors and micro-kernels (AVX2 / AVX-512, portable loops otherwise);
sparse_ffn_x86.h the AVX-512 VNNI int8 and AMX paths; sparse_ffn.h (the root) the dtypes, ld1, the gate,
the argument checks and the API's prototypes. build.py compiles it beside sparse_ffn.c and decode.c.
*/
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "sparse_ffn.h"  // dtypes, ld1, the gate, bad_args, the API
#include "sparse_ffn_simd.h"  // vectors, the micro-kernels (AVX2 / AVX-512, portable loops otherwise)
#include "sparse_ffn_x86.h"  // one CPU family's paths: AVX-512 VNNI int8 dots, AMX tiles

#define SFFN_MAX_CHUNK 256  // hidden units a thread takes at a time
#ifndef PF_BYTES
#define PF_BYTES 16384  // how far ahead to prefetch W1, at least (work() also keeps it a whole step ahead)
#endif
#ifndef PF2_BYTES
#define PF2_BYTES 4096  // pass 2 prefetches at least this far ahead: several active rows ahead where rows are short
#endif
#ifndef WARM_BYTES
#define WARM_BYTES 65536  // the blocked pass 2 prefetches its first block up to this far (d=192: h=512 has 2 blocks a chunk)
#endif
#ifndef P2_BY_ROW_MIN_B
#define P2_BY_ROW_MIN_B 8  // batches from which pass 2 goes row by row for 16-bit and int8 weights (work())
#endif
// W1 rows per step of the W1 pass and of the GEMV: each x vector loaded serves NRW rows. 4 rows x 4
// inputs = 16 accumulators, which AVX-512's 32 registers hold and AVX2's 16 do not. fp32 and VNNI int8
// (integer dots, no conversion) take 4; 16-bit and int8 weights widened to fp32 keep 2: their
// conversions, not the x loads, bind
#ifndef NRW
#define NRW(dt) (VW == 16 && ((dt) == F32 || ((dt) == I8 && SFFN_VNNI)) ? 4 : 2)
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
    // steps 4 rows of 8 KB, so PF_BYTES alone (2 rows) would prefetch only half of the current step
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
        // each weight once for all its rows; so do fp32 rows, too large to stay in L2 until the next row
        int acts = 0;  // (unit, batch row) pairs that fire
        for (int k = 0; B > 1 && k < n; k++)
            for (int b = 0; b < B; b++) acts += is_on(u[(list[k] - j0) * B + b], a->t);
        if (B >= P2_BY_ROW_MIN_B && es <= 2 && acts <= 4 * n) {
            // the (row, unit) pairs that fire, row by row, so that the prefetch runs `ahead` pairs ahead
            // across rows too (a unit fires on ~1 row of 16 at 90%: most rows have 1-2 per chunk, too few
            // to restart the prefetch at each row)
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
        // does not fire. fp32 takes it from 8 rows only: its weights need no conversion, so at fewer rows
        // the y loads and stores it saves do not pay for its FMAs with g = 0
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
    // PF_BYTES ahead in whole rows, plus one (work()'s W1 pass also floors its distance at a whole step)
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
// the entry points (declared in sparse_ffn.h's API block)

// 3: AVX-512 with VNNI int8 dots, 2: AVX-512, 1: AVX2+FMA+F16C, 0: portable loops
int sffn_simd(void) { return SFFN_AVX2 ? (VW == 16 ? 2 + SFFN_VNNI : 1) : 0; }
int sffn_amx(void) {  // 1 where bf16 (and int8) batches run their W1 pass on AMX tiles (built for it, and the OS allows it)
#if SFFN_AMX
    return amx_granted();
#else
    return 0;
#endif
}

// the threads to use for `work` bytes of weights x batch rows: a thread per 256 KB at most (waking a
// thread for less costs more than it saves), and each row of the batch is another dot per weight, so it
// counts as much work as another pass over the weights: small layers run batches on several threads
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
    // active units), so a few chunks a thread balance them without many start-ups
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
