"""A real fitllm server for tests: build_app on uvicorn in a thread, and /metrics scraping."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass

import httpx
from prometheus_client.parser import text_string_to_metric_families

from fitllm.engine.async_engine import AsyncEngine
from fitllm.server.app import build_app
from fitllm.server.shutdown import draining_server


@dataclass
class Served:
    url: str
    name: str
    engine: AsyncEngine
    server: object = None  # the uvicorn.Server (tests may stop it themselves)


@contextlib.contextmanager
def serve(engine: AsyncEngine, name: str, api_key: str | None = None, wait_ready: bool = True, **app_options):
    """build_app on uvicorn (as `fitllm serve` runs it: draining at shutdown) in a thread, on a socket bound
    before the thread starts (no port race); `app_options`: build_app's keyword options (access,
    scheduling_policy, limits)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = draining_server(build_app(engine, name, api_key, **app_options), log_level="warning")
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 180
        while True:
            assert thread.is_alive(), "uvicorn exited during startup"
            assert engine.error is None or not wait_ready, f"the engine failed to start: {engine.error}"
            with contextlib.suppress(httpx.TransportError):
                status = httpx.get(f"{url}/health", timeout=5).status_code
                if status == 200 or (status == 503 and not wait_ready):
                    break
                assert status == 503
            assert time.monotonic() < deadline, "the server did not become ready"
            time.sleep(0.1)
        yield Served(url, name, engine, server)
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    """/metrics as {(sample name, sorted labels): value}."""
    text = httpx.get(f"{url}/metrics", timeout=30).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def sample(metrics: dict, name: str, **labels) -> float:
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def assert_error(r: httpx.Response, status: int) -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert isinstance(err["type"], str) and err["type"]
    return err
