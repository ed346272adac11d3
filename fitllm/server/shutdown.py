"""Graceful shutdown (SIGTERM / SIGINT): every accepted request gets a proper ending.

uvicorn alone stops listening, waits `timeout_graceful_shutdown` for the requests in flight, then cancels
them: a non-streamed request got a plain-text 500, a stream was cut without `[DONE]`, and a queued request
that could never finish waited the whole time. `DrainingServer` drains first, while still listening:

1. `DrainGuard` answers every new request 503 + Retry-After (`/health` says "shutting down", so a load
   balancer stops sending), and counts the requests accepted before the signal.
2. The engine refuses new admissions and fails the requests not started yet at once; the running ones may
   finish until `--shutdown-timeout`, and then fail. A failure is the API's own error: a 503 JSON body, or
   on a stream its error event and end (errors.py `stream_error`).
3. Once the accepted requests have ended (or the timeout passed), uvicorn's own shutdown runs, with
   FLUSH_S for the last bytes to reach slow readers; then the lifespan stops the engine thread.

A second signal (uvicorn's force exit) cuts the drain short.
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from fitllm.server.errors import RETRY_AFTER_S, error_body

DRAIN_POLL_S = 0.05
FLUSH_S = 5.0  # uvicorn's timeout_graceful_shutdown after the drain: the last error events reach clients


@dataclass(slots=True)
class Drain:
    """The server's drain state, shared by the guard, /health and the server."""

    timeout_s: float = 30.0
    started: float | None = None  # monotonic time of the signal
    accepted: int = 0  # HTTP requests accepted before it and not finished yet

    @property
    def active(self) -> bool:
        return self.started is not None


class DrainGuard:
    """ASGI middleware: counts accepted requests; during a drain answers new ones 503 + Retry-After."""

    def __init__(self, app: ASGIApp, drain: Drain) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        http = scope["type"] == "http"
        if http and self.drain.active and scope["path"] not in ("/health", "/metrics"):
            body = error_body("the server is shutting down; retry later", "service_unavailable")
            await _reply_503(send, body)
            return
        counted = http and not self.drain.active
        self.drain.accepted += counted
        try:
            await self.app(scope, receive, send)
        finally:
            self.drain.accepted -= counted


async def _reply_503(send: Send, body: dict) -> None:
    payload = json.dumps(body).encode()
    headers = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(payload)).encode()),
        (b"retry-after", str(RETRY_AFTER_S).encode()),
        (b"connection", b"close"),
    ]
    await send({"type": "http.response.start", "status": 503, "headers": headers})
    await send({"type": "http.response.body", "body": payload})


class DrainingServer(uvicorn.Server):
    """uvicorn's server, draining the app's requests before its own shutdown (see the module docstring)."""

    def __init__(self, config: uvicorn.Config, drain: Drain, engine) -> None:
        super().__init__(config)
        self.drain = drain
        self.engine = engine

    async def shutdown(self, sockets=None) -> None:
        await self.drain_requests()
        await super().shutdown(sockets)

    async def drain_requests(self) -> None:
        """Begin the drain and wait until the requests accepted before it have ended."""
        drain = self.drain
        drain.started = time.monotonic()
        self.engine.drain(drain.timeout_s)
        # The engine fails what still runs at the timeout; a little more lets those errors be written.
        deadline = drain.started + drain.timeout_s + 2.0
        while drain.accepted > 0 and time.monotonic() < deadline and not self.force_exit:
            await asyncio.sleep(DRAIN_POLL_S)


def draining_server(app, **config: object) -> DrainingServer:
    """A DrainingServer for an app from `build_app` (`config`: uvicorn.Config's keywords)."""
    config.setdefault("timeout_graceful_shutdown", FLUSH_S)
    state = app.state.fitllm
    return DrainingServer(uvicorn.Config(app, **config), state.drain, state.engine)
