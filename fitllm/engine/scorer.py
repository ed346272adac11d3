"""Log-likelihoods of each next token of a sequence, through the engine's own model: one causal prefill over
a scratch KV cache. `fitllm eval perplexity` scores windows of a text with it, and the server's prompt
logprobs (`echo`) score a prompt with it. Logits are formed in chunks of rows, so the float32
vocabulary-sized buffer stays small.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from fitllm.config import ModelConfig
from fitllm.engine.parallel.messages import StepMessage
from fitllm.engine.runner import scratch_prefill
from fitllm.memory.kv.format import KVCacheFormat

if TYPE_CHECKING:
    from fitllm.engine.parallel.group import TensorParallelGroup

LOGIT_ROWS = 256  # rows of logits formed at once


class SequenceScorer:
    """Log-likelihoods of every next token of a sequence of up to `context` tokens, through the model."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        device: torch.device,
        context: int,
        kv_format: KVCacheFormat | None = None,
        tp: TensorParallelGroup | None = None,
    ) -> None:
        """`config`: as one rank's KV sees it (the engine's `kv_config`); `tp`: rank 0's group, whose
        workers run each scoring forward alongside."""
        self.tp = tp
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
        if self.tp is not None:
            self.tp.send(StepMessage("score", args={"ids": list(ids)}))
        with scratch_prefill(self.model, self.config, self.device, n, n, self.kv_format) as meta:
            hidden = self.model(tokens, torch.arange(n, device=self.device), meta)
        out = torch.empty(n - 1, dtype=torch.float32)
        top_values = torch.empty(n - 1, top_n, dtype=torch.float32)
        top_ids = torch.empty(n - 1, top_n, dtype=torch.long)
        for start, end in logit_chunks(n):
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


def logit_chunks(num_tokens: int) -> list[tuple[int, int]]:
    """The [start, end) rows of a scoring pass's hidden states whose logits are formed at once (a
    vocab-parallel worker forms its shard of the same chunks, for rank 0's gathers)."""
    return [
        (start, min(start + LOGIT_ROWS, num_tokens - 1)) for start in range(0, num_tokens - 1, LOGIT_ROWS)
    ]
