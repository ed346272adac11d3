"""Front ends read only what the engine thread publishes (issue 19 item 5): `/metrics`, `/studio/api/memory`
and the async engine's status snapshots, hammered while completions keep the engine stepping (slabs
growing and given back, blocks cached and evicted), are each internally consistent:
blocks used + cached + free = the live slabs' blocks, the ledger's tags sum to its total, the KV tags to the
live slabs' bytes, and the request counts stay within the scheduler's bounds. Reads that raced a step (as
the front ends' reads of the Engine itself did) could see a slab reserved but not yet in the pool, or a
block counted twice; so the Engine here records every attribute read from another thread, and none may
happen, whatever route is called."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable

import httpx
import pytest
from conftest import make_random_checkpoint
from live_server import scrape, serve

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.engine.engine import Engine
from fitllm.engine.view import ServedModel

FOREIGN_READS: list[tuple[str, str]] = []  # (thread, attribute) read from the Engine off its own thread
HAMMER_S = 3.0
MAX_NUM_SEQS = 4
BLOCK_SIZE = 16
SLAB_BLOCKS = 2


class OwnedEngine(Engine):
    """An Engine that records each attribute read from a thread other than the one that built it."""

    def __init__(self, config: EngineConfig) -> None:
        super().__init__(config)
        self._owner = threading.get_ident()

    def __getattribute__(self, name: str):
        owner = object.__getattribute__(self, "__dict__").get("_owner")
        if owner is not None and threading.get_ident() != owner:
            FOREIGN_READS.append((threading.current_thread().name, name))
        return object.__getattribute__(self, name)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    folder = make_random_checkpoint(tmp_path_factory.mktemp("snapshots"), family="llama")
    template = "{% for m in messages %}{{ m['content'] }} {% endfor %}"
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    # Slabs of two blocks, given back as soon as they idle: the pool grows and shrinks all the time.
    per_block = 2 * 2 * 2 * 16 * 4 * BLOCK_SIZE  # layers x (K, V) x kv heads x head_dim x float32 bytes
    config = EngineConfig(
        model=str(folder),
        dtype="float32",
        max_model_len=128,
        profile_workspace=False,
        block_size=BLOCK_SIZE,
        max_num_seqs=MAX_NUM_SEQS,
        kv_slab_size=SLAB_BLOCKS * per_block,
        kv_idle_release_s=0.0,
    )
    with serve(AsyncEngine(config, engine_factory=OwnedEngine), "tiny") as s:
        yield s


def _check(kv_blocks: dict, slabs: int, tags: dict, total: int, running: int, waiting: int, slab_bytes: int):
    """One snapshot's own consistency (raises AssertionError naming what disagrees)."""
    assert sum(kv_blocks.values()) == slabs * SLAB_BLOCKS, (kv_blocks, slabs)
    assert min(kv_blocks.values()) >= 0, kv_blocks
    assert sum(tags.values()) == total, (tags, total)
    assert tags["kv"] + tags["kv_cached"] == slabs * slab_bytes, (tags, slabs)
    assert 0 <= running <= MAX_NUM_SEQS and waiting >= 0, (running, waiting)
    # A running request holds blocks; a waiting one holds none (CPU: no swap), so used blocks mean running.
    assert (kv_blocks["used"] > 0) == (running > 0), (kv_blocks, running)


def _metrics(url: str, slab_bytes: int) -> None:
    m = scrape(url)

    def by(name: str, label: str) -> dict:
        return {dict(k[1])[label]: v for k, v in m.items() if k[0] == name}

    requests = by("fitllm_requests", "state")
    _check(
        by("fitllm_kv_blocks", "state"),
        int(m[("fitllm_kv_slabs", ())]),
        by("fitllm_memory_bytes", "tag"),
        int(m[("fitllm_memory_total_bytes", ())]),
        int(requests["running"]),
        int(requests["waiting"]),
        slab_bytes,
    )


def _memory(url: str, slab_bytes: int) -> None:
    mem = httpx.get(f"{url}/studio/api/memory", timeout=30).json()
    assert mem["ready"] and mem["slab_bytes"] == slab_bytes
    r = mem["requests"]
    _check(mem["kv_blocks"], mem["slabs"], mem["tags"], mem["total"], r["running"], r["waiting"], slab_bytes)


def _snapshot(engine: AsyncEngine, slab_bytes: int, seen: set[int]) -> None:
    s = engine.status().engine
    assert s.num_blocks == s.slabs * SLAB_BLOCKS
    r = s.requests
    _check(s.kv_blocks, s.slabs, s.ledger.current, s.ledger.total, r["running"], r["waiting"], slab_bytes)
    seen.add(s.slabs)
    time.sleep(0.001)  # a reader, not a spin loop holding the GIL


def _completion(url: str, i: int) -> None:
    body = {"prompt": " ".join(f"t{5 + (i + k) % 40}" for k in range(6 + i % 7)), "max_tokens": 6 + i % 5}
    body |= {"ignore_eos": True, "temperature": 0, "stream": i % 2 == 0}
    r = httpx.post(f"{url}/v1/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    if not body["stream"]:
        assert r.json()["usage"]["completion_tokens"] == body["max_tokens"]
    else:
        assert r.text.rstrip().endswith("data: [DONE]")


def test_every_snapshot_is_consistent_while_the_engine_steps(served):
    engine = served.engine
    model = engine.served_model
    assert isinstance(model, ServedModel) and model.max_model_len == 128 and model.block_size == BLOCK_SIZE
    slab_bytes = engine.status().engine.slab_bytes
    stop = time.monotonic() + HAMMER_S
    counts: dict[str, int] = {}
    failures: list[BaseException] = []
    slabs_seen: set[int] = set()

    def loop(name: str, fn: Callable[[int], None]) -> None:
        i = 0
        try:
            while time.monotonic() < stop and not failures:
                fn(i)
                i += 1
        except BaseException as exc:  # reported below, with the reader that saw it
            failures.append(exc)
        counts[name] = counts.get(name, 0) + i

    readers = {
        "metrics": lambda _: _metrics(served.url, slab_bytes),
        "memory": lambda _: _memory(served.url, slab_bytes),
        "snapshot": lambda _: _snapshot(engine, slab_bytes, slabs_seen),
    }
    threads = [threading.Thread(target=loop, args=("completions", lambda i, k=k: _completion(served.url, 7 * i + k)))
               for k in range(MAX_NUM_SEQS + 2)]  # fmt: skip
    threads += [
        threading.Thread(target=loop, args=(name, fn)) for name, fn in readers.items() for _ in range(2)
    ]
    steps_before = engine.counters.steps
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if failures:
        raise failures[0]
    assert all(counts.get(name, 0) >= 10 for name in [*readers, "completions"]), counts
    counters = engine.counters
    assert counters.steps > steps_before
    assert counters.requests_finished.get("length", 0) >= counts["completions"]
    assert len(slabs_seen) > 1, slabs_seen  # the pool grew and gave slabs back while it was read
    assert FOREIGN_READS == []


PROMPT = {"prompt": "t5 t6 t7 t8", "max_tokens": 3, "temperature": 0, "ignore_eos": True}
KOBOLD = {"prompt": "t5 t6 t7", "max_length": 3, "temperature": 0, "genkey": "KCPP0001"}
STORY = {"story": "t5 t6 t7", "settings": {"max_new_tokens": 3, "temperature": 0}}
ROUTES = [
    ("GET", "/health", None), ("GET", "/metrics", None), ("GET", "/v1/models", None),
    ("GET", "/v1/models/tiny", None), ("GET", "/tokenizer_info", None), ("GET", "/studio/api/memory", None),
    ("GET", "/api/v1/model", None), ("GET", "/api/v1/config/max_context_length", None),
    ("GET", "/api/extra/perf", None), ("GET", "/api/extra/version", None),
    ("POST", "/v1/completions", PROMPT), ("POST", "/v1/completions", PROMPT | {"stream": True, "n": 2}),
    ("POST", "/v1/completions", PROMPT | {"echo": True, "logprobs": 2}),
    ("POST", "/v1/completions", PROMPT | {"prompt": [5, 10**6]}),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "t5 t6"}], "max_tokens": 2}),
    ("POST", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "t5"}], "max_tokens": 2, "stream": True, "logprobs": True}),
    ("POST", "/tokenize", {"prompt": "t5 t6"}), ("POST", "/detokenize", {"tokens": [5, 6]}),
    ("POST", "/detokenize", {"tokens": [10**6]}),
    ("POST", "/api/v1/generate", KOBOLD | {"logprobs": True}), ("POST", "/api/extra/generate/stream", KOBOLD),
    ("POST", "/api/extra/generate/check", {"genkey": "KCPP0001"}), ("POST", "/api/extra/abort", {}),
    ("POST", "/api/extra/tokencount", {"prompt": "t5 t6"}), ("POST", "/api/extra/detokenize", {"ids": [5]}),
    ("POST", "/studio/api/context", STORY), ("POST", "/studio/api/generate", STORY),
]  # fmt: skip


def test_no_route_reads_the_engine_off_its_thread(served):
    FOREIGN_READS.clear()
    for method, path, body in ROUTES:
        r = httpx.request(method, f"{served.url}{path}", json=body, timeout=60)
        assert r.status_code < 500, (path, r.status_code, r.text)
    assert FOREIGN_READS == []


def test_the_published_model_is_what_routes_report(served):
    model = served.engine.served_model
    info = httpx.get(f"{served.url}/tokenizer_info").json()
    assert info["model_max_length"] == model.max_model_len
    assert info["eos_token_ids"] == list(model.eos_token_ids)
    mem = httpx.get(f"{served.url}/studio/api/memory").json()
    assert (mem["context_length"], mem["quantization"], mem["kv_cache_dtype"]) == (
        model.max_model_len,
        model.quantization,
        model.kv_cache_dtype,
    )
    with pytest.raises(AttributeError):
        model.max_model_len = 1  # frozen: no front end can change what another reads
