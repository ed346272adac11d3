"""The Triton attention backend: its metadata (`TritonMetadata`), built from a step's `BatchLayout` by
`TritonMetadataBuilder`, and the attention it runs (`triton_attention`), through the kernels of
triton_kernels.py, which read K/V through block tables straight from the slabs."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitllm.memory.transfer import to_device, to_device_packed
from fitllm.model.attention.batch import BatchLayout


@dataclass(slots=True)
class TritonMetadata:
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


@dataclass(frozen=True, slots=True)
class TritonMetadataBuilder:
    """Turns a `BatchLayout` into `TritonMetadata`: block tables and lengths, no gather plan."""

    num_kv_heads: int
    sliding_window: int  # 0: none
    num_sms: int | None  # SMs the flash-decoding splits fill; None: no splits (the scratch prefill)

    def build(
        self, layout: BatchLayout, device: torch.device, slot_mapping: torch.Tensor | None = None
    ) -> TritonMetadata:
        """The metadata on `device`; `slot_mapping` is the layout's already on the device (the runner
        copies it with the ids), else it is copied here. The int32 fields (lengths, query starts, block
        tables) go in one copy."""
        width = max(map(len, layout.block_tables))
        max_query_len = layout.max_query_len
        splits = 1
        if max_query_len == 1 and self.num_sms is not None:
            from fitllm.model.attention.triton_kernels import choose_num_splits

            splits = choose_num_splits(
                len(layout.seq_lens), self.num_kv_heads, max(layout.seq_lens), self.num_sms
            )
        if slot_mapping is None:
            slot_mapping = to_device(layout.slot_mapping, torch.long, device)
        flat_tables = [i for t in layout.block_tables for i in t + [0] * (width - len(t))]
        seq_lens, query_start, tables = to_device_packed(
            [layout.seq_lens, layout.query_start, flat_tables], torch.int32, device
        )
        return TritonMetadata(
            slot_mapping=slot_mapping,
            block_tables=tables.view(len(layout.seq_lens), width),
            seq_lens=seq_lens,
            query_start=query_start,
            max_query_len=max_query_len,
            block_size=layout.block_size,
            sliding_window=self.sliding_window,
            num_splits=splits,
        )


def triton_attention(
    attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TritonMetadata
) -> torch.Tensor:
    """Layer `attn`'s (a PagedAttention) attention through the kernels: q: [T, Hq, D]; k, v: [T, Hk, D]
    -> [T, Hq, D]."""
    from fitllm.model.attention import triton_kernels

    layout = attn.kv_layout
    assert layout is not None, "KV layout not bound to this layer"
    fmt = attn.kv_format
    triton_kernels.write_kv(fmt.encode(k), fmt.encode(v), meta.slot_mapping, layout, attn.layer_index)
    return triton_kernels.paged_attention(
        q,
        layout,
        attn.layer_index,
        kv_cache_dtype=fmt.name,
        block_tables=meta.block_tables,
        seq_lens=meta.seq_lens,
        query_start=meta.query_start,
        max_query_len=meta.max_query_len,
        block_size=meta.block_size,
        scale=attn.scale,
        sliding_window=meta.sliding_window,
        num_splits=meta.num_splits,
    )
