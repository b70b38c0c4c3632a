/* Shared by the AVX-512 translation units (kernels_avx512.c, gemm_lanes_avx512.c): their
 * target attributes and the vpdpbusd accumulate. Include inside `#if TBT_X86`. */
#ifndef TBT_AVX512_H
#define TBT_AVX512_H

#include <immintrin.h>

#define T_VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define T_VPOPCNT __attribute__((target("avx512f,avx512bw,avx512vl,avx512vpopcntdq")))
#define T_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))
#define INLINE static inline __attribute__((always_inline))

/* c += dot4(a (u8), b (s8)) per int32 lane: vpdpbusd through inline asm. GCC 12 compiles the
 * intrinsic with a register copy of the accumulator per instruction (twice the instructions
 * in the hot loops, front-end bound); the "+v" constraint accumulates in place. */
INLINE T_VNNI __m512i tbt_dpbusd(__m512i c, __m512i a, __m512i b) {
#if defined(TBT_DPBUSD_INTRINSIC)
  return _mm512_dpbusd_epi32(c, a, b);
#else
  __asm__("vpdpbusd %2, %1, %0" : "+v"(c) : "v"(a), "vm"(b));
  return c;
#endif
}

#endif /* TBT_AVX512_H */
