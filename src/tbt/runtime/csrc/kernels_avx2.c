/* AVX2 tiles (x86-64 with AVX2; selected at run time, compiled with a target attribute).
 * int8 dot products use vpmaddubsw (u8 x s8 -> i16 pairs; weight codes <= 2 so no saturation)
 * then vpmaddwd with ones -> i32. Popcounts use the 4-bit lookup table (vpshufb) + vpsadbw. */
#include "tbt_internal.h"

#if TBT_X86
#include <immintrin.h>

#include "tbt_tile.h"

#define T_AVX2 __attribute__((target("avx2")))
#define INLINE static inline __attribute__((always_inline))

INLINE T_AVX2 int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

INLINE T_AVX2 int64_t hsum_epi64(__m256i v) {
  __m128i s = _mm_add_epi64(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  return _mm_cvtsi128_si64(s) + _mm_extract_epi64(s, 1);
}

/* t2a8: per 64-byte block, two 32-byte halves; plane s = (byte >> 2s) & 3 pairs with the 32
 * activations at 256b + 64s + 32h. One weight row at a time, MR activation rows. */
INLINE T_AVX2 void t2a8_body(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                             size_t kpad, int32_t raw[TBT_NR][TBT_MR], const int NR,
                             const int MR) {
  const __m256i m3 = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
  for (int r = 0; r < NR; ++r) {
    __m256i acc[TBT_MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
    for (size_t b = 0; b < kpad / 256; ++b) {
      for (int h = 0; h < 2; ++h) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(w + r * ws + 64 * b + 32 * h));
        __m256i s16[TBT_MR];
        for (int m = 0; m < MR; ++m) s16[m] = _mm256_setzero_si256();
        for (int s = 0; s < 4; ++s) {
          const __m256i wp = _mm256_and_si256(_mm256_srli_epi16(wv, 2 * s), m3);
          for (int m = 0; m < MR; ++m) {
            const __m256i av = _mm256_loadu_si256(
                (const __m256i *)(a + m * as + 256 * b + 64 * s + 32 * h));
            s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(wp, av)); /* |.| <= 2048 */
          }
        }
        for (int m = 0; m < MR; ++m)
          acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(s16[m], ones));
      }
    }
    for (int m = 0; m < MR; ++m) raw[r][m] = hsum_epi32(acc[m]);
  }
}

/* 32 weight bits -> 32 bytes of 0/1 (byte j = bit j). */
INLINE T_AVX2 __m256i expand_bits32(const uint8_t *p) {
  uint32_t bits;
  memcpy(&bits, p, 4);
  const __m256i sel = _mm256_setr_epi8(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1, 2, 2, 2,
                                       2, 2, 2, 2, 2, 3, 3, 3, 3, 3, 3, 3, 3);
  const __m256i bit = _mm256_set1_epi64x((long long)0x8040201008040201ULL);
  __m256i v = _mm256_shuffle_epi8(_mm256_set1_epi32((int)bits), sel);
  return _mm256_min_epu8(_mm256_and_si256(v, bit), _mm256_set1_epi8(1));
}

INLINE T_AVX2 void b1a8_body(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                             size_t kpad, int32_t raw[TBT_NR][TBT_MR], const int NR,
                             const int MR) {
  const __m256i ones = _mm256_set1_epi16(1);
  for (int r = 0; r < NR; ++r) {
    __m256i acc[TBT_MR];
    for (int m = 0; m < MR; ++m) acc[m] = _mm256_setzero_si256();
    for (size_t b = 0; b < kpad / 256; ++b) { /* 8 chunks of 32 weights per block */
      __m256i s16[TBT_MR];
      for (int m = 0; m < MR; ++m) s16[m] = _mm256_setzero_si256();
      for (int c = 0; c < 8; ++c) {
        const __m256i wb = expand_bits32(w + r * ws + 32 * b + 4 * c);
        for (int m = 0; m < MR; ++m) {
          const __m256i av = _mm256_loadu_si256((const __m256i *)(a + m * as + 256 * b + 32 * c));
          s16[m] = _mm256_add_epi16(s16[m], _mm256_maddubs_epi16(wb, av)); /* |.| <= 2048 */
        }
      }
      for (int m = 0; m < MR; ++m)
        acc[m] = _mm256_add_epi32(acc[m], _mm256_madd_epi16(s16[m], ones));
    }
    for (int m = 0; m < MR; ++m) raw[r][m] = hsum_epi32(acc[m]);
  }
}

INLINE T_AVX2 __m256i popcnt8(__m256i v) { /* per-byte popcount, each <= 8 */
  const __m256i lut = _mm256_setr_epi8(0, 1, 1, 2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4, 0, 1, 1,
                                       2, 1, 2, 2, 3, 1, 2, 2, 3, 2, 3, 3, 4);
  const __m256i lo = _mm256_set1_epi8(0x0F);
  return _mm256_add_epi8(_mm256_shuffle_epi8(lut, _mm256_and_si256(v, lo)),
                         _mm256_shuffle_epi8(lut, _mm256_and_si256(_mm256_srli_epi16(v, 4), lo)));
}

/* Byte counters are flushed through vpsadbw every 15 words (15 * 8 * 2 < 256). */
#define FLUSH_WORDS 15

INLINE T_AVX2 void t2a2_body(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                             size_t kpad, int32_t raw[TBT_NR][TBT_MR], const int NR,
                             const int MR) {
  const size_t plane = kpad / 8, nw = plane / 32;
  const __m256i zero = _mm256_setzero_si256();
  for (int r = 0; r < NR; ++r) {
    const uint8_t *wr = w + r * ws;
    __m256i pos[TBT_MR], neg[TBT_MR];
    for (int m = 0; m < MR; ++m) pos[m] = neg[m] = zero;
    for (size_t i0 = 0; i0 < nw; i0 += FLUSH_WORDS) {
      const size_t i1 = i0 + FLUSH_WORDS < nw ? i0 + FLUSH_WORDS : nw;
      __m256i cp[TBT_MR], cn[TBT_MR];
      for (int m = 0; m < MR; ++m) cp[m] = cn[m] = zero;
      for (size_t i = i0; i < i1; ++i) {
        const __m256i wn = _mm256_loadu_si256((const __m256i *)(wr + 32 * i));
        const __m256i wg = _mm256_loadu_si256((const __m256i *)(wr + plane + 32 * i));
        for (int m = 0; m < MR; ++m) {
          const uint8_t *am = a + m * as;
          const __m256i an = _mm256_loadu_si256((const __m256i *)(am + 32 * i));
          const __m256i nz = _mm256_and_si256(wn, an);
          const __m256i ag = _mm256_loadu_si256((const __m256i *)(am + plane + 32 * i));
          const __m256i d = _mm256_and_si256(nz, _mm256_xor_si256(wg, ag));
          cp[m] = _mm256_add_epi8(cp[m], popcnt8(nz));
          cn[m] = _mm256_add_epi8(cn[m], popcnt8(d));
        }
      }
      for (int m = 0; m < MR; ++m) {
        pos[m] = _mm256_add_epi64(pos[m], _mm256_sad_epu8(cp[m], zero));
        neg[m] = _mm256_add_epi64(neg[m], _mm256_sad_epu8(cn[m], zero));
      }
    }
    for (int m = 0; m < MR; ++m) raw[r][m] = (int32_t)(hsum_epi64(pos[m]) - 2 * hsum_epi64(neg[m]));
  }
}

INLINE T_AVX2 void b1a1_body(const uint8_t *w, size_t ws, const uint8_t *a, size_t as,
                             size_t kpad, int32_t raw[TBT_NR][TBT_MR], const int NR,
                             const int MR) {
  const size_t nw = kpad / 256;
  const __m256i zero = _mm256_setzero_si256();
  for (int r = 0; r < NR; ++r) {
    const uint8_t *wr = w + r * ws;
    __m256i tot[TBT_MR];
    for (int m = 0; m < MR; ++m) tot[m] = zero;
    for (size_t i0 = 0; i0 < nw; i0 += 2 * FLUSH_WORDS) {
      const size_t i1 = i0 + 2 * FLUSH_WORDS < nw ? i0 + 2 * FLUSH_WORDS : nw;
      __m256i c8[TBT_MR];
      for (int m = 0; m < MR; ++m) c8[m] = zero;
      for (size_t i = i0; i < i1; ++i) {
        const __m256i wv = _mm256_loadu_si256((const __m256i *)(wr + 32 * i));
        for (int m = 0; m < MR; ++m) {
          const __m256i av = _mm256_loadu_si256((const __m256i *)(a + m * as + 32 * i));
          c8[m] = _mm256_add_epi8(c8[m], popcnt8(_mm256_xor_si256(wv, av)));
        }
      }
      for (int m = 0; m < MR; ++m) tot[m] = _mm256_add_epi64(tot[m], _mm256_sad_epu8(c8[m], zero));
    }
    for (int m = 0; m < MR; ++m) raw[r][m] = (int32_t)hsum_epi64(tot[m]);
  }
}

TBT_DEFINE_TILE(tile_t2a8, t2a8_body, T_AVX2)
TBT_DEFINE_TILE(tile_b1a8, b1a8_body, T_AVX2)
TBT_DEFINE_TILE(tile_t2a2, t2a2_body, T_AVX2)
TBT_DEFINE_TILE(tile_b1a1, b1a1_body, T_AVX2)

const tbt_isa_table tbt_table_avx2 = {{tile_t2a8, tile_b1a8, tile_t2a2, tile_b1a1},
                                       {NULL, NULL, NULL, NULL}, NULL};
#endif /* TBT_X86 */
