/* Dispatch, threading and the driver shared by every ISA: tiles of 4 weight rows x 4
 * activation rows, integer correction of the raw tile sums, float32 epilogue. */
#if !defined(_POSIX_C_SOURCE) && !defined(_WIN32)
#define _POSIX_C_SOURCE 200809L
#endif
#include <stdlib.h>

#include "tbt_internal.h"

#if defined(_OPENMP)
#include <omp.h>
#define TBT_THREADING 1
#elif (defined(__unix__) || defined(__APPLE__)) && !defined(__STDC_NO_ATOMICS__)
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <unistd.h>
#define TBT_THREADING 2
#else
#define TBT_THREADING 0
#endif

#define TBT_MAX_THREADS 256

int tbt_abi_version(void) { return TBT_ABI_VERSION; }
int tbt_threading(void) { return TBT_THREADING; }

/* ---- CPU features and ISA selection ---------------------------------------------------- */

unsigned tbt_cpu_features(void) {
  unsigned f = 0;
#if TBT_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("popcnt")) f |= TBT_CPU_POPCNT;
  if (__builtin_cpu_supports("avx2")) f |= TBT_CPU_AVX2;
  if (__builtin_cpu_supports("fma")) f |= TBT_CPU_FMA;
  if (__builtin_cpu_supports("avx512f")) f |= TBT_CPU_AVX512F;
  if (__builtin_cpu_supports("avx512bw")) f |= TBT_CPU_AVX512BW;
  if (__builtin_cpu_supports("avx512vl")) f |= TBT_CPU_AVX512VL;
  if (__builtin_cpu_supports("avx512vnni")) f |= TBT_CPU_AVX512VNNI;
  if (__builtin_cpu_supports("avx512vpopcntdq")) f |= TBT_CPU_AVX512VPOPCNTDQ;
#endif
  return f;
}

#if TBT_X86
static const unsigned AVX512_NEED =
    TBT_CPU_AVX512F | TBT_CPU_AVX512BW | TBT_CPU_AVX512VL | TBT_CPU_AVX512VNNI;
#endif

int tbt_isa_available(int isa) {
  const unsigned f = tbt_cpu_features();
  switch (isa) {
    case TBT_ISA_AUTO:
    case TBT_ISA_SCALAR: return 1;
#if TBT_X86
    case TBT_ISA_AVX2: return (f & TBT_CPU_AVX2) != 0;
    case TBT_ISA_AVX512: return (f & AVX512_NEED) == AVX512_NEED && (f & TBT_CPU_AVX2);
#endif
    default: (void)f; return 0;
  }
}

int tbt_resolve_isa(int fmt, int isa) {
  if (fmt < 0 || fmt >= TBT_NUM_FORMATS) return TBT_EINVAL;
  if (isa == TBT_ISA_AUTO) {
    isa = tbt_isa_available(TBT_ISA_AVX512) ? TBT_ISA_AVX512
          : tbt_isa_available(TBT_ISA_AVX2) ? TBT_ISA_AVX2 : TBT_ISA_SCALAR;
  }
  if (!tbt_isa_available(isa)) return TBT_EISA;
  /* AVX-512 without VPOPCNTDQ (Skylake-X, Cascade Lake): popcount kernels run the AVX2 tiles */
  if (isa == TBT_ISA_AVX512 && (fmt == TBT_T2A2 || fmt == TBT_B1A1) &&
      !(tbt_cpu_features() & TBT_CPU_AVX512VPOPCNTDQ))
    return TBT_ISA_AVX2;
  return isa;
}

static const tbt_isa_table *table_for(int isa) {
  switch (isa) {
#if TBT_X86
    case TBT_ISA_AVX512: return &tbt_table_avx512;
    case TBT_ISA_AVX2: return &tbt_table_avx2;
#endif
    default: return &tbt_table_scalar;
  }
}

/* ---- threads ------------------------------------------------------------------------------ */

static int g_num_threads = 0; /* 0: default */
static int64_t g_par_threshold = (int64_t)1 << 18; /* ~3 us on one core */
static int g_pool_chunks = 0;                         /* chunks per thread; 0: by size */

static int default_threads(void) {
  static int cached = 0; /* sysconf reads /sys on every call: once is enough */
  if (cached > 0) return cached;
#if TBT_THREADING == 1
  cached = omp_get_max_threads();
#elif TBT_THREADING == 2
  long n = sysconf(_SC_NPROCESSORS_ONLN);
  cached = n > 0 ? (int)n : 1;
#else
  cached = 1;
#endif
  return cached;
}

void tbt_set_num_threads(int n) { g_num_threads = n > TBT_MAX_THREADS ? TBT_MAX_THREADS : n; }
int tbt_get_num_threads(void) {
  int n = g_num_threads > 0 ? g_num_threads : default_threads();
  return n < 1 ? 1 : n > TBT_MAX_THREADS ? TBT_MAX_THREADS : n;
}
void tbt_set_parallel_threshold(int64_t macs) { g_par_threshold = macs < 0 ? 0 : macs; }
void tbt_set_pool_chunks(int n) { g_pool_chunks = n < 0 ? 0 : n; }

/* ---- driver ------------------------------------------------------------------------------- */

/* Kpad: a multiple of TBT_KBLOCK (256) less than a block above K; the 8-bit-activation formats
 * (t2a8, b1a8) also take a multiple of TBT_KTAIL (64): their rows end with (Kpad % 256) / 64
 * short blocks (tbt_kernels.h) */
static int kblock_ok(int fmt, int64_t K, int64_t kpad) {
  const int64_t g = fmt == TBT_T2A8 || fmt == TBT_B1A8 ? TBT_KTAIL : TBT_KBLOCK;
  return K >= 1 && kpad >= K && kpad % g == 0 && kpad - K < TBT_KBLOCK;
}

/* The tail of an a8-format row, K in [kmain, kpad) (kmain = kpad rounded down to 256): raw sum
 * of one weight row and one activation row over it, portable (the tiles cover [0, kmain)).
 * t2a8: short block c (16 bytes) holds, in byte i, the codes of K = kmain + 64c + 16s + i at
 * bits 2s; b1a8: the plain bit order. */
static int32_t tail_raw(int fmt, const uint8_t *w, const int8_t *a, int64_t kmain, int64_t kpad) {
  int32_t acc = 0;
  if (fmt == TBT_T2A8) {
    const uint8_t *wt = w + kmain / 4;
    for (int64_t c = 0; c < (kpad - kmain) / 64; ++c)
      for (int s = 0; s < 4; ++s)
        for (int i = 0; i < 16; ++i)
          acc += (int32_t)((wt[16 * c + i] >> (2 * s)) & 3) * a[kmain + 64 * c + 16 * s + i];
  } else {
    for (int64_t k = kmain; k < kpad; ++k) acc += (int32_t)((w[k >> 3] >> (k & 7)) & 1) * a[k];
  }
  return acc;
}


/* raw tile sums -> exact accumulators: acc = mul * raw + add_m (see tbt_internal.h) */
static inline void correction(const job_t *j, int64_t m, int32_t *mul, int32_t *add) {
  switch (j->fmt) {
    case TBT_T2A8: *mul = 1; *add = -j->asum[m]; break;          /* sum (c - 1) a */
    case TBT_B1A8: *mul = 2; *add = -j->asum[m]; break;          /* sum (2 bit - 1) a */
    case TBT_B1A1: *mul = -2; *add = (int32_t)j->K; break;       /* agreements - disagreements */
    default: *mul = 1; *add = 0; break;                          /* t2a2: already sum q a */
  }
}

/* The float32 epilogue of tbt_kernels.h for outputs y[m][n0 .. n0+nr): tbt_epilogue4 for a
 * full tile, the same operations in scalar code otherwise (-ffp-contract=off: unfused). */
static void epilogue_row(const job_t *j, const int32_t *acc, int64_t m, int64_t n0, int nr) {
#if defined(__SSE2__)
  if (nr == 4) {
    tbt_epilogue4(j, _mm_loadu_si128((const __m128i *)acc), m, n0);
    return;
  }
#endif
  if (j->acc_out) memcpy(j->acc_out + m * j->N + n0, acc, (size_t)nr * sizeof(int32_t));
  float *y = j->y + m * j->N + n0;
  for (int r = 0; r < nr; ++r) {
    float t = (float)acc[r] * j->a_scale[m];
    if (j->a_offset) t = t + j->a_offset[m] * (float)j->wsum[n0 + r];
    t = t * j->w_scale[n0 + r];
    if (j->bias) t = t + j->bias[n0 + r];
    y[r] = t;
  }
}

#ifndef TBT_GROUP_BYTES
#define TBT_GROUP_BYTES (128 << 10)
#endif
/* GEMM over weight tiles [t0, t1): groups of weight tiles of about TBT_GROUP_BYTES (they stay
 * in L2) are swept by every block of TBT_MR activation rows in turn (those stay in L1), so each
 * weight byte comes from L2 and each activation byte from L1. */
static void run_tiles(const job_t *j, int64_t t0, int64_t t1) {
  const int64_t kmain = j->kpad / TBT_KBLOCK * TBT_KBLOCK; /* the tiles' full blocks */
  int64_t group = TBT_GROUP_BYTES / (int64_t)(TBT_NR * j->ws);
  if (group < 1) group = 1;
  for (int64_t g0 = t0; g0 < t1; g0 += group) {
    const int64_t g1 = g0 + group < t1 ? g0 + group : t1;
    for (int64_t m0 = 0; m0 < j->M; m0 += TBT_MR) {
      const int mr = (int)(j->M - m0 < TBT_MR ? j->M - m0 : TBT_MR);
      for (int64_t t = g0; t < g1; ++t) {
        const int64_t n0 = t * TBT_NR;
        const int nr = (int)(j->N - n0 < TBT_NR ? j->N - n0 : TBT_NR);
        int32_t raw[TBT_NR][TBT_MR];
        j->tile(j->w + n0 * j->ws, j->ws, nr, j->a + m0 * j->as, j->as, mr, (size_t)kmain, raw);
        if (kmain < j->kpad) /* a8 formats: the short blocks after the last full one */
          for (int r = 0; r < nr; ++r)
            for (int m = 0; m < mr; ++m)
              raw[r][m] += tail_raw(j->fmt, j->w + (n0 + r) * j->ws,
                                    (const int8_t *)(j->a + (m0 + m) * j->as), kmain, j->kpad);
        for (int m = 0; m < mr; ++m) {
          int32_t mul, add, acc[TBT_NR];
          correction(j, m0 + m, &mul, &add);
          for (int r = 0; r < nr; ++r) acc[r] = mul * raw[r][m] + add;
          epilogue_row(j, acc, m0 + m, n0, nr);
        }
      }
    }
  }
}

/* Tiles [t0, t1): the ISA's GEMV routine for full tiles when M == 1, tiles otherwise. */
static void run_range(const job_t *j, int64_t t0, int64_t t1) {
  if (j->fn) {
    j->fn(j->ctx, t0, t1);
    return;
  }
  if (j->lanes) {
    j->lanes(j, t0, t1);
    return;
  }
  if (j->M == 1 && j->gemv) {
    const int64_t full = j->N / TBT_NR; /* tiles with 4 rows */
    const int64_t f1 = t1 < full ? t1 : full;
    if (t0 < f1) j->gemv(j, t0, f1);
    if (f1 > t0) t0 = f1;
  }
  if (t0 < t1) run_tiles(j, t0, t1);
}

#if TBT_THREADING == 2
/* A persistent pool. The calling thread publishes a job and works on it too; every thread
 * claims chunks of tiles with a compare-and-swap on (job epoch, next chunk), and the caller
 * returns when all chunks are *done*, not when every worker has checked in. A worker that
 * another process keeps off the CPU therefore costs nothing: the caller does its share. (An
 * OpenMP team waits at its barrier for every thread; on a shared or oversubscribed machine
 * that stalled calls for whole scheduler quanta, 4-12 ms.) Idle workers spin briefly, then
 * sleep on a condition variable. */
#define TBT_SPIN 2000 /* pause iterations (~50 us on Zen 4) a worker polls before sleeping */

typedef struct {
  pthread_mutex_t mu, run_mu; /* mu: job publication; run_mu: one caller at a time */
  pthread_cond_t cv;
  int started, sleepers, max_workers;
  job_t job;
  int64_t chunk, nchunks;
  _Atomic uint64_t epoch; /* bumped when a job is published */
  _Atomic uint64_t state; /* (epoch & 0xffffffff) << 32 | next chunk */
  _Atomic int64_t done;   /* chunks finished in the current job */
} pool_t;

static pool_t g_pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .run_mu = PTHREAD_MUTEX_INITIALIZER,
                        .cv = PTHREAD_COND_INITIALIZER};

static inline void cpu_relax(void) {
#if TBT_X86
  __builtin_ia32_pause();
#endif
}

static void pool_work(uint64_t e, const job_t *j, int64_t chunk, int64_t nchunks) {
  const uint64_t tag = (e & 0xffffffffu) << 32;
  for (;;) {
    uint64_t s = atomic_load_explicit(&g_pool.state, memory_order_acquire);
    if ((s & ~(uint64_t)0xffffffffu) != tag || (int64_t)(s & 0xffffffffu) >= nchunks) return;
    if (!atomic_compare_exchange_weak(&g_pool.state, &s, s + 1)) continue;
    const int64_t t0 = (int64_t)(s & 0xffffffffu) * chunk;
    const int64_t t1 = t0 + chunk < j->ntiles ? t0 + chunk : j->ntiles;
    run_range(j, t0, t1);
    atomic_fetch_add_explicit(&g_pool.done, 1, memory_order_release);
  }
}

static void *pool_worker(void *arg) {
  const int id = (int)(intptr_t)arg; /* 1-based */
  uint64_t seen = 0;
  for (;;) {
    uint64_t e = atomic_load_explicit(&g_pool.epoch, memory_order_acquire);
    for (int i = 0; e == seen && i < TBT_SPIN; ++i) {
      cpu_relax();
      e = atomic_load_explicit(&g_pool.epoch, memory_order_acquire);
    }
    pthread_mutex_lock(&g_pool.mu);
    while ((e = atomic_load(&g_pool.epoch)) == seen) {
      g_pool.sleepers++;
      pthread_cond_wait(&g_pool.cv, &g_pool.mu);
      g_pool.sleepers--;
    }
    const job_t j = g_pool.job; /* consistent with epoch e: both written under mu */
    const int64_t chunk = g_pool.chunk, nchunks = g_pool.nchunks;
    const int take = id <= g_pool.max_workers;
    pthread_mutex_unlock(&g_pool.mu);
    seen = e;
    if (take) pool_work(e, &j, chunk, nchunks);
  }
  return NULL;
}

static void pool_after_fork(void) { /* the child has no workers: start afresh */
  pthread_mutex_init(&g_pool.mu, NULL);
  pthread_mutex_init(&g_pool.run_mu, NULL);
  pthread_cond_init(&g_pool.cv, NULL);
  g_pool.started = g_pool.sleepers = 0;
}

static void pool_grow(int workers) { /* under mu */
  static int atfork_done = 0;
  if (!atfork_done) {
    pthread_atfork(NULL, NULL, pool_after_fork);
    atfork_done = 1;
  }
  while (g_pool.started < workers && g_pool.started < TBT_MAX_THREADS - 1) {
    pthread_t th;
    pthread_attr_t attr;
    pthread_attr_init(&attr);
    pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
    const int ok = pthread_create(&th, &attr, pool_worker, (void *)(intptr_t)(g_pool.started + 1));
    pthread_attr_destroy(&attr);
    if (ok != 0) break; /* fewer workers: the caller covers the rest */
    g_pool.started++;
  }
}

static void run_parallel(job_t *j, int nt) {
  if (pthread_mutex_trylock(&g_pool.run_mu) != 0) { /* pool busy (another caller) */
    run_range(j, 0, j->ntiles);
    return;
  }
  /* chunks per thread: each claim moves the job's cache line between cores (~0.1-0.2 us), so
   * GEMMs under 2^23 multiply-adds (decoding's 0.3-2 M) take 2 and larger jobs 8, for balance
   * when a thread is held up (benchmarks/results/engine-pool-2026-12-05.md) */
  const int cpt = j->fn                                          ? 8 /* tbt_parallel_for */
                  : g_pool_chunks                                  ? g_pool_chunks
                  : j->M * j->N * j->kpad >= ((int64_t)1 << 23)    ? 8
                                                                   : 2;
  int64_t chunk = j->ntiles / ((int64_t)nt * cpt);
  if (chunk < 1) chunk = 1;
  const int64_t nchunks = (j->ntiles + chunk - 1) / chunk;
  pthread_mutex_lock(&g_pool.mu);
  pool_grow(nt - 1);
  g_pool.job = *j;
  g_pool.chunk = chunk;
  g_pool.nchunks = nchunks;
  g_pool.max_workers = nt - 1;
  const uint64_t e = atomic_load(&g_pool.epoch) + 1;
  atomic_store(&g_pool.done, 0);
  atomic_store(&g_pool.state, (e & 0xffffffffu) << 32);
  atomic_store_explicit(&g_pool.epoch, e, memory_order_release);
  if (g_pool.sleepers) pthread_cond_broadcast(&g_pool.cv);
  pthread_mutex_unlock(&g_pool.mu);
  pool_work(e, j, chunk, nchunks);
  for (int i = 0; atomic_load_explicit(&g_pool.done, memory_order_acquire) < nchunks; ++i) {
    if (i % 256 == 255) sched_yield(); /* a preempted worker holds a chunk: let it run */
    cpu_relax();
  }
  pthread_mutex_unlock(&g_pool.run_mu);
}

#elif TBT_THREADING == 1
static void run_parallel(job_t *j, int nt) {
  int64_t chunk = j->ntiles / ((int64_t)nt * 8);
  if (chunk < 1) chunk = 1;
  const int64_t nchunks = (j->ntiles + chunk - 1) / chunk;
#pragma omp parallel for num_threads(nt) schedule(dynamic, 1)
  for (int64_t c = 0; c < nchunks; ++c) {
    const int64_t t0 = c * chunk, t1 = t0 + chunk < j->ntiles ? t0 + chunk : j->ntiles;
    run_range(j, t0, t1);
  }
}
#else
static void run_parallel(job_t *j, int nt) {
  (void)nt;
  run_range(j, 0, j->ntiles);
}
#endif


/* bytes of one row group of a lanes layout: t2a8/b1a8 16 rows of 2-bit codes, b1a1 8 rows
 * of bits, t2a2 8 rows of two bit-planes */
static int64_t lanes_group_bytes(int fmt, int64_t kpad) {
  return fmt == TBT_T2A8 || fmt == TBT_B1A8 ? 4 * kpad : fmt == TBT_B1A1 ? kpad : 2 * kpad;
}

/* lanes: a lanes layout (w = row groups, w_stride = bytes per group) */
static int gemm_run(int fmt, int isa, int lanes, const uint8_t *w, int64_t w_stride,
                    const int32_t *wsum, const float *w_scale, const void *a, int64_t a_stride,
                    const float *a_scale, const float *a_offset, const float *bias, int64_t M,
                    int64_t N, int64_t K, int64_t Kpad, float *y, int32_t *acc_out) {
  const int eff = tbt_resolve_isa(fmt, isa);
  if (eff < 0) return eff;
  if (!w || !w_scale || !a || !a_scale || !y || M < 1 || N < 1 || !kblock_ok(fmt, K, Kpad))
    return TBT_EINVAL;
  if (a_offset && !wsum) return TBT_EINVAL;
  const int is_a8 = fmt == TBT_T2A8 || fmt == TBT_B1A8;
  const int64_t wbytes = lanes ? lanes_group_bytes(fmt, Kpad) /* one row group */
                         : fmt == TBT_T2A8 ? Kpad / 4 : fmt == TBT_T2A2 ? Kpad / 4 : Kpad / 8;
  const int64_t abytes = is_a8 ? Kpad : fmt == TBT_T2A2 ? Kpad / 4 : Kpad / 8;
  if (w_stride < wbytes || a_stride < abytes) return TBT_EINVAL;
  tbt_gemv_fn lanes_fn = NULL;
  if (lanes) {
#if TBT_X86
    if (eff == TBT_ISA_AVX512)
      lanes_fn = fmt == TBT_T2A8 || fmt == TBT_B1A8 ? tbt_t2a8_lanes_avx512
                 : fmt == TBT_B1A1                  ? tbt_b1a1_lanes_avx512
                                                    : tbt_t2a2_lanes_avx512;
#endif
    if (!lanes_fn) return TBT_EISA;
  }

  const tbt_isa_table *tab = table_for(eff);
  int32_t asum_stack[256], *asum = NULL; /* no allocation for M <= 256 */
  if (is_a8) {
    asum = M <= 256 ? asum_stack : (int32_t *)malloc((size_t)M * sizeof(int32_t));
    if (!asum) return TBT_EINVAL;
    if (tab->rowsum_a8) {
      tab->rowsum_a8((const int8_t *)a, (size_t)a_stride, M, (size_t)Kpad, asum);
    } else {
      for (int64_t m = 0; m < M; ++m) {
        const int8_t *am = (const int8_t *)a + m * a_stride;
        int32_t s = 0;
        for (int64_t k = 0; k < Kpad; ++k) s += am[k];
        asum[m] = s;
      }
    }
  }
  const int64_t ntiles = lanes_fn ? (N + 31) / 32 : (N + TBT_NR - 1) / TBT_NR;
  job_t job = {tab->tile[fmt], tab->gemv[fmt], fmt, w, (size_t)w_stride, wsum, w_scale,
               (const uint8_t *)a, (size_t)a_stride, a_scale, a_offset, bias, asum,
               M, N, K, Kpad, ntiles, y, acc_out, lanes_fn, NULL, NULL};
  int nt = tbt_get_num_threads();
  if (nt > ntiles) nt = (int)ntiles;
  if (nt > 1 && M * N * Kpad >= g_par_threshold)
    run_parallel(&job, nt);
  else
    run_range(&job, 0, ntiles);
  if (asum != asum_stack) free(asum);
  return TBT_OK;
}

void tbt_parallel_for(int64_t n, void (*fn)(void *ctx, int64_t t0, int64_t t1), void *ctx) {
  if (n < 1) return;
  int nt = tbt_get_num_threads();
  if (nt > n) nt = (int)n;
  if (nt <= 1) {
    fn(ctx, 0, n);
    return;
  }
  job_t job;
  memset(&job, 0, sizeof job);
  job.fn = fn;
  job.ctx = ctx;
  job.ntiles = n;
  run_parallel(&job, nt);
}

int tbt_gemm(int fmt, int isa, const uint8_t *w, int64_t w_stride, const int32_t *wsum,
             const float *w_scale, const void *a, int64_t a_stride, const float *a_scale,
             const float *a_offset, const float *bias, int64_t M, int64_t N, int64_t K,
             int64_t Kpad, float *y, int32_t *acc_out) {
  return gemm_run(fmt, isa, 0, w, w_stride, wsum, w_scale, a, a_stride, a_scale, a_offset, bias,
                  M, N, K, Kpad, y, acc_out);
}

int tbt_gemm_lanes(int fmt, int isa, const uint8_t *w_lanes, const int32_t *wsum,
                   const float *w_scale, const void *a, int64_t a_stride, const float *a_scale,
                   const float *a_offset, const float *bias, int64_t M, int64_t N, int64_t K,
                   int64_t Kpad, float *y, int32_t *acc_out) {
  if (fmt < 0 || fmt >= TBT_NUM_FORMATS) return TBT_EINVAL;
  return gemm_run(fmt, isa, 1, w_lanes, lanes_group_bytes(fmt, Kpad), wsum, w_scale, a,
                  a_stride, a_scale, a_offset, bias, M, N, K, Kpad, y, acc_out);
}

int tbt_lanes_available(int fmt, int isa) {
#if TBT_X86
  if (fmt < 0 || fmt >= TBT_NUM_FORMATS) return 0;
  return tbt_resolve_isa(fmt, isa) == TBT_ISA_AVX512;
#else
  (void)fmt;
  (void)isa;
  return 0;
#endif
}

#define TBT_GEMM_PASS \
  isa, w, w_stride, wsum, w_scale, a, a_stride, a_scale, a_offset, bias, M, N, K, Kpad, y, acc_out
int tbt_gemm_t2a8(TBT_GEMM_ARGS) { return tbt_gemm(TBT_T2A8, TBT_GEMM_PASS); }
int tbt_gemm_b1a8(TBT_GEMM_ARGS) { return tbt_gemm(TBT_B1A8, TBT_GEMM_PASS); }
int tbt_gemm_t2a2(TBT_GEMM_ARGS) { return tbt_gemm(TBT_T2A2, TBT_GEMM_PASS); }
int tbt_gemm_b1a1(TBT_GEMM_ARGS) { return tbt_gemm(TBT_B1A1, TBT_GEMM_PASS); }

/* ---- activation layouts ------------------------------------------------------------------ */

int tbt_prepare_a8(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, int8_t *out) {
  if (!codes || !out || M < 1 || !kblock_ok(TBT_T2A8, K, Kpad)) return TBT_EINVAL;
  for (int64_t m = 0; m < M; ++m) {
    memcpy(out + m * Kpad, codes + m * K, (size_t)K);
    memset(out + m * Kpad + K, 0, (size_t)(Kpad - K));
  }
  return TBT_OK;
}

int tbt_prepare_a2(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, uint8_t *out) {
  if (!codes || !out || M < 1 || !kblock_ok(TBT_T2A2, K, Kpad)) return TBT_EINVAL;
  const int64_t plane = Kpad / 8;
  memset(out, 0, (size_t)(M * 2 * plane));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t *c = codes + m * K;
    uint8_t *nz = out + m * 2 * plane, *neg = nz + plane;
    for (int64_t k = 0; k < K; ++k) {
      const uint8_t bit = (uint8_t)(1u << (k & 7));
      if (c[k] == 1) {
        nz[k >> 3] |= bit;
      } else if (c[k] == -1) {
        nz[k >> 3] |= bit;
        neg[k >> 3] |= bit;
      } else if (c[k] != 0) {
        return TBT_EINVAL;
      }
    }
  }
  return TBT_OK;
}

int tbt_prepare_a1(const int8_t *codes, int64_t M, int64_t K, int64_t Kpad, uint8_t *out) {
  if (!codes || !out || M < 1 || !kblock_ok(TBT_B1A1, K, Kpad)) return TBT_EINVAL;
  const int64_t row = Kpad / 8;
  memset(out, 0, (size_t)(M * row));
  for (int64_t m = 0; m < M; ++m) {
    const int8_t *c = codes + m * K;
    uint8_t *bits = out + m * row;
    for (int64_t k = 0; k < K; ++k) {
      if (c[k] == 1)
        bits[k >> 3] |= (uint8_t)(1u << (k & 7));
      else if (c[k] != -1)
        return TBT_EINVAL;
    }
  }
  return TBT_OK;
}
