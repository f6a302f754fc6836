/* AVX2 helpers shared by the vector kernels (matvec_avx2.c, q8_tile.h, dequant.c, decode_step.c). */
#ifndef LOWBIT_SIMD_H
#define LOWBIT_SIMD_H

#include "lowbit.h"

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
#endif /* LB_X86 */

#endif /* LOWBIT_SIMD_H */
