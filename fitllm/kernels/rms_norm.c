/* Residual add + RMSNorm for a few rows (decode), in one call.
 *
 * Built at run time by fitllm/quant/cpu_kernels.py's loader (with simd.h) and called through ctypes from
 * fitllm/model/layers.py. Why: PyTorch's CPU rms_norm is a composite of ~12 ops (float conversion, pow, mean,
 * add, rsqrt, mul, conversion back), and with the residual add and the weight's multiply a norm costs ~15
 * PyTorch calls: ~60 norms per decode step of a 30-layer model make it ~900 calls, several microseconds each,
 * for arithmetic that takes a microsecond. The rounding is Hugging Face's Llama RMSNorm's: h = x + residual
 * rounded to the model dtype, h * rsqrt(mean(h^2) + eps) in float32 rounded to the model dtype, times the
 * weight rounded again; only the float32 sum of squares may differ in order.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "simd.h"

/* out[r] = weight * norm(x[r] + residual[r]); residual_out[r] = x[r] + residual[r] (residual NULL: no add,
 * residual_out unused). All [rows, hidden] contiguous in `dtype`, weight [hidden]. */
void fitllm_add_rms_norm(const void *x, const void *residual, const void *weight, int64_t rows, int64_t hidden,
                         float eps, int dtype, void *out, void *residual_out) {
    for (int64_t r = 0; r < rows; r++) {
        int64_t off = r * hidden;
        __m512 sq = _mm512_setzero_ps();
        /* h = x + residual, rounded to the model dtype (stored as the new residual), and its sum of squares */
        for (int64_t i = 0; i < hidden; i += 16) {
            __mmask16 m = tail16(i, hidden);
            __m512 h = load16(x, dtype, off + i, m);
            if (residual) {
                h = _mm512_add_ps(h, load16(residual, dtype, off + i, m));
                store16(residual_out, dtype, off + i, h, m);
                h = load16(residual_out, dtype, off + i, m); /* the rounded value, as the norm reads it */
            }
            sq = _mm512_add_ps(_mm512_mul_ps(h, h), sq); /* squared, then added: as pow(2) then sum */
        }
        float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)hidden + eps);
        const void *src = residual ? residual_out : x;
        for (int64_t i = 0; i < hidden; i += 16) {
            __mmask16 m = tail16(i, hidden);
            __m512 t = _mm512_mul_ps(load16(src, dtype, off + i, m), _mm512_set1_ps(inv));
            store16(out, dtype, off + i, t, m);
            t = _mm512_mul_ps(load16(weight, dtype, i, m), load16(out, dtype, off + i, m));
            store16(out, dtype, off + i, t, m);
        }
    }
}
