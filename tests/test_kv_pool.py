"""The elastic KV pool: slabs grown on demand within the budget, given back when idle, never moved."""

from __future__ import annotations

import contextlib
import time

import pytest
from conftest import fixed_and_block_bytes
from hypothesis import given, settings
from hypothesis import strategies as st
from stand_ins import FakeSlabs

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.memory.kv.block_pool import BlockHash, BlockPool


def elastic(budget_slabs: int = 3, slab_blocks: int = 4, idle: float = 0.0) -> tuple[BlockPool, FakeSlabs]:
    alloc = FakeSlabs(budget_slabs)
    pool = BlockPool(slab_blocks, max_slabs=8, allocator=alloc, idle_release_s=idle)
    return pool, alloc


def test_grows_by_a_slab_when_clean_blocks_run_out():
    pool, alloc = elastic()
    assert pool.num_slabs == 1 and pool.num_available_blocks == 12
    first = pool.take(4)
    assert [b.block_id for b in first] == [0, 1, 2, 3]
    more = pool.take(2)
    assert pool.num_slabs == 2 and alloc.live == {0, 1}
    assert [b.block_id for b in more] == [4, 5]  # the new slab's ids: nothing moved
    pool.check_integrity()


def test_evicts_cached_prefixes_before_growing():
    pool, _ = elastic(budget_slabs=2)
    blocks = pool.take(4)
    for i, b in enumerate(blocks):
        pool.cache(b, BlockHash.of(None, (i,)))
    pool.release(blocks)
    assert pool.num_cached_blocks == 4
    pool.take(3)  # cached prefixes go first (LRU), no new slab
    assert pool.num_slabs == 1 and pool.num_evictions == 3 and pool.num_cached_blocks == 1
    pool.take(3)  # 1 cached is not enough for 3: it is evicted too, and a new slab gives the other 2
    assert pool.num_slabs == 2 and pool.num_evictions == 4 and pool.num_cached_blocks == 0
    assert pool.take(3) is None  # 2 clean left and the budget is spent: nothing handed out
    assert pool.num_free_blocks == 2
    pool.check_integrity()


def test_idle_slabs_are_released_but_never_slab_zero():
    pool, alloc = elastic(budget_slabs=4, idle=5.0)
    held = pool.take(12)
    assert pool.num_slabs == 3
    pool.release(held[4:])  # slabs 1 and 2 fall idle now; slab 0 stays in use
    assert pool.release_idle_slabs(time.monotonic()) == 0  # not idle long enough yet
    assert pool.release_idle_slabs(time.monotonic() + 6) == 2
    assert pool.num_slabs == 1 and alloc.live == {0}
    pool.release(held[:4])
    assert pool.release_idle_slabs(time.monotonic() + 60) == 0  # slab 0 always stays
    pool.check_integrity()


def test_a_slab_with_one_block_in_use_is_kept_and_cached_blocks_go_with_their_slab():
    pool, alloc = elastic(budget_slabs=3)
    held = pool.take(6)  # slab 0 full, slab 1 half
    pool.cache(held[5], BlockHash.of(None, (5,)))
    pool.release([held[5]])
    assert pool.release_idle_slabs(time.monotonic() + 1) == 0  # block 4 still in use in slab 1
    pool.release([held[4]])
    assert pool.release_idle_slabs(time.monotonic() + 1) == 1
    assert pool.lookup(BlockHash.of(None, (5,))) is None
    pool.check_integrity()


def test_low_slabs_are_filled_first_so_high_slabs_drain():
    pool, _ = elastic(budget_slabs=3)
    held = pool.take(12)
    pool.release(held)
    again = pool.take(4)
    assert {b.block_id // 4 for b in again} == {0}


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["take", "free", "idle", "cache"]), st.integers(1, 7)), max_size=60)
)
def test_random_operations_keep_integrity_and_stay_within_budget(ops):
    pool, alloc = elastic(budget_slabs=3, slab_blocks=3)
    held = []
    for op, n in ops:
        if op == "take":
            got = pool.take(n)
            if got is None:
                assert n > pool.num_available_blocks
            else:
                held.extend(got)
        elif op == "free" and held:
            pool.release([held.pop() for _ in range(min(n, len(held)))])
        elif op == "cache" and held:
            b = held[-1]
            pool.cache(b, BlockHash.of(None, (b.block_id, n)))
        elif op == "idle":
            pool.release_idle_slabs(time.monotonic() + 1)
        pool.check_integrity()
        assert pool.num_slabs <= 3 and len(alloc.live) == pool.num_slabs
        assert {b.block_id // 3 for b in held} <= alloc.live


# ---- the engine -----------------------------------------------------------------------------------------


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def _book() -> str:
    from benchmarks.workload import DEFAULT_TEXT  # ../shared beside the repository, as CI lays it out

    return DEFAULT_TEXT.read_text(encoding="utf-8")


def test_engine_pool_grows_under_load_and_returns_to_one_slab_with_rss():
    """64 MiB slabs of the default model (bf16): ~2900 tokens each; 6 prompts of ~600 tokens need two. No
    retention budget: every cached block goes with its slab, so RSS falls by all of them (what retention keeps,
    and where, is tests/test_kv_retention.py's)."""
    eng = Engine(
        EngineConfig(
            dtype="bfloat16",
            max_model_len=1024,
            kv_idle_release_s=0.0,
            kv_slab_size=64 << 20,
            kv_cache_retention=0,
        )
    )
    slab = eng.storage.slab_bytes
    assert slab <= 64 << 20
    book = _book()
    prompts = [eng.tokenizer.encode(book[20000 + 5000 * i : 23000 + 5000 * i])[:600] for i in range(6)]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    for p in prompts:
        eng.add_request(p, params)
    rss_before = _rss()
    peak_slabs = 1
    high_blocks = 0  # blocks in use beyond slab 0, at most
    while eng.has_unfinished_requests():
        eng.step()
        eng.check_integrity()
        peak_slabs = max(peak_slabs, eng.pool.num_slabs)
        used_high = sum(1 for b in eng.pool.blocks[eng.pool.slab_blocks :] if b.ref_cnt > 0)
        high_blocks = max(high_blocks, used_high)
        assert eng.ledger.total <= eng.ledger.budget
    assert peak_slabs >= 2 and high_blocks > 0
    # Only written KV pages are resident: RSS grows by the blocks used beyond slab 0 (and activations).
    written_high = high_blocks * eng.storage.block_bytes
    rss_peak = _rss()
    assert rss_peak - rss_before >= written_high * 0.8
    eng.release_idle_memory()
    assert eng.pool.num_slabs == 1 and eng.storage.num_live == 1
    assert eng.ledger.current("kv") + eng.ledger.current("kv_cached") == slab
    # The released slabs' pages went back to the OS.
    assert rss_peak - _rss() >= written_high * 0.8


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("tiny"), family="llama")


_REFERENCE: dict[tuple[int, ...], list[int]] = {}
MAX_TOKENS = 24


def _reference(tiny, prompt: list[int]) -> list[int]:
    """Greedy output of `prompt` alone in an unconstrained engine (MAX_TOKENS tokens; shorter runs are
    its prefixes)."""
    key = tuple(prompt)
    if key not in _REFERENCE:
        eng = Engine(
            EngineConfig(model=str(tiny), dtype="float32", max_model_len=128, profile_workspace=False)
        )
        params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
        _REFERENCE[key] = _collect(eng, prompt, params)
    return _REFERENCE[key]


def _collect(eng: Engine, prompt: list[int], params: SamplingParams) -> list[int]:
    last = None
    for out in eng.stream(prompt, params):
        last = out
    return last.outputs[0].token_ids


workloads = st.fixed_dictionaries(
    {
        "requests": st.lists(
            st.tuples(
                st.lists(st.integers(3, 249), min_size=10, max_size=70),  # prompt
                st.integers(8, MAX_TOKENS),  # max_tokens
                st.integers(0, 2),  # priority
                st.integers(0, 3),  # arrival step
            ),
            min_size=3,
            max_size=8,
        ),
        "kv_blocks": st.integers(6, 10),  # the largest request (94 tokens) needs 6 blocks of 16
        "slab_blocks": st.integers(1, 3),
        "preemption_mode": st.sampled_from(["auto", "swap", "recompute"]),
        "swap_blocks": st.sampled_from([0, 4, 64]),
        "storage": st.sampled_from(["reserved", "slabs"]),
        "caching": st.booleans(),
    }
)


@settings(max_examples=30, deadline=None)
@given(w=workloads)
def test_tight_budget_random_workloads_match_unconstrained_runs(tiny, w):
    """Randomised workloads under tight budgets, both storage modes, swap and recompute: the ledger never
    passes the budget, the pool's integrity holds after every step, and every request's greedy output equals
    its run alone in an unconstrained engine."""
    from unittest import mock

    reference = [_reference(tiny, prompt)[:n] for prompt, n, _, _ in w["requests"]]
    patch = (
        mock.patch("fitllm.memory.kv.storage.reserve_region", lambda *a: None)
        if w["storage"] == "slabs"
        else contextlib.nullcontext()
    )
    fixed, per_block = fixed_and_block_bytes(tiny)
    with patch:
        eng = Engine(
            EngineConfig(
                model=str(tiny),
                dtype="float32",
                max_model_len=128,
                # Whole slabs only, at least the 6 blocks the largest request needs alone.
                memory_budget=fixed + -(-w["kv_blocks"] // w["slab_blocks"]) * w["slab_blocks"] * per_block,
                kv_slab_size=w["slab_blocks"] * per_block,
                kv_idle_release_s=0.0,
                profile_workspace=False,
                enable_prefix_caching=w["caching"],
                swap_space=w["swap_blocks"] * per_block,
                preemption_mode=w["preemption_mode"],
            )
        )
    assert eng.storage.mode == w["storage"] or eng.pool.max_slabs == 1
    pending = sorted(enumerate(w["requests"]), key=lambda t: t[1][3])
    ids: dict[int, str] = {}
    done: dict[str, list[int]] = {}
    step = 0
    while pending or eng.has_unfinished_requests():
        while pending and pending[0][1][3] <= step:
            i, (prompt, n, prio, _) = pending.pop(0)
            ids[i] = eng.add_request(
                prompt, SamplingParams(temperature=0, max_tokens=n, ignore_eos=True), priority=prio
            )
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        eng.check_integrity()
        assert eng.ledger.total <= eng.ledger.budget
        if eng.swapper.ledger is not None:
            assert eng.swapper.ledger.total <= eng.swapper.ledger.budget
        step += 1
        assert step < 2000, "requests never finished"
    assert [done[ids[i]] for i in range(len(w["requests"]))] == reference
    assert eng.ledger.peak_total <= eng.ledger.budget
    if eng.swapper.ledger is not None:
        assert eng.swapper.ledger.current("kv_swapped") == 0


def test_the_first_idle_turn_after_work_trims_the_host_heap(tiny, monkeypatch):
    """glibc keeps the heap a step's activations were freed into: the engine's first idle turn after a
    step hands it back (once; an idle engine does not trim every half second), as the pool gives back
    idle slabs."""
    import fitllm.memory.host as host_module

    trims = []
    monkeypatch.setattr(host_module, "trim_host_heap", lambda: trims.append(1))
    eng = Engine(EngineConfig(model=str(tiny), dtype="float32", max_model_len=128, profile_workspace=False))
    eng.idle()
    assert trims == []  # nothing ran since start-up, which trims its own transients
    _collect(eng, [5, 6, 7, 8], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.idle()
    eng.idle()
    assert trims == [1]
    eng.step()  # nothing to run: no step launched, nothing to trim
    eng.idle()
    assert trims == [1]
