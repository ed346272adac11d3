"""CUDA-graph decode logic on CPU: static buffers, padding rows and size choice, replayed by ReplayCapturer
(which re-runs the captured function on the static buffers only, as a graph replay would).

The Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_random_checkpoint, run_all

from fitllm.config import EngineConfig
from fitllm.engine.cuda_graphs import ReplayCapturer, capture_decode_graphs
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.memory.planner import capture_sizes
from fitllm.model.attention import KernelMetadata


def test_capture_sizes_cover_every_batch_up_to_max_num_seqs():
    assert capture_sizes(1) == [1]
    assert capture_sizes(5) == [1, 2, 4, 5]
    assert capture_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    for m in range(1, 70):
        sizes = capture_sizes(m)
        assert sizes == sorted(set(sizes)) and sizes[-1] == m
        assert all(any(s >= n for s in sizes) for n in range(1, m + 1))


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("graphs"))


PROMPTS = [list(range(5, 23)), [30, 31, 32], list(range(40, 48)), [7] * 21]
MAX_TOKENS = [20, 6, 13, 9]  # finishing at different steps: the batch shrinks through the sizes
PARAMS = [SamplingParams(temperature=0, max_tokens=n, ignore_eos=True) for n in MAX_TOKENS]


def _run(folder, backend: str, capture: bool, **kw) -> tuple[list[list[int]], Engine, ReplayCapturer | None]:
    config = EngineConfig(
        model=str(folder),
        dtype="float32",
        attention_backend=backend,
        max_num_seqs=6,
        max_model_len=96,
        block_size=4,
        kv_slab_size=4 * 2 * 2 * 2 * 16 * 4 * 4,  # 4 blocks of 4 tokens per slab: many slabs
        **kw,
    )
    engine = Engine(config)
    capturer = None
    if capture:
        capturer = ReplayCapturer()
        assert capture_decode_graphs(engine.runner, engine.ledger, 6, 96, capturer=capturer) is not None
    return run_all(engine, PROMPTS, params=PARAMS), engine, capturer


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
def test_replayed_decode_graphs_give_the_reference_tokens(tiny_llama, kv_cache_dtype):
    ref, _, _ = _run(tiny_llama, "torch", False, kv_cache_dtype=kv_cache_dtype)
    assert len({t for out in ref for t in out}) > 5, (
        "reference output must vary for the comparison to mean much"
    )
    got, engine, capturer = _run(tiny_llama, "triton", True, kv_cache_dtype=kv_cache_dtype)
    assert got == ref
    assert capturer.captures == len(capture_sizes(6))
    # Every decode-only step replayed a graph (the first decode steps run beside prefills, eagerly).
    assert capturer.replays >= max(MAX_TOKENS) - 4
    assert engine.pool.num_slabs >= 1


@torch.inference_mode()
def test_padding_rows_write_no_kv(tiny_llama):
    """3 sequences run in the size-4 graph: only their 3 slots change, whatever the padding row held before."""
    _, engine, _ = _run(tiny_llama, "triton", True)
    graphs = engine.runner.graphs
    assert graphs.size_for(3) == 4 and graphs.size_for(6) == 6 and graphs.size_for(7) is None
    # Stale state from an earlier, larger batch in the padding row.
    graphs.slot_mapping[3] = 9
    graphs.seq_lens[3] = 7
    region = engine.storage.region if engine.storage.region is not None else engine.storage.slab_view(0)
    before = region.clone()
    slots = torch.tensor([2, 5, 13])
    meta = KernelMetadata(
        slot_mapping=slots,
        block_tables=torch.zeros(3, 1, dtype=torch.int32),
        seq_lens=torch.ones(3, dtype=torch.int32),
        query_start=torch.arange(4, dtype=torch.int32),
        max_query_len=1,
        block_size=4,
    )
    hidden = graphs.run(torch.tensor([3, 4, 5]), torch.zeros(3, dtype=torch.long), meta)
    assert hidden.shape[0] == 3 and torch.isfinite(hidden).all()
    assert graphs.slot_mapping[3] == -1 and graphs.seq_lens[3] == 0
    changed = (region != before).flatten(3).any(-1).any(1).any(0)  # per slot
    assert changed.nonzero().flatten().tolist() == slots.tolist()


def test_graph_pool_without_room_falls_back_to_eager(tiny_llama):
    class HugePool(ReplayCapturer):
        def pool_bytes(self) -> int:
            return 1 << 50

    config = EngineConfig(
        model=str(tiny_llama), dtype="float32", attention_backend="triton", max_model_len=64
    )
    engine = Engine(config)
    workspace = engine.ledger.current("workspace")
    assert capture_decode_graphs(engine.runner, engine.ledger, 4, 64, capturer=HugePool()) is None
    assert engine.runner.graphs is None
    assert engine.ledger.current("workspace") == workspace


def test_graphs_need_the_triton_backend(tiny_llama):
    engine = Engine(
        EngineConfig(model=str(tiny_llama), dtype="float32", attention_backend="torch", max_model_len=64)
    )
    with pytest.raises(AssertionError, match="Triton"):
        engine.runner.capture_graphs(4, 64, ReplayCapturer())


def test_cpu_engine_captures_no_graphs(tiny_llama):
    """Graphs are a CUDA feature: a CPU engine (even on the Triton backend) runs decode eagerly."""
    engine = Engine(
        EngineConfig(model=str(tiny_llama), dtype="float32", attention_backend="triton", max_model_len=64)
    )
    assert engine.graphs is None and engine.runner.graphs is None


def test_measured_graph_pool_replaces_the_planned_reservation(tiny_llama):
    class Pool(ReplayCapturer):
        def pool_bytes(self) -> int:
            return 3 << 20

    engine = Engine(
        EngineConfig(model=str(tiny_llama), dtype="float32", attention_backend="triton", max_model_len=64)
    )
    before = engine.ledger.current("workspace")
    engine.ledger.reserve("workspace", 5 << 20)  # as Engine._reserve_graph_pool does on CUDA
    assert (
        capture_decode_graphs(engine.runner, engine.ledger, 4, 64, planned=5 << 20, capturer=Pool())
        is not None
    )
    assert engine.ledger.current("workspace") == before + (3 << 20)
    # Measured beyond the budget: the planned bytes are given back too, and decode stays eager.
    engine.ledger.reserve("workspace", 5 << 20)

    class HugePool(ReplayCapturer):
        def pool_bytes(self) -> int:
            return 1 << 50

    engine.ledger.release("workspace", 3 << 20)
    assert (
        capture_decode_graphs(engine.runner, engine.ledger, 4, 64, planned=5 << 20, capturer=HugePool())
        is None
    )
    assert engine.runner.graphs is None and engine.ledger.current("workspace") == before
