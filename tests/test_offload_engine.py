"""Offload through the whole engine: streamed layers give the same greedy tokens as resident ones, the
budget holds while streaming, and a model several times larger than its budget completes (CPU file tier).
The streamer's own ordering logic (and the CUDA tier's events, simulated) is in test_offload_streamer.py."""

from __future__ import annotations

import pytest
import torch
from conftest import make_random_checkpoint, run_all

from fitllm import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.plan.memory_plan import make_plan
from fitllm.plan.weights import weight_breakdown

GiB = 1 << 30


def _offload_gib(layers_bytes: int, fraction: float) -> float:
    """--cpu-offload-gb that streams `fraction` of the decoder layers (given their total bytes)."""
    return layers_bytes * fraction / GiB


# ---- the default model ---------------------------------------------------------------------------------

PROMPTS = [
    "The Martians landed on the common at Horsell, and",
    "Once upon a time, in a kingdom by the sea,",
    "def fibonacci(n):",
]


@pytest.fixture(scope="module")
def default_layers_bytes() -> int:
    from fitllm.loader import open_model

    cfg = open_model(None).config
    w = weight_breakdown(cfg, torch.bfloat16)
    return cfg.num_hidden_layers * w.per_layer


def _greedy_default(**kw) -> tuple[list[list[int]], Engine]:
    eng = Engine(EngineConfig(dtype="bfloat16", quantization="none", max_model_len=512, max_num_seqs=4, **kw))
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ids = [eng.add_request(p, params) for p in PROMPTS]  # one batch: one pass over the layers serves all
    done: dict[str, list[int]] = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            if out.finished:
                done[out.request_id] = list(out.outputs[0].token_ids)
        assert eng.ledger.total <= eng.ledger.budget
    return [done[i] for i in ids], eng


def test_default_model_greedy_identical_at_0_50_100_percent_offloaded(default_layers_bytes):
    resident, eng0 = _greedy_default()
    assert eng0.streamer is None and eng0.ledger.current("staging") == 0
    for fraction, prefetch in ((0.5, 1), (1.0, 2)):
        tokens, eng = _greedy_default(
            cpu_offload_gb=_offload_gib(default_layers_bytes, fraction), offload_prefetch=prefetch
        )
        layers = eng.model_config.num_hidden_layers
        streamed = len(eng.placement.offloaded)
        assert streamed == round(fraction * layers), (fraction, streamed)
        assert tokens == resident, f"{fraction:.0%} offloaded changed the greedy tokens"
        # Resident weights shrink by exactly the streamed layers; staging is prefetch x one layer.
        per_layer = default_layers_bytes // layers
        assert eng.ledger.current("weights") == eng0.ledger.current("weights") - streamed * per_layer
        assert eng.ledger.snapshot().peak["staging"] == prefetch * eng.placement.layer_bytes
        assert eng.streamer.stats.bytes_streamed > 0 and eng.status().bytes_streamed > 0
        eng.streamer.close()


# ---- random-weight Llama checkpoints ---------------------------------------------------------------------

BIG = dict(
    hidden_size=512,
    intermediate_size=2048,
    num_hidden_layers=8,
    num_attention_heads=8,
    num_key_value_heads=8,
    vocab_size=512,
    max_position_embeddings=512,
    initializer_range=0.05,
)


@pytest.fixture(scope="module")
def big_llama(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("offload"), "llama", seed=3, **BIG)


# Grouped-query attention (4 query heads per KV head), smaller so that its quantized cases stay cheap.
GQA = dict(BIG, hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def gqa_llama(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("offload-gqa"), "llama", seed=4, **GQA)


def _engine(folder, **kw) -> Engine:
    base = dict(
        model=str(folder), dtype="float32", max_model_len=256, max_num_seqs=4, max_num_batched_tokens=128
    )
    base.update(kw)
    return Engine(EngineConfig(**base))


RANDOM_PROMPTS = [[5, 17, 99, 3, 250, 12], [7] * 40, list(range(100, 131))]


@pytest.mark.parametrize(
    "checkpoint,quantization",
    [("big_llama", None), ("big_llama", "int8"), ("gqa_llama", None), ("gqa_llama", "int4")],
)
def test_random_llama_greedy_identical_when_offloaded(request, checkpoint, quantization):
    folder = request.getfixturevalue(checkpoint)
    cfg = _engine_config_model(folder)
    layers = cfg.num_hidden_layers
    resident = _engine(folder, quantization=quantization)
    reference = run_all(resident, RANDOM_PROMPTS)
    assert len({t for out in reference for t in out}) > 5  # varied output, or equality proves little
    # A layer as it runs (fused, quantized, repacked), read off the resident engine's loaded model.
    packed = LayerLayout.of(resident.model.layers[0]).nbytes
    if quantization is not None:  # the quantized bytes stream, not full-precision ones
        full = weight_breakdown(cfg, torch.float32).layer_stream_bytes
        assert packed < full / 3, (packed, full)
    layers_bytes = layers * weight_breakdown(cfg, torch.float32, _quant(quantization)).per_layer
    for fraction, prefetch in ((0.5, 1), (1.0, 2)):
        eng = _engine(
            folder,
            quantization=quantization,
            cpu_offload_gb=_offload_gib(layers_bytes, fraction),
            offload_prefetch=prefetch,
        )
        assert len(eng.placement.offloaded) == round(fraction * layers)
        assert eng.placement.layer_bytes == packed
        assert run_all(eng, RANDOM_PROMPTS) == reference, (checkpoint, quantization, fraction)
        snap = eng.ledger.snapshot()
        assert snap.current["staging"] == snap.peak["staging"] == prefetch * packed
        eng.streamer.close()


def _bytes_per_decode_step(folder, batch: int) -> tuple[set[int], int]:
    """The bytes streamed by each decode step of `batch` rows with every layer offloaded at prefetch 1 (no
    staging buffer keeps a layer from one pass to the next), and the packed layer size."""
    eng = _engine(folder, cpu_offload_gb=1.0, offload_prefetch=1)
    assert len(eng.placement.offloaded) == eng.model_config.num_hidden_layers
    deltas: set[int] = set()
    last = eng.streamer.stats.bytes_streamed

    def record(e: Engine) -> None:
        nonlocal last
        now = e.streamer.stats.bytes_streamed
        if e.last_step.num_tokens == e.last_step.num_running == batch:  # a decode step of every row
            deltas.add(now - last)
        last = now

    run_all(eng, RANDOM_PROMPTS[:batch], on_step=record)
    eng.streamer.close()
    return deltas, eng.placement.layer_bytes


def test_one_pass_over_the_layers_serves_the_whole_batch(gqa_llama):
    """A decode step streams each offloaded layer once, whatever the batch: the bytes streamed per decode
    step are the same at batch 1 and batch 3 (so throughput grows with the batch)."""
    one, layer_bytes = _bytes_per_decode_step(gqa_llama, 1)
    three, _ = _bytes_per_decode_step(gqa_llama, 3)
    assert one == three == {GQA["num_hidden_layers"] * layer_bytes}


def _engine_config_model(folder):
    from fitllm.loader import open_model

    return open_model(str(folder)).config


def _quant(name):
    from fitllm.quant import get_quant_method

    return get_quant_method(name)


def test_model_several_times_larger_than_its_budget_completes_within_it(big_llama):
    cfg = _engine_config_model(big_llama)
    weights = weight_breakdown(cfg, torch.float32).total
    budget = 40 << 20
    assert weights > 3 * budget  # the point of the test: weights alone are 3x the budget
    reference = run_all(_engine(big_llama), RANDOM_PROMPTS[:2])
    eng = _engine(big_llama, memory_budget=budget, offload_prefetch=1)  # automatic: no --cpu-offload-gb
    assert eng.placement.offloaded, "weights over the budget must be offloaded automatically"
    staging_cap = eng.placement.prefetch * eng.placement.layer_bytes

    def within_bounds(engine: Engine) -> None:
        snap = engine.ledger.snapshot()
        assert snap.total <= budget and snap.current["staging"] <= staging_cap

    assert run_all(eng, RANDOM_PROMPTS[:2], on_step=within_bounds) == reference
    snap = eng.ledger.snapshot()
    assert snap.peak_total <= budget and snap.peak["staging"] == staging_cap
    assert eng.ledger.current("weights") + eng.placement.offloaded_bytes >= weights
    # Every step streamed every offloaded layer (prefetch 1 < offloaded layers: no buffer keeps one).
    assert eng.streamer.stats.copies >= len(eng.placement.offloaded) * 2
    eng.streamer.close()
    assert eng.ledger.current("staging") == 0


def test_ledger_weights_match_the_planner_with_offload(big_llama):
    cfg = _engine_config_model(big_llama)
    eng = _engine(big_llama, cpu_offload_gb=0.03)
    plan = make_plan(
        cfg,
        "big",
        torch.float32,
        1 << 40,
        256,
        max_num_batched_tokens=128,
        max_num_seqs=4,
        cpu_offload_gb=0.03,
    )
    assert plan.placement.offloaded == eng.placement.offloaded
    assert eng.ledger.current("weights") == plan.resident_weight_bytes
    assert eng.ledger.current("staging") == plan.staging_bytes
    eng.streamer.close()


def test_budget_too_small_even_for_staging_names_the_flags(big_llama):
    with pytest.raises(ValueError, match="--memory-budget.*--offload-prefetch"):
        _engine(big_llama, memory_budget=12 << 20)


def test_bnb_with_offload_is_refused_naming_the_alternative(big_llama):
    with pytest.raises(ValueError, match="int8 or int4"):
        _engine(big_llama, quantization="bnb-int8", cpu_offload_gb=0.01)


def test_bench_offload_writes_its_table_as_json(gqa_llama, tmp_path):
    import json

    from fitllm.cli import main as cli_main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{3 + i % 500}" for i in range(8000)))
    out = tmp_path / "offload.json"
    argv = ["bench", "offload", "--model", str(gqa_llama), "--dtype", "float32", "--text", str(text)]
    argv += ["--fractions", "0.5,1", "--batches", "2", "--rounds", "2", "--steps", "2"]
    argv += ["--prompt-tokens", "20", "--max-model-len", "128", "--offload-prefetch", "2", "--json", str(out)]
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["tier"] == "file" and data["transfer_bytes_per_s"] > 0 and not data["copies_overlap_compute"]
    assert set(data["runs"]) == {"batch_2"}
    for runs in data["runs"].values():
        assert set(runs) == {"0", "0.5", "1"}
        assert [runs[f]["offloaded_layers"] for f in ("0", "0.5", "1")] == [0, 2, 4]
        assert runs["0"]["ratio_vs_resident"] == 1.0 and runs["0"]["staging_bytes"] == 0
        assert runs["0.5"]["staging_bytes"] == runs["1"]["staging_bytes"] > 0
        for row in runs.values():
            assert len(row["tokens_per_s_rounds"]) == 2 and row["tokens_per_s_median"] > 0
            assert row["predicted_tokens_per_s"] > 0
        # Two buffers for two offloaded layers keep them: nothing moves after the first pass. Four layers
        # through two buffers stream every step.
        assert runs["0.5"]["bytes_streamed_per_s"] == 0 < runs["1"]["bytes_streamed_per_s"]
