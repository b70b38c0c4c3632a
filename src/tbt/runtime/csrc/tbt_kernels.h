/* tbt native kernels: y = x . W^T for packed ternary/binary weights and quantized activations.
 *
 * Plain C ABI (raw pointers + sizes), loaded by tbt/runtime/kernels/native.py through ctypes.
 * The numpy reference (tbt/runtime/kernels/ref.py) is normative: the integer accumulators
 * below equal it exactly and the float epilogue is the same sequence of float32 operations.
 *
 * Kernel ("runtime") layouts: K is padded to Kpad = a multiple of TBT_KBLOCK (256) with codes
 * of zero weight / zero activation; rows are contiguous, row strides are given in bytes.
 *   t2 (for a8):  Kpad/4 bytes per row; in each 64-byte block b, byte i holds the codes
 *                 (q + 1) of weights 256b + 64s + i at bits 2s..2s+1, s = 0..3.
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

#define TBT_ABI_VERSION 1
#define TBT_KBLOCK 256

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

/* y (M x N, row-major float32) = epilogue(acc). w: weight rows (stride w_stride bytes), a:
 * activation rows (stride a_stride bytes), both in the kernel layout of `fmt`. wsum: int32[N];
 * w_scale: float[N]; a_scale: float[M]; a_offset, bias, acc_out (int32 M x N) may be NULL.
 * K: logical in_features (only b1a1 needs it), Kpad: padded K (multiple of TBT_KBLOCK). */
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

/* Activation layout helpers: int8 codes (M x K, row stride K) -> kernel layout rows of
 * `out_stride` bytes. a8: copy + zero pad; a2: codes in {-1,0,1} -> [nz][neg] planes;
 * a1: codes in {-1,1} -> bits (a > 0). Return TBT_EINVAL on a code outside the format. */
TBT_API int tbt_prepare_a8(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, int8_t *out);
TBT_API int tbt_prepare_a2(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, uint8_t *out);
TBT_API int tbt_prepare_a1(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, uint8_t *out);

#ifdef __cplusplus
}
#endif
#endif /* TBT_KERNELS_H */
