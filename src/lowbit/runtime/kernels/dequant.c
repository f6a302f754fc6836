/* Weights to float: the byte -> code tables of lb_decode_row, lb_dequantize (packed codes to
 * float32, bit-exact with QuantizedWeight.dequantize), and fp16 weights (lb_f16_to_f32, and
 * lb_linear_f16 for the layers a packed model keeps in fp16, such as the tied output head). */
#include "simd.h"

/* ---------------------------------------------------------------- byte -> code tables */

uint64_t lb_t5_table[256], lb_u1_table[256];

__attribute__((constructor)) static void lb_init_tables(void)
{
    for (int p = 0; p < 256; p++) {
        uint64_t t5 = 0, u1 = 0;
        int q = p;
        for (int k = 0; k < 5; k++) {
            t5 |= (uint64_t)(q % 3) << (8 * k);
            q /= 3;
        }
        for (int k = 0; k < 8; k++)
            u1 |= (uint64_t)((p >> k) & 1) << (8 * k);
        lb_t5_table[p] = t5;
        lb_u1_table[p] = u1;
    }
}

/* ---------------------------------------------------------------- lb_dequantize */

typedef struct {
    const lb_weight *w;
    int64_t r0, G, ng; /* first row of the range, group length, groups per row */
    float *out;        /* (rows of the range, cols) */
} lb_dequant_job;

/* Rows r0..r1 of the range: out[c] = step * (code - zero), no FMA (bit-exact with torch). */
LB_INLINE void lb_dequant_rows(const void *job, int64_t r0, int64_t r1, const lb_scratch *s)
{
    const lb_dequant_job *J = job;
    const lb_weight *w = J->w;
    const int64_t cols = w->cols, G = J->G;
    for (int64_t i = r0; i < r1; i++) {
        const int64_t r = J->r0 + i;
        float *o = J->out + i * cols;
        const uint8_t *codes = w->packed + r * w->row_bytes;
        if (w->fmt != LB_U8) {
            lb_decode_row(w->fmt, codes, cols, s->codes);
            codes = s->codes;
        }
        for (int64_t g = 0; g < J->ng; g++) {
            const float sg = lb_step(w, r, g), z = lb_zero(w, r, g);
            const int64_t c1 = (g + 1) * G < cols ? (g + 1) * G : cols;
            for (int64_t c = g * G; c < c1; c++)
                o[c] = sg * ((float)codes[c] - z);
        }
    }
}

static void lb_dequant_rows_portable(const void *job, int64_t r0, int64_t r1, const lb_scratch *s)
{
    lb_dequant_rows(job, r0, r1, s);
}

#ifdef LB_X86
/* the same C, vectorised by the compiler for AVX2 */
static LB_AVX2 void lb_dequant_rows_avx2(const void *job, int64_t r0, int64_t r1, const lb_scratch *s)
{
    lb_dequant_rows(job, r0, r1, s);
}
#endif

static const lb_rows_fn lb_dequant_kernels[LB_NISA] = {
    [LB_ISA_PORTABLE] = lb_dequant_rows_portable,
#ifdef LB_X86
    [LB_ISA_AVX2] = lb_dequant_rows_avx2,
#endif
};

/* out (r1 - r0, cols) float32 = rows r0..r1 of step * (code - zero), computed exactly as
 * QuantizedWeight.dequantize.  isa: -1 auto, 0 portable, 1 AVX2 (the same results). */
LB_EXPORT int lb_dequantize(const lb_weight *w, int64_t r0, int64_t r1, float *out, int nthreads, int isa)
{
    int err = lb_check(w);
    if (err) return err;
    if (r0 < 0 || r1 > w->rows || r0 > r1) return LB_EARG;
    if ((isa = lb_resolve_isa(isa)) < 0) return isa;
    const int64_t cols = w->cols, G = w->group < cols ? w->group : cols;
    const lb_dequant_job J = {w, r0, G, (cols + G - 1) / G, out};
    const lb_driver d = {lb_dequant_kernels[isa], &J, r1 - r0, 4, (r1 - r0) * cols, (size_t)(cols + 16), 0};
    return lb_run_rows(&d, nthreads);
}

/* ---------------------------------------------------------------- fp16 weights */

LB_EXPORT void lb_f16_to_f32(const uint16_t *src, float *dst, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = lb_half_to_float(src[i]);
}

typedef struct {
    const uint16_t *w; /* (rows, cols) fp16, row-major */
    int64_t rows, cols;
    const float *bias; /* may be NULL */
    const float *x;    /* (batch, cols) */
    int64_t batch;
    float *y;          /* (batch, rows) */
} lb_f16_job;

/* y[b, r] = sum_c half(w[r, c]) * x[b, c] (+ bias[r]) for rows r0..r1. */
static void lb_f16_rows_portable(const void *job, int64_t r0, int64_t r1, const lb_scratch *s)
{
    const lb_f16_job *J = job;
    const int64_t cols = J->cols;
    (void)s;
    for (int64_t r = r0; r < r1; r++)
        for (int64_t b = 0; b < J->batch; b++) {
            float acc = 0.0f;
            for (int64_t c = 0; c < cols; c++)
                acc += lb_half_to_float(J->w[r * cols + c]) * J->x[b * cols + c];
            J->y[b * J->rows + r] = acc + (J->bias ? J->bias[r] : 0.0f);
        }
}

#ifdef LB_X86
/* The same, 4 rows at a time with two accumulators per row; the halves convert in registers. */
static LB_AVX2 void lb_f16_rows_avx2(const void *job, int64_t r0, int64_t r1, const lb_scratch *s)
{
    const lb_f16_job *J = job;
    const int64_t cols = J->cols, c8 = cols / 8 * 8;
    (void)s;
    for (int64_t r = r0; r < r1; r += 4) {
        const int n = r1 - r < 4 ? (int)(r1 - r) : 4;
        const uint16_t *wr[4];
        for (int i = 0; i < 4; i++)
            wr[i] = J->w + (r + (i < n ? i : n - 1)) * cols;
        for (int64_t b = 0; b < J->batch; b++) {
            const float *xb = J->x + b * cols;
            __m256 a[4][2];
            for (int i = 0; i < 4; i++)
                a[i][0] = a[i][1] = _mm256_setzero_ps();
            int64_t c = 0;
            for (; c + 16 <= c8; c += 16) {
                const __m256 x0 = _mm256_loadu_ps(xb + c), x1 = _mm256_loadu_ps(xb + c + 8);
#pragma GCC unroll 4
                for (int i = 0; i < 4; i++) {
                    _mm_prefetch((const char *)(wr[i] + c) + 8 * cols, _MM_HINT_T0);
                    a[i][0] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr[i] + c))), x0, a[i][0]);
                    a[i][1] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr[i] + c + 8))), x1,
                                              a[i][1]);
                }
            }
            for (; c < c8; c += 8) {
                const __m256 x0 = _mm256_loadu_ps(xb + c);
                for (int i = 0; i < 4; i++)
                    a[i][0] = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(wr[i] + c))), x0, a[i][0]);
            }
            for (int i = 0; i < n; i++) {
                float acc = lb_hsum(_mm256_add_ps(a[i][0], a[i][1]));
                for (int64_t k = c8; k < cols; k++)
                    acc += lb_half_to_float(wr[i][k]) * xb[k];
                J->y[b * J->rows + r + i] = acc + (J->bias ? J->bias[r + i] : 0.0f);
            }
        }
    }
}
#endif

static const lb_rows_fn lb_f16_kernels[LB_NISA] = {
    [LB_ISA_PORTABLE] = lb_f16_rows_portable,
#ifdef LB_X86
    [LB_ISA_AVX2] = lb_f16_rows_avx2,
#endif
};

/* y (batch, rows) = x (batch, cols) @ half(W)^T + bias, W (rows, cols) fp16 row-major: reads the
 * halves once per call instead of converting the whole matrix.  isa: -1 auto, 0 portable, 1 AVX2. */
LB_EXPORT int lb_linear_f16(const uint16_t *w, int64_t rows, int64_t cols, const float *bias, const float *x,
                            int64_t batch, float *y, int nthreads, int isa)
{
    if (!w || rows < 0 || cols < 1) return LB_EARG;
    if (batch < 1 || rows == 0) return LB_OK;
    if ((isa = lb_resolve_isa(isa)) < 0) return isa;
    const lb_f16_job J = {w, rows, cols, bias, x, batch, y};
    const lb_driver d = {lb_f16_kernels[isa], &J, rows, 4, rows * cols * batch, 0, 0};
    return lb_run_rows(&d, nthreads);
}
