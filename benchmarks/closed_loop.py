"""A closed-loop client over Engine.step(), timed on the engine's own clock so two loops can alternate.

At most `concurrency` requests are in flight; the next is added as soon as one finishes. Request times
(arrival, first token, finish) are read from a clock that advances only while this loop's engine works
(add_request and step). Run alone, that clock is the wall clock minus the loop's bookkeeping; two loops
stepped alternately in one process (`run_alternating`) each see only their own engine's time, while
both share whatever the machine does meanwhile. That is how `fitllm bench memory` compares static and
elastic pools to within a percent on a noisy machine.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from benchmarks.hf_baseline import PreparedRequest, RequestTiming


class ClosedLoop:
    """One engine, one request list, one clock."""

    def __init__(
        self,
        engine,
        requests: list[PreparedRequest],
        concurrency: int,
        tag: str,
        on_step: Callable | None = None,
        sampling: dict | None = None,
        ignore_eos: bool = True,
    ) -> None:
        """`ignore_eos` False: requests may stop at EOS before max_tokens (their outputs are kept in
        `outputs`, e.g. to check that two engines answered alike)."""
        self.engine = engine
        self.sampling = sampling or {}  # SamplingParams fields added to every request (e.g. DRY + XTC)
        self.concurrency = concurrency
        self.tag = tag
        self.on_step = on_step
        self.pending = deque(requests)
        self.in_flight: dict[str, tuple[PreparedRequest, float, float | None]] = {}
        self.timings: list[RequestTiming] = []
        self.ignore_eos = ignore_eos
        self.outputs: dict[str, list[int]] = {}  # request id (the trace's) -> output token ids
        self.step_times: list[float] = []
        self.busy = 0.0  # this loop's clock: seconds spent inside the engine
        self._preemptions_at_start = engine.scheduler.num_preemptions
        self._collectives_at_start = collective_seconds()
        hops = getattr(engine, "hops", None)
        self._hops_at_start = (0, 0.0, 0) if hops is None else (hops.copies, hops.seconds, hops.bytes)
        engine.reset_prefix_cache()  # earlier passes ran the same prompts: no free prefix hits

    @property
    def done(self) -> bool:
        return not self.pending and not self.in_flight

    def _add_requests(self) -> None:
        from fitllm.engine.request import SamplingParams

        while self.pending and len(self.in_flight) < self.concurrency:
            r = self.pending.popleft()
            params = SamplingParams(
                temperature=r.temperature,
                top_p=r.top_p,
                seed=r.seed,
                max_tokens=r.max_tokens,
                ignore_eos=self.ignore_eos,
                **self.sampling,
            )
            rid = self.engine.add_request(r.prompt_ids, params, request_id=f"{self.tag}-{r.id}")
            self.in_flight[rid] = (r, self.busy, None)

    def step(self) -> float:
        """Top up the requests in flight and run one engine step; returns the step's seconds."""
        start = time.perf_counter()
        self._add_requests()
        outputs = self.engine.step()
        elapsed = time.perf_counter() - start
        self.busy += elapsed
        self.step_times.append(elapsed)
        for out in outputs:
            r, arrival, first = self.in_flight[out.request_id]
            if first is None:
                first = self.busy
                self.in_flight[out.request_id] = (r, arrival, first)
            if not out.finished:
                continue
            del self.in_flight[out.request_id]
            n_out = len(out.outputs[0].token_ids)
            self.outputs[r.id] = list(out.outputs[0].token_ids)
            if self.ignore_eos and (n_out != r.max_tokens or out.outputs[0].finish_reason != "length"):
                raise RuntimeError(
                    f"{r.id}: fitllm made {n_out} tokens ({out.outputs[0].finish_reason}), expected "
                    f"{r.max_tokens}; is --max-model-len below prompt + max_tokens?"
                )
            self.timings.append(
                RequestTiming(
                    r.id, len(r.prompt_ids), n_out, arrival, first, self.busy, out.num_cached_tokens
                )
            )
        if self.on_step is not None:
            self.on_step(self.engine)
        return elapsed

    def extra(self) -> dict:
        return {
            "steps": len(self.step_times),
            "preemptions": self.engine.scheduler.num_preemptions - self._preemptions_at_start,
            **self._tensor_parallel(),
            **self._layer_split(),
        }

    def _layer_split(self) -> dict:
        """With --layer-split, the pass's seconds in the hops between devices (hidden-state copies and the
        step's metadata moved to each device) and their share of the step time."""
        hops = getattr(self.engine, "hops", None)
        if hops is None:
            return {}
        copies, seconds, nbytes = (
            hops.copies - self._hops_at_start[0],
            hops.seconds - self._hops_at_start[1],
            hops.bytes - self._hops_at_start[2],
        )
        step_s = sum(self.step_times)
        return {
            "step_s": step_s,
            "hop_s": seconds,
            "hop_copies": copies,
            "hop_bytes": nbytes,
            "hop_share": seconds / step_s if step_s else 0.0,
            "hop_us_per_step": 1e6 * seconds / max(1, len(self.step_times)),
        }

    def _tensor_parallel(self) -> dict:
        """With tensor parallelism, rank 0's seconds in the row-parallel all-reduces and in the step
        broadcasts over the pass, and their shares of its step time."""
        if getattr(self.engine, "tp", None) is None:
            return {}
        reduce_s, broadcast_s, gather_s = (
            now - then for now, then in zip(collective_seconds(), self._collectives_at_start, strict=True)
        )
        step_s = sum(self.step_times)
        return {
            "step_s": step_s,
            "all_reduce_s": reduce_s,
            "broadcast_s": broadcast_s,
            "gather_s": gather_s,
            "all_reduce_share": reduce_s / step_s if step_s else 0.0,
            "broadcast_share": broadcast_s / step_s if step_s else 0.0,
            "gather_share": gather_s / step_s if step_s else 0.0,
        }


def collective_seconds() -> tuple[float, float, float]:
    """Rank 0's seconds so far in all-reduces (the vocab-parallel embedding's included), step broadcasts and
    logit gathers (tensor parallel)."""
    from fitllm.distributed import ALL_REDUCE, GATHER
    from fitllm.engine.parallel.messages import BROADCAST

    return ALL_REDUCE.seconds, BROADCAST.seconds, GATHER.seconds


def run_closed_loop(loop: ClosedLoop) -> ClosedLoop:
    while not loop.done:
        loop.step()
    return loop


def run_alternating(loops: list[ClosedLoop]) -> list[ClosedLoop]:
    """Step each unfinished loop in turn until all are done (the engines share the machine step by step)."""
    while not all(loop.done for loop in loops):
        for loop in loops:
            if not loop.done:
                loop.step()
    return loops
