"""What every route needs: the AsyncEngine (its commands, and what it publishes: the served model and status
snapshots; never the engine thread's objects), the served model's name, the server's settings, and error
translation."""

from __future__ import annotations

import time
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from fitllm.engine.async_engine import AsyncEngine, EngineDead, QueueFull
from fitllm.engine.report import EngineStatus
from fitllm.engine.request import Logprob
from fitllm.engine.view import ServedModel
from fitllm.loader.tokenizer import Tokenizer
from fitllm.memory.ledger import BudgetExceeded
from fitllm.server.errors import APIError, api_error, bad_request, unavailable
from fitllm.server.heavy import INLINE_SIZE, HeavyWork, ServerLimits, check_prompt_chars
from fitllm.server.shutdown import Drain
from fitllm.server.story_trim import DEFAULT_SMART_CONTEXT_SHARE, resolve_context_shift

T = TypeVar("T")


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    limits: ServerLimits = field(default_factory=ServerLimits)
    heavy: HeavyWork = field(default_factory=HeavyWork)
    drain: Drain = field(default_factory=Drain)
    scheduling_policy: str = "fcfs"  # "priority": a request's `priority` orders admission and preemption
    context_shift: str = "auto"  # --context-shift: auto | on | off (server/story_trim.py)
    smart_context_share: float = DEFAULT_SMART_CONTEXT_SHARE  # --smart-context-share

    def context_shift_for(self, requested: bool | None, route: str) -> bool:
        """A request's context shift choice on `route` ("kobold", "studio", "openai"): see story_trim.py."""
        return resolve_context_shift(requested, self.context_shift, route)

    def trim_share(self, shift: bool) -> float:
        """The share of the story's room to cut at once when it overflows: 0 (token-exact) where a context
        shift reuses the rest, --smart-context-share where it cannot (off, or the model cannot shift)."""
        if shift and self.model.context_shift_unsupported is None:
            return 0.0
        return self.smart_context_share

    def trim_align(self, shift: bool) -> int:
        """Tokens the story's cut is a multiple of: the KV block size where a context shift reuses the rest
        (a cut moving by whole blocks is shifted in place), else 1 (the SmartContext steps decide)."""
        return self.model.block_size if shift and self.model.context_shift_unsupported is None else 1

    def check_priority(self, priority: int) -> None:
        """400 for a client-chosen priority unless the operator enabled priority scheduling (as vLLM)."""
        if priority != 0 and self.scheduling_policy != "priority":
            raise bad_request(
                f"priority: got {priority}, but priority scheduling is not enabled on this server (start it "
                f"with --scheduling-policy priority); send priority 0 or leave it out",
                "priority",
            )

    @property
    def model(self) -> ServedModel:
        """The served model, as the engine published it; 503 while it loads or if it failed."""
        return self.require_ready()

    def require_ready(self) -> ServedModel:
        """The served model; 503 unless the engine is serving."""
        served = self.engine.served_model
        if served is None or not self.engine.ready:
            detail = (
                "the model is still loading"
                if self.engine.error is None
                else f"the engine failed: {self.engine.error}"
            )
            raise unavailable(detail)
        return served

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.model.max_model_len

    def status(self) -> EngineStatus:
        """The engine's latest status snapshot (taken on its thread); 503 while it loads."""
        self.require_ready()
        snapshot = self.engine.status()
        assert snapshot is not None  # published before the engine is ready
        return snapshot.engine

    def check_model(self, name: str | None) -> None:
        """404 for a model name this server does not serve (no name: the served model)."""
        if name and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "fitllm",
            "max_model_len": self.max_model_len,
        }

    # ---- prompts: limited in size, prepared off the event loop (heavy.py) ---------------------------
    @property
    def prompt_char_limit(self) -> int:
        return self.limits.prompt_chars(self.max_model_len)

    def check_prompt_chars(self, chars: int, param: str | None) -> None:
        """400 naming the limit for a prompt of more than `prompt_char_limit` characters."""
        flag_set = self.limits.max_prompt_chars is not None
        check_prompt_chars(chars, self.prompt_char_limit, param, self.max_model_len, flag_set)

    async def encode(self, text: str, param: str | None, add_special_tokens: bool = True) -> list[int]:
        """`text` as token ids, its size checked first and the work done on the heavy-work pool."""
        self.check_prompt_chars(len(text), param)
        return await self.heavy.run(self.tokenizer.encode, text, add_special_tokens, size=len(text))

    async def detokenize(self, ids: list[int], param: str) -> str:
        """Token ids (checked against the vocabulary) as text, both off the event loop when many."""
        model = self.model

        def decode() -> str:
            try:
                model.check_token_ids(ids, param)
            except ValueError as exc:
                raise bad_request(str(exc), param) from exc
            return model.tokenizer.decode(ids, skip_special_tokens=False)

        return await self.heavy.run(decode, size=len(ids))

    async def render_chat(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """The chat template applied to `messages` (and `tools`), always on the pool (the template is the
        checkpoint's code), bounded in output by the prompt limit and in time by `limits.template_timeout_s`."""
        chars = sum(len(str(m.get("content") or "")) + len(str(m.get("tool_calls") or "")) for m in messages)
        chars += len(str(tools or ""))
        self.check_prompt_chars(chars, "messages")
        tok, limit, timeout = self.tokenizer, self.prompt_char_limit, self.limits.template_timeout_s
        try:
            return await self.heavy.run(
                tok.apply_chat_template,
                messages,
                add_generation_prompt,
                limit,
                timeout,
                tools,
                size=INLINE_SIZE + chars,
            )
        except APIError:
            raise
        except Exception as exc:  # the template's own raise_exception, no template, or a bound it broke
            raise bad_request(f"the chat template refused the messages: {exc}", "messages") from exc

    async def start_streams(self, starting: Awaitable[T]) -> T:
        """Await engine admission, translating refusals into HTTP errors."""
        try:
            self.require_ready()
        except APIError:
            if hasattr(starting, "close"):
                starting.close()  # never started: close it so it is not reported as never awaited
            raise
        try:
            return await starting
        except (ValueError, BudgetExceeded, QueueFull, EngineDead) as exc:
            raise api_error(exc) from exc

    async def score_prompt(self, prompt: str | list[int], top_n: int) -> tuple[list[int], list]:
        """Every prompt token's id and logprob entry (the token and its `top_n` alternatives; None for the
        first token, which nothing predicts), in the shape the completions API's logprobs are built from."""
        ids, scores = await self.start_streams(self.engine.score(prompt, top_n))
        entries: list[dict[int, Logprob] | None] = [None]
        for tok, (logprob, alternatives) in zip(ids[1:], scores, strict=True):
            # The rank of a prompt token is not computed (it may lie outside the top_n).
            entries.append({a: Logprob(lp, None) for a, lp in alternatives} | {tok: Logprob(logprob, None)})
        return ids, entries


def get_state(request: Request) -> ServerState:
    return request.app.state.fitllm
