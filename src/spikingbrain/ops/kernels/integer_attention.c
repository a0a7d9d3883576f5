/* Causal softmax attention of many queries (a prefill) with integer scores, with AVX-512 VNNI: W8ASpike's attention,
 * whose query is a spike count times a threshold and whose keys and values are int8 codes times a scale per key and head.
 *
 * Scores: the int8 counts times the int8 key codes, summed in int32 by vpdpbusd (the counts offset by 128 to make them
 * unsigned, and 128 times each key's code sum taken off again), times the query's and the key's scale: the same
 * numbers as the fp32 product of the dequantised query and key, up to fp32 rounding. Softmax: online, in fp32, over
 * tiles of TILE keys (no score matrix in memory). Weighted values: in fp32, over the dequantised values (code times
 * scale, the simulation's numbers); or, as an option (bf16_values), each weight times its value's scale rounded to
 * bf16 and multiplied with the value codes (exact in bf16) by vdpbf16ps, two keys per instruction with fp32 sums: half
 * the instructions, a relative rounding of 2^-9 per weight.
 *
 * Queries: counts [B, Tq, H, D] int8 (contiguous) and scales [B, Tq, H] fp32 (threshold times the softmax scale).
 * Keys and values: int8 codes [B, Tk, Hkv, D] and fp32 scales [B, Tk, Hkv], given by their strides (each key's D codes
 * contiguous). The first `sinks` keys are sink keys that every query sees; key sinks + j is the real key at position j.
 * Query i sits at position offset + i and sees real key j where j <= its position and (window < 0, or position - j
 * <= window, or j < keep_first). Grouped-query attention: query head h * G + g uses key/value head h, G = H / Hkv.
 * D must be a multiple of 16. Output [B, Tq, H, D] fp32, contiguous. */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "thread_pool.h"
#include "vector_math.h"

/* (bf16 instructions only in the bf16_values branches, which run where sb_integer_attention_bf16_supported says so) */
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,avx512bf16")))

/* keys per tile of the online softmax (a multiple of 64) */
#ifndef TILE
#define TILE 128
#endif
/* queries of one key/value head per work item: the G * QUERY_BLOCK rows share every key and value tile they read */
#define QUERY_BLOCK 16
/* rows whose scores and weighted values are summed at once (their accumulators stay in registers; tile_scores is
 * written out for 4) */
#define ROWS 4

int sb_integer_attention_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl")
           && __builtin_cpu_supports("avx512vnni");
}

int sb_integer_attention_bf16_supported(void) {
    return sb_integer_attention_supported() && __builtin_cpu_supports("avx512bf16");
}

/* One key/value head's keys and values, repacked for the products (padded keys: zero codes and scales).
 * keys: [padded / 16][D / 4][16 keys][4 codes], the layout vpdpbusd reads 16 keys from;
 * values: [padded][D] fp32, each code times its scale; with bf16_values [padded / 2][D][2 keys] bf16 codes (value_codes),
 * the layout vdpbf16ps reads a key pair from, and value_scales per key;
 * key_offsets: 128 * the sum of each key's codes; key_scales per key. */
typedef struct {
    int8_t *keys;
    float *values;
    uint16_t *value_codes;
    int32_t *key_offsets;
    float *key_scales, *value_scales;
} packed_head;

typedef struct {
    const int8_t *qc;
    const float *qs;
    int64_t batch, queries, heads, kv_heads, dim, keys, padded, sinks, window, keep_first, offset, blocks, bf16_values;
    const int8_t *kc, *vc;
    int64_t kc_b, kc_t, kc_h, vc_b, vc_t, vc_h;
    const float *ks, *vs;
    int64_t ks_b, ks_t, ks_h, vs_b, vs_t, vs_h;
    int8_t *packed_keys;
    float *packed_values;
    float *scalars; /* per (batch row, kv head): key_offsets (as int32), key_scales, value_scales */
    float *out;
    int failed;
} attention_args;

static packed_head head_of(const attention_args *a, int64_t pair) {
    packed_head p;
    p.keys = a->packed_keys + pair * a->padded * a->dim;
    p.values = a->packed_values + pair * a->padded * a->dim;
    p.value_codes = (uint16_t *)p.values;
    float *s = a->scalars + pair * 3 * a->padded;
    p.key_offsets = (int32_t *)s;
    p.key_scales = s + a->padded;
    p.value_scales = s + 2 * a->padded;
    return p;
}

/* an int8 code as bf16: the upper half of its fp32 bits (exact: 8 significant bits) */
static inline uint16_t bf16_of_code(int8_t code) {
    float x = (float)code;
    uint32_t bits;
    memcpy(&bits, &x, sizeof bits);
    return (uint16_t)(bits >> 16);
}

static void pack_tasks(void *context, int64_t begin, int64_t end) {
    const attention_args *a = context;
    int64_t dim = a->dim;
    for (int64_t pair = begin; pair < end; pair++) {
        int64_t b = pair / a->kv_heads, h = pair % a->kv_heads;
        packed_head p = head_of(a, pair);
        memset(p.keys, 0, (size_t)(a->padded * dim));
        memset(p.values, 0, sizeof(float) * (size_t)(a->padded * dim));
        memset(p.key_offsets, 0, sizeof(float) * 3 * (size_t)a->padded);
        for (int64_t t = 0; t < a->keys; t++) {
            const int8_t *k = a->kc + b * a->kc_b + t * a->kc_t + h * a->kc_h;
            const int8_t *v = a->vc + b * a->vc_b + t * a->vc_t + h * a->vc_h;
            int32_t sum = 0;
            float value_scale = a->vs[b * a->vs_b + t * a->vs_t + h * a->vs_h];
            for (int64_t d = 0; d < dim; d++) {
                p.keys[((t / 16) * (dim / 4) + d / 4) * 64 + (t % 16) * 4 + d % 4] = k[d];
                if (a->bf16_values) p.value_codes[((t / 2) * dim + d) * 2 + t % 2] = bf16_of_code(v[d]);
                else p.values[t * dim + d] = (float)v[d] * value_scale;
                sum += k[d];
            }
            p.key_offsets[t] = 128 * sum;
            p.key_scales[t] = a->ks[b * a->ks_b + t * a->ks_t + h * a->ks_h];
            p.value_scales[t] = value_scale;
        }
    }
}

/* which of the 16 keys from key index k0 on the query at position pos sees */
VNNI static inline __mmask16 visible(const attention_args *a, int64_t k0, int64_t pos) {
    __m512i index = _mm512_add_epi32(_mm512_set1_epi32((int32_t)k0), _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
    __m512i position = _mm512_sub_epi32(index, _mm512_set1_epi32((int32_t)a->sinks));
    __mmask16 exists = _mm512_cmplt_epi32_mask(index, _mm512_set1_epi32((int32_t)a->keys));
    __mmask16 sink = _mm512_cmplt_epi32_mask(index, _mm512_set1_epi32((int32_t)a->sinks));
    __mmask16 causal = _mm512_cmple_epi32_mask(position, _mm512_set1_epi32((int32_t)pos));
    __mmask16 near = a->window < 0 ? (__mmask16)0xFFFF : _mm512_cmpge_epi32_mask(position, _mm512_set1_epi32((int32_t)(pos - a->window)));
    __mmask16 kept = _mm512_cmplt_epi32_mask(position, _mm512_set1_epi32((int32_t)a->keep_first));
    return exists & (sink | (causal & (near | kept)));
}

/* whether every query at positions first .. last sees every key of the tile from key index k0 (no mask needed) */
static inline int tile_visible(const attention_args *a, int64_t k0, int64_t first, int64_t last) {
    int64_t low = k0 - a->sinks, high = k0 + TILE - 1 - a->sinks;  /* the tile's key positions */
    if (k0 + TILE > a->keys || low < 0 || high > first) return 0;
    return a->window < 0 || low >= last - a->window || high < a->keep_first;
}

/* one row's query codes (4 at a time, from d4) against the four groups of 16 keys keys0 .. keys3 */
#define SCORE_DOT(a0, a1, a2, a3, r)                                                           \
    {                                                                                          \
        __m512i q = _mm512_set1_epi32(*(const int32_t *)(queries + (r0 + (r)) * dim + 4 * d4)); \
        a0 = _mm512_dpbusd_epi32(a0, q, keys0);                                                \
        a1 = _mm512_dpbusd_epi32(a1, q, keys1);                                                \
        a2 = _mm512_dpbusd_epi32(a2, q, keys2);                                                \
        a3 = _mm512_dpbusd_epi32(a3, q, keys3);                                                \
    }

/* scores [rows][TILE] of rows r0 .. r0 + 3 (ROWS is 4) over the tile from key k0: int32 products, then scaled; 64 keys at
 * a time. The 16 accumulators are named variables: GCC 12 keeps an array of them on the stack. tops[r]: each row's
 * largest score in the tile (before any mask). */
VNNI static inline __attribute__((always_inline)) void tile_scores(const int64_t dim, const uint8_t *queries, const float *query_scales,
                                                                   const packed_head *p, int64_t k0, int64_t r0, float *scores,
                                                                   float *tops) {
    __m512 best[ROWS];
    for (int r = 0; r < ROWS; r++) best[r] = _mm512_set1_ps(-INFINITY);
    for (int64_t part = 0; part < TILE; part += 64) {
        __m512i z = _mm512_setzero_si512();
        __m512i a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
        __m512i a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
        const int8_t *keys = p->keys + (k0 + part) * dim;
        for (int64_t d4 = 0; d4 < dim / 4; d4++) {
            __m512i keys0 = _mm512_loadu_si512(keys + d4 * 64), keys1 = _mm512_loadu_si512(keys + (dim / 4 + d4) * 64);
            __m512i keys2 = _mm512_loadu_si512(keys + (2 * (dim / 4) + d4) * 64);
            __m512i keys3 = _mm512_loadu_si512(keys + (3 * (dim / 4) + d4) * 64);
            SCORE_DOT(a00, a01, a02, a03, 0)
            SCORE_DOT(a10, a11, a12, a13, 1)
            SCORE_DOT(a20, a21, a22, a23, 2)
            SCORE_DOT(a30, a31, a32, a33, 3)
        }
        __m512i acc[ROWS][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
        for (int s = 0; s < 4; s++) {
            int64_t key = k0 + part + 16 * s;
            __m512i offsets = _mm512_loadu_si512(p->key_offsets + key);
            __m512 key_scales = _mm512_loadu_ps(p->key_scales + key);
            for (int r = 0; r < ROWS; r++) {
                __m512 products = _mm512_cvtepi32_ps(_mm512_sub_epi32(acc[r][s], offsets));
                __m512 x = _mm512_mul_ps(products, _mm512_mul_ps(key_scales, _mm512_set1_ps(query_scales[r0 + r])));
                _mm512_storeu_ps(scores + (r0 + r) * TILE + part + 16 * s, x);
                best[r] = _mm512_max_ps(best[r], x);
            }
        }
    }
    for (int r = 0; r < ROWS; r++) tops[r0 + r] = _mm512_reduce_max_ps(best[r]);
}
#undef SCORE_DOT

/* acc[r][c] = the sums over the tile from key k0 of weights[r][key] times the values, rows r0 .. r0 + ROWS - 1, features
 * f0 + 16 c .. + 15 */
VNNI static inline __attribute__((always_inline)) void tile_values(const int64_t dim, const float *weights, const packed_head *p,
                                                                   int64_t k0, int64_t r0, int64_t f0, __m512 acc[ROWS][4]) {
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = _mm512_setzero_ps();
    const float *values = p->values + k0 * dim;
    for (int64_t key = 0; key < TILE; key++) {
        __m512 v[4];
        for (int c = 0; c < 4; c++) v[c] = _mm512_loadu_ps(values + key * dim + f0 + 16 * c);
        for (int r = 0; r < ROWS; r++) {
            __m512 w = _mm512_set1_ps(weights[(r0 + r) * TILE + key]);
            for (int c = 0; c < 4; c++) acc[r][c] = _mm512_fmadd_ps(w, v[c], acc[r][c]);
        }
    }
}

/* one key pair's weights (bf16 pairs) of one row times the four value chunks */
#define PAIR_DOT(a0, a1, a2, a3, r)                                                                  \
    {                                                                                                \
        __m512bh w = (__m512bh)_mm512_set1_epi32((int32_t)weights[(r0 + (r)) * TILE + pair]);         \
        a0 = _mm512_dpbf16_ps(a0, w, v0);                                                            \
        a1 = _mm512_dpbf16_ps(a1, w, v1);                                                            \
        a2 = _mm512_dpbf16_ps(a2, w, v2);                                                            \
        a3 = _mm512_dpbf16_ps(a3, w, v3);                                                            \
    }

/* tile_values with bf16 weights (rows of TILE words, the first TILE / 2 holding pairs: weight times value scale) and bf16 value codes; rows r0 ..
 * r0 + 3, named accumulators (as tile_scores) */
VNNI static inline __attribute__((always_inline)) void tile_values_bf16(const int64_t dim, const uint32_t *weights, const packed_head *p,
                                                                        int64_t k0, int64_t r0, int64_t f0, __m512 acc[ROWS][4]) {
    __m512 z = _mm512_setzero_ps();
    __m512 a00 = z, a01 = z, a02 = z, a03 = z, a10 = z, a11 = z, a12 = z, a13 = z;
    __m512 a20 = z, a21 = z, a22 = z, a23 = z, a30 = z, a31 = z, a32 = z, a33 = z;
    const uint16_t *values = p->value_codes + k0 * dim + 2 * f0;
    for (int64_t pair = 0; pair < TILE / 2; pair++) {
        const uint16_t *row = values + pair * 2 * dim;
        __m512bh v0 = (__m512bh)_mm512_loadu_si512(row), v1 = (__m512bh)_mm512_loadu_si512(row + 32);
        __m512bh v2 = (__m512bh)_mm512_loadu_si512(row + 64), v3 = (__m512bh)_mm512_loadu_si512(row + 96);
        PAIR_DOT(a00, a01, a02, a03, 0)
        PAIR_DOT(a10, a11, a12, a13, 1)
        PAIR_DOT(a20, a21, a22, a23, 2)
        PAIR_DOT(a30, a31, a32, a33, 3)
    }
    __m512 sums[ROWS][4] = {{a00, a01, a02, a03}, {a10, a11, a12, a13}, {a20, a21, a22, a23}, {a30, a31, a32, a33}};
    for (int r = 0; r < ROWS; r++)
        for (int c = 0; c < 4; c++) acc[r][c] = sums[r][c];
}
#undef PAIR_DOT

/* one work item: the queries i0 .. i0 + n - 1 of key/value head h in batch row b, all G query heads */
VNNI static inline __attribute__((always_inline)) void attend_block(const attention_args *a, const int64_t dim, const int bf16_values,
                                                                    int64_t b, int64_t h, int64_t i0, int64_t n, uint8_t *queries,
                                                                    float *query_scales, float *scores, float *weights, float *outputs,
                                                                    float *state) {
    int64_t group = a->heads / a->kv_heads, rows = n * group, padded_rows = (rows + ROWS - 1) / ROWS * ROWS;
    float *top = state, *total = state + padded_rows, *rescale = state + 2 * padded_rows, *tile_tops = state + 3 * padded_rows;
    packed_head p = head_of(a, b * a->kv_heads + h);
    for (int64_t r = 0; r < padded_rows; r++) {  /* row r: query i0 + r / G, head h * G + r % G; padding repeats the last */
        int64_t row = r < rows ? r : rows - 1, i = i0 + row / group, head = h * group + row % group;
        const int8_t *q = a->qc + ((b * a->queries + i) * a->heads + head) * dim;
        for (int64_t d = 0; d < dim; d++) queries[r * dim + d] = (uint8_t)(q[d] + 128);
        query_scales[r] = a->qs[(b * a->queries + i) * a->heads + head];
        top[r] = -INFINITY, total[r] = 0.0f;
    }
    memset(outputs, 0, sizeof(float) * (size_t)(padded_rows * dim));
    int64_t first = a->offset + i0, last = a->offset + i0 + n - 1;  /* positions of the block's queries */
    /* key ranges: sinks and kept first keys, then the window (one range where they meet) */
    int64_t kept_end = a->sinks + (a->keep_first < last + 1 ? a->keep_first : last + 1);
    int64_t window_start = a->sinks + (a->window < 0 || first - a->window < 0 ? 0 : first - a->window);
    int64_t ranges[2][2] = {{0, kept_end}, {window_start, a->sinks + last + 1}};
    if (window_start <= kept_end) ranges[0][1] = 0, ranges[1][0] = 0;
    int64_t covered = 0;
    for (int range = 0; range < 2; range++) {
        int64_t start = ranges[range][0] / 16 * 16;
        if (start < covered) start = covered;
        for (int64_t k0 = start; k0 < ranges[range][1]; k0 += TILE) {
            covered = k0 + TILE;
            for (int64_t r0 = 0; r0 < padded_rows; r0 += ROWS) tile_scores(dim, queries, query_scales, &p, k0, r0, scores, tile_tops);
            int whole = tile_visible(a, k0, first, last);
            __mmask16 masks[TILE / 16] = {0};
            int64_t masked_position = -1;
            for (int64_t r = 0; r < padded_rows; r++) {  /* online softmax */
                float *s = scores + r * TILE;
                float tile_top = tile_tops[r];
                if (!whole) {  /* mask the scores this row does not see, and take their largest again */
                    int64_t pos = a->offset + i0 + (r < rows ? r : rows - 1) / group;
                    if (pos != masked_position)  /* the G rows of one query share its masks */
                        for (int c = 0; c < TILE / 16; c++) masks[c] = visible(a, k0 + 16 * c, pos);
                    masked_position = pos;
                    __m512 best = _mm512_set1_ps(-INFINITY);
                    for (int c = 0; c < TILE / 16; c++) {
                        __m512 x = _mm512_mask_mov_ps(_mm512_set1_ps(-INFINITY), masks[c], _mm512_loadu_ps(s + 16 * c));
                        _mm512_storeu_ps(s + 16 * c, x);
                        best = _mm512_max_ps(best, x);
                    }
                    tile_top = _mm512_reduce_max_ps(best);
                }
                float new_top = tile_top > top[r] ? tile_top : top[r];
                rescale[r] = new_top == top[r] ? 1.0f : expf(top[r] - new_top);  /* (-inf: nothing seen yet, nothing to rescale) */
                float *w = weights + r * TILE;
                if (tile_top == -INFINITY) {
                    memset(w, 0, sizeof(float) * TILE);
                    continue;
                }
                top[r] = new_top;
                __m512 sum = _mm512_setzero_ps();
                for (int c = 0; c < TILE / 16; c += 2) {
                    __m512 e0 = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * c), _mm512_set1_ps(new_top)));
                    __m512 e1 = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + 16 * c + 16), _mm512_set1_ps(new_top)));
                    if (bf16_values) {  /* 32 weights times their values' scales, as bf16 pairs of keys, in the row's first half */
                        __m512 w0 = _mm512_mul_ps(e0, _mm512_loadu_ps(p.value_scales + k0 + 16 * c));
                        __m512 w1 = _mm512_mul_ps(e1, _mm512_loadu_ps(p.value_scales + k0 + 16 * c + 16));
                        _mm512_storeu_si512(w + 8 * c, (__m512i)_mm512_cvtne2ps_pbh(w1, w0));
                    } else {
                        _mm512_storeu_ps(w + 16 * c, e0);
                        _mm512_storeu_ps(w + 16 * c + 16, e1);
                    }
                    sum = _mm512_add_ps(_mm512_add_ps(sum, e0), e1);
                }
                total[r] = total[r] * rescale[r] + _mm512_reduce_add_ps(sum);
            }
            for (int64_t r0 = 0; r0 < padded_rows; r0 += ROWS)
                for (int64_t f0 = 0; f0 < dim; f0 += 64) {
                    __m512 acc[ROWS][4];
                    if (bf16_values) tile_values_bf16(dim, (const uint32_t *)weights, &p, k0, r0, f0, acc);
                    else tile_values(dim, weights, &p, k0, r0, f0, acc);
                    for (int r = 0; r < ROWS; r++)
                        for (int c = 0; c < 4 && f0 + 16 * c < dim; c++) {
                            float *o = outputs + (r0 + r) * dim + f0 + 16 * c;
                            _mm512_storeu_ps(o, _mm512_fmadd_ps(_mm512_loadu_ps(o), _mm512_set1_ps(rescale[r0 + r]), acc[r][c]));
                        }
                }
        }
    }
    for (int64_t r = 0; r < rows; r++) {
        int64_t i = i0 + r / group, head = h * group + r % group;
        float *o = a->out + ((b * a->queries + i) * a->heads + head) * dim;
        for (int64_t d = 0; d < dim; d++) o[d] = outputs[r * dim + d] / total[r];
    }
}

VNNI static void attend_tasks(void *context, int64_t begin, int64_t end) {
    attention_args *a = context;
    int64_t dim = a->dim, rows = (QUERY_BLOCK * (a->heads / a->kv_heads) + ROWS - 1) / ROWS * ROWS;
    /* the rows' query codes, then floats: query scales, scores, weights, outputs, and four per-row states */
    char *scratch = malloc((size_t)rows * dim + sizeof(float) * (size_t)(rows + 2 * rows * TILE + rows * dim + 4 * rows));
    if (!scratch) {
        a->failed = 1;
        return;
    }
    uint8_t *queries = (uint8_t *)scratch;
    float *query_scales = (float *)(scratch + rows * dim);
    float *scores = query_scales + rows;
    float *weights = scores + rows * TILE;
    float *outputs = weights + rows * TILE;
    float *state = outputs + rows * dim;
    int64_t items = a->blocks * a->batch * a->kv_heads;
    for (int64_t item = begin; item < end; item++) {
        /* zig-zag: items 0, 1, 2, 3, ... are blocks 0, last, 1, last - 1, ... of the (head, query block) order, so that
         * each worker's contiguous part holds early queries (few keys under the causal mask) and late ones alike */
        int64_t order = item % 2 ? items - 1 - item / 2 : item / 2;
        int64_t block = order % a->blocks, pair = order / a->blocks, b = pair / a->kv_heads, h = pair % a->kv_heads;
        int64_t i0 = block * QUERY_BLOCK, n = a->queries - i0 < QUERY_BLOCK ? a->queries - i0 : QUERY_BLOCK;
        if (a->bf16_values) {
            if (dim == 64) attend_block(a, 64, 1, b, h, i0, n, queries, query_scales, scores, weights, outputs, state);
            else attend_block(a, dim, 1, b, h, i0, n, queries, query_scales, scores, weights, outputs, state);
        } else if (dim == 64) attend_block(a, 64, 0, b, h, i0, n, queries, query_scales, scores, weights, outputs, state);
        else if (dim == 128) attend_block(a, 128, 0, b, h, i0, n, queries, query_scales, scores, weights, outputs, state);
        else attend_block(a, dim, 0, b, h, i0, n, queries, query_scales, scores, weights, outputs, state);
    }
    free(scratch);
}

/* Returns 0, or 1 where memory for the packed keys and values could not be allocated. */
int sb_integer_attention(const int8_t *qc, const float *qs, int64_t batch, int64_t queries, int64_t heads, int64_t dim,
                         const int8_t *kc, int64_t kc_b, int64_t kc_t, int64_t kc_h, const float *ks, int64_t ks_b, int64_t ks_t,
                         int64_t ks_h, const int8_t *vc, int64_t vc_b, int64_t vc_t, int64_t vc_h, const float *vs, int64_t vs_b,
                         int64_t vs_t, int64_t vs_h, int64_t kv_heads, int64_t keys, int64_t sinks, int64_t window,
                         int64_t keep_first, int64_t bf16_values, float *out, int threads) {
    attention_args a = {qc, qs, batch, queries, heads, kv_heads, dim, keys, 0, sinks, window, keep_first,
                        keys - sinks - queries, (queries + QUERY_BLOCK - 1) / QUERY_BLOCK, bf16_values, kc, vc, kc_b, kc_t, kc_h,
                        vc_b, vc_t, vc_h, ks, vs, ks_b, ks_t, ks_h, vs_b, vs_t, vs_h, NULL, NULL, NULL, out, 0};
    a.padded = (keys + 15) / 16 * 16 + TILE;  /* a tile may start at any multiple of 16 below keys */
    int64_t pairs = batch * kv_heads;
    a.packed_keys = malloc((size_t)(pairs * a.padded * dim));
    a.packed_values = malloc(sizeof(float) * (size_t)(pairs * a.padded * dim + 128));  /* + 128: a head size not a multiple of
                                                                                   * 64 reads past its last feature */
    a.scalars = malloc(sizeof(float) * 3 * (size_t)(pairs * a.padded));
    int failed = !a.packed_keys || !a.packed_values || !a.scalars;
    if (!failed) {
        sb_parallel_for(pack_tasks, &a, pairs, threads);
        sb_parallel_for_then_sleep(attend_tasks, &a, pairs * a.blocks, threads);
        failed = a.failed;
    }
    free(a.packed_keys);
    free(a.packed_values);
    free(a.scalars);
    return failed;
}
