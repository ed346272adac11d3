"""BlockPool and KVCacheManager: unit tests plus a randomised state machine checked against a model.

The state machine keeps its own picture of the pool (who owns which block, which blocks are cached and
in what LRU order, which tokens each block really holds) and compares fitllm's behaviour with it after
every operation, on top of `pool.check_integrity()`.
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, precondition, rule

import fitllm.memory.kv.block_pool as block_pool_module
from fitllm.config import cdiv
from fitllm.memory.kv.block_pool import BlockHash, BlockPool
from fitllm.memory.kv.manager import KVCacheManager

BS = 4  # small blocks so short token lists span several


def chain_hashes(tokens: list[int], bs: int = BS) -> list[BlockHash]:
    out: list[BlockHash] = []
    for i in range(len(tokens) // bs):
        out.append(BlockHash.of(out[-1] if out else None, tuple(tokens[i * bs : (i + 1) * bs])))
    return out


def state_counts(pool: BlockPool) -> tuple[int, int, int]:
    """(clean free, cached, used) counted from the blocks themselves."""
    used = sum(1 for b in pool.blocks if b.ref_cnt > 0)
    cached = sum(1 for b in pool.blocks if b.ref_cnt == 0 and b.block_hash is not None)
    clean = sum(1 for b in pool.blocks if b.ref_cnt == 0 and b.block_hash is None)
    return clean, cached, used


# ---- BlockPool unit tests ---------------------------------------------------------------------------


def test_empty_pool_rejected():
    with pytest.raises(ValueError):
        BlockPool(0)


def test_fresh_pool_all_free():
    pool = BlockPool(5)
    pool.check_integrity()
    assert pool.num_free_blocks == 5
    assert pool.num_used_blocks == 0
    assert pool.num_cached_blocks == 0
    assert pool.usage() == 0.0


def test_take_low_ids_first_and_all_or_nothing():
    pool = BlockPool(4)
    got = pool.take(3)
    assert [b.block_id for b in got] == [0, 1, 2]
    assert all(b.ref_cnt == 1 for b in got)
    pool.check_integrity()
    assert pool.take(2) is None  # only one left: nothing handed out
    assert pool.num_free_blocks == 1
    pool.check_integrity()
    pool.release([got[1]])
    assert [b.block_id for b in pool.take(2)] == [1, 3]
    pool.check_integrity()
    assert pool.num_used_blocks == 4


def test_release_unhashed_goes_free_hashed_goes_cached():
    pool = BlockPool(3)
    a, b = pool.take(2)
    pool.cache(a, BlockHash.of(None, (1, 2)))
    pool.release([a, b])
    pool.check_integrity()
    assert pool.num_cached_blocks == 1
    assert pool.num_free_blocks == 3
    assert pool.lookup(BlockHash.of(None, (1, 2))) is a
    assert b.block_hash is None


def test_double_release_is_caught():
    pool = BlockPool(2)
    (a,) = pool.take(1)
    pool.release([a])
    with pytest.raises(AssertionError):
        pool.release([a])


def test_clean_blocks_before_evicting_cached():
    pool = BlockPool(6)
    blocks = pool.take(6)
    for i, b in enumerate(blocks[:3]):
        pool.cache(b, BlockHash.of(None, (i,)))
    pool.release(blocks)  # 3 cached, 3 clean
    pool.check_integrity()
    got = pool.take(3)
    assert {b.block_id for b in got} == {3, 4, 5}
    assert pool.num_evictions == 0
    assert pool.num_cached_blocks == 3
    for i in range(3):
        assert pool.lookup(BlockHash.of(None, (i,))) is blocks[i]
    pool.check_integrity()


def test_lru_eviction_order():
    pool = BlockPool(4)
    blocks = pool.take(4)
    hashes = [BlockHash.of(None, (i, i)) for i in range(4)]
    for b, h in zip(blocks, hashes):
        pool.cache(b, h)
    # Freed in order 2, 0, 3, 1: that is the eviction order.
    for i in (2, 0, 3, 1):
        pool.release([blocks[i]])
    pool.check_integrity()
    # A hit on block 0 takes it out of the evictable set.
    pool.touch([blocks[0]])
    pool.check_integrity()
    assert pool.num_cached_blocks == 3
    (first,) = pool.take(1)
    assert first.block_id == 2
    assert pool.lookup(hashes[2]) is None
    assert first.block_hash is None
    # Block 0 comes back to the cache as the most recently freed.
    pool.release([blocks[0]])
    order = [pool.take(1)[0].block_id for _ in range(3)]
    assert order == [3, 1, 0]
    assert pool.num_evictions == 4
    assert pool.num_cached_blocks == 0
    pool.check_integrity()


def test_touch_shares_and_release_counts_down():
    pool = BlockPool(2)
    (a,) = pool.take(1)
    h = BlockHash.of(None, (5,))
    pool.cache(a, h)
    pool.touch([a])
    pool.touch([a])
    assert a.ref_cnt == 3
    pool.release([a])
    pool.release([a])
    assert pool.num_cached_blocks == 0 and a.ref_cnt == 1
    pool.release([a])
    assert pool.num_cached_blocks == 1
    pool.check_integrity()


def test_cache_first_writer_wins_and_disabled_caching():
    pool = BlockPool(3)
    a, b = pool.take(2)
    h = BlockHash.of(None, (1, 2, 3))
    pool.cache(a, h)
    pool.cache(b, h)
    assert a.block_hash == h and b.block_hash is None
    assert pool.lookup(h) is a
    pool.check_integrity()

    off = BlockPool(2, enable_caching=False)
    (c,) = off.take(1)
    off.cache(c, h)
    assert c.block_hash is None and off.lookup(h) is None
    off.release([c])
    assert off.num_cached_blocks == 0
    off.check_integrity()


def test_reset_prefix_cache():
    pool = BlockPool(4)
    blocks = pool.take(4)
    for i, b in enumerate(blocks[:3]):
        pool.cache(b, BlockHash.of(None, (i,)))
    pool.release(blocks[1:])  # blocks 1, 2 cached; 0 stays used (hashed); 3 clean
    assert pool.reset_prefix_cache() == 2
    pool.check_integrity()
    assert pool.num_cached_blocks == 0
    assert pool.lookup(BlockHash.of(None, (1,))) is None
    assert pool.lookup(BlockHash.of(None, (0,))) is blocks[0]  # in use: not evicted
    assert pool.num_free_blocks == 3


def test_lookup_rejects_forced_hash_collision():
    pool = BlockPool(2)
    (a,) = pool.take(1)
    real = BlockHash(12345, (1, 2, 3, 4), None)
    pool.cache(a, real)
    assert pool.lookup(BlockHash(12345, (1, 2, 3, 4), None)) is a
    # Same hash value, different tokens.
    assert pool.lookup(BlockHash(12345, (1, 2, 3, 5), None)) is None
    # Same hash value and tokens, different parent chain.
    assert pool.lookup(BlockHash(12345, (1, 2, 3, 4), 99)) is None
    pool.release([a])
    assert pool.lookup(BlockHash(12345, (9, 9, 9, 9), None)) is None
    assert pool.lookup(real) is a
    pool.check_integrity()


def test_block_hash_chain_depends_on_parent():
    h0 = BlockHash.of(None, (1, 2))
    h1 = BlockHash.of(h0, (3, 4))
    h1_other = BlockHash.of(BlockHash.of(None, (9, 9)), (3, 4))
    assert h1.parent == h0.value
    assert h1 != h1_other
    assert BlockHash.of(h0, (3, 4)) == h1


# ---- KVCacheManager unit tests ------------------------------------------------------------------------


def _admit(kv: KVCacheManager, rid: str, tokens: list[int]) -> tuple[bool, int]:
    hits, n = kv.find_prefix_hit(rid, tokens)
    ok = kv.allocate(rid, len(tokens), hits)
    return ok, n


def test_prefix_hit_reuses_blocks_and_leaves_last_token():
    pool = BlockPool(10)
    kv = KVCacheManager(pool, BS)
    tokens = list(range(12))  # exactly 3 full blocks
    assert _admit(kv, "a", tokens) == (True, 0)
    kv.cache_computed("a", tokens, len(tokens))
    a_blocks = kv.block_ids("a")
    # Same 12 tokens: the last block may not be a hit (its last token must be recomputed).
    ok, n = _admit(kv, "b", tokens)
    assert ok and n == 8
    b_blocks = kv.block_ids("b")
    assert b_blocks[:2] == a_blocks[:2] and b_blocks[2] != a_blocks[2]
    assert pool.blocks[a_blocks[0]].ref_cnt == 2
    # Longer prompt sharing all 12 tokens hits all 3 blocks.
    ok, n = _admit(kv, "c", tokens + [99])
    assert ok and n == 12
    assert kv.block_ids("c")[:3] == a_blocks
    pool.check_integrity()
    for rid in ("a", "b", "c"):
        kv.free(rid)
    pool.check_integrity()
    assert pool.num_used_blocks == 0


def test_prefix_hit_needs_exact_tokens_and_same_parents():
    pool = BlockPool(10)
    kv = KVCacheManager(pool, BS)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 0]
    _admit(kv, "a", a)
    kv.cache_computed("a", a, len(a))
    assert kv.find_prefix_hit("x", [1, 2, 3, 5, 5, 6, 7, 8, 0])[1] == 0  # first block differs
    # Second block's tokens equal a's, but after a different first block: no hit at all.
    assert kv.find_prefix_hit("y", [9, 9, 9, 9, 5, 6, 7, 8, 0])[1] == 0
    # Blocks in a different order do not hit either.
    assert kv.find_prefix_hit("z", [5, 6, 7, 8, 1, 2, 3, 4, 0])[1] == 0
    assert kv.find_prefix_hit("w", [1, 2, 3, 4, 5, 6, 7, 9, 0])[1] == 4


def test_forced_hash_collision_in_manager(monkeypatch):
    """Every block hash collides: lookups must still match only identical tokens and parents."""
    monkeypatch.setattr(block_pool_module, "hash", lambda _x: 7, raising=False)
    assert BlockHash.of(None, (1,)).value == BlockHash.of(None, (2,)).value  # the patch took effect
    pool = BlockPool(12)
    kv = KVCacheManager(pool, BS)
    a = [1, 1, 1, 1, 2, 2, 2, 2, 3]
    _admit(kv, "a", a)
    kv.cache_computed("a", a, len(a))
    pool.check_integrity()
    hits, n = kv.find_prefix_hit("b", [5, 5, 5, 5, 2, 2, 2, 2, 3])
    assert (hits, n) == ([], 0)
    hits, n = kv.find_prefix_hit("c", [1, 1, 1, 1, 5, 5, 5, 5, 3])
    assert n == 4 and [b.block_id for b in hits] == kv.block_ids("a")[:1]
    # Under a colliding parent value with other tokens: still no hit for the first block.
    b_tokens = [2, 2, 2, 2, 2, 2, 2, 2, 3]
    ok, n = _admit(kv, "b2", b_tokens)
    assert ok and n == 0
    kv.cache_computed("b2", b_tokens, len(b_tokens))
    pool.check_integrity()
    for blk in kv.block_ids("b2"):
        # First writer wins: b2's blocks could not be indexed under the taken value.
        assert pool.blocks[blk].block_hash is None
    assert kv.find_prefix_hit("d", b_tokens)[1] == 0


def test_find_prefix_hit_disabled_caching():
    pool = BlockPool(6, enable_caching=False)
    kv = KVCacheManager(pool, BS)
    a = list(range(9))
    _admit(kv, "a", a)
    kv.cache_computed("a", a, len(a))
    kv.free("a")
    assert kv.find_prefix_hit("b", a) == ([], 0)
    assert pool.num_cached_blocks == 0
    pool.check_integrity()


def test_allocate_counts_reclaimed_cached_hits():
    """A hit on an unreferenced cached block is not also free space for the rest of the request."""
    pool = BlockPool(3)
    kv = KVCacheManager(pool, BS)
    a = [1, 2, 3, 4, 5, 6, 7, 8, 9]  # 3 blocks
    assert _admit(kv, "a", a)[0]
    kv.cache_computed("a", a, len(a))
    kv.free("a")
    assert pool.num_cached_blocks == 2 and pool.num_free_blocks == 3
    # b hits 2 cached blocks and needs 2 more: 3 free blocks minus the 2 hits leaves 1 -> refuse.
    b = a[:8] + [0, 0, 0, 0, 0]
    hits, n = kv.find_prefix_hit("b", b)
    assert n == 8
    assert not kv.allocate("b", len(b), hits)
    pool.check_integrity()
    assert pool.num_cached_blocks == 2 and pool.num_used_blocks == 0
    assert kv.block_ids("b") == []
    # With room for exactly one more block it fits and reuses both cached blocks.
    hits, n = kv.find_prefix_hit("c", b[:9])
    assert kv.allocate("c", 9, hits)
    assert pool.num_evictions == 0 and pool.num_used_blocks == 3
    pool.check_integrity()


def test_free_releases_tail_first():
    pool = BlockPool(8)
    kv = KVCacheManager(pool, BS)
    a = list(range(13))  # 4 blocks, 3 full
    _admit(kv, "a", a)
    kv.cache_computed("a", a, len(a))
    table = kv.block_ids("a")
    kv.free("a")
    pool.take(5)  # the 5 clean blocks (including a's partial last one)
    evicted = [pool.take(1)[0].block_id for _ in range(3)]
    assert evicted == [table[2], table[1], table[0]]  # tail first, head last
    pool.check_integrity()


@settings(max_examples=60, deadline=None)
@given(
    prefix=st.lists(st.integers(0, 2), min_size=0, max_size=20),
    tail=st.lists(st.integers(0, 2), min_size=0, max_size=10),
    computed=st.integers(0, 40),
)
def test_find_prefix_hit_never_covers_last_token(prefix, tail, computed):
    pool = BlockPool(20)
    kv = KVCacheManager(pool, BS)
    if prefix:
        assert _admit(kv, "a", prefix)[0]
        kv.cache_computed("a", prefix, min(computed, len(prefix)))
    query = prefix + tail
    if not query:
        return
    hits, n = kv.find_prefix_hit("q", query)
    assert n == len(hits) * BS
    assert n <= len(query) - 1
    expected_blocks = min(min(computed, len(prefix)) // BS, (len(query) - 1) // BS)
    assert len(hits) == expected_blocks
    for i, (blk, h) in enumerate(zip(hits, chain_hashes(query))):
        assert blk.block_hash == h
        assert blk.block_id == kv.block_ids("a")[i]
    pool.check_integrity()


# ---- randomised state machine ---------------------------------------------------------------------------

PREFIXES = [[], [0, 1, 2, 0], [0, 1, 2, 0, 1, 1, 0, 2], [2, 2, 2, 2, 2, 2, 2, 2], [0, 1, 2, 0, 2]]
token_lists = st.tuples(st.sampled_from(PREFIXES), st.lists(st.integers(0, 2), max_size=10)).map(
    lambda t: t[0] + t[1]
)


class PoolMachine(RuleBasedStateMachine):
    """Requests admitted with prefix lookups, grown chunk by chunk, freed; pool reset now and then."""

    def __init__(self) -> None:
        super().__init__()
        self.pool: BlockPool | None = None

    @initialize(num_blocks=st.integers(1, 12), caching=st.sampled_from([True, True, True, False]))
    def setup(self, num_blocks: int, caching: bool) -> None:
        self.pool = BlockPool(num_blocks, enable_caching=caching)
        self.kv = KVCacheManager(self.pool, BS)
        self.caching = caching
        self.live: dict[str, dict] = {}  # rid -> tokens, computed, registered (blocks known cached)
        self.lru: list[int] = []  # model: cached blocks, least recently freed first
        self.content: dict[int, list[int | None]] = {}  # shadow KV: what each block's slots hold
        self.index: dict[tuple[int, ...], int] = {}  # model prefix index: full prefix -> block id
        self.key_of: dict[int, tuple[int, ...]] = {}  # block id -> its prefix key
        self.n = 0

    # -- helpers --
    def _expected_hit(self, tokens: list[int]) -> list[int]:
        if not self.caching:
            return []
        out = []
        for i in range((len(tokens) - 1) // BS):
            blk = self.index.get(tuple(tokens[: (i + 1) * BS]))
            if blk is None:
                break
            out.append(blk)
        return out

    def _allocate(self, rid: str, num_tokens: int, hits: list) -> bool:
        """Call kv.allocate and check success, evictions and LRU order against the model."""
        pool = self.pool
        table_before = self.kv.block_ids(rid)
        need = cdiv(num_tokens, BS) - len(table_before) - len(hits)
        reclaimed = sum(1 for b in hits if b.ref_cnt == 0)
        expect_ok = need <= pool.num_free_blocks - reclaimed
        clean_before = state_counts(pool)[0]
        evictions_before = pool.num_evictions
        refs_before = [b.ref_cnt for b in pool.blocks]
        hashes_before = [b.block_hash for b in pool.blocks]
        ok = self.kv.allocate(rid, num_tokens, hits)
        assert ok == expect_ok
        if not ok:
            assert [b.ref_cnt for b in pool.blocks] == refs_before
            assert [b.block_hash for b in pool.blocks] == hashes_before
            assert pool.num_evictions == evictions_before
            assert self.kv.block_ids(rid) == table_before
            return False
        table = self.kv.block_ids(rid)
        assert table[: len(table_before)] == table_before
        assert table[len(table_before) : len(table_before) + len(hits)] == [b.block_id for b in hits]
        assert len(table) == max(len(table_before) + len(hits), cdiv(num_tokens, BS))
        for b in hits:
            if b.block_id in self.lru:
                self.lru.remove(b.block_id)
        new = table[len(table_before) + len(hits) :]
        n_evict = max(0, len(new) - clean_before)
        assert pool.num_evictions - evictions_before == n_evict
        # Clean blocks first, lowest id first ...
        clean_taken = new[: len(new) - n_evict]
        assert all(hashes_before[b] is None and refs_before[b] == 0 for b in clean_taken)
        assert clean_taken == sorted(clean_taken)
        # ... then cached blocks, least recently freed first.
        evicted = new[len(new) - n_evict :]
        assert evicted == self.lru[:n_evict]
        del self.lru[:n_evict]
        for b in evicted:
            key = self.key_of.pop(b)
            del self.index[key]
        for b in new:
            assert pool.blocks[b].block_hash is None
            self.content[b] = [None] * BS
        return True

    def _compute(self, rid: str, start: int, end: int) -> None:
        """Write tokens start..end-1 into the shadow KV and register full blocks as cached."""
        r = self.live[rid]
        table = self.kv.block_ids(rid)
        for p in range(start, end):
            blk = table[p // BS]
            # A request never writes into a block someone else also holds.
            assert self.pool.blocks[blk].ref_cnt == 1, f"write into shared block {blk}"
            self.content[blk][p % BS] = r["tokens"][p]
        r["computed"] = end
        self.kv.cache_computed(rid, r["tokens"], end)
        if self.caching:
            for i in range(r["registered"], end // BS):
                blk = table[i]
                key = tuple(r["tokens"][: (i + 1) * BS])
                if blk not in self.key_of and key not in self.index:
                    self.index[key] = blk
                    self.key_of[blk] = key
            r["registered"] = max(r["registered"], end // BS)

    # -- rules --
    @rule(tokens=token_lists, chunk=st.integers(1, 12))
    def admit(self, tokens: list[int], chunk: int) -> None:
        if not tokens:
            tokens = [0]
        rid = f"r{self.n}"
        self.n += 1
        hits, num_hit = self.kv.find_prefix_hit(rid, tokens)
        assert num_hit == len(hits) * BS
        assert num_hit <= len(tokens) - 1
        assert [b.block_id for b in hits] == self._expected_hit(tokens)
        for i, (b, h) in enumerate(zip(hits, chain_hashes(tokens))):
            assert b.block_hash == h
            assert self.content[b.block_id] == tokens[i * BS : (i + 1) * BS]  # the KV really is there
        num_new = min(chunk, len(tokens) - num_hit)
        self.live[rid] = {"tokens": list(tokens), "computed": num_hit, "registered": len(hits)}
        if self._allocate(rid, num_hit + num_new, hits):
            self._compute(rid, num_hit, num_hit + num_new)
        else:
            del self.live[rid]
            self.kv.free(rid)  # it held nothing; freeing must not disturb anything

    @precondition(lambda self: self.pool is not None and self.live)
    @rule(data=st.data(), chunk=st.integers(1, 12), new_token=st.integers(0, 2))
    def advance(self, data, chunk: int, new_token: int) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        r = self.live[rid]
        if r["computed"] == len(r["tokens"]):
            r["tokens"].append(new_token)  # a decode step: the sampled token is now input
        num_new = min(chunk, len(r["tokens"]) - r["computed"])
        if self._allocate(rid, r["computed"] + num_new, []):
            self._compute(rid, r["computed"], r["computed"] + num_new)

    @precondition(lambda self: self.pool is not None and self.live)
    @rule(data=st.data())
    def free(self, data) -> None:
        rid = data.draw(st.sampled_from(sorted(self.live)))
        table = self.kv.block_ids(rid)
        self.kv.free(rid)
        del self.live[rid]
        assert self.kv.block_ids(rid) == []
        for b in reversed(table):
            if self.pool.blocks[b].ref_cnt == 0 and b in self.key_of:
                self.lru.append(b)

    @precondition(lambda self: self.pool is not None)
    @rule()
    def reset(self) -> None:
        n = self.pool.reset_prefix_cache()
        assert n == len(self.lru)
        for b in self.lru:
            del self.index[self.key_of.pop(b)]
        self.lru.clear()

    # -- invariants --
    @invariant()
    def integrity(self) -> None:
        if self.pool is None:
            return
        pool = self.pool
        pool.check_integrity()
        clean, cached, used = state_counts(pool)
        assert clean + cached + used == pool.num_blocks
        assert pool.num_used_blocks == used
        assert pool.num_cached_blocks == cached
        assert pool.num_free_blocks == clean + cached
        if not self.caching:
            assert cached == 0

    @invariant()
    def ownership(self) -> None:
        if self.pool is None:
            return
        owners: dict[int, list[tuple[str, int]]] = {}
        for rid, r in self.live.items():
            table = self.kv.block_ids(rid)
            assert len(table) == len(set(table)), f"{rid} holds a block twice"
            assert len(table) * BS >= r["computed"]
            for i, b in enumerate(table):
                owners.setdefault(b, []).append((rid, i))
        for blk in self.pool.blocks:
            holders = owners.get(blk.block_id, [])
            assert blk.ref_cnt == len(holders)
            if len(holders) > 1:
                # Only a cached full prefix block is shared, and at the same position with the same prefix.
                assert blk.block_hash is not None
                positions = {i for _, i in holders}
                assert len(positions) == 1
                (i,) = positions
                prefixes = {tuple(self.live[rid]["tokens"][: (i + 1) * BS]) for rid, _ in holders}
                assert len(prefixes) == 1

    @invariant()
    def cache_model(self) -> None:
        if self.pool is None:
            return
        pool = self.pool
        assert {b.block_id for b in pool.blocks if b.ref_cnt == 0 and b.block_hash is not None} == set(
            self.lru
        )
        assert {b.block_id for b in pool.blocks if b.block_hash is not None} == set(self.key_of)
        for key, blk in self.index.items():
            h = chain_hashes(list(key))[-1]
            assert pool.lookup(h) is pool.blocks[blk]
            # What the cache claims the block holds is what was written into it.
            assert self.content[blk] == list(key[-BS:])


TestPoolMachine = PoolMachine.TestCase
TestPoolMachine.settings = settings(
    max_examples=120,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
