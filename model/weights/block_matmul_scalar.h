/* The portable variant of block_matmul.c, for any CPU and as the reference of the others: a
 * block's dot products for the 16 columns of a group as plain integer sums, then the scaling
 * every variant does. The loops run over the packed layout's bytes in order, which leaves the
 * compiler free to vectorize them for whatever CPU it targets. */

#define VARIANT "scalar"
#define ROWS 1 /* a column group's weights stay in the L1 cache from one row to the next */
#define Q8_0_UNSIGNED 0
#define quantize_row quantize_row_portable

/* The integer dot products of one block with the 16 columns of a group. */
static inline void block_dots(enum format format, const uint8_t *block, const int8_t *x,
                              int32_t dots[COLUMNS]) {
    for (int i = 0; i < COLUMNS; ++i) dots[i] = 0;
    if (format == Q4_1) {
        for (int p = 0; p < 4; ++p)
            for (int i = 0; i < COLUMNS; ++i)
                for (int j = 0; j < 4; ++j) {
                    const uint8_t byte = block[p * 64 + 4 * i + j];
                    dots[i] += (byte & 0x0F) * x[8 * p + j] + (byte >> 4) * x[8 * p + 4 + j];
                }
    } else {
        for (int g = 0; g < 8; ++g)
            for (int i = 0; i < COLUMNS; ++i)
                for (int j = 0; j < 4; ++j)
                    dots[i] += (int8_t)block[g * 64 + 4 * i + j] * x[4 * g + j];
    }
}

static void column_group(enum format format, int rows, const int8_t *qx, const float *dx,
                         const float *sx, int64_t k, const uint8_t *weights, float *y, int64_t n,
                         int width) {
    const int64_t blocks = k / BLOCK;
    const int64_t block_bytes = format == Q4_1 ? Q4_1_BYTES : Q8_0_BYTES;
    const int64_t scales = format == Q4_1 ? Q4_1_SCALES : Q8_0_SCALES;
    for (int r = 0; r < rows; ++r) {
        float acc[COLUMNS] = {0};
        for (int64_t b = 0; b < blocks; ++b) {
            const uint8_t *block = weights + b * block_bytes;
            int32_t dots[COLUMNS];
            block_dots(format, block, qx + r * k + b * BLOCK, dots);
            for (int i = 0; i < width; ++i) {
                const float d = half_to_float(block + scales + 2 * i);
                acc[i] = fmaf((float)dots[i], d * dx[r * blocks + b], acc[i]);
                if (format == Q4_1)
                    acc[i] = fmaf(half_to_float(block + scales + 32 + 2 * i),
                                  sx[r * blocks + b], acc[i]);
            }
        }
        memcpy(y + r * n, acc, sizeof(float) * (size_t)width);
    }
}
