/* Portable scalar tiles. Each mirrors the data flow of its SIMD twins (same blocks, same
 * planes, same raw quantity), one element at a time, so a bug in the layout shows here too. */
#include "tbt_internal.h"

static int popcount64(uint64_t x) {
#if defined(__GNUC__) || defined(__clang__)
  return __builtin_popcountll(x);
#else
  x = x - ((x >> 1) & 0x5555555555555555ULL);
  x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
  x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
  return (int)((x * 0x0101010101010101ULL) >> 56);
#endif
}

/* t2a8: 64-byte blocks of 256 weights; plane s of byte i is weight 64s + i. */
static int32_t dot_t2a8(const uint8_t *w, const int8_t *a, size_t kpad) {
  int32_t acc = 0;
  for (size_t b = 0; b < kpad / 256; ++b) {
    const uint8_t *wb = w + 64 * b;
    const int8_t *ab = a + 256 * b;
    for (int s = 0; s < 4; ++s)
      for (int i = 0; i < 64; ++i) acc += (int32_t)((wb[i] >> (2 * s)) & 3) * ab[64 * s + i];
  }
  return acc;
}

/* b1a8: 64 weights per 8-byte word, bit j of the word = weight j. */
static int32_t dot_b1a8(const uint8_t *w, const int8_t *a, size_t kpad) {
  int32_t acc = 0;
  for (size_t c = 0; c < kpad / 64; ++c) {
    uint64_t bits = tbt_load_u64(w + 8 * c);
    for (int j = 0; j < 64; ++j) acc += (int32_t)((bits >> j) & 1) * a[64 * c + j];
  }
  return acc;
}

/* t2a2: sum q*a = popcount(nz) - 2*popcount(nz & (neg_w ^ neg_a)), nz = nz_w & nz_a. */
static int32_t dot_t2a2(const uint8_t *w, const uint8_t *a, size_t kpad) {
  const size_t plane = kpad / 8;
  int64_t pos = 0, neg = 0;
  for (size_t i = 0; i < plane; i += 8) {
    uint64_t nz = tbt_load_u64(w + i) & tbt_load_u64(a + i);
    uint64_t d = nz & (tbt_load_u64(w + plane + i) ^ tbt_load_u64(a + plane + i));
    pos += popcount64(nz);
    neg += popcount64(d);
  }
  return (int32_t)(pos - 2 * neg);
}

static int32_t dot_b1a1(const uint8_t *w, const uint8_t *a, size_t kpad) {
  int64_t pop = 0;
  for (size_t i = 0; i < kpad / 8; i += 8)
    pop += popcount64(tbt_load_u64(w + i) ^ tbt_load_u64(a + i));
  return (int32_t)pop;
}

#define SCALAR_TILE(name, dot, atype)                                                       \
  static void name(const uint8_t *w, size_t ws, int nr, const uint8_t *a, size_t as, int mr, \
                   size_t kpad, int32_t raw[TBT_NR][TBT_MR]) {                              \
    for (int r = 0; r < nr; ++r)                                                            \
      for (int m = 0; m < mr; ++m) raw[r][m] = dot(w + r * ws, (const atype *)(a + m * as), kpad); \
  }

SCALAR_TILE(tile_t2a8, dot_t2a8, int8_t)
SCALAR_TILE(tile_b1a8, dot_b1a8, int8_t)
SCALAR_TILE(tile_t2a2, dot_t2a2, uint8_t)
SCALAR_TILE(tile_b1a1, dot_b1a1, uint8_t)

const tbt_isa_table tbt_table_scalar = {{tile_t2a8, tile_b1a8, tile_t2a2, tile_b1a1},
                                         {NULL, NULL, NULL, NULL}, NULL};
