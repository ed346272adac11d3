"""Paged attention: K/V are written and read only through slot ids or block tables.

Two backends (`--attention-backend`, chosen by `resolve_attention_backend`): the torch reference backend
below, and Triton kernels (fitllm/model/attention/triton_kernels.py) that read K/V through block tables straight
from the slabs. The runner picks one per engine and fills the matching half of `AttentionMetadata`.

Reference backend:

The runner flattens a step's requests into one token batch ordered decodes first, then prefill chunks.
Decodes (one query token each) are attended in one batched call over K/V gathered through their block
tables and padded to the longest context; each prefill chunk is attended on its own with a causal mask
offset by the tokens it already has in the cache. Gather indices and masks are built once per step and
shared by all layers.

The cache lives in slabs (see fitllm/memory/kv/storage.py); each layer sees a list of per-slab tensors
[2, slab_slots, kv_heads, head_dim]. Slot and row ids are global; the runner splits them by slab once per
step (`SlabSplit`), and with a single slab every read and write is one call. Slot-major means a new
token's K/V is one contiguous write. Reads gather rows of its [num_slots * kv_heads, head_dim] view in (kv_head, request, position)
order: the result is already the [kv_heads * requests, context, head_dim] batch that bmm wants, with no
transpose copy (measured 7x faster than gathering slots and permuting).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.layout import PagedKVLayout, SlabSplit


def head_rows(slots: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Row ids into the [num_slots * kv_heads, head_dim] cache view for `slots`, kv-head-major, flattened."""
    heads = torch.arange(num_kv_heads, device=slots.device).view(num_kv_heads, *([1] * slots.dim()))
    return (slots.unsqueeze(0) * num_kv_heads + heads).reshape(-1)


@dataclass(slots=True)
class PrefillSpan:
    """One request's prefill chunk inside the flat batch."""

    query_start: int
    query_len: int
    context_len: int
    context_rows: SlabSplit  # head_rows() of the slots of every token it attends to, oldest first
    mask: torch.Tensor | None  # [query_len, context_len] bool, True = attend; None = plain causal


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows [start, start + num) attended together, their K/V gathered padded to `context`. The
    runner splits a step's decodes into groups of at most its gather cap of padded context tokens, so the
    gathered K/V (the reference backend's largest decode temporary) stays bounded whatever the batch."""

    start: int
    num: int
    context: int
    rows: SlabSplit  # head_rows() of [num, context] slots (padding: 0)
    mask: torch.Tensor  # [num, context] bool, True = attend


ATTENTION_BACKENDS = ("auto", "torch", "triton")


def resolve_attention_backend(name: str, device: torch.device) -> str:
    """`--attention-backend` to the backend that runs: auto is triton on CUDA when Triton imports, else torch.
    triton off CUDA needs TRITON_INTERPRET=1 (the kernels then run, slowly, in Triton's interpreter)."""
    import os

    from fitllm.triton_flags import triton_available

    if name not in ATTENTION_BACKENDS:
        raise ValueError(f"--attention-backend must be one of {', '.join(ATTENTION_BACKENDS)}; got {name!r}")
    has_triton = triton_available()
    if name == "auto":
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if name == "triton":
        if not has_triton:
            raise ValueError(
                "--attention-backend triton needs the triton package; use --attention-backend torch"
            )
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise ValueError(
                "--attention-backend triton runs on CUDA GPUs (or on CPU under TRITON_INTERPRET=1, for tests); "
                "use --attention-backend torch"
            )
    return name


@dataclass(slots=True)
class KernelMetadata:
    """A step's batch as the Triton kernels read it: sequences in token order (decodes first), all on the
    device, with shapes that depend only on the batch (so a decode step can be captured as a CUDA graph)."""

    slot_mapping: torch.Tensor  # [T] int64 slot of each new token; -1 = write nothing (graph padding)
    block_tables: torch.Tensor  # [S, max_blocks] int32
    seq_lens: torch.Tensor  # [S] int32: keys each sequence attends to, this step's tokens included
    query_start: torch.Tensor  # [S + 1] int32: sequence i's tokens are [query_start[i], query_start[i+1])
    max_query_len: int
    block_size: int
    sliding_window: int = 0  # 0: none
    num_splits: int = 1  # context splits per decode sequence (flash decoding); 1 for batches with prefill


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs about one step's flat batch: the reference backend's gather plan, or the
    kernels' block tables (`kernel`)."""

    slot_mapping: SlabSplit | None = None  # where each new token's K/V is written
    num_decodes: int = 0  # the first num_decodes tokens are single-token decodes, one per request
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # the decodes, attended group by group
    prefills: list[PrefillSpan] = field(default_factory=list)
    kernel: KernelMetadata | None = None


class PagedAttention(nn.Module):
    """Attention over the paged KV cache for one layer; the runner binds `kv_cache` before use."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # Per slab (None where a slab is not allocated): [2, slab_slots, kv_heads, kv_format.entry_width].
        self.kv_slabs: list[torch.Tensor | None] | None = None
        self.kv_format: KVCacheFormat | None = None  # how K/V are stored there (bound with kv_slabs)
        # The same cache as the Triton kernels address it, and this layer's index in it.
        self.kv_layout: PagedKVLayout | None = None
        self.layer_index = 0

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq, D]."""
        assert self.kv_slabs is not None and self.kv_format is not None, "KV cache not bound to this layer"
        if meta.kernel is not None:
            return self._forward_kernels(q, k, v, meta.kernel)
        for slab, pos, local in meta.slot_mapping.parts:
            cache = self.kv_slabs[slab]
            kk, vv = (k, v) if pos is None else (k.index_select(0, pos), v.index_select(0, pos))
            cache[0].index_copy_(0, local, self.kv_format.encode(kk))
            cache[1].index_copy_(0, local, self.kv_format.encode(vv))
        out = torch.empty_like(q)
        for group in meta.decode_groups:
            rows = slice(group.start, group.start + group.num)
            out[rows] = self._decode(q[rows], group)
        for span in meta.prefills:
            qs = slice(span.query_start, span.query_start + span.query_len)
            out[qs] = self._prefill(q[qs], span)
        return out

    def _forward_kernels(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: KernelMetadata
    ) -> torch.Tensor:
        from fitllm.model.attention import triton_kernels

        layout = self.kv_layout
        assert layout is not None, "KV layout not bound to this layer"
        fmt = self.kv_format
        triton_kernels.write_kv(fmt.encode(k), fmt.encode(v), meta.slot_mapping, layout, self.layer_index)
        return triton_kernels.paged_attention(
            q,
            layout,
            self.layer_index,
            kv_cache_dtype=fmt.name,
            block_tables=meta.block_tables,
            seq_lens=meta.seq_lens,
            query_start=meta.query_start,
            max_query_len=meta.max_query_len,
            block_size=meta.block_size,
            scale=self.scale,
            sliding_window=meta.sliding_window,
            num_splits=meta.num_splits,
        )

    def _gather_raw(self, which: int, rows: SlabSplit) -> torch.Tensor:
        """Rows of K (which=0) or V (1) from the [slab_slots * kv_heads, entry_width] views of the slabs,
        as stored."""
        width = self.kv_format.entry_width
        if len(rows.parts) == 1:
            slab, _, local = rows.parts[0]
            return self.kv_slabs[slab][which].view(-1, width).index_select(0, local)
        first = self.kv_slabs[rows.parts[0][0]]
        out = torch.empty(rows.size, width, dtype=first.dtype, device=first.device)
        for slab, pos, local in rows.parts:
            out.index_copy_(0, pos, self.kv_slabs[slab][which].view(-1, width).index_select(0, local))
        return out

    def _gather(self, which: int, rows: SlabSplit) -> torch.Tensor:
        """_gather_raw decoded to [len(rows), head_dim] in the compute dtype."""
        return self.kv_format.decode(self._gather_raw(which, rows))

    def _decode_kv(self, dg: DecodeGroup, dtype: torch.dtype):
        """A decode group's keys and values [kvh * n, ctx, d] in `dtype`, and for a quantized cache their
        per-vector scales [kvh * n, 1, ctx] float32 (None otherwise): the scales are folded into the
        scores and the probabilities instead of multiplying every element of K and V."""
        n, ctx, d = dg.num, dg.context, self.head_dim
        shape = (self.num_kv_heads * n, ctx, d)
        if not self.kv_format.quantized:
            keys = self._gather(0, dg.rows).view(shape)
            return keys, self._gather(1, dg.rows).view(shape), None, None
        out = []
        for which in (0, 1):
            codes, scale = self.kv_format.split(self._gather_raw(which, dg.rows))
            out += [codes.to(dtype).view(shape), scale.view(shape[0], 1, ctx)]
        return out[0], out[2], out[1], out[3]

    def _decode(self, q: torch.Tensor, dg: DecodeGroup) -> torch.Tensor:
        n, ctx = dg.num, dg.context
        kvh, group, d = self.num_kv_heads, self.num_heads // self.num_kv_heads, self.head_dim
        keys, vals, k_scale, v_scale = self._decode_kv(dg, q.dtype)
        # The query heads sharing a KV head become that head's query rows: no K/V repeat for GQA.
        qg = q.view(n, kvh, group, d).transpose(0, 1).reshape(kvh * n, group, d)
        # Plain matmul-softmax-matmul (softmax in float32, as HF's eager attention): for a few query rows
        # this is ~2x faster on CPU in bfloat16 than SDPA's flash kernel.
        scores = torch.bmm(qg, keys.transpose(1, 2))
        # Quantized K: q . (s k) = s (q . k), one multiply per score instead of one per element of K.
        scores = (scores * self.scale).float() if k_scale is None else scores.float() * (k_scale * self.scale)
        mask = dg.mask.unsqueeze(0).expand(kvh, n, ctx).reshape(kvh * n, 1, ctx)
        probs = scores.masked_fill_(~mask, float("-inf")).softmax(dim=-1)
        if v_scale is not None:
            probs *= v_scale  # sum p (s v) = sum (p s) v: the same for V
        out = torch.bmm(probs.to(q.dtype), vals)
        return out.view(kvh, n, group, d).transpose(0, 1).reshape(n, self.num_heads, d)

    def _prefill(self, q: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
        shape = (1, self.num_kv_heads, span.context_len, self.head_dim)
        keys = self._gather(0, span.context_rows).view(shape)
        vals = self._gather(1, span.context_rows).view(shape)
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys,
            vals,
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.squeeze(0).transpose(0, 1)
