"""Context shift: reuse a cached sequence's K/V after a span was cut from it (KoboldCpp's ContextShift).

Rotary models only: a key rotated to position p can be moved to p - d by one more rotation by -d (two
rotations compose), so the kept run after a removed span needs no recompute. Absolute position embeddings
(XGLM) are added to the hidden state before the first layer, and a sliding window changes which keys a
query saw, so neither can shift.
"""

from __future__ import annotations

from fitllm.config import ModelConfig


def context_shift_unsupported(config: ModelConfig) -> str | None:
    """Why this model cannot shift its cache (None: it can)."""
    if config.model_type == "xglm":
        return "absolute position embeddings (XGLM) cannot be moved to new positions"
    if config.sliding_window is not None:
        return (
            f"sliding-window attention ({config.sliding_window} tokens) sees a different window after a shift"
        )
    return None
