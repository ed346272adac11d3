"""The HTTP server's generation routes end to end: real uvicorn on a loopback port, the official `openai`
client and plain `httpx` (errors, auth, disconnects and metrics: test_server_ops.py).

The reference for every generated text is the offline Engine with the same config (greedy), and for prompt
logprobs the SequenceScorer (itself checked against transformers in test_eval.py). Servers are built once
per module: the default model (bfloat16) for generation, a tiny random checkpoint with an API key and no
waiting room for auth and 503s, and an engine whose factory blocks then fails for /health.
"""

from __future__ import annotations

import json

import openai
import pytest
from conftest import SERVER_CONFIG

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.engine.scorer import SequenceScorer

PROMPT = "The Martians landed in"
MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def offline() -> Engine:
    return Engine(EngineConfig(**SERVER_CONFIG))


def greedy(engine: Engine, prompt, max_tokens: int = 12, **kw):
    """The offline reference: the final output of one greedy request."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, **kw)
    return list(engine.stream(prompt, params))[-1]


# ---- generation against the offline engine ---------------------------------------------------------------


def test_models_and_greedy_completion_match_offline(server, client, offline):
    assert [m.id for m in client.models.list().data] == [server.name]
    assert client.models.retrieve(server.name).id == server.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-9")
    ref = greedy(offline, PROMPT)
    resp = client.completions.create(model=server.name, prompt=PROMPT, max_tokens=12, temperature=0)
    assert len(resp.choices) == 1
    assert resp.choices[0].text == ref.outputs[0].text
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.prompt_tokens == len(offline.tokenizer.encode(PROMPT))
    assert resp.usage.completion_tokens == 12
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 12


def test_prompt_lists_and_n(server, client, offline):
    prompts = [PROMPT, "Once upon a time"]
    resp = client.completions.create(model=server.name, prompt=prompts, n=2, max_tokens=6, temperature=0)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in resp.choices)
    assert resp.choices[0].text == resp.choices[1].text  # greedy: both choices of one prompt agree
    assert resp.choices[2].text == resp.choices[3].text
    assert resp.usage.prompt_tokens == sum(len(offline.tokenizer.encode(p)) for p in prompts)
    assert resp.usage.completion_tokens == 4 * 6

    ids = offline.tokenizer.encode(PROMPT)
    one = client.completions.create(model=server.name, prompt=ids, max_tokens=12, temperature=0)
    assert [c.text for c in one.choices] == [greedy(offline, ids).outputs[0].text]
    assert one.usage.prompt_tokens == len(ids)
    ids2 = offline.tokenizer.encode("Once upon a time")
    two = client.completions.create(model=server.name, prompt=[ids, ids2], max_tokens=4, temperature=0)
    assert [c.index for c in two.choices] == [0, 1]
    assert two.choices[0].text == greedy(offline, ids, 4).outputs[0].text
    assert two.usage.prompt_tokens == len(ids) + len(ids2)

    chunks = list(
        client.completions.create(
            model=server.name,
            prompt=prompts,
            n=2,
            max_tokens=3,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    finished = sorted(c.choices[0].index for c in chunks[:-1] if c.choices[0].finish_reason == "length")
    assert finished == [0, 1, 2, 3]
    assert chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == 4 * 3


def test_stop_and_seeded_sampling_match_offline(server, client, offline):
    ref = greedy(offline, PROMPT, stop=[" and"]).outputs[0]
    resp = client.completions.create(
        model=server.name, prompt=PROMPT, max_tokens=12, temperature=0, stop=" and"
    )
    assert ref.finish_reason == "stop" and len(ref.token_ids) < 12  # the stop string is reached
    assert (resp.choices[0].text, resp.choices[0].finish_reason) == (ref.text, "stop")

    # A seeded request is reproducible and matches the offline engine with the same seed. (Both alone in
    # their batch: in bfloat16 the logits, and so the samples, depend slightly on the batch size.)
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=12, ignore_eos=True)
    ref = list(offline.stream(PROMPT, params))[-1].outputs[0].text
    kw = dict(
        model=server.name, prompt=PROMPT, max_tokens=12, temperature=1.0, extra_body={"ignore_eos": True}
    )
    assert client.completions.create(**kw, seed=5).choices[0].text == ref
    # Choice j of a seeded request samples with seed + j: reproducible, and distinct from its sibling.
    first = [c.text for c in client.completions.create(**kw, seed=5, n=2).choices]
    assert first == [c.text for c in client.completions.create(**kw, seed=5, n=2).choices]
    assert first[0] != first[1]


def test_chat_completion_matches_offline_template(server, client, offline):
    rendered = offline.tokenizer.apply_chat_template(MESSAGES)
    ref = greedy(offline, rendered, 24)
    assert ref.outputs[0].finish_reason == "stop"  # the answer ends on EOS before the limit
    resp = client.chat.completions.create(model=server.name, messages=MESSAGES, max_tokens=24, temperature=0)
    msg = resp.choices[0]
    assert (msg.message.role, msg.message.content) == ("assistant", ref.outputs[0].text)
    assert msg.finish_reason == "stop"
    assert resp.usage.prompt_tokens == len(offline.tokenizer.encode(rendered))

    chunks = list(
        client.chat.completions.create(
            model=server.name,
            messages=MESSAGES,
            max_tokens=24,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in content) == ref.outputs[0].text
    assert content[-1].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.prompt_tokens == resp.usage.prompt_tokens
    assert chunks[-1].usage.completion_tokens == resp.usage.completion_tokens


def test_completion_logprobs(server, client, offline):
    ref = greedy(offline, PROMPT, 8, logprobs=3).outputs[0]
    resp = client.completions.create(
        model=server.name, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=3
    )
    c = resp.choices[0]
    lp = c.logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 8
    assert "".join(lp.tokens) == c.text
    assert lp.text_offset[0] == 0
    for i in range(1, 8):
        assert lp.text_offset[i] == lp.text_offset[i - 1] + len(lp.tokens[i - 1])
    for tok, value, top, ref_entry, ref_id in zip(
        lp.tokens, lp.token_logprobs, lp.top_logprobs, ref.logprobs, ref.token_ids, strict=True
    ):
        assert 1 <= len(top) <= 4 and top[tok] == value
        assert value == max(top.values())  # greedy picks the most likely token
        assert value == pytest.approx(ref_entry[ref_id].logprob, abs=1e-3)


def test_streamed_logprobs_equal_non_streamed(server, client):
    kw = dict(model=server.name, prompt=PROMPT, max_tokens=8, temperature=0, logprobs=2)
    whole = client.completions.create(**kw).choices[0].logprobs
    parts = [c.choices[0].logprobs for c in client.completions.create(**kw, stream=True) if c.choices]
    parts = [p for p in parts if p is not None]
    assert sum((p.tokens for p in parts), []) == whole.tokens
    assert sum((p.token_logprobs for p in parts), []) == pytest.approx(whole.token_logprobs, abs=1e-4)
    # text_offset indexes the choice's whole text, as in the non-streamed response (and in vLLM).
    assert sum((p.text_offset for p in parts), []) == whole.text_offset


def test_chat_logprobs(server, client, offline):
    resp = client.chat.completions.create(
        model=server.name, messages=MESSAGES, max_tokens=16, temperature=0, logprobs=True, top_logprobs=2
    )
    c = resp.choices[0]
    entries = c.logprobs.content
    assert len(entries) == resp.usage.completion_tokens
    # As vLLM does, the EOS that stopped the answer is scored though its text is not in the content.
    assert c.finish_reason == "stop" and entries[-1].token == offline.tokenizer.eos_token
    assert "".join(e.token for e in entries[:-1]) == c.message.content
    for e in entries:
        assert e.bytes == list(e.token.encode())
        assert len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob >= e.top_logprobs[1].logprob
        assert e.top_logprobs[0].token == e.token and e.top_logprobs[0].logprob == e.logprob


def test_chat_logprob_bytes_rebuild_multibyte_text(server, client):
    messages = [{"role": "user", "content": "東京について日本語で一文書いてください。"}]
    resp = client.chat.completions.create(
        model=server.name, messages=messages, max_tokens=12, temperature=0, logprobs=True
    )
    c = resp.choices[0]
    entries = [
        e for e in c.logprobs.content if c.finish_reason == "length" or e is not c.logprobs.content[-1]
    ]
    data = b"".join(bytes(e.bytes) for e in entries)
    assert data.decode("utf-8", "ignore") == c.message.content  # the content holds back a cut character
    assert not data.isascii()


def test_echo_logprobs_as_lm_eval_sends_them(server, http, offline):
    prompts = [PROMPT + " the middle of a field", "Paris is the capital of"]
    r = http.post(
        "/v1/completions",
        json={
            "model": server.name,
            "prompt": prompts,
            "echo": True,
            "logprobs": 1,
            "max_tokens": 1,
            "temperature": 0,
        },
    )
    assert r.status_code == 200, r.text
    choices = r.json()["choices"]
    assert [c["index"] for c in choices] == [0, 1]
    for prompt, choice in zip(prompts, choices, strict=True):
        ids = offline.tokenizer.encode(prompt)
        lp = choice["logprobs"]
        assert choice["text"].startswith(prompt)
        assert len(lp["tokens"]) == len(ids) + 1  # every prompt token and the generated one
        assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
        assert "".join(lp["tokens"][: len(ids)]) == prompt
        assert lp["text_offset"][len(ids)] == len(prompt)
        scorer = SequenceScorer(offline.model, offline.model_config, offline.device, context=len(ids))
        ref = scorer.token_logprobs(ids)
        got = lp["token_logprobs"][1 : len(ids)]
        assert got == pytest.approx(ref.tolist(), abs=1e-3)
        assert sum(got) == pytest.approx(float(ref.sum()), abs=1e-3)
        for tok, value, top in zip(lp["tokens"][1:], lp["token_logprobs"][1:], lp["top_logprobs"][1:]):
            assert top[tok] == value and 1 <= len(top) <= 2


def test_echo_without_generation_returns_the_scored_prompt(server, http, offline):
    """Legacy OpenAI's `echo` with `max_tokens: 0`: the prompt and its logprobs, nothing generated."""
    body = {"prompt": [PROMPT, "Paris is"], "echo": True, "logprobs": 1, "max_tokens": 0, "n": 2}
    r = http.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    data = r.json()
    assert [c["index"] for c in data["choices"]] == [0, 1, 2, 3]
    ids = offline.tokenizer.encode(PROMPT)
    first = data["choices"][0]
    assert first["text"] == PROMPT and first["finish_reason"] == "length"
    ref = SequenceScorer(
        offline.model, offline.model_config, offline.device, context=len(ids)
    ).token_logprobs(ids)
    assert first["logprobs"]["token_logprobs"][1:] == pytest.approx(ref.tolist(), abs=1e-3)
    assert data["usage"]["completion_tokens"] == 0
    assert data["usage"]["prompt_tokens"] == len(ids) + len(offline.tokenizer.encode("Paris is"))
    plain = http.post("/v1/completions", json={"prompt": "Paris is", "echo": True, "max_tokens": 0}).json()
    assert plain["choices"][0]["text"] == "Paris is" and plain["choices"][0]["logprobs"] is None


# ---- tokenizer routes and raw SSE ------------------------------------------------------------------------


def test_tokenize_detokenize_and_tokenizer_info(server, http, offline):
    r = http.post("/tokenize", json={"prompt": PROMPT})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == offline.tokenizer.encode(PROMPT)
    assert (body["count"], body["max_model_len"]) == (len(body["tokens"]), 512)
    back = http.post("/detokenize", json={"tokens": body["tokens"]})
    assert back.status_code == 200 and back.json() == {"prompt": PROMPT}
    chat = http.post("/tokenize", json={"messages": MESSAGES}).json()
    assert chat["tokens"] == offline.tokenizer.encode(offline.tokenizer.apply_chat_template(MESSAGES))
    info = http.get("/tokenizer_info").json()
    assert info["eos_token_ids"] == offline.tokenizer.eos_token_ids and info["eos_token_ids"]
    assert info["chat_template"] == offline.tokenizer.chat_template and "im_start" in info["chat_template"]
    assert info["model_max_length"] == 512


@pytest.mark.parametrize(
    "path,extra",
    [("/v1/completions", {"prompt": PROMPT}), ("/v1/chat/completions", {"messages": MESSAGES})],
)
def test_raw_sse(http, path, extra):
    body = {"max_tokens": 5, "temperature": 0, "stream": True, **extra}
    with http.stream("POST", path, json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1
    events = [json.loads(line[len("data: ") :]) for line in lines[:-1]]
    assert len(events) >= 2 and all(e["choices"] for e in events)


def test_legacy_logprobs_keep_the_tokens_own_logprob_when_texts_collide():
    """Byte-fallback tokens can decode to the same text (U+FFFD); the top_logprobs entry under that text is
    the token's own logprob, not an alternative's that happens to decode alike (found in review)."""
    from types import SimpleNamespace

    from fitllm.engine.request import Logprob
    from fitllm.server.logprobs import legacy_logprobs

    class Tok:
        def decode(self, ids, skip_special_tokens=False):
            return "\ufffd" if ids[0] in (9, 17) else f"w{ids[0]}"

    st = SimpleNamespace(tokenizer=Tok())
    entries = [None, {9: Logprob(-2.104, None), 17: Logprob(-2.121, None), 4: Logprob(-3.0, None)}]
    out = legacy_logprobs(st, [5, 9], entries, 0)
    assert out["tokens"] == ["w5", "\ufffd"] and out["token_logprobs"] == [None, -2.104]
    assert out["top_logprobs"] == [None, {"\ufffd": -2.104, "w4": -3.0}]
    assert out["text_offset"] == [0, 2]
