"""Which requests made a step raise: trial runs of parts of the batch, so that only they fail.

A step's queueing (`ModelRunner.execute`) changes no scheduler state: the counts advance after it. So a
batch that raised can be run again in parts. Trial runs write K/V only for their requests' new tokens (the
real run writes the same slots again) and draw from the random streams, which are rewound after each, so
the run that follows samples exactly as the first attempt would have.
"""

from __future__ import annotations

from fitllm.engine.batch_layout import PendingTokens
from fitllm.engine.request import Request
from fitllm.engine.runner import ModelRunner
from fitllm.engine.sampler import Sampler
from fitllm.engine.scheduler import ScheduledRequest, SchedulerOutput


class RandomStreams:
    """The states of the random streams a step draws from (the sampler's, each seeded request's), taken
    before it runs (about 2 us each), to be put back before a run is repeated."""

    def __init__(self, sampler: Sampler, sched: SchedulerOutput) -> None:
        gens = [sampler.generator] + [
            s.request.generator for s in sched.scheduled if s.request.generator is not None
        ]
        self._states = [(g, g.get_state()) for g in gens]

    def rewind(self) -> None:
        for gen, state in self._states:
            gen.set_state(state)


def trial(
    runner: ModelRunner, part: list[ScheduledRequest], pending: PendingTokens | None, streams: RandomStreams
) -> Exception | None:
    """Run the model and sampling for `part` alone and read the samples; what it raised, or None."""
    streams.rewind()
    try:
        _, _, samples = runner.execute(SchedulerOutput(part), pending)
        if samples is not None:
            samples.result()
    except Exception as exc:
        return exc
    finally:
        streams.rewind()
    return None


def find_culprits(
    runner: ModelRunner,
    part: list[ScheduledRequest],
    pending: PendingTokens | None,
    streams: RandomStreams,
    error: Exception,
) -> dict[Request, Exception]:
    """Given that running `part` raised `error`: the requests whose rows make it raise, each with its
    error. A request that fails alone is at fault; halves are tried apart (bisection, so one bad request
    among n costs about 2 log2(n) trial runs); none when no half fails alone (a passing fault, or one only
    the whole batch causes)."""
    if len(part) == 1:
        return {part[0].request: error}
    half = len(part) // 2
    found: dict[Request, Exception] = {}
    for sub in (part[:half], part[half:]):
        if (exc := trial(runner, sub, pending, streams)) is not None:
            found |= find_culprits(runner, sub, pending, streams, exc)
    return found
