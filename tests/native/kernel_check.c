/* Runs every CPU kernel on fixed pseudo-random inputs and prints one line per case: its name,
 * its shape and a hash of its output bytes. Built once per instruction-set variant (the
 * compiler's target picks it, as for the libraries), natively or for AArch64 under qemu; every
 * variant must print the same lines as the portable build (tests/test_kernel_variants.py).
 *
 *     cc -O3 -ffp-contract=off -std=gnu11 [target flags] tests/native/kernel_check.c -lm
 *
 * The weights are random bytes in the packed layout of block_matmul.c (the layout itself is
 * checked against the GGUF's blocks in Python), with q in -127..127 for Q8_0 as llama.cpp's
 * quantizer makes them. */
#include "../../model/forward/cpu_kernels.c"
#undef VARIANT /* each source names its own */
#include "../../model/weights/block_matmul.c"

#include <stdio.h>

static uint64_t state = 0x9E3779B97F4A7C15u;

static uint64_t next(void) { /* splitmix64 */
    uint64_t z = (state += 0x9E3779B97F4A7C15u);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9u;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBu;
    return z ^ (z >> 31);
}

static float uniform(float low, float high) { /* 24 random bits: exact in a float */
    return low + (high - low) * (float)(next() >> 40) / 16777216.0f;
}

static void fill(float *x, int64_t count, float low, float high) {
    for (int64_t i = 0; i < count; ++i) x[i] = uniform(low, high);
}

static uint16_t random_half(void) { /* positive, 2^-10 .. 2^-2, any mantissa */
    return (uint16_t)(((5 + next() % 9) << 10) | (next() & 0x3FF));
}

static void print_hash(const char *name, int64_t a, int64_t b, int64_t c, const void *bytes,
                       size_t size) {
    uint64_t hash = 0xCBF29CE484222325u; /* FNV-1a */
    for (size_t i = 0; i < size; ++i) hash = (hash ^ ((const uint8_t *)bytes)[i]) * 0x100000001B3u;
    printf("%s %lld %lld %lld %016llx\n", name, (long long)a, (long long)b, (long long)c,
           (unsigned long long)hash);
}

static void check_matmul(enum format format, int64_t m, int64_t k, int64_t n) {
    const int64_t blocks = k / BLOCK, groups = (n + COLUMNS - 1) / COLUMNS;
    const int64_t block_bytes = format == Q4_1 ? Q4_1_BYTES : Q8_0_BYTES;
    uint8_t *weights = malloc((size_t)(groups * blocks * block_bytes));
    for (int64_t g = 0; g < groups * blocks; ++g) {
        uint8_t *block = weights + g * block_bytes;
        if (format == Q4_1) {
            for (int i = 0; i < Q4_1_SCALES; ++i) block[i] = (uint8_t)next();
            for (int i = 0; i < 2 * COLUMNS; ++i) { /* d, then m of either sign */
                const uint16_t half = random_half() | (i >= COLUMNS && next() % 2 ? 0x8000 : 0);
                memcpy(block + Q4_1_SCALES + 2 * i, &half, 2);
            }
        } else {
            for (int i = 0; i < Q8_0_SCALES; ++i) block[i] = (uint8_t)(int8_t)(next() % 255 - 127);
            for (int i = 0; i < COLUMNS; ++i) {
                const uint16_t half = random_half();
                memcpy(block + Q8_0_SCALES + 2 * i, &half, 2);
                int32_t sum = 0;
                for (int q = 0; q < BLOCK; ++q) sum += (int8_t)block[(q / 4) * 64 + 4 * i + q % 4];
                const int32_t shift = -128 * sum;
                memcpy(block + Q8_0_SHIFTS + 4 * i, &shift, 4);
            }
        }
    }
    float *x = malloc(sizeof(float) * (size_t)(m * k)), *y = malloc(sizeof(float) * (size_t)(m * n));
    fill(x, m * k, -4.0f, 4.0f);
    memset(x + (m / 2) * k, 0, sizeof(float) * BLOCK); /* a block of zeros: scale 0 */
    if (format == Q4_1) q4_1_matmul(x, m, k, weights, n, y, 2);
    else q8_0_matmul(x, m, k, weights, n, y, 2);
    print_hash(format == Q4_1 ? "q4_1_matmul" : "q8_0_matmul", m, k, n, y,
               sizeof(float) * (size_t)(m * n));
    free(weights), free(x), free(y);
}

/* Decode rows and prefill chunks over extents of a pool, as an engine step lays them out. */
static void check_attention(int64_t heads, int64_t kv_heads, int64_t head_dim) {
    const int64_t slots = 700;
    /* extents: a shared prefix in two nodes, a long one, a row's own run, a chunk's run */
    const int64_t starts[] = {0, 40, 100, 500, 600}, lengths[] = {40, 25, 300, 7, 1};
    /* spans: two decode rows on the shared prefix (one with its own run), one on the long
       extent, a 13-token chunk continuing the prefix, a 1-token chunk on a fresh run */
    const int64_t span_extents[] = {0, 2, 5, 6, 8, 9};
    const int64_t extent_of_span[] = {0, 1, 0, 1, 3, 2, 0, 1, 4};
    const int64_t span_tokens[] = {0, 1, 2, 3, 16, 17};
    int64_t extent_starts[9], extent_lengths[9];
    for (int e = 0; e < 9; ++e) {
        extent_starts[e] = starts[extent_of_span[e]];
        extent_lengths[e] = lengths[extent_of_span[e]];
    }
    const int64_t tokens = span_tokens[5];
    float *q = malloc(sizeof(float) * (size_t)(tokens * heads * head_dim));
    float *keys = malloc(sizeof(float) * (size_t)(kv_heads * slots * head_dim));
    float *values = malloc(sizeof(float) * (size_t)(kv_heads * slots * head_dim));
    float *out = malloc(sizeof(float) * (size_t)(tokens * heads * head_dim));
    fill(q, tokens * heads * head_dim, -2.0f, 2.0f);
    fill(keys, kv_heads * slots * head_dim, -2.0f, 2.0f);
    fill(values, kv_heads * slots * head_dim, -1.0f, 1.0f);
    attend_spans(q, keys, values, out, extent_starts, extent_lengths, span_extents, span_tokens,
                 5, heads, kv_heads, slots, head_dim, 1.0f / sqrtf((float)head_dim), 2);
    print_hash("attend_spans", heads, kv_heads, head_dim, out,
               sizeof(float) * (size_t)(tokens * heads * head_dim));
    free(q), free(keys), free(values), free(out);
}

static void check_norm(int64_t tokens, int64_t dim) {
    float *x = malloc(sizeof(float) * (size_t)(tokens * dim)), *weight = malloc(sizeof(float) * (size_t)dim);
    float *out = malloc(sizeof(float) * (size_t)(tokens * dim));
    fill(x, tokens * dim, -3.0f, 3.0f);
    fill(weight, dim, 0.5f, 1.5f);
    rms_norm(x, weight, out, tokens, dim, 1e-5f, 2);
    print_hash("rms_norm", tokens, dim, 0, out, sizeof(float) * (size_t)(tokens * dim));
    free(x), free(weight), free(out);
}

static void check_rotary(int64_t tokens, int64_t heads, int64_t kv_heads, int64_t head_dim) {
    const int64_t width = (heads + 2 * kv_heads) * head_dim, slots = 211; /* prime */
    float *qkv = malloc(sizeof(float) * (size_t)(tokens * width));
    float *cos = malloc(sizeof(float) * (size_t)(tokens * head_dim));
    float *sin = malloc(sizeof(float) * (size_t)(tokens * head_dim));
    float *q = malloc(sizeof(float) * (size_t)(tokens * heads * head_dim));
    float *pool = calloc((size_t)(2 * kv_heads * slots * head_dim), sizeof(float));
    int64_t *where = malloc(sizeof(int64_t) * (size_t)tokens);
    fill(qkv, tokens * width, -2.0f, 2.0f);
    fill(cos, tokens * head_dim, -1.0f, 1.0f);
    fill(sin, tokens * head_dim, -1.0f, 1.0f);
    for (int64_t t = 0; t < tokens; ++t) where[t] = (7 * t + 2) % slots; /* distinct */
    rotate_and_store(qkv, qkv + heads * head_dim, qkv + (heads + kv_heads) * head_dim, width, cos,
                     sin, q, pool, pool + kv_heads * slots * head_dim, where, tokens, heads,
                     kv_heads, slots, head_dim, 2);
    print_hash("rotate_queries", tokens, heads, head_dim, q,
               sizeof(float) * (size_t)(tokens * heads * head_dim));
    print_hash("rotate_pool", tokens, kv_heads, head_dim, pool,
               sizeof(float) * (size_t)(2 * kv_heads * slots * head_dim));
    free(qkv), free(cos), free(sin), free(q), free(pool), free(where);
}

static void check_silu(int64_t tokens, int64_t width) {
    float *gate_up = malloc(sizeof(float) * (size_t)(tokens * 2 * width));
    float *out = malloc(sizeof(float) * (size_t)(tokens * width));
    fill(gate_up, tokens * 2 * width, -12.0f, 12.0f);
    silu_and_mul(gate_up, 2 * width, gate_up + width, 2 * width, out, tokens, width, 2);
    print_hash("silu_and_mul", tokens, width, 0, out, sizeof(float) * (size_t)(tokens * width));
    free(gate_up), free(out);
}

int main(void) {
    printf("variants %s %s\n", block_matmul_variant(), cpu_kernels_variant());
    const int64_t rows[] = {1, 2, 4, 5, 8, 9, 21}, widths[] = {32, 96, 576};
    const int64_t columns[] = {3, 16, 40, 77};
    for (int f = 0; f < 2; ++f)
        for (int i = 0; i < 7; ++i)
            for (int j = 0; j < 3; ++j)
                for (int c = 0; c < 4; ++c) check_matmul(f == 0 ? Q4_1 : Q8_0, rows[i], widths[j], columns[c]);
    check_attention(9, 3, 64); /* SmolLM2's heads */
    check_attention(14, 2, 16);
    check_attention(4, 4, 40); /* a width the 8-register loop leaves a remainder of */
    check_norm(70, 576);
    check_norm(3, 40);
    check_rotary(70, 9, 3, 64);
    check_rotary(5, 4, 2, 24);
    check_silu(70, 1536); /* SmolLM2's MLP width */
    check_silu(3, 40);
    return 0;
}
