/* Shared declarations of the lowbit CPU kernels (one shared library, built from every .c here).
 *
 *   matvec.c       the parallel-rows driver, ISA selection, lb_linear (float activations), struct layouts
 *   matvec_avx2.c  the AVX2 row kernels of lb_linear (one per packing layout)
 *   q8.c           lb_linear_q8 (int8 activations; its AVX2 / VNNI tiles in q8_tile.h)
 *   dequant.c      byte -> code tables, lb_dequantize, fp16 weights (lb_linear_f16, lb_f16_to_f32)
 *   decode_step.c  lb_decode_layers: one single-token step of every Llama block
 *   simd.h         AVX2 helpers shared by the vector kernels
 *
 * Every entry point describes its work as an lb_driver: a row kernel, picked from that entry
 * point's table by code path (and packing layout), and the per-thread scratch it needs;
 * lb_run_rows splits the rows over OpenMP threads. W is stored as in lowbit/quant/packing.py (row-major,
 * little-endian inside each byte; row r starts at packed + r * row_bytes) and decodes per group of
 * G inputs as W = step * (code - zero).
 */
#ifndef LOWBIT_H
#define LOWBIT_H

#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <math.h>
#include <string.h>
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
enum { LB_NFMT = 9 }; /* table size for per-layout tables indexed by fmt */
enum { LB_F32 = 0, LB_F16 = 1, LB_U8Z = 2 }; /* scale / zero storage types */
enum { LB_OK = 0, LB_EFORMAT = -1, LB_ENOMEM = -2, LB_EISA = -3, LB_EARG = -4, LB_EUNSUP = -5 };
/* Code paths of lb_linear, lb_linear_f16, lb_dequantize and lb_decode_layers (-1: auto). The int8
 * path has its own ids (q8.c: 0 portable, 1 AVX2, 2 AVX-VNNI, 3 AVX512-VNNI). */
enum { LB_ISA_PORTABLE = 0, LB_ISA_AVX2 = 1, LB_NISA = 2 };
#ifndef LB_PREFETCH_ROWS
/* While a block of 4 rows runs, each unit load also prefetches the same bytes of the next block:
 * rows are short streams (a 4096-wide 2-bit row is 1 KB), too short for the hardware prefetcher
 * to run ahead of, when the weights come from memory rather than cache. */
#define LB_PREFETCH_ROWS 4
#endif

/* Mirrored by lowbit.runtime.kernels._Weight (ctypes); checked at load through lb_struct_layout. */
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

/* A Llama/Qwen2 decoder block for single-token decoding (decode_step.c). Mirrored by
 * lowbit.runtime.kernels._Layer; used by lowbit.runtime.decoder.Decoder when every projection is packed. */
typedef struct {
    const lb_weight *qkv, *o, *gate_up, *down;
    const float *ln1, *ln2;  /* RMSNorm weights (hidden) */
    float *kcache, *vcache;  /* (nkv, max_len, hd) */
    int64_t hidden, nh, nkv, hd, inter, max_len;
    float eps1, eps2, scale;
    int32_t q8;              /* 1: int8 activations (lb_linear_q8), 0: float (lb_linear) */
    int32_t reserved;
} lb_layer;

/* ---------------------------------------------------------------- the parallel-rows driver */

/* Per-thread scratch: `codes` (code_bytes, 64-byte aligned) and `steps` (step_floats, zeroed). */
typedef struct {
    uint8_t *codes;
    float *steps;
} lb_scratch;

/* A row kernel: rows r0..r1 (one block) of the job it is given. */
typedef void (*lb_rows_fn)(const void *job, int64_t r0, int64_t r1, const lb_scratch *s);

typedef struct {
    lb_rows_fn rows;
    const void *job;
    int64_t n_rows;     /* rows 0..n_rows, in blocks of `block` */
    int64_t block;
    int64_t work;       /* multiply-adds (or values written): threads only from 65536 */
    size_t code_bytes;  /* per-thread scratch */
    size_t step_floats;
} lb_driver;

/* Runs d->rows over every block, on up to nthreads OpenMP threads (< 1: OpenMP's default) in
 * dynamic chunks; LB_ENOMEM when a thread's scratch cannot be allocated. */
int lb_run_rows(const lb_driver *d, int nthreads);

/* ---------------------------------------------------------------- shared helpers (matvec.c) */

void *lb_alloc(size_t bytes); /* 64-byte aligned (free with free()) */
int lb_cpu_has_avx2(void);
int lb_resolve_isa(int isa);  /* -1 -> the CPU's best, else isa; LB_EISA / LB_EARG if it cannot run */
int lb_check(const lb_weight *w);
LB_EXPORT int lb_linear(const lb_weight *w, const float *x, int64_t batch, float *y, int nthreads, int isa);
LB_EXPORT int lb_linear_q8(const lb_weight *w, const float *x, int64_t batch, float *y, int nthreads, int isa);
LB_EXPORT int lb_q8_supported(const lb_weight *w);

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

/* Code of column c in one packed row (the layouts of lowbit/quant/packing.py). */
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

/* byte -> its codes, one per byte: t5 (5 base-3 digits), u1 (8 bits); filled at load (dequant.c). */
extern uint64_t lb_t5_table[256], lb_u1_table[256];

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

/* ---------------------------------------------------------------- per-call state of the matvec paths */

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
    int64_t ub;       /* bytes per unit: 32 (256-bit tiles) or 64 (512-bit tiles, q8_tile512.h) */
} lb_q8call;

/* One batch-1 lb_linear_q8 call split for a thread team that is already running (decode_step.c):
 * one thread quantizes the input (lb_q8_team_begin, into lb_q8_team_bytes of 64-byte aligned
 * memory), then the team runs blocks 0..n_blocks of 4 rows (lb_q8_team_block), each thread with
 * its own lb_scratch (steps: 4 * (groups + 8) floats; codes: cols + 16 bytes). */
typedef struct {
    lb_q8call Q;
    lb_rows_fn rows;
    int64_t n_blocks;
} lb_q8_team;

size_t lb_q8_team_bytes(const lb_weight *w);
int lb_q8_team_begin(lb_q8_team *T, const lb_weight *w, const float *x, float *y, int isa, uint8_t *mem);
void lb_q8_team_block(const lb_q8_team *T, int64_t blk, const lb_scratch *s);

/* Columns per unit (the packed bytes one vector step of lb_linear decodes) of each kind. */
LB_INLINE int lb_unit_cols(int kind) { return kind == 5 ? 40 : kind == 3 || kind == 8 ? 8 : 64 / kind; }

#ifdef LB_X86
/* The AVX2 row kernels of lb_linear by unit kind (matvec_avx2.c), and the columns of a row whose
 * units load without reading past it. */
extern const lb_rows_fn lb_rows_avx2_by_kind[LB_NFMT];
int64_t lb_fast_cols(int kind, int64_t cols, int64_t row_bytes);
#endif

#endif /* LOWBIT_H */
