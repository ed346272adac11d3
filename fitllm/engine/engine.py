"""Engine: add_request / step / abort over the scheduler, runner and detokenizer."""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator

import torch

from fitllm.config import EngineConfig, ModelConfig, cdiv, resolve_async_scheduling, resolve_dtype
from fitllm.distributed import check_tp_shape, rank_kv_config
from fitllm.engine.banned import BannedStrings, rewind_to_banned, single_char_bans, vocab_text
from fitllm.engine.compiled_decode import compile_decode_refusal
from fitllm.engine.context_shift import ContextShifter, context_shift_unsupported
from fitllm.engine.cuda_graphs import DecodeGraphs, capture_decode_graphs
from fitllm.engine.detokenizer import IncrementalDetokenizer
from fitllm.engine.isolation import RandomStreams, find_culprits
from fitllm.engine.outputs import error_output, make_output
from fitllm.engine.parallel.group import TensorParallelGroup, WorkerLost, refuse_with_tp
from fitllm.engine.parallel.messages import StepMessage
from fitllm.engine.parallel.ranks import rank_device, rank_threads
from fitllm.engine.report import EngineStatus, engine_status, give_back_to_device, memory_report
from fitllm.engine.request import Request, RequestOutput, RequestStatus, SamplingParams
from fitllm.engine.runner import ModelRunner
from fitllm.engine.sampler import Sampler
from fitllm.engine.sampling.dry import BreakerTable
from fitllm.engine.scheduler import Scheduler, SchedulerOutput
from fitllm.engine.scorer import SequenceScorer
from fitllm.engine.speculation import Speculator, speculation_refusal
from fitllm.engine.split_startup import split_budgets, start_split_memory
from fitllm.engine.stages import HopStats, Stage
from fitllm.engine.startup import start_memory
from fitllm.engine.step_state import InFlightStep, StepStats, StepTimer
from fitllm.engine.structured.compiler import GrammarCompiler
from fitllm.engine.view import check_token_ids
from fitllm.loader import ModelSource, open_model
from fitllm.memory.budget import resolve_budget
from fitllm.memory.host import IdleHeapTrim
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.host_cache import HostKVCache, build_host_cache
from fitllm.memory.kv.swap import KVSwapper
from fitllm.memory.ledger import MemoryLedger
from fitllm.memory.offload.streamer import WeightStreamer
from fitllm.model.attention import resolve_attention_backend
from fitllm.plan.layer_split import refuse_with_layer_split
from fitllm.plan.memory_plan import MemoryPlan
from fitllm.quant import engine_quant_method, resolve_config

log = logging.getLogger("fitllm")


class Engine:
    """Owns the model and all its memory; a single thread calls add_request, step and abort."""

    def __init__(
        self, config: EngineConfig, show_progress: bool = False, source: ModelSource | None = None
    ) -> None:
        """`source`: config.model already opened (and checked), e.g. by `fitllm serve` before it binds."""
        self.tp: TensorParallelGroup | None = None
        self.heap_trim = IdleHeapTrim()
        if config.tensor_parallel_size > 1:
            config = rank_threads(config)
        self.config = config
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.device = config.resolve_device()
        # --layer-split: stage 0's device is the engine's (embedding, head, sampler); each stage's budget.
        self.stages: list[Stage] = []
        self.hops: HopStats | None = None  # the split forward's hops (install_hops)
        self._split_budgets: list[int] | None = None
        if config.layer_split is not None:
            refuse_with_layer_split(config)
            devices, self._split_budgets = split_budgets(config, self.device)
            self.device = devices[0]
        self.source = source if source is not None else open_model(config.model)
        self.config = config = resolve_config(config, self.source)  # --quantization auto, from the file
        self.model_config = mc = self.source.config
        # What one rank's KV pool holds (its KV heads); the model config itself stays whole.
        self.kv_config = rank_kv_config(mc, config.tensor_parallel_size)
        if config.tensor_parallel_size > 1:
            check_tp_shape(mc, config.tensor_parallel_size)
            refuse_with_tp(config)
            self.device = rank_device(self.device, 0)
            # Workers load their shards while this rank loads its own.
            self.tp = TensorParallelGroup(config, self.device)
        try:
            self._start(config, mc, show_progress)
        except BaseException:
            if self.tp is not None:  # the workers may be inside a start-up collective: no stop message
                self.tp.close(graceful=False)
            raise
        log.info("memory:\n%s", self.memory_report())

    def _start(self, config: EngineConfig, mc: ModelConfig, show_progress: bool) -> None:
        """Everything after the workers are started: memory, runner, scheduler (`__init__`'s body)."""
        self.dtype = resolve_dtype(config.dtype, self.device)
        self.attention_backend = resolve_attention_backend(config.attention_backend, self.device)
        self.tokenizer = self.source.tokenizer(config.tokenizer)
        split = self._split_budgets
        self.ledger = MemoryLedger(
            resolve_budget(config.memory_budget, self.device) if split is None else split[0]
        )
        self.quant = engine_quant_method(config, mc, self.device, self.dtype)
        self.kv_format = KVCacheFormat(config.kv_cache_dtype, self.dtype, mc.head_dim)
        # placement -> weights -> staging -> workspace -> graph pool -> KV, each figure the plan's until
        # measured (fitllm/engine/startup.py)
        self.plan = MemoryPlan.for_engine(
            config,
            mc,
            self.device,
            # A split's context and KV are bounded by every device's budget together.
            budget=self.ledger.budget if split is None else sum(split),
            quant=self.quant,
        )
        self.kv_bytes_per_token = self.plan.kv_bytes_per_token
        self.streamer: WeightStreamer | None = None  # set with the staging it holds
        if split is None:
            graph_reserve = start_memory(self, show_progress)
        else:
            start_split_memory(self, show_progress)  # decode runs eagerly: graphs are per device
            graph_reserve = None
        self.swapper = KVSwapper(
            self.storage,
            self.kv,
            # Host swap would move K/V only rank 0 holds: with tensor parallelism preemption recomputes.
            0 if self.tp is not None else config.resolve_swap_space(self.device),
            config.preemption_mode,  # type: ignore[arg-type]
        )
        self.sampler = Sampler(
            self.tokenizer.eos_token_ids,
            seed=config.seed,
            breakers=BreakerTable.for_tokenizer(self.tokenizer),
        )
        self.runner = ModelRunner(
            self.model,
            self.kv_config,
            self.kv,
            self.storage,
            self.sampler,
            self.device,
            self.attention_backend,
            decode_gather_tokens=self.decode_gather_tokens,
        )
        self.runner.tp = self.tp
        if graph_reserve is not None:
            # Sets runner.graphs, or leaves it None when the budget has no room for the pool.
            capture_decode_graphs(
                self.runner, self.ledger, config.max_num_seqs, self.max_model_len, planned=graph_reserve
            )
        if config.compile_decode:
            refusal = compile_decode_refusal(
                self.device, self.attention_backend, self.streamer is not None, self.tp is not None
            )
            if refusal is None:
                self.runner.compile_decode()
            else:
                log.warning("--compile-decode is off: %s", refusal)
        # --context-shift auto is the routes' business (on for Kobold and the studio): for the engine, off.
        self.speculator = (
            Speculator(config.speculative_ngram, config.speculative_ngram_min, config.speculative_tokens)
            if config.speculative_ngram
            else None
        )
        self.shifter = ContextShifter(self.kv, config.context_shift == "on", context_shift_unsupported(mc))
        self.scheduler = Scheduler(
            self.kv,
            config.max_num_seqs,
            config.max_num_batched_tokens,
            self.max_model_len,
            self.tokenizer.eos_token_ids,
            self.swapper,
            self.shifter,
            self.speculator,
        )
        self.host_cache: HostKVCache | None = None
        self.attach_host_cache(build_host_cache(config, self.storage, self.device))
        self._ids = itertools.count()
        self.grammars = GrammarCompiler(self.tokenizer, mc.vocab_size)  # structured output, on first use
        self._vocab_text: list[str] | None = None  # each token's text, for one-character banned strings
        self._finished_outputs: list[RequestOutput] = []
        # The step in flight's tokens live on rank 0 only; with tensor parallelism each step's ids are known.
        self.async_scheduling = (
            self.tp is None
            and not self.stages
            and resolve_async_scheduling(config.async_scheduling, self.device)
        )
        self._in_flight: InFlightStep | None = None  # async scheduling: the step whose samples are unread
        self.last_step: StepStats | None = None

    def status(self) -> EngineStatus:
        """What the engine holds now (for metrics and the studio's memory panel)."""
        return engine_status(self)

    def memory_report(self) -> str:
        """The ledger by tag, the workspace planned vs measured, the pool, and the process's memory."""
        return memory_report(self)

    @property
    def graphs(self) -> DecodeGraphs | None:
        """The captured decode steps the runner replays (None: decode runs eagerly)."""
        return self.runner.graphs

    @property
    def requests(self) -> dict[str, Request]:
        """The requests not finished, by id (the scheduler's)."""
        return self.scheduler.requests

    # ---- requests ---------------------------------------------------------------------------------
    def add_request(
        self,
        prompt: str | list[int],
        params: SamplingParams | None = None,
        request_id: str | None = None,
        priority: int = 0,
    ) -> str:
        """Queue a prompt (text or token ids); returns its request id. Raises ValueError on bad input."""
        params = params or SamplingParams()
        params.validate()
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenizer.encode(prompt)
        else:
            text, ids = None, [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        vocab = self.model_config.vocab_size
        check_token_ids(ids, vocab, "prompt")
        check_token_ids(params.logit_bias or {}, vocab, "logit_bias")
        check_token_ids(params.stop_token_ids, vocab, "stop_token_ids")
        if len(ids) >= self.max_model_len:
            raise ValueError(
                f"the prompt has {len(ids)} tokens but --max-model-len is {self.max_model_len}; "
                f"shorten the prompt or raise --max-model-len"
            )
        if params.max_tokens is None and len(ids) + params.min_tokens > self.max_model_len:
            # Nothing else bounds it (max_tokens does otherwise, and the server checks that against the
            # context): EOS would be banned to the end of the context, whatever the client meant.
            raise ValueError(
                f"min_tokens must be at most {self.max_model_len - len(ids)} (--max-model-len "
                f"{self.max_model_len} minus the prompt's {len(ids)} tokens); got {params.min_tokens}"
            )
        limit = params.token_limit(len(ids), self.max_model_len)
        needed = cdiv(limit, self.block_size)
        if needed > self.pool.capacity_blocks:
            # It could never run to completion even alone: refuse now rather than preempt it forever.
            raise ValueError(
                f"the prompt ({len(ids)} tokens) plus up to {limit - len(ids)} new tokens needs {needed} KV blocks "
                f"of {self.block_size} tokens, but the budget holds at most {self.pool.capacity_blocks} "
                f"({self.pool.capacity_blocks * self.block_size} tokens); raise --memory-budget or --kv-cache-memory, "
                f"or lower max_tokens or --max-model-len"
            )
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        req = Request(request_id, text, ids, params, priority)
        if params.banned_strings:
            req.banned = self._banned_strings(params.banned_strings)
        if params.structured_output is not None:  # compiled here (cached by spec); ValueError names the field
            req.constraint = self.grammars.constraint(params.structured_output)
        req.detokenizer = IncrementalDetokenizer(
            self.tokenizer,
            ids,
            params.stop,
            params.skip_special_tokens,
            params.include_stop_str_in_output,
            req.banned,
        )
        self.scheduler.add(req)
        return request_id

    def _banned_strings(self, phrases: list[str]) -> BannedStrings:
        """A request's banned-strings state; one-character entries forbid the tokens holding them."""
        always: set[int] = set()
        if any(len(p) == 1 for p in phrases):
            if self._vocab_text is None:  # decoded once, when a request first needs it
                self._vocab_text = vocab_text(
                    lambda ids: self.tokenizer.backend.decode_batch(ids, skip_special_tokens=False),
                    self.model_config.vocab_size,
                )
            encode = lambda p: self.tokenizer.encode(p, add_special_tokens=False)  # noqa: E731
            always = single_char_bans(phrases, encode, self._vocab_text)
        return BannedStrings(list(phrases), frozenset(always))

    def score_prompt(
        self, prompt: str | list[int], top_n: int = 0
    ) -> tuple[list[int], list[tuple[float, list[tuple[int, float]]]]]:
        """log p(token | the tokens before it) for every prompt token after the first, with the `top_n`
        most likely alternatives: (token ids, [(logprob, [(id, logprob), ...]) per token from the second]).

        One prefill outside the KV pool (not cached) whose scratch cache and logits are reserved in the
        ledger for its duration; prompts longer than --max-num-batched-tokens are refused, because the
        measured workspace covers steps of at most that many tokens."""
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError("the prompt is empty; give at least one token")
        check_token_ids(ids, vocab, "prompt")
        if len(ids) > self.config.max_num_batched_tokens:
            raise ValueError(
                f"prompt logprobs are computed for prompts of up to --max-num-batched-tokens "
                f"({self.config.max_num_batched_tokens}) tokens; this one has {len(ids)}"
            )
        if len(ids) < 2:
            return ids, []
        need = SequenceScorer.workspace_bytes(len(ids), self.kv_bytes_per_token, vocab)
        self.ledger.reserve("workspace", need)  # BudgetExceeded when memory is short right now
        try:
            scorer = SequenceScorer(
                self.model, self.kv_config, self.device, len(ids), self.kv_format, self.tp
            )
            logprobs, values, indices = scorer.token_logprobs_and_top(ids, top_n)
        finally:
            self.ledger.release("workspace", need)
        entries = [
            (float(logprobs[i]), list(zip(indices[i].tolist(), values[i].tolist(), strict=True)))
            for i in range(len(ids) - 1)
        ]
        return ids, entries

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its memory; returns False if it is unknown or already done."""
        ended = self.scheduler.finish_requests([request_id], RequestStatus.FINISHED_ABORTED)
        self._finished_outputs += [make_output(req) for req in ended]
        return bool(ended)

    def reset_prefix_cache(self) -> int:
        """Evict every cached (unreferenced) prefix block, on the device and in the host tier; returns how
        many were dropped from the device."""
        if self.host_cache is not None:
            self.host_cache.clear()
        return self.pool.reset_prefix_cache()

    def attach_host_cache(self, tier: HostKVCache | None) -> None:
        """Put a host tier under the prefix cache: it hears the pool's evictions and extends lookups."""
        self.host_cache = tier
        self.pool.eviction_sink = tier
        self.scheduler.host_cache = tier

    def has_unfinished_requests(self) -> bool:
        """Whether step() has more to give: requests to run, or outputs not yet returned (an aborted last
        request's final output comes from the next step, so `while has_unfinished_requests(): step()`
        sees every request finish)."""
        return self.scheduler.has_unfinished() or bool(self._finished_outputs)

    # ---- the step ---------------------------------------------------------------------------------
    def release_idle_memory(self) -> int:
        """Give back KV slabs idle for --kv-idle-release-s and re-tag cached-block bytes; returns slabs freed."""
        released = self.pool.release_idle_slabs()
        if released:
            give_back_to_device(self.device)
        self.storage.tag_cached(self.pool.num_cached_blocks)
        return released

    def idle(self) -> None:
        """An idle turn (the async engine's, every half second without work): idle slabs given back, the
        host heap trimmed once after work (IdleHeapTrim), and with tensor parallelism the workers told (their
        heartbeat: a worker lost shows here, not at the next request)."""
        self.release_idle_memory()
        self.heap_trim.idle()
        if self.tp is not None:
            self.tp.heartbeat(StepMessage("idle", self.storage.take_journal()))

    def close(self) -> None:
        """End the tensor-parallel workers (a no-op on one device); the engine cannot step after it."""
        if self.tp is not None:
            self.tp.close()

    def step(self) -> list[RequestOutput]:
        """Schedule, queue the model and sampling, and return the outputs the host has learnt.

        Without async scheduling that is this step's. With it, the step is left in flight and the outputs
        are the previous step's, read (and detokenized, stop-checked) while this one runs on the device;
        this step was scheduled with the previous step's tokens as placeholders, which the device fills."""
        self.release_idle_memory()
        outputs, self._finished_outputs = self._finished_outputs, []
        if self._in_flight is not None and self._needs_known_tokens():
            outputs += self._resolve(self._take_in_flight())
        sched = self.scheduler.schedule()
        outs, ins = sched.swap_out + sched.cache_out, sched.swap_in + sched.cache_in
        if outs or ins or sched.shifts:  # before anything reads or rewrites those blocks
            seconds = self.runner.swap(outs, ins, sched.shifts)
            if outs or ins:
                self.swapper.costs.observe_swap(sum(c.nbytes for c in outs + ins), seconds)
        if not sched.scheduled:
            if self._in_flight is not None:
                return outputs + self._resolve(self._take_in_flight())
            if self.scheduler.has_unfinished() and not sched.preempted:
                # Nothing fits and nothing runs: the head request can never be served.
                raise RuntimeError(
                    "scheduler made no progress; the KV pool is too small for the waiting request"
                )
            return outputs
        # If queueing raises, the step in flight stays in flight (its tokens are still to be read); the
        # requests whose rows made it raise are failed alone and the rest of the batch is launched.
        step, failed = self._launch_isolating(sched, self._in_flight)
        self.heap_trim.worked()
        outputs += failed
        if self._in_flight is not None:
            outputs += self._resolve(self._take_in_flight())
        if step is None:
            pass  # every scheduled request failed
        elif self.async_scheduling:
            self._in_flight = step
        else:
            outputs += self._resolve(step)
        return outputs

    def _take_in_flight(self) -> InFlightStep:
        step, self._in_flight = self._in_flight, None
        assert step is not None
        return step

    def _needs_known_tokens(self) -> bool:
        """Whether a running request with a token in flight samples with penalties, which count previous
        tokens, a grammar, whose mask depends on them, or speculates, whose proposal needs its last token:
        then the step in flight is read before scheduling, and the next step does not overlap it (reading it
        first also lets requests that stopped there give up their seats and blocks)."""
        return any(
            r.num_output_placeholders
            and (
                r.params.uses_token_history
                or r.constraint is not None
                or (self.speculator and speculation_refusal(r.params) is None)
            )
            for r in self.scheduler.running
        )

    def _launch_isolating(
        self, sched: SchedulerOutput, prev: InFlightStep | None
    ) -> tuple[InFlightStep | None, list[RequestOutput]]:
        """`_launch`, and where it raises: the requests whose rows make it raise (found by trial runs of
        parts of the batch) fail alone, and the others are launched as if those had never been scheduled,
        so their output is what it would have been. (A failed queueing changes no scheduler state: the
        counts advance after it; K/V it wrote for the new tokens is rewritten by the retry, and the random
        streams it drew from are rewound.) A failure no part of the batch reproduces alone is retried once,
        then raised as the engine's own. Returns the launched step (None if nothing is left to launch) and
        the failed requests' outputs."""
        streams = RandomStreams(self.sampler, sched)
        try:
            return self._launch(sched, prev), []
        except WorkerLost:
            raise
        except Exception as exc:
            if self.tp is not None:
                # The workers may be inside this step's collectives: no trial runs, the group is lost.
                self.tp.fail(
                    WorkerLost(
                        f"a step failed on rank 0 ({exc!r}); the tensor-parallel ranks are out of step"
                    )
                )
                raise self.tp.failure from exc
            error = exc
        failed: list[RequestOutput] = []
        rest = list(sched.scheduled)
        while True:
            pending = None if prev is None else prev.pending_tokens()
            culprits = find_culprits(self.runner, rest, pending, streams, error)
            failed += [self._fail(req, exc) for req, exc in culprits.items()]
            rest = [s for s in rest if s.request not in culprits]
            if not rest:
                return None, failed
            streams.rewind()
            if not culprits:
                # No part fails alone: a passing fault (retried once), or the engine's own, which no
                # request is to blame for: it is raised (the step in flight stays in flight).
                return self._launch(SchedulerOutput(rest, sched.preempted), prev), failed
            try:
                return self._launch(SchedulerOutput(rest, sched.preempted), prev), failed
            except Exception as exc:  # another request's rows fail too: search the rest again
                error = exc

    def _launch(self, sched: SchedulerOutput, prev: InFlightStep | None) -> InFlightStep:
        """Queue the model and sampling for `sched`; each sampling request gets an output placeholder."""
        timer = StepTimer(self.device)
        sampled, checks, samples = self.runner.execute(sched, None if prev is None else prev.pending_tokens())
        timer.stop()
        if samples is not None:
            samples.start_copy()
        self.scheduler.update_after_launch(sched)
        stats = StepStats(
            num_tokens=sched.num_tokens,
            num_running=len(self.scheduler.running),
            num_waiting=self.scheduler.num_waiting,
            num_preempted=len(sched.preempted),
            kv_tokens=sum(r.num_computed_tokens for r in self.scheduler.running),
            kv_slots=self.pool.num_blocks * self.block_size,
            seconds=None,
        )
        return InFlightStep(sampled, checks, samples, stats, timer)

    def _resolve(self, step: InFlightStep) -> list[RequestOutput]:
        """Read a launched step's samples (waiting for them if need be), hand them to the scheduler (tokens,
        stop checks, freeing), then the output stage: each new token's text, stop strings, the outputs."""
        try:
            result = step.samples.result() if step.samples is not None else None
        except BaseException:
            self.scheduler.samples_lost(step.sampled, step.checks)
            raise
        step.stats.seconds = step.timer.seconds(wait=result is not None)
        if step.stats.seconds is not None:
            self.swapper.costs.observe_step(step.stats.num_tokens, step.stats.seconds)
        self.last_step = step.stats
        if result is None:
            return []
        outputs = []
        update = self.scheduler.update_from_output(step.sampled, result, step.checks)
        for req, num_new in zip(update.new_tokens, update.num_new, strict=True):
            try:
                out = self._output(req, num_new)
            except Exception as exc:  # its token's text broke: it fails alone
                out = self._fail(req, exc)
            if out is not None:
                outputs.append(out)
        return outputs

    def _output(self, req: Request, num_new: int = 1) -> RequestOutput | None:
        """The output stage for a request's new tokens (several after a verify step): their text, where a
        stop string may end it (the tokens after the one that completed it are dropped, as plain decoding
        would never have made them), or a banned phrase rewind it (then there is nothing new to report)."""
        if req.constraint is not None and req.constraint.error is not None:
            raise req.constraint.error
        for pos in range(req.num_tokens - num_new, req.num_tokens):
            stop = req.detokenizer.add_token(
                req.token_ids[pos], check_stop=pos - req.num_prompt_tokens + 1 >= req.params.min_tokens
            )
            if req.detokenizer.banned_at is not None:
                rewind_to_banned(req, self.scheduler)
                return None
            if stop is not None:
                req.stop_reason = stop
                self._finish(req, RequestStatus.FINISHED_STOPPED)
                self.scheduler.cut_tokens(req, pos + 1)
                break
        return make_output(req)

    def _fail(self, req: Request, error: Exception) -> RequestOutput:
        """Stop a request whose rows broke a step (it alone); its last output carries the error."""
        log.error(
            "request %s failed in a step and alone is stopped: %r", req.request_id, error, exc_info=error
        )
        self._finish(req, RequestStatus.FINISHED_ERROR)
        return error_output(req, error)

    def _finish(self, req: Request, status: RequestStatus) -> None:
        """End a request for a reason only the engine sees (a stop string, an error). One that its new token
        already ended (by length, EOS or a stop token id) stays ended and takes this reason, which outranks
        those, as it did when one function made every check."""
        if not self.scheduler.finish_requests([req.request_id], status):
            req.mark_finished(status)

    def stream(
        self, prompt: str | list[int], params: SamplingParams | None = None, priority: int = 0
    ) -> Iterator[RequestOutput]:
        """Run one request to completion here, yielding its output after every step it progresses."""
        rid = self.add_request(prompt, params, priority=priority)
        while True:
            for out in self.step():
                if out.request_id == rid:
                    if out.error is not None:
                        raise out.error
                    yield out
                    if out.finished:
                        return

    def check_integrity(self) -> None:
        """Pool invariants plus: every running request's blocks cover its computed tokens."""
        self.pool.check_integrity()
        for req in self.scheduler.running:
            assert len(self.kv.block_ids(req.request_id)) * self.block_size >= req.num_computed_tokens
