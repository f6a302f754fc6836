/* The AVX2 row kernels of lb_linear (float activations), one per unit kind: see matvec.c for
 * how the codes decode in registers. Each kernel runs rows r0..r1 (a block of 1 to 4) for every
 * input of the batch as tiles of (rows, inputs) = (4, 1), (2, 2) or (1, 4). */
#include "simd.h"

#ifdef LB_X86
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
int64_t lb_fast_cols(int kind, int64_t cols, int64_t row_bytes)
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

/* Rows r0..r1 (a block of 1 to 4) for every input of the batch: inputs in chunks of 4 (one row
 * per tile, shape (1, 4)), then 2 (two rows per tile, (2, 2)), then 1 (four rows per tile, (4, 1)).
 * A block of fewer than 4 rows repeats its last row to fill the tile and writes only the real
 * ones. `codes` holds the 4 decoded rows of the buffer path, `sbuf` 4 rows of steps. */
LB_INLINE LB_AVX2 void lb_rows_avx2(const lb_call *C, int64_t r0, int64_t r1, uint8_t *codes, float *sbuf,
                                    const int KIND)
{
    const lb_weight *w = C->w;
    const uint8_t *rowp[4];
    int64_t rid[4];
    const int n = (int)(r1 - r0);
    for (int i = 0; i < 4; i++) {
        rid[i] = r0 + (i < n ? i : n - 1);
        rowp[i] = w->packed + rid[i] * w->row_bytes;
        if (!C->direct && i < n) {
            uint8_t *dst = codes + i * (w->cols + 16);
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
            lb_tile_avx2(C, rowp + i, rid + i, 1, row_bytes, b0, sbuf, 1, 4, KIND);
    for (; b0 + 2 <= C->batch; b0 += 2)
        for (int i = 0; i < n; i += 2)
            lb_tile_avx2(C, rowp + i, rid + i, n - i < 2 ? n - i : 2, row_bytes, b0, sbuf, 2, 2, KIND);
    if (b0 < C->batch)
        lb_tile_avx2(C, rowp, rid, n, row_bytes, b0, sbuf, 4, 1, KIND);
}

/* One row kernel per unit kind (KIND a compile-time constant in each), the lb_rows_fn table
 * lb_linear picks from. */
#define LB_ROWS_KIND(KIND)                                                                         \
    static LB_AVX2 void lb_rows_avx2_##KIND(const void *job, int64_t r0, int64_t r1, const lb_scratch *s) \
    {                                                                                              \
        lb_rows_avx2((const lb_call *)job, r0, r1, s->codes, s->steps, KIND);                      \
    }
LB_ROWS_KIND(1)
LB_ROWS_KIND(2)
LB_ROWS_KIND(3)
LB_ROWS_KIND(4)
LB_ROWS_KIND(5)
LB_ROWS_KIND(8)
#undef LB_ROWS_KIND

const lb_rows_fn lb_rows_avx2_by_kind[LB_NFMT] = {
    [LB_U1] = lb_rows_avx2_1, [LB_U2] = lb_rows_avx2_2, [LB_U3] = lb_rows_avx2_3,
    [LB_U4] = lb_rows_avx2_4, [LB_T5] = lb_rows_avx2_5, [LB_U8] = lb_rows_avx2_8,
};
#endif /* LB_X86 */
