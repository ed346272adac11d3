"""Offload placement: which decoder layers stay resident and which are streamed in before each use.

Given the bytes one decoder layer takes as stored and the bytes the budget leaves for decoder layers, keep
as many layers resident as fit next to the staging buffers the streamed ones need (`prefetch` layers in
flight), and spread the streamed ones evenly through the stack, so every copy has resident layers' compute
to hide behind instead of a run of streamed layers stalling back to back. The streaming itself is
fitllm/memory/offload/streamer.py's.

The cost model is the one a pipeline of copies and compute has: a step takes the longer of all compute
and all copies, plus one copy to fill the pipeline; one pass over the layers serves the whole batch, so
tokens/s grows with batch size until compute dominates.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol

from fitllm.config import ModelConfig, cdiv
from fitllm.units import format_bytes


@dataclass(slots=True, frozen=True)
class Placement:
    """Decoder layers by where they live; the bytes each side holds."""

    num_layers: int
    layer_bytes: int  # one decoder layer as stored (quantized layers stream their quantized bytes)
    offloaded: tuple[int, ...]  # layer indices streamed in before each use, ascending
    prefetch: int  # streamed layers in flight at once (staging buffers)

    @property
    def resident_layers(self) -> int:
        return self.num_layers - len(self.offloaded)

    @property
    def resident_bytes(self) -> int:
        return self.resident_layers * self.layer_bytes

    @property
    def offloaded_bytes(self) -> int:
        return len(self.offloaded) * self.layer_bytes

    @property
    def staging_bytes(self) -> int:
        """Device bytes of the staging buffers: one per layer in flight, reused as soon as it has run."""
        return min(self.prefetch, len(self.offloaded)) * self.layer_bytes

    @property
    def device_bytes(self) -> int:
        return self.resident_bytes + self.staging_bytes


def spread_evenly(num_layers: int, count: int) -> tuple[int, ...]:
    """`count` distinct layer indices in [0, num_layers), as evenly spaced as possible (the centres of
    `count` equal slices of the stack)."""
    if not 0 <= count <= num_layers:
        raise ValueError(f"cannot pick {count} of {num_layers} layers")
    return tuple(int((i + 0.5) * num_layers / count) for i in range(count))


def place_layers(
    num_layers: int,
    layer_bytes: int,
    room: int,
    prefetch: int = 1,
    force_offload_bytes: int | None = None,
) -> Placement:
    """Where each decoder layer lives when `room` bytes of the budget are left for decoder layers.

    Automatic: everything resident if it fits; otherwise the most resident layers that fit beside
    `prefetch` staging buffers. `force_offload_bytes` (--cpu-offload-gb) offloads at least that many
    bytes' worth of whole layers even when everything would fit."""
    if num_layers < 1 or layer_bytes < 1:
        raise ValueError("a model with decoder layers of some size is needed")
    if prefetch < 1:
        raise ValueError(f"--offload-prefetch must be at least 1; got {prefetch}")
    forced = 0 if not force_offload_bytes else min(num_layers, math.ceil(force_offload_bytes / layer_bytes))
    if forced == 0 and num_layers * layer_bytes <= room:
        return Placement(num_layers, layer_bytes, (), prefetch)
    # r resident layers need r + min(prefetch, num_layers - r) layer slots.
    resident = next(
        (
            r
            for r in range(num_layers - max(forced, 1), -1, -1)
            if (r + min(prefetch, num_layers - r)) * layer_bytes <= room
        ),
        None,
    )
    if resident is None:
        need = min(prefetch, num_layers) * layer_bytes
        raise ValueError(
            f"the budget leaves {format_bytes(room)} for decoder layers, not even the {format_bytes(need)} of "
            f"staging for {min(prefetch, num_layers)} streamed layer(s) of {format_bytes(layer_bytes)}; raise "
            f"--memory-budget, lower --max-model-len or --max-num-batched-tokens, quantize "
            f"(--quantization int8/int4), or lower --offload-prefetch"
        )
    return Placement(num_layers, layer_bytes, spread_evenly(num_layers, num_layers - resident), prefetch)


# Automatic offload is for weights that do not fit beside the workspace and one KV block; when it
# streams, it keeps room for this many tokens of KV (or --max-model-len, or the model's context, if
# shorter) and gives the rest of the budget to layers. Longer contexts are the elastic KV pool's
# business; `fitllm plan` says what offload would buy them. With --max-model-len auto, a short prompt.
KV_RESERVE_TOKENS = 4096
AUTO_KV_RESERVE_TOKENS = 256


def kv_reserve_tokens(max_model_len: int | str | None, max_position: int) -> int:
    """Tokens of KV an automatic placement keeps room for."""
    if max_model_len == "auto":
        return min(max_position, AUTO_KV_RESERVE_TOKENS)
    length = max_model_len if isinstance(max_model_len, int) else max_position
    return min(length, KV_RESERVE_TOKENS)


class WeightSizes(Protocol):
    """What placement needs to know of a model's weights (the plan's `WeightBreakdown`)."""

    per_layer: int  # one decoder layer's parameters as held resident
    layer_stream_bytes: int  # one decoder layer packed for streaming (aligned)

    @property
    def total(self) -> int:
        """Every parameter's bytes."""


def place_decoder_layers(
    config: ModelConfig,
    weights: WeightSizes,
    fixed: int,
    kv_bytes_per_token: int,
    budget: int,
    max_model_len: int | str | None,
    block_size: int,
    prefetch: int,
    cpu_offload_gb: float,
) -> Placement:
    """The one placement rule, used by the engine (fitllm/plan/weight_placement.py) and by the plan.

    All layers stay resident when they fit beside the rest of the weights, `fixed` bytes (workspace,
    and the plan's overhead) and one KV block, and --cpu-offload-gb asks for nothing: offload is for
    weights that do not fit, and a budget they do fit leaves whatever context it can (the elastic
    pool's business). Otherwise `place_layers` over the layers as streamed (their aligned packed size),
    keeping room for the KV that `kv_reserve_tokens` keeps (--max-model-len as given: a number, None or
    "auto"), so streaming buys a usable context and not just a started engine. Raises ValueError when
    not even streaming every layer fits."""
    layers = config.num_hidden_layers
    block_bytes = kv_bytes_per_token * block_size
    reserve = block_bytes * cdiv(kv_reserve_tokens(max_model_len, config.max_position_embeddings), block_size)
    room = budget - (weights.total - layers * weights.per_layer) - fixed - block_bytes
    forced = int(cpu_offload_gb * (1 << 30)) or None
    if not forced and layers * weights.per_layer <= room:
        return Placement(layers, weights.layer_stream_bytes, (), prefetch)
    if room <= 0:  # not even with every layer streamed: say what is too big before anything is allocated
        other = weights.total - layers * weights.per_layer
        raise ValueError(
            f"the weights outside the decoder layers (embedding, head, norms: {format_bytes(other)}), "
            f"{format_bytes(fixed)} of workspace and one KV block need {format_bytes(other + fixed + block_bytes)}, "
            f"more than the budget of {format_bytes(budget)} before any of the {layers} decoder layers "
            f"({format_bytes(weights.per_layer)} each); raise --memory-budget, quantize "
            f"(--quantization int8/int4) or lower --max-num-batched-tokens (see `fitllm plan`)"
        )
    return place_layers(layers, weights.layer_stream_bytes, room - (reserve - block_bytes), prefetch, forced)


def predicted_step_seconds(
    placement: Placement, bandwidth: float, compute_seconds_per_layer: float, overlap: bool = True
) -> float:
    """One forward pass over the layers.

    With `overlap` (a copy engine of its own: CUDA's DMA engines), the longer of compute and copies, plus
    one copy to fill the pipeline (nothing to hide the first streamed layer's copy behind). Without it
    (the CPU tier when compute already uses every core, as on the 2-core machine measured in
    docs/benchmarks.md), copies and compute take turns, so their times add."""
    if bandwidth <= 0:
        raise ValueError("transfer bandwidth must be positive")
    compute = placement.num_layers * compute_seconds_per_layer
    if not placement.offloaded:
        return compute
    copy_one = placement.layer_bytes / bandwidth
    copies = copy_one * len(placement.offloaded)
    return max(compute, copies) + copy_one if overlap else compute + copies


def predicted_tokens_per_s(
    placement: Placement,
    bandwidth: float,
    compute_seconds_per_layer: float,
    batch: int = 1,
    overlap: bool = True,
) -> float:
    """Decode tokens/s at `batch` requests: one pass over the layers serves the whole batch
    (`compute_seconds_per_layer` is the per-layer compute of a step at that batch size)."""
    return batch / predicted_step_seconds(placement, bandwidth, compute_seconds_per_layer, overlap)


@dataclass(slots=True, frozen=True)
class OffloadEstimate:
    """Measured bandwidths (fitllm/memory/offload/bandwidth.py) that turn a placement into predicted tokens/s.

    Decode compute is taken as bandwidth-bound: a layer's step costs its bytes at the device's memory
    bandwidth, whatever the batch (one pass over the weights serves every request in it). `fitllm bench
    offload` replaces that with the measured compute of a fully resident step."""

    transfer: float  # bytes/s from where offloaded layers are kept into staging
    memory: float  # bytes/s the device reads its own memory at
    tier: str  # "file" (CPU) or "pinned host" (CUDA)
    basis: str = "measured"  # or "assumed (...)": a plan for a device this machine does not have

    @property
    def overlap(self) -> bool:
        """Whether copies run beside compute: CUDA's copy engines do; the CPU tier's reads take cores
        that compute uses (measured: its times add, docs/benchmarks.md)."""
        return self.tier != "file"

    def compute_seconds_per_layer(self, placement: Placement) -> float:
        return placement.layer_bytes / self.memory

    def tokens_per_s(self, placement: Placement, batch: int) -> float:
        return predicted_tokens_per_s(
            placement, self.transfer, self.compute_seconds_per_layer(placement), batch, self.overlap
        )

    def resident_tokens_per_s(self, placement: Placement, batch: int) -> float:
        return batch / (placement.num_layers * self.compute_seconds_per_layer(placement))

    def describe(self) -> str:
        return (
            f"{self.tier} -> device {self.basis} at {self.transfer / 1e9:.1f} GB/s, device memory at "
            f"{self.memory / 1e9:.1f} GB/s; weights-bandwidth-bound estimate, copies "
            f"{'overlapped with' if self.overlap else 'added to'} compute"
        )
