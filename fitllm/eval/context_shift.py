"""What a context shift costs in quality (`fitllm eval context-shift`): a story written turn by turn past the
context, each turn's continuation scored once over the shifted cache and once over recomputed K/V.

The session, as KoboldAI Lite drives a server: the first `memory` tokens of the text stay at the front; each
turn appends the text's next `turn` tokens; when memory + story + the new turn no longer fit in `context`,
the oldest `trim` story tokens after memory are dropped. The shifted side keeps one cache for the whole
session, as the engine does: at a trim its K/V after the cut moves back with `shift_kv` (K rotated by the
model's rotary), so after several trims the kept tokens carry K/V computed over text cut turns ago. Each
turn's tokens are prefilled over that cache (the last kept token recomputed, as the engine always computes a
prompt's last token) and their log-likelihoods are the shifted figures. The reference scores the same turn
with one prefill over the trimmed sequence: what recomputing (shift off) gives. Both run the engine's model
and attention through scratch caches (`scratch_prefill`); the engine's own shifted cache and next-token
logits equal this construction (tests/test_context_shift.py).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from fitllm.config import ModelConfig
from fitllm.engine.context_shift import shift_kv
from fitllm.engine.runner import scratch_prefill
from fitllm.engine.scorer import SequenceScorer
from fitllm.memory.kv.format import KVCacheFormat


@dataclass(slots=True)
class TurnScore:
    """One turn after trimming started: its tokens' summed negative log-likelihood both ways."""

    turn: int
    trims: int  # shifts the cache has been through by this turn
    nll_shifted: float
    nll_recomputed: float
    num_tokens: int


@dataclass(slots=True)
class ShiftEvalResult:
    context: int
    memory: int
    turn: int
    trim: int
    turns: list[TurnScore] = field(default_factory=list)

    @property
    def num_scored(self) -> int:
        return sum(t.num_tokens for t in self.turns)

    @property
    def perplexity_shifted(self) -> float:
        return math.exp(sum(t.nll_shifted for t in self.turns) / self.num_scored)

    @property
    def perplexity_recomputed(self) -> float:
        return math.exp(sum(t.nll_recomputed for t in self.turns) / self.num_scored)


class _Prefiller:
    """Prefills over a given cache through the engine's model, returning log-likelihoods and the new K/V."""

    def __init__(self, model: nn.Module, config: ModelConfig, device: torch.device, kv_format: KVCacheFormat):
        self.model, self.config, self.device, self.kv_format = model, config, device, kv_format

    @torch.inference_mode()
    def run(self, cache: torch.Tensor, tokens: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Prefill `tokens` at positions after `cache` [layers, 2, n, kv_heads, width]: the log-likelihood
        of tokens[1:] (float32, CPU) and the K/V of cache + tokens."""
        n, total = cache.shape[2], cache.shape[2] + len(tokens)
        ids = torch.tensor(tokens, device=self.device)
        with scratch_prefill(
            self.model,
            self.config,
            self.device,
            total,
            len(tokens),
            self.kv_format,
            spans=[(len(tokens), total)],
        ) as meta:
            layers = self.model.attention_layers()
            for i, attn in enumerate(layers):
                attn.kv_slabs[0][:, :n] = cache[i]
            hidden = self.model(ids, torch.arange(n, total, device=self.device), meta)
            kv = torch.stack([attn.kv_slabs[0] for attn in layers])
        logprobs = self.model.compute_logits(hidden[:-1]).float().log_softmax(-1)
        return logprobs.gather(1, ids[1:, None])[:, 0].cpu(), kv


def evaluate_shift(
    model: nn.Module,
    config: ModelConfig,
    device: torch.device,
    kv_format: KVCacheFormat,
    ids: list[int],
    context: int = 1024,
    memory: int = 64,
    turn: int = 64,
    trim: int = 64,
    max_turns: int = 30,
    progress=None,
) -> ShiftEvalResult:
    """Score up to `max_turns` turns after trimming starts (see the module docstring)."""
    if not (memory >= 0 and turn >= 1 and trim >= turn and memory + trim + turn < context):
        raise ValueError(
            f"need --turn >= 1, --trim >= --turn and --memory + --trim + --turn < --context; got memory "
            f"{memory}, turn {turn}, trim {trim}, context {context}"
        )
    prefill = _Prefiller(model, config, device, kv_format)
    scorer = SequenceScorer(model, config, device, context, kv_format)
    result = ShiftEvalResult(context, memory, turn, trim)
    # Fill the context first (no trim yet): one prefill gives the cache the session would have.
    first = context - turn
    if len(ids) < first + turn:
        raise ValueError(f"the text has {len(ids)} tokens; the session needs at least {first + turn}")
    empty = torch.empty((config.num_hidden_layers, 2, 0, config.num_key_value_heads, kv_format.entry_width))
    _, cache = prefill.run(empty.to(device, kv_format.storage_dtype), ids[:first])
    seq, pos, trims, n = list(ids[:first]), first, 0, 0
    while n < max_turns and pos + turn <= len(ids):
        new = ids[pos : pos + turn]
        if len(seq) + turn > context:  # trim: drop the oldest story tokens after memory, shift the rest
            seq = seq[:memory] + seq[memory + trim :]
            kept = cache[:, :, memory + trim :].clone()
            delta = torch.full((kept.shape[2],), -trim, dtype=torch.int64)
            shift_kv(kept, delta, model.rotary, kv_format)
            cache = torch.cat([cache[:, :, :memory], kept], dim=2)
            trims += 1
        # The last kept token is recomputed (it gives the logits for the turn's first token).
        logprobs, cache = prefill.run(cache[:, :, : len(seq) - 1], seq[-1:] + new)
        reference = scorer.token_logprobs(seq + new)[-turn:]
        if trims:
            result.turns.append(
                TurnScore(n, trims, -float(logprobs.double().sum()), -float(reference.double().sum()), turn)
            )
            n += 1
            if progress is not None:
                progress(n, max_turns)
        seq += new
        pos += turn
    return result
