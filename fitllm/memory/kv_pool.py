"""KVSlabStorage: the device memory behind the block pool, one tensor per slab, reserved in the ledger.

A slab is a single [num_layers, 2, slab_slots, kv_heads, head_dim] allocation: one large block of memory
(beyond the C allocator's mmap threshold), so freeing a slab really returns its pages to the OS, which a
scatter of per-layer tensors would not. Each layer sees its slice of every live slab through
`layer_slabs[layer]`, a list that is updated in place as slabs come and go.
"""

from __future__ import annotations

import torch

from fitllm.memory.ledger import MemoryLedger


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
        self.shape = (num_layers, 2, slab_blocks * block_size, num_kv_heads, head_dim)
        self.slab_slots = slab_blocks * block_size
        self.slab_bytes = torch.Size(self.shape).numel() * torch.empty((), dtype=dtype).element_size()
        self.max_slabs = max_slabs
        self.dtype = dtype
        self.device = device
        self.ledger = ledger
        self.slabs: list[torch.Tensor | None] = [None] * max_slabs
        self.layer_slabs: list[list[torch.Tensor | None]] = [[None] * max_slabs for _ in range(num_layers)]

    @property
    def num_live(self) -> int:
        return sum(s is not None for s in self.slabs)

    @property
    def bytes_allocated(self) -> int:
        return self.num_live * self.slab_bytes

    def num_addable(self) -> int:
        """Slabs the budget allows on top of the live ones."""
        return min(self.max_slabs - self.num_live, self.ledger.free_bytes() // self.slab_bytes)

    def add(self, slab: int) -> bool:
        """Reserve and allocate slab `slab`; False (nothing changed) if the budget refuses."""
        assert self.slabs[slab] is None, f"slab {slab} is already live"
        if not self.ledger.can_reserve(self.slab_bytes):
            return False
        self.ledger.reserve("kv", self.slab_bytes)
        # Zeros, not empty: padded gathers read slot 0's rows, which must hold finite numbers.
        tensor = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.slabs[slab] = tensor
        for layer, views in enumerate(self.layer_slabs):
            views[slab] = tensor[layer]
        return True

    def remove(self, slab: int) -> None:
        """Free slab `slab` and give its bytes back to the ledger."""
        assert self.slabs[slab] is not None, f"slab {slab} is not live"
        for views in self.layer_slabs:
            views[slab] = None
        self.slabs[slab] = None
        # Cached-block bytes are re-tagged lazily by the engine; fold them back before releasing.
        self.ledger.move("kv_cached", "kv", self.ledger.current("kv_cached"))
        self.ledger.release("kv", self.slab_bytes)
