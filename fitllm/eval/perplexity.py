"""Sliding-window perplexity of a text file (`fitllm eval perplexity`), the measure quantization is judged by.

The text is tokenized once. Windows of `context` tokens start every `stride` tokens; each window is one
causal prefill through the engine's own model and attention (K/V written to a scratch cache of the window's
slots), and only the tokens not scored by an earlier window count: with stride < context every token after
the first is scored exactly once, with at least `context - stride` tokens of history (the method of the
Hugging Face perplexity guide). Logits are formed in chunks of rows, so the float32 vocabulary-sized buffer stays small.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fitllm.config import ModelConfig
from fitllm.engine.runner import scratch_prefill
from fitllm.quant.kv import KVCacheFormat

LOGIT_ROWS = 256  # rows of logits formed at once


def gutenberg_body(text: str) -> str:
    """The text between Project Gutenberg's START and END markers (the whole text if there are none)."""
    start = re.search(r"^\*\*\* START OF .*\*\*\*\s*$", text, re.MULTILINE)
    end = re.search(r"^\*\*\* END OF .*\*\*\*\s*$", text, re.MULTILINE)
    return text[start.end() if start else 0 : end.start() if end else len(text)].strip()


@dataclass(slots=True)
class PerplexityResult:
    perplexity: float
    nll_sum: float
    num_scored: int
    num_tokens: int
    num_windows: int
    context: int
    stride: int


class SequenceScorer:
    """Log-likelihoods of every next token of a sequence of up to `context` tokens, through the model."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        device: torch.device,
        context: int,
        kv_format: KVCacheFormat | None = None,
    ) -> None:
        self.model = model
        self.config = config
        self.device = device
        self.context = context
        self.kv_format = kv_format  # K/V stored as the engine would (None: the model dtype)

    def token_logprobs(self, ids: list[int]) -> torch.Tensor:
        """log p(ids[i] | ids[:i]) for i = 1 .. len(ids) - 1, float32, on CPU."""
        return self.token_logprobs_and_top(ids, 0)[0]

    @torch.inference_mode()
    def token_logprobs_and_top(
        self, ids: list[int], top_n: int
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """token_logprobs, plus the `top_n` most likely tokens at each of those positions (logprobs and
        ids, [len(ids) - 1, top_n], on CPU)."""
        n = len(ids)
        assert 2 <= n <= self.context
        tokens = torch.tensor(ids, dtype=torch.long, device=self.device)
        with scratch_prefill(self.model, self.config, self.device, n, n, self.kv_format) as meta:
            hidden = self.model(tokens, torch.arange(n, device=self.device), meta)
        out = torch.empty(n - 1, dtype=torch.float32)
        top_values = torch.empty(n - 1, top_n, dtype=torch.float32)
        top_ids = torch.empty(n - 1, top_n, dtype=torch.long)
        for start in range(0, n - 1, LOGIT_ROWS):
            end = min(start + LOGIT_ROWS, n - 1)
            logprobs = self.model.compute_logits(hidden[start:end]).float().log_softmax(dim=-1)
            targets = tokens[start + 1 : end + 1]
            out[start:end] = logprobs.gather(1, targets[:, None])[:, 0].cpu()
            if top_n:
                values, indices = logprobs.topk(top_n, dim=-1)
                top_values[start:end], top_ids[start:end] = values.cpu(), indices.cpu()
        return out, top_values, top_ids

    @staticmethod
    def workspace_bytes(num_tokens: int, kv_bytes_per_token: int, vocab_size: int) -> int:
        """Bytes beyond the engine's workspace one scoring pass holds: its scratch KV cache and one chunk
        of float32 logits with their log-softmax."""
        return num_tokens * kv_bytes_per_token + 2 * LOGIT_ROWS * vocab_size * 4


def perplexity(scorer: SequenceScorer, ids: list[int], stride: int, progress=None) -> PerplexityResult:
    """Sliding-window perplexity of `ids` (HF method: each token scored once, by the first window that
    reaches it)."""
    context = scorer.context
    if stride < 1 or stride > context:
        raise ValueError(f"--stride must be between 1 and --context ({context}); got {stride}")
    if len(ids) < 2:
        raise ValueError("the text has fewer than two tokens")
    nll, scored, windows, prev_end = 0.0, 0, 0, 0
    for begin in range(0, len(ids) - 1, stride):
        end = min(begin + context, len(ids))
        new = end - max(prev_end, begin + 1)  # tokens of this window not yet scored (never the first)
        if new > 0:
            logprobs = scorer.token_logprobs(ids[begin:end])
            nll -= float(logprobs[-new:].double().sum())
            scored += new
            windows += 1
        prev_end = end
        if progress is not None:
            progress(end, len(ids))
        if end == len(ids):
            break
    return PerplexityResult(math.exp(nll / scored), nll, scored, len(ids), windows, context, stride)


def read_text(path: Path) -> str:
    return gutenberg_body(Path(path).read_text(encoding="utf-8"))
