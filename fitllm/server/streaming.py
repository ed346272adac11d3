"""Consuming engine streams in a route: several requests' outputs merged, and a non-streamed response
that aborts its requests when the client disconnects (Starlette only notices a disconnect while sending,
so the route polls for it).

A stream that fails after it started (its request broke a step, or the engine stopped) ends in the API's
own shape: a non-streamed response becomes a JSON error (`collect` raises an APIError), and a streamed
one ends with an error event (sse.py) instead of a cut connection; errors.stream_error says which."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

from fastapi import Request

from fitllm.engine.request import RequestOutput
from fitllm.engine.request_stream import RequestStream
from fitllm.server.errors import APIError, stream_error

DISCONNECT_POLL_S = 0.25


async def merged(streams: list[tuple[int, RequestStream]]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of all streams as they arrive, as (choice index, output); closing it aborts the rest.

    Each stream is read one output at a time, only when the previous one was taken: nothing is buffered
    here, so a client that does not read leaves its outputs to be merged in its streams (bounded)."""
    if len(streams) == 1:  # the common case, without a task per output
        stream = streams[0][1]
        try:
            async for out in stream:
                yield 0, out
        finally:
            stream.close()
        return
    reading = {asyncio.ensure_future(anext(s)): k for k, (_, s) in enumerate(streams)}
    try:
        while reading:
            done, _ = await asyncio.wait(reading, return_when=asyncio.FIRST_COMPLETED)
            for task in sorted(done, key=reading.__getitem__):
                k = reading.pop(task)
                try:
                    out = task.result()
                except StopAsyncIteration:
                    continue
                yield k, out
                reading[asyncio.ensure_future(anext(streams[k][1]))] = k
    finally:
        for task in reading:
            task.cancel()
        for _, s in streams:
            s.close()


async def collect(
    request: Request,
    streams: list[tuple[int, RequestStream]],
    on_output: Callable[[int, RequestOutput], None] | None = None,
) -> list[RequestOutput]:
    """The final output of every stream (`on_output` sees every output as it arrives); aborts them all if
    the client disconnects first."""
    finals: list[RequestOutput | None] = [None] * len(streams)

    async def run() -> None:
        async for index, out in merged(streams):
            if on_output is not None:
                on_output(index, out)
            if out.finished:
                finals[index] = out

    task = asyncio.create_task(run())
    try:
        while not task.done():
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                raise APIError(499, "client disconnected")
        try:
            task.result()
        except Exception as exc:  # a request failed (or the server is shutting down): the API's own error
            raise stream_error(exc) from exc
    finally:
        if not task.done():
            task.cancel()
        for _, s in streams:
            s.close()
    return [f for f in finals if f is not None]
