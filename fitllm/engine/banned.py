"""Banned strings (KoboldCpp's anti-slop `banned_tokens`, TabbyAPI's `banned_strings`): backtracking.

When a request's output text completes a banned phrase (case-insensitive, across token boundaries), the
request is rewound to the token where the phrase began: its output tokens, logprobs, K/V (blocks past the
new length go back to the pool), detokenizer state and any sample still in flight; that token is forbidden
at that position for the rest of the request, and the position is sampled again. The detokenizer holds back
as much text as the longest phrase (whole tokens), so a stream never shows a banned phrase.

As in KoboldCpp: only the output is searched (a phrase in the prompt, or one that begins in the prompt,
never triggers), bans at a position accumulate, and an entry of one character that is one token
(`tokcount == 1 && length < 2`) also forbids, at every position, each token whose text contains it (case-
insensitive), which saves a rewind per such token; the phrase check stays as the backstop.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from fitllm.engine.request import Request
from fitllm.memory.transfer import to_device

if TYPE_CHECKING:
    from fitllm.engine.scheduler import Scheduler


def phrase_pattern(phrases: list[str]) -> re.Pattern[str]:
    """One case-insensitive pattern over every phrase; `search` finds the leftmost match (IGNORECASE folds
    one character to one, so match offsets are offsets in the text itself)."""
    return re.compile("|".join(re.escape(p) for p in phrases), re.IGNORECASE)


@dataclass(slots=True)
class BannedStrings:
    """One request's banned phrases and the tokens it may not sample, by absolute position."""

    phrases: list[str]
    always: frozenset[int] = frozenset()  # tokens forbidden at every position (one-character entries)
    bans: dict[int, set[int]] = field(default_factory=dict)  # position -> tokens forbidden there
    num_rewinds: int = 0
    pattern: re.Pattern[str] = field(init=False)
    longest: int = field(init=False)  # characters: how much text the detokenizer holds back

    def __post_init__(self) -> None:
        self.pattern = phrase_pattern(self.phrases)
        self.longest = max(len(p) for p in self.phrases)

    def search(self, text: str, start: int) -> int | None:
        """Where the leftmost banned phrase at or after `start` begins, if any."""
        m = self.pattern.search(text, start)
        return None if m is None else m.start()

    def forbid(self, position: int, token_id: int) -> None:
        """Never sample `token_id` again at absolute token position `position` (KoboldCpp's antislop ban)."""
        self.bans.setdefault(position, set()).add(token_id)

    def forbidden_at(self, position: int) -> set[int] | frozenset[int]:
        """The tokens this request may not sample at `position`."""
        at = self.bans.get(position)
        if at is None:
            return self.always
        return at | self.always if self.always else at


def apply_bans(logits: torch.Tensor, requests: list[Request]) -> None:
    """-inf for every token a request may not sample at the position it samples now (after the tokens it
    has and those in flight), in place; rows without banned strings cost nothing."""
    rows: list[int] = []
    cols: list[int] = []
    for i, r in enumerate(requests):
        b = r.banned
        if b is None:
            continue
        ids = b.forbidden_at(r.num_tokens + r.num_output_placeholders)
        rows += [i] * len(ids)
        cols += ids
    if rows:
        index = to_device(rows + cols, torch.long, logits.device).view(2, -1)
        logits.index_put_((index[0], index[1]), logits.new_full((len(rows),), float("-inf")))


def single_char_bans(
    phrases: list[str], encode: Callable[[str], list[int]], vocab_text: list[str]
) -> set[int]:
    """KoboldCpp's rule for one-character entries that tokenize to one token: every token whose (lower-case)
    text contains the character. `vocab_text[i]` is token i's text, lower-cased."""
    chars = {p.lower() for p in phrases if len(p) == 1 and len(encode(p)) == 1}
    if not chars:
        return set()
    return {i for i, text in enumerate(vocab_text) if any(c in text for c in chars)}


def rewind_to_banned(req: Request, scheduler: Scheduler) -> None:
    """The request's last token completed a banned phrase that began at output token
    `req.detokenizer.banned_at`: forbid that token there, and cut the request (text, tokens, K/V) back
    to just before it, so that position is sampled again."""
    k = req.detokenizer.banned_at
    position = req.num_prompt_tokens + k
    req.banned.forbid(position, req.token_ids[position])
    req.banned.num_rewinds += 1
    req.detokenizer.rewind(k)
    scheduler.rewind(req, position)


def vocab_text(decode_batch: Callable[[list[list[int]]], list[str]], vocab_size: int) -> list[str]:
    """Every token's text alone, lower-cased (for `single_char_bans`)."""
    return [t.lower() for t in decode_batch([[i] for i in range(vocab_size)])]
