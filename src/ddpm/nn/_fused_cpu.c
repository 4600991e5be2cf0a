/* Group norm -> swish -> dropout as one kernel over a channels-last (N, H, W, C) tensor, forward (two passes
 * for the statistics, one to write) and backward (two passes), float32 or bfloat16 data with float32 statistics and
 * affine parameters. An optional per-(sample, channel) shift is added to x first (the residual block's time
 * embedding, h + temb), so that sum makes no pass over memory of its own. Loaded by ddpm/nn/fused.py through
 * ctypes, compiled on first use for the machine it runs on (see there for why and how).
 *
 * Why: torch's channels-last group norm vectorises over the channels of one group (4 or 8 in the paper's
 * network), and its bfloat16 backward runs 3-4x slower than the contiguous one; swish and dropout each add a
 * pass over memory (dropout a slow 32-bit Bernoulli draw per element). Here every loop runs over the whole
 * channel row, which the compiler vectorises, and one sample's rows stay in L2 between passes.
 *
 * Two ways to cut the work, with the same bits: items of whole samples (or blocks of their groups), each making
 * every pass over its part, or, for a small batch, blocks of rows with a parallel loop per pass (see the rows
 * path). Every sum is taken over the same blocks of rows in a fixed order, so the results depend neither on the
 * number of threads nor on the batch a sample comes in. Dropout keeps element i (its flat index in the tensor) when
 * the top 32 bits of splitmix64(seed + i * golden) are >= threshold = round(p * 2^32); the backward pass draws
 * the same bits again instead of storing a mask.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef uint16_t bf16_t;

static inline float load_f32(const float *p) { return *p; }
static inline void store_f32(float *p, float v) { *p = v; }
static inline float load_bf16(const bf16_t *p) {
    uint32_t u = (uint32_t)(*p) << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
static inline void store_bf16(bf16_t *p, float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16; /* round to nearest even */
    *p = (bf16_t)((u & 0x7FFFFFFFu) > 0x7F800000u ? 0x7FC0u : rounded); /* NaN stays NaN */
}

/* e^x to 1.7e-7 relative for |x| <= 1, 6e-7 to |x| = 10, 4e-6 to the clamp (the rounding of x log2 e grows with
 * |x|): 2^(x log2 e) = 2^i * 2^f, 2^f by a degree-5 fit on [0, 1). Written so that the compiler vectorises it
 * (no libm call in the loops). */
static inline float exp_approx(float x) {
    /* x clamped to [-87, 88] by masks: gcc does not vectorise the same clamp written with ?: */
    uint32_t xb, lo = -(uint32_t)(x < -87.0f), hi = -(uint32_t)(x > 88.0f);
    memcpy(&xb, &x, sizeof xb);
    xb = (xb & ~(lo | hi)) | (0xC2AE0000u & lo) | (0x42B00000u & hi); /* -87.0f, 88.0f */
    memcpy(&x, &xb, sizeof x);
    float t = x * 1.4426950408889634f;
    float fi = (float)(int32_t)t;
    fi = t < fi ? fi - 1.0f : fi; /* floor */
    float f = t - fi;
    float p = 0.0018762329f;
    p = p * f + 0.0089925844f;
    p = p * f + 0.0558236055f;
    p = p * f + 0.2401545346f;
    p = p * f + 0.6931529641f;
    p = p * f + 0.9999999404f;
    uint32_t bits = (uint32_t)((int32_t)fi + 127) << 23;
    float scale;
    memcpy(&scale, &bits, sizeof scale);
    return p * scale;
}

static inline uint32_t drop_bits(uint64_t seed, uint64_t index) {
    uint64_t z = seed + index * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return (uint32_t)((z ^ (z >> 31)) >> 32);
}

/* Row operations, each a loop the compiler vectorises on its own. */
static void load_row_f32(const float *restrict src, float *restrict dst, int64_t w) {
    for (int64_t c = 0; c < w; c++) dst[c] = src[c];
}
static void load_row_bf16(const bf16_t *restrict src, float *restrict dst, int64_t w) {
    for (int64_t c = 0; c < w; c++) dst[c] = load_bf16(src + c);
}
static void store_row_f32(const float *restrict src, float *restrict dst, int64_t w) {
    for (int64_t c = 0; c < w; c++) dst[c] = src[c];
}
static void store_row_bf16(const float *restrict src, bf16_t *restrict dst, int64_t w) {
    for (int64_t c = 0; c < w; c++) store_bf16(dst + c, src[c]);
}
/* f rounded to the nearest bfloat16 (ties to even), as a float: what torch's bf16 add stores. */
static inline float round_bf16(float f) {
    bf16_t h;
    store_bf16(&h, f);
    return load_bf16(&h);
}
static void affine_row(float *restrict v, const float *restrict a, const float *restrict b, int64_t w) {
    for (int64_t c = 0; c < w; c++) v[c] = v[c] * a[c] + b[c];
}
/* The two swish rows are inlined by force: gcc kept them as calls, which set up exp's ~17 vector constants again
 * for every row of C values; inlined, they are hoisted out of the row loops (at the fashion and digits networks'
 * 32-channel shapes forward 5-9% and backward 7-18% faster, elsewhere 0-3%; the same bits: benchmarks/RESULTS.md). */
#define ROW_INLINE static inline __attribute__((always_inline))
ROW_INLINE void silu_row(float *restrict v, int64_t w) {
    for (int64_t c = 0; c < w; c++) v[c] = v[c] / (1.0f + exp_approx(-v[c]));
}
/* v *= dsilu(z)/dz at z = x a + b, for x in xv. */
ROW_INLINE void silu_grad_row(float *restrict v, const float *restrict xv, const float *restrict a,
                              const float *restrict b, int64_t w) {
    for (int64_t c = 0; c < w; c++) {
        float z = xv[c] * a[c] + b[c];
        float s = 1.0f / (1.0f + exp_approx(-z));
        v[c] = v[c] * s * (1.0f + z * (1.0f - s));
    }
}
static void dropout_row(float *restrict v, uint64_t seed, uint64_t base, uint32_t threshold, float scale,
                        int64_t w) {
    for (int64_t c = 0; c < w; c++) v[c] = drop_bits(seed, base + (uint64_t)c) >= threshold ? v[c] * scale : 0.0f;
}

static void accumulate_row(float *restrict s_dz, float *restrict s_dzx, const float *restrict dz,
                           const float *restrict xv, int64_t w) {
    for (int64_t c = 0; c < w; c++) {
        s_dz[c] += dz[c];
        s_dzx[c] += dz[c] * xv[c];
    }
}
/* In place over xv: dx = a dz + c2 x + c3 (c2, c3 per channel, constant over a group). */
static void input_grad_row(float *restrict xv, const float *restrict dz, const float *restrict a,
                           const float *restrict c2, const float *restrict c3, int64_t w) {
    for (int64_t c = 0; c < w; c++) xv[c] = a[c] * dz[c] + c2[c] * xv[c] + c3[c];
}

/* The per-channel scale a = gamma rstd and shift b = beta - mean a of sample n, channels [c0, c0 + w): one
 * function for the forward and the backward, which must recompute exactly the forward's z = x a + b. */
static void affine_coefficients(const float *gamma, const float *beta, const float *mean, const float *rstd,
                                int64_t n, int64_t G, int64_t D, int64_t c0, int64_t w, float *a, float *b) {
    for (int64_t c = 0; c < w; c++) {
        int64_t g = (c0 + c) / D;
        a[c] = gamma[c0 + c] * rstd[n * G + g];
        b[c] = beta[c0 + c] - mean[n * G + g] * a[c];
    }
}

/* Scratch of one thread, kept between calls (the threads are the OpenMP runtime's, shared with torch). */
static __thread float *tls_buf = NULL;
static __thread size_t tls_cap = 0;
static float *scratch(size_t n) {
    if (n > tls_cap) {
        free(tls_buf);
        tls_buf = (float *)aligned_alloc(64, ((n * sizeof(float) + 63) / 64) * 64);
        tls_cap = tls_buf ? n : 0;
    }
    return tls_buf;
}

#define ROW_BLOCK 128 /* rows summed in float before being added to the double totals */

/* Element c of a row of x (+ shift), as float: the value the group norm sees, the sum as torch's add of two
 * tensors of x's dtype would store it (the loops that call these are unswitched on shift by the compiler). */
static inline float xval_f32(const float *row, const float *shift, int64_t c) {
    return shift ? row[c] + shift[c] : row[c];
}
static inline float xval_bf16(const bf16_t *row, const float *shift, int64_t c) {
    return shift ? round_bf16(load_bf16(row + c) + shift[c]) : load_bf16(row + c);
}
/* One row of x (+ shift), as float. */
#define DEFINE_LOAD(SUF, T)                                                                                    \
    static inline void load_x_##SUF(const T *restrict src, const float *restrict shift, float *restrict dst,   \
                                    int64_t w) {                                                               \
        for (int64_t c = 0; c < w; c++) dst[c] = xval_##SUF(src, shift, c);                                    \
    }

/* Per-channel float sums over rows [r0, r1) (at most ROW_BLOCK of them) of x (+ shift), or with centre != NULL
 * of (x (+ shift) - centre)^2, channels [c0, c0 + w). Both paths build their statistics from these blocks, added
 * in the same order, so that they agree bit for bit. */
#define DEFINE_BLOCK_SUMS(SUF, T)                                                                              \
    ROW_INLINE void block_sums_##SUF(const T *x, const float *shift, int64_t r0, int64_t r1, int64_t C,        \
                                     int64_t c0, int64_t w, const float *centre, float *part) {                \
        for (int64_t c = 0; c < w; c++) part[c] = 0.0f;                                                        \
        for (int64_t r = r0; r < r1; r++) {                                                                    \
            const T *row = x + r * C + c0;                                                                     \
            if (centre) {                                                                                      \
                for (int64_t c = 0; c < w; c++) {                                                              \
                    float d = xval_##SUF(row, shift, c) - centre[c];                                           \
                    part[c] += d * d;                                                                          \
                }                                                                                              \
            } else {                                                                                           \
                for (int64_t c = 0; c < w; c++) part[c] += xval_##SUF(row, shift, c);                          \
            }                                                                                                  \
        }                                                                                                      \
    }                                                                                                          \
    /* The same sums over all HW rows, the blocks' added in double in order. */                                \
    ROW_INLINE void channel_sums_##SUF(const T *x, const float *shift, int64_t HW, int64_t C, int64_t c0,      \
                                       int64_t w, const float *centre, double *total, float *part) {           \
        for (int64_t c = 0; c < w; c++) total[c] = 0.0;                                                        \
        for (int64_t r0 = 0; r0 < HW; r0 += ROW_BLOCK) {                                                       \
            block_sums_##SUF(x, shift, r0, r0 + ROW_BLOCK < HW ? r0 + ROW_BLOCK : HW, C, c0, w, centre, part); \
            for (int64_t c = 0; c < w; c++) total[c] += part[c];                                               \
        }                                                                                                      \
    }

/* y over rows [r0, r1) of sample n, channels [c0, c0 + w), from the per-channel scale a and shift b; v: a row of
 * scratch. */
#define DEFINE_APPLY(SUF, T)                                                                                   \
    ROW_INLINE void apply_rows_##SUF(const T *x, T *y, const float *sn, const float *a, const float *b,       \
                                     int64_t n, int64_t HW, int64_t C, int64_t c0, int64_t w, int64_t r0,     \
                                     int64_t r1, int silu, uint32_t threshold, float keep_scale,              \
                                     uint64_t seed, float *v) {                                                \
        for (int64_t r = r0; r < r1; r++) {                                                                    \
            int64_t at = (n * HW + r) * C + c0;                                                                \
            load_x_##SUF(x + at, sn, v, w);                                                                    \
            affine_row(v, a, b, w);                                                                            \
            if (silu) silu_row(v, w);                                                                          \
            if (threshold) dropout_row(v, seed, (uint64_t)at, threshold, keep_scale, w);                       \
            store_row_##SUF(v, y + at, w);                                                                     \
        }                                                                                                      \
    }

/* The backward's first pass over rows [r0, r1) (at most ROW_BLOCK): dz = dL/d(x a + b), from dy through
 * dropout's mask and swish's derivative, into dz (row r at dz + (r - r0) dz_stride: the items path keeps every
 * row, the rows path one at a time), and its float sums p_dz = sum(dz), p_dzx = sum(dz x) per channel. */
#define DEFINE_GRAD_SUMS(SUF, T)                                                                               \
    ROW_INLINE void dz_row_##SUF(const T *dyr, const float *xv, const float *a, const float *b, float *dz,     \
                                 int64_t w, int silu, uint64_t at, uint32_t threshold, float keep_scale,       \
                                 uint64_t seed) {                                                              \
        load_row_##SUF(dyr, dz, w);                                                                            \
        if (threshold) dropout_row(dz, seed, at, threshold, keep_scale, w);                                    \
        if (silu) silu_grad_row(dz, xv, a, b, w);                                                              \
    }                                                                                                          \
    ROW_INLINE void grad_sums_##SUF(const T *dy, const T *x, const float *sn, const float *a, const float *b,  \
                                    int64_t n, int64_t HW, int64_t C, int64_t c0, int64_t w, int64_t r0,      \
                                    int64_t r1, int silu, uint32_t threshold, float keep_scale, uint64_t seed, \
                                    float *xv, float *dz, int64_t dz_stride, float *p_dz, float *p_dzx) {     \
        for (int64_t c = 0; c < w; c++) p_dz[c] = p_dzx[c] = 0.0f;                                             \
        for (int64_t r = r0; r < r1; r++) {                                                                    \
            int64_t at = (n * HW + r) * C + c0;                                                                \
            float *dzr = dz + (r - r0) * dz_stride;                                                            \
            load_x_##SUF(x + at, sn, xv, w);                                                                   \
            dz_row_##SUF(dy + at, xv, a, b, dzr, w, silu, (uint64_t)at, threshold, keep_scale, seed);          \
            accumulate_row(p_dz, p_dzx, dzr, xv, w);                                                           \
        }                                                                                                      \
    }

/* The backward's last pass over rows [r0, r1): dx = a dz + c2 x + c3, and (p_dx != NULL) its float sum per
 * channel, the shift's gradient. dz as grad_sums left it, or (dz_stride 0, a row of scratch) computed again. */
#define DEFINE_INPUT_GRADS(SUF, T)                                                                             \
    ROW_INLINE void input_grads_##SUF(const T *dy, const T *x, T *dx, const float *sn, const float *a,        \
                                      const float *b, const float *c2, const float *c3, int64_t n, int64_t HW,  \
                                      int64_t C, int64_t c0, int64_t w, int64_t r0, int64_t r1, int silu,      \
                                      uint32_t threshold, float keep_scale, uint64_t seed, float *xv,          \
                                      float *dz, int64_t dz_stride, float *p_dx) {                             \
        if (p_dx)                                                                                              \
            for (int64_t c = 0; c < w; c++) p_dx[c] = 0.0f;                                                    \
        for (int64_t r = r0; r < r1; r++) {                                                                    \
            int64_t at = (n * HW + r) * C + c0;                                                                \
            float *dzr = dz + (r - r0) * dz_stride;                                                            \
            load_x_##SUF(x + at, sn, xv, w);                                                                   \
            if (!dz_stride) dz_row_##SUF(dy + at, xv, a, b, dzr, w, silu, (uint64_t)at, threshold, keep_scale, seed); \
            input_grad_row(xv, dzr, a, c2, c3, w);                                                             \
            store_row_##SUF(xv, dx + at, w);                                                                   \
            if (p_dx)                                                                                          \
                for (int64_t c = 0; c < w; c++) p_dx[c] += xv[c];                                              \
        }                                                                                                      \
    }

/* A group's mean and rstd from its sum s of x and of (x - mean)^2 over M elements: one definition for both paths,
 * which must agree bit for bit. */
static inline float group_mean(double s, double M) { return (float)(s / M); }
static inline float group_rstd(double s, double M, float eps) { return (float)(1.0 / sqrt(s / M + (double)eps)); }

/* Per group of D channels: dx's coefficients c2 and c3 (dx = a dz + c2 x + c3) from the group's sums
 * s_dz = sum(dz), s_dzx = sum(dz x) per channel (double), its gamma, mean, rstd and M = D HW elements. */
static void input_grad_coefficients(const double *s_dz, const double *s_dzx, const float *gamma, double mu,
                                    double rs, int64_t D, double M, float *c2, float *c3) {
    double ds = 0.0, db = 0.0;
    for (int64_t d = 0; d < D; d++) {
        ds += (double)gamma[d] * s_dzx[d];
        db += (double)gamma[d] * s_dz[d];
    }
    double k2 = (db * mu - ds) * rs * rs * rs / M;
    double k3 = -k2 * mu - db * rs / M;
    for (int64_t d = 0; d < D; d++) {
        c2[d] = (float)k2;
        c3[d] = (float)k3;
    }
}

/* ---- The items path: a work item is (sample, block of whole groups), which makes every pass over it, so that
 * one sample's rows stay in L2 between passes. */

/* Forward of one item: statistics of groups [g0, g1) of sample n, then y. w = (g1 - g0) C / G: the item's
 * channels (a constant where the width switch passes one). */
#define DEFINE_FORWARD(SUF, T)                                                                                 \
    ROW_INLINE int forward_item_##SUF(const T *x, T *y, const float *gamma, const float *beta,                 \
                                      const float *shift, float *mean, float *rstd, int64_t n, int64_t HW,     \
                                      int64_t C, int64_t G, int64_t g0, int64_t g1, int64_t w, float eps,      \
                                      int silu, uint32_t threshold, float keep_scale, uint64_t seed) {         \
        int64_t D = C / G, c0 = g0 * D;                                                                        \
        const T *xn = x + n * HW * C;                                                                          \
        const float *sn = shift ? shift + n * C + c0 : NULL;                                                   \
        double *total = (double *)malloc(sizeof(double) * w);                                                  \
        float *f = (float *)malloc(sizeof(float) * 4 * w), *part = f, *a = f + w, *b = f + 2 * w;              \
        float *v = f + 3 * w;                                                                                  \
        if (!total || !f) {                                                                                    \
            free(total);                                                                                       \
            free(f);                                                                                           \
            return -1;                                                                                         \
        }                                                                                                      \
        double M = (double)D * (double)HW;                                                                     \
        channel_sums_##SUF(xn, sn, HW, C, c0, w, NULL, total, part);                                            \
        for (int64_t g = g0; g < g1; g++) {                                                                    \
            double s = 0.0;                                                                                    \
            for (int64_t d = 0; d < D; d++) s += total[(g - g0) * D + d];                                      \
            mean[n * G + g] = group_mean(s, M);                                                                \
            for (int64_t d = 0; d < D; d++) b[(g - g0) * D + d] = mean[n * G + g];                             \
        }                                                                                                      \
        channel_sums_##SUF(xn, sn, HW, C, c0, w, b, total, part);                                               \
        for (int64_t g = g0; g < g1; g++) {                                                                    \
            double s = 0.0;                                                                                    \
            for (int64_t d = 0; d < D; d++) s += total[(g - g0) * D + d];                                      \
            rstd[n * G + g] = group_rstd(s, M, eps);                                                           \
        }                                                                                                      \
        affine_coefficients(gamma, beta, mean, rstd, n, G, D, c0, w, a, b);                                    \
        apply_rows_##SUF(x, y, sn, a, b, n, HW, C, c0, w, 0, HW, silu, threshold, keep_scale, seed, v);        \
        free(total);                                                                                           \
        free(f);                                                                                               \
        return 0;                                                                                              \
    }

/* Backward of one item (w as in the forward). dz is kept in scratch between the passes; sums [N, 2, C] gets
 * sum(dz) and sum(dz * x) per channel (torch turns them into the parameter gradients), and dshift [N, C] (when
 * the forward had a shift) the sum of dx over the rows: the shift's gradient. */
#define DEFINE_BACKWARD(SUF, T)                                                                                \
    ROW_INLINE int backward_item_##SUF(const T *dy, const T *x, const float *gamma, const float *beta,         \
                                       const float *shift, const float *mean, const float *rstd, T *dx,        \
                                       float *sums, float *dshift, int64_t n, int64_t HW, int64_t C,           \
                                       int64_t G, int64_t g0, int64_t g1, int64_t w, int silu,                 \
                                       uint32_t threshold, float keep_scale, uint64_t seed) {                  \
        int64_t D = C / G, c0 = g0 * D;                                                                        \
        const float *sn = shift ? shift + n * C + c0 : NULL;                                                   \
        float *dz = scratch((size_t)(HW * w));                                                                 \
        double *acc = (double *)malloc(sizeof(double) * 2 * w), *s_dz = acc, *s_dzx = acc + w;                 \
        float *f = (float *)malloc(sizeof(float) * 6 * w);                                                     \
        if (!dz || !acc || !f) {                                                                               \
            free(acc);                                                                                         \
            free(f);                                                                                           \
            return -1;                                                                                         \
        }                                                                                                      \
        float *a = f, *b = f + w, *p_dz = f + 2 * w, *p_dzx = f + 3 * w, *k = f + 4 * w, *xv = f + 5 * w;      \
        affine_coefficients(gamma, beta, mean, rstd, n, G, D, c0, w, a, b);                                    \
        for (int64_t c = 0; c < w; c++) s_dz[c] = s_dzx[c] = 0.0;                                              \
        for (int64_t r0 = 0; r0 < HW; r0 += ROW_BLOCK) {                                                       \
            int64_t r1 = r0 + ROW_BLOCK < HW ? r0 + ROW_BLOCK : HW;                                            \
            grad_sums_##SUF(dy, x, sn, a, b, n, HW, C, c0, w, r0, r1, silu, threshold, keep_scale, seed, xv,   \
                            dz + r0 * w, w, p_dz, p_dzx);                                                      \
            for (int64_t c = 0; c < w; c++) {                                                                  \
                s_dz[c] += p_dz[c];                                                                            \
                s_dzx[c] += p_dzx[c];                                                                          \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t g = g0; g < g1; g++) {                                                                    \
            int64_t at = (g - g0) * D;                                                                         \
            input_grad_coefficients(s_dz + at, s_dzx + at, gamma + c0 + at, mean[n * G + g], rstd[n * G + g],  \
                                    D, (double)D * (double)HW, b + at, k + at);                                \
        }                                                                                                      \
        for (int64_t c = 0; c < w; c++) {                                                                      \
            sums[(n * 2) * C + c0 + c] = (float)s_dz[c];                                                       \
            sums[(n * 2 + 1) * C + c0 + c] = (float)s_dzx[c];                                                  \
        }                                                                                                      \
        for (int64_t c = 0; c < w; c++) s_dz[c] = 0.0;                                                         \
        for (int64_t r0 = 0; r0 < HW; r0 += ROW_BLOCK) {                                                       \
            int64_t r1 = r0 + ROW_BLOCK < HW ? r0 + ROW_BLOCK : HW;                                            \
            input_grads_##SUF(dy, x, dx, sn, a, b, b, k, n, HW, C, c0, w, r0, r1, silu, threshold, keep_scale, \
                              seed, xv, dz + r0 * w, w, dshift ? p_dz : NULL);                                 \
            if (dshift)                                                                                        \
                for (int64_t c = 0; c < w; c++) s_dz[c] += p_dz[c];                                            \
        }                                                                                                      \
        if (dshift)                                                                                            \
            for (int64_t c = 0; c < w; c++) dshift[n * C + c0 + c] = (float)s_dz[c];                           \
        free(acc);                                                                                             \
        free(f);                                                                                               \
        return 0;                                                                                              \
    }

/* ---- The rows path: a work item is a block of ROW_BLOCK rows of one sample over all C channels, and each pass
 * is its own parallel loop over them. Its block sums are the items path's, added in the same order, and dz is
 * computed again in the last pass rather than kept: the same bits as the items path (tests/test_fused.py).
 * It runs where the items path would split a sample's groups into narrow items (a small batch: see takes_rows),
 * each reading a thin slice of every row; at batch 1 and 256 x 256 pixels those ran 5x slower than torch's
 * operators (benchmarks/RESULTS.md). */
/* Item i of a rows call: sample n, its rows [r0, r1), its shift row sn. */
#define ROWS_ITEM(i)                                                                                           \
    int64_t n = (i) / nb, r0 = ((i) % nb) * ROW_BLOCK, r1 = r0 + ROW_BLOCK < HW ? r0 + ROW_BLOCK : HW;         \
    const float *sn = shift ? shift + n * C : NULL
/* A row buffer of `count` floats from the thread's scratch, or the item fails (inside the item loops). */
#define ROWS_SCRATCH(v, count)                                                                                 \
    float *v = scratch((size_t)(count));                                                                       \
    if (!v) {                                                                                                  \
        failed = 1;                                                                                            \
        continue;                                                                                              \
    }

#define DEFINE_ROWS(SUF, T)                                                                                    \
    static int rows_forward_##SUF(const T *x, T *y, const float *gamma, const float *beta, const float *shift, \
                                  float *mean, float *rstd, int64_t N, int64_t HW, int64_t C, int64_t G,       \
                                  float eps, int silu, uint32_t threshold, float keep_scale, uint64_t seed,    \
                                  int threads) {                                                               \
        int64_t nb = (HW + ROW_BLOCK - 1) / ROW_BLOCK, items = N * nb, D = C / G;                              \
        if (items < threads) threads = items > 0 ? (int)items : 1; /* no thread without a block of rows */   \
        float *part = (float *)malloc(sizeof(float) * (size_t)((items + 2 * N) * C));                          \
        if (!part) return -2;                                                                                  \
        float *a = part + items * C, *b = a + N * C; /* b: the centres of pass 1, then the shifts */           \
        int failed = 0;                                                                                        \
        double M = (double)D * (double)HW;                                                                     \
        for (int pass = 0; pass < 2; pass++) {                                                                 \
            _Pragma("omp parallel for schedule(static) num_threads(threads)")                                  \
            for (int64_t i = 0; i < items; i++) {                                                              \
                ROWS_ITEM(i);                                                                                  \
                if (pass) {                                                                                    \
                    WIDTH_SWITCH(C, block_sums_##SUF(x + n * HW * C, sn, r0, r1, C, 0, W, b + n * C, part + i * C)); \
                } else {                                                                                       \
                    WIDTH_SWITCH(C, block_sums_##SUF(x + n * HW * C, sn, r0, r1, C, 0, W, NULL, part + i * C));  \
                }                                                                                              \
            }                                                                                                  \
            _Pragma("omp parallel for schedule(static) num_threads(threads)")                                  \
            for (int64_t i = 0; i < N * G; i++) {                                                              \
                int64_t n = i / G, c0 = (i % G) * D;                                                           \
                double s = 0.0;                                                                                \
                for (int64_t d = 0; d < D; d++) {                                                              \
                    double total = 0.0;                                                                        \
                    for (int64_t k = 0; k < nb; k++) total += part[(n * nb + k) * C + c0 + d];                 \
                    s += total;                                                                                \
                }                                                                                              \
                if (pass) {                                                                                    \
                    rstd[i] = group_rstd(s, M, eps);                                                           \
                } else {                                                                                       \
                    mean[i] = group_mean(s, M);                                                                \
                    for (int64_t d = 0; d < D; d++) b[n * C + c0 + d] = mean[i];                               \
                }                                                                                              \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t n = 0; n < N; n++)                                                                        \
            affine_coefficients(gamma, beta, mean, rstd, n, G, D, 0, C, a + n * C, b + n * C);                 \
        _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(| : failed)")                \
        for (int64_t i = 0; i < items; i++) {                                                                  \
            ROWS_ITEM(i);                                                                                      \
            ROWS_SCRATCH(v, C);                                                                                \
            WIDTH_SWITCH(C, apply_rows_##SUF(x, y, sn, a + n * C, b + n * C, n, HW, C, 0, W, r0, r1, silu,     \
                                             threshold, keep_scale, seed, v));                                 \
        }                                                                                                      \
        free(part);                                                                                            \
        return failed ? -2 : 0;                                                                                \
    }                                                                                                          \
                                                                                                               \
    static int rows_backward_##SUF(const T *dy, const T *x, const float *gamma, const float *beta,             \
                                   const float *shift, const float *mean, const float *rstd, T *dx,            \
                                   float *sums, float *dshift, int64_t N, int64_t HW, int64_t C, int64_t G,    \
                                   int silu, uint32_t threshold, float keep_scale, uint64_t seed,              \
                                   int threads) {                                                              \
        int64_t nb = (HW + ROW_BLOCK - 1) / ROW_BLOCK, items = N * nb, D = C / G;                              \
        if (items < threads) threads = items > 0 ? (int)items : 1; /* no thread without a block of rows */   \
        float *p = (float *)malloc(sizeof(float) * (size_t)((2 * items + 4 * N) * C));                         \
        double *acc = (double *)malloc(sizeof(double) * (size_t)(2 * N * C));                                  \
        if (!p || !acc) {                                                                                      \
            free(p);                                                                                           \
            free(acc);                                                                                         \
            return -2;                                                                                         \
        }                                                                                                      \
        float *a = p + 2 * items * C, *b = a + N * C, *c2 = b + N * C, *c3 = c2 + N * C;                       \
        for (int64_t n = 0; n < N; n++)                                                                        \
            affine_coefficients(gamma, beta, mean, rstd, n, G, D, 0, C, a + n * C, b + n * C);                 \
        int failed = 0;                                                                                        \
        _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(| : failed)")                \
        for (int64_t i = 0; i < items; i++) {                                                                  \
            ROWS_ITEM(i);                                                                                      \
            ROWS_SCRATCH(xv, 2 * C);                                                                           \
            WIDTH_SWITCH(C, grad_sums_##SUF(dy, x, sn, a + n * C, b + n * C, n, HW, C, 0, W, r0, r1, silu,     \
                                            threshold, keep_scale, seed, xv, xv + C, 0, p + 2 * i * C,         \
                                            p + (2 * i + 1) * C));                                             \
        }                                                                                                      \
        if (failed) {                                                                                          \
            free(p);                                                                                           \
            free(acc);                                                                                         \
            return -2;                                                                                         \
        }                                                                                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads)")                                      \
        for (int64_t i = 0; i < N * G; i++) {                                                                  \
            int64_t n = i / G, c0 = (i % G) * D;                                                               \
            double *s_dz = acc + 2 * n * C + c0, *s_dzx = s_dz + C;                                            \
            for (int64_t d = 0; d < D; d++) {                                                                  \
                s_dz[d] = s_dzx[d] = 0.0;                                                                      \
                for (int64_t k = 0; k < nb; k++) {                                                             \
                    s_dz[d] += p[2 * (n * nb + k) * C + c0 + d];                                               \
                    s_dzx[d] += p[(2 * (n * nb + k) + 1) * C + c0 + d];                                        \
                }                                                                                              \
                sums[(n * 2) * C + c0 + d] = (float)s_dz[d];                                                   \
                sums[(n * 2 + 1) * C + c0 + d] = (float)s_dzx[d];                                              \
            }                                                                                                  \
            input_grad_coefficients(s_dz, s_dzx, gamma + c0, mean[i], rstd[i], D, (double)D * (double)HW,      \
                                    c2 + n * C + c0, c3 + n * C + c0);                                         \
        }                                                                                                      \
        /* the last pass; p (free by now) takes the blocks' sums of dx */                                      \
        _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(| : failed)")                \
        for (int64_t i = 0; i < items; i++) {                                                                  \
            ROWS_ITEM(i);                                                                                      \
            ROWS_SCRATCH(xv, 2 * C);                                                                           \
            WIDTH_SWITCH(C, input_grads_##SUF(dy, x, dx, sn, a + n * C, b + n * C, c2 + n * C, c3 + n * C, n,  \
                                              HW, C, 0, W, r0, r1, silu, threshold, keep_scale, seed, xv,      \
                                              xv + C, 0, dshift ? p + i * C : NULL));                          \
        }                                                                                                      \
        if (dshift && !failed)                                                                                 \
            for (int64_t n = 0; n < N; n++)                                                                    \
                for (int64_t c = 0; c < C; c++) {                                                              \
                    double s = 0.0;                                                                            \
                    for (int64_t k = 0; k < nb; k++) s += p[(n * nb + k) * C + c];                             \
                    dshift[n * C + c] = (float)s;                                                              \
                }                                                                                              \
        free(p);                                                                                               \
        free(acc);                                                                                             \
        return failed ? -2 : 0;                                                                                \
    }

/* With AVX-512 the small networks' widths (32 to 128 channels: rows of 2 to 8 vectors) get a copy of the code
 * with W a constant, so that its row loops carry no trip-count logic: 13-21% faster at 32 and 64 channels, 7-11%
 * at 96 and 128, on an AVX-512 Xeon. Not for AVX2 builds: there, with 16 vector registers, the unrolled backward
 * spilled and ran 3-5% slower at 32 channels (benchmarks/RESULTS.md). The copies make the build 4x slower (about
 * 8 s, once per machine). WIDTH_SWITCH(width, code) runs code with W = width. */
#ifdef __AVX512F__
#define WIDTH_CASE(K, ...)                                                                                     \
    case K: {                                                                                                  \
        const int64_t W = K;                                                                                   \
        __VA_ARGS__;                                                                                           \
    } break;
#define WIDTH_SWITCH(WIDTH, ...)                                                                               \
    switch (WIDTH) {                                                                                           \
        WIDTH_CASE(32, __VA_ARGS__)                                                                            \
        WIDTH_CASE(64, __VA_ARGS__)                                                                            \
        WIDTH_CASE(96, __VA_ARGS__)                                                                            \
        WIDTH_CASE(128, __VA_ARGS__)                                                                           \
    default: {                                                                                                 \
        const int64_t W = (WIDTH);                                                                             \
        __VA_ARGS__;                                                                                           \
    }                                                                                                          \
    }
#else
#define WIDTH_SWITCH(WIDTH, ...)                                                                               \
    do {                                                                                                       \
        const int64_t W = (WIDTH);                                                                             \
        __VA_ARGS__;                                                                                           \
    } while (0)
#endif

DEFINE_LOAD(f32, float)
DEFINE_LOAD(bf16, bf16_t)
DEFINE_BLOCK_SUMS(f32, float)
DEFINE_BLOCK_SUMS(bf16, bf16_t)
DEFINE_APPLY(f32, float)
DEFINE_APPLY(bf16, bf16_t)
DEFINE_GRAD_SUMS(f32, float)
DEFINE_GRAD_SUMS(bf16, bf16_t)
DEFINE_INPUT_GRADS(f32, float)
DEFINE_INPUT_GRADS(bf16, bf16_t)
DEFINE_FORWARD(f32, float)
DEFINE_FORWARD(bf16, bf16_t)
DEFINE_BACKWARD(f32, float)
DEFINE_BACKWARD(bf16, bf16_t)
DEFINE_ROWS(f32, float)
DEFINE_ROWS(bf16, bf16_t)

/* Groups per work item of the items path: whole samples when there are enough of them, else the groups split in
 * blocks. */
static int64_t group_blocks(int64_t N, int64_t G) {
    int64_t blocks = 1;
    while (N * blocks < 16 && blocks * 2 <= G && G % (blocks * 2) == 0) blocks *= 2;
    return blocks;
}

/* Which path a call takes (the same bits either way): path 1 the items, 2 the rows, 0 the rows where the items
 * path would split a sample's groups into items narrower than 64 channels. Measured at 1 to 16 samples of 32 to
 * 256 channels (benchmarks/RESULTS.md), the rows ran 1.3-7x faster there, the items 1.2x faster at 8 x 128
 * channels (two items of 64 per sample). */
static int takes_rows(int path, int64_t N, int64_t G, int64_t C) {
    int64_t blocks = group_blocks(N, G);
    return path ? path == 2 : blocks > 1 && C / blocks < 64;
}

#define CHECK_ARGS                                                                                             \
    if (G <= 0 || C % G != 0 || N < 0 || HW <= 0 || (dtype != 0 && dtype != 1)) return -1;

/* The items path: runs CALL_F32 or CALL_BF16 (by dtype) for every work item (sample n, groups g0 .. g1, W
 * channels) on `threads` threads. Returns 0, or -2 when memory for an item's buffers could not be had. */
#define RUN_ITEMS(CALL_F32, CALL_BF16)                                                                         \
    int64_t blocks = group_blocks(N, G), items = N * blocks, per = G / blocks, width = per * (C / G);          \
    int failed = 0;                                                                                            \
    _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(| : failed)")                    \
    for (int64_t i = 0; i < items; i++) {                                                                      \
        int64_t n = i / blocks, g0 = (i % blocks) * per, g1 = g0 + per;                                        \
        int rc;                                                                                                \
        WIDTH_SWITCH(width, rc = dtype == 0 ? (CALL_F32) : (CALL_BF16));                                       \
        failed |= rc != 0;                                                                                     \
    }                                                                                                          \
    return failed ? -2 : 0;

/* dtype: 0 float32, 1 bfloat16. threshold 0: no dropout. shift: NULL, or [N, C] float32 added to x first (for
 * bfloat16 x the sum is rounded to bfloat16, as torch's add would store it); the backward then writes its
 * gradient to dshift [N, C] (NULL: not wanted). path: 0 (the kernel's choice), 1 or 2 (see takes_rows). Returns
 * 0; -1 for a bad argument, -2 when memory for the buffers could not be had. */
int ddpm_gn_act_forward(int dtype, const void *x, void *y, const float *gamma, const float *beta, const float *shift,
                        float *mean, float *rstd, int64_t N, int64_t HW, int64_t C, int64_t G, float eps, int silu,
                        uint32_t threshold, float keep_scale, uint64_t seed, int threads, int path) {
    CHECK_ARGS
    if (takes_rows(path, N, G, C))
        return dtype == 0 ? rows_forward_f32((const float *)x, (float *)y, gamma, beta, shift, mean, rstd, N, HW, C,
                                             G, eps, silu, threshold, keep_scale, seed, threads)
                          : rows_forward_bf16((const bf16_t *)x, (bf16_t *)y, gamma, beta, shift, mean, rstd, N, HW,
                                              C, G, eps, silu, threshold, keep_scale, seed, threads);
    RUN_ITEMS(forward_item_f32((const float *)x, (float *)y, gamma, beta, shift, mean, rstd, n, HW, C, G, g0, g1,
                               W, eps, silu, threshold, keep_scale, seed),
              forward_item_bf16((const bf16_t *)x, (bf16_t *)y, gamma, beta, shift, mean, rstd, n, HW, C, G, g0, g1,
                                W, eps, silu, threshold, keep_scale, seed))
}

int ddpm_gn_act_backward(int dtype, const void *dy, const void *x, const float *gamma, const float *beta,
                         const float *shift, const float *mean, const float *rstd, void *dx, float *sums,
                         float *dshift, int64_t N, int64_t HW, int64_t C, int64_t G, int silu, uint32_t threshold,
                         float keep_scale, uint64_t seed, int threads, int path) {
    CHECK_ARGS
    if (takes_rows(path, N, G, C))
        return dtype == 0 ? rows_backward_f32((const float *)dy, (const float *)x, gamma, beta, shift, mean, rstd,
                                              (float *)dx, sums, dshift, N, HW, C, G, silu, threshold, keep_scale,
                                              seed, threads)
                          : rows_backward_bf16((const bf16_t *)dy, (const bf16_t *)x, gamma, beta, shift, mean, rstd,
                                               (bf16_t *)dx, sums, dshift, N, HW, C, G, silu, threshold, keep_scale,
                                               seed, threads);
    RUN_ITEMS(backward_item_f32((const float *)dy, (const float *)x, gamma, beta, shift, mean, rstd, (float *)dx,
                                sums, dshift, n, HW, C, G, g0, g1, W, silu, threshold, keep_scale, seed),
              backward_item_bf16((const bf16_t *)dy, (const bf16_t *)x, gamma, beta, shift, mean, rstd,
                                 (bf16_t *)dx, sums, dshift, n, HW, C, G, g0, g1, W, silu, threshold, keep_scale, seed))
}
