/* Internal to the tbt kernels: the per-ISA tile micro-kernels and their table. */
#ifndef TBT_INTERNAL_H
#define TBT_INTERNAL_H

#include <stddef.h>
#include <stdint.h>
#include <string.h>

#include "tbt_kernels.h"

#define TBT_NR 4 /* weight rows per tile */
#define TBT_MR 4 /* activation rows per tile */

#ifndef TBT_X86 /* -DTBT_X86=0 builds the portable scalar library only */
#if (defined(__x86_64__) || defined(_M_X64) || defined(__i386__)) && \
    (defined(__GNUC__) || defined(__clang__))
#define TBT_X86 1
#else
#define TBT_X86 0
#endif
#endif

/* A tile: raw[r][m] for weight rows w + r*ws (r < nr <= TBT_NR) and activation rows
 * a + m*as (m < mr <= TBT_MR), over kpad weights. "raw" per format (the driver corrects):
 *   t2a8: sum c*a with c = q + 1 in {0,1,2}     -> acc = raw - sum_k a
 *   b1a8: sum bit*a with bit = (q > 0)           -> acc = 2*raw - sum_k a
 *   t2a2: sum q*a (nz/neg planes, popcounts)     -> acc = raw
 *   b1a1: popcount(w xor a) over kpad bits       -> acc = K - 2*raw
 */
typedef void (*tbt_tile_fn)(const uint8_t *w, size_t ws, int nr, const uint8_t *a, size_t as,
                            int mr, size_t kpad, int32_t raw[TBT_NR][TBT_MR]);

/* One tbt_gemm call, shared by the driver, the threads and the ISA files. */
typedef struct tbt_job job_t;

/* GEMV (M == 1) over full tiles [t0, t1) of 4 weight rows, epilogue included: ISA files
 * reduce four rows at once and write four outputs with one vector epilogue. May be NULL. */
typedef void (*tbt_gemv_fn)(const job_t *j, int64_t t0, int64_t t1);

struct tbt_job {
  tbt_tile_fn tile;
  tbt_gemv_fn gemv;
  int fmt;
  const uint8_t *w;
  size_t ws;
  const int32_t *wsum;
  const float *w_scale;
  const uint8_t *a;
  size_t as;
  const float *a_scale, *a_offset, *bias;
  const int32_t *asum; /* a8 formats: sum_k a[m][k] */
  int64_t M, N, K, kpad, ntiles;
  float *y;
  int32_t *acc_out;
  tbt_gemv_fn lanes; /* t2a8 lanes-layout GEMM over units of 32 rows (ntiles = units), or NULL */
  /* a generic job (tbt_parallel_for): fn(ctx, t0, t1) over [0, ntiles) in place of a GEMM */
  void (*fn)(void *ctx, int64_t t0, int64_t t1);
  void *ctx;
};

/* Run fn(ctx, t0, t1) over [0, n) on the kernels' thread pool (the caller works too); n <= 1
 * or one thread: a plain call. For the engine's non-GEMM loops (engine.c). */
void tbt_parallel_for(int64_t n, void (*fn)(void *ctx, int64_t t0, int64_t t1), void *ctx);

/* out[m] = sum_k a[m][k] over kpad int8 codes of each of M rows (stride as); may be NULL
 * (the driver's portable loop then runs). */
typedef void (*tbt_rowsum_fn)(const int8_t *a, size_t as, int64_t M, size_t kpad, int32_t *out);

typedef struct {
  tbt_tile_fn tile[TBT_NUM_FORMATS];
  tbt_gemv_fn gemv[TBT_NUM_FORMATS];
  tbt_rowsum_fn rowsum_a8;
} tbt_isa_table;

extern const tbt_isa_table tbt_table_scalar;
#if TBT_X86
/* gemm_lanes_avx512.c: GEMMs on the lanes layouts, over units of 32 output rows */
void tbt_t2a8_lanes_avx512(const job_t *j, int64_t u0, int64_t u1);
void tbt_b1a1_lanes_avx512(const job_t *j, int64_t u0, int64_t u1);
void tbt_t2a2_lanes_avx512(const job_t *j, int64_t u0, int64_t u1);
extern const tbt_isa_table tbt_table_avx2;
extern const tbt_isa_table tbt_table_avx512;
#endif

static inline uint64_t tbt_load_u64(const uint8_t *p) {
  uint64_t v;
  memcpy(&v, p, sizeof v); /* little-endian hosts (x86, arm64): byte 0 = bits 0..7 */
  return v;
}

#if defined(__SSE2__)
#include <emmintrin.h>
/* The float32 epilogue (tbt_kernels.h) of four exact accumulators acc = y[m][n0 .. n0+4):
 * one IEEE float32 operation per step, in the reference order (lanes = the scalar path). */
static inline void tbt_epilogue4(const job_t *j, __m128i acc, int64_t m, int64_t n0) {
  if (j->acc_out) _mm_storeu_si128((__m128i *)(j->acc_out + m * j->N + n0), acc);
  __m128 t = _mm_mul_ps(_mm_cvtepi32_ps(acc), _mm_set1_ps(j->a_scale[m]));
  if (j->a_offset)
    t = _mm_add_ps(t, _mm_mul_ps(_mm_set1_ps(j->a_offset[m]), _mm_cvtepi32_ps(_mm_loadu_si128(
                                                                  (const __m128i *)(j->wsum + n0)))));
  t = _mm_mul_ps(t, _mm_loadu_ps(j->w_scale + n0));
  if (j->bias) t = _mm_add_ps(t, _mm_loadu_ps(j->bias + n0));
  _mm_storeu_ps(j->y + m * j->N + n0, t);
}
#endif

#endif /* TBT_INTERNAL_H */
