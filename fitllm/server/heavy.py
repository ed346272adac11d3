"""CPU-heavy request work off the event loop, bounded; and the prompt-size limits that refuse early.

A 30 MiB prompt took about 1 s per MiB to tokenize on the event loop, and `/health` answered after a minute.
Now tokenizing, chat-template rendering, building Kobold and studio contexts, and parsing large JSON bodies
run on a small thread pool (the `tokenizers` encoder releases the GIL; a template's pure-Python rendering
yields it every switch interval), at most one job per core at a time and `max_waiting` more queued; past
that a request is answered 503 + Retry-After at once rather than holding its body in memory in a queue.

Prompt limits, before any of that work (a 400 that names the limit and the flag):
- characters: `--max-prompt-chars`, by default the context length x CHARS_PER_TOKEN_BOUND (far above what
  any tokenizer averages, so only text that could never fit is refused without tokenizing it);
- tokens: after tokenizing, the context length (checked where the prompt is used: openai.routes.token_prompts).
After a large job the heap is handed back to the OS (glibc keeps freed chunks otherwise).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

from fastapi import Request
from fastapi.routing import APIRoute
from starlette.responses import Response

from fitllm.memory.host import trim_host_heap
from fitllm.server.errors import bad_request, unavailable

T = TypeVar("T")
CHARS_PER_TOKEN_BOUND = 32  # English averages ~4 characters per token; 32 leaves room for any real text
INLINE_SIZE = 4096  # work on fewer characters (or body bytes) runs on the loop: a thread hop costs more
TRIM_AFTER_SIZE = 1 << 20  # after work on this much, malloc_trim


@dataclass(slots=True)
class ServerLimits:
    """Request-size and shutdown settings of `fitllm serve`."""

    max_prompt_chars: int | None = None  # None: max_model_len x CHARS_PER_TOKEN_BOUND
    template_timeout_s: float = 10.0  # a chat template rendering longer is refused (400)
    shutdown_timeout_s: float = 30.0  # --shutdown-timeout: how long running requests may finish
    heavy_workers: int | None = None  # None: the cores this process may use
    heavy_max_waiting: int = 64

    def prompt_chars(self, max_model_len: int) -> int:
        """The character limit of one prompt (or of all of a chat's messages)."""
        return self.max_prompt_chars or max_model_len * CHARS_PER_TOKEN_BOUND


class HeavyWork:
    """A bounded pool for CPU-heavy request work (see the module docstring)."""

    def __init__(self, workers: int | None = None, max_waiting: int = 64) -> None:
        self.workers = workers or len(os.sched_getaffinity(0))
        self.max_waiting = max_waiting
        self._pool = ThreadPoolExecutor(self.workers, thread_name_prefix="fitllm-heavy")
        self._outstanding = 0

    async def run(self, fn: Callable[..., T], *args: Any, size: int) -> T:
        """fn(*args) on the pool, or inline when `size` (characters or bytes worked on) is small; 503 when
        the pool and its queue are full."""
        if size < INLINE_SIZE:
            return fn(*args)
        if self._outstanding >= self.workers + self.max_waiting:
            raise unavailable(f"server busy: {self._outstanding} large requests are being prepared")
        self._outstanding += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._pool, _then_trim, fn, args, size)
        finally:
            self._outstanding -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def _then_trim(fn: Callable[..., T], args: tuple, size: int) -> T:
    try:
        return fn(*args)
    finally:
        if size >= TRIM_AFTER_SIZE:
            trim_host_heap()


def check_prompt_chars(chars: int, limit: int, param: str | None, max_model_len: int, flag_set: bool) -> None:
    """400 naming the limit when a prompt has more characters than `limit` (before tokenizing it)."""
    if chars > limit:
        source = (
            "--max-prompt-chars"
            if flag_set
            else f"--max-prompt-chars, by default the context length {max_model_len} x {CHARS_PER_TOKEN_BOUND}"
        )
        raise bad_request(
            f"the prompt has {chars} characters, more than this server's limit of {limit} ({source}); "
            f"shorten it",
            param,
        )


class _OffloadedJSONRequest(Request):
    """A request whose large JSON body is parsed on the heavy-work pool (FastAPI parses bodies through
    `Request.json()`, on the event loop)."""

    async def json(self) -> Any:
        if not hasattr(self, "_json"):
            body = await self.body()
            heavy: HeavyWork = self.app.state.fitllm.heavy
            self._json = await heavy.run(json.loads, body, size=len(body))
        return self._json


class OffloadedJSONRoute(APIRoute):
    """The route class of the API routers: bodies parsed off the event loop (see _OffloadedJSONRequest)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route_handler(request: Request) -> Response:
            return await handler(_OffloadedJSONRequest(request.scope, request.receive))

        return route_handler
