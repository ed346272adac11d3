"""What the async engine publishes for front ends: the served model (fixed once the engine is built) and
status snapshots (taken on the engine thread, after each step and on idle turns).

The Engine is not thread-safe: its pool, scheduler and queues change while a step runs, and only the ledger
is locked. So front ends (the server's routes, /metrics, the studio) never read it: they read these
immutable objects, which the engine thread builds from its own state and publishes by replacing one
reference (atomic under the GIL), each snapshot internally consistent (its blocks, requests and ledger
from the same moment between steps).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

from fitllm.engine.context_shift import context_shift_unsupported
from fitllm.engine.report import EngineStatus, engine_status
from fitllm.engine.request import CacheReuse
from fitllm.loader.tokenizer import Tokenizer

if TYPE_CHECKING:
    from fitllm.engine.engine import Engine


def check_token_ids(ids: Iterable[int], vocab_size: int, what: str) -> None:
    """ValueError naming `what` for the first token id outside the vocabulary [0, vocab_size): the one
    range check for prompts, logit biases, stop tokens, scored prompts and detokenized ids."""
    for t in ids:
        if not 0 <= t < vocab_size:
            raise ValueError(f"{what}: token id {t} is outside the vocabulary [0, {vocab_size})")


@dataclass(frozen=True, slots=True)
class ServedModel:
    """The served model as routes see it; built once on the engine thread, never changed.

    The tokenizer is shared (encoding and decoding keep no state between calls, and the engine thread's
    incremental detokenizers keep theirs in their own streams)."""

    tokenizer: Tokenizer
    max_model_len: int  # the context length (after --max-model-len auto chose it)
    vocab_size: int  # rows of the embedding: the token ids the model takes
    eos_token_ids: tuple[int, ...]
    block_size: int
    quantization: str  # how the weights are held (the QuantMethod's description)
    kv_cache_dtype: str
    # Why a trimmed prompt cannot reuse its K/V by a context shift (None: it can; fitllm/engine/context_shift.py),
    # so routes trim in large steps instead (SmartContext).
    context_shift_unsupported: str | None = None

    @classmethod
    def of(cls, engine: Engine) -> ServedModel:
        """The description of `engine`'s model (call on the engine thread, once it is built)."""
        return cls(
            tokenizer=engine.tokenizer,
            max_model_len=engine.max_model_len,
            vocab_size=engine.model_config.vocab_size,
            eos_token_ids=tuple(engine.tokenizer.eos_token_ids),
            block_size=engine.block_size,
            quantization=engine.quant.describe(),
            kv_cache_dtype=engine.kv_format.name,
            context_shift_unsupported=context_shift_unsupported(engine.model_config),
        )

    def check_token_ids(self, ids: Iterable[int], what: str) -> None:
        """ValueError naming `what` for a token id this model does not have."""
        check_token_ids(ids, self.vocab_size, what)


REUSE_SOURCES = tuple(f.name for f in fields(CacheReuse))  # cached, shifted, from_host, prefilled


@dataclass(frozen=True, slots=True)
class EngineCounters:
    """Totals since the engine started, for metrics."""

    prompt_tokens: int = 0
    generation_tokens: int = 0
    steps: int = 0
    requests_finished: Mapping[str, int] = field(default_factory=dict)  # by finish reason
    # Prompt tokens of finished requests by where their K/V came from (REUSE_SOURCES).
    prompt_reuse: Mapping[str, int] = field(default_factory=lambda: dict.fromkeys(REUSE_SOURCES, 0))
    # Requests that wanted a context shift the model cannot do (ServedModel.context_shift_unsupported).
    context_shift_unsupported: int = 0


@dataclass(frozen=True, slots=True)
class StatusSnapshot:
    """The engine as it was between two steps: what it holds (pool, queue, ledger, offload) and its totals."""

    engine: EngineStatus
    counters: EngineCounters
    taken_at: float  # time.time() on the engine thread

    @classmethod
    def of(cls, engine: Engine, counters: EngineCounters, now: float) -> StatusSnapshot:
        """A snapshot of `engine` (call on the engine thread only)."""
        return cls(engine_status(engine), counters, now)
