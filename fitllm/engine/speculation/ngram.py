"""Prompt lookup (vLLM's `ngram` method, llama.cpp's lookup decoding): the tokens that followed the last
n-gram of a sequence the last time it occurred earlier in that sequence (prompt and output) are proposed as
its next tokens. Code edits, quotes and structured output copy long runs of their prompt, so most proposals
are accepted there; elsewhere few proposals are made (a long n-gram rarely repeats) and a rejected one costs
only its rows in a step that runs anyway.

Each request keeps an index of where every n-gram (of `n_min` to `n_max` tokens) last ended, grown by the
tokens appended since the last proposal, so a proposal costs a few dictionary lookups, not a scan of the
context."""

from __future__ import annotations

from dataclasses import dataclass, field

from fitllm.engine.request import Request
from fitllm.engine.speculation.verify import speculation_refusal


class NgramIndex:
    """Where each n-gram of one sequence last ended: n-gram -> the position of the token after it."""

    __slots__ = ("n_min", "n_max", "_next", "_indexed")

    def __init__(self, n_min: int, n_max: int) -> None:
        self.n_min, self.n_max = n_min, n_max
        self._next: dict[tuple[int, ...], int] = {}
        self._indexed = 0  # n-grams ending before this position are in `_next`

    def propose(self, tokens: list[int], k: int) -> list[int]:
        """Up to `k` tokens that followed the longest n-gram ending `tokens` at its latest earlier
        occurrence (latest: a sequence's recent text predicts its next text best); [] when none occurs."""
        length = len(tokens)
        if length < self._indexed:  # the sequence was cut (a rewind): index it again
            self._next.clear()
            self._indexed = 0
        # Index every n-gram that ends before the last token: its continuation is known.
        for end in range(self._indexed, length - 1):
            for n in range(self.n_min, min(self.n_max, end + 1) + 1):
                self._next[tuple(tokens[end - n + 1 : end + 1])] = end + 1
        self._indexed = max(self._indexed, length - 1)
        for n in range(min(self.n_max, length), self.n_min - 1, -1):
            start = self._next.get(tuple(tokens[length - n :]))
            if start is not None:
                return tokens[start : start + k]
        return []


@dataclass(slots=True)
class SpeculationStats:
    """Proposed and accepted tokens since start (vLLM's spec_decode num_draft / num_accepted tokens)."""

    num_verify_steps: int = 0  # request-steps that verified at least one proposed token
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0

    @property
    def acceptance_rate(self) -> float:
        return self.num_accepted_tokens / self.num_draft_tokens if self.num_draft_tokens else 0.0


@dataclass(slots=True)
class _RequestState:
    index: NgramIndex
    k: int  # proposals next time (adapted to how many were accepted)


@dataclass(slots=True)
class Speculator:
    """The scheduler's proposer: per running request, up to `k` tokens by prompt lookup.

    How many is adapted per request, since every proposed token costs a sampled row (the LM head and the
    sampler, on CPU the largest part of a small model's step) whether it is accepted or not: after a
    rejection a request proposes one more than it had accepted; after a full acceptance twice as many, up to
    `k`. Copying text soon runs at k; text that only repeats short phrases (stories) mostly proposes one."""

    n_max: int
    n_min: int
    k: int
    stats: SpeculationStats = field(default_factory=SpeculationStats)
    _requests: dict[str, _RequestState] = field(default_factory=dict)

    def propose(self, req: Request, room: int) -> list[int]:
        """Tokens to verify after the request's last one: at most `room` (what the step's token budget and
        the request's token limit leave); none for samplers speculation cannot keep exact."""
        if room <= 0 or speculation_refusal(req.params) is not None:
            return []
        state = self._requests.get(req.request_id)
        if state is None:
            state = self._requests[req.request_id] = _RequestState(NgramIndex(self.n_min, self.n_max), self.k)
        return state.index.propose(req.token_ids, min(state.k, room))

    def record(self, request_id: str, num_proposed: int, num_accepted: int) -> None:
        """A verify step of the request accepted `num_accepted` of its `num_proposed` tokens."""
        self.stats.num_verify_steps += 1
        self.stats.num_draft_tokens += num_proposed
        self.stats.num_accepted_tokens += num_accepted
        state = self._requests.get(request_id)
        if state is not None:
            full = num_accepted == num_proposed
            state.k = min(self.k, 2 * num_proposed if full else num_accepted + 1)

    def forget(self, request_id: str) -> None:
        """The request finished: drop its index."""
        self._requests.pop(request_id, None)
