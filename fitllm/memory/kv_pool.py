"""KVSlabStorage: the device memory behind the block pool, reserved in the ledger slab by slab.

Two ways to back slabs, chosen by device:

- `reserved` (CPU on Linux): one virtual region big enough for every slab the pool may ever have,
  [num_layers, 2, max_slabs * slab_slots, kv_heads, head_dim], made with torch.empty, whose pages the
  kernel only backs when they are first written. Adding a slab reserves its bytes in the ledger; releasing
  it hands its pages back with madvise(MADV_DONTNEED), after which they read as zeros. Attention sees one
  tensor, so a gather stays a single index_select whatever the number of slabs (a gather split over slabs
  measured 30% slower per decode step at 3 slabs).
- `slabs` (CUDA, or when the region cannot be reserved): one real tensor [num_layers, 2, slab_slots,
  kv_heads, head_dim] per slab, freed as a whole; attention splits its reads and writes by slab.
"""

from __future__ import annotations

import ctypes
import logging
import math
import mmap
import sys

import torch

from fitllm.memory.ledger import MemoryLedger

log = logging.getLogger("fitllm")
_MADV_DONTNEED = 4


def _madvise_dontneed(tensor: torch.Tensor) -> None:
    """Return the whole pages inside a contiguous tensor's bytes to the OS (they read back as zeros)."""
    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    start = (start + page - 1) // page * page
    end = end // page * page
    if end > start:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(end - start), _MADV_DONTNEED) != 0:
            raise OSError(ctypes.get_errno(), "madvise(MADV_DONTNEED) failed")


def reserve_region(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A lazily backed tensor for every slab (CPU on Linux), or None where slabs must be real tensors."""
    if device.type != "cpu" or not sys.platform.startswith("linux"):
        return None
    try:
        return torch.empty(shape, dtype=dtype, device=device)
    except RuntimeError as exc:  # address space or overcommit limits: fall back to real slabs
        log.info("KV region %s not reservable (%s); using separate slabs", shape, exc)
        return None


class KVSlabStorage:
    """Allocates and frees KV slabs through the ledger (tag `kv`)."""

    def __init__(
        self,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        block_size: int,
        slab_blocks: int,
        max_slabs: int,
        dtype: torch.dtype,
        device: torch.device,
        ledger: MemoryLedger,
    ) -> None:
        self.slab_slots = slab_blocks * block_size
        self.slab_shape = (num_layers, 2, self.slab_slots, num_kv_heads, head_dim)
        self.slab_bytes = math.prod(self.slab_shape) * torch.empty((), dtype=dtype).element_size()
        self.max_slabs = max_slabs
        self.dtype = dtype
        self.device = device
        self.ledger = ledger
        self.live = [False] * max_slabs
        self.slabs: list[torch.Tensor | None] = [None] * max_slabs  # `slabs` mode only
        self.region: torch.Tensor | None = None
        if max_slabs > 1:
            shape = (num_layers, 2, max_slabs * self.slab_slots, num_kv_heads, head_dim)
            self.region = reserve_region(shape, dtype, device)
        # What attention indexes: one tensor per layer over all slots, or one per slab.
        self.view_slots = max_slabs * self.slab_slots if self.region is not None else self.slab_slots
        if self.region is not None:
            self.layer_slabs: list[list[torch.Tensor | None]] = [[self.region[i]] for i in range(num_layers)]
        else:
            self.layer_slabs = [[None] * max_slabs for _ in range(num_layers)]

    @property
    def mode(self) -> str:
        return "reserved" if self.region is not None else "slabs"

    @property
    def num_live(self) -> int:
        return sum(self.live)

    @property
    def bytes_allocated(self) -> int:
        return self.num_live * self.slab_bytes

    def slab_view(self, slab: int) -> torch.Tensor:
        """Slab `slab`'s memory as [num_layers, 2, slab_slots, kv_heads, head_dim] (a view, not a copy)."""
        if self.region is not None:
            return self.region[:, :, slab * self.slab_slots : (slab + 1) * self.slab_slots]
        tensor = self.slabs[slab]
        assert tensor is not None, f"slab {slab} is not live"
        return tensor

    def num_addable(self) -> int:
        """Slabs the budget allows on top of the live ones."""
        return min(self.max_slabs - self.num_live, self.ledger.free_bytes() // self.slab_bytes)

    def add(self, slab: int) -> bool:
        """Reserve and back slab `slab`; False (nothing changed) if the budget refuses."""
        assert not self.live[slab], f"slab {slab} is already live"
        if not self.ledger.can_reserve(self.slab_bytes):
            return False
        self.ledger.reserve("kv", self.slab_bytes)
        if self.region is not None:
            # Fresh or released pages read as zeros: padded gathers (slot 0) see finite numbers.
            self.live[slab] = True
            return True
        tensor = torch.zeros(self.slab_shape, dtype=self.dtype, device=self.device)
        self.slabs[slab] = tensor
        for layer, views in enumerate(self.layer_slabs):
            views[slab] = tensor[layer]
        self.live[slab] = True
        return True

    def remove(self, slab: int) -> None:
        """Free slab `slab` and give its bytes back to the ledger."""
        assert self.live[slab], f"slab {slab} is not live"
        if self.region is not None:
            view = self.slab_view(slab)
            for layer in range(view.shape[0]):
                for kv in range(2):
                    _madvise_dontneed(view[layer, kv])
        else:
            for views in self.layer_slabs:
                views[slab] = None
            self.slabs[slab] = None
        self.live[slab] = False
        # Cached-block bytes are re-tagged lazily by the engine; fold them back before releasing.
        self.ledger.move("kv_cached", "kv", self.ledger.current("kv_cached"))
        self.ledger.release("kv", self.slab_bytes)
