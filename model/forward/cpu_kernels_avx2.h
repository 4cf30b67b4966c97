/* The AVX2 variant of the inner loops of cpu_kernels.c: a register holds the eight lanes. */
#include <immintrin.h>

#define VARIANT "avx2"

/* scores[i] = scale * (q . key of slots[i]), four keys at a time: four independent chains of
   FMAs run side by side, and one horizontal reduction serves all four. A last group of fewer
   than four repeats its last key, so every score is computed by the same instructions. */
static void key_scores(const float *q, const float *keys, const int64_t *slots, int64_t length,
                       int64_t head_dim, float scale, float *scores) {
    for (int64_t i = 0; i < length; i += 4) {
        const float *key[4];
        for (int r = 0; r < 4; ++r)
            key[r] = keys + slots[i + r < length ? i + r : length - 1] * head_dim;
        __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(),
                         _mm256_setzero_ps()};
        for (int64_t d = 0; d < head_dim; d += LANES) {
            const __m256 x = _mm256_loadu_ps(q + d);
            for (int r = 0; r < 4; ++r)
                acc[r] = _mm256_fmadd_ps(x, _mm256_loadu_ps(key[r] + d), acc[r]);
        }
        /* each score: ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)) of its lanes */
        const __m256 pairs = _mm256_hadd_ps(_mm256_hadd_ps(acc[0], acc[1]),
                                            _mm256_hadd_ps(acc[2], acc[3]));
        const __m128 sums = _mm_add_ps(_mm256_castps256_ps128(pairs),
                                       _mm256_extractf128_ps(pairs, 1));
        float four[4];
        _mm_storeu_ps(four, _mm_mul_ps(sums, _mm_set1_ps(scale)));
        for (int r = 0; r < 4 && i + r < length; ++r) scores[i + r] = four[r];
    }
}

/* out[0:head_dim] += sum over i, in order, of p[i] * value of slots[i], one fused multiply-add
   after the other: columns [d, d + 64) in eight registers (eight independent chains keep both
   FMA units busy), then 8 at a time. A sum split over several calls rounds as one call. */
static void weighted_values(float *out, const float *p, const float *values,
                            const int64_t *slots, int64_t length, int64_t head_dim) {
    int64_t d = 0;
    for (; d + 8 * LANES <= head_dim; d += 8 * LANES) {
        __m256 acc[8];
        for (int r = 0; r < 8; ++r) acc[r] = _mm256_loadu_ps(out + d + r * LANES);
        for (int64_t i = 0; i < length; ++i) {
            const float *value = values + slots[i] * head_dim + d;
            const __m256 weight = _mm256_set1_ps(p[i]);
            for (int r = 0; r < 8; ++r)
                acc[r] = _mm256_fmadd_ps(weight, _mm256_loadu_ps(value + r * LANES), acc[r]);
        }
        for (int r = 0; r < 8; ++r) _mm256_storeu_ps(out + d + r * LANES, acc[r]);
    }
    for (; d < head_dim; d += LANES) {
        __m256 acc = _mm256_loadu_ps(out + d);
        for (int64_t i = 0; i < length; ++i)
            acc = _mm256_fmadd_ps(_mm256_set1_ps(p[i]),
                                  _mm256_loadu_ps(values + slots[i] * head_dim + d), acc);
        _mm256_storeu_ps(out + d, acc);
    }
}
