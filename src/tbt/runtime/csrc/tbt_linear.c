/* tbt_linear: one call from float32 activations to float32 outputs, y = Q(x) . W^T (+ bias).
 *
 * The activation quantizer of the layer (tbt_kernels.h, TBT_ACT_*) runs here, in C, with the
 * same float32 operations as the numpy reference (tbt/runtime/kernels/ref.py: quantize_a8,
 * quantize_a2, quantize_a1), so the codes, scales and offsets are bit-identical to it; then the
 * codes are laid out for the kernel and tbt_gemm runs. One call per layer and token instead of
 * the Python sequence quantize -> prepare -> gemm removes the interpreter from the decoding
 * step (tbt/runtime/kernels/native.py: FusedLinear).
 *
 * Rounding: round half to even, as np.rint / torch.round. The 8-bit codes are bounded
 * (|x*s| <= 127.x, |u| <= 255), so the float32 magic-number rounding below is exact. The 2- and
 * 1-bit codes clip rint(v) to a small range; for integer bounds clip(rint(v)) equals a pair of
 * comparisons against the half-way points (rint(0.5) = 0, rint(1.5) = 2), used instead. */
#if defined(__GNUC__) && !defined(__clang__)
/* The quantizer loops are plain C written to vectorise: GCC's -O2 cost model leaves them
 * scalar (~3 ns per element), -O3 vectorises them. Nothing here reassociates float math. */
#pragma GCC optimize("O3")
#endif
#include <math.h>
#include <stdlib.h>

#include "tbt_internal.h"

/* One copy of each quantizer loop per ISA, picked at load by the dynamic linker (ifunc). */
#if TBT_X86 && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define TBT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TBT_CLONES
#endif

#define TBT_MAGIC 12582912.0f /* 1.5 * 2^23: (v + M) - M = rint(v) for |v| < 2^22 */

static inline float rint_small(float v) { return (v + TBT_MAGIC) - TBT_MAGIC; }

static int64_t act_bytes(int fmt, int64_t kpad) {
  return (fmt == TBT_T2A8 || fmt == TBT_B1A8) ? kpad : fmt == TBT_T2A2 ? kpad / 4 : kpad / 8;
}

static int act_kind_fits(int fmt, int kind) {
  switch (kind) {
    case TBT_ACT_MINMAX_SYM:
    case TBT_ACT_MINMAX_ASYM: return fmt == TBT_T2A8 || fmt == TBT_B1A8;
    case TBT_ACT_TERNARY:
    case TBT_ACT_TERNARY_NONNEG: return fmt == TBT_T2A2;
    case TBT_ACT_BINARY:
    case TBT_ACT_BINARY_NONNEG: return fmt == TBT_B1A1;
    default: return 0;
  }
}

static size_t align64(size_t n) { return (n + 63) & ~(size_t)63; }

int64_t tbt_linear_workspace(const tbt_plan *p, int64_t M) {
  if (!p || M < 1 || p->Kpad < 1) return TBT_EINVAL;
  size_t n = align64((size_t)M * 2 * sizeof(float));       /* a_scale[M], a_offset[M] */
  n += align64((size_t)M * (size_t)act_bytes(p->fmt, p->Kpad)); /* kernel layout */
  if (p->fmt == TBT_T2A2 || p->fmt == TBT_B1A1) n += align64((size_t)M * (size_t)p->K);
  return (int64_t)n + 64; /* the caller's pointer may sit anywhere in its first cache line */
}

/* min and max of x[0..n): 16 independent lanes (vectorisable without reordering any
 * comparison), then the lanes. Exact: min/max do not round. */
#define MM_LANES 16
TBT_CLONES static void min_max(const float *x, int64_t n, float *lo, float *hi) {
  float a[MM_LANES], b[MM_LANES];
  for (int l = 0; l < MM_LANES; ++l) a[l] = b[l] = x[0];
  int64_t i = 0;
  for (; i + MM_LANES <= n; i += MM_LANES)
    for (int l = 0; l < MM_LANES; ++l) {
      const float v = x[i + l];
      a[l] = v < a[l] ? v : a[l];
      b[l] = v > b[l] ? v : b[l];
    }
  for (; i < n; ++i) {
    a[0] = x[i] < a[0] ? x[i] : a[0];
    b[0] = x[i] > b[0] ? x[i] : b[0];
  }
  for (int l = 1; l < MM_LANES; ++l) {
    a[0] = a[l] < a[0] ? a[l] : a[0];
    b[0] = b[l] > b[0] ? b[l] : b[0];
  }
  *lo = a[0];
  *hi = b[0];
}

static inline float clampf(float v, float lo, float hi) { return v < lo ? lo : v > hi ? hi : v; }

/* 8-bit min/max (quantize_a8, per tensor): codes into rows of `stride` bytes, zero padded. */
TBT_CLONES static void quant_a8(const tbt_plan *p, const float *x, int64_t M, int8_t *out, int64_t stride,
                     float *scale, float *offset) {
  const int64_t K = p->K, n = M * K;
  const float c = p->act_param;
  float lo, hi;
  min_max(x, n, &lo, &hi);
  lo = clampf(lo, -c, c); /* min/max of the clipped tensor = the clipped min/max (monotone) */
  hi = clampf(hi, -c, c);
  float sc, off = 0.0f;
  if (p->act_kind == TBT_ACT_MINMAX_SYM) {
    const float ma = -lo > hi ? -lo : hi;
    const float inv = 1.0f / (ma > 0.0f ? ma : 1.0f); /* torch: 127 / t = 127 * (1 / t) */
    const float s = ma > 0.0f ? 127.0f * inv : 1.0f;
    for (int64_t m = 0; m < M; ++m) {
      const float *xm = x + m * K;
      int8_t *om = out + m * stride;
      for (int64_t k = 0; k < K; ++k) om[k] = (int8_t)(int)rint_small(clampf(xm[k], -c, c) * s);
      memset(om + K, 0, (size_t)(stride - K));
    }
    sc = 1.0f / s;
  } else {
    const float rng = (hi - lo) + 1e-8f;
    for (int64_t m = 0; m < M; ++m) {
      const float *xm = x + m * K;
      int8_t *om = out + m * stride;
      for (int64_t k = 0; k < K; ++k)
        om[k] = (int8_t)((int)rint_small(((clampf(xm[k], -c, c) - lo) / rng) * 255.0f) - 128);
      memset(om + K, 0, (size_t)(stride - K));
    }
    sc = rng / 255.0f;
    off = lo + sc * 128.0f;
  }
  for (int64_t m = 0; m < M; ++m) {
    scale[m] = sc;
    offset[m] = off;
  }
}

/* 2-/1-bit elastic (quantize_a2 / quantize_a1, per tensor): int8 codes (M x K). Returns the
 * number of exact zeros of a signed binary input (x - shift == 0, stored as +1). */
TBT_CLONES static int64_t quant_low(const tbt_plan *p, const float *x, int64_t M, float shift, int8_t *codes,
                         float *scale, float *offset) {
  const int64_t n = M * p->K;
  const float a = p->act_param;
  float base = 0.0f;
  if (p->shift_mode == TBT_SHIFT_GIVEN) {
    base = shift;
  } else if (p->shift_mode == TBT_SHIFT_MIN) {
    float hi;
    min_max(x, n, &base, &hi);
  }
  const int sub = p->shift_mode != TBT_SHIFT_NONE;
  int64_t zeros = 0;
  float sc = a, off = 0.0f;
  switch (p->act_kind) {
    case TBT_ACT_TERNARY: /* clip(rint(v), -1, 1) */
      for (int64_t i = 0; i < n; ++i) {
        const float v = (sub ? x[i] - base : x[i]) / a;
        codes[i] = (int8_t)((v > 0.5f) - (v < -0.5f));
      }
      break;
    case TBT_ACT_TERNARY_NONNEG: /* c = clip(rint(v), 0, 2), stored c - 1, offset base + a */
      for (int64_t i = 0; i < n; ++i) {
        const float v = (sub ? x[i] - base : x[i]) / a;
        codes[i] = (int8_t)((v > 0.5f) + (v >= 1.5f) - 1);
      }
      off = base + a;
      break;
    case TBT_ACT_BINARY: /* sign(x - shift), an exact 0 -> +1 (counted) */
      for (int64_t i = 0; i < n; ++i) {
        const float v = sub ? x[i] - base : x[i];
        codes[i] = (int8_t)(v < 0.0f ? -1 : 1);
        zeros += v == 0.0f;
      }
      break;
    default: /* TBT_ACT_BINARY_NONNEG: c = clip(rint(x / a), 0, 1), stored 2c - 1 */
      for (int64_t i = 0; i < n; ++i) {
        const float v = (sub ? x[i] - base : x[i]) / a;
        codes[i] = (int8_t)(v > 0.5f ? 1 : -1);
      }
      sc = a / 2.0f;
      off = sc;
      break;
  }
  for (int64_t m = 0; m < M; ++m) {
    scale[m] = sc;
    offset[m] = off;
  }
  return zeros;
}

int tbt_quantize_act(const tbt_plan *p, const float *x, int64_t M, float shift, int8_t *codes,
                     float *scale, float *offset, int64_t *zeros) {
  if (!p || !x || !codes || !scale || !offset || M < 1 || p->K < 1 ||
      !act_kind_fits(p->fmt, p->act_kind))
    return TBT_EINVAL;
  int64_t z = 0;
  if (p->act_kind == TBT_ACT_MINMAX_SYM || p->act_kind == TBT_ACT_MINMAX_ASYM)
    quant_a8(p, x, M, codes, p->K, scale, offset);
  else
    z = quant_low(p, x, M, shift, codes, scale, offset);
  if (zeros) *zeros = z;
  return TBT_OK;
}

int tbt_linear(const tbt_plan *p, const float *x, int64_t M, float shift, void *work,
               int64_t work_bytes, float *y, int64_t *zeros) {
  if (!p || !x || !y || !work || M < 1 || !act_kind_fits(p->fmt, p->act_kind)) return TBT_EINVAL;
  const int64_t need = tbt_linear_workspace(p, M);
  if (need < 0 || work_bytes < need) return TBT_EINVAL;
  uint8_t *base = (uint8_t *)work + ((64 - (uintptr_t)work % 64) % 64);
  float *a_scale = (float *)base, *a_offset = a_scale + M;
  base += align64((size_t)M * 2 * sizeof(float));
  const int64_t abytes = act_bytes(p->fmt, p->Kpad);
  uint8_t *layout = base;
  int64_t z = 0;
  int has_offset;
  if (p->fmt == TBT_T2A8 || p->fmt == TBT_B1A8) {
    quant_a8(p, x, M, (int8_t *)layout, abytes, a_scale, a_offset);
    has_offset = p->act_kind == TBT_ACT_MINMAX_ASYM;
  } else {
    int8_t *codes = (int8_t *)(base + align64((size_t)M * (size_t)abytes));
    z = quant_low(p, x, M, shift, codes, a_scale, a_offset);
    const int rc = p->fmt == TBT_T2A2 ? tbt_prepare_a2(codes, M, p->K, p->Kpad, layout)
                                      : tbt_prepare_a1(codes, M, p->K, p->Kpad, layout);
    if (rc != TBT_OK) return rc;
    has_offset = p->act_kind == TBT_ACT_TERNARY_NONNEG || p->act_kind == TBT_ACT_BINARY_NONNEG;
  }
  if (zeros) *zeros = z;
  if (p->w_lanes && M >= p->lanes_min_m)
    return tbt_gemm_lanes(p->fmt, p->isa, p->w_lanes, p->wsum, p->w_scale, layout, abytes,
                          a_scale, has_offset ? a_offset : NULL, p->bias, M, p->N, p->K, p->Kpad,
                          y, NULL);
  return tbt_gemm(p->fmt, p->isa, p->w, p->w_stride, p->wsum, p->w_scale, layout, abytes,
                  a_scale, has_offset ? a_offset : NULL, p->bias, M, p->N, p->K, p->Kpad, y,
                  NULL);
}
