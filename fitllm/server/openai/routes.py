"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize,
/tokenizer_info.

Each prompt x choice is one engine request (`n` choices of one prompt share its KV blocks through the
prefix cache). Streams are server-sent events, every one of the same shape (`_chunks`: a chunk per choice
update, the usage chunk if asked, then [DONE]; an error event then [DONE] if it fails); a client that
disconnects closes its streams, which aborts their requests and frees their blocks. Usage counts each
prompt once, with `prompt_tokens_details.cached_tokens` its tokens not prefilled (server/reuse.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fitllm.engine.request import RequestOutput, SamplingParams
from fitllm.engine.request_stream import RequestStream
from fitllm.server import sse
from fitllm.server.errors import APIError, bad_request
from fitllm.server.fim_prompts import fim_params, fim_prompt
from fitllm.server.heavy import OffloadedJSONRoute
from fitllm.server.logprobs import chat_logprobs, legacy_logprobs
from fitllm.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from fitllm.server.openai.tool_parsers import ToolReplies
from fitllm.server.openai.tools import chat_tools
from fitllm.server.reuse import reused_tokens
from fitllm.server.state import ServerState, get_state
from fitllm.server.streaming import collect, merged

router = APIRouter(route_class=OffloadedJSONRoute)


def _sse_error(err: APIError) -> str:
    """A stream's last events when it fails, as vLLM sends them: the error object, then [DONE]."""
    return sse.event(sse.error_data(err)) + sse.event("[DONE]")


@dataclass(slots=True)
class _Usage:
    """Tokens counted as a stream's outputs arrive, for its usage chunk."""

    prompt: dict[int, tuple[int, int]] = field(default_factory=dict)  # by prompt index: (tokens, reused)
    completion: int = 0

    def see(self, prompt_index: int, out: RequestOutput) -> None:
        """A streamed output: its prompt, and its new tokens."""
        self.see_prompt(prompt_index, out)
        self.completion += len(out.outputs[0].delta_token_ids)

    def see_prompt(self, prompt_index: int, out: RequestOutput) -> None:
        self.prompt[prompt_index] = (len(out.prompt_token_ids), reused_tokens(out.reuse))

    @classmethod
    def of_finals(cls, finals: list[RequestOutput], prompt_index: Callable[[int], int]) -> _Usage:
        """The usage of finished outputs (choice k answers prompt `prompt_index(k)`)."""
        usage = cls(completion=sum(len(o.outputs[0].token_ids) for o in finals))
        for k, out in enumerate(finals):
            usage.see_prompt(prompt_index(k), out)
        return usage

    def as_dict(self) -> dict[str, Any]:
        return _usage(
            sum(p for p, _ in self.prompt.values()), self.completion, sum(c for _, c in self.prompt.values())
        )


async def _chunks(
    choices: AsyncGenerator[dict[str, Any], None],
    chunk: Callable[[list[dict[str, Any]]], dict[str, Any]],
    usage: Callable[[], dict[str, int]] | None,
    continuous: bool = False,
) -> AsyncIterator[str]:
    """Every OpenAI stream: one chunk per choice update (each with the usage so far if `continuous`, as
    vLLM's continuous_usage_stats), the usage chunk if asked, then [DONE]."""
    async with contextlib.aclosing(choices):
        async for choice in choices:
            data = chunk([choice])
            if continuous and usage is not None:
                data["usage"] = usage()
            yield sse.event(data)
    if usage is not None:
        yield sse.event(chunk([]) | {"usage": usage()})
    yield sse.event("[DONE]")


def _event_stream(
    choices: AsyncGenerator[dict[str, Any], None],
    chunk: Callable[[list[dict[str, Any]]], dict[str, Any]],
    usage: Callable[[], dict[str, int]] | None,
    continuous: bool = False,
) -> StreamingResponse:
    return sse.response(_chunks(choices, chunk, usage, continuous), _sse_error)


async def _start(
    st: ServerState, prompts: list[str | list[int]], params: SamplingParams, body: SamplingFields, prefix: str
) -> list[tuple[int, RequestStream]]:
    """One engine request per prompt x choice, as (prompt index, stream); all or none are started, in one
    engine command (so the choices are admitted, and batch, together)."""
    requests, owners = [], []
    for i, prompt in enumerate(prompts):
        for j in range(body.n):
            p = params
            if body.n > 1 and params.seed is not None:
                p = dataclasses.replace(params, seed=params.seed + j)  # distinct, reproducible choices
            requests.append((prompt, p, f"{prefix}-{i}-{j}", body.priority))
            owners.append(i)
    streams = await st.engine.add_all(requests)
    return list(zip(owners, streams, strict=True))


async def token_prompts(
    st: ServerState,
    prompts: list[str | list[int]],
    max_tokens: int | None,
    param: str,
    add_special_tokens: bool = True,
) -> list[list[int]]:
    """The prompts as token ids (each text checked against the character limit, then tokenized off the
    event loop), each checked against the context as vLLM's server does: a prompt that fills it, or a
    max_tokens it cannot hold after the prompt, is a 400 rather than a reply cut short."""
    out = []
    limit = st.max_model_len
    for prompt in prompts:
        if isinstance(prompt, str):
            ids = await st.encode(prompt, param, add_special_tokens)
        else:
            ids = list(prompt)
        if len(ids) >= limit:
            raise bad_request(
                f"this model's maximum context length is {limit} tokens and the prompt has {len(ids)}; "
                f"shorten the prompt",
                param,
            )
        if max_tokens is not None and len(ids) + max_tokens > limit:
            raise bad_request(
                f"this model's maximum context length is {limit} tokens, but {len(ids) + max_tokens} were "
                f"requested ({len(ids)} in the prompt, {max_tokens} in the completion); lower max_tokens to "
                f"{limit - len(ids)} or less, or shorten the prompt",
                "max_tokens",
            )
        out.append(ids)
    return out


def _envelope(obj: str, cid: str, created: int, model: str, choices: list, **extra: Any) -> dict[str, Any]:
    """A response or stream chunk: {"id", "object", "created", "model", "choices", ...extra}."""
    return {"id": cid, "object": obj, "created": created, "model": model, "choices": choices, **extra}


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens},
    }


# ---- routes --------------------------------------------------------------------------------------------


@router.get("/v1/models")
async def list_models(request: Request) -> dict[str, Any]:
    st = get_state(request)
    return {"object": "list", "data": [st.model_card()]}


@router.get("/v1/models/{model_id:path}")
async def get_model(model_id: str, request: Request) -> dict[str, Any]:
    st = get_state(request)
    st.check_model(model_id)
    return st.model_card()


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    st = get_state(request)
    st.check_model(body.model)
    st.check_priority(body.priority)
    if body.suffix and body.echo:
        raise bad_request("echo with suffix is not supported", "echo")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", "best_of")
    if body.echo and body.logprobs is not None and body.stream:
        raise bad_request("echo with logprobs is not supported while streaming", "echo")
    if body.echo and body.max_tokens == 0:
        return await _echo_only(st, body)
    params = body.sampling_params(
        body.max_tokens, body.logprobs, st.context_shift_for(body.context_shift, "openai")
    )
    prompts = body.prompts()
    if body.suffix:  # fill in the middle: each prompt is a prefix (fitllm/server/fim_prompts.py)
        if not all(isinstance(p, str) for p in prompts):
            raise bad_request("suffix needs the prompt as text, not token ids", "prompt")
        params = fim_params(st, params)
        prompts = [await fim_prompt(st, p, body.suffix) for p in prompts]  # type: ignore[arg-type]
    ids = await token_prompts(st, prompts, body.max_tokens, "prompt")
    prompt_scores = None
    if body.echo and body.logprobs is not None:
        prompt_scores = [await st.score_prompt(p, body.logprobs) for p in ids]
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await st.start_streams(_start(st, ids, params, body, cid))
    model, served = body.model or st.model_name, st.model

    def echo_text(i: int, out: RequestOutput) -> str:
        p = prompts[i]
        return p if isinstance(p, str) else served.tokenizer.decode(out.prompt_token_ids)

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _envelope("text_completion", cid, created, model, choices)

    if body.stream:
        usage = _Usage({i: (len(p), 0) for i, p in enumerate(ids)})

        async def choices() -> AsyncGenerator[dict[str, Any], None]:
            sent_echo: set[int] = set()
            next_offset: dict[int, int] = {}  # per choice: text offset of its next logprob token
            async for k, out in merged(streams):
                i = streams[k][0]
                usage.see(i, out)
                c = out.outputs[0]
                text = c.delta_text
                if body.echo and k not in sent_echo:
                    sent_echo.add(k)
                    prefix = echo_text(i, out)
                    next_offset[k] = len(prefix)
                    text = prefix + text
                logprobs = None
                if body.logprobs is not None and c.delta_token_ids and c.logprobs is not None:
                    n = len(c.delta_token_ids)
                    offset = next_offset.get(k, 0)
                    logprobs = legacy_logprobs(served, c.delta_token_ids, c.logprobs[-n:], offset)
                    next_offset[k] = offset + sum(len(t) for t in logprobs["tokens"])
                if not text and not out.finished and logprobs is None:
                    continue
                yield {
                    "index": k,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": out.outputs[0].finish_reason if out.finished else None,
                }

        return _event_stream(
            choices(), chunk, usage.as_dict if body.include_usage else None, body.continuous_usage
        )

    finals = await collect(request, streams)
    choices = []
    for k, out in enumerate(finals):
        i = streams[k][0]
        c = out.outputs[0]
        text = c.text
        logprobs = None
        if body.logprobs is not None:
            logprobs = legacy_logprobs(served, c.token_ids, c.logprobs or [], 0)
        if body.echo:
            prefix = echo_text(i, out)
            if logprobs is not None and prompt_scores is not None:
                head = legacy_logprobs(served, *prompt_scores[i], 0)
                logprobs = {
                    "tokens": head["tokens"] + logprobs["tokens"],
                    "token_logprobs": head["token_logprobs"] + logprobs["token_logprobs"],
                    "top_logprobs": head["top_logprobs"] + logprobs["top_logprobs"],
                    "text_offset": head["text_offset"] + [o + len(prefix) for o in logprobs["text_offset"]],
                }
            text = prefix + text
        choices.append(
            {"index": k, "text": text, "logprobs": logprobs, "finish_reason": out.outputs[0].finish_reason}
        )
    usage = _Usage.of_finals(finals, lambda k: streams[k][0])
    return JSONResponse(_envelope("text_completion", cid, created, model, choices, usage=usage.as_dict()))


async def _echo_only(st: ServerState, body: CompletionRequest) -> JSONResponse | StreamingResponse:
    """`echo` with `max_tokens: 0`: each prompt back, with its logprobs if asked, and nothing generated."""
    body.refuse_unsupported()
    prompts = body.prompts()
    ids = await token_prompts(st, prompts, 0, "prompt")
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or st.model_name
    served = st.model
    choices = []
    for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
        text = prompt if isinstance(prompt, str) else served.tokenizer.decode(prompt_ids)
        logprobs = None
        if body.logprobs is not None:
            logprobs = legacy_logprobs(served, *await st.score_prompt(prompt_ids, body.logprobs), 0)
        for j in range(body.n):
            choices.append(
                {"index": i * body.n + j, "text": text, "logprobs": logprobs, "finish_reason": "length"}
            )
    usage = _usage(sum(len(p) for p in ids), 0)
    if body.stream:

        async def each() -> AsyncGenerator[dict[str, Any], None]:
            for choice in choices:
                yield choice

        def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
            return _envelope("text_completion", cid, created, model, choices)

        return _event_stream(
            each(), chunk, (lambda: usage) if body.include_usage else None, body.continuous_usage
        )
    return JSONResponse(_envelope("text_completion", cid, created, model, choices, usage=usage))


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    st = get_state(request)
    st.check_model(body.model)
    st.check_priority(body.priority)
    top_n = body.top_logprobs or 0
    if body.top_logprobs is not None and not body.logprobs:
        raise bad_request("top_logprobs needs logprobs: true", "top_logprobs")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    shift = st.context_shift_for(body.context_shift, "openai")
    params = body.sampling_params(max_tokens, top_n if body.logprobs else None, shift)
    tools, family, forced, messages = chat_tools(
        body.model_extra or {}, st.tokenizer.chat_template, [m.template_dict() for m in body.messages]
    )
    if forced is not None:
        if params.structured_output is not None:
            raise bad_request(
                f"tool_choice {tools.choice!r} forces a tool call and {params.structured_output.field} "
                "constrains the output too; send one",
                "tool_choice",
            )
        params = dataclasses.replace(params, structured_output=forced)
    prompt = await st.render_chat(messages, body.add_generation_prompt, tools.tools if tools else None)
    ids = await token_prompts(st, [prompt], max_tokens, "messages", body.add_special_tokens)
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await st.start_streams(_start(st, ids, params, body, cid))
    model, served = body.model or st.model_name, st.model

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _envelope("chat.completion.chunk", cid, created, model, choices)

    replies = ToolReplies(family, tools.names if tools is not None else set(), len(streams))
    if body.stream:
        usage = _Usage({0: (len(ids[0]), 0)})

        async def choices() -> AsyncGenerator[dict[str, Any], None]:
            for k in range(len(streams)):
                yield {
                    "index": k,
                    "delta": {"role": "assistant", "content": ""},
                    "logprobs": None,
                    "finish_reason": None,
                }
            async for k, out in merged(streams):
                usage.see(streams[k][0], out)
                c = out.outputs[0]
                logprobs = None
                if body.logprobs and c.delta_token_ids and c.logprobs is not None:
                    n = len(c.delta_token_ids)
                    logprobs = chat_logprobs(served, c.delta_token_ids, c.logprobs[-n:], top_n)
                if not c.delta_text and not out.finished and logprobs is None:
                    continue
                d = replies.delta(k, c.delta_text, out.finished)
                if not d and not out.finished and logprobs is None:
                    continue  # text held back: it may be the start of a tool call
                reason = replies.finish_reason(k, c.finish_reason if out.finished else None)
                yield {"index": k, "delta": d, "logprobs": logprobs, "finish_reason": reason}

        return _event_stream(
            choices(), chunk, usage.as_dict if body.include_usage else None, body.continuous_usage
        )

    finals = await collect(request, streams)
    choices = []
    for k, out in enumerate(finals):
        c = out.outputs[0]
        message, reason = replies.message(c.text, c.finish_reason)
        choices.append(
            {
                "index": k,
                "message": message,
                "logprobs": chat_logprobs(served, c.token_ids, c.logprobs or [], top_n)
                if body.logprobs
                else None,
                "finish_reason": reason,
            }
        )
    usage = _Usage.of_finals(finals, lambda k: 0)
    return JSONResponse(_envelope("chat.completion", cid, created, model, choices, usage=usage.as_dict()))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    st = get_state(request)
    st.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give either prompt or messages", "prompt")
    if body.messages is not None:
        text = await st.render_chat([m.template_dict() for m in body.messages], True)
    else:
        text = body.prompt or ""
    ids = await st.encode(text, "prompt", body.add_special_tokens)
    return {"tokens": ids, "count": len(ids), "max_model_len": st.max_model_len}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request) -> dict[str, Any]:
    st = get_state(request)
    st.check_model(body.model)
    return {"prompt": await st.detokenize(body.tokens, "tokens")}


@router.get("/tokenizer_info")
async def tokenizer_info(request: Request) -> dict[str, Any]:
    st = get_state(request)
    tok = st.tokenizer
    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "vocab_size": tok.vocab_size,
        "bos_token": tok.bos_token or None,
        "eos_token": tok.eos_token or None,
        "bos_token_id": tok.bos_token_id,
        "eos_token_ids": tok.eos_token_ids,
        "chat_template": tok.chat_template,
        "model_max_length": st.max_model_len,
    }
