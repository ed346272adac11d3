"""Verifying proposed tokens so that the output is exactly what plain decoding would give.

A request with proposed tokens d1..dk computes its last token and the k proposals in one step (a k + 1
token query over its paged cache, as a prefill chunk is) and samples all k + 1 rows; row j is sampled as
plain decoding would sample the position after d1..dj (`DraftRow`: penalties, min_tokens and logit bias
see that history). d(j+1) is accepted when row j's sample equals it; the first row whose sample differs
gives the next token instead, and after k acceptances row k gives one more (`accepted_tokens`).

Why this is exact: the proposal is deterministic (one token with probability 1), so the rejection sampler
of speculative decoding (Leviathan et al.; vLLM's `RejectionSampler` with no draft probabilities) accepts d
with probability min(1, p(d) / 1) = p(d) and otherwise samples from p with d removed and renormalised.
Sampling t ~ p and accepting iff t == d does both at once: P(accept) = p(d), and a rejected t is
distributed as p given t != d. Every row is sampled by the request's own full sampler chain, so top-k,
top-p, min-p, temperature, penalties and the rest hold exactly; greedy rows compare the argmax.

Seeded requests stay reproducible: each sampled row draws one uniform from the request's stream, so after
verification the stream is put back to its state before the step and advanced by the rows that produced
tokens (`settle_stream`): it is where plain decoding of the same tokens would have left it, and a seeded
request samples the same tokens with speculation on or off (up to the rounding of a k + 1 token query).

Not speculated (the request decodes normally, in the same steps as the others): samplers whose state or
random draws per position could not be replayed exactly for rows sampled together (`speculation_refusal`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitllm.engine.request import Request, SamplingParams
from fitllm.engine.sampler import draw_uniform


def speculation_refusal(params: SamplingParams) -> str | None:
    """Why a request's samplers cannot be verified exactly in one step (None: they can)."""
    if params.structured_output is not None:
        return "a grammar constraint (its state advances token by token)"
    if params.banned_strings:
        return "banned strings (a phrase found rewinds the request: one rewind mechanism at a time)"
    if params.dry_multiplier > 0:
        return "DRY (its matches are kept incrementally, token by token)"
    if params.mirostat:
        return "mirostat (mu is updated from each sampled token's surprise)"
    if params.xtc_on:
        return "XTC (two draws per position: the stream could not be replayed)"
    return None


class DraftRow:
    """A request as it samples at a proposed position: its tokens followed by the proposals before that
    position (all of them accepted if this row's sample is used). Reads what the sampler reads."""

    __slots__ = ("request", "extra")

    def __init__(self, request: Request, extra: list[int]) -> None:
        self.request = request
        self.extra = extra

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def params(self) -> SamplingParams:
        return self.request.params

    @property
    def generator(self) -> torch.Generator | None:
        return self.request.generator

    @property
    def sampler_state(self):
        return self.request.sampler_state

    banned = None  # banned strings are not speculated
    constraint = None  # nor grammars (speculation_refusal)
    num_output_placeholders = 0  # a speculating request has every token on the host

    @property
    def num_prompt_tokens(self) -> int:
        return self.request.num_prompt_tokens

    @property
    def token_ids(self) -> list[int]:
        return self.request.token_ids + self.extra

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.request.prompt_token_ids

    @property
    def output_token_ids(self) -> list[int]:
        return self.request.output_token_ids + self.extra

    @property
    def num_tokens(self) -> int:
        return self.request.num_tokens + len(self.extra)

    @property
    def num_output_tokens(self) -> int:
        return self.request.num_output_tokens + len(self.extra)


def sampling_rows(requests: list[Request], drafts: list[list[int]]) -> list[Request | DraftRow]:
    """The sampler's rows: each request, followed by one row per token proposed for it."""
    rows: list[Request | DraftRow] = []
    for req, proposed in zip(requests, drafts, strict=True):
        rows.append(req)
        rows += [DraftRow(req, proposed[:j]) for j in range(1, len(proposed) + 1)]
    return rows


def accepted_tokens(proposed: list[int], sampled: list[int]) -> list[int]:
    """The tokens a verify step gives: the proposals up to the first whose row sampled another token, then
    that row's token (or, all accepted, the last row's)."""
    assert len(sampled) == len(proposed) + 1
    for j, d in enumerate(proposed):
        if sampled[j] != d:
            return proposed[:j] + [sampled[j]]
    return proposed + [sampled[-1]]


@dataclass(slots=True)
class DraftCheck:
    """A request's proposals in a launched step, and its seeded stream's state before they were sampled
    (None: greedy or unseeded, nothing to put back)."""

    tokens: list[int]
    stream_state: torch.Tensor | None = None

    @classmethod
    def before_sampling(cls, req: Request, tokens: list[int]) -> DraftCheck:
        seeded = req.generator is not None and not req.params.greedy
        return cls(tokens, req.generator.get_state() if seeded else None)


def settle_stream(req: Request, check: DraftCheck, num_tokens: int) -> None:
    """Put a seeded request's stream where plain decoding of the `num_tokens` tokens it got would leave it:
    one draw per token (the sampler's `draw_uniform`)."""
    if check.stream_state is None:
        return
    req.generator.set_state(check.stream_state)
    for _ in range(num_tokens):
        draw_uniform(req.generator)
