"""Weight quantization: how a linear layer stores and multiplies its weight (`--quantization`).

A `QuantMethod` decides three things for every decoder linear (q/k/v, o, gate/up, down; the embedding and
LM head stay in the model dtype): which parameters the layer holds (so building the model on the meta
device gives the planner exact bytes), how a checkpoint tensor's rows are quantized as they arrive (so
loading never holds more than one tensor in float on top of the final weights), and the matmul.
"""

from __future__ import annotations

from fitllm.quant.base import QuantMethod, UnquantizedMethod
from fitllm.quant.int4 import Int4Method
from fitllm.quant.int8 import Int8Method

QUANTIZATIONS = ("none", "int8", "int4")
DEFAULT_INT4_GROUP_SIZE = 64


def get_quant_method(name: str | None, group_size: int | None = None) -> QuantMethod:
    """The method for `--quantization NAME` (None or 'none': the model dtype)."""
    if name in (None, "none"):
        return UnquantizedMethod()
    if name == "int8":
        return Int8Method()
    if name == "int4":
        return Int4Method(group_size or DEFAULT_INT4_GROUP_SIZE)
    raise ValueError(f"--quantization must be one of {', '.join(QUANTIZATIONS)}; got {name!r}")


__all__ = ["QUANTIZATIONS", "QuantMethod", "UnquantizedMethod", "get_quant_method"]
