/* y = x W^T for W in Q4_1 blocks (w = d * q + m per block of 32 weights, 4-bit q, fp16 d and m),
 * the way llama.cpp multiplies its Q4_1 weights: each row of x is quantized to 8 bits per block
 * of 32 (scale dx = max |x| / 127), so a block's dot product is exact integer arithmetic,
 *     sum_k w_k x_k = d * dx * sum_k q_k qx_k + m * dx * sum_k qx_k,
 * and only the per-block scaling is in floating point. AVX-512 VNNI multiplies 64 unsigned 4-bit
 * values by 64 signed bytes and sums them in fours in one instruction.
 *
 * Weights are repacked at load time so that one instruction serves 16 output columns: for column
 * group c, block b and pair p (0..3), 64 bytes hold, for column lane i and j = 0..3, q[16c + i]
 * [32b + 8p + j] in the low nibble of byte 4i + j and q[16c + i][32b + 8p + 4 + j] in its high
 * nibble. Scales: for (c, b), the 16 columns' d, then their 16 m, as fp16.
 *
 * Every row of x goes through the same operations in the same order whatever the number of
 * rows and wherever it sits among them, so a token's output never depends on the batch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32   /* weights per Q4_1 block, and activations per 8-bit block */
#define COLUMNS 16 /* output columns per group: one register of floats */
#define ROWS 8     /* rows of x that share each unpacked block of weights */

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

int q4_1_matmul_available(void) { return 1; }

/* One row of x to bytes: per block of 32, qx = round-to-nearest-even(x / dx), dx = max |x| / 127,
   and sx = dx * sum qx (what the block's m multiplies). */
static void quantize_row(const float *x, int64_t k, int8_t *qx, float *dx, float *sx) {
    for (int64_t b = 0; b < k / BLOCK; ++b) {
        const __m512 x0 = _mm512_loadu_ps(x + b * BLOCK);
        const __m512 x1 = _mm512_loadu_ps(x + b * BLOCK + 16);
        const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0),
                                                              _mm512_abs_ps(x1)));
        const float scale = amax / 127.0f;
        const __m512 inverse = _mm512_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
        const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, inverse));
        const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, inverse));
        _mm_storeu_si128((__m128i *)(qx + b * BLOCK), _mm512_cvtsepi32_epi8(q0));
        _mm_storeu_si128((__m128i *)(qx + b * BLOCK + 16), _mm512_cvtsepi32_epi8(q1));
        dx[b] = scale;
        sx[b] = scale * (float)_mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
    }
}

/* y[r][16c .. 16c + 15] for `rows` (a constant after inlining) rows of quantized x. */
static inline __attribute__((always_inline)) void column_group(
    int rows, const int8_t *qx, const float *dx, const float *sx, int64_t k,
    const uint8_t *nibbles, const uint16_t *scales, float *y, int64_t n, __mmask16 mask) {
    const int64_t blocks = k / BLOCK;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[ROWS];
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        __m512i dots[ROWS];
        for (int r = 0; r < rows; ++r) dots[r] = _mm512_setzero_si512();
        for (int p = 0; p < 4; ++p) {
            const __m512i packed = _mm512_loadu_si512(nibbles + (b * 4 + p) * 64);
            const __m512i first = _mm512_and_si512(packed, low);
            const __m512i second = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
            for (int r = 0; r < rows; ++r) {
                const int8_t *at = qx + r * k + b * BLOCK + p * 8;
                int32_t four[2];
                memcpy(four, at, sizeof four);
                dots[r] = _mm512_dpbusd_epi32(dots[r], first, _mm512_set1_epi32(four[0]));
                dots[r] = _mm512_dpbusd_epi32(dots[r], second, _mm512_set1_epi32(four[1]));
            }
        }
        const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(scales + b * 32)));
        const __m512 m = _mm512_cvtph_ps(
            _mm256_loadu_si256((const __m256i *)(scales + b * 32 + COLUMNS)));
        for (int r = 0; r < rows; ++r) {
            const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[r * blocks + b]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, acc[r]);
            acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * blocks + b]), acc[r]);
        }
    }
    for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + r * n, mask, acc[r]);
}

#define ROWS_CASE(R)                                                                       \
    case R:                                                                                \
        column_group(R, qx, dx, sx, k, nibbles, scales, y, n, mask);                        \
        break;

static void column_group_rows(int rows, const int8_t *qx, const float *dx, const float *sx,
                              int64_t k, const uint8_t *nibbles, const uint16_t *scales,
                              float *y, int64_t n, __mmask16 mask) {
    switch (rows) {
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
        ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
    }
}

/* x [m, k] fp32 (k a multiple of 32), weights packed for n columns (padded to a multiple of 16),
   y [m, n] fp32. Returns 0, or -1 when the scratch memory cannot be allocated. */
int q4_1_matmul(const float *x, int64_t m, int64_t k, const uint8_t *nibbles,
                const uint16_t *scales, int64_t n, float *y, int num_threads) {
    const int64_t blocks = k / BLOCK;
    int8_t *qx = malloc((size_t)(m * k));
    float *dx = malloc(sizeof(float) * (size_t)(m * blocks));
    float *sx = malloc(sizeof(float) * (size_t)(m * blocks));
    if (qx == NULL || dx == NULL || sx == NULL) {
        free(qx), free(dx), free(sx);
        return -1;
    }
    const int64_t groups = (n + COLUMNS - 1) / COLUMNS;
#pragma omp parallel num_threads(num_threads)
    {
#pragma omp for schedule(static)
        for (int64_t r = 0; r < m; ++r)
            quantize_row(x + r * k, k, qx + r * k, dx + r * blocks, sx + r * blocks);
#pragma omp for schedule(static)
        for (int64_t c = 0; c < groups; ++c) {
            const int64_t width = n - c * COLUMNS < COLUMNS ? n - c * COLUMNS : COLUMNS;
            const __mmask16 mask = (__mmask16)((1u << width) - 1u);
            const uint8_t *group_nibbles = nibbles + c * blocks * 4 * 64;
            const uint16_t *group_scales = scales + c * blocks * 2 * COLUMNS;
            for (int64_t r = 0; r < m; r += ROWS) {
                const int rows = (int)(m - r < ROWS ? m - r : ROWS);
                column_group_rows(rows, qx + r * k, dx + r * blocks, sx + r * blocks, k,
                                  group_nibbles, group_scales, y + r * n + c * COLUMNS, n,
                                  mask);
            }
        }
    }
    free(qx), free(dx), free(sx);
    return 0;
}

#else

int q4_1_matmul_available(void) { return 0; }

int q4_1_matmul(const float *x, int64_t m, int64_t k, const uint8_t *nibbles,
                const uint16_t *scales, int64_t n, float *y, int num_threads) {
    (void)x, (void)m, (void)k, (void)nibbles, (void)scales, (void)n, (void)y, (void)num_threads;
    return -2;
}

#endif
