"""Banned strings on the real default model (SmolLM2-135M): greedy decoding with the phrase it would write
banned never writes it, the rewound K/V blocks go back to the pool, other requests in the batch are
untouched, and neither the KoboldCpp stream nor the OpenAI stream ever shows the phrase."""

from __future__ import annotations

import json
import re

import httpx
import pytest
from conftest import run_streamed
from live_server import serve

from fitllm import SamplingParams
from fitllm.config import EngineConfig, cdiv
from fitllm.engine.async_engine import AsyncEngine
from fitllm.engine.engine import Engine
from fitllm.server.app import default_model_name

PROMPT = "Once upon a time, there was a little girl who"
OTHERS = ["The capital of France is", "def fibonacci(n):", "My favourite food is", "In 1969, the first"]
PHRASE = "Big Imagination and loved to create"  # what it writes: "...She had a big imagination and loved..."


def run(engine: Engine, prompts, params):
    outs, deltas = run_streamed(engine, prompts, params)
    return [o.outputs[0] for o in outs], deltas, [o.request_id for o in outs]


def test_greedy_never_writes_the_banned_phrase_and_gives_its_blocks_back():
    engine = Engine(
        EngineConfig(dtype="float32", quantization="none", max_model_len=256, block_size=4, max_num_seqs=8)
    )
    greedy = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    prompts = [PROMPT, *OTHERS]
    free, _, _ = run(engine, prompts, [greedy] * len(prompts))
    assert PHRASE.lower() in free[0].text.lower()

    rewinds = []
    orig = engine.scheduler.rewind

    def spy(req, num_tokens):
        before = len(engine.kv.block_ids(req.request_id)), engine.pool.num_used_blocks
        orig(req, num_tokens)
        after = len(engine.kv.block_ids(req.request_id)), engine.pool.num_used_blocks
        rewinds.append((req.request_id, num_tokens, before, after))

    engine.scheduler.rewind = spy
    banned = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, banned_strings=[PHRASE])
    outs, deltas, rids = run(engine, prompts, [banned] + [greedy] * len(OTHERS))
    assert PHRASE.lower() not in outs[0].text.lower() and deltas[0] == outs[0].text
    assert len(outs[0].token_ids) == 30
    # The text up to where the phrase began is what it wrote before; then it wrote something else.
    start = free[0].text.lower().index(PHRASE.lower())
    assert outs[0].text[:start] == free[0].text[:start] and outs[0].text != free[0].text
    assert [o.token_ids for o in outs[1:]] == [o.token_ids for o in free[1:]]  # the others: untouched
    assert rewinds and {r[0] for r in rewinds} == {rids[0]}  # only the banned request rewinds
    for _, num_tokens, (blocks_before, used_before), (blocks_after, used_after) in rewinds:
        # The last kept token is recomputed; blocks past it went back to the pool.
        assert blocks_after == cdiv(num_tokens - 1, 4) < blocks_before
        assert used_before - used_after == blocks_before - blocks_after


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(dtype="bfloat16", quantization="none", max_model_len=256, max_num_seqs=4, seed=0)
    with serve(AsyncEngine(config), default_model_name(None)) as s:
        yield s


LITE_SSE = re.compile(r"event: (.*)\ndata: (.*)\n\n")


def _phrase_it_writes(server) -> str:
    """Three words from the middle of what the server writes for PROMPT greedily."""
    body = {"prompt": PROMPT, "max_length": 24, "temperature": 0}
    text = httpx.post(f"{server.url}/api/v1/generate", json=body, timeout=120).json()["results"][0]["text"]
    words = text.split()
    assert len(words) > 8
    return " ".join(words[3:6])


def test_kobold_stream_never_shows_the_banned_phrase(server):
    phrase = _phrase_it_writes(server)
    body = {"prompt": PROMPT, "max_length": 24, "temperature": 0, "banned_tokens": [phrase.upper()]}
    full = httpx.post(f"{server.url}/api/v1/generate", json=body, timeout=120).json()["results"][0]["text"]
    with httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=body, timeout=120) as r:
        raw = r.read().decode()
    tokens = [json.loads(data)["token"] for _, data in LITE_SSE.findall(raw)]
    streamed = ""
    for t in tokens:
        streamed += t
        assert phrase.lower() not in streamed.lower()
    assert streamed == full and phrase.lower() not in full.lower()
    # SillyTavern's name for the same field.
    st = body | {"banned_tokens": None, "banned_strings": [phrase]}
    assert (
        httpx.post(f"{server.url}/api/v1/generate", json=st, timeout=120).json()["results"][0]["text"] == full
    )


def test_openai_stream_never_shows_the_banned_phrase(server):
    import openai

    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
    phrase = _phrase_it_writes(server)
    kw = dict(model=server.name, prompt=PROMPT, max_tokens=24, temperature=0, logprobs=1)
    free = client.completions.create(**kw).choices[0].text
    assert phrase in free
    banned = client.completions.create(**kw, extra_body={"banned_strings": [phrase]}).choices[0]
    streamed, tokens = "", 0
    for chunk in client.completions.create(**kw, stream=True, extra_body={"banned_strings": [phrase]}):
        if chunk.choices:
            streamed += chunk.choices[0].text
            assert phrase.lower() not in streamed.lower()
            if chunk.choices[0].logprobs is not None:
                tokens += len(chunk.choices[0].logprobs.tokens)
    assert streamed == banned.text and phrase not in banned.text
    assert tokens == len(banned.logprobs.tokens) == 24  # the token ids streamed are the ones kept
