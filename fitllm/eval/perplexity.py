"""Sliding-window perplexity of a text file (`fitllm eval perplexity`), the measure quantization is judged by.

The text is tokenized once. Windows of `context` tokens start every `stride` tokens; each window is one
causal prefill through the engine's own model and attention (K/V written to a scratch cache of the window's
slots), and only the tokens not scored by an earlier window count: with stride < context every token after
the first is scored exactly once, with at least `context - stride` tokens of history (the method of the
Hugging Face perplexity guide). Scoring is `SequenceScorer`'s (fitllm/engine/scorer.py), which the server's
prompt logprobs share.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

from fitllm.engine.scorer import SequenceScorer


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
