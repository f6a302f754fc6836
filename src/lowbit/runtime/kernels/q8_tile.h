/* Int8-activation row kernels of q8.c, included once per instruction set with
 *   LB_Q8_NAME(x)  the suffixed function name,
 *   LB_Q8_TARGET   its target attribute,
 *   LB_Q8_VNNI     0: AVX2 vpmaddubsw/vpmaddwd, 1: AVX-VNNI vpdpbusd, 2: AVX512-VNNI (ymm) vpdpbusd.
 *
 * One unit = 32 packed bytes of a row = 32 * cpb columns (cpb codes per byte: 8, 4, 2, 1 for
 * u1, u2, u4, u8). Plane h of a unit is (bytes >> bits*h) & mask: byte i of plane h holds the code
 * of column (unit start + cpb*i + h). The activations were quantized per block of 32 columns
 * (x = d * q, q int8) and permuted to the same plane order (xq), so
 *     isum[k] = sum_h sum_{i in 4k..4k+3} plane_h[i] * xq[h][i]        (one int32 lane k)
 * is an exact integer dot over the 4*cpb columns of lane k, which all share one activation scale
 * (dxl[k]) and one weight group: lanes are scaled by dxl, then by the group's step, in float. */

/* Integer dot of one unit (32 packed bytes at p) with its permuted activations xq, added to acc. */
LB_INLINE LB_Q8_TARGET __m256i LB_Q8_NAME(lb_q8_unit)(__m256i acc, const __m256i v, const int8_t *xq, const int CPB)
{
    const int bits = 8 / CPB;
    const __m256i mask = _mm256_set1_epi8((char)((1 << bits) - 1));
    if (CPB == 1) { /* u8: codes up to 255 */
#if LB_Q8_VNNI == 1
        return _mm256_dpbusd_avx_epi32(acc, v, _mm256_load_si256((const __m256i *)xq));
#elif LB_Q8_VNNI == 2
        return _mm256_dpbusd_epi32(acc, v, _mm256_load_si256((const __m256i *)xq));
#else
        /* code = 16 hi + lo keeps each vpmaddubsw pair sum below 2^15 */
        const __m256i ones = _mm256_set1_epi16(1), x = _mm256_load_si256((const __m256i *)xq);
        const __m256i nib = _mm256_set1_epi8(15);
        const __m256i lo = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_and_si256(v, nib), x), ones);
        const __m256i hi = _mm256_madd_epi16(
            _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), nib), x), ones);
        return _mm256_add_epi32(acc, _mm256_add_epi32(lo, _mm256_slli_epi32(hi, 4)));
#endif
    }
#if LB_Q8_VNNI
#pragma GCC unroll 8
    for (int h = 0; h < CPB; h++) {
        const __m256i plane = _mm256_and_si256(h ? _mm256_srli_epi16(v, bits * h) : v, mask);
#if LB_Q8_VNNI == 1
        acc = _mm256_dpbusd_avx_epi32(acc, plane, _mm256_load_si256((const __m256i *)(xq + 32 * h)));
#else
        acc = _mm256_dpbusd_epi32(acc, plane, _mm256_load_si256((const __m256i *)(xq + 32 * h)));
#endif
    }
    return acc;
#else
    /* pair sums of all planes stay below 2^15: 2 * (2^bits - 1) * 127 * cpb <= 7620 */
    __m256i s16 = _mm256_setzero_si256();
#pragma GCC unroll 8
    for (int h = 0; h < CPB; h++) {
        const __m256i plane = _mm256_and_si256(h ? _mm256_srli_epi16(v, bits * h) : v, mask);
        s16 = _mm256_add_epi16(s16, _mm256_maddubs_epi16(plane, _mm256_load_si256((const __m256i *)(xq + 32 * h))));
    }
    return _mm256_add_epi32(acc, _mm256_madd_epi16(s16, _mm256_set1_epi16(1)));
#endif
}

/* Unit u (32 packed bytes) of a row, prefetching the same bytes `pf` ahead; units at or past
 * `nfast` (the tensor's last row only) are read through a zero-padded copy so that no byte past
 * the row is touched. */
LB_INLINE LB_Q8_TARGET __m256i LB_Q8_NAME(lb_q8_load)(const uint8_t *row, int64_t u, int64_t nfast, int64_t row_bytes,
                                                     int64_t pf)
{
    const uint8_t *p = row + 32 * u;
    if (u < nfast) {
        _mm_prefetch((const char *)p + pf, _MM_HINT_T0);
        return _mm256_loadu_si256((const __m256i *)p);
    }
    uint8_t tmp[32] = {0};
    memcpy(tmp, p, (size_t)(row_bytes - 32 * u));
    return _mm256_loadu_si256((const __m256i *)tmp);
}

/* Rows rid[0..R) (first nr real) times input b. MODE 0: groups of several whole units (or one
 * group per row): float lane sums per group, scaled by the group's step at its end. MODE 1: one
 * unit per group, or groups inside a unit (L = 8 * G / UC lanes each): a per-lane step vector
 * per unit. */
LB_INLINE LB_Q8_TARGET void LB_Q8_NAME(lb_q8_tile)(const lb_q8call *Q, const int64_t *rid, int nr, int64_t b,
                                                 float *sbuf, const int R, const int CPB, const int MODE)
{
    const lb_call *C = &Q->c;
    const lb_weight *w = C->w;
    const int64_t ng = C->ng, ngp = ng + 8, units = Q->units, G = C->G;
    const int UC = 32 * CPB;
    const int8_t *xq = Q->xq + b * Q->xqs;
    const float *dxl = Q->dxl + b * Q->dxls;
    const uint8_t *rowp[4];
    int64_t nfast[4];
    float zt[4][1];
    __m256 total[4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        rowp[r] = w->packed + rid[r] * w->row_bytes;
        /* units past the row end read the next row's bytes, harmless (xq is zero there), except
         * in the tensor's last row */
        nfast[r] = rid[r] == w->rows - 1 ? w->row_bytes / 32 : units;
        lb_row_scales(C, rid[r], b, 1, sbuf + r * ngp, zt[r]);
        total[r] = _mm256_setzero_ps();
    }
    const int64_t pf = C->prefetch;
    if (MODE == 0) {
        const int64_t upg = (G + UC - 1) / UC; /* units per group (the last group may have fewer) */
        for (int64_t g = 0; g < ng; g++) {
            const int64_t u0 = g * upg, u1 = u0 + upg < units ? u0 + upg : units;
            __m256 facc[4];
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                facc[r] = _mm256_setzero_ps();
            for (int64_t u = u0; u < u1; u++) {
                const __m256 dx = _mm256_load_ps(dxl + 8 * u);
                const int8_t *xu = xq + u * UC;
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) {
                    const __m256i v = LB_Q8_NAME(lb_q8_load)(rowp[r], u, nfast[r], w->row_bytes, pf);
                    const __m256i acc = LB_Q8_NAME(lb_q8_unit)(_mm256_setzero_si256(), v, xu, CPB);
                    facc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc), dx, facc[r]);
                }
            }
#pragma GCC unroll 4
            for (int r = 0; r < R; r++)
                total[r] = _mm256_fmadd_ps(_mm256_broadcast_ss(sbuf + r * ngp + g), facc[r], total[r]);
        }
    } else {
        const int64_t L = 8 * G / UC;         /* lanes per group: 1, 2, 4, or >= 8 (one group per unit) */
        const __m256i idx = L == 1 ? _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)
                            : L == 2 ? _mm256_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3)
                            : L == 4 ? _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1)
                                     : _mm256_setzero_si256();
        for (int64_t u = 0; u < units; u++) {
            const __m256 dx = _mm256_load_ps(dxl + 8 * u);
            const int8_t *xu = xq + u * UC;
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m256i v = LB_Q8_NAME(lb_q8_load)(rowp[r], u, nfast[r], w->row_bytes, pf);
                const __m256i acc = LB_Q8_NAME(lb_q8_unit)(_mm256_setzero_si256(), v, xu, CPB);
                const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(sbuf + r * ngp + u * UC / G), idx);
                total[r] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_cvtepi32_ps(acc), dx), sv, total[r]);
            }
        }
    }
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        if (r >= nr)
            break;
        const float bias = w->bias ? w->bias[rid[r]] : 0.0f;
        C->y[b * w->rows + rid[r]] = (lb_hsum(total[r]) - zt[r][0]) + bias;
    }
}

/* Rows r0..r1 (a block of 1 to 4) for every input, one tile of 4 rows per input. */
LB_INLINE LB_Q8_TARGET void LB_Q8_NAME(lb_q8_rows)(const lb_q8call *Q, int64_t r0, int64_t r1, float *sbuf, const int CPB)
{
    int64_t rid[4];
    const int n = (int)(r1 - r0);
    for (int i = 0; i < 4; i++)
        rid[i] = r0 + (i < n ? i : n - 1);
    for (int64_t b = 0; b < Q->c.batch; b++) {
        if (Q->mode == 0) LB_Q8_NAME(lb_q8_tile)(Q, rid, n, b, sbuf, 4, CPB, 0);
        else LB_Q8_NAME(lb_q8_tile)(Q, rid, n, b, sbuf, 4, CPB, 1);
    }
}

/* One row kernel per layout (CPB a compile-time constant in each): the table lb_linear_q8 picks from. */
#define LB_Q8_ROWS_FMT(FMT, CPB)                                                                   \
    static LB_Q8_TARGET void LB_Q8_NAME(lb_q8_rows_##FMT)(const void *job, int64_t r0, int64_t r1,  \
                                                         const lb_scratch *s)                      \
    {                                                                                              \
        LB_Q8_NAME(lb_q8_rows)((const lb_q8call *)job, r0, r1, s->steps, CPB);                     \
    }
LB_Q8_ROWS_FMT(u1, 8)
LB_Q8_ROWS_FMT(u2, 4)
LB_Q8_ROWS_FMT(u4, 2)
LB_Q8_ROWS_FMT(u8, 1)
#undef LB_Q8_ROWS_FMT

static const lb_rows_fn LB_Q8_NAME(lb_q8_rows_by_fmt)[LB_NFMT] = {
    [LB_U1] = LB_Q8_NAME(lb_q8_rows_u1), [LB_U2] = LB_Q8_NAME(lb_q8_rows_u2),
    [LB_U4] = LB_Q8_NAME(lb_q8_rows_u4), [LB_U8] = LB_Q8_NAME(lb_q8_rows_u8),
};
