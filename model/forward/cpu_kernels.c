/* The CPU kernels of one decoder step (fp32): attention over the KV pool, RMS norm, and rotary
 * embedding fused with writing keys and values to the pool. Each replaces a handful of torch
 * calls whose per-call cost, not their arithmetic, dominated a decode step.
 *
 * attend_spans: attention of each query token over its own list of key extents in the pool,
 * read in order: that order is the token's sequence order. The step's tokens come in spans
 * (consecutive tokens of one sequence: a decode row, a prefill chunk). Every token is computed on its own, in one
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

#define LANES 8 /* lanes of a dot product: one AVX2 register of floats, two NEON ones */

/* Multiply-adds are explicit (fmaf and the FMA intrinsics) and the library is built with
   -ffp-contract=off, so the compiler never decides on its own where to fuse: every variant, and
   a vectorized loop and its scalar remainder, round the same way, and every token goes through
   exactly the same arithmetic. head_dim is a multiple of 8 (the caller checks).

   Each variant (model/native.py builds the one for the CPU) defines VARIANT and the two inner
   loops of attention, key_scores and weighted_values, which compute the same bits in all of
   them: a dot product in eight lanes (element d in lane d % 8), the lanes added as
   ((x0 + x1) + (x2 + x3)) + ((x4 + x5) + (x6 + x7)); a weighted sum one fused multiply-add
   after the other, in key order. The rest of this file is portable C. */
#if defined(GROUPWISE_PORTABLE)
#include "cpu_kernels_scalar.h"
#elif defined(__AVX2__) && defined(__FMA__)
#include "cpu_kernels_avx2.h"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include "cpu_kernels_neon.h"
#else
#include "cpu_kernels_scalar.h"
#endif

/* The variant this library was built as: avx2, neon or scalar. */
const char *cpu_kernels_variant(void) { return VARIANT; }

/* e^x for -87 <= x <= 0: x = n ln2 + r, e^x = 2^n e^r, e^r by Cephes' expf polynomial (about
   1 ulp). Elementwise, without libm's expf (which does not vectorize), so that a loop of it
   vectorizes; the loop that clamps x to -87 is kept apart, as GCC turns a clamp inside this
   one into a branch and leaves the loop scalar. */
static inline float exp_clamped(float x) {
    const float n = rintf(x * 1.44269504088896341f);
    float r = fmaf(n, -0.693359375f, x);
    r = fmaf(n, 2.12194440e-4f, r);
    float p = 1.9875691500e-4f;
    p = fmaf(p, r, 1.3981999507e-3f);
    p = fmaf(p, r, 8.3334519073e-3f);
    p = fmaf(p, r, 4.1665795894e-2f);
    p = fmaf(p, r, 1.6666665459e-1f);
    p = fmaf(p, r, 5.0000001201e-1f);
    p = fmaf(p, r * r, r) + 1.0f;
    union { int32_t i; float f; } scale = {.i = ((int32_t)n + 127) << 23};
    return p * scale.f;
}

/* x[i] = e^(x[i] - shift) for x[i] <= shift; e^-87 ~ 1.6e-38 stands for anything smaller, which
   keeps 2^n a normal float. */
static void exp_shifted(float *x, int64_t length, float shift) {
    for (int64_t i = 0; i < length; ++i) {
        const float y = x[i] - shift;
        x[i] = y < -87.0f ? -87.0f : y;
    }
    for (int64_t i = 0; i < length; ++i) x[i] = exp_clamped(x[i]);
}

#define TILE 8         /* consecutive tokens of one sequence computed together */
#define KEY_BLOCK 64   /* keys read from memory once for all of a tile's tokens and heads */

/* The softmax of one score row, in place: the same order of operations for every row. The max
   and the sum run in eight lanes (element i in lane i % 8), so they vectorize; the max is exact
   in any order, and each lane of the sum adds its elements in index order. */
static void softmax(float *row, int64_t length) {
    float top[LANES], lanes[LANES] = {0};
    for (int l = 0; l < LANES; ++l) top[l] = row[0];
    int64_t i = 0;
    for (; i + LANES <= length; i += LANES)
        for (int l = 0; l < LANES; ++l) top[l] = row[i + l] > top[l] ? row[i + l] : top[l];
    for (; i < length; ++i) top[i % LANES] = row[i] > top[i % LANES] ? row[i] : top[i % LANES];
    float most = top[0];
    for (int l = 1; l < LANES; ++l) most = top[l] > most ? top[l] : most;
    exp_shifted(row, length, most);
    for (i = 0; i + LANES <= length; i += LANES)
        for (int l = 0; l < LANES; ++l) lanes[l] += row[i + l];
    for (; i < length; ++i) lanes[i % LANES] += row[i];
    const float total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
                        ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
    const float inverse = 1.0f / total;
    for (i = 0; i < length; ++i) row[i] *= inverse;
}

/* One tile (m consecutive tokens of one sequence; token i attends the first first_length + i
   keys of `slots`) and one kv head: its per_kv query heads. Keys and values are walked in
   blocks, each block serving every token and head of the tile while it is in cache; every
   score and every output is still computed by the same operations, in the same order, as for a
   token alone. scores: m * per_kv * (first_length + m - 1) floats of scratch. */
static void attend_tile(const float *q, int64_t q_stride, float *out, int64_t m,
                        const float *keys, const float *values, const int64_t *slots,
                        int64_t first_length, int64_t per_kv, int64_t head_dim, float scale,
                        float *scores) {
    const int64_t width = first_length + m - 1;
    for (int64_t k = 0; k < width; k += KEY_BLOCK)
        for (int64_t i = 0; i < m; ++i) {
            const int64_t n = first_length + i - k < KEY_BLOCK ? first_length + i - k : KEY_BLOCK;
            for (int64_t g = 0; n > 0 && g < per_kv; ++g)
                key_scores(q + i * q_stride + g * head_dim, keys, slots + k, n, head_dim, scale,
                           scores + (i * per_kv + g) * width + k);
        }
    for (int64_t i = 0; i < m; ++i) {
        memset(out + i * q_stride, 0, sizeof(float) * per_kv * head_dim);
        for (int64_t g = 0; g < per_kv; ++g)
            softmax(scores + (i * per_kv + g) * width, first_length + i);
    }
    for (int64_t k = 0; k < width; k += KEY_BLOCK)
        for (int64_t i = 0; i < m; ++i) {
            const int64_t n = first_length + i - k < KEY_BLOCK ? first_length + i - k : KEY_BLOCK;
            for (int64_t g = 0; n > 0 && g < per_kv; ++g)
                weighted_values(out + i * q_stride + g * head_dim,
                                scores + (i * per_kv + g) * width + k, values, slots + k, n,
                                head_dim);
        }
}

/* Returns 0, or 1 when scratch memory could not be allocated. Span s is the tokens
   span_tokens[s] .. span_tokens[s + 1] - 1 of one sequence; its first token attends the slots of
   extents span_extents[s] .. span_extents[s + 1] - 1 in order, and each next token one slot more
   of the last extent (its own new token). */
int attend_spans(const float *q, const float *keys, const float *values, float *out,
                 const int64_t *extent_starts, const int64_t *extent_lengths,
                 const int64_t *span_extents, const int64_t *span_tokens, int64_t num_spans,
                 int64_t num_heads, int64_t num_kv_heads, int64_t num_slots, int64_t head_dim,
                 float scale, int num_threads) {
    const int64_t per_kv = num_heads / num_kv_heads, num_tokens = span_tokens[num_spans];
    /* a tile is up to TILE consecutive tokens of one span: its first token and its span */
    int64_t *tiles = malloc(sizeof(int64_t) * 2 * (size_t)num_tokens);
    if (tiles == NULL) return 1;
    int64_t num_tiles = 0;
    for (int64_t s = 0; s < num_spans; ++s)
        for (int64_t t = span_tokens[s]; t < span_tokens[s + 1]; t += TILE, ++num_tiles) {
            tiles[2 * num_tiles] = t;
            tiles[2 * num_tiles + 1] = s;
        }
    int failed = 0;
    /* consecutive tasks are one tile's kv heads, then the next tile's: tokens that share a
       prefix are neighbours in a step, so a thread finds their keys still in its cache */
#pragma omp parallel for num_threads(num_threads) schedule(static) reduction(| : failed)
    for (int64_t task = 0; task < num_tiles * num_kv_heads; ++task) {
        const int64_t tile = task / num_kv_heads, h = task % num_kv_heads;
        const int64_t t = tiles[2 * tile], span = tiles[2 * tile + 1];
        const int64_t end = span_tokens[span + 1], m = end - t < TILE ? end - t : TILE;
        const int64_t first = span_extents[span], last = span_extents[span + 1] - 1;
        /* the tile's last token attends the most keys: all the slots gathered here */
        const int64_t grown = t + m - 1 - span_tokens[span];
        int64_t width = grown;
        for (int64_t e = first; e <= last; ++e) width += extent_lengths[e];
        int64_t *slots = malloc((sizeof(int64_t) + sizeof(float) * per_kv * m) * (size_t)width);
        if (slots == NULL) {
            failed = 1;
            continue;
        }
        int64_t j = 0;
        for (int64_t e = first; e <= last; ++e) {
            const int64_t length = extent_lengths[e] + (e == last ? grown : 0);
            for (int64_t s = extent_starts[e]; s < extent_starts[e] + length; ++s) slots[j++] = s;
        }
        attend_tile(q + (t * num_heads + h * per_kv) * head_dim, num_heads * head_dim,
                    out + (t * num_heads + h * per_kv) * head_dim, m,
                    keys + h * num_slots * head_dim, values + h * num_slots * head_dim, slots,
                    width - m + 1, per_kv, head_dim, scale, (float *)(slots + width));
        free(slots);
    }
    free(tiles);
    return failed;
}

/* out[t] = weight * (x[t] / sqrt(mean(x[t]^2) + eps)), as transformers' LlamaRMSNorm. */
void rms_norm(const float *x, const float *weight, float *out, int64_t num_tokens, int64_t dim,
              float eps, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_tokens >= 64)
    for (int64_t t = 0; t < num_tokens; ++t) {
        const float *row = x + t * dim;
        float lanes[LANES] = {0}; /* lane i % 8, as every other reduction here */
        for (int64_t i = 0; i < dim; ++i) lanes[i % LANES] = fmaf(row[i], row[i], lanes[i % LANES]);
        const float total = ((lanes[0] + lanes[4]) + (lanes[1] + lanes[5])) +
                            ((lanes[2] + lanes[6]) + (lanes[3] + lanes[7]));
        const float inverse = 1.0f / sqrtf(total / (float)dim + eps);
        for (int64_t i = 0; i < dim; ++i) out[t * dim + i] = weight[i] * (row[i] * inverse);
    }
}

/* Rotate-half rotary embedding of one head, as transformers' apply_rotary_pos_emb:
   out = x * cos + cat(-x[half:], x[:half]) * sin, each product rounded on its own. */
static inline void rotate(const float *x, const float *cos, const float *sin, float *out,
                          int64_t head_dim) {
    const int64_t half = head_dim / 2;
    for (int64_t i = 0; i < half; ++i) {
        out[i] = x[i] * cos[i] + (-x[i + half]) * sin[i];
        out[i + half] = x[i + half] * cos[i + half] + x[i] * sin[i + half];
    }
}

/* For each token t: q_out[t] = its rotated query heads; its rotated key heads and its value
   heads go to pool slot slots[t] of keys / values [kv_heads, num_slots, head_dim]. q, k and v
   are rows of `stride` floats (they may be column ranges of one fused projection). */
void rotate_and_store(const float *q, const float *k, const float *v, int64_t stride,
                      const float *cos, const float *sin, float *q_out, float *keys,
                      float *values, const int64_t *slots, int64_t num_tokens, int64_t num_heads,
                      int64_t num_kv_heads, int64_t num_slots, int64_t head_dim,
                      int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_tokens >= 64)
    for (int64_t t = 0; t < num_tokens; ++t) {
        const float *c = cos + t * head_dim, *s = sin + t * head_dim;
        for (int64_t h = 0; h < num_heads; ++h)
            rotate(q + t * stride + h * head_dim, c, s,
                   q_out + (t * num_heads + h) * head_dim, head_dim);
        for (int64_t h = 0; h < num_kv_heads; ++h) {
            const int64_t slot = (h * num_slots + slots[t]) * head_dim;
            rotate(k + t * stride + h * head_dim, c, s, keys + slot, head_dim);
            memcpy(values + slot, v + t * stride + h * head_dim, sizeof(float) * head_dim);
        }
    }
}

/* e^x for -104 <= x <= 104 as SLEEF's expf (its 1-ulp version, with fused multiply-adds),
   which torch's vectorized CPU kernels use: so the SiLU below computes exactly torch's silu on
   its AVX2, AVX-512 and NEON builds. Past 88.7 it is infinity, below -103.3 zero. (The
   softmax keeps exp_clamped: another exponential there would change every answer's bits.) */
static inline float exp_sleef(float x) {
    const float q = rintf(x * 1.44269504088896340736f);
    float s = fmaf(q, -0.693145751953125f, x);
    s = fmaf(q, -1.428606765330187045e-06f, s);
    float u = 0.000198527617612853646278381f;
    u = fmaf(u, s, 0.00139304355252534151077271f);
    u = fmaf(u, s, 0.00833336077630519866943359f);
    u = fmaf(u, s, 0.0416664853692054748535156f);
    u = fmaf(u, s, 0.166666671633720397949219f);
    u = fmaf(u, s, 0.5f);
    u = 1.0f + fmaf(s * s, u, s);
    const int32_t n = (int32_t)q, half = n >> 1; /* 2^n in two factors, each a normal float */
    union { int32_t i; float f; } low = {.i = (half + 127) << 23};
    union { int32_t i; float f; } high = {.i = (n - half + 127) << 23};
    return (u * low.f) * high.f;
}

/* out[t] = silu(gate[t]) * up[t] for each token's `width` gate and up values, silu(x) =
   x / (1 + e^-x) as torch computes it; rows of gate and up are gate_stride and up_stride floats
   apart (two halves of one fused projection, or two). Beyond +-104, where SLEEF returns zero or
   infinity, -x is clamped: e^-x is then below 2^-24 (1 + it is 1) or infinite, as there. Three
   loops, since GCC vectorizes each alone but not the clamp inside the exponential's. */
void silu_and_mul(const float *gate, int64_t gate_stride, const float *up, int64_t up_stride,
                  float *out, int64_t num_tokens, int64_t width, int num_threads) {
#pragma omp parallel for num_threads(num_threads) schedule(static) if (num_tokens * width >= 16384)
    for (int64_t t = 0; t < num_tokens; ++t) {
        const float *g = gate + t * gate_stride, *u = up + t * up_stride;
        float *e = out + t * width;
        for (int64_t i = 0; i < width; ++i) {
            const float x = -g[i] < -104.0f ? -104.0f : -g[i];
            e[i] = x > 104.0f ? 104.0f : x;
        }
        for (int64_t i = 0; i < width; ++i) e[i] = exp_sleef(e[i]);
        for (int64_t i = 0; i < width; ++i) e[i] = (g[i] / (1.0f + e[i])) * u[i];
    }
}

/* y [m, n] = x [m, k] W^T for W in packed blocks: block_matmul.c's q4_1_matmul, from the other
   library (its address comes from Python), so that one build of it serves both. */
typedef int (*block_product)(const float *x, int64_t m, int64_t k, const uint8_t *weights,
                             int64_t n, float *y, int num_threads);

/* One decoder layer's weights: its norms' and, for each linear, the packed blocks and the bias
   (NULL for none). Ten addresses, as Python lays them out. */
struct layer_weights {
    const float *input_norm, *post_norm;
    const uint8_t *qkv;
    const float *qkv_bias;
    const uint8_t *o;
    const float *o_bias;
    const uint8_t *gate_up;
    const float *gate_up_bias;
    const uint8_t *down;
    const float *down_bias;
};

static int project(block_product product, const float *x, int64_t m, int64_t k,
                   const uint8_t *weights, const float *bias, int64_t n, float *y,
                   int num_threads) {
    if (product(x, m, k, weights, n, y, num_threads)) return 1;
    if (bias != NULL)
        for (int64_t t = 0; t < m; ++t)
            for (int64_t j = 0; j < n; ++j) y[t * n + j] += bias[j];
    return 0;
}

static void add(float *x, const float *delta, int64_t count) {
    for (int64_t i = 0; i < count; ++i) x[i] += delta[i];
}

/* Every layer of a decoder step, each op as its own function computes it when called alone
   (the same bits as the step op by op): per layer, x += delta (from the second layer on), norm,
   the q / k / v projection, rotary + store into the pool, attention, the output projection,
   x += it, norm, the gate / up projection, silu(gate) * up, the down projection into delta.
   x [tokens, hidden] is the residual stream, in and out; delta [tokens, hidden] gets the last
   layer's output (not yet added). pool [layers, 2, kv_heads, num_slots, head_dim]; cos / sin
   [tokens, head_dim]; slots and the attention extents as rotate_and_store and attend_spans take
   them. Returns 0, or 1 when scratch memory could not be allocated. */
int decoder_layers(float *x, float *delta, int64_t num_tokens,
                   const struct layer_weights *layers, int64_t num_layers, int64_t hidden,
                   int64_t intermediate, float eps, block_product product, float *pool,
                   const float *cos, const float *sin, const int64_t *slots,
                   const int64_t *extent_starts, const int64_t *extent_lengths,
                   const int64_t *span_extents, const int64_t *span_tokens, int64_t num_spans,
                   int64_t num_heads, int64_t num_kv_heads, int64_t num_slots, int64_t head_dim,
                   float scale, int num_threads) {
    const int64_t t = num_tokens, attention_width = num_heads * head_dim;
    const int64_t qkv_width = (num_heads + 2 * num_kv_heads) * head_dim;
    const int64_t layer_floats = num_kv_heads * num_slots * head_dim; /* keys, or values */
    float *h = malloc(sizeof(float) * (size_t)(t * hidden));
    float *qkv = malloc(sizeof(float) * (size_t)(t * qkv_width));
    float *q = malloc(sizeof(float) * (size_t)(t * attention_width));
    float *attended = malloc(sizeof(float) * (size_t)(t * attention_width));
    float *gate_up = malloc(sizeof(float) * (size_t)(t * 2 * intermediate));
    float *gated = malloc(sizeof(float) * (size_t)(t * intermediate));
    int failed = h == NULL || qkv == NULL || q == NULL || attended == NULL || gate_up == NULL ||
                 gated == NULL;
    for (int64_t l = 0; l < num_layers && !failed; ++l) {
        const struct layer_weights *w = layers + l;
        float *keys = pool + 2 * l * layer_floats, *values = keys + layer_floats;
        if (l > 0) add(x, delta, t * hidden);
        rms_norm(x, w->input_norm, h, t, hidden, eps, num_threads);
        failed = project(product, h, t, hidden, w->qkv, w->qkv_bias, qkv_width, qkv,
                         num_threads);
        if (failed) break;
        const float *k = qkv + attention_width, *v = k + num_kv_heads * head_dim;
        rotate_and_store(qkv, k, v, qkv_width, cos, sin, q, keys, values, slots, t, num_heads,
                         num_kv_heads, num_slots, head_dim, num_threads);
        failed = attend_spans(q, keys, values, attended, extent_starts, extent_lengths,
                              span_extents, span_tokens, num_spans, num_heads, num_kv_heads,
                              num_slots, head_dim, scale, num_threads) ||
                 project(product, attended, t, attention_width, w->o, w->o_bias, hidden, delta,
                         num_threads);
        if (failed) break;
        add(x, delta, t * hidden);
        rms_norm(x, w->post_norm, h, t, hidden, eps, num_threads);
        failed = project(product, h, t, hidden, w->gate_up, w->gate_up_bias, 2 * intermediate,
                         gate_up, num_threads);
        if (failed) break;
        silu_and_mul(gate_up, 2 * intermediate, gate_up + intermediate, 2 * intermediate, gated,
                     t, intermediate, num_threads);
        failed = project(product, gated, t, intermediate, w->down, w->down_bias, hidden, delta,
                         num_threads);
    }
    free(h), free(qkv), free(q), free(attended), free(gate_up), free(gated);
    return failed;
}
