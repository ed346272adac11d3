"""What every route needs: the AsyncEngine (its commands, and what it publishes: the served model and status
snapshots; never the engine thread's objects), the served model's name, and error translation."""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from fastapi import Request

from fitllm.engine.async_engine import AsyncEngine, EngineDead, QueueFull
from fitllm.engine.report import EngineStatus
from fitllm.engine.request import Logprob, RequestOutput
from fitllm.engine.view import ServedModel
from fitllm.loader.tokenizer import Tokenizer
from fitllm.memory.ledger import BudgetExceeded
from fitllm.server.errors import APIError, bad_request
from fitllm.server.heavy import INLINE_SIZE, HeavyWork, ServerLimits, check_prompt_chars
from fitllm.server.shutdown import Drain

T = TypeVar("T")
RETRY_AFTER_S = 1


def unavailable(message: str) -> APIError:
    """A 503 a client should retry shortly (loading, busy, out of memory for now)."""
    return APIError(503, message, "service_unavailable", headers={"Retry-After": str(RETRY_AFTER_S)})


MAX_GENKEY_CHARS = 64  # KoboldAI Lite's genkeys are "KCPP" + 4 digits
MAX_FINISHED_JOBS = 256  # finished jobs whose text a check can still read, oldest forgotten first


def api_error(exc: BaseException) -> APIError:
    """What a failure of admission or of a running request answers: a 400 for bad input, a 503 for what a
    retry can get past (a full queue, no memory now, a shutdown), a 500 naming the failure otherwise."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, ValueError):
        return bad_request(str(exc))
    if isinstance(exc, BudgetExceeded):
        return unavailable(f"not enough free memory right now: {exc}")
    if isinstance(exc, QueueFull):
        return unavailable(f"server busy: {exc}")
    if isinstance(exc, EngineDead):
        return unavailable(str(exc))
    return APIError(500, f"the request failed: {type(exc).__name__}: {exc}", "server_error")


@dataclass
class KoboldJob:
    """A Kobold generation: its text so far (for /api/extra/generate/check) and request (for abort)."""

    request_id: str
    genkey: str = ""
    seed: int = -1
    text: str = ""
    done: bool = False
    admitted: bool = False  # the engine took the request (until then it cannot be asked whether it runs)

    def update(self, text: str) -> None:
        self.text = text


@dataclass
class KoboldPerf:
    """The last finished Kobold generation's figures, as KoboldCpp's /api/extra/perf reports them."""

    last_process: float = 0.0  # seconds from arrival to the first token (prompt processing)
    last_eval: float = 0.0  # seconds from the first token to the last
    last_token_count: int = 0
    last_seed: int = -1
    stop_reason: int = -1  # KoboldCpp's codes: -1 none yet, 0 out of tokens, 1 EOS, 2 a stop sequence
    total_gens: int = 0


@dataclass
class KoboldJobs:
    """Generations by genkey, and the latest (what a check or abort without a genkey refers to, if it was
    itself started without one: a genkey keeps a job's text from other users, as in KoboldCpp).

    A genkey belongs to its job while the job runs: a new job with that genkey is refused (409), so nobody
    can take over another's check and abort. Running jobs are bounded by the engine's queue; finished ones
    are kept up to `max_finished` (and genkeys are at most MAX_GENKEY_CHARS, checked with the body)."""

    by_genkey: dict[str, KoboldJob] = field(default_factory=dict)
    last: KoboldJob | None = None
    perf: KoboldPerf = field(default_factory=KoboldPerf)
    max_finished: int = MAX_FINISHED_JOBS
    # Whether the engine still runs a request: a job whose stream nobody read to the end (its client left
    # before the response started) is over once the engine is done with it.
    alive: Callable[[str], bool] = lambda _: True

    def running(self, job: KoboldJob) -> bool:
        return not job.done and (not job.admitted or self.alive(job.request_id))

    def find(self, genkey: str) -> KoboldJob | None:
        """The job `genkey` names; without one, the latest job if it has no genkey of its own."""
        if genkey:
            return self.by_genkey.get(genkey)
        return self.last if self.last is not None and not self.last.genkey else None

    def finish(self, job: KoboldJob, out: RequestOutput) -> None:
        """Mark `job` done and record its figures for /api/extra/perf."""
        job.done = True
        m, c = out.metrics, out.outputs[0]
        process = evaluate = 0.0
        if m is not None:
            first = m.first_token_time or m.finished_time or m.arrival_time
            process, evaluate = max(0.0, first - m.arrival_time), max(0.0, (m.finished_time or first) - first)
        stop = 0 if c.finish_reason == "length" else 2 if isinstance(c.stop_reason, str) else 1
        self.perf = KoboldPerf(
            process,
            evaluate,
            len(c.token_ids),
            job.seed,
            stop,
            self.perf.total_gens + 1,
        )

    def start(self, request_id: str, genkey: str, seed: int = -1) -> KoboldJob:
        """A new job, before its request is added; 409 if `genkey` names a job that still runs."""
        old = self.by_genkey.get(genkey) if genkey else None
        if old is not None and self.running(old):
            raise APIError(
                409,
                f"the genkey {genkey!r} belongs to a generation that is still running; use another genkey "
                f"or wait for it to end",
                param="genkey",
                code="genkey_in_use",
            )
        job = KoboldJob(request_id, genkey, seed)
        self.last = job
        if genkey:
            self.by_genkey.pop(genkey, None)
            self.by_genkey[genkey] = job  # newest last: finished jobs are forgotten oldest first
            finished = [k for k, j in self.by_genkey.items() if not self.running(j)]
            for k in finished[: max(0, len(finished) - self.max_finished)]:
                del self.by_genkey[k]
        return job

    def drop(self, job: KoboldJob) -> None:
        """Forget a job whose request was never added (refused, or its client left)."""
        job.done = True
        if self.by_genkey.get(job.genkey) is job:
            del self.by_genkey[job.genkey]


@dataclass
class ServerState:
    engine: AsyncEngine
    model_name: str
    api_key: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))
    kobold_jobs: KoboldJobs = field(default_factory=KoboldJobs)
    limits: ServerLimits = field(default_factory=ServerLimits)
    heavy: HeavyWork = field(default_factory=HeavyWork)
    drain: Drain = field(default_factory=Drain)
    scheduling_policy: str = "fcfs"  # "priority": a request's `priority` orders admission and preemption

    def __post_init__(self) -> None:
        self.kobold_jobs.alive = self.engine.is_running

    def check_priority(self, priority: int) -> None:
        """400 for a client-chosen priority unless the operator enabled priority scheduling (as vLLM)."""
        if priority != 0 and self.scheduling_policy != "priority":
            raise bad_request(
                f"priority: got {priority}, but priority scheduling is not enabled on this server (start it "
                f"with --scheduling-policy priority); send priority 0 or leave it out",
                "priority",
            )

    @property
    def model(self) -> ServedModel:
        """The served model, as the engine published it; 503 while it loads or if it failed."""
        return self.require_ready()

    def require_ready(self) -> ServedModel:
        """The served model; 503 unless the engine is serving."""
        served = self.engine.served_model
        if served is None or not self.engine.ready:
            detail = (
                "the model is still loading"
                if self.engine.error is None
                else f"the engine failed: {self.engine.error}"
            )
            raise unavailable(detail)
        return served

    @property
    def tokenizer(self) -> Tokenizer:
        return self.model.tokenizer

    @property
    def max_model_len(self) -> int:
        return self.model.max_model_len

    def status(self) -> EngineStatus:
        """The engine's latest status snapshot (taken on its thread); 503 while it loads."""
        self.require_ready()
        snapshot = self.engine.status()
        assert snapshot is not None  # published before the engine is ready
        return snapshot.engine

    def check_model(self, name: str | None) -> None:
        """404 for a model name this server does not serve (no name: the served model)."""
        if name and name != self.model_name:
            raise APIError(
                404,
                f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                "not_found_error",
                "model",
                "model_not_found",
            )

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "fitllm",
            "max_model_len": self.max_model_len,
        }

    # ---- prompts: limited in size, prepared off the event loop (heavy.py) ---------------------------
    @property
    def prompt_char_limit(self) -> int:
        return self.limits.prompt_chars(self.max_model_len)

    def check_prompt_chars(self, chars: int, param: str | None) -> None:
        """400 naming the limit for a prompt of more than `prompt_char_limit` characters."""
        flag_set = self.limits.max_prompt_chars is not None
        check_prompt_chars(chars, self.prompt_char_limit, param, self.max_model_len, flag_set)

    async def encode(self, text: str, param: str | None, add_special_tokens: bool = True) -> list[int]:
        """`text` as token ids, its size checked first and the work done on the heavy-work pool."""
        self.check_prompt_chars(len(text), param)
        return await self.heavy.run(self.tokenizer.encode, text, add_special_tokens, size=len(text))

    async def detokenize(self, ids: list[int], param: str) -> str:
        """Token ids (checked against the vocabulary) as text, both off the event loop when many."""
        model = self.model

        def decode() -> str:
            try:
                model.check_token_ids(ids, param)
            except ValueError as exc:
                raise bad_request(str(exc), param) from exc
            return model.tokenizer.decode(ids, skip_special_tokens=False)

        return await self.heavy.run(decode, size=len(ids))

    async def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool) -> str:
        """The chat template applied to `messages`, always on the pool (the template is the checkpoint's
        code), bounded in output by the prompt limit and in time by `limits.template_timeout_s`."""
        chars = sum(len(str(m.get("content") or "")) for m in messages)
        self.check_prompt_chars(chars, "messages")
        tok, limit, timeout = self.tokenizer, self.prompt_char_limit, self.limits.template_timeout_s
        try:
            return await self.heavy.run(
                tok.apply_chat_template,
                messages,
                add_generation_prompt,
                limit,
                timeout,
                size=INLINE_SIZE + chars,
            )
        except APIError:
            raise
        except Exception as exc:  # the template's own raise_exception, no template, or a bound it broke
            raise bad_request(f"the chat template refused the messages: {exc}", "messages") from exc

    async def start_streams(self, starting: Awaitable[T]) -> T:
        """Await engine admission, translating refusals into HTTP errors."""
        try:
            self.require_ready()
        except APIError:
            if hasattr(starting, "close"):
                starting.close()  # never started: close it so it is not reported as never awaited
            raise
        try:
            return await starting
        except (ValueError, BudgetExceeded, QueueFull, EngineDead) as exc:
            raise api_error(exc) from exc

    async def score_prompt(self, prompt: str | list[int], top_n: int) -> tuple[list[int], list]:
        """Every prompt token's id and logprob entry (the token and its `top_n` alternatives; None for the
        first token, which nothing predicts), in the shape the completions API's logprobs are built from."""
        ids, scores = await self.start_streams(self.engine.score(prompt, top_n))
        entries: list[dict[int, Logprob] | None] = [None]
        for tok, (logprob, alternatives) in zip(ids[1:], scores, strict=True):
            # The rank of a prompt token is not computed (it may lie outside the top_n).
            entries.append({a: Logprob(lp, None) for a, lp in alternatives} | {tok: Logprob(logprob, None)})
        return ids, entries


def get_state(request: Request) -> ServerState:
    return request.app.state.fitllm
