/* The engine's forward step (tbt_engine.h): every layer of a packed Llama-style decoder in
 * one C call. The packed linears run through tbt_linear (activation quantizer + kernel, the
 * same call the per-layer torch backend makes); everything between them is here: the token
 * embedding (dequantized rows of the packed matrix), RMSNorm, RoPE, the KV cache, attention
 * with TBT's four fake quantizers (Q, K, V, probabilities; one set of statistics per tensor,
 * the cache re-quantized as a whole like tbt.quant.attention does), SiLU-gated MLP, the final
 * norm and the LM head (packed, or float).
 *
 * Threads: the GEMMs split their rows over the kernels' persistent pool (tbt_kernels.c);
 * attention and the float head use the same pool through tbt_parallel_for, so the workers
 * spin between the ops of a step instead of sleeping.
 *
 * Rounding: every elementwise step is the float32 operation torch performs, in its order
 * (-ffp-contract=off: no FMA); the tensor means and RMSNorm's mean of squares use torch's own
 * float32 summation order (torch_sum below); the attention dot products, softmax and the float
 * head sum in their own order, where this and torch may differ by float32 rounding. */
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
#if TBT_X86 && defined(__GNUC__)
#include <immintrin.h>
#endif

int tbt_engine_abi(void) { return TBT_ENGINE_ABI; }


static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }
static size_t al64(size_t n) { return (n + 63) & ~(size_t)63; }

static float tensor_mean(const float *x, int64_t n);

/* ---- fake quantizers on float tensors (tbt/quant/csrc/qops.c's forward values) ------------ */

typedef struct {
  float p0, p1; /* minmax signed: s; unsigned: lo, rng. elastic: the offset (mean / min) */
} aq_params;

/* Parameters from statistics: lo/hi (clipped for minmax, raw for elastic), the tensor mean. */
static aq_params aq_from_stats(const tbt_aq *q, float lo, float hi, float mean) {
  aq_params p = {0.0f, 0.0f};
  if (q->kind == TBT_AQ_MINMAX) {
    if (q->is_signed) {
      const float ma = fabsf(lo) > fabsf(hi) ? fabsf(lo) : fabsf(hi);
      const float qp = (float)((1 << (q->bits - 1)) - 1);
      p.p0 = ma > 0.0f ? qp * (1.0f / ma) : 1.0f; /* torch: qp / t = qp * reciprocal(t) */
    } else {
      p.p0 = lo;
      p.p1 = (hi - lo) + 1e-8f;
    }
  } else if (q->kind == TBT_AQ_ELASTIC) {
    if (q->center) p.p0 = mean;
    else if (q->shift_min) p.p0 = lo;
  }
  return p;
}

/* y[i] = Q(x[i]) for i < n with parameters p (in place allowed). */
TBT_CLONES static void aq_apply(const tbt_aq *q, aq_params p, const float *x, float *y,
                                int64_t n) {
  if (q->kind == TBT_AQ_MINMAX) {
    const float c = q->clip;
    if (q->is_signed) {
      const float s = p.p0;
      for (int64_t i = 0; i < n; ++i) y[i] = rint_s(clampf(x[i], -c, c) * s) / s;
    } else {
      const float lo = p.p0, rng = p.p1, lv = (float)((1 << q->bits) - 1);
      for (int64_t i = 0; i < n; ++i)
        y[i] = rint_s(((clampf(x[i], -c, c) - lo) / rng) * lv) / lv * rng + lo;
    }
  } else if (q->kind == TBT_AQ_ELASTIC) {
    const float a = q->alpha_c, off = p.p0, add = q->shift_min ? p.p0 : 0.0f;
    const float qn = (float)q->qn, qp = (float)q->qp;
    if (q->use_sign) {
      for (int64_t i = 0; i < n; ++i) {
        const float xs = x[i] - off;
        y[i] = (float)((xs > 0.0f) - (xs < 0.0f)) * a + add;
      }
    } else {
      for (int64_t i = 0; i < n; ++i) y[i] = rint_s(clampf((x[i] - off) / a, qn, qp)) * a + add;
    }
  } else if (x != y) {
    memcpy(y, x, (size_t)n * sizeof(float));
  }
}

/* statistics of x[0..n): min/max (clipped to [-c, c] for minmax) */
TBT_CLONES static void aq_stats(const tbt_aq *q, const float *x, int64_t n, float *lo,
                                float *hi) {
  const float c = q->kind == TBT_AQ_MINMAX ? q->clip : FLT_MAX;
  float a[16], b[16];
  for (int l = 0; l < 16; ++l) a[l] = *lo, b[l] = *hi;
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) {
      const float v = clampf(x[i + l], -c, c);
      a[l] = v < a[l] ? v : a[l];
      b[l] = v > b[l] ? v : b[l];
    }
  for (; i < n; ++i) {
    const float v = clampf(x[i], -c, c);
    a[0] = v < a[0] ? v : a[0];
    b[0] = v > b[0] ? v : b[0];
  }
  for (int l = 1; l < 16; ++l) {
    a[0] = a[l] < a[0] ? a[l] : a[0];
    b[0] = b[l] > b[0] ? b[l] : b[0];
  }
  *lo = a[0];
  *hi = b[0];
}

/* Fake-quantize a whole contiguous tensor in place (its memory order is torch's). */
static void aq_tensor(const tbt_aq *q, float *x, int64_t n) {
  if (q->kind == TBT_AQ_NONE || n < 1) return;
  float lo = INFINITY, hi = -INFINITY;
  aq_stats(q, x, n, &lo, &hi);
  aq_apply(q, aq_from_stats(q, lo, hi, q->center ? tensor_mean(x, n) : 0.0f), x, x, n);
}

/* Cache rows [r0, r1) of every block through the quantizer into out, read from src: block g's
 * row t at src + (g * src_rows + t - r0 + src_r0) * D (the raw cache: src_rows = max_t,
 * src_r0 = r0; the new rows of a step: src_rows = T, src_r0 = 0). transposed: out holds each
 * block as (D, max_t), so that the scores of a block of keys are one register tile. */
static void aq_rows(const tbt_aq *q, aq_params p, const float *src0, int64_t src_rows,
                    int64_t src_r0, float *out, int64_t blocks, int64_t max_t, int64_t D,
                    int64_t r0, int64_t r1, int transposed) {
  float tmp[512];
  for (int64_t g = 0; g < blocks; ++g) {
    const float *src = src0 + (g * src_rows + src_r0) * D;
    if (!transposed) {
      aq_apply(q, p, src, out + (g * max_t + r0) * D, (r1 - r0) * D);
      continue;
    }
    float *dst = out + g * D * max_t;
    for (int64_t t = r0; t < r1; ++t, src += D) {
      const float *v = src;
      if (D <= 512) {
        aq_apply(q, p, src, tmp, D);
        v = tmp;
      }
      for (int64_t i = 0; i < D; ++i) dst[i * max_t + t] = v[i];
    }
  }
}

/* What a K/V cache keeps between steps (tbt_dec_layer): the quantized cache only, when the
 * quantizer's parameters never change (none; elastic without a mean or min: codes of fixed
 * alpha); the raw cache and a quantized copy for min/max, the raw rows written only until the
 * clipped range saturates (then the parameters are final: the new rows are quantized
 * directly); the raw cache only for the paper's centred quantizer, whose mean moves every step
 * (the whole cache is re-quantized into out, scratch shared by the layers). */
int tbt_kv_mode(const tbt_aq *q) {
  if (q->kind == TBT_AQ_NONE || (q->kind == TBT_AQ_ELASTIC && !q->center && !q->shift_min))
    return TBT_KV_FIXED;
  return q->kind == TBT_AQ_MINMAX ? TBT_KV_MINMAX : TBT_KV_CENTER;
}

/* min/max parameters that no new value can change: the clipped range is full */
static int minmax_saturated(const tbt_aq *q, float lo, float hi) {
  const float c = q->clip;
  return q->is_signed ? (lo <= -c || hi >= c) : (lo <= -c && hi >= c);
}

/* The mean of the raw cache rows [0, n_new) of B * nkv (max_t x D) blocks, summed in torch's
 * memory order (gathered into gbuf): (B, T, n_kv, D) on a sequence's first call, when torch's
 * cache is the transposed projection itself, (B, n_kv, T, D) after it, when torch.cat made it
 * contiguous. */
static float cache_mean(const float *raw, int64_t B, int64_t nkv, int64_t max_t, int64_t D,
                        int64_t n_new, int first_call, float *gbuf) {
  const size_t row = (size_t)D * sizeof(float);
  int64_t n = 0;
  if (first_call) {
    for (int64_t b = 0; b < B; ++b)
      for (int64_t t = 0; t < n_new; ++t)
        for (int64_t g = 0; g < nkv; ++g, n += D)
          memcpy(gbuf + n, raw + ((b * nkv + g) * max_t + t) * D, row);
  } else {
    for (int64_t g = 0; g < B * nkv; ++g, n += n_new * D)
      memcpy(gbuf + n, raw + g * max_t * D, row * (size_t)n_new);
  }
  return tensor_mean(gbuf, n);
}

/* The cache of one layer after a step: the step's new rows fresh (B * n_kv blocks of T x D:
 * cache rows [n_old, n_new)) join rows [0, n_old) of each of the B * n_kv (max_t x D) blocks,
 * quantized as ONE tensor into out (tbt_kv_mode says what raw keeps). st (8 doubles): [0] rows
 * counted in the statistics, [1] lo, [2] hi, [3] min/max saturated, [4] [5] the parameters
 * out holds, [6] rows of out valid with them. n_old == 0 restarts. Min and max grow with the
 * cache (old rows keep their codes while the parameters stay); the mean of the paper's signed
 * quantizers is recomputed over the whole cache in torch's memory order (gathered into gbuf):
 * (B, T, n_kv, D) for the first call, when torch's cache is the transposed projection itself,
 * (B, n_kv, T, D) after it, when torch.cat made it contiguous. */
static int aq_cache(const tbt_aq *q, const float *fresh, float *raw, float *out, int64_t B,
                    int64_t nkv, int64_t max_t, int64_t D, int64_t n_old, int64_t n_new,
                    double *st, float *gbuf, int transposed) {
  const int64_t blocks = B * nkv, T = n_new - n_old;
  const int mode = tbt_kv_mode(q);
  if (mode == TBT_KV_FIXED) { /* parameters without statistics */
    aq_rows(q, aq_from_stats(q, 0.0f, 0.0f, 0.0f), fresh, T, 0, out, blocks, max_t, D, n_old,
            n_new, transposed);
    return TBT_OK;
  }
  const int64_t first = n_old;
  if (n_old == 0) { /* a new sequence: restart the statistics */
    st[1] = INFINITY, st[2] = -INFINITY, st[3] = 0.0, st[6] = 0.0;
  } else if ((int64_t)st[0] != n_old || (int64_t)st[6] != n_old) {
    return TBT_EINVAL; /* the statistics do not describe the cache (a step was skipped) */
  }
  st[0] = (double)n_new;
  if (mode == TBT_KV_MINMAX && st[3] != 0.0) { /* final parameters: only the new rows */
    aq_rows(q, (aq_params){(float)st[4], (float)st[5]}, fresh, T, 0, out, blocks, max_t, D,
            n_old, n_new, transposed);
    st[6] = (double)n_new;
    return TBT_OK;
  }
  for (int64_t g = 0; g < blocks; ++g) /* the raw rows */
    memcpy(raw + (g * max_t + n_old) * D, fresh + g * T * D, (size_t)(T * D) * sizeof(float));
  float lo = (float)st[1], hi = (float)st[2];
  for (int64_t g = 0; g < blocks; ++g) aq_stats(q, fresh + g * T * D, T * D, &lo, &hi);
  st[1] = lo, st[2] = hi;
  const float mean = q->center ? cache_mean(raw, B, nkv, max_t, D, n_new, first == 0, gbuf) : 0.0f;
  const aq_params p = aq_from_stats(q, lo, hi, mean);
  int64_t start = 0;
  if (mode == TBT_KV_MINMAX && n_old > 0 && (float)st[4] == p.p0 && (float)st[5] == p.p1)
    start = n_old; /* same parameters: the old rows keep their values */
  aq_rows(q, p, raw, max_t, start, out, blocks, max_t, D, start, n_new, transposed);
  st[4] = p.p0, st[5] = p.p1, st[6] = (double)n_new;
  if (mode == TBT_KV_MINMAX && minmax_saturated(q, lo, hi)) st[3] = 1.0;
  return TBT_OK;
}

/* ---- packed linears ----------------------------------------------------------------------- */

/* torch's float32 sum of a contiguous array (aten/src/ATen/native/cpu/SumKernel.cpp,
 * cascade_sum on one thread): vectors of W lanes (16 with AVX-512, else 8) summed in rows of 4
 * (ILP) through 4 cascade levels of 16 steps, then the scalar tail and the lanes. Reproducing
 * its rounding matters where a quantizer subtracts the tensor mean (the paper's signed
 * quantizers): after quantized attention the inputs of o_proj take a few discrete values and
 * x - mean == 0 decides a code. Torch with several intra-op threads splits tensors of 32768+
 * elements, and rounds differently. Torch dispatches this kernel at 8 float lanes on AVX2 and
 * AVX-512 CPUs alike (tests/runtime/test_engine.py holds the sums equal to torch's). */
#define TS_ILP 4
#define TS_LEVELS 4
static int torch_lanes(void) { return 8; } /* torch runs its AVX2 sum kernel on AVX-512 too */

static int64_t ceil_log2(int64_t x) {
  if (x <= 2) return 1;
  int64_t r = 0;
  for (uint64_t v = (uint64_t)x - 1; v; v >>= 1) ++r;
  return r;
}

/* multi_row_sum + row_sum over `size` elements of W lanes (W = 1: scalars) */
static void cascade(const float *x, int64_t size, int W, int sq, float out[16]) {
#define LD(i) (sq ? x[i] * x[i] : x[i])
  float acc[TS_LEVELS][TS_ILP][16];
  memset(acc, 0, sizeof acc);
  const int64_t size_ilp = size / TS_ILP;
  int64_t power = ceil_log2(size_ilp) / TS_LEVELS;
  if (power < 4) power = 4;
  const int64_t step = (int64_t)1 << power, mask0 = step - 1;
  int64_t i = 0;
  while (i + step <= size_ilp) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < TS_ILP; ++k)
        for (int l = 0; l < W; ++l) acc[0][k][l] += LD((i * TS_ILP + k) * W + l);
    for (int j = 1; j < TS_LEVELS; ++j) {
      for (int k = 0; k < TS_ILP; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      if ((i & (mask0 << (j * power))) != 0) break;
    }
  }
  for (; i < size_ilp; ++i)
    for (int k = 0; k < TS_ILP; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += LD((i * TS_ILP + k) * W + l);
  for (int j = 1; j < TS_LEVELS; ++j)
    for (int k = 0; k < TS_ILP; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  for (int64_t v = size_ilp * TS_ILP; v < size; ++v) /* row_sum's tail */
    for (int l = 0; l < W; ++l) acc[0][0][l] += LD(v * W + l);
  for (int k = 1; k < TS_ILP; ++k)
    for (int l = 0; l < W; ++l) acc[0][0][l] += acc[0][k][l];
  for (int l = 0; l < W; ++l) out[l] = acc[0][0][l];
#undef LD
}

/* sq: the sum of squares (torch's x.pow(2).sum(-1): the squares are exact float products) */
static float torch_sum(const float *x, int64_t n, int sq) {
  const int W = torch_lanes();
  float part[16];
  if (n < W) { /* scalar_inner_sum */
    cascade(x, n, 1, sq, part);
    return 0.0f + part[0];
  }
  const int64_t nv = n / W;
  cascade(x, nv, W, sq, part);
  float acc = 0.0f;
  for (int64_t k = nv * W; k < n; ++k) acc += sq ? x[k] * x[k] : x[k];
  for (int l = 0; l < W; ++l) acc += part[l];
  return 0.0f + acc;
}

float tbt_torch_sum(const float *x, int64_t n) { return torch_sum(x, n, 0); }

/* torch's x.mean() of a contiguous float32 tensor: sum / numel, in float32 */
static float tensor_mean(const float *x, int64_t n) { return torch_sum(x, n, 0) / (float)n; }

/* Signed binary activations: a1 codes an exact 0 as +1; subtract d * alpha_n * sum of the
 * weight codes of those columns (PackedLinearNP.undo_binary_zeros, same float steps). */
static void undo_zeros(const tbt_elin *L, const float *x, int64_t M, float shift, float *y,
                       int32_t *cols) {
  const tbt_plan *p = L->plan;
  const int64_t K = p->K, N = p->N;
  for (int64_t m = 0; m < M; ++m) {
    const float *xm = x + m * K;
    int64_t nz = 0;
    for (int64_t k = 0; k < K; ++k)
      if ((L->needs_mean ? xm[k] - shift : xm[k]) == 0.0f) cols[nz++] = (int32_t)k;
    if (!nz) continue;
    for (int64_t n = 0; n < N; ++n) {
      const uint8_t *row = L->b1_rows + n * L->b1_stride;
      int32_t c = 0;
      for (int64_t i = 0; i < nz; ++i) c += (row[cols[i] >> 3] >> (cols[i] & 7) & 1) ? 1 : -1;
      y[m * N + n] = y[m * N + n] - ((float)c * L->zero_d) * p->w_scale[n];
    }
  }
}

typedef struct {
  void *work;
  int64_t work_bytes;
  int32_t *cols;
} lin_ws;

static int lin_run(const tbt_elin *L, const float *x, int64_t M, float *y, const lin_ws *ws) {
  const tbt_plan *p = L->plan;
  const float shift = L->needs_mean ? tensor_mean(x, M * p->K) : 0.0f;
  int64_t zeros = 0;
  const int rc = tbt_linear(p, x, M, shift, ws->work, ws->work_bytes, y,
                            L->b1_rows ? &zeros : NULL);
  if (rc != TBT_OK) return rc;
  if (zeros) undo_zeros(L, x, M, shift, y, ws->cols);
  return TBT_OK;
}

/* ---- elementwise pieces ------------------------------------------------------------------- */

/* LlamaRMSNorm: w * (x * rsqrt(mean(x^2) + eps)), rsqrt = 1 / sqrt (torch's vector rsqrt);
 * the mean is torch's (its float32 sum order, then / d) */
static void rmsnorm(const float *x, const float *w, float eps, int64_t d, float *out) {
  const float var = torch_sum(x, d, 1) / (float)d;
  const float r = 1.0f / sqrtf(var + eps);
  for (int64_t k = 0; k < d; ++k) out[k] = w[k] * (x[k] * r);
}

/* apply_rotary_pos_emb: (x * cos) + (rotate_half(x) * sin), cos/sin = cat(f, f) */
static inline void rope(const float *x, const float *c, const float *s, int64_t D, float mul,
                        float *out) {
  const int64_t h = D / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float a = x[i], b = x[i + h];
    out[i] = (a * c[i] + -b * s[i]) * mul;
    out[i + h] = (b * c[i] + a * s[i]) * mul;
  }
}

static void embed_row(const tbt_dec_model *m, int32_t tok, float *out) {
  const int64_t d = m->d;
  if (m->emb_kind == TBT_EMB_FLOAT) {
    memcpy(out, m->emb_f + (int64_t)tok * d, (size_t)d * sizeof(float));
    return;
  }
  const uint8_t *row = m->emb_p + (int64_t)tok * m->emb_stride;
  const float sc = m->emb_scale[tok];
  if (m->emb_kind == TBT_EMB_T2) {
    for (int64_t k = 0; k < d; ++k)
      out[k] = (float)((int)(row[k >> 2] >> (2 * (k & 3)) & 3) - 1) * sc;
  } else {
    for (int64_t k = 0; k < d; ++k) out[k] = (float)((row[k >> 3] >> (k & 7) & 1) ? 1 : -1) * sc;
  }
}

/* SiLU(g) * u: torch's silu is x / (1 + exp(-x)) */
TBT_CLONES static void silu_mul(const float *g, const float *u, float *a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = g[i] / (1.0f + exp_f(-g[i])) * u[i];
}

/* ---- attention ---------------------------------------------------------------------------- */

typedef struct {
  const tbt_dec_model *m;
  const tbt_dec_layer *L;
  const float *qb; /* (B, T, H, D) rotated, scaled, quantized queries (torch's memory order) */
  float *probs;    /* (B, H, T, Tk) */
  float *att;      /* (B, T, H, D) */
  int64_t B, T, Tk, pos0;
  int64_t sets;       /* head sets per KV group (att_units) */
  const int64_t *pad; /* NULL, or (B,) left padding: cache rows [0, pad[b]) are pad tokens */
} att_job;

/* The keys [j0, n) a query row sees: causal (n = its cache row + 1) after the left padding.
 * A pad query sees no key: torch's additive mask makes that row all finfo.min, a uniform
 * softmax over all Tk keys: returns 0 and sets *uniform. */
static int64_t att_keys(const att_job *J, int64_t b, int64_t t, int64_t *j0, int *uniform) {
  const int64_t i = J->pos0 + t, pb = J->pad ? J->pad[b] : 0;
  *uniform = i < pb;
  *j0 = *uniform ? 0 : pb;
  return *uniform ? J->Tk : i + 1;
}

/* Scores of R query rows q[r] (D) against the keys j of a transposed block kt (D x mt):
 * p[r][j] = sum_i q[r][i] kt[i mt + j], each sum in order i = 0 .. D-1 from 0. The R heads of
 * a GQA group share their keys: a block of W keys accumulates R x W sums in registers over the
 * D dimensions, every key column read once for all R rows. R, W: compile-time constants. */
static inline __attribute__((always_inline)) void score_blk(const int R, const int W,
                                                            const float *const *q,
                                                            const float *kt, int64_t mt,
                                                            int64_t D, float *const *p,
                                                            int64_t j, int keep) {
  float acc[4][64];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < W; ++l) acc[r][l] = 0.0f;
  for (int64_t i = 0; i < D; ++i) {
    const float *kr = kt + i * mt + j;
    for (int r = 0; r < R; ++r) {
      const float qi = q[r][i];
      for (int l = 0; l < W; ++l) acc[r][l] += qi * kr[l];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < keep; ++l) p[r][j + l] = acc[r][l];
}

/* keys [0, n): blocks of 64, then 16 (the last one reading past n, up to mt: those lanes are
 * dropped), then one at a time */
#define SCORE_ROWS(R)                                                                       \
  TBT_CLONES static void score_rows##R(const float *const *q, const float *kt, int64_t mt,  \
                                       int64_t D, int64_t n, float *const *p) {             \
    int64_t j = 0;                                                                          \
    for (; j + 64 <= n; j += 64) score_blk(R, 64, q, kt, mt, D, p, j, 64);                  \
    for (; j + 16 <= mt && j < n; j += 16)                                                  \
      score_blk(R, 16, q, kt, mt, D, p, j, n - j < 16 ? (int)(n - j) : 16);                 \
    for (; j < n; ++j) score_blk(R, 1, q, kt, mt, D, p, j, 1);                              \
  }
SCORE_ROWS(1)
SCORE_ROWS(2)
SCORE_ROWS(3)
SCORE_ROWS(4)

#if TBT_X86 && defined(__GNUC__)
/* AVX-512 score_blk / value_blk: the same sums in the same order (a product, then an add: no
 * FMA), the R x V accumulators held in zmm registers (GCC spills the generic arrays) and the
 * tails masked. R heads (<= 4), V vectors of 16 keys or dimensions (<= 4). */
#define T512 __attribute__((target("avx512f,avx512bw,avx512vl"), always_inline)) static inline
static inline __mmask16 lanes_mask(int64_t left) {
  return left >= 16 ? (__mmask16)0xFFFF : left <= 0 ? (__mmask16)0 : (__mmask16)((1u << left) - 1);
}
T512 void score_blk512(const int R, const int V, const float *const *q, const float *kt,
                       int64_t mt, int64_t D, float *const *p, int64_t j, int64_t left) {
  __m512 acc[4][4];
  __mmask16 mk[4];
  for (int v = 0; v < V; ++v) mk[v] = lanes_mask(left - 16 * v);
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) acc[r][v] = _mm512_setzero_ps();
  for (int64_t i = 0; i < D; ++i) {
    const float *kr = kt + i * mt + j;
    __m512 k[4];
    for (int v = 0; v < V; ++v) k[v] = _mm512_maskz_loadu_ps(mk[v], kr + 16 * v);
    for (int r = 0; r < R; ++r) {
      const __m512 qi = _mm512_set1_ps(q[r][i]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_add_ps(acc[r][v], _mm512_mul_ps(qi, k[v]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_mask_storeu_ps(p[r] + j + 16 * v, mk[v], acc[r][v]);
}
T512 void score_rows512_r(const int R, const float *const *q, const float *kt, int64_t mt,
                          int64_t D, int64_t n, float *const *p) {
  int64_t j = 0;
  for (; j + 64 <= n; j += 64) score_blk512(R, 4, q, kt, mt, D, p, j, 64);
  switch ((n - j + 15) / 16) {
    case 1: score_blk512(R, 1, q, kt, mt, D, p, j, n - j); break;
    case 2: score_blk512(R, 2, q, kt, mt, D, p, j, n - j); break;
    case 3: score_blk512(R, 3, q, kt, mt, D, p, j, n - j); break;
    default: break;
  }
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void score_rows512(
    int R, const float *const *q, const float *kt, int64_t mt, int64_t D, int64_t n,
    float *const *p) {
  for (; R > 0; R -= 4, q += 4, p += 4) switch (R < 4 ? R : 4) {
      case 1: score_rows512_r(1, q, kt, mt, D, n, p); break;
      case 2: score_rows512_r(2, q, kt, mt, D, n, p); break;
      case 3: score_rows512_r(3, q, kt, mt, D, n, p); break;
      default: score_rows512_r(4, q, kt, mt, D, n, p); break;
    }
}
T512 void value_blk512(const int R, const int V, const float *const *p, const float *v,
                       int64_t D, int64_t n, int64_t Tk, float *const *o, int64_t i0) {
  __m512 acc[4][4];
  __mmask16 mk[4];
  for (int c = 0; c < V; ++c) mk[c] = lanes_mask(D - i0 - 16 * c);
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < Tk; ++j) {
    if (j >= n) {
      int any = 0;
      for (int r = 0; r < R; ++r) any |= p[r][j] != 0.0f;
      if (!any) continue;
    }
    const float *vr = v + j * D + i0;
    __m512 x[4];
    for (int c = 0; c < V; ++c) x[c] = _mm512_maskz_loadu_ps(mk[c], vr + 16 * c);
    for (int r = 0; r < R; ++r) {
      const __m512 pj = _mm512_set1_ps(p[r][j]);
      for (int c = 0; c < V; ++c) acc[r][c] = _mm512_add_ps(acc[r][c], _mm512_mul_ps(pj, x[c]));
    }
  }
  for (int r = 0; r < R; ++r)
    for (int c = 0; c < V; ++c) _mm512_mask_storeu_ps(o[r] + i0 + 16 * c, mk[c], acc[r][c]);
}
T512 void value_rows512_r(const int R, const float *const *p, const float *v, int64_t D,
                          int64_t n, int64_t Tk, float *const *o) {
  int64_t i0 = 0;
  for (; i0 + 64 <= D; i0 += 64) value_blk512(R, 4, p, v, D, n, Tk, o, i0);
  switch ((D - i0 + 15) / 16) {
    case 1: value_blk512(R, 1, p, v, D, n, Tk, o, i0); break;
    case 2: value_blk512(R, 2, p, v, D, n, Tk, o, i0); break;
    case 3: value_blk512(R, 3, p, v, D, n, Tk, o, i0); break;
    default: break;
  }
}
__attribute__((target("avx512f,avx512bw,avx512vl"))) static void value_rows512(
    int R, const float *const *p, const float *v, int64_t D, int64_t n, int64_t Tk,
    float *const *o) {
  for (; R > 0; R -= 4, p += 4, o += 4) switch (R < 4 ? R : 4) {
      case 1: value_rows512_r(1, p, v, D, n, Tk, o); break;
      case 2: value_rows512_r(2, p, v, D, n, Tk, o); break;
      case 3: value_rows512_r(3, p, v, D, n, Tk, o); break;
      default: value_rows512_r(4, p, v, D, n, Tk, o); break;
    }
}
static int use512(void) {
  static int f = -1;
  if (f < 0) f = tbt_isa_available(TBT_ISA_AVX512);
  return f;
}
#else
static int use512(void) { return 0; }
#define score_rows512(...) ((void)0)
#define value_rows512(...) ((void)0)
#endif

static void score_rows(int R, const float *const *q, const float *kt, int64_t mt, int64_t D,
                       int64_t n, float *const *p) {
  if (use512()) {
    score_rows512(R, q, kt, mt, D, n, p);
    return;
  }
  for (; R > 0; R -= 4, q += 4, p += 4) switch (R < 4 ? R : 4) {
      case 1: score_rows1(q, kt, mt, D, n, p); break;
      case 2: score_rows2(q, kt, mt, D, n, p); break;
      case 3: score_rows3(q, kt, mt, D, n, p); break;
      default: score_rows4(q, kt, mt, D, n, p); break;
    }
}

/* o[r][i] = sum_j p[r][j] v[j D + i] for i < D, each sum in order j = 0, 1, ... from 0 over
 * the keys j < n and those beyond with p[r][j] != 0 (a quantized probability of a masked key
 * may be > 0; adding an exact 0 changes no sum): R heads share the value rows, blocks of W
 * dimensions accumulate in registers over the keys. */
static inline __attribute__((always_inline)) void value_blk(const int R, const int W,
                                                            const float *const *p,
                                                            const float *v, int64_t D,
                                                            int64_t n, int64_t Tk, float *const *o,
                                                            int64_t i0, int keep) {
  float acc[4][64];
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < W; ++l) acc[r][l] = 0.0f;
  for (int64_t j = 0; j < Tk; ++j) {
    const float *vr = v + j * D + i0;
    if (j >= n) {
      int any = 0;
      for (int r = 0; r < R; ++r) any |= p[r][j] != 0.0f;
      if (!any) continue;
    }
    for (int r = 0; r < R; ++r) {
      const float pj = p[r][j];
      for (int l = 0; l < W; ++l) acc[r][l] += pj * vr[l];
    }
  }
  for (int r = 0; r < R; ++r)
    for (int l = 0; l < keep; ++l) o[r][i0 + l] = acc[r][l];
}

#define VALUE_ROWS(R)                                                                       \
  TBT_CLONES static void value_rows##R(const float *const *p, const float *v, int64_t D,    \
                                       int64_t n, int64_t Tk, float *const *o) {            \
    int64_t i0 = 0;                                                                         \
    for (; i0 + 64 <= D; i0 += 64) value_blk(R, 64, p, v, D, n, Tk, o, i0, 64);             \
    for (; i0 + 16 <= D; i0 += 16) value_blk(R, 16, p, v, D, n, Tk, o, i0, 16);             \
    for (; i0 < D; ++i0) value_blk(R, 1, p, v, D, n, Tk, o, i0, 1);                         \
  }
VALUE_ROWS(1)
VALUE_ROWS(2)
VALUE_ROWS(3)
VALUE_ROWS(4)

static void value_rows(int R, const float *const *p, const float *v, int64_t D, int64_t n,
                       int64_t Tk, float *const *o) {
  if (use512()) {
    value_rows512(R, p, v, D, n, Tk, o);
    return;
  }
  for (; R > 0; R -= 4, p += 4, o += 4) switch (R < 4 ? R : 4) {
      case 1: value_rows1(p, v, D, n, Tk, o); break;
      case 2: value_rows2(p, v, D, n, Tk, o); break;
      case 3: value_rows3(p, v, D, n, Tk, o); break;
      default: value_rows4(p, v, D, n, Tk, o); break;
    }
}

/* softmax of p[0..n) in place: max and sum over 16 lanes (then the lanes), exp_f */
TBT_CLONES static void softmax_row(float *p, int64_t n) {
  float mx[16], sm[16];
  for (int l = 0; l < 16; ++l) mx[l] = -INFINITY, sm[l] = 0.0f;
  int64_t j = 0;
  for (; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) mx[l] = p[j + l] > mx[l] ? p[j + l] : mx[l];
  for (; j < n; ++j) mx[0] = p[j] > mx[0] ? p[j] : mx[0];
  float m = mx[0];
  for (int l = 1; l < 16; ++l) m = mx[l] > m ? mx[l] : m;
  for (j = 0; j < n; ++j) p[j] = exp_f(p[j] - m);
  for (j = 0; j + 16 <= n; j += 16)
    for (int l = 0; l < 16; ++l) sm[l] += p[j + l];
  for (; j < n; ++j) sm[0] += p[j];
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) sm[l] += sm[l + w];
  const float inv = 1.0f / sm[0];
  for (j = 0; j < n; ++j) p[j] = p[j] * inv;
}

#define ATT_PAR_MACS ((int64_t)1 << 17)

/* The attention work splits into units of (sequence b, KV group g, query t, head set):
 * `sets` head sets per group (1: the rep heads of the group together, sharing each key and
 * value row; rep: one head each, more units for the threads when B n_kv T is small). */
static int64_t att_units(const att_job *J) { return J->B * J->m->n_kv * J->T * J->sets; }

static void att_unit(const att_job *J, int64_t u, int64_t *b, int64_t *g, int64_t *t,
                     int64_t *h0, int *R) {
  const int64_t rep = J->m->n_heads / J->m->n_kv, per = rep / J->sets;
  const int64_t s = u % J->sets;
  u /= J->sets;
  *t = u % J->T;
  u /= J->T;
  *g = u % J->m->n_kv;
  *b = u / J->m->n_kv;
  *h0 = *g * rep + s * per;
  *R = (int)per;
}

/* scores and softmax of units [u0, u1); the quantized keys are (D, max_t) per block */
static void att_scores(void *ctx, int64_t u0, int64_t u1) {
  const att_job *J = (const att_job *)ctx;
  const tbt_dec_model *m = J->m;
  const int64_t H = m->n_heads, D = m->head_dim, T = J->T, Tk = J->Tk, mt = m->max_t;
  const float *q[64];
  float *p[64];
  for (int64_t u = u0; u < u1; ++u) {
    int64_t b, g, t, h0;
    int R;
    att_unit(J, u, &b, &g, &t, &h0, &R);
    const float *kt = J->L->kq + (b * m->n_kv + g) * D * mt;
    int64_t j0;
    int uniform;
    const int64_t n = att_keys(J, b, t, &j0, &uniform); /* keys j0 .. n-1 */
    for (int r = 0; r < R; ++r) {
      q[r] = J->qb + ((b * T + t) * H + h0 + r) * D;
      p[r] = J->probs + ((b * H + h0 + r) * T + t) * Tk;
    }
    if (uniform) { /* exp(0) / Tk for every key */
      const float u = 1.0f / (float)Tk;
      for (int r = 0; r < R; ++r)
        for (int64_t j = 0; j < Tk; ++j) p[r][j] = u;
      continue;
    }
    for (int r = 0; r < R; ++r) p[r] += j0;
    score_rows(R, q, kt + j0, mt, D, n - j0, p);
    for (int r = 0; r < R; ++r) {
      softmax_row(p[r], n - j0);
      p[r] -= j0;
      for (int64_t j = 0; j < j0; ++j) p[r][j] = 0.0f; /* masked: exp(-inf) */
      for (int64_t j = n; j < Tk; ++j) p[r][j] = 0.0f;
    }
  }
}

/* out = P V of units [u0, u1) */
static void att_values(void *ctx, int64_t u0, int64_t u1) {
  const att_job *J = (const att_job *)ctx;
  const tbt_dec_model *m = J->m;
  const int64_t H = m->n_heads, D = m->head_dim, T = J->T, Tk = J->Tk;
  const float *p[64];
  float *o[64];
  for (int64_t u = u0; u < u1; ++u) {
    int64_t b, g, t, h0;
    int R;
    att_unit(J, u, &b, &g, &t, &h0, &R);
    int64_t j0;
    int uniform;
    const int64_t n = att_keys(J, b, t, &j0, &uniform);
    const float *vq = J->L->vq + ((b * m->n_kv + g) * m->max_t + j0) * D;
    for (int r = 0; r < R; ++r) { /* keys before j0: p = 0 exactly (masked), skipped */
      p[r] = J->probs + ((b * H + h0 + r) * T + t) * Tk + j0;
      o[r] = J->att + ((b * T + t) * H + h0 + r) * D;
    }
    value_rows(R, p, vq, D, n - j0, Tk - j0, o);
  }
}

/* ---- float LM head ------------------------------------------------------------------------ */

typedef struct {
  const tbt_dec_model *m;
  const float *x; /* (B, d) */
  float *y;       /* (B, vocab) */
  int64_t B;
} head_job;

#define HEAD_ROWS 64
static void head_rows(void *ctx, int64_t c0, int64_t c1) {
  const head_job *J = (const head_job *)ctx;
  const tbt_dec_model *m = J->m;
  const int64_t V = m->vocab, d = m->d;
  for (int64_t c = c0; c < c1; ++c) {
    const int64_t v1 = (c + 1) * HEAD_ROWS < V ? (c + 1) * HEAD_ROWS : V;
    for (int64_t v = c * HEAD_ROWS; v < v1; ++v)
      for (int64_t b = 0; b < J->B; ++b) {
        float t = dot(m->head_w + v * d, J->x + b * d, d);
        if (m->head_b) t = t + m->head_b[v];
        J->y[b * V + v] = t;
      }
  }
}

/* ---- the step ----------------------------------------------------------------------------- */

typedef struct {
  float *x, *h, *qkv, *qb, *att, *probs, *mlp, *act, *last, *gbuf, *knew, *vnew;
  lin_ws ws;
} bufs;

static int64_t plan_ws(const tbt_elin *L, int64_t M) {
  return L->plan ? tbt_linear_workspace(L->plan, M) : 0;
}

static int64_t carve(const tbt_dec_model *m, int64_t B, int64_t T, int64_t Tk, uint8_t *base,
                     bufs *b) {
  const int64_t M = B * T, d = m->d, H = m->n_heads, D = m->head_dim;
  const int64_t nqkv = (H + 2 * m->n_kv) * D;
  const int64_t sizes[12] = {M * d, M * d, M * nqkv, M * H * D, M * H * D, B * H * T * Tk,
                             2 * M * m->inter, M * m->inter, B * d, B * m->n_kv * Tk * D,
                             M * m->n_kv * D, M * m->n_kv * D};
  float **ptrs[12] = {&b->x, &b->h, &b->qkv, &b->qb, &b->att, &b->probs, &b->mlp, &b->act,
                      &b->last, &b->gbuf, &b->knew, &b->vnew};
  size_t off = 0;
  for (int i = 0; i < 12; ++i) {
    if (base) *ptrs[i] = (float *)(base + off);
    off += al64((size_t)sizes[i] * sizeof(float));
  }
  int64_t kmax = m->inter > d ? m->inter : d;
  if (base) b->ws.cols = (int32_t *)(base + off);
  off += al64((size_t)kmax * sizeof(int32_t));
  int64_t w = 0;
  const tbt_dec_layer *L = m->layers;
  const tbt_elin *all[8] = {&L->q, &L->k, &L->v, &L->o, &L->gate, &L->up, &L->down, &m->head};
  for (int i = 0; i < 8; ++i) {
    if (i == 7 && m->head_kind != TBT_HEAD_PACKED) continue;
    const int64_t need = plan_ws(all[i], i == 7 ? B : M);
    if (need < 0) return -1;
    w = need > w ? need : w;
  }
  if (base) {
    b->ws.work = base + off;
    b->ws.work_bytes = w;
  }
  off += al64((size_t)w);
  return (int64_t)off + 64;
}

int64_t tbt_dec_scratch_bytes(const tbt_dec_model *m, int64_t B, int64_t T) {
  if (!m || B < 1 || T < 1 || m->n_layers < 1) return TBT_EINVAL;
  return carve(m, B, T, m->max_t, NULL, &(bufs){0});
}

#define CHECK(call)                     \
  do {                                  \
    const int rc_ = (call);             \
    if (rc_ != TBT_OK) return rc_;      \
  } while (0)

static int layer_forward(const tbt_dec_model *m, const tbt_dec_layer *L, bufs *bf, int64_t B,
                         int64_t T, int64_t pos0, const int64_t *pad, prof_t *pf) {
  const int64_t M = B * T, d = m->d, H = m->n_heads, nkv = m->n_kv, D = m->head_dim;
  const int64_t nq = H * D, nk = nkv * D, Tk = pos0 + T, I = m->inter;
  /* attention block */
  for (int64_t r = 0; r < M; ++r) rmsnorm(bf->x + r * d, L->ln1, m->eps, d, bf->h + r * d);
  prof_mark(pf, TBT_PROF_OTHER);
  const float *qs, *ks, *vs;
  int64_t qst, kst, vst;
  if (!L->k.plan) { /* fused q|k|v */
    CHECK(lin_run(&L->q, bf->h, M, bf->qkv, &bf->ws));
    qs = bf->qkv, ks = bf->qkv + nq, vs = bf->qkv + nq + nk;
    qst = kst = vst = nq + 2 * nk;
  } else {
    float *qo = bf->qkv, *ko = qo + M * nq, *vo = ko + M * nk;
    CHECK(lin_run(&L->q, bf->h, M, qo, &bf->ws));
    CHECK(lin_run(&L->k, bf->h, M, ko, &bf->ws));
    CHECK(lin_run(&L->v, bf->h, M, vo, &bf->ws));
    qs = qo, ks = ko, vs = vo, qst = nq, kst = vst = nk;
  }
  prof_mark(pf, TBT_PROF_LINEAR);
  const int64_t half = D / 2;
  for (int64_t b = 0; b < B; ++b)
    for (int64_t t = 0; t < T; ++t) {
      /* position ids: transformers' cumsum(mask) - 1, pad tokens 0 */
      const int64_t r = b * T + t, pb = pad ? pad[b] : 0;
      const int64_t pos = pos0 + t >= pb ? pos0 + t - pb : 0;
      const float *c = m->rope_cos + pos * half, *s = m->rope_sin + pos * half;
      for (int64_t g = 0; g < nkv; ++g) { /* the new rows, (B, n_kv, T, D) */
        const int64_t at = ((b * nkv + g) * T + t) * D;
        rope(ks + r * kst + g * D, c, s, D, 1.0f, bf->knew + at);
        memcpy(bf->vnew + at, vs + r * vst + g * D, (size_t)D * sizeof(float));
      }
      for (int64_t h = 0; h < H; ++h)
        rope(qs + r * qst + h * D, c, s, D, m->attn_scale, bf->qb + (r * H + h) * D);
    }
  aq_tensor(&L->aq_q, bf->qb, M * H * D);
  CHECK(aq_cache(&L->aq_k, bf->knew, L->kc, L->kq, B, nkv, m->max_t, D, pos0, Tk, L->st,
                 bf->gbuf, 1));
  CHECK(aq_cache(&L->aq_v, bf->vnew, L->vc, L->vq, B, nkv, m->max_t, D, pos0, Tk, L->st + 8,
                 bf->gbuf, 0));
  /* the pool only where the work pays for waking it (2 * 2^17 multiply-adds: ~20 us) */
  const int par = B * H * T * Tk * D >= ATT_PAR_MACS && tbt_get_num_threads() > 1;
  const int64_t rep = H / nkv;
  att_job J = {m, L, bf->qb, bf->probs, bf->att, B, T, Tk, pos0,
               (par && B * nkv * T < 2 * tbt_get_num_threads()) || rep > 64 ? rep : 1, pad};
  const int64_t units = att_units(&J);
  if (par) tbt_parallel_for(units, att_scores, &J);
  else att_scores(&J, 0, units);
  aq_tensor(&L->aq_p, bf->probs, B * H * T * Tk);
  if (par) tbt_parallel_for(units, att_values, &J);
  else att_values(&J, 0, units);
  prof_mark(pf, TBT_PROF_ATTENTION);
  CHECK(lin_run(&L->o, bf->att, M, bf->h, &bf->ws));
  prof_mark(pf, TBT_PROF_LINEAR);
  for (int64_t i = 0; i < M * d; ++i) bf->x[i] = bf->x[i] + bf->h[i];
  /* MLP block */
  for (int64_t r = 0; r < M; ++r) rmsnorm(bf->x + r * d, L->ln2, m->eps, d, bf->h + r * d);
  prof_mark(pf, TBT_PROF_OTHER);
  const float *gs, *us;
  int64_t gst;
  if (!L->up.plan) { /* fused gate|up */
    CHECK(lin_run(&L->gate, bf->h, M, bf->mlp, &bf->ws));
    gs = bf->mlp, us = bf->mlp + I, gst = 2 * I;
  } else {
    CHECK(lin_run(&L->gate, bf->h, M, bf->mlp, &bf->ws));
    CHECK(lin_run(&L->up, bf->h, M, bf->mlp + M * I, &bf->ws));
    gs = bf->mlp, us = bf->mlp + M * I, gst = I;
  }
  prof_mark(pf, TBT_PROF_LINEAR);
  for (int64_t r = 0; r < M; ++r) silu_mul(gs + r * gst, us + r * gst, bf->act + r * I, I);
  prof_mark(pf, TBT_PROF_OTHER);
  CHECK(lin_run(&L->down, bf->act, M, bf->h, &bf->ws));
  prof_mark(pf, TBT_PROF_LINEAR);
  for (int64_t i = 0; i < M * d; ++i) bf->x[i] = bf->x[i] + bf->h[i];
  return TBT_OK;
}

int tbt_dec_forward(const tbt_dec_model *m, const int32_t *tokens, int64_t B, int64_t T,
                    int64_t pos0, float *logits, void *scratch, int64_t scratch_bytes) {
  return tbt_dec_forward_padded(m, tokens, B, T, pos0, NULL, logits, scratch, scratch_bytes);
}

int tbt_dec_forward_padded(const tbt_dec_model *m, const int32_t *tokens, int64_t B, int64_t T,
                           int64_t pos0, const int64_t *pad, float *logits, void *scratch,
                           int64_t scratch_bytes) {
  if (!m || !tokens || !logits || !scratch || B < 1 || T < 1 || pos0 < 0) return TBT_EINVAL;
  for (int64_t b = 0; pad && b < B; ++b)
    if (pad[b] < 0 || pad[b] >= pos0 + T) return TBT_EINVAL; /* a real token in every row */
  if (B > m->max_b || pos0 + T > m->max_t || pos0 + T > m->rope_len) return TBT_EINVAL;
  if (m->head_dim % 2 || m->n_heads % m->n_kv) return TBT_EINVAL;
  const int64_t need = tbt_dec_scratch_bytes(m, B, T);
  if (need < 0 || scratch_bytes < need) return TBT_EINVAL;
  for (int64_t i = 0; i < B * T; ++i)
    if (tokens[i] < 0 || tokens[i] >= m->vocab) return TBT_EINVAL;
  bufs bf;
  uint8_t *base = (uint8_t *)scratch + ((64 - (uintptr_t)scratch % 64) % 64);
  carve(m, B, T, pos0 + T, base, &bf);
  const int64_t d = m->d;
  prof_t pf = {m->prof, {0.0, 0.0}};
  if (pf.acc) now2(pf.t);
  for (int64_t i = 0; i < B * T; ++i) embed_row(m, tokens[i], bf.x + i * d);
  for (int64_t l = 0; l < m->n_layers; ++l)
    CHECK(layer_forward(m, m->layers + l, &bf, B, T, pos0, pad, &pf));
  for (int64_t b = 0; b < B; ++b)
    rmsnorm(bf.x + (b * T + T - 1) * d, m->norm_w, m->eps, d, bf.last + b * d);
  prof_mark(&pf, TBT_PROF_OTHER);
  if (m->head_kind == TBT_HEAD_PACKED) {
    CHECK(lin_run(&m->head, bf.last, B, logits, &bf.ws));
  } else {
    head_job J = {m, bf.last, logits, B};
    tbt_parallel_for((m->vocab + HEAD_ROWS - 1) / HEAD_ROWS, head_rows, &J);
  }
  prof_mark(&pf, TBT_PROF_HEAD);
  return TBT_OK;
}

/* ---- shared with engine_s2s.c (engine_shared.h): wrappers, the helpers above unchanged ----- */


float tbte_torch_sum(const float *x, int64_t n, int sq) { return torch_sum(x, n, sq); }

void tbte_aq_tensor(const tbt_aq *q, float *x, int64_t n) { aq_tensor(q, x, n); }

void tbte_aq_apply_stats(const tbt_aq *q, const float *x, int64_t n, const float *mean_x,
                         int64_t mean_n, float *y) {
  if (q->kind == TBT_AQ_NONE || n < 1) {
    if (x != y) memcpy(y, x, (size_t)(n > 0 ? n : 0) * sizeof(float));
    return;
  }
  float lo = INFINITY, hi = -INFINITY;
  aq_stats(q, x, n, &lo, &hi);
  aq_apply(q, aq_from_stats(q, lo, hi, q->center ? tensor_mean(mean_x, mean_n) : 0.0f), x, y,
           n);
}

void tbte_aq_cache(const tbt_aq *q, const float *raw, float *out, int64_t B, int64_t nkv,
                   int64_t max_t, int64_t D, int64_t n_old, int64_t n_new, double *st,
                   float *gbuf, int transposed) {
  const int64_t blocks = B * nkv;
  if (q->kind == TBT_AQ_NONE) {
    aq_rows(q, (aq_params){0.0f, 0.0f}, raw, max_t, n_old, out, blocks, max_t, D, n_old, n_new,
            transposed);
    return;
  }
  const int64_t first = n_old;
  if (n_old == 0 || (int64_t)st[0] != n_old) { /* restart the statistics */
    st[1] = INFINITY, st[2] = -INFINITY, st[6] = 0.0;
    n_old = 0;
  }
  float lo = (float)st[1], hi = (float)st[2];
  for (int64_t g = 0; g < blocks; ++g)
    aq_stats(q, raw + (g * max_t + n_old) * D, (n_new - n_old) * D, &lo, &hi);
  st[0] = (double)n_new, st[1] = lo, st[2] = hi;
  const float mean = q->center ? cache_mean(raw, B, nkv, max_t, D, n_new, first == 0, gbuf) : 0.0f;
  const aq_params p = aq_from_stats(q, lo, hi, mean);
  int64_t start = 0;
  if ((int64_t)st[6] == n_old && n_old > 0 && (float)st[4] == p.p0 && (float)st[5] == p.p1)
    start = n_old; /* same parameters: the old rows keep their values */
  aq_rows(q, p, raw, max_t, start, out, blocks, max_t, D, start, n_new, transposed);
  st[4] = p.p0, st[5] = p.p1, st[6] = (double)n_new;
}

int tbte_lin_run(const tbt_elin *L, const float *x, int64_t M, float *y, void *work,
                 int64_t work_bytes, int32_t *cols) {
  const lin_ws ws = {work, work_bytes, cols};
  return lin_run(L, x, M, y, &ws);
}
