"""The engine's start-up walks its `MemoryPlan` (fitllm/plan/memory_plan.py): under each flag set, the ledger
an engine holds after start equals the plan's figures for the same flags, the plan `fitllm plan` prints: the
placement, resident weights, staging, workspace (as planned: the profile step's measurement replaces it
only when it runs), graph pool, `--max-model-len` (auto: one search) and the KV pool's first slab."""

from __future__ import annotations

import pytest
import torch
from conftest import make_random_checkpoint

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.loader import open_model
from fitllm.plan.memory_plan import MemoryPlan

CPU = torch.device("cpu")
BASE = dict(dtype="float32", max_num_batched_tokens=16, max_num_seqs=4, profile_workspace=False)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_random_checkpoint(
        tmp_path_factory.mktemp("plan"), family="llama", num_hidden_layers=4, max_position_embeddings=512
    )


def _plan(config: EngineConfig) -> MemoryPlan:
    return MemoryPlan.for_engine(config, open_model(config.model).config, CPU)


def _budget(folder, tokens: int, **kw) -> int:
    """A budget that holds every weight, the workspace and about `tokens` tokens of KV."""
    plan = _plan(EngineConfig(model=str(folder), max_model_len=tokens, **{**BASE, **kw}))
    return plan.weights.total + plan.workspace_at(tokens) + tokens * plan.kv_bytes_per_token


def _offload_budget(folder) -> int:
    """A budget that leaves room for all but about two decoder layers: placement must stream some."""
    plan = _plan(EngineConfig(model=str(folder), max_model_len=128, **BASE))
    return _budget(folder, 128) - 2 * plan.weights.per_layer + plan.weights.layer_stream_bytes


CASES = {
    "torch": dict(max_model_len=128),
    "triton-interpreter": dict(max_model_len=128, attention_backend="triton"),
    "offload": dict(max_model_len=128, memory_budget=_offload_budget),
    "static-kv": dict(max_model_len=128, static_kv=True, memory_budget=lambda f: _budget(f, 300)),
    "kv-cache-memory": dict(max_model_len=128, kv_cache_memory=1 << 18),
    "int8": dict(max_model_len=128, quantization="int8"),
    "auto": dict(max_model_len="auto", memory_budget=lambda f: _budget(f, 200)),
    "auto-triton": dict(
        max_model_len="auto", attention_backend="triton", memory_budget=lambda f: _budget(f, 200)
    ),
    "model-context": dict(max_model_len=None),
    "profiled": dict(max_model_len=128, profile_workspace=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_the_engine_ledger_holds_the_plans_figures(llama, name):
    kw = {**BASE, **CASES[name]}
    if callable(kw.get("memory_budget")):
        kw["memory_budget"] = kw["memory_budget"](llama)
    config = EngineConfig(model=str(llama), **kw)
    plan = _plan(config)
    engine = Engine(config)
    ledger = engine.ledger
    assert engine.attention_backend == ("triton" if "triton" in name else "torch")

    placement = plan.placement()
    assert engine.placement.offloaded == placement.offloaded
    assert bool(placement.offloaded) == (name == "offload")
    resident = plan.resident_weight_bytes(placement)
    assert ledger.current("weights") == resident
    assert ledger.current("staging") == placement.staging_bytes

    length, auto = plan.initial_length()
    assert auto == (kw["max_model_len"] == "auto")
    streamed = bool(placement.offloaded)
    if auto:
        length = plan.auto_length(ledger.budget - resident - placement.staging_bytes, length, streamed)
        assert 2 <= length < 512  # the budget, not the model's context, bounds it
    elif kw["max_model_len"] is None:
        assert length == 512  # the model's context, as serve
    assert engine.workspace_planned == plan.workspace_at(length)
    graph_pool = plan.graph_pool_at(length, streamed)
    assert graph_pool == 0  # CPU: decode runs eagerly
    workspace = engine.workspace_planned if engine.workspace_measured is None else engine.workspace_measured
    assert (engine.workspace_measured is not None) == (name == "profiled")
    assert ledger.current("workspace") == workspace + graph_pool

    free = ledger.budget - resident - placement.staging_bytes - workspace - graph_pool
    slab_blocks, max_slabs = plan.kv_pool_at(length, free)
    assert (engine.storage.slab_bytes, engine.storage.max_slabs) == (
        slab_blocks * config.block_size * plan.kv_bytes_per_token,
        max_slabs,
    )
    assert ledger.current("kv") == engine.storage.slab_bytes  # the first slab
    if config.static_kv or config.kv_cache_memory is not None:
        assert max_slabs == 1
    # auto: at most what the pool can ever hold (whole slabs, after the measured workspace)
    capacity = engine.pool.capacity_blocks * config.block_size
    assert engine.max_model_len == (min(length, capacity) if auto else length)
    if engine.streamer is not None:
        engine.streamer.close()


def test_plan_reports_the_static_pool_it_sizes(llama):
    """`fitllm plan --static-kv` / `--kv-cache-memory`: the KV capacity is the one slab the engine allocates
    (whole blocks, at most max_num_seqs full contexts), not all the room after the fixed bytes."""
    mc = open_model(str(llama)).config
    budget = _budget(llama, 4096)

    def report(**kw):
        config = EngineConfig(model=str(llama), max_model_len=128, memory_budget=budget, **{**BASE, **kw})
        return MemoryPlan.for_engine(config, mc, CPU).report("tiny")

    elastic, static, sized = report(), report(static_kv=True), report(kv_cache_memory=1 << 18)
    assert elastic.kv_capacity_tokens > static.kv_capacity_tokens == BASE["max_num_seqs"] * 128
    assert sized.kv_capacity_tokens == (1 << 18) // elastic.kv_bytes_per_token
    assert not report(kv_cache_memory=budget).fits  # a slab larger than the room never starts
