"""Triton paged-attention backend: K/V written and read through block tables, straight from the slabs.

Two kernels, one launch each per layer and step:

- `_write_kv_kernel` scatters the step's encoded K/V rows to their slots (`slot_mapping`; -1 skips a row, the
  padding of a captured decode batch).
- `_paged_attention_kernel` serves a whole mixed batch: one program per (sequence, KV head, query block,
  split). A program's rows are its query tokens times the query heads that share the KV head, so GQA reads
  each K/V tile once for the whole group. It walks the sequence's block table tile by tile with an online
  softmax (flash attention), causal from the sequence's cached length, with an optional sliding window.
  Decode-only batches split the context across programs (flash decoding) so that a few long sequences still
  fill the GPU; `_combine_splits_kernel` merges the splits' partial results.

Slabs are separate allocations on CUDA, so a kernel cannot index them as one tensor. It addresses them from
one fixed anchor tensor plus a per-slab element offset (`PagedKVLayout` in fitllm/memory/kv/layout.py), so a captured
CUDA graph stays valid as the pool grows and shrinks.

Quantized caches (int8, fp8 e4m3) keep each head vector's float32 scale in the last 4 bytes of its row
(fitllm/memory/kv/format.py); the kernel reads codes and scale from the same row and folds the scales into the
scores and probabilities, as the reference backend does. Kernels run on CPU tensors under TRITON_INTERPRET=1,
which is how CI checks them against the reference backend.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from fitllm.memory.kv.layout import PagedKVLayout
from fitllm.triton_flags import dot_flags

_QUANT_CODES = {"auto": 0, "int8": 1, "fp8": 2, "fp8-bits": 3}


def kv_quant_code(kv_cache_dtype: str, device: torch.device) -> int:
    """The kernel's KV_QUANT for a cache dtype: fp8 is converted natively where the GPU has fp8 conversions
    (sm_89 and later; the interpreter too) and decoded from its bits elsewhere ("fp8-bits" forces that)."""
    if (
        kv_cache_dtype == "fp8"
        and device.type == "cuda"
        and torch.cuda.get_device_capability(device) < (8, 9)
    ):
        return _QUANT_CODES["fp8-bits"]
    return _QUANT_CODES[kv_cache_dtype]


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    slot_ptr,
    cache_ptr,
    slab_off_ptr,
    layer_off,
    slab_slots,
    kv_stride,
    KVH: tl.constexpr,
    W: tl.constexpr,
    W_P2: tl.constexpr,
    ALIGN: tl.constexpr,
):
    tok = tl.program_id(0)
    head = tl.program_id(1)
    slot = tl.load(slot_ptr + tok)
    valid = slot >= 0
    slot = tl.where(valid, slot, 0)
    slab = slot // slab_slots
    dst_off = tl.load(slab_off_ptr + slab) + layer_off + ((slot % slab_slots) * KVH + head) * W
    dst = cache_ptr + tl.multiple_of(dst_off, ALIGN)
    d = tl.arange(0, W_P2)
    mask = (d < W) & valid
    src = (tok * KVH + head) * W + d
    tl.store(dst + d, tl.load(k_ptr + src, mask=mask), mask=mask)
    tl.store(dst + kv_stride + d, tl.load(v_ptr + src, mask=mask), mask=mask)


@triton.jit
def _load_kv_tile(
    cache_ptr,
    row_off,
    tile_mask,
    d,
    D: tl.constexpr,
    KV_QUANT: tl.constexpr,
    COMPUTE: tl.constexpr,
):
    """A [BLOCK_N, D_P2] tile of K or V rows (as COMPUTE) and, for a quantized cache, their scales."""
    ptrs = cache_ptr + row_off[:, None] + d[None, :]
    mask = tile_mask[:, None] & (d[None, :] < D)
    if KV_QUANT == 0:
        # No scales: a constant the caller never reads (KV_QUANT is a compile-time constant).
        return tl.load(ptrs, mask=mask, other=0.0).to(COMPUTE), tl.zeros_like(row_off).to(tl.float32)
    raw = tl.load(ptrs, mask=mask, other=0)
    if KV_QUANT == 1:
        codes = raw.to(tl.int8, bitcast=True).to(tl.float32)
    elif KV_QUANT == 2:
        codes = raw.to(tl.float8e4nv, bitcast=True).to(tl.float32)
    else:
        # e4m3 decoded from its bits, for GPUs without fp8 conversions (before sm_89): sign, 4-bit exponent
        # (bias 7; 0 = subnormal), 3-bit mantissa. The encoder never writes the NaN pattern.
        bits = raw.to(tl.int32)
        exponent = (bits >> 3) & 15
        mantissa = (bits & 7).to(tl.float32)
        magnitude = tl.where(
            exponent == 0,
            mantissa * 0.001953125,  # m / 8 * 2^-6
            (8.0 + mantissa) * tl.exp2((exponent - 10).to(tl.float32)),  # (1 + m / 8) * 2^(e - 7)
        )
        codes = tl.where(bits >= 128, -magnitude, magnitude)
    scale_ptrs = (cache_ptr + row_off + D).to(tl.pointer_type(tl.float32), bitcast=True)
    return codes.to(COMPUTE), tl.load(scale_ptrs, mask=tile_mask, other=0.0)


@triton.jit
def _paged_attention_kernel(
    out_ptr,
    part_out_ptr,
    part_ml_ptr,
    q_ptr,
    cache_ptr,
    slab_off_ptr,
    layer_off,
    slab_slots,
    kv_stride,
    block_table_ptr,
    block_table_stride,
    seq_lens_ptr,
    query_start_ptr,
    num_tokens,
    scale,
    window,
    KVH: tl.constexpr,
    GROUP: tl.constexpr,
    GROUP_P2: tl.constexpr,
    D: tl.constexpr,
    D_P2: tl.constexpr,
    W: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_N: tl.constexpr,
    KV_QUANT: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    ALIGN: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    q_block = tl.program_id(2) // NUM_SPLITS
    split = tl.program_id(2) % NUM_SPLITS
    COMPUTE: tl.constexpr = tl.float32 if UPCAST else q_ptr.dtype.element_ty

    q_start = tl.load(query_start_ptr + seq)
    q_len = tl.load(query_start_ptr + seq + 1) - q_start
    seq_len = tl.load(seq_lens_ptr + seq)
    cached = seq_len - q_len  # position of the sequence's first query token

    # Rows: BLOCK_Q query tokens x the GROUP query heads of this KV head (padded to a power of two).
    r = tl.arange(0, BLOCK_Q * GROUP_P2)
    q_idx = q_block * BLOCK_Q + r // GROUP_P2
    head = kv_head * GROUP + r % GROUP_P2
    row_valid = (q_idx < q_len) & (r % GROUP_P2 < GROUP)
    q_pos = cached + q_idx
    d = tl.arange(0, D_P2)
    q_rows = (q_start + q_idx) * (KVH * GROUP) + head
    q_mask = row_valid[:, None] & (d[None, :] < D)
    q = tl.load(q_ptr + q_rows[:, None] * D + d[None, :], mask=q_mask, other=0.0).to(COMPUTE)

    # Keys this block of queries may see: [kv_lo, kv_hi), causal; none if the block is past the queries.
    first = cached + q_block * BLOCK_Q
    kv_hi = tl.minimum(first + BLOCK_Q, seq_len)
    kv_hi = tl.where(q_block * BLOCK_Q < q_len, kv_hi, 0)
    kv_lo = tl.where(window > 0, tl.maximum(first - window + 1, 0), 0)
    tile_lo = kv_lo // BLOCK_N
    num_tiles = tl.maximum(tl.cdiv(kv_hi, BLOCK_N) - tile_lo, 0)
    per_split = tl.cdiv(num_tiles, NUM_SPLITS)
    t_begin = tile_lo + split * per_split
    t_end = tl.minimum(t_begin + per_split, tile_lo + num_tiles)

    m_i = tl.full([BLOCK_Q * GROUP_P2], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_Q * GROUP_P2], tl.float32)
    acc = tl.zeros([BLOCK_Q * GROUP_P2, D_P2], tl.float32)
    n = tl.arange(0, BLOCK_N)
    for tile in range(t_begin, t_end):
        pos = tile * BLOCK_N + n
        in_seq = pos < seq_len
        block = tl.load(block_table_ptr + seq * block_table_stride + pos // BLOCK_SIZE, mask=in_seq, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        slab = slot // slab_slots
        row_off = tl.load(slab_off_ptr + slab, mask=in_seq, other=0) + layer_off
        row_off += ((slot % slab_slots) * KVH + kv_head) * W
        row_off = tl.multiple_of(row_off, ALIGN)
        k, k_scale = _load_kv_tile(cache_ptr, row_off, in_seq, d, D, KV_QUANT, COMPUTE)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION, out_dtype=tl.float32) * scale
        if KV_QUANT != 0:
            s = s * k_scale[None, :]
        visible = (pos[None, :] <= q_pos[:, None]) & in_seq[None, :] & row_valid[:, None]
        visible &= (window <= 0) | (pos[None, :] > q_pos[:, None] - window)
        s = tl.where(visible, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v, v_scale = _load_kv_tile(cache_ptr, row_off + kv_stride, in_seq, d, D, KV_QUANT, COMPUTE)
        if KV_QUANT != 0:
            p = p * v_scale[None, :]
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE), v, input_precision=PRECISION, out_dtype=tl.float32)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    out_mask = row_valid[:, None] & (d[None, :] < D)
    if NUM_SPLITS == 1:
        tl.store(out_ptr + q_rows[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:
        part = split * num_tokens * (KVH * GROUP) + q_rows
        tl.store(part_out_ptr + part[:, None] * D + d[None, :], out, mask=out_mask)
        tl.store(part_ml_ptr + part * 2, m_i, mask=row_valid)
        tl.store(part_ml_ptr + part * 2 + 1, l_i, mask=row_valid)


@triton.jit
def _combine_splits_kernel(
    out_ptr,
    part_out_ptr,
    part_ml_ptr,
    num_rows,
    D: tl.constexpr,
    D_P2: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
):
    """out[row] = sum_s w_s o_s / sum_s w_s with w_s = l_s exp(m_s - max m): the splits' softmax merged."""
    row = tl.program_id(0)
    s = tl.arange(0, NUM_SPLITS)
    d = tl.arange(0, D_P2)
    part = s * num_rows + row
    l_s = tl.load(part_ml_ptr + part * 2 + 1)
    m = tl.where(l_s > 0, tl.load(part_ml_ptr + part * 2), float("-inf"))
    m_max = tl.max(m, axis=0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.where(l_s > 0, l_s * tl.exp(m - m_max), 0.0)
    o = tl.load(
        part_out_ptr + part[:, None] * D + d[None, :], mask=(l_s[:, None] > 0) & (d[None, :] < D), other=0.0
    )
    total = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * o, axis=0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * D + d, out.to(out_ptr.dtype.element_ty), mask=d < D)


def write_kv(
    k_rows: torch.Tensor, v_rows: torch.Tensor, slot_mapping: torch.Tensor, layout: PagedKVLayout, layer: int
) -> None:
    """Store encoded rows [T, kv_heads, width] at `slot_mapping` [T] (int64; -1 = skip) in `layer`."""
    tokens = k_rows.shape[0]
    if tokens == 0:
        return
    width = layout.width
    _write_kv_kernel[(tokens, layout.num_kv_heads)](
        k_rows.contiguous(),
        v_rows.contiguous(),
        slot_mapping,
        layout.anchor,
        layout.slab_offsets,
        layout.layer_offset(layer),
        layout.slab_slots,
        layout.kv_stride,
        KVH=layout.num_kv_heads,
        W=width,
        W_P2=triton.next_power_of_2(width),
        ALIGN=layout.align,
    )


def paged_attention(
    q: torch.Tensor,
    layout: PagedKVLayout,
    layer: int,
    *,
    kv_cache_dtype: str,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    query_start: torch.Tensor,
    max_query_len: int,
    block_size: int,
    scale: float,
    sliding_window: int = 0,
    num_splits: int = 1,
) -> torch.Tensor:
    """Attention of `q` [T, Hq, D] (sequences packed as `query_start` [S + 1] says, each sequence's tokens the
    last ones of its `seq_lens` [S]) over the cached K/V of `layer` -> [T, Hq, D].

    `num_splits` > 1 (a power of two) splits each sequence's context across programs; it needs
    max_query_len == 1 (decode only)."""
    tokens, num_heads, head_dim = q.shape
    num_seqs = seq_lens.shape[0]
    kvh = layout.num_kv_heads
    group = num_heads // kvh
    group_p2 = triton.next_power_of_2(group)
    if num_splits > 1 and max_query_len != 1:
        raise ValueError("split-context attention serves decode-only batches")
    if num_splits & (num_splits - 1):
        raise ValueError(f"num_splits must be a power of two; got {num_splits}")
    # tl.dot wants at least 16 rows and 16 keys per tile.
    rows = max(16, min(64, triton.next_power_of_2(max_query_len) * group_p2))
    block_q = max(1, rows // group_p2)
    block_n, num_warps = tile_shape(head_dim, block_size, max_query_len, kv_cache_dtype != "auto")
    q = q.contiguous()
    out = torch.empty_like(q)
    if tokens == 0:
        return out
    if num_splits > 1:
        part_out = torch.empty(num_splits, tokens, num_heads, head_dim, dtype=torch.float32, device=q.device)
        # Every split stores (max, sum) for all its rows, an empty one (-inf, 0): no initialisation needed.
        part_ml = torch.empty(num_splits, tokens, num_heads, 2, dtype=torch.float32, device=q.device)
    else:
        part_out = part_ml = out
    grid = (num_seqs, kvh, triton.cdiv(max_query_len, block_q) * num_splits)
    _paged_attention_kernel[grid](
        out,
        part_out,
        part_ml,
        q,
        layout.anchor,
        layout.slab_offsets,
        layout.layer_offset(layer),
        layout.slab_slots,
        layout.kv_stride,
        block_tables,
        block_tables.stride(0),
        seq_lens,
        query_start,
        tokens,
        scale,
        sliding_window,
        KVH=kvh,
        GROUP=group,
        GROUP_P2=group_p2,
        D=head_dim,
        D_P2=triton.next_power_of_2(head_dim),
        W=layout.width,
        BLOCK_SIZE=block_size,
        BLOCK_Q=block_q,
        BLOCK_N=block_n,
        KV_QUANT=kv_quant_code(kv_cache_dtype, q.device),
        NUM_SPLITS=num_splits,
        ALIGN=layout.align,
        num_warps=num_warps,
        **dot_flags(q.dtype),
    )
    if num_splits > 1:
        d_p2 = triton.next_power_of_2(head_dim)
        _combine_splits_kernel[(tokens * num_heads,)](
            out, part_out, part_ml, tokens * num_heads, D=head_dim, D_P2=d_p2, NUM_SPLITS=num_splits
        )
    return out


def tile_shape(head_dim: int, block_size: int, max_query_len: int, quantized: bool) -> tuple[int, int]:
    """(keys per tile, warps) for the attention kernel. Up to head dim 128 a tile is one cache block and 4
    warps. Past it the accumulator alone is [rows, head_dim] float32 per program, so with the sm_90 compile
    (`python -m benchmarks.kernel_compile`) as the judge: a prefill runs 8 warps (4 spilled up to ~850
    bytes a thread at d256), and a quantized cache (whose tiles are decoded in registers) reads 16 keys a
    tile, not 32."""
    if head_dim <= 128:
        return max(16, block_size), 4
    block_n = 16 if quantized else max(16, min(block_size, 32))
    return block_n, 8 if max_query_len > 1 else 4


MIN_KEYS_PER_SPLIT = 64  # four 16-key tiles: enough for the loop's 3-stage copy pipeline to fill
SPLIT_WAVES = 2  # programs wanted per SM


def choose_num_splits(num_seqs: int, num_kv_heads: int, max_context: int, num_sms: int) -> int:
    """Context splits for a decode batch: a decode step reads the whole K/V once, so it is bound by memory
    and wants every SM busy. Split until there are about SPLIT_WAVES programs per SM (rounding up to a power
    of two), each split keeping at least MIN_KEYS_PER_SPLIT keys, at most 64 splits. Batch 1 of an
    8-KV-head model at 657 tokens on 132 SMs: 8 splits, 64 programs (256 keys per split gave 2, 16)."""
    programs = max(1, num_seqs * num_kv_heads)
    splits = 1
    while (
        splits < 64
        and programs * splits < SPLIT_WAVES * num_sms
        and max_context >= 2 * MIN_KEYS_PER_SPLIT * splits
    ):
        splits *= 2
    return splits
