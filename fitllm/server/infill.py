"""Fill-in-the-middle over HTTP: llama.cpp's `POST /infill` (`input_prefix`, `input_suffix`, `input_extra`,
`prompt`; llama.cpp's /completion response and stream shape), and the prompts /v1/completions builds for a
`suffix`. The prompt is the model's own FIM format (fitllm/loader/fim.py); a model without FIM tokens is a
400 naming it. Editors resend nearly the same prefix on every keystroke: the prompt starts with the files and
the prefix, so the prefix cache serves all but the changed tail (`timings.cache_n` says how many tokens).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictInt, StrictStr

from fitllm.engine.request import RequestOutput
from fitllm.loader.fim import ExtraFile
from fitllm.server import sse
from fitllm.server.errors import APIError, bad_request
from fitllm.server.fim_prompts import fim_params, fim_prompt
from fitllm.server.heavy import OffloadedJSONRoute
from fitllm.server.openai.protocol import SamplingFields
from fitllm.server.openai.routes import token_prompts
from fitllm.server.reuse import reused_tokens
from fitllm.server.state import get_state
from fitllm.server.streaming import collect

router = APIRouter(route_class=OffloadedJSONRoute)


class InfillChunk(BaseModel):
    """One `input_extra` file (llama.cpp: text required, filename optional)."""

    model_config = ConfigDict(extra="forbid")
    text: StrictStr
    filename: StrictStr = "tmp"


class InfillRequest(SamplingFields):
    """llama.cpp's /infill body: its FIM fields plus the sampling fields every route takes."""

    input_prefix: StrictStr
    input_suffix: StrictStr
    input_extra: list[InfillChunk] = []
    prompt: StrictStr = ""
    n_predict: StrictInt | None = None  # llama.cpp's name; -1: until the context or EOS
    max_tokens: StrictInt | None = None


def _stop_type(out: RequestOutput) -> str:
    """llama.cpp's stop_type: "eos" (an end token), "word" (a stop string), "limit" (n_predict)."""
    c = out.outputs[0]
    if c.finish_reason == "length":
        return "limit"
    return "word" if isinstance(c.stop_reason, str) else "eos"


@router.post("/infill", response_model=None)
async def infill(body: InfillRequest, request: Request) -> JSONResponse | StreamingResponse:
    st = get_state(request)
    st.check_model(body.model)
    st.check_priority(body.priority)
    if body.n != 1:
        raise bad_request("/infill returns one completion; n must be 1", "n")
    max_tokens = body.n_predict if body.n_predict is not None else body.max_tokens
    if max_tokens is not None and max_tokens < 0:
        max_tokens = None  # llama.cpp: -1 is no limit
    shift = st.context_shift_for(body.context_shift, "openai")
    params = fim_params(st, body.sampling_params(max_tokens, None, shift), "input_prefix")
    extra = tuple(ExtraFile(c.text, c.filename) for c in body.input_extra)
    ids = await fim_prompt(st, body.input_prefix, body.input_suffix, body.prompt, extra, "input_prefix")
    (ids,) = await token_prompts(st, [ids], max_tokens, "input_prefix")
    started = time.monotonic()
    (stream,) = await st.start_streams(
        st.engine.add_all([(ids, params, f"infill-{uuid.uuid4().hex}", body.priority)])
    )
    model = body.model or st.model_name

    def final(out: RequestOutput, content: str) -> dict[str, Any]:
        c, cached = out.outputs[0], reused_tokens(out.reuse)
        first = (
            out.metrics.first_token_time if out.metrics and out.metrics.first_token_time else time.monotonic()
        )
        now = time.monotonic()
        return {
            "index": 0,
            "content": content,
            "tokens": [],
            "stop": True,
            "model": model,
            "tokens_predicted": len(c.token_ids),
            "tokens_evaluated": len(out.prompt_token_ids),
            "tokens_cached": len(out.prompt_token_ids) + len(c.token_ids),
            "has_new_line": "\n" in c.text,
            "truncated": False,
            "stop_type": _stop_type(out),
            "stopping_word": c.stop_reason if isinstance(c.stop_reason, str) else "",
            "timings": {
                "cache_n": cached,
                "prompt_n": len(out.prompt_token_ids) - cached,
                "prompt_ms": 1000 * (first - started),
                "predicted_n": len(c.token_ids),
                "predicted_ms": 1000 * (now - first),
            },
        }

    if body.stream:

        async def events() -> AsyncGenerator[str, None]:
            # Every token gets its event (llama.cpp sends one per token), also one whose bytes do not yet
            # make a whole character: its text comes with a later event.
            async with stream:
                async for out in stream:
                    c = out.outputs[0]
                    if c.delta_token_ids or c.delta_text:
                        yield sse.event(
                            {"index": 0, "content": c.delta_text, "tokens": c.delta_token_ids, "stop": False}
                        )
                    if out.finished:
                        yield sse.event(final(out, ""))

        def error_event(err: APIError) -> str:
            return sse.event(sse.error_data(err))

        return sse.response(events(), error_event)

    (out,) = await collect(request, [(0, stream)])
    return JSONResponse(final(out, out.outputs[0].text))
