"""Triton here: whether it is installed, and what every kernel is told about its dot products (attention and
the quantized matmuls)."""

from __future__ import annotations

import importlib.util
import os

import torch


def triton_available() -> bool:
    """Whether the triton package is installed (it is optional off CUDA); does not import it."""
    return importlib.util.find_spec("triton") is not None


def dot_flags(dtype: torch.dtype) -> dict[str, object]:
    """UPCAST and PRECISION constexprs for dots on `dtype` inputs.

    UPCAST: Triton's interpreter computes bfloat16 dots wrongly (numpy has no bfloat16), so under
    TRITON_INTERPRET=1 bfloat16 is multiplied in float32. PRECISION: float32 models get IEEE dots instead of
    Triton's default TF32 on NVIDIA GPUs."""
    return dict(
        UPCAST=dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1",
        PRECISION="ieee" if dtype == torch.float32 else "tf32",
    )
