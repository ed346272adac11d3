"""AsyncEngine: the Engine's step loop on one background thread, reached from asyncio through queues.

One thread owns the model and every byte of device memory (the Engine is not thread-safe and needs none of
it): it builds the Engine, then loops: take the commands front ends sent (add, abort), run one step when
anything is unfinished, and hand each RequestOutput to the asyncio queue of its request's stream. Front ends
(the HTTP server, the studio) only await `generate()` and call `abort()`, and read what the engine thread
publishes (fitllm/engine/view.py): the served model (`served_model`), fixed once the engine is built, and
status snapshots (`status()`) taken after each step and on idle turns. Nothing outside this thread reads the
Engine itself: its pool and scheduler change while a step runs.

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
from fitllm.engine.parallel.group import WorkerLost
from fitllm.engine.request import RequestOutput, SamplingParams
from fitllm.engine.request_stream import OutputHandoff, RequestStream
from fitllm.engine.view import REUSE_SOURCES, EngineCounters, ServedModel, StatusSnapshot

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
class _Tally:
    """The totals as the engine thread counts them; published frozen (EngineCounters) with each snapshot."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    requests_finished: dict[str, int] = field(default_factory=dict)  # by finish reason
    # Prompt tokens of finished requests by where their K/V came from (RequestOutput.reuse's fields).
    prompt_reuse: dict[str, int] = field(default_factory=lambda: dict.fromkeys(REUSE_SOURCES, 0))

    def count(self, out: RequestOutput) -> None:
        self.generation_tokens += len(out.outputs[0].delta_token_ids)
        if out.finished:
            reason = out.outputs[0].finish_reason or "unknown"
            self.requests_finished[reason] = self.requests_finished.get(reason, 0) + 1
            for source in REUSE_SOURCES:
                self.prompt_reuse[source] += getattr(out.reuse, source)

    def frozen(self, context_shift_unsupported: int = 0) -> EngineCounters:
        """The totals, with the engine's count of requests that wanted a shift the model cannot do."""
        return EngineCounters(
            self.prompt_tokens,
            self.generation_tokens,
            self.steps,
            dict(self.requests_finished),
            dict(self.prompt_reuse),
            context_shift_unsupported,
        )


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
        self.engine: Engine | None = None  # the engine thread's own (tests inspect it; front ends never do)
        self.error: BaseException | None = None
        self._served: ServedModel | None = None  # published once the engine is built
        self._status: StatusSnapshot | None = None  # replaced by the engine thread, never changed
        self._tally = _Tally()
        self._started = False
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, OutputHandoff] = {}
        self._ready = threading.Event()
        self._stopping = threading.Event()
        self._drain_deadline: float | None = None  # monotonic; set on the engine thread by drain()
        self._thread = threading.Thread(target=self._run, name="fitllm-engine", daemon=True)

    # ---- lifecycle -------------------------------------------------------------------------------
    def start(self) -> AsyncEngine:
        """Start the engine thread (which builds the Engine); does nothing if it was started before."""
        if not self._started:
            self._started = True
            self._thread.start()
        return self

    @property
    def alive(self) -> bool:
        """Whether the engine thread runs (loading, serving or stopping)."""
        return self._thread.is_alive()

    @property
    def ready(self) -> bool:
        return self._served is not None and self.error is None and not self._stopping.is_set()

    def wait_ready(self, timeout: float | None = None) -> ServedModel:
        """Block until the engine is built; raises EngineDead if building failed."""
        self._ready.wait(timeout)
        if self._served is None or self.error is not None:
            raise EngineDead(f"the engine failed to start: {self.error}")
        return self._served

    # ---- what the engine thread publishes (any thread) -----------------------------------------------
    @property
    def served_model(self) -> ServedModel | None:
        """The served model (None until the engine is built)."""
        return self._served

    def status(self) -> StatusSnapshot | None:
        """The latest status snapshot (None until the engine is built)."""
        return self._status

    @property
    def counters(self) -> EngineCounters:
        """The totals as of the latest snapshot."""
        return EngineCounters() if self._status is None else self._status.counters

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
        stream = OutputHandoff(asyncio.get_running_loop())
        rid = await self._call("add", (prompt, params, request_id, priority, stream))
        return RequestStream(self, rid, stream)

    async def add_all(
        self, requests: list[tuple[str | list[int], SamplingParams, str | None, int]]
    ) -> list[RequestStream]:
        """Queue several requests (prompt, params, request_id, priority) as one command, so they reach the
        engine between the same two steps: the choices of an n > 1 request are admitted together, batch
        together and so sample alike run after run. All or none: if one is refused, none is queued."""
        loop = asyncio.get_running_loop()
        handoffs = [OutputHandoff(loop) for _ in requests]
        items = tuple((*r, h) for r, h in zip(requests, handoffs, strict=True))
        rids = await self._call("add_all", items)
        return [RequestStream(self, rid, h) for rid, h in zip(rids, handoffs, strict=True)]

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
            served = ServedModel.of(self.engine)
            self._publish()
        except BaseException as exc:  # reported by /health and every request
            # A refusal (bad checkpoint, budget too small) is its message; anything else keeps its traceback.
            log.error("engine failed to start: %s", exc, exc_info=not isinstance(exc, ValueError))
            self.error = exc
            self._ready.set()
            return
        engine = self.engine
        if engine.tp is not None:  # a lost worker fails the engine at once (/health), not at the next step
            engine.tp.on_failure.append(self._lost)
        self._served = served  # ready from here on (the first snapshot is already published)
        self._ready.set()
        try:
            self._serve(engine)
        finally:
            engine.close()

    def _lost(self, exc: BaseException) -> None:
        """The engine can no longer run (a tensor-parallel worker is gone): not ready from now on."""
        self.error = exc
        self._commands.put(("wake", None, None))

    def _serve(self, engine: Engine) -> None:
        while not self._stopping.is_set():
            if self.error is not None:  # lost a worker: every stream ends with the error, nothing steps
                self._fail(list(self._streams), _failed(f"the engine failed: {self.error}", self.error))
                self._drain_commands(block=True)
                continue
            busy = engine.has_unfinished_requests()
            self._drain_commands(block=not busy)
            self._enforce_drain_deadline()
            if self._stopping.is_set():
                break
            if not engine.has_unfinished_requests():
                try:
                    engine.idle()
                except WorkerLost as exc:
                    self._lost(exc)
                    continue
                self._publish()
                continue
            self._step()
        if self.error is not None:
            return
        for rid in list(self._streams):
            engine.abort(rid)
        self._deliver_all(engine.step() if engine.has_unfinished_requests() else [])
        for rid in list(self._streams):
            self._send(rid, EngineDead("the server is shutting down"))

    def _step(self) -> None:
        """One engine step, its outputs delivered. An exception out of it is not one request's fault (the
        engine isolates those inside the step): every request in flight fails, and the thread serves on
        (unless a tensor-parallel worker is lost: then the engine is failed for good)."""
        try:
            outputs = self.engine.step()
        except WorkerLost as exc:
            self._lost(exc)
            return
        except Exception as exc:
            log.exception("engine step failed")
            self._fail_all(exc)
            return
        self._tally.steps += 1
        self._deliver_all(outputs)

    def _publish(self) -> None:
        """Replace the status snapshot with one of the engine as it is now (this thread only)."""
        # The ledger's kv_cached tag follows the pool's cached blocks only at the next step; re-tag now so the
        # snapshot's bytes and blocks agree (the studio shows both side by side).
        self.engine.storage.tag_cached(self.engine.pool.num_cached_blocks)
        counters = self._tally.frozen(self.engine.shifter.num_fallbacks)
        self._status = StatusSnapshot.of(self.engine, counters, time.time())

    def _deliver_all(self, outputs: list[RequestOutput]) -> None:
        """Count the outputs, publish a snapshot, then hand them over: a client that has its output finds
        the snapshot up to date with it."""
        for out in outputs:
            self._tally.count(out)
        self._publish()
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
        if self.error is not None and future is not None:
            future.set_exception(EngineDead(f"the engine failed: {self.error}"))
            return
        if kind in ("add", "add_all"):
            items = (payload,) if kind == "add" else payload
            added: list[str] = []
            try:
                for item in items:
                    added.append(self._add(*item))
            except Exception as exc:
                for rid in added:  # all or none
                    self._streams.pop(rid, None)
                    engine.abort(rid)
                future.set_exception(exc)
                return
            future.set_result(added[0] if kind == "add" else added)
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

    def _add(
        self, prompt: str | list[int], params: SamplingParams, request_id: str | None, priority: int, stream
    ) -> str:
        """Admit one request into the engine's queue (on the engine thread); raises what refuses it."""
        engine = self.engine
        assert engine is not None
        if self._stopping.is_set() or self._drain_deadline is not None:
            raise ShuttingDown("the server is shutting down; retry on another replica or later")
        if engine.scheduler.num_waiting >= self.max_waiting_requests:
            raise QueueFull(f"{engine.scheduler.num_waiting} requests are waiting (--max-waiting-requests)")
        rid = engine.add_request(prompt, params, request_id, priority)
        self._streams[rid] = stream
        self._tally.prompt_tokens += len(engine.requests[rid].prompt_token_ids)
        return rid

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
        if stream is not None and new and self.on_token_timing is not None:
            now = time.monotonic()
            if stream.first_token_time is None:
                stream.first_token_time = now
                if out.metrics is not None:
                    self.on_token_timing("ttft", now - out.metrics.arrival_time)
            elif stream.last_token_time is not None:
                self.on_token_timing("tpot", (now - stream.last_token_time) / new)
            stream.last_token_time = now
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
