"""StagedSlabStorage: one block pool's slabs backed on several devices, each holding its layers' K/V.

With `--layer-split`, each stage (a device and a run of consecutive decoder layers) has its own
`KVSlabStorage` over its own layers, in its own ledger. The block pool, block tables and prefix cache stay
one: block b is block b on every stage. So a slab exists on every stage or on none: `add` backs it on all
of them or, when any stage's budget refuses, on none (the ones already added are given back).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.storage import KVSlabStorage


class StagedSlabStorage:
    """Several stages' `KVSlabStorage`s seen as the one storage the pool, runner and swapper use. Layer l of
    the model is layer l - first of the stage holding it; slot ids are global and the same on every stage."""

    def __init__(self, parts: Sequence[KVSlabStorage]) -> None:
        assert len(parts) > 1, "one stage needs no staging"
        first = parts[0]
        for part in parts[1:]:
            # Attention metadata is built once and moved to each device: it must index each stage alike.
            if (part.slab_slots, part.max_slabs, part.view_slots) != (
                first.slab_slots,
                first.max_slabs,
                first.view_slots,
            ):
                raise ValueError(
                    f"KV stages differ in shape ({part.mode} on {part.device} vs {first.mode} on "
                    f"{first.device}); every --layer-split device needs the same slab layout"
                )
        self.stages = list(parts)
        self.bounds: list[tuple[int, int]] = []
        start = 0
        for part in parts:
            layers = part.slab_shape[0]
            self.bounds.append((start, start + layers))
            start += layers
        self.num_layers = start
        self.kv_format: KVCacheFormat = first.kv_format
        self.block_size = first.block_size
        self.slab_slots = first.slab_slots
        self.max_slabs = first.max_slabs
        self.view_slots = first.view_slots
        self.dtype = first.dtype
        self.device = first.device  # where the engine (embedding, head, sampler) lives: stage 0
        self.bytes_per_token = sum(p.bytes_per_token for p in parts)
        self.block_bytes = sum(p.block_bytes for p in parts)
        self.slab_bytes = sum(p.slab_bytes for p in parts)
        self.slab_shape = (self.num_layers, *first.slab_shape[1:])
        self.journal: list[tuple] | None = None  # tensor parallelism is refused with a layer split

    # --- the pool's allocator -------------------------------------------------------------------------

    @property
    def live(self) -> set[int]:
        """Slabs live on every stage (stage 0's set: `add` and `remove` keep the stages in lockstep)."""
        return self.stages[0].live

    @property
    def num_live(self) -> int:
        return len(self.live)

    @property
    def bytes_allocated(self) -> int:
        return self.num_live * self.slab_bytes

    @property
    def mode(self) -> str:
        return self.stages[0].mode

    def num_addable(self) -> int:
        """Slabs every stage's budget allows on top of the live ones."""
        return min(part.num_addable() for part in self.stages)

    def add(self, slab: int) -> bool:
        """Back slab `slab` on every stage, or (a stage's budget refusing) on none."""
        added: list[KVSlabStorage] = []
        for part in self.stages:
            if not part.add(slab):
                for done in added:
                    done.remove(slab)
                return False
            added.append(part)
        return True

    def remove(self, slab: int) -> None:
        for part in self.stages:
            part.remove(slab)

    def tag_cached(self, num_cached_blocks: int) -> None:
        """Each stage re-tags its own share of the cached blocks in its own ledger."""
        for part in self.stages:
            part.tag_cached(num_cached_blocks)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        for part in self.stages:
            part.copy_blocks(src, dst)

    def take_journal(self) -> list[tuple]:
        return []

    # --- the model's view -----------------------------------------------------------------------------

    def parts(self) -> list[KVSlabStorage]:
        """The stages' storages, in layer order."""
        return self.stages

    def bind(self, attention_layers: Sequence[torch.nn.Module]) -> None:
        """Each attention layer reads and writes its stage's storage, at its index within the stage."""
        assert len(attention_layers) == self.num_layers
        for part, (lo, hi) in zip(self.stages, self.bounds, strict=True):
            part.bind(attention_layers[lo:hi])

    # --- whole-model slot copies (swap), split by layer -------------------------------------------------

    def block_shape(self, num_blocks: int) -> tuple[int, ...]:
        return (self.num_layers, *self.stages[0].block_shape(num_blocks)[1:])

    def read_slots(self, slots: torch.Tensor, out: torch.Tensor) -> None:
        """`out` [all layers, 2, len(slots), ...]: each stage fills its layers' rows."""
        for part, (lo, hi) in zip(self.stages, self.bounds, strict=True):
            part.read_slots(slots.to(part.device), out[lo:hi])

    def write_slots(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        for part, (lo, hi) in zip(self.stages, self.bounds, strict=True):
            part.write_slots(slots.to(part.device), data[lo:hi])
