/* lowbit CPU kernels: y = x @ W^T + bias, with W read straight from packed integer codes.
 *
 * This file: the parallel-rows driver every entry point runs on, code-path (ISA) selection, the
 * float-activation matvec lb_linear with its portable row kernel, and lb_struct_layout (the
 * struct sizes / offsets lowbit.runtime.kernels checks its ctypes mirrors against). See lowbit.h for the
 * other files.
 *
 * lb_linear computes each output as
 *
 *     y[r] = sum_g step[r,g] * sum_{j in g} code[r,j] * x[j]  -  sum_g step[r,g] * zero[r,g] * X[g]
 *
 * with X[g] the sum of x over group g, computed once per call: the inner loop only multiplies
 * integer codes by x. The AVX2 row kernels (matvec_avx2.c) decode the codes in registers, one
 * "unit" of packed bytes at a time, without shifts:
 *   - u1/u2/u4/u8: vpmovzxbd spreads 8 packed bytes over 8 int32 lanes; lane i then holds the
 *     8/b codes of byte i, the h-th at bit b*h. Masking keeps code << (b*h) (at most 240),
 *     converted to float exactly. The matching inputs are gathered once per call into x' and
 *     pre-scaled by 2^(-b*h), so (code << b*h) * x' == code * x exactly. For h = 0 of u1/u2 a
 *     vpermps table lookup on the lane's low 3 bits replaces mask + convert.
 *   - u3: each 3-byte chunk (8 codes) is broadcast to 8 lanes and lane i masked at bit 3i.
 *   - t5: 8 bytes (40 trits) in 8 lanes; digit k is floor(p / 3^k) - 3 floor(p / 3^(k+1)),
 *     each floor one vpmulhuw by a rounded-up 2^16 / 3^k (exact for p < 256).
 * Per 8 weights that is about 3 uops (mask, convert, FMA), two of them on the FMA ports: the
 * kernels are compute-bound near 1 cycle per 8 weights per core, not memory-bound.
 * The last, partial unit of a row is read through a zero-padded copy with x' padded by zeros.
 * Group sizes the units do not divide (and t5 with groups) decode each row to one byte per
 * code first and run the u8 loop over that buffer. Rows are split over OpenMP threads in blocks
 * of 4; a block runs tiles of (rows, inputs) = (4, 1), (2, 2) or (1, 4) with two FMA chains per
 * (row, input). A portable C path (no intrinsics) is compiled alongside and chosen at run time
 * when the CPU lacks AVX2/FMA/F16C, or when the caller asks for it (isa 0).
 */
#include "lowbit.h"
#ifdef _OPENMP
#include <omp.h>
#endif

/* ---------------------------------------------------------------- the parallel-rows driver */

static void lb_run_block(const lb_driver *d, int64_t blk, const lb_scratch *s)
{
    const int64_t r0 = blk * d->block, r1 = r0 + d->block < d->n_rows ? r0 + d->block : d->n_rows;
    d->rows(d->job, r0, r1, s);
}

int lb_run_rows(const lb_driver *d, int nthreads)
{
    const int64_t nblocks = (d->n_rows + d->block - 1) / d->block;
    const size_t code_bytes = (d->code_bytes + 63) & ~(size_t)63;
    const size_t scratch_bytes = code_bytes + sizeof(float) * d->step_floats;
    int failed = 0;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
    const int parallel = nthreads > 1 && d->work >= 65536 && nblocks > 1;
    /* dynamic chunks (~16 per thread): a thread the OS pauses does not hold back the others */
    int64_t chunk = nblocks / (16 * (int64_t)nthreads);
    if (chunk < 1) chunk = 1;
#pragma omp parallel num_threads(nthreads) if (parallel) reduction(| : failed)
#endif
    {
        lb_scratch s = {NULL, NULL};
        uint8_t *mem = scratch_bytes ? lb_alloc(scratch_bytes) : NULL;
        if (scratch_bytes && !mem) {
            failed = 1;
        } else if (mem) {
            s.codes = mem;
            s.steps = (float *)(mem + code_bytes);
            memset(s.steps, 0, sizeof(float) * d->step_floats);
        }
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
        for (int64_t blk = 0; blk < nblocks; blk++)
            if (!failed)
                lb_run_block(d, blk, &s);
        free(mem);
    }
    (void)nthreads;
    return failed ? LB_ENOMEM : LB_OK;
}

/* ---------------------------------------------------------------- shared helpers */

void *lb_alloc(size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

int lb_cpu_has_avx2(void)
{
#ifdef LB_X86
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
    return 0;
#endif
}

int lb_resolve_isa(int isa)
{
    if (isa < 0) return lb_cpu_has_avx2() ? LB_ISA_AVX2 : LB_ISA_PORTABLE;
    if (isa >= LB_NISA) return LB_EARG;
    if (isa == LB_ISA_AVX2 && !lb_cpu_has_avx2()) return LB_EISA;
    return isa;
}

static int lb_fmt_ok(int fmt)
{
    return fmt == LB_U1 || fmt == LB_U2 || fmt == LB_U3 || fmt == LB_U4 || fmt == LB_U8 || fmt == LB_T5;
}

int lb_check(const lb_weight *w)
{
    if (!lb_fmt_ok(w->fmt)) return LB_EFORMAT;
    if (w->rows < 0 || w->cols < 1 || w->group < 1 || !w->packed || !w->step || !w->zero) return LB_EARG;
    return LB_OK;
}

LB_EXPORT int lb_isa(void) { return lb_cpu_has_avx2() ? 1 : 0; }

LB_EXPORT int lb_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

/* ---------------------------------------------------------------- struct layouts */

/* Sizes and field offsets of the structs lowbit.runtime.kernels mirrors in ctypes ("lb_weight" is a size,
 * "lb_weight.bias" an offset); the loader compares them with its mirrors. */
#define LB_SIZE(T) {#T, (int64_t)sizeof(T)}
#define LB_FIELD(T, F) {#T "." #F, (int64_t)offsetof(T, F)}
static const struct {
    const char *name;
    int64_t value;
} lb_layouts[] = {
    LB_SIZE(lb_weight),          LB_FIELD(lb_weight, fmt),     LB_FIELD(lb_weight, step_type),
    LB_FIELD(lb_weight, zero_type), LB_FIELD(lb_weight, packed), LB_FIELD(lb_weight, row_bytes),
    LB_FIELD(lb_weight, rows),   LB_FIELD(lb_weight, cols),    LB_FIELD(lb_weight, group),
    LB_FIELD(lb_weight, step),   LB_FIELD(lb_weight, step_rs), LB_FIELD(lb_weight, step_gs),
    LB_FIELD(lb_weight, zero),   LB_FIELD(lb_weight, zero_rs), LB_FIELD(lb_weight, zero_gs),
    LB_FIELD(lb_weight, bias),
    LB_SIZE(lb_layer),           LB_FIELD(lb_layer, qkv),      LB_FIELD(lb_layer, o),
    LB_FIELD(lb_layer, gate_up), LB_FIELD(lb_layer, down),     LB_FIELD(lb_layer, ln1),
    LB_FIELD(lb_layer, ln2),     LB_FIELD(lb_layer, kcache),   LB_FIELD(lb_layer, vcache),
    LB_FIELD(lb_layer, hidden),  LB_FIELD(lb_layer, nh),       LB_FIELD(lb_layer, nkv),
    LB_FIELD(lb_layer, hd),      LB_FIELD(lb_layer, inter),    LB_FIELD(lb_layer, max_len),
    LB_FIELD(lb_layer, eps1),    LB_FIELD(lb_layer, eps2),     LB_FIELD(lb_layer, scale),
    LB_FIELD(lb_layer, q8),
};
#undef LB_SIZE
#undef LB_FIELD

/* Entry i: its value, and its name in *name; -1 past the last entry. */
LB_EXPORT int64_t lb_struct_layout(int i, const char **name)
{
    if (i < 0 || i >= (int)(sizeof lb_layouts / sizeof lb_layouts[0])) return -1;
    *name = lb_layouts[i].name;
    return lb_layouts[i].value;
}

/* ---------------------------------------------------------------- lb_linear: per-call preparation */

/* x' for one input row: x'[c + 8h + i] = x[c + i*H + h] * 2^(-b*h) per unit starting at c;
 * u3: x'[c + i] = x[c + i] * 2^(-3i); zero past the last column. */
static void lb_prepare_xp(int kind, const float *x, int64_t cols, float *xp)
{
    const int U = lb_unit_cols(kind);
    const int64_t padded = (cols + U - 1) / U * U;
    for (int64_t c = 0; c < padded; c += U)
        for (int j = 0; j < U; j++) {
            int h = j / 8, i = j % 8;
            int64_t src;
            float scale = 1.0f;
            if (kind == 3) {
                src = c + j;
                scale = 1.0f / (float)(1u << (3 * j));
            } else if (kind == 5) {
                src = c + 5 * i + h;
            } else {
                src = c + i * (8 / kind) + h;
                scale = 1.0f / (float)(1u << (kind * h));
            }
            xp[c + j] = src < cols ? x[src] * scale : 0.0f;
        }
}

/* Group sums sx (batch, ng) of x, and x' (batch, xps) where the kind needs it: one allocation,
 * returned (NULL: out of memory). */
static float *lb_prepare_inputs(lb_call *C, int64_t xps)
{
    const lb_weight *w = C->w;
    const int need_xp = C->kind != LB_U8;
    const size_t xp_floats = need_xp ? (size_t)(C->batch * xps) : 0;
    float *scratch = lb_alloc(sizeof(float) * (xp_floats + (size_t)(C->batch * C->ng)));
    if (!scratch) return NULL;
    C->sx = scratch + xp_floats;
    for (int64_t b = 0; b < C->batch; b++)
        for (int64_t g = 0; g < C->ng; g++) {
            int64_t c0 = g * C->G, c1 = c0 + C->G < w->cols ? c0 + C->G : w->cols;
            double s = 0.0;
            for (int64_t c = c0; c < c1; c++)
                s += C->x[b * w->cols + c];
            C->sx[b * C->ng + g] = (float)s;
        }
    if (need_xp) {
        for (int64_t b = 0; b < C->batch; b++)
            lb_prepare_xp(C->kind, C->x + b * w->cols, w->cols, scratch + b * xps);
        C->xp = scratch;
        C->xps = xps;
    } else {
        C->xp = C->x;
        C->xps = w->cols;
    }
    return scratch;
}

/* ---------------------------------------------------------------- lb_linear: portable row kernel */

static void lb_rows_portable(const void *job, int64_t r0, int64_t r1, const lb_scratch *s)
{
    const lb_call *C = job;
    const lb_weight *w = C->w;
    const int64_t cols = w->cols, rows = w->rows;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->packed + r * w->row_bytes;
        const uint8_t *codes = row;
        if (w->fmt != LB_U8) {
            lb_decode_row(w->fmt, row, cols, s->codes);
            codes = s->codes;
        }
        const float bias = w->bias ? w->bias[r] : 0.0f;
        for (int64_t b = 0; b < C->batch; b++) {
            const float *x = C->x + b * cols;
            float y = 0.0f;
            for (int64_t g = 0; g < C->ng; g++) {
                int64_t c0 = g * C->G, c1 = c0 + C->G < cols ? c0 + C->G : cols, c = c0;
                float a[8] = {0}; /* 8 partial sums: the compiler vectorises this loop */
                for (; c + 8 <= c1; c += 8)
                    for (int k = 0; k < 8; k++)
                        a[k] += (float)codes[c + k] * x[c + k];
                for (; c < c1; c++)
                    a[0] += (float)codes[c] * x[c];
                float dot = ((a[0] + a[4]) + (a[1] + a[5])) + ((a[2] + a[6]) + (a[3] + a[7]));
                y += lb_step(w, r, g) * (dot - lb_zero(w, r, g) * C->sx[b * C->ng + g]);
            }
            C->y[b * rows + r] = y + bias;
        }
    }
}

/* The row kernel of lb_linear for a code path and unit kind. */
static lb_rows_fn lb_linear_rows(int isa, int kind)
{
#ifdef LB_X86
    if (isa == LB_ISA_AVX2) return lb_rows_avx2_by_kind[kind];
#endif
    (void)kind;
    return lb_rows_portable;
}

/* ---------------------------------------------------------------- lb_linear */

/* y (batch, rows) = x (batch, cols) @ W^T + bias.  isa: -1 auto, 0 portable, 1 AVX2. */
LB_EXPORT int lb_linear(const lb_weight *w, const float *x, int64_t batch, float *y, int nthreads, int isa)
{
    int err = lb_check(w);
    if (err) return err;
    if (batch < 1) return LB_OK;
    if ((isa = lb_resolve_isa(isa)) < 0) return isa;

    lb_call C;
    memset(&C, 0, sizeof C);
    C.w = w;
    C.G = w->group < w->cols ? w->group : w->cols;
    C.ng = (w->cols + C.G - 1) / C.G;
    C.x = x;
    C.y = y;
    C.batch = batch;
    /* direct: every group starts on a unit boundary */
    C.direct = isa == LB_ISA_AVX2 && (w->fmt == LB_U8 || C.G % lb_unit_cols(w->fmt) == 0 || C.G == w->cols);
    C.kind = C.direct ? w->fmt : LB_U8;
#ifdef LB_X86
    if (C.direct) {
        C.fast_cols = lb_fast_cols(C.kind, w->cols, w->row_bytes);
        C.prefetch = LB_PREFETCH_ROWS * w->row_bytes;
    }
#endif
    /* x' rows start on 64-byte boundaries so that no vector load splits a cache line */
    const int64_t U = lb_unit_cols(C.kind), xps = ((w->cols + U - 1) / U * U + 15) / 16 * 16;
    float *scratch = lb_prepare_inputs(&C, xps);
    if (!scratch) return LB_ENOMEM;

    /* per thread: 4 decoded rows (buffer path) and 4 rows of steps as floats */
    const lb_driver d = {lb_linear_rows(isa, C.kind), &C, w->rows, 4, w->rows * w->cols * batch,
                         (size_t)4 * (size_t)(w->cols + 16), (size_t)(4 * C.ng)};
    err = lb_run_rows(&d, nthreads);
    free(scratch);
    return err;
}
