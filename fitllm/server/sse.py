"""Server-sent events: one way to write an event, and one shape for every event stream the server answers
(OpenAI completions and chat, Kobold's generate/stream, the studio's generate).

`response(events, error_event)`: the route's events, and if they fail after the response started (the
request broke a step, the server is shutting down) one last event in the API's own shape, made by
`error_event` from the failure as an APIError (errors.stream_error), so a client always learns why a
stream ended: a connection cut short says nothing. Closed early (a client that went away), it closes the
route's generator at once, which aborts its requests. `request_events` is the route's generator for one
request (Kobold's and the studio's); the OpenAI routes' choices go through openai/routes.py `chunks`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi.responses import StreamingResponse

from fitllm.engine.request import RequestOutput
from fitllm.engine.request_stream import RequestStream
from fitllm.server.errors import APIError, error_body, stream_error

ErrorEvent = Callable[[APIError], str]


def event(data: dict[str, Any] | str, name: str | None = None) -> str:
    """One event: `data` (JSON unless a plain string such as [DONE]), under `name` if given."""
    head = f"event: {name}\n" if name else ""
    return f"{head}data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def error_data(err: APIError) -> dict[str, Any]:
    """The OpenAI-style error object an error event carries: {"error": {message, type, param, code}}."""
    return error_body(err.message, err.type, err.param, err.code)


async def events_or_error(events: AsyncGenerator[str, None], error_event: ErrorEvent) -> AsyncIterator[str]:
    """`events`, ending with `error_event(the error)` if they fail (see the module docstring)."""
    try:
        async for item in events:
            yield item
    except Exception as exc:
        yield error_event(stream_error(exc))
    finally:
        await events.aclose()


def response(
    events: AsyncGenerator[str, None], error_event: ErrorEvent, headers: dict[str, str] | None = None
) -> StreamingResponse:
    """The streaming response of `events` (text/event-stream), ended by an error event if they fail."""
    return StreamingResponse(
        events_or_error(events, error_event), media_type="text/event-stream", headers=headers
    )


async def request_events(
    stream: RequestStream,
    delta_event: Callable[[RequestOutput], str],
    final_event: Callable[[RequestOutput], str],
    on_end: Callable[[], None] | None = None,
) -> AsyncGenerator[str, None]:
    """One request's events: `delta_event(output)` for each output with new text, then
    `final_event(output)` for the finished one; `on_end()` once they end, however they end. Closing it
    early closes the stream (the request is aborted)."""
    try:
        async with stream:
            async for out in stream:
                if out.outputs[0].delta_text:
                    yield delta_event(out)
                if out.finished:
                    yield final_event(out)
    finally:
        if on_end is not None:
            on_end()
