"""AsyncEngine: the Engine's step loop on one background thread, reached from asyncio through queues.

One thread owns the model and every byte of device memory (the Engine is not thread-safe and needs none of
it): it builds the Engine, then loops: take the commands front ends sent (add, abort), run one step when
anything is unfinished, and hand each RequestOutput to the asyncio queue of its request's stream. Front ends
(the HTTP server, the studio) only await `generate()` and call `abort()`.

- Adding validates on the engine thread (prompt length against the model and the pool, sampling
  parameters) and answers through a future, so a bad request fails before its stream starts.
- `--max-waiting-requests` bounds the scheduler's waiting queue: beyond it `QueueFull` (HTTP 503).
- A stream that is closed early (a client that disconnects) aborts its request: its KV blocks are free
  after the engine's next loop turn.
- A reader that falls behind (a client that does not read) finds one output waiting, into which later ones
  were merged: what the server holds for it stays bounded by the request's own output.
- A request whose rows make a step raise is failed alone by the Engine; its stream raises `RequestFailed`
  and the others go on. An error the Engine cannot pin on requests fails every stream in flight, and the
  thread keeps serving.
- `drain(timeout)` begins a graceful shutdown: new requests are refused, requests not started yet fail at
  once and those still running when the timeout ends fail then, all with `ShuttingDown` (the server
  answers 503 + Retry-After, or an error event on a stream).
- `shutdown()` aborts what is in flight, ends every stream, and joins the thread.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import RequestOutput, SamplingParams

log = logging.getLogger("fitllm")

IDLE_POLL_S = 0.5  # how often an idle engine thread wakes to give back idle KV slabs


class QueueFull(Exception):
    """The waiting queue is at --max-waiting-requests."""


class EngineDead(Exception):
    """The engine failed to start or stopped; no request can be served."""


class RequestFailed(Exception):
    """A step failed while running this request (its own rows broke it, or, when the engine itself
    failed, every request in flight); raised from its stream, with the cause chained."""


def _failed(message: str, cause: BaseException) -> RequestFailed:
    failure = RequestFailed(message)
    failure.__cause__ = cause
    return failure


class ShuttingDown(EngineDead):
    """The server is draining for shutdown: the request was not started, or did not finish in time."""


@dataclass(slots=True)
class EngineCounters:
    """Totals the engine thread keeps for metrics (read from other threads; ints only, so no lock)."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    steps: int = 0


@dataclass(slots=True)
class _Stream:
    """One request's outputs on their way to its event loop: `put` runs there (call_soon_threadsafe).

    Outputs are cumulative but for their deltas, so an output the reader has not taken yet is replaced by
    the next one, whose deltas are joined onto the ones it replaces: at most one output (and a final error)
    waits, however slowly the reader reads."""

    loop: asyncio.AbstractEventLoop
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    pending: RequestOutput | None = None
    merged_texts: list[str] = field(default_factory=list)  # deltas of the outputs merged into `pending`
    merged_ids: list[int] = field(default_factory=list)
    error: BaseException | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None

    def put(self, item: RequestOutput | BaseException) -> None:
        if isinstance(item, BaseException):
            self.error = item
        else:
            if self.pending is not None:
                if not self.merged_texts:
                    old = self.pending.outputs[0]
                    self.merged_texts.append(old.delta_text)
                    self.merged_ids.extend(old.delta_token_ids)
                new = item.outputs[0]
                self.merged_texts.append(new.delta_text)
                self.merged_ids.extend(new.delta_token_ids)
            self.pending = item
        self.ready.set()

    async def get(self) -> RequestOutput | BaseException:
        while True:
            if self.pending is not None:
                out, self.pending = self.pending, None
                if self.merged_texts:
                    c = out.outputs[0]
                    c.delta_text, c.delta_token_ids = "".join(self.merged_texts), self.merged_ids
                    self.merged_texts, self.merged_ids = [], []
                return out
            if self.error is not None:
                return self.error
            self.ready.clear()
            await self.ready.wait()


class RequestStream:
    """The outputs of one request as they arrive; aborts the request if closed before it finished."""

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: _Stream) -> None:
        self.engine = engine
        self.request_id = request_id
        self._outputs = outputs
        self.finished = False

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        item = await self._outputs.get()
        if isinstance(item, BaseException):
            self.finished = True
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it finished (a client that went away frees its memory at once)."""
        if not self.finished:
            self.finished = True
            self.engine.abort(self.request_id)

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class AsyncEngine:
    """Submit and stream requests from asyncio; the Engine runs on its own thread (see module docstring)."""

    def __init__(
        self,
        config: EngineConfig,
        max_waiting_requests: int = 256,
        engine_factory: Callable[[EngineConfig], Engine] = Engine,
        on_token_timing: Callable[[str, float], None] | None = None,
    ) -> None:
        self.config = config
        self.max_waiting_requests = max_waiting_requests
        self._factory = engine_factory
        self.on_token_timing = on_token_timing  # ("ttft" | "tpot", seconds), called on the engine thread
        self.engine: Engine | None = None
        self.error: BaseException | None = None
        self.counters = EngineCounters()
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, _Stream] = {}
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._drain_deadline: float | None = None  # monotonic; set on the engine thread by drain()
        self._thread = threading.Thread(target=self._run, name="fitllm-engine", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        self._thread.start()
        return self

    @property
    def ready(self) -> bool:
        return self.engine is not None and self.error is None and not self._stopping.is_set()

    def wait_ready(self, timeout: float | None = None) -> Engine:
        """Block until the engine is built; raises EngineDead if building failed."""
        self._ready.wait(timeout)
        if self.engine is None or self.error is not None:
            raise EngineDead(f"the engine failed to start: {self.error}")
        return self.engine

    def shutdown(self, timeout: float = 30.0) -> None:
        """Abort in-flight requests, end their streams, stop the thread."""
        self._stopping.set()
        self._commands.put(("wake", None, None))
        if self._thread.is_alive():
            self._thread.join(timeout)

    def drain(self, timeout: float) -> None:
        """Begin a graceful shutdown (see the module docstring); `in_flight` tells when it is over."""
        self._commands.put(("drain", time.monotonic() + max(0.0, timeout), None))

    @property
    def in_flight(self) -> int:
        """Requests whose streams have not ended yet."""
        return len(self._streams)

    # ---- front-end API (any thread / event loop) --------------------------------------------------
    async def add(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> RequestStream:
        """Queue a request; raises ValueError (bad input), QueueFull or EngineDead. Iterate the returned
        stream for its outputs; close it early (or let it be garbage) to abort the request."""
        stream = _Stream(asyncio.get_running_loop())
        rid = await self._call("add", (prompt, params, request_id, priority, stream))
        return RequestStream(self, rid, stream)

    async def score(self, prompt: str | list[int], top_n: int):
        """Engine.score_prompt on the engine thread, between steps."""
        return await self._call("score", (prompt, top_n))

    async def _call(self, kind: str, payload: tuple):
        """Send a command to the engine thread and await its answer (or the exception it raised)."""
        if not self.ready:
            raise EngineDead("the engine is not running" if self.error is None else str(self.error))
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((kind, payload, future))
        return await asyncio.wrap_future(future)

    async def generate(
        self,
        prompt: str | list[int],
        params: SamplingParams,
        request_id: str | None = None,
        priority: int = 0,
    ) -> AsyncIterator[RequestOutput]:
        """add() and iterate in one: the outputs of one request, the last with finished=True."""
        stream = await self.add(prompt, params, request_id, priority)
        async with stream:
            async for out in stream:
                yield out

    def abort(self, request_id: str) -> None:
        self._commands.put(("abort", request_id, None))

    def is_running(self, request_id: str) -> bool:
        """Whether `request_id` was added and has not yet finished, failed or been aborted."""
        return request_id in self._streams

    # ---- the engine thread ------------------------------------------------------------------------
    def _run(self) -> None:
        try:
            self.engine = self._factory(self.config)
        except BaseException as exc:  # reported by /health and every request
            # A refusal (bad checkpoint, budget too small) is its message; anything else keeps its traceback.
            log.error("engine failed to start: %s", exc, exc_info=not isinstance(exc, ValueError))
            self.error = exc
            self._ready.set()
            return
        self._ready.set()
        engine = self.engine
        while not self._stopping.is_set():
            busy = engine.has_unfinished_requests()
            self._drain_commands(block=not busy)
            self._enforce_drain_deadline()
            if self._stopping.is_set():
                break
            if not engine.has_unfinished_requests():
                engine.release_idle_memory()
                continue
            self._step()
        for rid in list(self._streams):
            engine.abort(rid)
        for out in engine.step() if engine.has_unfinished_requests() else []:
            self._deliver(out)
        for rid in list(self._streams):
            self._send(rid, EngineDead("the server is shutting down"))

    def _step(self) -> None:
        """One engine step, its outputs delivered. An exception out of it is not one request's fault (the
        engine isolates those inside the step): every request in flight fails, and the thread serves on."""
        try:
            outputs = self.engine.step()
        except Exception as exc:
            log.exception("engine step failed")
            self._fail_all(exc)
            return
        self.counters.steps += 1
        for out in outputs:
            self._deliver(out)

    def _fail_all(self, exc: Exception) -> None:
        """Abort every request with a stream and end each stream with the engine's error."""
        self._fail(list(self._streams), _failed(f"the engine failed while running this request: {exc}", exc))
        try:
            self.engine.step()  # flush the aborted outputs
        except Exception:
            log.exception("engine step failed again after aborting every request")

    def _drain_commands(self, block: bool) -> None:
        try:
            cmd = self._commands.get(timeout=IDLE_POLL_S) if block else self._commands.get_nowait()
        except queue.Empty:
            return
        while True:
            self._handle(cmd)
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return

    def _handle(self, cmd: tuple) -> None:
        kind, payload, future = cmd
        engine = self.engine
        assert engine is not None
        if kind == "add":
            prompt, params, request_id, priority, stream = payload
            if self._stopping.is_set() or self._drain_deadline is not None:
                future.set_exception(
                    ShuttingDown("the server is shutting down; retry on another replica or later")
                )
                return
            if engine.scheduler.num_waiting >= self.max_waiting_requests:
                future.set_exception(
                    QueueFull(f"{engine.scheduler.num_waiting} requests are waiting (--max-waiting-requests)")
                )
                return
            try:
                rid = engine.add_request(prompt, params, request_id, priority)
            except Exception as exc:
                future.set_exception(exc)
                return
            self._streams[rid] = stream
            self.counters.prompt_tokens += len(engine.requests[rid].prompt_token_ids)
            future.set_result(rid)
        elif kind == "score":
            try:
                future.set_result(engine.score_prompt(*payload))
            except Exception as exc:
                future.set_exception(exc)
        elif kind == "drain":
            self._begin_drain(payload)
        elif kind == "abort" and engine.abort(payload) and not engine.has_unfinished_requests():
            # The aborted output is flushed by the next step(); with nothing else running, step now.
            self._step()

    def _begin_drain(self, deadline: float) -> None:
        """Fail every request that has not started (nothing computed, nothing generated) now: it could only
        wait for the deadline and fail then."""
        engine = self.engine
        assert engine is not None
        self._drain_deadline = deadline
        idle = [
            r.request_id
            for r in engine.scheduler.waiting
            if r.num_computed_tokens == 0 and r.num_output_tokens == 0
        ]
        self._fail(
            idle, ShuttingDown("the server is shutting down and this request was not started; retry it")
        )

    def _enforce_drain_deadline(self) -> None:
        if self._drain_deadline is not None and time.monotonic() >= self._drain_deadline and self._streams:
            self._fail(
                list(self._streams),
                ShuttingDown(
                    "the server is shutting down and this request did not finish within --shutdown-timeout"
                ),
            )

    def _fail(self, request_ids: list[str], exc: BaseException) -> None:
        """End these requests with `exc` on their streams and free them (the loop's next step flushes their
        aborted outputs, which find no stream)."""
        engine = self.engine
        assert engine is not None
        for rid in request_ids:
            engine.abort(rid)
            self._send(rid, exc)

    def _deliver(self, out: RequestOutput) -> None:
        stream = self._streams.get(out.request_id)
        new = len(out.outputs[0].delta_token_ids)
        self.counters.generation_tokens += new
        if stream is not None and new and self.on_token_timing is not None:
            now = time.monotonic()
            if stream.first_token_time is None:
                stream.first_token_time = now
                if out.metrics is not None:
                    self.on_token_timing("ttft", now - out.metrics.arrival_time)
            elif stream.last_token_time is not None:
                self.on_token_timing("tpot", (now - stream.last_token_time) / new)
            stream.last_token_time = now
        if out.finished:
            reason = out.outputs[0].finish_reason or "unknown"
            self.counters.requests_finished[reason] = self.counters.requests_finished.get(reason, 0) + 1
        if out.error is not None:  # its own rows broke a step: only its stream ends, with the error
            self._send(
                out.request_id, _failed(f"this request failed during generation: {out.error}", out.error)
            )
            return
        self._send(out.request_id, out)
        if out.finished:
            self._streams.pop(out.request_id, None)

    def _send(self, request_id: str, item: RequestOutput | BaseException) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        try:
            stream.loop.call_soon_threadsafe(stream.put, item)
        except RuntimeError:  # its event loop is closed: nobody is listening any more
            self._streams.pop(request_id, None)
        if isinstance(item, BaseException):
            self._streams.pop(request_id, None)
