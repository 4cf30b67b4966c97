/* The NEON variant of block_matmul.c (AArch64), on the same packed layout: a 64-byte line of
 * weights is four registers of 4 columns x 4 weights, each multiplied by 4 activations
 * broadcast. With the dot-product extension (ARMv8.2 and later: all Apple silicon, Graviton 2
 * and later) vdotq_s32 multiplies signed bytes and sums them in fours; without it, vmull_s8
 * multiplies into 16 bits, neighbours are added pairwise (at most 2 * 127 * 127) and widened into
 * the 32-bit sums. Each block's dot product is the same exact integer as in the other variants. */
#include <arm_neon.h>

#if defined(__ARM_FEATURE_DOTPROD)
#define VARIANT "neon-dotprod"
#else
#define VARIANT "neon"
#endif
#define ROWS 4 /* rows of x that share each loaded block of weights */
#define Q8_0_UNSIGNED 0
#define quantize_row quantize_row_portable

static inline int8x16_t broadcast4(const int8_t *at) {
    int32_t four;
    memcpy(&four, at, sizeof four);
    return vreinterpretq_s8_s32(vdupq_n_s32(four));
}

/* dots + the sums of 4 products of each column lane of w and x */
static inline int32x4_t dot4(int32x4_t dots, int8x16_t w, int8x16_t x) {
#if defined(__ARM_FEATURE_DOTPROD)
    return vdotq_s32(dots, w, x);
#else
    const int16x8_t low = vmull_s8(vget_low_s8(w), vget_low_s8(x));
    const int16x8_t high = vmull_high_s8(w, x);
    return vpadalq_s16(dots, vpaddq_s16(low, high));
#endif
}

/* Columns 4 quarter .. 4 quarter + 3 of a group for `rows` rows (constants after inlining). */
static inline __attribute__((always_inline)) void quarter_group(
    enum format format, int rows, const int8_t *qx, const float *dx, const float *sx, int64_t k,
    const uint8_t *weights, int quarter, float32x4_t *acc) {
    const int64_t blocks = k / BLOCK;
    const uint8x16_t low = vdupq_n_u8(0x0F);
    for (int r = 0; r < rows; ++r) acc[r] = vdupq_n_f32(0.0f);
    for (int64_t b = 0; b < blocks; ++b) {
        const int8_t *x = qx + b * BLOCK;
        int32x4_t dots[ROWS];
        float32x4_t d, m = vdupq_n_f32(0.0f);
        for (int r = 0; r < rows; ++r) dots[r] = vdupq_n_s32(0);
        if (format == Q4_1) {
            const uint8_t *block = weights + b * Q4_1_BYTES;
            for (int p = 0; p < 4; ++p) {
                const uint8x16_t packed = vld1q_u8(block + p * 64 + quarter * 16);
                const int8x16_t first = vreinterpretq_s8_u8(vandq_u8(packed, low));
                const int8x16_t second = vreinterpretq_s8_u8(vshrq_n_u8(packed, 4));
                for (int r = 0; r < rows; ++r) {
                    dots[r] = dot4(dots[r], first, broadcast4(x + r * k + 8 * p));
                    dots[r] = dot4(dots[r], second, broadcast4(x + r * k + 8 * p + 4));
                }
            }
            d = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(block + Q4_1_SCALES + quarter * 8)));
            m = vcvt_f32_f16(
                vreinterpret_f16_u8(vld1_u8(block + Q4_1_SCALES + 32 + quarter * 8)));
        } else {
            const uint8_t *block = weights + b * Q8_0_BYTES;
            for (int g = 0; g < 8; ++g) {
                const int8x16_t quad = vreinterpretq_s8_u8(vld1q_u8(block + g * 64 + quarter * 16));
                for (int r = 0; r < rows; ++r)
                    dots[r] = dot4(dots[r], quad, broadcast4(x + r * k + 4 * g));
            }
            d = vcvt_f32_f16(vreinterpret_f16_u8(vld1_u8(block + Q8_0_SCALES + quarter * 8)));
        }
        for (int r = 0; r < rows; ++r) {
            const float32x4_t scale = vmulq_n_f32(d, dx[r * blocks + b]);
            acc[r] = vfmaq_f32(acc[r], vcvtq_f32_s32(dots[r]), scale);
            if (format == Q4_1) acc[r] = vfmaq_n_f32(acc[r], m, sx[r * blocks + b]);
        }
    }
}

static inline __attribute__((always_inline)) void column_group(
    enum format format, int rows, const int8_t *qx, const float *dx, const float *sx, int64_t k,
    const uint8_t *weights, float *y, int64_t n, int width) {
    for (int quarter = 0; quarter < 4 && 4 * quarter < width; ++quarter) {
        float32x4_t acc[ROWS];
        quarter_group(format, rows, qx, dx, sx, k, weights, quarter, acc);
        const int columns = width - 4 * quarter < 4 ? width - 4 * quarter : 4;
        for (int r = 0; r < rows; ++r) {
            float lanes[4];
            vst1q_f32(lanes, acc[r]);
            memcpy(y + r * n + 4 * quarter, lanes, sizeof(float) * (size_t)columns);
        }
    }
}
