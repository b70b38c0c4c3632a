/* Fused CPU kernels for the training-time activation quantizers (tbt.quant.fused).
 *
 * The torch formulation of the elastic (LSQ-style) quantizer makes ~8 passes over memory in the
 * forward (shift, divide, round, clamp, multiply, two compares, and) and ~7 in the backward
 * (masked copy, int8 -> float cast, two dot products, a sum); on a CPU these tensors (e.g. the
 * B*H*T*T attention probabilities) are far larger than the caches, so the quantizer costs about
 * as much as the matmuls it feeds. Here each direction is one pass.
 *
 * Numerics are the torch path's, operation for operation, in float32 (built with
 * -ffp-contract=off, so no FMA contraction): r = (x - offset) / a; code = rint(r) clamped to
 * [qn, qp] (rint under the default rounding mode = round half to even, like torch.round), or
 * sign(x - offset) for signed binary; y = code * a (+ offset when it is added back). The forward
 * is therefore bit-identical to tbt.quant.activation's torch path. The backward's three sums are
 * accumulated in double per thread, so the alpha gradient agrees with torch's float32 reductions
 * to float32 rounding, not bit for bit (torch's own summation order is unspecified too).
 *
 * Saved state: one int8 per element, code * 2 + inside, where inside = 1[qn <= r <= qp] (the STE
 * window, bounds inclusive). |code| <= 63 is required (bits <= 6), checked by the caller.
 *
 * Threads: the element range is split into contiguous chunks, one pthread each (created per
 * call; only for n >= PAR_MIN elements, where a call takes >= ~100 us and thread start-up is
 * noise). No OpenMP: a second OpenMP runtime next to torch's is what tbt's kernels avoid too.
 */
#pragma GCC optimize("O3")  /* the loops below must vectorise */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>

#define TBT_QOPS_ABI 1
#define MAX_THREADS 64
#define PAR_MIN (1 << 18)

#if defined(_WIN32)
#define API __declspec(dllexport)
#else
#define API __attribute__((visibility("default")))
#endif

API int tbt_qops_abi_version(void) { return TBT_QOPS_ABI; }

/* ---- a tiny parallel-for over [0, n) --------------------------------------------------------- */

typedef void (*range_fn)(void *ctx, int64_t lo, int64_t hi, int tid);

typedef struct {
    range_fn fn;
    void *ctx;
    int64_t lo, hi;
    int tid;
} task_t;

static void *run_task(void *p) {
    task_t *t = (task_t *)p;
    t->fn(t->ctx, t->lo, t->hi, t->tid);
    return NULL;
}

static int parallel_for(int64_t n, int nthreads, range_fn fn, void *ctx) {
    if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
    if (nthreads < 1 || n < PAR_MIN) nthreads = 1;
    if (nthreads == 1) {
        fn(ctx, 0, n, 0);
        return 1;
    }
    task_t tasks[MAX_THREADS];
    pthread_t th[MAX_THREADS];
    int started[MAX_THREADS];
    int64_t chunk = (n + nthreads - 1) / nthreads;
    chunk = (chunk + 63) & ~(int64_t)63; /* cache-line aligned chunk boundaries */
    for (int t = 0; t < nthreads; t++) {
        int64_t lo = (int64_t)t * chunk, hi = lo + chunk;
        if (lo > n) lo = n;
        if (hi > n) hi = n;
        tasks[t] = (task_t){fn, ctx, lo, hi, t};
        started[t] = 0;
    }
    for (int t = 1; t < nthreads; t++)
        started[t] = pthread_create(&th[t], NULL, run_task, &tasks[t]) == 0;
    run_task(&tasks[0]);
    for (int t = 1; t < nthreads; t++) {
        if (started[t]) pthread_join(th[t], NULL);
        else run_task(&tasks[t]); /* could not start a thread: do its chunk here */
    }
    return nthreads;
}

/* ---- elastic quantizer ------------------------------------------------------------------------ */

typedef struct {
    const float *x;
    float *y;
    int8_t *saved;
    float a, offset, add_back;
    int qn, qp, use_sign;
} efwd_t;

/* Round half to even of a value already clamped to [-64, 64]: adding and subtracting 1.5*2^23
 * leaves the nearest integer under the default rounding mode (exact for |v| < 2^22), the same
 * result as rintf / torch.round, without a libm call in the loop. round(clamp(r, qn, qp)) equals
 * clamp(round(r), qn, qp) because qn, qp are integers and rounding is monotone. */
#define RNE_MAGIC 12582912.0f

#define ELASTIC_FWD_BODY                                                                   \
    const efwd_t *c = (const efwd_t *)p;                                                   \
    const float a = c->a, off = c->offset, add = c->add_back;                              \
    const float qn = (float)c->qn, qp = (float)c->qp;                                      \
    const float *x = c->x;                                                                 \
    float *y = c->y;                                                                       \
    int8_t *saved = c->saved;                                                              \
    if (c->use_sign) {                                                                     \
        for (int64_t i = lo; i < hi; i++) {                                                \
            float xs = x[i] - off;                                                         \
            float r = xs / a;                                                              \
            float code = (float)((xs > 0.0f) - (xs < 0.0f));                               \
            int inside = (r >= qn) & (r <= qp);                                            \
            y[i] = code * a + add;                                                         \
            saved[i] = (int8_t)((int)code * 2 + inside);                                   \
        }                                                                                  \
    } else {                                                                               \
        for (int64_t i = lo; i < hi; i++) {                                                \
            float r = (x[i] - off) / a;                                                    \
            float rc = r < qn ? qn : r;                                                    \
            rc = rc > qp ? qp : rc;                                                        \
            float code = (rc + RNE_MAGIC) - RNE_MAGIC;                                     \
            int inside = (r >= qn) & (r <= qp);                                            \
            y[i] = code * a + add;                                                         \
            saved[i] = (int8_t)((int)code * 2 + inside);                                   \
        }                                                                                  \
    }

static void elastic_fwd_generic(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    ELASTIC_FWD_BODY
}

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2"))) static void elastic_fwd_avx2(void *p, int64_t lo, int64_t hi,
                                                             int tid) {
    (void)tid;
    ELASTIC_FWD_BODY
}
#define HAVE_AVX2_TWIN 1
#endif

static int use_avx2(void) {
#ifdef HAVE_AVX2_TWIN
    static int cached = -1;
    if (cached < 0) cached = __builtin_cpu_supports("avx2") ? 1 : 0;
    return cached;
#else
    return 0;
#endif
}

static void elastic_fwd_range(void *p, int64_t lo, int64_t hi, int tid) {
#ifdef HAVE_AVX2_TWIN
    if (use_avx2()) {
        elastic_fwd_avx2(p, lo, hi, tid);
        return;
    }
#endif
    elastic_fwd_generic(p, lo, hi, tid);
}

/* y = code * a (+ offset if add_back); saved = code * 2 + 1[qn <= r <= qp]; r = (x - offset)/a.
 * a and offset are pointers to the 0-dim tensors (offset may be NULL: no shift), so the caller
 * never reads them on the host. */
API int tbt_elastic_fwd_f32(const float *x, int64_t n, const float *a, const float *offset,
                            int add_back, int qn, int qp, int use_sign, float *y,
                            int8_t *saved, int nthreads) {
    if (n < 0 || qn < -63 || qp > 63 || qn > qp || !(*a > 0.0f)) return -1;
    float off = offset ? *offset : 0.0f;
    efwd_t c = {x, y, saved, *a, off, add_back && offset ? off : 0.0f, qn, qp, use_sign};
    parallel_for(n, nthreads, elastic_fwd_range, &c);
    return 0;
}

typedef struct {
    const float *g, *x;
    const int8_t *saved;
    float *gx;
    double s_code[MAX_THREADS], s_gx_x[MAX_THREADS], s_gx[MAX_THREADS];
} ebwd_t;

/* Sums run in float32 over blocks of 1024 elements (vectorisable), each block's partial sum
 * added into a double: the error is that of a 1024-term float32 sum, far below the noise of a
 * stochastic gradient, and the loop keeps SIMD speed. */
#define BWD_BLOCK 1024
#define LANES 8
#define ELASTIC_BWD_BODY                                                                   \
    ebwd_t *c = (ebwd_t *)p;                                                               \
    const int8_t *saved = c->saved;                                                        \
    const float *g = c->g, *x = c->x;                                                      \
    float *gxo = c->gx;                                                                    \
    double sc = 0.0, sxx = 0.0, sg = 0.0;                                                  \
    for (int64_t b = lo; b < hi; b += BWD_BLOCK) {                                         \
        int64_t e = b + BWD_BLOCK < hi ? b + BWD_BLOCK : hi;                               \
        float fc[LANES] = {0}, fxx[LANES] = {0}, fg[LANES] = {0};                          \
        int64_t i = b;                                                                     \
        for (; i + LANES <= e; i += LANES) {                                               \
            for (int j = 0; j < LANES; j++) { /* one accumulator per lane: vectorises */   \
                int s = saved[i + j];                                                      \
                int inside = s & 1;                                                        \
                float code = (float)((s - inside) / 2);                                    \
                float gx = inside ? g[i + j] : 0.0f;                                       \
                gxo[i + j] = gx;                                                           \
                fc[j] += g[i + j] * code;                                                  \
                fxx[j] += gx * x[i + j];                                                   \
                fg[j] += gx;                                                               \
            }                                                                              \
        }                                                                                  \
        for (; i < e; i++) {                                                               \
            int s = saved[i];                                                              \
            int inside = s & 1;                                                            \
            float code = (float)((s - inside) / 2);                                        \
            float gx = inside ? g[i] : 0.0f;                                               \
            gxo[i] = gx;                                                                   \
            fc[0] += g[i] * code;                                                          \
            fxx[0] += gx * x[i];                                                           \
            fg[0] += gx;                                                                   \
        }                                                                                  \
        for (int j = 0; j < LANES; j++) {                                                  \
            sc += fc[j];                                                                   \
            sxx += fxx[j];                                                                 \
            sg += fg[j];                                                                   \
        }                                                                                  \
    }                                                                                      \
    c->s_code[tid] = sc;                                                                   \
    c->s_gx_x[tid] = sxx;                                                                  \
    c->s_gx[tid] = sg;

static void elastic_bwd_generic(void *p, int64_t lo, int64_t hi, int tid) { ELASTIC_BWD_BODY }

#ifdef HAVE_AVX2_TWIN
__attribute__((target("avx2"))) static void elastic_bwd_avx2(void *p, int64_t lo, int64_t hi,
                                                             int tid) {
    ELASTIC_BWD_BODY
}
#endif

static void elastic_bwd_range(void *p, int64_t lo, int64_t hi, int tid) {
#ifdef HAVE_AVX2_TWIN
    if (use_avx2()) {
        elastic_bwd_avx2(p, lo, hi, tid);
        return;
    }
#endif
    elastic_bwd_generic(p, lo, hi, tid);
}

/* gx = g * inside; sums = {sum g*code, sum gx*x, sum gx} (the alpha gradient's three terms). */
API int tbt_elastic_bwd_f32(const float *g, const int8_t *saved, const float *x, int64_t n,
                            float *gx, double *sums, int nthreads) {
    if (n < 0) return -1;
    static const ebwd_t zero;
    ebwd_t c = zero;
    c.g = g;
    c.x = x;
    c.saved = saved;
    c.gx = gx;
    int used = parallel_for(n, nthreads, elastic_bwd_range, &c);
    sums[0] = sums[1] = sums[2] = 0.0;
    for (int t = 0; t < used; t++) {
        sums[0] += c.s_code[t];
        sums[1] += c.s_gx_x[t];
        sums[2] += c.s_gx[t];
    }
    return 0;
}

/* ---- 8-bit min/max quantizer (DQ-BART) ---------------------------------------------------------- */

typedef struct {
    const float *x;
    float clip;
    float lo[MAX_THREADS], hi[MAX_THREADS];
} mstat_t;

static void minmax_stat_range(void *p, int64_t lo, int64_t hi, int tid) {
    mstat_t *c = (mstat_t *)p;
    const float clip = c->clip;
    float mn[LANES], mx[LANES];
    for (int j = 0; j < LANES; j++) mn[j] = INFINITY, mx[j] = -INFINITY;
    int64_t i = lo;
    for (; i + LANES <= hi; i += LANES)
        for (int j = 0; j < LANES; j++) {
            float v = c->x[i + j];
            v = v < -clip ? -clip : (v > clip ? clip : v);
            mn[j] = v < mn[j] ? v : mn[j];
            mx[j] = v > mx[j] ? v : mx[j];
        }
    for (; i < hi; i++) {
        float v = c->x[i];
        v = v < -clip ? -clip : (v > clip ? clip : v);
        mn[0] = v < mn[0] ? v : mn[0];
        mx[0] = v > mx[0] ? v : mx[0];
    }
    for (int j = 1; j < LANES; j++) {
        mn[0] = mn[j] < mn[0] ? mn[j] : mn[0];
        mx[0] = mx[j] > mx[0] ? mx[j] : mx[0];
    }
    c->lo[tid] = mn[0];
    c->hi[tid] = mx[0];
}

typedef struct {
    const float *x;
    float *y;
    uint8_t *inside;
    float clip, s, lo, rng, levels;
    int is_signed;
} mfwd_t;

/* The rounded values are bounded (|xc * s| <= qp + 1/2, (xc - lo) / rng * levels <= levels,
 * bits <= 16), so the magic-number rounding (RNE_MAGIC) equals rintf; without the libm call the
 * loops vectorise (3-5x faster on the small attention tensors of a decoding step). */
static void minmax_fwd_range(void *p, int64_t lo, int64_t hi, int tid) {
    (void)tid;
    const mfwd_t *c = (const mfwd_t *)p;
    const float clip = c->clip, s = c->s, mn = c->lo, rng = c->rng, levels = c->levels;
    const float *x = c->x;
    float *y = c->y;
    uint8_t *inside = c->inside;
    if (c->is_signed) {
        for (int64_t i = lo; i < hi; i++) {
            const float v = x[i];
            inside[i] = (uint8_t)((v > -clip) & (v < clip));
            const float xc = v < -clip ? -clip : (v > clip ? clip : v);
            y[i] = (((xc * s) + RNE_MAGIC) - RNE_MAGIC) / s;
        }
    } else {
        for (int64_t i = lo; i < hi; i++) {
            const float v = x[i];
            inside[i] = (uint8_t)((v > -clip) & (v < clip));
            const float xc = v < -clip ? -clip : (v > clip ? clip : v);
            y[i] = (((((xc - mn) / rng) * levels) + RNE_MAGIC) - RNE_MAGIC) / levels * rng + mn;
        }
    }
}

/* Signed: s = qp * (1 / max|clamp(x)|) (1 when that is 0); y = rint(xc*s)/s.  Unsigned: lo = min xc,
 * rng = max xc - lo + eps; y = rint((xc-lo)/rng*levels)/levels*rng + lo.  inside = 1[-c < x < c].
 * A NaN in x propagates as in torch (the caller checks nothing). */
API int tbt_minmax_fwd_f32(const float *x, int64_t n, int bits, int is_signed, float clip,
                           float eps, float *y, uint8_t *inside, int nthreads) {
    if (n <= 0 || bits < 2 || bits > 16 || !(clip > 0.0f)) return -1;
    static const mstat_t zero;
    mstat_t st = zero;
    st.x = x;
    st.clip = clip;
    int used = parallel_for(n, nthreads, minmax_stat_range, &st);
    float mn = st.lo[0], mx = st.hi[0];
    for (int t = 1; t < used; t++) {
        mn = st.lo[t] < mn ? st.lo[t] : mn;
        mx = st.hi[t] > mx ? st.hi[t] : mx;
    }
    mfwd_t c = {x, y, inside, clip, 1.0f, 0.0f, 1.0f, 0.0f, is_signed};
    if (is_signed) {
        float max_abs = fabsf(mn) > fabsf(mx) ? fabsf(mn) : fabsf(mx);
        /* torch evaluates `qp / t` (Python number over a tensor) as qp * reciprocal(t) */
        c.s = max_abs > 0.0f ? (float)((1 << (bits - 1)) - 1) * (1.0f / max_abs) : 1.0f;
    } else {
        c.lo = mn;
        c.rng = (mx - mn) + eps;
        c.levels = (float)((1 << bits) - 1);
    }
    parallel_for(n, nthreads, minmax_fwd_range, &c);
    return 0;
}
