/* The int8-activation row kernels of q8.c on 512-bit registers (AVX512-VNNI vpdpbusd on zmm), for
 * CPUs with AVX512-VNNI and AVX512-BW: the scheme of q8_tile.h with a unit of 64 packed bytes
 * (64 * cpb columns, 16 int32 lanes) instead of 32, so each instruction does twice the work.
 *
 * Plane h of a unit is (bytes >> bits*h) & mask: byte i of plane h holds the code of column
 * (unit start + cpb*i + h); the activations were quantized per block of 32 columns and permuted to
 * that order with 64-byte units (lb_q8_prepare with ub = 64), so lane k of a unit (bytes 4k..4k+3 of
 * every plane) covers 4*cpb columns inside one 32-column block: one activation scale dxl[16u + k]. */

#define LB_Z_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

/* Integer dot of one 64-byte unit v with its permuted activations xq (64 * cpb bytes). */
LB_INLINE LB_Z_TARGET __m512i lb_z_unit(__m512i acc, const __m512i v, const int8_t *xq, const int CPB)
{
    const int bits = 8 / CPB;
    if (CPB == 1) return _mm512_dpbusd_epi32(acc, v, _mm512_load_si512((const void *)xq));
    const __m512i mask = _mm512_set1_epi8((char)((1 << bits) - 1));
#pragma GCC unroll 8
    for (int h = 0; h < CPB; h++) {
        const __m512i plane = _mm512_and_si512(h ? _mm512_srli_epi16(v, bits * h) : v, mask);
        acc = _mm512_dpbusd_epi32(acc, plane, _mm512_load_si512((const void *)(xq + 64 * h)));
    }
    return acc;
}

/* Unit u (64 packed bytes) of a row; units at or past `nfast` (the tensor's last row only) are
 * read through a zero-padded copy so that no byte past the row is touched. */
LB_INLINE LB_Z_TARGET __m512i lb_z_load(const uint8_t *row, int64_t u, int64_t nfast, int64_t row_bytes, int64_t pf)
{
    const uint8_t *p = row + 64 * u;
    if (u < nfast) {
        _mm_prefetch((const char *)p + pf, _MM_HINT_T0);
        return _mm512_loadu_si512((const void *)p);
    }
    uint8_t tmp[64] = {0};
    memcpy(tmp, p, (size_t)(row_bytes - 64 * u));
    return _mm512_loadu_si512((const void *)tmp);
}

/* Rows rid[0..4) (first nr real) times input b; MODE 0 / 1 as in q8_tile.h (L = 16 * G / UC lanes
 * per group in mode 1). sbuf: 4 rows of steps, each ng + 16 floats. */
LB_INLINE LB_Z_TARGET void lb_z_tile(const lb_q8call *Q, const int64_t *rid, int nr, int64_t b, float *sbuf,
                                     const int CPB, const int MODE)
{
    const lb_call *C = &Q->c;
    const lb_weight *w = C->w;
    const int64_t ng = C->ng, ngp = ng + 16, units = Q->units, G = C->G;
    const int UC = 64 * CPB;
    const int8_t *xq = Q->xq + b * Q->xqs;
    const float *dxl = Q->dxl + b * Q->dxls;
    const uint8_t *rowp[4];
    int64_t nfast[4];
    float zt[4][1];
    __m512 total[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        rowp[r] = w->packed + rid[r] * w->row_bytes;
        nfast[r] = rid[r] == w->rows - 1 ? w->row_bytes / 64 : units;
        lb_row_scales(C, rid[r], b, 1, sbuf + r * ngp, zt[r]);
        total[r] = _mm512_setzero_ps();
    }
    const int64_t pf = C->prefetch;
    if (MODE == 0) {
        const int64_t upg = (G + UC - 1) / UC;
        for (int64_t g = 0; g < ng; g++) {
            const int64_t u0 = g * upg, u1 = u0 + upg < units ? u0 + upg : units;
            __m512 facc[4];
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                facc[r] = _mm512_setzero_ps();
            for (int64_t u = u0; u < u1; u++) {
                const __m512 dx = _mm512_load_ps(dxl + 16 * u);
                const int8_t *xu = xq + u * UC;
#pragma GCC unroll 4
                for (int r = 0; r < 4; r++) {
                    const __m512i v = lb_z_load(rowp[r], u, nfast[r], w->row_bytes, pf);
                    const __m512i acc = lb_z_unit(_mm512_setzero_si512(), v, xu, CPB);
                    facc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), dx, facc[r]);
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++)
                total[r] = _mm512_fmadd_ps(_mm512_set1_ps(sbuf[r * ngp + g]), facc[r], total[r]);
        }
    } else {
        const int64_t L = 16 * G / UC; /* lanes per group: 1, 2, 4, 8, or 16 (one group per unit) */
        const __m512i idx = L == 1 ? _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                            : L == 2 ? _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)
                            : L == 4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                            : L == 8 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                     : _mm512_setzero_si512();
        for (int64_t u = 0; u < units; u++) {
            const __m512 dx = _mm512_load_ps(dxl + 16 * u);
            const int8_t *xu = xq + u * UC;
#pragma GCC unroll 4
            for (int r = 0; r < 4; r++) {
                const __m512i v = lb_z_load(rowp[r], u, nfast[r], w->row_bytes, pf);
                const __m512i acc = lb_z_unit(_mm512_setzero_si512(), v, xu, CPB);
                const __m512 sv = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(sbuf + r * ngp + u * UC / G));
                total[r] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), dx), sv, total[r]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < 4; r++) {
        if (r >= nr)
            break;
        const float bias = w->bias ? w->bias[rid[r]] : 0.0f;
        C->y[b * w->rows + rid[r]] = (_mm512_reduce_add_ps(total[r]) - zt[r][0]) + bias;
    }
}

/* Rows r0..r1 (a block of 1 to 4) for every input. */
LB_INLINE LB_Z_TARGET void lb_z_rows(const lb_q8call *Q, int64_t r0, int64_t r1, float *sbuf, const int CPB)
{
    int64_t rid[4];
    const int n = (int)(r1 - r0);
    for (int i = 0; i < 4; i++)
        rid[i] = r0 + (i < n ? i : n - 1);
    for (int64_t b = 0; b < Q->c.batch; b++) {
        if (Q->mode == 0) lb_z_tile(Q, rid, n, b, sbuf, CPB, 0);
        else lb_z_tile(Q, rid, n, b, sbuf, CPB, 1);
    }
}

#define LB_Z_ROWS_FMT(FMT, CPB)                                                                        \
    static LB_Z_TARGET void lb_z_rows_##FMT(const void *job, int64_t r0, int64_t r1, const lb_scratch *s) \
    {                                                                                                  \
        lb_z_rows((const lb_q8call *)job, r0, r1, s->steps, CPB);                                      \
    }
LB_Z_ROWS_FMT(u1, 8)
LB_Z_ROWS_FMT(u2, 4)
LB_Z_ROWS_FMT(u4, 2)
LB_Z_ROWS_FMT(u8, 1)
#undef LB_Z_ROWS_FMT

static const lb_rows_fn lb_z_rows_by_fmt[LB_NFMT] = {
    [LB_U1] = lb_z_rows_u1, [LB_U2] = lb_z_rows_u2, [LB_U4] = lb_z_rows_u4, [LB_U8] = lb_z_rows_u8,
};
