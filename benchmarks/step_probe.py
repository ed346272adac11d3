"""Where a decode step's time goes on the host: the model's forward, the logits, the sampler, and the rest
(`host`: scheduler, batch layout and attention metadata, detokenizer, output objects), measured per step.

`StepProbe` wraps an engine's model and sampler calls with timers, as instance attributes (nothing in the
engine changes). On CPU every call is synchronous, so `host` is the overhead the engine adds to the model's
own work (issue 24's target: under 1 ms at batch 1); on a GPU the calls only queue kernels and the split says
little. `host` is itself split: `host.schedule` (Scheduler.schedule), `host.prepare` (the runner's batch
layout and attention metadata), `host.update` (Scheduler.update_from_output: tokens, stop checks, freeing),
`host.output` (the output stage per new token: detokenizer, stop strings, RequestOutput) and `host.rest`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

MODEL_PARTS = ("forward", "logits", "sample")
HOST_PARTS = ("schedule", "prepare", "update", "output")


@dataclass(slots=True)
class StepProbe:
    """Seconds spent in each timed part since the last `reset`, and the steps counted."""

    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def attach(cls, engine) -> StepProbe:
        """Time `engine`'s model forward, `compute_logits`, sampler and the host parts from now on."""
        probe = cls(dict.fromkeys(MODEL_PARTS + HOST_PARTS, 0.0))
        model, sampler = engine.runner.model, engine.runner.sampler
        model.forward = probe._timed("forward", model.forward)
        if engine.runner.compiled is not None:  # --compile-decode: its steps bypass model.forward
            compiled = engine.runner.compiled
            compiled.run = probe._timed("forward", compiled.run)
        model.compute_logits = probe._timed("logits", model.compute_logits)
        sampler.sample = probe._timed("sample", sampler.sample)
        engine.scheduler.schedule = probe._timed("schedule", engine.scheduler.schedule)
        engine.runner.prepare = probe._timed("prepare", engine.runner.prepare)
        engine.scheduler.update_from_output = probe._timed("update", engine.scheduler.update_from_output)
        engine._output = probe._timed("output", engine._output)
        return probe

    def time_part(self, name: str, owner, attr: str) -> None:
        """Also time `owner.attr` (an instance attribute, as `attach` does) as part `name`, from now on."""
        self.seconds.setdefault(name, 0.0)
        setattr(owner, attr, self._timed(name, getattr(owner, attr)))

    def _timed(self, name: str, fn):
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - t0

        return timed

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.steps = 0

    def split_ms(self, total_s: float) -> dict[str, float]:
        """Milliseconds per step of each model part, of the host (the rest of the step) and of the host's
        parts (`host.NAME`, and `host.rest`: what no part timed), given the steps' total seconds."""
        n = max(self.steps, 1)
        ms = {name: s * 1000 / n for name, s in self.seconds.items()}
        parts = {name: ms[name] for name in MODEL_PARTS}
        parts["host"] = total_s * 1000 / n - sum(parts.values())
        parts |= {f"host.{name}": ms[name] for name in HOST_PARTS}
        parts["host.rest"] = parts["host"] - sum(ms[name] for name in HOST_PARTS)
        return parts


def host_split_text(split: dict[str, float]) -> str:
    """'schedule 0.05, prepare 0.21, ...' from a split's host parts (ms per step)."""
    names = [*HOST_PARTS, "rest"]
    return ", ".join(f"{name} {split[f'host.{name}']:.2f}" for name in names if f"host.{name}" in split)


def timed_steps(engine, probe: StepProbe, steps: int) -> dict[str, float]:
    """Run `steps` engine steps; their milliseconds per step: total, and `probe`'s split of it."""
    probe.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - t0
    probe.steps = steps
    return {"step": total * 1000 / steps, **probe.split_ms(total)}
