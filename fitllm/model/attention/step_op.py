"""Paged attention as one opaque operator, `torch.ops.fitllm.paged_attention`, for a compiled forward.

`torch.compile` cannot trace the torch backend's attention into a static graph: its gathers have one length
per step (the contexts), its K/V slabs come and go, and its metadata is plain Python. Everything else in a
decode step has static shapes for a given batch size. So, while a forward is being traced,
`PagedAttention.forward` calls this operator instead, which the compiler sees as one call with a known
output shape; when it runs, it attends through the step's metadata bound by `bound_step`. The whole forward
then becomes one graph (norms, rotary, SiLU-mul and residual adds fused by inductor) with one opaque call
per layer, and no graph break, so no guard or Python is paid between layers.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from fitllm.model.attention.torch_backend import TorchMetadata, torch_attention


@dataclass(slots=True)
class _BoundStep:
    """The step the operator attends for: the model's attention layers in order, and their metadata."""

    layers: Sequence[nn.Module] = ()
    meta: TorchMetadata | None = None


_STEP = _BoundStep()

_LIB = torch.library.Library("fitllm", "DEF")  # noqa: TOR901 (a plain Library is ~2x cheaper per call)
_LIB.define("paged_attention(Tensor q, Tensor k, Tensor v, int layer) -> Tensor")


def _paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    meta = _STEP.meta
    if meta is None:
        raise RuntimeError("fitllm::paged_attention called outside bound_step (no step metadata bound)")
    return torch_attention(_STEP.layers[layer], q, k, v, meta)


def _paged_attention_fake(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    return q.new_empty(q.shape)


_LIB.impl("paged_attention", _paged_attention, "CompositeExplicitAutograd")
torch.library.register_fake("fitllm::paged_attention", _paged_attention_fake, lib=_LIB)


@contextmanager
def bound_step(layers: Sequence[nn.Module], meta: TorchMetadata) -> Iterator[None]:
    """Bind one step's attention layers (`model.attention_layers()`) and metadata for the operator's calls."""
    _STEP.layers, _STEP.meta = layers, meta
    try:
        yield
    finally:
        _STEP.layers, _STEP.meta = (), None


def opaque_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer: int) -> torch.Tensor:
    """The operator call that a traced `PagedAttention.forward` records for layer `layer`."""
    return torch.ops.fitllm.paged_attention(q, k, v, layer)
