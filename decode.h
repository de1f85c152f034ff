/*
decode.h: the C decode engine's interface (decode.c). decode.py fills DecModel with the packed weights'
pointers (the weights stay Python's); dec_new allocates what one generation needs (the KV cache and the
activations), dec_step runs one step, dec_free frees it. The same declarations are cffi's cdef (build.py).
*/
#ifndef DECODE_H
#define DECODE_H
#include <stddef.h>
#include <stdint.h>

typedef struct {
    const float *attn_norm, *ffn_norm;      // [d] each
    const void *wqkv, *wo;                  // [(n_head + 2 n_kv_head) hd, d] (Wq, Wk, Wv stacked), [d, d]
    const float *sqkv, *so;                 // int8: their per-row scales; else NULL
    const void *w1, *w32;                   // the sparse FFN, packed as SparseFFN packs it: [h, d], [h, 2d]
    const float *s132;                      //   int8: its 3h scales; else NULL
    const void *w13, *w2;                   // or the dense FFN: [W1; W3] [2h, d] and W2 [d, h] (w1 NULL)
    const float *s13, *s2;                  //   int8: their per-row scales; else NULL
    int gate;                               // g: RELU or SILU (sparse_ffn.h)
    float t;                                // the threshold: units with |g(u)| <= t are zero
} DecLayer;

typedef struct {
    int n_layer, d, n_head, n_kv_head, h;   // as model.GPTConfig (h = ffn_hidden)
    int n_emb, vocab;                       // embedding rows (the padded vocabulary), logits per token
    int dtype, rope_len;                    // the matrices' dtype (sparse_ffn.h); rows of the RoPE tables
    int plain_ffn;                          // 1: the sparse FFN by sffn_forward_plain (the plain kernel), 0: sffn_forward
    float eps;                              // RMSNorm's
    const float *emb, *norm;                // [n_emb, d] fp32 (the lookup), the final norm's [d]
    const void* head;                       // the tied output layer, [vocab, d] in dtype
    const float* shead;                     //   int8: its per-row scales; else NULL
    const float *rope_cos, *rope_sin;       // [rope_len, hd / 2], model.py's tables
    const DecLayer* layers;                 // [n_layer]
} DecModel;

enum { DEC_REST, DEC_PROJ, DEC_ATTN, DEC_FFN, DEC_HEAD, DEC_PARTS };  // the parts dec_stats times

typedef struct Dec Dec;
Dec* dec_new(const DecModel* m, int max_batch, int max_len);
void dec_free(Dec* e);
int dec_live(void);
int dec_step(Dec* e, const int64_t* tokens, int B, int T, int pos, float* logits, int nthreads);
void dec_stats(const Dec* e, double* seconds, int64_t* counts);
#endif
