"""The start-up of an engine whose decoder layers are split over devices (`--layer-split`).

The same order as one device's (fitllm/engine/startup.py), per stage: the planner's split
(fitllm/plan/layer_split.py) -> each stage's layers built on its device -> each stage's weights in its own
ledger -> workspace (stage 0's measured by the profile step, which runs the whole split forward; the other
stages' planned, without logits) -> one KV pool whose slabs every stage backs for its own layers.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from fitllm.config import EngineConfig
from fitllm.engine.stages import Stage, install_hops, stage_weight_bytes
from fitllm.engine.startup import reserve_workspace
from fitllm.loader import build_model
from fitllm.memory.budget import resolve_budget
from fitllm.memory.host import trim_host_heap
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.setup import KVStage, build_kv_pool
from fitllm.memory.ledger import BudgetExceeded, MemoryLedger
from fitllm.memory.offload.placement import Placement
from fitllm.plan.layer_split import plan_layer_split, split_devices, split_table
from fitllm.units import format_bytes

if TYPE_CHECKING:
    from fitllm.engine.engine import Engine

log = logging.getLogger("fitllm")


def split_budgets(engine_config: EngineConfig, device: torch.device) -> tuple[list[torch.device], list[int]]:
    """The `--layer-split` devices and their budgets in bytes (fractions resolved on each device)."""
    pairs = split_devices(engine_config, device)
    devices = [d for d, _ in pairs]
    for d in devices:
        if d.type == "cuda" and (d.index or 0) >= torch.cuda.device_count():
            raise ValueError(
                f"--layer-split names {d}, but this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    return devices, [resolve_budget(spec, d) for d, spec in pairs]


def start_split_memory(engine: Engine, show_progress: bool) -> None:
    """Build the model over `engine.stages`' devices and every stage's memory, each in its own ledger."""
    config, mc, plan = engine.config, engine.model_config, engine.plan
    engine.max_model_len, auto_len = plan.initial_length()
    if auto_len:
        raise ValueError(
            f"the model's context ({mc.max_position_embeddings} tokens) needs more KV than the --layer-split "
            f"budgets hold; pass --max-model-len"
        )
    devices, budgets = split_budgets(config, engine.device)
    budgets[0] = engine.ledger.budget
    stage_plans = plan_layer_split(plan, devices, budgets, engine.max_model_len)
    log.info("%s", split_table(stage_plans, config.block_size, engine.max_model_len))
    engine.stages = [
        Stage(i, sp.device, sp.layers, engine.ledger if i == 0 else MemoryLedger(sp.budget))
        for i, sp in enumerate(stage_plans)
    ]
    engine.placement = Placement(mc.num_hidden_layers, plan.weights.per_layer, (), config.offload_prefetch)
    engine.streamer = None
    layer_devices = {i: s.device for s in engine.stages[1:] for i in s.layers}
    engine.model = build_model(
        engine.source,
        engine.dtype,
        engine.device,
        engine.max_model_len,
        show_progress,
        engine.quant,
        layer_devices=layer_devices,
    )
    engine.source.release()
    engine.hops = install_hops(engine.model, engine.stages)
    for stage in engine.stages:
        try:
            stage.ledger.reserve("weights", stage_weight_bytes(engine.model, stage))
        except BudgetExceeded as exc:
            raise ValueError(f"{stage.device}: {exc}; raise its --layer-split budget or quantize") from exc
    reserve_workspace(engine)
    for stage, sp in zip(engine.stages[1:], stage_plans[1:], strict=True):
        try:
            stage.ledger.reserve("workspace", sp.workspace)
        except BudgetExceeded as exc:
            raise ValueError(f"{stage.device}: {exc}; raise its --layer-split budget") from exc
    trim_host_heap()
    engine.block_size = config.block_size
    engine.storage, engine.pool = build_kv_pool(
        config,
        engine.kv_config,
        engine.kv_format,
        engine.max_model_len,
        engine.device,
        engine.ledger,
        stages=[KVStage(len(s.layers), s.device, s.ledger) for s in engine.stages],
    )
    for stage, part in zip(engine.stages, engine.storage.parts(), strict=True):
        stage.storage = part
    engine.kv = KVCacheManager(engine.pool, engine.block_size)
    if engine.device.type == "cuda":
        log.info("CUDA graphs off: --layer-split (a graph per device is not built); decode runs eagerly")
    log.info(
        "layer split: %s",
        ", ".join(
            f"{s.device} layers {s.layers.start}-{s.layers.stop - 1} "
            f"({format_bytes(s.ledger.total)} of {format_bytes(s.ledger.budget)})"
            for s in engine.stages
        ),
    )
