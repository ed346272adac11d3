"""How the kernels address KV slabs: global slot and row ids split by slab (`SlabSplit`, for the torch
reference backend and the slab storage's swap copies) and `PagedKVLayout` (one fixed anchor plus a per-slab
offset table, for the Triton kernels and captured CUDA graphs). Memory-side facts the storage builds and
attention reads, so they live here, below the model."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitllm.memory.transfer import move


@dataclass(slots=True)
class SlabSplit:
    """Global ids split by slab: (slab, positions in the original order or None for all, local ids)."""

    size: int
    parts: list[tuple[int, torch.Tensor | None, torch.Tensor]]

    def to(self, device: torch.device) -> SlabSplit:
        """The same split with its index tensors on `device` (itself on CPU)."""
        if device.type == "cpu":
            return self
        return SlabSplit(
            self.size,
            [(s, None if p is None else move(p, device), move(local, device)) for s, p, local in self.parts],
        )


def block_slots(block_ids: list[int], block_size: int) -> torch.Tensor:
    """Global slot ids of whole blocks, block after block (int64, on CPU): the one slot formula for blocks."""
    ids = torch.tensor(block_ids, dtype=torch.int64)
    return (ids.unsqueeze(1) * block_size + torch.arange(block_size)).reshape(-1)


def split_by_slab(ids: torch.Tensor, per_slab: int) -> SlabSplit:
    """Split global slot or row ids (per_slab ids per slab) into per-slab local ids."""
    slab = ids // per_slab
    lo, hi = int(slab.min()), int(slab.max())
    if lo == hi:
        return SlabSplit(len(ids), [(lo, None, ids - lo * per_slab)])
    parts = []
    for s in torch.unique(slab).tolist():
        pos = (slab == s).nonzero().squeeze(1)
        parts.append((s, pos, ids.index_select(0, pos) - s * per_slab))
    return SlabSplit(len(ids), parts)


@dataclass(slots=True)
class PagedKVLayout:
    """Where the Triton kernels find every layer's K/V: slab s of layer l starts at
    anchor + slab_offsets[s] + l * layer_stride elements, K then V, each [slab_slots, kv_heads, width].

    Slabs are separate allocations on CUDA; addressing them from one fixed anchor through an offset table
    that is rewritten in place lets a captured CUDA graph outlive slabs coming and going."""

    anchor: torch.Tensor  # a fixed tensor of the storage dtype, alive as long as the pool
    slab_offsets: torch.Tensor  # [max_slabs] int64: element offset of each live slab from `anchor`
    slab_slots: int
    num_kv_heads: int
    width: int  # elements per head vector (KVCacheFormat.entry_width)

    @property
    def kv_stride(self) -> int:
        """Elements from a slab's K plane to its V plane within one layer."""
        return self.slab_slots * self.num_kv_heads * self.width

    def layer_offset(self, layer: int) -> int:
        return layer * 2 * self.kv_stride

    @property
    def align(self) -> int:
        """Elements every row offset is a multiple of (a power of two, at most 16 bytes' worth): the kernels
        tell Triton so (`tl.multiple_of`), which lets it load K/V rows 16 bytes at a time. Rows are `width`
        apart, and `bind` refuses a slab whose offset is not a multiple (allocations are 512-byte aligned
        on CUDA, 64-byte on CPU, so none is refused in practice)."""
        return max(1, min(self.width & -self.width, 16 // self.anchor.element_size()))

    def bind(self, slab: int, tensor: torch.Tensor) -> None:
        """Point slab `slab` at `tensor` (its [num_layers, 2, slab_slots, kv_heads, width] memory)."""
        delta = tensor.data_ptr() - self.anchor.data_ptr()
        size = self.anchor.element_size()
        if delta % (size * self.align):
            raise ValueError(
                f"KV slab at byte offset {delta} is not aligned to {self.align} elements of {size} bytes"
            )
        self.slab_offsets[slab] = delta // size
