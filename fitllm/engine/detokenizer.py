"""Incremental detokenization with stop strings and banned phrases that never leak into the output.

Text is decoded token by token through `tokenizers`' DecodeStream, which holds back incomplete UTF-8.
While a request runs, the last (longest stop string or banned phrase - 1) characters are held back from
streaming, since they could be the start of a stop string or banned phrase that the next token completes.
With banned phrases the request can be rewound to the token where one began, so text is released in whole
tokens: up to the start of the token holding the first held-back character (and only those tokens' ids
are reported), so nothing streamed is ever taken back.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right

from fitllm.engine.banned import BannedStrings
from fitllm.loader.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Output text of one request, grown a token at a time, with stop-string and banned-phrase detection."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
        banned: BannedStrings | None = None,
    ) -> None:
        self._tokenizer = tokenizer
        self._prompt_ids = prompt_ids
        self._skip_special = skip_special_tokens
        self._stream = tokenizer.decode_stream(prompt_ids, skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self.banned = banned
        longest = max([len(s) for s in stop] + ([banned.longest] if banned else []), default=1)
        self._holdback = longest - 1
        self.text = ""
        self._sent = 0
        self._ids: list[int] = []  # output tokens added
        self._starts: list[int] = []  # where each output token's text begins in `text` (non-decreasing)
        # Set by add_token when the token completed a banned phrase: the output token it began at.
        self.banned_at: int | None = None

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token's text; returns the stop string if it now appears (text is cut there). If the
        token completed a banned phrase instead, `banned_at` says where it began (see `rewind`).

        check_stop=False (before min_tokens) appends without looking for stop strings."""
        self.banned_at = None
        piece = self._stream.step(self._tokenizer.backend, token_id)
        self._ids.append(token_id)
        self._starts.append(len(self.text))
        if not piece:
            return None
        start = max(0, len(self.text) - self._holdback)
        self.text += piece
        if self.banned is not None and (at := self.banned.search(self.text, start)) is not None:
            k = bisect_right(self._starts, at) - 1
            # Tokens whose bytes only completed a character together share its start: take the first.
            self.banned_at = bisect_left(self._starts, self._starts[k])
            return None
        if not check_stop:
            return None
        found = [(at, s) for s in self.stop if (at := self.text.find(s, start)) != -1]
        if not found:
            return None
        at, s = min(found)  # the earliest stop string wins
        self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
        return s

    def rewind(self, num_tokens: int) -> None:
        """Keep only the first `num_tokens` output tokens (never fewer than those already released)."""
        assert self.released_tokens(False) <= num_tokens <= len(self._ids)
        self.text = self.text[: self._starts[num_tokens]] if num_tokens < len(self._ids) else self.text
        del self._ids[num_tokens:], self._starts[num_tokens:]
        self._stream = self._tokenizer.decode_stream(self._prompt_ids + self._ids, self._skip_special)
        self.banned_at = None

    @property
    def streamed_text(self) -> str:
        """The text released by take_delta so far (held-back characters excluded)."""
        return self.text[: self._sent]

    def _release_end(self, finished: bool) -> int:
        """How far the text may be streamed now."""
        if finished:
            return len(self.text)
        end = len(self.text) - self._holdback
        if self.banned is not None:  # whole tokens only: back to the start of the token holding `end`
            k = bisect_right(self._starts, end) - 1
            end = self._starts[k] if k >= 0 else 0
        return max(self._sent, end)

    def released_tokens(self, finished: bool) -> int | None:
        """With banned phrases, how many output tokens have all their text streamed (None: no limit)."""
        if self.banned is None or finished:
            return None
        return bisect_left(self._starts, self._sent)

    def take_delta(self, finished: bool) -> str:
        """Text not yet streamed that can no longer turn into a stop string or banned phrase."""
        end = self._release_end(finished)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
