"""The state of one engine step between queueing it and reading its samples."""

from __future__ import annotations

from dataclasses import dataclass
from time import perf_counter

import torch

from fitllm.engine.batch_layout import PendingTokens
from fitllm.engine.request import Request
from fitllm.engine.sampler import SampledBatch
from fitllm.engine.speculation import DraftCheck


@dataclass(slots=True)
class StepStats:
    """One step, seen right after it was queued (before finished requests give their blocks back)."""

    num_tokens: int  # tokens computed
    num_running: int
    num_waiting: int
    num_preempted: int
    kv_tokens: int  # tokens whose K/V running requests hold
    kv_slots: int  # token slots of the live KV slabs
    seconds: float | None  # the step's own time (StepTimer), when its samples are read; None: not known

    @property
    def kv_utilization(self) -> float:
        return self.kv_tokens / self.kv_slots


class StepTimer:
    """How long one step took, without counting the host work of the step queued after it.

    On CUDA: events recorded before the step's first kernel and after its sampling, read once the samples
    are (so reading costs no extra wait). On CPU the step runs on the host thread while it is queued, so
    the host time of queueing it is its time. The preemption cost model learns prefill speed from this."""

    __slots__ = ("_start", "_end", "_t0", "_seconds")

    def __init__(self, device: torch.device) -> None:
        self._start = self._end = None
        self._seconds = 0.0
        if device.type == "cuda":
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._t0 = perf_counter()

    def stop(self) -> None:
        """Right after the step is queued."""
        if self._end is not None:
            self._end.record()
        else:
            self._seconds = perf_counter() - self._t0

    def seconds(self, wait: bool = True) -> float | None:
        """The step's time. On CUDA that needs its end: reading its samples has already waited for it; a
        step without samples is not waited for (None if it has not finished), so the host keeps queueing."""
        if self._end is None:
            return self._seconds
        if not wait and not self._end.query():
            return None
        self._end.synchronize()
        return self._start.elapsed_time(self._end) / 1000.0


@dataclass(slots=True)
class InFlightStep:
    """A launched step: its kernels and sampling are queued; the host has not read its samples yet."""

    sampled: list[Request]  # the requests that sample, in row order
    checks: list[DraftCheck | None] | None  # what each verifies (speculation; None: nothing)
    samples: SampledBatch | None
    stats: StepStats
    timer: StepTimer

    def pending_tokens(self) -> PendingTokens | None:
        """Its sampled tokens, still on the device, for the next step's placeholder ids (a request's last
        row; one that verified proposals is never a placeholder: its tokens are read before scheduling)."""
        if self.samples is None:
            return None
        rows, row = {}, -1
        for i, r in enumerate(self.sampled):
            check = self.checks[i] if self.checks is not None else None
            row += 1 + (len(check.tokens) if check is not None else 0)
            rows[r.request_id] = row
        return PendingTokens(self.samples.tokens, rows)
