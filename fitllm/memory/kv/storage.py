"""KVSlabStorage: the device memory behind the block pool, reserved in the ledger slab by slab.

Two ways to back slabs, chosen by device:

- `reserved` (CPU on Linux): one virtual region big enough for every slab the pool may ever have,
  [num_layers, 2, max_slabs * slab_slots, kv_heads, entry_width], an anonymous private mmap whose pages the
  kernel only backs when they are first written. Adding a slab reserves its bytes in the ledger; releasing
  it hands its pages back with madvise(MADV_DONTNEED), after which they read as zeros. Attention sees one
  tensor, so a gather stays a single index_select whatever the number of slabs (a gather split over slabs
  measured 30% slower per decode step at 3 slabs).
- `slabs` (CUDA, or when the region cannot be reserved): one real tensor [num_layers, 2, slab_slots,
  kv_heads, entry_width] per slab, freed as a whole; attention splits its reads and writes by slab.

Each head vector takes `entry_width` elements of the storage dtype, as its `KVCacheFormat` says: head_dim
values of the model dtype, or head_dim one-byte codes plus a 4-byte scale for a quantized cache.
"""

from __future__ import annotations

import logging
import math
import mmap
import sys
from collections.abc import Callable, Sequence

import torch
from torch import nn

from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.layout import PagedKVLayout, block_slots, split_by_slab
from fitllm.memory.ledger import MemoryLedger

log = logging.getLogger("fitllm")


class ReservedRegion:
    """Anonymous private memory seen as one tensor: zero-filled, and backed by the kernel page by page only
    when first written (so reserving it for every slab costs address space, not memory)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        self._buffer = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE)
        self.tensor = torch.frombuffer(self._buffer, dtype=dtype).view(shape)
        self._base = self.tensor.data_ptr()

    def discard(self, view: torch.Tensor) -> None:
        """Return the whole pages inside a contiguous view's bytes to the OS; they read back as zeros."""
        page = mmap.PAGESIZE
        start = view.data_ptr() - self._base
        end = start + view.numel() * view.element_size()
        start = (start + page - 1) // page * page
        end = end // page * page
        if end > start:
            self._buffer.madvise(mmap.MADV_DONTNEED, start, end - start)


def reserve_region(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> ReservedRegion | None:
    """A lazily backed region for every slab (CPU on Linux), or None where slabs must be real tensors."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return None
    try:
        return ReservedRegion(shape, dtype)
    except (OSError, ValueError, RuntimeError) as exc:  # address space or overcommit limits
        log.info("KV region %s not reservable (%s); using separate slabs", shape, exc)
        return None


class KVSlabStorage:
    """Allocates and frees KV slabs through the ledger. The one owner of which slabs are live (`live`, which
    the block pool reads) and of the ledger's `kv` and `kv_cached` tags: `kv` holds the live slabs, and
    `kv_cached` the part of them that blocks kept only for prefix reuse take (`tag_cached`)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        kv_format: KVCacheFormat,
        block_size: int,
        slab_blocks: int,
        max_slabs: int,
        device: torch.device,
        ledger: MemoryLedger,
    ) -> None:
        self.kv_format = kv_format
        self.block_size = block_size
        dtype, width = kv_format.storage_dtype, kv_format.entry_width
        self.slab_slots = slab_blocks * block_size
        self.slab_shape = (num_layers, 2, self.slab_slots, num_kv_heads, width)
        self.bytes_per_token = kv_format.bytes_per_token(num_layers, num_kv_heads)
        self.block_bytes = block_size * self.bytes_per_token
        self.slab_bytes = slab_blocks * self.block_bytes
        self.max_slabs = max_slabs
        self.dtype = dtype
        self.device = device
        self.ledger = ledger
        self.live: set[int] = set()
        # Tensor parallel, rank 0: every slab op in order (("add", slab), ("remove", slab), ("copy", src,
        # dst)), sent with the next step so each worker's storage follows in that step (`replay`).
        self.journal: list[tuple] | None = None
        self.slabs: list[torch.Tensor | None] = [None] * max_slabs  # `slabs` mode only
        self.region: torch.Tensor | None = None
        self._reserved: ReservedRegion | None = None
        if max_slabs > 1:
            shape = (num_layers, 2, max_slabs * self.slab_slots, num_kv_heads, width)
            self._reserved = reserve_region(shape, dtype, device)
            if self._reserved is not None:
                self.region = self._reserved.tensor
        # What attention indexes: one tensor per layer over all slots, or one per slab.
        self.view_slots = max_slabs * self.slab_slots if self.region is not None else self.slab_slots
        if self.region is not None:
            self.layer_slabs: list[list[torch.Tensor | None]] = [[self.region[i]] for i in range(num_layers)]
        else:
            self.layer_slabs = [[None] * max_slabs for _ in range(num_layers)]
        # What the Triton kernels address: the region itself, or separate slabs from a one-element anchor
        # (its 8 bytes per slab of offsets and the anchor are not ledgered).
        anchor = self.region if self.region is not None else torch.empty(1, dtype=dtype, device=device)
        offsets = torch.zeros(1 if self.region is not None else max_slabs, dtype=torch.int64, device=device)
        self.layout = PagedKVLayout(anchor, offsets, self.view_slots, num_kv_heads, width)

    @property
    def mode(self) -> str:
        return "reserved" if self.region is not None else "slabs"

    @property
    def num_live(self) -> int:
        return len(self.live)

    @property
    def bytes_allocated(self) -> int:
        return self.num_live * self.slab_bytes

    def parts(self) -> list[KVSlabStorage]:
        """The storages holding the model's layers, in layer order: this one (a layer split has several:
        fitllm/memory/kv/staged.py)."""
        return [self]

    def bind(self, attention_layers: Sequence[nn.Module]) -> None:
        """Point each attention layer at its layer of this storage (its slab views, format and layout); the
        views are updated in place as slabs come and go."""
        assert len(attention_layers) == len(self.layer_slabs)
        for i, (attn, slabs) in enumerate(zip(attention_layers, self.layer_slabs, strict=True)):
            attn.kv_slabs, attn.kv_format = slabs, self.kv_format
            attn.kv_layout, attn.layer_index = self.layout, i

    def slab_view(self, slab: int) -> torch.Tensor:
        """Slab `slab`'s memory as [num_layers, 2, slab_slots, kv_heads, entry_width] (a view, not a copy)."""
        if self.region is not None:
            return self.region[:, :, slab * self.slab_slots : (slab + 1) * self.slab_slots]
        tensor = self.slabs[slab]
        assert tensor is not None, f"slab {slab} is not live"
        return tensor

    def read_slots(self, slots: torch.Tensor, out: torch.Tensor) -> None:
        """Copy the K/V of global `slots` into `out` [num_layers, 2, len(slots), kv_heads, entry_width]."""
        for view, pos, local in self._split(slots):
            part = view.index_select(2, local)
            if pos is None:
                out.copy_(part, non_blocking=True)
            else:
                out[:, :, pos.to(out.device)] = part.to(out.device)

    def write_slots(self, slots: torch.Tensor, data: torch.Tensor) -> None:
        """Write `data` [num_layers, 2, len(slots), kv_heads, entry_width] into global `slots`."""
        data = data.to(self.device, non_blocking=True)
        for view, pos, local in self._split(slots):
            view.index_copy_(2, local, data if pos is None else data.index_select(2, pos))

    def move_slots(
        self, src: torch.Tensor, dst: torch.Tensor, transform: Callable[[torch.Tensor], None]
    ) -> None:
        """Copy the K/V of global slots `src` to `dst` (they may overlap: each layer's sources are all read
        before any of its slots is written), calling `transform` on the gathered K/V [num_layers, 2, n,
        kv_heads, entry_width] in between. On the reserved region a layer at a time (num_layers 1 each): the
        pieces stay in cache and no buffer of the whole move is allocated (measured: 848 slots of 30 layers
        moved in 14 ms against 22-28 ms at once)."""
        if self.region is None:
            layers, _, _, heads, width = self.slab_shape
            kv = torch.empty((layers, 2, len(src), heads, width), dtype=self.dtype, device=self.device)
            self.read_slots(src, kv)
            transform(kv)
            self.write_slots(dst, kv)
            return
        for layer in self.region:
            part = layer.index_select(1, src).unsqueeze(0)
            transform(part)
            layer.index_copy_(1, dst, part[0])

    def key_runs(self, block_ids: list[int]) -> list[torch.Tensor]:
        """The K of whole blocks as views [num_layers, slots, kv_heads, entry_width] into the cache, one per
        run of consecutive block ids within a slab (what a context shift rotates in place, with no copy)."""
        per_slab = self.slab_slots // self.block_size
        runs: list[list[int]] = []
        for b in sorted(block_ids):
            if runs and b == runs[-1][1] and (self.region is not None or b % per_slab):
                runs[-1][1] = b + 1
            else:
                runs.append([b, b + 1])
        views = []
        for lo, hi in runs:
            if self.region is not None:
                views.append(self.region[:, 0, lo * self.block_size : hi * self.block_size])
            else:
                slab, first = divmod(lo, per_slab)
                local = slice(first * self.block_size, (first + hi - lo) * self.block_size)
                views.append(self.slab_view(slab)[:, 0, local])
        return views

    def block_shape(self, num_blocks: int) -> tuple[int, ...]:
        """The shape `read_slots` fills for `num_blocks` whole blocks."""
        layers, _, _, heads, width = self.slab_shape
        return (layers, 2, num_blocks * self.block_size, heads, width)

    def copy_blocks(self, src: list[int], dst: list[int]) -> None:
        """Copy whole blocks' K/V from block ids `src` to `dst` (compaction before a slab is released),
        through a device buffer of at most one slab's bytes at a time."""
        if self.journal is not None:
            self.journal.append(("copy", list(src), list(dst)))
        per = max(1, self.slab_slots // self.block_size)
        for i in range(0, len(src), per):
            part = src[i : i + per]
            buffer = torch.empty(self.block_shape(len(part)), dtype=self.dtype, device=self.device)
            self.read_slots(block_slots(part, self.block_size), buffer)
            self.write_slots(block_slots(dst[i : i + per], self.block_size), buffer)

    def _split(self, slots: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]]:
        """Global slot ids as (tensor to index on dim 2, positions in `slots` or None for all, local ids)."""
        if self.region is not None:
            return [(self.region, None, slots)]
        split = split_by_slab(slots, self.slab_slots)
        return [(self.slab_view(slab), pos, local) for slab, pos, local in split.parts]

    def num_addable(self) -> int:
        """Slabs the budget allows on top of the live ones."""
        return min(self.max_slabs - self.num_live, self.ledger.free_bytes() // self.slab_bytes)

    def add(self, slab: int) -> bool:
        """Reserve and back slab `slab`; False (nothing changed) if the budget refuses."""
        assert slab not in self.live, f"slab {slab} is already live"
        if not self.ledger.can_reserve(self.slab_bytes):
            return False
        self.ledger.reserve("kv", self.slab_bytes)
        if self.journal is not None:
            self.journal.append(("add", slab))
        if self.region is not None:
            # Fresh or released pages read as zeros: padded gathers (slot 0) see finite numbers.
            self.live.add(slab)
            return True
        tensor = torch.zeros(self.slab_shape, dtype=self.dtype, device=self.device)
        self.slabs[slab] = tensor
        self.layout.bind(slab, tensor)
        for layer, views in enumerate(self.layer_slabs):
            views[slab] = tensor[layer]
        self.live.add(slab)
        return True

    def remove(self, slab: int) -> None:
        """Free slab `slab` and give its bytes back to the ledger."""
        assert slab in self.live, f"slab {slab} is not live"
        if self.journal is not None:
            self.journal.append(("remove", slab))
        if self.region is not None:
            view = self.slab_view(slab)
            for layer in range(view.shape[0]):
                for kv in range(2):
                    self._reserved.discard(view[layer, kv])
        else:
            for views in self.layer_slabs:
                views[slab] = None
            self.slabs[slab] = None
        self.live.discard(slab)
        # The slab's cached blocks were evicted with it; the rest are re-tagged at the next `tag_cached`.
        self.tag_cached(0)
        self.ledger.release("kv", self.slab_bytes)

    def take_journal(self) -> list[tuple]:
        """The slab ops since the last call (tensor parallel, rank 0)."""
        ops, self.journal = self.journal or [], ([] if self.journal is not None else None)
        return ops

    def replay(self, ops: list[tuple]) -> None:
        """Follow rank 0's slab ops in order (a worker's storage, same shape, before the step that needs
        them); a slab this rank's budget refuses is an error: ranks must hold the same pool."""
        for op in ops:
            if op[0] == "add":
                if not self.add(op[1]):
                    raise RuntimeError(
                        f"this rank's --memory-budget refuses KV slab {op[1]} that rank 0 added "
                        f"({self.ledger.free_bytes()} bytes free); give every rank the same budget"
                    )
            elif op[0] == "remove":
                self.remove(op[1])
            else:
                self.copy_blocks(op[1], op[2])

    def tag_cached(self, num_cached_blocks: int) -> None:
        """Re-tag the bytes of `num_cached_blocks` blocks (unreferenced, kept for prefix reuse) as
        `kv_cached`, the rest of the live slabs as `kv`; the total does not change."""
        delta = num_cached_blocks * self.block_bytes - self.ledger.current("kv_cached")
        if delta > 0:
            self.ledger.move("kv", "kv_cached", delta)
        elif delta < 0:
            self.ledger.move("kv_cached", "kv", -delta)
