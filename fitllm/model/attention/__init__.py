"""Paged attention: the layer (layer.py) and one module per backend (torch_backend.py, the reference;
triton_backend.py over the kernels of triton_kernels.py), each building its own metadata from a step's
backend-independent `BatchLayout` (batch.py)."""

from fitllm.model.attention.batch import BatchLayout, slot_of
from fitllm.model.attention.layer import (
    ATTENTION_BACKENDS,
    AttentionMetadata,
    PagedAttention,
    metadata_builder,
    resolve_attention_backend,
)
from fitllm.model.attention.torch_backend import TorchMetadata
from fitllm.model.attention.triton_backend import TritonMetadata

__all__ = [
    "ATTENTION_BACKENDS",
    "AttentionMetadata",
    "BatchLayout",
    "PagedAttention",
    "TorchMetadata",
    "TritonMetadata",
    "metadata_builder",
    "resolve_attention_backend",
    "slot_of",
]
