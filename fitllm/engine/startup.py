"""The engine's start-up: its `MemoryPlan` walked against the ledger, in the plan's order.

placement -> resident weights (loaded) -> staging (the streamer) -> `--max-model-len auto` -> workspace
(the profile step's measured figure replaces the planned one) -> graph pool (planned here, the captured
figure replaces it after capture: fitllm/engine/cuda_graphs.py) -> KV pool (memory/kv/setup.py). Each
figure the ledger holds is the plan's, except the two measured ones.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from fitllm.engine.parallel.messages import LOAD_TIMEOUT_S, StepMessage
from fitllm.engine.runner import profile_workspace
from fitllm.loader import build_model
from fitllm.memory.host import trim_host_heap
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.setup import build_kv_pool
from fitllm.memory.ledger import BudgetExceeded
from fitllm.memory.offload.copy_engine import OffloadFile, PinnedHostStore, make_sink
from fitllm.memory.offload.streamer import start_streamer
from fitllm.plan.memory_plan import eager_reason
from fitllm.plan.weight_placement import layer_layout
from fitllm.units import format_bytes

if TYPE_CHECKING:
    from fitllm.engine.engine import Engine

log = logging.getLogger("fitllm")


def start_memory(engine: Engine, show_progress: bool) -> int | None:
    """Build the model and every memory region of `engine` from `engine.plan`, each in the ledger; returns
    the graph pool reserved for capture (None: decode runs eagerly)."""
    config, mc, plan = engine.config, engine.model_config, engine.plan
    # Under auto, chosen once the weights are in; the model is built without position tables until then.
    engine.max_model_len, auto_len = plan.initial_length()
    if engine.max_model_len > mc.max_position_embeddings and mc.rope_scaling is None:
        log.warning(
            "--max-model-len %d exceeds the model's trained context %d",
            engine.max_model_len,
            mc.max_position_embeddings,
        )
    engine.placement = plan.placement()
    if engine.tp is not None and engine.placement.offloaded:
        raise ValueError(
            f"one rank's shard does not fit --memory-budget {format_bytes(engine.ledger.budget)} without "
            f"streaming {len(engine.placement.offloaded)} layers, which tensor parallelism does not do; "
            f"raise the budget, quantize or add ranks (see `fitllm plan --tensor-parallel-size N`)"
        )
    sink = None
    if engine.placement.offloaded:
        sink = make_sink(
            layer_layout(mc, engine.dtype, engine.quant),
            len(engine.placement.offloaded),
            engine.device,
            config.offload_dir,
        )
        log.info(
            "offload: %d of %d decoder layers streamed (%s each), prefetch %d",
            len(engine.placement.offloaded),
            mc.num_hidden_layers,
            format_bytes(engine.placement.layer_bytes),
            engine.placement.prefetch,
        )
    engine.model = build_model(
        engine.source,
        engine.dtype,
        engine.device,
        1 if auto_len else engine.max_model_len,
        show_progress,
        engine.quant,
        frozenset(engine.placement.offloaded),
        sink,
    )
    engine.source.release()  # the weights are in; the file's mapped pages need not stay resident
    if engine.tp is not None:  # every rank's shard is in before the first collective's timeout runs
        engine.tp.barrier(LOAD_TIMEOUT_S)
    reserve_weights(engine, sink)
    if auto_len:
        engine.max_model_len = auto_length(engine)
        engine.model.prepare(engine.device, engine.dtype, engine.max_model_len)
    reserve_workspace(engine)
    trim_host_heap()  # loading's and the profile step's transients are gone; give their heap back
    engine.block_size = config.block_size
    graph_reserve = reserve_graph_pool(engine)
    engine.storage, engine.pool = build_kv_pool(
        config, engine.kv_config, engine.kv_format, engine.max_model_len, engine.device, engine.ledger
    )
    if engine.tp is not None:
        # Workers build the same pool; from here on rank 0's slab ops reach them with each step.
        pool_shape = {
            "block_size": engine.block_size,
            "slab_blocks": engine.storage.slab_slots // engine.block_size,
            "max_slabs": engine.storage.max_slabs,
            "decode_cap": engine.decode_gather_tokens,
        }
        engine.tp.send(StepMessage("kv_pool", args=pool_shape))
        engine.storage.journal = []
    engine.kv = KVCacheManager(engine.pool, engine.block_size)
    if auto_len:
        # What the pool can ever hold is in whole slabs, after the measured workspace (the length was
        # chosen with the planned one): the longest context one request can have is the lesser.
        engine.max_model_len = min(engine.max_model_len, engine.pool.capacity_blocks * engine.block_size)
        if engine.max_model_len < 2:
            raise ValueError(no_room_for_kv(engine))
        log.info("--max-model-len auto: %d tokens", engine.max_model_len)
    return graph_reserve


def reserve_weights(engine: Engine, sink: OffloadFile | PinnedHostStore | None) -> None:
    """Ledger the resident weights, then start streaming the offloaded ones (their staging buffers are
    ledgered too)."""
    # Offloaded layers' parameters are empty between uses, so this counts resident weights only.
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    try:
        engine.ledger.reserve("weights", weight_bytes)
        engine.streamer = (
            None
            if sink is None
            else start_streamer(engine.model, engine.placement, sink, engine.device, engine.ledger)
        )
    except BudgetExceeded as exc:
        raise ValueError(f"{exc}; raise --memory-budget or quantize (see `fitllm plan`)") from exc


def auto_length(engine: Engine) -> int:
    """--max-model-len auto, once the weights (and any staging) are in the ledger: the plan's search over
    what is free, with the planned workspace and graph pool sized at each candidate length, as `fitllm
    plan` sizes them (the plan also sets aside its overhead)."""
    length = engine.plan.auto_length(
        engine.ledger.free_bytes(), engine.max_model_len, engine.streamer is not None
    )
    if length < 2:
        raise ValueError(no_room_for_kv(engine))
    return length


def reserve_workspace(engine: Engine) -> None:
    """Ledger the workspace: the plan's, or the profile step's measured figure unless disabled."""
    config = engine.config
    engine.workspace_planned = engine.plan.workspace_at(engine.max_model_len)
    engine.workspace_measured = None
    # The reference backend gathers a decode group's K/V padded to its longest context; groups hold at
    # most this many context tokens (as a prefill step's), so the profile step can measure the largest.
    engine.decode_gather_tokens = max(config.max_num_batched_tokens, engine.max_model_len)
    if engine.tp is not None:  # the workers prepare and profile alongside (the forward's all-reduces meet)
        setup = {
            "max_model_len": engine.max_model_len,
            "planned": engine.workspace_planned,
            "profile": config.profile_workspace,
            "tokens": config.max_num_batched_tokens,
            "rows": min(config.max_num_seqs, config.max_num_batched_tokens),
            "decode_cap": engine.decode_gather_tokens,
        }
        engine.tp.send(StepMessage("setup", args=setup))
    if config.profile_workspace:
        # Measured before the KV pool is sized, so the pool gets what the real workspace leaves: a full
        # step of --max-num-batched-tokens, decodes and prefills at the full context.
        tokens = config.max_num_batched_tokens
        engine.workspace_measured = profile_workspace(
            engine.model,
            engine.kv_config,
            engine.device,
            tokens,
            config.max_sampled_rows,
            backend=engine.attention_backend,
            max_model_len=engine.max_model_len,
            decode_cap=engine.decode_gather_tokens,
        )
        log.info(
            "workspace: measured %s for a %d-token step (planned %s)",
            format_bytes(engine.workspace_measured),
            tokens,
            format_bytes(engine.workspace_planned),
        )
    measured = engine.workspace_measured
    try:
        engine.ledger.reserve("workspace", engine.workspace_planned if measured is None else measured)
    except BudgetExceeded as exc:
        raise ValueError(
            f"{exc}; raise --memory-budget or lower --max-num-batched-tokens (see `fitllm plan`)"
        ) from exc


def no_room_for_kv(engine: Engine) -> str:
    return (
        f"--max-model-len auto: no room for KV in --memory-budget {format_bytes(engine.ledger.budget)} "
        f"after weights and workspace; raise the budget (see `fitllm plan`)"
    )


def reserve_graph_pool(engine: Engine) -> int | None:
    """Reserve the decode CUDA graphs' planned bytes before the KV pool is sized (so --static-kv does not
    take them); None when decode runs eagerly (see `eager_reason`) or the budget has no room."""
    config, streamed = engine.config, engine.streamer is not None
    if engine.tp is not None:
        if engine.device.type == "cuda":
            log.info("CUDA graphs off: tensor parallel; decode runs eagerly")
        return None
    reason = eager_reason(
        engine.attention_backend, engine.device, config.enforce_eager, streamed, config.quantization
    )
    if reason is not None:
        if engine.device.type == "cuda":
            log.info("CUDA graphs off: %s; decode runs eagerly", reason)
        return None
    planned = engine.plan.graph_pool_bytes(engine.max_model_len)
    try:
        engine.ledger.reserve("workspace", planned)
    except BudgetExceeded:
        log.warning(
            "CUDA graphs need about %s that the budget does not have; decode runs eagerly",
            format_bytes(planned),
        )
        return None
    return planned
