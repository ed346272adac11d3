"""KoboldAI / KoboldCpp-compatible routes, the API creative-writing front ends (KoboldAI Lite, SillyTavern's
Kobold mode, ...) speak. Behaviour follows KoboldCpp (koboldcpp.py, gpttype_adapter.cpp); its bodies and
their translation are in protocol.py, its jobs (genkeys) in jobs.py.

- `logprobs: true` returns, as KoboldCpp does, each generated token's logprob and its top 5 alternatives in
  the chat API's `content` list beside the completions API's `tokens` / `token_logprobs` / `top_logprobs`.
- Bodies are read as JSON whatever their content type (a cross-origin page cannot use that to skip the
  CORS preflight: the request guard refuses origins not allowed before anything runs); a genkey keeps its
  job's text and abort to whoever holds it (check and abort without one refer to the latest job only if
  it has none), and a genkey whose job still runs is refused for a new job (409), so nobody can take
  another's over. Genkeys are at most MAX_GENKEY_CHARS long.
- The generate result and the stream's last event carry `prompt_tokens`, `completion_tokens` and
  `prompt_tokens_details`
  (server/reuse.py: prompt tokens reused from the prefix cache, shifted, from host, prefilled); front ends
  read only the fields they know.
- `/api/extra/version` reports KoboldCpp 1.74 with every optional feature off: KoboldAI Lite turns on its
  controls by version (1.49: `memory` sent separately, SSE; 1.70: DRY; 1.74: XTC), SillyTavern too (min-p
  from 1.48, mirostat from 1.35); every feature they enable up to 1.74 is one fitllm serves (fitllm's
  samplers are KoboldCpp 1.74's; `grammar` is GBNF through llguidance). Vision, whisper and the
  other optional servers are reported off, which is how Lite and SillyTavern hide them.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ValidationError

from fitllm.engine.request import RequestOutput
from fitllm.server import sse
from fitllm.server.errors import APIError, bad_request, kobold_error_body
from fitllm.server.heavy import OffloadedJSONRoute
from fitllm.server.kobold.jobs import KoboldJobs
from fitllm.server.kobold.protocol import (
    DEFAULT_MAX_LENGTH,
    KOBOLD_LOGPROBS,
    DetokenizeRequest,
    GenkeyRequest,
    KoboldGenerateRequest,
    TokenCountRequest,
    build_context,
    sampling_params,
)
from fitllm.server.logprobs import chat_logprobs, legacy_logprobs
from fitllm.server.reuse import reuse_details
from fitllm.server.state import ServerState, get_state
from fitllm.server.streaming import collect

router = APIRouter(route_class=OffloadedJSONRoute)
B = TypeVar("B", bound=BaseModel)

KOBOLD_API_VERSION = "1.2.5"  # the KoboldAI United API version KoboldCpp reports
KOBOLDCPP_VERSION = "1.74"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def get_jobs(request: Request) -> KoboldJobs:
    """The app's Kobold jobs (build_app makes them beside the ServerState)."""
    return request.app.state.kobold_jobs


async def read_body(request: Request, model: type[B], lenient: bool = False) -> B:
    """The body as `model`, read as JSON whatever its content type (KoboldCpp reads every body so, and
    front ends send JSON as text/plain or form data). `lenient`: an empty or unreadable body is `{}`, as
    KoboldCpp's check and abort take it. Field errors are 400s naming the field, as for any route."""
    raw = await request.body()
    try:
        data = await get_state(request).heavy.run(json.loads, raw, size=len(raw)) if raw.strip() else {}
    except RecursionError as exc:  # nested deeper than the parser goes: no clumsy client sends that
        raise bad_request("the body is not valid JSON: it is nested too deeply") from exc
    except ValueError as exc:
        if not lenient:
            raise bad_request(f"the body is not valid JSON: {exc}") from exc
        data = {}
    if not isinstance(data, dict):
        if not lenient:
            raise bad_request("the body must be a JSON object")
        data = {}
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors()) from exc


# ---- requests ----------------------------------------------------------------------------------------


async def _start(st: ServerState, jobs: KoboldJobs, body: KoboldGenerateRequest):
    chars = len(body.memory) + len(body.prompt)
    st.check_prompt_chars(chars, "prompt")
    model = st.model
    shift = st.context_shift_for(body.context_shift, "kobold")
    trim = (st.trim_share(shift), st.trim_align(shift))
    ids, max_length = await st.heavy.run(build_context, model, body, *trim, size=chars)
    params = sampling_params(body, max_length, model.eos_token_ids, shift)
    rid = f"kobold-{uuid.uuid4().hex}"
    # The genkey is taken before the request is added, so two requests with one genkey cannot both pass.
    job = jobs.start(rid, body.genkey, params.seed if params.seed is not None else -1)
    try:
        stream = await st.start_streams(st.engine.add(ids, params, rid))
    except BaseException:
        jobs.drop(job)
        raise
    job.admitted = True
    return stream, job


def _finish_reason(out: RequestOutput) -> str:
    reason = out.outputs[0].finish_reason
    return "length" if reason == "length" else "stop"


# ---- routes --------------------------------------------------------------------------------------------


@router.get("/api/v1/model")
@router.get("/api/latest/model")
async def model(request: Request) -> dict[str, str]:
    return {"result": get_state(request).model_name}


@router.get("/api/v1/info/version")
@router.get("/api/latest/info/version")
async def api_version() -> dict[str, str]:
    return {"result": KOBOLD_API_VERSION}


@router.get("/api/v1/config/max_context_length")
@router.get("/api/latest/config/max_context_length")
@router.get("/api/extra/true_max_context_length")
async def max_context_length(request: Request) -> dict[str, int]:
    return {"value": get_state(request).max_model_len}


@router.get("/api/v1/config/max_length")
@router.get("/api/latest/config/max_length")
async def max_length() -> dict[str, int]:
    return {"value": DEFAULT_MAX_LENGTH}


@router.get("/api/v1/config/soft_prompts_list")
@router.get("/api/latest/config/soft_prompts_list")
async def soft_prompts_list() -> dict[str, list]:
    return {"values": []}


@router.get("/api/extra/perf")
async def perf(request: Request) -> dict[str, Any]:
    """KoboldCpp's figures: the last generation's prompt-processing and generation seconds, its token
    count, seed and stop reason, the number of generations, and the queue now."""
    st = get_state(request)
    requests = st.status().requests
    return {
        **dataclasses.asdict(get_jobs(request).perf),
        "queue": requests.get("waiting", 0),
        "idle": 0 if requests.get("running", 0) or requests.get("waiting", 0) else 1,
        "uptime": time.time() - st.created,
    }


@router.get("/api/extra/version")
async def extra_version(request: Request) -> dict[str, Any]:
    st = get_state(request)
    off = dict.fromkeys(
        ("txt2img", "vision", "audio", "transcribe", "multiplayer", "websearch", "tts", "embeddings"), False
    )
    return {
        "result": "KoboldCpp",
        "version": KOBOLDCPP_VERSION,
        "protected": st.api_key is not None,
        "llm": True,
        **off,
        "savedata": False,
        "admin": 0,
        "guidance": False,
        "jinja": False,
    }


@router.post("/api/v1/generate")
@router.post("/api/latest/generate")
async def generate(request: Request) -> dict[str, Any]:
    st, jobs = get_state(request), get_jobs(request)
    body = await read_body(request, KoboldGenerateRequest)
    stream, job = await _start(st, jobs, body)
    try:
        (final,) = await collect(request, [(0, stream)], lambda _, out: job.update(out.outputs[0].text))
    finally:
        job.done = True
    jobs.finish(job, final)
    c = final.outputs[0]
    logprobs = None
    if body.logprobs:  # KoboldCpp's shape: the chat API's `content` beside the completions API's lists
        ids, entries, model = c.token_ids, c.logprobs or [], st.model
        logprobs = chat_logprobs(model, ids, entries, KOBOLD_LOGPROBS) | legacy_logprobs(
            model, ids, entries, 0
        )
    return {
        "results": [
            {
                "text": c.text,
                "finish_reason": _finish_reason(final),
                "prompt_tokens": len(final.prompt_token_ids),
                "completion_tokens": len(c.token_ids),
                "prompt_tokens_details": reuse_details(final.reuse),
                "logprobs": logprobs,
                "tool_calls": [],
            }
        ]
    }


@router.post("/api/extra/generate/stream")
async def generate_stream(request: Request) -> StreamingResponse:
    st, jobs = get_state(request), get_jobs(request)
    body = await read_body(request, KoboldGenerateRequest)
    stream, job = await _start(st, jobs, body)

    def delta(out: RequestOutput) -> str:
        job.update(out.outputs[0].text)
        return sse.event({"token": out.outputs[0].delta_text, "finish_reason": None}, "message")

    def final(out: RequestOutput) -> str:
        job.update(out.outputs[0].text)
        jobs.finish(job, out)
        last = {"token": "", "finish_reason": _finish_reason(out), "prompt_tokens": len(out.prompt_token_ids)}
        last |= {"completion_tokens": len(out.outputs[0].token_ids)}
        return sse.event(last | {"prompt_tokens_details": reuse_details(out.reuse)}, "message")

    def end() -> None:
        job.done = True  # finished, failed, or its client left: the genkey is free again

    return sse.response(sse.request_events(stream, delta, final, end), _error_event, SSE_HEADERS)


def _error_event(err: APIError) -> str:
    """KoboldCpp's stream has no error event: its last message event, finish_reason "error", with the error
    beside it in both shapes (a front end that knows no error still sees the stream end)."""
    return sse.event({"token": "", "finish_reason": "error", **kobold_error_body(err)}, "message")


@router.api_route("/api/extra/generate/check", methods=["GET", "POST"])
async def check(request: Request) -> dict[str, Any]:
    """The text so far of the job the genkey names (POST), or of the latest job if it has no genkey."""
    genkey = ""
    if request.method == "POST":
        genkey = (await read_body(request, GenkeyRequest, lenient=True)).genkey
    job = get_jobs(request).find(genkey)
    return {"results": [{"text": job.text if job else ""}]}


@router.post("/api/extra/abort")
async def abort(request: Request) -> dict[str, str]:
    """Abort the job the genkey names. Without a genkey (an empty body included), KoboldCpp's multiuser
    rule: the latest job, if it was itself started without one, and only while it is the one request the
    server runs (KoboldCpp: nobody queued), so an abort without a genkey never stops another user's work."""
    st = get_state(request)
    body = await read_body(request, GenkeyRequest, lenient=True)
    job = get_jobs(request).find(body.genkey)
    if job is None or job.done or (not body.genkey and st.engine.in_flight > 1):
        return {"success": "false", "done": "false"}
    st.engine.abort(job.request_id)
    return {"success": "true", "done": "true"}


@router.get("/api/extra/preloadstory")
async def preloadstory() -> dict[str, Any]:
    """KoboldCpp's story preloaded with --preloadstory; fitllm has none (KoboldAI Lite asks on connect)."""
    return {}


@router.get("/sdapi/v1/sd-models")
async def sd_models() -> list[Any]:
    """KoboldCpp's image models (A1111's API); fitllm generates no images (KoboldAI Lite asks on connect)."""
    return []


@router.post("/api/extra/tokencount")
@router.post("/api/extra/tokenize")
async def tokencount(request: Request) -> dict[str, Any]:
    body = await read_body(request, TokenCountRequest)
    ids = await get_state(request).encode(body.prompt, "prompt", body.special)
    return {"value": len(ids), "ids": ids}


@router.post("/api/extra/detokenize")
async def detokenize(request: Request) -> dict[str, Any]:
    body = await read_body(request, DetokenizeRequest)
    return {"result": await get_state(request).detokenize(body.ids, "ids"), "success": True}
