"""The server's doors (issue 22), through real HTTP: the Host and Origin allow-lists (DNS rebinding, pages
that call the API cross-origin), Kobold genkeys nobody can take over, bounded memory for what clients
control (genkeys, finished jobs, slow readers), a client's priority only under
--scheduling-policy priority, bodies refused with a 400 (lone surrogates, deep nesting), 405's Allow,
/openapi.json as the server answers, and KV block states that add up.

Two servers on one tiny random checkpoint, each step slowed a little so a generation lasts long enough to
be talked over: the defaults, and one opened as a user would for KoboldAI Lite (a file page and another
local port), a LAN name, and priority scheduling with one seat.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from live_server import Served, assert_error, sample, scrape, serve
from stand_ins import slow_engine

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.server.access import AccessPolicy
from fitllm.server.kobold.jobs import MAX_GENKEY_CHARS, KoboldJobs
from fitllm.server.streaming import merged

STEP_DELAY_S = 0.01
LITE_ORIGINS = ["null", "http://localhost:5001"]  # KoboldAI Lite opened from a file / from KoboldCpp


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from conftest import make_random_checkpoint

    return make_random_checkpoint(tmp_path_factory.mktemp("doors"), family="llama")


def _config(folder, **kw) -> EngineConfig:
    return EngineConfig(model=str(folder), dtype="float32", max_model_len=128, profile_workspace=False, **kw)


def _slow(config: EngineConfig) -> Engine:
    return slow_engine(config, STEP_DELAY_S)


@pytest.fixture(scope="module")
def default(folder) -> Iterator[Served]:
    with serve(AsyncEngine(_config(folder), engine_factory=_slow), "tiny") as s:
        yield s


@pytest.fixture(scope="module")
def opened(folder) -> Iterator[Served]:
    access = AccessPolicy.build(["myhost.lan,.home.arpa"], LITE_ORIGINS)
    engine = AsyncEngine(_config(folder, max_num_seqs=1), engine_factory=_slow)
    with serve(engine, "tiny", access=access, scheduling_policy="priority") as s:
        yield s


def _port(s: Served) -> str:
    return s.url.rsplit(":", 1)[1]


# ---- Host (DNS rebinding) --------------------------------------------------------------------------------

HOSTS = [  # (Host header, {port} filled in; allowed by default; allowed by the opened server)
    ("127.0.0.1:{port}", True, True),
    ("localhost:{port}", True, True),
    ("localhost", True, True),
    ("LocalHost.:{port}", True, True),
    ("[::1]:{port}", True, True),
    ("studio.localhost:{port}", True, True),
    ("192.168.1.20:{port}", True, True),  # an address: rebinding needs a name
    ("evil.example:{port}", False, False),
    ("evil.example", False, False),
    ("localhost.evil.example:{port}", False, False),
    ("myhost.lan:{port}", False, True),
    ("myhost.lan", False, True),
    ("pc.home.arpa:{port}", False, True),
    ("home.arpa", False, True),
]


@pytest.mark.parametrize("host,by_default,when_opened", HOSTS, ids=[h[0] for h in HOSTS])
def test_host_allow_list(default, opened, host, by_default, when_opened):
    for server, allowed in ((default, by_default), (opened, when_opened)):
        headers = {"host": host.format(port=_port(server))}
        r = httpx.get(f"{server.url}/v1/models", headers=headers, timeout=30)
        if allowed:
            assert r.status_code == 200, r.text
        else:
            err = assert_error(r, 403)
            assert err["code"] == "host_not_allowed" and "--allowed-hosts" in err["message"]


def test_access_policy_names():
    bound = AccessPolicy.build(bound_host="inference.lan")
    assert bound.host_allowed("inference.lan:7860") and bound.host_allowed("INFERENCE.LAN")
    assert not bound.host_allowed("other.lan")
    off = AccessPolicy.build(["*"])
    assert off.host_allowed("evil.example") and not off.any_origin
    anyone = AccessPolicy.build(allowed_origins=["*"])
    assert anyone.origin_allowed("http://evil.example", "127.0.0.1:1") and anyone.cors_origins() == ["*"]


# ---- Origin (pages in the browser) --------------------------------------------------------------------------

ORIGINS = [  # (Origin, {port} filled in; allowed by default; allowed by the opened server)
    ("http://127.0.0.1:{port}", True, True),  # the server's own page (the studio)
    ("http://127.0.0.1:9", False, False),  # another local port
    ("http://evil.example", False, False),
    ("null", False, True),  # KoboldAI Lite opened from a file
    ("http://localhost:5001", False, True),  # Lite served by KoboldCpp on its port
    ("https://localhost:5001", False, False),
]


@pytest.mark.parametrize("origin,by_default,when_opened", ORIGINS, ids=[o[0] for o in ORIGINS])
def test_origin_allow_list(default, opened, origin, by_default, when_opened):
    for server, allowed in ((default, by_default), (opened, when_opened)):
        value = origin.format(port=_port(server))
        r = httpx.post(f"{server.url}/tokenize", json={"prompt": "t5 t6"}, headers={"origin": value})
        preflight = httpx.options(
            f"{server.url}/v1/completions",
            headers={
                "origin": value,
                "access-control-request-method": "POST",
                "access-control-request-headers": "content-type,authorization",
            },
        )
        if not allowed:
            for refused in (r, preflight):
                err = assert_error(refused, 403)
                assert err["code"] == "origin_not_allowed" and "--allowed-origins" in err["message"]
            continue
        assert r.status_code == 200 and r.json()["tokens"] == [5, 6]
        if value in LITE_ORIGINS:  # cross-origin: the browser needs the CORS answer
            assert r.headers["access-control-allow-origin"] == value
            assert preflight.status_code == 200, preflight.text
            assert preflight.headers["access-control-allow-origin"] == value
            assert "POST" in preflight.headers["access-control-allow-methods"]


def test_a_simple_cross_origin_post_is_refused_before_it_runs(default, opened):
    """A page's text/plain POST skips the CORS preflight; the Kobold routes read it as JSON. From a
    foreign origin it must not run at all (not only have its answer hidden), and from an allowed one it
    works (KoboldAI Lite from a file)."""
    body = json.dumps({"prompt": "t5 t6 t7", "max_length": 3, "temperature": 0})
    for server in (default, opened):
        rebound = f"evil.example:{_port(server)}"  # a page whose name now resolves to 127.0.0.1
        foreign = [
            ({"origin": "http://evil.example"}, "origin_not_allowed"),
            ({"origin": f"http://{rebound}", "host": rebound}, "host_not_allowed"),
        ]
        before = sample(scrape(server.url), "fitllm_prompt_tokens_total")
        for headers, code in foreign:
            for path in ("/api/v1/generate", "/api/extra/generate/stream"):
                r = httpx.post(
                    f"{server.url}{path}", content=body, headers={"content-type": "text/plain"} | headers
                )
                assert assert_error(r, 403)["code"] == code
        assert sample(scrape(server.url), "fitllm_prompt_tokens_total") == before  # nothing was admitted
    lite = httpx.post(
        f"{opened.url}/api/v1/generate",
        content=body,
        headers={"content-type": "text/plain", "origin": "null"},
        timeout=60,
    )
    assert lite.status_code == 200 and lite.headers["access-control-allow-origin"] == "null"
    assert lite.json()["results"][0]["completion_tokens"] == 3


# ---- Kobold genkeys ---------------------------------------------------------------------------------------


def _post(server: Served, path: str, body: dict) -> httpx.Response:
    """POST `body` as JSON with every non-ASCII character escaped (so a lone surrogate can be sent)."""
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server.url}{path}", content=json.dumps(body), headers=headers, timeout=60)


def test_a_genkey_in_use_cannot_be_taken_over(default):
    key = "KCPP1234"
    body = {"prompt": "t5 t6 t7", "max_length": 100, "temperature": 0, "genkey": key,
            "use_default_badwordsids": True}  # fmt: skip
    with httpx.stream("POST", f"{default.url}/api/extra/generate/stream", json=body, timeout=60) as r:
        lines = r.iter_lines()
        first = json.loads(next(line for line in lines if line.startswith("data:"))[5:])["token"]
        # A second client with the same genkey is refused, and cannot abort or read the first's job.
        err = assert_error(_post(default, "/api/v1/generate", body | {"max_length": 2}), 409)
        assert (err["param"], err["code"]) == ("genkey", "genkey_in_use")
        assert _post(default, "/api/extra/abort", {"genkey": "KCPP9999"}).json()["success"] == "false"
        assert _post(default, "/api/extra/abort", {}).json()["success"] == "false"
        text = _post(default, "/api/extra/generate/check", {"genkey": key}).json()["results"][0]["text"]
        assert text.startswith(first)
        assert _post(default, "/api/extra/abort", {"genkey": key}).json() == {
            "success": "true",
            "done": "true",
        }
        events = [json.loads(line[5:]) for line in lines if line.startswith("data:")]
    assert events[-1]["finish_reason"] == "stop"  # aborted by its owner, before max_length
    owner_text = first + "".join(e["token"] for e in events)
    assert len(owner_text.split()) < 100
    assert (
        _post(default, "/api/extra/generate/check", {"genkey": key}).json()["results"][0]["text"]
        == owner_text
    )
    # Once it ended, the genkey may start a new job.
    again = _post(default, "/api/v1/generate", body | {"max_length": 2})
    assert again.status_code == 200 and again.json()["results"][0]["completion_tokens"] == 2


@pytest.mark.parametrize("path", ["/api/v1/generate", "/api/extra/generate/check", "/api/extra/abort"])
def test_oversized_genkeys_are_refused(default, path):
    body = {"prompt": "t5", "max_length": 1, "genkey": "K" * (MAX_GENKEY_CHARS + 1)}
    assert assert_error(_post(default, path, body), 400)["param"] == "genkey"


def test_finished_jobs_are_forgotten_beyond_the_bound():
    jobs = KoboldJobs(max_finished=8)
    running = jobs.start("r-run", "RUNNING")
    for i in range(50):
        jobs.start(f"r{i}", f"KCPP{i:04d}").done = True
    assert len(jobs.by_genkey) <= 8 + 2 and jobs.find("RUNNING") is running
    assert jobs.find("KCPP0049") is not None and jobs.find("KCPP0000") is None  # oldest forgotten first


# ---- slow readers ----------------------------------------------------------------------------------------


def test_a_slow_reader_holds_one_merged_output(folder):
    """A client that does not read: its request's outputs are merged while they wait (one output, its
    deltas joined), and a reader that comes back gets exactly the text a prompt reader got."""
    engine = AsyncEngine(_config(folder)).start()
    engine.wait_ready(120)
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)

    async def main() -> None:
        prompt = [5, 6, 7]
        reference = [out async for out in engine.generate(prompt, params)]
        want_text = reference[-1].outputs[0].text
        want_ids = reference[-1].outputs[0].token_ids
        assert len(reference) > 10 and "".join(o.outputs[0].delta_text for o in reference) == want_text
        slow = await engine.add(prompt, params)
        pair = [(0, await engine.add(prompt, params)), (1, await engine.add(prompt, params))]
        together = merged(pair)
        first = await anext(together)
        while any(engine.is_running(s.request_id) for s in (slow, pair[0][1], pair[1][1])):
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)  # the last outputs reach this loop
        assert slow._outputs.pending is not None and slow._outputs.pending.finished  # one output waits
        (out,) = [o async for o in slow]
        assert out.outputs[0].delta_token_ids == want_ids and out.outputs[0].delta_text == want_text
        rest = [x async for x in together]
        assert len(rest) <= 3  # per stream at most the output being read and one merged output
        for k in (0, 1):
            got = [o for i, o in [first, *rest] if i == k]
            assert "".join(o.outputs[0].delta_text for o in got) == want_text and got[-1].finished
            assert [t for o in got for t in o.outputs[0].delta_token_ids] == want_ids

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


# ---- priority -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": "t5", "max_tokens": 1, "priority": 5}),
        ("/v1/completions", {"prompt": "t5", "max_tokens": 1, "priority": -1, "stream": True}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "t5"}], "priority": 3}),
    ],
)
def test_priority_is_refused_under_fcfs(default, path, body):
    err = assert_error(_post(default, path, body), 400)
    assert err["param"] == "priority" and "--scheduling-policy priority" in err["message"]
    assert (
        _post(
            default, path.replace("chat/", ""), {"prompt": "t5", "max_tokens": 1, "priority": 0}
        ).status_code
        == 200
    )


def test_priority_orders_admission_under_the_priority_policy(opened):
    """One seat: a long request holds it; a low-priority (10) then a high-priority (-5) request wait; the
    high-priority one runs first, though it came later."""
    finished: list[str] = []

    def run(name: str, priority: int) -> None:
        r = _post(opened, "/v1/completions", {"prompt": "t5 t6", "max_tokens": 2, "priority": priority})
        assert r.status_code == 200, r.text
        finished.append(name)

    long = {"prompt": "t5 t6 t7", "max_tokens": 90, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{opened.url}/v1/completions", json=long, timeout=60) as r:
        lines = r.iter_lines()
        next(line for line in lines if line.startswith("data: {"))
        low = threading.Thread(target=run, args=("low", 10))
        low.start()
        time.sleep(0.2)
        high = threading.Thread(target=run, args=("high", -5))
        high.start()
        time.sleep(0.2)
        for _ in lines:
            pass
    low.join(60)
    high.join(60)
    assert finished == ["high", "low"]


# ---- bodies that are a 400, not a 500 ---------------------------------------------------------------------

S = "a\ud800b"
SURROGATES = [  # (path, body, param)
    ("/v1/completions", {"prompt": S}, "prompt"),
    ("/v1/completions", {"prompt": ["t5", S]}, "prompt"),
    ("/v1/completions", {"prompt": "t5", "stop": ["\udc00"]}, "stop"),
    ("/v1/completions", {"prompt": "t5", "logit_bias": {S: 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": S}]}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": S}]}]}, "messages"),
    ("/tokenize", {"prompt": S}, "prompt"),
    ("/tokenize", {"messages": [{"role": "user", "content": S}]}, "messages"),
    ("/api/v1/generate", {"prompt": S}, "prompt"),
    ("/api/v1/generate", {"prompt": "t5", "memory": S}, "memory"),
    ("/api/v1/generate", {"prompt": "t5", "stop_sequence": [S]}, "stop_sequence"),
    ("/api/extra/generate/stream", {"prompt": S}, "prompt"),
    ("/api/extra/tokencount", {"prompt": S}, "prompt"),
    ("/api/extra/generate/check", {"genkey": S}, "genkey"),
    ("/studio/api/context", {"story": S}, "story"),
    ("/studio/api/generate", {"memory": S}, "memory"),
]  # fmt: skip


@pytest.mark.parametrize("path,body,param", SURROGATES, ids=[f"{p}-{q}" for p, _, q in SURROGATES])
def test_lone_surrogates_are_a_400(default, path, body, param):
    err = assert_error(_post(default, path, body), 400)
    assert err["param"] == param and "surrogate" in err["message"], err


def test_a_surrogate_pair_is_a_character(default):
    r = _post(default, "/tokenize", {"prompt": "\U0001f600 t5"})  # sent as the pair \ud83d\ude00
    assert r.status_code == 200, r.text


DEEP = "[" * 100_000 + "]" * 100_000
NESTED = [
    "/api/v1/generate",
    "/api/extra/generate/stream",
    "/api/extra/generate/check",
    "/api/extra/abort",
    "/api/extra/tokencount",
    "/v1/completions",
    "/tokenize",
    "/studio/api/context",
]


@pytest.mark.parametrize("path", NESTED)
def test_deep_nesting_is_a_400(default, path):
    content = '{"prompt": ' + DEEP + "}"
    r = httpx.post(f"{default.url}{path}", content=content, headers={"content-type": "application/json"})
    assert_error(r, 400)


# ---- 405, OpenAPI, KV block states -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "method,path,allow",
    [("GET", "/v1/completions", {"POST"}), ("DELETE", "/api/extra/generate/check", {"GET", "POST"}),
     ("PUT", "/health", {"GET"})],
)  # fmt: skip
def test_405_says_what_is_allowed(default, method, path, allow):
    r = httpx.request(method, f"{default.url}{path}")
    assert_error(r, 405)
    assert {m.strip() for m in r.headers["allow"].split(",")} >= allow


def test_openapi_documents_what_the_server_answers(default):
    doc = httpx.get(f"{default.url}/openapi.json").json()
    text = json.dumps(doc)
    assert '"422"' not in text and "HTTPValidationError" not in text
    assert set(doc["components"]["schemas"]["Error"]["properties"]["error"]["required"]) == {
        "message", "type", "param", "code"
    }  # fmt: skip
    for path in ("/v1/completions", "/v1/chat/completions", "/tokenize", "/api/v1/generate"):
        bad = doc["paths"][path]["post"]["responses"]["400"]
        assert bad["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Error"}
    metrics = doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert list(metrics) == ["text/plain"]


def test_kv_block_states_add_up(default):
    assert _post(default, "/v1/completions", {"prompt": "t5 " * 40, "max_tokens": 2}).status_code == 200
    m = scrape(default.url)
    states = {s: sample(m, "fitllm_kv_blocks", state=s) for s in ("used", "cached", "free")}
    assert states["cached"] > 0  # the prompt's full blocks stay cached for prefix reuse
    assert sum(states.values()) == default.engine.engine.pool.num_blocks
    studio = httpx.get(f"{default.url}/studio/api/memory").json()["kv_blocks"]
    assert sum(studio.values()) == default.engine.engine.pool.num_blocks
