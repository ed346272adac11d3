"""What KoboldAI Lite, SillyTavern and vLLM's clients expect of the server's edges (issue 21), through real
HTTP: refusals logged with their reason, Lite's connect probes answered without the key, an abort without
a genkey that never stops another user's work, unique OpenAPI operation ids, vLLM's /ping and /version,
usage on every chunk under continuous_usage_stats, and vLLM's prompt dicts in the offline API.

One server on a tiny random checkpoint with an API key, each step slowed a little so a generation lasts
long enough to be talked over.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Iterator

import httpx
import openai
import pytest
from live_server import Served, serve
from stand_ins import slow_engine

from fitllm import LLM, SamplingParams
from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.engine.engine import Engine
from fitllm.server.refusals import RefusalLog

KEY = "sekrit"
AUTH = {"Authorization": f"Bearer {KEY}"}
STEP_DELAY_S = 0.02


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path_factory.mktemp("frontends"), family="llama")
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"  # so the chat route has one
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    return folder


def _config(folder) -> EngineConfig:
    return EngineConfig(model=str(folder), dtype="float32", max_model_len=256, profile_workspace=False)


def _slow(config: EngineConfig) -> Engine:
    return slow_engine(config, STEP_DELAY_S)


@pytest.fixture(scope="module")
def server(folder) -> Iterator[Served]:
    with serve(AsyncEngine(_config(folder), engine_factory=_slow), "tiny", api_key=KEY) as s:
        yield s


def test_refused_requests_are_logged_with_their_reason(server, caplog, monkeypatch):
    from fitllm.server.refusals import REFUSALS

    # The process's rate limit is shared by every server this test worker ran: start a fresh window.
    monkeypatch.setattr(REFUSALS, "_window_start", time.monotonic())
    monkeypatch.setattr(REFUSALS, "_logged", 0)
    monkeypatch.setattr(REFUSALS, "_suppressed", 0)  # earlier tests' refusals past the burst
    caplog.set_level(logging.WARNING, logger="fitllm")
    r = httpx.post(f"{server.url}/api/v1/generate", json={"prompt": "t5", "max_length": 0}, headers=AUTH)
    assert r.status_code == 400
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "t5", "max_tokens": 4})  # no key
    assert r.status_code == 401
    lines = [rec.getMessage() for rec in caplog.records if rec.name == "fitllm"]
    assert "refused POST /api/v1/generate with 400: max_length must be at least 1; got 0" in lines
    assert any(
        line.startswith("refused POST /v1/completions with 401: missing or wrong API key") for line in lines
    )


def test_refusal_log_is_rate_limited(caplog):
    caplog.set_level(logging.WARNING, logger="fitllm")
    log = RefusalLog(burst=2, window_s=0.2)
    assert [log.refused(400, "POST", "/x", f"bad {i}") for i in range(4)] == [True, True, False, False]
    time.sleep(0.25)
    assert log.refused(404, "GET", "/y", "not\nfound")
    last = caplog.records[-1].getMessage()
    assert last == "refused GET /y with 404: not found (2 more refused requests were not logged)"


def test_lite_connect_probes_answer_without_the_key(server):
    assert httpx.get(f"{server.url}/api/extra/preloadstory").json() == {}
    assert httpx.get(f"{server.url}/sdapi/v1/sd-models").json() == []
    assert httpx.post(f"{server.url}/api/extra/preloadstory").status_code in (401, 405)  # only GET is open


def test_ping_and_version_as_vllm(server):
    from fitllm import __version__

    assert httpx.get(f"{server.url}/version").json() == {"version": __version__}
    for method in ("GET", "POST"):
        r = httpx.request(method, f"{server.url}/ping")
        assert r.status_code == 200 and r.json() == {"status": "ok"}


def test_openapi_operation_ids_are_unique(server):
    doc = httpx.get(f"{server.url}/openapi.json", headers=AUTH).json()
    ids = Counter(op["operationId"] for path in doc["paths"].values() for op in path.values())
    assert ids and max(ids.values()) == 1, [k for k, n in ids.items() if n > 1]
    check = doc["paths"]["/api/extra/generate/check"]
    assert set(check) == {"get", "post"} and check["get"]["operationId"] != check["post"]["operationId"]


def _generate(server, body: dict, out: dict, key: str) -> threading.Thread:
    def run() -> None:
        out[key] = httpx.post(f"{server.url}/api/v1/generate", json=body, headers=AUTH, timeout=120).json()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def _wait_for_text(server, genkey: str | None) -> None:
    deadline = time.monotonic() + 60
    body = {"genkey": genkey} if genkey else {}
    while not httpx.post(f"{server.url}/api/extra/generate/check", json=body, headers=AUTH).json()["results"][
        0
    ]["text"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_abort_without_a_genkey_never_stops_another_users_work(server):
    long = {"prompt": "t5 t6 t7", "max_length": 150, "temperature": 0.8, "use_default_badwordsids": True}
    out: dict = {}
    mine = _generate(server, long, out, "mine")  # no genkey: the latest genkey-less job
    _wait_for_text(server, None)
    theirs = _generate(server, long | {"genkey": "KCPP7777"}, out, "theirs")
    _wait_for_text(server, "KCPP7777")
    # Someone else's generation runs beside it: KoboldCpp's multiuser rule refuses the keyless abort.
    r = httpx.post(f"{server.url}/api/extra/abort", json={}, headers=AUTH).json()
    assert r["success"] == "false"
    mine.join(120)
    theirs.join(120)
    assert out["mine"]["results"][0]["completion_tokens"] == 150
    assert out["theirs"]["results"][0]["completion_tokens"] == 150
    # Alone, the keyless abort stops the keyless job.
    mine = _generate(server, long, out, "alone")
    _wait_for_text(server, None)
    assert httpx.post(f"{server.url}/api/extra/abort", headers=AUTH).json()["success"] == "true"
    mine.join(120)
    assert out["alone"]["results"][0]["completion_tokens"] < 150


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_continuous_usage_stats_put_usage_on_every_chunk(server, route):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)
    kw = dict(model="tiny", max_tokens=12, temperature=0, stream=True)
    if route == "chat":
        create, kw = client.chat.completions.create, kw | {"messages": [{"role": "user", "content": "t5 t6"}]}
    else:
        create, kw = client.completions.create, kw | {"prompt": "t5 t6 t7"}
    plain = [c for c in create(**kw, stream_options={"include_usage": True})]
    chunks = [c for c in create(**kw, stream_options={"include_usage": True, "continuous_usage_stats": True})]
    assert all(c.usage is None for c in plain[:-1]) and plain[-1].usage is not None
    assert all(c.usage is not None for c in chunks)
    final = chunks[-1].usage
    assert final == plain[-1].usage and final.completion_tokens == 12
    assert {c.usage.prompt_tokens for c in chunks} == {final.prompt_tokens}
    completions = [c.usage.completion_tokens for c in chunks]
    assert completions == sorted(completions) and completions[0] < 12
    for c in chunks:
        assert c.usage.total_tokens == c.usage.prompt_tokens + c.usage.completion_tokens
    # Without include_usage, no usage at all (vLLM's rule).
    none = [c for c in create(**kw, stream_options={"continuous_usage_stats": True})]
    assert all(c.usage is None for c in none)


def test_offline_generate_takes_vllm_prompt_dicts(folder):
    llm = LLM(model=str(folder), dtype="float32", max_model_len=128, profile_workspace=False)
    greedy = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    ids = llm.tokenizer.encode("t5 t6 t7")
    want = llm.generate("t5 t6 t7", greedy)[0].outputs[0].token_ids
    outs = llm.generate([{"prompt": "t5 t6 t7"}, {"prompt_token_ids": ids}], greedy)
    assert [o.outputs[0].token_ids for o in outs] == [want, want]
    assert llm.generate({"prompt_token_ids": ids}, greedy)[0].prompt_token_ids == ids
    with pytest.raises(ValueError, match="multi_modal_data"):
        llm.generate({"prompt": "t5", "multi_modal_data": {}})
    with pytest.raises(ValueError, match="prompt_token_ids must be a list of integer token ids"):
        llm.generate({"prompt_token_ids": ["t5"]})
    with pytest.raises(ValueError, match="exactly one"):
        llm.generate({"prompt": "t5", "prompt_token_ids": [5]})
