/* int8 weight x dynamically quantized activation GEMM for few rows (decode), AVX-512 VNNI.
 *
 * Built at run time by fitllm/quant/cpu_kernels.py (gcc, this file only, no PyTorch headers) and called
 * through ctypes. y[m, n] = sum_k x[m, k] * w[n, k] * scale[n].
 *
 * Why: PyTorch's int8 weight-only kernel converts every weight to float and multiplies in float, so at one
 * activation row it is bound by that arithmetic, not by reading the weight. Here each activation row is
 * quantized once per call into two int8 parts, x ~= sx * (hi + lo / 254) (about 16 bits relative to the
 * row's largest |x|, finer than bfloat16's 8-bit mantissa for the elements that dominate a dot product),
 * and the dot products are VNNI instructions (vpdpbusd: 64 u8 x s8 products per instruction). vpdpbusd
 * takes unsigned activations: hi + 128 and lo + 128 are stored, and 128 * sum_k w[n, k] (one more
 * vpdpbusd against ones) is taken off. The weight is read as it is stored ([N, K] int8, row-major).
 *
 * Threads: OpenMP over output rows, with the caller's thread count (PyTorch's libgomp is the one loaded).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1 };

#define PARALLEL_MIN (1 << 16)   /* weights per call below which one thread does it all */

static inline float load_f(const void *p, int dtype, int64_t i) {
    if (dtype == DT_BF16) {
        uint32_t u = (uint32_t)((const uint16_t *)p)[i] << 16;
        float f;
        memcpy(&f, &u, 4);
        return f;
    }
    return ((const float *)p)[i];
}

static inline void store_f(void *p, int dtype, int64_t i, float f) {
    if (dtype == DT_BF16) {
        uint32_t u;
        memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) {
            ((uint16_t *)p)[i] = (uint16_t)((u >> 16) | 0x40); /* NaN stays NaN */
        } else {
            u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even, as PyTorch's conversion */
            ((uint16_t *)p)[i] = (uint16_t)(u >> 16);
        }
    } else {
        ((float *)p)[i] = f;
    }
}

/* 16 elements of x from element i on (fewer at the tail: `mask`), as float. */
static inline __m512 load16(const void *x, int dtype, int64_t i, __mmask16 mask) {
    if (dtype == DT_BF16) {
        __m256i h = _mm256_maskz_loadu_epi16(mask, (const uint16_t *)x + i);
        return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    }
    return _mm512_maskz_loadu_ps(mask, (const float *)x + i);
}

/* Row `row_off` of x into hi/lo (biased by 128, padded to kp with the bias, i.e. zeros) and its scale. */
static void quantize_row(const void *x, int x_dtype, int64_t row_off, int64_t k, int64_t kp, uint8_t *hi,
                         uint8_t *lo, float *sx) {
    const void *base = x_dtype == DT_BF16 ? (const void *)((const uint16_t *)x + row_off)
                                          : (const void *)((const float *)x + row_off);
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        __mmask16 mask = (i + 16 <= k) ? (__mmask16)0xffff : (__mmask16)((1u << (k - i)) - 1);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(base, x_dtype, i, mask)));
    }
    float amax = _mm512_reduce_max_ps(vmax);
    float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / s), top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
    const __m512 spread = _mm512_set1_ps(254.0f);
    const __m512i bias = _mm512_set1_epi32(128);
    for (int64_t i = 0; i < kp; i += 16) {
        __mmask16 mask = (i + 16 <= k) ? (__mmask16)0xffff : (i < k ? (__mmask16)((1u << (k - i)) - 1) : 0);
        __m512 v = _mm512_mul_ps(load16(base, x_dtype, i, mask), inv);
        v = _mm512_min_ps(_mm512_max_ps(v, bottom), top);
        __m512 h = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), spread),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
        l = _mm512_min_ps(_mm512_max_ps(l, bottom), top);
        /* masked-off lanes are 0: stored as the bias, i.e. zero activations in the padding */
        _mm_storeu_si128((__m128i *)(hi + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(h), bias)));
        _mm_storeu_si128((__m128i *)(lo + i), _mm512_cvtepi32_epi8(_mm512_add_epi32(_mm512_cvtps_epi32(l), bias)));
    }
    *sx = s;
}

/* Output rows [j, j + C) for activation rows [0, R): R and C are constants at every call site, so the loops
 * over them unroll, the C * (1 + 2R) accumulators stay in registers, and the C weight rows' dependency
 * chains interleave (one row alone waits on vpdpbusd's latency). */
static inline __attribute__((always_inline)) void dot_block(const int8_t *w, int64_t ldw, int64_t k,
                                                            int64_t kp, const uint8_t *hi, const uint8_t *lo,
                                                            const float *sx, int R, int C, float *acc_out) {
    const __m512i ones = _mm512_set1_epi8(1);
    __m512i aw[4], ah[4][4], al[4][4];
    for (int c = 0; c < C; c++) {
        aw[c] = _mm512_setzero_si512();
        for (int r = 0; r < R; r++) {
            ah[c][r] = _mm512_setzero_si512();
            al[c][r] = _mm512_setzero_si512();
        }
    }
    for (int64_t i = 0; i < kp; i += 64) {
        __mmask64 mask = (i + 64 <= k) ? ~0ULL : ((1ULL << (k - i)) - 1);
        __m512i xh[4], xl[4];
        for (int r = 0; r < R; r++) {
            xh[r] = _mm512_load_si512(hi + r * kp + i);
            xl[r] = _mm512_load_si512(lo + r * kp + i);
        }
        for (int c = 0; c < C; c++) {
            __m512i wv = _mm512_maskz_loadu_epi8(mask, w + c * ldw + i);
            aw[c] = _mm512_dpbusd_epi32(aw[c], ones, wv);
            for (int r = 0; r < R; r++) {
                ah[c][r] = _mm512_dpbusd_epi32(ah[c][r], xh[r], wv);
                al[c][r] = _mm512_dpbusd_epi32(al[c][r], xl[r], wv);
            }
        }
    }
    const __m512 third = _mm512_set1_ps(1.0f / 254.0f);
    for (int c = 0; c < C; c++) {
        const __m512i bias = _mm512_slli_epi32(aw[c], 7); /* 128 * the weights' sum, per lane */
        for (int r = 0; r < R; r++) {
            __m512 h = _mm512_cvtepi32_ps(_mm512_sub_epi32(ah[c][r], bias));
            __m512 l = _mm512_cvtepi32_ps(_mm512_sub_epi32(al[c][r], bias));
            acc_out[r * 4 + c] = _mm512_reduce_add_ps(_mm512_fmadd_ps(l, third, h)) * sx[r];
        }
    }
}

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) . w[N, K]^T * scale[N]. Returns 0, or -1 when the
 * work buffer could not be had. */
int fitllm_int8_gemm(const void *x, int x_dtype, int64_t ldx, int64_t m, int64_t k, const int8_t *w,
                     const void *scale, int scale_dtype, int64_t n, void *y, int y_dtype, int64_t ldy,
                     int threads) {
    int64_t kp = (k + 63) / 64 * 64;
    uint8_t *hi = aligned_alloc(64, (size_t)(2 * m * kp + 64));
    float *sx = malloc((size_t)m * sizeof(float));
    if (!hi || !sx) {
        free(hi);
        free(sx);
        return -1;
    }
    uint8_t *lo = hi + m * kp;
    for (int64_t r = 0; r < m; r++) quantize_row(x, x_dtype, r * ldx, k, kp, hi + r * kp, lo + r * kp, sx + r);
    int nt = (n * k >= PARALLEL_MIN && threads > 1) ? threads : 1;
    int64_t blocks = (n + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t j = b * 4;
        int cols = n - j < 4 ? (int)(n - j) : 4;
        float acc[16];
        for (int64_t r0 = 0; r0 < m; r0 += 2) {
            int rows = m - r0 < 2 ? 1 : 2;
            const uint8_t *h = hi + r0 * kp, *l = lo + r0 * kp;
            /* constant (rows, cols) per call: each case compiles to its own unrolled block */
            if (rows == 2 && cols == 4) dot_block(w + j * k, k, k, kp, h, l, sx + r0, 2, 4, acc);
            else if (rows == 1 && cols == 4) dot_block(w + j * k, k, k, kp, h, l, sx + r0, 1, 4, acc);
            else if (rows == 2) for (int c = 0; c < cols; c++) dot_block(w + (j + c) * k, k, k, kp, h, l, sx + r0, 2, 1, acc + c);
            else for (int c = 0; c < cols; c++) dot_block(w + (j + c) * k, k, k, kp, h, l, sx + r0, 1, 1, acc + c);
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++)
                    store_f(y, y_dtype, (r0 + r) * ldy + j + c, acc[r * 4 + c] * load_f(scale, scale_dtype, j + c));
        }
    }
    free(hi);
    free(sx);
    return 0;
}
