"""Per-request block tables over the block pool, with prefix-cache lookups by chained block hashes.

Knows nothing of requests beyond an id and a token list, so the scheduler stays above it.
"""

from __future__ import annotations

import torch

from fitllm.config import cdiv
from fitllm.memory.kv.block_pool import BlockHash, BlockPool, KVBlock
from fitllm.memory.kv.layout import block_slots

SHIFTED = "context-shift"  # the salt of hash chains over shifted K/V


class KVCacheManager:
    """Allocates slots for requests' new tokens and shares full blocks between equal prefixes."""

    def __init__(self, pool: BlockPool, block_size: int) -> None:
        self.pool = pool
        self.block_size = block_size
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[BlockHash]] = {}
        self._num_cached: dict[str, int] = {}  # blocks of each request already registered in the cache
        # Requests whose K/V from this block on came from a context shift (or was computed over shifted K/V):
        # their chain is salted there, so only requests that accept a shifted cache hit those blocks.
        self._salt_at: dict[str, int] = {}
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # of which found

    def _block_hashes(self, request_id: str, token_ids: list[int]) -> list[BlockHash]:
        hashes = self._hashes.setdefault(request_id, [])
        bs = self.block_size
        salt_at = self._salt_at.get(request_id)
        for i in range(len(hashes), len(token_ids) // bs):
            hashes.append(
                BlockHash.of(
                    hashes[-1] if hashes else None,
                    tuple(token_ids[i * bs : (i + 1) * bs]),
                    SHIFTED if i == salt_at else None,
                )
            )
        return hashes

    def block_hashes(self, request_id: str, token_ids: list[int]) -> list[BlockHash]:
        """The hash chain of the request's full blocks of `token_ids` (salted where it was shifted)."""
        return list(self._block_hashes(request_id, token_ids))

    def prefix_block_hashes(self, request_id: str, token_ids: list[int]) -> list[BlockHash]:
        """Hashes of the full blocks a prefix hit may cover (all but the last token, which is recomputed to
        produce logits)."""
        return self._block_hashes(request_id, token_ids)[: (len(token_ids) - 1) // self.block_size]

    def find_prefix_hit(
        self, request_id: str, token_ids: list[int], shifted_ok: bool = False
    ) -> tuple[list[KVBlock], int]:
        """Longest run of cached full blocks at the start of `token_ids`, leaving >= 1 token to compute.
        With `shifted_ok`, where the plain chain stops the run may go on through blocks a context shift
        filled (the salted chain from that block: a story's previous turn after its own shift)."""
        if not self.pool.enable_caching:
            return [], 0
        max_blocks = (len(token_ids) - 1) // self.block_size
        self._set_salt(request_id, None)  # a waiting request holds no blocks: its chain starts plain
        hits = self._walk(self.prefix_block_hashes(request_id, token_ids), 0)
        k = len(hits)
        if shifted_ok and k < max_blocks:
            self._set_salt(request_id, k)
            salted = self._walk(self.prefix_block_hashes(request_id, token_ids), k)
            if not salted:
                self._set_salt(request_id, None)
            hits += salted
        return hits, len(hits) * self.block_size

    def _walk(self, hashes: list[BlockHash], start: int) -> list[KVBlock]:
        """The cached blocks of hashes[start:], up to the first one not cached."""
        hits: list[KVBlock] = []
        for block_hash in hashes[start:]:
            block = self.pool.lookup(block_hash)
            if block is None:
                break
            hits.append(block)
        return hits

    def _set_salt(self, request_id: str, block: int | None) -> None:
        """Salt the request's chain from `block` on (None: unsalted); hashes past it are recomputed."""
        if block is None:
            block = self._salt_at.pop(request_id, None)
        else:
            self._salt_at[request_id] = block
        if block is not None and request_id in self._hashes:
            del self._hashes[request_id][block:]

    def mark_shifted(self, request_id: str, block: int) -> None:
        """The request's K/V from `block` on comes from a context shift: publish it under the salted chain
        (an earlier salt point stays: everything after it is salted already)."""
        if self._salt_at.get(request_id, block) >= block:
            assert self._num_cached.get(request_id, 0) <= block, "a shifted block was already published"
            self._set_salt(request_id, block)

    def is_shifted(self, request_id: str) -> bool:
        """Whether some of the request's K/V came from a context shift (a recompute would not give it back)."""
        return request_id in self._salt_at

    def record_prefix_lookup(self, num_tokens: int, num_hit: int) -> None:
        """Count an admitted request's prefix lookup (for the hit-rate metric)."""
        self.prefix_queries += num_tokens
        self.prefix_hits += num_hit

    def allocate(
        self,
        request_id: str,
        num_tokens: int,
        prefix_hits: list[KVBlock] | None = None,
        adopted: list[tuple[int, KVBlock]] | None = None,
    ) -> bool:
        """Ensure the request's block table covers `num_tokens` tokens; all or nothing. `adopted`: (logical
        block, cached block) pairs of a context shift made in place, taken over at those places of a new
        request's table (they leave the prefix cache: `BlockPool.adopt`)."""
        blocks = self._blocks.setdefault(request_id, [])
        hits = prefix_hits or []
        moved = adopted or []
        need = cdiv(num_tokens, self.block_size) - len(blocks) - len(hits) - len(moved)
        # A hit on an unreferenced cached block takes it out of the free count (adopted ones all are).
        reclaimed = sum(1 for b in hits if b.ref_cnt == 0) + len(moved)
        if need > self.pool.num_available_blocks - reclaimed:
            return False
        self.pool.touch(hits)
        blocks.extend(hits)
        self._num_cached[request_id] = self._num_cached.get(request_id, 0) + len(hits)
        if moved:
            assert len(blocks) == len(hits), "blocks are adopted only by a request being admitted"
            self.pool.adopt([b for _, b in moved])  # before `take`, which could evict them
        new = self.pool.take(need) if need > 0 else []
        assert new is not None
        if moved:  # the table up to the last adopted block, new blocks in the gaps
            at = dict(moved)
            fresh = iter(new)
            for i in range(len(blocks), max(at) + 1):
                blocks.append(at[i] if i in at else next(fresh))
            new = list(fresh)
        blocks.extend(new)
        return True

    def cache_computed(self, request_id: str, token_ids: list[int], num_computed: int) -> None:
        """Register every block that is now full and computed under its prefix hash."""
        if not self.pool.enable_caching:
            return
        full = num_computed // self.block_size
        done = self._num_cached.get(request_id, 0)
        if full <= done:
            return
        hashes = self._block_hashes(request_id, token_ids[: full * self.block_size])
        blocks = self._blocks[request_id]
        for i in range(done, full):
            self.pool.cache(blocks[i], hashes[i])
        self._num_cached[request_id] = full

    def truncate(self, request_id: str, num_tokens: int) -> int:
        """Keep K/V for the request's first `num_tokens` tokens (it was rewound): later blocks go back to the
        pool, tail first, and the hashes of blocks no longer full are forgotten. A kept block that would be
        partly rewritten but is shared or published in the prefix cache (its tokens are some sequence's)
        goes too. Returns the tokens whose K/V is kept (at most `num_tokens`)."""
        blocks = self._blocks.get(request_id, [])
        bs = self.block_size
        keep = cdiv(num_tokens, bs)
        if num_tokens % bs and keep <= len(blocks):
            last = blocks[keep - 1]
            if last.ref_cnt > 1 or last.block_hash is not None:
                keep -= 1
        self.pool.release(list(reversed(blocks[keep:])))
        del blocks[keep:]
        if request_id in self._hashes:  # a hash names a full block's tokens, which are cut past here
            del self._hashes[request_id][num_tokens // bs :]
        if request_id in self._num_cached:
            self._num_cached[request_id] = min(self._num_cached[request_id], keep)
        return min(num_tokens, keep * bs)

    def free(self, request_id: str) -> None:
        """Give the request's blocks back (tail first, so shared heads stay cached longest)."""
        blocks = self._blocks.pop(request_id, [])
        self.pool.release(list(reversed(blocks)))
        self._hashes.pop(request_id, None)
        self._num_cached.pop(request_id, None)
        self._salt_at.pop(request_id, None)

    def slots(self, request_id: str, num_tokens: int) -> torch.Tensor:
        """Physical slot ids of the request's first `num_tokens` tokens (int64, on CPU)."""
        slots = block_slots(self.block_ids(request_id), self.block_size)
        assert len(slots) >= num_tokens, f"{request_id}: {num_tokens} tokens but {len(slots)} slots"
        return slots[:num_tokens]

    def num_shared_prefix_tokens(self, request_id: str, num_tokens: int) -> int:
        """Tokens at the start of the request held in blocks other requests also use (they survive its
        preemption, so a recompute gets them back as prefix hits)."""
        shared = 0
        for block in self._blocks.get(request_id, ()):
            if block.ref_cnt < 2:
                break
            shared += 1
        return min(shared * self.block_size, num_tokens)

    def exclusive_block_ids(self, request_id: str) -> list[int]:
        """Blocks only this request references (freeing it makes exactly these available)."""
        return [b.block_id for b in self._blocks.get(request_id, ()) if b.ref_cnt == 1]

    def block_ids(self, request_id: str) -> list[int]:
        """The request's block table: logical block i -> physical block id."""
        return [b.block_id for b in self._blocks.get(request_id, ())]
