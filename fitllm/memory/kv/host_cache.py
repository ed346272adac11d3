"""HostKVCache: a host-memory tier under the device prefix cache (`--kv-host-cache BYTES`, CUDA).

When the device pool evicts a cached prefix block (to hand it to a running request in `take`, or with an
idle slab), the tier keeps a copy of its K/V in pinned host memory under the block's hash, least recently
used first out within its byte budget. A later prefix lookup that misses on the device but finds the next
blocks here takes fresh device blocks, registers them in the prefix cache under their hashes, and copies
the K/V back instead of recomputing it: the request is admitted as if they had been device hits.

Like the swapper (fitllm/memory/kv/swap.py), the tier decides and keeps the books; it moves no bytes on the
scheduling path. Each copy is a `KVCopy` in the step's SchedulerOutput (`cache_out`, `cache_in`), made by
the runner before the forward with the swap copies: every copy out first (an evicted block may be handed to
another request, or restored into, in the same step), then every copy in. A slab being released is the
exception: its evicted blocks are copied out at once (`flush`), before its memory is freed.

The host bytes are one arena of whole blocks allocated at start (a pinned allocation per block would cost
a driver call each), with their own ledger (tag `kv_host_cached`): host memory, outside `--memory-budget`.
A row being copied back is not reused until the step after (`copies`), so a copy out recorded later in the
same step cannot overwrite it first.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from fitllm.config import EngineConfig
from fitllm.memory.kv.block_pool import BlockHash, BlockPool, KVBlock
from fitllm.memory.kv.layout import block_slots
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.kv.swap import KVCopy
from fitllm.memory.ledger import MemoryLedger
from fitllm.memory.pinned import pinned_tensor
from fitllm.units import format_bytes

TAG = "kv_host_cached"


@dataclass(slots=True)
class HostEntry:
    """One block's K/V in host memory: its identity and its row of the arena."""

    block_hash: BlockHash
    row: int


class HostKVCache:
    """LRU host copies of evicted prefix blocks, copied back into fresh device blocks on a hit."""

    def __init__(self, storage: KVSlabStorage, budget_bytes: int, pin: bool) -> None:
        self.storage = storage
        self.block_size = storage.block_size
        rows = budget_bytes // storage.block_bytes
        if rows < 1:
            raise ValueError(
                f"--kv-host-cache {format_bytes(budget_bytes)} holds no KV block "
                f"({format_bytes(storage.block_bytes)}); raise it, or leave it at 0 (off)"
            )
        # Exactly its bytes, page-locked for the tier's life (the caching host allocator would round the
        # whole tier up to a power of two: fitllm/memory/pinned.py).
        self.arena, self._pinned = pinned_tensor((rows, *storage.block_shape(1)), storage.dtype, pin)
        self.ledger = MemoryLedger(rows * storage.block_bytes, tags=(TAG,))
        self._entries: OrderedDict[int, HostEntry] = OrderedDict()  # by hash value, least recent first
        self._free_rows = list(range(rows - 1, -1, -1))
        self._reading: dict[int, HostEntry] = {}  # device block id -> entry its copy in reads this step
        self._read_rows: list[int] = []  # rows the last step copied in: free from the next `copies`
        self._out: list[KVCopy] = []
        self._in: dict[int, KVCopy] = {}  # by device block id
        self.blocks_written = 0  # copies to host, in total
        self.blocks_read = 0  # copies back to the device, in total

    @property
    def num_blocks(self) -> int:
        """Blocks held (restores in progress included)."""
        return len(self._entries) + len(self._reading)

    def holds(self, block_hash: BlockHash) -> bool:
        entry = self._entries.get(block_hash.value)
        return entry is not None and entry.block_hash == block_hash

    # ---- the device pool's EvictionSink -------------------------------------------------------------
    def evicted(self, block: KVBlock) -> None:
        """A cached block leaves the device: record the copy of its K/V to a host row under its hash."""
        entry = self._reading.pop(block.block_id, None)
        if entry is not None:  # restored this step and evicted before its copy: the row still holds it
            del self._in[block.block_id]
            self._entries[entry.block_hash.value] = entry
            return
        h = block.block_hash
        assert h is not None
        old = self._entries.pop(h.value, None)  # a newer copy of the same block replaces it
        row = old.row if old is not None else self._take_row()
        if row is None:
            return  # every row is being copied back this step: the block is lost, as without the tier
        self._entries[h.value] = HostEntry(h, row)
        self._out.append(KVCopy(TAG, block_slots([block.block_id], self.block_size), self.arena[row]))
        self.blocks_written += 1

    def flush(self) -> None:
        """Make the recorded copies out now (their slab is about to be freed)."""
        if not self._out:
            return
        for copy in self._out:
            self.storage.read_slots(copy.slots, copy.host)
        self._out = []
        if self.storage.device.type == "cuda":  # the host rows are complete before anything reads them
            torch.cuda.synchronize(self.storage.device)

    def _take_row(self) -> int | None:
        """A free row (counted in the ledger), else the least recently used entry's."""
        if self._free_rows:
            self.ledger.reserve(TAG, self.storage.block_bytes)
            return self._free_rows.pop()
        if self._entries:
            _, entry = self._entries.popitem(last=False)
            return entry.row
        return None

    # ---- lookups and copies -------------------------------------------------------------------------
    def restore(
        self, pool: BlockPool, kv: KVCacheManager, request_id: str, token_ids: list[int], hits: list[KVBlock]
    ) -> list[KVBlock]:
        """The blocks after the device hits `hits` that this tier holds, in order, brought back: fresh
        device blocks registered in the prefix cache (unreferenced, like any cached block) whose copies in
        are recorded. Returns them (possibly none)."""
        found: list[HostEntry] = []
        for h in kv.prefix_block_hashes(request_id, token_ids)[len(hits) :]:
            if not self.holds(h) or pool.holds_hash(h):
                break
            found.append(self._entries[h.value])
        if not found:
            return []
        for entry in found:  # out of the LRU while blocks are taken, so the evictions cannot reuse their rows
            del self._entries[entry.block_hash.value]
        pool.touch(hits)  # nor evict this request's own device hits
        n = min(len(found), pool.num_available_blocks)
        blocks = pool.take(n) if n else []
        pool.release(list(reversed(hits)))
        for entry in found[n:]:
            self._entries[entry.block_hash.value] = entry
        for block, entry in zip(blocks, found, strict=False):
            pool.cache(block, entry.block_hash)
            self._reading[block.block_id] = entry
            self._in[block.block_id] = KVCopy(
                TAG, block_slots([block.block_id], self.block_size), self.arena[entry.row]
            )
            self.blocks_read += 1
        pool.release(list(reversed(blocks)))  # cached, the head most recently used
        return blocks

    def copies(self) -> tuple[list[KVCopy], list[KVCopy]]:
        """The step's copies (out, in) for the runner; the rows the previous step copied in are free now."""
        for row in self._read_rows:
            self._free_rows.append(row)
            self.ledger.release(TAG, self.storage.block_bytes)
        self._read_rows = [entry.row for entry in self._reading.values()]
        self._reading.clear()
        out, self._out = self._out, []
        ins = list(self._in.values())
        self._in.clear()
        return out, ins

    def clear(self) -> int:
        """Drop every host copy not being read back (the prefix cache was reset); returns how many."""
        n = len(self._entries)
        for entry in self._entries.values():
            self._free_rows.append(entry.row)
        self.ledger.release(TAG, n * self.storage.block_bytes)
        self._entries.clear()
        self._out = []
        return n


def build_host_cache(
    config: EngineConfig, storage: KVSlabStorage, device: torch.device
) -> HostKVCache | None:
    """The tier `--kv-host-cache` asks for (None at 0). Refused on the CPU, whose KV pool is host memory
    already, and without prefix caching, which it extends."""
    if not config.kv_host_cache:
        return None
    if device.type != "cuda":
        raise ValueError(
            "--kv-host-cache keeps prefix KV evicted from a CUDA device in host memory; on the CPU the KV "
            "pool is host memory already (raise --memory-budget or --kv-cache-retention instead): leave "
            "--kv-host-cache at 0"
        )
    if not config.enable_prefix_caching:
        raise ValueError("--kv-host-cache extends the prefix cache: it needs --enable-prefix-caching")
    return HostKVCache(storage, config.kv_host_cache, pin=True)


def restore_from_host(
    tier: HostKVCache | None, kv: KVCacheManager, request_id: str, token_ids: list[int], hits: list[KVBlock]
) -> tuple[list[KVBlock], int]:
    """A prefix hit `hits` on the device, extended by the blocks the host tier brings back (none without a
    tier): the hit blocks in order, and how many prompt tokens came from the host."""
    if tier is None:
        return hits, 0
    restored = tier.restore(kv.pool, kv, request_id, token_ids, hits)
    return hits + restored, len(restored) * kv.block_size
