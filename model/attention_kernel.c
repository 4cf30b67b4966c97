/* Attention of each query token over its own list of key extents in the KV pool (fp32).
 *
 * Token t attends the pool slots of extents [token_extents[t], token_extents[t + 1]), read in
 * order: that order is the token's sequence order. Every token is computed on its own, in one
 * fixed order of operations (scores, then the softmax, then the weighted sum of values, each in
 * key order), so its output depends only on its query and its keys: not on which other tokens
 * share the step, nor on where the prefix cache split its keys into nodes. That makes batched
 * and grouped decoding reproduce unbatched decoding bit for bit.
 *
 * Layouts: q and out [tokens, heads, head_dim]; keys and values [kv_heads, slots, head_dim] (one
 * layer of the pool). Query heads [h * per_kv, (h + 1) * per_kv) share kv head h.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define LANES 8 /* one AVX2 register of floats; the compiler vectorizes the fixed-lane loops */

static inline float dot(const float *a, const float *b, int64_t n) {
    float lanes[LANES] = {0};
    int64_t d = 0;
    for (; d + LANES <= n; d += LANES)
        for (int l = 0; l < LANES; ++l) lanes[l] += a[d + l] * b[d + l];
    float sum = 0.0f;
    for (int l = 0; l < LANES; ++l) sum += lanes[l];
    for (; d < n; ++d) sum += a[d] * b[d];
    return sum;
}

/* One (token, kv head): its per_kv query heads over the token's keys. scores: per_kv * length. */
static void attend_one(const float *q, const float *keys, const float *values, float *out,
                       const int64_t *starts, const int64_t *lengths, int64_t num_extents,
                       int64_t length, int64_t per_kv, int64_t head_dim, float scale,
                       float *scores) {
    int64_t j = 0;
    for (int64_t e = 0; e < num_extents; ++e)
        for (int64_t s = starts[e]; s < starts[e] + lengths[e]; ++s, ++j) {
            const float *key = keys + s * head_dim;
            for (int64_t g = 0; g < per_kv; ++g)
                scores[g * length + j] = dot(q + g * head_dim, key, head_dim) * scale;
        }
    memset(out, 0, sizeof(float) * per_kv * head_dim);
    for (int64_t g = 0; g < per_kv; ++g) {
        float *row = scores + g * length;
        float top = row[0];
        for (int64_t i = 1; i < length; ++i) top = row[i] > top ? row[i] : top;
        float total = 0.0f;
        for (int64_t i = 0; i < length; ++i) {
            row[i] = expf(row[i] - top);
            total += row[i];
        }
        const float inverse = 1.0f / total;
        for (int64_t i = 0; i < length; ++i) row[i] *= inverse;
    }
    j = 0;
    for (int64_t e = 0; e < num_extents; ++e)
        for (int64_t s = starts[e]; s < starts[e] + lengths[e]; ++s, ++j) {
            const float *value = values + s * head_dim;
            for (int64_t g = 0; g < per_kv; ++g) {
                const float p = scores[g * length + j];
                float *o = out + g * head_dim;
                for (int64_t d = 0; d < head_dim; ++d) o[d] += p * value[d];
            }
        }
}

/* Returns 0, or 1 when scratch memory could not be allocated. */
int attend_tokens(const float *q, const float *keys, const float *values, float *out,
                  const int64_t *extent_starts, const int64_t *extent_lengths,
                  const int64_t *token_extents, int64_t num_tokens, int64_t num_heads,
                  int64_t num_kv_heads, int64_t num_slots, int64_t head_dim, float scale,
                  int num_threads) {
    const int64_t per_kv = num_heads / num_kv_heads;
    int failed = 0;
    /* consecutive tasks are one token's kv heads, then the next token's: tokens that share a
       prefix are neighbours in a step, so a thread finds their keys still in its cache */
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : failed)
    for (int64_t task = 0; task < num_tokens * num_kv_heads; ++task) {
        const int64_t t = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t first = token_extents[t], count = token_extents[t + 1] - first;
        int64_t length = 0;
        for (int64_t e = 0; e < count; ++e) length += extent_lengths[first + e];
        float *scores = malloc(sizeof(float) * (size_t)(per_kv * (length > 0 ? length : 1)));
        if (scores == NULL) {
            failed = 1;
            continue;
        }
        attend_one(q + (t * num_heads + h * per_kv) * head_dim,
                   keys + h * num_slots * head_dim, values + h * num_slots * head_dim,
                   out + (t * num_heads + h * per_kv) * head_dim, extent_starts + first,
                   extent_lengths + first, count, length, per_kv, head_dim, scale, scores);
        free(scores);
    }
    return failed;
}
