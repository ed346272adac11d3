"""Weight bytes from the config alone: the model class built on the meta device with the quantization the
loader would use, so the figures are exact for every registered architecture and equal what the loader
later allocates."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from fitllm.config import ModelConfig
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.model.linear import LinearBase, QKVParallelLinear, RowParallelLinear
from fitllm.model.registry import build_on_meta
from fitllm.quant.base import QuantMethod


@dataclass(slots=True)
class WeightBreakdown:
    """Resident weight bytes per component."""

    embedding: int = 0
    attention: int = 0
    mlp: int = 0
    norms: int = 0
    lm_head: int = 0  # 0 when tied: the embedding's table is the head (stored as the head is)
    lm_head_dtype: str = ""  # how the head is stored (--lm-head-dtype): "int8", or the model dtype's name
    per_layer: int = 0
    largest_quantized_linear: int = (
        0  # elements of the shared scratch (int8; int4 on CPU): the largest linear
    )
    layer_stream_bytes: int = (
        0  # one decoder layer packed for streaming (aligned; fitllm/memory/offload/layer_layout.py)
    )

    @property
    def total(self) -> int:
        return self.embedding + self.attention + self.mlp + self.norms + self.lm_head


def weight_breakdown(
    config: ModelConfig, dtype: torch.dtype, quant: QuantMethod | None = None, device_type: str = "cpu"
) -> WeightBreakdown:
    """Exact parameter bytes by component, from the model class built on the meta device with the same
    quantization the loader would use (so quantized weights and their scales are counted as stored).
    Decoder layers are all alike, so one is built and counted num_hidden_layers times: the count costs
    nothing whatever a config claims. `device_type`: where the model runs (whether its quantized linears
    multiply through the shared scratch depends on it: int4's only on CPU)."""
    layers = config.num_hidden_layers
    model = build_on_meta(replace(config, num_hidden_layers=1), dtype, quant)
    head = quant.head if quant is not None else None
    out = WeightBreakdown(
        lm_head_dtype=head.name if head is not None else str(dtype).removeprefix("torch."),
        largest_quantized_linear=scratch_elements(model, device_type),
        layer_stream_bytes=LayerLayout.of(model.layers[0]).nbytes,
    )
    attention = {f"layers.0.{name}" for name in attention_parameters(model.layers[0])}
    for name, p in model.named_parameters():
        nbytes = p.numel() * p.element_size()
        if name.startswith("layers.0."):
            out.per_layer += nbytes
            nbytes *= layers
        if "embed_tokens" in name:
            out.embedding += nbytes
        elif name.startswith("lm_head"):
            out.lm_head += nbytes
        elif "norm" in name:
            out.norms += nbytes
        elif name in attention:
            out.attention += nbytes
        else:
            out.mlp += nbytes
    return out


def attention_parameters(layer: nn.Module) -> set[str]:
    """Names (within `layer`) of a decoder layer's attention parameters: its QKV projection and the
    row-parallel linear that takes the attention's output back to the residual, i.e. the first one
    registered after the QKV projection. By module type and order, not by name, so it holds whether the
    projections sit in an attention submodule (Llama's `self_attn.o_proj`) or on the layer (XGLM's
    `out_proj`)."""
    names: set[str] = set()
    in_attention = False
    for prefix, module in layer.named_modules():
        if isinstance(module, QKVParallelLinear):
            in_attention = True
        if in_attention and isinstance(module, LinearBase):
            names |= {f"{prefix}.{n}" for n, _ in module.named_parameters(recurse=False)}
            if isinstance(module, RowParallelLinear):
                break
    return names


def scratch_elements(model: nn.Module, device_type: str = "cpu") -> int:
    """Elements of the shared model-dtype scratch the model's quantized linears multiply through on a
    `device_type` device (the largest such weight; 0 when no method uses one). Works on a meta-built or a
    loaded model."""
    return max(
        (m.quant.scratch_elements(m, device_type) for m in model.modules() if isinstance(m, LinearBase)),
        default=0,
    )
