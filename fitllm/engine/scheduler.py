"""Continuous batching under a token budget, with chunked prefill, prefix hits and preemption.

There are no prefill and decode phases: every request has `num_computed_tokens` and `num_tokens`
(prompt + output), and each step hands out up to `max_num_batched_tokens` new tokens. Running requests
go first (decodes take one token, unfinished prompts take a chunk), then waiting requests are admitted
in priority order while blocks and seats (`max_num_seqs`) last. When the pool cannot supply a block for
a running request, the lowest-priority, newest running request is preempted: its blocks are released
and it is recomputed later from its prompt and the tokens it had generated, which leaves its output
unchanged.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from fitllm.engine.request import Request, RequestStatus
from fitllm.memory.kv_cache_manager import KVCacheManager


@dataclass(slots=True)
class ScheduledRequest:
    """A request and the number of new tokens it computes this step."""

    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so a next token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


class Scheduler:
    """Decides, each step, which requests run and how many tokens each computes."""

    def __init__(self, kv: KVCacheManager, max_num_seqs: int, max_num_batched_tokens: int) -> None:
        self.kv = kv
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.running: list[Request] = []
        self._waiting: list[tuple[int, float, int, Request]] = []  # heap by (priority, arrival, seq)
        self._seq = itertools.count()
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        request.status = RequestStatus.WAITING
        heapq.heappush(self._waiting, (request.priority, request.arrival_time, next(self._seq), request))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> list[Request]:
        return [item[-1] for item in sorted(self._waiting)]

    def has_unfinished(self) -> bool:
        return bool(self.running or self._waiting)

    def remove(self, request: Request) -> None:
        """Take a request out of the queues and free its blocks (finish or abort)."""
        if request in self.running:
            self.running.remove(request)
        else:
            before = len(self._waiting)
            self._waiting = [item for item in self._waiting if item[-1] is not request]
            if len(self._waiting) != before:
                heapq.heapify(self._waiting)
        self.kv.free(request.request_id)

    # ---- the step ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        now = time.monotonic()

        for req in list(self.running):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step to make room
            num_new = min(req.num_tokens - req.num_computed_tokens, budget)
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + num_new):
                victim = max(self.running, key=lambda r: r.sort_key)
                self._preempt(victim, out)
                for j, s in enumerate(out.scheduled):
                    if s.request is victim:
                        budget += s.num_new_tokens
                        del out.scheduled[j]
                        break
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new

        # Admit waiting requests only when nothing had to be preempted this step.
        while not out.preempted and self._waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self._waiting[0][-1]
            hits, num_hit = self.kv.find_prefix_hit(req.request_id, req.token_ids)
            num_new = min(req.num_tokens - num_hit, budget)
            if not self.kv.allocate(req.request_id, num_hit + num_new, hits):
                break
            heapq.heappop(self._waiting)
            self.kv.record_prefix_lookup(req.num_tokens, num_hit)
            req.num_computed_tokens = num_hit
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
            req.status = RequestStatus.RUNNING
            if req.metrics.first_scheduled_time is None:
                req.metrics.first_scheduled_time = now
            self.running.append(req)
            out.scheduled.append(ScheduledRequest(req, num_new))
            budget -= num_new
        return out

    def _preempt(self, req: Request, out: SchedulerOutput) -> None:
        self.running.remove(req)
        self.kv.free(req.request_id)
        req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        heapq.heappush(self._waiting, (req.priority, req.arrival_time, next(self._seq), req))
        out.preempted.append(req)
        self.num_preemptions += 1

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and publish newly full blocks to the prefix cache."""
        for s in out.scheduled:
            r = s.request
            r.num_computed_tokens += s.num_new_tokens
            self.kv.cache_computed(r.request_id, r.token_ids, r.num_computed_tokens)
