"""Compiling a request's constraint once: llguidance's tokenizer view of the model's vocabulary (built on first
use, ~0.1 s for 49k tokens), and a cache of compiled matchers by spec, so requests with the same schema (an
agent's every call) pay nothing after the first; each request gets a copy of the compiled matcher."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from fitllm.engine.structured.matcher import Constraint
from fitllm.engine.structured.spec import StructuredOutput

CACHE_SIZE = 64  # compiled grammars kept (each a few hundred KiB at most for JSON schemas)


class _Vocabulary:
    """The model's vocabulary as llguidance's TokenizerWrapper reads it: every id's bytes (ids past the
    tokenizer, an embedding's padding rows, are empty and never allowed), EOS, special ids, and encoding."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        n = min(vocab_size, tokenizer.vocab_size)
        self.tokens = [tokenizer.token_bytes(i) for i in range(n)] + [b""] * (vocab_size - n)
        self.eos_token_id = tokenizer.eos_token_ids[0] if tokenizer.eos_token_ids else None
        self.bos_token_id = tokenizer.bos_token_id
        # Special tokens only: llguidance keeps them out of text. A plain added token (Qwen's `<tool_call>`)
        # is its text, so a grammar's literal "<tool_call>" matches the token the model writes for it.
        added = tokenizer.backend.get_added_tokens_decoder()
        self.special_token_ids = sorted(i for i, t in added.items() if t.special and i < n)
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode(text, add_special_tokens=False)


class GrammarCompiler:
    """Turns a StructuredOutput into a per-request Constraint (ValueError naming the spec's field when it does
    not compile). Used on the engine thread at admission (Engine.add_request)."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._source = tokenizer
        self.vocab_size = vocab_size
        self._lltokenizer: Any = None
        self._cache: OrderedDict[StructuredOutput, Any] = OrderedDict()
        self.num_compiled = 0  # cache misses (for tests and the benchmark)

    @property
    def lltokenizer(self) -> Any:
        if self._lltokenizer is None:
            import llguidance

            vocab = _Vocabulary(self._source, self.vocab_size)
            eos = list(self._source.eos_token_ids) or None
            self._lltokenizer = llguidance.LLTokenizer(
                llguidance.TokenizerWrapper(vocab), n_vocab=self.vocab_size, eos_token=eos
            )
        return self._lltokenizer

    def compile(self, spec: StructuredOutput) -> Any:
        """The compiled (pristine) llguidance matcher for `spec`, from the cache when it was compiled before."""
        matcher = self._cache.get(spec)
        if matcher is not None:
            self._cache.move_to_end(spec)
            return matcher
        import llguidance

        try:
            grammar = spec.grammar_text()
        except ValueError as exc:
            message = str(exc)
            raise ValueError(
                message if message.startswith(spec.field) else f"{spec.field}: {message}"
            ) from None
        matcher = llguidance.LLMatcher(self.lltokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise ValueError(f"{spec.field}: {_first_line(matcher.get_error())}")
        self.num_compiled += 1
        self._cache[spec] = matcher
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return matcher

    def constraint(self, spec: StructuredOutput) -> Constraint:
        """A fresh matcher for one request (a copy of the compiled one)."""
        return Constraint(spec, self.compile(spec).deep_copy())


def _first_line(error: str) -> str:
    """llguidance's errors can span lines (a regex caret display): keep them readable in a JSON body."""
    return " ".join(line.strip() for line in error.strip().splitlines() if line.strip())[:500]
