"""How one decoder layer is packed for streaming; where each layer lives is `MemoryPlan.placement`
(fitllm/plan/memory_plan.py), the streaming itself memory/offload/streamer.py's."""

from __future__ import annotations

import torch

from fitllm.config import ModelConfig
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.model.registry import build_on_meta
from fitllm.quant.base import QuantMethod


def layer_layout(model_config: ModelConfig, dtype: torch.dtype, quant: QuantMethod) -> LayerLayout:
    """How one decoder layer of this model is packed for streaming (read off a meta-built model)."""
    return LayerLayout.of(build_on_meta(model_config, dtype, quant).layers[0])
