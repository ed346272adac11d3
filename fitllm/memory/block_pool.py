"""The KV block pool: which physical blocks are free, in use, or cached for prefix reuse.

Three disjoint states, always summing to the pool size (checked by `check_integrity`):
- free:   ref_cnt 0, no hash. Kept in a min-heap so low ids are handed out first.
- cached: ref_cnt 0, holds a prefix hash. Reusable on a hit until evicted, least recently freed first.
- used:   ref_cnt > 0 (shared by every running request whose prefix matched it).
Clean free blocks are always handed out before a cached block is evicted.
"""

from __future__ import annotations

import heapq
from collections import OrderedDict
from dataclasses import dataclass


@dataclass(slots=True, frozen=True)
class BlockHash:
    """Identity of a full block: chained hash plus the exact tokens and parent (guards hash collisions)."""

    value: int
    token_ids: tuple[int, ...]
    parent: int | None

    @staticmethod
    def of(parent: BlockHash | None, token_ids: tuple[int, ...]) -> BlockHash:
        parent_value = None if parent is None else parent.value
        return BlockHash(hash((parent_value, token_ids)), token_ids, parent_value)


@dataclass(slots=True)
class KVBlock:
    """One physical block of `block_size` token slots."""

    block_id: int
    ref_cnt: int = 0
    block_hash: BlockHash | None = None


class BlockPool:
    """Allocation, reference counting and prefix-cache bookkeeping over a fixed set of block ids."""

    def __init__(self, num_blocks: int, enable_caching: bool = True) -> None:
        if num_blocks < 1:
            raise ValueError("the KV pool needs at least one block")
        self.blocks = [KVBlock(i) for i in range(num_blocks)]
        self.enable_caching = enable_caching
        self._free: list[int] = list(range(num_blocks))  # heap of clean free block ids
        self._cached: OrderedDict[int, KVBlock] = OrderedDict()  # ref 0 with hash, LRU first
        self._by_hash: dict[int, KVBlock] = {}
        self.num_evictions = 0

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: clean plus evictable cached."""
        return len(self._free) + len(self._cached)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def usage(self) -> float:
        """Fraction of blocks referenced by running requests."""
        return self.num_used_blocks / self.num_blocks

    def lookup(self, block_hash: BlockHash) -> KVBlock | None:
        """The block holding exactly these tokens after exactly this parent, if cached."""
        block = self._by_hash.get(block_hash.value)
        if block is None or block.block_hash != block_hash:
            return None
        return block

    def take(self, num: int) -> list[KVBlock] | None:
        """Hand out `num` blocks with ref_cnt 1 (clean first, then evict LRU cached), or None if short."""
        if num > self.num_free_blocks:
            return None
        out = []
        for _ in range(num):
            if self._free:
                block = self.blocks[heapq.heappop(self._free)]
            else:
                _, block = self._cached.popitem(last=False)
                self._forget_hash(block)
                self.num_evictions += 1
            block.ref_cnt = 1
            out.append(block)
        return out

    def touch(self, blocks: list[KVBlock]) -> None:
        """Add a reference to each block (prefix hits); a cached block leaves the evictable set."""
        for block in blocks:
            if block.ref_cnt == 0:
                del self._cached[block.block_id]
            block.ref_cnt += 1

    def release(self, blocks: list[KVBlock]) -> None:
        """Drop one reference from each block; pass them tail first so tails are evicted before heads."""
        for block in blocks:
            block.ref_cnt -= 1
            assert block.ref_cnt >= 0, f"block {block.block_id} released more often than taken"
            if block.ref_cnt == 0:
                if block.block_hash is not None:
                    self._cached[block.block_id] = block
                else:
                    heapq.heappush(self._free, block.block_id)

    def cache(self, block: KVBlock, block_hash: BlockHash) -> None:
        """Record that a full, computed block holds these tokens (first writer wins)."""
        if not self.enable_caching or block.block_hash is not None or block_hash.value in self._by_hash:
            return
        block.block_hash = block_hash
        self._by_hash[block_hash.value] = block

    def reset_prefix_cache(self) -> int:
        """Evict every cached (unreferenced) block; returns how many."""
        n = len(self._cached)
        while self._cached:
            _, block = self._cached.popitem(last=False)
            self._forget_hash(block)
            heapq.heappush(self._free, block.block_id)
        return n

    def _forget_hash(self, block: KVBlock) -> None:
        if block.block_hash is not None:
            if self._by_hash.get(block.block_hash.value) is block:
                del self._by_hash[block.block_hash.value]
            block.block_hash = None

    def check_integrity(self) -> None:
        """Assert free + cached + used == total and that every block is in exactly one state."""
        free = set(self._free)
        cached = set(self._cached)
        assert len(free) == len(self._free), "a block is in the free heap twice"
        assert not free & cached, "a block is both free and cached"
        for block in self.blocks:
            in_free, in_cached = block.block_id in free, block.block_id in cached
            if block.ref_cnt > 0:
                assert not in_free and not in_cached, f"block {block.block_id} is used and also free/cached"
            else:
                assert in_free != in_cached, (
                    f"unreferenced block {block.block_id} is in {in_free + in_cached} lists"
                )
                assert in_cached == (block.block_hash is not None), (
                    f"block {block.block_id} hash/state mismatch"
                )
            if block.block_hash is not None:
                assert self._by_hash.get(block.block_hash.value) is block, (
                    f"block {block.block_id} hash not indexed"
                )
        assert all(b.block_hash is not None and self._by_hash[h] is b for h, b in self._by_hash.items())
        used = sum(1 for b in self.blocks if b.ref_cnt > 0)
        assert len(free) + len(cached) + used == self.num_blocks, "free + cached + used != total"
