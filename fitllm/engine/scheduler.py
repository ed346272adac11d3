"""Continuous batching under a token budget, with chunked prefill, prefix hits and preemption.

There are no prefill and decode phases: every request has `num_computed_tokens` and `num_tokens`
(prompt + output), and each step hands out up to `max_num_batched_tokens` new tokens. Running requests
go first (decodes take one token, unfinished prompts take a chunk), then waiting requests are admitted
in priority order while blocks and seats (`max_num_seqs`) last. When the pool cannot supply a block for
a running request (cached prefixes already given up by the pool), the lowest-priority, newest running
request is preempted; a waiting request that outranks running ones may preempt them to be admitted.
A preempted request's K/V is either swapped to host memory and copied back when it resumes, or dropped
and recomputed from its prompt and the tokens it had generated (fitllm/memory/kv/swap.py chooses); both
leave its output unchanged.
"""

from __future__ import annotations

import heapq
import itertools
import time
from dataclasses import dataclass, field

from fitllm.config import cdiv
from fitllm.engine.request import Request, RequestStatus
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.swap import KVSwapper


@dataclass(slots=True)
class ScheduledRequest:
    """A request and the number of new tokens it computes this step."""

    request: Request
    num_new_tokens: int

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so a next token is sampled."""
        r = self.request
        return r.num_computed_tokens + self.num_new_tokens == r.num_tokens_with_placeholders


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

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        swapper: KVSwapper | None = None,
    ) -> None:
        self.kv = kv
        self.swapper = swapper
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
        if self.swapper is not None:
            self.swapper.discard(request.request_id)

    # ---- the step ------------------------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens

        for req in list(self.running):
            if budget <= 0:
                break
            if req.status is not RequestStatus.RUNNING:
                continue  # preempted earlier in this step to make room
            total = req.num_tokens_with_placeholders
            if req.num_output_placeholders and total >= req.max_total_tokens:
                continue  # its last token is in flight: it finishes when that token is known
            num_new = min(total - req.num_computed_tokens, budget)
            while not self.kv.allocate(req.request_id, req.num_computed_tokens + num_new):
                # The pool has already given up its cached prefixes: preempt the least important.
                victim = max(self.running, key=lambda r: r.sort_key)
                budget += self._preempt(victim, out)
                if victim is req:
                    break
            else:
                out.scheduled.append(ScheduledRequest(req, num_new))
                budget -= num_new

        # Admit waiting requests in priority order; once anything was preempted this step, only those
        # that outrank a running request (equals never displace each other, and a victim does not come
        # straight back, so nothing thrashes).
        while self._waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            req = self._waiting[0][-1]
            if out.preempted and not self._lower_priority_running(req):
                break
            num_new = self._admit(req, budget, out)
            if num_new is None:
                break
            budget -= num_new
        return out

    def _admit(self, req: Request, budget: int, out: SchedulerOutput) -> int | None:
        """Give the head waiting request its blocks (preempting lower-priority running requests if that
        makes room); returns the tokens it computes this step, or None if it must keep waiting."""
        if req.num_output_placeholders:
            return None  # preempted with a token in flight: its ids are complete once that step is known
        swapped = self.swapper is not None and self.swapper.holds(req.request_id)
        if swapped:
            hits, num_hit = [], self.swapper.num_swapped_tokens(req.request_id)
        else:
            hits, num_hit = self.kv.find_prefix_hit(req.request_id, req.token_ids)
        num_new = min(req.num_tokens - num_hit, budget)
        if not self.kv.allocate(req.request_id, num_hit + num_new, hits):
            victims = self._lower_priority_running(req)
            if not self._room_after_preempting(victims, hits, cdiv(num_hit + num_new, self.kv.block_size)):
                return None  # even preempting every lower-priority request would not make room: wait
            for victim in victims:
                self._preempt(victim, out)
                if self.kv.allocate(req.request_id, num_hit + num_new, hits):
                    break
            else:
                return None  # not reached: the room was counted exactly
        heapq.heappop(self._waiting)
        if swapped:
            self.swapper.swap_in(req.request_id)
        else:
            self.kv.record_prefix_lookup(req.num_tokens, num_hit)
            if req.num_preemptions == 0:
                req.num_cached_tokens = num_hit
        req.num_computed_tokens = num_hit
        req.status = RequestStatus.RUNNING
        if req.metrics.first_scheduled_time is None:
            req.metrics.first_scheduled_time = time.monotonic()
        self.running.append(req)
        out.scheduled.append(ScheduledRequest(req, num_new))
        return num_new

    def _room_after_preempting(self, victims: list[Request], hits: list, num_blocks: int) -> bool:
        """Whether `num_blocks` (the first len(hits) of them prefix hits) fit once `victims` are gone."""
        hit_ids = {b.block_id for b in hits}
        room = self.kv.pool.num_available_blocks - sum(1 for b in hits if b.ref_cnt == 0)
        for v in victims:
            room += sum(1 for i in self.kv.exclusive_block_ids(v.request_id) if i not in hit_ids)
        return num_blocks - len(hits) <= room

    def _lower_priority_running(self, req: Request) -> list[Request]:
        """Running requests of strictly lower priority than `req`, least important first."""
        return sorted(
            (r for r in self.running if r.priority > req.priority), key=lambda r: r.sort_key, reverse=True
        )

    def _preempt(self, req: Request, out: SchedulerOutput) -> int:
        """Take a running request off the device (swapped to host, or dropped for recompute) and back to
        the waiting queue; returns the token budget it had been given this step."""
        refund = 0
        for j, s in enumerate(out.scheduled):
            if s.request is req:
                refund = s.num_new_tokens
                del out.scheduled[j]
                break
        self.running.remove(req)
        swapped = self.swapper is not None and self.swapper.preempt(req.request_id, req.num_computed_tokens)
        self.kv.free(req.request_id)
        if not swapped:
            req.num_computed_tokens = 0
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        heapq.heappush(self._waiting, (req.priority, req.arrival_time, next(self._seq), req))
        out.preempted.append(req)
        self.num_preemptions += 1
        return refund

    def update_after_step(self, out: SchedulerOutput) -> None:
        """Advance computed-token counts and publish newly full blocks to the prefix cache (the hash needs
        the ids: a block holding a placeholder is published once its token is known, `cache_known`)."""
        for s in out.scheduled:
            r = s.request
            r.num_computed_tokens += s.num_new_tokens
            self.cache_known(r)

    def cache_known(self, request: Request) -> None:
        """Publish the request's full, computed blocks whose token ids are all known."""
        if request.status is RequestStatus.RUNNING:
            num = min(request.num_computed_tokens, request.num_tokens)
            self.kv.cache_computed(request.request_id, request.token_ids, num)
