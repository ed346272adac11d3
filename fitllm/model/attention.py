"""Paged attention, torch reference backend: K/V are written and read only through slot ids.

The runner flattens a step's requests into one token batch ordered decodes first, then prefill chunks.
Decodes (one query token each) are attended in one batched call over K/V gathered through their block
tables and padded to the longest context; each prefill chunk is attended on its own with a causal mask
offset by the tokens it already has in the cache. Masks and gather indices are built once per step
and shared by all layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(slots=True)
class PrefillSpan:
    """One request's prefill chunk inside the flat batch."""

    query_start: int
    query_len: int
    context_slots: torch.Tensor  # [context_len] slot id of every token it attends to, oldest first
    mask: torch.Tensor | None  # [query_len, context_len] bool, True = attend; None = plain causal


@dataclass(slots=True)
class AttentionMetadata:
    """Everything attention needs about one step's flat batch."""

    slot_mapping: torch.Tensor  # [num_tokens] where each new token's K/V is written
    num_decodes: int  # the first num_decodes tokens are single-token decodes, one per request
    decode_slots: torch.Tensor | None = None  # [num_decodes, max_context] slot ids (padding: 0)
    decode_mask: torch.Tensor | None = None  # [num_decodes, 1, 1, max_context] bool
    prefills: list[PrefillSpan] = field(default_factory=list)


class PagedAttention(nn.Module):
    """Attention over the paged KV cache for one layer; the runner binds `kv_cache` before use."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.scale = scale
        # [2, num_slots, num_kv_heads, head_dim]: K then V, one row per token slot.
        self.kv_cache: torch.Tensor | None = None

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq, D]."""
        assert self.kv_cache is not None, "KV cache not bound to this layer"
        k_cache, v_cache = self.kv_cache[0], self.kv_cache[1]
        k_cache.index_copy_(0, meta.slot_mapping, k.to(k_cache.dtype))
        v_cache.index_copy_(0, meta.slot_mapping, v.to(v_cache.dtype))
        out = torch.empty_like(q)
        if meta.num_decodes:
            out[: meta.num_decodes] = self._decode(q[: meta.num_decodes], k_cache, v_cache, meta)
        for span in meta.prefills:
            qs = slice(span.query_start, span.query_start + span.query_len)
            out[qs] = self._prefill(q[qs], k_cache, v_cache, span)
        return out

    def _decode(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        n, max_ctx = meta.decode_slots.shape
        group = self.num_heads // self.num_kv_heads
        flat = meta.decode_slots.reshape(-1)
        keys = (
            k_cache.index_select(0, flat).view(n, max_ctx, self.num_kv_heads, self.head_dim).transpose(1, 2)
        )
        vals = (
            v_cache.index_select(0, flat).view(n, max_ctx, self.num_kv_heads, self.head_dim).transpose(1, 2)
        )
        # The query heads that share a KV head become that head's "query rows": no K/V repeat needed.
        qg = q.view(n, self.num_kv_heads, group, self.head_dim)
        # Plain matmul-softmax-matmul (softmax in float32, as HF's eager attention): for one query token
        # per request this is ~2x faster on CPU in bfloat16 than SDPA's flash kernel.
        scores = torch.matmul(qg, keys.to(q.dtype).transpose(-1, -2)) * self.scale
        scores = scores.float().masked_fill_(~meta.decode_mask, float("-inf"))
        out = torch.matmul(scores.softmax(dim=-1).to(q.dtype), vals.to(q.dtype))
        return out.reshape(n, self.num_heads, self.head_dim)

    def _prefill(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, span: PrefillSpan
    ) -> torch.Tensor:
        keys = k_cache.index_select(0, span.context_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        vals = v_cache.index_select(0, span.context_slots).transpose(0, 1).unsqueeze(0).to(q.dtype)
        qh = q.transpose(0, 1).unsqueeze(0)
        out = F.scaled_dot_product_attention(
            qh,
            keys,
            vals,
            attn_mask=span.mask,
            is_causal=span.mask is None,
            scale=self.scale,
            enable_gqa=self.num_heads != self.num_kv_heads,
        )
        return out.squeeze(0).transpose(0, 1)
