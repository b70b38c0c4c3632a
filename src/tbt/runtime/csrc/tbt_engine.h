/* tbt engine: the whole forward step of a packed decoder-only model (Llama, Qwen2, Mistral,
 * SmolLM2) in C, on the kernels of tbt_kernels.h. One call runs every layer for B sequences
 * of T new tokens each (prefill: T = prompt length; decoding: T = 1) and returns the logits of
 * the last position. tbt/runtime/engine.py fills the structs below (ctypes mirrors) and owns
 * every buffer (weights, KV caches, scratch): the C side allocates nothing.
 *
 * The float operations follow the torch model op for op (transformers' Llama modeling and
 * tbt.quant.attention.tbt_attention_forward), so the only differences from the torch backend
 * are the summation orders of the attention dot products, softmax and the float head, and the
 * exp function; docs/engine.md describes the tolerance. */
#ifndef TBT_ENGINE_H
#define TBT_ENGINE_H

#include <stdint.h>

#include "tbt_kernels.h"

#ifdef __cplusplus
extern "C" {
#endif

#define TBT_ENGINE_ABI 2

/* A fake quantizer on a float tensor (the attention's Q, K, V and probabilities), one set of
 * statistics per tensor: tbt.quant.activation (MinMaxQuantizer, ElasticQuantizer). */
enum { TBT_AQ_NONE = 0, TBT_AQ_MINMAX = 1, TBT_AQ_ELASTIC = 2 };
typedef struct tbt_aq {
  int32_t kind, bits, is_signed;
  int32_t center;    /* elastic, paper, signed: x - mean(x), the mean not added back */
  int32_t shift_min; /* elastic, released, non-negative, bits >= 2: x - min(x), added back */
  int32_t use_sign;  /* elastic signed binary: sign(x) (sign(0) = 0) */
  int32_t qn, qp;    /* elastic code range */
  float clip;        /* minmax clip c */
  float alpha_c;     /* elastic max(alpha, 1e-5) */
} tbt_aq;

/* A packed linear layer: its tbt_linear plan plus what the caller of tbt_linear adds. */
typedef struct tbt_elin {
  const tbt_plan *plan;   /* NULL: absent (fused into the previous linear) */
  const uint8_t *b1_rows; /* signed binary activations: the normative binary_1bit rows, to undo
                             the +1 the a1 format gives an exact 0 (PackedLinearNP) */
  int64_t b1_stride;
  float zero_d;           /* the a1 scale alpha_c */
  int32_t needs_mean;     /* the quantizer subtracts the input tensor's mean (shift "given") */
} tbt_elin;

typedef struct tbt_dec_layer {
  const float *ln1, *ln2; /* input_layernorm, post_attention_layernorm weights */
  tbt_elin q, k, v, o, gate, up, down; /* k.plan NULL: q is q|k|v; up.plan NULL: gate is gate|up */
  tbt_aq aq_q, aq_k, aq_v, aq_p;
  float *kc, *vc;         /* raw K/V caches [max_b][n_kv][max_t][head_dim]; what they hold
                             depends on tbt_kv_mode (NULL allowed for TBT_KV_FIXED) */
  float *kq, *vq;         /* their fake-quantized copies; kq transposed per block (D, max_t);
                             TBT_KV_CENTER: scratch, rewritten each step (may be shared) */
  double *st;             /* 16 doubles of quantizer statistics (K: 0..7, V: 8..15) */
} tbt_dec_layer;

enum { TBT_EMB_FLOAT = 0, TBT_EMB_T2 = 1, TBT_EMB_B1 = 2 };
enum { TBT_HEAD_FLOAT = 0, TBT_HEAD_PACKED = 1 };

typedef struct tbt_dec_model {
  int64_t n_layers, d, n_heads, n_kv, head_dim, inter, vocab, max_t, max_b;
  float eps, attn_scale;
  int32_t emb_kind, head_kind;
  const float *emb_f;      /* TBT_EMB_FLOAT: (vocab, d) */
  const uint8_t *emb_p;    /* packed rows (vocab, emb_stride) */
  const float *emb_scale;  /* (vocab,) */
  int64_t emb_stride;
  const float *norm_w;     /* final norm */
  const float *head_w;     /* TBT_HEAD_FLOAT: (vocab, d) */
  const float *head_b;     /* may be NULL */
  tbt_elin head;           /* TBT_HEAD_PACKED */
  const float *rope_cos, *rope_sin; /* (rope_len, head_dim / 2) */
  int64_t rope_len;
  const tbt_dec_layer *layers;
  double *prof; /* NULL, or TBT_PROF_N x 2 accumulators: wall and thread-CPU seconds per part */
} tbt_dec_model;

/* the parts of a step the profile splits: packed linears (quantizer + kernel), attention
 * (RoPE, cache, quantizers, scores, softmax, P V), norms + residuals + SiLU + embedding, LM head */
enum { TBT_PROF_LINEAR = 0, TBT_PROF_ATTENTION = 1, TBT_PROF_OTHER = 2, TBT_PROF_HEAD = 3,
       TBT_PROF_N = 4 };

/* What a layer's K/V cache keeps between steps, by its quantizer (engine.c, aq_cache):
 *   TBT_KV_FIXED:  parameters without statistics (no quantizer; elastic without mean or min):
 *                  only the quantized cache kq/vq; kc/vc are not used.
 *   TBT_KV_MINMAX: min/max: kc/vc hold the raw rows until the clipped range saturates (then
 *                  the parameters are final and later rows are quantized directly; their raw
 *                  rows are never written), kq/vq the quantized cache.
 *   TBT_KV_CENTER: the paper's centred quantizer (its mean moves every step): kc/vc the raw
 *                  cache; kq/vq only the current step's quantized cache (scratch). */
enum { TBT_KV_FIXED = 0, TBT_KV_MINMAX = 1, TBT_KV_CENTER = 2 };
TBT_API int tbt_kv_mode(const tbt_aq *q);

TBT_API int tbt_engine_abi(void);
/* torch's float32 sum of x[0..n) (one thread; engine.c explains), for tests */
TBT_API float tbt_torch_sum(const float *x, int64_t n);
/* bytes of scratch tbt_dec_forward needs for B sequences of T new tokens */
TBT_API int64_t tbt_dec_scratch_bytes(const tbt_dec_model *m, int64_t B, int64_t T);
/* Run tokens (B x T, positions pos0 .. pos0 + T - 1 of every sequence; the caches hold
 * positions < pos0) and write the logits of the last position, (B x vocab) float32.
 * pos0 = 0 starts new sequences (the quantizer statistics of the caches restart). */
TBT_API int tbt_dec_forward(const tbt_dec_model *m, const int32_t *tokens, int64_t B, int64_t T,
                            int64_t pos0, float *logits, void *scratch, int64_t scratch_bytes);
/* The same for left-padded sequences (transformers' generate with padding_side="left"): row b's
 * cache positions [0, pad[b]) hold pad tokens, masked as keys (as an attention mask of zeros
 * does); position ids count from the first real token (pad tokens: 0); a pad query attends
 * uniformly to every key (torch's all-masked softmax row). The pad rows take part in the
 * per-tensor quantizer statistics, as in torch. pad[b] < pos0 + T; NULL: no padding. */
TBT_API int tbt_dec_forward_padded(const tbt_dec_model *m, const int32_t *tokens, int64_t B,
                                   int64_t T, int64_t pos0, const int64_t *pad, float *logits,
                                   void *scratch, int64_t scratch_bytes);

/* ---- encoder-decoder models (BART, mBART, Marian): engine_s2s.c ------------------------------
 * tbt_s2s_encode runs the whole encoder for B sources (padded to S tokens, mask 1 = token,
 * 0 = padding) and then every decoder layer's cross-attention K/V, raw projections quantized
 * as torch quantizes them (one tensor over the sources, each repeated `expand` times, as
 * generate's beams expand them); they stay in the layers' xk/xv until the next encode.
 * tbt_s2s_decode runs one decoder step for R = n_src * expand rows (row r reads source
 * r / expand) at position pos; tbt_s2s_reorder gathers the self-attention caches' rows
 * (beam search). */

enum { TBT_ACT_GELU = 0, TBT_ACT_RELU = 1, TBT_ACT_SILU = 2 };

typedef struct tbt_s2s_layer {
  const float *ln_sa_w, *ln_sa_b; /* self_attn_layer_norm */
  const float *ln_ca_w, *ln_ca_b; /* encoder_attn_layer_norm (decoder layers) */
  const float *ln_ff_w, *ln_ff_b; /* final_layer_norm */
  tbt_elin q, k, v, o;            /* self-attention; k.plan NULL: q is q|k|v */
  tbt_elin cq, ck, cv, co;        /* cross-attention; cv.plan NULL: ck is k|v */
  tbt_elin fc1, fc2;
  tbt_aq aq[8];                   /* self Q, K, V, P; cross Q, K, V, P */
  float *kc, *vc, *kq, *vq;       /* decoder self-attention caches [max_b][H][max_t][D]
                                     (kq transposed per block: (D, max_t)) */
  double *st;                     /* 16 doubles: K and V cache statistics */
  float *xk, *xv;                 /* quantized cross K (D, max_s) and V (max_s, D) per block
                                     [max_src][H] */
} tbt_s2s_layer;

typedef struct tbt_s2s_model {
  int64_t enc_layers, dec_layers, d, n_heads, head_dim, ffn_enc, ffn_dec, vocab;
  int64_t max_t, max_b, max_s, max_src, n_pos;
  float eps, attn_scale, emb_mul;
  int32_t pre_ln, act, emb_kind, head_kind;
  const float *emb_f;
  const uint8_t *emb_p;
  const float *emb_scale;
  int64_t emb_stride;
  const float *enc_pos, *dec_pos;           /* (n_pos, d): row p is position p (offset applied) */
  const float *enc_lne_w, *enc_lne_b, *dec_lne_w, *dec_lne_b; /* layernorm_embedding or NULL */
  const float *enc_lnf_w, *enc_lnf_b, *dec_lnf_w, *dec_lnf_b; /* final layer_norm or NULL */
  const float *head_w;                      /* TBT_HEAD_FLOAT: (vocab, d) */
  const float *head_b;                      /* final_logits_bias (+ head bias), or NULL */
  tbt_elin head;
  const tbt_s2s_layer *enc, *dec;
  int64_t *calls; /* NULL or 4 counters: encodes, cross K/V projections, decode steps, reorders */
  double *prof;   /* NULL or TBT_PROF_N x 2 (as tbt_dec_model) */
} tbt_s2s_model;

/* scratch for encoding B sources of S tokens and decoding R rows */
TBT_API int64_t tbt_s2s_scratch_bytes(const tbt_s2s_model *m, int64_t B, int64_t S, int64_t R);
TBT_API int tbt_s2s_encode(const tbt_s2s_model *m, const int32_t *tokens, const int32_t *mask,
                           int64_t B, int64_t S, int64_t expand, void *scratch,
                           int64_t scratch_bytes);
TBT_API int tbt_s2s_decode(const tbt_s2s_model *m, const int32_t *tokens, int64_t R,
                           int64_t pos, int64_t n_src, int64_t S, const int32_t *mask,
                           float *logits, void *scratch, int64_t scratch_bytes);
TBT_API int tbt_s2s_reorder(const tbt_s2s_model *m, const int32_t *rows, int64_t R, int64_t T,
                            void *scratch, int64_t scratch_bytes);
/* torch's layer_norm of one row and its erf GELU, for tests */
TBT_API void tbt_layer_norm(const float *x, const float *w, const float *b, float eps,
                            int64_t d, float *out);
TBT_API void tbt_gelu(const float *x, float *y, int64_t n);

#ifdef __cplusplus
}
#endif
#endif /* TBT_ENGINE_H */
