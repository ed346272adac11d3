/* Decode attention on CPU straight from the paged KV cache: one query token per request.
 *
 * Built at run time by fitllm/quant/cpu_kernels.py's loader (with simd.h) (gcc, no PyTorch headers) and called through
 * ctypes from fitllm/model/attention/cpu_decode.py.
 *
 * Why: the reference backend gathers each layer's K and V rows into a new tensor (index_select) and runs
 * PyTorch's SDPA over it: two calls of ~30-50 us each per layer at a few hundred tokens, on a machine where
 * the whole layer's arithmetic is a few microseconds. Here the rows are read where they lie, once for all the
 * query heads that share a KV head (grouped-query attention), in float32: scores, a max-subtracted softmax and
 * the weighted sum of V, rounded once to the output dtype.
 *
 * rows: [kvh, n, ctx] row ids into the cache's [slots * kvh, d] views of K and of V (the layout the
 * reference backend gathers), request r attending to its first lengths[r] positions. bf16_dot: the CPU has
 * AVX-512 BF16, so bfloat16 scores are vdpbf16ps dot products.
 * Threads: OpenMP over (KV head, request) pairs when the call is large enough to pay for them; a context longer
 * than PIECE_ROWS is split into pieces attended apart and merged (flash-decoding's split), so that one
 * request's few KV heads do not leave threads idle: at batch 1 a model with 3 KV heads kept 3 threads busy
 * however many it had, and 2 threads at 2:1.
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "simd.h"

#define PARALLEL_MIN_ROWS 2048 /* K/V rows per call below which one thread does it all */
#define PIECE_ROWS 1024        /* a longer context is attended in pieces of this many positions, then merged */
#define MAX_GROUP 64           /* query heads per KV head */

static inline const void *row_ptr(const void *base, int dtype, int64_t row, int64_t d) {
    return dtype == DT_BF16 ? (const void *)((const uint16_t *)base + row * d)
                            : (const void *)((const float *)base + row * d);
}

/* scores[p] = q . k[p] for 16 rows: float32 FMAs over the rows converted to float32. */
static inline __m512 dots16_f32(const void *q, const void **k, int64_t d, int dtype) {
    __m512 s[16];
    for (int p = 0; p < 16; p++) s[p] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        __mmask16 m = tail16(i, d);
        __m512 qv = load16(q, dtype, i, m);
        for (int p = 0; p < 16; p++) s[p] = _mm512_fmadd_ps(qv, load16(k[p], dtype, i, m), s[p]);
    }
    return reduce16(s);
}

/* The same for bfloat16 q and rows: vdpbf16ps takes 32 bfloat16 pairs a step, products exact, float32 sums. */
static inline __attribute__((target("avx512bf16"))) __m512 dots16_bf16(const uint16_t *q, const void **k,
                                                                        int64_t d) {
    __m512 s[16];
    for (int p = 0; p < 16; p++) s[p] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 32) {
        __mmask32 m = (i + 32 <= d) ? ~0u : ((1u << (d - i)) - 1);
        __m512i qv = _mm512_maskz_loadu_epi16(m, q + i);
        for (int p = 0; p < 16; p++)
            s[p] = _mm512_dpbf16_ps(s[p], (__m512bh)_mm512_maskz_loadu_epi16(m, (const uint16_t *)k[p] + i),
                                    (__m512bh)qv);
    }
    return reduce16(s);
}

/* ---- an int8 cache (--kv-cache-dtype int8, fitllm/memory/kv/format.py): each row is d int8 codes and
 * their float32 scale (d + 4 bytes); the value is code * scale. */

static inline const int8_t *i8_row(const void *base, int64_t row, int64_t d) {
    return (const int8_t *)base + row * (d + KV_SCALE_BYTES);
}

static inline float i8_scale(const int8_t *row, int64_t d) {
    float s;
    memcpy(&s, row + d, sizeof s);
    return s;
}

/* scores[p] = q . codes[p] (q float32) for 16 rows; the caller multiplies in each row's scale. */
static inline __m512 dots16_i8(const float *q, const int8_t **k, int64_t d) {
    __m512 s[16];
    for (int p = 0; p < 16; p++) s[p] = _mm512_setzero_ps();
    for (int64_t i = 0; i < d; i += 16) {
        __mmask16 m = tail16(i, d);
        __m512 qv = _mm512_maskz_loadu_ps(m, q + i);
        for (int p = 0; p < 16; p++)
            s[p] = _mm512_fmadd_ps(qv, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, k[p] + i))), s[p]);
    }
    return reduce16(s);
}

/* acc[0, d) = sum_j p[j] codes_j (p already carries each row's scale), 16 channels at a time. */
static inline __attribute__((always_inline)) void weighted_sum_i8(const void *vbase, const int64_t *rows, int64_t len,
                                                                  const float *p, int C, int64_t d, float *acc) {
    __m512 a[16];
    for (int c = 0; c < C; c++) a[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        const int8_t *v = i8_row(vbase, rows[j], d);
        __m512 pj = _mm512_set1_ps(p[j]);
        for (int c = 0; c < C; c++) {
            int64_t i = 16 * c;
            __mmask16 m = tail16(i, d);
            a[c] = _mm512_fmadd_ps(pj, _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_maskz_loadu_epi8(m, v + i))), a[c]);
        }
    }
    for (int c = 0; c < C; c++) {
        int64_t i = 16 * c;
        __mmask16 m = tail16(i, d);
        _mm512_mask_storeu_ps(acc + i, m, a[c]);
    }
}

/* acc[0, 16 * C) = sum_j p[j] v_j for rows of C * 16 elements; C is a constant at each call site. */
static inline __attribute__((always_inline)) void weighted_sum(const void *vbase, const int64_t *rows, int64_t len,
                                                               const float *p, int C, int dtype, float *acc) {
    __m512 a[16];
    for (int c = 0; c < C; c++) a[c] = _mm512_setzero_ps();
    for (int64_t j = 0; j < len; j++) {
        const void *v = row_ptr(vbase, dtype, rows[j], 16 * C);
        __m512 pj = _mm512_set1_ps(p[j]);
        for (int c = 0; c < C; c++) a[c] = _mm512_fmadd_ps(pj, load16(v, dtype, 16 * c, 0xffff), a[c]);
    }
    for (int c = 0; c < C; c++) _mm512_storeu_ps(acc + 16 * c, a[c]);
}

/* The same for any d, the sums kept in memory. */
static void weighted_sum_any(const void *vbase, const int64_t *rows, int64_t len, const float *p, int64_t d,
                             int dtype, float *acc) {
    memset(acc, 0, (size_t)d * sizeof(float));
    for (int64_t j = 0; j < len; j++) {
        const void *v = row_ptr(vbase, dtype, rows[j], d);
        __m512 pj = _mm512_set1_ps(p[j]);
        for (int64_t i = 0; i < d; i += 16) {
            __mmask16 m = tail16(i, d);
            _mm512_mask_storeu_ps(acc + i, m, _mm512_fmadd_ps(pj, load16(v, dtype, i, m), _mm512_maskz_loadu_ps(m, acc + i)));
        }
    }
}

/* One piece of one (KV head, request): `group` query heads q[g * q_stride ...] over `len` rows. Leaves the
 * scores' max in top[g], the sum of the softmax numerators e^(s - top) in sum[g], and their V sums
 * (unnormalized) in acc[g * d ...]. `scores` holds group * (len rounded up to 16) floats. */
static void attend_piece(const void *q, int64_t q_stride, int group, int64_t d, const void *kbase,
                         const void *vbase, const int64_t *rows, int64_t len, float scale, int dtype, int bf16_dot,
                         int kv_kind, float *scores, float *acc, float *qf, float *top, float *sum) {
    int64_t lp = (len + 15) / 16 * 16;
    const __m512 vscale = _mm512_set1_ps(scale);
    if (kv_kind == KV_INT8) { /* q in float32 once; scores = (q . codes) * (row scale * scale), as the
                               * reference backend folds a quantized cache's scales into its scores */
        for (int g = 0; g < group; g++)
            for (int64_t i = 0; i < d; i++) qf[g * d + i] = load_f(q, dtype, g * q_stride + i);
        for (int64_t j0 = 0; j0 < len; j0 += 16) {
            const int8_t *k[16];
            float ks[16];
            for (int p = 0; p < 16; p++) {
                k[p] = i8_row(kbase, j0 + p < len ? rows[j0 + p] : rows[0], d);
                ks[p] = i8_scale(k[p], d) * scale;
            }
            __m512 kscale = _mm512_loadu_ps(ks);
            for (int g = 0; g < group; g++)
                _mm512_storeu_ps(scores + g * lp + j0, _mm512_mul_ps(dots16_i8(qf + g * d, k, d), kscale));
        }
    } else { /* scores = q . k * scale, 16 positions at a time (positions past len read row 0 and are dropped) */
        for (int64_t j0 = 0; j0 < len; j0 += 16) {
            const void *k[16];
            for (int p = 0; p < 16; p++) k[p] = row_ptr(kbase, dtype, j0 + p < len ? rows[j0 + p] : rows[0], d);
            for (int g = 0; g < group; g++) {
                __m512 dots = bf16_dot ? dots16_bf16((const uint16_t *)q + g * q_stride, k, d)
                                       : dots16_f32(row_ptr(q, dtype, g, q_stride), k, d, dtype);
                _mm512_storeu_ps(scores + g * lp + j0, _mm512_mul_ps(dots, vscale));
            }
        }
    }
    /* softmax numerators (positions past len: 0) and their sum */
    for (int g = 0; g < group; g++) {
        float *sg = scores + g * lp;
        for (int64_t j = len; j < lp; j++) sg[j] = -INFINITY;
        __m512 vmax = _mm512_set1_ps(-INFINITY), vsum = _mm512_setzero_ps();
        for (int64_t j = 0; j < lp; j += 16) vmax = _mm512_max_ps(vmax, _mm512_loadu_ps(sg + j));
        top[g] = _mm512_reduce_max_ps(vmax);
        __m512 vtop = _mm512_set1_ps(top[g]);
        for (int64_t j = 0; j < lp; j += 16) {
            __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(sg + j), vtop));
            _mm512_storeu_ps(sg + j, e);
            vsum = _mm512_add_ps(vsum, e);
        }
        sum[g] = _mm512_reduce_add_ps(vsum);
    }
    /* acc = sum_j p_j v_j: one query head at a time, its d / 16 accumulators in registers where d is a
     * multiple of 16 the calls below make a constant (a loop-carried sum through memory is ~10x slower) */
    if (kv_kind == KV_INT8) { /* each numerator times its row's V scale, then the codes' weighted sum */
        for (int64_t j = 0; j < len; j++) {
            float vs = i8_scale(i8_row(vbase, rows[j], d), d);
            for (int g = 0; g < group; g++) scores[g * lp + j] *= vs;
        }
        for (int g = 0; g < group; g++) {
            const float *pg = scores + g * lp;
            float *ag = acc + g * d;
            switch ((d + 15) / 16) {
            case 4: weighted_sum_i8(vbase, rows, len, pg, 4, d, ag); break;
            case 5: weighted_sum_i8(vbase, rows, len, pg, 5, d, ag); break;
            case 6: weighted_sum_i8(vbase, rows, len, pg, 6, d, ag); break;
            case 8: weighted_sum_i8(vbase, rows, len, pg, 8, d, ag); break;
            case 16: weighted_sum_i8(vbase, rows, len, pg, 16, d, ag); break;
            default:
                for (int64_t c0 = 0; c0 < d; c0 += 64) { /* 64 channels at a time for other widths */
                    int64_t w = d - c0 < 64 ? d - c0 : 64;
                    float part[64];
                    memset(part, 0, sizeof part);
                    for (int64_t j = 0; j < len; j++) {
                        const int8_t *v = i8_row(vbase, rows[j], d) + c0;
                        for (int64_t i = 0; i < w; i++) part[i] += pg[j] * (float)v[i];
                    }
                    memcpy(ag + c0, part, (size_t)w * sizeof(float));
                }
            }
        }
        return;
    }
    for (int g = 0; g < group; g++) {
        const float *pg = scores + g * lp;
        float *ag = acc + g * d;
        switch (d) {
        case 64: weighted_sum(vbase, rows, len, pg, 4, dtype, ag); break;
        case 80: weighted_sum(vbase, rows, len, pg, 5, dtype, ag); break;
        case 96: weighted_sum(vbase, rows, len, pg, 6, dtype, ag); break;
        case 128: weighted_sum(vbase, rows, len, pg, 8, dtype, ag); break;
        case 256: weighted_sum(vbase, rows, len, pg, 16, dtype, ag); break;
        default: weighted_sum_any(vbase, rows, len, pg, d, dtype, ag);
        }
    }
}

/* A whole (KV head, request) in one piece: the V sums divided by the numerators' sum, rounded once. */
static void attend(const void *q, int64_t q_stride, int group, int64_t d, const void *kbase, const void *vbase,
                   const int64_t *rows, int64_t len, float scale, int dtype, int bf16_dot, int kv_kind, void *out,
                   int64_t out_stride, float *scores, float *acc, float *qf) {
    float top[MAX_GROUP], sum[MAX_GROUP];
    attend_piece(q, q_stride, group, d, kbase, vbase, rows, len, scale, dtype, bf16_dot, kv_kind, scores, acc, qf,
                 top, sum);
    for (int g = 0; g < group; g++) {
        float inv = 1.0f / sum[g];
        for (int64_t i = 0; i < d; i++) store_f(out, dtype, g * out_stride + i, acc[g * d + i] * inv);
    }
}

/* A long context's pieces merged (flash-decoding's reduction), in piece order: with M the largest piece max and
 * w_i = e^(top_i - M), out = (sum_i w_i acc_i) / (sum_i w_i sum_i). part: `pieces` records of
 * [group tops, group sums, group * d V sums]; the tops are overwritten with the weights. `a`: d floats. */
static void merge_pieces(float *part, int64_t pieces, int group, int64_t d, void *out, int64_t out_stride,
                         int dtype, float *a) {
    const int64_t rec = 2 * group + group * d;
    for (int g = 0; g < group; g++) {
        float m = -INFINITY, total = 0.0f;
        for (int64_t p = 0; p < pieces; p++) m = fmaxf(m, part[p * rec + g]);
        for (int64_t p = 0; p < pieces; p++) {
            part[p * rec + g] = expf(part[p * rec + g] - m);
            total += part[p * rec + g] * part[p * rec + group + g];
        }
        memset(a, 0, (size_t)d * sizeof(float));
        for (int64_t p = 0; p < pieces; p++) {
            const __m512 w = _mm512_set1_ps(part[p * rec + g]);
            const float *acc = part + p * rec + 2 * group + g * d;
            for (int64_t i = 0; i < d; i += 16) {
                __mmask16 k = tail16(i, d);
                _mm512_mask_storeu_ps(a + i, k, _mm512_add_ps(_mm512_maskz_loadu_ps(k, a + i),
                                                              _mm512_mul_ps(w, _mm512_maskz_loadu_ps(k, acc + i))));
            }
        }
        float inv = 1.0f / total;
        for (int64_t i = 0; i < d; i++) store_f(out, dtype, g * out_stride + i, a[i] * inv);
    }
}

/* out[r, h * group + g, :] for n requests of kvh KV heads, `group` query heads each, head dim d.
 * q and out: [n, kvh * group, d] contiguous in `dtype`; kbase / vbase: the cache's K and V views ([*, d]);
 * kv_kind: KV_SAME (the cache's rows in q's dtype) or KV_INT8 (int8 codes + a float32 scale per row);
 * rows: [kvh, n, ctx]; lengths: [n] (<= ctx). Returns 0, -1 without memory, -2 for a group over MAX_GROUP. */
int fitllm_decode_attention(const void *q, int dtype, int64_t n, int64_t kvh, int64_t group, int64_t d,
                            const void *kbase, const void *vbase, int kv_kind, const int64_t *rows, int64_t ctx,
                            const int64_t *lengths, float scale, void *out, int bf16_dot, int threads) {
    if (group > MAX_GROUP) return -2;
    int64_t tasks = kvh * n, total_rows = 0;
    /* work items: each (KV head, request), a long context's split into pieces of PIECE_ROWS positions (by its
     * own length only, so a request's numbers do not depend on its batch) */
    int64_t *first = malloc((size_t)(tasks + 1) * sizeof(int64_t));
    if (!first) return -1;
    first[0] = 0;
    for (int64_t t = 0; t < tasks; t++) {
        int64_t len = lengths[t % n];
        total_rows += len;
        first[t + 1] = first[t] + (len > PIECE_ROWS ? (len + PIECE_ROWS - 1) / PIECE_ROWS : 1);
    }
    int64_t items = first[tasks];
    int64_t *item_task = malloc((size_t)items * sizeof(int64_t));
    const int64_t rec = 2 * group + group * d;
    float *part = items > tasks ? malloc((size_t)(items * rec) * sizeof(float)) : NULL;
    if (!item_task || (items > tasks && !part)) {
        free(first);
        free(item_task);
        free(part);
        return -1;
    }
    for (int64_t t = 0; t < tasks; t++)
        for (int64_t i = first[t]; i < first[t + 1]; i++) item_task[i] = t;
    int nt = (total_rows >= PARALLEL_MIN_ROWS && threads > 1) ? threads : 1;
    if (nt > items) nt = (int)items;
    int64_t longest = ctx < PIECE_ROWS ? ctx : PIECE_ROWS;
    int failed = 0;
#pragma omp parallel num_threads(nt)
    {
        int64_t lp = (longest + 15) / 16 * 16;
        float *scores = malloc((size_t)(group * lp + 2 * group * d) * sizeof(float)); /* + acc, + q as float32 */
        if (!scores) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp for schedule(static)
        for (int64_t i = 0; i < items; i++) {
            if (!scores) continue;
            int64_t t = item_task[i], h = t / n, r = t % n, len = lengths[r];
            int64_t heads = kvh * group;
            int64_t off = (r * heads + h * group) * d;
            const void *qp = row_ptr(q, dtype, off / d, d);
            const int64_t *task_rows = rows + (h * n + r) * ctx;
            int dot = bf16_dot && dtype == DT_BF16;
            if (first[t + 1] - first[t] == 1) {
                void *op = dtype == DT_BF16 ? (void *)((uint16_t *)out + off) : (void *)((float *)out + off);
                attend(qp, d, (int)group, d, kbase, vbase, task_rows, len, scale, dtype, dot, kv_kind, op, d, scores,
                       scores + group * lp, scores + group * lp + group * d);
            } else {
                int64_t start = (i - first[t]) * PIECE_ROWS;
                int64_t plen = len - start < PIECE_ROWS ? len - start : PIECE_ROWS;
                float *rp = part + i * rec;
                attend_piece(qp, d, (int)group, d, kbase, vbase, task_rows + start, plen, scale, dtype, dot, kv_kind,
                             scores, rp + 2 * group, scores + group * lp + group * d, rp, rp + group);
            }
        }
        /* the barrier above: every piece is in before any merge */
#pragma omp for schedule(static)
        for (int64_t t = 0; t < tasks; t++) {
            if (first[t + 1] - first[t] == 1 || !scores || failed) continue;
            int64_t h = t / n, r = t % n, off = (r * kvh * group + h * group) * d;
            void *op = dtype == DT_BF16 ? (void *)((uint16_t *)out + off) : (void *)((float *)out + off);
            merge_pieces(part + first[t] * rec, first[t + 1] - first[t], (int)group, d, op, d, dtype, scores);
        }
        free(scores);
    }
    free(first);
    free(item_task);
    free(part);
    return failed ? -1 : 0;
}
