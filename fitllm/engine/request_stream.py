"""A request's outputs on their way from the engine thread to the event loop that reads them.

`OutputHandoff` is the hand-over point (`put` runs on the reader's loop, through call_soon_threadsafe);
`RequestStream` is what front ends iterate, and closing it early aborts the request.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from fitllm.engine.request import RequestOutput

if TYPE_CHECKING:
    from fitllm.engine.async_engine import AsyncEngine


@dataclass(slots=True)
class OutputHandoff:
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

    def __init__(self, engine: AsyncEngine, request_id: str, outputs: OutputHandoff) -> None:
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
