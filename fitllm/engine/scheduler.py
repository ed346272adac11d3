"""Continuous batching under a token budget, with chunked prefill, prefix hits and preemption.

There are no prefill and decode phases: every request has `num_computed_tokens` and `num_tokens`
(prompt + output), and each step hands out up to `max_num_batched_tokens` new tokens. Running requests
go first (decodes take one token, unfinished prompts take a chunk), then waiting requests are admitted
in priority order while blocks and seats (`max_num_seqs`) last. When the pool cannot supply a block for
a running request (cached prefixes already given up by the pool), the lowest-priority, newest running
request is preempted; a waiting request that outranks running ones may preempt them to be admitted.
A preempted request's K/V is either swapped to host memory and copied back when it resumes, or dropped
and recomputed from its prompt and the tokens it had generated (fitllm/memory/kv/swap.py chooses); both
leave its output unchanged; the swap copies are recorded in the SchedulerOutput and made by the runner.

The scheduler owns each request's lifecycle: `update_after_launch` counts a queued step's tokens as computed
(and gives each request that samples an output placeholder), `update_from_output` turns the read samples
into tokens, publishes newly full blocks to the prefix cache, runs the stop checks and frees what finished,
and `finish_requests` ends requests for the reasons only the engine sees (aborts, stop strings, errors).
"""

from __future__ import annotations

import heapq
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

from fitllm.config import cdiv
from fitllm.engine.context_shift import ContextShifter, KVShift
from fitllm.engine.request import Request, RequestStatus
from fitllm.engine.sampler import SampleResult
from fitllm.engine.speculation import DraftCheck, Speculator, accepted_tokens, settle_stream
from fitllm.memory.kv.host_cache import HostKVCache, restore_from_host
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.swap import KVCopy, KVSwapper


@dataclass(slots=True)
class ScheduledRequest:
    """A request and the number of new tokens it computes this step: with speculation, its last token and
    the tokens proposed after it (`draft_token_ids`, verified by sampling every one of those rows)."""

    request: Request
    num_new_tokens: int
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def samples(self) -> bool:
        """Whether this step reaches the request's last token, so a next token is sampled."""
        r = self.request
        done = r.num_computed_tokens + self.num_new_tokens - len(self.draft_token_ids)
        return done == r.num_tokens_with_placeholders


@dataclass(slots=True)
class SchedulerOutput:
    """One step's plan."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    preempted: list[Request] = field(default_factory=list)
    # K/V copies the runner makes before the forward, outs first: preempted requests' blocks to host memory,
    # resumed requests' back into their new blocks.
    swap_out: list[KVCopy] = field(default_factory=list)
    swap_in: list[KVCopy] = field(default_factory=list)
    # Context shifts of admitted requests, made between the swap-outs (a victim's freed blocks may be a
    # shift's destination) and the swap-ins (whose new blocks may be a shift's evicted source), in order.
    shifts: list[KVShift] = field(default_factory=list)
    # The host prefix tier's copies (fitllm/memory/kv/host_cache.py), made with the swaps: evicted cached
    # blocks out to host (with the outs), blocks a prefix hit found on host back (with the ins).
    cache_out: list[KVCopy] = field(default_factory=list)
    cache_in: list[KVCopy] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)


@dataclass(slots=True)
class StepUpdate:
    """What `update_from_output` did with a step's samples."""

    new_tokens: list[Request] = field(default_factory=list)  # took a token (in row order), finished or not
    num_new: list[int] = field(default_factory=list)  # how many each took (more than 1: speculation)
    finished: list[Request] = field(default_factory=list)  # of which those it finished (status: why)


def check_stop(
    req: Request, token: int, eos_token_ids: Iterable[int], max_model_len: int
) -> RequestStatus | None:
    """The request's status after `token` (already appended) if it stops here, else None. Stop strings are
    the engine's output stage's (they need the text); one the same token completes is the reason given."""
    p = req.params
    if req.constraint is not None and req.constraint.finished:
        return RequestStatus.FINISHED_STOPPED  # the grammar is complete: nothing else may follow
    if req.num_output_tokens < p.min_tokens:
        # min_tokens defers stop conditions, never the context limit.
        return RequestStatus.FINISHED_LENGTH if req.num_tokens >= max_model_len else None
    if not p.ignore_eos and token in eos_token_ids:
        return RequestStatus.FINISHED_STOPPED
    if token in p.stop_token_ids:
        req.stop_reason = token
        return RequestStatus.FINISHED_STOPPED
    if req.num_tokens >= req.max_total_tokens:
        return RequestStatus.FINISHED_LENGTH
    return None


class Scheduler:
    """Decides, each step, which requests run and how many tokens each computes; owns their lifecycle."""

    def __init__(
        self,
        kv: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        eos_token_ids: Iterable[int] = (),
        swapper: KVSwapper | None = None,
        shifter: ContextShifter | None = None,
        speculator: Speculator | None = None,
    ) -> None:
        self.kv = kv
        self.speculator = speculator  # prompt lookup (--speculative-ngram): proposals for running requests
        self.swapper = swapper
        self.shifter = shifter
        self.host_cache: HostKVCache | None = None  # the host tier under the prefix cache (--kv-host-cache)
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.requests: dict[str, Request] = {}  # every request not finished, by id
        self.running: list[Request] = []
        self._waiting: list[tuple[int, float, int, Request]] = []  # heap by (priority, arrival, seq)
        self._seq = itertools.count()
        self.num_preemptions = 0

    # ---- queue management -------------------------------------------------------------------------
    def add(self, request: Request) -> None:
        assert request.request_id not in self.requests, f"request id {request.request_id!r} is in use"
        request.max_total_tokens = request.params.token_limit(request.num_prompt_tokens, self.max_model_len)
        request.status = RequestStatus.WAITING
        if self.shifter is not None:
            self.shifter.count_request(request.params)
        self.requests[request.request_id] = request
        heapq.heappush(self._waiting, (request.priority, request.arrival_time, next(self._seq), request))

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def waiting(self) -> list[Request]:
        return [item[-1] for item in sorted(self._waiting)]

    def has_unfinished(self) -> bool:
        return bool(self.running or self._waiting)

    def finish_requests(self, request_ids: Iterable[str], status: RequestStatus) -> list[Request]:
        """End requests for a reason the scheduler's own checks cannot see (an abort, a stop string the
        output stage found, an error) and free them; returns those ended (unknown or finished ids are
        skipped)."""
        done = []
        for rid in request_ids:
            req = self.requests.get(rid)
            if req is not None:
                self._finish(req, status)
                done.append(req)
        return done

    def _finish(self, request: Request, status: RequestStatus) -> None:
        """Take a request out of the queues and free its blocks and any host copy."""
        if self.shifter is not None and request in self.running:  # its blocks go to the prefix cache
            self.shifter.remember(request.request_id, request.token_ids, request.num_computed_tokens)
        request.mark_finished(status)
        if self.speculator is not None:
            self.speculator.forget(request.request_id)
        del self.requests[request.request_id]
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
            drafts = self._propose(req, num_new, budget)
            if drafts and self.kv.allocate(req.request_id, req.num_computed_tokens + 1 + len(drafts)):
                out.scheduled.append(ScheduledRequest(req, 1 + len(drafts), drafts))
                budget -= 1 + len(drafts)
                continue  # (without room for its proposals, it decodes as usual below)
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
        if self.host_cache is not None:
            out.cache_out, out.cache_in = self.host_cache.copies()
        return out

    def _propose(self, req: Request, num_new: int, budget: int) -> list[int]:
        """Tokens proposed after a decoding request's last one (speculation), within the step's budget and
        the request's token limit; [] for a request that is not at its last token or has one in flight."""
        if self.speculator is None or num_new != 1 or req.num_output_placeholders:
            return []
        if req.num_computed_tokens != req.num_tokens - 1:
            return []
        room = min(budget - 1, req.max_total_tokens - req.num_tokens - 1)
        return self.speculator.propose(req, room)

    def _admit(self, req: Request, budget: int, out: SchedulerOutput) -> int | None:
        """Give the head waiting request its blocks (preempting lower-priority running requests if that
        makes room); returns the tokens it computes this step, or None if it must keep waiting."""
        if req.num_output_placeholders:
            return None  # preempted with a token in flight: its ids are complete once that step is known
        swapped = self.swapper is not None and self.swapper.holds(req.request_id)
        shift = None
        from_host = 0
        if swapped:
            hits, num_hit = [], self.swapper.num_swapped_tokens(req.request_id)
        else:
            shift_ok = self.shifter is not None and self.shifter.wants(req.params)
            hits, num_hit = self.kv.find_prefix_hit(req.request_id, req.token_ids, shift_ok)
            hits, from_host = restore_from_host(self.host_cache, self.kv, req.request_id, req.token_ids, hits)
            num_hit += from_host
            if shift_ok:
                shift = self.shifter.plan(req, num_hit)
        num_done = num_hit if shift is None else shift.end  # K/V from the cache or moved by the shift
        num_new = min(req.num_tokens - num_done, budget)
        adopted = [] if shift is None else shift.adopted  # blocks a shift rotates in place: reused like hits
        if not self.kv.allocate(req.request_id, num_done + num_new, hits, adopted):
            victims = self._lower_priority_running(req)
            reused = hits + [b for _, b in adopted]
            if not self._room_after_preempting(victims, reused, cdiv(num_done + num_new, self.kv.block_size)):
                return None  # even preempting every lower-priority request would not make room: wait
            for victim in victims:
                self._preempt(victim, out)
                if self.kv.allocate(req.request_id, num_done + num_new, hits, adopted):
                    break
            else:
                return None  # not reached: the room was counted exactly
        heapq.heappop(self._waiting)
        if swapped:
            out.swap_in.append(self.swapper.swap_in(req.request_id))
        else:
            self.kv.record_prefix_lookup(req.num_tokens, num_hit)
            if shift is not None:
                self.shifter.committed(shift)
                out.shifts.append(shift)
            if req.num_preemptions == 0:
                req.reuse.cached = num_hit - from_host
                req.reuse.from_host = from_host
                req.reuse.shifted = num_done - num_hit
                req.reuse.prefilled = req.num_prompt_tokens - num_done
        req.num_computed_tokens = num_done
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
        # A shift admitted this step has not moved its K/V yet: drop it (re-admission plans it again) and
        # recompute. Otherwise K/V a shift gave would not come back from a recompute: swap it if it fits.
        pending_shift = [s for s in out.shifts if s.request_id == req.request_id]
        out.shifts = [s for s in out.shifts if s.request_id != req.request_id]
        copy = None
        if self.swapper is not None and not pending_shift:
            keep = self.kv.is_shifted(req.request_id)
            copy = self.swapper.preempt(req.request_id, req.num_computed_tokens, keep)
        self.kv.free(req.request_id)
        if copy is None:
            req.num_computed_tokens = 0
        else:
            out.swap_out.append(copy)
        req.num_preemptions += 1
        req.status = RequestStatus.PREEMPTED
        heapq.heappush(self._waiting, (req.priority, req.arrival_time, next(self._seq), req))
        out.preempted.append(req)
        self.num_preemptions += 1
        return refund

    # ---- after the step -----------------------------------------------------------------------------
    def update_after_launch(self, out: SchedulerOutput) -> None:
        """The step `out` is queued: its tokens count as computed (the next step is scheduled on that, with
        async scheduling before this one's samples are read); each request that samples holds an output
        placeholder until `update_from_output`; newly full blocks whose ids are known are published."""
        for s in out.scheduled:
            r = s.request
            if s.samples:
                r.num_output_placeholders += 1
            r.num_computed_tokens += s.num_new_tokens
            self._cache_blocks(r)

    def update_from_output(
        self, sampled: list[Request], result: SampleResult, checks: list[DraftCheck | None] | None = None
    ) -> StepUpdate:
        """A launched step's samples are read (`sampled[i]`'s rows follow `sampled[i - 1]`'s: one, or with
        proposals `checks[i]`, one per proposed token more): each placeholder becomes its token, or a verify
        step's accepted tokens (the rejected proposals' K/V given back), with their logprobs; blocks they
        fill are published; the stop checks run after each token and what finished is freed. A request that
        finished, or was aborted, while its token was in flight drops that token."""
        update = StepUpdate()
        now = time.monotonic()
        row = 0
        for i, req in enumerate(sampled):
            check = checks[i] if checks is not None else None
            first, row = row, row + 1 + (len(check.tokens) if check is not None else 0)
            if req.num_stale_samples:  # sampled before the request was rewound (fitllm/engine/banned.py)
                req.num_stale_samples -= 1
                continue
            req.num_output_placeholders -= 1
            if req.status.finished:
                continue
            tokens = result.token_ids[first:row]
            if check is not None:
                tokens = accepted_tokens(check.tokens, tokens)
                self._verified(req, check, len(tokens))
            status = None
            for j, token in enumerate(tokens):
                req.token_ids.append(token)
                if req.constraint is not None:  # a refused token fails the request (Engine._output)
                    req.constraint.accept(token)
                if req.logprobs is not None:
                    req.logprobs.append(result.logprobs[first + j])
                    req.cumulative_logprob += result.sampled_logprob[first + j]
                status = check_stop(req, token, self.eos_token_ids, self.max_model_len)
                if status is not None:
                    break
            self._cache_blocks(req)
            if req.metrics.first_token_time is None:
                req.metrics.first_token_time = now
            update.new_tokens.append(req)
            update.num_new.append(j + 1)
            if status is not None:
                self._finish(req, status)
                update.finished.append(req)
        return update

    def _verified(self, req: Request, check: DraftCheck, num_tokens: int) -> None:
        """A verify step gave `num_tokens` tokens (`num_tokens - 1` proposals accepted): the K/V computed for
        the rejected ones is dropped (their blocks go back), the seeded stream replayed, stats counted."""
        self._drop_computed(req, req.num_tokens + num_tokens - 1)
        settle_stream(req, check, num_tokens)
        if self.speculator is not None:
            self.speculator.record(req.request_id, len(check.tokens), num_tokens - 1)

    def _drop_computed(self, req: Request, num_tokens: int) -> None:
        """Keep K/V for the request's first `num_tokens` tokens only (KVCacheManager.truncate: blocks past
        them go back; one that is shared or published is recomputed rather than rewritten). The one
        rollback of a rewind (banned strings) and of rejected proposals (speculation)."""
        kept = self.kv.truncate(req.request_id, num_tokens)
        req.num_computed_tokens = min(req.num_computed_tokens, kept)

    def cut_tokens(self, req: Request, num_tokens: int) -> None:
        """Keep only the request's first `num_tokens` tokens, their logprobs and its grammar's state (K/V is
        the caller's)."""
        del req.token_ids[num_tokens:]
        if req.constraint is not None:
            req.constraint.rollback_to(req.output_token_ids)
        if req.logprobs is not None:
            del req.logprobs[num_tokens - req.num_prompt_tokens :]
            req.cumulative_logprob = sum(e[t].logprob for e, t in zip(req.logprobs, req.output_token_ids))

    def rewind(self, req: Request, num_tokens: int) -> None:
        """Cut a request back to its first `num_tokens` tokens (a banned phrase began after them) so that it
        samples position `num_tokens` again: its tokens and logprobs, its K/V past what is kept (blocks given
        back; the last one recomputed where it is shared or published, so no cached block is rewritten), and
        the samples in flight, dropped when read. One that this step's token also finished (by length, EOS or
        a stop token) is taken back and resumes as a preempted request would (its prefix mostly cached)."""
        assert req.num_prompt_tokens <= num_tokens < req.num_tokens
        self.cut_tokens(req, num_tokens)
        req.num_stale_samples += req.num_output_placeholders
        req.num_output_placeholders = 0
        if req.status.finished:
            req.status, req.finish_reason, req.stop_reason = RequestStatus.PREEMPTED, None, None
            req.metrics.finished_time = None
            req.num_computed_tokens = 0
            self.requests[req.request_id] = req
            heapq.heappush(self._waiting, (req.priority, req.arrival_time, next(self._seq), req))
        elif req.status is RequestStatus.RUNNING:
            # The last kept token is computed again: its logits choose the new token.
            self._drop_computed(req, num_tokens - 1)
        else:  # preempted: a host copy holds K/V past the cut, so it resumes by recomputing instead
            if self.swapper is not None:
                self.swapper.discard(req.request_id)
            req.num_computed_tokens = 0

    def samples_lost(self, sampled: list[Request], checks: list[DraftCheck | None] | None = None) -> None:
        """A launched step's samples cannot be read: its requests lose the placeholder, and the running ones
        recompute their last position next step (whose K/V is rewritten, identically) to sample again; the
        K/V of proposals (`checks`) is dropped."""
        for i, req in enumerate(sampled):
            if req.num_stale_samples:
                req.num_stale_samples -= 1
                continue
            req.num_output_placeholders -= 1
            if req.status is RequestStatus.RUNNING:
                if checks is not None and checks[i] is not None:
                    self._drop_computed(req, req.num_tokens - 1)
                req.num_computed_tokens = min(req.num_computed_tokens, req.num_tokens - 1)

    def _cache_blocks(self, request: Request) -> None:
        """Publish the request's full, computed blocks whose token ids are all known (a block holding a
        placeholder waits for its token)."""
        if request.status is RequestStatus.RUNNING:
            num = min(request.num_computed_tokens, request.num_tokens)
            self.kv.cache_computed(request.request_id, request.token_ids, num)
