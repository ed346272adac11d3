"""Weight offload for the engine: where each decoder layer lives, and the streamer for those that move."""

from __future__ import annotations

import torch
from torch import nn

from fitllm.config import EngineConfig, ModelConfig, cdiv
from fitllm.memory.copy_engine import OffloadFile, PinnedHostStore, make_copy_engine
from fitllm.memory.layer_layout import LayerLayout
from fitllm.memory.ledger import MemoryLedger
from fitllm.memory.offload import Placement, kv_reserve_tokens, place_for_budget
from fitllm.memory.planner import weight_breakdown, workspace_bytes
from fitllm.memory.streamer import WeightStreamer
from fitllm.model.registry import build_on_meta
from fitllm.quant.base import QuantMethod

GIB = 1 << 30


def engine_placement(
    config: EngineConfig,
    model_config: ModelConfig,
    dtype: torch.dtype,
    quant: QuantMethod,
    budget: int,
    kv_bytes_per_token: int,
    max_model_len: int | str | None,
) -> Placement:
    """Layers stay resident unless the budget cannot hold them beside the workspace and one KV block, or
    --cpu-offload-gb asks; streamed layers then leave room for the KV that `kv_reserve_tokens` keeps
    (--max-model-len as given: a number, None or "auto")."""
    mc = model_config
    weights = weight_breakdown(mc, dtype, quant)
    workspace = workspace_bytes(
        mc, dtype, config.max_num_batched_tokens, config.max_num_seqs, weights.largest_quantized_linear
    )
    block = config.block_size
    block_bytes = kv_bytes_per_token * block
    reserve = block_bytes * cdiv(kv_reserve_tokens(max_model_len, mc.max_position_embeddings), block)
    non_layer = weights.total - mc.num_hidden_layers * weights.per_layer
    placement = place_for_budget(
        mc.num_hidden_layers,
        weights.per_layer,
        weights.layer_stream_bytes,
        budget - non_layer - workspace - block_bytes,
        reserve - block_bytes,
        config.offload_prefetch,
        int(config.cpu_offload_gb * GIB) or None,
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
