"""Kobold generations by genkey, for /api/extra/generate/check and /api/extra/abort, and the last one's
figures for /api/extra/perf (KoboldCpp keeps both the same way)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from fitllm.engine.request import RequestOutput
from fitllm.server.errors import APIError

MAX_GENKEY_CHARS = 64  # KoboldAI Lite's genkeys are "KCPP" + 4 digits
MAX_FINISHED_JOBS = 256  # finished jobs whose text a check can still read, oldest forgotten first


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
