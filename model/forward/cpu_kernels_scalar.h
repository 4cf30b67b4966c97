/* The portable variant of the inner loops of cpu_kernels.c, for any CPU and as the reference of
   the others: the eight lanes as an array. */

#define VARIANT "scalar"

static void key_scores(const float *q, const float *keys, const int64_t *slots, int64_t length,
                       int64_t head_dim, float scale, float *scores) {
    for (int64_t i = 0; i < length; ++i) {
        const float *key = keys + slots[i] * head_dim;
        float lanes[LANES] = {0};
        for (int64_t d = 0; d < head_dim; d += LANES)
            for (int l = 0; l < LANES; ++l) lanes[l] = fmaf(q[d + l], key[d + l], lanes[l]);
        scores[i] = scale * (((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) +
                             ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7])));
    }
}

static void weighted_values(float *out, const float *p, const float *values,
                            const int64_t *slots, int64_t length, int64_t head_dim) {
    for (int64_t i = 0; i < length; ++i)
        for (int64_t d = 0; d < head_dim; ++d)
            out[d] = fmaf(p[i], values[slots[i] * head_dim + d], out[d]);
}
