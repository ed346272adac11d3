"""Request bodies of the OpenAI-compatible routes, and their translation into SamplingParams.

Unknown fields are accepted and ignored (front ends send several backends' fields in one body), except the
ones other servers honour that would change the answer: other servers' sampler names are honoured
(sampler_fields.HONOURED), and the rest are a 400 (UNSUPPORTED_FIELDS, sampler_fields.REFUSED); known
fields are type-checked by pydantic (a 400 naming the field) and range-checked by SamplingParams.validate.

fitllm's one extension field, `context_shift` (true / false; absent: --context-shift, else off), lets a
request reuse a trimmed prompt's cached K/V by a context shift (K rotated to the new positions: close to,
not bit-identical with, recomputing; fitllm/server/story_trim.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt

from fitllm.engine.request import SamplingParams
from fitllm.server.body import Body
from fitllm.server.errors import bad_request
from fitllm.server.openai.sampler_fields import REFUSED, banned_phrases, writer_kwargs
from fitllm.server.openai.structured_fields import structured_output
from fitllm.server.openai.tools import template_message

MAX_N = 16  # choices per request


def _set(value: Any) -> bool:
    return value not in (None, False, "", [], {})


# Fields other OpenAI-compatible servers honour and fitllm does not. Ignoring one would answer a different
# question than the client asked (free text instead of JSON, no tool call, beams, a truncated prompt), so
# each is a 400 unless it is at its neutral value.
UNSUPPORTED_FIELDS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "guided_whitespace_pattern": (_set, "guided_whitespace_pattern is not supported"),
    "guided_decoding_backend": (
        lambda v: _set(v) and v not in ("auto", "guidance", "llguidance"),
        "fitllm's only guided decoding backend is llguidance",
    ),
    "allowed_token_ids": (_set, "allowed_token_ids is not supported (use logit_bias)"),
    "bad_words": (_set, "bad_words is not supported (use logit_bias)"),
    "prompt_logprobs": (
        lambda v: v is not None,
        "prompt_logprobs is not supported; use /v1/completions with echo and logprobs",
    ),
    "use_beam_search": (_set, "beam search is not supported"),
    "truncate_prompt_tokens": (lambda v: v is not None, "truncate_prompt_tokens is not supported"),
    "continue_final_message": (_set, "continue_final_message is not supported"),
    **REFUSED,
}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM: the usage so far on every chunk (with include_usage)


class SamplingFields(Body):
    """Fields the completion and chat routes share (OpenAI names, plus vLLM's extras)."""

    model: str | None = None
    # Strict numbers, as OpenAI's API: "4", 3.0 or true for an integer (or "0.5" for a float) is a 400,
    # never silently read as another value.
    temperature: StrictFloat | None = None
    top_p: StrictFloat | None = None
    top_k: StrictInt | None = None
    min_p: StrictFloat | None = None
    n: StrictInt = 1
    stop: str | list[str] | None = None
    stop_token_ids: list[StrictInt] | None = None
    seed: StrictInt | None = None
    presence_penalty: StrictFloat | None = None
    frequency_penalty: StrictFloat | None = None
    repetition_penalty: StrictFloat | None = None
    logit_bias: dict[str, StrictFloat] | None = None
    ignore_eos: bool = False
    min_tokens: StrictInt = 0
    stream: bool = False
    stream_options: StreamOptions | None = None
    priority: int = 0
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    context_shift: StrictBool | None = None  # fitllm's extension (module docstring)
    banned_strings: list[str] | None = None  # TabbyAPI's / KoboldCpp's anti-slop phrases
    serves_tools: ClassVar[bool] = False  # the chat route reads tools itself (openai/tools.py)

    def refuse_unsupported(self) -> None:
        """400 for a field fitllm would otherwise ignore while it changes the answer (UNSUPPORTED_FIELDS, tools
        the client wants called outside the chat route, which serves them: openai/tools.py), or
        stream_options without stream (as vLLM)."""
        extra = self.model_extra or {}
        for name, (used, why) in UNSUPPORTED_FIELDS.items():
            if name in extra and used(extra[name]):
                raise bad_request(f"{name}: {why} by fitllm", name)
        if not self.serves_tools and _set(extra.get("tools")) and extra.get("tool_choice", "auto") != "none":
            raise bad_request(
                'tools: tool calls are served on /v1/chat/completions only; send tool_choice "none" or no tools',
                "tools",
            )
        if self.stream_options is not None and not self.stream:
            raise bad_request("stream_options is only allowed with stream: true", "stream_options")

    def sampling_params(
        self, max_tokens: int | None, logprobs: int | None, context_shift: bool | None = None
    ) -> SamplingParams:
        """The request's SamplingParams; `context_shift` is the route's resolved choice (ServerState)."""
        self.refuse_unsupported()
        if not 1 <= self.n <= MAX_N:
            raise bad_request(f"n must be in [1, {MAX_N}]; got {self.n}", "n")
        bias = None
        if self.logit_bias:
            try:
                bias = {int(k): float(v) for k, v in self.logit_bias.items()}
            except ValueError as exc:
                raise bad_request("logit_bias keys must be token ids", "logit_bias") from exc
        values: dict[str, Any] = {
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "seed": self.seed,
        }
        kwargs, names = writer_kwargs(self.model_extra or {}, values)
        try:
            return SamplingParams(
                **kwargs,
                max_tokens=max_tokens,
                min_tokens=self.min_tokens,
                stop=[self.stop] if isinstance(self.stop, str) else list(self.stop or []),
                stop_token_ids=list(self.stop_token_ids or []),
                ignore_eos=self.ignore_eos,
                logprobs=logprobs,
                logit_bias=bias,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                context_shift=context_shift,
                banned_strings=banned_phrases(self.banned_strings, self.model_extra or {}),
                structured_output=structured_output(self.model_extra or {}),
            )
        except ValueError as exc:
            # SamplingParams names its field; the client may have sent it under another server's name.
            message = str(exc)
            field = message.split(" ", 1)[0]
            sent = names.get(field, field)
            raise bad_request(message.replace(field, sent, 1), sent if field in names else None) from exc

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """vLLM's continuous_usage_stats: every chunk carries the usage so far (only with include_usage)."""
        return self.include_usage and bool(self.stream_options.continuous_usage_stats)


class CompletionRequest(SamplingFields):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: StrictInt | None = 16
    logprobs: StrictInt | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[str | list[int]]:
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise bad_request("prompt is empty", "prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        return list(p)  # type: ignore[arg-type]


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as chat templates read it (tool calls and tool results included; openai/tools.py)."""
        return template_message({**(self.model_extra or {}), "role": self.role, "content": self.text()})

    def text(self) -> str:
        if self.content is None and self.role != "assistant":  # an assistant turn may be a tool call
            raise bad_request(f"a {self.role} message needs content", "messages")
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad_request("only text content parts are supported", "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    serves_tools: ClassVar[bool] = True
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: StrictInt | None = None
    max_completion_tokens: StrictInt | None = None
    logprobs: bool = False
    top_logprobs: StrictInt | None = None
    add_generation_prompt: bool = True
    # As vLLM: the chat template writes the model's start tokens (Llama 3's <|begin_of_text|>, GLM's
    # [gMASK]<sop>), so the tokenizer adds none unless asked; adding them too doubles them.
    add_special_tokens: bool = False


class TokenizeRequest(Body):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Body):
    model: str | None = None
    tokens: list[int]
