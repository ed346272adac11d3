"""DRY ("don't repeat yourself"): the token that would extend a repeat of an earlier sequence of the context
(prompt + output) is penalised by multiplier * base ** (length - allowed_length).

Semantics are KoboldCpp's `sample_dry` (itself the llama.cpp port by the sampler's author): the match is
looked for in the last `dry_penalty_last_n` tokens (0 or -1: all), a sequence breaker (a string, found in
the vocabulary as llama.cpp does: every token containing it, or a token ending with a prefix of it followed
by the tokens of the rest) ends the longest match that may be counted, nothing is penalised when fewer
than `allowed_length` tokens are left after the latest breaker, and the exponent is capped so the penalty
stays a finite float32.

KoboldCpp recomputes the matches each step with the Z-algorithm. Here each request keeps them: the length
m[j] of the longest common suffix of tokens[..j] and of the whole context, for every j where it is not 0.
Appending token t maps m to {j: m[j - 1] + 1 for each earlier position j of t}, so a step costs the
occurrences of one token, not the context length. The penalties go to the device in one copy per step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

FLOAT_MAX_LOG = 88.7228391  # log of the largest float32: the exponent's cap, as KoboldCpp and llama.cpp
MAX_TAIL_TOKENS = 20  # a breaker's tail is clamped to this many tokens (bounds the backwards scan)

Heads = dict[int, list[tuple[int, ...]]]  # head token -> the tails that complete a breaker after it


class BreakerTable:
    """Sequence breakers as token sequences, per breaker list, for one vocabulary (cached: scanning the
    vocabulary for every request would cost tens of milliseconds)."""

    def __init__(self, token_texts: Callable[[], Sequence[str]], encode: Callable[[str], list[int]]) -> None:
        self._texts_fn, self._texts = token_texts, None
        self._encode = encode
        self._cache: dict[tuple[str, ...], Heads] = {}

    @classmethod
    def for_tokenizer(cls, tokenizer) -> BreakerTable:
        """From a fitllm Tokenizer: each token's text decoded alone, special tokens included (KoboldCpp's
        FileFormatTokenizeID(id, true))."""

        def texts() -> list[str]:
            n = tokenizer.vocab_size
            return tokenizer.backend.decode_batch([[i] for i in range(n)], skip_special_tokens=False)

        return cls(texts, lambda s: tokenizer.encode(s, add_special_tokens=False))

    def heads(self, breakers: Sequence[str]) -> Heads:
        key = tuple(breakers)
        if key not in self._cache:
            if self._texts is None:
                self._texts = list(self._texts_fn())
            heads: Heads = {}
            for b in key:
                if b:
                    self._add(b, heads)
            self._cache[key] = heads
        return self._cache[key]

    def _add(self, s: str, heads: Heads) -> None:
        all_extended = all(ord(c) > 127 for c in s)
        tails: dict[int, tuple[int, ...]] = {}  # prefix length k -> the tokens of s[k:]
        for v, word in enumerate(self._texts):
            if s in word:
                seqs = heads.setdefault(v, [])
                if () not in seqs:
                    seqs.append(())
                continue
            if all_extended:
                continue
            # The word ends with a proper prefix of s (it cannot contain s): a head whose tail is the rest.
            for k in range(1, min(len(s), len(word) + 1)):
                if word.endswith(s[:k]):
                    if k not in tails:
                        tails[k] = tuple(self._encode(s[k:])[:MAX_TAIL_TOKENS])
                    seqs = heads.setdefault(v, [])
                    if tails[k] not in seqs:
                        seqs.append(tails[k])


@dataclass(slots=True)
class DryState:
    """One request's matches: `match[j]` = longest common suffix of tokens[..j] and of tokens[..seen-1],
    for j < seen - 1 where it is not 0; `positions[t]`: where t occurs among the tokens seen."""

    tokens: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    seen: int = 0
    match: dict[int, int] = field(default_factory=dict)
    positions: dict[int, list[int]] = field(default_factory=dict)

    def update(self, token_ids: list[int]) -> None:
        """Fold in the tokens added since the last call; start over if the sequence was cut or changed
        (a rewind, a context shift)."""
        n = len(token_ids)
        if n < self.seen or (self.seen and token_ids[self.seen - 1] != int(self.tokens[self.seen - 1])):
            self.seen, self.match, self.positions = 0, {}, {}
        if self.seen == 0 and n:
            self._build(token_ids)
            return
        if len(self.tokens) < n:
            grown = np.empty(max(n, 2 * len(self.tokens)), dtype=np.int64)
            grown[: self.seen] = self.tokens[: self.seen]
            self.tokens = grown
        for t in token_ids[self.seen :]:
            pos = self.positions.setdefault(t, [])
            old = self.match
            self.match = {j: old.get(j - 1, 0) + 1 for j in pos}
            self.tokens[self.seen] = t
            pos.append(self.seen)
            self.seen += 1

    def _build(self, token_ids: list[int]) -> None:
        """The matches of a whole sequence at once: extend every earlier occurrence of the last token
        backwards while it agrees with the end (one vector step per matched length)."""
        x = np.asarray(token_ids, dtype=np.int64)
        n = len(x)
        self.tokens = np.empty(max(n, 64), dtype=np.int64)
        self.tokens[:n] = x
        self.seen = n
        self.positions = {}
        for i, t in enumerate(token_ids):
            self.positions.setdefault(t, []).append(i)
        cand = np.nonzero(x[:-1] == x[-1])[0]
        length = np.ones(len(cand), dtype=np.int64)
        live = np.arange(len(cand))
        k = 1
        while len(live):
            j = cand[live] - k
            ok = (j >= 0) & (x[np.maximum(j, 0)] == x[n - 1 - k])
            live = live[ok]
            length[live] += 1
            k += 1
        self.match = dict(zip(cand.tolist(), length.tolist(), strict=True))


def _rep_limit(x: np.ndarray, start: int, heads: Heads) -> int:
    """Tokens after the latest sequence breaker in x[start:], less the breaker's tail (KoboldCpp's step 1);
    the window's length when none is there."""
    window = len(x) - start
    if not heads:
        return window
    is_head = np.isin(x[start:], np.fromiter(heads, dtype=np.int64, count=len(heads)))
    for ix in np.nonzero(is_head)[0][::-1].tolist():
        i = window - 1 - ix  # tokens after this one
        longest = -1
        for tail in heads[int(x[start + ix])]:
            n = len(tail)
            if longest < n <= i and tuple(x[start + ix + 1 : start + ix + 1 + n].tolist()) == tail:
                longest = n
        if longest >= 0:
            return i - longest
    return window


def dry_penalties(
    state: DryState,
    multiplier: float,
    base: float,
    allowed: int,
    last_n: int,
    heads: Heads,
) -> dict[int, float]:
    """{token: penalty to subtract from its logit} for the context `state` has seen."""
    n = state.seen
    if multiplier <= 0 or base <= 0:
        return {}
    window = n if last_n <= 0 else min(last_n, n)
    if window <= allowed:
        return {}
    start = n - window
    x = state.tokens[:n]
    limit = _rep_limit(x, start, heads)
    if limit <= allowed:
        return {}
    longest: dict[int, int] = {}
    for j, m in state.match.items():
        if j < start:
            continue
        length = min(m, limit, j - start + 1)
        if length >= allowed:
            t = int(x[j + 1])
            if longest.get(t, -1) < length:
                longest[t] = length
    max_exp = int(FLOAT_MAX_LOG / math.log(base)) if base > 1.000001 else 0
    out = {}
    for t, length in longest.items():
        e = length - allowed
        if max_exp > 0 and e > max_exp:
            e = max_exp
        out[t] = multiplier * base**e
    return out
