"""One decoder layer's parameters as one flat byte buffer, so a streamed layer is one copy, not dozens.

Every decoder layer of a model has the same parameters (names, shapes, dtypes, quantized or not), so one
layout serves them all: a layer is packed into it once at load (into the offload file or pinned host
memory), copied whole into a staging buffer before it runs, and its parameters are bound to views of that
buffer. Offsets are aligned to 256 bytes, the alignment CUDA's allocator gives and its GEMM kernels and
PyTorch's CPU int4/int8 kernels expect of a weight.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

ALIGN = 256


@dataclass(slots=True, frozen=True)
class ParamSlot:
    name: str  # parameter name inside the layer, e.g. "self_attn.qkv_proj.weight"
    dtype: torch.dtype
    shape: tuple[int, ...]
    offset: int  # bytes from the start of the layer buffer

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * _element_size(self.dtype)


@dataclass(slots=True, frozen=True)
class LayerLayout:
    """Where each parameter of a decoder layer sits in the layer's flat buffer."""

    params: tuple[ParamSlot, ...]
    nbytes: int  # the buffer size (aligned)

    @classmethod
    def of(cls, layer: nn.Module) -> LayerLayout:
        """The layout of `layer`'s parameters as they are now (after loading and any repacking). Reads
        only shapes and dtypes, so it also works on a layer built on the meta device."""
        slots: list[ParamSlot] = []
        offset = 0
        for name, p in layer.named_parameters():
            slots.append(ParamSlot(name, p.dtype, tuple(p.shape), offset))
            offset += _round_up(slots[-1].nbytes, ALIGN)
        if not slots:
            raise ValueError("a layer without parameters has nothing to offload")
        return cls(tuple(slots), offset)

    def check(self, layer: nn.Module) -> None:
        """Raise unless `layer` has exactly this layout's parameters (a model whose layers differ cannot
        share one staging buffer)."""
        theirs = [(n, p.dtype, tuple(p.shape)) for n, p in layer.named_parameters()]
        ours = [(s.name, s.dtype, s.shape) for s in self.params]
        if theirs != ours:
            raise ValueError("decoder layers differ in their parameters; offload needs identical layers")

    def pack(self, layer: nn.Module, out: torch.Tensor) -> None:
        """Copy `layer`'s parameter bytes into `out` (uint8, `nbytes` long); padding is zeroed."""
        self.check(layer)
        out.zero_()
        for slot in self.params:
            src = layer.get_parameter(slot.name).data.contiguous().reshape(-1).view(torch.uint8)
            out[slot.offset : slot.offset + slot.nbytes].copy_(src)

    def bind(self, layer: nn.Module, buffer: torch.Tensor) -> None:
        """Point `layer`'s parameters at views of `buffer` (which holds a packed layer); no copy."""
        for slot in self.params:
            view = buffer[slot.offset : slot.offset + slot.nbytes].view(slot.dtype).view(slot.shape)
            layer.get_parameter(slot.name).data = view

    def materialize(self, layer: nn.Module, device: torch.device) -> None:
        """Give `layer`'s parameters their own memory of the full shape (to load a layer into)."""
        for slot in self.params:
            layer.get_parameter(slot.name).data = torch.empty(slot.shape, dtype=slot.dtype, device=device)

    def release(self, layer: nn.Module, device: torch.device) -> None:
        """Drop `layer`'s parameter memory: each becomes an empty tensor, so a use without a bind fails
        loudly instead of computing with stale bytes."""
        for slot in self.params:
            empty = torch.empty(0, dtype=slot.dtype, device=device)
            param = layer.get_parameter(slot.name)
            if param.is_meta:  # built on meta: a meta tensor cannot take device data, so swap the object
                owner, _, leaf = slot.name.rpartition(".")
                layer.get_submodule(owner)._parameters[leaf] = nn.Parameter(empty, requires_grad=False)
            else:
                param.data = empty


def _round_up(n: int, align: int) -> int:
    return -(-n // align) * align


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()
