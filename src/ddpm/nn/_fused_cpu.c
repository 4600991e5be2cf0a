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
 * Work items are (sample, block of whole groups); every sum is taken in a fixed order inside an item, so the
 * results do not depend on the number of threads. Dropout keeps element i (its flat index in the tensor) when
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

/* Per-channel sums of x (+ shift) (and, with centre != NULL, of (x (+ shift) - centre)^2) over the HW rows,
 * channels [c0, c0 + w). */
#define DEFINE_CHANNEL_SUMS(SUF, T)                                                                            \
    ROW_INLINE void channel_sums_##SUF(const T *x, const float *shift, int64_t HW, int64_t C, int64_t c0,      \
                                       int64_t w, const float *centre, double *total, float *part) {           \
        for (int64_t c = 0; c < w; c++) total[c] = 0.0;                                                        \
        for (int64_t r0 = 0; r0 < HW; r0 += ROW_BLOCK) {                                                       \
            int64_t r1 = r0 + ROW_BLOCK < HW ? r0 + ROW_BLOCK : HW;                                            \
            for (int64_t c = 0; c < w; c++) part[c] = 0.0f;                                                    \
            for (int64_t r = r0; r < r1; r++) {                                                                \
                const T *row = x + r * C + c0;                                                                 \
                if (centre) {                                                                                  \
                    for (int64_t c = 0; c < w; c++) {                                                          \
                        float d = xval_##SUF(row, shift, c) - centre[c];                                       \
                        part[c] += d * d;                                                                      \
                    }                                                                                          \
                } else {                                                                                       \
                    for (int64_t c = 0; c < w; c++) part[c] += xval_##SUF(row, shift, c);                      \
                }                                                                                              \
            }                                                                                                  \
            for (int64_t c = 0; c < w; c++) total[c] += part[c];                                               \
        }                                                                                                      \
    }

/* Forward of one item: statistics of groups [g0, g1) of sample n, then y. w = (g1 - g0) C / G: the item's
 * channels (a constant where RUN_ITEMS passes one). */
#define DEFINE_FORWARD(SUF, T)                                                                                 \
    ROW_INLINE int forward_item_##SUF(const T *x, T *y, const float *gamma, const float *beta,                 \
                                      const float *shift, float *mean, float *rstd, int64_t n, int64_t HW,     \
                                      int64_t C, int64_t G, int64_t g0, int64_t g1, int64_t w, float eps,      \
                                      int silu, uint32_t threshold, float keep_scale, uint64_t seed) {         \
        int64_t D = C / G, c0 = g0 * D;                                                                        \
        const T *xn = x + n * HW * C;                                                                          \
        const float *sn = shift ? shift + n * C + c0 : NULL;                                                   \
        T *yn = y + n * HW * C;                                                                                \
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
            mean[n * G + g] = (float)(s / M);                                                                  \
            for (int64_t d = 0; d < D; d++) b[(g - g0) * D + d] = mean[n * G + g];                             \
        }                                                                                                      \
        channel_sums_##SUF(xn, sn, HW, C, c0, w, b, total, part);                                               \
        for (int64_t g = g0; g < g1; g++) {                                                                    \
            double s = 0.0;                                                                                    \
            for (int64_t d = 0; d < D; d++) s += total[(g - g0) * D + d];                                      \
            rstd[n * G + g] = (float)(1.0 / sqrt(s / M + (double)eps));                                        \
        }                                                                                                      \
        affine_coefficients(gamma, beta, mean, rstd, n, G, D, c0, w, a, b);                                    \
        for (int64_t r = 0; r < HW; r++) {                                                                     \
            load_x_##SUF(xn + r * C + c0, sn, v, w);                                                           \
            affine_row(v, a, b, w);                                                                            \
            if (silu) silu_row(v, w);                                                                          \
            if (threshold) dropout_row(v, seed, (uint64_t)((n * HW + r) * C + c0), threshold, keep_scale, w);  \
            store_row_##SUF(v, yn + r * C + c0, w);                                                            \
        }                                                                                                      \
        free(total);                                                                                           \
        free(f);                                                                                               \
        return 0;                                                                                              \
    }

/* Backward of one item (w as in the forward). dz = dL/d(normalised and affine-transformed x), kept in scratch
 * between the passes; sums [N, 2, C] gets sum(dz) and sum(dz * x) per channel (torch turns them into the
 * parameter gradients), and dshift [N, C] (when the forward had a shift) the sum of dx over the rows: the shift's
 * gradient, accumulated in the last pass in s_dz and p_dz, free by then. */
#define DEFINE_BACKWARD(SUF, T)                                                                                \
    ROW_INLINE int backward_item_##SUF(const T *dy, const T *x, const float *gamma, const float *beta,         \
                                       const float *shift, const float *mean, const float *rstd, T *dx,        \
                                       float *sums, float *dshift, int64_t n, int64_t HW, int64_t C,           \
                                       int64_t G, int64_t g0, int64_t g1, int64_t w, int silu,                 \
                                       uint32_t threshold, float keep_scale, uint64_t seed) {                  \
        int64_t D = C / G, c0 = g0 * D;                                                                        \
        const T *xn = x + n * HW * C, *dyn = dy + n * HW * C;                                                  \
        const float *sn = shift ? shift + n * C + c0 : NULL;                                                   \
        T *dxn = dx + n * HW * C;                                                                              \
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
            for (int64_t c = 0; c < w; c++) p_dz[c] = p_dzx[c] = 0.0f;                                         \
            for (int64_t r = r0; r < r1; r++) {                                                                \
                float *dzr = dz + r * w;                                                                       \
                load_x_##SUF(xn + r * C + c0, sn, xv, w);                                                      \
                load_row_##SUF(dyn + r * C + c0, dzr, w);                                                      \
                if (threshold) dropout_row(dzr, seed, (uint64_t)((n * HW + r) * C + c0), threshold, keep_scale, w); \
                if (silu) silu_grad_row(dzr, xv, a, b, w);                                                     \
                accumulate_row(p_dz, p_dzx, dzr, xv, w);                                                       \
            }                                                                                                  \
            for (int64_t c = 0; c < w; c++) {                                                                  \
                s_dz[c] += p_dz[c];                                                                            \
                s_dzx[c] += p_dzx[c];                                                                          \
            }                                                                                                  \
        }                                                                                                      \
        double M = (double)D * (double)HW;                                                                     \
        for (int64_t g = g0; g < g1; g++) {                                                                    \
            double ds = 0.0, db = 0.0;                                                                         \
            for (int64_t d = 0; d < D; d++) {                                                                  \
                int64_t c = (g - g0) * D + d;                                                                  \
                ds += (double)gamma[c0 + c] * s_dzx[c];                                                        \
                db += (double)gamma[c0 + c] * s_dz[c];                                                         \
            }                                                                                                  \
            double mu = mean[n * G + g], rs = rstd[n * G + g];                                                 \
            double c2 = (db * mu - ds) * rs * rs * rs / M;                                                     \
            double c3 = -c2 * mu - db * rs / M;                                                                \
            for (int64_t d = 0; d < D; d++) {                                                                  \
                b[(g - g0) * D + d] = (float)c2;                                                               \
                k[(g - g0) * D + d] = (float)c3;                                                               \
            }                                                                                                  \
        }                                                                                                      \
        for (int64_t c = 0; c < w; c++) {                                                                      \
            sums[(n * 2) * C + c0 + c] = (float)s_dz[c];                                                       \
            sums[(n * 2 + 1) * C + c0 + c] = (float)s_dzx[c];                                                  \
        }                                                                                                      \
        for (int64_t c = 0; c < w; c++) s_dz[c] = 0.0;                                                         \
        for (int64_t r0 = 0; r0 < HW; r0 += ROW_BLOCK) {                                                       \
            int64_t r1 = r0 + ROW_BLOCK < HW ? r0 + ROW_BLOCK : HW;                                            \
            for (int64_t c = 0; c < w; c++) p_dz[c] = 0.0f;                                                    \
            for (int64_t r = r0; r < r1; r++) {                                                                \
                load_x_##SUF(xn + r * C + c0, sn, xv, w);                                                      \
                input_grad_row(xv, dz + r * w, a, b, k, w);                                                    \
                store_row_##SUF(xv, dxn + r * C + c0, w);                                                      \
                if (dshift)                                                                                    \
                    for (int64_t c = 0; c < w; c++) p_dz[c] += xv[c];                                          \
            }                                                                                                  \
            if (dshift)                                                                                        \
                for (int64_t c = 0; c < w; c++) s_dz[c] += p_dz[c];                                            \
        }                                                                                                      \
        if (dshift)                                                                                            \
            for (int64_t c = 0; c < w; c++) dshift[n * C + c0 + c] = (float)s_dz[c];                           \
        free(acc);                                                                                             \
        free(f);                                                                                               \
        return 0;                                                                                              \
    }

DEFINE_LOAD(f32, float)
DEFINE_LOAD(bf16, bf16_t)
DEFINE_CHANNEL_SUMS(f32, float)
DEFINE_CHANNEL_SUMS(bf16, bf16_t)
DEFINE_FORWARD(f32, float)
DEFINE_FORWARD(bf16, bf16_t)
DEFINE_BACKWARD(f32, float)
DEFINE_BACKWARD(bf16, bf16_t)

/* Groups per work item: whole samples when there are enough of them, else the groups split in blocks. */
static int64_t group_blocks(int64_t N, int64_t G) {
    int64_t blocks = 1;
    while (N * blocks < 16 && blocks * 2 <= G && G % (blocks * 2) == 0) blocks *= 2;
    return blocks;
}

/* With AVX-512 the small networks' widths (32 to 128 channels: rows of 2 to 8 vectors) get a copy of the item
 * with W a constant, so that its row loops carry no trip-count logic: 13-21% faster at 32 and 64 channels, 7-11%
 * at 96 and 128, on an AVX-512 Xeon. Not for AVX2 builds: there, with 16 vector registers, the unrolled backward
 * spilled and ran 3-5% slower at 32 channels (benchmarks/RESULTS.md). The copies make the build 4x slower (about
 * 8 s, once per machine). */
#ifdef __AVX512F__
#define SPECIALISED_WIDTHS(CALL_F32, CALL_BF16)                                                                \
    case 32: ITEM(32, CALL_F32, CALL_BF16); break;                                                             \
    case 64: ITEM(64, CALL_F32, CALL_BF16); break;                                                             \
    case 96: ITEM(96, CALL_F32, CALL_BF16); break;                                                             \
    case 128: ITEM(128, CALL_F32, CALL_BF16); break;
#else
#define SPECIALISED_WIDTHS(CALL_F32, CALL_BF16)
#endif
#define ITEM(WIDTH, CALL_F32, CALL_BF16)                                                                       \
    do {                                                                                                       \
        const int64_t W = (WIDTH);                                                                             \
        rc = dtype == 0 ? (CALL_F32) : (CALL_BF16);                                                            \
    } while (0)

/* The body of both entry points: checks the shape, then runs CALL_F32 or CALL_BF16 (by dtype) for every work
 * item (sample n, groups g0 .. g1, W channels) on `threads` threads. Returns 0; -1 for a bad argument, -2 when
 * memory for an item's buffers could not be had. */
#define RUN_ITEMS(CALL_F32, CALL_BF16)                                                                         \
    if (G <= 0 || C % G != 0 || N < 0 || HW <= 0 || (dtype != 0 && dtype != 1)) return -1;                     \
    int64_t blocks = group_blocks(N, G), items = N * blocks, per = G / blocks, width = per * (C / G);          \
    int failed = 0;                                                                                            \
    _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(| : failed)")                    \
    for (int64_t i = 0; i < items; i++) {                                                                      \
        int64_t n = i / blocks, g0 = (i % blocks) * per, g1 = g0 + per;                                        \
        int rc;                                                                                                \
        switch (width) {                                                                                       \
            SPECIALISED_WIDTHS(CALL_F32, CALL_BF16)                                                            \
        default: ITEM(width, CALL_F32, CALL_BF16);                                                             \
        }                                                                                                      \
        failed |= rc != 0;                                                                                     \
    }                                                                                                          \
    return failed ? -2 : 0;

/* dtype: 0 float32, 1 bfloat16. threshold 0: no dropout. shift: NULL, or [N, C] float32 added to x first (for
 * bfloat16 x the sum is rounded to bfloat16, as torch's add would store it); the backward then writes its
 * gradient to dshift [N, C] (NULL: not wanted). */
int ddpm_gn_act_forward(int dtype, const void *x, void *y, const float *gamma, const float *beta, const float *shift,
                        float *mean, float *rstd, int64_t N, int64_t HW, int64_t C, int64_t G, float eps, int silu,
                        uint32_t threshold, float keep_scale, uint64_t seed, int threads) {
    RUN_ITEMS(forward_item_f32((const float *)x, (float *)y, gamma, beta, shift, mean, rstd, n, HW, C, G, g0, g1,
                               W, eps, silu, threshold, keep_scale, seed),
              forward_item_bf16((const bf16_t *)x, (bf16_t *)y, gamma, beta, shift, mean, rstd, n, HW, C, G, g0, g1,
                                W, eps, silu, threshold, keep_scale, seed))
}

int ddpm_gn_act_backward(int dtype, const void *dy, const void *x, const float *gamma, const float *beta,
                         const float *shift, const float *mean, const float *rstd, void *dx, float *sums,
                         float *dshift, int64_t N, int64_t HW, int64_t C, int64_t G, int silu, uint32_t threshold,
                         float keep_scale, uint64_t seed, int threads) {
    RUN_ITEMS(backward_item_f32((const float *)dy, (const float *)x, gamma, beta, shift, mean, rstd, (float *)dx,
                                sums, dshift, n, HW, C, G, g0, g1, W, silu, threshold, keep_scale, seed),
              backward_item_bf16((const bf16_t *)dy, (const bf16_t *)x, gamma, beta, shift, mean, rstd,
                                 (bf16_t *)dx, sums, dshift, n, HW, C, G, g0, g1, W, silu, threshold, keep_scale, seed))
}
