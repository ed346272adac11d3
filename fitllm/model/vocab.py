"""The token table and the LM head: at world size 1 whole; with tensor parallelism split by vocabulary rows
(vLLM's VocabParallelEmbedding / ParallelLMHead). Always split, whatever the table's size: each rank holds
1/N of it, for one gather of the sampled rows' logits (0.8-1.9% of rank 0's step on gloo); a replicated
table measured no faster (docs/benchmarks.md, issue 25), so it is not offered.

Vocab-parallel: rank r holds ids [r * rows, (r + 1) * rows), `rows` the vocabulary over the ranks rounded
up to `VOCAB_PAD`, so every rank's shard has one shape (the gather needs it) and padding rows (zeros) sit
at the end of the table. A lookup zeroes the rows of ids outside the shard, and one all-reduce sums the
ranks' rows (exact: each id's row comes from one rank, the others add zeros). The head: each rank
multiplies by its rows and rank 0 gathers the logits, cuts the padding and alone samples; a worker's
`compute_logits` returns None.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from fitllm.config import ModelConfig
from fitllm.distributed import get_tp_rank, get_tp_world_size, tp_all_reduce, tp_gather
from fitllm.model.linear import LinearBase, expect_rows
from fitllm.quant.base import QuantMethod
from fitllm.quant.gguf_blocks import GGUFBlocks

VOCAB_PAD = 64  # a shard's rows are a multiple of this (as vLLM pads): aligned kernels, equal shapes


@dataclass(frozen=True, slots=True)
class VocabShard:
    """The vocabulary rows one rank holds: ids [start, start + real), then `rows - real` padding rows."""

    vocab_size: int  # the whole vocabulary
    rows: int  # rows every rank holds (padded)
    start: int

    @property
    def real(self) -> int:
        """Rows of real ids (0 for a rank wholly past the vocabulary)."""
        return max(0, min(self.rows, self.vocab_size - self.start))


def vocab_shard(vocab_size: int, rank: int, world_size: int) -> VocabShard:
    """Rank `rank`'s contiguous share of `vocab_size` ids, padded to a multiple of VOCAB_PAD."""
    rows = -(-vocab_size // world_size)
    rows = -(-rows // VOCAB_PAD) * VOCAB_PAD
    return VocabShard(vocab_size, rows, rank * rows)


class VocabEmbedding(LinearBase):
    """The [vocab, hidden] token table (this rank's shard when vocab-parallel), held through a QuantMethod as
    a linear's weight is (the model dtype by default), so that an LM head tied to it can be quantized
    (`--lm-head-dtype`) without a second copy: `forward` looks rows up (dequantized, so the lookup gives
    exactly the rows the head multiplies by) and `project` is the tied head."""

    def __init__(self, vocab_size: int, hidden_size: int, quant: QuantMethod | None = None) -> None:
        self.vocab_size = vocab_size
        world = get_tp_world_size()
        self.shard = vocab_shard(vocab_size, get_tp_rank(), world) if world > 1 else None
        super().__init__(hidden_size, self.shard.rows if self.shard else vocab_size, bias=False, quant=quant)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        s = self.shard
        if s is None:
            super().weight_loader(param, loaded, shard_id)
            return
        expect_rows(loaded, s.vocab_size)
        if s.real:
            self._load_rows(0, s.real, loaded.narrow(0, s.start, s.real))
        if s.real < s.rows:  # padding: zero rows (looked up never, their logits cut on rank 0)
            dtype = torch.float32 if isinstance(loaded, GGUFBlocks) else loaded.dtype
            self.quant.load_rows(self, s.real, torch.zeros(s.rows - s.real, self.in_features, dtype=dtype))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        s = self.shard
        if s is None:
            return self.quant.embedding(self, input_ids)
        local = input_ids - s.start
        outside = (local < 0) | (local >= s.real)
        rows = self.quant.embedding(self, local.masked_fill(outside, 0))
        rows.masked_fill_(outside.unsqueeze(-1), 0)
        return tp_all_reduce(rows)

    def project(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """hidden [T, hidden_size] -> logits [T, vocab_size] (vocab-parallel: on rank 0; None on the others,
        whose shard went to rank 0's gather)."""
        logits = self.quant.apply(self, hidden)
        s = self.shard
        if s is None:
            return logits
        parts = tp_gather(logits)
        if parts is None:
            return None
        # Padding rows are the table's last: keep each rank's real columns (a copy only where cut).
        keep = [p[..., : vocab_shard(s.vocab_size, r, len(parts)).real] for r, p in enumerate(parts)]
        return torch.cat([p for p in keep if p.shape[-1]], dim=-1)


class ParallelLMHead(VocabEmbedding):
    """An untied LM head: the [vocab, hidden] output projection, split by vocabulary rows as the embedding
    is; only `project` is used."""


def vocab_layers(
    config: ModelConfig, quant: QuantMethod | None
) -> tuple[VocabEmbedding, VocabEmbedding | None]:
    """(embedding, LM head or None when tied): the head stored as `quant.head` says (`--lm-head-dtype`). A
    tied embedding is the head's one copy, so it takes the head's method: an int8 head then halves the
    table instead of adding a second one beside it."""
    head = quant.head if quant is not None else None
    if config.tie_word_embeddings:
        return VocabEmbedding(config.vocab_size, config.hidden_size, head), None
    lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, head)
    return VocabEmbedding(config.vocab_size, config.hidden_size), lm_head


def compute_logits(
    embed: VocabEmbedding, lm_head: VocabEmbedding | None, hidden: torch.Tensor
) -> torch.Tensor | None:
    """Logits of `hidden` through the LM head, or the embedding tied to it (None on a vocab-parallel
    worker, which only contributes its shard)."""
    return (embed if lm_head is None else lm_head).project(hidden)
