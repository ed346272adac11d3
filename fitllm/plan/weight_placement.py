"""The engine's weight placement: where each decoder layer lives (the planner's rule with the engine's
workspace), and how one layer is packed for streaming; the streaming itself is memory/offload/streamer.py's."""

from __future__ import annotations

import torch

from fitllm.config import EngineConfig, ModelConfig
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.memory.offload.placement import Placement, place_decoder_layers
from fitllm.model.registry import build_on_meta
from fitllm.plan.planner import workspace_bytes
from fitllm.plan.weights import weight_breakdown
from fitllm.quant.base import QuantMethod


def engine_placement(
    config: EngineConfig,
    model_config: ModelConfig,
    dtype: torch.dtype,
    quant: QuantMethod,
    budget: int,
    kv_bytes_per_token: int,
) -> Placement:
    """Where the engine's decoder layers live: `place_decoder_layers` (the rule `fitllm plan` uses)
    with the engine's planned workspace; bitsandbytes weights cannot be streamed."""
    mc = model_config
    weights = weight_breakdown(mc, dtype, quant)
    workspace = workspace_bytes(
        mc, dtype, config.max_num_batched_tokens, config.max_num_seqs, weights.largest_quantized_linear
    )
    placement = place_decoder_layers(
        mc,
        weights,
        workspace,
        kv_bytes_per_token,
        budget,
        config.max_model_len,
        config.block_size,
        config.offload_prefetch,
        config.cpu_offload_gb,
    )
    if placement.offloaded and quant.name.startswith("bnb"):
        raise ValueError(
            f"--quantization {quant.name} keeps bitsandbytes state tied to resident weights and cannot be "
            f"offloaded; use --quantization int8 or int4, or raise --memory-budget"
        )
    return placement


def layer_layout(model_config: ModelConfig, dtype: torch.dtype, quant: QuantMethod) -> LayerLayout:
    """How one decoder layer of this model is packed for streaming (read off a meta-built model)."""
    return LayerLayout.of(build_on_meta(model_config, dtype, quant).layers[0])
