/* Decode-size GEMMs for CPU (few activation rows): int8 and int4 weights through AVX-512 VNNI, bfloat16
 * weights through AVX-512 BF16.
 *
 * Built at run time by fitllm/quant/cpu_kernels.py (gcc, this file only, no PyTorch headers) and called
 * through ctypes. y[m, n] = sum_k x[m, k] * w[n, k] (* scale[n] for int8).
 *
 * Why int8: PyTorch's int8 weight-only kernel converts every weight to float and multiplies in float, so at one
 * activation row it is bound by that arithmetic, not by reading the weight. Here each activation row is
 * quantized once per call into two int8 parts, x ~= sx * (hi + lo / 254) (about 16 bits relative to the
 * row's largest |x|, finer than bfloat16's 8-bit mantissa for the elements that dominate a dot product),
 * and the dot products are VNNI instructions (vpdpbusd: 64 u8 x s8 products per instruction). vpdpbusd
 * takes unsigned activations: hi + 128 and lo + 128 are stored, and 128 * sum_k w[n, k] (one more
 * vpdpbusd against ones) is taken off. The weight is read as it is stored ([N, K] int8, row-major).
 *
 * Why bfloat16 (the last section): at one row oneDNN's bfloat16 matmul reads the weight at 8-15 GB/s on this
 * project's machines; vdpbf16ps over four weight rows at once reads it at ~20 GB/s.
 *
 * Threads: OpenMP over output rows, with the caller's thread count (PyTorch's libgomp is the one loaded).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define PARALLEL_MIN (1 << 16)   /* weights per call below which one thread does it all */
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 2048      /* how far ahead in a weight stream the kernels prefetch */
#endif

/* Row `row_off` of x into hi/lo (plus `offset`: 128 where they are vpdpbusd's unsigned operand; padded to kp
 * with the offset, i.e. zeros) and its scale. */
static void quantize_row(const void *x, int x_dtype, int64_t row_off, int64_t k, int64_t kp, uint8_t *hi,
                         uint8_t *lo, float *sx, int offset) {
    const void *base = x_dtype == DT_BF16 ? (const void *)((const uint16_t *)x + row_off)
                                          : (const void *)((const float *)x + row_off);
    __m512 vmax = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
        __mmask16 mask = tail16(i, k);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(load16(base, x_dtype, i, mask)));
    }
    float amax = _mm512_reduce_max_ps(vmax);
    float s = amax > 0.0f ? amax / 127.0f : 1.0f;
    const __m512 inv = _mm512_set1_ps(1.0f / s), top = _mm512_set1_ps(127.0f), bottom = _mm512_set1_ps(-127.0f);
    const __m512 spread = _mm512_set1_ps(254.0f);
    const __m512i bias = _mm512_set1_epi32(offset);
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
            _mm_prefetch((const char *)(w + c * ldw + i + PREFETCH_BYTES), _MM_HINT_T0); /* rows are one stream */
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
    for (int64_t r = 0; r < m; r++) quantize_row(x, x_dtype, r * ldx, k, kp, hi + r * kp, lo + r * kp, sx + r, 128);
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

/* ---- int4 in PyTorch's CPU int4 layout (aten._weight_int4pack_mm_for_cpu; fitllm/quant/int4.py) ----------
 * packed.view(n / 64, k, 32): byte j of input channel c in block b holds output row 64b + j in its low nibble
 * and 64b + 32 + j in its high one; scale_zeros bfloat16 [k / group, n, 2], w = (q - 8) * scale + zero.
 * Per group, y += scale * sum(x q) + (zero - 8 scale) * sum(x). The nibbles are the unsigned operand of
 * vpdpbusd as they are (0..15) and the activation parts the signed one (no bias to take off); output rows are
 * the lanes: vpermt2b gathers, for 16 rows, the codes of 4 consecutive input channels into each lane. */

static inline float sum_group(const int8_t *v, int64_t n) {
    int s = 0;
    for (int64_t i = 0; i < n; i++) s += v[i];
    return (float)s;
}

/* Output rows [64b, 64b + 64) for activation rows [r0, r0 + R): R (1 or 2) is a constant at each call, and
 * the R rows share each unpacking of the codes (loads, nibble masks, vpermt2b). */
static inline __attribute__((always_inline, target("avx512vbmi"))) void int4_rows(
    const uint8_t *wb, int64_t k, int64_t group, int64_t n, int64_t b, const uint16_t *scale_zeros,
    const int8_t *hi, const int8_t *lo, const float *sx, const float *gsum, int64_t r0, int R, __m512i idx0,
    __m512i idx1, void *y, int y_dtype) {
    const __m512i nib = _mm512_set1_epi8(0x0f), high_half = _mm512_set1_epi32((int)0xffff0000u);
    const __m512 third = _mm512_set1_ps(1.0f / 254.0f), eight = _mm512_set1_ps(8.0f);
    int64_t groups = k / group;
    __m512 yv[2][4];
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) yv[r][c] = _mm512_setzero_ps();
    for (int64_t g = 0; g < groups; g++) {
        __m512i ah[2][4], al[2][4];
        for (int r = 0; r < R; r++)
            for (int c = 0; c < 4; c++) {
                ah[r][c] = _mm512_setzero_si512();
                al[r][c] = _mm512_setzero_si512();
            }
        for (int64_t i = g * group; i < (g + 1) * group; i += 4) {
            /* the block's codes are one stream: ask for them PREFETCH_BYTES ahead (cold weights: decode) */
            _mm_prefetch((const char *)(wb + i * 32 + PREFETCH_BYTES), _MM_HINT_T0);
            _mm_prefetch((const char *)(wb + i * 32 + PREFETCH_BYTES + 64), _MM_HINT_T0);
            __m512i a = _mm512_loadu_si512(wb + i * 32), bb = _mm512_loadu_si512(wb + i * 32 + 64);
            __m512i al_ = _mm512_and_si512(a, nib), bl_ = _mm512_and_si512(bb, nib);
            __m512i ah_ = _mm512_and_si512(_mm512_srli_epi16(a, 4), nib);
            __m512i bh_ = _mm512_and_si512(_mm512_srli_epi16(bb, 4), nib);
            __m512i wv[4] = {_mm512_permutex2var_epi8(al_, idx0, bl_), _mm512_permutex2var_epi8(al_, idx1, bl_),
                             _mm512_permutex2var_epi8(ah_, idx0, bh_), _mm512_permutex2var_epi8(ah_, idx1, bh_)};
            for (int r = 0; r < R; r++) {
                int32_t h4, l4;
                memcpy(&h4, hi + (r0 + r) * k + i, 4);
                memcpy(&l4, lo + (r0 + r) * k + i, 4);
                __m512i vh = _mm512_set1_epi32(h4), vl = _mm512_set1_epi32(l4);
                for (int c = 0; c < 4; c++) {
                    ah[r][c] = _mm512_dpbusd_epi32(ah[r][c], wv[c], vh);
                    al[r][c] = _mm512_dpbusd_epi32(al[r][c], wv[c], vl);
                }
            }
        }
        for (int c = 0; c < 4; c++) {
            /* 16 (scale, zero) bfloat16 pairs of rows 64b + 16c.., one pair per 32-bit lane */
            __m512i pairs = _mm512_loadu_si512(scale_zeros + 2 * (g * n + b * 64 + 16 * c));
            __m512 sc = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
            __m512 ze = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
            __m512 offset = _mm512_fnmadd_ps(eight, sc, ze); /* zero - 8 scale */
            for (int r = 0; r < R; r++) {
                __m512 f = _mm512_fmadd_ps(_mm512_cvtepi32_ps(al[r][c]), third, _mm512_cvtepi32_ps(ah[r][c]));
                yv[r][c] = _mm512_fmadd_ps(f, _mm512_mul_ps(sc, _mm512_set1_ps(sx[r0 + r])), yv[r][c]);
                yv[r][c] = _mm512_fmadd_ps(offset, _mm512_set1_ps(gsum[(r0 + r) * groups + g]), yv[r][c]);
            }
        }
    }
    for (int r = 0; r < R; r++)
        for (int c = 0; c < 4; c++) {
            float out[16];
            _mm512_storeu_ps(out, yv[r][c]);
            for (int i = 0; i < 16; i++) store_f(y, y_dtype, (r0 + r) * n + b * 64 + 16 * c + i, out[i]);
        }
}

__attribute__((target("avx512vbmi"))) int fitllm_int4_gemm(const void *x, int x_dtype, int64_t m, int64_t k,
                                                           const uint8_t *w, const uint16_t *scale_zeros,
                                                           int64_t group, int64_t n, void *y, int y_dtype,
                                                           int threads) {
    if (n % 64 || k % group || group % 4) return -2;
    int64_t groups = k / group;
    int8_t *hi = aligned_alloc(64, (size_t)(2 * m * k + 64) / 64 * 64 + 64);
    float *sx = malloc((size_t)m * sizeof(float));
    float *gsum = malloc((size_t)(m * groups) * sizeof(float));
    if (!hi || !sx || !gsum) {
        free(hi);
        free(sx);
        free(gsum);
        return -1;
    }
    int8_t *lo = hi + m * k;
    int64_t kp = (k + 15) / 16 * 16;
    int8_t *tmp_hi = aligned_alloc(64, (size_t)(2 * kp + 64) / 64 * 64 + 64);
    if (!tmp_hi) {
        free(hi);
        free(sx);
        free(gsum);
        return -1;
    }
    for (int64_t r = 0; r < m; r++) {
        quantize_row(x, x_dtype, r * k, k, kp, (uint8_t *)tmp_hi, (uint8_t *)tmp_hi + kp, sx + r, 0);
        memcpy(hi + r * k, tmp_hi, (size_t)k);
        memcpy(lo + r * k, tmp_hi + kp, (size_t)k);
        for (int64_t g = 0; g < groups; g++) /* sum of the group's activations as the kernel sees them */
            gsum[r * groups + g] = sx[r] * (sum_group(hi + r * k + g * group, group) +
                                            sum_group(lo + r * k + g * group, group) / 254.0f);
    }
    free(tmp_hi);
    uint8_t idx_bytes[2][64];
    for (int half = 0; half < 2; half++)
        for (int i = 0; i < 16; i++)
            for (int t = 0; t < 4; t++) idx_bytes[half][4 * i + t] = (uint8_t)(32 * t + i + 16 * half);
    const __m512i idx0 = _mm512_loadu_si512(idx_bytes[0]), idx1 = _mm512_loadu_si512(idx_bytes[1]);
    int64_t blocks = n / 64;
    int nt = (n * k >= PARALLEL_MIN && threads > 1) ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t r = 0;
        for (; r + 2 <= m; r += 2)
            int4_rows(w + b * k * 32, k, group, n, b, scale_zeros, hi, lo, sx, gsum, r, 2, idx0, idx1, y, y_dtype);
        if (r < m) int4_rows(w + b * k * 32, k, group, n, b, scale_zeros, hi, lo, sx, gsum, r, 1, idx0, idx1, y, y_dtype);
    }
    free(hi);
    free(sx);
    free(gsum);
    return 0;
}

/* ---- dequantization into a scratch (prefill-sized calls multiply there with the dense GEMM) --------------
 * out[j, :] = w[j, :] * scale[j] in float32 or bfloat16 (rounded to nearest even), rows [0, n). PyTorch's
 * int8 -> bfloat16 copy followed by a multiply of the product by the scales took longer than the GEMM. */
int fitllm_int8_dequant(const int8_t *w, const void *scale, int scale_dtype, int64_t n, int64_t k, void *out,
                        int out_dtype, int threads) {
    int nt = (n * k >= PARALLEL_MIN && threads > 1) ? threads : 1;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t j = 0; j < n; j++) {
        const __m512 s = _mm512_set1_ps(load_f(scale, scale_dtype, j));
        const int8_t *row = w + j * k;
        for (int64_t i = 0; i < k; i += 16) {
            __mmask16 mask = tail16(i, k);
            __m512 v = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(mask, row + i))), s);
            if (out_dtype == DT_BF16) {
                __m512i u = _mm512_castps_si512(v);
                __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
                _mm256_mask_storeu_epi16((uint16_t *)out + j * k + i, mask, _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16)));
            } else {
                _mm512_mask_storeu_ps((float *)out + j * k + i, mask, v);
            }
        }
    }
    return 0;
}

/* W^T [k, n] in bfloat16 from a weight in PyTorch's CPU int4 layout (n a multiple of 64): each element
 * (q - 8) * scale + zero, multiplied and added in float32 (not fused) and rounded once, exactly what
 * fitllm/quant/int4.py's unpack_kernel_layout writes, in one pass instead of its five. */
int fitllm_int4_unpack_t(const uint8_t *w, const uint16_t *scale_zeros, int64_t group, int64_t n, int64_t k,
                         uint16_t *out, int threads) {
    if (n % 64 || k % group) return -2;
    int nt = (n * k >= PARALLEL_MIN && threads > 1) ? threads : 1;
    int64_t blocks = n / 64, groups = k / group;
    const __m512i high_half = _mm512_set1_epi32((int)0xffff0000u), nib = _mm512_set1_epi32(0x0f);
    const __m512 eight = _mm512_set1_ps(8.0f);
#pragma omp parallel for collapse(2) schedule(static) num_threads(nt)
    for (int64_t g = 0; g < groups; g++) {
        for (int64_t b = 0; b < blocks; b++) {
            __m512 sc[4], ze[4];
            for (int c = 0; c < 4; c++) {
                __m512i pairs = _mm512_loadu_si512(scale_zeros + 2 * (g * n + b * 64 + 16 * c));
                sc[c] = _mm512_castsi512_ps(_mm512_slli_epi32(pairs, 16));
                ze[c] = _mm512_castsi512_ps(_mm512_and_si512(pairs, high_half));
            }
            for (int64_t i = g * group; i < (g + 1) * group; i++) {
                const uint8_t *src = w + (b * k + i) * 32;
                uint16_t *dst = out + i * n + b * 64;
                for (int c = 0; c < 4; c++) {
                    __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(src + 16 * (c & 1))));
                    __m512i q = c < 2 ? _mm512_and_si512(bytes, nib) : _mm512_srli_epi32(bytes, 4);
                    __m512 v = _mm512_mul_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(q), eight), sc[c]);
                    store16(dst, DT_BF16, 16 * c, _mm512_add_ps(v, ze[c]), 0xffff);
                }
            }
        }
    }
    return 0;
}

/* A float32 model's int4 layer (the plain layout: byte j of row r holds channel 2j in its low nibble, 2j + 1 in
 * its high one; scale_zeros float32 [k / group, n, 2]) dequantized to out [n, k] float32, each element
 * (q - 8) * scale + zero rounded as int4.dequantize_int4 rounds it (a multiply, then an add: no FMA, this file
 * is built with -ffp-contract=off). Why: PyTorch's elementwise passes over the whole weight cost ~2 ms a
 * layer on this project's machines, every call; this is one pass. Returns -2 for a group not a multiple of
 * 32. */
int fitllm_int4_plain_dequant_f32(const uint8_t *w, const float *scale_zeros, int64_t group, int64_t n,
                                  int64_t k, float *out, int threads) {
    if (group % 32 || k % group) return -2;
    int nt = (n * k >= PARALLEL_MIN && threads > 1) ? threads : 1;
    int64_t groups = k / group;
    const __m512i nib = _mm512_set1_epi32(0x0f);
    const __m512 eight = _mm512_set1_ps(8.0f);
    /* element i of the low nibbles' floats goes to 2i, of the high ones' to 2i + 1 */
    const __m512i first = _mm512_set_epi32(23, 7, 22, 6, 21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
    const __m512i second = _mm512_set_epi32(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8);
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t r = 0; r < n; r++) {
        const uint8_t *row = w + r * (k / 2);
        float *dst = out + r * k;
        for (int64_t g = 0; g < groups; g++) {
            const __m512 sc = _mm512_set1_ps(scale_zeros[2 * (g * n + r)]);
            const __m512 ze = _mm512_set1_ps(scale_zeros[2 * (g * n + r) + 1]);
            for (int64_t j = g * group / 2; j < (g + 1) * group / 2; j += 16) {
                __m512i bytes = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)(row + j)));
                __m512 lo = _mm512_cvtepi32_ps(_mm512_and_si512(bytes, nib));
                __m512 hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(bytes, 4));
                lo = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(lo, eight), sc), ze);
                hi = _mm512_add_ps(_mm512_mul_ps(_mm512_sub_ps(hi, eight), sc), ze);
                _mm512_storeu_ps(dst + 2 * j, _mm512_permutex2var_ps(lo, first, hi));
                _mm512_storeu_ps(dst + 2 * j + 16, _mm512_permutex2var_ps(lo, second, hi));
            }
        }
    }
    return 0;
}

/* ---- bfloat16 weights: y = x W^T with x, W and y bfloat16 ------------------------------------------------
 * vdpbf16ps multiplies bfloat16 pairs exactly and accumulates in float32, as PyTorch's bfloat16 matmul does
 * (its sums differ from these only in order); each output is rounded to bfloat16 once, and is the same bits
 * whatever the number of rows in the call (batch-invariant). The weight is read as it is stored ([N, K]
 * row-major); 4 weight rows at a time interleave their dependency chains, and each block of weight rows is
 * read once for all R activation rows. A tail of K (odd K included) is masked to zeros. */

static inline __attribute__((always_inline, target("avx512bf16"))) void bf16_block(
    const uint16_t *w, int64_t ldw, int64_t k, const uint16_t *x, int64_t ldx, int R, int C, float *acc_out) {
    __m512 acc[4][4];
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) acc[c][r] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 32) {
        __mmask32 mask = (i + 32 <= k) ? ~0u : ((1u << (k - i)) - 1);
        __m512i xv[4];
        for (int r = 0; r < R; r++) xv[r] = _mm512_maskz_loadu_epi16(mask, x + r * ldx + i);
        for (int c = 0; c < C; c++) {
            _mm_prefetch((const char *)(w + c * ldw + i) + PREFETCH_BYTES, _MM_HINT_T0);
            __m512i wv = _mm512_maskz_loadu_epi16(mask, w + c * ldw + i);
            for (int r = 0; r < R; r++)
                acc[c][r] = _mm512_dpbf16_ps(acc[c][r], (__m512bh)wv, (__m512bh)xv[r]);
        }
    }
    /* All sums through one reduction whatever R and C (absent ones zero): each sum is added up in the same
     * order however many rows share the call, so a row's result does not depend on its batch. */
    __m512 v[16];
    for (int i = 0; i < 16; i++) v[i] = _mm512_setzero_ps();
    for (int c = 0; c < C; c++)
        for (int r = 0; r < R; r++) v[r * 4 + c] = acc[c][r];
    _mm512_storeu_ps(acc_out, reduce16(v));
}

/* y[M, N] (row stride ldy) = x[M, K] (row stride ldx) . w[N, K]^T, all bfloat16. Returns 0. */
__attribute__((target("avx512bf16"))) int fitllm_bf16_gemm(const uint16_t *x, int64_t ldx, int64_t m, int64_t k,
                                                           const uint16_t *w, int64_t n, uint16_t *y, int64_t ldy,
                                                           int threads) {
    int nt = (n * k >= PARALLEL_MIN && threads > 1) ? threads : 1;
    int64_t blocks = (n + 3) / 4;
#pragma omp parallel for schedule(static) num_threads(nt)
    for (int64_t b = 0; b < blocks; b++) {
        int64_t j = b * 4;
        int cols = n - j < 4 ? (int)(n - j) : 4;
        float acc[16];
        for (int64_t r0 = 0; r0 < m; r0 += 4) {
            int rows = m - r0 < 4 ? (int)(m - r0) : 4;
            const uint16_t *xr = x + r0 * ldx;
            /* constant (rows, cols) per call: each case compiles to its own unrolled block */
            if (cols == 4) {
                if (rows == 4) bf16_block(w + j * k, k, k, xr, ldx, 4, 4, acc);
                else if (rows == 3) bf16_block(w + j * k, k, k, xr, ldx, 3, 4, acc);
                else if (rows == 2) bf16_block(w + j * k, k, k, xr, ldx, 2, 4, acc);
                else bf16_block(w + j * k, k, k, xr, ldx, 1, 4, acc);
            } else {
                for (int c = 0; c < cols; c++) {
                    float one[16];
                    for (int r = 0; r < rows; r++) {
                        bf16_block(w + (j + c) * k, k, k, xr + r * ldx, ldx, 1, 1, one);
                        acc[r * 4 + c] = one[0];
                    }
                }
            }
            for (int r = 0; r < rows; r++)
                for (int c = 0; c < cols; c++) store_f(y, DT_BF16, (r0 + r) * ldy + j + c, acc[r * 4 + c]);
        }
    }
    return 0;
}
