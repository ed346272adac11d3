"""The HTTP server's operations end to end: bad input, oversized bodies, disconnects, metrics, API key, a
full queue, /health while loading, shutdown (generation routes: test_server.py).

The reference for every generated text is the offline Engine with the same config (greedy), and for prompt
logprobs the SequenceScorer (itself checked against transformers in test_eval.py). Servers are built once
per module: the default model (bfloat16) for generation, a tiny random checkpoint with an API key and no
waiting room for auth and 503s, and an engine whose factory blocks then fails for /health.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import openai
import pytest
from live_server import Served, assert_error, sample, scrape, serve

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine, EngineDead
from fitllm.engine.engine import Engine
from fitllm.server.app import default_model_name
from fitllm.server.guard import MAX_BODY_BYTES

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]
API_KEY = "secret"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Iterator[Served]:
    """A random-weight checkpoint behind an API key, whose engine refuses every add (no waiting room)."""
    from conftest import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path_factory.mktemp("srv"), family="llama")
    config = EngineConfig(model=str(folder), dtype="float32", max_model_len=128, profile_workspace=False)
    with serve(AsyncEngine(config, max_waiting_requests=0), default_model_name(str(folder)), API_KEY) as s:
        yield s


def wait_idle_after_abort(url: str, aborts_before: float) -> dict:
    """Poll /metrics until nothing runs or waits, no KV block is in use, and one more request was aborted."""
    deadline = time.monotonic() + 10
    while True:
        m = scrape(url)
        idle = (
            sample(m, "fitllm_requests", state="running") == 0
            and sample(m, "fitllm_requests", state="waiting") == 0
            and sample(m, "fitllm_kv_blocks", state="used") == 0
        )
        if idle and sample(m, "fitllm_requests_finished_total", reason="abort") == aborts_before + 1:
            return m
        assert time.monotonic() < deadline, {k: v for k, v in m.items() if "requests" in k[0] or "kv" in k[0]}
        time.sleep(0.1)


# ---- bad input -------------------------------------------------------------------------------------------

C, CHAT = "/v1/completions", "/v1/chat/completions"
ANY = object()  # the param is not checked
BAD = [
    ("malformed_json", C, '{"prompt": "hi",', 400, ANY),
    ("body_is_a_list", C, "[1, 2]", 400, ANY),
    ("empty_body", C, "", 400, ANY),
    ("prompt_dict", C, {"prompt": {"a": 1}}, 400, ANY),
    ("max_tokens_text", C, {"prompt": "hi", "max_tokens": "ten"}, 400, "max_tokens"),
    ("max_tokens_fraction", C, {"prompt": "hi", "max_tokens": 2.5}, 400, "max_tokens"),
    ("nan_temperature", C, '{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    ("infinite_top_p", C, '{"prompt": "hi", "top_p": Infinity}', 400, "top_p"),
    ("negative_temperature", C, {"prompt": "hi", "temperature": -1}, 400, "temperature"),
    ("negative_max_tokens", C, {"prompt": "hi", "max_tokens": -5}, 400, "max_tokens"),
    ("zero_max_tokens", C, {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("top_p_zero", C, {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("huge_n", C, {"prompt": "hi", "n": 1000}, 400, "n"),
    ("zero_n", C, {"prompt": "hi", "n": 0}, 400, "n"),
    ("presence_penalty_out_of_range", C, {"prompt": "hi", "presence_penalty": 5}, 400, "presence_penalty"),
    ("min_tokens_over_max", C, {"prompt": "hi", "max_tokens": 2, "min_tokens": 5}, 400, "min_tokens"),
    ("logprobs_over_20", C, {"prompt": "hi", "logprobs": 50}, 400, "logprobs"),
    ("logit_bias_key", C, {"prompt": "hi", "logit_bias": {"abc": 1}}, 400, "logit_bias"),
    ("stop_int", C, {"prompt": "hi", "stop": 5}, 400, ANY),
    (
        "logit_bias_out_of_vocab",
        C,
        {"prompt": "hi", "max_tokens": 2, "logit_bias": {"99999999": 1}},
        400,
        "logit_bias",
    ),
    (
        "stop_token_out_of_vocab",
        C,
        {"prompt": "hi", "min_tokens": 1, "stop_token_ids": [99999999]},
        400,
        "stop_token_ids",
    ),
    ("empty_prompt", C, {"prompt": ""}, 400, ANY),
    ("empty_prompt_list", C, {"prompt": []}, 400, "prompt"),
    ("empty_token_prompt", C, {"prompt": [[]]}, 400, ANY),
    ("token_out_of_vocab", C, {"prompt": [10**9]}, 400, ANY),
    ("negative_token", C, {"prompt": [[1, -1]]}, 400, ANY),
    ("prompt_too_long", C, {"prompt": "hello " * 600, "max_tokens": 1}, 400, "prompt"),
    (
        "chat_prompt_too_long",
        CHAT,
        {"messages": [{"role": "user", "content": "hello " * 600}]},
        400,
        "messages",
    ),
    ("max_tokens_past_context", C, {"prompt": "hi", "max_tokens": 100000}, 400, "max_tokens"),
    ("chat_max_tokens_past_context", CHAT, {"messages": MESSAGES, "max_tokens": 100000}, 400, "max_tokens"),
    ("seed_overflow", C, {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("guided_json_bad_schema", C, {"prompt": "hi", "guided_json": {"type": "foo"}}, 400, "guided_json"),
    ("beam_search", C, {"prompt": "hi", "use_beam_search": True}, 400, "use_beam_search"),
    (
        "response_format_json_schema_without_schema",
        CHAT,
        {"messages": MESSAGES, "response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
        400,
        "response_format",
    ),
    (  # SmolLM2's chat template teaches no tool-call format (tests/test_tools.py serves those that do)
        "tools_without_a_tool_format",
        CHAT,
        {"messages": MESSAGES, "tools": [{"type": "function", "function": {"name": "f"}}]},
        400,
        "tools",
    ),
    (  # a forced call needs a tool-call format too
        "tool_choice_required_without_a_tool_format",
        CHAT,
        {
            "messages": MESSAGES,
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "tool_choice": "required",
        },
        400,
        "tools",
    ),
    (
        "tool_choice_without_tools",
        CHAT,
        {"messages": MESSAGES, "tool_choice": "required"},
        400,
        "tool_choice",
    ),
    (
        "stream_options_without_stream",
        C,
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("suffix_without_fim_tokens", C, {"prompt": "hi", "suffix": "x"}, 400, "suffix"),  # tests/test_fim.py
    ("infill_without_fim_tokens", "/infill", {"input_prefix": "a", "input_suffix": "b"}, 400, "input_prefix"),
    ("best_of", C, {"prompt": "hi", "best_of": 3}, 400, "best_of"),
    ("echo_logprobs_stream", C, {"prompt": "hi", "echo": True, "logprobs": 1, "stream": True}, 400, "echo"),
    ("stream_bad_max_tokens", C, {"prompt": "hi", "max_tokens": -1, "stream": True}, 400, "max_tokens"),
    ("stream_empty_prompt", C, {"prompt": "", "stream": True}, 400, ANY),
    ("unknown_model", C, {"prompt": "hi", "model": "gpt-9"}, 404, "model"),
    ("chat_no_messages", CHAT, {"max_tokens": 1}, 400, ANY),
    ("chat_empty_messages", CHAT, {"messages": []}, 400, ANY),
    ("chat_user_without_content", CHAT, {"messages": [{"role": "user"}]}, 400, "messages"),
    ("chat_bad_role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, ANY),
    (
        "chat_image_part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages",
    ),
    ("chat_top_logprobs_alone", CHAT, {"messages": MESSAGES, "top_logprobs": 2}, 400, "top_logprobs"),
    ("chat_unknown_model", CHAT, {"messages": MESSAGES, "model": "gpt-9"}, 404, "model"),
    ("detokenize_out_of_vocab", "/detokenize", {"tokens": [10**9]}, 400, "tokens"),
    ("tokenize_nothing", "/tokenize", {}, 400, ANY),
    ("unknown_route", "/v1/nothing", {}, 404, ANY),
]


@pytest.mark.parametrize("name,path,body,status,param", BAD, ids=[b[0] for b in BAD])
def test_bad_input_is_an_openai_error(server, http, name, path, body, status, param):
    content = body if isinstance(body, str) else json.dumps(body)
    r = http.post(path, content=content, headers={"content-type": "application/json"})
    err = assert_error(r, status)
    if param is not ANY:
        assert err["param"] == param, err
    if name.endswith("unknown_model"):
        assert (err["code"], err["type"]) == ("model_not_found", "not_found_error")
    ok = http.post(C, json={"prompt": "hi", "max_tokens": 1, "temperature": 0})
    assert ok.status_code == 200 and len(ok.json()["choices"]) == 1


def test_unknown_fields_and_neutral_unsupported_ones_are_accepted(server, http):
    body = {"prompt": "hi", "max_tokens": 1, "foo": "bar", "guided_json": None, "top_a": 0.1}
    assert http.post(C, json=body).status_code == 200
    chat = {
        "messages": [{"role": "user", "content": "hi", "name": "x"}],
        "max_tokens": 1,
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "tool_choice": "none",
        "response_format": {"type": "text"},
    }
    assert http.post(CHAT, json=chat).status_code == 200
    # The whole context is there for max_tokens: prompt + max_tokens == max_model_len is accepted.
    n = len(http.post("/tokenize", json={"prompt": "hi"}).json()["tokens"])
    limit = http.get("/v1/models").json()["data"][0]["max_model_len"]
    with http.stream("POST", C, json={"prompt": "hi", "max_tokens": limit - n, "stream": True}) as r:
        assert r.status_code == 200  # accepted (closing the stream aborts it)


def test_a_tiny_temperature_samples_greedily(server, http):
    greedy = http.post(C, json={"prompt": "The Martians", "max_tokens": 6, "temperature": 0}).json()
    tiny = http.post(C, json={"prompt": "The Martians", "max_tokens": 6, "temperature": 1e-38}).json()
    assert tiny["choices"][0]["text"] == greedy["choices"][0]["text"]


def test_openai_client_sees_the_errors(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="gpt-9", prompt="hi", max_tokens=1)
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=server.name, prompt="hi", max_tokens=-1)
    assert e.value.param == "max_tokens" and "max_tokens" in e.value.message


def _read_response(sock: socket.socket) -> bytes:
    """One HTTP/1.1 response with a Content-Length, read off a raw socket."""
    data = b""
    while True:
        head, sep, body = data.partition(b"\r\n\r\n")
        if sep:
            length = next(
                int(v)
                for k, _, v in (h.partition(b":") for h in head.split(b"\r\n")[1:])
                if k.strip().lower() == b"content-length"
            )
            if len(body) >= length:
                return data
        chunk = sock.recv(65536)
        assert chunk, f"the connection closed mid-response: {data[:300]!r}"
        data += chunk


def test_oversized_body_is_refused_before_it_is_read(server):
    host, port = server.url.removeprefix("http://").split(":")
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {MAX_BODY_BYTES + 1}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b'{"prompt": "' + b"x" * 1000)  # the rest is never sent
        response = _read_response(sock)
    status_line, rest = response.split(b"\r\n", 1)
    assert status_line.split()[1] == b"413", response[:300]
    err = json.loads(rest.split(b"\r\n\r\n", 1)[1])["error"]
    assert set(err) == {"message", "type", "param", "code"} and "--max-prompt-chars" in err["message"]
    # The limit follows the prompt limit once the model is served, and is never above MAX_BODY_BYTES.
    assert int(re.search(r"larger than (\d+) bytes", err["message"]).group(1)) <= MAX_BODY_BYTES


def test_chunked_oversized_body_is_refused(server):
    """Without a Content-Length (chunked upload) the limit must hold while the body is read."""
    pad = b"x" * (1 << 20)

    def body():
        yield b'{"prompt": "hi", "max_tokens": 1, "pad": "'
        for _ in range(MAX_BODY_BYTES // len(pad) + 1):
            yield pad
        yield b'"}'

    r = httpx.post(
        f"{server.url}{C}", content=body(), headers={"content-type": "application/json"}, timeout=60
    )
    assert_error(r, 413)


def test_bad_logit_bias_leaves_other_requests_alone(server, http):
    """A request the engine cannot run must be refused at admission, not fail the step of everyone."""
    body = {
        "prompt": "Once upon a time",
        "max_tokens": 40,
        "ignore_eos": True,
        "temperature": 0,
        "stream": True,
    }
    lines: list[str] = []
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", C, json=body) as r:
        it = r.iter_lines()
        for line in it:
            lines.append(line)
            if line.startswith("data: {"):
                break
        bad = http.post(C, json={"prompt": "hi", "max_tokens": 2, "logit_bias": {"99999999": 1}})
        with contextlib.suppress(httpx.HTTPError):  # a stream cut short by the server
            lines.extend(it)
    lines = [line for line in lines if line]  # SSE separates events with blank lines
    assert lines[-1] == "data: [DONE]", f"the other request's stream was cut: {lines[-2:]}"
    assert bad.status_code == 400, bad.text


# ---- disconnects, metrics --------------------------------------------------------------------------------


@pytest.fixture
def abort_leftovers(server) -> Iterator[None]:
    """After the test, abort whatever still runs, so a failed abort does not slow the tests after it."""
    yield
    engine = server.engine.engine
    for _ in range(3):  # the engine thread may add or drop a request while the ids are listed
        with contextlib.suppress(RuntimeError):
            for rid in list(engine.requests):
                server.engine.abort(rid)
            break
    deadline = time.monotonic() + 30
    while engine.has_unfinished_requests() and time.monotonic() < deadline:
        time.sleep(0.05)


def test_stream_disconnect_aborts_and_frees_blocks(server, abort_leftovers):
    before = scrape(server.url)
    aborts = sample(before, "fitllm_requests_finished_total", reason="abort")
    assert sample(before, "fitllm_kv_blocks", state="used") == 0
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, timeout=60) as c, c.stream("POST", C, json=body) as r:
        assert r.status_code == 200
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen == 3:
                break
    assert seen == 3
    m = wait_idle_after_abort(server.url, aborts)
    assert sample(m, "fitllm_requests_finished_total", reason="length") == sample(
        before, "fitllm_requests_finished_total", reason="length"
    )


def test_non_stream_disconnect_aborts(server, abort_leftovers):
    aborts = sample(scrape(server.url), "fitllm_requests_finished_total", reason="abort")
    body = {"prompt": "Once upon a time", "max_tokens": 400, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}{C}", json=body, timeout=httpx.Timeout(30, read=1.0))
    wait_idle_after_abort(server.url, aborts)


def test_metrics(server, http):
    assert http.post(C, json={"prompt": "hi", "max_tokens": 3, "temperature": 0}).status_code == 200
    r = http.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
    m = scrape(server.url)
    assert sample(m, "fitllm_ready") == 1
    assert sample(m, "fitllm_memory_bytes", tag="weights") > 0
    assert sample(m, "fitllm_memory_budget_bytes") >= sample(m, "fitllm_memory_total_bytes") > 0
    for state in ("used", "cached", "free"):
        assert ("fitllm_kv_blocks", (("state", state),)) in m
    for state in ("running", "waiting", "swapped"):
        assert ("fitllm_requests", (("state", state),)) in m
    assert sample(m, "fitllm_time_to_first_token_seconds_count") >= 1
    assert sample(m, "fitllm_time_per_output_token_seconds_count") >= 1
    assert sample(m, "fitllm_generation_tokens_total") >= 3
    assert sample(m, "fitllm_prompt_tokens_total") >= 1
    assert sample(m, "fitllm_requests_finished_total", reason="length") >= 1


# ---- the tiny server: API key and a full queue -----------------------------------------------------------


def test_api_key(tiny):
    lower = {"authorization": f"bearer {API_KEY}"}  # the scheme is case-insensitive (RFC 9110)
    assert httpx.get(f"{tiny.url}/v1/models", headers=lower).status_code == 200
    # What a KoboldAI front end reads to find the server and learn that it needs a key stays open.
    version = httpx.get(f"{tiny.url}/api/extra/version")
    assert version.status_code == 200 and version.json()["protected"] is True
    assert httpx.get(f"{tiny.url}/api/v1/config/max_context_length").status_code == 200
    assert_error(httpx.post(f"{tiny.url}/api/v1/generate", json={"prompt": "t5"}), 401)
    assert_error(httpx.post(f"{tiny.url}/api/extra/tokencount", json={"prompt": "t5"}), 401)
    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": API_KEY}):
        err = assert_error(httpx.get(f"{tiny.url}/v1/models", headers=headers), 401)
        assert (err["type"], err["code"]) == ("authentication_error", "invalid_api_key")
    assert_error(httpx.post(f"{tiny.url}/tokenize", json={"prompt": "t5"}), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{tiny.url}/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=f"{tiny.url}/v1", api_key=API_KEY, max_retries=0)
    assert [m.id for m in good.models.list().data] == [tiny.name]
    auth = {"authorization": f"Bearer {API_KEY}"}
    tokens = httpx.post(f"{tiny.url}/tokenize", json={"prompt": "t5 t6"}, headers=auth).json()["tokens"]
    assert tokens == [5, 6]
    assert httpx.get(f"{tiny.url}/health").status_code == 200
    assert httpx.get(f"{tiny.url}/metrics").status_code == 200
    # A key does not open the server to every web page: a foreign origin is refused (403) before the key
    # is looked at; allowed origins (test_server_doors.py) get CORS answers, refusals included.
    preflight = httpx.options(
        f"{tiny.url}/v1/completions",
        headers={"origin": "http://example.com", "access-control-request-method": "POST"},
    )
    assert assert_error(preflight, 403)["code"] == "origin_not_allowed"


def test_full_queue_is_503_with_retry_after(tiny):
    auth = {"authorization": f"Bearer {API_KEY}"}
    for stream in (False, True):
        body = {"prompt": "t5 t6 t7", "max_tokens": 2, "stream": stream}
        r = httpx.post(f"{tiny.url}/v1/completions", json=body, headers=auth, timeout=60)
        err = assert_error(r, 503)
        assert err["type"] == "service_unavailable" and int(r.headers["retry-after"]) >= 1
    # No chat template on this checkpoint: a 400 naming messages, not a 500.
    r = httpx.post(f"{tiny.url}/v1/chat/completions", json={"messages": MESSAGES}, headers=auth, timeout=60)
    assert assert_error(r, 400)["param"] == "messages"


def test_health_while_loading_and_after_a_failed_start():
    gate = threading.Event()

    def factory(_: EngineConfig) -> Engine:
        gate.wait(60)
        raise RuntimeError("boom")

    engine = AsyncEngine(EngineConfig(), engine_factory=factory)
    with serve(engine, "broken", wait_ready=False) as s:
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503 and r.json()["status"] == "loading" and r.headers["retry-after"]
        assert_error(httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"}), 503)
        assert sample(scrape(s.url), "fitllm_ready") == 0
        gate.set()
        with pytest.raises(EngineDead, match="boom"):
            engine.wait_ready(30)
        r = httpx.get(f"{s.url}/health")
        assert r.status_code == 503 and "boom" in r.json()["status"]
        err = assert_error(httpx.post(f"{s.url}/v1/completions", json={"prompt": "hi"}), 503)
        assert "boom" in err["message"]


def test_shutdown_lets_in_flight_streams_finish_then_stops_the_engine(tmp_path):
    from conftest import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path, family="llama")
    config = EngineConfig(model=str(folder), dtype="float32", max_model_len=128, profile_workspace=False)
    engine = AsyncEngine(config)
    with serve(engine, "tiny") as s:
        body = {"prompt": "t5 t6 t7", "max_tokens": 60, "ignore_eos": True, "stream": True}
        lines: list[str] = []
        with httpx.stream("POST", f"{s.url}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 2:
                    s.server.should_exit = True  # what SIGINT / SIGTERM does
        assert lines[-1] == "data: [DONE]"
        finals = [json.loads(x[6:]) for x in lines[:-1]]
        assert finals[-1]["choices"][0]["finish_reason"] == "length"  # it ran to the end
        assert sum(1 for f in finals if f["choices"][0]["text"]) >= 2
        deadline = time.monotonic() + 30
        while engine.alive:  # the lifespan stops the engine thread after the last request
            assert time.monotonic() < deadline, "the engine thread did not stop"
            time.sleep(0.05)
        assert not engine.ready
