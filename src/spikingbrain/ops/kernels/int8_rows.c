/* Decode-row INT8 products with AVX-512 VNNI: y = s_m * scale_n * (codes(x_m) . W_n) + bias_n for a few rows x_m.
 *
 * The rows are quantized here, codes(x) = clamp(round_half_up(x / s_m), -127, 127), as PyTorch's round-half-up does
 * it (round to nearest even, then lift the ties that went down), so the product equals the fp32 simulation of the
 * same codes. VNNI multiplies unsigned by signed bytes: the codes go in as code + 128, and 128 * sum_k W[n, k] is
 * taken off each accumulator. The weight is packed once into blocks of 16 output rows by 4 input columns, one
 * 64-byte vector each, so a row product streams the weight once. Built with -ffp-contract=off: no fused
 * multiply-add, the same fp32 rounding as the simulation's separate multiplies. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "thread_pool.h"

#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni")))

/* Products smaller than this many multiply-adds run on one thread: a pool call costs about a microsecond, more than
 * splitting a product this small saves. */
#define PARALLEL_MIN_MACS (1 << 16)

int sb_cpu_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
}

/* codes [N, K] (K a multiple of 4) -> packed [ceil(N/16)][K/4][16][4], offsets [ceil(N/16) * 16] = 128 * row sums */
void sb_pack(const int8_t *codes, int64_t n_out, int64_t n_in, int8_t *packed, int32_t *offsets) {
    int64_t blocks = (n_out + 15) / 16, quads = n_in / 4;
    for (int64_t b = 0; b < blocks; b++)
        for (int64_t j = 0; j < quads; j++)
            for (int64_t i = 0; i < 16; i++)
                for (int64_t t = 0; t < 4; t++) {
                    int64_t n = b * 16 + i;
                    packed[((b * quads + j) * 16 + i) * 4 + t] = n < n_out ? codes[n * n_in + 4 * j + t] : 0;
                }
    for (int64_t n = 0; n < blocks * 16; n++) {
        int32_t sum = 0;
        for (int64_t k = 0; n < n_out && k < n_in; k++) sum += codes[n * n_in + k];
        offsets[n] = 128 * sum;
    }
}

static inline float round_half_up(float q) {
    float r = rintf(q);
    return q - r == 0.5f ? r + 1.0f : r;
}

VNNI static void dot_block(const uint8_t *xq, int64_t rows, int64_t n_in, const int8_t *block, __m512i *acc) {
    for (int64_t m = 0; m < rows; m++) acc[m] = _mm512_setzero_si512();
    for (int64_t j = 0; j < n_in / 4; j++) {
        __m512i w = _mm512_loadu_si512((const void *)(block + j * 64));
        for (int64_t m = 0; m < rows; m++) {
            int32_t a;
            __builtin_memcpy(&a, xq + m * n_in + 4 * j, 4);
            acc[m] = _mm512_dpbusd_epi32(acc[m], _mm512_set1_epi32(a), w);
        }
    }
}

/* one row against four consecutive blocks: four independent accumulator chains */
VNNI static void dot_four_blocks(const uint8_t *xq, int64_t n_in, const int8_t *blocks, __m512i *acc) {
    int64_t stride = (n_in / 4) * 64;
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, a3 = a0;
    for (int64_t j = 0; j < n_in / 4; j++) {
        int32_t a;
        __builtin_memcpy(&a, xq + 4 * j, 4);
        __m512i x = _mm512_set1_epi32(a);
        const int8_t *w = blocks + j * 64;
        a0 = _mm512_dpbusd_epi32(a0, x, _mm512_loadu_si512((const void *)w));
        a1 = _mm512_dpbusd_epi32(a1, x, _mm512_loadu_si512((const void *)(w + stride)));
        a2 = _mm512_dpbusd_epi32(a2, x, _mm512_loadu_si512((const void *)(w + 2 * stride)));
        a3 = _mm512_dpbusd_epi32(a3, x, _mm512_loadu_si512((const void *)(w + 3 * stride)));
    }
    acc[0] = a0, acc[1] = a1, acc[2] = a2, acc[3] = a3;
}

/* (acc - offset) * scale * s (+ bias) for output channels n0 .. n0 + 15 (fewer at the end) */
VNNI static void store_block(__m512i acc, const int32_t *offsets, const float *scales, const float *bias, float s, float *y,
                             int64_t n0, int64_t n_out) {
    __mmask16 mask = n_out - n0 >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (n_out - n0)) - 1);
    __m512 v = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc, _mm512_loadu_si512((const void *)(offsets + n0))));
    v = _mm512_mul_ps(_mm512_mul_ps(v, _mm512_maskz_loadu_ps(mask, scales + n0)), _mm512_set1_ps(s));
    if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, bias + n0));
    _mm512_mask_storeu_ps(y + n0, mask, v);
}

/* one call's product, shared by the pool's tasks */
struct product {
    const uint8_t *xq;
    int64_t rows, n_in;
    const int8_t *packed;
    const int32_t *offsets;
    const float *scales, *bias;
    const float *s;
    float *y;
    int64_t n_out;
};

/* one row, groups of four blocks of 16 outputs [begin, end) */
VNNI static void one_row_quads(void *context, int64_t begin, int64_t end) {
    const struct product *p = context;
    int64_t blocks = (p->n_out + 15) / 16, stride = (p->n_in / 4) * 64;
    for (int64_t g = begin; g < end; g++) {
        __m512i acc[4];
        int64_t b0 = g * 4, count = blocks - b0 < 4 ? blocks - b0 : 4;
        if (count == 4)
            dot_four_blocks(p->xq, p->n_in, p->packed + b0 * stride, acc);
        else
            for (int64_t t = 0; t < count; t++) dot_block(p->xq, 1, p->n_in, p->packed + (b0 + t) * stride, acc + t);
        for (int64_t t = 0; t < count; t++) store_block(acc[t], p->offsets, p->scales, p->bias, p->s[0], p->y, (b0 + t) * 16, p->n_out);
    }
}

/* several rows, blocks of 16 outputs [begin, end) */
VNNI static void rows_blocks(void *context, int64_t begin, int64_t end) {
    const struct product *p = context;
    int64_t stride = (p->n_in / 4) * 64;
    for (int64_t b = begin; b < end; b++) {
        __m512i acc[8];
        dot_block(p->xq, p->rows, p->n_in, p->packed + b * stride, acc);
        for (int64_t m = 0; m < p->rows; m++)
            store_block(acc[m], p->offsets, p->scales, p->bias, p->s[m], p->y + m * p->n_out, b * 16, p->n_out);
    }
}

/* What the clipping left out, for the caller to add: the input columns flagged in beyond[] (a code beyond +-127 in
 * some row), ascending, into columns[0 .. *n_columns), and per such column c and row m the excess (q - clipped q) * s_m,
 * with q = round_half_up(x / s_m), into excess[c * rows + m] (0 where that row's code was not clipped). */
static void clipped_columns(const float *x, int64_t rows, int64_t n_in, const float *s, const uint8_t *beyond,
                            int64_t *columns, float *excess, int64_t *n_columns) {
    int64_t c = 0;
    for (int64_t k = 0; k < n_in; k++) {
        if (!beyond[k]) continue;
        for (int64_t m = 0; m < rows; m++) {
            float q = round_half_up(x[m * n_in + k] / s[m]);
            float kept = q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q;
            excess[c * rows + m] = (q - kept) * s[m];
        }
        columns[c++] = k;
    }
    *n_columns = c;
}

/* x [rows, n_in] fp32, row_scales [rows], y [rows, n_out]; rows <= 8. Without row_scales (NULL) each row's scale is
 * found here: max|x_m| / 127 (1 for a row of zeros), the per-token scale of W8A8. With a divisor > 0, row_scales hold
 * mean|x_m| and the scale is the spiking threshold min(max(mean|x_m| / divisor, lo), hi), in fp32 as PyTorch's
 * division by a scalar and clamp compute it.
 * Returns how many codes were clipped to +-127 (then y holds the clipped product), or -1 where memory ran out. Where
 * codes were clipped and columns is not NULL (room for n_in columns and rows * n_in excess values), the clipped
 * columns and their excess are written as clipped_columns says; *n_columns is 0 where none were. */
VNNI int64_t sb_rows(const float *x, int64_t rows, int64_t n_in, const float *row_scales, const int8_t *packed,
                     const int32_t *offsets, const float *scales, const float *bias, float *y, int64_t n_out, int threads,
                     int64_t *columns, float *excess, int64_t *n_columns, float divisor, float lo, float hi) {
    int64_t clipped = 0;
    float s[8];
    if (n_columns) *n_columns = 0;
    uint8_t *xq = malloc((size_t)(rows * n_in + n_in)), *beyond = xq + rows * n_in; /* codes, then a flag per column */
    if (!xq || rows > 8) {
        free(xq);
        return -1;
    }
    memset(beyond, 0, (size_t)n_in);
    for (int64_t m = 0; m < rows; m++) {
        float amax = 0.0f;
        for (int64_t k = 0; !row_scales && k < n_in; k++) amax = fmaxf(amax, fabsf(x[m * n_in + k]));
        s[m] = !row_scales ? (amax > 0.0f ? amax / 127.0f : 1.0f)
               : divisor > 0.0f ? fminf(fmaxf(row_scales[m] / divisor, lo), hi) : row_scales[m];
    }
    for (int64_t m = 0; m < rows; m++)
        for (int64_t k = 0; k < n_in; k++) {
            float q = round_half_up(x[m * n_in + k] / s[m]);
            if (q > 127.0f || q < -127.0f) {
                q = q > 0 ? 127.0f : -127.0f;
                clipped++;
                beyond[k] = 1;
            }
            xq[m * n_in + k] = (uint8_t)((int32_t)q + 128);
        }
    struct product product = {xq, rows, n_in, packed, offsets, scales, bias, s, y, n_out};
    int64_t blocks = (n_out + 15) / 16;
    int parallel = threads > 1 && rows * n_out * n_in >= PARALLEL_MIN_MACS;
    if (rows == 1)
        sb_parallel_for(one_row_quads, &product, (blocks + 3) / 4, parallel ? threads : 1);
    else
        sb_parallel_for(rows_blocks, &product, blocks, parallel ? threads : 1);
    if (clipped && columns) clipped_columns(x, rows, n_in, s, beyond, columns, excess, n_columns);
    free(xq);
    return clipped;
}
