/* The int8-activation row kernels of q8.c on 512-bit registers (AVX512-VNNI vpdpbusd on zmm), for
 * CPUs with AVX512-VNNI and AVX512-BW: the scheme of q8_tile.h with a unit of 64 packed bytes
 * (64 * cpb columns, 16 int32 lanes) instead of 32, so each instruction does twice the work.
 *
 * Plane h of a unit is (bytes >> bits*h) & mask: byte i of plane h holds the code of column
 * (unit start + cpb*i + h); the activations were quantized per block of 32 columns and permuted to
 * that order with 64-byte units (lb_q8_prepare with ub = 64), so lane k of a unit (bytes 4k..4k+3 of
 * every plane) covers 4*cpb columns inside one 32-column block: one activation scale dxl[16u + k]. */

#define LB_Z_TARGET __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))

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

/* R rows (2 or 4; first nr real) times NB inputs b0.. (1 to 4): each unit of a row is loaded and split
 * into its planes once for the NB inputs; per (row, input) the same integer and float sums in the
 * same order whatever R and NB, so a prompt's results are bit-identical to one input at a time.
 * MODE 0: groups of several whole units (or one group per row): float lane sums per group, scaled
 * by the group's step at its end. MODE 1: one unit per group, or groups inside a unit (L = 16 * G /
 * UC lanes each): a per-lane step vector per unit. sbuf: 4 rows of steps, each ng + 16 floats. */
LB_INLINE LB_Z_TARGET void lb_z_gemm_tile(const lb_q8call *Q, const int64_t *rid, int nr, int64_t b0, float *sbuf,
                                          const int CPB, const int MODE, const int R, const int NB)
{
    const lb_call *C = &Q->c;
    const lb_weight *w = C->w;
    const int64_t ng = C->ng, ngp = ng + 16, units = Q->units, G = C->G;
    const int UC = 64 * CPB, bits = 8 / CPB;
    const __m512i mask = _mm512_set1_epi8((char)((1 << bits) - 1));
    const uint8_t *rowp[4];
    int64_t nfast[4];
    float zt[4][4];
    __m512 total[4][4];
#pragma GCC unroll 4
    for (int r = 0; r < R; r++) {
        rowp[r] = w->packed + rid[r] * w->row_bytes;
        nfast[r] = rid[r] == w->rows - 1 ? w->row_bytes / 64 : units;
        lb_row_scales(C, rid[r], b0, NB, sbuf + r * ngp, zt[r]);
        for (int t = 0; t < NB; t++)
            total[r][t] = _mm512_setzero_ps();
    }
    const int64_t pf = C->prefetch;
    const int64_t L = MODE == 1 ? 16 * G / UC : 0;
    const __m512i idx = L == 1 ? _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
                        : L == 2 ? _mm512_setr_epi32(0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5, 6, 6, 7, 7)
                        : L == 4 ? _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3)
                        : L == 8 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                 : _mm512_setzero_si512();
    const int64_t upg = MODE == 0 ? (G + UC - 1) / UC : 1, n_outer = MODE == 0 ? ng : units;
    for (int64_t g = 0; g < n_outer; g++) {
        const int64_t u0 = MODE == 0 ? g * upg : g;
        const int64_t u1 = MODE == 0 ? (u0 + upg < units ? u0 + upg : units) : g + 1;
        __m512 facc[4][4];
#pragma GCC unroll 4
        for (int r = 0; r < R; r++)
            for (int t = 0; t < NB; t++)
                facc[r][t] = _mm512_setzero_ps();
        for (int64_t u = u0; u < u1; u++) {
#pragma GCC unroll 4
            for (int r = 0; r < R; r++) {
                const __m512i v = lb_z_load(rowp[r], u, nfast[r], w->row_bytes, pf);
                __m512i plane[8];
#pragma GCC unroll 4
                for (int h = 0; h < CPB; h++)
                    plane[h] = CPB == 1 ? v : _mm512_and_si512(h ? _mm512_srli_epi16(v, bits * h) : v, mask);
                const __m512 sv = MODE == 1 ? _mm512_permutexvar_ps(idx, _mm512_loadu_ps(sbuf + r * ngp + u * UC / G))
                                            : _mm512_setzero_ps();
#pragma GCC unroll 4
                for (int t = 0; t < NB; t++) {
                    const int8_t *xu = Q->xq + (b0 + t) * Q->xqs + u * UC;
                    __m512i acc = _mm512_setzero_si512();
#pragma GCC unroll 4
                    for (int h = 0; h < CPB; h++)
                        acc = _mm512_dpbusd_epi32(acc, plane[h], _mm512_load_si512((const void *)(xu + 64 * h)));
                    const __m512 dx = _mm512_load_ps(Q->dxl + (b0 + t) * Q->dxls + 16 * u);
                    if (MODE == 0) {
                        facc[r][t] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc), dx, facc[r][t]);
                    } else {
                        total[r][t] = _mm512_fmadd_ps(_mm512_mul_ps(_mm512_cvtepi32_ps(acc), dx), sv, total[r][t]);
                    }
                }
            }
        }
        if (MODE == 0)
            for (int r = 0; r < R; r++)
                for (int t = 0; t < NB; t++)
                    total[r][t] = _mm512_fmadd_ps(_mm512_set1_ps(sbuf[r * ngp + g]), facc[r][t], total[r][t]);
    }
    for (int r = 0; r < R && r < nr; r++) {
        const float bias = w->bias ? w->bias[rid[r]] : 0.0f;
        for (int t = 0; t < NB; t++)
            C->y[(b0 + t) * w->rows + rid[r]] = (_mm512_reduce_add_ps(total[r][t]) - zt[r][t]) + bias;
    }
}

/* Rows r0..r1 (a block of 1 to 4) for inputs b0.. of the call. */
LB_INLINE LB_Z_TARGET void lb_z_rows_from(const lb_q8call *Q, int64_t r0, int64_t r1, float *sbuf, const int CPB,
                                          int64_t b0)
{
    int64_t rid[4];
    const int n = (int)(r1 - r0);
    for (int i = 0; i < 4; i++)
        rid[i] = r0 + (i < n ? i : n - 1);
    for (int64_t b = b0; b < Q->c.batch; b++) {
        if (Q->mode == 0) lb_z_gemm_tile(Q, rid, n, b, sbuf, CPB, 0, 4, 1);
        else lb_z_gemm_tile(Q, rid, n, b, sbuf, CPB, 1, 4, 1);
    }
}

LB_INLINE LB_Z_TARGET void lb_z_rows(const lb_q8call *Q, int64_t r0, int64_t r1, float *sbuf, const int CPB)
{
    lb_z_rows_from(Q, r0, r1, sbuf, CPB, 0);
}

/* One row kernel per layout (NAME: IMPL with CPB fixed), for the lb_rows_fn tables lb_linear_q8 picks
 * from: lb_z_rows (one input per tile) here, lb_z_gemm_rows (4 inputs per tile) below. */
#define LB_Z_FMT(NAME, IMPL, CPB)                                                                    \
    static LB_Z_TARGET void NAME(const void *job, int64_t r0, int64_t r1, const lb_scratch *s)       \
    {                                                                                                \
        IMPL((const lb_q8call *)job, r0, r1, s->steps, CPB);                                         \
    }
LB_Z_FMT(lb_z_rows_u1, lb_z_rows, 8)
LB_Z_FMT(lb_z_rows_u2, lb_z_rows, 4)
LB_Z_FMT(lb_z_rows_u4, lb_z_rows, 2)
LB_Z_FMT(lb_z_rows_u8, lb_z_rows, 1)

static const lb_rows_fn lb_z_rows_by_fmt[LB_NFMT] = {
    [LB_U1] = lb_z_rows_u1, [LB_U2] = lb_z_rows_u2, [LB_U4] = lb_z_rows_u4, [LB_U8] = lb_z_rows_u8,
};

/* Rows r0..r1 (a block of 1 to 4) for every input: inputs 4 at a time through lb_z_gemm_tile (all 4
 * rows at once where the codes take at most 2 planes, else in pairs), the rest one at a time through
 * lb_z_rows_from. */
LB_INLINE LB_Z_TARGET void lb_z_gemm_rows(const lb_q8call *Q, int64_t r0, int64_t r1, float *sbuf, const int CPB)
{
    const int64_t batch = Q->c.batch, full = batch / 4 * 4;
    const int R = CPB <= 2 ? 4 : 2;
    for (int64_t p = r0; p < r1; p += R) {
        const int n = (int)(r1 - p < R ? r1 - p : R);
        int64_t rid[4];
        for (int i = 0; i < 4; i++)
            rid[i] = p + (i < n ? i : n - 1);
        for (int64_t b = 0; b < full; b += 4) {
            if (R == 4) {
                if (Q->mode == 0) lb_z_gemm_tile(Q, rid, n, b, sbuf, CPB, 0, 4, 4);
                else lb_z_gemm_tile(Q, rid, n, b, sbuf, CPB, 1, 4, 4);
            } else {
                if (Q->mode == 0) lb_z_gemm_tile(Q, rid, n, b, sbuf, CPB, 0, 2, 4);
                else lb_z_gemm_tile(Q, rid, n, b, sbuf, CPB, 1, 2, 4);
            }
        }
    }
    if (full < batch)
        lb_z_rows_from(Q, r0, r1, sbuf, CPB, full);
}

LB_Z_FMT(lb_z_gemm_u2, lb_z_gemm_rows, 4)
LB_Z_FMT(lb_z_gemm_u4, lb_z_gemm_rows, 2)
LB_Z_FMT(lb_z_gemm_u8, lb_z_gemm_rows, 1)
#undef LB_Z_FMT

/* The several-input kernels by layout (u1: the one-input tiles). */
static const lb_rows_fn lb_z_gemm_by_fmt[LB_NFMT] = {
    [LB_U1] = lb_z_rows_u1, [LB_U2] = lb_z_gemm_u2, [LB_U4] = lb_z_gemm_u4, [LB_U8] = lb_z_gemm_u8,
};
