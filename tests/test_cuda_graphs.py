"""CUDA-graph decode logic on CPU: static buffers, padding rows and size choice, replayed by ReplayCapturer
(tests/stand_ins.py, which re-runs the captured function on the static buffers only, as a graph replay would).

The Triton kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1 without CUDA)."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_CONFIG, make_random_checkpoint, run_all
from stand_ins import ReplayCapturer

from fitllm.config import EngineConfig
from fitllm.engine.cuda_graphs import capture_decode_graphs
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.engine.startup import reserve_graph_pool
from fitllm.model.attention import TritonMetadata
from fitllm.plan.memory_plan import eager_reason
from fitllm.plan.planner import capture_sizes, graph_pool_bytes


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
        profile_workspace=False,  # a 2048-token step in Triton's interpreter: ~25 s, measuring nothing here
        **kw,
    )
    engine = Engine(config)
    capturer = None
    if capture:
        capturer = ReplayCapturer()
        assert capture_decode_graphs(engine.runner, engine.ledger, 6, 96, capturer=capturer) is not None
    return run_all(engine, PROMPTS, params=PARAMS), engine, capturer


def _triton_engine(folder, **kw) -> Engine:
    """A float32 engine on the Triton backend with a 64-token context, without the start-up profile step (a
    2048-token step in Triton's interpreter: ~25 s, and these tests measure no workspace)."""
    return Engine(
        EngineConfig(
            model=str(folder),
            dtype="float32",
            attention_backend="triton",
            max_model_len=64,
            profile_workspace=False,
            **kw,
        )
    )


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
    meta = TritonMetadata(
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

    engine = _triton_engine(tiny_llama)
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


def test_eager_reason_names_what_keeps_decode_out_of_graphs():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert eager_reason("triton", cuda, False, False, None) is None
    assert eager_reason("triton", cuda, False, False, "int8") is None
    assert eager_reason("triton", cuda, False, False, "bnb-nf4") is None
    assert eager_reason("triton", cpu, False, False, None) == "not on CUDA"
    assert eager_reason("triton", cuda, True, False, None) == "--enforce-eager"
    assert "torch attention" in eager_reason("torch", cuda, False, False, None)
    assert "streamed" in eager_reason("triton", cuda, False, True, None)
    # LLM.int8() decomposes outlier columns found on the host every call: not capturable.
    assert "bnb-int8" in eager_reason("triton", cuda, False, False, "bnb-int8")


def test_the_engine_reserves_the_planned_pool_only_where_graphs_can_run(tiny_llama, monkeypatch):
    """On this CPU engine `eager_reason` says no; made to say yes, the engine reserves the planner's pool as
    workspace, and with no room for it in the budget it stays eager and reserves nothing."""
    engine = _triton_engine(tiny_llama, device="cpu")
    assert engine.graphs is None and reserve_graph_pool(engine) is None
    monkeypatch.setattr("fitllm.engine.startup.eager_reason", lambda *args: None)
    before = engine.ledger.current("workspace")
    planned = reserve_graph_pool(engine)
    assert planned == graph_pool_bytes(engine.model_config, engine.dtype, engine.config.max_num_seqs, 64, 16)
    assert planned > 0 and engine.ledger.current("workspace") == before + planned
    engine.ledger.release("workspace", planned)
    engine.ledger.budget = engine.ledger.total + planned - 1
    assert reserve_graph_pool(engine) is None and engine.ledger.current("workspace") == before


def test_a_failed_capture_leaves_decode_eager_and_gives_the_planned_bytes_back(tiny_llama):
    class Refuses(ReplayCapturer):
        def capture(self, fn):
            raise RuntimeError("operation not permitted when stream is capturing")

    engine = _triton_engine(tiny_llama, device="cpu")
    before = engine.ledger.current("workspace")
    engine.ledger.reserve("workspace", 5 << 20)
    assert (
        capture_decode_graphs(engine.runner, engine.ledger, 4, 64, planned=5 << 20, capturer=Refuses())
        is None
    )
    assert engine.runner.graphs is None and engine.ledger.current("workspace") == before
    out = run_all(engine, PROMPTS[:2], params=PARAMS[:2])  # and decode still runs
    assert [len(o) for o in out] == MAX_TOKENS[:2]


def test_measured_graph_pool_replaces_the_planned_reservation(tiny_llama):
    class Pool(ReplayCapturer):
        def pool_bytes(self) -> int:
            return 3 << 20

    engine = _triton_engine(tiny_llama)
    before = engine.ledger.current("workspace")
    engine.ledger.reserve("workspace", 5 << 20)  # as startup.reserve_graph_pool does on CUDA
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


def test_cuda_capturer_warms_up_and_captures_every_size_on_one_stream(monkeypatch):
    """PyTorch gives every stream that runs a matmul a cuBLAS workspace of its own (32 MiB on sm_90) and
    never frees it, so the capturer must not make a stream per size (issue 23: ~128 MiB at --max-num-seqs
    8). torch.cuda is replaced by a recorder: which stream each warm-up and capture of each size ran on."""
    from contextlib import contextmanager

    from fitllm.engine import cuda_graphs

    created, ran = [], []
    state = {"current": "default"}

    class Stream:
        def __init__(self, device=None):
            created.append(self)

        def wait_stream(self, other):
            pass

    @contextmanager
    def on(stream):
        before, state["current"] = state["current"], stream
        try:
            yield
        finally:
            state["current"] = before

    class Graph:
        def replay(self):
            pass

    @contextmanager
    def graph(g, pool=None, stream=None):
        assert stream is not None, "capture on the capturer's stream, not a private one per graph"
        with on(stream):
            yield

    fake = dict(
        Stream=Stream,
        stream=on,
        graph=graph,
        CUDAGraph=Graph,
        graph_pool_handle=lambda: "pool",
        current_stream=lambda device=None: Stream.__new__(Stream),
        synchronize=lambda device=None: None,
        empty_cache=lambda: None,
        memory_reserved=lambda device=None: 0,
    )
    for name, value in fake.items():
        monkeypatch.setattr(cuda_graphs.torch.cuda, name, value)
    capturer = cuda_graphs.CudaGraphCapturer(torch.device("cuda"))
    for size in reversed(capture_sizes(8)):
        replay, out = capturer.capture(
            lambda size=size: ran.append((size, state["current"])) or torch.zeros(1)
        )
        assert callable(replay)
    assert len(created) == 1
    assert len(ran) == 2 * len(capture_sizes(8))  # a warm-up and a capture per size
    assert {stream for _, stream in ran} == {created[0]}


def test_planned_graph_pool_holds_one_cublas_workspace(monkeypatch):
    """PyTorch's per-stream cuBLAS workspace rule, and the plan's graph pool counting one (the capture
    stream's)."""
    from fitllm.config import ModelConfig
    from fitllm.plan.planner import cublas_workspace_bytes

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    assert cublas_workspace_bytes((9, 0)) == 32 << 20  # H100, H200
    assert cublas_workspace_bytes((10, 0)) == 32 << 20
    assert cublas_workspace_bytes((8, 0)) == (8 << 20) + (128 << 10)
    if not torch.cuda.is_available():
        assert cublas_workspace_bytes() == 32 << 20  # planning without a GPU: assume Hopper
    cfg = ModelConfig.from_hf_config(
        dict(TINY_CONFIG, architectures=["LlamaForCausalLM"], model_type="llama")
    )
    workspace = cublas_workspace_bytes()
    default = graph_pool_bytes(cfg, torch.bfloat16, 8, 4096, 16)
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":16:8")  # what deterministic runs may set: 128 KiB
    assert cublas_workspace_bytes((9, 0)) == 128 << 10
    assert default - graph_pool_bytes(cfg, torch.bfloat16, 8, 4096, 16) == workspace - (128 << 10)
