/* The AVX2 variant of block_matmul.c (x86-64-v3: AVX2, FMA, F16C), on the same packed layout: a
 * 64-byte line of weights is two registers of 8 columns x 4 weights, each multiplied by 4
 * activations broadcast. _mm256_maddubs_epi16 multiplies unsigned by signed bytes and adds
 * neighbouring pairs into 16 bits, _mm256_madd_epi16 by ones adds those pairs into 32 bits.
 *   Q4_1: q (0..15) is the unsigned operand. A pair is at most 2 * 15 * 127 = 3810, so a block's
 *         8 pairs per lane add up in 16 bits (30480) before one widening.
 *   Q8_0: both signed: |qx| is the unsigned operand and q takes qx's sign (_mm256_sign_epi8), so
 *         a pair is at most 2 * 127 * 127 = 32258 and is widened at once.
 * Each block's dot product is the same exact integer as in the other variants. */
#include <immintrin.h>

#define VARIANT "avx2"
#define ROWS 4 /* rows of x that share each loaded block of weights: 16 registers in all */
#define Q8_0_UNSIGNED 0

/* quantize_row_portable in registers: the same rounding (to nearest even), the same values. */
static void quantize_row(const float *x, int64_t k, int8_t *qx, float *dx, float *sx) {
    const __m256 magnitude = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (int64_t b = 0; b < k / BLOCK; ++b) {
        __m256 v[4], top = _mm256_setzero_ps();
        for (int i = 0; i < 4; ++i) {
            v[i] = _mm256_loadu_ps(x + b * BLOCK + 8 * i);
            top = _mm256_max_ps(top, _mm256_and_ps(v[i], magnitude));
        }
        __m128 top4 = _mm_max_ps(_mm256_castps256_ps128(top), _mm256_extractf128_ps(top, 1));
        top4 = _mm_max_ps(top4, _mm_movehl_ps(top4, top4));
        top4 = _mm_max_ss(top4, _mm_movehdup_ps(top4));
        const float scale = _mm_cvtss_f32(top4) / 127.0f;
        const __m256 inverse = _mm256_set1_ps(scale != 0.0f ? 1.0f / scale : 0.0f);
        __m256i q[4];
        for (int i = 0; i < 4; ++i) q[i] = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inverse));
        const __m256i sum = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]),
                                             _mm256_add_epi32(q[2], q[3]));
        __m128i sum4 = _mm_add_epi32(_mm256_castsi256_si128(sum), _mm256_extracti128_si256(sum, 1));
        sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0x4E));
        sum4 = _mm_add_epi32(sum4, _mm_shuffle_epi32(sum4, 0xB1));
        /* packs work within 128-bit lanes: the permutation puts the bytes back in order */
        const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]),
                                                 _mm256_packs_epi32(q[2], q[3]));
        _mm256_storeu_si256((__m256i *)(qx + b * BLOCK), _mm256_permutevar8x32_epi32(bytes, order));
        dx[b] = scale;
        sx[b] = scale * (float)_mm_cvtsi128_si32(sum4);
    }
}

/* An empty asm that says it may change v: GCC must keep v's sum in a register as it goes.
   Integer addition being associative, GCC otherwise computes a block's 32 byte products first
   and adds them up as a tree, which needs more registers than there are: at four rows, 12
   registers a block went to the stack and back (24 of the Q4_1 loop's 180 instructions). */
#define IN_REGISTER(v) __asm__("" : "+x"(v))

static inline __m256i broadcast4(const int8_t *at) {
    int32_t four;
    memcpy(&four, at, sizeof four);
    return _mm256_set1_epi32(four);
}

/* Columns 8 half .. 8 half + 7 of a group for `rows` rows (constants after inlining). */
static inline __attribute__((always_inline)) void half_group(
    enum format format, int rows, const int8_t *qx, const float *dx, const float *sx, int64_t k,
    const uint8_t *weights, int half, __m256 *acc) {
    const int64_t blocks = k / BLOCK;
    const __m256i low = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
    for (int r = 0; r < rows; ++r) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < blocks; ++b) {
        const int8_t *x = qx + b * BLOCK;
        __m256i dots[ROWS];
        __m256 d, m = _mm256_setzero_ps();
        if (format == Q4_1) {
            const uint8_t *block = weights + b * Q4_1_BYTES;
            for (int r = 0; r < rows; ++r) dots[r] = _mm256_setzero_si256();
            for (int p = 0; p < 4; ++p) {
                const __m256i packed =
                    _mm256_loadu_si256((const __m256i *)(block + p * 64 + half * 32));
                const __m256i first = _mm256_and_si256(packed, low);
                const __m256i second = _mm256_and_si256(_mm256_srli_epi16(packed, 4), low);
                for (int r = 0; r < rows; ++r) {
                    const __m256i pairs = _mm256_add_epi16(
                        _mm256_maddubs_epi16(first, broadcast4(x + r * k + 8 * p)),
                        _mm256_maddubs_epi16(second, broadcast4(x + r * k + 8 * p + 4)));
                    dots[r] = _mm256_add_epi16(dots[r], pairs); /* 16-bit sums for now */
                    IN_REGISTER(dots[r]);
                }
            }
            for (int r = 0; r < rows; ++r) dots[r] = _mm256_madd_epi16(dots[r], ones);
            d = _mm256_cvtph_ps(
                _mm_loadu_si128((const __m128i *)(block + Q4_1_SCALES + half * 16)));
            m = _mm256_cvtph_ps(
                _mm_loadu_si128((const __m128i *)(block + Q4_1_SCALES + 32 + half * 16)));
        } else {
            const uint8_t *block = weights + b * Q8_0_BYTES;
            for (int r = 0; r < rows; ++r) dots[r] = _mm256_setzero_si256();
            for (int g = 0; g < 8; ++g) {
                const __m256i quad =
                    _mm256_loadu_si256((const __m256i *)(block + g * 64 + half * 32));
                for (int r = 0; r < rows; ++r) {
                    const __m256i ax = broadcast4(x + r * k + 4 * g);
                    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(ax),
                                                               _mm256_sign_epi8(quad, ax));
                    dots[r] = _mm256_add_epi32(dots[r], _mm256_madd_epi16(pairs, ones));
                    IN_REGISTER(dots[r]);
                }
            }
            d = _mm256_cvtph_ps(
                _mm_loadu_si128((const __m128i *)(block + Q8_0_SCALES + half * 16)));
        }
        for (int r = 0; r < rows; ++r) {
            const __m256 scale = _mm256_mul_ps(d, _mm256_set1_ps(dx[r * blocks + b]));
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[r]), scale, acc[r]);
            if (format == Q4_1)
                acc[r] = _mm256_fmadd_ps(m, _mm256_set1_ps(sx[r * blocks + b]), acc[r]);
        }
    }
}

static inline __attribute__((always_inline)) void column_group(
    enum format format, int rows, const int8_t *qx, const float *dx, const float *sx, int64_t k,
    const uint8_t *weights, float *y, int64_t n, int width) {
    for (int half = 0; half < 2 && 8 * half < width; ++half) {
        __m256 acc[ROWS];
        half_group(format, rows, qx, dx, sx, k, weights, half, acc);
        const int columns = width - 8 * half < 8 ? width - 8 * half : 8;
        for (int r = 0; r < rows; ++r) {
            if (columns == 8) {
                _mm256_storeu_ps(y + r * n + 8 * half, acc[r]);
            } else {
                float lanes[8];
                _mm256_storeu_ps(lanes, acc[r]);
                memcpy(y + r * n + 8 * half, lanes, sizeof(float) * (size_t)columns);
            }
        }
    }
}
