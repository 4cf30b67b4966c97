/* The AVX-512 VNNI variant of block_matmul.c. VNNI multiplies 64 unsigned bytes by 64 signed
 * bytes and sums them in fours in one instruction (16 columns x 4 weights of the packed layout
 * against 4 activations broadcast). Q4_1's q are the unsigned operand; for Q8_0 the activations
 * are, shifted to qx + 128, and the block's dot starts from -128 sum q to take the shift back. */
#include <immintrin.h>

#define VARIANT "avx512"
#define ROWS 8 /* rows of x that share each loaded block of weights */
#define Q8_0_UNSIGNED 1

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
    const uint8_t *weights, float *y, int64_t n, int width) {
    const __mmask16 mask = (__mmask16)((1u << width) - 1u);
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
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + Q4_1_SCALES)));
            m = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + Q4_1_SCALES + 32)));
        } else {
            const uint8_t *block = weights + b * Q8_0_BYTES;
            const __m512i shift = _mm512_loadu_si512(block + Q8_0_SHIFTS);
            for (int r = 0; r < rows; ++r) dots[r] = shift;
            for (int g = 0; g < 8; ++g) {
                const __m512i quad = _mm512_loadu_si512(block + g * 64);
                for (int r = 0; r < rows; ++r)
                    dots[r] = _mm512_dpbusd_epi32(dots[r], broadcast4(x + r * k + 4 * g), quad);
            }
            d = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)(block + Q8_0_SCALES)));
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
