"""Decode steps replayed as CUDA graphs: one graph per batch size, all sharing one memory pool.

A decode step is a few hundred small kernel launches (per layer: norms, projections, rotary, K/V write,
attention); at batch 1 on a GPU, launching them from Python costs more than running them. Capturing the
model's forward once per batch size and replaying it removes that cost. vLLM's `[1, 2, 4] + multiples of 8`
scheme is followed: a batch runs in the smallest captured size that holds it, its padding rows writing no K/V
(slot -1) and attending to nothing (length 0).

A graph replays fixed addresses, so every input lives in a static buffer that `run` fills in place:
input ids, positions, slot mapping, block tables (as wide as `--max-model-len` needs), sequence lengths.
The K/V slabs are reached through `PagedKVLayout`'s anchor and offset table, so slabs may come and go
between replays. Each size's flash-decoding split count is fixed at capture for the longest context.

Graphs serve only the Triton backend, without weight offload (its hooks wait on host events), and are
skipped with `--enforce-eager`. The planner's estimate of the pool (`graph_pool_bytes`) is reserved as
workspace before the KV pool is sized; after capture the measured bytes replace it.

The capture mechanism is a `GraphCapturer`: `CudaGraphCapturer` on CUDA; the tests bring a CPU stand-in that
re-runs the captured function on the static buffers, to check the buffer and padding logic on CPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from fitllm.memory.ledger import BudgetExceeded, MemoryLedger
from fitllm.model.attention import TritonMetadata
from fitllm.units import format_bytes

if TYPE_CHECKING:
    from fitllm.engine.runner import ModelRunner

log = logging.getLogger("fitllm")


class GraphCapturer(Protocol):
    """Records `fn` (which reads and writes only static tensors) and returns a replay of it."""

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        """(replay, output): replay() recomputes `output` in place from the static inputs."""
        ...

    def pool_bytes(self) -> int:
        """Device bytes the captured graphs hold."""
        ...


class CudaGraphCapturer:
    """torch.cuda.CUDAGraph capture into one shared pool (largest batch first, so smaller ones reuse it), every
    size warmed up and captured on one side stream.

    One stream, because PyTorch gives each stream that runs a matmul its own cuBLAS workspace (32 MiB on
    sm_90) and never frees it: a new stream per size held ~128 MiB at --max-num-seqs 8. The one workspace
    is in the measured pool and in the plan's (`graph_pool_bytes`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        self.stream = torch.cuda.Stream(device)
        # Each capture starts by emptying the allocator's cache (torch.cuda.graph), so the baseline must
        # not include cached blocks, or what they held would be subtracted from the pool.
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()
        self._reserved_before = torch.cuda.memory_reserved(device)

    def capture(self, fn: Callable[[], torch.Tensor]) -> tuple[Callable[[], None], torch.Tensor]:
        # Warm up first (Triton compiles and autotunes outside the capture; the stream's cuBLAS workspace
        # is allocated here, outside the graphs' pool).
        current = torch.cuda.current_stream(self.device)
        self.stream.wait_stream(current)
        with torch.cuda.stream(self.stream):
            fn()
        current.wait_stream(self.stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            output = fn()
        return graph.replay, output

    def pool_bytes(self) -> int:
        torch.cuda.synchronize(self.device)
        return max(0, torch.cuda.memory_reserved(self.device) - self._reserved_before)


class DecodeGraphs:
    """Captured decode steps of `model` for each of `sizes`, over static input buffers."""

    def __init__(
        self,
        model: nn.Module,
        device: torch.device,
        sizes: list[int],
        max_blocks: int,
        block_size: int,
        sliding_window: int,
        num_splits: Callable[[int], int],
        capturer: GraphCapturer,
    ) -> None:
        self.model = model
        self.sizes = sorted(sizes)
        self.max_blocks = max_blocks
        top = self.sizes[-1]
        self.input_ids = torch.zeros(top, dtype=torch.long, device=device)
        self.positions = torch.zeros(top, dtype=torch.long, device=device)
        self.slot_mapping = torch.full((top,), -1, dtype=torch.long, device=device)
        self.block_tables = torch.zeros(top, max_blocks, dtype=torch.int32, device=device)
        self.seq_lens = torch.zeros(top, dtype=torch.int32, device=device)
        # One token per sequence, padding included: query_start never changes.
        self.query_start = torch.arange(top + 1, dtype=torch.int32, device=device)
        self._graphs: dict[int, tuple[Callable[[], None], torch.Tensor]] = {}
        for size in reversed(self.sizes):
            meta = TritonMetadata(
                slot_mapping=self.slot_mapping[:size],
                block_tables=self.block_tables[:size],
                seq_lens=self.seq_lens[:size],
                query_start=self.query_start[: size + 1],
                max_query_len=1,
                block_size=block_size,
                sliding_window=sliding_window,
                num_splits=num_splits(size),
            )

            def forward(size: int = size, meta: TritonMetadata = meta) -> torch.Tensor:
                return self.model(self.input_ids[:size], self.positions[:size], meta)

            self._graphs[size] = capturer.capture(forward)
        self.pool_bytes = capturer.pool_bytes()

    def size_for(self, num_seqs: int) -> int | None:
        """The smallest captured size holding `num_seqs` sequences, or None."""
        return next((s for s in self.sizes if s >= num_seqs), None)

    def can_run(self, meta: TritonMetadata) -> bool:
        """Whether this step is a decode-only batch a captured graph holds."""
        return (
            meta.max_query_len == 1
            and self.size_for(meta.seq_lens.shape[0]) is not None
            and meta.block_tables.shape[1] <= self.max_blocks
        )

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: TritonMetadata) -> torch.Tensor:
        """Hidden states [n, hidden] of a decode batch of n sequences, by replaying the graph that holds it."""
        n = meta.seq_lens.shape[0]
        size = self.size_for(n)
        assert size is not None and meta.max_query_len == 1
        width = meta.block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.slot_mapping[n:size].fill_(-1)
        self.block_tables[:n, :width].copy_(meta.block_tables)
        self.seq_lens[:n].copy_(meta.seq_lens)
        self.seq_lens[n:size].zero_()
        replay, output = self._graphs[size]
        replay()
        return output[:n]


def capture_decode_graphs(
    runner: ModelRunner,
    ledger: MemoryLedger,
    max_num_seqs: int,
    max_model_len: int,
    planned: int = 0,
    capturer: GraphCapturer | None = None,
) -> DecodeGraphs | None:
    """Capture decode graphs (on CUDA unless a capturer is given) and ledger their pool as workspace, in
    place of the `planned` bytes reserved for it before the KV pool was sized; None (decode stays eager)
    if capture fails or the budget has no room for the measured pool, which is then given back."""
    capturer = capturer or CudaGraphCapturer(runner.device)
    try:
        graphs = runner.capture_graphs(max_num_seqs, max_model_len, capturer)
    except RuntimeError as exc:
        # A kernel that cannot be captured (a host sync, an allocation outside the pool) must not stop the
        # server from starting: decode runs eagerly, and the planned bytes go back to the budget.
        log.warning(
            "CUDA graph capture failed (%s); decode runs eagerly (--enforce-eager skips capture)", exc
        )
        runner.graphs = None
        ledger.release("workspace", planned)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
        return None
    ledger.release("workspace", planned)
    try:
        ledger.reserve("workspace", graphs.pool_bytes)
    except BudgetExceeded:
        log.warning(
            "CUDA graphs need %s (planned %s) that the budget does not have; decode runs eagerly",
            format_bytes(graphs.pool_bytes),
            format_bytes(planned),
        )
        runner.graphs = None
        del graphs
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return None
    log.info(
        "CUDA graphs: %d decode batch sizes up to %d, pool %s (planned %s)",
        len(graphs.sizes),
        graphs.sizes[-1],
        format_bytes(graphs.pool_bytes),
        format_bytes(planned),
    )
    return graphs
