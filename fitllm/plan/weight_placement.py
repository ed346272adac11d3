"""Weight offload for the engine: where each decoder layer lives, and the streamer for those that move."""

from __future__ import annotations

import torch
from torch import nn

from fitllm.config import EngineConfig, ModelConfig
from fitllm.memory.ledger import MemoryLedger
from fitllm.memory.offload.copy_engine import OffloadFile, PinnedHostStore, make_copy_engine
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.memory.offload.placement import Placement
from fitllm.memory.offload.streamer import WeightStreamer
from fitllm.model.registry import build_on_meta
from fitllm.plan.planner import place_decoder_layers, weight_breakdown, workspace_bytes
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


def start_streamer(
    model: nn.Module,
    placement: Placement,
    sink: OffloadFile | PinnedHostStore,
    device: torch.device,
    ledger: MemoryLedger,
) -> WeightStreamer:
    """Streams the offloaded layers that `build_model` handed to `sink`."""
    sink.finish()
    layers = {i: model.layers[i] for i in placement.offloaded}
    return WeightStreamer(
        layers, sink.layout, make_copy_engine(sink, device), placement.prefetch, device, ledger
    )
