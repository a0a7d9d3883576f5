/* Softmax attention of one query per head over every key (a decode step), fp32, with AVX-512.
 *
 * q [B, H, D] (contiguous, fp32), keys and values [B, T, Hkv, D] in fp32, fp16 or int8 codes (kind; widened to fp32
 * as they are read, so that a step reads a half or a quarter of the bytes; int8 codes come with one fp32 scale per
 * key and head, [B, T, Hkv] by their strides, applied to each score and to each value's weight), given by their strides (each key's D values contiguous:
 * head-major buffers or any other layout), out [B, H, D]; H a multiple of Hkv (grouped-query attention: query head g of
 * key/value head h is h * G + g, G = H / Hkv). For each (batch row, key/value head) the G query heads read the keys
 * once for their scores, the softmax runs over the scores with a vector exp, and the values are read once for the
 * weighted sums. The order of the keys does not matter (a ring buffer may be passed as it is). Long key runs are split
 * into KEY_CHUNKS parts attended apart (so that two threads share even three key/value heads) and merged by their
 * softmax maxima and sums; the split depends on the number of keys only, so any thread count gives the same output. */
#include <immintrin.h>
#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <stdlib.h>

#include "thread_pool.h"
#include "vector_math.h"

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl")))

/* Attention smaller than this many query-key multiply-adds runs on one thread: splitting it saves less than a pool
 * call costs. */
#define PARALLEL_MIN_MACS (1 << 16)
/* Query heads and 16-float chunks of a head's values summed at once (their accumulators stay in registers). */
#define HEADS_AT_ONCE 4
#define CHUNKS_AT_ONCE 4
/* Keys whose scores are computed together, their horizontal sums merged */
#define KEYS_AT_ONCE 4
/* From this many keys on, each (batch row, key/value head) attends its keys in KEY_CHUNKS parts. */
#define CHUNKED_MIN_KEYS 2048
#define KEY_CHUNKS 4

int sb_attention_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl");
}

/* how keys and values are stored */
enum { KV_FP32 = 0, KV_FP16 = 1, KV_INT8 = 2 };

/* Rows ahead of the one being read that are fetched into the cache (the rows of one head are short runs, which the
 * hardware's prefetcher enters late). */
#define PREFETCH_ROWS 16

static inline int kv_width(int kind) { return kind == KV_FP32 ? 4 : kind == KV_FP16 ? 2 : 1; }

/* ask for the cache lines of the row at element offset at (dim elements of width bytes) */
static inline void prefetch_row(const void *base, int64_t at, int64_t dim, int width) {
    const char *row = (const char *)base + at * width;
    /* __builtin_prefetch, not _mm_prefetch: GCC 12 dropped the latter from the always-inlined bodies below */
    for (int64_t byte = 0; byte < dim * width; byte += 64) __builtin_prefetch(row + byte, 0, 3);
}

/* 16 (masked) elements of a key or value row from element offset at, as fp32 (int8: the codes, unscaled) */
AVX512 static inline __m512 load_row(const void *base, int64_t at, __mmask16 m, int kind) {
    if (kind == KV_FP16) return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, (const uint16_t *)base + at));
    if (kind == KV_INT8) return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, (const int8_t *)base + at)));
    return _mm512_maskz_loadu_ps(m, (const float *)base + at);
}

/* the sums of the 16 lanes of each of a, b, c, d, as one 4-float vector (7 shuffles instead of 16 for four reductions) */
AVX512 static inline __m128 sums_of_four(__m512 a, __m512 b, __m512 c, __m512 d) {
    __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    __m512 blocks = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD)); /* a b c d parts */
    blocks = _mm512_add_ps(blocks, _mm512_permute_ps(blocks, 0x4E));
    blocks = _mm512_add_ps(blocks, _mm512_permute_ps(blocks, 0xB1)); /* every lane of a block: its sum */
    return _mm512_castps512_ps128(_mm512_permutexvar_ps(_mm512_setr_epi32(0, 4, 8, 12, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), blocks));
}

static inline __mmask16 chunk_mask(int64_t remaining) {
    return remaining >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << remaining) - 1);
}

/* out[(g0 + g) * dim + 16 * (c0 + c) ...] = inverse[g] * sum_t scores[g * keys + t] * v_t for query heads g < ng and
 * value chunks c < nc; always inlined with constant counts, so that the accumulators stay in registers */
AVX512 static inline __attribute__((always_inline)) void weighted_values(int64_t c0, const int64_t nc, int64_t g0, const int64_t ng,
                                                                       int64_t dim, int64_t keys, const void *v, int64_t v_pos,
                                                                       int kind, const float *scores, const float *inverse, float *out) {
    __m512 acc[HEADS_AT_ONCE][CHUNKS_AT_ONCE];
    for (int64_t g = 0; g < ng; g++)
        for (int64_t c = 0; c < nc; c++) acc[g][c] = _mm512_setzero_ps();
    for (int64_t t = 0; t < keys; t++) {
        if (c0 == 0 && t + PREFETCH_ROWS < keys) prefetch_row(v, (t + PREFETCH_ROWS) * v_pos, dim, kv_width(kind));
        for (int64_t c = 0; c < nc; c++) {
            __m512 vc = load_row(v, t * v_pos + 16 * (c0 + c), chunk_mask(dim - 16 * (c0 + c)), kind);
            for (int64_t g = 0; g < ng; g++) acc[g][c] = _mm512_fmadd_ps(_mm512_set1_ps(scores[g * keys + t]), vc, acc[g][c]);
        }
    }
    for (int64_t g = 0; g < ng; g++)
        for (int64_t c = 0; c < nc; c++)
            _mm512_mask_storeu_ps(out + (g0 + g) * dim + 16 * (c0 + c), chunk_mask(dim - 16 * (c0 + c)),
                                  _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inverse[g])));
}

/* query heads g0 .. g0 + ng - 1 of one (batch row, key/value head): query heads q[g * dim], their outputs out[g * dim],
 * scores scratch [G, T]; with int8 codes, ks[t * ks_pos] and vs[t * vs_pos] are the scales of key t and of value t.
 * Without tops (NULL) the outputs are the attention; with tops and totals [G] they are the weighted sums before
 * division, and tops and totals receive each head's largest score and its softmax denominator at that shift (a part to
 * merge). Always inlined with a constant ng (attend_group). */
AVX512 static inline __attribute__((always_inline)) void attend_heads(int64_t g0, const int64_t ng, int64_t chunks,
                                const float *q, int64_t dim, int64_t keys, const void *k, int64_t k_pos,
                                const void *v, int64_t v_pos, int kind, const float *ks, int64_t ks_pos, const float *vs,
                                int64_t vs_pos, float scale, float *out, float *scores, float *tops, float *totals) {
    int64_t t = 0;
    for (; t + KEYS_AT_ONCE <= keys; t += KEYS_AT_ONCE) {  /* scores of four keys at once, summed together */
        for (int j = 0; j < KEYS_AT_ONCE; j++)
            if (t + PREFETCH_ROWS + j < keys) prefetch_row(k, (t + PREFETCH_ROWS + j) * k_pos, dim, kv_width(kind));
        __m512 acc[HEADS_AT_ONCE][KEYS_AT_ONCE];
        for (int64_t g = 0; g < ng; g++)
            for (int j = 0; j < KEYS_AT_ONCE; j++) acc[g][j] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) {
            __mmask16 m = chunk_mask(dim - 16 * c);
            __m512 kc[KEYS_AT_ONCE];
            for (int j = 0; j < KEYS_AT_ONCE; j++) kc[j] = load_row(k, (t + j) * k_pos + 16 * c, m, kind);
            for (int64_t g = 0; g < ng; g++) {
                __m512 qc = _mm512_maskz_loadu_ps(m, q + (g0 + g) * dim + 16 * c);
                for (int j = 0; j < KEYS_AT_ONCE; j++) acc[g][j] = _mm512_fmadd_ps(qc, kc[j], acc[g][j]);
            }
        }
        for (int64_t g = 0; g < ng; g++)
            _mm_storeu_ps(scores + g * keys + t, _mm_mul_ps(sums_of_four(acc[g][0], acc[g][1], acc[g][2], acc[g][3]), _mm_set1_ps(scale)));
    }
    for (; t < keys; t++) {  /* the last keys one at a time, each read once for the ng query heads */
        __m512 acc[HEADS_AT_ONCE];
        for (int64_t g = 0; g < ng; g++) acc[g] = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; c++) {
            __mmask16 m = chunk_mask(dim - 16 * c);
            __m512 kc = load_row(k, t * k_pos + 16 * c, m, kind);
            for (int64_t g = 0; g < ng; g++)
                acc[g] = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, q + (g0 + g) * dim + 16 * c), kc, acc[g]);
        }
        for (int64_t g = 0; g < ng; g++) scores[g * keys + t] = _mm512_reduce_add_ps(acc[g]) * scale;
    }
    if (ks)  /* int8 keys: each score times its key's scale */
        for (int64_t g = 0; g < ng; g++)
            for (int64_t t = 0; t < keys; t++) scores[g * keys + t] *= ks[t * ks_pos];
    float inverse[HEADS_AT_ONCE];
    for (int64_t g = 0; g < ng; g++) {  /* softmax weights, unnormalised, and 1 / their sum */
        float *s = scores + g * keys;
        __m512 top = _mm512_set1_ps(-INFINITY);
        for (int64_t t = 0; t < keys; t += 16) top = _mm512_max_ps(top, _mm512_mask_loadu_ps(top, chunk_mask(keys - t), s + t));
        float largest = _mm512_reduce_max_ps(top);
        __m512 shift = _mm512_set1_ps(largest), total = _mm512_setzero_ps();
        for (int64_t t = 0; t < keys; t += 16) {
            __mmask16 m = chunk_mask(keys - t);
            __m512 e = _mm512_maskz_mov_ps(m, exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, s + t), shift)));
            _mm512_mask_storeu_ps(s + t, m, e);
            total = _mm512_add_ps(total, e);
        }
        float sum = _mm512_reduce_add_ps(total);
        inverse[g] = tops ? 1.0f : 1.0f / sum;
        if (tops) tops[g0 + g] = largest, totals[g0 + g] = sum;
        if (vs)  /* int8 values: each weight times its value's scale, after the softmax sum */
            for (int64_t t = 0; t < keys; t++) s[t] *= vs[t * vs_pos];
    }
    for (int64_t c0 = 0; c0 < chunks; c0 += CHUNKS_AT_ONCE) {  /* weighted values: each value read once per block */
        if (chunks - c0 >= CHUNKS_AT_ONCE)
            weighted_values(c0, CHUNKS_AT_ONCE, g0, ng, dim, keys, v, v_pos, kind, scores, inverse, out);
        else
            weighted_values(c0, chunks - c0, g0, ng, dim, keys, v, v_pos, kind, scores, inverse, out);
    }
}

/* the query heads of one (batch row, key/value head) in groups of HEADS_AT_ONCE, each group through attend_heads with
 * its head count a constant (its accumulators then stay in registers: with a count known only at run time they were
 * kept on the stack) */
AVX512 static void attend_group(const float *q, int64_t group, int64_t dim, int64_t keys, const void *k, int64_t k_pos,
                                const void *v, int64_t v_pos, int kind, const float *ks, int64_t ks_pos, const float *vs,
                                int64_t vs_pos, float scale, float *out, float *scores, float *tops, float *totals) {
    int64_t chunks = (dim + 15) / 16;
    for (int64_t g0 = 0; g0 < group; g0 += HEADS_AT_ONCE) {
        int64_t ng = group - g0 < HEADS_AT_ONCE ? group - g0 : HEADS_AT_ONCE;
#define HEADS(n) attend_heads(g0, n, chunks, q, dim, keys, k, k_pos, v, v_pos, kind, ks, ks_pos, vs, vs_pos, scale, out, scores, tops, totals)
        if (ng == 1) HEADS(1);
        else if (ng == 2) HEADS(2);
        else if (ng == 3) HEADS(3);
        else HEADS(HEADS_AT_ONCE);
#undef HEADS
    }
}

/* one call's tensors, shared by the pool's tasks (strides in elements) */
struct attention {
    const float *q;
    const void *k, *v;
    int kind;
    const float *ks, *vs; /* int8 codes: their scales */
    int64_t ks_batch, ks_pos, ks_head, vs_batch, vs_pos, vs_head;
    int64_t heads, kv_heads, group, dim, keys, k_batch, k_pos, k_head, v_batch, v_pos, v_head, chunks;
    float scale;
    float *out;
    float *parts, *tops, *totals; /* with chunks > 1: [pair][chunk][G][dim], [pair][chunk][G] twice */
    atomic_int failed;
};

/* tasks [begin, end): (batch row, key/value head) pairs, times their key chunks */
static void attend_tasks(void *context, int64_t begin, int64_t end) {
    struct attention *a = context;
    float *scores = malloc(sizeof(float) * (size_t)(a->group * (a->keys / a->chunks + 1)));
    if (scores == NULL) {
        atomic_store(&a->failed, 1);
        return;
    }
    for (int64_t task = begin; task < end; task++) {
        int64_t pair = task / a->chunks, chunk = task % a->chunks;
        int64_t b = pair / a->kv_heads, h = pair % a->kv_heads, first = (b * a->heads + h * a->group) * a->dim;
        int64_t k0 = a->keys * chunk / a->chunks, n = a->keys * (chunk + 1) / a->chunks - k0;
        size_t width = (size_t)kv_width(a->kind);
        const char *k = (const char *)a->k + width * (size_t)(b * a->k_batch + h * a->k_head + k0 * a->k_pos);
        const char *v = (const char *)a->v + width * (size_t)(b * a->v_batch + h * a->v_head + k0 * a->v_pos);
        const float *ks = a->ks ? a->ks + b * a->ks_batch + h * a->ks_head + k0 * a->ks_pos : NULL;
        const float *vs = a->vs ? a->vs + b * a->vs_batch + h * a->vs_head + k0 * a->vs_pos : NULL;
        if (a->chunks == 1)
            attend_group(a->q + first, a->group, a->dim, n, k, a->k_pos, v, a->v_pos, a->kind, ks, a->ks_pos, vs, a->vs_pos,
                         a->scale, a->out + first, scores, NULL, NULL);
        else
            attend_group(a->q + first, a->group, a->dim, n, k, a->k_pos, v, a->v_pos, a->kind, ks, a->ks_pos, vs, a->vs_pos,
                         a->scale, a->parts + task * a->group * a->dim, scores, a->tops + task * a->group,
                         a->totals + task * a->group);
    }
    free(scores);
}

/* the key chunks of every pair merged into the outputs, in chunk order */
static void merge_chunks(struct attention *a, int64_t pairs) {
    for (int64_t pair = 0; pair < pairs; pair++) {
        int64_t b = pair / a->kv_heads, h = pair % a->kv_heads;
        for (int64_t g = 0; g < a->group; g++) {
            float *out = a->out + (b * a->heads + h * a->group + g) * a->dim, largest = -INFINITY, sum = 0.0f;
            for (int64_t c = 0; c < a->chunks; c++) largest = fmaxf(largest, a->tops[(pair * a->chunks + c) * a->group + g]);
            for (int64_t d = 0; d < a->dim; d++) out[d] = 0.0f;
            for (int64_t c = 0; c < a->chunks; c++) {
                int64_t part = (pair * a->chunks + c) * a->group + g;
                float weight = expf(a->tops[part] - largest);
                sum += weight * a->totals[part];
                for (int64_t d = 0; d < a->dim; d++) out[d] += weight * a->parts[part * a->dim + d];
            }
            for (int64_t d = 0; d < a->dim; d++) out[d] *= 1.0f / sum;
        }
    }
}

/* Returns 0, or -1 if the scratch could not be allocated. Strides are in elements; kind: keys and values are fp32 (0),
 * fp16 (1) or int8 codes (2) with scales ks, vs [B, T, Hkv] (given by their strides; NULL otherwise). */
int sb_attend(const float *q, int64_t batch, int64_t heads, int64_t kv_heads, int64_t dim, int64_t keys,
              const void *k, int64_t k_batch, int64_t k_pos, int64_t k_head,
              const void *v, int64_t v_batch, int64_t v_pos, int64_t v_head, int kind,
              const float *ks, int64_t ks_batch, int64_t ks_pos, int64_t ks_head,
              const float *vs, int64_t vs_batch, int64_t vs_pos, int64_t vs_head, float scale, float *out, int threads) {
    int64_t pairs = batch * kv_heads, chunks = keys >= CHUNKED_MIN_KEYS ? KEY_CHUNKS : 1, group = heads / kv_heads;
    struct attention a = {q, k, v, kind, ks, vs, ks_batch, ks_pos, ks_head, vs_batch, vs_pos, vs_head, heads, kv_heads, group, dim, keys, k_batch, k_pos, k_head, v_batch, v_pos, v_head, chunks,
                          scale, out, NULL, NULL, NULL, 0};
    if (chunks > 1) {
        a.parts = malloc(sizeof(float) * (size_t)(pairs * chunks * group * (dim + 2)));
        if (a.parts == NULL) return -1;
        a.tops = a.parts + pairs * chunks * group * dim;
        a.totals = a.tops + pairs * chunks * group;
    }
    int parallel = threads > 1 && keys * heads * dim * batch >= PARALLEL_MIN_MACS;
    sb_parallel_for(attend_tasks, &a, pairs * chunks, parallel ? threads : 1);
    if (chunks > 1 && !atomic_load(&a.failed)) merge_chunks(&a, pairs);
    free(a.parts);
    return atomic_load(&a.failed) ? -1 : 0;
}

/* Write rows src [B, H, D] (fp32, each row's D values contiguous, strides in elements) as int8 codes with one fp32
 * scale per row, as Int8Rows stores them: scale = max(max|x|, FLT_MIN) / 127, code = clamp(round(x / scale), -127, 127)
 * with ties to even (rintf in the default rounding mode, as torch.round), every step in fp32 as PyTorch computes it. */
void sb_quantize_rows(const float *src, int64_t batch, int64_t heads, int64_t dim, int64_t src_b, int64_t src_h,
                      int8_t *codes, int64_t codes_b, int64_t codes_h, float *scales, int64_t scales_b, int64_t scales_h) {
    for (int64_t b = 0; b < batch; b++)
        for (int64_t h = 0; h < heads; h++) {
            const float *x = src + b * src_b + h * src_h;
            int8_t *out = codes + b * codes_b + h * codes_h;
            float amax = 0.0f;
            for (int64_t d = 0; d < dim; d++) amax = fmaxf(amax, fabsf(x[d]));
            float scale = fmaxf(amax, 1.17549435e-38f) / 127.0f;
            for (int64_t d = 0; d < dim; d++) {
                float q = rintf(x[d] / scale);
                out[d] = (int8_t)(q > 127.0f ? 127.0f : q < -127.0f ? -127.0f : q);
            }
            scales[b * scales_b + h * scales_h] = scale;
        }
}
