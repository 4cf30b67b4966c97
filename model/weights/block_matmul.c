/* y = x W^T for W in a GGUF's quantized blocks of 32 weights, the way llama.cpp multiplies them:
 * each row of x is rounded to 8 bits per block of 32 (scale dx = max |x| / 127), so a block's dot
 * product is exact integer arithmetic and only its scaling is floating point.
 *   Q4_1 (the linears): w = d * q + m, q in 0..15:  sum w x = d dx sum q qx + m dx sum qx
 *   Q8_0 (the LM head): w = d * q,     q in -127..127: sum w x = d dx sum q qx
 * AVX-512 VNNI multiplies 64 unsigned bytes by 64 signed bytes and sums them in fours in one
 * instruction. Q4_1's q are the unsigned operand; for Q8_0 the activations are, shifted to
 * qx + 128, and the block's dot starts from -128 sum q to take the shift back.
 *
 * Weights are repacked at load time (gguf_blocks.py) so that one instruction serves 16
 * output columns: for column group c and block b, 16 columns x 4 consecutive weights per 64
 * bytes (column lane i holds bytes 4i .. 4i + 3), in order of k.
 *   Q4_1: 4 pairs of 64 bytes; pair p holds q[32b + 8p + j] in the low nibble of byte 4i + j and
 *         q[32b + 8p + 4 + j] in its high nibble; then the 16 columns' d and their 16 m (fp16).
 *   Q8_0: 8 quads of 64 bytes; quad g holds q[32b + 4g + j] at byte 4i + j; then the 16 d
 *         (fp16) and the 16 columns' -128 sum q (int32).
 *
 * Every row of x goes through the same operations in the same order whatever the number of
 * rows and wherever it sits among them, so a token's output never depends on the batch.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32   /* weights per block, and activations per 8-bit block */
#define COLUMNS 16 /* output columns per group: one register of floats */
#define ROWS 8     /* rows of x that share each loaded block of weights */
#define Q4_1_BYTES (4 * 64 + 2 * COLUMNS * 2)             /* per column group and block */
#define Q8_0_BYTES (8 * 64 + COLUMNS * 2 + COLUMNS * 4)

enum format { Q4_1, Q8_0 };

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include <immintrin.h>

int block_matmul_available(void) { return 1; }

/* One row of x to bytes: per block of 32, qx = round-to-nearest-even(x / dx), dx = max |x| / 127,
   and sx = dx * sum qx (what a Q4_1 block's m multiplies). */
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

static inline __m512i broadcast4(const int8_t *at) {
    int32_t four;
    memcpy(&four, at, sizeof four);
    return _mm512_set1_epi32(four);
}

/* y[r][16c .. 16c + 15] for `rows` rows of quantized x (format and rows are constants after
   inlining, so the accumulators stay in registers). For Q8_0, qx holds qx + 128. */
static inline __attribute__((always_inline)) void column_group(
    enum format format, int rows, const int8_t *qx, const float *dx, const float *sx, int64_t k,
    const uint8_t *weights, float *y, int64_t n, __mmask16 mask) {
    const int64_t blocks = k / BLOCK;
    const __m512i low = _mm512_set1_epi8(0x0F);
    __m512 acc[ROWS];
    for (int r = 0; r < rows; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        const int8_t *x = qx + b * BLOCK;
        __m512i dots[ROWS];
        __m512 d, m = _mm512_setzero_ps();
        if (format == Q4_1) {
            const uint8_t *block = weights + b * Q4_1_BYTES;
            for (int r = 0; r < rows; ++r) dots[r] = _mm512_setzero_si512();
            for (int p = 0; p < 4; ++p) {
                const __m512i packed = _mm512_loadu_si512(block + p * 64);
                const __m512i first = _mm512_and_si512(packed, low);
                const __m512i second = _mm512_and_si512(_mm512_srli_epi16(packed, 4), low);
                for (int r = 0; r < rows; ++r) {
                    dots[r] = _mm512_dpbusd_epi32(dots[r], first, broadcast4(x + r * k + 8 * p));
                    dots[r] = _mm512_dpbusd_epi32(dots[r], second,
                                                  broadcast4(x + r * k + 8 * p + 4));
                }
            }
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 4 * 64)));
            m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 4 * 64 + 32)));
        } else {
            const uint8_t *block = weights + b * Q8_0_BYTES;
            const __m512i shift = _mm512_loadu_si512(block + 8 * 64 + 32);
            for (int r = 0; r < rows; ++r) dots[r] = shift;
            for (int g = 0; g < 8; ++g) {
                const __m512i quad = _mm512_loadu_si512(block + g * 64);
                for (int r = 0; r < rows; ++r)
                    dots[r] = _mm512_dpbusd_epi32(dots[r], broadcast4(x + r * k + 4 * g), quad);
            }
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + 8 * 64)));
        }
        for (int r = 0; r < rows; ++r) {
            const __m512 scale = _mm512_mul_ps(d, _mm512_set1_ps(dx[r * blocks + b]));
            acc[r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dots[r]), scale, acc[r]);
            if (format == Q4_1)
                acc[r] = _mm512_fmadd_ps(m, _mm512_set1_ps(sx[r * blocks + b]), acc[r]);
        }
    }
    for (int r = 0; r < rows; ++r) _mm512_mask_storeu_ps(y + r * n, mask, acc[r]);
}

#define ROWS_CASE(R)                                                                       \
    case R:                                                                                \
        if (format == Q4_1)                                                                \
            column_group(Q4_1, R, qx, dx, sx, k, weights, y, n, mask);                      \
        else                                                                               \
            column_group(Q8_0, R, qx, dx, sx, k, weights, y, n, mask);                      \
        break;

static void column_group_rows(enum format format, int rows, const int8_t *qx, const float *dx,
                              const float *sx, int64_t k, const uint8_t *weights, float *y,
                              int64_t n, __mmask16 mask) {
    switch (rows) {
        ROWS_CASE(1) ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
        ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
    }
}

/* x [m, k] fp32 (k a multiple of 32), weights packed for n columns (padded to a multiple of 16),
   y [m, n] fp32. Returns 0, or -1 when the scratch memory cannot be allocated. */
static int block_matmul(enum format format, const float *x, int64_t m, int64_t k,
                        const uint8_t *weights, int64_t n, float *y, int num_threads) {
    const int64_t blocks = k / BLOCK;
    const int64_t group_bytes = blocks * (format == Q4_1 ? Q4_1_BYTES : Q8_0_BYTES);
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
        for (int64_t r = 0; r < m; ++r) {
            quantize_row(x + r * k, k, qx + r * k, dx + r * blocks, sx + r * blocks);
            if (format == Q8_0) /* qx + 128 as an unsigned byte */
                for (int64_t i = 0; i < k; ++i) qx[r * k + i] ^= (int8_t)0x80;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < groups; ++c) {
            const int64_t width = n - c * COLUMNS < COLUMNS ? n - c * COLUMNS : COLUMNS;
            const __mmask16 mask = (__mmask16)((1u << width) - 1u);
            for (int64_t r = 0; r < m; r += ROWS) {
                const int rows = (int)(m - r < ROWS ? m - r : ROWS);
                column_group_rows(format, rows, qx + r * k, dx + r * blocks, sx + r * blocks, k,
                                  weights + c * group_bytes, y + r * n + c * COLUMNS, n, mask);
            }
        }
    }
    free(qx), free(dx), free(sx);
    return 0;
}

#else

int block_matmul_available(void) { return 0; }

static int block_matmul(enum format format, const float *x, int64_t m, int64_t k,
                        const uint8_t *weights, int64_t n, float *y, int num_threads) {
    (void)format, (void)x, (void)m, (void)k, (void)weights, (void)n, (void)y, (void)num_threads;
    return -2;
}

#endif

int q4_1_matmul(const float *x, int64_t m, int64_t k, const uint8_t *weights, int64_t n,
                float *y, int num_threads) {
    return block_matmul(Q4_1, x, m, k, weights, n, y, num_threads);
}

int q8_0_matmul(const float *x, int64_t m, int64_t k, const uint8_t *weights, int64_t n,
                float *y, int num_threads) {
    return block_matmul(Q8_0, x, m, k, weights, n, y, num_threads);
}
