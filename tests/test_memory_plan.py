"""Ledger, budget parsing and the planner (figures checked against what the engine really allocates)."""

from __future__ import annotations

import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fitllm.cli import main as cli_main
from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.loader import open_model
from fitllm.memory.budget import resolve_budget
from fitllm.memory.kv.format import kv_bytes_per_token
from fitllm.memory.ledger import TAGS, BudgetExceeded, MemoryLedger
from fitllm.plan.memory_plan import make_plan
from fitllm.plan.planner import workspace_bytes
from fitllm.plan.weights import weight_breakdown


def test_ledger_reserve_release_and_peak():
    ledger = MemoryLedger(1000)
    ledger.reserve("weights", 600)
    ledger.reserve("kv", 300)
    ledger.release("kv", 200)
    assert ledger.total == 700 and ledger.peak_total == 900
    assert ledger.snapshot().peak["kv"] == 300
    ledger.move("kv", "kv_cached", 100)
    assert ledger.current("kv") == 0 and ledger.current("kv_cached") == 100 and ledger.total == 700


def test_ledger_refuses_over_budget_without_changing_state():
    ledger = MemoryLedger(1000)
    ledger.reserve("weights", 900)
    with pytest.raises(BudgetExceeded, match="exceed the budget"):
        ledger.reserve("kv", 101)
    assert ledger.total == 900 and ledger.current("kv") == 0
    with pytest.raises(ValueError):
        ledger.release("kv", 1)
    with pytest.raises(KeyError):
        ledger.reserve("bogus", 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(TAGS), st.integers(0, 400), st.booleans()), max_size=60))
def test_ledger_never_exceeds_budget(ops):
    ledger = MemoryLedger(1000)
    held = dict.fromkeys(TAGS, 0)
    for tag, nbytes, is_reserve in ops:
        if is_reserve:
            try:
                ledger.reserve(tag, nbytes)
                held[tag] += nbytes
            except BudgetExceeded:
                assert sum(held.values()) + nbytes > 1000
        else:
            amount = min(nbytes, held[tag])
            ledger.release(tag, amount)
            held[tag] -= amount
        assert ledger.total == sum(held.values()) <= 1000
        assert ledger.peak_total <= 1000


def test_budget_units_and_fractions():
    cpu = torch.device("cpu")
    assert resolve_budget("12GiB", cpu) == 12 * 1024**3
    assert resolve_budget("1500", cpu) == 1500
    half = resolve_budget("0.5", cpu)
    assert 0 < half < resolve_budget(None, cpu)
    with pytest.raises(ValueError, match="--memory-budget"):
        resolve_budget("12x", cpu)


@pytest.fixture(scope="module")
def engine() -> Engine:
    return Engine(EngineConfig(dtype="bfloat16", quantization="none", max_model_len=512, max_num_seqs=4))


def test_planned_weights_and_kv_equal_what_the_engine_allocates(engine):
    actual_weights = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    planned = weight_breakdown(engine.model_config, torch.bfloat16)
    assert planned.total == actual_weights
    kv_bytes = engine.storage.bytes_allocated
    tokens = engine.pool.num_blocks * engine.block_size
    assert kv_bytes_per_token(engine.model_config, torch.bfloat16) * tokens == kv_bytes


def test_plan_fits_and_auto_context():
    source = open_model(None)
    cfg = source.config
    big = make_plan(cfg, "m", torch.bfloat16, 4 << 30, None)
    assert big.fits and big.max_model_len == cfg.max_position_embeddings
    # A budget with room for ~1000 tokens of KV: auto picks a context that fits, whole blocks.
    fixed = big.fixed_bytes
    budget = fixed + 1000 * big.kv_bytes_per_token
    small = make_plan(cfg, "m", torch.bfloat16, budget, None)
    assert small.fits and small.max_model_len == 992 == small.max_context_that_fits
    too_long = make_plan(cfg, "m", torch.bfloat16, budget, 4096)
    assert not too_long.fits
    assert any("--max-model-len 992" in s for s in too_long.suggestions)
    assert any("--kv-cache-dtype int8" in s for s in too_long.suggestions)


def test_plan_reports_weights_over_budget():
    cfg = open_model(None).config
    plan = make_plan(cfg, "m", torch.float32, 300 << 20, 1024)
    assert not plan.fits and plan.kv_capacity_tokens == 0
    assert "over the budget" in plan.suggestions[0]


def test_plan_cli_json_and_exit_code(tmp_path, capsys):
    assert cli_main(["plan", "--memory-budget", "4GiB", "--dtype", "bfloat16", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["fits"] is True and data["weights"]["total"] > 0
    assert cli_main(["plan", "--memory-budget", "300MiB", "--max-model-len", "8192"]) == 1
    assert "fits" in capsys.readouterr().out


def test_plan_from_config_json(tmp_path, capsys):
    from conftest import make_random_checkpoint

    folder = make_random_checkpoint(tmp_path, family="qwen2")
    assert (
        cli_main(["plan", "--model", str(folder / "config.json"), "--memory-budget", "1GiB", "--json"]) == 0
    )
    data = json.loads(capsys.readouterr().out)
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16)
    assert data["weights"]["total"] == sum(p.numel() * p.element_size() for p in hf.parameters())


def test_engine_ledger_holds_weights_workspace_and_kv(engine):
    snap = engine.ledger.snapshot()
    assert snap.current["weights"] == sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert snap.current["kv"] + snap.current["kv_cached"] == engine.storage.bytes_allocated
    assert snap.current["workspace"] == engine.workspace_measured > 0
    assert snap.total <= snap.budget


def test_engine_refuses_budget_below_weights_naming_the_flag():
    with pytest.raises(ValueError, match="--memory-budget"):
        Engine(EngineConfig(dtype="bfloat16", quantization="none", memory_budget="100MiB"))


def test_engine_sizes_kv_pool_within_budget():
    cfg = open_model(None).config
    weights = weight_breakdown(cfg, torch.bfloat16).total
    budget = weights + (100 << 20)
    eng = Engine(
        EngineConfig(
            dtype="bfloat16", quantization="none", memory_budget=budget, max_model_len=512, max_num_seqs=64
        )
    )
    assert eng.ledger.total <= budget
    assert eng.ledger.current("kv") == eng.pool.num_blocks * eng.block_size * kv_bytes_per_token(
        cfg, torch.bfloat16
    )


def test_engine_max_model_len_auto_is_what_the_budget_holds():
    cfg = open_model(None).config
    weights = weight_breakdown(cfg, torch.bfloat16).total
    eng = Engine(
        EngineConfig(
            dtype="bfloat16", quantization="none", memory_budget=weights + (100 << 20), max_model_len="auto"
        )
    )
    per_token = kv_bytes_per_token(cfg, torch.bfloat16)
    room = eng.ledger.budget - eng.ledger.current("weights") - eng.ledger.current("workspace")
    slab = eng.storage.slab_bytes
    # Whole slabs only: what the budget leaves after weights and workspace, rounded down to slabs.
    assert eng.max_model_len == (room // slab) * (slab // (per_token * 16)) * 16 < cfg.max_position_embeddings
    # A request of exactly that length is admitted; one token more is refused with the flag to change.
    eng.add_request([5] * (eng.max_model_len - 1), SamplingParams(max_tokens=1))
    with pytest.raises(ValueError, match="--max-model-len"):
        eng.add_request([5] * eng.max_model_len, SamplingParams(max_tokens=1))


def test_engine_max_model_len_auto_is_the_planners_answer():
    """The engine's --max-model-len auto asks the planner's search with the workspace sized at each
    candidate length (the reference attention's scratch grows with it): with the planned workspace and one
    static slab, it is exactly the plan's auto length (the plan without its framework overhead)."""
    cfg = open_model(None).config
    budget = weight_breakdown(cfg, torch.bfloat16).total + (60 << 20)
    eng = Engine(
        EngineConfig(
            dtype="bfloat16",
            quantization="none",
            memory_budget=budget,
            max_model_len="auto",
            static_kv=True,
            profile_workspace=False,
        )
    )
    plan = make_plan(cfg, "m", torch.bfloat16, budget, None, overhead=0, reference_attention=True)
    assert eng.attention_backend == "torch"
    assert eng.max_model_len == plan.max_model_len < cfg.max_position_embeddings
    assert eng.workspace_planned == plan.workspace
    # Sized at the model's own context, the workspace would have left fewer tokens (the old answer).
    at_full = workspace_bytes(cfg, torch.bfloat16, 2048, 64, 0, cfg.max_position_embeddings)
    per_token = kv_bytes_per_token(cfg, torch.bfloat16)
    assert (budget - plan.resident_weight_bytes - at_full) // per_token < eng.max_model_len - 16


@pytest.mark.parametrize(("dtype", "tokens"), [("bfloat16", 2048), ("float32", 512)])
def test_measured_workspace_is_reserved_and_within_10_percent_of_the_plan(dtype, tokens):
    eng = Engine(EngineConfig(dtype=dtype, max_num_batched_tokens=tokens, max_model_len=4096))
    assert eng.workspace_measured is not None and eng.workspace_measured > 0
    assert eng.ledger.current("workspace") == eng.workspace_measured
    assert abs(eng.workspace_planned - eng.workspace_measured) <= 0.10 * eng.workspace_measured
    assert "measured" in eng.memory_report()


def test_plan_holds_the_cuda_graph_pool_before_kv_and_says_what_eager_frees():
    from fitllm.plan.planner import capture_sizes, graph_pool_bytes, layer_activation_bytes

    cfg = open_model(None).config
    eager = make_plan(cfg, "m", torch.bfloat16, 2 << 30, 4096, max_num_seqs=64)
    graphs = make_plan(cfg, "m", torch.bfloat16, 2 << 30, 4096, max_num_seqs=64, cuda_graphs=True)
    assert eager.graph_pool == 0 and "CUDA graph pool" not in eager.table()
    pool = graphs.graph_pool
    assert pool == graph_pool_bytes(cfg, torch.bfloat16, 64, 4096, 16)
    # The pool at least holds one decode forward at the largest size and every size's output.
    assert pool >= layer_activation_bytes(cfg, 64, 2) + sum(capture_sizes(64)) * cfg.hidden_size * 2
    assert graphs.fixed_bytes - eager.fixed_bytes == pool
    assert eager.kv_capacity_tokens - graphs.kv_capacity_tokens >= pool // eager.kv_bytes_per_token - 16
    assert "CUDA graph pool (decode steps)" in graphs.table()
    # Wider contexts widen the static block table; more sequences, the forward and the outputs.
    assert graph_pool_bytes(cfg, torch.bfloat16, 64, 1 << 20, 16) > pool
    assert graph_pool_bytes(cfg, torch.bfloat16, 256, 4096, 16) > pool
    # A budget the graphs tip over: the plan names --enforce-eager and the room it gives.
    tight = make_plan(
        cfg, "m", torch.bfloat16, eager.fixed_bytes + 4096 * eager.kv_bytes_per_token, 4096, cuda_graphs=True
    )
    assert not tight.fits and any(s.startswith("--enforce-eager frees") for s in tight.suggestions)
    # Streamed layers run eagerly: no pool planned.
    offloaded = make_plan(
        cfg, "m", torch.bfloat16, 2 << 30, 4096, cpu_offload_gb=0.05, max_num_seqs=64, cuda_graphs=True
    )
    assert offloaded.placement.offloaded and offloaded.graph_pool == 0


def test_plan_cli_plans_the_graph_pool_on_cuda_unless_eager(capsys):
    args = ["plan", "--device", "cuda", "--memory-budget", "2GiB", "--dtype", "bfloat16", "--json"]
    assert cli_main(args) == 0
    assert json.loads(capsys.readouterr().out)["graph_pool"] > 0
    assert cli_main([*args, "--enforce-eager"]) == 0
    assert json.loads(capsys.readouterr().out)["graph_pool"] == 0
    assert cli_main([*args, "--quantization", "bnb-int8"]) == 0  # LLM.int8() is not capturable
    assert json.loads(capsys.readouterr().out)["graph_pool"] == 0
    assert cli_main(["plan", "--device", "cpu", "--memory-budget", "2GiB", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["graph_pool"] == 0


def test_decode_groups_bound_the_padded_gather():
    from fitllm.model.attention.torch_backend import decode_groups

    assert decode_groups([5, 9, 3], None) == [(0, 3)]
    assert decode_groups([10, 10, 10, 10], 40) == [(0, 4)]
    assert decode_groups([10, 10, 30, 10], 40) == [(0, 2), (2, 3), (3, 4)]
    assert decode_groups([100, 5, 5], 40) == [(0, 1), (1, 3)]  # a long context alone is still one group
    for contexts in ([7, 3, 12, 40, 1, 1, 9], [1] * 50, [33, 33, 1, 33]):
        groups = decode_groups(contexts, 36)
        assert [i for a, b in groups for i in range(a, b)] == list(range(len(contexts)))
        assert all(b - a == 1 or (b - a) * max(contexts[a:b]) <= 36 for a, b in groups)


@pytest.mark.parametrize("shape", ["several_prompts", "many_decodes"])
def test_a_full_step_stays_within_the_measured_workspace(tmp_path, shape):
    """The profile step measures the largest step as it really comes: --max-num-batched-tokens tokens over
    several prompts when the context is shorter (it measured one prompt of the context, 8x too little), and
    decodes gather their K/V in groups of at most that many context tokens (32 long decodes gathered 3x)."""
    from conftest import make_random_checkpoint

    from fitllm.memory.profile import measure_peak_bytes

    folder = make_random_checkpoint(tmp_path, family="llama")
    if shape == "several_prompts":
        cfg = dict(max_model_len=64, max_num_batched_tokens=512, max_num_seqs=16)
        prompts, max_tokens = [[5 + (i * 7 + j) % 200 for j in range(63)] for i in range(8)], 1
    else:
        cfg = dict(max_model_len=256, max_num_batched_tokens=256, max_num_seqs=32)
        prompts, max_tokens = [[5 + (i * 7 + j) % 200 for j in range(200)] for i in range(32)], 24
    engine = Engine(EngineConfig(model=str(folder), dtype="float32", memory_budget=1 << 30, **cfg))
    for p in prompts:
        engine.add_request(p, SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True))
    workspace = engine.ledger.current("workspace")
    peaks = []
    while engine.has_unfinished_requests():
        peaks.append(measure_peak_bytes(engine.step, engine.device))
    assert max(peaks) <= workspace
