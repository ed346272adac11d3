"""KoboldAI / KoboldCpp compatibility (fitllm/server/kobold/): the context (memory kept at the
front, the prompt trimmed from its oldest tokens, max_length capped as KoboldCpp does), the translation of
Kobold sampler fields with the unsupported ones refused by name, and the routes through real HTTP against
the offline engine."""

from __future__ import annotations

import json
import re
import threading
import time
from types import SimpleNamespace

import httpx
import pytest
from live_server import sample, scrape, serve

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.engine.engine import Engine
from fitllm.engine.request import SAMPLER_NAMES
from fitllm.loader import open_model
from fitllm.server.app import default_model_name
from fitllm.server.errors import APIError
from fitllm.server.kobold.routes import KoboldGenerateRequest, build_context, sampling_params


@pytest.fixture(scope="module")
def state():
    return SimpleNamespace(tokenizer=open_model(None).tokenizer(), max_model_len=256)


def _body(**kw) -> KoboldGenerateRequest:
    return KoboldGenerateRequest(**kw)


def test_short_prompt_is_memory_then_prompt(state):
    tok = state.tokenizer
    ids, max_length = build_context(
        state, _body(prompt=" and then the ship landed.", memory="Mars, 2090.", max_length=20)
    )
    assert max_length == 20
    assert ids == tok.encode("", add_special_tokens=True) + tok.encode(
        "Mars, 2090.", add_special_tokens=False
    ) + tok.encode(" and then the ship landed.", add_special_tokens=False)


def test_long_prompt_keeps_memory_and_the_newest_prompt_tokens(state):
    tok = state.tokenizer
    memory = "Memory: the captain is called Ada."
    prompt = " ".join(f"word{i}" for i in range(400))  # far more than the context
    ids, max_length = build_context(
        state, _body(prompt=prompt, memory=memory, max_length=50, max_context_length=200)
    )
    mem_ids = tok.encode(memory, add_special_tokens=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    bos = tok.encode("", add_special_tokens=True)
    assert len(ids) + max_length == 200  # exactly fills max_context_length
    assert ids[: len(bos) + len(mem_ids)] == bos + mem_ids  # memory whole, at the front
    tail = ids[len(bos) + len(mem_ids) :]
    assert tail == prompt_ids[-len(tail) :]  # the newest prompt tokens, oldest dropped


def test_context_is_capped_by_max_model_len_and_max_length_leaves_room(state):
    # Asking for more context than the server has: capped at --max-model-len (256). Asking for a
    # max_length that would leave no prompt: KoboldCpp caps it at ctx - max(min(ctx - 4, 16), ctx / 5).
    ids, max_length = build_context(
        state, _body(prompt="x " * 1000, max_length=500, max_context_length=100_000)
    )
    assert max_length == 256 - max(min(252, 16), int(0.2 * 256))
    assert len(ids) + max_length == 256


@pytest.mark.parametrize(
    ("field", "value"),
    [("grammar_retain_state", True), ("images", ["data"])],
)
def test_unsupported_fields_are_refused_by_name(field, value):
    with pytest.raises(APIError) as err:
        sampling_params(_body(prompt="x", grammar="root ::= 'a'", **{field: value}), 10, [2])
    assert err.value.status == 400 and err.value.param == field and "not supported" in err.value.message


def test_writers_samplers_are_mapped():
    body = dict(
        top_a=0.2, typical=0.9, tfs=0.95, nsigma=1.0, mirostat=2, mirostat_tau=4.0, mirostat_eta=0.2,
        dynatemp_range=0.5, dynatemp_exponent=1.5, smoothing_factor=0.3, dry_multiplier=0.8, dry_base=1.5,
        dry_allowed_length=3, dry_penalty_last_n=256, dry_sequence_breakers=["\n", "*"], xtc_threshold=0.15,
        xtc_probability=0.5,
    )  # fmt: skip
    p = sampling_params(_body(prompt="x", **body), 10, [2])
    got = (p.top_a, p.typical_p, p.tfs, p.top_n_sigma, p.mirostat, p.mirostat_tau, p.mirostat_eta)
    assert got == (0.2, 0.9, 0.95, 1.0, 2, 4.0, 0.2)
    assert (p.dynatemp_range, p.dynatemp_exponent, p.smoothing_factor) == (0.5, 1.5, 0.3)
    assert (p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n) == (0.8, 1.5, 3, 256)
    assert p.dry_sequence_breakers == ["\n", "*"] and (p.xtc_threshold, p.xtc_probability) == (0.15, 0.5)
    # KoboldCpp's default breakers are none; a JSON string of a list is read as the list.
    assert sampling_params(_body(prompt="x"), 10, [2]).dry_sequence_breakers == []
    q = sampling_params(_body(prompt="x", dry_sequence_breakers='["a"]'), 10, [2])
    assert q.dry_sequence_breakers == ["a"]


def test_kobold_lite_defaults_are_accepted_and_mapped():
    # What KoboldAI Lite sends by default: not neutral, and all served.
    lite = dict(
        rep_pen=1.1, rep_pen_range=320, rep_pen_slope=0.7, temperature=0.7, top_p=0.92, top_k=100, top_a=0,
        typical=1, tfs=1, min_p=0, presence_penalty=0, sampler_order=[6, 0, 1, 3, 4, 2, 5], sampler_seed=7,
        stop_sequence=["\nYou:"], use_default_badwordsids=False, n=1, quiet=True,
    )  # fmt: skip
    p = sampling_params(_body(prompt="x", **lite), 120, [2])
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.7, 100, 0.92, 1.1)
    assert (p.repetition_penalty_range, p.repetition_penalty_slope) == (320, 0.7)
    assert p.sampler_order == [
        "repetition_penalty",
        "top_k",
        "top_a",
        "tfs",
        "typical_p",
        "top_p",
        "temperature",
    ]
    assert p.seed == 7 and p.max_tokens == 120 and p.stop == ["\nYou:"]
    assert not p.include_stop_str_in_output  # trim_stop defaults on


def test_any_sampler_order_is_taken_as_sent_and_bad_ones_refused():
    for order in ([0, 6, 1, 3, 4, 2, 5], [6, 2, 1, 3, 4, 0, 5], [5, 6], []):
        p = sampling_params(_body(prompt="x", sampler_order=order), 10, [2])
        assert p.sampler_order == [SAMPLER_NAMES[i] for i in order]
    for order in ([0, 0, 1], [7], [-1]):
        with pytest.raises(APIError, match="distinct sampler ids"):
            sampling_params(_body(prompt="x", sampler_order=order), 10, [2])


def test_eos_banning_and_bias_and_greedy_and_seed():
    p = sampling_params(
        _body(
            prompt="x", use_default_badwordsids=True, logit_bias={"5": 500}, temperature=0, sampler_seed=-1
        ),
        10,
        [2, 3],
    )
    assert p.ignore_eos and p.logit_bias == {5: 100.0, 2: -100.0, 3: -100.0}  # clamped to +-100 as KoboldCpp
    assert p.temperature == 0 and p.seed is None
    q = sampling_params(_body(prompt="x", trim_stop=False, top_k=0, rep_pen_range=0), 10, [2])
    assert q.include_stop_str_in_output and q.top_k == 0 and q.repetition_penalty_range == 1
    # KoboldCpp's top_p 0 keeps only the most likely token; above 1 it is off.
    zero = sampling_params(_body(prompt="x", top_p=0, top_k=40), 10, [2])
    assert (zero.top_k, zero.top_p) == (1, 1.0)
    assert sampling_params(_body(prompt="x", top_p=1.5), 10, [2]).top_p == 1.0


# ---- through real HTTP ----------------------------------------------------------------------------------

LITE_SSE = re.compile(r"event: (.*)\ndata: (.*)\n\n")  # how KoboldAI Lite parses the stream


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(dtype="bfloat16", max_model_len=256, max_num_seqs=4, seed=0)
    with serve(AsyncEngine(config), default_model_name(None)) as s:
        yield s


@pytest.fixture(scope="module")
def offline():
    return Engine(EngineConfig(dtype="bfloat16", max_model_len=256, max_num_seqs=4, seed=0))


def test_info_routes(server):
    get = lambda path: httpx.get(server.url + path, timeout=30).json()  # noqa: E731
    assert get("/api/v1/model") == {"result": server.name}
    assert get("/api/v1/info/version") == {"result": "1.2.5"}
    assert get("/api/v1/config/max_context_length") == {"value": 256}
    assert get("/api/v1/config/max_length")["value"] > 0
    version = get("/api/extra/version")
    assert version["result"] == "KoboldCpp" and version["version"] == "1.74"  # Lite: DRY from 1.70, XTC 1.74
    assert not any(version[k] for k in ("txt2img", "vision", "audio", "transcribe", "tts", "embeddings"))


def test_generate_matches_the_offline_engine_and_keeps_memory(server, offline):
    body = {
        "prompt": " ".join(["The fleet drifted past the moons of Jupiter."] * 60),  # longer than the context
        "memory": "Captain Ada commands the Starling.\n",
        "max_length": 24,
        "max_context_length": 200,
        "temperature": 0,
        "rep_pen": 1.1,
        "rep_pen_range": 64,
        "rep_pen_slope": 0.7,
        "use_default_badwordsids": True,
    }
    r = httpx.post(f"{server.url}/api/v1/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    result = r.json()["results"][0]
    state = SimpleNamespace(tokenizer=offline.tokenizer, max_model_len=256)
    # The route cuts the story in whole KV blocks (16 tokens: the server's block size) where a context shift
    # serves (the Kobold default), so the next turn's shift is made in place.
    ids, max_length = build_context(state, KoboldGenerateRequest(**body), 0.0, 16)
    assert result["prompt_tokens"] == len(ids) and 200 - 24 - 16 < len(ids) <= 200 - 24
    params = sampling_params(KoboldGenerateRequest(**body), max_length, offline.tokenizer.eos_token_ids)
    want = list(offline.stream(ids, params))[-1].outputs[0]
    assert result["text"] == want.text and result["completion_tokens"] == len(want.token_ids) == 24
    assert result["finish_reason"] == "length"


def test_stream_is_what_lite_parses_and_equals_generate(server):
    body = {"prompt": "Once upon a time, on a distant planet,", "max_length": 16, "temperature": 0}
    full = httpx.post(f"{server.url}/api/v1/generate", json=body, timeout=120).json()["results"][0]["text"]
    with httpx.stream("POST", f"{server.url}/api/extra/generate/stream", json=body, timeout=120) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        raw = r.read().decode()
    events = [(name, json.loads(data)) for name, data in LITE_SSE.findall(raw)]
    assert "".join(m for m in LITE_SSE.split(raw)[::3]) == ""  # nothing outside the events
    assert all(name == "message" for name, _ in events)
    assert "".join(d["token"] for _, d in events) == full
    last = events[-1][1]
    assert (last["token"], last["finish_reason"]) == ("", "length")  # what Lite reads of the last event
    # fitllm's additions (Lite ignores them): the prompt's size and how its K/V was had.
    details = last.pop("prompt_tokens_details")
    assert set(last) == {"token", "finish_reason", "prompt_tokens", "completion_tokens"}
    assert last["completion_tokens"] == 16
    assert (
        sum(details[k] for k in ("prefix_cached_tokens", "shifted_tokens", "from_host_tokens"))
        == (details["cached_tokens"])
    )
    assert details["cached_tokens"] + details["prefilled_tokens"] == last["prompt_tokens"]


def test_stop_sequence_is_trimmed_unless_trim_stop_is_off(server, offline):
    base = {"prompt": "1, 2, 3, 4, 5,", "max_length": 30, "temperature": 0}
    free = httpx.post(f"{server.url}/api/v1/generate", json=base, timeout=120).json()["results"][0]["text"]
    stop = free[2:6]  # a piece of what it writes anyway
    trimmed = httpx.post(f"{server.url}/api/v1/generate", json=base | {"stop_sequence": [stop]}, timeout=120)
    kept = httpx.post(
        f"{server.url}/api/v1/generate",
        json=base | {"stop_sequence": [stop], "trim_stop": False},
        timeout=120,
    )
    cut = free[: free.index(stop)]
    assert trimmed.json()["results"][0]["text"] == cut
    assert kept.json()["results"][0]["text"] == cut + stop
    assert trimmed.json()["results"][0]["finish_reason"] == "stop"


def test_check_and_abort_by_genkey(server):
    body = {"prompt": "A very long saga begins:", "max_length": 180, "temperature": 0.8, "genkey": "KCPP4242",
            "use_default_badwordsids": True}  # fmt: skip
    result: dict = {}

    def run() -> None:
        result["r"] = httpx.post(f"{server.url}/api/v1/generate", json=body, timeout=120)

    worker = threading.Thread(target=run)
    worker.start()
    deadline = time.monotonic() + 60
    text = ""
    while not text:  # the check route shows the text so far while it is generated
        assert time.monotonic() < deadline
        text = httpx.post(f"{server.url}/api/extra/generate/check", json={"genkey": "KCPP4242"}).json()[
            "results"
        ][0]["text"]
        time.sleep(0.05)
    assert httpx.post(f"{server.url}/api/extra/generate/check", json={"genkey": "other"}).json() == {
        "results": [{"text": ""}]
    }
    assert httpx.post(f"{server.url}/api/extra/abort", json={"genkey": "KCPP4242"}).json() == {
        "success": "true",
        "done": "true",
    }
    worker.join(60)
    r = result["r"].json()["results"][0]
    assert r["completion_tokens"] < 180 and r["text"].startswith(text)
    assert (
        httpx.post(f"{server.url}/api/extra/abort", json={"genkey": "KCPP4242"}).json()["success"] == "false"
    )
    m = scrape(server.url)
    assert (
        sample(m, "fitllm_kv_blocks", state="used") == 0
        and sample(m, "fitllm_requests", state="running") == 0
    )


def test_tokencount_and_bad_input(server, offline):
    r = httpx.post(f"{server.url}/api/extra/tokencount", json={"prompt": "The Martians landed."}).json()
    assert r == {"value": len(r["ids"]), "ids": offline.tokenizer.encode("The Martians landed.")}
    bad = httpx.post(f"{server.url}/api/v1/generate", json={"prompt": "x", "grammar": "root ::= ('a'"})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "grammar"
    pen = httpx.post(f"{server.url}/api/v1/generate", json={"prompt": "x", "rep_pen": 0})
    assert pen.status_code == 400 and pen.json()["error"]["param"] == "rep_pen"
    assert pen.json()["error"]["message"].startswith("rep_pen must be")
    wrong = httpx.post(f"{server.url}/api/v1/generate", json={"prompt": "x", "max_length": "long"})
    assert wrong.status_code == 400 and "max_length" in wrong.json()["error"]["message"]
    ok = httpx.post(f"{server.url}/api/v1/generate", json={"prompt": "x", "max_length": 2}, timeout=60)
    assert ok.status_code == 200  # still serving


def test_bodies_are_read_as_json_whatever_their_content_type(server):
    """KoboldCpp reads every body as JSON: front ends send it as text/plain, form data, or nothing at all
    (SillyTavern's abort)."""
    body = json.dumps({"prompt": "Once upon a time", "max_length": 3, "temperature": 0})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {} if content_type is None else {"content-type": content_type}
        r = httpx.post(f"{server.url}/api/v1/generate", content=body, headers=headers, timeout=60)
        assert r.status_code == 200, r.text
    assert httpx.post(f"{server.url}/api/extra/abort").json() == {"success": "false", "done": "false"}
    last = r.json()["results"][0]["text"]  # the latest job, started without a genkey
    assert httpx.post(f"{server.url}/api/extra/generate/check").json() == {"results": [{"text": last}]}
    bad = httpx.post(f"{server.url}/api/v1/generate", content=b"not json", timeout=30)
    assert bad.status_code == 400 and "JSON" in bad.json()["error"]["message"]


def test_check_without_a_genkey_shows_only_a_job_started_without_one(server):
    """A genkey keeps a job's text from everyone else, as in KoboldCpp (multi-user servers)."""
    base = {"prompt": "The ships sailed on", "max_length": 4, "temperature": 0}
    private = httpx.post(f"{server.url}/api/v1/generate", json=base | {"genkey": "USER-A"}, timeout=60).json()
    assert private["results"][0]["text"]
    assert httpx.get(f"{server.url}/api/extra/generate/check").json() == {"results": [{"text": ""}]}
    mine = httpx.post(f"{server.url}/api/extra/generate/check", json={"genkey": "USER-A"}).json()
    assert mine == {"results": [{"text": private["results"][0]["text"]}]}
    public = httpx.post(f"{server.url}/api/v1/generate", json=base, timeout=60).json()
    shown = httpx.get(f"{server.url}/api/extra/generate/check").json()
    assert shown == {"results": [{"text": public["results"][0]["text"]}]}


def test_perf_tokenize_detokenize_and_latest_aliases(server, offline):
    before = httpx.get(f"{server.url}/api/extra/perf").json()
    body = {"prompt": "The Martians", "max_length": 5, "temperature": 0, "sampler_seed": 77}
    result = httpx.post(f"{server.url}/api/v1/generate", json=body, timeout=60).json()["results"][0]
    perf = httpx.get(f"{server.url}/api/extra/perf").json()
    assert perf["total_gens"] == before["total_gens"] + 1
    assert perf["last_token_count"] == result["completion_tokens"] == 5
    assert perf["stop_reason"] == 0 and perf["last_seed"] == 77  # 0: out of tokens (max_length)
    assert perf["last_process"] >= 0 and perf["last_eval"] > 0
    assert (perf["queue"], perf["idle"]) == (0, 1) and perf["uptime"] > 0
    ids = offline.tokenizer.encode("The Martians landed.")
    tokens = httpx.post(f"{server.url}/api/extra/tokenize", json={"prompt": "The Martians landed."}).json()
    assert tokens == {"value": len(ids), "ids": ids}
    text = httpx.post(f"{server.url}/api/extra/detokenize", json={"ids": ids}).json()
    assert text == {"result": offline.tokenizer.decode(ids, skip_special_tokens=False), "success": True}
    assert httpx.post(f"{server.url}/api/extra/detokenize", json={"ids": [10**9]}).status_code == 400
    assert httpx.get(f"{server.url}/api/latest/model").json() == {"result": server.name}
    assert httpx.get(f"{server.url}/api/v1/config/soft_prompts_list").json() == {"values": []}


def test_logprobs_in_koboldcpps_shape(server, offline):
    """KoboldAI Lite's token-probability view: logprobs: true gives the chat API's `content` and the
    completions API's lists, five alternatives per token, matching the offline engine's."""
    body = {"prompt": "The Martians", "max_length": 4, "temperature": 0, "logprobs": True}
    result = httpx.post(f"{server.url}/api/v1/generate", json=body, timeout=60).json()["results"][0]
    lp = result["logprobs"]
    assert len(lp["content"]) == len(lp["tokens"]) == result["completion_tokens"] == 4
    assert "".join(lp["tokens"]) == result["text"]
    state = SimpleNamespace(tokenizer=offline.tokenizer, max_model_len=256)
    ids, max_length = build_context(state, KoboldGenerateRequest(**body))
    want = list(offline.stream(ids, sampling_params(KoboldGenerateRequest(**body), max_length, [])))[-1]
    for entry, own, wanted_id, alternatives in zip(
        lp["content"], lp["token_logprobs"], want.outputs[0].token_ids, want.outputs[0].logprobs, strict=True
    ):
        assert entry["logprob"] == own == pytest.approx(alternatives[wanted_id].logprob, abs=1e-4)
        assert len(entry["top_logprobs"]) == 5
    plain = httpx.post(f"{server.url}/api/v1/generate", json=body | {"logprobs": False}, timeout=60).json()
    assert plain["results"][0]["logprobs"] is None
