/* y = x W^T for W in a GGUF's quantized blocks of 32 weights, the way llama.cpp multiplies them:
 * each row of x is rounded to 8 bits per block of 32 (scale dx = max |x| / 127), so a block's dot
 * product is exact integer arithmetic and only its scaling is floating point.
 *   Q4_1 (the linears): w = d * q + m, q in 0..15:  sum w x = d dx sum q qx + m dx sum qx
 *   Q8_0 (the LM head): w = d * q,     q in -127..127: sum w x = d dx sum q qx
 *
 * Weights are repacked at load time (gguf_blocks.py) so that one AVX-512 register of products
 * serves 16 output columns: for column group c and block b, 16 columns x 4 consecutive weights
 * per 64 bytes (column lane i holds bytes 4i .. 4i + 3), in order of k.
 *   Q4_1: 4 pairs of 64 bytes; pair p holds q[32b + 8p + j] in the low nibble of byte 4i + j and
 *         q[32b + 8p + 4 + j] in its high nibble; then the 16 columns' d and their 16 m (fp16).
 *   Q8_0: 8 quads of 64 bytes; quad g holds q[32b + 4g + j] at byte 4i + j; then the 16 d
 *         (fp16) and the 16 columns' -128 sum q (int32; only the AVX-512 variant reads it).
 *
 * One variant per instruction set, chosen by the compiler's target (model/native.py), each in its
 * header: AVX-512 VNNI, AVX2, NEON, and portable C (GROUPWISE_PORTABLE, or any other CPU). They
 * compute the same bits: a block's dot product is an exact integer in every variant, and its
 * scaling is the same float operations in the same order:
 *   acc = fma((float)dot, d * dx, acc);  then, for Q4_1,  acc = fma(m, sx, acc)
 * with sx = dx * sum qx. Every row of x goes through the same operations whatever the number of
 * rows and wherever it sits among them, so a token's output never depends on the batch.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define BLOCK 32   /* weights per block, and activations per 8-bit block */
#define COLUMNS 16 /* output columns per group */
#define Q4_1_BYTES (4 * 64 + 2 * COLUMNS * 2) /* per column group and block */
#define Q8_0_BYTES (8 * 64 + COLUMNS * 2 + COLUMNS * 4)
#define Q4_1_SCALES (4 * 64)     /* where a Q4_1 block's 16 d begin; its 16 m follow */
#define Q8_0_SCALES (8 * 64)     /* where a Q8_0 block's 16 d begin */
#define Q8_0_SHIFTS (8 * 64 + 32) /* where its 16 -128 sum q begin */

enum format { Q4_1, Q8_0 };

/* One row of x to bytes: per block of 32, qx = round-to-nearest-even(x / dx), dx = max |x| / 127,
   and sx = dx * sum qx (what a Q4_1 block's m multiplies). |qx| <= 127. */
static inline void quantize_row_portable(const float *x, int64_t k, int8_t *qx, float *dx, float *sx) {
    for (int64_t b = 0; b < k / BLOCK; ++b) {
        const float *block = x + b * BLOCK;
        float amax = 0.0f;
        for (int i = 0; i < BLOCK; ++i) amax = fabsf(block[i]) > amax ? fabsf(block[i]) : amax;
        const float scale = amax / 127.0f;
        const float inverse = scale != 0.0f ? 1.0f / scale : 0.0f;
        int32_t sum = 0;
        for (int i = 0; i < BLOCK; ++i) {
            const int32_t q = (int32_t)rintf(block[i] * inverse);
            qx[b * BLOCK + i] = (int8_t)q;
            sum += q;
        }
        dx[b] = scale;
        sx[b] = scale * (float)sum;
    }
}

/* IEEE half to float, exactly (normal, subnormal, zero, infinity, NaN). */
static inline float half_to_float(const uint8_t *at) {
    uint16_t h;
    memcpy(&h, at, sizeof h);
    const uint32_t sign = (uint32_t)(h & 0x8000) << 16, exponent = (h >> 10) & 0x1F;
    uint32_t mantissa = h & 0x3FF, bits;
    if (exponent == 0x1F) {
        bits = sign | 0x7F800000u | (mantissa << 13);
    } else if (exponent != 0) {
        bits = sign | ((exponent + 112) << 23) | (mantissa << 13);
    } else if (mantissa == 0) {
        bits = sign;
    } else { /* subnormal: normalize */
        int shift = 0;
        while (!(mantissa & 0x400)) mantissa <<= 1, ++shift;
        bits = sign | ((uint32_t)(113 - shift) << 23) | ((mantissa & 0x3FF) << 13);
    }
    float value;
    memcpy(&value, &bits, sizeof value);
    return value;
}

/* Each variant defines VARIANT (its name), ROWS (rows of x that share each loaded block of
   weights), quantize_row, Q8_0_UNSIGNED (whether its Q8_0 activations are qx + 128) and
   column_group(format, rows, qx, dx, sx, k, weights, y, n, width): y[r][0 .. width - 1] for
   rows 0 .. rows - 1 of one column group. */
#if defined(GROUPWISE_PORTABLE)
#include "block_matmul_scalar.h"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#include "block_matmul_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "block_matmul_avx2.h"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include "block_matmul_neon.h"
#else
#include "block_matmul_scalar.h"
#endif

/* column_group with its format and row count as constants, so that a variant's loops over rows
   and formats unroll into registers. */
#define ROWS_CASE(R)                                                                       \
    case R:                                                                                \
        if (format == Q4_1)                                                                \
            column_group(Q4_1, R, qx, dx, sx, k, weights, y, n, width);                     \
        else                                                                               \
            column_group(Q8_0, R, qx, dx, sx, k, weights, y, n, width);                     \
        break;

static void column_group_rows(enum format format, int rows, const int8_t *qx, const float *dx,
                              const float *sx, int64_t k, const uint8_t *weights, float *y,
                              int64_t n, int width) {
    switch (rows) {
        ROWS_CASE(1)
#if ROWS > 1
        ROWS_CASE(2) ROWS_CASE(3) ROWS_CASE(4)
#endif
#if ROWS > 4
        ROWS_CASE(5) ROWS_CASE(6) ROWS_CASE(7) ROWS_CASE(8)
#endif
    }
}

/* The variant this library was built as: avx512, avx2, neon-dotprod, neon or scalar. */
const char *block_matmul_variant(void) { return VARIANT; }

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
            if (format == Q8_0 && Q8_0_UNSIGNED) /* qx + 128 as an unsigned byte */
                for (int64_t i = 0; i < k; ++i) qx[r * k + i] ^= (int8_t)0x80;
        }
#pragma omp for schedule(static)
        for (int64_t c = 0; c < groups; ++c) {
            const int width = (int)(n - c * COLUMNS < COLUMNS ? n - c * COLUMNS : COLUMNS);
            for (int64_t r = 0; r < m; r += ROWS) {
                const int rows = (int)(m - r < ROWS ? m - r : ROWS);
                column_group_rows(format, rows, qx + r * k, dx + r * blocks, sx + r * blocks, k,
                                  weights + c * group_bytes, y + r * n + c * COLUMNS, n, width);
            }
        }
    }
    free(qx), free(dx), free(sx);
    return 0;
}

int q4_1_matmul(const float *x, int64_t m, int64_t k, const uint8_t *weights, int64_t n,
                float *y, int num_threads) {
    return block_matmul(Q4_1, x, m, k, weights, n, y, num_threads);
}

int q8_0_matmul(const float *x, int64_t m, int64_t k, const uint8_t *weights, int64_t n,
                float *y, int num_threads) {
    return block_matmul(Q8_0, x, m, k, weights, n, y, num_threads);
}
