"""OpenAI-compatible routes: /v1/models, /v1/completions, /v1/chat/completions, /tokenize, /detokenize,
/tokenizer_info.

Each prompt x choice is one engine request (`n` choices of one prompt share its KV blocks through the
prefix cache). Streams are server-sent events; a client that disconnects closes its streams, which aborts
their requests and frees their blocks.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from fitllm.engine.async_engine import RequestStream
from fitllm.engine.request import Logprob, RequestOutput, SamplingParams
from fitllm.server.errors import APIError, bad_request
from fitllm.server.heavy import OffloadedJSONRoute
from fitllm.server.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    SamplingFields,
    TokenizeRequest,
)
from fitllm.server.state import ServerState, get_state
from fitllm.server.streaming import collect, events_or_error, merged, sse_error

router = APIRouter(route_class=OffloadedJSONRoute)


def _sse(data: dict[str, Any] | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


def _sse_error(err: APIError) -> str:
    """A stream's last events when it fails, as vLLM sends them: the error object, then [DONE]."""
    return sse_error(err) + _sse("[DONE]")


def _event_stream(events: AsyncGenerator[str, None]) -> StreamingResponse:
    return StreamingResponse(events_or_error(events, _sse_error), media_type="text/event-stream")


async def _start(
    st: ServerState, prompts: list[str | list[int]], params: SamplingParams, body: SamplingFields, prefix: str
) -> list[tuple[int, RequestStream]]:
    """One engine request per prompt x choice, as (prompt index, stream); all or none are started."""
    streams: list[tuple[int, RequestStream]] = []
    try:
        for i, prompt in enumerate(prompts):
            for j in range(body.n):
                p = params
                if body.n > 1 and params.seed is not None:
                    p = dataclasses.replace(params, seed=params.seed + j)  # distinct, reproducible choices
                stream = await st.engine.add(prompt, p, f"{prefix}-{i}-{j}", body.priority)
                streams.append((i, stream))
    except BaseException:
        for _, s in streams:
            s.close()
        raise
    return streams


async def token_prompts(
    st: ServerState, prompts: list[str | list[int]], max_tokens: int | None, param: str
) -> list[list[int]]:
    """The prompts as token ids (each text checked against the character limit, then tokenized off the
    event loop), each checked against the context as vLLM's server does: a prompt that fills it, or a
    max_tokens it cannot hold after the prompt, is a 400 rather than a reply cut short."""
    out = []
    limit = st.max_model_len
    for prompt in prompts:
        ids = await st.encode(prompt, param) if isinstance(prompt, str) else list(prompt)
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


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _token_text(st: ServerState, token_id: int, entry: Logprob | None = None) -> str:
    if entry is not None and entry.decoded_token is not None:
        return entry.decoded_token
    return st.tokenizer.decode([token_id], skip_special_tokens=False)


def legacy_logprobs(
    st: ServerState, token_ids: list[int], entries: list[dict[int, Logprob] | None], offset: int
) -> dict[str, Any]:
    """The completions API's logprobs object for `token_ids` (text offsets start at `offset`); a None entry
    (an echoed prompt's first token) has no logprob and no alternatives."""
    tokens, token_logprobs, top, offsets = [], [], [], []
    for tok, entry in zip(token_ids, entries, strict=False):
        own = None if entry is None else entry.get(tok)
        text = _token_text(st, tok, own)
        tokens.append(text)
        token_logprobs.append(None if own is None else own.logprob)
        if entry is None:
            top.append(None)
        else:  # the token's own logprob wins where an alternative decodes to the same text
            others = {_token_text(st, t, lp): lp.logprob for t, lp in entry.items() if t != tok}
            top.append(others if own is None else others | {text: own.logprob})
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top, "text_offset": offsets}


def chat_logprobs(st: ServerState, token_ids: list[int], entries: list[dict[int, Logprob]], top_n: int):
    """The chat API's logprobs. `token` is the token decoded alone (U+FFFD where it holds part of a UTF-8
    character); `bytes` are the token's own bytes, from which a client can rebuild the text exactly."""
    token_bytes = st.tokenizer.token_bytes
    content = []
    for tok, entry in zip(token_ids, entries, strict=False):
        text = _token_text(st, tok, entry.get(tok))
        ranked = sorted(entry.items(), key=lambda kv: -kv[1].logprob)[:top_n]
        content.append(
            {
                "token": text,
                "logprob": entry[tok].logprob if tok in entry else None,
                "bytes": list(token_bytes(tok)),
                "top_logprobs": [
                    {"token": _token_text(st, i, lp), "logprob": lp.logprob, "bytes": list(token_bytes(i))}
                    for i, lp in ranked
                ],
            }
        )
    return {"content": content}


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
    if body.suffix:
        raise bad_request("suffix is not supported", "suffix")
    if body.best_of is not None and body.best_of != body.n:
        raise bad_request("best_of other than n is not supported", "best_of")
    if body.echo and body.logprobs is not None and body.stream:
        raise bad_request("echo with logprobs is not supported while streaming", "echo")
    if body.echo and body.max_tokens == 0:
        return await _echo_only(st, body)
    params = body.sampling_params(body.max_tokens, body.logprobs)
    prompts = body.prompts()
    ids = await token_prompts(st, prompts, body.max_tokens, "prompt")
    prompt_scores = None
    if body.echo and body.logprobs is not None:
        prompt_scores = [await st.score_prompt(p, body.logprobs) for p in ids]
    cid = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await st.start_streams(_start(st, ids, params, body, cid))
    model = body.model or st.model_name

    def echo_text(i: int, out: RequestOutput) -> str:
        p = prompts[i]
        return p if isinstance(p, str) else st.tokenizer.decode(out.prompt_token_ids)

    if body.stream:

        async def events() -> AsyncIterator[str]:
            sent_echo: set[int] = set()
            next_offset: dict[int, int] = {}  # per choice: text offset of its next logprob token
            prompt_tokens: dict[int, int] = {}
            completion_tokens = 0
            async for k, out in merged(streams):
                i = streams[k][0]
                prompt_tokens[i] = len(out.prompt_token_ids)
                c = out.outputs[0]
                completion_tokens += len(c.delta_token_ids)
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
                    logprobs = legacy_logprobs(st, c.delta_token_ids, c.logprobs[-n:], offset)
                    next_offset[k] = offset + sum(len(t) for t in logprobs["tokens"])
                if not text and not out.finished and logprobs is None:
                    continue
                choice = {
                    "index": k,
                    "text": text,
                    "logprobs": logprobs,
                    "finish_reason": out.outputs[0].finish_reason if out.finished else None,
                }
                yield _sse(_envelope("text_completion", cid, created, model, [choice]))
            if body.include_usage:
                usage = _usage(sum(prompt_tokens.values()), completion_tokens)
                yield _sse(_envelope("text_completion", cid, created, model, [], usage=usage))
            yield _sse("[DONE]")

        return _event_stream(events())

    finals = await collect(request, streams)
    choices = []
    for k, out in enumerate(finals):
        i = streams[k][0]
        c = out.outputs[0]
        text = c.text
        logprobs = None
        if body.logprobs is not None:
            logprobs = legacy_logprobs(st, c.token_ids, c.logprobs or [], 0)
        if body.echo:
            prefix = echo_text(i, out)
            if logprobs is not None and prompt_scores is not None:
                head = legacy_logprobs(st, *prompt_scores[i], 0)
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
    prompt_tokens = sum(
        len(finals[k].prompt_token_ids) for k in {streams[k][0]: k for k in range(len(finals))}.values()
    )
    completion_tokens = sum(len(o.outputs[0].token_ids) for o in finals)
    usage = _usage(prompt_tokens, completion_tokens)
    return JSONResponse(_envelope("text_completion", cid, created, model, choices, usage=usage))


async def _echo_only(st: ServerState, body: CompletionRequest) -> JSONResponse | StreamingResponse:
    """`echo` with `max_tokens: 0`: each prompt back, with its logprobs if asked, and nothing generated."""
    body.refuse_unsupported()
    prompts = body.prompts()
    ids = await token_prompts(st, prompts, 0, "prompt")
    cid, created, model = f"cmpl-{uuid.uuid4().hex}", int(time.time()), body.model or st.model_name
    choices = []
    for i, (prompt, prompt_ids) in enumerate(zip(prompts, ids, strict=True)):
        text = prompt if isinstance(prompt, str) else st.tokenizer.decode(prompt_ids)
        logprobs = None
        if body.logprobs is not None:
            logprobs = legacy_logprobs(st, *await st.score_prompt(prompt_ids, body.logprobs), 0)
        for j in range(body.n):
            choices.append(
                {"index": i * body.n + j, "text": text, "logprobs": logprobs, "finish_reason": "length"}
            )
    usage = _usage(sum(len(p) for p in ids), 0)
    if body.stream:

        async def events() -> AsyncIterator[str]:
            for choice in choices:
                yield _sse(_envelope("text_completion", cid, created, model, [choice]))
            if body.include_usage:
                yield _sse(_envelope("text_completion", cid, created, model, [], usage=usage))
            yield _sse("[DONE]")

        return _event_stream(events())
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
    params = body.sampling_params(max_tokens, top_n if body.logprobs else None)
    prompt = await st.render_chat(
        [{"role": m.role, "content": m.text()} for m in body.messages], body.add_generation_prompt
    )
    ids = await token_prompts(st, [prompt], max_tokens, "messages")
    cid = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    streams = await st.start_streams(_start(st, ids, params, body, cid))
    model = body.model or st.model_name

    def chunk(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return _envelope("chat.completion.chunk", cid, created, model, choices)

    if body.stream:

        async def events() -> AsyncIterator[str]:
            for k in range(len(streams)):
                yield _sse(
                    chunk(
                        [
                            {
                                "index": k,
                                "delta": {"role": "assistant", "content": ""},
                                "logprobs": None,
                                "finish_reason": None,
                            }
                        ]
                    )
                )
            prompt_tokens, completion_tokens = 0, 0
            async for k, out in merged(streams):
                prompt_tokens = len(out.prompt_token_ids)
                c = out.outputs[0]
                completion_tokens += len(c.delta_token_ids)
                logprobs = None
                if body.logprobs and c.delta_token_ids and c.logprobs is not None:
                    n = len(c.delta_token_ids)
                    logprobs = chat_logprobs(st, c.delta_token_ids, c.logprobs[-n:], top_n)
                if not c.delta_text and not out.finished and logprobs is None:
                    continue
                delta = {"content": c.delta_text} if c.delta_text else {}
                yield _sse(
                    chunk(
                        [
                            {
                                "index": k,
                                "delta": delta,
                                "logprobs": logprobs,
                                "finish_reason": out.outputs[0].finish_reason if out.finished else None,
                            }
                        ]
                    )
                )
            if body.include_usage:
                yield _sse(chunk([]) | {"usage": _usage(prompt_tokens, completion_tokens)})
            yield _sse("[DONE]")

        return _event_stream(events())

    finals = await collect(request, streams)
    choices = []
    for k, out in enumerate(finals):
        c = out.outputs[0]
        choices.append(
            {
                "index": k,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": chat_logprobs(st, c.token_ids, c.logprobs or [], top_n)
                if body.logprobs
                else None,
                "finish_reason": out.outputs[0].finish_reason,
            }
        )
    completion_tokens = sum(len(o.outputs[0].token_ids) for o in finals)
    usage = _usage(len(finals[0].prompt_token_ids), completion_tokens)
    return JSONResponse(_envelope("chat.completion", cid, created, model, choices, usage=usage))


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> dict[str, Any]:
    st = get_state(request)
    st.check_model(body.model)
    if (body.prompt is None) == (body.messages is None):
        raise bad_request("give either prompt or messages", "prompt")
    if body.messages is not None:
        text = await st.render_chat([{"role": m.role, "content": m.text()} for m in body.messages], True)
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
