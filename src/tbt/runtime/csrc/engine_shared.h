/* Pieces of engine.c that engine_s2s.c (the encoder-decoder engine) reuses: thin non-static
 * wrappers appended to engine.c around its static helpers, so that both engines quantize,
 * sum and call the packed linears in exactly the same way. Internal (hidden symbols). */
#ifndef TBT_ENGINE_SHARED_H
#define TBT_ENGINE_SHARED_H

#include <stdint.h>

#include "tbt_engine.h"
#include "tbt_internal.h"
#if TBT_X86 && defined(__GNUC__)
#include <immintrin.h>
#endif

#include <string.h>

#define MAGIC 12582912.0f /* 1.5 * 2^23: (v + MAGIC) - MAGIC = rint(v) for |v| < 2^22 */

static inline float rint_s(float v) { return (v + MAGIC) - MAGIC; }

/* exp(x) for float32, vectorisable (no libm call): Cody-Waite reduction x = n ln2 + r and
 * Cephes' degree-6 polynomial, about 1 ulp (torch's vectorised exp is Sleef's, 1 ulp: the two
 * may differ in the last bit). x is clamped to [-87.3, 88]: exp(88) = 1.65e38, not inf. */
static inline float exp_f(float x) {
  x = x < -87.33654f ? -87.33654f : x > 88.0f ? 88.0f : x;
  const float n = rint_s(x * 1.44269504088896341f);
  float r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  const int32_t e = ((int32_t)n + 127) << 23;
  float sc;
  memcpy(&sc, &e, sizeof sc);
  return p * sc;
}

/* the opt-in step profile of both engines (m->prof) and their ISA clones */
#if defined(_POSIX_C_SOURCE)
#include <time.h>
static inline void now2(double t[2]) {
  struct timespec a, b;
  clock_gettime(CLOCK_MONOTONIC, &a);
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &b);
  t[0] = (double)a.tv_sec + 1e-9 * (double)a.tv_nsec;
  t[1] = (double)b.tv_sec + 1e-9 * (double)b.tv_nsec;
}
#else
static inline void now2(double t[2]) { t[0] = t[1] = 0.0; }
#endif

/* opt-in profile (m->prof): time since the last mark goes to `part` */
typedef struct {
  double *acc;
  double t[2];
} prof_t;
static inline void prof_mark(prof_t *p, int part) {
  if (!p->acc) return;
  double t[2];
  now2(t);
  p->acc[2 * part] += t[0] - p->t[0];
  p->acc[2 * part + 1] += t[1] - p->t[1];
  p->t[0] = t[0], p->t[1] = t[1];
}

#if TBT_X86 && defined(__GNUC__) && !defined(__clang__) && defined(__ELF__)
#define TBT_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define TBT_CLONES
#endif

/* a float dot product in 16 lanes, summed pairwise (the float head, cross-attention) */
TBT_CLONES static float dot(const float *a, const float *b, int64_t n) {
  float acc[16] = {0};
  int64_t i = 0;
  for (; i + 16 <= n; i += 16)
    for (int l = 0; l < 16; ++l) acc[l] += a[i + l] * b[i + l];
  for (; i < n; ++i) acc[0] += a[i] * b[i];
  for (int w = 8; w >= 1; w /= 2)
    for (int l = 0; l < w; ++l) acc[l] += acc[l + w];
  return acc[0];
}

/* torch's float32 sum of x[0..n) (sq: of the squares), one thread */
float tbte_torch_sum(const float *x, int64_t n, int sq);
/* fake-quantize a contiguous tensor in place (statistics over the whole tensor) */
void tbte_aq_tensor(const tbt_aq *q, float *x, int64_t n);
/* y = Q(x) for x[0..n) with min/max over x and, where the quantizer subtracts the mean, the
 * mean of mean_x[0..mean_n) (the same values in the order torch sums them) */
void tbte_aq_apply_stats(const tbt_aq *q, const float *x, int64_t n, const float *mean_x,
                         int64_t mean_n, float *y);
/* the whole raw cache rows [0, n_new) of B * nkv (max_t x D) blocks quantized as one tensor
 * into out (statistics in st[8], grown from n_old; st[0] != n_old restarts them from all rows,
 * as after a beam reorder). The encoder-decoder engine keeps the raw cache whole (beams move
 * rows); the decoder-only engine's aq_cache keeps only what its quantizer needs. */
void tbte_aq_cache(const tbt_aq *q, const float *raw, float *out, int64_t B, int64_t nkv,
                   int64_t max_t, int64_t D, int64_t n_old, int64_t n_new, double *st,
                   float *gbuf, int transposed);
/* a packed linear (activation quantizer + kernel + the binary zero correction) */
int tbte_lin_run(const tbt_elin *L, const float *x, int64_t M, float *y, void *work,
                 int64_t work_bytes, int32_t *cols);

#endif /* TBT_ENGINE_SHARED_H */
