"""Test-only stand-ins and hooks, kept out of fitllm/: what a test needs to see inside the engine, or a CPU
replacement for a GPU-only mechanism."""

from __future__ import annotations

from collections.abc import Callable

import torch


class ReplayCapturer:
    """CPU stand-in for tests: replay re-runs `fn` and copies its result into the captured output, so what a
    replay sees is exactly what a CUDA graph would: the static buffers, nothing passed at run time."""

    def __init__(self) -> None:
        self.captures = 0
        self.replays = 0

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        output = fn()
        self.captures += 1

        def replay() -> None:
            self.replays += 1
            output.copy_(fn())

        return replay, output

    def pool_bytes(self) -> int:
        return 0
