"""End to end on the real default model (SmolLM2-135M, float32 on CPU).

The reference for every comparison is the same engine running the prompt alone (greedy), so the tests
check that batching, chunked prefill, preemption and prefix caching do not change what a request computes.
Engines are module-scoped: loading one costs a few seconds.
"""

from __future__ import annotations

import pytest
import torch
from stand_ins import LogitsTap

from benchmarks.workload import DEFAULT_TEXT
from fitllm import SamplingParams
from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import RequestStatus

BLOCK_BYTES = 30 * 2 * 3 * 64 * 4 * 16  # one 16-token float32 block of the default model: 737280 B
MAX_MODEL_LEN = 512
BOOK = DEFAULT_TEXT  # ../shared beside the repository, as CI lays it out
PROMPT_LENS = [5, 17, 31, 48, 64, 100, 177, 300]  # crossing 16-token block boundaries
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def make_engine(**kw) -> Engine:
    # The dequantized model these tests were written on (auto would run the GGUF's int4 codes, whose float32
    # path dequantizes every call: 5x slower here, and int4 has its own tests).
    cfg = dict(
        dtype="float32", quantization="none", max_model_len=MAX_MODEL_LEN, kv_cache_memory=300 * BLOCK_BYTES
    )
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def run(engine: Engine, prompts, params=GREEDY) -> list:
    """Add all prompts, step until done with integrity checks after every step; outputs in prompt order."""
    params_list = params if isinstance(params, list) else [params] * len(prompts)
    rids = [engine.add_request(p, sp) for p, sp in zip(prompts, params_list)]
    done = {}
    steps = 0
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                assert out.request_id not in done
                done[out.request_id] = out
        engine.check_integrity()
        assert len(engine.scheduler.running) <= engine.config.max_num_seqs
        steps += 1
        assert steps < 5000
    assert set(done) == set(rids)
    assert engine.pool.num_used_blocks == 0
    return [done[r] for r in rids]


def tokens_of(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.fixture(scope="module")
def engine() -> Engine:
    return make_engine()


@pytest.fixture(scope="module")
def book_ids(engine) -> list[int]:
    text = BOOK.read_text(encoding="utf-8")
    start = text.index("No one would have believed")
    return engine.tokenizer.encode(text[start : start + 40_000])


@pytest.fixture(scope="module")
def prompts(book_ids) -> list[list[int]]:
    # Different places in the book, so the prompts share no prefix.
    return [book_ids[i * 400 : i * 400 + n] for i, n in enumerate(PROMPT_LENS)]


@pytest.fixture(scope="module")
def alone(engine, prompts) -> list[list[int]]:
    """Each prompt's greedy tokens when it is the only request."""
    out = []
    for p in prompts:
        (res,) = run(engine, [p])
        assert res.outputs[0].finish_reason == "length"
        assert len(res.outputs[0].token_ids) == 24
        out.append(res.outputs[0].token_ids)
    return out


# ---- batch invariance ------------------------------------------------------------------------------------


def test_prompt_lengths(prompts):
    assert [len(p) for p in prompts] == PROMPT_LENS


def test_batch_of_eight_matches_alone(engine, prompts, alone):
    order = [3, 7, 0, 5, 1, 6, 2, 4]  # position in the batch does not follow length
    engine.reset_prefix_cache()  # no help from the runs alone
    hits = engine.kv.prefix_hits
    outs = run(engine, [prompts[i] for i in order])
    assert engine.kv.prefix_hits == hits
    assert tokens_of(outs) == [alone[i] for i in order]


def test_chunked_prefill_matches_alone(prompts, alone):
    eng = make_engine(max_num_batched_tokens=32)
    plans = []
    orig = eng.scheduler.schedule

    def spy():
        out = orig()
        assert out.num_tokens <= 32
        plans.append([s.num_new_tokens for s in out.scheduled])
        return out

    eng.scheduler.schedule = spy
    assert tokens_of(run(eng, prompts)) == alone
    assert any(len(p) > 1 and max(p) > 1 for p in plans)  # prefills really were cut and mixed
    assert max(sum(p) for p in plans) == 32


@pytest.fixture(scope="module")
def tiny_engine() -> Engine:
    return make_engine(kv_cache_memory=24 * BLOCK_BYTES)


def test_preemption_matches_alone(tiny_engine, prompts, alone):
    assert tiny_engine.pool.num_blocks == 24
    before = tiny_engine.scheduler.num_preemptions
    assert tokens_of(run(tiny_engine, prompts)) == alone
    assert tiny_engine.scheduler.num_preemptions > before


def test_prefix_cache_hit_matches_alone(engine, prompts, alone):
    engine.reset_prefix_cache()
    hits_before = engine.kv.prefix_hits
    p = prompts[6]  # 177 tokens: 11 full blocks
    first = engine.add_request(p, GREEDY)
    engine.step()  # computes (and caches) the whole prompt
    engine.check_integrity()
    again = engine.add_request(p, GREEDY)
    longer = engine.add_request(p + prompts[0], GREEDY)
    other = engine.add_request(prompts[2], GREEDY)
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        engine.check_integrity()
    assert done[first].num_cached_tokens == 0
    assert done[again].num_cached_tokens == len(p) // 16 * 16
    assert done[longer].num_cached_tokens == len(p) // 16 * 16
    assert done[other].num_cached_tokens == 0
    assert engine.kv.prefix_hits - hits_before == 2 * (len(p) // 16 * 16)
    assert done[first].outputs[0].token_ids == done[again].outputs[0].token_ids == alone[6]
    assert done[other].outputs[0].token_ids == alone[2]
    assert engine.pool.num_used_blocks == 0


def test_seeded_sampling_independent_of_batch(engine, prompts):
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=10, ignore_eos=True)
    (solo,) = run(engine, [prompts[3]], seeded)
    others = [
        SamplingParams(temperature=1.0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.7, top_k=20, seed=7, max_tokens=12, ignore_eos=True),
    ]
    mixed = run(
        engine, [prompts[0], prompts[3], prompts[5], prompts[7]], [others[0], seeded, others[1], others[2]]
    )
    assert solo.outputs[0].token_ids == mixed[1].outputs[0].token_ids
    other_seed = SamplingParams(temperature=0.9, top_p=0.95, seed=4321, max_tokens=10, ignore_eos=True)
    # Reversed order, and another seed beside it in the same batch.
    rev = run(engine, [prompts[3], prompts[7], prompts[3]], [other_seed, others[2], seeded])
    assert rev[2].outputs[0].token_ids == solo.outputs[0].token_ids
    assert rev[0].outputs[0].token_ids != solo.outputs[0].token_ids


# ---- streaming, stop conditions, abort ----------------------------------------------------------------------


def test_stream_deltas_build_the_final_text(engine, prompts, alone):
    texts, deltas, delta_ids = [], [], []
    last = None
    for out in engine.stream(prompts[4], GREEDY):
        c = out.outputs[0]
        if texts:
            assert c.text.startswith(texts[-1])
        texts.append(c.text)
        deltas.append(c.delta_text)
        assert c.text == "".join(deltas)
        delta_ids.extend(c.delta_token_ids)
        last = out
        engine.check_integrity()
    assert last.finished
    assert "".join(deltas) == last.outputs[0].text
    assert delta_ids == last.outputs[0].token_ids == alone[4]
    assert last.outputs[0].text == engine.tokenizer.decode(alone[4])
    assert engine.pool.num_used_blocks == 0


def test_stream_with_stop_string(engine, prompts, alone):
    full = engine.tokenizer.decode(alone[4])
    # A stop string in the middle of the greedy text, starting mid-word where possible.
    mid = len(full) // 2
    stop = full[mid : mid + 6]
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])
    expected = full[: full.index(stop)]
    deltas, last = [], None
    for out in engine.stream(prompts[4], params):
        deltas.append(out.outputs[0].delta_text)
        last = out
        assert expected.startswith("".join(deltas))  # no part of the stop string is ever streamed
        # The cumulative text only grows towards the final text: it never shows (then takes back) characters
        # of the stop string, and it is exactly what the deltas delivered so far.
        assert expected.startswith(out.outputs[0].text), "cumulative text shows part of the stop string"
        assert out.outputs[0].text == "".join(deltas)
    c = last.outputs[0]
    assert c.text == expected == "".join(deltas)
    assert c.finish_reason == "stop" and c.stop_reason == stop
    assert c.token_ids == alone[4][: len(c.token_ids)]
    assert engine.pool.num_used_blocks == 0


def test_min_tokens_defers_stop_strings_without_cutting_text(engine, prompts, alone):
    """Before min_tokens, a stop string must not end the request, nor be cut out of the text."""
    full = engine.tokenizer.decode(alone[4])
    early = engine.tokenizer.decode(alone[4][:4])
    stop = early[-3:]  # completes within the first four tokens
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24, ignore_eos=True, stop=[stop])
    (out,) = run(engine, [prompts[4]], params)
    c = out.outputs[0]
    assert c.token_ids == alone[4]
    assert c.finish_reason == "length"
    assert c.text == full


def test_a_stop_string_on_the_last_token_is_the_reason(engine, prompts, alone):
    """The scheduler ends a request by max_tokens or a stop token id before the output stage reads its text;
    a stop string that same token completes is still the reason given, and the text is cut there."""
    ids = alone[4]
    texts = [engine.tokenizer.decode(ids[:k]) for k in range(len(ids) + 1)]
    k = next(k for k in range(3, len(ids)) if texts[k].find(texts[k][-3:]) == len(texts[k]) - 3)
    stop, first = texts[k][-3:], ids.index(ids[k - 1])
    for params in (
        SamplingParams(temperature=0, max_tokens=k, ignore_eos=True, stop=[stop]),
        SamplingParams(
            temperature=0, max_tokens=24, ignore_eos=True, stop=[stop], stop_token_ids=[ids[k - 1]]
        ),
    ):
        (out,) = run(engine, [prompts[4]], params)
        c = out.outputs[0]
        if params.stop_token_ids and first < k - 1:
            continue  # the stop token came earlier: nothing to compare
        assert c.token_ids == ids[:k]
        assert (c.finish_reason, c.stop_reason) == ("stop", stop)
        assert c.text == texts[k][:-3]
    assert engine.pool.num_used_blocks == 0


def test_stop_token_ids_and_eos(engine, prompts, alone):
    target = alone[2][5]
    first = alone[2].index(target)
    (out,) = run(
        engine,
        [prompts[2]],
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop_token_ids=[target]),
    )
    c = out.outputs[0]
    assert c.token_ids == alone[2][: first + 1]
    assert c.finish_reason == "stop" and c.stop_reason == target
    eos = engine.tokenizer.eos_token_ids[0]
    (out,) = run(engine, [prompts[2]], SamplingParams(temperature=0, max_tokens=24, logit_bias={eos: 100.0}))
    assert out.outputs[0].token_ids == [eos]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text == ""


def test_logprobs_through_engine(engine, prompts, alone):
    (out,) = run(
        engine, [prompts[1]], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=2)
    )
    c = out.outputs[0]
    assert c.token_ids == alone[1]
    assert len(c.logprobs) == 24
    for tok, entry in zip(c.token_ids, c.logprobs):
        assert entry[tok].rank == 1  # greedy takes the most likely token
        assert entry[tok].logprob <= 0
        assert {lp.rank for lp in entry.values()} == {1, 2}
    assert c.cumulative_logprob == pytest.approx(sum(e[t].logprob for t, e in zip(c.token_ids, c.logprobs)))


def test_captured_logits_are_raw(engine, prompts):
    """The logits tap keeps the model's logits, untouched by the request's penalties and biases."""
    with LogitsTap(engine) as tap:
        captured = []
        for params in (
            SamplingParams(temperature=0, max_tokens=1),
            SamplingParams(temperature=0, max_tokens=1, logit_bias={7: 50.0}, repetition_penalty=1.8),
        ):
            engine.reset_prefix_cache()
            rid = engine.add_request(prompts[1], params)
            while engine.has_unfinished_requests():
                engine.step()
            captured.append(tap.last[rid])
        raw, biased_run = captured
        assert torch.equal(raw, biased_run)


def test_abort_mid_generation_frees_blocks(engine, prompts):
    long_run = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    a = engine.add_request(prompts[6], long_run)
    b = engine.add_request(prompts[7], long_run)
    for _ in range(3):
        engine.step()
        engine.check_integrity()
    assert engine.pool.num_used_blocks > 0
    used_both = engine.pool.num_used_blocks
    assert engine.abort(a)
    engine.check_integrity()
    assert 0 < engine.pool.num_used_blocks < used_both
    assert not engine.abort(a)  # already gone
    assert not engine.abort("no-such-request")
    outs = engine.step()
    engine.check_integrity()
    aborted = [o for o in outs if o.request_id == a]
    assert len(aborted) == 1 and aborted[0].finished
    assert aborted[0].outputs[0].finish_reason == "abort"
    assert engine.abort(b)
    engine.check_integrity()
    assert engine.pool.num_used_blocks == 0
    assert engine.has_unfinished_requests()  # b's final output is still to be returned
    assert [(o.request_id, o.finished) for o in engine.step()] == [(b, True)]
    assert not engine.has_unfinished_requests()


def test_abort_waiting_request(tiny_engine, prompts):
    eng = tiny_engine
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    first = eng.add_request(prompts[7], params)  # 300 tokens: most of the 24 blocks
    second = eng.add_request(prompts[6], params)  # cannot be admitted alongside
    eng.step()
    eng.check_integrity()
    assert second in [r.request_id for r in eng.scheduler.waiting]
    assert eng.abort(second)
    assert eng.abort(first)
    eng.step()
    eng.check_integrity()
    assert eng.pool.num_used_blocks == 0 and not eng.has_unfinished_requests()


# ---- priorities ---------------------------------------------------------------------------------------------


def test_low_priority_request_is_preempted(tiny_engine, prompts, alone):
    """Three requests needing 6 + 8 + 13 blocks of a 24-block pool. The low-priority one arrives first
    (the oldest): it is still the one preempted, and every output equals its run alone."""
    eng = tiny_engine
    eng.reset_prefix_cache()
    order = [6, 4, 5]  # prompt index, in arrival order
    priorities = [5, 0, 0]
    rids = [eng.add_request(prompts[i], GREEDY, priority=prio) for i, prio in zip(order, priorities)]
    reqs = [eng.requests[r] for r in rids]
    done = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        eng.check_integrity()
    assert reqs[0].num_preemptions > 0, "the pool was meant to be too small for all three"
    assert reqs[1].num_preemptions == 0 and reqs[2].num_preemptions == 0
    assert [done[r].outputs[0].token_ids for r in rids] == [alone[i] for i in order]


# ---- input errors -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        [],
        [49152],
        [5, -1],
        [1] * MAX_MODEL_LEN,
        [1] * (MAX_MODEL_LEN + 100),
    ],
    ids=["empty-text", "empty-ids", "oov", "negative", "at-max-len", "over-max-len"],
)
def test_bad_prompts_raise_value_error(engine, prompt):
    n = len(engine.requests)
    with pytest.raises(ValueError):
        engine.add_request(prompt, GREEDY)
    assert len(engine.requests) == n
    assert not engine.has_unfinished_requests()
    engine.check_integrity()


def test_text_prompt_over_max_len_raises(engine, book_ids):
    text = engine.tokenizer.decode(book_ids[:700])
    with pytest.raises(ValueError):
        engine.add_request(text, GREEDY)


def test_request_that_can_never_fit_the_pool_raises(tiny_engine, prompts):
    # 300 prompt tokens + 200 new ones need 32 blocks; the pool has 24.
    with pytest.raises(ValueError):
        tiny_engine.add_request(prompts[7], SamplingParams(max_tokens=200))
    assert not tiny_engine.has_unfinished_requests()


def test_duplicate_request_id_raises(engine, prompts):
    engine.add_request(prompts[0], GREEDY, request_id="dup")
    try:
        with pytest.raises(ValueError):
            engine.add_request(prompts[1], GREEDY, request_id="dup")
    finally:
        engine.abort("dup")
        engine.step()
    assert engine.pool.num_used_blocks == 0


def test_min_tokens_never_runs_past_max_model_len(engine, book_ids):
    """min_tokens may not push a request past max_model_len: it finishes with 'length' at the limit."""
    prompt = book_ids[:505]
    params = SamplingParams(temperature=0, max_tokens=10, min_tokens=10, ignore_eos=True)
    rid = engine.add_request(prompt, params)
    req = engine.requests[rid]
    try:
        final = None
        for _ in range(20):
            for out in engine.step():
                if out.request_id == rid and out.finished:
                    final = out
            engine.check_integrity()
            if final is not None:
                break
        assert final is not None
        assert final.outputs[0].finish_reason == "length"
        assert len(prompt) + len(final.outputs[0].token_ids) <= MAX_MODEL_LEN
    finally:
        if req.status is not RequestStatus.FINISHED_LENGTH:
            engine.abort(rid)
            engine.step()
        assert engine.pool.num_used_blocks == 0


def test_aborting_the_last_request_still_yields_its_final_output(engine):
    """`while has_unfinished_requests(): step()` sees every request finish, an aborted last one included."""
    from fitllm.engine.request import SamplingParams

    rid = engine.add_request("The Martians", SamplingParams(temperature=0, max_tokens=50, ignore_eos=True))
    engine.step()
    assert engine.abort(rid)
    finals = []
    while engine.has_unfinished_requests():
        finals += [o for o in engine.step() if o.finished]
    assert [(o.request_id, o.outputs[0].finish_reason) for o in finals] == [(rid, "abort")]
