"""Prompt-lookup speculative decoding (`--speculative-ngram`): n-gram proposals (ngram.py), and their
verification in one step, exact for greedy and sampled requests alike (verify.py)."""

from fitllm.engine.speculation.ngram import NgramIndex, Speculator
from fitllm.engine.speculation.verify import (
    DraftCheck,
    DraftRow,
    accepted_tokens,
    sampling_rows,
    settle_stream,
    speculation_refusal,
)

__all__ = [
    "DraftCheck",
    "DraftRow",
    "NgramIndex",
    "Speculator",
    "accepted_tokens",
    "sampling_rows",
    "settle_stream",
    "speculation_refusal",
]
