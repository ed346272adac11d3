"""Swap preemption: the cost choice, the host copies, and identical greedy output to recompute."""

from __future__ import annotations

import pytest
import torch
from conftest import GREEDY, run_all, tight_engine

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.memory.kv.format import KVCacheFormat, kv_bytes_per_token
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.kv.swap import KVSwapper, PreemptionCosts, choose_preemption
from fitllm.memory.ledger import MemoryLedger
from fitllm.memory.pinned import pinned_block_bytes

# ---- the cost choice -------------------------------------------------------------------------------------


def costs(bw: float = 1e9, tps: float = 1000.0) -> PreemptionCosts:
    return PreemptionCosts(swap_bytes_per_s=bw, recompute_tokens_per_s=tps)


def test_swap_when_moving_bytes_twice_is_cheaper_than_recomputing():
    # 100 tokens of 100 KB: swap 2 x 10 MB at 1 GB/s = 20 ms; recompute 100 tokens at 1000 tok/s = 100 ms.
    assert choose_preemption("auto", 100, 10_000_000, 1 << 40, costs()) == "swap"


def test_recompute_when_it_is_cheaper():
    # The same bytes at 100 MB/s take 200 ms, recompute 100 ms.
    assert choose_preemption("auto", 100, 10_000_000, 1 << 40, costs(bw=1e8)) == "recompute"


def test_break_even_counts_both_directions():
    # Swap one way = recompute exactly; both ways is twice that, so recompute wins.
    assert choose_preemption("auto", 100, 100_000_000, 1 << 40, costs(bw=1e9)) == "recompute"
    assert choose_preemption("auto", 100, 49_000_000, 1 << 40, costs(bw=1e9)) == "swap"


def test_shared_prefix_tokens_make_recompute_cheaper():
    # Only the tokens not shared with other requests are recomputed (the shared blocks stay cached).
    assert choose_preemption("auto", 100, 10_000_000, 1 << 40, costs()) == "swap"
    assert choose_preemption("auto", 10, 10_000_000, 1 << 40, costs()) == "recompute"


def test_no_host_room_means_recompute_even_when_forced():
    assert choose_preemption("swap", 100, 10_000_000, 9_999_999, costs()) == "recompute"
    assert choose_preemption("auto", 100, 10_000_000, 0, costs()) == "recompute"


def test_forced_modes():
    assert choose_preemption("swap", 1, 10_000_000, 1 << 40, costs(bw=1.0)) == "swap"
    assert choose_preemption("recompute", 10**6, 1, 1 << 40, costs()) == "recompute"


def test_costs_follow_observations():
    c = costs(bw=1e9, tps=1000.0)
    for _ in range(50):
        c.observe_swap(4_000_000_000, 1.0)
        c.observe_step(2000, 1.0)
    assert c.swap_bytes_per_s == pytest.approx(4e9, rel=1e-3)
    assert c.recompute_tokens_per_s == pytest.approx(2000.0, rel=1e-3)
    c.observe_step(1, 1.0)  # decode-only steps say nothing about prefill speed
    assert c.recompute_tokens_per_s == pytest.approx(2000.0, rel=1e-3)


# ---- host copies -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["reserved", "slabs"])
def test_read_and_write_slots_round_trip_across_slabs(mode, monkeypatch):
    if mode == "slabs":
        monkeypatch.setattr("fitllm.memory.kv.storage.reserve_region", lambda *a: None)
    ledger = MemoryLedger(1 << 30)
    fmt = KVCacheFormat("auto", torch.float32, 8)
    s = KVSlabStorage(3, 2, fmt, 4, 2, 3, torch.device("cpu"), ledger)  # 8 slots per slab
    for slab in range(3):
        assert s.add(slab)
    assert s.mode == mode
    slots = torch.tensor([17, 2, 9, 23, 0, 8])  # slabs 2, 0, 1, 2, 0, 1 out of order
    data = torch.randn(3, 2, len(slots), 2, 8)
    s.write_slots(slots, data)
    out = torch.empty_like(data)
    s.read_slots(slots, out)
    assert torch.equal(out, data)
    # Each value landed at its own slot and nowhere else.
    view = s.slab_view(2)
    assert torch.equal(view[:, :, 17 - 16], data[:, :, 0])
    assert torch.equal(view[:, :, 23 - 16], data[:, :, 3])
    assert int((s.slab_view(1) != 0).any(dim=(0, 1, 3, 4)).sum()) == 2


# ---- through the engine -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from conftest import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("swap"), family="llama")


@pytest.fixture(scope="module")
def prompts():
    import random

    rng = random.Random(7)
    return [[rng.randrange(3, 250) for _ in range(rng.randrange(20, 60))] for _ in range(8)]


@pytest.fixture(scope="module")
def reference(tiny, prompts):
    eng = Engine(EngineConfig(model=str(tiny), dtype="float32", max_model_len=128))
    return run_all(eng, prompts)


@pytest.mark.parametrize("mode", ["swap", "recompute", "auto"])
def test_swap_and_recompute_both_give_the_unconstrained_output(tiny, prompts, reference, mode):
    eng = tight_engine(tiny, 12, preemption_mode=mode, swap_space=64 << 20)
    peak_swapped = []
    out = run_all(eng, prompts, on_step=lambda e: peak_swapped.append(e.swapper.ledger.current("kv_swapped")))
    assert out == reference
    sw = eng.swapper
    assert eng.scheduler.num_preemptions > 0
    if mode == "swap":
        assert sw.num_swap_outs == eng.scheduler.num_preemptions and sw.num_recomputes == 0
        assert max(peak_swapped) > 0
    if mode == "recompute":
        assert sw.num_swap_outs == 0 and sw.num_recomputes == eng.scheduler.num_preemptions
    assert sw.num_swap_ins == sw.num_swap_outs  # every swapped request came back
    assert sw.ledger.current("kv_swapped") == 0 and not sw._held


def test_swapped_request_resumes_without_recomputing(tiny, prompts, reference):
    """A swapped request is re-admitted with its computed tokens; it never prefills its prompt twice."""
    eng = tight_engine(tiny, 12, preemption_mode="swap", swap_space=64 << 20)
    computed_at_resume = []
    orig = eng.runner.swap

    def swap(swap_out, swap_in, shifts=()):
        for copy in swap_in:
            req = eng.requests[copy.request_id]
            assert req.num_computed_tokens == len(copy.slots)  # resumed with what came back
            computed_at_resume.append((len(copy.slots), req))
        return orig(swap_out, swap_in, shifts)

    eng.runner.swap = swap
    assert run_all(eng, prompts) == reference
    assert computed_at_resume
    for n, req in computed_at_resume:
        assert n >= len(req.prompt_token_ids)  # at least the whole prompt came back from host


def test_swap_space_too_small_falls_back_to_recompute(tiny, prompts, reference):
    eng = tight_engine(tiny, 12, preemption_mode="swap", swap_space=eng_bytes_per_token(tiny) * 10)
    assert run_all(eng, prompts) == reference
    assert eng.swapper.num_recomputes > 0
    assert eng.swapper.ledger.peak_total <= eng.swapper.ledger.budget


def eng_bytes_per_token(tiny) -> int:
    from fitllm.loader import open_model

    return kv_bytes_per_token(open_model(str(tiny)).config, torch.float32)


def test_aborting_a_swapped_request_frees_its_host_bytes(tiny, prompts):
    eng = tight_engine(tiny, 12, preemption_mode="swap", swap_space=64 << 20)
    ids = [eng.add_request(p, GREEDY) for p in prompts]
    while not eng.swapper._held:
        eng.step()
        assert eng.has_unfinished_requests(), "the pool was meant to force a swap"
    victim = next(iter(eng.swapper._held))
    assert eng.swapper.ledger.current("kv_swapped") > 0
    assert eng.abort(victim)
    assert not eng.swapper.holds(victim)
    while eng.has_unfinished_requests():
        eng.step()
        eng.check_integrity()
    assert eng.swapper.ledger.current("kv_swapped") == 0
    assert victim in ids


def test_high_priority_arrival_preempts_running_low_priority_requests(tiny, prompts, reference):
    """Low-priority requests fill the pool; a high-priority one arrives and runs at once, by preempting them."""
    eng = tight_engine(tiny, 9, preemption_mode="swap", swap_space=64 << 20)
    low = [eng.add_request(p, GREEDY, priority=5) for p in prompts[:3]]
    for _ in range(3):
        eng.step()
    # prompts[3] (39 tokens) needs 3 blocks; the low-priority ones (43, 25, 27 tokens) hold 7 of 9.
    assert eng.pool.num_available_blocks < 3, "the low-priority requests were meant to fill the pool"
    assert eng.scheduler.num_preemptions == 0
    high = eng.add_request(prompts[3], GREEDY, priority=0)
    done = {}
    eng.step()
    assert eng.requests[high] in eng.scheduler.running
    assert eng.scheduler.num_preemptions > 0
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        eng.check_integrity()
    assert [done[r] for r in low] == reference[:3]
    assert done[high] == reference[3]


def test_the_scheduler_records_swaps_and_the_runner_copies_them(tiny, prompts, reference):
    """No K/V byte moves while scheduling: each swap is a copy in the SchedulerOutput (outs before ins),
    made by the runner before the step's forward, one read per swap-out and one write per swap-in."""
    eng = tight_engine(tiny, 12, preemption_mode="swap", swap_space=64 << 20)
    scheduling, copies = [False], []
    schedule, swap = eng.scheduler.schedule, eng.runner.swap

    def spy_schedule():
        scheduling[0] = True
        try:
            return schedule()
        finally:
            scheduling[0] = False

    def spy_swap(swap_out, swap_in, shifts=()):
        ids = [c.request_id for c in swap_out]
        assert all(eng.requests[r].num_preemptions > 0 for r in ids)
        return swap(swap_out, swap_in, shifts)

    def spying(name):
        orig = getattr(eng.storage, name)

        def spy(slots, tensor):
            assert not scheduling[0], f"{name} while scheduling"
            copies.append(name)
            return orig(slots, tensor)

        return spy

    for name in ("read_slots", "write_slots"):
        setattr(eng.storage, name, spying(name))
    eng.scheduler.schedule, eng.runner.swap = spy_schedule, spy_swap
    assert run_all(eng, prompts) == reference
    sw = eng.swapper
    assert copies.count("read_slots") == sw.num_swap_outs > 0
    assert copies.count("write_slots") == sw.num_swap_ins == sw.num_swap_outs
    assert sw.ledger.current("kv_swapped") == 0


def test_swap_space_counts_the_pinned_allocators_power_of_two_rounding():
    """On CUDA a swap buffer comes from PyTorch's caching host allocator, which holds the next power of two
    of what it was asked: the space's books count that, so --swap-space is never exceeded in fact."""
    assert [pinned_block_bytes(n) for n in (0, 1, 4096, 4097, 3 << 20)] == [0, 1, 4096, 8192, 4 << 20]

    class Storage:  # only what the swapper's books read
        bytes_per_token = 3000
        device = torch.device("cuda")

    swapper = KVSwapper(Storage(), kv=None, space_bytes=1 << 20)
    assert swapper._held_bytes(300 * 3000) == 1 << 20  # 900 kB held as 1 MiB: the whole space
    assert swapper._held_bytes(400 * 3000) == 2 << 20  # would not fit: recompute
    Storage.device = torch.device("cpu")
    assert KVSwapper(Storage(), kv=None, space_bytes=1 << 20)._held_bytes(400 * 3000) == 400 * 3000
