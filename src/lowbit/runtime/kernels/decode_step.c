/* lb_decode_layers: one single-token decode step of every Llama/Qwen2 block, entirely in C:
 * RMSNorm, the fused q/k/v projection, RoPE, the KV-cache write, attention over the cache,
 * o projection, residual, RMSNorm, the fused gate/up projection, SiLU * up, down projection,
 * residual. The blocks are described by lb_layer (lowbit.h); the projections run lb_linear or
 * lb_linear_q8 on the code path the caller chose. */
#include "simd.h"

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
/* The projection W of one block: lb_linear_q8 (int8 activations) or lb_linear. */
static int lb_project(const lb_layer *L, const lb_weight *W, const float *in, float *out, int nthreads, int isa)
{
    /* the int8 path has its own ids: portable stays portable, else its best vector code */
    if (L->q8) return lb_linear_q8(W, in, 1, out, nthreads, isa == LB_ISA_PORTABLE ? 0 : -1);
    return lb_linear(W, in, 1, out, nthreads, isa);
}

/* Attention of head hh of the token at `pos` (its q in qkv, its k/v already in the caches) into
 * att; scores: pos + 1 floats of scratch. */
static void lb_attention_head(const lb_layer *L, const float *q, int64_t pos, int64_t hh, float *scores, float *att,
                              int avx2)
{
    const int64_t hd = L->hd, len = pos + 1, group = L->nh / L->nkv;
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

/* Attention of every head of the token at `pos` into att. */
static void lb_attention(const lb_layer *L, const float *q, int64_t pos, float *scores, float *att, int avx2)
{
    for (int64_t hh = 0; hh < L->nh; hh++)
        lb_attention_head(L, q, pos, hh, scores, att, avx2);
}

/* The pieces of the caller's scratch one block uses (see lowbit.runtime.decoder.Decoder for its size). */
typedef struct {
    float *h, *qkv, *att, *o, *gu, *act, *scores;
} lb_bufs;

static lb_bufs lb_layer_bufs(const lb_layer *L, float *scratch)
{
    lb_bufs b;
    b.h = scratch;
    b.qkv = b.h + L->hidden;
    b.att = b.qkv + (L->nh + 2 * L->nkv) * L->hd;
    b.o = b.att + L->nh * L->hd;
    b.gu = b.o + L->hidden;
    b.act = b.gu + 2 * L->inter;
    b.scores = b.act + L->inter;
    return b;
}

/* RoPE on this token's q and k (in qkv), then its k and v into the caches at pos. */
static void lb_rope_and_cache(const lb_layer *L, float *qkv, int64_t pos, const float *cos, const float *ss)
{
    const int64_t nh = L->nh, nkv = L->nkv, hd = L->hd;
    float *q = qkv, *k = qkv + nh * hd, *v = k + nkv * hd;
    lb_rope(q, nh, hd, cos, ss);
    lb_rope(k, nkv, hd, cos, ss);
    for (int64_t j = 0; j < nkv; j++) {
        memcpy(L->kcache + (j * L->max_len + pos) * hd, k + j * hd, sizeof(float) * (size_t)hd);
        memcpy(L->vcache + (j * L->max_len + pos) * hd, v + j * hd, sizeof(float) * (size_t)hd);
    }
}

/* act = SiLU(gate) * up, gu = [gate | up] (n each). */
static void lb_silu_mul(const float *gu, int64_t n, float *act)
{
    for (int64_t i = 0; i < n; i++) {
        const float g = gu[i];
        act[i] = g / (1.0f + expf(-g)) * gu[n + i];
    }
}

static void lb_add(float *x, const float *y, int64_t n)
{
    for (int64_t i = 0; i < n; i++)
        x[i] += y[i];
}

/* One block on the hidden state x (hidden floats, updated in place) at position pos; isa: the
 * resolved code path (0 portable, 1 AVX2). */
static int lb_decode_layer(const lb_layer *L, float *x, int64_t pos, const float *cos, const float *ss,
                           float *scratch, int nthreads, int isa)
{
    const int64_t H = L->hidden;
    if (pos < 0 || pos >= L->max_len) return LB_EARG;
    const lb_bufs b = lb_layer_bufs(L, scratch);
    int err;
    lb_rmsnorm(x, L->ln1, H, L->eps1, b.h);
    if ((err = lb_project(L, L->qkv, b.h, b.qkv, nthreads, isa))) return err;
    lb_rope_and_cache(L, b.qkv, pos, cos, ss);
    lb_attention(L, b.qkv, pos, b.scores, b.att, isa == LB_ISA_AVX2);
    if ((err = lb_project(L, L->o, b.att, b.o, nthreads, isa))) return err;
    lb_add(x, b.o, H);
    lb_rmsnorm(x, L->ln2, H, L->eps2, b.h);
    if ((err = lb_project(L, L->gate_up, b.h, b.gu, nthreads, isa))) return err;
    lb_silu_mul(b.gu, L->inter, b.act);
    if ((err = lb_project(L, L->down, b.act, b.o, nthreads, isa))) return err;
    lb_add(x, b.o, H);
    return LB_OK;
}

/* ---------------------------------------------------------------- one thread team for the whole step */

#ifdef _OPENMP
#include <omp.h>

/* Whether the team path runs these blocks: every projection int8 and taken by lb_linear_q8. */
static int lb_team_ok(const lb_layer *layers, int64_t n_layers)
{
    for (int64_t l = 0; l < n_layers; l++) {
        const lb_layer *L = layers + l;
        if (!L->q8) return 0;
        const lb_weight *ws[4] = {L->qkv, L->o, L->gate_up, L->down};
        for (int i = 0; i < 4; i++)
            if (!lb_q8_supported(ws[i])) return 0;
    }
    return 1;
}

/* The team's share of one projection: blocks of 4 rows in dynamic chunks; the implicit barrier
 * at its end makes the output complete for every thread. */
static void lb_team_rows(const lb_q8_team *T, const lb_scratch *s, int nthreads)
{
    int64_t chunk = T->n_blocks / (8 * (int64_t)nthreads);
    if (chunk < 1) chunk = 1;
    /* the row kernels expect zeros past each row's steps (earlier projections had other widths) */
    memset(s->steps, 0, sizeof(float) * (size_t)(4 * (T->Q.c.ng + 16)));
#pragma omp for schedule(dynamic, chunk)
    for (int64_t blk = 0; blk < T->n_blocks; blk++)
        lb_q8_team_block(T, blk, s);
}

/* lb_decode_layers with int8 activations on one OpenMP team for the whole step (one parallel
 * region per token instead of one per projection, no allocation per projection): the serial
 * pieces (norms, input quantization, RoPE, attention, residuals) run on one thread between
 * barriers, the projections' rows on all of them. */
static int lb_decode_layers_team(const lb_layer *layers, int64_t n_layers, float *x, int64_t pos, const float *cos,
                                 const float *ss, float *scratch, int nthreads, int isa)
{
    size_t mem_bytes = 0;
    int64_t max_ng = 0, max_cols = 0, max_len = 0;
    for (int64_t l = 0; l < n_layers; l++) {
        if (pos < 0 || pos >= layers[l].max_len) return LB_EARG;
        max_len = layers[l].max_len > max_len ? layers[l].max_len : max_len;
        const lb_weight *ws[4] = {layers[l].qkv, layers[l].o, layers[l].gate_up, layers[l].down};
        for (int i = 0; i < 4; i++) {
            const size_t b = lb_q8_team_bytes(ws[i]);
            const int64_t G = ws[i]->group < ws[i]->cols ? ws[i]->group : ws[i]->cols;
            const int64_t ng = (ws[i]->cols + G - 1) / G;
            mem_bytes = b > mem_bytes ? b : mem_bytes;
            max_ng = ng > max_ng ? ng : max_ng;
            max_cols = ws[i]->cols > max_cols ? ws[i]->cols : max_cols;
        }
    }
    const size_t code_bytes = ((size_t)max_cols + 16 + 63) / 64 * 64;
    const size_t step_floats = (size_t)(4 * (max_ng + 16));
    const size_t step_bytes = sizeof(float) * ((step_floats + 15) / 16 * 16);
    const size_t per_thread = code_bytes + step_bytes + sizeof(float) * (size_t)((max_len + 15) / 16 * 16);
    uint8_t *mem = lb_alloc(mem_bytes + (size_t)nthreads * per_thread);
    if (!mem) return LB_ENOMEM;
    memset(mem + mem_bytes, 0, (size_t)nthreads * per_thread);
    const int q8isa = isa == LB_ISA_PORTABLE ? 0 : -1, avx2 = isa == LB_ISA_AVX2;
    lb_q8_team T;
#pragma omp parallel num_threads(nthreads)
    {
        const int tid = omp_get_thread_num(), team = omp_get_num_threads();
        uint8_t *own = mem + mem_bytes + (size_t)tid * per_thread;
        const lb_scratch s = {own, (float *)(own + code_bytes)};
        float *own_scores = (float *)(own + code_bytes + step_bytes);
        for (int64_t l = 0; l < n_layers; l++) {
            const lb_layer *L = layers + l;
            const lb_bufs b = lb_layer_bufs(L, scratch);
#pragma omp single
            {
                if (l > 0) /* the previous block's down projection (same scratch layout) */
                    lb_add(x, b.o, L->hidden);
                lb_rmsnorm(x, L->ln1, L->hidden, L->eps1, b.h);
                lb_q8_team_begin(&T, L->qkv, b.h, b.qkv, q8isa, mem);
            }
            lb_team_rows(&T, &s, team);
#pragma omp single
            lb_rope_and_cache(L, b.qkv, pos, cos, ss);
            /* attention: heads over the team, each thread with its own scores */
#pragma omp for schedule(static)
            for (int64_t hh = 0; hh < L->nh; hh++)
                lb_attention_head(L, b.qkv, pos, hh, own_scores, b.att, avx2);
#pragma omp single
            lb_q8_team_begin(&T, L->o, b.att, b.o, q8isa, mem);
            lb_team_rows(&T, &s, team);
#pragma omp single
            {
                lb_add(x, b.o, L->hidden);
                lb_rmsnorm(x, L->ln2, L->hidden, L->eps2, b.h);
                lb_q8_team_begin(&T, L->gate_up, b.h, b.gu, q8isa, mem);
            }
            lb_team_rows(&T, &s, team);
#pragma omp single
            {
                lb_silu_mul(b.gu, L->inter, b.act);
                lb_q8_team_begin(&T, L->down, b.act, b.o, q8isa, mem);
            }
            lb_team_rows(&T, &s, team);
        }
    }
    if (n_layers > 0) {
        const lb_layer *L = layers + n_layers - 1;
        lb_add(x, lb_layer_bufs(L, scratch).o, L->hidden);
    }
    free(mem);
    return LB_OK;
}
#endif

/* Every block of `layers` on one token's hidden state x (updated in place) at position pos;
 * cos / ss: that position's RoPE rows (ss: sin with rotate_half's sign folded in). scratch: see
 * lowbit.runtime.decoder.Decoder. isa: -1 auto, 0 portable (every projection and the attention loops),
 * 1 AVX2. With int8 activations and more than one thread the whole step runs on one OpenMP team
 * (lb_decode_layers_team); else each projection starts its own (lb_run_rows). */
LB_EXPORT int lb_decode_layers(const lb_layer *layers, int64_t n_layers, float *x, int64_t pos, const float *cos,
                               const float *ss, float *scratch, int nthreads, int isa)
{
    const int path = lb_resolve_isa(isa);
    if (path < 0) return path;
#ifdef _OPENMP
    if (nthreads < 1) nthreads = omp_get_max_threads();
    if (nthreads > 1 && lb_team_ok(layers, n_layers))
        return lb_decode_layers_team(layers, n_layers, x, pos, cos, ss, scratch, nthreads, path);
#endif
    for (int64_t l = 0; l < n_layers; l++) {
        const int err = lb_decode_layer(layers + l, x, pos, cos, ss, scratch, nthreads, path);
        if (err) return err;
    }
    return LB_OK;
}
