/* lowbit CPU kernels: y = x @ W^T + bias, with W read straight from packed integer codes.
 *
 * W is stored as in lowbit/packing.py (row-major, little-endian inside each byte; row r starts
 * at packed + r * row_bytes) and decodes per group of G inputs as W = step * (code - zero).
 * Each output is computed as
 *
 *     y[r] = sum_g step[r,g] * sum_{j in g} code[r,j] * x[j]  -  sum_g step[r,g] * zero[r,g] * X[g]
 *
 * with X[g] the sum of x over group g, computed once per call: the inner loop only multiplies
 * integer codes by x. The AVX2 path decodes the codes in registers, one "unit" of packed bytes
 * at a time, without shifts:
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
 * when the CPU lacks AVX2/FMA/F16C.
 *
 * lb_linear_q8 (int8 activations, q8_tile.h) and lb_linear_f16 (fp16 weights) are described at
 * their definitions below.
 */
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#define LB_X86 1
#include <immintrin.h>
#endif

#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "lowbit kernels assume a little-endian CPU"
#endif

#define LB_EXPORT __attribute__((visibility("default")))
#define LB_INLINE static inline __attribute__((always_inline))

enum { LB_U1 = 1, LB_U2 = 2, LB_U3 = 3, LB_U4 = 4, LB_T5 = 5, LB_U8 = 8 };
enum { LB_F32 = 0, LB_F16 = 1, LB_U8Z = 2 }; /* scale / zero storage types */
enum { LB_OK = 0, LB_EFORMAT = -1, LB_ENOMEM = -2, LB_EISA = -3, LB_EARG = -4, LB_EUNSUP = -5 };
#ifndef LB_PREFETCH_ROWS
/* While a block of 4 rows runs, each unit load also prefetches the same bytes of the next block:
 * rows are short streams (a 4096-wide 2-bit row is 1 KB), too short for the hardware prefetcher
 * to run ahead of, when the weights come from memory rather than cache. */
#define LB_PREFETCH_ROWS 4
#endif

/* Mirrored by lowbit.kernels._Weight (ctypes). */
typedef struct {
    int32_t fmt;
    int32_t step_type;
    int32_t zero_type;
    int32_t reserved;
    const uint8_t *packed;
    int64_t row_bytes, rows, cols, group; /* group: inputs per scale (cols for per-channel) */
    const void *step;
    int64_t step_rs, step_gs; /* element strides over rows and groups (0 = broadcast) */
    const void *zero;
    int64_t zero_rs, zero_gs;
    const float *bias; /* may be NULL */
} lb_weight;

/* ---------------------------------------------------------------- scalar helpers */

LB_INLINE float lb_half_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000u) << 16, exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, bits;
    if (exp == 0) {
        if (man == 0) {
            bits = sign;
        } else { /* subnormal half: normalise */
            int shifts = 0;
            while (!(man & 0x400u)) {
                man <<= 1;
                shifts++;
            }
            bits = sign | ((uint32_t)(113 - shifts) << 23) | ((man & 0x3FFu) << 13);
        }
    } else if (exp == 31) {
        bits = sign | 0x7F800000u | (man << 13);
    } else {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

LB_INLINE float lb_load_scalar(const void *p, int type, int64_t i)
{
    switch (type) {
    case LB_F16: return lb_half_to_float(((const uint16_t *)p)[i]);
    case LB_U8Z: return (float)((const uint8_t *)p)[i];
    default: return ((const float *)p)[i];
    }
}

LB_INLINE float lb_step(const lb_weight *w, int64_t r, int64_t g)
{
    return lb_load_scalar(w->step, w->step_type, r * w->step_rs + g * w->step_gs);
}

LB_INLINE float lb_zero(const lb_weight *w, int64_t r, int64_t g)
{
    return lb_load_scalar(w->zero, w->zero_type, r * w->zero_rs + g * w->zero_gs);
}

/* Code of column c in one packed row (the layouts of lowbit/packing.py). */
LB_INLINE int lb_code(int fmt, const uint8_t *row, int64_t c)
{
    switch (fmt) {
    case LB_U1: return (row[c >> 3] >> (c & 7)) & 1;
    case LB_U2: return (row[c >> 2] >> ((c & 3) * 2)) & 3;
    case LB_U4: return (row[c >> 1] >> ((c & 1) * 4)) & 15;
    case LB_U3: {
        const uint8_t *p = row + 3 * (c >> 3);
        uint32_t w = (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16;
        return (w >> (3 * (c & 7))) & 7;
    }
    case LB_T5: {
        static const int pow3[5] = {1, 3, 9, 27, 81};
        return (row[c / 5] / pow3[c % 5]) % 3;
    }
    default: return row[c];
    }
}

/* byte -> its codes, one per byte: t5 (5 base-3 digits), u1 (8 bits). */
static uint64_t lb_t5_table[256], lb_u1_table[256];

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

/* Decode one packed row to one byte per code. `out` needs cols + 8 bytes. */
LB_INLINE void lb_decode_row(int fmt, const uint8_t *row, int64_t cols, uint8_t *out)
{
    int64_t c = 0;
    switch (fmt) {
    case LB_U8: memcpy(out, row, (size_t)cols); return;
    case LB_U4:
        for (; c + 8 <= cols; c += 8) { /* 4 bytes -> 8 codes */
            uint32_t b;
            memcpy(&b, row + (c >> 1), 4);
            uint64_t v = b;
            v = (v | v << 16) & 0x0000FFFF0000FFFFull; /* one byte per 16 bits */
            v = (v | v << 8) & 0x00FF00FF00FF00FFull;
            v = (v & 0x000F000F000F000Full) | ((v << 4) & 0x0F000F000F000F00ull);
            memcpy(out + c, &v, 8);
        }
        break;
    case LB_U2:
        for (; c + 8 <= cols; c += 8) { /* 2 bytes -> 8 codes */
            uint64_t v = (uint64_t)row[c >> 2] | (uint64_t)row[(c >> 2) + 1] << 32;
            v = (v | v << 12) & 0x000F000F000F000Full; /* two codes per 16 bits */
            v = (v | v << 6) & 0x0303030303030303ull;  /* one code per byte */
            memcpy(out + c, &v, 8);
        }
        break;
    case LB_U1:
        for (; c + 8 <= cols; c += 8)
            memcpy(out + c, &lb_u1_table[row[c >> 3]], 8);
        break;
    case LB_U3:
        for (; c + 8 <= cols; c += 8) {
            const uint8_t *p = row + 3 * (c >> 3);
            uint64_t v = (uint64_t)p[0] | (uint64_t)p[1] << 8 | (uint64_t)p[2] << 16;
            v = (v | v << 20) & 0x00000FFF00000FFFull; /* 4 codes per 32-bit half */
            v = (v | v << 10) & 0x003F003F003F003Full; /* 2 codes per 16 bits */
            v = (v | v << 5) & 0x0707070707070707ull;  /* 1 code per byte */
            memcpy(out + c, &v, 8);
        }
        break;
    case LB_T5:
        for (; c + 5 <= cols; c += 5)
            memcpy(out + c, &lb_t5_table[row[c / 5]], 8); /* writes 3 bytes past, overwritten next */
        break;
    default: break;
    }
    for (; c < cols; c++)
        out[c] = (uint8_t)lb_code(fmt, row, c);
}

/* ---------------------------------------------------------------- per-call preparation */

typedef struct {
    const lb_weight *w;
    int64_t G, ng;   /* group length, groups per row */
    const float *x;  /* (batch, cols) */
    float *y;        /* (batch, rows) */
    int64_t batch;
    const float *xp; /* x' (batch, xps) for the direct path, else x */
    int64_t xps;     /* row stride of xp */
    float *sx;       /* (batch, ng): group sums of x */
    int kind;        /* AVX2 unit kind: 1, 2, 3, 4, 5 (t5) or 8 (u8 or decoded buffer) */
    int64_t fast_cols; /* direct path: columns whose units load without crossing the row end */
    int64_t prefetch;  /* direct path: bytes ahead to prefetch (the same place in the next block of rows) */
    int direct;      /* 1: the AVX2 loop reads packed rows; 0: rows decoded to a u8 buffer */
} lb_call;

/* The int8-activation path: x quantized per block of 32 columns, x = d * q with q in [-127, 127]. */
typedef struct {
    lb_call c;       /* c.sx: group sums of the dequantized activations d * q */
    int cpb;         /* codes per packed byte: 8, 4, 2, 1 (u1, u2, u4, u8) */
    int mode;        /* 0: groups of whole units or per-channel, 1: groups inside a unit */
    int64_t units;   /* 32-byte units per row (the last may run past the row end) */
    const int8_t *q; /* (batch, cols): q in column order (portable path) */
    const float *d;  /* (batch, nblk): the scale of each block of 32 columns */
    int64_t nblk;
    const int8_t *xq; /* (batch, xqs): q permuted to the plane order of the units (AVX2 path) */
    int64_t xqs;
    const float *dxl; /* (batch, dxls): the activation scale of each int32 lane of each unit */
    int64_t dxls;
} lb_q8call;

/* 64-byte aligned allocation (free with free()). */
static void *lb_alloc(size_t bytes)
{
    return aligned_alloc(64, (bytes + 63) / 64 * 64);
}

static int lb_fmt_ok(int fmt)
{
    return fmt == LB_U1 || fmt == LB_U2 || fmt == LB_U3 || fmt == LB_U4 || fmt == LB_U8 || fmt == LB_T5;
}

/* Columns per unit (the packed bytes one vector step decodes) of each kind. */
static int lb_unit_cols(int kind) { return kind == 5 ? 40 : kind == 3 || kind == 8 ? 8 : 64 / kind; }

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

/* ---------------------------------------------------------------- portable path */

static void lb_rows_portable(const lb_call *C, int64_t r0, int64_t r1, uint8_t *buf)
{
    const lb_weight *w = C->w;
    const int64_t cols = w->cols, rows = w->rows;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *row = w->packed + r * w->row_bytes;
        const uint8_t *codes = row;
        if (w->fmt != LB_U8) {
            lb_decode_row(w->fmt, row, cols, buf);
            codes = buf;
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

/* ---------------------------------------------------------------- AVX2 path */
#ifdef LB_X86
#define LB_AVX2 __attribute__((target("avx2,fma,f16c")))

LB_INLINE LB_AVX2 float lb_hsum(__m256 v)
{
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* 8 consecutive groups g..g+7 of a step/zero row as floats (gs == 1 or 0). */
LB_INLINE LB_AVX2 __m256 lb_load8(const void *p, int type, int64_t base, int64_t gs, int64_t g)
{
    if (gs == 0)
        return _mm256_set1_ps(lb_load_scalar(p, type, base));
    const int64_t i = base + g;
    switch (type) {
    case LB_F16: return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + i)));
    case LB_U8Z: return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)((const uint8_t *)p + i))));
    default: return _mm256_loadu_ps((const float *)p + i);
    }
}

LB_INLINE LB_AVX2 float lb_load_scalar_f16c(const void *p, int type, int64_t i)
{
    switch (type) {
    case LB_F16: return _cvtsh_ss(((const uint16_t *)p)[i]);
    case LB_U8Z: return (float)((const uint8_t *)p)[i];
    default: return ((const float *)p)[i];
    }
}

/* Steps of row r as floats into s[0..ng), and zt[b] = sum_g step * zero * X[g] per input. */
LB_INLINE LB_AVX2 void lb_row_scales(const lb_call *C, int64_t r, int64_t b0, const int NB, float *s, float *zt)
{
    const lb_weight *w = C->w;
    const int64_t ng = C->ng, sb = r * w->step_rs, zb = r * w->zero_rs;
    const int vec = (w->step_gs <= 1) && (w->zero_gs <= 1);
    __m256 acc[4];
    for (int b = 0; b < NB; b++)
        acc[b] = _mm256_setzero_ps();
    int64_t g = 0;
    if (vec)
        for (; g + 8 <= ng; g += 8) {
            __m256 sv = lb_load8(w->step, w->step_type, sb, w->step_gs, g);
            __m256 sz = _mm256_mul_ps(sv, lb_load8(w->zero, w->zero_type, zb, w->zero_gs, g));
            _mm256_storeu_ps(s + g, sv);
            for (int b = 0; b < NB; b++)
                acc[b] = _mm256_fmadd_ps(sz, _mm256_loadu_ps(C->sx + (b0 + b) * ng + g), acc[b]);
        }
    for (int b = 0; b < NB; b++)
        zt[b] = lb_hsum(acc[b]);
    for (; g < ng; g++) { /* the last groups (all of them when ng < 8): F16C scalar conversions */
        s[g] = lb_load_scalar_f16c(w->step, w->step_type, sb + g * w->step_gs);
        const float sz = s[g] * lb_load_scalar_f16c(w->zero, w->zero_type, zb + g * w->zero_gs);
        for (int b = 0; b < NB; b++)
            zt[b] += sz * C->sx[(b0 + b) * ng + g];
    }
}

/* Byte offset of the unit starting at column c. */
LB_INLINE int64_t lb_unit_offset(int kind, int64_t c)
{
    const uint64_t u = (uint64_t)c; /* c >= 0: unsigned arithmetic avoids sign fix-ups */
    return (int64_t)(kind == 8 ? u : kind == 3 ? 3 * (u >> 3) : kind == 5 ? u / 5 : u * (uint64_t)kind / 8);
}

LB_INLINE LB_AVX2 __m256i lb_unit_lanes(const uint8_t *p, const int kind)
{
    if (kind == 3) {
        uint32_t v;
        memcpy(&v, p, 4);
        return _mm256_set1_epi32((int)v);
    }
    return _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
}

/* Unit at column c of a row through a zero-padded copy (the row's last units only). */
LB_INLINE LB_AVX2 __m256i lb_load_unit_safe(const uint8_t *row, int64_t c, int64_t row_bytes, const int kind)
{
    const int64_t off = lb_unit_offset(kind, c);
    const int64_t n = row_bytes - off < 8 ? row_bytes - off : 8;
    uint8_t tmp[8] = {0};
    memcpy(tmp, row + off, (size_t)n);
    return lb_unit_lanes(tmp, kind);
}

/* Columns at the start of a row whose units can be loaded without reading past the row. */
static int64_t lb_fast_cols(int kind, int64_t cols, int64_t row_bytes)
{
    const int64_t U = lb_unit_cols(kind), need = kind == 3 ? 4 : 8, units = (cols + U - 1) / U;
    int64_t t = units;
    while (t > 0 && lb_unit_offset(kind, (t - 1) * U) + need > row_bytes)
        t--;
    return t * U;
}

/* acc[r][b][chain] += codes of the unit (lanes v[r]) times the matching x' of input b; sub-step h
 * feeds chain (a0 + h) % 2, so each (row, input) pair has two independent FMA chains. */
LB_INLINE LB_AVX2 void lb_unit_fma(const lb_call *C, const __m256i *v, const float *xp, __m256 acc[4][4][2],
                                   const int R, const int NB, const int KIND, const int a0)
{
    if (KIND == 5) {
        /* digit h = floor(p / 3^h) - 3 floor(p / 3^(h+1)); floor(p / 3^k) = (p * m_k) >> 16 for p < 256 */
        const int m[5] = {0, 21846, 7282, 2428, 810};
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            __m256i f = v[r];
#pragma GCC unroll 5
            for (int h = 0; h < 5; h++) {
                __m256i d = f;
                if (h < 4) {
                    const __m256i f_next = _mm256_mulhi_epu16(v[r], _mm256_set1_epi32(m[h + 1]));
                    d = _mm256_sub_epi32(f, _mm256_mullo_epi16(f_next, _mm256_set1_epi32(3)));
                    f = f_next;
                }
                const __m256 q = _mm256_cvtepi32_ps(d);
#pragma GCC unroll 4
                for (int b = 0; b < NB; b++)
                    acc[r][b][(a0 + h) & 1] =
                        _mm256_fmadd_ps(q, _mm256_loadu_ps(xp + b * C->xps + 8 * h), acc[r][b][(a0 + h) & 1]);
            }
        }
        return;
    }
    const int H = (KIND == 3 || KIND == 8) ? 1 : 8 / KIND;
#pragma GCC unroll 8
    for (int h = 0; h < H; h++) {
        __m256 xv[4];
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++)
            xv[b] = _mm256_loadu_ps(xp + b * C->xps + 8 * h);
        const __m256i mask = KIND == 3 ? _mm256_setr_epi32(7, 7 << 3, 7 << 6, 7 << 9, 7 << 12, 7 << 15, 7 << 18, 7 << 21)
                                       : _mm256_set1_epi32(((1 << KIND) - 1) << (KIND * h));
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            /* h = 0 of u1/u2: vpermps reads only the lane's low 3 bits; a periodic table drops the
             * other codes, so no mask and no conversion (one uop on the shuffle port) */
            const __m256 f = (h == 0 && (KIND == 1 || KIND == 2))
                                 ? _mm256_permutevar8x32_ps(KIND == 2 ? _mm256_setr_ps(0, 1, 2, 3, 0, 1, 2, 3)
                                                                      : _mm256_setr_ps(0, 1, 0, 1, 0, 1, 0, 1), v[r])
                                 : _mm256_cvtepi32_ps(KIND == 8 ? v[r] : _mm256_and_si256(v[r], mask));
#pragma GCC unroll 4
            for (int b = 0; b < NB; b++)
                acc[r][b][(a0 + h) & 1] = _mm256_fmadd_ps(f, xv[b], acc[r][b][(a0 + h) & 1]);
        }
    }
}

/* n whole units from p[r] (advanced) and *xq (advanced); one-sub-step kinds take units in pairs
 * so that both FMA chains are fed. */
LB_INLINE LB_AVX2 void lb_units(const lb_call *C, const uint8_t **p, const float **xq, int64_t n, __m256 acc[4][4][2],
                                const int R, const int NB, const int KIND)
{
    const int U = lb_unit_cols(KIND);
    const int64_t step = KIND == 3 ? 3 : 8; /* bytes per unit */
    int64_t k = 0;
    if (KIND == 3 || KIND == 8)
        for (; k + 2 <= n; k += 2) {
            __m256i v[4], v2[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                v[r] = lb_unit_lanes(p[r], KIND);
                v2[r] = lb_unit_lanes(p[r] + step, KIND);
                p[r] += 2 * step;
            }
            lb_unit_fma(C, v, *xq, acc, R, NB, KIND, 0);
            lb_unit_fma(C, v2, *xq + U, acc, R, NB, KIND, 1);
            *xq += 2 * U;
        }
    for (; k < n; k++) {
        __m256i v[4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++) {
            _mm_prefetch((const char *)p[r] + C->prefetch, _MM_HINT_T0);
            v[r] = lb_unit_lanes(p[r], KIND);
            p[r] += step;
        }
        lb_unit_fma(C, v, *xq, acc, R, NB, KIND, 0);
        *xq += U;
    }
}

/* total[r][b] += step[r, g] * acc[r][b], then acc = 0. */
LB_INLINE LB_AVX2 void lb_flush(__m256 total[4][4], __m256 acc[4][4][2], const float *sbuf, int64_t ng, int64_t g,
                                const int R, const int NB)
{
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        const __m256 sv = _mm256_broadcast_ss(sbuf + r * ng + g);
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) {
            total[r][b] = _mm256_fmadd_ps(sv, _mm256_add_ps(acc[r][b][0], acc[r][b][1]), total[r][b]);
            acc[r][b][0] = acc[r][b][1] = _mm256_setzero_ps();
        }
    }
}

/* One tile: rows rid[0..R) (code rows rowp[]) times inputs b0..b0+NB-1; only the first nr rows
 * are written (the others repeat the last row). R, NB and KIND are compile-time constants at
 * every call site, so the arrays below live in registers. */
LB_INLINE LB_AVX2 void lb_tile_avx2(const lb_call *C, const uint8_t *const *rowp, const int64_t *rid, int nr,
                                    int64_t row_bytes, int64_t b0, float *sbuf, const int R, const int NB,
                                    const int KIND)
{
    const lb_weight *w = C->w;
    const int64_t cols = w->cols, G = C->G, ng = C->ng;
    const int U = lb_unit_cols(KIND);
    const float *xb = C->xp + b0 * C->xps;

    float zt[4][4], extra[4][4];
    __m256 total[4][4], acc[4][4][2];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        lb_row_scales(C, rid[r], b0, NB, sbuf + r * ng, zt[r]);
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++) {
            total[r][b] = acc[r][b][0] = acc[r][b][1] = _mm256_setzero_ps();
            extra[r][b] = 0.0f;
        }
    }

    /* Groups of whole units that all load without crossing the row end: a tight loop. */
    const int64_t upg = G % U == 0 ? G / U : 0;
    const int64_t n_tight = upg ? (C->fast_cols / G < ng ? C->fast_cols / G : ng) : 0;
    const uint8_t *p[4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++)
        p[r] = rowp[r];
    const float *xq = xb;
    for (int64_t g = 0; g < n_tight; g++) {
        lb_units(C, p, &xq, upg, acc, R, NB, KIND);
        lb_flush(total, acc, sbuf, ng, g, R, NB);
    }

    /* The other groups: the row end, and the u8 loop's groups that end inside a unit. */
    for (int64_t g = n_tight; g < ng; g++) {
        const int64_t c0 = g * G, c1 = c0 + G < cols ? c0 + G : cols; /* c0: a unit boundary, or any (KIND 8) */
        const int64_t c_fast = KIND == 8 ? c1 : c1 < C->fast_cols ? c1 : C->fast_cols;
        const int64_t n_fast = c_fast > c0 ? (c_fast - c0) / U : 0;
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            p[r] = rowp[r] + lb_unit_offset(KIND, c0);
        xq = xb + c0;
        lb_units(C, p, &xq, n_fast, acc, R, NB, KIND);
        int64_t c = c0 + n_fast * U;
        if (KIND != 8)
            for (; c < c1; c += U) { /* the row's last units: x' is zero past the end */
                __m256i v[4];
#pragma GCC unroll 4
                for (int r = 0; r < R; r++)
                    v[r] = lb_load_unit_safe(rowp[r], c, row_bytes, KIND);
                lb_unit_fma(C, v, xb + c, acc, R, NB, KIND, 0);
            }
        lb_flush(total, acc, sbuf, ng, g, R, NB);
        if (KIND == 8 && c < c1) { /* group end not on a unit boundary: scalar */
            float tail[4][4] = {{0}};
            for (; c < c1; c++)
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const float code = (float)rowp[r][c];
#pragma GCC unroll 4
                    for (int b = 0; b < NB; b++)
                        tail[r][b] += code * C->x[(b0 + b) * cols + c];
                }
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
#pragma GCC unroll 4
                for (int b = 0; b < NB; b++)
                    extra[r][b] += sbuf[r * ng + g] * tail[r][b];
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        if (r >= nr)
            break;
        const float bias = w->bias ? w->bias[rid[r]] : 0.0f;
#pragma GCC unroll 4
        for (int b = 0; b < NB; b++)
            C->y[(b0 + b) * w->rows + rid[r]] = (lb_hsum(total[r][b]) + extra[r][b] - zt[r][b]) + bias;
    }
}

/* Dispatch a tile to the specialisation of its KIND; shapes (R, NB): (4, 1), (2, 2), (1, 4). */
#define LB_TILE_SHAPES(KIND)                                                                        \
    do {                                                                                            \
        if (NB == 1) lb_tile_avx2(C, rowp, rid, nr, row_bytes, b0, sbuf, 4, 1, KIND);              \
        else if (NB == 2) lb_tile_avx2(C, rowp, rid, nr, row_bytes, b0, sbuf, 2, 2, KIND);         \
        else lb_tile_avx2(C, rowp, rid, nr, row_bytes, b0, sbuf, 1, 4, KIND);                      \
    } while (0)

static LB_AVX2 void lb_tile_dispatch(const lb_call *C, const uint8_t *const *rowp, const int64_t *rid, int nr,
                                     int64_t row_bytes, int64_t b0, float *sbuf, int NB, int kind)
{
    switch (kind) {
    case 1: LB_TILE_SHAPES(1); break;
    case 2: LB_TILE_SHAPES(2); break;
    case 3: LB_TILE_SHAPES(3); break;
    case 4: LB_TILE_SHAPES(4); break;
    case 5: LB_TILE_SHAPES(5); break;
    default: LB_TILE_SHAPES(8); break;
    }
}

/* Rows r0..r1 (a block of 1 to 4) for every input of the batch: inputs in chunks of 4 (one row
 * per tile), then 2 (two rows per tile), then 1 (four rows per tile). A block of fewer than 4
 * rows repeats its last row to fill the tile and writes only the real ones. */
static LB_AVX2 void lb_rows_avx2(const lb_call *C, int64_t r0, int64_t r1, uint8_t *buf, float *sbuf)
{
    const lb_weight *w = C->w;
    const uint8_t *rowp[4];
    int64_t rid[4];
    const int n = (int)(r1 - r0);
    for (int i = 0; i < 4; i++) {
        rid[i] = r0 + (i < n ? i : n - 1);
        rowp[i] = w->packed + rid[i] * w->row_bytes;
        if (!C->direct && i < n) {
            uint8_t *dst = buf + i * (w->cols + 16);
            lb_decode_row(w->fmt, rowp[i], w->cols, dst);
            rowp[i] = dst;
        } else if (!C->direct) {
            rowp[i] = rowp[n - 1];
        }
    }
    const int64_t row_bytes = C->direct ? w->row_bytes : w->cols;
    int64_t b0 = 0;
    for (; b0 + 4 <= C->batch; b0 += 4)
        for (int i = 0; i < n; i++)
            lb_tile_dispatch(C, rowp + i, rid + i, 1, row_bytes, b0, sbuf, 4, C->kind);
    for (; b0 + 2 <= C->batch; b0 += 2)
        for (int i = 0; i < n; i += 2)
            lb_tile_dispatch(C, rowp + i, rid + i, n - i < 2 ? n - i : 2, row_bytes, b0, sbuf, 2, C->kind);
    if (b0 < C->batch)
        lb_tile_dispatch(C, rowp, rid, n, row_bytes, b0, sbuf, 1, C->kind);
}

/* ---------------------------------------------------------------- int8-activation path (AVX2) */

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

static int lb_cpu_has_avx2(void)
{
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
}
#else
static int lb_cpu_has_avx2(void) { return 0; }
#endif

/* ---------------------------------------------------------------- exported API */

LB_EXPORT int lb_isa(void) { return lb_cpu_has_avx2() ? 1 : 0; }

LB_EXPORT int lb_openmp(void)
{
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}

LB_EXPORT void lb_f16_to_f32(const uint16_t *src, float *dst, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        dst[i] = lb_half_to_float(src[i]);
}

static int lb_check(const lb_weight *w)
{
    if (!lb_fmt_ok(w->fmt)) return LB_EFORMAT;
    if (w->rows < 0 || w->cols < 1 || w->group < 1 || !w->packed || !w->step || !w->zero) return LB_EARG;
    return LB_OK;
}

/* y (batch, rows) = x (batch, cols) @ W^T + bias.  isa: -1 auto, 0 portable, 1 AVX2. */
LB_EXPORT int lb_linear(const lb_weight *w, const float *x, int64_t batch, float *y, int nthreads, int isa)
{
    int err = lb_check(w);
    if (err) return err;
    if (batch < 1) return LB_OK;
    if (isa < 0) isa = lb_cpu_has_avx2();
    if (isa == 1 && !lb_cpu_has_avx2()) return LB_EISA;

    lb_call C;
    memset(&C, 0, sizeof C);
    C.w = w;
    C.G = w->group < w->cols ? w->group : w->cols;
    C.ng = (w->cols + C.G - 1) / C.G;
    C.x = x;
    C.y = y;
    C.batch = batch;
    /* direct: every group starts on a unit boundary */
    C.direct = isa == 1 && (w->fmt == LB_U8 || C.G % lb_unit_cols(w->fmt) == 0 || C.G == w->cols);
    C.kind = C.direct ? w->fmt : LB_U8;

#ifdef LB_X86
    if (C.direct) {
        C.fast_cols = lb_fast_cols(C.kind, w->cols, w->row_bytes);
        C.prefetch = LB_PREFETCH_ROWS * w->row_bytes;
    }
#endif
    /* x' rows start on 64-byte boundaries so that no vector load splits a cache line */
    const int64_t U = lb_unit_cols(C.kind), xps = ((w->cols + U - 1) / U * U + 15) / 16 * 16;
    const int need_xp = C.kind != LB_U8;
    const size_t xp_floats = need_xp ? (size_t)(batch * xps) : 0;
    float *scratch = lb_alloc(sizeof(float) * (xp_floats + (size_t)(batch * C.ng)));
    if (!scratch) return LB_ENOMEM;
    C.sx = scratch + xp_floats;
    for (int64_t b = 0; b < batch; b++)
        for (int64_t g = 0; g < C.ng; g++) {
            int64_t c0 = g * C.G, c1 = c0 + C.G < w->cols ? c0 + C.G : w->cols;
            double s = 0.0;
            for (int64_t c = c0; c < c1; c++)
                s += x[b * w->cols + c];
            C.sx[b * C.ng + g] = (float)s;
        }
    if (need_xp) {
        for (int64_t b = 0; b < batch; b++)
            lb_prepare_xp(C.kind, x + b * w->cols, w->cols, scratch + b * xps);
        C.xp = scratch;
        C.xps = xps;
    } else {
        C.xp = x;
        C.xps = w->cols;
    }

    const int64_t nblocks = (w->rows + 3) / 4;
    int failed = 0;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
    const int parallel = nthreads > 1 && w->rows * w->cols * batch >= 65536 && nblocks > 1;
    /* dynamic chunks (~16 per thread): a thread the OS pauses does not hold back the others */
    int64_t chunk = nblocks / (16 * (int64_t)nthreads);
    if (chunk < 1) chunk = 1;
#pragma omp parallel num_threads(nthreads) if (parallel) reduction(| : failed)
#endif
    {
        /* 4 decoded rows (buffer path) and 4 rows of steps as floats */
        const size_t codes_bytes = ((size_t)4 * (size_t)(w->cols + 16) + 63) & ~(size_t)63;
        uint8_t *buf = lb_alloc(codes_bytes + sizeof(float) * (size_t)(4 * C.ng));
        float *sbuf = buf ? (float *)(buf + codes_bytes) : NULL;
        if (!buf) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
        for (int64_t blk = 0; blk < nblocks; blk++) {
            if (failed) continue;
            int64_t r0 = blk * 4, r1 = r0 + 4 < w->rows ? r0 + 4 : w->rows;
#ifdef LB_X86
            if (isa == 1)
                lb_rows_avx2(&C, r0, r1, buf, sbuf);
            else
#endif
                lb_rows_portable(&C, r0, r1, buf);
        }
        free(buf);
    }
    (void)nthreads;
    free(scratch);
    return failed ? LB_ENOMEM : LB_OK;
}

/* ---------------------------------------------------------------- int8-activation entry points */

/* 0: no AVX2 (portable), 1: AVX2, 2: AVX-VNNI, 3: AVX512-VNNI (used on ymm registers). */
static int lb_q8_isa(void)
{
#ifdef LB_X86
    if (!lb_cpu_has_avx2()) return 0;
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
#endif
    return isa == 0;
}

/* Codes per byte of the layouts the int8 path reads (0: not one of them). */
static int lb_q8_cpb(int fmt) { return fmt == LB_U1 ? 8 : fmt == LB_U2 ? 4 : fmt == LB_U4 ? 2 : fmt == LB_U8 ? 1 : 0; }

/* 0 / 1: the tile mode for this weight (0: per-channel or several units per group, 1: one unit
 * per group or several groups per unit); -1: the int8 path does not take it (u3, t5, or groups
 * whose boundaries split a 4-code int32 lane of a unit). */
static int lb_q8_mode(const lb_weight *w)
{
    const int cpb = lb_q8_cpb(w->fmt);
    if (!cpb) return -1;
    const int64_t G = w->group < w->cols ? w->group : w->cols, UC = 32 * cpb;
    if (G == w->cols || (G % UC == 0 && G >= 2 * UC)) return 0; /* several units per group */
    if (G == UC || (UC % G == 0 && G % (4 * cpb) == 0)) return 1;
    return -1;
}

LB_EXPORT int lb_q8_supported(const lb_weight *w) { return lb_check(w) == LB_OK && lb_q8_mode(w) >= 0; }

/* Quantize one input row: per 32-column block d = max|x| / 127, q = round(x / d) (as x * (1 / d),
 * half to even); q in column order, permuted (xq), lane scales (dxl) and group sums of d * q. */
static void lb_q8_prepare(const lb_q8call *Q, const float *x, int8_t *q, float *d, int8_t *xq, float *dxl, float *sx)
{
    const int64_t cols = Q->c.w->cols, G = Q->c.G, cpb = Q->cpb, UC = 32 * cpb;
    for (int64_t k = 0; k < Q->nblk; k++) {
        const int64_t c0 = 32 * k, c1 = c0 + 32 < cols ? c0 + 32 : cols;
        float amax = 0.0f;
        for (int64_t c = c0; c < c1; c++) {
            const float a = x[c] < 0 ? -x[c] : x[c];
            amax = a > amax ? a : amax;
        }
        const float dk = amax / 127.0f, id = dk > 0.0f ? 1.0f / dk : 0.0f;
        d[k] = dk;
        for (int64_t c = c0; c < c1; c++) {
            float v = __builtin_nearbyintf(x[c] * id);
            v = v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v;
            q[c] = (int8_t)v;
        }
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
            for (int64_t i = 0; i < 32; i++) {
                const int64_t c = (32 * u + i) * cpb + h;
                xq[u * UC + 32 * h + i] = c < cols ? q[c] : 0;
            }
        for (int64_t k = 0; k < 8; k++) {
            const int64_t c = (32 * u + 4 * k) * cpb;
            dxl[8 * u + k] = c < cols ? d[c / 32] : 0.0f;
        }
    }
}

static void lb_q8_rows_portable(const lb_q8call *Q, int64_t r0, int64_t r1, uint8_t *buf)
{
    const lb_weight *w = Q->c.w;
    const int64_t cols = w->cols, G = Q->c.G, ng = Q->c.ng;
    for (int64_t r = r0; r < r1; r++) {
        const uint8_t *codes = w->packed + r * w->row_bytes;
        if (w->fmt != LB_U8) {
            lb_decode_row(w->fmt, codes, cols, buf);
            codes = buf;
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

/* y (batch, rows) = q8(x) @ W^T + bias: x quantized to int8 per block of 32 columns, integer
 * dot products with the codes. isa: -1 auto (the best of lb_q8_isa), 0 portable, 1 AVX2,
 * 2 AVX-VNNI, 3 AVX512-VNNI. Returns LB_EUNSUP for weights lb_q8_supported rejects. */
LB_EXPORT int lb_linear_q8(const lb_weight *w, const float *x, int64_t batch, float *y, int nthreads, int isa)
{
    int err = lb_check(w);
    if (err) return err;
    const int mode = lb_q8_mode(w);
    if (mode < 0) return LB_EUNSUP;
    if (batch < 1) return LB_OK;
    if (isa < 0) isa = lb_q8_isa();
    else if (!lb_q8_isa_ok(isa)) return LB_EISA;

    lb_q8call Q;
    memset(&Q, 0, sizeof Q);
    lb_call *C = &Q.c;
    C->w = w;
    C->G = w->group < w->cols ? w->group : w->cols;
    C->ng = (w->cols + C->G - 1) / C->G;
    C->y = y;
    C->batch = batch;
    C->prefetch = LB_PREFETCH_ROWS * w->row_bytes;
    Q.cpb = lb_q8_cpb(w->fmt);
    Q.mode = mode;
    Q.units = (w->row_bytes + 31) / 32;
    Q.nblk = (w->cols + 31) / 32;
    Q.xqs = (Q.units * 32 * Q.cpb + 63) / 64 * 64;
    Q.dxls = (Q.units * 8 + 15) / 16 * 16;
    const int64_t qs = (w->cols + 63) / 64 * 64, ds = (Q.nblk + 15) / 16 * 16, ss = (C->ng + 15) / 16 * 16;
    const int vec = isa >= 1;
    /* scratch (64-byte aligned pieces): q, xq (bytes); d, dxl, sx (floats) */
    const size_t q_bytes = (size_t)(batch * qs), xq_bytes = vec ? (size_t)(batch * Q.xqs) : 0;
    const size_t floats = (size_t)(batch * (ds + (vec ? Q.dxls : 0) + ss));
    uint8_t *scratch = lb_alloc(q_bytes + xq_bytes + sizeof(float) * floats);
    if (!scratch) return LB_ENOMEM;
    int8_t *qb = (int8_t *)scratch, *xqb = vec ? (int8_t *)(scratch + q_bytes) : NULL;
    float *db = (float *)(scratch + q_bytes + xq_bytes), *dxlb = vec ? db + batch * ds : NULL;
    float *sxb = db + batch * ds + (vec ? batch * Q.dxls : 0);
    for (int64_t b = 0; b < batch; b++)
        lb_q8_prepare(&Q, x + b * w->cols, qb + b * qs, db + b * ds, vec ? xqb + b * Q.xqs : NULL,
                      vec ? dxlb + b * Q.dxls : NULL, sxb + b * ss);
    Q.q = qb;
    Q.d = db;
    Q.xq = xqb;
    Q.dxl = dxlb;
    /* lb_row_scales reads sx as (batch, ng) */
    if (ss != C->ng)
        for (int64_t b = 1; b < batch; b++)
            memmove(sxb + b * C->ng, sxb + b * ss, sizeof(float) * (size_t)C->ng);
    C->sx = sxb;
    /* the portable path indexes q and d by cols and nblk */
    if (!vec) {
        for (int64_t b = 1; b < batch; b++) {
            memmove(qb + b * w->cols, qb + b * qs, (size_t)w->cols);
            memmove(db + b * Q.nblk, db + b * ds, sizeof(float) * (size_t)Q.nblk);
        }
    }

    const int64_t nblocks = (w->rows + 3) / 4;
    int failed = 0;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
    const int parallel = nthreads > 1 && w->rows * w->cols * batch >= 65536 && nblocks > 1;
    int64_t chunk = nblocks / (16 * (int64_t)nthreads);
    if (chunk < 1) chunk = 1;
#pragma omp parallel num_threads(nthreads) if (parallel) reduction(| : failed)
#endif
    {
        /* one decoded row (portable) and 4 rows of steps as floats, each padded by 8 zeros */
        const size_t codes_bytes = ((size_t)(w->cols + 16) + 63) & ~(size_t)63;
        const size_t sfloats = (size_t)(4 * (C->ng + 8));
        uint8_t *buf = lb_alloc(codes_bytes + sizeof(float) * sfloats);
        float *sbuf = buf ? (float *)(buf + codes_bytes) : NULL;
        if (!buf) failed = 1;
        else memset(sbuf, 0, sizeof(float) * sfloats);
#ifdef _OPENMP
#pragma omp for schedule(dynamic, chunk)
#endif
        for (int64_t blk = 0; blk < nblocks; blk++) {
            if (failed) continue;
            const int64_t r0 = blk * 4, r1 = r0 + 4 < w->rows ? r0 + 4 : w->rows;
#ifdef LB_X86
            if (isa == 3) lb_q8_rows_avx512vnni(&Q, r0, r1, sbuf);
            else if (isa == 2) lb_q8_rows_avxvnni(&Q, r0, r1, sbuf);
            else if (isa == 1) lb_q8_rows_avx2(&Q, r0, r1, sbuf);
            else
#endif
                lb_q8_rows_portable(&Q, r0, r1, buf);
        }
        free(buf);
    }
    (void)nthreads;
    free(scratch);
    return failed ? LB_ENOMEM : LB_OK;
}

/* ---------------------------------------------------------------- fp16 weights (unquantized layers) */

/* y[b, r] = sum_c half(w[r, c]) * x[b, c] (+ bias[r]) for rows r0..r1; 4 rows at a time, two
 * accumulators per row. For the high-precision layers a packed model keeps in fp16 (the tied
 * output head): reads the halves once per call instead of converting the whole matrix. */
static void lb_f16_rows_portable(const uint16_t *w, int64_t cols, const float *x, int64_t batch, int64_t rows,
                                 const float *bias, float *y, int64_t r0, int64_t r1)
{
    for (int64_t r = r0; r < r1; r++)
        for (int64_t b = 0; b < batch; b++) {
            float acc = 0.0f;
            for (int64_t c = 0; c < cols; c++)
                acc += lb_half_to_float(w[r * cols + c]) * x[b * cols + c];
            y[b * rows + r] = acc + (bias ? bias[r] : 0.0f);
        }
}

#ifdef LB_X86
static LB_AVX2 void lb_f16_rows_avx2(const uint16_t *w, int64_t cols, const float *x, int64_t batch, int64_t rows,
                                     const float *bias, float *y, int64_t r0, int64_t r1)
{
    const int64_t c8 = cols / 8 * 8;
    for (int64_t r = r0; r < r1; r += 4) {
        const int n = r1 - r < 4 ? (int)(r1 - r) : 4;
        const uint16_t *wr[4];
        for (int i = 0; i < 4; i++)
            wr[i] = w + (r + (i < n ? i : n - 1)) * cols;
        for (int64_t b = 0; b < batch; b++) {
            const float *xb = x + b * cols;
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
                y[b * rows + r + i] = acc + (bias ? bias[r + i] : 0.0f);
            }
        }
    }
}
#endif

/* y (batch, rows) = x (batch, cols) @ half(W)^T + bias, W (rows, cols) fp16 row-major. */
LB_EXPORT int lb_linear_f16(const uint16_t *w, int64_t rows, int64_t cols, const float *bias, const float *x,
                            int64_t batch, float *y, int nthreads, int isa)
{
    if (!w || rows < 0 || cols < 1) return LB_EARG;
    if (batch < 1 || rows == 0) return LB_OK;
    if (isa < 0) isa = lb_cpu_has_avx2();
    if (isa == 1 && !lb_cpu_has_avx2()) return LB_EISA;
    const int64_t nblocks = (rows + 3) / 4;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
    const int parallel = nthreads > 1 && rows * cols * batch >= 65536 && nblocks > 1;
    int64_t chunk = nblocks / (16 * (int64_t)nthreads);
    if (chunk < 1) chunk = 1;
#pragma omp parallel for num_threads(nthreads) if (parallel) schedule(dynamic, chunk)
#endif
    for (int64_t blk = 0; blk < nblocks; blk++) {
        const int64_t r0 = blk * 4, r1 = r0 + 4 < rows ? r0 + 4 : rows;
#ifdef LB_X86
        if (isa == 1)
            lb_f16_rows_avx2(w, cols, x, batch, rows, bias, y, r0, r1);
        else
#endif
            lb_f16_rows_portable(w, cols, x, batch, rows, bias, y, r0, r1);
    }
    (void)nthreads;
    return LB_OK;
}

/* ---------------------------------------------------------------- one decode step of a Llama block */

/* A Llama/Qwen2 decoder block for single-token decoding, entirely in C: RMSNorm, the fused q/k/v
 * projection, RoPE, the KV-cache write, attention over the cache, o projection, residual, RMSNorm,
 * the fused gate/up projection, SiLU * up, down projection, residual. Mirrored by
 * lowbit.kernels._Layer; used by lowbit.decoder.Decoder when every projection is packed. */
typedef struct {
    const lb_weight *qkv, *o, *gate_up, *down;
    const float *ln1, *ln2;  /* RMSNorm weights (hidden) */
    float *kcache, *vcache;  /* (nkv, max_len, hd) */
    int64_t hidden, nh, nkv, hd, inter, max_len;
    float eps1, eps2, scale;
    int32_t q8;              /* 1: int8 activations (lb_linear_q8), 0: float (lb_linear) */
    int32_t reserved;
} lb_layer;

static void lb_rmsnorm(const float *x, const float *w, int64_t n, float eps, float *out)
{
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++)
        ss += x[i] * x[i];
    const float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++)
        out[i] = w[i] * (x[i] * r);
}

/* x (heads, hd) in place: x[i] * cos[i] + x[(i + hd/2) % hd] * ss[i] (ss: sin with the sign of
 * rotate_half folded in). */
static void lb_rope(float *x, int64_t heads, int64_t hd, const float *cos, const float *ss)
{
    const int64_t half = hd / 2;
    for (int64_t h = 0; h < heads; h++) {
        float *v = x + h * hd;
        for (int64_t i = 0; i < half; i++) {
            const float a = v[i], b = v[i + half];
            v[i] = a * cos[i] + b * ss[i];
            v[i + half] = b * cos[i + half] + a * ss[i + half];
        }
    }
}

/* sum_i a[i] * b[i] and y += p * x (n floats): AVX2 with 4 / 1 independent vectors where the CPU
 * has it (the attention loops over the cache are the only O(context) work of a decode step). */
#ifdef LB_X86
static LB_AVX2 float lb_dot_avx2(const float *a, const float *b, int64_t n)
{
    __m256 s0 = _mm256_setzero_ps(), s1 = _mm256_setzero_ps();
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) {
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
        s1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i + 8), _mm256_loadu_ps(b + i + 8), s1);
    }
    for (; i + 8 <= n; i += 8)
        s0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + i), _mm256_loadu_ps(b + i), s0);
    float s = lb_hsum(_mm256_add_ps(s0, s1));
    for (; i < n; i++)
        s += a[i] * b[i];
    return s;
}

static LB_AVX2 void lb_axpy_avx2(float *y, float p, const float *x, int64_t n)
{
    const __m256 pv = _mm256_set1_ps(p);
    int64_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm256_storeu_ps(y + i, _mm256_fmadd_ps(pv, _mm256_loadu_ps(x + i), _mm256_loadu_ps(y + i)));
    for (; i < n; i++)
        y[i] += p * x[i];
}
#endif

static float lb_dot(const float *a, const float *b, int64_t n, int avx2)
{
#ifdef LB_X86
    if (avx2) return lb_dot_avx2(a, b, n);
#endif
    (void)avx2;
    float s[4] = {0};
    int64_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int k = 0; k < 4; k++)
            s[k] += a[i + k] * b[i + k];
    float t = (s[0] + s[2]) + (s[1] + s[3]);
    for (; i < n; i++)
        t += a[i] * b[i];
    return t;
}

static void lb_axpy(float *y, float p, const float *x, int64_t n, int avx2)
{
#ifdef LB_X86
    if (avx2) {
        lb_axpy_avx2(y, p, x, n);
        return;
    }
#endif
    (void)avx2;
    for (int64_t i = 0; i < n; i++)
        y[i] += p * x[i];
}

LB_EXPORT int lb_decode_layers(const lb_layer *layers, int64_t n_layers, float *x, int64_t pos, const float *cos,
                               const float *ss, float *scratch, int nthreads)
{
    const int avx2 = lb_cpu_has_avx2();
    for (int64_t l = 0; l < n_layers; l++) {
        const lb_layer *L = layers + l;
        const int64_t H = L->hidden, nh = L->nh, nkv = L->nkv, hd = L->hd, I = L->inter;
        if (pos < 0 || pos >= L->max_len) return LB_EARG;
        float *h = scratch, *qkv = h + H, *att = qkv + (nh + 2 * nkv) * hd, *o = att + nh * hd;
        float *gu = o + H, *act = gu + 2 * I, *scores = act + I;
        int err;
#define LB_LIN(W, IN, OUT) (L->q8 ? lb_linear_q8((W), (IN), 1, (OUT), nthreads, -1) : lb_linear((W), (IN), 1, (OUT), nthreads, -1))
        lb_rmsnorm(x, L->ln1, H, L->eps1, h);
        if ((err = LB_LIN(L->qkv, h, qkv))) return err;
        float *q = qkv, *k = qkv + nh * hd, *v = k + nkv * hd;
        lb_rope(q, nh, hd, cos, ss);
        lb_rope(k, nkv, hd, cos, ss);
        for (int64_t j = 0; j < nkv; j++) {
            memcpy(L->kcache + (j * L->max_len + pos) * hd, k + j * hd, sizeof(float) * (size_t)hd);
            memcpy(L->vcache + (j * L->max_len + pos) * hd, v + j * hd, sizeof(float) * (size_t)hd);
        }
        const int64_t len = pos + 1, group = nh / nkv;
        for (int64_t hh = 0; hh < nh; hh++) {
            const float *qh = q + hh * hd;
            const float *kc = L->kcache + (hh / group) * L->max_len * hd, *vc = L->vcache + (hh / group) * L->max_len * hd;
            float mx = -INFINITY;
            for (int64_t t = 0; t < len; t++) {
                scores[t] = lb_dot(qh, kc + t * hd, hd, avx2) * L->scale;
                mx = scores[t] > mx ? scores[t] : mx;
            }
            float sum = 0.0f;
            for (int64_t t = 0; t < len; t++) {
                scores[t] = expf(scores[t] - mx);
                sum += scores[t];
            }
            float *out = att + hh * hd;
            for (int64_t i = 0; i < hd; i++)
                out[i] = 0.0f;
            for (int64_t t = 0; t < len; t++)
                lb_axpy(out, scores[t] / sum, vc + t * hd, hd, avx2);
        }
        if ((err = LB_LIN(L->o, att, o))) return err;
        for (int64_t i = 0; i < H; i++)
            x[i] += o[i];
        lb_rmsnorm(x, L->ln2, H, L->eps2, h);
        if ((err = LB_LIN(L->gate_up, h, gu))) return err;
        for (int64_t i = 0; i < I; i++) {
            const float g = gu[i];
            act[i] = g / (1.0f + expf(-g)) * gu[I + i];
        }
        if ((err = LB_LIN(L->down, act, o))) return err;
        for (int64_t i = 0; i < H; i++)
            x[i] += o[i];
#undef LB_LIN
    }
    return LB_OK;
}

/* One row of the dequantized weight: out[c] = step * (code - zero), no FMA (bit-exact with torch). */
LB_INLINE void lb_dequant_row(const lb_weight *w, int64_t r, int64_t G, int64_t ng, uint8_t *buf, float *o)
{
    const int64_t cols = w->cols;
    const uint8_t *codes = w->packed + r * w->row_bytes;
    if (w->fmt != LB_U8) {
        lb_decode_row(w->fmt, codes, cols, buf);
        codes = buf;
    }
    for (int64_t g = 0; g < ng; g++) {
        const float s = lb_step(w, r, g), z = lb_zero(w, r, g);
        const int64_t c1 = (g + 1) * G < cols ? (g + 1) * G : cols;
        for (int64_t c = g * G; c < c1; c++)
            o[c] = s * ((float)codes[c] - z);
    }
}

static void lb_dequant_row_portable(const lb_weight *w, int64_t r, int64_t G, int64_t ng, uint8_t *buf, float *o)
{
    lb_dequant_row(w, r, G, ng, buf, o);
}

#ifdef LB_X86
/* the same C, vectorised by the compiler for AVX2 */
static LB_AVX2 void lb_dequant_row_avx2(const lb_weight *w, int64_t r, int64_t G, int64_t ng, uint8_t *buf, float *o)
{
    lb_dequant_row(w, r, G, ng, buf, o);
}
#endif

/* out (r1 - r0, cols) float32 = rows r0..r1 of step * (code - zero), computed exactly as
 * QuantizedWeight.dequantize. */
LB_EXPORT int lb_dequantize(const lb_weight *w, int64_t r0, int64_t r1, float *out, int nthreads)
{
    int err = lb_check(w);
    if (err) return err;
    if (r0 < 0 || r1 > w->rows || r0 > r1) return LB_EARG;
    const int64_t cols = w->cols, G = w->group < cols ? w->group : cols, ng = (cols + G - 1) / G;
    const int avx2 = lb_cpu_has_avx2();
    int failed = 0;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
#pragma omp parallel num_threads(nthreads) if (nthreads > 1 && (r1 - r0) * cols >= 65536) reduction(| : failed)
#endif
    {
        uint8_t *buf = malloc((size_t)(cols + 16));
        if (!buf) failed = 1;
#ifdef _OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t r = r0; r < r1; r++) {
            if (failed) continue;
#ifdef LB_X86
            if (avx2)
                lb_dequant_row_avx2(w, r, G, ng, buf, out + (r - r0) * cols);
            else
#endif
                lb_dequant_row_portable(w, r, G, ng, buf, out + (r - r0) * cols);
        }
        free(buf);
    }
    (void)nthreads;
    (void)avx2;
    return failed ? LB_ENOMEM : LB_OK;
}
