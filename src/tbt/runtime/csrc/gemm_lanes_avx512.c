/* t2a8 GEMM with output rows in the vector lanes ("lanes" layout), AVX-512 VNNI.
 *
 * The row-tile GEMM (kernels_avx512.c) accumulates 4 weight rows x 4 activation rows in 16
 * vectors whose lanes hold partial sums over K, so every tile ends with 16 horizontal
 * reductions and a scalar driver step. At K = 768 a tile has only 3 K-blocks and that fixed
 * cost was ~40% of the time (benchmarks/results/kernels-2026-12-01.md). Here each int32 lane is
 * one output row: nothing to reduce, and the epilogue is one vector per 16 outputs.
 *
 * Layout (built at load by tbt.runtime.kernels.native.repack_t2_lanes): rows are grouped by 16
 * (N padded to a multiple of 32 with zero-weight rows); group g is Kpad/16 blocks of 64 bytes;
 * in block kb, byte 4j + i holds the codes c = q + 1 of row 16g + j at K = 16kb + 4s + i in bits
 * 2s..2s+1 (s = 0..3). So (block >> 2s) & 3 is, per 32-bit lane j, the four codes of row 16g + j
 * at K = 16kb + 4s .. 16kb + 4s + 3, and one vpdpbusd against the broadcast of those four
 * activation bytes adds their products to row j's accumulator. raw = sum c*a; the exact
 * accumulator is raw - sum_k a (the same correction as the row tiles).
 *
 * Work unit: 32 output rows (two groups) x all M, in blocks of up to 8 activation rows
 * (16 accumulators). The driver (tbt_kernels.c) splits units across threads. */
#include "tbt_internal.h"

#if TBT_X86
#include "tbt_avx512.h"
#if defined(__clang__)
#define UNROLL4 _Pragma("unroll")
#define UNROLL8 _Pragma("unroll")
#elif defined(__GNUC__)
#define UNROLL4 _Pragma("GCC unroll 4")
#define UNROLL8 _Pragma("GCC unroll 8")
#else
#define UNROLL4
#define UNROLL8
#endif

INLINE int32_t load_i32(const uint8_t *p) {
  int32_t v;
  memcpy(&v, p, sizeof v);
  return v;
}

/* The float32 epilogue of tbt_kernels.h for y[m][n0 .. n0+16) (masked to N), lanes = rows;
 * acc: the exact accumulators. */
INLINE T_VNNI void epilogue16(const job_t *j, __m512i acc, int64_t m, int64_t n0) {
  const int64_t left = j->N - n0;
  if (left <= 0) return;
  const __mmask16 k = left >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << left) - 1u);
  if (j->acc_out) _mm512_mask_storeu_epi32(j->acc_out + m * j->N + n0, k, acc);
  __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(acc), _mm512_set1_ps(j->a_scale[m]));
  if (j->a_offset)
    t = _mm512_add_ps(t, _mm512_mul_ps(_mm512_set1_ps(j->a_offset[m]),
                                       _mm512_cvtepi32_ps(_mm512_maskz_loadu_epi32(
                                           k, j->wsum + n0))));
  t = _mm512_mul_ps(t, _mm512_maskz_loadu_ps(k, j->w_scale + n0));
  if (j->bias) t = _mm512_add_ps(t, _mm512_maskz_loadu_ps(k, j->bias + n0));
  _mm512_mask_storeu_ps(j->y + m * j->N + n0, k, t);
}

/* 32 rows (groups w0, w1) x MR activation rows starting at a (stride as). */
INLINE T_VNNI void unit_mr(const job_t *j, const uint8_t *w0, const uint8_t *w1, int64_t m0,
                           int64_t n0, const int MR) {
  const __m512i m3 = _mm512_set1_epi8(3);
  const uint8_t *a = j->a + m0 * j->as;
  const size_t as = j->as, nb = (size_t)j->kpad / 16;
  __m512i c0[8], c1[8]; /* fully unrolled below: the arrays live in registers */
  UNROLL8 for (int m = 0; m < MR; ++m) c0[m] = c1[m] = _mm512_setzero_si512();
  for (size_t b = 0; b < nb; ++b) {
    const __m512i v0 = _mm512_loadu_si512(w0 + 64 * b), v1 = _mm512_loadu_si512(w1 + 64 * b);
    UNROLL4 for (int s = 0; s < 4; ++s) {
      const __m512i p0 = _mm512_and_si512(s ? _mm512_srli_epi16(v0, 2 * s) : v0, m3);
      const __m512i p1 = _mm512_and_si512(s ? _mm512_srli_epi16(v1, 2 * s) : v1, m3);
      UNROLL8 for (int m = 0; m < MR; ++m) {
        const __m512i x = _mm512_set1_epi32(load_i32(a + m * as + 16 * b + 4 * s));
        c0[m] = tbt_dpbusd(c0[m], p0, x);
        c1[m] = tbt_dpbusd(c1[m], p1, x);
      }
    }
  }
  const int twice = j->fmt == TBT_B1A8; /* b1a8: codes c = bit, acc = 2 raw - sum a */
  UNROLL8 for (int m = 0; m < MR; ++m) {
    const __m512i asum = _mm512_set1_epi32(j->asum[m0 + m]); /* t2a8: sum (q + 1) a - sum a */
    const __m512i r0 = twice ? _mm512_add_epi32(c0[m], c0[m]) : c0[m];
    const __m512i r1 = twice ? _mm512_add_epi32(c1[m], c1[m]) : c1[m];
    epilogue16(j, _mm512_sub_epi32(r0, asum), m0 + m, n0);
    epilogue16(j, _mm512_sub_epi32(r1, asum), m0 + m, n0 + 16);
  }
}

/* software prefetch distance of the one-row kernel (the row GEMV uses TBT_PF_DIST, 8 KiB) */
#ifndef TBT_LANES_PF
#define TBT_LANES_PF 4096
#endif
/* One activation row (decoding at batch 1): unit_mr with MR = 1 keeps one accumulator per
 * group, so each K block's four vpdpbusd wait on each other (latency ~5 cycles) and the kernel
 * reads only ~14 GB/s from cache. Here every bit plane s has its own accumulator (8 independent
 * chains for the 32 rows), summed at the end: integer adds, the same exact result. */
INLINE T_VNNI void unit_m1(const job_t *j, const uint8_t *w0, const uint8_t *w1, int64_t n0) {
  const __m512i m3 = _mm512_set1_epi8(3);
  const uint8_t *a = j->a;
  const size_t nb = (size_t)j->kpad / 16;
  __m512i c0[4], c1[4];
  UNROLL4 for (int s = 0; s < 4; ++s) c0[s] = c1[s] = _mm512_setzero_si512();
  for (size_t b = 0; b < nb; ++b) {
    const __m512i v0 = _mm512_loadu_si512(w0 + 64 * b), v1 = _mm512_loadu_si512(w1 + 64 * b);
    _mm_prefetch((const char *)(w0 + 64 * b) + TBT_LANES_PF, _MM_HINT_T0);
    _mm_prefetch((const char *)(w1 + 64 * b) + TBT_LANES_PF, _MM_HINT_T0);
    UNROLL4 for (int s = 0; s < 4; ++s) {
      const __m512i x = _mm512_set1_epi32(load_i32(a + 16 * b + 4 * s));
      c0[s] = tbt_dpbusd(c0[s], _mm512_and_si512(s ? _mm512_srli_epi16(v0, 2 * s) : v0, m3), x);
      c1[s] = tbt_dpbusd(c1[s], _mm512_and_si512(s ? _mm512_srli_epi16(v1, 2 * s) : v1, m3), x);
    }
  }
  const __m512i r0 = _mm512_add_epi32(_mm512_add_epi32(c0[0], c0[1]), _mm512_add_epi32(c0[2], c0[3]));
  const __m512i r1 = _mm512_add_epi32(_mm512_add_epi32(c1[0], c1[1]), _mm512_add_epi32(c1[2], c1[3]));
  const int twice = j->fmt == TBT_B1A8;
  const __m512i asum = _mm512_set1_epi32(j->asum[0]);
  epilogue16(j, _mm512_sub_epi32(twice ? _mm512_add_epi32(r0, r0) : r0, asum), 0, n0);
  epilogue16(j, _mm512_sub_epi32(twice ? _mm512_add_epi32(r1, r1) : r1, asum), 0, n0 + 16);
}

/* units [u0, u1) of 32 rows; j->w is the lanes layout, j->ws the bytes of one 16-row group.
 * b1a8 runs here too, on the same layout holding its 0/1 bits as codes. */
T_VNNI void tbt_t2a8_lanes_avx512(const job_t *j, int64_t u0, int64_t u1) {
  if (j->M == 1) {
    for (int64_t u = u0; u < u1; ++u) {
      const uint8_t *w0 = j->w + 2 * u * j->ws;
      unit_m1(j, w0, w0 + j->ws, 32 * u);
    }
    return;
  }
  for (int64_t u = u0; u < u1; ++u) {
    const uint8_t *w0 = j->w + 2 * u * j->ws, *w1 = w0 + j->ws;
    for (int64_t m0 = 0; m0 < j->M; m0 += 8) {
      switch (j->M - m0 < 8 ? (int)(j->M - m0) : 8) {
        case 8: unit_mr(j, w0, w1, m0, 32 * u, 8); break;
        case 7: unit_mr(j, w0, w1, m0, 32 * u, 7); break;
        case 6: unit_mr(j, w0, w1, m0, 32 * u, 6); break;
        case 5: unit_mr(j, w0, w1, m0, 32 * u, 5); break;
        case 4: unit_mr(j, w0, w1, m0, 32 * u, 4); break;
        case 3: unit_mr(j, w0, w1, m0, 32 * u, 3); break;
        case 2: unit_mr(j, w0, w1, m0, 32 * u, 2); break;
        default: unit_mr(j, w0, w1, m0, 32 * u, 1); break;
      }
    }
  }
}
/* ---- b1a1: 64-bit lanes = 8 rows per vector, XNOR-popcount ------------------------------
 * Layout (tbt.runtime.kernels.native.repack_b1_lanes): rows grouped by 8 (N padded to a
 * multiple of 32); group g is Kpad/64 blocks of 64 bytes; block kb holds, in 64-bit lane j,
 * the bits of row 8g + j at K = 64kb .. 64kb + 63 (bit i = K 64kb + i, the b1 row layout's
 * word kb). One vpxorq + vpopcntq against the broadcast activation word counts 64
 * disagreements for 8 rows; acc = K - 2 * raw (padding bits are 0 on both sides). */
#define T_POP __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512vpopcntdq")))

INLINE T_POP __m512i pack_rows16(__m512i lo8, __m512i hi8) { /* 2 x 8 int64 -> 16 int32 */
  return _mm512_inserti64x4(_mm512_castsi256_si512(_mm512_cvtepi64_epi32(lo8)),
                            _mm512_cvtepi64_epi32(hi8), 1);
}

INLINE T_POP void b1_unit_mr(const job_t *j, const uint8_t *w, int64_t m0, int64_t n0,
                             const int MR) {
  const size_t nb = (size_t)j->kpad / 64, gs = j->ws, as = j->as;
  const uint8_t *a = j->a + m0 * as;
  __m512i c[4][6];
  UNROLL8 for (int m = 0; m < MR; ++m) c[0][m] = c[1][m] = c[2][m] = c[3][m] = _mm512_setzero_si512();
  for (size_t b = 0; b < nb; ++b) {
    const __m512i v0 = _mm512_loadu_si512(w + 64 * b), v1 = _mm512_loadu_si512(w + gs + 64 * b);
    const __m512i v2 = _mm512_loadu_si512(w + 2 * gs + 64 * b);
    const __m512i v3 = _mm512_loadu_si512(w + 3 * gs + 64 * b);
    UNROLL8 for (int m = 0; m < MR; ++m) {
      int64_t word;
      memcpy(&word, a + m * as + 8 * b, sizeof word);
      const __m512i x = _mm512_set1_epi64(word);
      c[0][m] = _mm512_add_epi64(c[0][m], _mm512_popcnt_epi64(_mm512_xor_si512(v0, x)));
      c[1][m] = _mm512_add_epi64(c[1][m], _mm512_popcnt_epi64(_mm512_xor_si512(v1, x)));
      c[2][m] = _mm512_add_epi64(c[2][m], _mm512_popcnt_epi64(_mm512_xor_si512(v2, x)));
      c[3][m] = _mm512_add_epi64(c[3][m], _mm512_popcnt_epi64(_mm512_xor_si512(v3, x)));
    }
  }
  const __m512i kk = _mm512_set1_epi32((int32_t)j->K);
  UNROLL8 for (int m = 0; m < MR; ++m) {
    const __m512i r0 = pack_rows16(c[0][m], c[1][m]), r1 = pack_rows16(c[2][m], c[3][m]);
    epilogue16(j, _mm512_sub_epi32(kk, _mm512_add_epi32(r0, r0)), m0 + m, n0);
    epilogue16(j, _mm512_sub_epi32(kk, _mm512_add_epi32(r1, r1)), m0 + m, n0 + 16);
  }
}

/* ---- t2a2: 64-bit lanes, two planes (nz, neg) per operand ---------------------------------
 * Layout (repack_t2a2_lanes): groups of 8 rows, 2*Kpad bytes each; block kb (128 bytes) holds
 * the rows' nz words kb (lanes 0..7), then their neg words kb. With t = nz_w & nz_a,
 * q*a summed over a word = popcount(t) - 2 popcount(t & (neg_w ^ neg_a)). */
INLINE T_POP void t2a2_unit_mr(const job_t *j, const uint8_t *w, int64_t m0, int64_t n0,
                               const int MR) {
  const size_t nb = (size_t)j->kpad / 64, gs = j->ws, as = j->as, plane = (size_t)j->kpad / 8;
  const uint8_t *a = j->a + m0 * as;
  __m512i p[4][2], q[4][2]; /* popcount(t), popcount(t & sign differs) per group and row */
  UNROLL4 for (int m = 0; m < MR; ++m)
    for (int g = 0; g < 4; ++g) p[g][m] = q[g][m] = _mm512_setzero_si512();
  for (size_t b = 0; b < nb; ++b) {
    __m512i nz[4], ng[4];
    UNROLL4 for (int g = 0; g < 4; ++g) {
      nz[g] = _mm512_loadu_si512(w + g * gs + 128 * b);
      ng[g] = _mm512_loadu_si512(w + g * gs + 128 * b + 64);
    }
    UNROLL4 for (int m = 0; m < MR; ++m) {
      int64_t wn, wg;
      memcpy(&wn, a + m * as + 8 * b, sizeof wn);
      memcpy(&wg, a + m * as + plane + 8 * b, sizeof wg);
      const __m512i xn = _mm512_set1_epi64(wn), xg = _mm512_set1_epi64(wg);
      UNROLL4 for (int g = 0; g < 4; ++g) {
        const __m512i t = _mm512_and_si512(nz[g], xn);
        p[g][m] = _mm512_add_epi64(p[g][m], _mm512_popcnt_epi64(t));
        q[g][m] = _mm512_add_epi64(
            q[g][m], _mm512_popcnt_epi64(_mm512_and_si512(t, _mm512_xor_si512(ng[g], xg))));
      }
    }
  }
  UNROLL4 for (int m = 0; m < MR; ++m) {
    const __m512i s0 = pack_rows16(p[0][m], p[1][m]), d0 = pack_rows16(q[0][m], q[1][m]);
    const __m512i s1 = pack_rows16(p[2][m], p[3][m]), d1 = pack_rows16(q[2][m], q[3][m]);
    epilogue16(j, _mm512_sub_epi32(s0, _mm512_add_epi32(d0, d0)), m0 + m, n0);
    epilogue16(j, _mm512_sub_epi32(s1, _mm512_add_epi32(d1, d1)), m0 + m, n0 + 16);
  }
}

T_POP void tbt_t2a2_lanes_avx512(const job_t *j, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const uint8_t *w = j->w + 4 * u * j->ws;
    for (int64_t m0 = 0; m0 < j->M; m0 += 2) { /* 2 rows: 16 accumulators + 8 weight words */
      if (j->M - m0 >= 2)
        t2a2_unit_mr(j, w, m0, 32 * u, 2);
      else
        t2a2_unit_mr(j, w, m0, 32 * u, 1);
    }
  }
}

/* units [u0, u1) of 32 rows = four 8-row groups of j->ws bytes */
T_POP void tbt_b1a1_lanes_avx512(const job_t *j, int64_t u0, int64_t u1) {
  for (int64_t u = u0; u < u1; ++u) {
    const uint8_t *w = j->w + 4 * u * j->ws;
    for (int64_t m0 = 0; m0 < j->M; m0 += 6) {
      switch (j->M - m0 < 6 ? (int)(j->M - m0) : 6) {
        case 6: b1_unit_mr(j, w, m0, 32 * u, 6); break;
        case 5: b1_unit_mr(j, w, m0, 32 * u, 5); break;
        case 4: b1_unit_mr(j, w, m0, 32 * u, 4); break;
        case 3: b1_unit_mr(j, w, m0, 32 * u, 3); break;
        case 2: b1_unit_mr(j, w, m0, 32 * u, 2); break;
        default: b1_unit_mr(j, w, m0, 32 * u, 1); break;
      }
    }
  }
}
#endif /* TBT_X86 */
