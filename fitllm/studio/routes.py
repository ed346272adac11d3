"""The story studio's routes: the page at `/`, and the small JSON/SSE API it calls.

The studio is one static page (fitllm/studio/static/studio.html: HTML, CSS and plain JavaScript, no build
step) served by the same process and port as the APIs, rather than Gradio: the page streams tokens into
the story and stops them with a plain `fetch` + `AbortController` (a closed connection aborts the request
and frees its blocks, as for any API client), draws the memory panel from `/studio/api/memory` itself, and
costs no dependency (Gradio would bring ~30 MB and dozens of packages for three text boxes and a plot).
Several tabs are several clients: their generations batch together in the engine. A story's
`context_shift` (absent: --context-shift, else on) chooses whether a trimmed story may reuse its cached K/V by
a context shift, and how the story is trimmed (fitllm/server/story_trim.py); the last event of a generation
says how its prompt's K/V was had (server/reuse.py), and the memory panel shows it with the cached KV.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from fitllm.engine.request import RequestOutput, SamplingParams
from fitllm.server import sse
from fitllm.server.body import Body
from fitllm.server.errors import APIError, bad_request
from fitllm.server.heavy import OffloadedJSONRoute
from fitllm.server.reuse import reuse_details
from fitllm.server.state import get_state
from fitllm.studio.context import build_story_context

router = APIRouter(route_class=OffloadedJSONRoute)
PAGE = Path(__file__).parent / "static" / "studio.html"


class Settings(BaseModel):
    model_config = ConfigDict(extra="allow")
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.1
    max_new_tokens: int = Field(default=150, ge=1)
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)


class StoryRequest(Body):
    memory: str = ""
    story: str = ""
    note: str = ""
    note_depth: int = Field(default=3, ge=0)
    settings: Settings = Field(default_factory=Settings)
    context_shift: bool | None = None  # None: --context-shift, else on


async def _context(request: Request, body: StoryRequest):
    """The story's context, its size checked first and built off the event loop (server/heavy.py)."""
    st = get_state(request)
    chars = len(body.memory) + len(body.story) + len(body.note)
    st.check_prompt_chars(chars, "story")
    shift = st.context_shift_for(body.context_shift, "studio")
    try:
        ctx = await st.heavy.run(
            build_story_context,
            st.tokenizer,
            body.memory,
            body.story,
            body.note,
            body.note_depth,
            st.max_model_len,
            min(body.settings.max_new_tokens, st.max_model_len - 1),
            st.trim_share(shift),
            st.trim_align(shift),
            size=chars,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    return st, ctx, shift


@router.get("/", response_class=HTMLResponse, include_in_schema=False)
async def page() -> HTMLResponse:
    return HTMLResponse(PAGE.read_text(encoding="utf-8"))


@router.post("/studio/api/context")
async def context(body: StoryRequest, request: Request) -> dict[str, Any]:
    st, ctx, _ = await _context(request, body)
    return {
        "total_tokens": ctx.total_tokens,
        "prompt_tokens": len(ctx.ids),
        "dropped_tokens": ctx.story_tokens_dropped,
        "max_new_tokens": ctx.max_new_tokens,
        "context_length": st.max_model_len,
        "model": st.model_name,
    }


@router.post("/studio/api/generate")
async def generate(body: StoryRequest, request: Request) -> StreamingResponse:
    """SSE: {"text": delta} events, then {"done": true, "finish_reason", "tokens", "tokens_per_s", ...}, or
    {"error": {...}} if the request fails on the way."""
    st, ctx, shift = await _context(request, body)
    s = body.settings
    try:
        params = SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            min_p=s.min_p,
            repetition_penalty=s.repetition_penalty,
            max_tokens=ctx.max_new_tokens,
            seed=s.seed,
            stop=[x for x in s.stop if x],
            context_shift=shift,
        )
    except ValueError as exc:
        raise bad_request(str(exc)) from exc
    stream = await st.start_streams(st.engine.add(ctx.ids, params, f"studio-{uuid.uuid4().hex}"))
    start = time.perf_counter()
    first: float | None = None

    def delta(out: RequestOutput) -> str:
        nonlocal first
        first = first or time.perf_counter()
        return sse.event({"text": out.outputs[0].delta_text})

    def final(out: RequestOutput) -> str:
        n = len(out.outputs[0].token_ids)
        span = time.perf_counter() - (first or start)
        return sse.event(
            {
                "done": True,
                "finish_reason": out.outputs[0].finish_reason,
                "tokens": n,
                "prompt_tokens": len(ctx.ids),
                "dropped_tokens": ctx.story_tokens_dropped,
                "prompt_tokens_details": reuse_details(out.reuse),
                "seconds": time.perf_counter() - start,
                "tokens_per_s": (n - 1) / span if n > 1 and span > 0 else None,
            }
        )

    return sse.response(sse.request_events(stream, delta, final), _error_event, {"Cache-Control": "no-cache"})


def _error_event(err: APIError) -> str:
    """A failed story stream's last event: the error (the page shows its message) and done."""
    return sse.event(sse.error_data(err) | {"done": True})


@router.get("/studio/api/memory")
async def memory(request: Request) -> dict[str, Any]:
    """What the device memory holds now: the memory panel polls this."""
    st = get_state(request)
    model, snapshot = st.engine.served_model, st.engine.status()
    if model is None or snapshot is None or not st.engine.ready:
        return {"ready": False, "time": time.time()}
    status = snapshot.engine
    snap = status.ledger
    return {
        "ready": True,
        "time": time.time(),
        "budget": snap.budget,
        "total": snap.total,
        "peak_total": snap.peak_total,
        "tags": dict(snap.current),
        "kv_blocks": status.kv_blocks,
        # Finished stories' KV kept for their next turn (prefix cache): the blocks and the bytes they hold.
        "cached_kv": {"blocks": status.kv_blocks.get("cached", 0), "bytes": snap.current.get("kv_cached", 0)},
        "block_size": status.block_size,
        "slabs": status.slabs,
        "slab_bytes": status.slab_bytes,
        "requests": status.requests,
        "model": st.model_name,
        "context_length": model.max_model_len,
        "quantization": model.quantization,
        "kv_cache_dtype": model.kv_cache_dtype,
    }
