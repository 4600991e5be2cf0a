/* A 3x3 convolution (stride 1, zero padding 1) over channels-last float32 tensors by Winograd's F(4x4, 3x3),
 * with the three stages fused per block of tiles so that the transformed tiles never leave the core's cache
 * (inference; in training the forward and the input gradient, ddpm.nn.winograd._FusedForward; the weight gradient
 * has its own entry, ddpm_winograd_weight_grad, below). Loaded with the group-norm kernel (same library, see
 * ddpm/nn/fused.py for the build).
 *
 * x [N][H][W][C] -> y [N][H][W][K], from filter tiles u [36][C][K] (G g G^T per (c, k), ddpm.nn.winograd's
 * filter_transform transposed) and an optional bias [K]. The output is cut into 4x4 tiles (the last row and
 * column of tiles cut short where H or W is not a multiple of 4); tile (ty, tx) reads the 6x6 input patch from
 * row 4 ty - 1 and column 4 tx - 1, zero outside the image. Per block of TB tiles, on one thread:
 *   V[36][TB][C] = B^T d B for each tile and channel (the input transform, rows then columns),
 *   M[p][TB][K] = V[p][TB][C] @ u[p][C][K] for each of the 36 positions p (a register-blocked product: 6 tiles
 *   by NV vectors of K at a time),
 *   y = A^T M A + bias on each tile's 4x4 outputs inside the image.
 * Where torch's Winograd (ddpm.nn.winograd._forward) writes V and M for a whole batch chunk to memory and reads
 * them back in separate operators, these stay in the cache: the memory traffic is x read once (the 6x6 patches
 * overlap, the rows come from cache) and y written once. Every output depends only on its own tile, so the
 * result does not depend on the block size or the number of threads.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#if defined(__AVX512F__)
#define VL 16
#elif defined(__AVX__)
#define VL 8
#else
#define VL 4
#endif
#define R 6 /* tiles per register block of the product */

typedef float vf __attribute__((vector_size(VL * sizeof(float)), aligned(sizeof(float))));

/* vf's alignment is a float's: these are unaligned vector loads and stores (memcpy here went through the stack
 * in gcc's AVX2 builds) */
static inline vf vload(const float *p) { return *(const vf *)p; }
static inline void vstore(float *p, vf v) { *(vf *)p = v; }

/* Rows of the input transform: r = B^T d for six rows d0..d5 of C channels each. */
#define INPUT_ROWS(T, LOAD, STORE, c)                                                                        \
    {                                                                                                        \
        T d0 = LOAD(d[0] + c), d1 = LOAD(d[1] + c), d2 = LOAD(d[2] + c), d3 = LOAD(d[3] + c);               \
        T d4 = LOAD(d[4] + c), d5 = LOAD(d[5] + c);                                                          \
        T a = d4 - 4.0f * d2, b = d3 - 4.0f * d1; /* rows 1 and 2 */                                        \
        T e = d4 - d2, f = 2.0f * (d3 - d1);      /* rows 3 and 4 */                                        \
        STORE(r[0] + c, 4.0f * d0 - 5.0f * d2 + d4);                                                         \
        STORE(r[1] + c, a + b);                                                                              \
        STORE(r[2] + c, a - b);                                                                              \
        STORE(r[3] + c, e + f);                                                                              \
        STORE(r[4] + c, e - f);                                                                              \
        STORE(r[5] + c, 4.0f * d1 - 5.0f * d3 + d5);                                                         \
    }
#define SLOAD(p) (*(p))
#define SSTORE(p, v) (*(p) = (v))

/* A row transform over n values: whole vectors, then the scalars past the last one (the same arithmetic). */
#define ROW_LOOP(ROWS, n)                                                                                    \
    {                                                                                                        \
        int64_t i = 0;                                                                                       \
        for (; i + VL <= (n); i += VL) ROWS(vf, vload, vstore, i)                                            \
        for (; i < (n); i++) ROWS(float, SLOAD, SSTORE, i)                                                   \
    }

static inline void input_rows(const float *const d[6], float *const r[6], int64_t C) ROW_LOOP(INPUT_ROWS, C)

/* Rows of the output transform: o = A^T m for six rows m0..m5 of K values (four out). */
#define OUTPUT_ROWS(T, LOAD, STORE, k)                                                                       \
    {                                                                                                        \
        T m0 = LOAD(m[0] + k), m1 = LOAD(m[1] + k), m2 = LOAD(m[2] + k), m3 = LOAD(m[3] + k);               \
        T m4 = LOAD(m[4] + k), m5 = LOAD(m[5] + k);                                                          \
        T s12 = m1 + m2, d12 = m1 - m2, s34 = m3 + m4, d34 = m3 - m4;                                        \
        STORE(o[0] + k, m0 + s12 + s34);                                                                     \
        STORE(o[1] + k, d12 + 2.0f * d34);                                                                   \
        STORE(o[2] + k, s12 + 4.0f * s34);                                                                   \
        STORE(o[3] + k, d12 + 8.0f * d34 + m5);                                                              \
    }

static inline void output_rows(const float *const m[6], float *const o[4], int64_t K) ROW_LOOP(OUTPUT_ROWS, K)

/* The input transform of tile (n, ty, tx) of x [N][H][W][C]: v[p * stride + c] for the 36 positions p, through
 * T[36][C] (rows of the patch through B^T, one patch column at a time, then the columns). */
static void input_tile(const float *x, int64_t n, int64_t ty, int64_t tx, int64_t H, int64_t W, int64_t C,
                       const float *zero, float *T, float *v, int64_t stride) {
    for (int b = 0; b < 6; b++) {
        int64_t col = 4 * tx - 1 + b;
        const float *d[6];
        float *r[6];
        for (int a = 0; a < 6; a++) {
            int64_t row = 4 * ty - 1 + a;
            d[a] = (row >= 0 && row < H && col >= 0 && col < W) ? x + ((n * H + row) * W + col) * C : zero;
            r[a] = T + (a * 6 + b) * C;
        }
        input_rows(d, r, C);
    }
    for (int i = 0; i < 6; i++) {
        const float *d[6];
        float *r[6];
        for (int j = 0; j < 6; j++) {
            d[j] = T + (i * 6 + j) * C;
            r[j] = v + (i * 6 + j) * stride;
        }
        input_rows(d, r, C);
    }
}

/* The output transform of tile (n, ty, tx) from its products m[p * stride + k]: A^T m A + bias into y [N][H][W][K],
 * the outputs past the image's edge into `sink`, through T[24][K] (the columns first, then the rows). */
static void output_tile(const float *m, int64_t stride, const float *bias, int64_t n, int64_t ty, int64_t tx,
                        int64_t H, int64_t W, int64_t K, float *T, float *sink, float *y) {
    for (int i = 0; i < 6; i++) {
        const float *r[6];
        float *o[4];
        for (int j = 0; j < 6; j++) r[j] = m + (i * 6 + j) * stride;
        for (int q = 0; q < 4; q++) o[q] = T + (i * 4 + q) * K;
        output_rows(r, o, K);
    }
    for (int q = 0; q < 4; q++) {
        int64_t col = 4 * tx + q;
        const float *r[6];
        float *o[4];
        for (int i = 0; i < 6; i++) r[i] = T + (i * 4 + q) * K;
        for (int p = 0; p < 4; p++) {
            int64_t row = 4 * ty + p;
            o[p] = (row < H && col < W) ? y + ((n * H + row) * W + col) * K : sink;
        }
        output_rows(r, o, K);
        if (bias)
            for (int p = 0; p < 4; p++) {
                float *restrict out = o[p];
                for (int64_t k = 0; k < K; k++) out[k] += bias[k];
            }
    }
}

/* Rows of the output gradient's transform: r = A g for four rows g0..g3 of K values (six out; A = (A^T)^T). */
#define GRAD_ROWS(T, LOAD, STORE, k)                                                                         \
    {                                                                                                        \
        T g0 = LOAD(g[0] + k), g1 = LOAD(g[1] + k), g2 = LOAD(g[2] + k), g3 = LOAD(g[3] + k);               \
        T s02 = g0 + g2, s13 = g1 + g3, f02 = g0 + 4.0f * g2, f13 = 2.0f * g1 + 8.0f * g3;                 \
        STORE(r[0] + k, g0);                                                                                 \
        STORE(r[1] + k, s02 + s13);                                                                          \
        STORE(r[2] + k, s02 - s13);                                                                          \
        STORE(r[3] + k, f02 + f13);                                                                          \
        STORE(r[4] + k, f02 - f13);                                                                          \
        STORE(r[5] + k, g3);                                                                                 \
    }

static inline void grad_rows(const float *const g[4], float *const r[6], int64_t K) ROW_LOOP(GRAD_ROWS, K)

/* A g A^T for tile (n, ty, tx) of the output gradient gy [N][H][W][K] (zero outside the image): m[p * stride + k]
 * for the 36 positions, through T[24][K]. The products' gradient: the forward's y = A^T m A. */
static void grad_tile(const float *gy, int64_t n, int64_t ty, int64_t tx, int64_t H, int64_t W, int64_t K,
                      const float *zero, float *T, float *m, int64_t stride) {
    for (int q = 0; q < 4; q++) {
        int64_t col = 4 * tx + q;
        const float *g[4];
        float *r[6];
        for (int a = 0; a < 4; a++) {
            int64_t row = 4 * ty + a;
            g[a] = (row < H && col < W) ? gy + ((n * H + row) * W + col) * K : zero;
        }
        for (int i = 0; i < 6; i++) r[i] = T + (i * 4 + q) * K;
        grad_rows(g, r, K);
    }
    for (int i = 0; i < 6; i++) {
        const float *g[4];
        float *r[6];
        for (int q = 0; q < 4; q++) g[q] = T + (i * 4 + q) * K;
        for (int j = 0; j < 6; j++) r[j] = m + (i * 6 + j) * stride;
        grad_rows(g, r, K);
    }
}

/* out[r][NV vectors] (+= where ADD) the sum over s < S of v[AT] times the NV vectors at w + s ldw, for the R rows r
 * of a register block, AT an expression of r, s and ldv fixed at compile time (runtime strides measured 3-9%
 * slower): the forward's products (v the block's input tiles, rows r = tiles, s = channels: AT = r ldv + s) and
 * the weight gradient's (rows r = channels, s = tiles: AT = s ldv + r). */
#define PRODUCT(NAME, NV, AT, ADD)                                                                           \
    static void NAME##_##NV(const float *restrict v, int64_t ldv, const float *restrict w, int64_t ldw,     \
                            float *restrict out, int64_t ldo, int64_t S) {                                   \
        vf acc[R][NV];                                                                                       \
        for (int r = 0; r < R; r++)                                                                          \
            for (int j = 0; j < NV; j++) acc[r][j] = (vf){0};                                                \
        for (int64_t s = 0; s < S; s++) {                                                                    \
            vf u[NV];                                                                                        \
            for (int j = 0; j < NV; j++) u[j] = vload(w + s * ldw + j * VL);                                 \
            for (int r = 0; r < R; r++) {                                                                    \
                float b = v[AT]; /* broadcast */                                                             \
                for (int j = 0; j < NV; j++) acc[r][j] += b * u[j];                                          \
            }                                                                                                \
        }                                                                                                    \
        for (int r = 0; r < R; r++)                                                                          \
            for (int j = 0; j < NV; j++)                                                                     \
                vstore(out + r * ldo + j * VL, ADD ? vload(out + r * ldo + j * VL) + acc[r][j] : acc[r][j]); \
    }
/* The family's four widths and their dispatch by the number of vectors left in the row. */
#define PRODUCTS(NAME, AT, ADD)                                                                              \
    PRODUCT(NAME, 1, AT, ADD)                                                                                \
    PRODUCT(NAME, 2, AT, ADD)                                                                                \
    PRODUCT(NAME, 3, AT, ADD)                                                                                \
    PRODUCT(NAME, 4, AT, ADD)                                                                                \
    static void NAME(int64_t nv, const float *v, int64_t ldv, const float *w, int64_t ldw, float *out,      \
                     int64_t ldo, int64_t S) {                                                               \
        switch (nv) {                                                                                        \
        case 1: NAME##_1(v, ldv, w, ldw, out, ldo, S); break;                                                \
        case 2: NAME##_2(v, ldv, w, ldw, out, ldo, S); break;                                                \
        case 3: NAME##_3(v, ldv, w, ldw, out, ldo, S); break;                                                \
        default: NAME##_4(v, ldv, w, ldw, out, ldo, S); break;                                               \
        }                                                                                                    \
    }
PRODUCTS(forward_block, r * ldv + s, 0)
PRODUCTS(weight_block, s * ldv + r, 1)
PRODUCTS(weight_first, s * ldv + r, 0)

#if VL == 16
#define NV_MAX 4
#else
#define NV_MAX 2
#endif

static void products(const float *v, const float *u, float *m, int64_t TB, int64_t C, int64_t K) {
    for (int64_t r0 = 0; r0 < TB; r0 += R)
        for (int64_t k0 = 0; k0 < K; k0 += NV_MAX * VL) {
            int64_t nv = (K - k0) / VL < NV_MAX ? (K - k0) / VL : NV_MAX;
            forward_block(nv, v + r0 * C, C, u + k0, K, m + r0 * K + k0, K, C);
        }
}

static float *aligned_floats(int64_t n) {
    size_t bytes = ((size_t)n * sizeof(float) + 63) & ~(size_t)63;
    return (float *)aligned_alloc(64, bytes ? bytes : 64);
}

/* The vector width in floats this build was compiled for: K must be a multiple of it. */
int ddpm_winograd_vector_width(void) { return VL; }

/* Returns 0, -1 for arguments refused (K not a multiple of the vector width, a block not a multiple of R), -2
 * when out of memory. */
int ddpm_winograd_forward(const float *x, const float *u, const float *bias, float *y, int64_t N, int64_t H,
                          int64_t W, int64_t C, int64_t K, int64_t TB, int threads) {
    if (N < 0 || H <= 0 || W <= 0 || C <= 0 || K <= 0 || K % VL || TB <= 0 || TB % R) return -1;
    int64_t th = (H + 3) / 4, tw = (W + 3) / 4, tiles = N * th * tw;
    int64_t blocks = (tiles + TB - 1) / TB;
    if (threads < 1) threads = 1;
    if (threads > blocks) threads = blocks > 0 ? (int)blocks : 1;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        int64_t width = C > K ? C : K;
        float *V = aligned_floats(36 * TB * C), *M = aligned_floats(36 * TB * K);
        float *T = aligned_floats(36 * width), *zero = aligned_floats(width), *sink = aligned_floats(K);
        if (!V || !M || !T || !zero || !sink) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(zero, 0, (size_t)width * sizeof(float));
            memset(V, 0, (size_t)(36 * TB * C) * sizeof(float)); /* rows past the last tile: finite */
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < blocks; blk++) {
                int64_t t0 = blk * TB, nt = tiles - t0 < TB ? tiles - t0 : TB;
                for (int64_t t = 0; t < nt; t++) {
                    int64_t id = t0 + t;
                    input_tile(x, id / (th * tw), id / tw % th, id % tw, H, W, C, zero, T, V + t * C, TB * C);
                }
                for (int p = 0; p < 36; p++) products(V + p * TB * C, u + p * C * K, M + p * TB * K, TB, C, K);
                for (int64_t t = 0; t < nt; t++) {
                    int64_t id = t0 + t;
                    output_tile(M + t * K, TB * K, bias, id / (th * tw), id / tw % th, id % tw, H, W, K, T, sink, y);
                }
            }
        }
        free(V);
        free(M);
        free(T);
        free(zero);
        free(sink);
    }
    return failed ? -2 : 0;
}

/* gu[p][Cp][K] (+= where add, else =) V[p][TB][Cp]^T @ G[p][TB][K] for the 36 positions. */
static void weight_products(const float *V, const float *G, float *gu, int64_t TB, int64_t Cp, int64_t K, int add) {
    for (int p = 0; p < 36; p++)
        for (int64_t k0 = 0; k0 < K; k0 += NV_MAX * VL)
            for (int64_t c0 = 0; c0 < Cp; c0 += R) {
                int64_t nv = (K - k0) / VL < NV_MAX ? (K - k0) / VL : NV_MAX;
                const float *v = V + p * TB * Cp + c0, *g = G + p * TB * K + k0;
                float *out = gu + (p * Cp + c0) * K + k0;
                if (add)
                    weight_block(nv, v, Cp, g, K, out, K, TB);
                else
                    weight_first(nv, v, Cp, g, K, out, K, TB);
            }
}

/* The weight gradient of the convolution in the transformed domain: gu[36][C][K] = the sum over all tiles of
 * V^T G, V the input tiles' transform (as in the forward) and G = A g A^T the output gradient's tiles'; the caller
 * maps it back through G^T . G. Each thread sums its blocks of tiles into its own part of `parts` (scratch,
 * threads x 36 x Cp x K floats, Cp = C rounded up to R; the first block is stored, the rest added), then the
 * threads add the parts in thread order, each over a share of gu. Blocks go to threads in a static schedule, so
 * the sums' order depends on the block size and the number of threads only. Returns 0, -1 for arguments refused,
 * -2 when out of memory. */
int ddpm_winograd_weight_grad(const float *x, const float *gy, float *gu, float *parts, int64_t N, int64_t H,
                              int64_t W, int64_t C, int64_t K, int64_t TB, int threads) {
    if (N <= 0 || H <= 0 || W <= 0 || C <= 0 || K <= 0 || K % VL || TB <= 0 || threads < 1) return -1;
    int64_t Cp = (C + R - 1) / R * R;
    int64_t th = (H + 3) / 4, tw = (W + 3) / 4, tiles = N * th * tw;
    int64_t blocks = (tiles + TB - 1) / TB;
    if (threads > blocks) threads = (int)blocks; /* every thread of the team then has a block */
    int failed = 0, team = 1;
#pragma omp parallel num_threads(threads)
    {
        int64_t width = Cp > K ? Cp : K;
        float *V = aligned_floats(36 * TB * Cp), *G = aligned_floats(36 * TB * K);
        float *T = aligned_floats(36 * width), *zero = aligned_floats(width);
#pragma omp single
        team = omp_get_num_threads();
        if (!V || !G || !T || !zero) {
#pragma omp atomic write
            failed = 1;
        } else {
            memset(zero, 0, (size_t)width * sizeof(float));
            /* the padding channels and the rows past the last tile stay zero: they add nothing */
            memset(V, 0, (size_t)(36 * TB * Cp) * sizeof(float));
            memset(G, 0, (size_t)(36 * TB * K) * sizeof(float));
        }
#pragma omp barrier
        if (!failed) {
            float *part = parts + (int64_t)omp_get_thread_num() * 36 * Cp * K;
            int first = 1;
#pragma omp for schedule(static)
            for (int64_t blk = 0; blk < blocks; blk++) {
                int64_t t0 = blk * TB, nt = tiles - t0 < TB ? tiles - t0 : TB;
                for (int64_t t = 0; t < nt; t++) {
                    int64_t id = t0 + t, n = id / (th * tw), ty = id / tw % th, tx = id % tw;
                    input_tile(x, n, ty, tx, H, W, C, zero, T, V + t * Cp, TB * Cp);
                    grad_tile(gy, n, ty, tx, H, W, K, zero, T, G + t * K, TB * K);
                }
                if (nt < TB)
                    for (int p = 0; p < 36; p++) {
                        memset(V + (p * TB + nt) * Cp, 0, (size_t)((TB - nt) * Cp) * sizeof(float));
                        memset(G + (p * TB + nt) * K, 0, (size_t)((TB - nt) * K) * sizeof(float));
                    }
                weight_products(V, G, part, TB, Cp, K, !first);
                first = 0;
            }
            /* (the loop's end is a barrier: every part is complete) */
#pragma omp for schedule(static)
            for (int64_t row = 0; row < 36 * C; row++) {
                int64_t p = row / C, c = row % C;
                const float *src = parts + (p * Cp + c) * K;
                float *dst = gu + row * K;
                memcpy(dst, src, (size_t)K * sizeof(float));
                for (int t = 1; t < team; t++)
                    for (int64_t k = 0; k < K; k++) dst[k] += src[(int64_t)t * 36 * Cp * K + k];
            }
        }
        free(V);
        free(G);
        free(T);
        free(zero);
    }
    return failed ? -2 : 0;
}
