/* tbt native kernels: y = x . W^T for packed ternary/binary weights and quantized activations.
 *
 * Plain C ABI (raw pointers + sizes), loaded by tbt/runtime/kernels/native.py through ctypes.
 * The numpy reference (tbt/runtime/kernels/ref.py) is normative: the integer accumulators
 * below equal it exactly and the float epilogue is the same sequence of float32 operations.
 *
 * Kernel ("runtime") layouts: K is padded to Kpad = a multiple of TBT_KBLOCK (256) with codes
 * of zero weight / zero activation, or, for the formats with 8-bit activations (t2a8, b1a8), a
 * multiple of TBT_KTAIL (64) (SmolLM2's K = 576 stays 576 instead of 768); rows are
 * contiguous, row strides are given in bytes.
 *   t2 (for a8):  Kpad/4 bytes per row; in each 64-byte block b, byte i holds the codes
 *                 (q + 1) of weights 256b + 64s + i at bits 2s..2s+1, s = 0..3; after the
 *                 last full block (kmain = Kpad rounded down to 256), short blocks of 16
 *                 bytes: byte i of short block c holds weights kmain + 64c + 16s + i at bits
 *                 2s..2s+1.
 *   t2 (for a2):  two bit-planes per row, [nz: Kpad/8 bytes][neg: Kpad/8 bytes]; bit j of a
 *                 plane is bit j%8 of byte j/8; nz = (q != 0), neg = (q < 0).
 *   b1:           Kpad/8 bytes per row, bit j%8 of byte j/8 = (q > 0) (the on-disk order).
 *   a8:           int8 codes, Kpad bytes per row (zero padded).
 *   a2:           planes [nz][neg] like t2 for a2.
 *   a1:           Kpad/8 bytes per row, bit = (a > 0); padding bits 0.
 *
 * Integer accumulator acc[m][n] = sum_k q[n][k] * a[m][k] (exact, int32). Float epilogue,
 * each step rounded to float32 (no FMA contraction):
 *   t = (float)acc * a_scale[m];
 *   if (a_offset) t = t + a_offset[m] * (float)wsum[n];      (wsum[n] = sum_k q[n][k])
 *   t = t * w_scale[n];
 *   if (bias) t = t + bias[n];
 */
#ifndef TBT_KERNELS_H
#define TBT_KERNELS_H

#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#if defined(_WIN32)
#define TBT_API __declspec(dllexport)
#elif defined(__GNUC__) || defined(__clang__)
#define TBT_API __attribute__((visibility("default")))
#else
#define TBT_API
#endif

#define TBT_ABI_VERSION 4
#define TBT_KBLOCK 256
#define TBT_KTAIL 64 /* Kpad granularity of t2a8 and b1a8 */

/* kernel formats (weight x activation) */
enum { TBT_T2A8 = 0, TBT_B1A8 = 1, TBT_T2A2 = 2, TBT_B1A1 = 3, TBT_NUM_FORMATS = 4 };

/* instruction-set backends; TBT_ISA_AUTO picks the best one the CPU supports */
enum { TBT_ISA_AUTO = 0, TBT_ISA_SCALAR = 1, TBT_ISA_AVX2 = 2, TBT_ISA_AVX512 = 3 };

/* return codes */
enum { TBT_OK = 0, TBT_EINVAL = -1, TBT_EISA = -2 };

/* CPU feature bits of tbt_cpu_features() */
enum {
  TBT_CPU_AVX2 = 1 << 0, TBT_CPU_AVX512F = 1 << 1, TBT_CPU_AVX512BW = 1 << 2,
  TBT_CPU_AVX512VL = 1 << 3, TBT_CPU_AVX512VNNI = 1 << 4, TBT_CPU_AVX512VPOPCNTDQ = 1 << 5,
  TBT_CPU_POPCNT = 1 << 6, TBT_CPU_FMA = 1 << 7
};

TBT_API int tbt_abi_version(void);
TBT_API unsigned tbt_cpu_features(void);
/* 1 if `isa` is compiled in and supported by this CPU (TBT_ISA_AUTO: always 1) */
TBT_API int tbt_isa_available(int isa);
/* the ISA that TBT_ISA_AUTO resolves to for kernel format `fmt` */
TBT_API int tbt_resolve_isa(int fmt, int isa);
/* 2: own pthread pool (default), 1: OpenMP (TBT_OPENMP=1 build), 0: single-threaded */
TBT_API int tbt_threading(void);
/* n <= 0: the default (online CPUs; OpenMP builds: OMP_NUM_THREADS) */
TBT_API void tbt_set_num_threads(int n);
TBT_API int tbt_get_num_threads(void);
/* minimum M*N*Kpad multiply-accumulates before a call is split across threads */
TBT_API void tbt_set_parallel_threshold(int64_t macs);
/* chunks each thread's share of a parallel GEMM is cut into (0: the default, 2 below 2^23
 * multiply-adds and 8 above) */
TBT_API void tbt_set_pool_chunks(int n);

/* y (M x N, row-major float32) = epilogue(acc). w: weight rows (stride w_stride bytes), a:
 * activation rows (stride a_stride bytes), both in the kernel layout of `fmt`. wsum: int32[N];
 * w_scale: float[N]; a_scale: float[M]; a_offset, bias, acc_out (int32 M x N) may be NULL.
 * K: logical in_features (only b1a1 needs it), Kpad: padded K (above: a multiple of
 * TBT_KBLOCK, or of TBT_KTAIL for t2a8 and b1a8). */
TBT_API int tbt_gemm(int fmt, int isa, const uint8_t *w, int64_t w_stride, const int32_t *wsum,
             const float *w_scale, const void *a, int64_t a_stride, const float *a_scale,
             const float *a_offset, const float *bias, int64_t M, int64_t N, int64_t K,
             int64_t Kpad, float *y, int32_t *acc_out);

/* Named entry points (the same call with fmt fixed). */
#define TBT_GEMM_ARGS                                                                       \
  int isa, const uint8_t *w, int64_t w_stride, const int32_t *wsum, const float *w_scale,   \
      const void *a, int64_t a_stride, const float *a_scale, const float *a_offset,         \
      const float *bias, int64_t M, int64_t N, int64_t K, int64_t Kpad, float *y,           \
      int32_t *acc_out
TBT_API int tbt_gemm_t2a8(TBT_GEMM_ARGS);
TBT_API int tbt_gemm_b1a8(TBT_GEMM_ARGS);
TBT_API int tbt_gemm_t2a2(TBT_GEMM_ARGS);
TBT_API int tbt_gemm_b1a1(TBT_GEMM_ARGS);

/* GEMM on a "lanes" layout (gemm_lanes_avx512.c: output rows in the vector lanes, no
 * horizontal sums; for M > 1), any format, AVX-512 only (TBT_EISA elsewhere: use tbt_gemm;
 * t2a2/b1a1 need VPOPCNTDQ). Same arguments and results as tbt_gemm, with w_lanes in place of w:
 *   t2a8: ceil(N/32)*2 groups of 16 rows, 4*Kpad bytes each (32-bit lane = row, 2-bit c = q+1);
 *   b1a8: the same layout holding c = bit (0/1);
 *   b1a1: ceil(N/32)*4 groups of 8 rows, Kpad bytes each (64-bit lane = row);
 *   t2a2: ceil(N/32)*4 groups of 8 rows, 2*Kpad bytes each: per 64 K, the nz words of the 8
 *         rows, then their neg words. */
TBT_API int tbt_gemm_lanes(int fmt, int isa, const uint8_t *w_lanes, const int32_t *wsum,
                           const float *w_scale, const void *a, int64_t a_stride,
                           const float *a_scale, const float *a_offset, const float *bias,
                           int64_t M, int64_t N, int64_t K, int64_t Kpad, float *y,
                           int32_t *acc_out);
/* 1 if the lanes GEMM of kernel format `fmt` runs with `isa` here */
TBT_API int tbt_lanes_available(int fmt, int isa);

/* Activation layout helpers: int8 codes (M x K, row stride K) -> kernel layout rows of
 * `out_stride` bytes. a8: copy + zero pad; a2: codes in {-1,0,1} -> [nz][neg] planes;
 * a1: codes in {-1,1} -> bits (a > 0). Return TBT_EINVAL on a code outside the format. */
TBT_API int tbt_prepare_a8(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, int8_t *out);
TBT_API int tbt_prepare_a2(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, uint8_t *out);
TBT_API int tbt_prepare_a1(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, uint8_t *out);

/* ---- one call per layer: float32 x -> activation quantizer -> kernel -> float32 y --------- */

/* activation quantizers (the trained ones, tbt/runtime/linear.py ActSpec) */
enum {
  TBT_ACT_MINMAX_SYM = 0,     /* a8: clip to [-c, c], s = 127 * (1 / max|x|), rint(x s)      */
  TBT_ACT_MINMAX_ASYM = 1,    /* a8: clip, u = rint((x - min) / range * 255), stored u - 128  */
  TBT_ACT_TERNARY = 2,        /* a2: clip(rint((x - shift) / alpha), -1, 1)                   */
  TBT_ACT_TERNARY_NONNEG = 3, /* a2: c = clip(rint((x - shift) / alpha), 0, 2); + shift back  */
  TBT_ACT_BINARY = 4,         /* a1: sign(x - shift), 0 -> +1                                  */
  TBT_ACT_BINARY_NONNEG = 5   /* a1: clip(rint(x / alpha), 0, 1)                               */
};
/* what is subtracted before quantizing: nothing, the caller's value (the paper's signed
 * quantizers: the tensor mean as torch computed it), or the tensor minimum (released code,
 * non-negative inputs; added back as the offset) */
enum { TBT_SHIFT_NONE = 0, TBT_SHIFT_GIVEN = 1, TBT_SHIFT_MIN = 2 };

/* A layer: its prepared weight (tbt_gemm's arguments) and its activation quantizer.
 * act_param: the clip c (8-bit) or alpha_c = max(alpha, 1e-5) (2/1-bit), as float32.
 * w_lanes (may be NULL): the weight's lanes layout (tbt_gemm_lanes), used from M >= lanes_min_m. */
typedef struct tbt_plan {
  int32_t fmt, isa;
  const uint8_t *w;
  int64_t w_stride;
  const int32_t *wsum;
  const float *w_scale, *bias; /* bias may be NULL */
  int64_t N, K, Kpad;
  int32_t act_kind, shift_mode;
  float act_param, reserved;
  const uint8_t *w_lanes;
  int64_t lanes_min_m;
} tbt_plan;

/* bytes of `work` tbt_linear needs for M rows */
TBT_API int64_t tbt_linear_workspace(const tbt_plan *p, int64_t M);
/* y (M x N) = epilogue(Q(x) . W^T): x is M x K float32, contiguous, quantized as ONE tensor
 * (one scale/offset, as the trained quantizer). zeros (may be NULL) receives, for
 * TBT_ACT_BINARY, the count of exact zeros of x - shift (coded +1; torch's sign gives 0). */
TBT_API int tbt_linear(const tbt_plan *p, const float *x, int64_t M, float shift, void *work,
                       int64_t work_bytes, float *y, int64_t *zeros);
/* The quantizer alone: int8 codes (M x K; a8 codes, or a2/a1 codes in {-1,0,1}/{-1,1}) and the
 * per-row scale/offset (offset 0 where the format has none). For tests against the reference. */
TBT_API int tbt_quantize_act(const tbt_plan *p, const float *x, int64_t M, float shift,
                             int8_t *codes, float *scale, float *offset, int64_t *zeros);

#ifdef __cplusplus
}
#endif
#endif /* TBT_KERNELS_H */
