"""One request's failure is its own (invariant 6): a request whose rows make a step raise fails alone, with
an error in the API's own shape, while the others run on with the output they would have had without it
(greedy text identical), the pool stays consistent, and the engine keeps serving. Numeric fields are bounded
at validation (so the overflowing top_k of issue 22 is a 400), and lenient inputs are refused.

The failure is injected by a test-only hook (`poison`): the sampler raises whenever a poisoned request's row
is in the batch it samples, after a given number of its tokens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from conftest import make_random_checkpoint, run_all
from live_server import Served, assert_error, serve

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine, RequestFailed
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams

POISON_TOKEN = 250  # a prompt that starts with this token id ("t250") is poisoned
GREEDY = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
PROMPTS = [[5, 17, 33, 9, 41], [7] * 19, list(range(60, 90)), [3, 99, 12]]


class Poison(RuntimeError):
    """The injected failure."""


def poison(engine: Engine, after_tokens: int = 0, delay_s: float = 0.0) -> list[int]:
    """Make the engine's sampler raise when a request whose prompt starts with POISON_TOKEN samples, once
    it has `after_tokens` output tokens; `delay_s` slows every sampling call (so that HTTP streams overlap).
    Returns a list that records the batch size of every sampling call that raised."""
    sample, failures = engine.sampler.sample, []

    def hooked(logits, requests):
        if delay_s:
            time.sleep(delay_s)
        if any(
            r.prompt_token_ids[0] == POISON_TOKEN and r.num_output_tokens >= after_tokens for r in requests
        ):
            failures.append(len(requests))
            raise Poison("injected failure")
        return sample(logits, requests)

    engine.sampler.sample = hooked
    return failures


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("iso"), family="llama")


def config(folder, **kw) -> EngineConfig:
    return EngineConfig(
        model=str(folder), dtype="float32", max_model_len=128, profile_workspace=False, block_size=8, **kw
    )


@pytest.fixture(scope="module")
def reference(folder) -> list[list[int]]:
    """Greedy token ids of PROMPTS without any poison."""
    return run_all(Engine(config(folder)), PROMPTS, params=GREEDY)


# ---- Engine ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
@pytest.mark.parametrize("after_tokens", [0, 3], ids=["in_prefill", "mid_decode"])
def test_a_failing_request_fails_alone_in_the_engine(folder, reference, async_scheduling, after_tokens):
    engine = Engine(config(folder, async_scheduling=async_scheduling))
    failures = poison(engine, after_tokens)
    bad = engine.add_request([POISON_TOKEN, 8, 9, 10], GREEDY)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    done, failed = {}, []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                failed.append(out)
            elif out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
    assert failures[0] == len(PROMPTS) + 1  # it was batched with everyone when it broke the step
    assert [o.request_id for o in failed] == [bad]
    assert isinstance(failed[0].error, Poison) and failed[0].outputs[0].finish_reason == "error"
    assert failed[0].finished and len(failed[0].outputs[0].token_ids) == after_tokens
    assert [done[i] for i in ids] == reference
    # Still serving, and everything was given back.
    assert engine.pool.num_used_blocks == 0
    assert run_all(engine, PROMPTS[:1], params=GREEDY) == reference[:1]
    with pytest.raises(Poison):
        list(engine.stream([POISON_TOKEN, 1], GREEDY))


def test_two_failing_requests_and_a_lone_one(folder, reference):
    engine = Engine(config(folder))
    poison(engine)
    bad = [engine.add_request([POISON_TOKEN, t], GREEDY) for t in (4, 6)]
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    failed, done = set(), {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.error is not None:
                failed.add(out.request_id)
            elif out.finished:
                done[out.request_id] = out.outputs[0].token_ids
        engine.check_integrity()
    assert failed == set(bad) and [done[i] for i in ids] == reference
    # A request that fails alone is its own fault too.
    (out,) = [o for o in _drain(engine, [POISON_TOKEN, 3]) if o.finished]
    assert isinstance(out.error, Poison)


def _drain(engine: Engine, prompt: list[int]) -> list:
    engine.add_request(prompt, GREEDY)
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
    return outs


def test_an_error_reading_one_sample_fails_that_request_alone(folder, reference):
    """A failure after the step (its token's text: here the detokenizer) also stays with its request."""
    engine = Engine(config(folder))
    bad = engine.add_request([POISON_TOKEN, 5], GREEDY)
    ids = [engine.add_request(p, GREEDY) for p in PROMPTS]
    detok = engine.requests[bad].detokenizer

    def broken(token, check_stop):
        raise Poison("detokenizer")

    detok.add_token = broken
    outs = []
    while engine.has_unfinished_requests():
        outs += engine.step()
        engine.check_integrity()
    assert [o.request_id for o in outs if o.error is not None] == [bad]
    assert [
        next(o for o in outs if o.finished and o.request_id == i).outputs[0].token_ids for i in ids
    ] == reference


# ---- AsyncEngine -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def started(folder, hook) -> Iterator[AsyncEngine]:
    """An AsyncEngine whose Engine gets `hook(engine)` once built."""

    def factory(cfg: EngineConfig) -> Engine:
        engine = Engine(cfg)
        hook(engine)
        return engine

    async_engine = AsyncEngine(config(folder), engine_factory=factory).start()
    try:
        async_engine.wait_ready(60)
        yield async_engine
    finally:
        async_engine.shutdown()


def generate_all(async_engine: AsyncEngine, prompts) -> list:
    """Each prompt's greedy token ids, or the exception its stream raised (all run concurrently)."""

    async def run(prompt):
        tokens = []
        async for out in async_engine.generate(prompt, GREEDY):
            tokens = out.outputs[0].token_ids
        return tokens

    async def main():
        return await asyncio.gather(*(run(p) for p in prompts), return_exceptions=True)

    return asyncio.run(main())


def test_async_engine_ends_only_the_failing_stream(folder, reference):
    with started(folder, lambda engine: poison(engine, after_tokens=2)) as async_engine:
        *texts, failure = generate_all(async_engine, [*PROMPTS, [POISON_TOKEN, 5, 6]])
        assert isinstance(failure, RequestFailed) and isinstance(failure.__cause__, Poison)
        assert texts == reference
        assert generate_all(async_engine, PROMPTS[:1]) == reference[:1]  # still serving
        assert async_engine.counters.requests_finished.get("error") == 1
        engine = async_engine.engine
        assert not engine.has_unfinished_requests() and engine.pool.num_used_blocks == 0
        engine.check_integrity()


def test_an_engine_fault_fails_what_is_in_flight_and_the_engine_serves_on(folder, reference):
    """A failure no request causes (here: scheduling itself) ends every stream in flight with an error,
    never silently, and the next requests are served."""

    def break_third_schedule(engine: Engine) -> None:
        schedule, calls = engine.scheduler.schedule, []

        def broken_once():
            calls.append(1)
            if len(calls) == 3:
                raise RuntimeError("scheduler bug")
            return schedule()

        engine.scheduler.schedule = broken_once

    with started(folder, break_third_schedule) as async_engine:
        failures = generate_all(async_engine, PROMPTS[:2])
        assert all(isinstance(f, RequestFailed) and "scheduler bug" in str(f) for f in failures), failures
        assert generate_all(async_engine, PROMPTS) == reference
        async_engine.engine.check_integrity()


# ---- through real HTTP -----------------------------------------------------------------------------------

OTHERS = ["t5 t17 t33 t9 t41", "t7 t7 t7 t7 t7 t7 t7", "t60 t61 t62 t63 t64 t65"]
C = "/v1/completions"


@pytest.fixture(scope="module")
def server(folder) -> Iterator[Served]:
    """The tiny model behind a real server; prompts that start with "t250" break every step they are in,
    and each sampling call takes 5 ms more (so that streams overlap)."""

    def factory(cfg: EngineConfig) -> Engine:
        engine = Engine(cfg)
        poison(engine, after_tokens=1, delay_s=0.005)
        return engine

    with serve(AsyncEngine(config(folder, max_num_seqs=8), engine_factory=factory), "tiny") as s:
        yield s


def stream_body(prompt: str) -> dict:
    return {"prompt": prompt, "max_tokens": 40, "temperature": 0, "ignore_eos": True, "stream": True}


def sse_lines(url: str, path: str, body: dict, started: threading.Event | None = None) -> list[str]:
    """The non-empty lines of an SSE response (`started` is set once its first event arrived)."""
    lines = []
    with httpx.stream("POST", url + path, json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line:
                lines.append(line)
                if started is not None:
                    started.set()
    return lines


def completion_text(lines: list[str]) -> str:
    assert lines[-1] == "data: [DONE]", f"the stream was cut: {lines[-3:]}"
    chunks = [json.loads(line.removeprefix("data: ")) for line in lines[:-1]]
    return "".join(c["choices"][0]["text"] for c in chunks)


def with_others_running(url: str, poison_calls) -> tuple[list[str], list]:
    """Start a stream for each of OTHERS, wait until each has sent an event, run `poison_calls` (functions
    of the url) meanwhile, then return the others' texts and what each poison call returned."""
    results: list = [None] * len(OTHERS)
    started = [threading.Event() for _ in OTHERS]

    def run(i):
        results[i] = sse_lines(url, C, stream_body(OTHERS[i]), started[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(OTHERS))]
    for t in threads:
        t.start()
    for e in started:
        assert e.wait(30)
    answers = [call(url) for call in poison_calls]
    for t in threads:
        t.join(60)
    return [completion_text(lines) for lines in results], answers


@pytest.fixture(scope="module")
def alone(server) -> list[str]:
    """The others' greedy texts, each run alone."""
    return [completion_text(sse_lines(server.url, C, stream_body(p))) for p in OTHERS]


def test_overflowing_top_k_is_a_400_and_hurts_no_one(server, alone):
    body = {"prompt": "Poison", "max_tokens": 4, "temperature": 1, "top_k": 1180591620717411303424}
    texts, (answer,) = with_others_running(
        server.url, [lambda url: httpx.post(url + C, json=body, timeout=60)]
    )
    assert assert_error(answer, 400)["param"] == "top_k"
    assert texts == alone
    # A top_k past the vocabulary is off: the same text as without it.
    plain = {"prompt": "t3 t4", "max_tokens": 6, "temperature": 1, "seed": 3}
    cut = httpx.post(server.url + C, json=plain | {"top_k": 10**6}, timeout=60).json()["choices"][0]["text"]
    assert cut == httpx.post(server.url + C, json=plain, timeout=60).json()["choices"][0]["text"]


def test_a_request_that_breaks_its_step_fails_alone_in_the_apis_shape(server, alone):
    poisoned = {"prompt": "t250 t9 t8", "max_tokens": 8, "temperature": 0}
    kobold = {"prompt": "t250 t9 t8", "max_length": 8, "temperature": 0}
    studio = {"story": "t250 t9 t8", "settings": {"temperature": 0, "max_new_tokens": 8}}
    calls = [
        lambda url: sse_lines(url, C, poisoned | {"stream": True}),
        lambda url: httpx.post(url + C, json=poisoned, timeout=60),
        lambda url: httpx.post(url + "/api/v1/generate", json=kobold, timeout=60),
        lambda url: sse_lines(url, "/api/extra/generate/stream", kobold),
        lambda url: sse_lines(url, "/studio/api/generate", studio),
    ]
    texts, (stream, plain, kobold_plain, kobold_stream, studio_stream) = with_others_running(
        server.url, calls
    )
    assert texts == alone
    # OpenAI stream: its first token, then an error event and [DONE] (as vLLM ends a failed stream).
    assert stream[-1] == "data: [DONE]"
    error = json.loads(stream[-2].removeprefix("data: "))["error"]
    assert error["code"] == "request_failed" and "injected failure" in error["message"]
    assert json.loads(stream[0].removeprefix("data: "))["choices"][0]["text"]
    assert assert_error(plain, 500)["code"] == "request_failed"
    assert kobold_plain.status_code == 500 and "injected failure" in kobold_plain.json()["detail"]["msg"]
    # Kobold stream: KoboldCpp has no error event, so its last message event ends it with the error beside.
    assert kobold_stream[-2] == "event: message"
    last = json.loads(kobold_stream[-1].removeprefix("data: "))
    assert last["finish_reason"] == "error" and "injected failure" in last["detail"]["msg"]
    studio_last = json.loads(studio_stream[-1].removeprefix("data: "))
    assert studio_last["done"] is True and "injected failure" in studio_last["error"]["message"]
    # The official client raises on the error event.
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.APIError, match="injected failure"):
        for _ in client.completions.create(model="tiny", prompt="t250 t1", max_tokens=4, stream=True):
            pass
    # Still serving, and nothing leaked.
    again = httpx.post(server.url + C, json=stream_body(OTHERS[0]) | {"stream": False}, timeout=60)
    assert again.json()["choices"][0]["text"] == alone[0]
    engine = server.engine.engine
    deadline = time.monotonic() + 10
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.02)
    engine.check_integrity()
    assert engine.pool.num_used_blocks == 0


# ---- numeric bounds and lenient input --------------------------------------------------------------------

K = "/api/v1/generate"
OK = {"prompt": "t3 t4", "max_tokens": 2}
KOK = {"prompt": "t3 t4", "max_length": 2}
NUMERIC = [
    ("max_tokens_string", C, OK | {"max_tokens": "4"}, 400, "max_tokens"),
    ("max_tokens_float", C, OK | {"max_tokens": 3.0}, 400, "max_tokens"),
    ("max_tokens_bool", C, OK | {"max_tokens": True}, 400, "max_tokens"),
    ("max_tokens_2_70", C, OK | {"max_tokens": 2**70}, 400, "max_tokens"),
    ("max_completion_tokens_float", CHAT := "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "t3"}], "max_completion_tokens": 2.0}, 400, "max_completion_tokens"),
    ("min_tokens_2_70", C, OK | {"min_tokens": 2**70, "max_tokens": None}, 400, "min_tokens"),
    ("min_tokens_past_context", C, OK | {"min_tokens": 1000, "max_tokens": None}, 400, "min_tokens"),
    ("min_tokens_string", C, OK | {"min_tokens": "1"}, 400, "min_tokens"),
    ("top_k_2_70", C, OK | {"top_k": 2**70}, 400, "top_k"),
    ("top_k_2_63", C, OK | {"top_k": 2**63}, 400, "top_k"),
    ("top_k_past_vocab_is_off", C, OK | {"top_k": 10**6}, 200, None),
    ("top_k_minus_one_is_off", C, OK | {"top_k": -1}, 200, None),
    ("top_k_minus_two", C, OK | {"top_k": -2}, 400, "top_k"),
    ("top_k_float", C, OK | {"top_k": 5.0}, 400, "top_k"),
    ("n_bool", C, OK | {"n": True}, 400, "n"),
    ("n_string", C, OK | {"n": "2"}, 400, "n"),
    ("seed_string", C, OK | {"seed": "5"}, 400, "seed"),
    ("seed_2_64", C, OK | {"seed": 2**64}, 400, "seed"),
    ("seed_plus_choice_overflows", C, OK | {"seed": 2**63 - 1, "n": 2}, 400, "seed"),
    ("logprobs_bool", C, OK | {"logprobs": True}, 400, "logprobs"),
    ("logprobs_21", C, OK | {"logprobs": 21}, 400, "logprobs"),
    ("top_logprobs_2_70", CHAT,
     {"messages": [{"role": "user", "content": "t3"}], "logprobs": True, "top_logprobs": 2**70}, 400, "logprobs"),
    ("temperature_string", C, OK | {"temperature": "0.5"}, 400, "temperature"),
    ("temperature_bool", C, OK | {"temperature": True}, 400, "temperature"),
    ("temperature_int_is_fine", C, OK | {"temperature": 1}, 200, None),
    ("stop_token_ids_string", C, OK | {"stop_token_ids": ["1"]}, 400, "stop_token_ids.0"),
    ("kobold_max_context_length_0", K, KOK | {"max_context_length": 0}, 400, "max_context_length"),
    ("kobold_nan_temperature", K, '{"prompt": "t3", "max_length": 2, "temperature": NaN}', 400, "temperature"),
    ("kobold_inf_temperature", K, '{"prompt": "t3", "max_length": 2, "temperature": Infinity}', 400, "temperature"),
    ("kobold_nan_top_p", K, '{"prompt": "t3", "max_length": 2, "top_p": NaN}', 400, "top_p"),
    ("kobold_nan_min_p", K, '{"prompt": "t3", "max_length": 2, "min_p": NaN}', 400, "min_p"),
    ("kobold_nan_logit_bias", K, '{"prompt": "t3", "max_length": 2, "logit_bias": {"5": NaN}}', 400, "logit_bias"),
    ("kobold_top_k_2_70", K, KOK | {"top_k": 2**70}, 400, "top_k"),
    ("kobold_top_k_past_vocab_is_off", K, KOK | {"top_k": 10**6}, 200, None),
    ("kobold_rep_pen_range_2_70", K, KOK | {"rep_pen_range": 2**70}, 400, "rep_pen_range"),
    ("kobold_sampler_seed_2_70", K, KOK | {"sampler_seed": 2**70}, 400, "sampler_seed"),
    ("kobold_max_length_2_70_is_capped", K, KOK | {"max_length": 2**70}, 200, None),
]  # fmt: skip


@pytest.mark.parametrize("name,path,body,status,param", NUMERIC, ids=[row[0] for row in NUMERIC])
def test_numeric_bounds_and_lenient_input(server, name, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(
        server.url + path, content=content, headers={"content-type": "application/json"}, timeout=60
    )
    if status == 200:
        assert r.status_code == 200, r.text
        return
    assert assert_error(r, status)["param"] == param, r.text
    if path == K:  # KoboldCpp's own shape beside it
        assert r.json()["detail"]["msg"] == r.json()["error"]["message"]
