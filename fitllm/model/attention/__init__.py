"""Paged attention: the layer and one module per backend (moved here from model/attention.py and
model/triton_attention.py)."""

from fitllm.model.attention.torch_backend import (
    ATTENTION_BACKENDS,
    AttentionMetadata,
    DecodeGroup,
    KernelMetadata,
    PagedAttention,
    PrefillSpan,
    head_rows,
    resolve_attention_backend,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionMetadata",
    "DecodeGroup",
    "KernelMetadata",
    "PagedAttention",
    "PrefillSpan",
    "head_rows",
    "resolve_attention_backend",
]
