/* A Llama-family model's decoder layers for one CPU decode step, in one call.
 *
 * Built with the other kernels into one shared object by fitllm/quant/cpu_kernels.py and called through ctypes
 * from fitllm/model/cpu_decode_layers.py, which checks that a step is in the form read here (bfloat16, a few
 * decode rows, one KV slab, a bfloat16 or int8 cache, no sliding window) and otherwise leaves the step to PyTorch.
 *
 * Why: at batch 1 a 30-layer model's step is ~10 calls a layer into fitllm's kernels plus the small ops
 * between them (rotary, the KV write, SiLU * up, views, output tensors), each paying Python's and PyTorch's
 * per-call cost: ~8 ms of a ~17 ms step on this project's 2-core machine, where the arithmetic between the
 * GEMMs takes microseconds. Here the whole loop over layers is C: the same GEMM, attention and RMSNorm kernels
 * PyTorch's path calls (decode_gemm.c, decode_attention.c, rms_norm.c), and the small ops written out with
 * the rounding points PyTorch's bfloat16 ops have, so that a step's numbers are those of PyTorch's path
 * (the float32 exp in SiLU may differ from PyTorch's in its last bit, which moves a bfloat16 result rarely).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

enum { GEMM_BF16 = 0, GEMM_INT8 = 1, GEMM_INT4 = 2 };

/* One linear layer as a kernel reads it: y[m, n] = x[m, k] W^T (+ bias[n], bfloat16). */
typedef struct {
    int kind;        /* GEMM_* */
    int scale_dtype; /* GEMM_INT8: the per-row scale's dtype (DT_*) */
    int64_t n, k;
    int64_t group;   /* GEMM_INT4: input channels per (scale, zero) */
    const void *weight, *scale, *bias; /* scale: int8 [n], int4 scale_zeros [k / group, n, 2]; bias or NULL */
} fitllm_linear;

typedef struct {
    const void *input_norm, *post_norm; /* RMSNorm weights [hidden], bfloat16 */
    fitllm_linear qkv, o, gate_up, down;
} fitllm_layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, rotary_dim, intermediate;
    float eps, scale; /* RMSNorm epsilon; attention's softmax scale */
} fitllm_dims;

/* the kernels this loop calls (decode_gemm.c, decode_attention.c, rms_norm.c) */
int fitllm_int8_gemm(const void *x, int x_dtype, int64_t ldx, int64_t m, int64_t k, const int8_t *w,
                     const void *scale, int scale_dtype, int64_t n, void *y, int y_dtype, int64_t ldy, int threads);
int fitllm_int4_gemm(const void *x, int x_dtype, int64_t m, int64_t k, const uint8_t *w,
                     const uint16_t *scale_zeros, int64_t group, int64_t n, void *y, int y_dtype, int threads);
int fitllm_bf16_gemm(const uint16_t *x, int64_t ldx, int64_t m, int64_t k, const uint16_t *w, int64_t n,
                     uint16_t *y, int64_t ldy, int threads);
int fitllm_decode_attention(const void *q, int dtype, int64_t n, int64_t kvh, int64_t group, int64_t d,
                            const void *kbase, const void *vbase, int kv_kind, const int64_t *rows, int64_t ctx,
                            const int64_t *lengths, float scale, void *out, int bf16_dot, int threads);
void fitllm_add_rms_norm(const void *x, const void *residual, const void *weight, int64_t rows, int64_t hidden,
                         float eps, int dtype, void *out, void *residual_out);

/* y = x W^T (+ bias), bfloat16 in and out. Returns the kernel's code (0: done). */
static int linear(const fitllm_linear *l, const uint16_t *x, int64_t m, uint16_t *y, int threads) {
    int rc;
    if (l->kind == GEMM_INT8)
        rc = fitllm_int8_gemm(x, DT_BF16, l->k, m, l->k, l->weight, l->scale, l->scale_dtype, l->n, y, DT_BF16,
                              l->n, threads);
    else if (l->kind == GEMM_INT4)
        rc = fitllm_int4_gemm(x, DT_BF16, m, l->k, l->weight, l->scale, l->group, l->n, y, DT_BF16, threads);
    else
        rc = fitllm_bf16_gemm(x, l->k, m, l->k, l->weight, l->n, y, l->n, threads);
    if (rc || !l->bias) return rc;
    /* out + bias: the product is rounded to bfloat16 first, then the sum (PyTorch's two ops) */
    for (int64_t r = 0; r < m; r++)
        for (int64_t i = 0; i < l->n; i += 16) {
            __mmask16 t = tail16(i, l->n);
            store16(y, DT_BF16, r * l->n + i, _mm512_add_ps(load16(y, DT_BF16, r * l->n + i, t),
                                                            load16(l->bias, DT_BF16, i, t)), t);
        }
    return 0;
}

/* One head's rotary rotation in place (rotate-half layout; sin carries rotate-half's sign on its first half):
 * x[i] = x[i] cos[i] + x[(i + rd / 2) % rd] sin[i], each product rounded to bfloat16, then the sum, as
 * RotaryEmbedding.apply's three bfloat16 ops round. Channels past rd are left. */
static void rotate_head(uint16_t *x, const uint16_t *cos, const uint16_t *sin, int64_t rd) {
    uint16_t src[512];
    memcpy(src, x, (size_t)rd * 2);
    int64_t half = rd / 2;
    if (half % 16 == 0) { /* 16 channels at a time; their partners are the 16 half a head away */
        for (int64_t i = 0; i < rd; i += 16) {
            int64_t j = i < half ? i + half : i - half;
            __m512 a = _mm512_mul_ps(load16(src, DT_BF16, i, 0xffff), load16(cos, DT_BF16, i, 0xffff));
            __m512 b = _mm512_mul_ps(load16(src, DT_BF16, j, 0xffff), load16(sin, DT_BF16, i, 0xffff));
            uint16_t ra[16], rb[16];
            store16(ra, DT_BF16, 0, a, 0xffff);
            store16(rb, DT_BF16, 0, b, 0xffff);
            store16(x, DT_BF16, i, _mm512_add_ps(load16(ra, DT_BF16, 0, 0xffff), load16(rb, DT_BF16, 0, 0xffff)), 0xffff);
        }
        return;
    }
    for (int64_t i = 0; i < rd; i++) {
        float a = load_f(src, DT_BF16, i) * load_f(cos, DT_BF16, i);
        float b = load_f(src, DT_BF16, (i + half) % rd) * load_f(sin, DT_BF16, i);
        uint16_t ra, rb;
        store_f(&ra, DT_BF16, 0, a);
        store_f(&rb, DT_BF16, 0, b);
        store_f(x, DT_BF16, i, load_f(&ra, DT_BF16, 0) + load_f(&rb, DT_BF16, 0));
    }
}

/* One head vector into an int8 cache row (fitllm/memory/kv/format.py's encode): scale = max |x| / 127 (at
 * least 1e-12), codes = x / scale rounded to nearest even and clamped to +-127, then the float32 scale. */
static void encode_int8(const uint16_t *x, int64_t d, int8_t *row) {
    float amax = 0.0f;
    for (int64_t i = 0; i < d; i++) amax = fmaxf(amax, fabsf(load_f(x, DT_BF16, i)));
    float scale = amax / 127.0f;
    if (!(scale >= 1e-12f)) scale = 1e-12f;
    for (int64_t i = 0; i < d; i++) {
        float c = nearbyintf(load_f(x, DT_BF16, i) / scale);
        row[i] = (int8_t)(c > 127.0f ? 127.0f : c < -127.0f ? -127.0f : c);
    }
    memcpy(row + d, &scale, sizeof scale);
}

/* out[r, i] = silu(gate[r, i]) * up[r, i] over gate_up [m, 2 I]: silu rounded to bfloat16, then the product
 * (F.silu then the multiply). silu(g) = g / (1 + e^-g) in float32, as PyTorch's CPU kernel computes it. */
static void silu_mul(const uint16_t *gate_up, int64_t m, int64_t inter, uint16_t *out) {
    const __m512 one = _mm512_set1_ps(1.0f);
    for (int64_t r = 0; r < m; r++) {
        const uint16_t *g = gate_up + r * 2 * inter, *u = g + inter;
        for (int64_t i = 0; i < inter; i += 16) {
            __mmask16 t = tail16(i, inter);
            __m512 gv = load16(g, DT_BF16, i, t);
            __m512 s = _mm512_div_ps(gv, _mm512_add_ps(one, exp16(_mm512_sub_ps(_mm512_setzero_ps(), gv))));
            store16(out, DT_BF16, r * inter + i, s, t);
            s = _mm512_mul_ps(load16(out, DT_BF16, r * inter + i, t), load16(u, DT_BF16, i, t));
            store16(out, DT_BF16, r * inter + i, s, t);
        }
    }
}

/* The decoder layers over m decode rows.
 * x_in [m, hidden]: the token embeddings; x_out [m, hidden]: the last layer's output (before its residual
 * add); residual [m, hidden]: the residual stream after the last layer's attention (x_out + residual is the
 * final norm's input, as LlamaForCausalLM.forward passes them). cos / sin [m, rotary_dim]: the step's
 * rotary rows. slots [m]: each row's slot in the slab; kv [2 * layers]: each layer's K and V
 * ([slab slots, kv_heads, head_dim] bfloat16, or with kv_kind KV_INT8 the int8 cache's rows of head_dim codes
 * and a float32 scale); rows / ctx / lengths: the decode group's attention rows
 * (decode_attention.c). Returns 0, -1 without memory, or a kernel's error code. */
int fitllm_decode_layers(const fitllm_layer *layers, int64_t n_layers, const fitllm_dims *dims, int64_t m,
                         const uint16_t *x_in, uint16_t *x_out, uint16_t *residual, const uint16_t *cos,
                         const uint16_t *sin, const int64_t *slots, void *const *kv, int kv_kind,
                         const int64_t *rows, int64_t ctx, const int64_t *lengths, int bf16_dot, int threads) {
    const int64_t hidden = dims->hidden, hq = dims->heads, hk = dims->kv_heads, d = dims->head_dim;
    const int64_t rd = dims->rotary_dim, inter = dims->intermediate, width = (hq + 2 * hk) * d;
    if (rd > 512 || rd % 2 || rd > d) return -2;
    size_t elems = (size_t)m * (hidden + width + 2 * hq * d + 3 * inter);
    uint16_t *work = malloc(elems * sizeof(uint16_t));
    if (!work) return -1;
    uint16_t *normed = work, *qkv = normed + m * hidden, *q = qkv + m * width, *attn = q + m * hq * d;
    uint16_t *gate_up = attn + m * hq * d, *act = gate_up + m * 2 * inter;
    int rc = 0;
    for (int64_t l = 0; l < n_layers && !rc; l++) {
        const fitllm_layer *L = layers + l;
        if (l == 0) {
            memcpy(residual, x_in, (size_t)(m * hidden) * 2);
            fitllm_add_rms_norm(x_in, NULL, L->input_norm, m, hidden, dims->eps, DT_BF16, normed, NULL);
        } else {
            fitllm_add_rms_norm(x_out, residual, L->input_norm, m, hidden, dims->eps, DT_BF16, normed, residual);
        }
        if ((rc = linear(&L->qkv, normed, m, qkv, threads))) break;
        void *kc = kv[2 * l], *vc = kv[2 * l + 1];
        for (int64_t r = 0; r < m; r++) {
            uint16_t *row = qkv + r * width;
            for (int64_t h = 0; h < hq + hk; h++) rotate_head(row + h * d, cos + r * rd, sin + r * rd, rd);
            memcpy(q + r * hq * d, row, (size_t)(hq * d) * 2);
            if (kv_kind == KV_INT8) { /* a row per (slot, KV head): d codes and the scale */
                for (int64_t h = 0; h < hk; h++) {
                    int64_t at = (slots[r] * hk + h) * (d + KV_SCALE_BYTES);
                    encode_int8(row + (hq + h) * d, d, (int8_t *)kc + at);
                    encode_int8(row + (hq + hk + h) * d, d, (int8_t *)vc + at);
                }
            } else {
                memcpy((uint16_t *)kc + slots[r] * hk * d, row + hq * d, (size_t)(hk * d) * 2);
                memcpy((uint16_t *)vc + slots[r] * hk * d, row + (hq + hk) * d, (size_t)(hk * d) * 2);
            }
        }
        rc = fitllm_decode_attention(q, DT_BF16, m, hk, hq / hk, d, kc, vc, kv_kind, rows, ctx, lengths, dims->scale,
                                     attn, bf16_dot, threads);
        if (rc || (rc = linear(&L->o, attn, m, x_out, threads))) break;
        fitllm_add_rms_norm(x_out, residual, L->post_norm, m, hidden, dims->eps, DT_BF16, normed, residual);
        if ((rc = linear(&L->gate_up, normed, m, gate_up, threads))) break;
        silu_mul(gate_up, m, inter, act);
        rc = linear(&L->down, act, m, x_out, threads);
    }
    free(work);
    return rc;
}
