/* AVX-512 tiles: int8 dot products with AVX512-VNNI vpdpbusd (u8 x s8, 4 products per i32
 * lane, no saturation), popcounts with AVX512-VPOPCNTDQ vpopcntq. Selected at run time. */
#include "tbt_internal.h"

#if TBT_X86
#include <immintrin.h>

#include "tbt_tile.h"

#include "tbt_avx512.h"

/* t2a8. GEMV (MR == 1): the four 2-bit planes are masked in place (byte & 0x03, 0x0C, 0x30,
 * 0xC0 = code << 2s), dotted into four accumulators and recombined with exact right shifts
 * at the end (lane sums stay below 2^31 for K < 8M):
 * one AND and one vpdpbusd per 64 weights. GEMM (MR > 1): planes are shifted down
 * ((byte >> 2s) & 3) once per weight row and reused for every activation row. */
INLINE T_VNNI void t2a8_body(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                             size_t kpad, int32_t raw[TBT_NR][TBT_MR], const int NR,
                             const int MR) {
  const size_t nb = kpad / 256;
  if (MR == 1) {
    const __m512i mk0 = _mm512_set1_epi8(0x03), mk1 = _mm512_set1_epi8(0x0C);
    const __m512i mk2 = _mm512_set1_epi8(0x30), mk3 = _mm512_set1_epi8((char)0xC0);
    __m512i acc[TBT_NR][4];
    for (int r = 0; r < NR; ++r)
      for (int s = 0; s < 4; ++s) acc[r][s] = _mm512_setzero_si512();
    for (size_t b = 0; b < nb; ++b) {
      const int8_t *ab = (const int8_t *)a + 256 * b;
      const __m512i a0 = _mm512_loadu_si512(ab), a1 = _mm512_loadu_si512(ab + 64);
      const __m512i a2 = _mm512_loadu_si512(ab + 128), a3 = _mm512_loadu_si512(ab + 192);
      for (int r = 0; r < NR; ++r) {
        const __m512i wv = _mm512_loadu_si512(w + r * ws + 64 * b);
        acc[r][0] = tbt_dpbusd(acc[r][0], _mm512_and_si512(wv, mk0), a0);
        acc[r][1] = tbt_dpbusd(acc[r][1], _mm512_and_si512(wv, mk1), a1);
        acc[r][2] = tbt_dpbusd(acc[r][2], _mm512_and_si512(wv, mk2), a2);
        acc[r][3] = tbt_dpbusd(acc[r][3], _mm512_and_si512(wv, mk3), a3);
      }
    }
    for (int r = 0; r < NR; ++r) {
      /* plane s holds code << 2s, so its accumulator is 4^s times too large (exactly) */
      __m512i v = _mm512_add_epi32(acc[r][0], _mm512_srai_epi32(acc[r][1], 2));
      v = _mm512_add_epi32(v, _mm512_srai_epi32(acc[r][2], 4));
      v = _mm512_add_epi32(v, _mm512_srai_epi32(acc[r][3], 6));
      raw[r][0] = _mm512_reduce_add_epi32(v);
    }
    return;
  }
  const __m512i m3 = _mm512_set1_epi8(3);
  __m512i acc[TBT_NR][TBT_MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_si512();
  for (size_t b = 0; b < nb; ++b) {
    for (int s = 0; s < 4; ++s) {
      __m512i wp[TBT_NR];
      for (int r = 0; r < NR; ++r)
        wp[r] = _mm512_and_si512(
            _mm512_srli_epi16(_mm512_loadu_si512(w + r * ws + 64 * b), 2 * s), m3);
      for (int m = 0; m < MR; ++m) {
        const __m512i av = _mm512_loadu_si512(a + m * as + 256 * b + 64 * s);
        for (int r = 0; r < NR; ++r) acc[r][m] = tbt_dpbusd(acc[r][m], wp[r], av);
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) raw[r][m] = _mm512_reduce_add_epi32(acc[r][m]);
}

/* b1a8: 64 weight bits -> a mask -> bytes 0/1 (vmovdqu8 with zero-masking), one vpdpbusd per
 * activation row. GEMV keeps two accumulators per row (even/odd chunk) for latency. */
INLINE T_VNNI void b1a8_body(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                             size_t kpad, int32_t raw[TBT_NR][TBT_MR], const int NR,
                             const int MR) {
  const __m512i ones = _mm512_set1_epi8(1);
  const size_t nc = kpad / 64;
  if (MR == 1) {
    __m512i acc[TBT_NR][2];
    for (int r = 0; r < NR; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_si512();
    for (size_t c = 0; c < nc; c += 2) { /* nc is a multiple of 4 */
      const __m512i a0 = _mm512_loadu_si512(a + 64 * c), a1 = _mm512_loadu_si512(a + 64 * c + 64);
      for (int r = 0; r < NR; ++r) {
        const __mmask64 k0 = (__mmask64)tbt_load_u64(w + r * ws + 8 * c);
        const __mmask64 k1 = (__mmask64)tbt_load_u64(w + r * ws + 8 * c + 8);
        acc[r][0] = tbt_dpbusd(acc[r][0], _mm512_maskz_mov_epi8(k0, ones), a0);
        acc[r][1] = tbt_dpbusd(acc[r][1], _mm512_maskz_mov_epi8(k1, ones), a1);
      }
    }
    for (int r = 0; r < NR; ++r)
      raw[r][0] = _mm512_reduce_add_epi32(_mm512_add_epi32(acc[r][0], acc[r][1]));
    return;
  }
  __m512i acc[TBT_NR][TBT_MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_si512();
  for (size_t c = 0; c < nc; ++c) {
    __m512i wb[TBT_NR];
    for (int r = 0; r < NR; ++r)
      wb[r] = _mm512_maskz_mov_epi8((__mmask64)tbt_load_u64(w + r * ws + 8 * c), ones);
    for (int m = 0; m < MR; ++m) {
      const __m512i av = _mm512_loadu_si512(a + m * as + 64 * c);
      for (int r = 0; r < NR; ++r) acc[r][m] = tbt_dpbusd(acc[r][m], wb[r], av);
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) raw[r][m] = _mm512_reduce_add_epi32(acc[r][m]);
}


/* ---- hand-unrolled hot tiles (4 weight rows x 4 or 1 activation rows) ------------------- */

#define LD(p) _mm512_loadu_si512((const void *)(p))
#define DP(c, x, y) c = tbt_dpbusd(c, x, y)
#define Z _mm512_setzero_si512()
#define KMASK(p) ((__mmask64)tbt_load_u64(p))

/* Four int32 accumulators -> [sum c0, sum c1, sum c2, sum c3]: one transposing reduction
 * (13 operations) instead of four horizontal sums. */
INLINE T_AVX512 __m128i hsum4_epi32(__m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  const __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(c0, c1), _mm512_unpackhi_epi32(c0, c1));
  const __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(c2, c3), _mm512_unpackhi_epi32(c2, c3));
  const __m512i s = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
  const __m256i h = _mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1));
  return _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
}

/* The same for int64 accumulators whose totals fit in int32 (popcount sums, |.| <= Kpad). */
INLINE T_AVX512 __m128i hsum4_epi64(__m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  const __m512i a = _mm512_add_epi64(_mm512_unpacklo_epi64(c0, c1), _mm512_unpackhi_epi64(c0, c1));
  const __m512i b = _mm512_add_epi64(_mm512_unpacklo_epi64(c2, c3), _mm512_unpackhi_epi64(c2, c3));
  const __m256i x = _mm512_cvtepi64_epi32(a), y = _mm512_cvtepi64_epi32(b); /* [c0 c1 c0 c1 ..] */
  const __m256i s = _mm256_add_epi32(_mm256_unpacklo_epi64(x, y), _mm256_unpackhi_epi64(x, y));
  return _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
}

INLINE T_VNNI __m512i t2a8_combine(__m512i c0, __m512i c1, __m512i c2, __m512i c3) {
  __m512i v = _mm512_add_epi32(c0, _mm512_srai_epi32(c1, 2)); /* plane s is 4^s too large */
  v = _mm512_add_epi32(v, _mm512_srai_epi32(c2, 4));
  return _mm512_add_epi32(v, _mm512_srai_epi32(c3, 6));
}

/* GEMV on two weight rows: 8 accumulators (four planes each). With four rows the 16
 * accumulators + 4 masks + 4 activation vectors made GCC 12 spill in the loop. */
/* GEMV software prefetch: each weight-row load also prefetches the line TBT_PF_DIST bytes
 * further on. Rows are contiguous, so that is the same offset two 4-row tiles (K = 4096) ahead.
 * The hardware prefetcher alone lost most of the DRAM bandwidth on 4 short row streams per
 * tile (t2a8 4096x4096 from DRAM: 225 -> 130 us, one thread, shared machine); 4-16 KiB and
 * T0/T1/T2 hints measured alike within noise, T1/T2 cost ~15 us when the weights are in L3. */
#ifndef TBT_PF_DIST
#define TBT_PF_DIST 8192
#endif
#ifndef TBT_PF_HINT
#define TBT_PF_HINT _MM_HINT_T0
#endif
#define PF(p) _mm_prefetch((const char *)(p) + TBT_PF_DIST, TBT_PF_HINT)
INLINE T_VNNI void t2a8_gemv2(const uint8_t *w0, const uint8_t *w1, const uint8_t *a,
                              size_t nb, __m512i *out0, __m512i *out1) {
  const __m512i k0 = _mm512_set1_epi8(0x03), k1 = _mm512_set1_epi8(0x0C);
  const __m512i k2 = _mm512_set1_epi8(0x30), k3 = _mm512_set1_epi8((char)0xC0);
  __m512i c00 = Z, c01 = Z, c02 = Z, c03 = Z, c10 = Z, c11 = Z, c12 = Z, c13 = Z;
#define T2A8_ROW(wr, c0, c1, c2, c3)                                                          \
  {                                                                                           \
    const __m512i v = LD(wr + 64 * b);                                                        \
    PF(wr + 64 * b);                                                                          \
    DP(c0, _mm512_and_si512(v, k0), a0);                                                      \
    DP(c1, _mm512_and_si512(v, k1), a1);                                                      \
    DP(c2, _mm512_and_si512(v, k2), a2);                                                      \
    DP(c3, _mm512_and_si512(v, k3), a3);                                                      \
  }
  for (size_t b = 0; b < nb; ++b) {
    const uint8_t *ab = a + 256 * b;
    const __m512i a0 = LD(ab), a1 = LD(ab + 64), a2 = LD(ab + 128), a3 = LD(ab + 192);
    T2A8_ROW(w0, c00, c01, c02, c03)
    T2A8_ROW(w1, c10, c11, c12, c13)
  }
#undef T2A8_ROW
  *out0 = t2a8_combine(c00, c01, c02, c03);
  *out1 = t2a8_combine(c10, c11, c12, c13);
}

/* The short blocks of four t2a8 rows (K in [kmain, kpad), kmain = kpad rounded down to 256):
 * the 16 bytes of a short block are broadcast to the four 128-bit lanes and lane L keeps
 * plane L (code << 2L, mask 3 << 2L), against the 64 activations in one vector; each 128-bit
 * lane of the accumulator is then 4^L times too large, undone by an exact per-lane shift. */
INLINE T_VNNI __m128i t2a8_tail4(const uint8_t *w, size_t ws, const uint8_t *a, size_t kpad) {
  const size_t kmain = kpad / 256 * 256, nt = (kpad - kmain) / 64;
  const __m512i mk = _mm512_set_epi32(
      (int)0xC0C0C0C0, (int)0xC0C0C0C0, (int)0xC0C0C0C0, (int)0xC0C0C0C0, 0x30303030, 0x30303030,
      0x30303030, 0x30303030, 0x0C0C0C0C, 0x0C0C0C0C, 0x0C0C0C0C, 0x0C0C0C0C, 0x03030303,
      0x03030303, 0x03030303, 0x03030303);
  const __m512i sh = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  __m512i c0 = Z, c1 = Z, c2 = Z, c3 = Z;
  for (size_t c = 0; c < nt; ++c) {
    const __m512i x = LD(a + kmain + 64 * c);
    const size_t o = kmain / 4 + 16 * c;
#define T2A8_TAIL(cr, wr)                                                                     \
  DP(cr, _mm512_and_si512(_mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)(wr + o))), \
                          mk), x)
    T2A8_TAIL(c0, w);
    T2A8_TAIL(c1, w + ws);
    T2A8_TAIL(c2, w + 2 * ws);
    T2A8_TAIL(c3, w + 3 * ws);
#undef T2A8_TAIL
  }
  return hsum4_epi32(_mm512_srav_epi32(c0, sh), _mm512_srav_epi32(c1, sh),
                     _mm512_srav_epi32(c2, sh), _mm512_srav_epi32(c3, sh));
}

/* raw sums of four consecutive weight rows against one activation row (over kpad, short
 * blocks included) */
#if defined(TBT_GEMV_2ROWS)
INLINE T_VNNI __m128i t2a8_rows4(const uint8_t *w, size_t ws, const uint8_t *a, size_t kpad) {
  __m512i v0, v1, v2, v3;
  t2a8_gemv2(w, w + ws, a, kpad / 256, &v0, &v1);
  t2a8_gemv2(w + 2 * ws, w + 3 * ws, a, kpad / 256, &v2, &v3);
  const __m128i mainv = hsum4_epi32(v0, v1, v2, v3);
  return kpad % 256 ? _mm_add_epi32(mainv, t2a8_tail4(w, ws, a, kpad)) : mainv;
}
#else
INLINE T_VNNI __m128i t2a8_rows4(const uint8_t *w, size_t ws, const uint8_t *a, size_t kpad) {
  const __m512i k0 = _mm512_set1_epi8(0x03), k1 = _mm512_set1_epi8(0x0C);
  const __m512i k2 = _mm512_set1_epi8(0x30), k3 = _mm512_set1_epi8((char)0xC0);
  const uint8_t *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  __m512i c00 = Z, c01 = Z, c02 = Z, c03 = Z, c10 = Z, c11 = Z, c12 = Z, c13 = Z;
  __m512i c20 = Z, c21 = Z, c22 = Z, c23 = Z, c30 = Z, c31 = Z, c32 = Z, c33 = Z;
#define T2A8_ROW(wr, c0, c1, c2, c3)                                                          \
  {                                                                                           \
    const __m512i v = LD(wr + 64 * b);                                                        \
    PF(wr + 64 * b);                                                                          \
    DP(c0, _mm512_and_si512(v, k0), a0);                                                      \
    DP(c1, _mm512_and_si512(v, k1), a1);                                                      \
    DP(c2, _mm512_and_si512(v, k2), a2);                                                      \
    DP(c3, _mm512_and_si512(v, k3), a3);                                                      \
  }
  for (size_t b = 0; b < kpad / 256; ++b) {
    const uint8_t *ab = a + 256 * b;
    const __m512i a0 = LD(ab), a1 = LD(ab + 64), a2 = LD(ab + 128), a3 = LD(ab + 192);
    T2A8_ROW(w0, c00, c01, c02, c03)
    T2A8_ROW(w1, c10, c11, c12, c13)
    T2A8_ROW(w2, c20, c21, c22, c23)
    T2A8_ROW(w3, c30, c31, c32, c33)
  }
#undef T2A8_ROW
  const __m128i mainv =
      hsum4_epi32(t2a8_combine(c00, c01, c02, c03), t2a8_combine(c10, c11, c12, c13),
                  t2a8_combine(c20, c21, c22, c23), t2a8_combine(c30, c31, c32, c33));
  return kpad % 256 ? _mm_add_epi32(mainv, t2a8_tail4(w, ws, a, kpad)) : mainv;
}
#endif

INLINE void store_col0(int32_t raw[TBT_NR][TBT_MR], __m128i v) {
  int32_t t[4];
  _mm_storeu_si128((__m128i *)t, v);
  for (int r = 0; r < 4; ++r) raw[r][0] = t[r];
}

static T_VNNI void t2a8_41_fast(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {
  (void)as;
  store_col0(raw, t2a8_rows4(w, ws, a, kpad));
}

static T_VNNI void t2a8_gemv(const job_t *j, int64_t t0, int64_t t1) {
  const __m128i asum = _mm_set1_epi32(j->asum[0]);
  for (int64_t t = t0; t < t1; ++t) {
    const __m128i raw = t2a8_rows4(j->w + 4 * t * j->ws, j->ws, j->a, (size_t)j->kpad);
    tbt_epilogue4(j, _mm_sub_epi32(raw, asum), 0, 4 * t);
  }
}

/* 16 accumulators c<r><m>, reduced into raw[r][m] */
#define ACC16 \
  __m512i c00 = Z, c01 = Z, c02 = Z, c03 = Z, c10 = Z, c11 = Z, c12 = Z, c13 = Z, c20 = Z, \
          c21 = Z, c22 = Z, c23 = Z, c30 = Z, c31 = Z, c32 = Z, c33 = Z
#define STORE16(hsum4)                                                                       \
  _mm_storeu_si128((__m128i *)raw[0], hsum4(c00, c01, c02, c03));                            \
  _mm_storeu_si128((__m128i *)raw[1], hsum4(c10, c11, c12, c13));                            \
  _mm_storeu_si128((__m128i *)raw[2], hsum4(c20, c21, c22, c23));                            \
  _mm_storeu_si128((__m128i *)raw[3], hsum4(c30, c31, c32, c33))
/* OP4(m, x): apply OP(c<r><m>, p<r>, x) for the four weight rows */
#define COL4(OP, m, x) OP(c0##m, p0, x); OP(c1##m, p1, x); OP(c2##m, p2, x); OP(c3##m, p3, x)

static T_VNNI void t2a8_44_fast(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {
  const __m512i m3 = _mm512_set1_epi8(3);
  const uint8_t *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  const uint8_t *a0 = a, *a1 = a + as, *a2 = a + 2 * as, *a3 = a + 3 * as;
  ACC16;
#define T2A8_PLANE(s)                                                                         \
  {                                                                                           \
    const __m512i p0 = _mm512_and_si512((s) ? _mm512_srli_epi16(v0, 2 * (s)) : v0, m3);      \
    const __m512i p1 = _mm512_and_si512((s) ? _mm512_srli_epi16(v1, 2 * (s)) : v1, m3);      \
    const __m512i p2 = _mm512_and_si512((s) ? _mm512_srli_epi16(v2, 2 * (s)) : v2, m3);      \
    const __m512i p3 = _mm512_and_si512((s) ? _mm512_srli_epi16(v3, 2 * (s)) : v3, m3);      \
    const size_t o = 256 * b + 64 * (s);                                                      \
    __m512i x = LD(a0 + o);                                                                   \
    COL4(DP, 0, x);                                                                           \
    x = LD(a1 + o);                                                                           \
    COL4(DP, 1, x);                                                                           \
    x = LD(a2 + o);                                                                           \
    COL4(DP, 2, x);                                                                           \
    x = LD(a3 + o);                                                                           \
    COL4(DP, 3, x);                                                                           \
  }
  for (size_t b = 0; b < kpad / 256; ++b) {
    PF(w0 + 64 * b); PF(w1 + 64 * b); PF(w2 + 64 * b); PF(w3 + 64 * b);
    const __m512i v0 = LD(w0 + 64 * b), v1 = LD(w1 + 64 * b);
    const __m512i v2 = LD(w2 + 64 * b), v3 = LD(w3 + 64 * b);
    T2A8_PLANE(0) T2A8_PLANE(1) T2A8_PLANE(2) T2A8_PLANE(3)
  }
#undef T2A8_PLANE
  STORE16(hsum4_epi32);
}

INLINE T_VNNI __m128i b1a8_rows4(const uint8_t *w, size_t ws, const uint8_t *a, size_t kpad) {
  const __m512i ones = _mm512_set1_epi8(1);
  const uint8_t *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  __m512i c00 = Z, c01 = Z, c10 = Z, c11 = Z, c20 = Z, c21 = Z, c30 = Z, c31 = Z;
#define B1A8_ROW(wr, e, o)                                                                    \
  DP(e, _mm512_maskz_mov_epi8(KMASK(wr + 8 * c), ones), x0);                                  \
  DP(o, _mm512_maskz_mov_epi8(KMASK(wr + 8 * c + 8), ones), x1)
  const size_t nc = kpad / 64;
  for (size_t c = 0; c + 2 <= nc; c += 2) { /* pairs of 64-weight chunks */
    const __m512i x0 = LD(a + 64 * c), x1 = LD(a + 64 * c + 64);
    if (!(c & 7)) {
      PF(w0 + 8 * c); PF(w1 + 8 * c); PF(w2 + 8 * c); PF(w3 + 8 * c);
    }
    B1A8_ROW(w0, c00, c01);
    B1A8_ROW(w1, c10, c11);
    B1A8_ROW(w2, c20, c21);
    B1A8_ROW(w3, c30, c31);
  }
  if (nc & 1) { /* a last single chunk (kpad a multiple of 64, not 128) */
    const size_t c = nc - 1;
    const __m512i x0 = LD(a + 64 * c);
    DP(c00, _mm512_maskz_mov_epi8(KMASK(w0 + 8 * c), ones), x0);
    DP(c10, _mm512_maskz_mov_epi8(KMASK(w1 + 8 * c), ones), x0);
    DP(c20, _mm512_maskz_mov_epi8(KMASK(w2 + 8 * c), ones), x0);
    DP(c30, _mm512_maskz_mov_epi8(KMASK(w3 + 8 * c), ones), x0);
  }
#undef B1A8_ROW
  return hsum4_epi32(_mm512_add_epi32(c00, c01), _mm512_add_epi32(c10, c11),
                     _mm512_add_epi32(c20, c21), _mm512_add_epi32(c30, c31));
}

static T_VNNI void b1a8_41_fast(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {
  (void)as;
  store_col0(raw, b1a8_rows4(w, ws, a, kpad));
}

static T_VNNI void b1a8_gemv(const job_t *j, int64_t t0, int64_t t1) {
  const __m128i asum = _mm_set1_epi32(j->asum[0]);
  for (int64_t t = t0; t < t1; ++t) {
    const __m128i raw = b1a8_rows4(j->w + 4 * t * j->ws, j->ws, j->a, (size_t)j->kpad);
    tbt_epilogue4(j, _mm_sub_epi32(_mm_add_epi32(raw, raw), asum), 0, 4 * t);
  }
}

static T_VNNI void b1a8_44_fast(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {
  const __m512i ones = _mm512_set1_epi8(1);
  const uint8_t *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  const uint8_t *a0 = a, *a1 = a + as, *a2 = a + 2 * as, *a3 = a + 3 * as;
  ACC16;
  for (size_t c = 0; c < kpad / 64; ++c) {
    if (!(c & 7)) {
      PF(w0 + 8 * c); PF(w1 + 8 * c); PF(w2 + 8 * c); PF(w3 + 8 * c);
    }
    const __m512i p0 = _mm512_maskz_mov_epi8(KMASK(w0 + 8 * c), ones);
    const __m512i p1 = _mm512_maskz_mov_epi8(KMASK(w1 + 8 * c), ones);
    const __m512i p2 = _mm512_maskz_mov_epi8(KMASK(w2 + 8 * c), ones);
    const __m512i p3 = _mm512_maskz_mov_epi8(KMASK(w3 + 8 * c), ones);
    __m512i x = LD(a0 + 64 * c);
    COL4(DP, 0, x);
    x = LD(a1 + 64 * c);
    COL4(DP, 1, x);
    x = LD(a2 + 64 * c);
    COL4(DP, 2, x);
    x = LD(a3 + 64 * c);
    COL4(DP, 3, x);
  }
  STORE16(hsum4_epi32);
}

/* Popcount kernels walk the bit-planes in 64-byte words; a plane of Kpad/8 bytes (a multiple
 * of 32) may end with a 32-byte half word, loaded with a 4-qword zero mask. */
INLINE T_VPOPCNT __m512i load_plane(const uint8_t *p, __mmask8 k) {
  return _mm512_maskz_loadu_epi64(k, p);
}

/* t2a2: sum q*a = popcount(nz) - 2 popcount(nz & (neg_w ^ neg_a)), nz = nz_w & nz_a. */
INLINE T_VPOPCNT void t2a2_body(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                size_t kpad, int32_t raw[TBT_NR][TBT_MR], const int NR,
                                const int MR) {
  const size_t plane = kpad / 8;
  __m512i acc[TBT_NR][TBT_MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_si512();
  for (size_t i = 0; i < plane; i += 64) {
    const __mmask8 k = plane - i >= 64 ? 0xFF : 0x0F;
    __m512i wn[TBT_NR], wg[TBT_NR];
    for (int r = 0; r < NR; ++r) {
      wn[r] = load_plane(w + r * ws + i, k);
      wg[r] = load_plane(w + r * ws + plane + i, k);
    }
    for (int m = 0; m < MR; ++m) {
      const __m512i an = load_plane(a + m * as + i, k), ag = load_plane(a + m * as + plane + i, k);
      for (int r = 0; r < NR; ++r) {
        const __m512i nz = _mm512_and_si512(wn[r], an);
        const __m512i d = _mm512_ternarylogic_epi64(nz, wg[r], ag, 0x60); /* nz & (wg ^ ag) */
        const __m512i pd = _mm512_popcnt_epi64(d);
        acc[r][m] = _mm512_sub_epi64(_mm512_add_epi64(acc[r][m], _mm512_popcnt_epi64(nz)),
                                     _mm512_add_epi64(pd, pd));
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) raw[r][m] = (int32_t)_mm512_reduce_add_epi64(acc[r][m]);
}

INLINE T_VPOPCNT void b1a1_body(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                size_t kpad, int32_t raw[TBT_NR][TBT_MR], const int NR,
                                const int MR) {
  const size_t nbytes = kpad / 8;
  __m512i acc[TBT_NR][TBT_MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_si512();
  for (size_t i = 0; i < nbytes; i += 64) {
    const __mmask8 k = nbytes - i >= 64 ? 0xFF : 0x0F;
    __m512i wv[TBT_NR];
    for (int r = 0; r < NR; ++r) wv[r] = load_plane(w + r * ws + i, k);
    for (int m = 0; m < MR; ++m) {
      const __m512i av = load_plane(a + m * as + i, k);
      for (int r = 0; r < NR; ++r)
        acc[r][m] = _mm512_add_epi64(acc[r][m], _mm512_popcnt_epi64(_mm512_xor_si512(wv[r], av)));
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) raw[r][m] = (int32_t)_mm512_reduce_add_epi64(acc[r][m]);
}


/* t2a2 4x4: weights' planes p<r> (non-zero) and g<r> (negative) stay in registers. */
#define T2A2_OP(c, pr, gr, an, ag)                                                            \
  {                                                                                           \
    const __m512i nz = _mm512_and_si512(pr, an);                                              \
    const __m512i pd = _mm512_popcnt_epi64(_mm512_ternarylogic_epi64(nz, gr, ag, 0x60));      \
    c = _mm512_sub_epi64(_mm512_add_epi64(c, _mm512_popcnt_epi64(nz)), _mm512_add_epi64(pd, pd)); \
  }
#define T2A2_COL(m, ar)                                                                       \
  {                                                                                           \
    const __m512i an = load_plane(ar + i, k), ag = load_plane(ar + plane + i, k);             \
    T2A2_OP(c0##m, p0, g0, an, ag) T2A2_OP(c1##m, p1, g1, an, ag)                             \
    T2A2_OP(c2##m, p2, g2, an, ag) T2A2_OP(c3##m, p3, g3, an, ag)                             \
  }

static T_VPOPCNT void t2a2_44_fast(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                   size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {
  const size_t plane = kpad / 8;
  const uint8_t *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  const uint8_t *a0 = a, *a1 = a + as, *a2 = a + 2 * as, *a3 = a + 3 * as;
  ACC16;
  for (size_t i = 0; i < plane; i += 64) {
    const __mmask8 k = plane - i >= 64 ? 0xFF : 0x0F;
    PF(w0 + i); PF(w0 + plane + i); PF(w1 + i); PF(w1 + plane + i);
    PF(w2 + i); PF(w2 + plane + i); PF(w3 + i); PF(w3 + plane + i);
    const __m512i p0 = load_plane(w0 + i, k), g0 = load_plane(w0 + plane + i, k);
    const __m512i p1 = load_plane(w1 + i, k), g1 = load_plane(w1 + plane + i, k);
    const __m512i p2 = load_plane(w2 + i, k), g2 = load_plane(w2 + plane + i, k);
    const __m512i p3 = load_plane(w3 + i, k), g3 = load_plane(w3 + plane + i, k);
    T2A2_COL(0, a0) T2A2_COL(1, a1) T2A2_COL(2, a2) T2A2_COL(3, a3)
  }
  STORE16(hsum4_epi64);
}

#define XPOP(c, pr, x) c = _mm512_add_epi64(c, _mm512_popcnt_epi64(_mm512_xor_si512(pr, x)))

static T_VPOPCNT void b1a1_44_fast(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                   size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {
  const size_t nbytes = kpad / 8;
  const uint8_t *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  const uint8_t *a0 = a, *a1 = a + as, *a2 = a + 2 * as, *a3 = a + 3 * as;
  ACC16;
  for (size_t i = 0; i < nbytes; i += 64) {
    const __mmask8 k = nbytes - i >= 64 ? 0xFF : 0x0F;
    PF(w0 + i); PF(w1 + i); PF(w2 + i); PF(w3 + i);
    const __m512i p0 = load_plane(w0 + i, k), p1 = load_plane(w1 + i, k);
    const __m512i p2 = load_plane(w2 + i, k), p3 = load_plane(w3 + i, k);
    __m512i x = load_plane(a0 + i, k);
    COL4(XPOP, 0, x);
    x = load_plane(a1 + i, k);
    COL4(XPOP, 1, x);
    x = load_plane(a2 + i, k);
    COL4(XPOP, 2, x);
    x = load_plane(a3 + i, k);
    COL4(XPOP, 3, x);
  }
  STORE16(hsum4_epi64);
}

/* GEMV popcount rows: two 64-byte words per step, two accumulators per row. */
INLINE T_VPOPCNT __m128i b1a1_rows4(const uint8_t *w, size_t ws, const uint8_t *a, size_t kpad) {
  const size_t nbytes = kpad / 8;
  const uint8_t *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  __m512i c00 = Z, c01 = Z, c10 = Z, c11 = Z, c20 = Z, c21 = Z, c30 = Z, c31 = Z;
  size_t i = 0;
  for (; i + 128 <= nbytes; i += 128) {
    const __m512i x0 = LD(a + i), x1 = LD(a + i + 64);
    PF(w0 + i); PF(w0 + i + 64); PF(w1 + i); PF(w1 + i + 64);
    PF(w2 + i); PF(w2 + i + 64); PF(w3 + i); PF(w3 + i + 64);
    XPOP(c00, LD(w0 + i), x0); XPOP(c01, LD(w0 + i + 64), x1);
    XPOP(c10, LD(w1 + i), x0); XPOP(c11, LD(w1 + i + 64), x1);
    XPOP(c20, LD(w2 + i), x0); XPOP(c21, LD(w2 + i + 64), x1);
    XPOP(c30, LD(w3 + i), x0); XPOP(c31, LD(w3 + i + 64), x1);
  }
  for (; i < nbytes; i += 64) {
    const __mmask8 k = nbytes - i >= 64 ? 0xFF : 0x0F;
    const __m512i x0 = load_plane(a + i, k);
    XPOP(c00, load_plane(w0 + i, k), x0); XPOP(c10, load_plane(w1 + i, k), x0);
    XPOP(c20, load_plane(w2 + i, k), x0); XPOP(c30, load_plane(w3 + i, k), x0);
  }
  return hsum4_epi64(_mm512_add_epi64(c00, c01), _mm512_add_epi64(c10, c11),
                     _mm512_add_epi64(c20, c21), _mm512_add_epi64(c30, c31));
}

static T_VPOPCNT void b1a1_41_fast(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                   size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {
  (void)as;
  store_col0(raw, b1a1_rows4(w, ws, a, kpad));
}

static T_VPOPCNT void b1a1_gemv(const job_t *j, int64_t t0, int64_t t1) {
  const __m128i k = _mm_set1_epi32((int32_t)j->K);
  for (int64_t t = t0; t < t1; ++t) {
    const __m128i raw = b1a1_rows4(j->w + 4 * t * j->ws, j->ws, j->a, (size_t)j->kpad);
    tbt_epilogue4(j, _mm_sub_epi32(k, _mm_add_epi32(raw, raw)), 0, 4 * t);
  }
}

INLINE T_VPOPCNT __m128i t2a2_rows4(const uint8_t *w, size_t ws, const uint8_t *a, size_t kpad) {
  const size_t plane = kpad / 8;
  const uint8_t *w0 = w, *w1 = w + ws, *w2 = w + 2 * ws, *w3 = w + 3 * ws;
  __m512i c00 = Z, c10 = Z, c20 = Z, c30 = Z;
  for (size_t i = 0; i < plane; i += 64) {
    const __mmask8 k = plane - i >= 64 ? 0xFF : 0x0F;
    const __m512i an = load_plane(a + i, k), ag = load_plane(a + plane + i, k);
    PF(w0 + i); PF(w0 + plane + i); PF(w1 + i); PF(w1 + plane + i);
    PF(w2 + i); PF(w2 + plane + i); PF(w3 + i); PF(w3 + plane + i);
    T2A2_OP(c00, load_plane(w0 + i, k), load_plane(w0 + plane + i, k), an, ag)
    T2A2_OP(c10, load_plane(w1 + i, k), load_plane(w1 + plane + i, k), an, ag)
    T2A2_OP(c20, load_plane(w2 + i, k), load_plane(w2 + plane + i, k), an, ag)
    T2A2_OP(c30, load_plane(w3 + i, k), load_plane(w3 + plane + i, k), an, ag)
  }
  return hsum4_epi64(c00, c10, c20, c30);
}

static T_VPOPCNT void t2a2_41_fast(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                                   size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {
  (void)as;
  store_col0(raw, t2a2_rows4(w, ws, a, kpad));
}

static T_VPOPCNT void t2a2_gemv(const job_t *j, int64_t t0, int64_t t1) {
  for (int64_t t = t0; t < t1; ++t)
    tbt_epilogue4(j, t2a2_rows4(j->w + 4 * t * j->ws, j->ws, j->a, (size_t)j->kpad), 0, 4 * t);
}

TBT_DEFINE_TILE_FAST(tile_t2a8, t2a8_body, t2a8_44_fast, t2a8_41_fast, T_VNNI)
TBT_DEFINE_TILE_FAST(tile_b1a8, b1a8_body, b1a8_44_fast, b1a8_41_fast, T_VNNI)
TBT_DEFINE_TILE_FAST(tile_t2a2, t2a2_body, t2a2_44_fast, t2a2_41_fast, T_VPOPCNT)
TBT_DEFINE_TILE_FAST(tile_b1a1, b1a1_body, b1a1_44_fast, b1a1_41_fast, T_VPOPCNT)

/* sum_k a[m][k]: vpdpbusd against bytes of 1, four accumulators (kpad a multiple of 64) */
static T_VNNI void rowsum_a8(const int8_t *a, size_t as, int64_t M, size_t kpad, int32_t *out) {
  const __m512i ones = _mm512_set1_epi8(1);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t *am = a + m * as;
    __m512i s0 = Z, s1 = Z, s2 = Z, s3 = Z;
    size_t k = 0;
    for (; k + 256 <= kpad; k += 256) {
      DP(s0, ones, LD(am + k));
      DP(s1, ones, LD(am + k + 64));
      DP(s2, ones, LD(am + k + 128));
      DP(s3, ones, LD(am + k + 192));
    }
    for (; k < kpad; k += 64) DP(s0, ones, LD(am + k));
    out[m] = _mm512_reduce_add_epi32(
        _mm512_add_epi32(_mm512_add_epi32(s0, s1), _mm512_add_epi32(s2, s3)));
  }
}

const tbt_isa_table tbt_table_avx512 = {{tile_t2a8, tile_b1a8, tile_t2a2, tile_b1a1},
                                         {t2a8_gemv, b1a8_gemv, t2a2_gemv, b1a1_gemv},
                                         rowsum_a8};
#endif /* TBT_X86 */
