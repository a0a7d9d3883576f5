/* Rotary embedding of a decode step's rows (rotate-half convention): out = x * cos + rotate_half(x) * sin, where
 * rotate_half(x) = (-x[half:], x[:half]). Each product and the sum are rounded in fp32 as PyTorch's separate multiplies
 * and add round them (built with -ffp-contract=off), so the result equals ops.rotary.apply_rotary bit for bit. */
#include <stdint.h>

/* x: rows of dim floats, row r at x + r * stride; cos, sin: dim floats shared by every row; out: rows * dim, contiguous */
void sb_rotate_half(const float *x, int64_t rows, int64_t dim, int64_t stride, const float *cos, const float *sin,
                    float *out) {
    int64_t half = dim / 2;
    for (int64_t r = 0; r < rows; r++) {
        const float *row = x + r * stride;
        float *o = out + r * dim;
        for (int64_t d = 0; d < half; d++) o[d] = row[d] * cos[d] + -row[d + half] * sin[d];
        for (int64_t d = half; d < dim; d++) o[d] = row[d] * cos[d] + row[d - half] * sin[d];
    }
}
