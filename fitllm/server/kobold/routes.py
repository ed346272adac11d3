"""KoboldAI / KoboldCpp-compatible routes, the API creative-writing front ends (KoboldAI Lite, SillyTavern's
Kobold mode, ...) speak.

Behaviour follows KoboldCpp (koboldcpp.py, gpttype_adapter.cpp), including its defaults:

- `memory` is kept whole at the front; the prompt is trimmed from its oldest tokens so that memory +
  prompt + max_length fit max_context_length (itself capped by --max-model-len), and max_length is capped
  so some context always remains.
- Samplers: temperature (<= 0: greedy), top_k (< 1: off), top_p, min_p, rep_pen over the last
  rep_pen_range tokens with rep_pen_slope, presence_penalty over the same window, logit_bias, sampler_seed,
  stop_sequence with trim_stop (default on: the stop string is cut from the text), the default
  sampler_order (repetition penalties, truncations, then temperature). Samplers fitllm does not implement
  (top_a, typical, tfs, mirostat, dynamic temperature, smoothing, DRY, XTC, top-n-sigma, grammars, banned
  strings, images) are accepted only at their neutral values; anything else is a 400 naming the field.
- `logprobs: true` returns, as KoboldCpp does, each generated token's logprob and its top 5 alternatives in
  the chat API's `content` list beside the completions API's `tokens` / `token_logprobs` / `top_logprobs`.
- Bodies are read as JSON whatever their content type (a cross-origin page cannot use that to skip the
  CORS preflight: the request guard refuses origins not allowed before anything runs); a genkey keeps its
  job's text and abort to whoever holds it (check and abort without one refer to the latest job only if
  it has none), and a genkey whose job still runs is refused for a new job (409), so nobody can take
  another's over. Genkeys are at most MAX_GENKEY_CHARS long.
- `/api/extra/version` reports KoboldCpp 1.49 with every optional feature off: 1.49 is the version from
  which KoboldAI Lite sends `memory` separately and streams over SSE, and every feature Lite enables below
  it is one fitllm serves or rejects clearly.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, TypeVar

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, Field, ValidationError

from fitllm.engine.request import RequestOutput, SamplingParams
from fitllm.server.body import Body
from fitllm.server.errors import APIError, bad_request, kobold_error_body
from fitllm.server.heavy import OffloadedJSONRoute
from fitllm.server.openai.routes import chat_logprobs, legacy_logprobs
from fitllm.server.state import MAX_GENKEY_CHARS, ServerState, get_state
from fitllm.server.streaming import collect, events_or_error

router = APIRouter(route_class=OffloadedJSONRoute)
B = TypeVar("B", bound=BaseModel)

KOBOLD_API_VERSION = "1.2.5"  # the KoboldAI United API version KoboldCpp reports
KOBOLDCPP_VERSION = "1.49"
DEFAULT_MAX_LENGTH = 100
DEFAULT_SAMPLER_ORDER = [6, 0, 1, 3, 4, 2, 5]
# SamplingParams fields -> the Kobold fields they come from, so an error names what the client sent.
KOBOLD_NAMES = {
    "repetition_penalty": "rep_pen",
    "repetition_penalty_range": "rep_pen_range",
    "repetition_penalty_slope": "rep_pen_slope",
    "max_tokens": "max_length",
    "seed": "sampler_seed",
}
KOBOLD_LOGPROBS = 5  # alternatives per token KoboldCpp reports (its logprobs_max)
REP_PEN, TOP_K, TOP_A, TOP_P, TFS, TYPICAL, TEMPERATURE = 6, 0, 1, 2, 3, 4, 5


class KoboldGenerateRequest(Body):
    """POST /api/v1/generate and /api/extra/generate/stream, with KoboldCpp's defaults."""

    prompt: str = ""
    memory: str = ""
    max_length: int = DEFAULT_MAX_LENGTH
    max_context_length: int | None = None
    temperature: float = 0.75
    top_k: int = 100
    top_p: float = 0.92
    min_p: float = 0.0
    top_a: float = 0.0
    typical: float = 1.0
    tfs: float = 1.0
    nsigma: float = 0.0
    rep_pen: float = 1.0
    rep_pen_range: int = 320
    rep_pen_slope: float = 1.0
    presence_penalty: float = 0.0
    sampler_order: list[int] | None = None
    sampler_seed: int = -1
    stop_sequence: list[str] | None = None
    trim_stop: bool = True
    genkey: str = Field(default="", max_length=MAX_GENKEY_CHARS)
    mirostat: int = 0
    dynatemp_range: float = 0.0
    smoothing_factor: float = 0.0
    dry_multiplier: float = 0.0
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.2
    grammar: str = ""
    banned_tokens: list[str] | None = None
    banned_strings: list[str] | None = None
    logit_bias: dict[str, float] | None = None
    use_default_badwordsids: bool = False
    ban_eos_token: bool | None = None
    bypass_eos: bool = False
    images: list[Any] | None = None
    logprobs: bool = False  # KoboldAI Lite's token-probability view: the top KOBOLD_LOGPROBS per token


class GenkeyRequest(Body):
    genkey: str = Field(default="", max_length=MAX_GENKEY_CHARS)


class TokenCountRequest(Body):
    prompt: str = ""
    special: bool = True


class DetokenizeRequest(Body):
    ids: list[int]


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


# ---- translating a request ----------------------------------------------------------------------------


def _reject_unsupported(body: KoboldGenerateRequest) -> None:
    """400 for a sampler fitllm does not implement set to a non-neutral value (never silently ignored)."""
    unsupported = [
        ("top_a", body.top_a > 0, "0"),
        ("typical", body.typical < 1, "1"),
        ("tfs", body.tfs < 1, "1"),
        ("nsigma", body.nsigma > 0, "0"),
        ("mirostat", body.mirostat in (1, 2), "0"),
        ("dynatemp_range", body.dynatemp_range > 0, "0"),
        ("smoothing_factor", body.smoothing_factor > 0, "0"),
        ("dry_multiplier", body.dry_multiplier > 0, "0"),
        ("xtc_probability", body.xtc_probability > 0 and body.xtc_threshold <= 0.5, "0"),
        ("grammar", bool(body.grammar), "empty"),
        ("banned_tokens", bool(body.banned_tokens or body.banned_strings), "empty"),
        ("images", bool(body.images), "empty"),
    ]
    for name, used, neutral in unsupported:
        if used:
            raise bad_request(f"{name} is not supported by fitllm; set it to {neutral} (off)", name)


def _temperature_last(body: KoboldGenerateRequest) -> bool:
    """Map sampler_order onto the orders fitllm's sampler has: repetition penalties first, top-k before
    top-p / min-p, temperature either before every active cut or after all of them."""
    order = body.sampler_order or DEFAULT_SAMPLER_ORDER
    if sorted(set(order)) != sorted(order) or any(not 0 <= s <= 6 for s in order):
        raise bad_request(f"sampler_order must list distinct sampler ids 0-6; got {order}", "sampler_order")
    pos = {s: i for i, s in enumerate(order)}
    active = [s for s, on in ((TOP_K, body.top_k >= 1), (TOP_P, body.top_p < 1 or body.min_p > 0)) if on]
    if REP_PEN in pos and any(pos.get(s, -1) < pos[REP_PEN] for s in (*active, TEMPERATURE) if s in pos):
        raise bad_request("sampler_order: fitllm applies repetition penalties (6) first", "sampler_order")
    if TOP_K in active and TOP_P in active and pos.get(TOP_P, 99) < pos.get(TOP_K, 99):
        raise bad_request("sampler_order: fitllm applies top_k (0) before top_p (2)", "sampler_order")
    t = pos.get(TEMPERATURE, len(order))
    before = [s for s in active if pos.get(s, 99) < t]
    if before and len(before) != len(active):
        raise bad_request(
            "sampler_order: temperature (5) must come before or after all active truncation samplers",
            "sampler_order",
        )
    return bool(before)


def _reject_non_finite(body: KoboldGenerateRequest) -> None:
    """400 for a NaN or infinite number: the clamps below (max, min) would silently turn NaN into a
    neutral value (a NaN temperature into greedy, a NaN top_p into off), answering another question."""
    numbers = [(n, v) for n in type(body).model_fields if isinstance(v := getattr(body, n), float)]
    numbers += [(f"logit_bias[{k}]", v) for k, v in (body.logit_bias or {}).items()]
    for name, value in numbers:
        if not math.isfinite(value):
            raise bad_request(f"{name} must be a finite number; got {value}", name.split("[")[0])


def sampling_params(body: KoboldGenerateRequest, max_length: int, eos_ids: list[int]) -> SamplingParams:
    _reject_non_finite(body)
    _reject_unsupported(body)
    bias: dict[int, float] = {}
    for k, v in (body.logit_bias or {}).items():
        try:
            bias[int(k)] = max(-100.0, min(100.0, float(v)))
        except ValueError as exc:
            raise bad_request("logit_bias keys must be token ids", "logit_bias") from exc
    ban_eos = body.ban_eos_token if body.ban_eos_token is not None else body.use_default_badwordsids
    if ban_eos:
        bias.update(dict.fromkeys(eos_ids, -100.0))
    stops = [s for s in (body.stop_sequence or []) if s]
    try:
        return SamplingParams(
            temperature=max(0.0, body.temperature),
            # KoboldCpp: top_p 0 keeps only the most likely token; above 1, off.
            top_k=1 if body.top_p <= 0 else max(0, body.top_k),
            top_p=min(1.0, body.top_p) if body.top_p > 0 else 1.0,
            min_p=max(0.0, body.min_p),
            repetition_penalty=body.rep_pen,
            repetition_penalty_range=max(1, body.rep_pen_range),
            repetition_penalty_slope=body.rep_pen_slope,
            presence_penalty=body.presence_penalty,
            temperature_last=_temperature_last(body),
            seed=body.sampler_seed if body.sampler_seed > 0 else None,
            max_tokens=max_length,
            stop=stops,
            include_stop_str_in_output=not body.trim_stop,
            ignore_eos=bool(ban_eos or body.bypass_eos),
            logit_bias=bias or None,
            logprobs=KOBOLD_LOGPROBS if body.logprobs else None,
        )
    except ValueError as exc:
        message = str(exc)
        name = message.split(" ", 1)[0]
        kobold = KOBOLD_NAMES.get(name)
        raise bad_request(message.replace(name, kobold, 1) if kobold else message, kobold) from exc


def build_context(st: ServerState, body: KoboldGenerateRequest) -> tuple[list[int], int]:
    """(prompt token ids, max_length): memory whole at the front, then the newest prompt tokens that fit
    max_context_length - max_length (KoboldCpp's trimming)."""
    tok = st.tokenizer
    # 0 is a length, not "unset" (KoboldCpp takes it as given), so it is refused below like any short one.
    asked = st.max_model_len if body.max_context_length is None else body.max_context_length
    ctx = min(asked, st.max_model_len)
    if ctx < 8:
        raise bad_request(f"max_context_length must be at least 8; got {ctx}", "max_context_length")
    if body.max_length < 1:
        raise bad_request(f"max_length must be at least 1; got {body.max_length}", "max_length")
    max_length = min(body.max_length, ctx - max(min(ctx - 4, 16), int(0.2 * ctx)))
    bos = tok.encode("", add_special_tokens=True)  # [BOS] for models that start with it, else []
    memory = tok.encode(body.memory, add_special_tokens=False) if body.memory else []
    prompt = tok.encode(body.prompt, add_special_tokens=False)
    room = ctx - max_length - len(bos)
    if len(memory) > room - 1:
        memory = memory[len(memory) - (room - 1) :]  # memory alone overflows: its oldest tokens go
    keep = room - len(memory)
    prompt = prompt[len(prompt) - keep :] if len(prompt) > keep else prompt
    ids = bos + memory + prompt
    if len(ids) == len(bos):
        raise bad_request("the prompt is empty", "prompt")
    return ids, max_length


async def _start(st: ServerState, body: KoboldGenerateRequest):
    chars = len(body.memory) + len(body.prompt)
    st.check_prompt_chars(chars, "prompt")
    ids, max_length = await st.heavy.run(build_context, st, body, size=chars)
    params = sampling_params(body, max_length, st.tokenizer.eos_token_ids)
    rid = f"kobold-{uuid.uuid4().hex}"
    # The genkey is taken before the request is added, so two requests with one genkey cannot both pass.
    job = st.kobold_jobs.start(rid, body.genkey, params.seed if params.seed is not None else -1)
    try:
        stream = await st.start_streams(st.engine.add(ids, params, rid))
    except BaseException:
        st.kobold_jobs.drop(job)
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
        **dataclasses.asdict(st.kobold_jobs.perf),
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
    st = get_state(request)
    body = await read_body(request, KoboldGenerateRequest)
    stream, job = await _start(st, body)
    try:
        (final,) = await collect(request, [(0, stream)], lambda _, out: job.update(out.outputs[0].text))
    finally:
        job.done = True
    st.kobold_jobs.finish(job, final)
    c = final.outputs[0]
    logprobs = None
    if body.logprobs:  # KoboldCpp's shape: the chat API's `content` beside the completions API's lists
        ids, entries = c.token_ids, c.logprobs or []
        logprobs = chat_logprobs(st, ids, entries, KOBOLD_LOGPROBS) | legacy_logprobs(st, ids, entries, 0)
    return {
        "results": [
            {
                "text": c.text,
                "finish_reason": _finish_reason(final),
                "prompt_tokens": len(final.prompt_token_ids),
                "completion_tokens": len(c.token_ids),
                "logprobs": logprobs,
                "tool_calls": [],
            }
        ]
    }


@router.post("/api/extra/generate/stream")
async def generate_stream(request: Request) -> StreamingResponse:
    st = get_state(request)
    body = await read_body(request, KoboldGenerateRequest)
    stream, job = await _start(st, body)

    def event(token: str, finish_reason: str | None) -> str:
        return f"event: message\ndata: {json.dumps({'token': token, 'finish_reason': finish_reason})}\n\n"

    async def events() -> AsyncIterator[str]:
        try:
            async with stream:
                async for out in stream:
                    c = out.outputs[0]
                    job.update(c.text)
                    if c.delta_text:
                        yield event(c.delta_text, None)
                    if out.finished:
                        st.kobold_jobs.finish(job, out)
                        yield event("", _finish_reason(out))
        finally:
            job.done = True  # its client left: the genkey is free again

    def error_event(err: APIError) -> str:
        """KoboldCpp's stream has no error event: its last message event, finish_reason "error", with the
        error beside it in both shapes (a front end that knows no error still sees the stream end)."""
        data = {"token": "", "finish_reason": "error", **kobold_error_body(err)}
        return f"event: message\ndata: {json.dumps(data)}\n\n"

    headers = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
    return StreamingResponse(
        events_or_error(events(), error_event), media_type="text/event-stream", headers=headers
    )


@router.api_route("/api/extra/generate/check", methods=["GET", "POST"])
async def check(request: Request) -> dict[str, Any]:
    """The text so far of the job the genkey names (POST), or of the latest job if it has no genkey."""
    genkey = ""
    if request.method == "POST":
        genkey = (await read_body(request, GenkeyRequest, lenient=True)).genkey
    job = get_state(request).kobold_jobs.find(genkey)
    return {"results": [{"text": job.text if job else ""}]}


@router.post("/api/extra/abort")
async def abort(request: Request) -> dict[str, str]:
    """Abort the job the genkey names, or the latest job if it has no genkey (an empty body included)."""
    st = get_state(request)
    body = await read_body(request, GenkeyRequest, lenient=True)
    job = st.kobold_jobs.find(body.genkey)
    if job is None or job.done:
        return {"success": "false", "done": "false"}
    st.engine.abort(job.request_id)
    return {"success": "true", "done": "true"}


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
