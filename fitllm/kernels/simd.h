/* What fitllm's C kernels share: their dtype codes and AVX-512 loads, stores and reductions.
 * Included by every kernel source; fitllm/quant/cpu_kernels.py hashes it into each build. */
#ifndef FITLLM_SIMD_H
#define FITLLM_SIMD_H

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

enum { DT_F32 = 0, DT_BF16 = 1 };

/* How a KV cache holds its rows (decode_attention.c's kv_kind): in the compute dtype, or as int8 codes followed
 * by their float32 scale (--kv-cache-dtype int8, fitllm/memory/kv/format.py). */
enum { KV_SAME = 0, KV_INT8 = 1 };
#define KV_SCALE_BYTES 4 /* an int8 cache row's float32 scale */

/* The lanes of a 16-element step at element i of n that are inside n. */
static inline __mmask16 tail16(int64_t i, int64_t n) {
    return (i + 16 <= n) ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
}

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

/* 16 floats (fewer at the tail: `mask`) stored at element i of p in `dtype`: bfloat16 rounded as store_f
 * rounds (to nearest even, NaN kept NaN). */
static inline void store16(void *p, int dtype, int64_t i, __m512 v, __mmask16 mask) {
    if (dtype != DT_BF16) {
        _mm512_mask_storeu_ps((float *)p + i, mask, v);
        return;
    }
    __m512i u = _mm512_castps_si512(v);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i rounded = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    __m512i nan = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    rounded = _mm512_mask_blend_epi32(_mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), rounded, nan);
    _mm256_mask_storeu_epi16((uint16_t *)p + i, mask, _mm512_cvtepi32_epi16(rounded));
}

/* The sums of 16 vectors, in order, in one vector: pairs, then quads within each 128-bit lane, then across
 * the lanes (about 30 instructions where 16 separate reductions take ~160). */
static inline __m512 reduce16(const __m512 *v) {
    __m512 p[8], q[4];
    for (int i = 0; i < 8; i++)
        p[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
    for (int i = 0; i < 4; i++) {
        __m512d a = _mm512_castps_pd(p[2 * i]), b = _mm512_castps_pd(p[2 * i + 1]);
        q[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(a, b)), _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)));
    }
    __m512 s01 = _mm512_add_ps(_mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(q[0], q[1], _MM_SHUFFLE(3, 1, 3, 1)));
    __m512 s23 = _mm512_add_ps(_mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(2, 0, 2, 0)),
                               _mm512_shuffle_f32x4(q[2], q[3], _MM_SHUFFLE(3, 1, 3, 1)));
    return _mm512_add_ps(_mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(s01, s23, _MM_SHUFFLE(3, 1, 3, 1)));
}

/* e^x for 16 floats: x = n ln2 + r with |r| <= ln2 / 2, e^r by its degree-6 Taylor polynomial (relative error
 * ~1.2e-7, float32's own rounding), times 2^n by vscalefps. x = -inf gives 0. */
static inline __m512 exp16(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f)); /* e^-104 is below float32's smallest subnormal */
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

#endif
