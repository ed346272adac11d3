"""Async scheduling: step N+1 is scheduled and queued before the host reads step N's tokens.

The reference is the same engine with async scheduling off. Greedy and seeded requests must come out
identical (tokens, text, finish reasons, logprobs), through chunked prefill, prefix hits, stop strings and
stop tokens, min_tokens, penalties, aborts and both kinds of preemption. The overlap itself is checked by
the order of calls: the runner queues step N+1 before step N's samples are read. On CPU the model runs on
the host thread, so there is no speed to gain here; that is measured on a GPU (docs/benchmarks.md).
"""

from __future__ import annotations

import random

import pytest
from conftest import make_random_checkpoint, tight_engine

from fitllm import SamplingParams
from fitllm.config import EngineConfig, resolve_async_scheduling
from fitllm.engine.engine import Engine
from fitllm.engine.sampler import SampledBatch


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("async"), "llama", seed=11)


def make_engine(folder, async_scheduling: str, **kw) -> Engine:
    cfg = dict(model=str(folder), dtype="float32", max_model_len=128, profile_workspace=False)
    cfg.update(kw)
    return Engine(EngineConfig(async_scheduling=async_scheduling, **cfg))


def run(engine: Engine, prompts, params, aborts: dict[int, int] | None = None, on_step=None) -> dict:
    """Run to the end; aborts maps a step number to the prompt index aborted before it. Returns the final
    output of each request by prompt index."""
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done, step = {}, 0
    while engine.has_unfinished_requests():
        if aborts and step in aborts:
            engine.abort(rids[aborts[step]])
        for out in engine.step():
            assert out.request_id not in done, "an output after the request finished"
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
        assert engine.ledger.total <= engine.ledger.budget
        if on_step is not None:
            on_step(engine)
        step += 1
        assert step < 2000
    assert engine.pool.num_used_blocks == 0
    return {i: done[r] for i, r in enumerate(rids)}


def summary(outputs: dict) -> dict:
    """What must match between the modes, by prompt index."""
    result = {}
    for i, out in outputs.items():
        c = out.outputs[0]
        lps = None
        if c.logprobs is not None:
            lps = [{t: (round(lp.logprob, 4), lp.rank) for t, lp in e.items()} for e in c.logprobs]
        result[i] = (c.token_ids, c.text, c.finish_reason, c.stop_reason, lps)
    return result


def mixed_requests(n: int = 10, seed: int = 3) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts of 3..90 tokens (some longer than a 32-token prefill chunk, several sharing a prefix) with
    greedy and seeded sampling, stop tokens and strings, min_tokens, logprobs and EOS left on."""
    rng = random.Random(seed)
    shared = [rng.randrange(3, 250) for _ in range(40)]
    prompts, params = [], []
    for i in range(n):
        body = [rng.randrange(3, 250) for _ in range(rng.randrange(3, 50))]
        prompts.append(shared + body if i % 3 == 0 else body)
        kind = i % 5
        if kind == 0:
            sp = SamplingParams(temperature=0, max_tokens=rng.randrange(4, 30), ignore_eos=True, logprobs=2)
        elif kind == 1:
            sp = SamplingParams(
                temperature=0.9, top_k=20, top_p=0.9, seed=i, max_tokens=25, stop_token_ids=[5, 9]
            )
        elif kind == 2:
            sp = SamplingParams(temperature=0.8, seed=100 + i, max_tokens=30, min_tokens=6, stop=["t1"])
        elif kind == 3:
            sp = SamplingParams(temperature=0, max_tokens=40)  # EOS (id 2) stops it when sampled
        else:
            sp = SamplingParams(temperature=1.0, min_p=0.05, seed=7 * i, max_tokens=12, logprobs=0)
        params.append(sp)
    return prompts, params


def test_auto_is_on_for_cuda_only_and_bad_values_name_the_flag():
    import torch

    assert resolve_async_scheduling("auto", torch.device("cuda")) is True
    assert resolve_async_scheduling("auto", torch.device("cpu")) is False
    assert resolve_async_scheduling("on", torch.device("cpu")) is True
    assert resolve_async_scheduling("off", torch.device("cuda")) is False
    with pytest.raises(ValueError, match="--async-scheduling"):
        EngineConfig(model="x", async_scheduling="yes")


@pytest.mark.parametrize("batched_tokens", [32, 2048], ids=["chunked-prefill", "whole-prompts"])
def test_async_outputs_equal_sync_outputs(tiny, batched_tokens):
    prompts, params = mixed_requests()
    kw = dict(max_num_batched_tokens=batched_tokens, max_num_seqs=6)
    sync = make_engine(tiny, "off", **kw)
    async_ = make_engine(tiny, "on", **kw)
    want = summary(run(sync, prompts, params))
    got = summary(run(async_, prompts, params))
    assert got == want
    reasons = {w[2] for w in want.values()}
    assert reasons == {"stop", "length"}  # the mix really exercises both ways to finish
    # Full blocks were published under their hashes (once their tokens were known) and later prompts hit
    # them, as often as without async scheduling.
    assert async_.kv.prefix_hits == sync.kv.prefix_hits > 0


def test_step_n_plus_one_is_queued_before_step_n_is_read(tiny, monkeypatch):
    """The order of calls is the overlap: execute(N+1) comes before result(N), and step N+1's input for a
    decoding request is its placeholder, filled on the device from step N's tokens."""
    engine = make_engine(tiny, "on")
    events: list[tuple[str, int]] = []
    launched: dict[int, int] = {}  # id(SampledBatch) -> launch number
    placeholder_inputs = []
    execute, result = engine.runner.execute, SampledBatch.result

    def spy_execute(sched, pending=None):
        n = len([e for e in events if e[0] == "execute"])
        events.append(("execute", n))
        placeholder_inputs.append(
            sum(1 for s in sched.scheduled if len(s.request.token_ids) == s.request.num_computed_tokens)
        )
        sampled, checks, samples = execute(sched, pending)
        if samples is not None:
            launched[id(samples)] = n
        return sampled, checks, samples

    def spy_result(self):
        events.append(("result", launched[id(self)]))
        return result(self)

    engine.runner.execute = spy_execute
    monkeypatch.setattr(SampledBatch, "result", spy_result)
    prompts = [[3 + i, 4, 5, 6, 7] for i in range(3)]
    greedy = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    out = run(engine, prompts, [greedy] * 3)
    assert all(len(o.outputs[0].token_ids) == 10 for o in out.values())
    # Every step after the first is queued before the previous one is read...
    for n in range(1, 10):
        assert events.index(("execute", n)) < events.index(("result", n - 1))
    # ...and its decoding requests read their last token from the device, not from the host.
    assert placeholder_inputs[0] == 0 and all(k == 3 for k in placeholder_inputs[1:9])
    monkeypatch.undo()
    assert summary(out) == summary(run(make_engine(tiny, "off"), prompts, [greedy] * 3))


def test_penalties_read_the_tokens_in_flight_first(tiny, monkeypatch):
    """Penalties count previous tokens: a step sampling such a request reads the step in flight first (no
    overlap for it), so the penalty sees every token and the output equals the sync engine's."""
    prompts = [[10, 11, 12, 13] * 3, [20, 21, 22]]
    params = [
        SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, repetition_penalty=1.8),
        SamplingParams(temperature=0.7, seed=4, max_tokens=20, ignore_eos=True, presence_penalty=1.5),
    ]
    want = summary(run(make_engine(tiny, "off"), prompts, params))
    engine = make_engine(tiny, "on")
    got = summary(run(engine, prompts, params))
    assert got == want
    # Sanity: the penalty changes the output, so reading stale history would have shown.
    plain = [SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)]
    assert summary(run(make_engine(tiny, "on"), prompts[:1], plain))[0][0] != want[0][0]


def test_aborts_and_stops_with_a_step_in_flight(tiny):
    """A request aborted, or stopped by its token, while its next step is in flight drops that step's
    token; its blocks are freed once and the others are unaffected. Aborted before the same step() call,
    an async request can have fewer tokens than a sync one (the token in flight when it was aborted)."""
    prompts, params = mixed_requests(8, seed=9)
    aborts = {3: 1, 6: 4, 7: 6}
    want = summary(run(make_engine(tiny, "off"), prompts, params, aborts))
    got = summary(run(make_engine(tiny, "on"), prompts, params, aborts))
    aborted = sorted(aborts.values())
    assert {i: v for i, v in got.items() if i not in aborted} == {
        i: v for i, v in want.items() if i not in aborted
    }
    for i in aborted:
        tokens, want_tokens = got[i][0], want[i][0]
        assert got[i][2] == want[i][2] == "abort"
        assert tokens == want_tokens[: len(tokens)]
    assert any(want[i][2] == "stop" for i in want)  # some stopped by their own token, too


@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preemption_with_a_step_in_flight(tiny, mode):
    """A KV pool of 10 blocks for 8 requests of up to ~100 tokens: requests are preempted while their next
    token is in flight, and come back with it."""
    kw = dict(swap_space=64 << 20, preemption_mode=mode)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 250) for _ in range(rng.randrange(20, 60))] for _ in range(8)]
    params = [SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)] * 8
    sync = tight_engine(tiny, 10, async_scheduling="off", **kw)
    async_ = tight_engine(tiny, 10, async_scheduling="on", **kw)
    want = summary(run(sync, prompts, params))
    got = summary(run(async_, prompts, params))
    assert got == want
    assert async_.scheduler.num_preemptions > 0


def test_last_token_in_flight_is_not_scheduled_past_the_context(tiny):
    """A request whose final token (by max_tokens or the context length) is in flight is not scheduled again:
    the pool never holds more than max_model_len tokens for it."""
    engine = make_engine(tiny, "on", max_model_len=49, block_size=16)
    peak = []

    def blocks(e):
        peak.extend(len(e.kv.block_ids(r.request_id)) for r in e.scheduler.running)

    prompt = list(range(3, 35))  # 32 tokens: the context ends after 17 more
    params = [SamplingParams(temperature=0, max_tokens=None, ignore_eos=True)]
    out = run(engine, [prompt], params, on_step=blocks)
    assert len(out[0].outputs[0].token_ids) == 17 and out[0].outputs[0].finish_reason == "length"
    # The 49th token is sampled, never computed: 48 tokens of K/V in three 16-token blocks, never a fourth.
    assert max(peak) == 3


def test_triton_backend_placeholders(tiny):
    """The Triton backend's batch preparation fills placeholders the same way (interpreted on CPU)."""
    prompts, params = mixed_requests(4, seed=2)
    for p in params:
        p.max_tokens = min(p.max_tokens or 8, 8)
        p.min_tokens = min(p.min_tokens, 8)
    kw = dict(attention_backend="triton")
    want = summary(run(make_engine(tiny, "off", **kw), prompts, params))
    got = summary(run(make_engine(tiny, "on", **kw), prompts, params))
    assert got == want


def test_a_steps_index_lists_reach_the_device_in_two_copies(tiny, monkeypatch):
    """Triton path: ids, positions, slots, sampled rows and placeholder rows go in one int64 copy, lengths,
    query starts and block tables in one int32 copy, however many lists a step has."""
    import fitllm.memory.transfer as transfer

    calls: list[int] = []
    to_device = transfer.to_device

    def counting(values, dtype, device):
        calls.append(len(values))
        return to_device(values, dtype, device)

    monkeypatch.setattr(transfer, "to_device", counting)
    engine = make_engine(tiny, "on", attention_backend="triton")
    per_step: list[int] = []
    execute = engine.runner.execute

    def counted_execute(out, pending=None):
        calls.clear()
        result = execute(out, pending)
        per_step.append(len(calls) if pending is not None else -1)
        return result

    monkeypatch.setattr(engine.runner, "execute", counted_execute)
    prompts, params = mixed_requests(3, seed=5)
    for p in params:
        p.max_tokens, p.min_tokens = 6, 0
    run(engine, prompts, params)
    with_placeholders = [n for n in per_step if n >= 0]
    assert with_placeholders and set(with_placeholders) == {2}


def test_to_device_packed_returns_views_of_one_buffer():
    import torch

    from fitllm.memory.transfer import to_device_packed

    a, b, c, d = to_device_packed([[1, 2], [], [3], [4, 5, 6]], torch.long, torch.device("cpu"))
    assert [a.tolist(), b.tolist(), c.tolist(), d.tolist()] == [[1, 2], [], [3], [4, 5, 6]]
    assert a.dtype == torch.long and a.untyped_storage().data_ptr() == d.untyped_storage().data_ptr()


def test_status_is_unchanged_after_finishing(tiny):
    """When every request has finished, nothing is left running or held, though a step may be in flight."""
    engine = make_engine(tiny, "on")
    run(engine, [[3, 4, 5]], [SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)])
    assert not engine.has_unfinished_requests()
    assert engine.step() == []  # reads the last step (only dropped tokens) and does nothing else
    assert engine._in_flight is None
    st = engine.status()
    assert st.requests == {"running": 0, "waiting": 0, "swapped": 0} and st.kv_blocks["used"] == 0


def test_penalised_request_that_stops_in_flight_does_not_stall_the_queue(tiny):
    """One seat: A (penalised) stops on a token that is in flight while B waits. The step in flight is read
    before scheduling, so A's seat goes to B in the same step (found by review: it used to raise 'scheduler
    made no progress')."""
    prompt_a, prompt_b = [10, 11, 12, 13, 14], [20, 21, 22]
    probe = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, repetition_penalty=1.3)
    stop_at = summary(run(make_engine(tiny, "off"), [prompt_a], [probe]))[0][0][3]
    params = [
        SamplingParams(temperature=0, max_tokens=20, repetition_penalty=1.3, stop_token_ids=[stop_at]),
        SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
    ]
    want = summary(run(make_engine(tiny, "off", max_num_seqs=1), [prompt_a, prompt_b], params))
    got = summary(run(make_engine(tiny, "on", max_num_seqs=1), [prompt_a, prompt_b], params))
    assert got == want and want[0][2] == "stop" and len(want[0][0]) == 4


@pytest.mark.parametrize("times", [1, 2])
def test_a_step_that_fails_to_queue_leaves_the_step_in_flight(tiny, times):
    """An exception while queueing that no request causes alone (say, out of memory for the whole batch):
    once, it is retried; again, it propagates. Either way the step in flight is kept and read, so the run
    completes with the same output (the retried step draws the same random numbers)."""
    prompts, params = mixed_requests(4, seed=8)
    want = summary(run(make_engine(tiny, "off"), prompts, params))
    engine = make_engine(tiny, "on")
    execute, calls, broken = engine.runner.execute, [], []

    def flaky(sched, pending=None):
        batch = {s.request.request_id for s in sched.scheduled}
        calls.append(batch)
        if len(batch) > 1 and len(broken) < times and (broken or len(calls) == 5) and batch == calls[4]:
            broken.append(1)  # the 5th call's whole batch fails, `times` times; its parts never do
            raise RuntimeError("injected")
        return execute(sched, pending)

    engine.runner.execute = flaky
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params, strict=True)]
    done, failures = {}, 0
    while engine.has_unfinished_requests():
        try:
            outs = engine.step()
        except RuntimeError as exc:
            assert str(exc) == "injected"
            failures += 1
            continue
        done.update({o.request_id: o for o in outs if o.finished})
        engine.check_integrity()
    assert (len(broken), failures) == (times, times - 1)
    assert summary({i: done[r] for i, r in enumerate(rids)}) == want


def test_step_time_excludes_the_host_work_queued_after_it(tiny, monkeypatch):
    """The preemption cost model learns prefill speed from each step's time. With a step in flight, reading
    it happens after the next one is queued; its time must stop when it was queued (CPU), not when read."""
    import fitllm.engine.step_state as step_state

    clock = iter(range(0, 10_000, 5))  # every reading of the clock advances it by 5 "seconds"
    monkeypatch.setattr(step_state, "perf_counter", lambda: float(next(clock)))
    engine = make_engine(tiny, "on")
    seen = []
    prompt = [[3, 4, 5, 6]]
    params = [SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)]
    run(engine, prompt, params, on_step=lambda e: seen.append(e.last_step and e.last_step.seconds))
    assert seen[0] is None and seen[1:] == [5.0] * 4  # one tick: queued, never the reads after


def test_step_timer_waits_only_for_steps_whose_samples_are_read(monkeypatch):
    """On CUDA a step's time comes from events. Reading a sampled step has already waited for it; a step
    without samples (a prefill chunk) must not make the host wait, so its time is skipped if not done."""
    import torch

    from fitllm.engine.step_state import StepTimer

    log: list[str] = []

    class FakeEvent:  # torch.cuda.Event's interface, on CPU
        def __init__(self, enable_timing: bool = False) -> None:
            self.done = False

        def record(self) -> None:
            log.append("record")

        def query(self) -> bool:
            return self.done

        def synchronize(self) -> None:
            log.append("synchronize")
            self.done = True

        def elapsed_time(self, end: FakeEvent) -> float:
            return 250.0  # ms

    monkeypatch.setattr(torch.cuda, "Event", FakeEvent)
    timer = StepTimer(torch.device("cuda"))
    timer.stop()
    assert timer.seconds(wait=False) is None and "synchronize" not in log  # still running: skipped
    assert timer.seconds(wait=True) == 0.25 and log.count("synchronize") == 1
    assert timer.seconds(wait=False) == 0.25  # finished: read without waiting again
