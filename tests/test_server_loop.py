"""The event loop stays free and the prompt limits hold (issue 22 item 2), hostile chat templates are bounded
(item 7's template half), and a shutdown ends every accepted request properly (item 3).

One tiny random checkpoint whose chat template turns hostile on cue (a user message "boom" repeats a string
10^8 times, "spin" loops 10^10 times without output), served in this process; the shutdown test runs
`fitllm serve` as a real subprocess and sends it SIGTERM.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from live_server import Served, assert_error, sample, scrape, serve

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.loader.chat_template import TemplateBoundExceeded, render_chat_template
from fitllm.memory.host import host_memory
from fitllm.server.heavy import CHARS_PER_TOKEN_BOUND, ServerLimits

C, CHAT = "/v1/completions", "/v1/chat/completions"
MAX_MODEL_LEN = 128
TEMPLATE = (
    "{% if messages[0]['content'] == 'boom' %}{{ 'x' * 100000000 }}"
    "{% elif messages[0]['content'] == 'spin' %}"
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    "{% else %}{% for m in messages %}{{ m['content'] }} {% endfor %}{% endif %}"
)


def _checkpoint(tmp_path: Path, **overrides) -> Path:
    from conftest import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path, family="llama", **overrides)
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATE}))
    return folder


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Iterator[Served]:
    """The tiny checkpoint with the cue-driven template, served with the default prompt limit."""
    folder = _checkpoint(tmp_path_factory.mktemp("loop"))
    config = EngineConfig(
        model=str(folder), dtype="float32", max_model_len=MAX_MODEL_LEN, profile_workspace=False
    )
    with serve(AsyncEngine(config), "tiny", limits=ServerLimits(template_timeout_s=1.0)) as s:
        yield s


@contextlib.contextmanager
def raised_limit(served: Served, chars: int) -> Iterator[None]:
    """--max-prompt-chars raised for the block, so large prompts are tokenized."""
    limits = served.server.config.app.state.fitllm.limits
    limits.max_prompt_chars = chars
    try:
        yield
    finally:
        limits.max_prompt_chars = None


@contextlib.contextmanager
def health_latency(url: str) -> Iterator[list[float]]:
    """Polls /health on its own connection while the block runs; yields the list of latencies."""
    latencies: list[float] = []
    stop = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=url, timeout=30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                assert c.get("/health").status_code == 200
                latencies.append(time.perf_counter() - t)
                time.sleep(0.01)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    try:
        yield latencies
    finally:
        stop.set()
        thread.join(30)


def test_health_answers_while_a_large_prompt_is_tokenized_and_a_hostile_template_renders(tiny):
    url = tiny.url
    text = " ".join(f"t{i % 200}" for i in range((8 << 20) // 5))[: 8 << 20]  # 8 MiB, ~1.6M tokens
    rss_before = host_memory().rss
    with (
        raised_limit(tiny, 64 << 20),
        health_latency(url) as latencies,
        httpx.Client(base_url=url, timeout=120) as c,
    ):
        time.sleep(0.1)
        t = time.perf_counter()
        big = c.post(C, json={"prompt": text, "max_tokens": 1})
        big_s = time.perf_counter() - t
        boom = c.post(CHAT, json={"messages": [{"role": "user", "content": "boom"}]})
        t = time.perf_counter()
        spin = c.post(CHAT, json={"messages": [{"role": "user", "content": "spin"}]})
        spin_s = time.perf_counter() - t
        ok = c.post(CHAT, json={"messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 2})
    err = assert_error(big, 400)  # tokenized (the limit allows it), then too many tokens for the context
    assert err["param"] == "prompt" and f"maximum context length is {MAX_MODEL_LEN} tokens" in err["message"]
    assert "past its limit" in assert_error(boom, 400)["message"]
    assert "longer than 1 s" in assert_error(spin, 400)["message"] and spin_s < 5
    assert ok.status_code == 200, ok.text
    # The loop answered all along: before, it was blocked for the whole tokenization (most of big_s). The
    # bound is relative to big_s, since on a loaded machine one health check can wait its turn for a core.
    assert len(latencies) >= 5
    assert max(latencies) < max(0.25, 0.4 * big_s), (max(latencies), big_s, sorted(latencies)[-5:])
    # The heap the work used is handed back (glibc would otherwise keep it).
    rss_after = host_memory().rss
    assert rss_after - rss_before < 150 << 20, (rss_before >> 20, rss_after >> 20)


# ---- prompt limits: refused before tokenizing ---------------------------------------------------------

LIMIT = MAX_MODEL_LEN * CHARS_PER_TOKEN_BOUND
LONG = "t5 " * (LIMIT // 3 + 10)
LIMIT_ROWS = [
    ("completion", C, {"prompt": LONG, "max_tokens": 1}, "prompt"),
    ("completion_list", C, {"prompt": ["t5", LONG], "max_tokens": 1}, "prompt"),
    ("chat", CHAT, {"messages": [{"role": "user", "content": LONG}]}, "messages"),
    ("chat_split", CHAT, {"messages": [{"role": "user", "content": LONG[: LIMIT // 2]}] * 3}, "messages"),
    ("tokenize", "/tokenize", {"prompt": LONG}, "prompt"),
    ("kobold_generate", "/api/v1/generate", {"prompt": LONG[:-50], "memory": "t6 " * 30}, "prompt"),
    ("kobold_stream", "/api/extra/generate/stream", {"prompt": LONG}, "prompt"),
    ("kobold_tokencount", "/api/extra/tokencount", {"prompt": LONG}, "prompt"),
    ("studio", "/studio/api/context", {"story": LONG}, "story"),
]


@pytest.mark.parametrize("name,path,body,param", LIMIT_ROWS, ids=[r[0] for r in LIMIT_ROWS])
def test_prompt_over_the_character_limit_is_refused_before_tokenizing(tiny, name, path, body, param):
    tok = tiny.engine.engine.tokenizer
    calls = []
    encode = tok.encode
    tok.encode = lambda *a, **k: calls.append(a) or encode(*a, **k)
    try:
        r = httpx.post(f"{tiny.url}{path}", json=body, timeout=60)
    finally:
        del tok.encode
    err = assert_error(r, 400)
    assert err["param"] == param, err
    assert str(LIMIT) in err["message"] and "--max-prompt-chars" in err["message"], err
    assert not any(len(a[0]) > LIMIT for a in calls), "the long prompt was tokenized"
    # Just under the limit is served (a 400 for tokens past the context at most, never for characters).
    r = httpx.post(f"{tiny.url}/tokenize", json={"prompt": "t5 " * (LIMIT // 3 - 1)}, timeout=60)
    assert r.status_code == 200 and r.json()["count"] == LIMIT // 3 - 1


def read_http_reply(conn: socket.socket) -> str:
    """One whole HTTP/1.1 reply: headers and body may come in separate TCP segments, so read until the
    body has the Content-Length the headers announce."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return data.decode()
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":", 1)[1])
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return (head + b"\r\n\r\n" + body).decode()


def test_a_body_larger_than_any_prompt_needs_is_refused_before_it_is_read(tiny):
    """The body limit follows the prompt limit (8 bytes a character + 1 MiB, at most 32 MiB): a 30 MiB body
    to a small-context server is a 413 from its Content-Length, never parsed; raising --max-prompt-chars
    raises it."""
    from fitllm.server.app import BODY_BYTES_PER_PROMPT_CHAR
    from fitllm.server.heavy import CHARS_PER_TOKEN_BOUND

    chars = tiny.engine.served_model.max_model_len * CHARS_PER_TOKEN_BOUND
    limit = BODY_BYTES_PER_PROMPT_CHAR * chars + (1 << 20)
    assert limit < 30 << 20
    # Headers announcing 30 MiB, and no body at all: the answer comes without one byte of it read.
    host, port = tiny.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as conn:
        conn.sendall(
            f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {30 << 20}\r\n\r\n".encode()
        )
        reply = read_http_reply(conn)
    status, _, body = reply.partition("\r\n\r\n")
    assert status.startswith("HTTP/1.1 413"), reply
    message = json.loads(body)["error"]["message"]
    assert str(limit) in message and "--max-prompt-chars" in message, message
    with raised_limit(
        tiny, limit
    ):  # a body this size is now a prompt the server reads (and refuses by tokens)
        r = httpx.post(f"{tiny.url}/tokenize", json={"prompt": "t5 " * (limit // 3 - 10)}, timeout=60)
    assert r.status_code == 200, r.text


# ---- hostile templates, directly ------------------------------------------------------------------------

HOSTILE = [
    "{{ 'x' * 100000000 }}",
    "{{ ['x'] * 100000000 }}",
    "{{ 'x'|center(1000000000) }}",
    "{{ 'x'.ljust(1000000000) }}",
    "{{ '%999999999s' % 'a' }}",
    "{{ '{:>999999999}'.format('a') }}",
    "{{ 2 ** 100000000 }}",
    "{% set ns = namespace(s='x' * 1000) %}{% for i in range(30) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{{ 'y' * 100 }}{% endfor %}{% endfor %}",
    "{% set t %}{% for i in range(100000) %}{% for j in range(1000) %}yyyy{{ 'y' }}{% endfor %}{% endfor %}"
    "{% endset %}",
    "{{ ('x' * 10000)|replace('x', 'y' * 10000) }}",
    "{{ range(100000)|list|join('a' * 1000) }}",
    "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "{% for a in messages %}{% for b in messages %}{% for c in messages %}{% endfor %}{% endfor %}{% endfor %}",
]


@pytest.mark.parametrize("source", HOSTILE)
def test_hostile_template_is_refused_quickly(source):
    t = time.perf_counter()
    with pytest.raises(TemplateBoundExceeded):
        render_chat_template(source, max_chars=1 << 20, timeout_s=0.5, messages=[{"content": "c"}] * 2000)
    assert time.perf_counter() - t < 3


def test_real_template_renders_as_the_plain_sandbox_does():
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    source = (
        "{% for m in messages %}{{ '<|' + m['role'] + '|>' }}{{ m['content']|trim }}{{ eos_token }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
        "{{ '%-5s|' % 'ab' }}{{ 'x' * 3 }}{{ ['a', 'b']|join(', ') }}{{ 'abc'.replace('b', 'B') }}"
    )
    variables = dict(
        messages=[{"role": "user", "content": " hi "}, {"role": "assistant", "content": "yo"}],
        add_generation_prompt=True,
        eos_token="</s>",
    )
    plain = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True).from_string(source)
    assert render_chat_template(source, **variables) == plain.render(**variables)
    with pytest.raises(TemplateBoundExceeded, match="limit of 10 characters"):
        render_chat_template("{{ m }}", max_chars=10, m="y" * 11)


# ---- shutdown under load ---------------------------------------------------------------------------------

SHUTDOWN_S = 4.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def fitllm_serve(folder: Path, *flags: str) -> Iterator[tuple[str, subprocess.Popen]]:
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).parents[1]))
    cmd = [sys.executable, "-m", "fitllm.cli", "serve", "--model", str(folder), "--port", str(port), *flags]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, proc.stderr.read()
            with contextlib.suppress(httpx.TransportError):
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.2)
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(30)


class Outcome:
    """One request's ending, as its client saw it."""

    def __init__(self) -> None:
        self.status: int | None = None
        self.events: list[str] = []
        self.body: dict | None = None
        self.headers: dict = {}
        self.first = threading.Event()
        self.ended_at: float | None = None
        self.failure: BaseException | None = None


def _run(url: str, body: dict, out: Outcome, path: str = C) -> None:
    try:
        with httpx.Client(timeout=60) as c, c.stream("POST", f"{url}{path}", json=body) as r:
            out.status, out.headers = r.status_code, dict(r.headers)
            if r.headers.get("content-type", "").startswith("text/event-stream"):
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        out.events.append(line[6:])
                        out.first.set()
            else:
                out.body = json.loads(r.read())
    except BaseException as exc:  # a cut connection: the test reports it
        out.failure = exc
    finally:
        out.ended_at = time.monotonic()
        out.first.set()


def _assert_stream_ended_properly(out: Outcome) -> str:
    """'done' for a complete stream, 'error' for one ended by an error event; never cut."""
    assert out.failure is None and out.status == 200, (out.failure, out.status)
    assert out.events and out.events[-1] == "[DONE]", out.events[-3:]
    last = json.loads(out.events[-2])
    if "error" in last:
        assert set(last["error"]) == {"message", "type", "param", "code"}
        return "error"
    assert last["choices"][0]["finish_reason"] in ("length", "stop")
    return "done"


@pytest.mark.slow
def test_sigterm_under_load_ends_every_accepted_request_properly(tmp_path):
    folder = _checkpoint(tmp_path, max_position_embeddings=4096)
    flags = ("--max-model-len", "4096", "--max-num-seqs", "3", "--dtype", "float32")
    with fitllm_serve(folder, *flags, "--shutdown-timeout", str(SHUTDOWN_S)) as (url, proc):
        long = {"prompt": "t5 t6 t7", "max_tokens": 4000, "ignore_eos": True, "temperature": 0}
        requests = {
            "long_stream": long | {"stream": True},
            "long_plain": long,
            "short_stream": long | {"stream": True, "max_tokens": 40},
        }
        outs = {k: Outcome() for k in [*requests, "queued_stream", "queued_plain"]}
        threads = [threading.Thread(target=_run, args=(url, b, outs[k])) for k, b in requests.items()]
        for t in threads:
            t.start()
        # The short one ends before anything is queued (on a loaded machine it could otherwise free its seat
        # for a queued request); a third long one then takes that seat, so the queue stays a queue.
        threads[2].join(60)
        outs["long_stream2"] = Outcome()
        threads.append(
            threading.Thread(target=_run, args=(url, long | {"stream": True}, outs["long_stream2"]))
        )
        threads[-1].start()
        deadline = time.monotonic() + 60
        while sample(scrape(url), "fitllm_requests", state="running") < 3:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        queued = [
            ("queued_stream", long | {"stream": True}, C),
            ("queued_plain", long, C),
            ("queued_kobold", {"prompt": "t5 t6", "max_length": 2000}, "/api/extra/generate/stream"),
            ("queued_studio", {"story": "t5", "settings": {"max_new_tokens": 2000}}, "/studio/api/generate"),
        ]
        outs |= {k: Outcome() for k, _, _ in queued}
        threads += [threading.Thread(target=_run, args=(url, b, outs[k], p)) for k, b, p in queued]
        for t in threads[4:]:
            t.start()
        while sample(scrape(url), "fitllm_requests", state="waiting") < len(queued):
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert outs["short_stream"].first.wait(30)
        signalled = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        late = httpx.post(f"{url}{C}", json={"prompt": "t5", "max_tokens": 1}, timeout=30)
        for t in threads:
            t.join(60)
        # uvicorn re-raises the signal once it has shut down, so the parent sees how it ended.
        assert proc.wait(SHUTDOWN_S + 15) == -signal.SIGTERM, proc.stderr.read()[-2000:]
        exited = time.monotonic()

    assert exited - signalled < SHUTDOWN_S + 8
    # New requests during the drain: 503 + Retry-After.
    assert_error(late, 503)
    assert int(late.headers["retry-after"]) >= 1
    # Queued requests are told at once, in the API's shape.
    assert outs["queued_stream"].ended_at - signalled < 2
    assert _assert_stream_ended_properly(outs["queued_stream"]) == "error"
    plain = outs["queued_plain"]
    assert plain.ended_at - signalled < 2 and plain.status == 503 and plain.headers["retry-after"]
    assert set(plain.body["error"]) == {"message", "type", "param", "code"}
    for name in ("queued_kobold", "queued_studio"):  # their own stream shapes, with the error in them
        out = outs[name]
        assert out.failure is None and out.status == 200 and out.ended_at - signalled < 2, name
        last = json.loads(out.events[-1])
        assert last["error"]["type"] == "service_unavailable" and "shutting down" in last["error"]["message"]
        assert last.get("finish_reason") == "error" if name == "queued_kobold" else last["done"] is True
    # The short one finishes; the long ones finish or end at the deadline with an error, never cut.
    assert _assert_stream_ended_properly(outs["short_stream"]) == "done"
    long_plain = outs["long_plain"]
    for long_stream in (outs["long_stream"], outs["long_stream2"]):
        if _assert_stream_ended_properly(long_stream) == "error":
            assert long_stream.ended_at - signalled >= SHUTDOWN_S - 0.5
    assert long_plain.failure is None, long_plain.failure
    if long_plain.status == 503:
        assert set(long_plain.body["error"]) == {"message", "type", "param", "code"}
        assert long_plain.ended_at - signalled >= SHUTDOWN_S - 0.5
    else:
        assert long_plain.status == 200 and long_plain.body["choices"][0]["finish_reason"] == "length"
