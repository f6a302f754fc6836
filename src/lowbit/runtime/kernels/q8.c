/* lb_linear_q8: y = q8(x) @ W^T + bias with int8 activations. x is quantized per block of 32
 * columns (x = d * q, q in [-127, 127], as llama.cpp's CPU matvec does) and multiplied with the
 * u1/u2/u4/u8 codes by integer dot products: AVX2 vpmaddubsw, AVX-VNNI or AVX512-VNNI vpdpbusd
 * (the tiles of q8_tile.h, included once per instruction set), or a portable C loop. */
#include "simd.h"

#ifdef LB_X86
#define LB_Q8_NAME(x) x##_avx2
#define LB_Q8_TARGET LB_AVX2
#define LB_Q8_VNNI 0
#include "q8_tile.h"
#undef LB_Q8_NAME
#undef LB_Q8_TARGET
#undef LB_Q8_VNNI

#define LB_Q8_NAME(x) x##_avxvnni
#define LB_Q8_TARGET __attribute__((target("avx2,fma,f16c,avxvnni")))
#define LB_Q8_VNNI 1
#include "q8_tile.h"
#undef LB_Q8_NAME
#undef LB_Q8_TARGET
#undef LB_Q8_VNNI

#define LB_Q8_NAME(x) x##_avx512vnni
#define LB_Q8_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512vl,avx512vnni")))
#define LB_Q8_VNNI 2
#include "q8_tile.h"
#undef LB_Q8_NAME
#undef LB_Q8_TARGET
#undef LB_Q8_VNNI

#include "q8_tile512.h"
#endif

/* ---------------------------------------------------------------- code paths and layouts */

/* 0: no AVX2 (portable), 1: AVX2, 2: AVX-VNNI, 3: AVX512-VNNI on ymm registers, 4: AVX512-VNNI on
 * zmm registers (64-byte units, q8_tile512.h; weights whose groups do not fit those units run 3). */
static int lb_has_zmm(void)
{
#ifdef LB_X86
    return lb_cpu_has_avx2() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl") &&
           __builtin_cpu_supports("avx512bw");
#else
    return 0;
#endif
}

static int lb_q8_isa(void)
{
#ifdef LB_X86
    if (!lb_cpu_has_avx2()) return 0;
    if (lb_has_zmm()) return 4;
    if (__builtin_cpu_supports("avxvnni")) return 2;
    if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl")) return 3;
    return 1;
#else
    return 0;
#endif
}

LB_EXPORT int lb_q8_isa_id(void) { return lb_q8_isa(); }

/* Whether this CPU runs int8 path `isa` (a test can force each one the CPU has). */
LB_EXPORT int lb_q8_isa_ok(int isa)
{
#ifdef LB_X86
    if (isa == 1) return lb_cpu_has_avx2();
    if (isa == 2) return lb_cpu_has_avx2() && __builtin_cpu_supports("avxvnni");
    if (isa == 3) return lb_cpu_has_avx2() && __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
    if (isa == 4) return lb_has_zmm();
#endif
    return isa == 0;
}

/* Codes per byte of the layouts the int8 path reads (0: not one of them). */
static int lb_q8_cpb(int fmt) { return fmt == LB_U1 ? 8 : fmt == LB_U2 ? 4 : fmt == LB_U4 ? 2 : fmt == LB_U8 ? 1 : 0; }

/* 0 / 1: the tile mode for this weight (0: per-channel or several units per group, 1: one unit
 * per group or several groups per unit); -1: the int8 path does not take it (u3, t5, or groups
 * whose boundaries split a 4-code int32 lane of a unit). */
static int lb_q8_mode_ub(const lb_weight *w, int64_t ub)
{
    const int cpb = lb_q8_cpb(w->fmt);
    if (!cpb) return -1;
    const int64_t G = w->group < w->cols ? w->group : w->cols, UC = ub * cpb;
    if (G == w->cols || (G % UC == 0 && G >= 2 * UC)) return 0; /* several units per group */
    if (G == UC || (UC % G == 0 && G % (4 * cpb) == 0)) return 1;
    return -1;
}

static int lb_q8_mode(const lb_weight *w) { return lb_q8_mode_ub(w, 32); }

/* The code path a call runs: the zmm tiles (4) only where the weight's groups fit 64-byte units. */
static int lb_q8_path(const lb_weight *w, int isa) { return isa == 4 && lb_q8_mode_ub(w, 64) < 0 ? 3 : isa; }

LB_EXPORT int lb_q8_supported(const lb_weight *w) { return lb_check(w) == LB_OK && lb_q8_mode(w) >= 0; }

/* One block of n <= 32 columns: d = max|x| / 127 (returned) and q = round(x * (1 / d)), half to
 * even, clamped to +-127, in column order. */
static float lb_q8_block(const float *x, int64_t n, int8_t *q)
{
    float amax = 0.0f;
    for (int64_t c = 0; c < n; c++) {
        const float a = x[c] < 0 ? -x[c] : x[c];
        amax = a > amax ? a : amax;
    }
    const float dk = amax / 127.0f, id = dk > 0.0f ? 1.0f / dk : 0.0f;
    for (int64_t c = 0; c < n; c++) {
        float v = __builtin_nearbyintf(x[c] * id);
        v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
        q[c] = (int8_t)v;
    }
    return dk;
}

#ifdef LB_X86
/* lb_q8_block of a whole block of 32 columns, with the same float32 operations (vroundps is
 * round-half-even, as nearbyintf in the default mode). */
static LB_AVX2 float lb_q8_block_avx2(const float *x, int8_t *q)
{
    const __m256 sign = _mm256_set1_ps(-0.0f), lim = _mm256_set1_ps(127.0f), nlim = _mm256_set1_ps(-127.0f);
    __m256 v[4], m = _mm256_setzero_ps();
    for (int k = 0; k < 4; k++) {
        v[k] = _mm256_loadu_ps(x + 8 * k);
        m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[k]));
    }
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    s = _mm_max_ss(s, _mm_movehdup_ps(s));
    const float dk = _mm_cvtss_f32(s) / 127.0f, id = dk > 0.0f ? 1.0f / dk : 0.0f;
    const __m256 vid = _mm256_set1_ps(id);
    __m256i iv[4];
    for (int k = 0; k < 4; k++) {
        __m256 r = _mm256_round_ps(_mm256_mul_ps(v[k], vid), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        iv[k] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, nlim), lim));
    }
    /* packs interleave the 128-bit lanes: dwords come out as blocks 0,4,1,5,2,6,3,7 of 4 values */
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(iv[0], iv[1]), _mm256_packs_epi32(iv[2], iv[3]));
    _mm256_storeu_si256((__m256i *)q, _mm256_permutevar8x32_epi32(b, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7)));
    return dk;
}
#endif

/* Quantize one input row: per 32-column block d = max|x| / 127, q = round(x / d) (as x * (1 / d),
 * half to even); q in column order, permuted (xq), lane scales (dxl) and group sums of d * q. */
static void lb_q8_prepare(const lb_q8call *Q, const float *x, int8_t *q, float *d, int8_t *xq, float *dxl, float *sx)
{
    const int64_t cols = Q->c.w->cols, G = Q->c.G, cpb = Q->cpb, ub = Q->ub, UC = ub * cpb, lanes = ub / 4;
#ifdef LB_X86
    static int avx2 = -1;
    if (avx2 < 0) avx2 = lb_cpu_has_avx2();
#endif
    for (int64_t k = 0; k < Q->nblk; k++) {
        const int64_t c0 = 32 * k, c1 = c0 + 32 < cols ? c0 + 32 : cols;
#ifdef LB_X86
        if (xq && avx2 && c1 - c0 == 32) { /* the vector paths (the portable one keeps the scalar loop) */
            d[k] = lb_q8_block_avx2(x + c0, q + c0);
            continue;
        }
#endif
        d[k] = lb_q8_block(x + c0, c1 - c0, q + c0);
    }
    for (int64_t g = 0; g < Q->c.ng; g++) {
        const int64_t c0 = g * G, c1 = c0 + G < cols ? c0 + G : cols;
        double s = 0.0;
        for (int64_t c = c0; c < c1; c++)
            s += (double)d[c / 32] * q[c];
        sx[g] = (float)s;
    }
    if (!xq) return;
    for (int64_t u = 0; u < Q->units; u++) {
        for (int64_t h = 0; h < cpb; h++)
            for (int64_t i = 0; i < ub; i++) {
                const int64_t c = (ub * u + i) * cpb + h;
                xq[u * UC + ub * h + i] = c < cols ? q[c] : 0;
            }
        for (int64_t k = 0; k < lanes; k++) {
            const int64_t c = (ub * u + 4 * k) * cpb;
            dxl[lanes * u + k] = c < cols ? d[c / 32] : 0.0f;
        }
    }
}


static void lb_q8_rows_portable(const void *job, int64_t r0, int64_t r1, const lb_scratch *s)
{
    const lb_q8call *Q = job;
    const lb_weight *w = Q->c.w;
    const int64_t cols = w->cols, G = Q->c.G, ng = Q->c.ng;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *codes = w->packed + r * w->row_bytes;
        if (w->fmt != LB_U8) {
            lb_decode_row(w->fmt, codes, cols, s->codes);
            codes = s->codes;
        }
        const float bias = w->bias ? w->bias[r] : 0.0f;
        for (int64_t b = 0; b < Q->c.batch; b++) {
            const int8_t *q = Q->q + b * cols;
            const float *d = Q->d + b * Q->nblk;
            float y = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                const int64_t c1 = (g + 1) * G < cols ? (g + 1) * G : cols;
                float acc = 0.0f;
                for (int64_t c = g * G; c < c1;) {
                    const int64_t e = (c / 32 + 1) * 32 < c1 ? (c / 32 + 1) * 32 : c1;
                    int32_t isum = 0;
                    for (int64_t j = c; j < e; j++)
                        isum += (int32_t)codes[j] * q[j];
                    acc += d[c / 32] * (float)isum;
                    c = e;
                }
                y += lb_step(w, r, g) * (acc - lb_zero(w, r, g) * Q->c.sx[b * ng + g]);
            }
            Q->c.y[b * w->rows + r] = y + bias;
        }
    }
}


/* ---------------------------------------------------------------- lb_linear_q8 */

static const lb_rows_fn lb_q8_rows_portable_by_fmt[LB_NFMT] = {
    [LB_U1] = lb_q8_rows_portable, [LB_U2] = lb_q8_rows_portable,
    [LB_U4] = lb_q8_rows_portable, [LB_U8] = lb_q8_rows_portable,
};

/* The row kernels by int8 path (lb_q8_isa's ids) and layout. */
static const lb_rows_fn *const lb_q8_rows_by_isa[5] = {
    lb_q8_rows_portable_by_fmt,
#ifdef LB_X86
    lb_q8_rows_by_fmt_avx2, lb_q8_rows_by_fmt_avxvnni, lb_q8_rows_by_fmt_avx512vnni, lb_z_rows_by_fmt,
#endif
};

/* Fills Q's geometry for one call (no input yet); returns the scratch bytes lb_q8_quantize needs.
 * vec: the vector paths' permuted q (xq) and lane scales (dxl) too. */
static size_t lb_q8_init(lb_q8call *Q, const lb_weight *w, int64_t batch, float *y, int mode, int vec, int64_t ub)
{
    lb_call *C = &Q->c;
    memset(Q, 0, sizeof *Q);
    C->w = w;
    C->G = w->group < w->cols ? w->group : w->cols;
    C->ng = (w->cols + C->G - 1) / C->G;
    C->y = y;
    C->batch = batch;
    C->prefetch = LB_PREFETCH_ROWS * w->row_bytes;
    Q->cpb = lb_q8_cpb(w->fmt);
    Q->mode = mode;
    Q->ub = ub;
    Q->units = (w->row_bytes + ub - 1) / ub;
    Q->nblk = (w->cols + 31) / 32;
    Q->xqs = (Q->units * ub * Q->cpb + 63) / 64 * 64;
    Q->dxls = (Q->units * (ub / 4) + 15) / 16 * 16;
    const int64_t qs = (w->cols + 63) / 64 * 64, ds = (Q->nblk + 15) / 16 * 16, ss = (C->ng + 15) / 16 * 16;
    const size_t q_bytes = (size_t)(batch * qs), xq_bytes = vec ? (size_t)(batch * Q->xqs) : 0;
    const size_t floats = (size_t)(batch * (ds + (vec ? Q->dxls : 0) + ss));
    return q_bytes + xq_bytes + sizeof(float) * floats;
}

/* Quantizes every input row of x into `scratch` (lb_q8_init's bytes, 64-byte aligned) and points
 * Q at it. */
static void lb_q8_quantize(lb_q8call *Q, const float *x, uint8_t *scratch, int vec, int nthreads)
{
    lb_call *C = &Q->c;
    const lb_weight *w = C->w;
    const int64_t batch = C->batch;
    const int64_t qs = (w->cols + 63) / 64 * 64, ds = (Q->nblk + 15) / 16 * 16, ss = (C->ng + 15) / 16 * 16;
    /* scratch (64-byte aligned pieces): q, xq (bytes); d, dxl, sx (floats) */
    const size_t q_bytes = (size_t)(batch * qs), xq_bytes = vec ? (size_t)(batch * Q->xqs) : 0;
    int8_t *qb = (int8_t *)scratch, *xqb = vec ? (int8_t *)(scratch + q_bytes) : NULL;
    float *db = (float *)(scratch + q_bytes + xq_bytes), *dxlb = vec ? db + batch * ds : NULL;
    float *sxb = db + batch * ds + (vec ? batch * Q->dxls : 0);
    /* inputs are independent: several (a prompt) are quantized by the threads of the call */
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (batch >= 4 && nthreads > 1)
#endif
    for (int64_t b = 0; b < batch; b++)
        lb_q8_prepare(Q, x + b * w->cols, qb + b * qs, db + b * ds, vec ? xqb + b * Q->xqs : NULL,
                      vec ? dxlb + b * Q->dxls : NULL, sxb + b * ss);
    (void)nthreads;
    Q->q = qb;
    Q->d = db;
    Q->xq = xqb;
    Q->dxl = dxlb;
    /* lb_row_scales reads sx as (batch, ng) */
    if (ss != C->ng)
        for (int64_t b = 1; b < batch; b++)
            memmove(sxb + b * C->ng, sxb + b * ss, sizeof(float) * (size_t)C->ng);
    C->sx = sxb;
    /* the portable path indexes q and d by cols and nblk */
    if (!vec) {
        for (int64_t b = 1; b < batch; b++) {
            memmove(qb + b * w->cols, qb + b * qs, (size_t)w->cols);
            memmove(db + b * Q->nblk, db + b * ds, sizeof(float) * (size_t)Q->nblk);
        }
    }
}

/* Fills Q for one call and quantizes every input row into one scratch allocation, returned
 * (NULL: out of memory). */
static uint8_t *lb_q8_setup(lb_q8call *Q, const lb_weight *w, const float *x, int64_t batch, float *y, int mode,
                            int vec, int64_t ub, int nthreads)
{
    uint8_t *scratch = lb_alloc(lb_q8_init(Q, w, batch, y, mode, vec, ub));
    if (!scratch) return NULL;
    lb_q8_quantize(Q, x, scratch, vec, nthreads);
    return scratch;
}

/* ---------------------------------------------------------------- one input inside a thread team */

size_t lb_q8_team_bytes(const lb_weight *w)
{
    lb_q8call Q;
    const size_t a = lb_q8_init(&Q, w, 1, NULL, 0, 1, 32), b = lb_q8_init(&Q, w, 1, NULL, 0, 1, 64);
    return a > b ? a : b;
}

int lb_q8_team_begin(lb_q8_team *T, const lb_weight *w, const float *x, float *y, int isa, uint8_t *mem)
{
    const int mode = lb_q8_mode(w);
    if (mode < 0) return LB_EUNSUP;
    if (isa < 0) isa = lb_q8_isa();
    else if (!lb_q8_isa_ok(isa)) return LB_EISA;
    isa = lb_q8_path(w, isa);
    lb_q8_init(&T->Q, w, 1, y, isa == 4 ? lb_q8_mode_ub(w, 64) : mode, isa >= 1, isa == 4 ? 64 : 32);
    lb_q8_quantize(&T->Q, x, mem, isa >= 1, 1);
    T->rows = lb_q8_rows_by_isa[isa][w->fmt];
    T->n_blocks = (w->rows + 3) / 4;
    return LB_OK;
}

void lb_q8_team_block(const lb_q8_team *T, int64_t blk, const lb_scratch *s)
{
    const int64_t rows = T->Q.c.w->rows, r0 = 4 * blk, r1 = r0 + 4 < rows ? r0 + 4 : rows;
    T->rows(&T->Q, r0, r1, s);
}

/* y (batch, rows) = q8(x) @ W^T + bias: x quantized to int8 per block of 32 columns, integer
 * dot products with the codes. isa: -1 auto (the best of lb_q8_isa), 0 portable, 1 AVX2,
 * 2 AVX-VNNI, 3 AVX512-VNNI (ymm), 4 AVX512-VNNI (zmm where the groups fit, else 3). Returns LB_EUNSUP for weights lb_q8_supported rejects. */
LB_EXPORT int lb_linear_q8(const lb_weight *w, const float *x, int64_t batch, float *y, int nthreads, int isa)
{
    int err = lb_check(w);
    if (err) return err;
    const int mode = lb_q8_mode(w);
    if (mode < 0) return LB_EUNSUP;
    if (batch < 1) return LB_OK;
    if (isa < 0) isa = lb_q8_isa();
    else if (!lb_q8_isa_ok(isa)) return LB_EISA;

    isa = lb_q8_path(w, isa);
    lb_q8call Q;
    uint8_t *scratch = lb_q8_setup(&Q, w, x, batch, y, isa == 4 ? lb_q8_mode_ub(w, 64) : mode, isa >= 1,
                                   isa == 4 ? 64 : 32, nthreads);
    if (!scratch) return LB_ENOMEM;
    /* per thread: one decoded row (portable) and 4 rows of steps as floats, each padded by 16 zeros */
#ifdef LB_X86
    const lb_rows_fn rows = isa == 4 && batch >= 4 ? lb_z_gemm_by_fmt[w->fmt] : lb_q8_rows_by_isa[isa][w->fmt];
#else
    const lb_rows_fn rows = lb_q8_rows_by_isa[isa][w->fmt];
#endif
    const lb_driver d = {rows, &Q, w->rows, 4, w->rows * w->cols * batch,
                         (size_t)(w->cols + 16), (size_t)(4 * (Q.c.ng + 16))};
    err = lb_run_rows(&d, nthreads);
    free(scratch);
    return err;
}

/* ---------------------------------------------------------------- lb_q8_round */

/* One row of lb_q8_round: each block of 32 columns quantized as lb_q8_prepare does (the AVX2
 * block quantizer for whole blocks when vec), then out = d * q. */
static void lb_q8_round_row(const float *x, int64_t cols, float *out, int vec)
{
    int8_t q[32];
    for (int64_t c0 = 0; c0 < cols; c0 += 32) {
        const int64_t n = c0 + 32 < cols ? 32 : cols - c0;
        float dk;
#ifdef LB_X86
        if (vec && n == 32)
            dk = lb_q8_block_avx2(x + c0, q);
        else
#endif
            dk = lb_q8_block(x + c0, n, q);
        for (int64_t c = 0; c < n; c++)
            out[c0 + c] = dk * (float)q[c];
    }
    (void)vec;
}

/* out (rows, cols) = x rounded as lb_linear_q8 rounds its input (the float value d * q the
 * integer kernel multiplies), for paths that multiply in float (large batches); bit-identical
 * with lowbit.runtime.packed_linear.q8_round. isa 0 forces the portable loop. */
LB_EXPORT int lb_q8_round(const float *x, int64_t rows, int64_t cols, float *out, int nthreads, int isa)
{
    if (rows < 0 || cols < 1) return LB_EARG;
    const int vec = isa != 0 && lb_cpu_has_avx2();
#ifdef _OPENMP
#pragma omp parallel for num_threads(nthreads > 0 ? nthreads : 1) schedule(static) if (rows * cols >= 65536)
#endif
    for (int64_t r = 0; r < rows; r++)
        lb_q8_round_row(x + r * cols, cols, out + r * cols, vec);
    (void)nthreads;
    return LB_OK;
}
