/* Gated linear attention over many tokens as its recurrence, with AVX-512: a prefill's GLA layers on CPU.
 *
 *     S_t = diag(decay_t) S_{t-1} + k_t^T v_t,        o_t = q_t S_t
 *
 * for every key/value head, S [K, V] in fp32, query heads h * G .. h * G + G - 1 reading head h's state. The state of
 * one head is cut into blocks of BLOCK (32) value columns, which are independent: a work item is one (batch row, head,
 * block), its K x 32 slice of the state kept in a local buffer (K <= MAX_KEY_DIM) while it runs over every token. Per token and
 * key channel: one multiply by the decay, one rank-one update, and an FMA into each query head's output; nothing of
 * size T x T or K x K exists. Each state element is updated as decay * S + k * v with the two products rounded
 * separately (as the token-by-token reference computes it); the outputs' sums over K differ from any other kernel's
 * in the order of their additions only.
 *
 * Inputs, contiguous fp32: q [B, T, H, K] (already scaled), k and decay [B, T, Hkv, K] (decay = exp(g) <= 1), v [B, T, Hkv, V];
 * state [B, Hkv, K, V], read as the initial state and overwritten with the final one; out [B, T, H, V]. */
#include <immintrin.h>
#include <stdint.h>

#include "thread_pool.h"

#define AVX512 __attribute__((target("avx512f")))

/* the largest key head size (the local state slice is 2 * MAX_KEY_DIM vectors, 64 KB) */
#define MAX_KEY_DIM 512
/* value columns per work item: two vectors, which share each broadcast decay, key and query */
#define BLOCK 32

int sb_gla_recurrence_supported(void) {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx512f");
}

typedef struct {
    const float *q, *k, *v, *decay;
    float *state, *out;
    int64_t tokens, heads, kv_heads, key_dim, value_dim, blocks;
} gla_args;

/* one state row's step over two vectors of value columns, decay * row + key * value, each product rounded on its own */
AVX512 static inline __attribute__((always_inline)) void update(__m512 *row, float decay, float key, const __m512 value[2]) {
    __m512 d = _mm512_set1_ps(decay), k = _mm512_set1_ps(key);
    for (int c = 0; c < 2; c++) row[c] = _mm512_add_ps(_mm512_mul_ps(d, row[c]), _mm512_mul_ps(k, value[c]));
}

/* one work item's tokens, G query heads per key/value head (a constant where the caller inlines it) */
AVX512 static inline __attribute__((always_inline)) void run_block(const gla_args *a, const int64_t group, int64_t b, int64_t h,
                                                                   int64_t block, __m512 *rows) {
    const int64_t K = a->key_dim, V = a->value_dim, T = a->tokens, H = a->heads, Hkv = a->kv_heads;
    int64_t v0 = BLOCK * block;
    __mmask16 lanes[2];
    for (int c = 0; c < 2; c++) {
        int64_t width = V - v0 - 16 * c;
        lanes[c] = width >= 16 ? (__mmask16)0xFFFF : width <= 0 ? 0 : (__mmask16)((1u << width) - 1);
    }
    float *state = a->state + (b * Hkv + h) * K * V + v0;
    for (int64_t i = 0; i < K; i++)
        for (int c = 0; c < 2; c++) rows[2 * i + c] = _mm512_maskz_loadu_ps(lanes[c], state + i * V + 16 * c);
    for (int64_t t = 0; t < T; t++) {
        int64_t kv_row = (b * T + t) * Hkv + h;
        const float *key = a->k + kv_row * K, *decay = a->decay + kv_row * K;
        const float *query = a->q + ((b * T + t) * H + h * group) * K;
        __m512 value[2], sums[group][2];
        for (int c = 0; c < 2; c++) value[c] = _mm512_maskz_loadu_ps(lanes[c], a->v + kv_row * V + v0 + 16 * c);
        for (int64_t g = 0; g < group; g++) sums[g][0] = sums[g][1] = _mm512_setzero_ps();
        for (int64_t i = 0; i < K; i++) {
            update(rows + 2 * i, decay[i], key[i], value);
            for (int64_t g = 0; g < group; g++) {
                __m512 weight = _mm512_set1_ps(query[g * K + i]);
                for (int c = 0; c < 2; c++) sums[g][c] = _mm512_fmadd_ps(weight, rows[2 * i + c], sums[g][c]);
            }
        }
        float *out = a->out + ((b * T + t) * H + h * group) * V + v0;
        for (int64_t g = 0; g < group; g++)
            for (int c = 0; c < 2; c++) _mm512_mask_storeu_ps(out + g * V + 16 * c, lanes[c], sums[g][c]);
    }
    for (int64_t i = 0; i < K; i++)
        for (int c = 0; c < 2; c++) _mm512_mask_storeu_ps(state + i * V + 16 * c, lanes[c], rows[2 * i + c]);
}

AVX512 static void gla_tasks(void *context, int64_t begin, int64_t end) {
    const gla_args *a = context;
    __m512 rows[2 * MAX_KEY_DIM];
    int64_t group = a->heads / a->kv_heads;
    for (int64_t item = begin; item < end; item++) {
        int64_t block = item % a->blocks, pair = item / a->blocks, b = pair / a->kv_heads, h = pair % a->kv_heads;
        if (group == 1) run_block(a, 1, b, h, block, rows);
        else if (group == 2) run_block(a, 2, b, h, block, rows);
        else if (group == 3) run_block(a, 3, b, h, block, rows);
        else if (group == 4) run_block(a, 4, b, h, block, rows);
        else run_block(a, group, b, h, block, rows);
    }
}

/* Returns 0, or 1 where the key head size is above MAX_KEY_DIM (nothing computed). */
int sb_gla_recurrence(const float *q, const float *k, const float *v, const float *decay, float *state, float *out, int64_t batch,
                      int64_t tokens, int64_t heads, int64_t kv_heads, int64_t key_dim, int64_t value_dim, int threads) {
    if (key_dim > MAX_KEY_DIM) return 1;
    gla_args a = {q, k, v, decay, state, out, tokens, heads, kv_heads, key_dim, value_dim, (value_dim + BLOCK - 1) / BLOCK};
    sb_parallel_for_then_sleep(gla_tasks, &a, batch * kv_heads * a.blocks, threads);
    return 0;
}
