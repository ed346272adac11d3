"""The attention layer (`PagedAttention`) and the choice of backend: K/V are written and read only through
slot ids or block tables.

Two backends (`--attention-backend`, chosen by `resolve_attention_backend`): the torch reference backend
(torch_backend.py) and Triton kernels (triton_backend.py, triton_kernels.py) that read K/V through block
tables straight from the slabs. The runner picks one per engine and turns each step's `BatchLayout` into
that backend's metadata with its builder (`metadata_builder`); `PagedAttention.forward` dispatches on the
metadata's type.
"""

from __future__ import annotations

import torch
from torch import nn

from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.layout import PagedKVLayout
from fitllm.model.attention.step_op import opaque_attention
from fitllm.model.attention.torch_backend import TorchMetadata, TorchMetadataBuilder, torch_attention
from fitllm.model.attention.triton_backend import TritonMetadata, TritonMetadataBuilder, triton_attention

AttentionMetadata = TorchMetadata | TritonMetadata  # one step's metadata, for the backend that runs


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


def metadata_builder(
    backend: str,
    num_kv_heads: int,
    sliding_window: int | None,
    slab_slots: int,
    decode_cap: int | None = None,
    num_sms: int | None = None,
) -> TorchMetadataBuilder | TritonMetadataBuilder:
    """The builder of `backend`'s metadata for a model of `num_kv_heads` KV heads and `sliding_window`:
    `slab_slots` slots per KV slab and the decode gather cap (torch), the SMs flash-decoding splits fill
    (Triton; None: no splits)."""
    if backend == "triton":
        return TritonMetadataBuilder(num_kv_heads, sliding_window or 0, num_sms)
    return TorchMetadataBuilder(num_kv_heads, slab_slots, sliding_window, decode_cap)


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
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: AttentionMetadata | None
    ) -> torch.Tensor:
        """q: [T, Hq, D]; k, v: [T, Hk, D] -> [T, Hq, D]. meta None: the step's metadata is the one bound by
        `step_op.bound_step`, reached through the opaque operator that a compiled forward records."""
        if meta is None:  # a compiled decode forward (fitllm/engine/compiled_decode.py): see step_op.py
            return opaque_attention(q, k, v, self.layer_index)
        assert self.kv_slabs is not None and self.kv_format is not None, "KV cache not bound to this layer"
        if isinstance(meta, TritonMetadata):
            return triton_attention(self, q, k, v, meta)
        return torch_attention(self, q, k, v, meta)
