"""Incremental detokenization with stop strings that never leak into the output.

Text is decoded token by token through `tokenizers`' DecodeStream, which holds back incomplete UTF-8.
While a request runs, the last (longest stop string - 1) characters are held back from streaming, since
they could be the start of a stop string that the next token completes.
"""

from __future__ import annotations

from fitllm.loader.tokenizer import Tokenizer


class IncrementalDetokenizer:
    """Output text of one request, grown a token at a time, with stop-string detection."""

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: list[int],
        stop: list[str],
        skip_special_tokens: bool = True,
        include_stop_str_in_output: bool = False,
    ) -> None:
        self._tokenizer = tokenizer
        self._stream = tokenizer.decode_stream(prompt_ids, skip_special_tokens)
        self.stop = stop
        self.include_stop = include_stop_str_in_output
        self._holdback = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._sent = 0

    def add_token(self, token_id: int, check_stop: bool = True) -> str | None:
        """Append one token's text; returns the stop string if it now appears (text is cut there).

        check_stop=False (before min_tokens) appends without looking for stop strings."""
        piece = self._stream.step(self._tokenizer.backend, token_id)
        if not piece:
            return None
        start = max(0, len(self.text) - self._holdback)
        self.text += piece
        if not check_stop:
            return None
        found = [(at, s) for s in self.stop if (at := self.text.find(s, start)) != -1]
        if not found:
            return None
        at, s = min(found)  # the earliest stop string wins
        self.text = self.text[: at + len(s)] if self.include_stop else self.text[:at]
        return s

    @property
    def streamed_text(self) -> str:
        """The text released by take_delta so far (held-back characters excluded)."""
        return self.text[: self._sent]

    def take_delta(self, finished: bool) -> str:
        """Text not yet streamed that can no longer turn into a stop string."""
        end = len(self.text) if finished else max(self._sent, len(self.text) - self._holdback)
        delta = self.text[self._sent : end]
        self._sent = end
        return delta
