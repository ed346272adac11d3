"""Long stories through HTTP (issue 20): every route's `context_shift` choice reaches the engine as the body, the
server's --context-shift and the route's default decide it; the prompt's reuse (prefix cache / shift / host /
prefilled) comes back in each route's response shape and in /metrics; a model that cannot shift is trimmed
in large steps and counted. A tiny random checkpoint (fast), served for real on a loopback port."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import openai
import pytest
from live_server import Served, sample, scrape, serve
from stand_ins import AddTap

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.server.state import ServerState

CHAT_TEMPLATE = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
MAX_MODEL_LEN = 256
BLOCK = 16


def words(n: int, start: int = 3) -> str:
    """`n` tokens of the tiny WordLevel tokenizer ("t3 t4 ..."), never BOS / EOS."""
    return " ".join(f"t{start + i % 200}" for i in range(n))


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    from conftest import make_random_checkpoint

    root = tmp_path_factory.mktemp("story")
    out = {}
    for family in ("llama", "xglm"):
        folder = make_random_checkpoint(root, family=family)
        (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": CHAT_TEMPLATE}))
        out[family] = folder
    return out


@contextlib.contextmanager
def tiny(folder: Path, context_shift: str = "auto", **app_options) -> Iterator[Served]:
    config = EngineConfig(
        model=str(folder),
        dtype="float32",
        max_model_len=MAX_MODEL_LEN,
        block_size=BLOCK,
        profile_workspace=False,
        context_shift=context_shift,
    )
    with serve(AsyncEngine(config), "tiny", **app_options) as s:
        yield s


def _kobold(url: str, extra: dict) -> httpx.Response:
    return httpx.post(
        f"{url}/api/v1/generate", json={"prompt": words(5), "max_length": 2} | extra, timeout=60
    )


def _kobold_stream(url: str, extra: dict) -> httpx.Response:
    body = {"prompt": words(5), "max_length": 2} | extra
    return httpx.post(f"{url}/api/extra/generate/stream", json=body, timeout=60)


def _completions(url: str, extra: dict) -> httpx.Response:
    return httpx.post(f"{url}/v1/completions", json={"prompt": words(5), "max_tokens": 2} | extra, timeout=60)


def _chat(url: str, extra: dict) -> httpx.Response:
    body = {"messages": [{"role": "user", "content": words(5)}], "max_tokens": 2} | extra
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)


def _studio(url: str, extra: dict) -> httpx.Response:
    body = {"story": words(5), "settings": {"max_new_tokens": 2}} | extra
    return httpx.post(f"{url}/studio/api/generate", json=body, timeout=60)


ROUTES: dict[str, tuple[Callable[[str, dict], httpx.Response], bool]] = {
    "kobold generate": (_kobold, True),
    "kobold stream": (_kobold_stream, True),
    "completions": (_completions, False),
    "chat": (_chat, False),
    "studio": (_studio, True),
}


@pytest.mark.parametrize("flag", ["auto", "on", "off"])
def test_every_route_passes_the_resolved_choice_to_the_engine(folders, flag):
    """The body's field, else --context-shift on/off, else the route's default (Kobold, studio on; OpenAI
    off), as the SamplingParams the engine receives."""
    with tiny(folders["llama"], flag) as s, AddTap(s.engine) as tap:
        for name, (post, route_default) in ROUTES.items():
            for field in (None, True, False):
                r = post(s.url, {} if field is None else {"context_shift": field})
                assert r.status_code == 200, (name, r.text)
                default = route_default if flag == "auto" else flag == "on"
                want = default if field is None else field
                assert tap.last_params.context_shift is want, (name, flag, field)
        assert len(tap.added) == 3 * len(ROUTES)


def test_a_bad_context_shift_is_a_400_naming_the_field(folders):
    with tiny(folders["llama"]) as s:
        for name, (post, _) in ROUTES.items():
            r = post(s.url, {"context_shift": "maybe"})
            assert r.status_code == 400, (name, r.text)
            err = r.json()["error"]
            assert err["param"] == "context_shift" and "context_shift" in err["message"], name
            if name.startswith("kobold"):
                assert r.json()["detail"]["msg"] == err["message"]  # KoboldCpp's shape beside it
        # OpenAI's numbers and booleans are strict: 1 or "true" is not a boolean there.
        for value in (1, "true"):
            r = _completions(s.url, {"context_shift": value})
            assert r.status_code == 400 and r.json()["error"]["param"] == "context_shift"


def _reuse_sum(d: dict) -> int:
    return d["prefix_cached_tokens"] + d["shifted_tokens"] + d["from_host_tokens"] + d["prefilled_tokens"]


def test_reuse_is_reported_by_every_route_and_counted_in_metrics(folders):
    prompt = words(3 * BLOCK + 5)  # three whole blocks the second turn finds in the prefix cache
    with tiny(folders["llama"]) as s:
        before = scrape(s.url)
        body = {"prompt": prompt, "max_length": 3, "temperature": 0}
        first = httpx.post(f"{s.url}/api/v1/generate", json=body, timeout=60).json()["results"][0]
        second = httpx.post(f"{s.url}/api/v1/generate", json=body, timeout=60).json()["results"][0]
        n = first["prompt_tokens"]
        d1, d2 = first["prompt_tokens_details"], second["prompt_tokens_details"]
        assert d1["cached_tokens"] == 0 and d1["prefilled_tokens"] == n == _reuse_sum(d1)
        assert d2["prefix_cached_tokens"] == d2["cached_tokens"] == 3 * BLOCK and _reuse_sum(d2) == n
        after = scrape(s.url)
        delta = lambda src: (  # noqa: E731
            sample(after, "fitllm_prompt_tokens_by_source_total", source=src)
            - sample(before, "fitllm_prompt_tokens_by_source_total", source=src)
        )
        assert (delta("cached"), delta("prefilled")) == (3 * BLOCK, 2 * n - 3 * BLOCK)
        assert delta("shifted") == delta("from_host") == 0

        # The Kobold stream's last event carries the same.
        with httpx.stream("POST", f"{s.url}/api/extra/generate/stream", json=body, timeout=60) as r:
            events = [json.loads(x[6:]) for x in r.read().decode().split("\n") if x.startswith("data: ")]
        assert events[-1]["finish_reason"] == "length" and events[-1]["prompt_tokens"] == n
        assert events[-1]["prompt_tokens_details"] == d2

        # OpenAI: usage.prompt_tokens_details.cached_tokens, read by the official client, streamed or not.
        client = openai.OpenAI(base_url=f"{s.url}/v1", api_key="x", max_retries=0, timeout=60)
        done = client.completions.create(model="tiny", prompt=prompt, max_tokens=2)
        assert done.usage.prompt_tokens == n and done.usage.prompt_tokens_details.cached_tokens == 3 * BLOCK
        chunks = list(
            client.completions.create(
                model="tiny", prompt=prompt, max_tokens=2, stream=True, stream_options={"include_usage": True}
            )
        )
        assert chunks[-1].usage.prompt_tokens_details.cached_tokens == 3 * BLOCK
        messages = [{"role": "user", "content": words(3 * BLOCK + 5, start=60)}]  # not cached yet
        chat = [client.chat.completions.create(model="tiny", messages=messages, max_tokens=2) for _ in "ab"]
        assert (
            chat[0].usage.prompt_tokens_details.cached_tokens
            < chat[1].usage.prompt_tokens_details.cached_tokens
        )
        assert chat[1].usage.prompt_tokens_details.cached_tokens == 3 * BLOCK

        # The studio: its last event, and the memory panel's cached story KV.
        story = {"story": prompt, "settings": {"max_new_tokens": 2, "temperature": 0}}
        with httpx.stream("POST", f"{s.url}/studio/api/generate", json=story, timeout=60) as r:
            last = [json.loads(x[6:]) for x in r.read().decode().split("\n") if x.startswith("data: ")][-1]
        assert last["done"] and last["prompt_tokens_details"]["prefix_cached_tokens"] == 3 * BLOCK
        mem = httpx.get(f"{s.url}/studio/api/memory").json()
        assert mem["cached_kv"]["blocks"] == mem["kv_blocks"]["cached"] >= 3
        assert mem["cached_kv"]["bytes"] == mem["tags"]["kv_cached"] > 0
        assert mem["cached_kv"]["bytes"] % mem["cached_kv"]["blocks"] == 0
        assert sample(scrape(s.url), "fitllm_context_shift_unsupported_requests_total") == 0


def _dropped(result: dict, story_tokens: int) -> int:
    return story_tokens - result["prompt_tokens"]


def test_a_model_that_cannot_shift_is_trimmed_in_large_steps_and_counted(folders):
    """XGLM cannot shift: its Kobold stories are cut in steps of --smart-context-share of the room, and each
    request that wanted a shift is counted; a rotary model (Llama) wanting one is cut as little as whole KV
    blocks allow."""
    body = {"prompt": words(300), "max_length": 16, "max_context_length": 128, "temperature": 0}
    room = 128 - 16  # the tiny tokenizer adds no BOS
    step = int(0.5 * room)
    with tiny(folders["llama"]) as s:
        exact = httpx.post(f"{s.url}/api/v1/generate", json=body, timeout=60).json()["results"][0]
        stepped = httpx.post(f"{s.url}/api/v1/generate", json=body | {"context_shift": False}, timeout=60)
        assert exact["prompt_tokens"] == 300 - -(-(300 - room) // 16) * 16  # cut in whole KV blocks of 16
        assert stepped.json()["results"][0]["prompt_tokens"] == 300 - -(-(300 - room) // step) * step
    with tiny(folders["xglm"], smart_context_share=0.25) as s:
        step = int(0.25 * room)
        for extra, counted in (({}, 1), ({"context_shift": False}, 1), ({"context_shift": True}, 2)):
            r = httpx.post(f"{s.url}/api/v1/generate", json=body | extra, timeout=60).json()["results"][0]
            assert r["prompt_tokens"] == 300 - -(-(300 - room) // step) * step
            m = scrape(s.url)
            assert sample(m, "fitllm_context_shift_unsupported_requests_total") == counted
        _completions(s.url, {})  # OpenAI: off by default, so not a shift wanted
        _completions(s.url, {"context_shift": True})
        assert sample(scrape(s.url), "fitllm_context_shift_unsupported_requests_total") == 3


def test_trim_share_follows_the_choice_and_the_model():
    def state(unsupported: str | None) -> ServerState:
        model = SimpleNamespace(context_shift_unsupported=unsupported, block_size=16)
        engine = SimpleNamespace(served_model=model, ready=True, error=None)
        return ServerState(engine, "m", smart_context_share=0.4)  # type: ignore[arg-type]

    assert state(None).trim_share(True) == 0.0
    assert state(None).trim_share(False) == 0.4
    assert state("absolute positions").trim_share(True) == 0.4
    # Where a shift serves, the cut is whole KV blocks (a shift by whole blocks is made in place).
    assert state(None).trim_align(True) == 16
    assert state(None).trim_align(False) == 1
    assert state("absolute positions").trim_align(True) == 1
