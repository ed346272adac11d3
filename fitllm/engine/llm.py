"""LLM: the offline API. `LLM(model=...).generate(prompts, params)` -> one RequestOutput per prompt."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import RequestOutput, SamplingParams


class LLM:
    """Batch generation over the continuous-batching engine."""

    def __init__(self, model: str | None = None, **engine_kwargs: Any) -> None:
        self.engine = Engine(EngineConfig(model=model, **engine_kwargs))
        self.tokenizer = self.engine.tokenizer

    def generate(
        self,
        prompts: str | list[int] | Sequence[str | list[int]],
        params: SamplingParams | Sequence[SamplingParams] | None = None,
        priority: Sequence[int] | None = None,
    ) -> list[RequestOutput]:
        """Run all prompts together; outputs come back in prompt order."""
        if isinstance(prompts, str) or (
            isinstance(prompts, list) and prompts and isinstance(prompts[0], int)
        ):
            prompts = [prompts]
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
