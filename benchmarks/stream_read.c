/* Streaming read bandwidth of this machine, for docs/engine.md's bandwidth bound: each thread
 * sums its share of a buffer with 64-byte AVX-512 loads; best of the passes. Bytes per second
 * of wall time and per second of thread-CPU time (the latter survives a loaded machine: time
 * slices given to other jobs do not count).
 *
 *   gcc -O3 -mavx512f -pthread -o /tmp/stream_read benchmarks/stream_read.c
 *   /tmp/stream_read MiB THREADS PASSES      (e.g. 1024 1 10: DRAM; 32 1 10: the model's size) */
#include <immintrin.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double clk(clockid_t id) {
  struct timespec t;
  clock_gettime(id, &t);
  return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

typedef struct {
  const char *p;
  size_t n;
  long long out;
  double cpu;
} arg_t;

static void *run(void *v) {
  arg_t *a = v;
  const double c0 = clk(CLOCK_THREAD_CPUTIME_ID);
  __m512i s0 = _mm512_setzero_si512(), s1 = s0, s2 = s0, s3 = s0;
  for (size_t i = 0; i < a->n; i += 256) {
    s0 = _mm512_add_epi64(s0, _mm512_load_si512(a->p + i));
    s1 = _mm512_add_epi64(s1, _mm512_load_si512(a->p + i + 64));
    s2 = _mm512_add_epi64(s2, _mm512_load_si512(a->p + i + 128));
    s3 = _mm512_add_epi64(s3, _mm512_load_si512(a->p + i + 192));
  }
  a->cpu = clk(CLOCK_THREAD_CPUTIME_ID) - c0;
  a->out = _mm512_reduce_add_epi64(_mm512_add_epi64(_mm512_add_epi64(s0, s1),
                                                    _mm512_add_epi64(s2, s3)));
  return NULL;
}

int main(int argc, char **argv) {
  if (argc < 4) {
    fprintf(stderr, "usage: %s MiB THREADS PASSES\n", argv[0]);
    return 2;
  }
  const size_t n = (size_t)atoll(argv[1]) << 20;
  const int nt = atoi(argv[2]), passes = atoi(argv[3]);
  if (nt < 1 || nt > 64 || passes < 1 || n % (256 * (size_t)nt)) {
    fprintf(stderr, "THREADS in 1..64, PASSES >= 1, MiB a multiple of THREADS / 4\n");
    return 2;
  }
  char *p = aligned_alloc(4096, n);
  memset(p, 1, n);
  double best = 1e30, best_cpu = 1e30;
  long long chk = 0;
  for (int r = 0; r < passes; ++r) {
    pthread_t th[64];
    arg_t a[64];
    double t = clk(CLOCK_MONOTONIC), worst = 0.0;
    for (int i = 0; i < nt; ++i) {
      a[i] = (arg_t){p + i * (n / nt), n / nt, 0, 0.0};
      pthread_create(&th[i], NULL, run, &a[i]);
    }
    for (int i = 0; i < nt; ++i) {
      pthread_join(th[i], NULL);
      chk += a[i].out;
      worst = a[i].cpu > worst ? a[i].cpu : worst;
    }
    t = clk(CLOCK_MONOTONIC) - t;
    best = t < best ? t : best;
    best_cpu = worst < best_cpu ? worst : best_cpu;
  }
  printf("%zu MiB, %d thread(s): %.1f GB/s wall, %.1f GB/s per thread-CPU time "
         "(best of %d; %lld)\n",
         n >> 20, nt, (double)n / best / 1e9, (double)n / best_cpu / 1e9, passes, chk & 1);
  free(p);
  return 0;
}
