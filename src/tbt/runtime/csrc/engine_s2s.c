/* The engine's encoder-decoder models (tbt_engine.h, second half): BART, mBART and Marian with
 * packed linears. tbt_s2s_encode runs the whole encoder for a batch of padded sources in one
 * call, then every decoder layer's cross-attention K/V (projected and fake-quantized once per
 * source); tbt_s2s_decode runs one decoder step (self-attention over the KV cache,
 * cross-attention over the stored K/V with the sources' padding mask, the MLP, the head).
 *
 * The float operations follow transformers' modeling (modeling_bart / mbart / marian) and
 * tbt.quant.attention op for op, in float32 and torch's order, as engine.c does for the
 * decoder-only models (whose quantizers, sums and linear calls this file reuses through
 * engine_shared.h). New here: LayerNorm (torch's Welford moments, below), GELU (a
 * vectorisable erf, ~2 ulp), position tables, padding masks, the beams' cache reorder. */
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC optimize("O3")
#endif
#if !defined(_POSIX_C_SOURCE) && !defined(_WIN32)
#define _POSIX_C_SOURCE 200809L
#endif
#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "engine_shared.h"
#include "tbt_engine.h"
#include "tbt_internal.h"


static size_t al64(size_t n) { return (n + 63) & ~(size_t)63; }


/* ---- LayerNorm: torch's CPU kernel (layer_norm_kernel.cpp + moments_utils.h) -------------
 * mean and variance by RowwiseMoments: Welford over 8-float vectors in chunks of 16, the chunk
 * results merged on a binary stack, then the lanes; torch's build contracts a*b + c into FMA
 * there. Then y = ((x - mean) * rstd) * w + b, the last step an FMA. */
#define LN_W 8
#define LN_CHUNK 16
/* fmaf is one instruction where the CPU has FMA (x86-64-v3), a libm call otherwise */
#if TBT_X86 && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define LN_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define LN_CLONES
#endif

static inline void add_moments_vec(int64_t m0, const float *m1, const float *m2, int64_t *s0,
                            float *s1, float *s2) {
  const int64_t n = m0 + *s0;
  const float c = n == 0 ? 0.0f : (float)m0 / (float)n;
  const float f0 = (float)*s0;
  for (int l = 0; l < LN_W; ++l) {
    const float delta = m1[l] - s1[l];
    s1[l] = s1[l] + delta * c;
    s2[l] = fmaf((delta * delta) * c, f0, s2[l] + m2[l]);
  }
  *s0 = n;
}

LN_CLONES static void row_moments(const float *x, int64_t N, float *mean, float *var) {
  const int64_t n = N / LN_W, m = (n + LN_CHUNK - 1) / LN_CHUNK;
  int64_t depth = 0;
  while (((int64_t)1 << depth) < m) ++depth; /* CeilLog2 */
  if (depth < 1) depth = 1;
  int64_t s0[64] = {0};
  float s1[64][LN_W], s2[64][LN_W];
  memset(s1, 0, sizeof s1);
  memset(s2, 0, sizeof s2);
  for (int64_t i = 0; i < m; ++i) {
    const float *xp = x + i * LN_CHUNK * LN_W;
    const int64_t m0 = LN_CHUNK < n - i * LN_CHUNK ? LN_CHUNK : n - i * LN_CHUNK;
    float m1[LN_W] = {0}, m2[LN_W] = {0};
    for (int64_t j = 0; j < m0; ++j) {
      const float c = 1.0f / (float)(j + 1);
      for (int l = 0; l < LN_W; ++l) {
        const float xv = xp[j * LN_W + l];
        const float delta = xv - m1[l];
        m1[l] = fmaf(delta, c, m1[l]);
        m2[l] = fmaf(delta, xv - m1[l], m2[l]);
      }
    }
    add_moments_vec(m0, m1, m2, &s0[0], s1[0], s2[0]);
    int64_t mask = i + 1;
    for (int64_t j = 1; j < depth && (mask & 1) == 0; ++j) {
      add_moments_vec(s0[j - 1], s1[j - 1], s2[j - 1], &s0[j], s1[j], s2[j]);
      s0[j - 1] = 0;
      memset(s1[j - 1], 0, sizeof s1[0]);
      memset(s2[j - 1], 0, sizeof s2[0]);
      mask >>= 1;
    }
  }
  for (int64_t i = 1; i < depth; ++i)
    add_moments_vec(s0[i], s1[i], s2[i], &s0[0], s1[0], s2[0]);
  int64_t c0 = 0;
  float c1 = 0.0f, c2 = 0.0f;
  for (int64_t i = n * LN_W; i < N; ++i) {
    const float xv = x[i];
    const float delta = xv - c1;
    ++c0;
    c1 += delta / (float)c0;
    c2 = c2 + delta * (xv - c1);
  }
  for (int l = 0; l < LN_W; ++l) {
    const int64_t nn = c0 + n;
    const float c = nn == 0 ? 0.0f : (float)n / (float)nn;
    const float delta = s1[0][l] - c1;
    c1 = fmaf(delta, c, c1);
    c2 = c2 + fmaf((delta * delta) * c, (float)c0, s2[0][l]);
    c0 = nn;
  }
  *mean = c1;
  *var = c2 / (float)N;
}

LN_CLONES static void layer_norm(const float *x, const float *w, const float *b, float eps,
                                 int64_t d, float *out) {
  float mean, var;
  row_moments(x, d, &mean, &var);
  const float r = 1.0f / sqrtf((var > 0.0f ? var : 0.0f) + eps);
  for (int64_t k = 0; k < d; ++k) out[k] = fmaf((x[k] - mean) * r, w[k], b[k]);
}

void tbt_layer_norm(const float *x, const float *w, const float *b, float eps, int64_t d,
                    float *out) {
  layer_norm(x, w, b, eps, d, out);
}

/* ---- activations ---------------------------------------------------------------------------- */

/* erf for float, branch-free (vectorisable): |x| < 1: x P(x^2), P fitted to erf(x)/x (relative
 * error 1.4e-9); 1 <= |x| < 4: 1 - exp(-x^2) Q(x), Q fitted to erfc(x) exp(x^2) (7.6e-9);
 * beyond: +-1. Evaluated in float32: within ~2 ulp of the correctly rounded erf, like libm's
 * erff (docs/engine.md: torch's vectorised erf rounds differently from both). */
static inline float erf_v(float x) {
  const float a = fabsf(x), z = a * a;
  float p = 7.882503713e-05f;
  p = p * z + -8.018863006e-04f;
  p = p * z + 5.189313678e-03f;
  p = p * z + -2.685433028e-02f;
  p = p * z + 1.128359752e-01f;
  p = p * z + -3.761262691e-01f;
  p = p * z + 1.128379166e+00f;
  const float small = a * p;
  const float t = (a < 4.0f ? a : 4.0f) * (1.0f / 1.5f) - (2.5f / 1.5f);
  float q = 1.381932174e-05f;
  q = q * t + -3.692937457e-05f;
  q = q * t + 5.494660826e-05f;
  q = q * t + -1.439469704e-04f;
  q = q * t + 4.145087523e-04f;
  q = q * t + -1.017119239e-03f;
  q = q * t + 2.401701390e-03f;
  q = q * t + -5.567332340e-03f;
  q = q * t + 1.248970374e-02f;
  q = q * t + -2.700572538e-02f;
  q = q * t + 5.611047258e-02f;
  q = q * t + -1.115210047e-01f;
  q = q * t + 2.108063643e-01f;
  const float large = 1.0f - exp_f(-z) * q;
  const float r = a < 1.0f ? small : a < 4.0f ? large : 1.0f;
  return x < 0.0f ? -r : r;
}

TBT_CLONES static void gelu(float *x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = x[i];
    x[i] = v * 0.5f * (1.0f + erf_v(v * 0.70710678118654752440f));
  }
}

TBT_CLONES static void silu(float *x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] / (1.0f + exp_f(-x[i]));
}

static void activation(int act, float *x, int64_t n) {
  if (act == TBT_ACT_RELU) {
    for (int64_t i = 0; i < n; ++i) x[i] = x[i] > 0.0f ? x[i] : 0.0f;
  } else if (act == TBT_ACT_SILU) {
    silu(x, n);
  } else {
    gelu(x, n);
  }
}

void tbt_gelu(const float *x, float *y, int64_t n) {
  if (x != y) memcpy(y, x, (size_t)n * sizeof(float));
  activation(TBT_ACT_GELU, y, n);
}

/* ---- attention ------------------------------------------------------------------------------ */

/* One attention over R rows x H heads, T queries each. Row r reads key/value block
 * src = r / rep. q: (R, T, H, D) in rows of q_ld floats per (r, t). Keys transposed: element
 * (i, j) of block (src, h) at kt[src * k_bs + h * k_hs + i * k_ld + j]; values: (j, i) at
 * v[src * v_bs + h * v_hs + j * v_ld + i]. Keys j >= n_keys(t) (causal: pos0 + t + 1) or with
 * mask[src * Tk + j] == 0 get probability 0 (torch: exp(score + finfo.min - max) = 0). */
typedef struct {
  const float *q, *kt, *v;
  int64_t q_ld, k_bs, k_hs, k_ld, v_bs, v_hs, v_ld;
  const int32_t *mask;
  float *probs; /* (R, H, T, Tk) */
  float *out;   /* (R, T, H, D) */
  int64_t R, H, D, T, Tk, rep, pos0;
  int causal;
} att_t;

TBT_CLONES static void att_scores(void *ctx, int64_t u0, int64_t u1) {
  const att_t *J = (const att_t *)ctx;
  const int64_t H = J->H, D = J->D, T = J->T, Tk = J->Tk;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t r = u / H, h = u % H, src = r / J->rep;
    const float *kt = J->kt + src * J->k_bs + h * J->k_hs;
    const int32_t *mk = J->mask ? J->mask + src * Tk : NULL;
    for (int64_t t = 0; t < T; ++t) {
      const float *q = J->q + (r * T + t) * J->q_ld + h * D;
      float *p = J->probs + ((r * H + h) * T + t) * Tk;
      const int64_t n = J->causal ? J->pos0 + t + 1 : Tk;
      for (int64_t j = 0; j < n; ++j) p[j] = 0.0f;
      for (int64_t i = 0; i < D; ++i) {
        const float qi = q[i];
        const float *kr = kt + i * J->k_ld;
        for (int64_t j = 0; j < n; ++j) p[j] += qi * kr[j];
      }
      float mx = -INFINITY;
      for (int64_t j = 0; j < n; ++j)
        if (!mk || mk[j]) mx = p[j] > mx ? p[j] : mx;
      float sum = 0.0f;
      for (int64_t j = 0; j < n; ++j) p[j] = (!mk || mk[j]) ? exp_f(p[j] - mx) : 0.0f;
      for (int64_t j = 0; j < n; ++j) sum += p[j];
      const float inv = 1.0f / sum;
      for (int64_t j = 0; j < n; ++j) p[j] = p[j] * inv;
      for (int64_t j = n; j < Tk; ++j) p[j] = 0.0f;
    }
  }
}

TBT_CLONES static void att_values(void *ctx, int64_t u0, int64_t u1) {
  const att_t *J = (const att_t *)ctx;
  const int64_t H = J->H, D = J->D, T = J->T, Tk = J->Tk;
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t r = u / H, h = u % H, src = r / J->rep;
    const float *vb = J->v + src * J->v_bs + h * J->v_hs;
    for (int64_t t = 0; t < T; ++t) {
      const float *p = J->probs + ((r * H + h) * T + t) * Tk;
      float *o = J->out + ((r * T + t) * H + h) * D;
      for (int64_t i = 0; i < D; ++i) o[i] = 0.0f;
      for (int64_t j = 0; j < Tk; ++j) {
        const float pj = p[j];
        if (pj == 0.0f) continue; /* adds of exact zeros: no change */
        const float *v = vb + j * J->v_ld;
        for (int64_t i = 0; i < D; ++i) o[i] += pj * v[i];
      }
    }
  }
}

static void attend(att_t *J) {
  const int64_t work = J->R * J->H * J->T * J->Tk * J->D;
  if (work >= (1 << 15)) tbt_parallel_for(J->R * J->H, att_scores, J);
  else att_scores(J, 0, J->R * J->H);
}

static void attend_values(att_t *J) {
  const int64_t work = J->R * J->H * J->T * J->Tk * J->D;
  if (work >= (1 << 15)) tbt_parallel_for(J->R * J->H, att_values, J);
  else att_values(J, 0, J->R * J->H);
}

/* ---- embeddings ----------------------------------------------------------------------------- */

static void embed_row(const tbt_s2s_model *m, int32_t tok, float *out) {
  const int64_t d = m->d;
  if (m->emb_kind == TBT_EMB_FLOAT) {
    memcpy(out, m->emb_f + (int64_t)tok * d, (size_t)d * sizeof(float));
  } else {
    const uint8_t *row = m->emb_p + (int64_t)tok * m->emb_stride;
    const float sc = m->emb_scale[tok];
    if (m->emb_kind == TBT_EMB_T2) {
      for (int64_t k = 0; k < d; ++k)
        out[k] = (float)((int)(row[k >> 2] >> (2 * (k & 3)) & 3) - 1) * sc;
    } else {
      for (int64_t k = 0; k < d; ++k)
        out[k] = (float)((row[k >> 3] >> (k & 7) & 1) ? 1 : -1) * sc;
    }
  }
  if (m->emb_mul != 1.0f)
    for (int64_t k = 0; k < d; ++k) out[k] = out[k] * m->emb_mul;
}

/* x = LN_emb(emb(tok) * scale + pos[p]) (the norm where the model has one) */
static void embed(const tbt_s2s_model *m, const int32_t *tok, int64_t M, int64_t T, int64_t pos0,
                  const float *pos, const float *lw, const float *lb, float *x, float *tmp) {
  const int64_t d = m->d;
  for (int64_t r = 0; r < M; ++r) {
    float *o = lw ? tmp : x + r * d;
    embed_row(m, tok[r], o);
    const float *pr = pos + (pos0 + r % T) * d;
    for (int64_t k = 0; k < d; ++k) o[k] = o[k] + pr[k];
    if (lw) layer_norm(tmp, lw, lb, m->eps, d, x + r * d);
  }
}

/* ---- buffers -------------------------------------------------------------------------------- */

typedef struct {
  float *x, *h, *y, *qkv, *qb, *kb, *vb, *kt, *att, *probs, *ffn, *gbuf;
  int32_t *cols;
  void *work;
  int64_t work_bytes;
} s2s_bufs;

static int64_t lin_need(const tbt_elin *L, int64_t M) {
  return L->plan ? tbt_linear_workspace(L->plan, M) : 0;
}

static int64_t max_ffn(const tbt_s2s_model *m) {
  return m->ffn_enc > m->ffn_dec ? m->ffn_enc : m->ffn_dec;
}

static int64_t carve(const tbt_s2s_model *m, int64_t B, int64_t S, int64_t R, uint8_t *base,
                     s2s_bufs *b) {
  const int64_t d = m->d, H = m->n_heads, F = max_ffn(m);
  const int64_t M = (R > B ? R : B) * S; /* the encoder's rows, or the expanded ones */
  const int64_t Tk = S > m->max_t ? S : m->max_t;
  const int64_t Sx = S > m->max_s ? S : m->max_s;
  int64_t probs = B * H * S * S;
  if (R * H * Tk > probs) probs = R * H * Tk;
  const int64_t g = R * m->max_t * d; /* aq_cache's gather of the self-attention cache */
  const int64_t sizes[12] = {M * d, M * d, M * d, 3 * M * d, M * d, M * d, M * d,
                             B * H * Sx * m->head_dim, M * d, probs, M * F, g};
  float **ptrs[12] = {&b->x, &b->h, &b->y, &b->qkv, &b->qb, &b->kb, &b->vb, &b->kt, &b->att,
                      &b->probs, &b->ffn, &b->gbuf};
  size_t off = 0;
  for (int i = 0; i < 12; ++i) {
    if (base) *ptrs[i] = (float *)(base + off);
    off += al64((size_t)sizes[i] * sizeof(float));
  }
  if (base) b->cols = (int32_t *)(base + off);
  off += al64((size_t)(F > d ? F : d) * sizeof(int32_t));
  int64_t w = 0;
  const int64_t Ms[4] = {B * S, R, 1, M};
  for (int side = 0; side < 2; ++side) {
    const tbt_s2s_layer *L = side ? m->dec : m->enc;
    if ((side ? m->dec_layers : m->enc_layers) < 1) continue;
    const tbt_elin *all[10] = {&L->q, &L->k, &L->v, &L->o, &L->cq, &L->ck, &L->cv, &L->co,
                               &L->fc1, &L->fc2};
    for (int i = 0; i < 10; ++i)
      for (int k = 0; k < 4; ++k) {
        const int64_t need = lin_need(all[i], Ms[k]);
        if (need < 0) return -1;
        w = need > w ? need : w;
      }
  }
  if (m->head_kind == TBT_HEAD_PACKED)
    for (int k = 1; k < 3; ++k) {
      const int64_t need = lin_need(&m->head, Ms[k]);
      if (need < 0) return -1;
      w = need > w ? need : w;
    }
  if (base) {
    b->work = base + off;
    b->work_bytes = w;
  }
  off += al64((size_t)w);
  return (int64_t)off + 64;
}

int64_t tbt_s2s_scratch_bytes(const tbt_s2s_model *m, int64_t B, int64_t S, int64_t R) {
  if (!m || B < 1 || S < 1 || R < 1) return TBT_EINVAL;
  return carve(m, B, S, R, NULL, &(s2s_bufs){0});
}

#define CHECK(call)                \
  do {                             \
    const int rc_ = (call);        \
    if (rc_ != TBT_OK) return rc_; \
  } while (0)

static int lin(const tbt_elin *L, const float *x, int64_t M, float *y, s2s_bufs *bf) {
  return tbte_lin_run(L, x, M, y, bf->work, bf->work_bytes, bf->cols);
}

/* rows [0, M) of the q|k|v (or q, k, v) projections of h, split into contiguous q, k, v
 * (M, d) buffers; q not yet scaled */
static int project_qkv(const tbt_elin *q, const tbt_elin *k, const tbt_elin *v, const float *h,
                       int64_t M, int64_t d, s2s_bufs *bf, float *qo, float *ko, float *vo) {
  if (!k->plan) {
    CHECK(lin(q, h, M, bf->qkv, bf));
    for (int64_t r = 0; r < M; ++r) {
      const float *s = bf->qkv + r * 3 * d;
      memcpy(qo + r * d, s, (size_t)d * sizeof(float));
      memcpy(ko + r * d, s + d, (size_t)d * sizeof(float));
      memcpy(vo + r * d, s + 2 * d, (size_t)d * sizeof(float));
    }
    return TBT_OK;
  }
  CHECK(lin(q, h, M, qo, bf));
  CHECK(lin(k, h, M, ko, bf));
  return lin(v, h, M, vo, bf);
}

/* k|v (or k, v) of h into ko, vo */
static int project_kv(const tbt_elin *k, const tbt_elin *v, const float *h, int64_t M, int64_t d,
                      s2s_bufs *bf, float *ko, float *vo) {
  if (!v->plan) {
    CHECK(lin(k, h, M, bf->qkv, bf));
    for (int64_t r = 0; r < M; ++r) {
      memcpy(ko + r * d, bf->qkv + r * 2 * d, (size_t)d * sizeof(float));
      memcpy(vo + r * d, bf->qkv + r * 2 * d + d, (size_t)d * sizeof(float));
    }
    return TBT_OK;
  }
  CHECK(lin(k, h, M, ko, bf));
  return lin(v, h, M, vo, bf);
}

static void add_into(float *x, const float *h, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = x[i] + h[i];
}

static void norm_rows(const tbt_s2s_model *m, const float *x, const float *w, const float *b,
                      int64_t M, float *out) {
  for (int64_t r = 0; r < M; ++r) layer_norm(x + r * m->d, w, b, m->eps, m->d, out + r * m->d);
}

/* the MLP block on x (M rows) with its residual and norm (post- or pre-LN) */
static int mlp_block(const tbt_s2s_model *m, const tbt_s2s_layer *L, int64_t F, int64_t M,
                     s2s_bufs *bf, prof_t *pf) {
  const int64_t d = m->d;
  const float *in = bf->x;
  if (m->pre_ln) {
    norm_rows(m, bf->x, L->ln_ff_w, L->ln_ff_b, M, bf->h);
    in = bf->h;
  }
  prof_mark(pf, TBT_PROF_OTHER);
  CHECK(lin(&L->fc1, in, M, bf->ffn, bf));
  prof_mark(pf, TBT_PROF_LINEAR);
  activation(m->act, bf->ffn, M * F);
  prof_mark(pf, TBT_PROF_OTHER);
  CHECK(lin(&L->fc2, bf->ffn, M, bf->y, bf));
  prof_mark(pf, TBT_PROF_LINEAR);
  add_into(bf->x, bf->y, M * d);
  if (!m->pre_ln) {
    norm_rows(m, bf->x, L->ln_ff_w, L->ln_ff_b, M, bf->h);
    memcpy(bf->x, bf->h, (size_t)(M * d) * sizeof(float));
  }
  prof_mark(pf, TBT_PROF_OTHER);
  return TBT_OK;
}

/* ---- the encoder ---------------------------------------------------------------------------- */

static int enc_layer(const tbt_s2s_model *m, const tbt_s2s_layer *L, const int32_t *mask,
                     int64_t B, int64_t S, s2s_bufs *bf, prof_t *pf) {
  const int64_t d = m->d, H = m->n_heads, D = m->head_dim, M = B * S;
  const float *in = bf->x;
  if (m->pre_ln) {
    norm_rows(m, bf->x, L->ln_sa_w, L->ln_sa_b, M, bf->h);
    in = bf->h;
  }
  prof_mark(pf, TBT_PROF_OTHER);
  CHECK(project_qkv(&L->q, &L->k, &L->v, in, M, d, bf, bf->qb, bf->kb, bf->vb));
  prof_mark(pf, TBT_PROF_LINEAR);
  for (int64_t i = 0; i < M * d; ++i) bf->qb[i] = bf->qb[i] * m->attn_scale;
  /* Q, K, V: each one tensor in torch's memory order (B, S, H, D) */
  tbte_aq_tensor(&L->aq[0], bf->qb, M * d);
  tbte_aq_tensor(&L->aq[1], bf->kb, M * d);
  tbte_aq_tensor(&L->aq[2], bf->vb, M * d);
  for (int64_t b = 0; b < B; ++b) /* keys transposed: (B, H, D, S) */
    for (int64_t s = 0; s < S; ++s)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t i = 0; i < D; ++i)
          bf->kt[((b * H + h) * D + i) * S + s] = bf->kb[(b * S + s) * d + h * D + i];
  att_t J = {bf->qb, bf->kt, bf->vb, d, H * D * S, D * S, S, S * d, D, d, mask, bf->probs,
             bf->att, B, H, D, S, S, 1, 0, 0};
  attend(&J);
  tbte_aq_tensor(&L->aq[3], bf->probs, B * H * S * S);
  attend_values(&J);
  prof_mark(pf, TBT_PROF_ATTENTION);
  CHECK(lin(&L->o, bf->att, M, bf->y, bf));
  prof_mark(pf, TBT_PROF_LINEAR);
  add_into(bf->x, bf->y, M * d);
  if (!m->pre_ln) {
    norm_rows(m, bf->x, L->ln_sa_w, L->ln_sa_b, M, bf->h);
    memcpy(bf->x, bf->h, (size_t)(M * d) * sizeof(float));
  }
  return mlp_block(m, L, m->ffn_enc, M, bf, pf);
}

/* The cross-attention K/V of decoder layer L from the encoder output enc (B x S rows), as
 * torch computes them after generate expanded the encoder output to B * expand rows (beams):
 * the projections of the expanded rows (their activation quantizer's statistics span the
 * copies) and K, V each quantized as one (B * expand, H, S, D) tensor. The copies are equal:
 * the first of each source is stored. */
static int cross_kv(const tbt_s2s_model *m, const tbt_s2s_layer *L, const float *enc, int64_t B,
                    int64_t S, int64_t expand, s2s_bufs *bf) {
  const int64_t d = m->d, H = m->n_heads, D = m->head_dim, ms = m->max_s;
  const int64_t Mx = B * expand * S, blk = H * S * D;
  CHECK(project_kv(&L->ck, &L->cv, enc, Mx, d, bf, bf->kb, bf->vb));
  if (m->calls) m->calls[1] += 1;
  for (int side = 0; side < 2; ++side) {
    const tbt_aq *q = &L->aq[5 + side];
    const float *src = side ? bf->vb : bf->kb;
    float *hd = bf->qkv; /* free here: (B * expand, H, S, D), torch's contiguous cache */
    for (int64_t b = 0; b < B * expand; ++b)
      for (int64_t h = 0; h < H; ++h)
        for (int64_t s = 0; s < S; ++s)
          memcpy(hd + ((b * H + h) * S + s) * D, src + (b * S + s) * d + h * D,
                 (size_t)D * sizeof(float));
    tbte_aq_apply_stats(q, hd, Mx * d, hd, Mx * d, bf->h);
    for (int64_t b = 0; b < B; ++b)
      for (int64_t h = 0; h < H; ++h) {
        const float *qb = bf->h + (b * expand) * blk + h * S * D;
        const int64_t g = b * H + h;
        if (side) {
          memcpy(L->xv + g * ms * D, qb, (size_t)(S * D) * sizeof(float));
        } else {
          float *kt = L->xk + g * D * ms;
          for (int64_t s = 0; s < S; ++s)
            for (int64_t i = 0; i < D; ++i) kt[i * ms + s] = qb[s * D + i];
        }
      }
  }
  return TBT_OK;
}

int tbt_s2s_encode(const tbt_s2s_model *m, const int32_t *tokens, const int32_t *mask,
                   int64_t B, int64_t S, int64_t expand, void *scratch, int64_t scratch_bytes) {
  if (!m || !tokens || !mask || !scratch || B < 1 || S < 1 || expand < 1) return TBT_EINVAL;
  if (B > m->max_src || S > m->max_s || S > m->n_pos || B * expand > m->max_b) return TBT_EINVAL;
  const int64_t need = tbt_s2s_scratch_bytes(m, B, S, B * expand);
  if (need < 0 || scratch_bytes < need) return TBT_EINVAL;
  for (int64_t i = 0; i < B * S; ++i)
    if (tokens[i] < 0 || tokens[i] >= m->vocab) return TBT_EINVAL;
  for (int64_t b = 0; b < B; ++b) { /* every source needs a token (else softmax of nothing) */
    int64_t n = 0;
    for (int64_t s = 0; s < S; ++s) n += mask[b * S + s] != 0;
    if (!n) return TBT_EINVAL;
  }
  s2s_bufs bf;
  uint8_t *base = (uint8_t *)scratch + ((64 - (uintptr_t)scratch % 64) % 64);
  carve(m, B, S, B * expand, base, &bf);
  prof_t pf = {m->prof, {0.0, 0.0}};
  if (pf.acc) now2(pf.t);
  const int64_t d = m->d, M = B * S;
  embed(m, tokens, M, S, 0, m->enc_pos, m->enc_lne_w, m->enc_lne_b, bf.x, bf.h);
  for (int64_t l = 0; l < m->enc_layers; ++l)
    CHECK(enc_layer(m, m->enc + l, mask, B, S, &bf, &pf));
  if (m->enc_lnf_w) {
    norm_rows(m, bf.x, m->enc_lnf_w, m->enc_lnf_b, M, bf.h);
    memcpy(bf.x, bf.h, (size_t)(M * d) * sizeof(float));
  }
  prof_mark(&pf, TBT_PROF_OTHER);
  float *enc = bf.att; /* the encoder output, each source repeated expand times (generate's
                          expansion for beams), apart from the buffers cross_kv uses */
  for (int64_t b = 0; b < B; ++b)
    for (int64_t e = 0; e < expand; ++e)
      memcpy(enc + (b * expand + e) * S * d, bf.x + b * S * d, (size_t)(S * d) * sizeof(float));
  for (int64_t l = 0; l < m->dec_layers; ++l)
    CHECK(cross_kv(m, m->dec + l, enc, B, S, expand, &bf));
  prof_mark(&pf, TBT_PROF_LINEAR);
  if (m->calls) m->calls[0] += 1;
  return TBT_OK;
}

/* ---- the decoder step ----------------------------------------------------------------------- */

static int dec_layer(const tbt_s2s_model *m, const tbt_s2s_layer *L, int64_t R, int64_t pos,
                     int64_t n_src, int64_t S, const int32_t *mask, s2s_bufs *bf, prof_t *pf) {
  const int64_t d = m->d, H = m->n_heads, D = m->head_dim, mt = m->max_t, Tk = pos + 1;
  /* self-attention */
  const float *in = bf->x;
  if (m->pre_ln) {
    norm_rows(m, bf->x, L->ln_sa_w, L->ln_sa_b, R, bf->h);
    in = bf->h;
  }
  prof_mark(pf, TBT_PROF_OTHER);
  CHECK(project_qkv(&L->q, &L->k, &L->v, in, R, d, bf, bf->qb, bf->kb, bf->vb));
  prof_mark(pf, TBT_PROF_LINEAR);
  for (int64_t r = 0; r < R; ++r)
    for (int64_t h = 0; h < H; ++h) {
      const int64_t at = ((r * H + h) * mt + pos) * D;
      memcpy(L->kc + at, bf->kb + r * d + h * D, (size_t)D * sizeof(float));
      memcpy(L->vc + at, bf->vb + r * d + h * D, (size_t)D * sizeof(float));
    }
  for (int64_t i = 0; i < R * d; ++i) bf->qb[i] = bf->qb[i] * m->attn_scale;
  tbte_aq_tensor(&L->aq[0], bf->qb, R * d);
  tbte_aq_cache(&L->aq[1], L->kc, L->kq, R, H, mt, D, pos, Tk, L->st, bf->gbuf, 1);
  tbte_aq_cache(&L->aq[2], L->vc, L->vq, R, H, mt, D, pos, Tk, L->st + 8, bf->gbuf, 0);
  att_t J = {bf->qb, L->kq, L->vq, d, H * D * mt, D * mt, mt, H * mt * D, mt * D, D, NULL,
             bf->probs, bf->att, R, H, D, 1, Tk, 1, pos, 1};
  attend(&J);
  tbte_aq_tensor(&L->aq[3], bf->probs, R * H * Tk);
  attend_values(&J);
  prof_mark(pf, TBT_PROF_ATTENTION);
  CHECK(lin(&L->o, bf->att, R, bf->y, bf));
  prof_mark(pf, TBT_PROF_LINEAR);
  add_into(bf->x, bf->y, R * d);
  if (!m->pre_ln) {
    norm_rows(m, bf->x, L->ln_sa_w, L->ln_sa_b, R, bf->h);
    memcpy(bf->x, bf->h, (size_t)(R * d) * sizeof(float));
  }
  /* cross-attention over the stored K/V */
  in = bf->x;
  if (m->pre_ln) {
    norm_rows(m, bf->x, L->ln_ca_w, L->ln_ca_b, R, bf->h);
    in = bf->h;
  }
  prof_mark(pf, TBT_PROF_OTHER);
  CHECK(lin(&L->cq, in, R, bf->qb, bf));
  prof_mark(pf, TBT_PROF_LINEAR);
  for (int64_t i = 0; i < R * d; ++i) bf->qb[i] = bf->qb[i] * m->attn_scale;
  tbte_aq_tensor(&L->aq[4], bf->qb, R * d);
  const int64_t ms = m->max_s;
  att_t C = {bf->qb, L->xk, L->xv, d, H * D * ms, D * ms, ms, H * ms * D, ms * D, D, mask,
             bf->probs, bf->att, R, H, D, 1, S, R / n_src, 0, 0};
  attend(&C);
  tbte_aq_tensor(&L->aq[7], bf->probs, R * H * S);
  attend_values(&C);
  prof_mark(pf, TBT_PROF_ATTENTION);
  CHECK(lin(&L->co, bf->att, R, bf->y, bf));
  prof_mark(pf, TBT_PROF_LINEAR);
  add_into(bf->x, bf->y, R * d);
  if (!m->pre_ln) {
    norm_rows(m, bf->x, L->ln_ca_w, L->ln_ca_b, R, bf->h);
    memcpy(bf->x, bf->h, (size_t)(R * d) * sizeof(float));
  }
  return mlp_block(m, L, m->ffn_dec, R, bf, pf);
}

typedef struct {
  const tbt_s2s_model *m;
  const float *x;
  float *y;
  int64_t R;
} head_t;

#define HEAD_ROWS 64
static void head_rows(void *ctx, int64_t c0, int64_t c1) {
  const head_t *J = (const head_t *)ctx;
  const int64_t V = J->m->vocab, d = J->m->d;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t v1 = (c + 1) * HEAD_ROWS < V ? (c + 1) * HEAD_ROWS : V;
    for (int64_t v = c * HEAD_ROWS; v < v1; ++v)
      for (int64_t r = 0; r < J->R; ++r)
        J->y[r * V + v] = dot(J->m->head_w + v * d, J->x + r * d, d);
  }
}

int tbt_s2s_decode(const tbt_s2s_model *m, const int32_t *tokens, int64_t R, int64_t pos,
                   int64_t n_src, int64_t S, const int32_t *mask, float *logits, void *scratch,
                   int64_t scratch_bytes) {
  if (!m || !tokens || !mask || !logits || !scratch || R < 1 || pos < 0 || n_src < 1 || S < 1)
    return TBT_EINVAL;
  if (R % n_src || R > m->max_b || pos >= m->max_t || pos >= m->n_pos || S > m->max_s ||
      n_src > m->max_src)
    return TBT_EINVAL;
  const int64_t need = tbt_s2s_scratch_bytes(m, n_src, S, R);
  if (need < 0 || scratch_bytes < need) return TBT_EINVAL;
  for (int64_t i = 0; i < R; ++i)
    if (tokens[i] < 0 || tokens[i] >= m->vocab) return TBT_EINVAL;
  s2s_bufs bf;
  uint8_t *base = (uint8_t *)scratch + ((64 - (uintptr_t)scratch % 64) % 64);
  carve(m, n_src, S, R, base, &bf);
  prof_t pf = {m->prof, {0.0, 0.0}};
  if (pf.acc) now2(pf.t);
  const int64_t V = m->vocab;
  embed(m, tokens, R, 1, pos, m->dec_pos, m->dec_lne_w, m->dec_lne_b, bf.x, bf.h);
  for (int64_t l = 0; l < m->dec_layers; ++l)
    CHECK(dec_layer(m, m->dec + l, R, pos, n_src, S, mask, &bf, &pf));
  const float *last = bf.x;
  if (m->dec_lnf_w) {
    norm_rows(m, bf.x, m->dec_lnf_w, m->dec_lnf_b, R, bf.h);
    last = bf.h;
  }
  prof_mark(&pf, TBT_PROF_OTHER);
  if (m->head_kind == TBT_HEAD_PACKED) {
    CHECK(lin(&m->head, last, R, logits, &bf));
  } else {
    head_t J = {m, last, logits, R};
    tbt_parallel_for((V + HEAD_ROWS - 1) / HEAD_ROWS, head_rows, &J);
  }
  if (m->head_b)
    for (int64_t r = 0; r < R; ++r)
      for (int64_t v = 0; v < V; ++v) logits[r * V + v] = logits[r * V + v] + m->head_b[v];
  prof_mark(&pf, TBT_PROF_HEAD);
  if (m->calls) m->calls[2] += 1;
  return TBT_OK;
}

int tbt_s2s_reorder(const tbt_s2s_model *m, const int32_t *rows, int64_t R, int64_t T,
                    void *scratch, int64_t scratch_bytes) {
  if (!m || !rows || !scratch || R < 1 || R > m->max_b || T < 0 || T > m->max_t)
    return TBT_EINVAL;
  for (int64_t r = 0; r < R; ++r)
    if (rows[r] < 0 || rows[r] >= R) return TBT_EINVAL;
  const int64_t H = m->n_heads, D = m->head_dim, mt = m->max_t, blk = H * mt * D;
  if (scratch_bytes < (int64_t)(R * blk * sizeof(float))) return TBT_EINVAL;
  float *tmp = (float *)scratch;
  for (int64_t l = 0; l < m->dec_layers; ++l) {
    const tbt_s2s_layer *L = m->dec + l;
    float *caches[2] = {L->kc, L->vc};
    for (int c = 0; c < 2; ++c) {
      for (int64_t r = 0; r < R; ++r)
        for (int64_t h = 0; h < H; ++h)
          memcpy(tmp + (r * H + h) * mt * D, caches[c] + ((int64_t)rows[r] * H + h) * mt * D,
                 (size_t)(T * D) * sizeof(float));
      for (int64_t r = 0; r < R; ++r)
        for (int64_t h = 0; h < H; ++h)
          memcpy(caches[c] + (r * H + h) * mt * D, tmp + (r * H + h) * mt * D,
                 (size_t)(T * D) * sizeof(float));
    }
    L->st[0] = -1.0; /* the rows moved: statistics and quantized copies start again */
    L->st[8] = -1.0;
  }
  if (m->calls) m->calls[3] += 1;
  return TBT_OK;
}
