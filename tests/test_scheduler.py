"""Scheduler over a real KVCacheManager with fake requests and a fake model.

A simulated step, as the engine drives it: schedule(), "run" the scheduled tokens (write them into a shadow
KV cache), update_after_launch(), then update_from_output() with a fake sampled token for every request that
samples (the scheduler appends it, publishes blocks, stops the request at max_tokens and frees it). The fake
token at each position is a fixed function of (request, position), so recomputation after preemption must
reproduce exactly the same sequence. With async scheduling, step N+1 is scheduled and launched before
step N's samples are read, as the engine does: a request that samples holds an output placeholder meanwhile.
"""

from __future__ import annotations

from dataclasses import dataclass

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fitllm.config import cdiv
from fitllm.engine.request import Request, RequestStatus, SamplingParams
from fitllm.engine.sampler import SampleResult
from fitllm.engine.scheduler import Scheduler
from fitllm.memory.kv.block_pool import BlockPool
from fitllm.memory.kv.manager import KVCacheManager

VOCAB = 3


def fake_token(req: Request, position: int) -> int:
    return (int(req.request_id[1:]) * 7 + position * 3 + position // 5) % VOCAB


def token_at(req: Request, position: int) -> int:
    """The request's token at `position`, a placeholder's included (the token it will be)."""
    return req.token_ids[position] if position < req.num_tokens else fake_token(req, position)


@dataclass
class Spec:
    prompt: list[int]
    max_tokens: int
    priority: int = 0
    arrival_step: int = 0


class Sim:
    """Drives a Scheduler as the engine would, checking invariants around every step."""

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        max_num_seqs: int,
        budget: int,
        caching: bool = True,
        async_scheduling: bool = False,
    ) -> None:
        self.async_scheduling = async_scheduling
        self.in_flight: tuple[list[Request], list[int]] | None = None  # a launched step's rows and tokens
        self.bs = block_size
        self.budget = budget
        self.max_num_seqs = max_num_seqs
        self.pool = BlockPool(num_blocks, enable_caching=caching)
        self.kv = KVCacheManager(self.pool, block_size)
        self.sched = Scheduler(self.kv, max_num_seqs, budget, max_model_len=1 << 20)
        self.all: dict[str, Request] = {}
        self.finished: dict[str, Request] = {}
        self.content: dict[int, list[int | None]] = {}  # shadow KV: token held by each slot
        self.victims: list[Request] = []
        self.num_steps = 0
        self.num_samples: dict[str, int] = {}
        self.num_placeholder_inputs = 0
        self.num_preempted_in_flight = 0  # preempted while a token of theirs was in flight

    def add(self, rid: str, prompt: list[int], max_tokens: int, priority: int = 0, arrival: float = 0.0):
        req = Request(
            rid, None, prompt, SamplingParams(max_tokens=max_tokens), priority, arrival_time=arrival
        )
        self.all[rid] = req
        self.num_samples[rid] = 0
        self.sched.add(req)
        return req

    # -- checks -----------------------------------------------------------------------------------------
    def check_pool(self) -> None:
        self.pool.check_integrity()
        holders: dict[int, int] = {}
        for r in self.sched.running:
            table = self.kv.block_ids(r.request_id)
            assert len(table) == len(set(table))
            for b in table:
                holders[b] = holders.get(b, 0) + 1
        for r in self.sched.waiting:
            assert self.kv.block_ids(r.request_id) == [], "a waiting request holds blocks"
        for blk in self.pool.blocks:
            assert blk.ref_cnt == holders.get(blk.block_id, 0)
            if holders.get(blk.block_id, 0) > 1:
                assert blk.block_hash is not None
        assert self.pool.num_used_blocks == len(holders)

    def check_queues(self) -> None:
        running = [r.request_id for r in self.sched.running]
        waiting = [r.request_id for r in self.sched.waiting]
        assert len(running) == len(set(running))
        assert not set(running) & set(waiting)
        assert len(running) <= self.max_num_seqs
        unfinished = {rid for rid, r in self.all.items() if rid not in self.finished}
        assert set(running) | set(waiting) == unfinished, "a request was lost or duplicated"
        for r in self.sched.running:
            assert r.status is RequestStatus.RUNNING
            assert len(self.kv.block_ids(r.request_id)) * self.bs >= r.num_computed_tokens
            # Always one token (at least) left to compute, or its last token is in flight.
            assert r.num_computed_tokens < r.num_tokens_with_placeholders
            assert r.num_output_placeholders <= 1
        for r in self.sched.waiting:
            assert r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED)
            assert r.num_computed_tokens == 0 or r.status is RequestStatus.WAITING

    # -- the step -----------------------------------------------------------------------------------------
    def step(self):
        self.num_steps += 1
        running_before = list(self.sched.running)
        waiting_before = {r.request_id for r in self.sched.waiting}
        out = self.sched.schedule()

        # Token budget and seats.
        assert out.num_tokens <= self.budget
        assert len(self.sched.running) <= self.max_num_seqs
        ids = [s.request.request_id for s in out.scheduled]
        assert len(ids) == len(set(ids))
        assert len(ids) <= self.max_num_seqs

        # Preemption victims: each the lowest-priority, newest of those still running at that moment.
        remaining = list(running_before)
        for victim in out.preempted:
            assert victim in remaining
            expected = max(remaining, key=lambda r: (r.priority, r.arrival_time))
            assert victim is expected, (
                f"preempted {victim.request_id} {victim.sort_key}, expected {expected.request_id} "
                f"{expected.sort_key}"
            )
            remaining.remove(victim)
            assert victim.status is RequestStatus.PREEMPTED
            assert victim.num_computed_tokens == 0
            assert self.kv.block_ids(victim.request_id) == []
            assert victim not in self.sched.running
            self.num_preempted_in_flight += victim.num_output_placeholders
            self.victims.append(victim)
        if out.preempted:
            # Admission in a step that preempts is only for requests that outrank a running one.
            admitted_now = [r for r in self.sched.running if not any(r is b for b in running_before)]
            lowest = max(r.priority for r in running_before)
            assert all(r.priority < lowest for r in admitted_now), "admitted an equal while preempting"
            assert not any(s.request in out.preempted for s in out.scheduled)

        # Admission in priority order: everyone admitted beats everyone left waiting.
        admitted = [r for r in self.sched.running if r.request_id in waiting_before]
        still_waiting = self.sched.waiting
        if admitted and still_waiting:
            assert max(r.sort_key for r in admitted) < min(r.sort_key for r in still_waiting)

        # Budget left over means nobody still running was skipped (freed budget of victims is reused), but
        # those whose last token is in flight.
        if out.num_tokens < self.budget:
            done = {
                r.request_id
                for r in self.sched.running
                if r.num_tokens_with_placeholders >= r.max_total_tokens
            }
            assert set(ids) == {r.request_id for r in self.sched.running} - done

        # Progress: the engine raises when a step does nothing at all.
        if self.sched.has_unfinished():
            assert out.scheduled or out.preempted or self.in_flight, "scheduler made no progress"
        if not out.scheduled:
            if self.in_flight is not None:
                self.resolve(self.in_flight)
                self.in_flight = None
            self.check_pool()
            self.check_queues()
            return out

        sampling = []
        self.last_plan = [(s.request.request_id, s.num_new_tokens, s.samples) for s in out.scheduled]
        for s in out.scheduled:
            r = s.request
            assert r.status is RequestStatus.RUNNING and r in self.sched.running
            assert s.num_new_tokens >= 1
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            assert end <= r.num_tokens_with_placeholders
            table = self.kv.block_ids(r.request_id)
            assert len(table) * self.bs >= end, "blocks do not cover the scheduled tokens"
            # What the request attends to is exactly its own token prefix (prefix hits included).
            for p in range(start):
                assert self.content[table[p // self.bs]][p % self.bs] == token_at(r, p), (
                    f"{r.request_id} position {p} reads a wrong KV slot"
                )
            for p in range(start, end):
                blk = table[p // self.bs]
                assert self.pool.blocks[blk].ref_cnt == 1, "writes into a shared block"
                # A placeholder's K/V is its token's once the device has it (the runner fills the id).
                self.num_placeholder_inputs += p >= r.num_tokens
                self.content.setdefault(blk, [None] * self.bs)[p % self.bs] = token_at(r, p)
            if s.samples:
                sampling.append(r)
        self.sched.update_after_launch(out)
        tokens = []
        for r in sampling:
            assert r.num_output_placeholders >= 1
            assert r.num_computed_tokens == r.num_tokens_with_placeholders - 1
            tokens.append(fake_token(r, r.num_computed_tokens))
        previous, self.in_flight = self.in_flight, (sampling, tokens)
        if previous is not None:
            self.resolve(previous)
        if not self.async_scheduling:
            self.resolve(self.in_flight)
            self.in_flight = None
        self.check_pool()
        self.check_queues()
        return out

    def resolve(self, step: tuple[list[Request], list[int]]) -> None:
        """A launched step's samples are read: the scheduler appends them, stops and frees."""
        sampling, tokens = step
        update = self.sched.update_from_output(
            sampling, SampleResult(tokens, [None] * len(tokens), [None] * len(tokens))
        )
        assert update.new_tokens == sampling  # nothing here finishes while its token is in flight
        for r in sampling:
            self.num_samples[r.request_id] += 1
            assert (r.num_output_tokens >= r.params.max_tokens) == (r in update.finished)
        for r in update.finished:
            assert r.status is RequestStatus.FINISHED_LENGTH and r.request_id not in self.sched.requests
            assert r.num_output_placeholders == 0
            self.finished[r.request_id] = r

    def run(self, specs: list[Spec] | None = None, max_steps: int = 3000) -> None:
        pending = sorted(enumerate(specs or []), key=lambda t: t[1].arrival_step)
        step = 0
        while pending or self.sched.has_unfinished():
            while pending and pending[0][1].arrival_step <= step:
                i, sp = pending.pop(0)
                self.add(f"r{i}", sp.prompt, sp.max_tokens, sp.priority, arrival=float(i))
            if self.sched.has_unfinished():
                self.step()
            step += 1
            assert step < max_steps, "requests never finished"
        assert set(self.finished) == set(self.all) and self.in_flight is None
        for rid, r in self.all.items():
            assert r.num_output_placeholders == 0
            assert r.num_output_tokens == r.params.max_tokens
            assert self.num_samples[rid] == r.params.max_tokens  # sampled once per output token
            for p in range(r.num_prompt_tokens, r.num_tokens):
                assert r.token_ids[p] == fake_token(r, p)
        assert self.pool.num_used_blocks == 0


# ---- deterministic scenarios ----------------------------------------------------------------------------


def _prefill_and_decode(sim: Sim, steps: int) -> list:
    return [sim.step() for _ in range(steps)]


def test_preempts_newest_of_lowest_priority():
    sim = Sim(num_blocks=6, block_size=4, max_num_seqs=8, budget=100, caching=False)
    a = sim.add("r0", [1] * 7, 10, priority=0, arrival=0.0)
    b = sim.add("r1", [2] * 7, 10, priority=1, arrival=1.0)
    c = sim.add("r2", [0] * 7, 10, priority=1, arrival=2.0)
    out = sim.step()  # all three prefill 7 tokens into 2 blocks each
    assert len(out.scheduled) == 3 and sim.pool.num_free_blocks == 0
    out = sim.step()  # position 7 still fits in block 2
    assert not out.preempted
    out = sim.step()  # position 8 needs a third block each
    assert out.preempted == [c]
    assert c.num_preemptions == 1 and sim.sched.num_preemptions == 1
    assert {s.request.request_id for s in out.scheduled} == {"r0", "r1"}
    assert a.num_preemptions == 0 and b.num_preemptions == 0
    sim.run()
    assert c.num_output_tokens == 10


def test_priority_beats_age_in_victim_choice():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=100, caching=False)
    old_low = sim.add("r0", [1] * 7, 6, priority=5, arrival=0.0)
    new_high = sim.add("r1", [2] * 7, 6, priority=0, arrival=1.0)
    _prefill_and_decode(sim, 2)
    out = sim.step()
    assert out.preempted == [old_low]
    assert new_high.num_preemptions == 0
    sim.run()


def test_requester_preempts_itself_when_it_is_lowest_priority():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=100, caching=False)
    high = sim.add("r0", [1] * 7, 3, priority=0, arrival=0.0)  # stays within 3 blocks... (7+3-1=9 tokens)
    low = sim.add("r1", [2] * 7, 8, priority=3, arrival=1.0)
    _prefill_and_decode(sim, 2)  # 9 tokens each; high needs 3 blocks at position 8
    out = sim.step()
    assert out.preempted == [low]
    assert high.num_preemptions == 0
    sim.run()
    assert sim.sched.num_preemptions >= 1


def test_victim_scheduled_earlier_in_step_returns_its_budget():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=3, caching=False)
    low = sim.add("r0", [1] * 3, 8, priority=9, arrival=0.0)
    sim.step()  # low prefills 3 tokens alone
    high = sim.add("r1", [2] * 3, 8, priority=0, arrival=1.0)
    sim.step()  # low decodes (1) and high prefills... budget 3: low 1 + high 2 (chunked)
    assert sim.sched.running == [low, high]
    # Drive until the pool runs dry; when high needs a block, the already scheduled low is the victim.
    saw = False
    for _ in range(40):
        out = sim.step()
        if out.preempted:
            assert out.preempted == [low]
            assert [s.request for s in out.scheduled] == [high]
            assert out.num_tokens <= 3
            saw = True
            break
    assert saw
    sim.run()


def test_victims_budget_goes_to_the_next_running_request():
    """Budget given back by a victim scheduled earlier in the step is spent on later running requests."""
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=4, budget=3, caching=False)
    low = sim.add("r0", [1] * 3, 12, priority=9, arrival=0.0)
    sim.step()
    high = sim.add("r1", [2], 12, priority=0, arrival=1.0)
    mid = sim.add("r2", [0] * 10, 1, priority=1, arrival=2.0)
    sim.step()
    assert sim.sched.running == [low, high, mid]
    for _ in range(20):
        out = sim.step()
        if out.preempted:
            break
    assert out.preempted == [low]
    assert dict((rid, n) for rid, n, _ in sim.last_plan) == {"r1": 1, "r2": 2}
    assert out.num_tokens == 3
    sim.run()


def test_high_priority_arrival_preempts_lower_priority_running():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=100, caching=False)
    low = sim.add("r0", [1] * 6, 6, priority=5, arrival=0.0)
    mid = sim.add("r1", [2] * 6, 6, priority=3, arrival=1.0)
    sim.step()  # 2 + 2 blocks (7 tokens each after the step): the pool is full, nobody needs to grow yet
    assert sim.pool.num_free_blocks == 0
    high = sim.add("r2", [0] * 3, 3, priority=0, arrival=2.0)
    out = sim.step()
    assert out.preempted == [low]  # one victim (the least important) makes room; mid keeps running
    assert high in sim.sched.running and mid in sim.sched.running
    sim.run()
    assert high.num_preemptions == 0  # mid may be preempted later by high's growth, never high


def test_equal_priority_arrival_waits_instead_of_preempting():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=100, caching=False)
    first = sim.add("r0", [1] * 6, 4, priority=1, arrival=0.0)
    sim.add("r1", [2] * 6, 4, priority=1, arrival=1.0)
    sim.step()
    late = sim.add("r2", [0] * 3, 3, priority=1, arrival=2.0)
    out = sim.step()
    assert not out.preempted and late not in sim.sched.running
    sim.run()
    assert first.num_preemptions == 0 and late.num_preemptions == 0


def test_high_priority_waits_when_preempting_cannot_make_room():
    """Preempting the only lower-priority request would free 1 block; the newcomer needs 3: no victim."""
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=100, caching=False)
    top = sim.add("r0", [1] * 10, 2, priority=0, arrival=0.0)
    low = sim.add("r1", [2] * 3, 2, priority=9, arrival=1.0)
    sim.step()
    assert sim.pool.num_free_blocks == 0
    big = sim.add("r2", [0] * 11, 2, priority=1, arrival=2.0)
    out = sim.step()
    scheduled = [s.request for s in out.scheduled]
    assert not out.preempted and low in scheduled and big not in scheduled
    sim.run()
    assert low.num_preemptions == 0 and top.num_preemptions == 0 and big.num_output_tokens == 2


def test_cached_prefixes_are_sacrificed_before_running_requests():
    sim = Sim(num_blocks=4, block_size=4, max_num_seqs=8, budget=100, caching=True)
    sim.add("r0", [1] * 8, 1, priority=0, arrival=0.0)
    sim.run()  # finished: its 2 full prompt blocks stay cached
    assert sim.pool.num_cached_blocks == 2
    low = sim.add("r1", [2] * 7, 6, priority=9, arrival=1.0)
    sim.step()
    high = sim.add("r2", [0] * 7, 3, priority=0, arrival=2.0)
    out = sim.step()  # needs 2 blocks: the cached ones are evicted, low keeps running
    assert not out.preempted and high in sim.sched.running and low in sim.sched.running
    assert sim.pool.num_cached_blocks == 0
    sim.run()


def test_chunked_prefill_respects_budget_and_samples_once():
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=4, budget=8)
    r = sim.add("r0", list(range(3)) * 7, 2)  # 21 tokens
    chunks, samples = [], []
    while r.num_output_tokens == 0:
        sim.step()
        ((_, n, samples_now),) = sim.last_plan
        chunks.append(n)
        samples.append(samples_now)
    assert chunks == [8, 8, 5]
    assert samples == [False, False, True]
    sim.run()


def test_decodes_go_before_new_prefills():
    sim = Sim(num_blocks=32, block_size=4, max_num_seqs=8, budget=6)
    a = sim.add("r0", [1, 2], 20, arrival=0.0)
    b = sim.add("r1", [2, 1], 20, arrival=1.0)
    sim.step()
    c = sim.add("r2", [0] * 30, 3, arrival=2.0)
    out = sim.step()
    sizes = {s.request.request_id: s.num_new_tokens for s in out.scheduled}
    assert sizes == {a.request_id: 1, b.request_id: 1, c.request_id: 4}
    sim.run()


def test_max_num_seqs_caps_running():
    sim = Sim(num_blocks=64, block_size=4, max_num_seqs=2, budget=100)
    specs = [Spec([i % 3] * (3 + i), 4, arrival_step=0) for i in range(5)]
    sim.run(specs)
    assert sim.num_steps >= 3 * 4  # at most two at a time


def test_prefix_hit_on_admission_and_cached_token_count():
    sim = Sim(num_blocks=16, block_size=4, max_num_seqs=4, budget=100)
    prompt = [0, 1, 2, 0, 1, 2, 0, 1, 2, 0]
    sim.add("r0", prompt, 2)
    sim.run()
    second = sim.add("r1", prompt + [2], 2)
    out = sim.step()
    (s,) = out.scheduled
    assert s.num_new_tokens == 3 and second.num_cached_tokens == 8
    assert sim.kv.prefix_hits == 8
    sim.run()


def test_preempted_request_keeps_first_cached_count_and_recomputes():
    sim = Sim(num_blocks=5, block_size=4, max_num_seqs=4, budget=100)
    shared = [0, 1, 2, 0, 1, 2, 0, 1]
    sim.add("r0", shared + [2], 1)
    sim.run()
    hi = sim.add("r1", [2, 2, 2, 2, 2], 12, priority=0, arrival=1.0)
    lo = sim.add("r2", shared + [0], 12, priority=1, arrival=2.0)
    sim.step()
    assert lo.num_cached_tokens == 8 and hi.num_cached_tokens == 0
    while lo.num_preemptions == 0:
        sim.step()
    assert lo.status is RequestStatus.PREEMPTED
    sim.run()
    assert lo.num_cached_tokens == 8  # the first admission's figure is kept


def test_remove_waiting_request_frees_it():
    sim = Sim(num_blocks=3, block_size=4, max_num_seqs=1, budget=100)
    a = sim.add("r0", [1] * 5, 3, arrival=0.0)
    b = sim.add("r1", [2] * 5, 3, arrival=1.0)
    sim.step()
    assert sim.sched.waiting == [b]
    assert sim.sched.finish_requests(["r1"], RequestStatus.FINISHED_ABORTED) == [b]
    assert b.status is RequestStatus.FINISHED_ABORTED
    sim.finished["r1"] = b
    assert sim.sched.num_waiting == 0
    sim.check_queues()
    assert sim.sched.finish_requests(["r0", "r0", "nobody"], RequestStatus.FINISHED_ABORTED) == [a]
    sim.finished["r0"] = a
    assert not sim.sched.has_unfinished()
    assert sim.pool.num_used_blocks == 0
    sim.pool.check_integrity()


# ---- randomised streams ------------------------------------------------------------------------------------

SHARED = [[], [0, 1, 2, 0, 1, 2, 0, 1], [2, 2, 2, 2]]


@st.composite
def workloads(draw):
    bs = draw(st.sampled_from([2, 4]))
    n = draw(st.integers(1, 8))
    specs = []
    for _ in range(n):
        head = draw(st.sampled_from(SHARED))
        tail = draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=24))
        specs.append(
            Spec(
                prompt=head + tail,
                max_tokens=draw(st.integers(1, 10)),
                priority=draw(st.integers(0, 3)),
                arrival_step=draw(st.integers(0, 6)),
            )
        )
    biggest = max(cdiv(len(s.prompt) + s.max_tokens, bs) for s in specs)
    num_blocks = biggest + draw(st.integers(0, 5))  # often far too small for everything at once
    return dict(
        specs=specs,
        bs=bs,
        num_blocks=num_blocks,
        max_num_seqs=draw(st.integers(1, 6)),
        budget=draw(st.integers(1, 40)),
        caching=draw(st.sampled_from([True, True, False])),
    )


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(w=workloads(), async_scheduling=st.booleans())
def test_random_streams(w, async_scheduling):
    sim = Sim(w["num_blocks"], w["bs"], w["max_num_seqs"], w["budget"], w["caching"], async_scheduling)
    sim.run(w["specs"])
    assert sim.sched.num_preemptions == len(sim.victims)


def test_random_streams_do_preempt_and_chunk():
    """Guard for the property test above: its workloads must actually exercise preemption and chunking."""
    specs = [Spec([i % 3, 1, 2, 0] * 4 + [i], 10, priority=i % 3, arrival_step=i) for i in range(8)]
    for async_scheduling in (False, True):
        sim = Sim(num_blocks=8, block_size=4, max_num_seqs=6, budget=7, async_scheduling=async_scheduling)
        sim.run(specs)
        assert sim.sched.num_preemptions > 0
        assert any(r.num_preemptions > 0 for r in sim.all.values())
        assert (sim.num_placeholder_inputs > 0) == (sim.num_preempted_in_flight > 0) == async_scheduling
