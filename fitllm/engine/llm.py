"""LLM: the offline API. `LLM(model=...).generate(prompts, params)` -> one RequestOutput per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import RequestOutput, SamplingParams

PromptType = str | list[int] | dict[str, Any]
_PROMPT_KEYS = {"prompt": str, "prompt_token_ids": list}


def prompt_of(prompt: PromptType) -> str | list[int]:
    """Text or token ids from any prompt form `generate` takes (vLLM's TextPrompt / TokensPrompt dicts
    included); a ValueError naming what is wrong otherwise."""
    if not isinstance(prompt, dict):
        return prompt
    keys = [k for k in _PROMPT_KEYS if k in prompt]
    other = sorted(set(prompt) - set(_PROMPT_KEYS))
    if other:
        raise ValueError(f"prompt dicts take 'prompt' or 'prompt_token_ids'; fitllm does not support {other}")
    if len(keys) != 1:
        raise ValueError("a prompt dict needs exactly one of 'prompt' (text) or 'prompt_token_ids' (ids)")
    value = prompt[keys[0]]
    if not isinstance(value, _PROMPT_KEYS[keys[0]]) or (
        keys[0] == "prompt_token_ids"
        and not all(isinstance(t, int) and not isinstance(t, bool) for t in value)
    ):
        want = "a string" if keys[0] == "prompt" else "a list of integer token ids"
        raise ValueError(f"{keys[0]} must be {want}; got {type(value).__name__}")
    return value


class LLM:
    """Batch generation over the continuous-batching engine."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: PromptType | Sequence[PromptType],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together; outputs come back in prompt order. A prompt is text, token ids, or as
        vLLM takes them, `{"prompt": text}` or `{"prompt_token_ids": [...]}`."""
        if isinstance(prompts, (str, dict)) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
        prompts = [prompt_of(p) for p in prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params or SamplingParams()] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params)} sampling params")
        ids = [
            self.engine.add_request(p, sp, priority=priority[i] if priority else 0)
            for i, (p, sp) in enumerate(zip(prompts, params))
        ]
        done: dict[str, RequestOutput] = {}
        while len(done) < len(ids):
            for out in self.engine.step():
                if out.finished:
                    done[out.request_id] = out
        return [done[i] for i in ids]

    def close(self) -> None:
        """End the tensor-parallel workers, if any (they also end with this process)."""
        self.engine.close()
