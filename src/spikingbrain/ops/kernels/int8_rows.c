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

/* Products of many rows (a prefill) whose int8 codes the caller has made (spike counts clipped to +-127):
 * y[m] = s_m * scale_n * (codes_m . W_n) + bias_n, dequantised as the rows above. Work items are blocks of
 * PREFILL_ROW_BLOCK rows; in each, every group of four output blocks (64 channels) is multiplied with PREFILL_ROWS rows
 * at a time, 24 accumulators in registers, the weight's four blocks read once per PREFILL_ROWS rows. */
#define PREFILL_ROWS 6
#define PREFILL_ROW_BLOCK 48

struct codes_product {
    const int8_t *codes;
    int64_t rows, n_in;
    const int8_t *packed;
    const int32_t *offsets;
    const float *scales, *bias, *row_scales;
    float *y;
    int64_t n_out;
    int failed;
};

/* PREFILL_ROWS rows from r0 (unsigned codes xq, rows of n_in) against the four output blocks from b0, stored. The 24
 * accumulators are named variables: GCC keeps an array of them on the stack. */
#define ROW_DOT(a0, a1, a2, a3, r)                                                    \
    {                                                                                  \
        __m512i x = _mm512_set1_epi32(*(const int32_t *)(xq + (r) * p->n_in + 4 * j)); \
        a0 = _mm512_dpbusd_epi32(a0, x, w0);                                           \
        a1 = _mm512_dpbusd_epi32(a1, x, w1);                                           \
        a2 = _mm512_dpbusd_epi32(a2, x, w2);                                           \
        a3 = _mm512_dpbusd_epi32(a3, x, w3);                                           \
    }
VNNI static void codes_tile(const struct codes_product *p, const uint8_t *xq, int64_t r0, int64_t b0) {
    int64_t stride = (p->n_in / 4) * 64;
    const int8_t *weight = p->packed + b0 * stride;
    __m512i z = _mm512_setzero_si512();
    __m512i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z, a20 = z, a21 = z, a22 = z, a23 = z;
    __m512i a30 = z, a31 = z, a32 = z, a33 = z, a40 = z, a41 = z, a42 = z, a43 = z, a50 = z, a51 = z, a52 = z, a53 = z;
    for (int64_t j = 0; j < p->n_in / 4; j++) {
        const int8_t *w = weight + j * 64;
        __m512i w0 = _mm512_loadu_si512((const void *)w), w1 = _mm512_loadu_si512((const void *)(w + stride));
        __m512i w2 = _mm512_loadu_si512((const void *)(w + 2 * stride)), w3 = _mm512_loadu_si512((const void *)(w + 3 * stride));
        ROW_DOT(a00, a01, a02, a03, 0)
        ROW_DOT(a10, a11, a12, a13, 1)
        ROW_DOT(a20, a21, a22, a23, 2)
        ROW_DOT(a30, a31, a32, a33, 3)
        ROW_DOT(a40, a41, a42, a43, 4)
        ROW_DOT(a50, a51, a52, a53, 5)
    }
    __m512i acc[PREFILL_ROWS][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23},
                                    {a30, a31, a32, a33}, {a40, a41, a42, a43}, {a50, a51, a52, a53}};
    for (int r = 0; r < PREFILL_ROWS; r++)
        for (int b = 0; b < 4; b++)
            store_block(acc[r][b], p->offsets, p->scales, p->bias, p->row_scales[r0 + r], p->y + (r0 + r) * p->n_out, (b0 + b) * 16,
                        p->n_out);
}
#undef ROW_DOT

/* one row (unsigned codes xq) against output blocks b0 .. b0 + blocks - 1, stored: the edges of codes_tile's grid */
VNNI static void codes_row(const struct codes_product *p, const uint8_t *xq, int64_t r0, int64_t b0, int64_t blocks) {
    int64_t stride = (p->n_in / 4) * 64;
    for (int64_t b = b0; b < b0 + blocks; b++) {
        __m512i acc;
        dot_block(xq, 1, p->n_in, p->packed + b * stride, &acc);
        store_block(acc, p->offsets, p->scales, p->bias, p->row_scales[r0], p->y + r0 * p->n_out, b * 16, p->n_out);
    }
}

VNNI static void codes_row_blocks(void *context, int64_t begin, int64_t end) {
    struct codes_product *p = context;
    uint8_t *xq = malloc((size_t)(PREFILL_ROW_BLOCK * p->n_in));
    if (!xq) {
        p->failed = 1;
        return;
    }
    int64_t blocks = (p->n_out + 15) / 16;
    for (int64_t item = begin; item < end; item++) {
        int64_t m0 = item * PREFILL_ROW_BLOCK, rows = p->rows - m0 < PREFILL_ROW_BLOCK ? p->rows - m0 : PREFILL_ROW_BLOCK;
        for (int64_t i = 0; i < rows * p->n_in; i++) xq[i] = (uint8_t)(p->codes[m0 * p->n_in + i] + 128);
        for (int64_t b0 = 0; b0 < blocks; b0 += 4) {
            int64_t nb = blocks - b0 < 4 ? blocks - b0 : 4, r = 0;
            if (nb == 4)
                for (; r + PREFILL_ROWS <= rows; r += PREFILL_ROWS) codes_tile(p, xq + r * p->n_in, m0 + r, b0);
            for (; r < rows; r++) codes_row(p, xq + r * p->n_in, m0 + r, b0, nb);
        }
    }
    free(xq);
}

/* codes [rows, n_in] int8 (within +-127), row_scales [rows], y [rows, n_out]. Returns 0, or -1 where memory ran out. */
VNNI int sb_codes_product(const int8_t *codes, int64_t rows, int64_t n_in, const float *row_scales, const int8_t *packed,
                          const int32_t *offsets, const float *scales, const float *bias, float *y, int64_t n_out, int threads) {
    struct codes_product p = {codes, rows, n_in, packed, offsets, scales, bias, row_scales, y, n_out, 0};
    sb_parallel_for_then_sleep(codes_row_blocks, &p, (rows + PREFILL_ROW_BLOCK - 1) / PREFILL_ROW_BLOCK, threads);
    return p.failed ? -1 : 0;
}
