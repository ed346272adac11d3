"""Cached prefixes survive a pause (compaction and the retention budget) and eviction (the host tier)."""

from __future__ import annotations

import heapq
import random
import types

import pytest
import torch
from conftest import fixed_and_block_bytes, tight_engine
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from stand_ins import FakeSlabs

from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.memory.kv import block_pool
from fitllm.memory.kv.block_pool import BlockHash, BlockPool, KVBlock
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.host_cache import TAG, HostKVCache
from fitllm.memory.kv.layout import block_slots
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.kv.swap import make_copies
from fitllm.memory.ledger import MemoryLedger


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch):
    c = FakeClock()
    monkeypatch.setattr(block_pool, "time", types.SimpleNamespace(monotonic=c.monotonic))
    return c


class OldReleasePool(BlockPool):
    """The pool with release_idle_slabs as it was before retention (the reference 'as before')."""

    def release_idle_slabs(self, now: float | None = None) -> int:
        if self.num_slabs == 1:
            return 0
        now = block_pool.time.monotonic() if now is None else now
        released = 0
        for slab in sorted(self.allocator.live - {0}, reverse=True):
            if self._slab_used[slab] or now - self._idle_since[slab] < self.idle_release_s:
                continue
            ids = self._slab_ids(slab)
            for i in ids:
                block = self.blocks[i]
                if block.block_hash is not None:
                    del self._cached[i]
                    self._forget_hash(block)
            self._free = [i for i in self._free if i not in ids]
            heapq.heapify(self._free)
            self.allocator.remove(slab)
            self.num_releases += 1
            released += 1
        return released


class Driver:
    """Stories over one pool: a request is a story's first n blocks (chained hashes), admitted with its
    prefix hits, computed (its content is its hash), finished (cached, released tail first). The fake
    storage's contents follow compaction's copies, so a hit proves the data moved with its hash."""

    def __init__(self, pool_cls: type[BlockPool], retain: int, slab_blocks: int = 3, budget: int = 4) -> None:
        self.content: dict[int, int] = {}
        self.alloc = FakeSlabs(budget)
        self.pool = pool_cls(
            slab_blocks,
            max_slabs=6,
            allocator=self.alloc,
            idle_release_s=10.0,
            retain_blocks=retain,
            copy_blocks=self._copy,
        )
        self.running: dict[int, tuple[list[KVBlock], list[BlockHash]]] = {}
        self.started: list[tuple] = []
        self.hit_blocks = 0

    def _copy(self, src: list[int], dst: list[int]) -> None:
        assert not set(src) & set(dst)
        for s, d in zip(src, dst, strict=True):
            self.content[d] = self.content[s]

    @staticmethod
    def hashes(story: int, n: int) -> list[BlockHash]:
        out: list[BlockHash] = []
        for k in range(n):
            out.append(BlockHash.of(out[-1] if out else None, (story, k)))
        return out

    def start(self, rid: int, story: int, n: int) -> None:
        if rid in self.running:
            return
        hashes = self.hashes(story, n)
        hits = []
        for h in hashes:
            b = self.pool.lookup(h)
            if b is None:
                break
            assert self.content[b.block_id] == h.value, "a cached block's data did not follow its hash"
            hits.append(b)
        need = n - len(hits)
        if need > self.pool.num_available_blocks - sum(1 for b in hits if b.ref_cnt == 0):
            return
        self.pool.touch(hits)
        new = self.pool.take(need) if need else []
        assert new is not None
        for b, h in zip(new, hashes[len(hits) :], strict=True):
            self.content[b.block_id] = h.value  # computed
        self.hit_blocks += len(hits)
        self.running[rid] = (hits + new, hashes)

    def finish(self, rid: int) -> None:
        if rid not in self.running:
            return
        blocks, hashes = self.running.pop(rid)
        for b, h in zip(blocks, hashes, strict=True):
            self.pool.cache(b, h)
        self.pool.release(list(reversed(blocks)))


# (kind, a, b): start a request on story a of b blocks; finish the a-th running one; pause a seconds;
# release idle slabs.
ops = st.lists(
    st.tuples(
        st.sampled_from(["start", "start", "finish", "finish", "pause", "release"]),
        st.integers(0, 30),
        st.integers(1, 6),
    ),
    min_size=20,
    max_size=60,
)


def _apply(d: Driver, op: tuple) -> None:
    kind, a, b = op
    if kind == "start":
        d.start(len(d.started), a % 4, b)
        d.started.append(op)
    elif kind == "finish" and d.running:
        d.finish(sorted(d.running)[a % len(d.running)])


# The fake clock only moves forward, so one clock serves every example.
ONE_CLOCK = [HealthCheck.function_scoped_fixture]


@settings(max_examples=120, deadline=None, suppress_health_check=ONE_CLOCK)
@given(ops=ops, retain=st.integers(0, 12), slab_blocks=st.integers(1, 4))
def test_idle_release_keeps_recent_prefixes_within_the_retention_budget(clock, ops, retain, slab_blocks):
    d = Driver(BlockPool, retain, slab_blocks=slab_blocks)
    pool = d.pool
    for op in ops:
        if op[0] == "pause":
            clock.now += op[1]
        elif op[0] == "release":
            lru = list(pool._cached)  # least recently used first
            keep = set(lru[max(0, len(lru) - retain) :]) if retain else set()
            live_before = set(d.alloc.live)
            hashes = {i: pool.blocks[i].block_hash for i in lru}
            released = pool.release_idle_slabs()
            # The budget: never more kept blocks than it allows, nor more held slabs than its bytes.
            assert pool.num_retained <= retain
            assert len(pool.held_slabs) * slab_blocks <= retain
            after = {b.block_hash.value for b in pool._cached.values()}
            kept_lost = [i for i in keep if hashes[i].value not in after]
            if kept_lost:  # a block within the budget went only because there was no room left for it
                assert not pool._free and after <= {hashes[i].value for i in keep}
            # Every cached block still there is in a live slab, where its data is.
            for block in pool._cached.values():
                assert block.block_id // slab_blocks in d.alloc.live
                assert d.content[block.block_id] == block.block_hash.value
            assert released == len(live_before - d.alloc.live)
        else:
            _apply(d, op)
        pool.check_integrity()
        assert pool.num_slabs <= 4


@settings(max_examples=80, deadline=None, suppress_health_check=ONE_CLOCK)
@given(ops=ops, slab_blocks=st.integers(1, 4))
def test_without_a_budget_release_is_exactly_as_before(clock, ops, slab_blocks):
    """Retention 0: the same slabs released, the same free and cached blocks, as the old release."""
    new, old = Driver(BlockPool, 0, slab_blocks), Driver(OldReleasePool, 0, slab_blocks)
    for op in ops:
        if op[0] == "pause":
            clock.now += op[1]
        elif op[0] == "release":
            assert new.pool.release_idle_slabs() == old.pool.release_idle_slabs()
        else:
            _apply(new, op)
            _apply(old, op)
        assert new.alloc.live == old.alloc.live
        assert sorted(new.pool._free) == sorted(old.pool._free)
        assert list(new.pool._cached) == list(old.pool._cached)
        new.pool.check_integrity()
    assert new.pool.num_compacted == 0


def test_nothing_cached_means_slabs_go_as_before_whatever_the_budget(clock):
    d = Driver(BlockPool, retain=100, slab_blocks=2)
    blocks = d.pool.take(7)  # slabs 0..3
    d.pool.release(blocks)  # clean: never cached
    clock.now += 11
    assert d.pool.release_idle_slabs() == 3
    assert d.alloc.live == {0} and d.pool.held_slabs == [] and d.pool.num_compacted == 0


def test_a_story_is_compacted_into_slab_zero_and_hits_after_the_pause(clock):
    d = Driver(BlockPool, retain=4, slab_blocks=4)
    d.start(0, story=7, n=6)  # slabs 0 and 1
    d.finish(0)
    d.start(1, story=8, n=2)  # the clean blocks 6 and 7 of slab 1 (blocks 0-5 are story 7's, cached)
    d.finish(1)
    clock.now += 11
    assert d.pool.release_idle_slabs() == 1
    assert d.alloc.live == {0}
    # The 4 most recently used cached blocks were kept: story 8's two (used last) and story 7's head.
    kept = {b.block_hash.value for b in d.pool._cached.values()}
    assert kept == {h.value for h in Driver.hashes(8, 2)} | {h.value for h in Driver.hashes(7, 2)}
    assert d.pool.num_compacted >= 1
    d.start(2, story=8, n=2)
    assert d.hit_blocks == 2
    d.pool.check_integrity()


def test_slabs_are_held_only_when_compaction_has_no_room(clock):
    d = Driver(BlockPool, retain=8, slab_blocks=2, budget=5)
    d.start(0, story=1, n=8)  # four full slabs
    d.finish(0)
    clock.now += 11
    assert d.pool.release_idle_slabs() == 0  # 8 cached blocks, all within the budget: slabs 1..3 held
    assert d.pool.held_slabs == [1, 2, 3] and d.pool.num_retained == 6
    assert d.pool.release_idle_slabs() == 0  # nothing changed: nothing to do
    d.start(1, story=1, n=8)
    assert d.hit_blocks == 8


# ---- through the engine --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("tiny"), family="llama")


def _run(eng: Engine, prompt: list[int], n: int):
    last = None
    for out in eng.stream(prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True)):
        last = out
        eng.check_integrity()
    return last


def _story(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 250) for _ in range(n)]


def _reference(tiny, prompt: list[int], n: int) -> list[int]:
    eng = tight_engine(tiny, 64, 64, enable_prefix_caching=False)
    return _run(eng, prompt, n).outputs[0].token_ids


@pytest.mark.parametrize("retention", [None, 0])
def test_a_story_survives_an_idle_release(tiny, retention):
    """A story, a pause past --kv-idle-release-s, the story plus more: its prefix still hits, and the output
    equals an uncached run's. Without retention (0) the pause loses it, as before."""
    eng = tight_engine(tiny, 48, 2, kv_cache_retention=retention)
    story = _story(1, 64)
    first = _run(eng, story, 8).outputs[0].token_ids
    assert eng.pool.num_slabs > 1
    released = eng.pool.release_idle_slabs(now=block_pool.time.monotonic() + 31)
    assert released >= 1
    eng.storage.tag_cached(eng.pool.num_cached_blocks)
    eng.check_integrity()
    assert eng.ledger.total <= eng.ledger.budget
    turn = story + first + _story(2, 20)
    out = _run(eng, turn, 16)
    full_blocks = (len(story) + len(first) - 1) // eng.block_size  # computed, full blocks of turn one
    if retention is None:  # default: one context's KV (8 blocks), at most a quarter of the KV room
        assert eng.pool.retain_blocks == 8
        assert out.reuse.cached == full_blocks * eng.block_size
        status = eng.status()
        assert status.kv_retained_bytes > 0 or status.kv_blocks_compacted > 0
    else:
        assert out.reuse.cached <= eng.pool.slab_blocks * eng.block_size  # slab 0's, at most
    assert out.reuse.cached + out.reuse.from_host + out.reuse.prefilled == len(turn)
    assert out.outputs[0].token_ids == _reference(tiny, turn, 16)


# ---- the host tier ---------------------------------------------------------------------------------------


def _parts(blocks: int = 4, slab_blocks: int = 4, host_blocks: int = 8):
    """A real CPU slab storage with one slab, its pool and manager, and a host tier (a CPU stand-in for
    pinned memory)."""
    fmt = KVCacheFormat("auto", torch.float32, 8)
    storage = KVSlabStorage(2, 2, fmt, 4, slab_blocks, 1, torch.device("cpu"), MemoryLedger(1 << 30))
    assert storage.add(0)
    pool = BlockPool(blocks, allocator=storage)
    kv = KVCacheManager(pool, 4)
    tier = HostKVCache(storage, host_blocks * storage.block_bytes, pin=False)
    pool.eviction_sink = tier
    return storage, pool, kv, tier


def _fill(storage: KVSlabStorage, block_id: int, value: float) -> torch.Tensor:
    data = torch.full(storage.block_shape(1), value) + torch.randn(storage.block_shape(1))
    storage.write_slots(block_slots([block_id], 4), data)
    return data


def _read(storage: KVSlabStorage, block_id: int) -> torch.Tensor:
    out = torch.empty(storage.block_shape(1))
    storage.read_slots(block_slots([block_id], 4), out)
    return out


def _step_copies(storage: KVSlabStorage, tier: HostKVCache) -> None:
    outs, ins = tier.copies()
    make_copies(storage, outs, ins)


def test_evicted_blocks_go_to_host_and_come_back_bit_exact():
    storage, pool, kv, tier = _parts()
    tokens = list(range(17))  # 4 full blocks of 4, the last token left to compute
    kv.allocate("a", 16)
    data = {}
    for i, b in enumerate(kv._blocks["a"]):
        data[i] = _fill(storage, b.block_id, i)
    kv.cache_computed("a", tokens, 16)
    hashes = kv.prefix_block_hashes("a", tokens)
    kv.free("a")
    assert pool.num_cached_blocks == 4
    kv.allocate("other", 16)  # takes every block: the four cached ones are evicted to host
    assert tier.blocks_written == 4 and all(tier.holds(h) for h in hashes)
    _step_copies(storage, tier)  # the copies out, before "other" writes its K/V
    for b in kv._blocks["other"]:
        _fill(storage, b.block_id, 99.0)
    kv.free("other")
    hits, _ = kv.find_prefix_hit("b", tokens)
    assert hits == []  # gone from the device
    restored = tier.restore(pool, kv, "b", tokens, hits)
    assert len(restored) == 4 and tier.blocks_read == 4
    assert [pool.lookup(h) for h in hashes] == restored
    _step_copies(storage, tier)
    for i, b in enumerate(restored):
        assert torch.equal(_read(storage, b.block_id), data[i])
    pool.check_integrity()


def test_the_host_budget_keeps_the_most_recently_evicted_blocks():
    storage, pool, kv, tier = _parts(host_blocks=2)
    tokens = list(range(17))
    kv.allocate("a", 16)
    kv.cache_computed("a", tokens, 16)
    hashes = kv.prefix_block_hashes("a", tokens)
    kv.free("a")  # tail first: the head blocks are the most recently used, evicted last
    kv.allocate("other", 16)
    assert tier.blocks_written == 4
    assert [tier.holds(h) for h in hashes] == [True, True, False, False]
    assert tier.ledger.current(TAG) == 2 * storage.block_bytes <= tier.ledger.budget
    _step_copies(storage, tier)
    kv.free("other")
    restored = tier.restore(pool, kv, "b", tokens, [])
    assert [b.block_hash for b in restored] == hashes[:2]


def test_a_block_recomputed_on_device_replaces_its_stale_host_copy():
    storage, pool, kv, tier = _parts(blocks=2, slab_blocks=2)
    tokens = list(range(9))
    kv.allocate("a", 8)
    _fill(storage, kv._blocks["a"][0].block_id, 1.0)
    kv.cache_computed("a", tokens, 8)
    h0 = kv.prefix_block_hashes("a", tokens)[0]
    kv.free("a")
    kv.allocate("x", 8)  # evicts both: the host holds the first version
    _step_copies(storage, tier)
    kv.free("x")
    # The same block computed again on the device (say the lookup was skipped), with other bytes.
    kv.allocate("a2", 8)
    fresh = _fill(storage, kv._blocks["a2"][0].block_id, 5.0)
    kv.cache_computed("a2", tokens, 8)
    kv.free("a2")
    held = tier.num_blocks
    kv.allocate("y", 8)  # evicted again: the new bytes replace the old copy in its row
    _step_copies(storage, tier)
    assert tier.num_blocks == held and tier.ledger.current(TAG) == held * storage.block_bytes
    kv.free("y")
    (block, *_) = tier.restore(pool, kv, "b", tokens, [])
    assert block.block_hash == h0
    _step_copies(storage, tier)
    assert torch.equal(_read(storage, block.block_id), fresh)


def test_a_block_evicted_and_restored_into_in_one_step_is_copied_out_first():
    """The ordering the runner keeps (outs before ins), with the same block on both sides."""
    storage, pool, kv, tier = _parts(blocks=1, slab_blocks=1)
    a, b = list(range(5)), list(range(100, 105))
    kv.allocate("a", 4)
    da = _fill(storage, 0, 1.0)
    kv.cache_computed("a", a, 4)
    kv.free("a")
    kv.allocate("b", 4)  # evicts a's block to host
    _step_copies(storage, tier)
    db = _fill(storage, 0, 2.0)
    kv.cache_computed("b", b, 4)
    kv.free("b")
    # One step: a's block comes back into block 0, which first goes out with b's K/V.
    (block,) = tier.restore(pool, kv, "a2", a, [])
    assert block.block_id == 0
    outs, ins = tier.copies()
    assert len(outs) == 1 and len(ins) == 1
    make_copies(storage, outs, ins)
    assert torch.equal(_read(storage, 0), da)
    (back,) = tier.restore(pool, kv, "b2", b, [])
    _step_copies(storage, tier)
    assert torch.equal(_read(storage, back.block_id), db)


def test_engine_host_tier_restores_an_evicted_story_with_identical_output(tiny):
    """A story evicted from a small device pool by another, then continued: its blocks come back from the
    host tier (reuse.from_host), and the output equals an uncached run's."""
    eng = tight_engine(tiny, 8, 8)  # one static-size slab of 8 blocks: two 100-token stories do not fit
    _, per_block = fixed_and_block_bytes(tiny)
    eng.attach_host_cache(HostKVCache(eng.storage, 16 * per_block, pin=False))
    story = _story(3, 80)
    first = _run(eng, story, 8).outputs[0].token_ids
    _run(eng, _story(4, 80), 8)  # evicts the first story's last blocks
    assert eng.host_cache.blocks_written > 0
    turn = story + first + _story(5, 10)
    out = _run(eng, turn, 12)
    assert out.reuse.from_host > 0
    assert out.reuse.cached + out.reuse.from_host + out.reuse.prefilled == len(turn)
    assert out.outputs[0].token_ids == _reference(tiny, turn, 12)
    status = eng.status()
    assert status.kv_host_blocks_read == eng.host_cache.blocks_read > 0
    assert status.kv_host_blocks_written > 0


def test_kv_host_cache_is_refused_on_the_cpu(tiny):
    with pytest.raises(ValueError, match="--kv-host-cache"):
        tight_engine(tiny, 8, 8, kv_host_cache=1 << 20)


def test_fitllm_plan_shows_the_retention_budget_and_host_cache(tiny, capsys):
    from fitllm.cli import main

    args = [
        "plan",
        "--model",
        str(tiny),
        "--dtype",
        "float32",
        "--max-model-len",
        "256",
        "--memory-budget",
        "1GiB",
    ]
    main([*args, "--kv-host-cache", "1GiB"])
    table = capsys.readouterr().out
    per_token = 2 * 2 * 2 * 16 * 4  # layers x K/V x kv heads x head_dim x float32
    assert "KV kept for cached prefixes when idle" in table
    assert f"{256 * per_token // 1024}.00 KiB (--kv-cache-retention" in table
    assert "1.00 GiB of host memory (--kv-host-cache, outside the budget; CUDA only)" in table
    main([*args, "--kv-cache-retention", "0"])
    assert "none: idle slabs go with their cached prefixes" in capsys.readouterr().out
    main([*args, "--json", "--kv-cache-retention", "1MiB"])
    assert '"kv_cache_retention": 1048576' in capsys.readouterr().out
