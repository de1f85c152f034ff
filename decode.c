/*
decode.c: the decode step of model.GPT in C, one call per step: the whole forward of the new token(s).

    x = emb[token]
    for each layer:   q, k, v = Wqkv n(x);  q, k = rope(q), rope(k);  cache k, v     n = RMSNorm
                      x += Wo attention(q, the cached k, v)                          grouped-query, causal
                      x += W2 (g_t(W1 n(x)) * (W3 n(x)))                             the sparse FFN
    logits = Wemb n(x)                                                               tied output layer

It computes what model.py's GPT.forward(idx, start_pos=pos) computes, in fp32 (weights fp32, fp16, bf16 or
int8 with per-row scales, as attach() packs them). The matrix-vector products are the tuned kernels of
kernels/sparse_ffn_tuned.c (declared in sparse_ffn.h): sffn_gemv (dense) and sffn_forward (the sparse FFN,
which reads W3 and W2 only for the active units; sffn_forward_plain of sparse_ffn.c with plain_ffn). What
this file adds is the step around them, written plainly: a step is a few hundred small loops around ~25
kernel calls, and in Python each loop was a dispatched op; in C they cost next to nothing.

Rows: a call takes T new tokens of B sequences at positions pos .. pos+T-1 (a prompt is one call; a decode
step has T = 1). Tokens pass through the layers SFFN_MAX_B rows at a time (the kernels' batch), so the
weights are read once per 16 rows; later tokens of a prompt see the earlier ones through the cache.
*/
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <time.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#include "sparse_ffn.h"
#include "decode.h"

struct Dec {
    DecModel m;
    DecLayer* layers;                  // a copy of m.layers (the weights they point to stay Python's)
    int max_batch, max_len, rows;      // rows: the most rows one pass through the layers holds
    int hd, nqkv;                      // head size; q, k and v of one row: (n_head + 2 n_kv_head) hd
    float *k, *v;                      // the KV cache, [n_layer][max_batch][n_kv_head][max_len][hd] each
    float *x, *xn, *qkv, *att, *y;     // activations, [rows][...] each
    float *u, *a, *last;               // dense FFN's [W1 x | W3 x] and g_t(W1 x) * W3 x; the final rows
    float* scratch;                    // the kernels' scratch, then the softmax's (max_len per thread); grown
    size_t n_scratch;                  //   to each call's need
    double seconds[DEC_PARTS];         // time per part, summed over the steps (dec_stats)
    int64_t steps, tokens, active, units;  // calls, rows run, FFN units active / run (sparse FFN)
};

static int live;  // engines allocated and not freed: the tests check that create/free leaves none

static double now(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

// ----------------------------------------------------------------------------
// the small parts, as model.py computes them

// (omp simd: the sums may be reordered, so that the compiler vectorizes them)
static void rmsnorm(float* out, const float* x, const float* w, int d, float eps) {
    float ss = 0.0f;
#pragma omp simd reduction(+ : ss)
    for (int i = 0; i < d; i++) ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)d + eps);
    for (int i = 0; i < d; i++) out[i] = x[i] * r * w[i];
}

// rotate-half RoPE of one head: pair (v[i], v[i + hd/2]) turns by the angle of position p (cos, sin: its row)
static void rope(float* v, const float* cos, const float* sin, int hd) {
    const int h2 = hd / 2;
    for (int i = 0; i < h2; i++) {
        const float a = v[i], b = v[i + h2];
        v[i] = a * cos[i] - b * sin[i];
        v[i + h2] = a * sin[i] + b * cos[i];
    }
}

// y = W x for n_rows rows of x [n_rows, din] -> y [n_rows, n], SFFN_MAX_B rows per kernel call
static int gemv(Dec* e, const float* x, int n_rows, int din, int n, const void* w, const float* s, float* y, int nt) {
    for (int r = 0; r < n_rows; r += SFFN_MAX_B) {
        const int R = n_rows - r < SFFN_MAX_B ? n_rows - r : SFFN_MAX_B;
        if (sffn_gemv(x + (size_t)r * din, R, din, n, w, e->m.dtype, s, y + (size_t)r * n,
                      e->scratch, e->n_scratch, nt) < 0) return -1;
    }
    return 0;
}

// y = W2 (g_t(W1 x) * (W3 x)): the sparse kernel, or (a layer packed dense) three GEMVs in two calls
static int ffn(Dec* e, const DecLayer* L, const float* x, int n_rows, float* y, int nt) {
    const int d = e->m.d, h = e->m.h;
    if (L->w1) {
        for (int r = 0; r < n_rows; r += SFFN_MAX_B) {
            const int R = n_rows - r < SFFN_MAX_B ? n_rows - r : SFFN_MAX_B;
            const int on = (e->m.plain_ffn ? sffn_forward_plain : sffn_forward)(x + (size_t)r * d, R, d, h, L->w1,
                L->w32, e->m.dtype, L->s132, L->gate, L->t, y + (size_t)r * d, e->scratch, e->n_scratch, nt);
            if (on < 0) return -1;
            e->active += on, e->units += h;
        }
        return 0;
    }
    if (gemv(e, x, n_rows, d, 2 * h, L->w13, L->s13, e->u, nt)) return -1;  // [W1 x | W3 x]
    for (int r = 0; r < n_rows; r++) {
        const float* u = e->u + (size_t)r * 2 * h;
        for (int j = 0; j < h; j++) {
            const float g = gate_value(u[j], L->gate);
            e->a[(size_t)r * h + j] = is_on(g, L->t) ? g * u[h + j] : 0.0f;
        }
    }
    return gemv(e, e->a, n_rows, h, d, L->w2, L->s2, y, nt);
}

// Attention for B sequences of n new tokens each (row r = b * n + i, at position p0 + i): RoPE on q and k,
// k and v into the cache, then each query head attends to positions 0 .. p0 + i of its key/value head.
// The (row, head) pairs are split over the threads where there is enough work to wake them
static void attention(Dec* e, int l, int B, int n, int p0, int nt) {
    const DecModel* m = &e->m;
    const int hd = e->hd, nh = m->n_head, nkv = m->n_kv_head, group = nh / nkv, h2 = hd / 2;
    const float scale = 1.0f / sqrtf((float)hd);
    for (int b = 0; b < B; b++)
        for (int i = 0; i < n; i++) {  // every new k, v into the cache first: later rows see earlier ones
            float* q = e->qkv + (size_t)(b * n + i) * e->nqkv;
            const int p = p0 + i;
            for (int hh = 0; hh < nh + nkv; hh++)  // the query heads, then the key heads
                rope(q + (size_t)hh * hd, m->rope_cos + (size_t)p * h2, m->rope_sin + (size_t)p * h2, hd);
            for (int kv = 0; kv < nkv; kv++) {
                const size_t at = ((((size_t)l * e->max_batch + b) * nkv + kv) * e->max_len + p) * hd;
                memcpy(e->k + at, q + (size_t)(nh + kv) * hd, hd * sizeof(float));
                memcpy(e->v + at, q + (size_t)(nh + nkv + kv) * hd, hd * sizeof(float));
            }
        }
    const long long work = (long long)B * n * nh * (p0 + n) * hd;  // multiply-adds, about
#pragma omp parallel for num_threads(nt) schedule(static) if (nt > 1 && work > (1 << 16))
    for (int rh = 0; rh < B * n * nh; rh++) {
        const int r = rh / nh, hq = rh % nh, p = p0 + r % n;
        int tid = 0;
#ifdef _OPENMP
        tid = omp_get_thread_num();
#endif
        float* sc = e->scratch + e->n_scratch - (size_t)(tid + 1) * e->max_len;  // this thread's scores
        const float* q = e->qkv + (size_t)r * e->nqkv + (size_t)hq * hd;
        const size_t at = (((size_t)l * e->max_batch + r / n) * nkv + hq / group) * e->max_len * hd;
        const float *K = e->k + at, *V = e->v + at;
        float* out = e->att + (size_t)r * m->d + (size_t)hq * hd;
        float mx = -INFINITY, sum = 0.0f;
        for (int j = 0; j <= p; j++) {  // scores q . k_j / sqrt(hd), then a stable softmax
            float s = 0.0f;
#pragma omp simd reduction(+ : s)
            for (int c = 0; c < hd; c++) s += q[c] * K[(size_t)j * hd + c];
            sc[j] = s * scale;
            mx = sc[j] > mx ? sc[j] : mx;
        }
        for (int j = 0; j <= p; j++) sum += sc[j] = expf(sc[j] - mx);
        memset(out, 0, hd * sizeof(float));
        for (int j = 0; j <= p; j++) {
            const float w = sc[j] / sum;
            for (int c = 0; c < hd; c++) out[c] += w * V[(size_t)j * hd + c];
        }
    }
}

// ----------------------------------------------------------------------------
// the step

// the scratch for this thread count: the largest any kernel call of a step asks for, then the scores
static int grow_scratch(Dec* e, int nt) {
    const int din = e->m.d > e->m.h ? e->m.d : e->m.h;
    const size_t k1 = sffn_scratch_floats(SFFN_MAX_B, din, nt), k2 = sffn_plain_scratch_floats(SFFN_MAX_B, e->m.d, e->m.h, nt);
    const size_t need = (e->m.plain_ffn && k2 > k1 ? k2 : k1) + (size_t)nt * e->max_len;
    if (e->n_scratch >= need) return 0;
    float* s = (float*)realloc(e->scratch, need * sizeof(float));
    if (!s) return -1;
    e->scratch = s, e->n_scratch = need;
    return 0;
}

// logits [B, vocab] of the last of T new tokens per sequence; tokens [B, T]; the cache holds positions < pos.
// Returns 0, or -1 for arguments it cannot take (decode.py checks them first, with messages)
int dec_step(Dec* e, const int64_t* tokens, int B, int T, int pos, float* logits, int nthreads) {
    if (!e || !tokens || !logits || B < 1 || B > e->max_batch || T < 1 || pos < 0 || pos > e->max_len - T
        || nthreads < 1 || grow_scratch(e, nthreads))
        return -1;
    for (size_t i = 0; i < (size_t)B * T; i++)
        if (tokens[i] < 0 || tokens[i] >= e->m.n_emb) return -1;
    const DecModel* m = &e->m;
    const int d = m->d, n_max = B >= SFFN_MAX_B ? 1 : SFFN_MAX_B / B;  // tokens per sequence per pass
    double t0 = now(), t1;
    int n = 0;
    for (int i0 = 0; i0 < T; i0 += n) {
        n = T - i0 < n_max ? T - i0 : n_max;
        const int R = B * n;
        for (int b = 0; b < B; b++)
            for (int i = 0; i < n; i++)
                memcpy(e->x + (size_t)(b * n + i) * d, m->emb + (size_t)tokens[(size_t)b * T + i0 + i] * d,
                       d * sizeof(float));
        for (int l = 0; l < m->n_layer; l++) {
            const DecLayer* L = &e->layers[l];
            for (int r = 0; r < R; r++) rmsnorm(e->xn + (size_t)r * d, e->x + (size_t)r * d, L->attn_norm, d, m->eps);
            t1 = now(), e->seconds[DEC_REST] += t1 - t0, t0 = t1;
            if (gemv(e, e->xn, R, d, e->nqkv, L->wqkv, L->sqkv, e->qkv, nthreads)) return -1;
            t1 = now(), e->seconds[DEC_PROJ] += t1 - t0, t0 = t1;
            attention(e, l, B, n, pos + i0, nthreads);
            t1 = now(), e->seconds[DEC_ATTN] += t1 - t0, t0 = t1;
            if (gemv(e, e->att, R, d, d, L->wo, L->so, e->y, nthreads)) return -1;
            t1 = now(), e->seconds[DEC_PROJ] += t1 - t0, t0 = t1;
            for (size_t i = 0; i < (size_t)R * d; i++) e->x[i] += e->y[i];
            for (int r = 0; r < R; r++) rmsnorm(e->xn + (size_t)r * d, e->x + (size_t)r * d, L->ffn_norm, d, m->eps);
            t1 = now(), e->seconds[DEC_REST] += t1 - t0, t0 = t1;
            if (ffn(e, L, e->xn, R, e->y, nthreads)) return -1;
            t1 = now(), e->seconds[DEC_FFN] += t1 - t0, t0 = t1;
            for (size_t i = 0; i < (size_t)R * d; i++) e->x[i] += e->y[i];
        }
        e->tokens += R;
    }
    for (int b = 0; b < B; b++)  // the last pass's last token of each sequence: row b * n + n - 1
        rmsnorm(e->last + (size_t)b * d, e->x + (size_t)(b * n + n - 1) * d, m->norm, d, m->eps);
    if (gemv(e, e->last, B, d, m->vocab, m->head, m->shead, logits, nthreads)) return -1;
    t1 = now(), e->seconds[DEC_HEAD] += t1 - t0;
    e->steps++;
    return 0;
}

// ----------------------------------------------------------------------------
// an engine's life

static int bad_layer(const DecModel* m, const DecLayer* L) {
    const int i8 = m->dtype == I8;
    if (!L->attn_norm || !L->ffn_norm || !L->wqkv || !L->wo || (L->sqkv != NULL) != i8 || (L->so != NULL) != i8
        || (L->gate != RELU && L->gate != SILU) || !(L->t >= 0.0f) || isinf(L->t))
        return 1;
    if (L->w1) return !L->w32 || (L->s132 != NULL) != i8;
    return !L->w13 || !L->w2 || (L->s13 != NULL) != i8 || (L->s2 != NULL) != i8;
}

// an engine for up to max_batch sequences of up to max_len positions, or NULL (arguments it cannot take,
// or no memory)
Dec* dec_new(const DecModel* m, int max_batch, int max_len) {
    if (!m || m->n_layer < 1 || m->d < 1 || m->n_head < 1 || m->n_kv_head < 1 || m->h < 1 || m->n_head % m->n_kv_head
        || m->d % m->n_head || (m->d / m->n_head) % 2 || m->vocab < 1 || m->n_emb < 1 || m->dtype < F32
        || m->dtype > I8 || !(m->eps > 0.0f) || !m->emb || !m->norm || !m->head || (m->shead != NULL) != (m->dtype == I8)
        || !m->rope_cos || !m->rope_sin || !m->layers || max_batch < 1 || max_len < 1 || max_len > m->rope_len)
        return NULL;
    for (int l = 0; l < m->n_layer; l++)
        if (bad_layer(m, &m->layers[l])) return NULL;
    Dec* e = (Dec*)calloc(1, sizeof(Dec));
    if (!e) return NULL;
    e->m = *m;
    e->max_batch = max_batch, e->max_len = max_len;
    e->rows = max_batch > SFFN_MAX_B ? max_batch : SFFN_MAX_B;
    e->hd = m->d / m->n_head, e->nqkv = (m->n_head + 2 * m->n_kv_head) * e->hd;
    const size_t cache = (size_t)m->n_layer * max_batch * m->n_kv_head * max_len * e->hd, R = (size_t)e->rows;
    const size_t d = (size_t)m->d, h = (size_t)m->h;
    e->layers = (DecLayer*)malloc((size_t)m->n_layer * sizeof(DecLayer));
    e->k = (float*)calloc(cache, sizeof(float));
    e->v = (float*)calloc(cache, sizeof(float));
    e->x = (float*)malloc((R * (4 * d + e->nqkv + 3 * h) + (size_t)max_batch * d) * sizeof(float));
    if (!e->layers || !e->k || !e->v || !e->x) {
        free(e->layers), free(e->k), free(e->v), free(e->x), free(e);
        return NULL;
    }
    memcpy(e->layers, m->layers, (size_t)m->n_layer * sizeof(DecLayer));
    e->m.layers = e->layers;
    e->xn = e->x + R * d, e->y = e->xn + R * d, e->att = e->y + R * d, e->qkv = e->att + R * d;
    e->u = e->qkv + R * e->nqkv, e->a = e->u + R * 2 * h, e->last = e->a + R * h;
    __atomic_add_fetch(&live, 1, __ATOMIC_RELAXED);
    return e;
}

void dec_free(Dec* e) {
    if (!e) return;
    free(e->layers), free(e->k), free(e->v), free(e->x), free(e->scratch), free(e);
    __atomic_sub_fetch(&live, 1, __ATOMIC_RELAXED);
}

int dec_live(void) { return __atomic_load_n(&live, __ATOMIC_RELAXED); }

// seconds per part (DEC_PARTS) and counts: steps, rows run, sparse FFN units active, units run
void dec_stats(const Dec* e, double* seconds, int64_t* counts) {
    memcpy(seconds, e->seconds, sizeof(e->seconds));
    counts[0] = e->steps, counts[1] = e->tokens, counts[2] = e->active, counts[3] = e->units;
}
