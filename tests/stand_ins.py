"""Test-only stand-ins and hooks, kept out of fitllm/: what a test needs to see inside the engine, or a CPU
replacement for a GPU-only mechanism."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ReplayCapturer:
    """CPU stand-in for tests: replay re-runs `fn` and copies its result into the captured output, so what a
    replay sees is exactly what a CUDA graph would: the static buffers, nothing passed at run time."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        output = fn()
        self.captures += 1

        def replay() -> None:
            self.replays += 1
            output.copy_(fn())

        return replay, output

    def pool_bytes(self) -> int:
        return 0


class LogitsTap:
    """The model's float32 logits of each request that sampled in the last step the engine read, before the
    sampler's in-place edits (penalties, bias, temperature): `tap.last[request_id]`, for parity checks.

    It wraps this engine's `Sampler.sample` (to copy the logits it is given) and the engine's step reader
    (so that, with async scheduling too, `last` is the step whose tokens the engine just returned); leaving
    the `with` block (or `close`) puts both back."""

    def __init__(self, engine) -> None:
        self.last: dict[str, torch.Tensor] = {}
        self._engine, self._sampler = engine, engine.runner.sampler
        pending: dict[int, tuple[object, dict[str, torch.Tensor]]] = {}  # id(SampledBatch): (it, its logits)
        sample, resolve = self._sampler.sample, engine._resolve

        def tapped_sample(logits: torch.Tensor, requests: list) -> object:
            kept = {
                r.request_id: logits[i].to("cpu", torch.float32, copy=True) for i, r in enumerate(requests)
            }
            batch = sample(logits, requests)
            pending[id(batch)] = (batch, kept)
            return batch

        def tapped_resolve(step) -> list:
            entry = None if step.samples is None else pending.pop(id(step.samples), None)
            outputs = resolve(step)
            if entry is not None:
                self.last = entry[1]
            return outputs

        self._sampler.sample, engine._resolve = tapped_sample, tapped_resolve

    def close(self) -> None:
        del self._sampler.sample, self._engine._resolve

    def __enter__(self) -> LogitsTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AddTap:
    """What an AsyncEngine is asked to run: `tap.added` lists (prompt, SamplingParams) of each request the
    routes hand it, in order. It wraps this engine's `add` and `add_all`; leaving the `with` block (or `close`)
    puts them back."""

    def __init__(self, engine) -> None:
        self.added: list[tuple[object, object]] = []
        self._engine = engine
        add, add_all = engine.add, engine.add_all

        async def tapped_add(prompt, params, *args, **kwargs):
            self.added.append((prompt, params))
            return await add(prompt, params, *args, **kwargs)

        async def tapped_add_all(requests):
            self.added.extend((prompt, params) for prompt, params, *_ in requests)
            return await add_all(requests)

        engine.add, engine.add_all = tapped_add, tapped_add_all

    @property
    def params(self) -> list:
        """The SamplingParams of each request, in arrival order."""
        return [params for _, params in self.added]

    @property
    def last_params(self):
        return self.added[-1][1]

    def close(self) -> None:
        del self._engine.add, self._engine.add_all

    def __enter__(self) -> AddTap:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def slow_engine(config, delay_s: float):
    """An Engine whose steps take `delay_s` longer (a generation outlasts a few HTTP round trips)."""
    import time

    from fitllm.engine.engine import Engine

    engine = Engine(config)
    step = engine.step

    def slow_step():
        time.sleep(delay_s)
        return step()

    engine.step = slow_step
    return engine


class Script:
    """What a scripted engine's requests emit: `ids` (set it before a request), then the model's first EOS."""

    def __init__(self) -> None:
        self.ids: list[int] = []


def scripted_engine(config, script: Script):
    """An Engine whose every request samples `script.ids` in order and then EOS, whatever its random weights
    compute: each sampling row's logits are set to -inf but for the scripted token before the real sampler
    runs, so the engine, detokenizer, stop checks and routes run as they do for a real model's text (a random
    model never writes a tool call on its own)."""
    from fitllm.engine.engine import Engine

    engine = Engine(config)
    sample = engine.runner.sampler.sample
    eos = engine.tokenizer.eos_token_ids[0]

    def forced(logits: torch.Tensor, requests: list):
        for i, r in enumerate(requests):
            k = r.num_output_tokens + r.num_output_placeholders
            target = script.ids[k] if k < len(script.ids) else eos
            logits[i].fill_(float("-inf"))
            logits[i, target] = 0.0
        return sample(logits, requests)

    engine.runner.sampler.sample = forced
    return engine


class FakeSlabs:
    """A KV slab allocator with a budget counted in slabs, for the block pool's elastic tests."""

    def __init__(self, budget_slabs: int) -> None:
        self.budget = budget_slabs
        self.live = {0}

    def num_addable(self) -> int:
        return self.budget - len(self.live)

    def add(self, slab: int) -> bool:
        if len(self.live) >= self.budget:
            return False
        assert slab not in self.live
        self.live.add(slab)
        return True

    def remove(self, slab: int) -> None:
        self.live.remove(slab)
