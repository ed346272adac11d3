"""One memory plan from the engine's own config: what `fitllm plan` prints, `bench fullsize` predicts and the
engine's start-up walks against its ledger, in the start-up's order.

placement -> resident weights -> staging -> workspace -> graph pool -> KV pool, with `--max-model-len`
resolved once (None: the model's context, as `serve`; auto: the largest that fits, one search). The engine
(fitllm/engine/startup.py) ledgers each figure as it allocates it and replaces the planned workspace and
graph pool with the measured ones (the profile step, the capture).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fitllm.config import EngineConfig, ModelConfig, cdiv, resolve_dtype
from fitllm.distributed import check_tp_shape, planning_as, rank_kv_config
from fitllm.memory.kv.format import kv_bytes_per_token
from fitllm.memory.kv.setup import kv_cache_retention, kv_pool_shape
from fitllm.memory.offload.placement import (
    OffloadEstimate,
    Placement,
    kv_reserve_tokens,
    place_decoder_layers,
)
from fitllm.model.attention import resolve_attention_backend
from fitllm.plan.planner import (
    DEFAULT_OVERHEAD,
    Plan,
    graph_pool_bytes,
    largest_context_that_fits,
    offload_suggestion,
    suggestions,
    workspace_bytes,
)
from fitllm.plan.weights import WeightBreakdown, weight_breakdown
from fitllm.quant import get_quant_method, graph_safe
from fitllm.quant.base import QuantMethod
from fitllm.units import format_bytes

log = logging.getLogger("fitllm")

# Without --max-model-len, a model whose own context could never be served by the budget runs at the
# longest that fits up to this (the longest context of the common families): a context_length the file
# lies about must not size the start-up profile step of a small model by the whole budget.
FALLBACK_CONTEXT_CAP = 1 << 17


def eager_reason(
    attention_backend: str,
    device: torch.device,
    enforce_eager: bool,
    streamed: bool,
    quantization: str | None,
) -> str | None:
    """Why decode must run eagerly, or None when its steps can be captured as CUDA graphs. The engine and
    `fitllm plan` both ask this, so the plan holds the graph pool exactly when the engine will capture."""
    if device.type != "cuda":
        return "not on CUDA"
    if enforce_eager:
        return "--enforce-eager"
    if attention_backend != "triton":
        return f"the {attention_backend} attention backend (graphs need --attention-backend triton)"
    if streamed:
        return "layers are streamed (offload waits on host events between kernels)"
    if not graph_safe(quantization):
        return f"--quantization {quantization} syncs with the host in its matmul"
    return None


@dataclass(slots=True)
class MemoryPlan:
    """The start-up memory sequence of one engine configuration, as figures (no weights read)."""

    config: EngineConfig
    model_config: ModelConfig
    dtype: torch.dtype
    quant: QuantMethod
    budget: int
    weights: WeightBreakdown
    kv_bytes_per_token: int
    reference_attention: bool  # the torch backend, whose workspace grows with the context
    cuda_graphs: bool  # decode is captured unless layers are streamed (`eager_reason` with streamed=False)
    overhead: int = 0  # framework overhead `fitllm plan` sets aside; the engine ledgers none
    device: torch.device | None = None

    @classmethod
    def for_engine(
        cls,
        config: EngineConfig,
        model_config: ModelConfig,
        device: torch.device,
        budget: int | None = None,
        group_size: int | None = None,
        quant: QuantMethod | None = None,
        overhead: int = 0,
    ) -> MemoryPlan:
        """The plan of `Engine(config)` on `device`: dtype, attention backend and CUDA graphs decided as the
        engine decides them. `budget` None: --memory-budget resolved on `device`; `quant` None: built from
        --quantization with `group_size` (the checkpoint's default for int4 when not given)."""
        from fitllm.memory.budget import resolve_budget

        dtype = resolve_dtype(config.dtype, device)
        backend = resolve_attention_backend(config.attention_backend, device)
        if quant is None:
            quant = get_quant_method(
                config.quantization,
                group_size or config.quant_group_size,
                config=model_config,
                lm_head_dtype=config.lm_head_dtype,
            )
        reason = eager_reason(backend, device, config.enforce_eager, False, config.quantization)
        tp = config.tensor_parallel_size
        check_tp_shape(model_config, tp)
        # With tensor parallelism every figure is one rank's (each GPU's): its shard of the weights, its
        # KV heads; rank 0's, which also holds the sampler's logits, is the largest, so the one planned.
        with planning_as(tp):
            weights = weight_breakdown(model_config, dtype, quant, device.type)
        return cls(
            config,
            model_config,
            dtype,
            quant,
            resolve_budget(config.memory_budget, device) if budget is None else budget,
            weights,
            kv_bytes_per_token(rank_kv_config(model_config, tp), dtype, config.kv_cache_dtype),
            reference_attention=backend == "torch",
            cuda_graphs=reason is None and tp == 1,
            overhead=overhead,
            device=device,
        )

    # --- the context ---------------------------------------------------------------------------------

    def initial_length(self, strict: bool = True, warn: bool = True) -> tuple[int, bool]:
        """(the context to build for, whether --max-model-len auto picks it once the weights are in).

        A context whose KV for one request is more than the whole budget could never be served, and
        rotary tables, workspace and the profile step would still be sized by it: a context_length of
        2^32 - 1 would allocate 16 GiB of rotary table at load. The model's own such context (a file that
        lies, or a budget far below it) falls back to auto with a warning; one asked for is refused
        (`strict`; `fitllm plan` reports it as not fitting instead). `warn`: log the fallback."""
        asked, mc, budget = self.config.max_model_len, self.model_config, self.budget
        ceiling = max(2, budget // self.kv_bytes_per_token)  # tokens of KV the whole budget holds
        if asked == "auto":
            return min(mc.max_position_embeddings, ceiling), True
        if asked is None:
            if mc.max_position_embeddings <= ceiling:
                return mc.max_position_embeddings, False
            if warn:
                log.warning(
                    "the model's context (%d tokens) needs %s of KV for one request, more than --memory-budget "
                    "%s holds; using the longest context that fits, at most %d tokens (--max-model-len auto); "
                    "pass --max-model-len to choose",
                    mc.max_position_embeddings,
                    format_bytes(mc.max_position_embeddings * self.kv_bytes_per_token),
                    format_bytes(budget),
                    min(ceiling, FALLBACK_CONTEXT_CAP),
                )
            return min(ceiling, FALLBACK_CONTEXT_CAP), True
        if strict and asked > ceiling:
            raise ValueError(
                f"--max-model-len {asked} needs {format_bytes(asked * self.kv_bytes_per_token)} of KV for one "
                f"request, more than --memory-budget {format_bytes(budget)}; lower --max-model-len (at most "
                f"{ceiling} before weights), use --max-model-len auto, or raise --memory-budget"
            )
        return asked, False

    # --- the figures, in start-up order -----------------------------------------------------------------

    def placement(self) -> Placement:
        """Where the decoder layers live: `place_decoder_layers` (the one rule) with the workspace of the
        context placement keeps room for; bitsandbytes weights cannot be streamed."""
        length, auto = self.initial_length(strict=False, warn=False)
        placement = place_decoder_layers(
            self.model_config,
            self.weights,
            # Under auto, placement keeps room for a short context (kv_reserve_tokens), so its workspace.
            self.workspace_at(
                kv_reserve_tokens("auto", self.model_config.max_position_embeddings) if auto else length
            )
            + self.overhead,
            self.kv_bytes_per_token,
            self.budget,
            "auto" if auto else length,
            self.config.block_size,
            self.config.offload_prefetch,
            self.config.cpu_offload_gb,
        )
        if placement.offloaded and self.quant.name.startswith("bnb"):
            raise ValueError(
                f"--quantization {self.quant.name} keeps bitsandbytes state tied to resident weights and "
                f"cannot be offloaded; use --quantization int8 or int4, or raise --memory-budget"
            )
        return placement

    def resident_weight_bytes(self, placement: Placement | None) -> int:
        """Weights held on the device: all but the streamed decoder layers."""
        streamed = len(placement.offloaded) if placement is not None else 0
        return self.weights.total - streamed * self.weights.per_layer

    def workspace_at(self, length: int, sampling: bool = True) -> int:
        """The planned workspace at a context of `length` (only the torch reference backend's grows with
        it; the Triton kernels' is length-free). `sampling` False: without the logits and sampler's peak
        (a layer split's stages after the first)."""
        c = self.config
        return workspace_bytes(
            self.model_config,
            self.dtype,
            c.max_num_batched_tokens,
            c.max_num_seqs,
            self.weights.largest_quantized_linear,
            length if self.reference_attention else None,
            c.max_sampled_rows,
            sampling,
        )

    def graphs(self, streamed: bool) -> bool:
        """Whether decode is captured as CUDA graphs (never while layers are streamed)."""
        return self.cuda_graphs and not streamed

    def graph_pool_at(self, length: int, streamed: bool) -> int:
        """The decode CUDA graphs' planned pool at a context of `length` (0: decode runs eagerly)."""
        return self.graph_pool_bytes(length) if self.graphs(streamed) else 0

    def graph_pool_bytes(self, length: int) -> int:
        """The planned pool of decode graphs captured for a context of `length` (`graph_pool_bytes`)."""
        c = self.config
        return graph_pool_bytes(self.model_config, self.dtype, c.max_num_seqs, length, c.block_size)

    def room_at(self, free: int, length: int, streamed: bool) -> int:
        """What `free` bytes (after weights and staging) leave for KV at a context of `length`."""
        return free - self.workspace_at(length) - self.graph_pool_at(length, streamed) - self.overhead

    def auto_length(self, free: int, cap: int, streamed: bool) -> int:
        """--max-model-len auto: the longest context, at most `cap`, whose KV fits in `free` beside a
        workspace and graph pool sized for that context (0 when not one block fits)."""
        return largest_context_that_fits(
            lambda length: self.room_at(free, length, streamed),
            self.kv_bytes_per_token,
            self.config.block_size,
            cap,
        )

    def kv_pool_at(self, length: int, free: int, device: torch.device | None = None) -> tuple[int, int]:
        """(blocks per slab, slabs at most) of the KV pool over `free` bytes: elastic, or one slab with
        --static-kv / --kv-cache-memory (memory/kv/setup.py's `kv_pool_shape`, which the engine uses)."""
        return kv_pool_shape(
            self.config,
            self.kv_bytes_per_token * self.config.block_size,
            length,
            free,
            device if device is not None else self.device or torch.device("cpu"),
        )

    # --- the report `fitllm plan` prints --------------------------------------------------------------

    def report(self, model_name: str, estimate: OffloadEstimate | None = None) -> Plan:
        """Does one full-length request fit, how many fit, what to change if not. `estimate` (measured
        bandwidths) turns an offloaded placement into predicted tokens/s."""
        config, mc, weights, per_token = self.config, self.model_config, self.weights, self.kv_bytes_per_token
        block_size = config.block_size
        cap, auto = self.initial_length(strict=False)
        try:
            placement: Placement | None = self.placement()
        except ValueError:  # not even with every layer streamed: the suggestions say what would
            placement = None
        resident = self.resident_weight_bytes(placement)
        staging = placement.staging_bytes if placement else 0
        streamed = placement is None or bool(placement.offloaded)
        free = self.budget - resident - staging
        # The longest context whose KV fits beside a workspace and graph pool sized for that context.
        max_ctx = self.auto_length(free, mc.max_position_embeddings, streamed)
        length = min(max_ctx, cap) if auto else cap
        room = self.room_at(free, length, streamed)
        # KV is allocated in whole blocks.
        capacity = max(0, room // (per_token * block_size)) * block_size
        if config.static_kv or config.kv_cache_memory is not None:  # one slab, allocated up front
            slab_blocks, _ = self.kv_pool_at(length, max(room, 0))
            slab_tokens = slab_blocks * block_size
            capacity = slab_tokens if slab_tokens * per_token <= room else 0
        per_request = per_token * cdiv(max(length, 1), block_size) * block_size
        fits = room > 0 and capacity >= length and length >= 2
        dtype = str(self.dtype).removeprefix("torch.")
        quant = self.quant
        plan = Plan(
            model=model_name,
            dtype=dtype + ("" if quant.name == "none" else f", {quant.describe()} weights"),
            kv_dtype=dtype if config.kv_cache_dtype == "auto" else config.kv_cache_dtype,
            budget=self.budget,
            weights=weights,
            kv_bytes_per_token=per_token,
            max_model_len=length,
            kv_bytes_per_request=per_request,
            workspace=self.workspace_at(length),
            overhead=self.overhead,
            kv_capacity_tokens=capacity,
            fits=fits,
            max_context_that_fits=max_ctx,
            max_full_length_requests=capacity // max(1, cdiv(length, block_size) * block_size),
            placement=placement,
            resident_weight_bytes=resident,
            offload_estimate=estimate if placement is not None and placement.offloaded else None,
            graph_pool=self.graph_pool_at(length, streamed),
            kv_cache_retention=kv_cache_retention(config, per_token, length, room),
            kv_host_cache=config.kv_host_cache,
            tensor_parallel_size=config.tensor_parallel_size,
        )
        if not fits:
            device_type = self.device.type if self.device is not None else "cpu"
            plan.suggestions = suggestions(
                plan, mc, self.dtype, room, quant.name, config.kv_cache_dtype, device_type
            )
            layers = mc.num_hidden_layers
            if placement is not None and layers * weights.per_layer > 0:
                plan.suggestions += offload_suggestion(
                    plan, layers, weights, room, length, config.offload_prefetch
                )
        return plan


def make_plan(
    config: ModelConfig,
    model_name: str,
    dtype: torch.dtype,
    budget: int,
    max_model_len: int | None,
    block_size: int = 16,
    max_num_batched_tokens: int = 2048,
    max_num_seqs: int = 64,
    kv_cache_dtype: str = "auto",
    overhead: int = DEFAULT_OVERHEAD,
    quantization: str | None = None,
    quant_group_size: int | None = None,
    cpu_offload_gb: float = 0.0,
    offload_prefetch: int = 2,
    estimate: OffloadEstimate | None = None,
    cuda_graphs: bool = False,
    reference_attention: bool = False,
    lm_head_dtype: str = "auto",
) -> Plan:
    """`MemoryPlan.report` from loose figures, for callers without an EngineConfig (max_model_len None:
    'auto', the largest context that fits). `cuda_graphs`: decode will be captured (CUDA, Triton attention,
    no --enforce-eager), which holds `graph_pool_bytes` unless layers are streamed."""
    engine_config = EngineConfig(
        max_model_len="auto" if max_model_len is None else max_model_len,
        block_size=block_size,
        max_num_batched_tokens=max_num_batched_tokens,
        max_num_seqs=max_num_seqs,
        kv_cache_dtype=kv_cache_dtype,
        quantization=quantization,
        quant_group_size=quant_group_size,
        lm_head_dtype=lm_head_dtype,
        cpu_offload_gb=cpu_offload_gb,
        offload_prefetch=offload_prefetch,
    )
    quant = get_quant_method(quantization, quant_group_size, config=config, lm_head_dtype=lm_head_dtype)
    plan = MemoryPlan(
        engine_config,
        config,
        dtype,
        quant,
        budget,
        weight_breakdown(config, dtype, quant),
        kv_bytes_per_token(config, dtype, kv_cache_dtype),
        reference_attention=reference_attention,
        cuda_graphs=cuda_graphs,
        overhead=overhead,
    )
    return plan.report(model_name, estimate)
