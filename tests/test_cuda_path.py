"""The engine's GPU path on a real CUDA device: Triton kernels compiled for the GPU, CUDA graphs captured and
replayed, compared with the torch reference backend; offloaded layers streamed from pinned host memory on a
side stream, compared with resident ones. CPU machines (CI) check the same logic through the
interpreter, ReplayCapturer and simulated stream events (test_triton_attention.py, test_cuda_graphs.py,
test_offload_streamer.py); this file needs a GPU."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_greedy_parity, make_random_checkpoint, run_all

from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the device)")

PROMPTS = [list(range(5, 40)), [30, 31, 32], list(range(40, 58)), [7] * 70]
MAX_TOKENS = [40, 12, 25, 18]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("cuda"), num_hidden_layers=3)


def _greedy(folder, logits: list | None = None, **kw) -> tuple[list[list[int]], Engine]:
    engine = Engine(EngineConfig(model=str(folder), device="cuda", max_num_seqs=8, max_model_len=256, **kw))
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    return run_all(engine, PROMPTS, params=params, logits=logits), engine


# Float32 logits of the Triton path (IEEE dots) against the torch reference: within 1e-3 of the largest
# |logit|; tokens compared up to the first near-tie (conftest.assert_greedy_parity).
LOGIT_REL = 1e-3


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8", "fp8"])
@pytest.mark.parametrize("enforce_eager", [False, True])
@pytest.mark.parametrize("async_scheduling", ["on", "off"])
def test_gpu_triton_backend_matches_the_reference(llama, kv_cache_dtype, enforce_eager, async_scheduling):
    ref_logits, got_logits = [], []
    ref, _ = _greedy(
        llama, ref_logits, dtype="float32", attention_backend="torch", kv_cache_dtype=kv_cache_dtype
    )
    assert len({t for out in ref for t in out}) > 5
    got, engine = _greedy(
        llama,
        got_logits,
        dtype="float32",
        attention_backend="auto",
        enforce_eager=enforce_eager,
        kv_cache_dtype=kv_cache_dtype,
        async_scheduling=async_scheduling,
    )
    assert engine.attention_backend == "triton"
    assert engine.async_scheduling == (async_scheduling == "on")
    assert (engine.graphs is None) == enforce_eager
    compared = assert_greedy_parity(got, ref, got_logits, ref_logits, LOGIT_REL)
    assert compared >= 0.5 * sum(MAX_TOKENS), "near-ties left too little to compare"


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_gpu_quantized_weights_through_the_triton_matmuls_with_graphs(llama, quantization):
    """Decode-sized calls go through the fused Triton dequantize-matmuls (int8_path / int4_path), captured in
    the decode graphs; the same quantized weights under torch attention, eager, give the same tokens."""
    kw = dict(dtype="bfloat16", quantization=quantization)
    ref, _ = _greedy(llama, attention_backend="torch", **kw)
    assert len({t for out in ref for t in out}) > 5
    got, engine = _greedy(llama, attention_backend="auto", **kw)
    assert engine.graphs is not None
    proj = engine.model.layers[0].self_attn.qkv_proj
    assert proj.quant.name == quantization and not getattr(proj, "int4_kernel_layout", False)
    # bfloat16 rounding may part a few late tokens; the first of each request must agree.
    assert [o[:8] for o in got] == [o[:8] for o in ref]
    assert sum(a == b for o, r in zip(got, ref, strict=True) for a, b in zip(o, r, strict=True)) >= 0.9 * sum(
        MAX_TOKENS
    )


def test_gpu_graph_pool_is_in_the_workspace(llama):
    eager = Engine(EngineConfig(model=str(llama), device="cuda", enforce_eager=True, max_model_len=256))
    workspace_eager = eager.ledger.current("workspace")
    del eager
    torch.cuda.empty_cache()
    graphs = Engine(EngineConfig(model=str(llama), device="cuda", max_model_len=256))
    assert graphs.graphs is not None and graphs.graphs.pool_bytes > 0
    assert graphs.ledger.current("workspace") >= workspace_eager + graphs.graphs.pool_bytes - (1 << 20)
    assert "CUDA graphs" in graphs.memory_report()


@pytest.mark.parametrize("max_num_seqs", [8, 64])
def test_gpu_static_kv_leaves_the_planned_graph_pool_which_covers_the_measured_one(llama, max_num_seqs):
    from fitllm.plan.planner import graph_pool_bytes

    engine = Engine(
        EngineConfig(
            model=str(llama),
            device="cuda",
            static_kv=True,
            memory_budget="1GiB",
            max_num_seqs=max_num_seqs,
            max_model_len=256,
        )
    )
    assert engine.graphs is not None, "the static KV pool took the graphs' planned bytes"
    planned = graph_pool_bytes(engine.model_config, engine.dtype, max_num_seqs, 256, engine.block_size)
    assert 0 < engine.graphs.pool_bytes <= planned
    assert engine.ledger.total <= engine.ledger.budget


def _mixed_params() -> list[SamplingParams]:
    """Greedy and seeded rows with logprobs, top-k/top-p/min-p, logit bias and min_tokens."""
    return [
        SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=1, max_tokens=12, ignore_eos=True),
        SamplingParams(temperature=0.7, min_p=0.05, seed=2, max_tokens=25, logit_bias={9: 2.0}, min_tokens=5),
        SamplingParams(temperature=1.0, seed=3, max_tokens=18, ignore_eos=True, logprobs=0),
    ]


@pytest.mark.parametrize(
    "backend,eager", [("auto", False), ("auto", True), ("torch", False)], ids=["graphs", "eager", "torch"]
)
def test_gpu_steps_queue_without_host_syncs(llama, backend, eager):
    """With async scheduling, preparing, running and sampling a step must not wait for the device (which
    would wait for the step in flight): any synchronising call inside execute raises in this mode. Half the
    requests arrive after the warm-up, so mixed prefill + decode steps run guarded too."""
    kw = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=256, attention_backend=backend)
    kw["enforce_eager"] = eager
    params = _mixed_params()
    ref = run_all(
        Engine(EngineConfig(model=str(llama), async_scheduling="off", **kw)), PROMPTS, params=params
    )
    engine = Engine(EngineConfig(model=str(llama), **kw))
    assert engine.async_scheduling  # auto on CUDA
    execute, calls = engine.runner.execute, []

    def guarded(sched, pending=None):
        calls.append(sched.num_tokens)
        if len(calls) <= 3:  # warm-up: Triton compiles, the pinned host allocator grows
            return execute(sched, pending)
        torch.cuda.set_sync_debug_mode("error")
        try:
            return execute(sched, pending)
        finally:
            torch.cuda.set_sync_debug_mode("default")

    engine.runner.execute = guarded
    rids = [engine.add_request(p, sp) for p, sp in zip(PROMPTS[:2], params[:2], strict=True)]
    done = {}
    while engine.has_unfinished_requests():
        if len(calls) >= 6 and len(rids) == 2:  # the other two arrive mid-run
            rids += [engine.add_request(p, sp) for p, sp in zip(PROMPTS[2:], params[2:], strict=True)]
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    assert [done[r] for r in rids] == ref
    assert len(calls) > 30


# ---- weight offload: the CUDA tier (pinned host memory, side stream, events) -----------------------------

OFFLOAD_LAYERS = 4


@pytest.fixture(scope="module")
def llama4(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("cuda-offload"), num_hidden_layers=OFFLOAD_LAYERS)


@pytest.mark.parametrize("prefetch", [1, 2])
def test_gpu_offload_greedy_matches_resident_within_the_budget(llama4, prefetch):
    """0, 50 and 100% of the decoder layers streamed from pinned host memory give the resident greedy
    tokens; staging is prefetch x one packed layer and the ledger stays within the budget every step."""
    from fitllm.loader import open_model
    from fitllm.memory.offload.copy_engine import StreamCopyEngine
    from fitllm.plan.weights import weight_breakdown

    weights = weight_breakdown(open_model(str(llama4)).config, torch.float32)
    layer_bytes = weights.layer_stream_bytes
    kw = dict(device="cuda", dtype="float32", max_num_seqs=8, max_model_len=256, offload_prefetch=prefetch)
    params = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]
    resident_engine = Engine(EngineConfig(model=str(llama4), **kw))
    assert resident_engine.placement.offloaded == () and resident_engine.streamer is None
    ref = run_all(resident_engine, PROMPTS, params=params)
    assert len({t for out in ref for t in out}) > 5
    resident_weights = resident_engine.ledger.current("weights")
    assert resident_engine.ledger.snapshot().peak.get("staging", 0) == 0
    del resident_engine
    torch.cuda.empty_cache()

    cap = prefetch * layer_bytes
    for streamed in (OFFLOAD_LAYERS // 2, OFFLOAD_LAYERS):
        # Half a layer short of `streamed` layers: --cpu-offload-gb rounds up to whole layers.
        gib = (streamed - 0.5) * layer_bytes / (1 << 30)
        engine = Engine(EngineConfig(model=str(llama4), cpu_offload_gb=gib, **kw))
        assert len(engine.placement.offloaded) == streamed
        streamer = engine.streamer
        assert isinstance(streamer.engine, StreamCopyEngine)
        assert all(t.is_pinned() for t in streamer.engine.host.values())
        assert all(buf.data.device.type == "cuda" for buf in streamer.buffers)
        assert engine.graphs is None  # streamed layers wait on events between kernels: eager decode
        steps = 0

        def within_budget(e: Engine) -> None:
            nonlocal steps
            steps += 1
            snap = e.ledger.snapshot()
            assert snap.total <= snap.budget and snap.current["staging"] == cap

        got = run_all(engine, PROMPTS, params=params, on_step=within_budget)
        assert got == ref, f"{streamed} of {OFFLOAD_LAYERS} layers streamed at prefetch {prefetch}"
        snap = engine.ledger.snapshot()
        assert snap.peak["staging"] == cap and snap.peak_total <= snap.budget
        assert engine.ledger.current("weights") == resident_weights - streamed * weights.per_layer
        # Between uses an offloaded layer holds no device memory of its own.
        for i in engine.placement.offloaded:
            assert all(p.numel() == 0 for p in engine.model.layers[i].parameters())
        if prefetch < streamed:  # every pass streams every offloaded layer again
            assert streamer.stats.copies >= streamed * (steps - 1)
        else:  # a buffer per offloaded layer: copied once, then kept
            assert streamer.stats.copies == streamed
        assert streamer.stats.resyncs == 0
        streamer.close()
        assert engine.ledger.current("staging") == 0
        del engine, streamer
        torch.cuda.empty_cache()
