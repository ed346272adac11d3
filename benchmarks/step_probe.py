"""Where a decode step's time goes on the host: the model's forward, the logits, the sampler, and the rest
(scheduler, batch layout and attention metadata, detokenizer, output objects), measured per step.

`StepProbe` wraps an engine's model and sampler calls with timers, as instance attributes (nothing in the
engine changes). On CPU every call is synchronous, so the rest is the host-side overhead the engine adds to
the model's own work; on a GPU the calls only queue kernels and the split says little.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field


@dataclass(slots=True)
class StepProbe:
    """Seconds spent in each timed part since the last `reset`, and the steps counted."""

    seconds: dict[str, float] = field(default_factory=dict)
    steps: int = 0

    @classmethod
    def attach(cls, engine) -> StepProbe:
        """Time `engine`'s model forward, `compute_logits` and sampler from now on."""
        probe = cls({"forward": 0.0, "logits": 0.0, "sample": 0.0})
        model, sampler = engine.runner.model, engine.runner.sampler
        model.forward = probe._timed("forward", model.forward)
        model.compute_logits = probe._timed("logits", model.compute_logits)
        sampler.sample = probe._timed("sample", sampler.sample)
        return probe

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
        """Milliseconds per step of each part and of the host's rest, given the steps' total seconds."""
        n = max(self.steps, 1)
        parts = {name: s * 1000 / n for name, s in self.seconds.items()}
        parts["host"] = total_s * 1000 / n - sum(parts.values())
        return parts


def timed_steps(engine, probe: StepProbe, steps: int) -> dict[str, float]:
    """Run `steps` engine steps; their milliseconds per step: total, and `probe`'s split of it."""
    probe.reset()
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.step()
    total = time.perf_counter() - t0
    probe.steps = steps
    return {"step": total * 1000 / steps, **probe.split_ms(total)}
