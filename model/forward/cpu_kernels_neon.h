/* The NEON variant of the inner loops of cpu_kernels.c (AArch64): two registers hold the eight
   lanes, lanes 0-3 and 4-7. */
#include <arm_neon.h>

#define VARIANT "neon"

/* scores[i] = scale * (q . key of slots[i]), two keys at a time (four chains of fused
   multiply-adds); pairwise adds reduce the lanes as ((x0 + x1) + (x2 + x3)) + ((x4 + x5) +
   (x6 + x7)). A last lone key is paired with itself. */
static void key_scores(const float *q, const float *keys, const int64_t *slots, int64_t length,
                       int64_t head_dim, float scale, float *scores) {
    for (int64_t i = 0; i < length; i += 2) {
        const float *a = keys + slots[i] * head_dim;
        const float *b = keys + slots[i + 1 < length ? i + 1 : i] * head_dim;
        float32x4_t a_low = vdupq_n_f32(0.0f), a_high = a_low, b_low = a_low, b_high = a_low;
        for (int64_t d = 0; d < head_dim; d += LANES) {
            const float32x4_t x_low = vld1q_f32(q + d), x_high = vld1q_f32(q + d + 4);
            a_low = vfmaq_f32(a_low, x_low, vld1q_f32(a + d));
            a_high = vfmaq_f32(a_high, x_high, vld1q_f32(a + d + 4));
            b_low = vfmaq_f32(b_low, x_low, vld1q_f32(b + d));
            b_high = vfmaq_f32(b_high, x_high, vld1q_f32(b + d + 4));
        }
        /* per key [x0 + x1, x2 + x3, x4 + x5, x6 + x7]; then both keys' two halves; then
           [a, b, a, b] */
        const float32x4_t halves = vpaddq_f32(vpaddq_f32(a_low, a_high),
                                              vpaddq_f32(b_low, b_high));
        const float32x4_t sums = vpaddq_f32(halves, halves); /* [a, b, a, b] */
        scores[i] = scale * vgetq_lane_f32(sums, 0);
        if (i + 1 < length) scores[i + 1] = scale * vgetq_lane_f32(sums, 1);
    }
}

/* out[0:head_dim] += sum over i, in order, of p[i] * value of slots[i], one fused multiply-add
   after the other: columns [d, d + 32) in eight registers, then 4 at a time. */
static void weighted_values(float *out, const float *p, const float *values,
                            const int64_t *slots, int64_t length, int64_t head_dim) {
    int64_t d = 0;
    for (; d + 32 <= head_dim; d += 32) {
        float32x4_t acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = vld1q_f32(out + d + 4 * r);
        for (int64_t i = 0; i < length; ++i) {
            const float *value = values + slots[i] * head_dim + d;
            for (int r = 0; r < 8; ++r) acc[r] = vfmaq_n_f32(acc[r], vld1q_f32(value + 4 * r), p[i]);
        }
        for (int r = 0; r < 8; ++r) vst1q_f32(out + d + 4 * r, acc[r]);
    }
    for (; d < head_dim; d += 4) {
        float32x4_t acc = vld1q_f32(out + d);
        for (int64_t i = 0; i < length; ++i)
            acc = vfmaq_n_f32(acc, vld1q_f32(values + slots[i] * head_dim + d), p[i]);
        vst1q_f32(out + d, acc);
    }
}
