"""Offload streaming on CPU (fitllm/memory/{layer_layout,copy_engine,streamer}.py): the packed layer
layout, both copy tiers (the CUDA one through a simulated side stream that copies lazily and checks every
copy's hazard), the staging ring's schedule and ledger bytes, and recovery when layers run out of order."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

from fitllm.memory.ledger import BudgetExceeded, MemoryLedger
from fitllm.memory.offload.copy_engine import FileCopyEngine, OffloadFile, PinnedHostStore, StreamCopyEngine
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.memory.offload.streamer import WeightStreamer

CPU = torch.device("cpu")
K = 6


class Mixed(nn.Module):
    """Parameters of four dtypes and odd sizes, so packing must align and reinterpret bytes."""

    def __init__(self, n: int = 5) -> None:
        super().__init__()
        self.a = nn.Linear(3, n)
        self.b = nn.Linear(n, 7, dtype=torch.bfloat16)
        self.q = nn.Parameter(torch.randint(-128, 127, (n, 3), dtype=torch.int8), requires_grad=False)
        self.z = nn.Parameter(torch.randint(0, 255, (11,), dtype=torch.uint8), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x) + self.q.float().sum(-1) + self.z.float().mean()
        return self.b(h.bfloat16()).float()


class Block(nn.Module):
    """One decoder-like layer; `observer` sees it while its weights are bound, `fail` makes it raise."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 8)
        self.observer: Callable[[Block], None] | None = None
        self.fail = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observer is not None:
            self.observer(self)
        if self.fail:  # after reading its weights, as a kernel failing part way would
            raise RuntimeError("layer failed")
        return torch.tanh(self.fc(x))


def make_stack(seed: int = 0) -> nn.ModuleList:
    torch.manual_seed(seed)
    return nn.ModuleList(Block() for _ in range(K))


@torch.inference_mode()
def run(stack: nn.ModuleList, x: torch.Tensor, order: Iterable[int] | None = None) -> torch.Tensor:
    for i in range(len(stack)) if order is None else order:
        x = stack[i](x)
    return x


def offload(stack: nn.ModuleList, indices: Iterable[int], sink: OffloadFile | PinnedHostStore) -> dict:
    """Pack each offloaded layer into `sink` and drop its parameters, as the loader does."""
    layers = {}
    for i in indices:
        sink.write(i, stack[i])
        sink.layout.release(stack[i], CPU)
        layers[i] = stack[i]
    sink.finish()
    return layers


@dataclass
class Event:
    tick: int  # compute position (record) or -1 for a copy
    copy: int = -1  # index of the copy it marks (-1: a compute event)


@dataclass
class SimOps:
    """StreamOps simulated: copies run lazily, in order, only when compute waits for them (or a later
    one), so a bind without a wait reads stale bytes; every copy is checked against the buffer's last use."""

    queue: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    landed: int = 0  # copies executed so far (a prefix of queue)
    now: int = 0
    used_at: dict[int, int] = field(default_factory=dict)  # buffer ptr -> tick of its last use
    running: int | None = None
    violations: list[str] = field(default_factory=list)
    reuse_copies: int = 0

    def copy(self, dst: torch.Tensor, src: torch.Tensor, after: Event | None) -> Event:
        ptr = dst.data_ptr()
        if ptr == self.running:
            self.violations.append(f"copy into buffer {ptr} while its layer runs")
        used = self.used_at.get(ptr)
        if used is not None:
            self.reuse_copies += 1
            if after is None or after.copy >= 0 or after.tick < used:
                self.violations.append(f"copy into buffer {ptr} does not wait for its use at {used}")
        self.queue.append((dst, src))
        return Event(-1, len(self.queue) - 1)

    def wait(self, event: Event) -> None:
        while self.landed <= event.copy:
            dst, src = self.queue[self.landed]
            dst.copy_(src)
            self.landed += 1

    def record(self) -> Event:
        self.now += 1
        self.running = None  # CPU compute is synchronous: the layer has finished
        return Event(self.now)

    def use(self, block: Block) -> None:
        """Called from a layer's forward: it reads the buffer its weight is bound to."""
        ptr = block.fc.weight.untyped_storage().data_ptr()
        if any(d.data_ptr() == ptr for d, _ in self.queue[self.landed :]):
            self.violations.append(f"buffer {ptr} used before its copy landed")
        self.now += 1
        self.used_at[ptr] = self.now
        self.running = ptr


def sim_streamer(stack: nn.ModuleList, indices: Iterable[int], prefetch: int, **kw) -> tuple:
    layout = LayerLayout.of(stack[0])
    indices = tuple(indices)
    store = PinnedHostStore(layout, len(indices), registrar=None)
    layers = offload(stack, indices, store)
    ops = SimOps()
    for layer in layers.values():
        layer.observer = ops.use
    streamer = WeightStreamer(layers, layout, StreamCopyEngine(store.layers, ops), prefetch, CPU, **kw)
    return streamer, ops


def test_layout_aligns_packs_and_binds_mixed_dtypes():
    """Offsets are aligned, the buffer covers every parameter, and pack -> bind reproduces the layer."""
    torch.manual_seed(0)
    layer = Mixed()
    layout = LayerLayout.of(layer)
    assert [s.name for s in layout.params] == [n for n, _ in layer.named_parameters()]
    for slot, nxt in zip(layout.params, layout.params[1:] + (None,)):
        assert slot.offset % 256 == 0
        assert slot.offset + slot.nbytes <= (nxt.offset if nxt else layout.nbytes)
    assert layout.nbytes % 256 == 0
    assert layout.nbytes >= sum(p.numel() * p.element_size() for p in layer.parameters())

    buf = torch.full((layout.nbytes,), 0xAB, dtype=torch.uint8)
    layout.pack(layer, buf)
    clone = copy.deepcopy(layer)
    layout.release(clone, CPU)
    assert all(p.numel() == 0 for p in clone.parameters())
    x = torch.randn(2, 3)
    with pytest.raises(RuntimeError):
        clone(x)  # a released layer fails loudly instead of using stale bytes
    layout.bind(clone, buf)
    for (name, p), q in zip(layer.named_parameters(), clone.parameters()):
        assert q.dtype == p.dtype and torch.equal(q, p), name
        assert q.untyped_storage().data_ptr() == buf.data_ptr()  # a view, not a copy
    assert torch.equal(clone(x), layer(x))
    layout.materialize(clone, CPU)
    assert [tuple(p.shape) for p in clone.parameters()] == [s.shape for s in layout.params]
    assert clone.a.weight.untyped_storage().data_ptr() != buf.data_ptr()


def test_layout_check_rejects_a_different_layer_and_reads_meta():
    """Layers must match the layout; a meta-built layer gives the same layout, releases and binds."""
    torch.manual_seed(0)
    layer = Mixed()
    layout = LayerLayout.of(layer)
    with pytest.raises(ValueError, match="identical layers"):
        layout.check(Mixed(n=6))
    with pytest.raises(ValueError, match="identical layers"):
        layout.pack(Mixed(n=6), torch.empty(layout.nbytes, dtype=torch.uint8))
    with torch.device("meta"):
        meta = Mixed()
    assert LayerLayout.of(meta) == layout
    layout.release(meta, CPU)
    assert all(not p.is_meta and p.numel() == 0 for p in meta.parameters())
    buf = torch.empty(layout.nbytes, dtype=torch.uint8)
    layout.pack(layer, buf)
    layout.bind(meta, buf)
    x = torch.randn(4, 3)
    assert torch.equal(meta(x), layer(x))
    with pytest.raises(ValueError, match="without parameters"):
        LayerLayout.of(nn.ReLU())


@pytest.mark.parametrize("indices", [(1, 3, 4), tuple(range(K))])
@pytest.mark.parametrize("prefetch", [1, 2, 3, K])
def test_streamed_outputs_match_resident(indices, prefetch):
    """Over several passes (copies wrapping from one pass to the next) outputs equal a resident model,
    no copy breaks the side-stream hazard rules, and copies/bytes follow the ring's schedule."""
    stack, ref = make_stack(), make_stack()
    streamer, ops = sim_streamer(stack, indices, prefetch)
    passes, k, s = 4, len(indices), min(prefetch, len(indices))
    for p in range(passes):
        x = torch.randn(3, 8, generator=torch.Generator().manual_seed(p))
        assert torch.equal(run(stack, x), run(ref, x))
    assert ops.violations == []
    # The next pass's first S copies are already under way; with a buffer per layer nothing re-copies.
    expected = passes * k + s if s < k else k
    assert streamer.stats.copies == expected == len(ops.queue)
    assert ops.reuse_copies == (expected - s)
    assert streamer.stats.bytes_streamed == expected * streamer.layout.nbytes == streamer.engine.bytes_copied
    assert streamer.stats.resyncs == 0
    assert all(p.numel() == 0 for i in indices for p in stack[i].parameters())  # unbound between uses


class LateBind(SimOps):
    """A side stream whose copies never land: proves the simulation catches a missing wait."""

    def wait(self, event: Event) -> None:
        pass


def test_simulation_detects_a_bind_before_the_copy_lands():
    """Guards the guard: if compute did not wait for copies, outputs and the hazard log would show it."""
    stack, ref = make_stack(), make_stack()
    layout = LayerLayout.of(stack[0])
    store = PinnedHostStore(layout, 2, registrar=None)
    layers = offload(stack, (1, 3), store)
    ops = LateBind()
    for layer in layers.values():
        layer.observer = ops.use
    streamer = WeightStreamer(layers, layout, StreamCopyEngine(store.layers, ops), 1, CPU)
    streamer.buffers[0].data.zero_()  # what the layers read if their copies never land
    x = torch.randn(3, 8)
    assert not torch.equal(run(stack, x), run(ref, x))
    assert any("before its copy landed" in v for v in ops.violations)


@pytest.mark.parametrize("prefetch", [1, 2, K])
def test_ledger_holds_staging_while_streaming(prefetch):
    """Staging is min(prefetch, K) layers in the ledger, never more, and none after close."""
    stack, ref = make_stack(), make_stack()
    ledger = MemoryLedger(1 << 20)
    streamer, ops = sim_streamer(stack, (0, 2, 5), prefetch, ledger=ledger)
    want = min(prefetch, 3) * streamer.layout.nbytes
    seen: list[int] = []
    for i in (0, 2, 5):
        stack[i].observer = lambda b: (ops.use(b), seen.append(ledger.current("staging")))
    x = torch.randn(2, 8)
    for _ in range(3):
        assert torch.equal(run(stack, x), run(ref, x))
    assert seen == [want] * 9 and ledger.snapshot().peak["staging"] == want
    streamer.close()
    assert ledger.current("staging") == 0 and ledger.total == 0


def test_ledger_too_small_refuses_the_streamer():
    """A budget without room for the staging ring fails at construction and installs no hooks."""
    stack = make_stack()
    layout = LayerLayout.of(stack[0])
    ledger = MemoryLedger(2 * layout.nbytes - 1)
    with pytest.raises(BudgetExceeded):
        sim_streamer(stack, (1, 3, 4), 2, ledger=ledger)
    assert ledger.total == 0
    assert not any(b._forward_pre_hooks or b._forward_hooks for b in stack)


@pytest.mark.parametrize("prefetch", [1, 2, K])
@pytest.mark.parametrize("failing", [3, 2, 4])  # inside an offloaded layer / a resident one / the last
def test_resync_after_a_pass_fails_part_way(prefetch, failing):
    """A forward that raises part way leaves the schedule mid-pass; the next passes are correct again."""
    stack, ref = make_stack(), make_stack()
    streamer, ops = sim_streamer(stack, (1, 3, 4), prefetch)
    x = torch.randn(2, 8)
    assert torch.equal(run(stack, x), run(ref, x))
    stack[failing].fail = True
    with pytest.raises(RuntimeError, match="layer failed"):
        run(stack, x)
    stack[failing].fail = False
    for p in range(3):
        assert torch.equal(run(stack, x + p), run(ref, x + p))
    assert streamer.stats.resyncs >= 1 and ops.violations == []


@pytest.mark.parametrize("prefetch", [1, 2, 3])
def test_layers_out_of_order_still_compute_right(prefetch):
    """Skipping or repeating an offloaded layer resyncs the ring instead of binding the wrong bytes."""
    stack, ref = make_stack(), make_stack()
    streamer, ops = sim_streamer(stack, (1, 3, 4), prefetch)
    x = torch.randn(2, 8)
    orders = [None, [0, 2, 3, 4, 5], None, [0, 1, 3, 3, 4, 1], [4, 1], None, None]
    for order in orders:
        assert torch.equal(run(stack, x, order), run(ref, x, order))
    assert streamer.stats.resyncs >= 3 and ops.violations == []


def test_streamer_rejects_bad_arguments():
    """Nothing to stream, or a prefetch depth below one, is refused."""
    stack = make_stack()
    layout = LayerLayout.of(stack[0])
    engine = StreamCopyEngine({}, SimOps())
    with pytest.raises(ValueError, match="nothing to stream"):
        WeightStreamer({}, layout, engine, 1, CPU)
    with pytest.raises(ValueError, match="at least 1"):
        WeightStreamer({1: stack[1]}, layout, engine, 0, CPU)


@pytest.mark.parametrize("prefetch", [1, 2, K])
def test_file_tier_streams_from_an_unlinked_file(tmp_path: Path, prefetch: int):
    """The offload file is unlinked at once yet readable; the background thread's reads feed a streamer
    whose outputs equal resident ones, with the next layer's read already started before it is needed."""
    stack, ref = make_stack(), make_stack()
    layout = LayerLayout.of(stack[0])
    path = tmp_path / "offload.bin"
    file = OffloadFile(path, layout)
    assert not path.exists() and list(tmp_path.iterdir()) == []
    indices = (1, 3, 4)
    layers = offload(stack, indices, file)
    assert file.nbytes == 3 * layout.nbytes
    probe = torch.empty(layout.nbytes, dtype=torch.uint8)
    file.read_into(3, probe)
    expected = torch.empty_like(probe)
    layout.pack(ref[3], expected)
    assert torch.equal(probe, expected)

    engine = FileCopyEngine(file)
    streamer = WeightStreamer(layers, layout, engine, prefetch, CPU)
    s = min(prefetch, 3)
    in_flight: list[set[int | None]] = []
    for i in indices:
        stack[i].observer = lambda b: in_flight.append({buf.layer for buf in streamer.buffers})
    for p in range(3):
        x = torch.randn(2, 8, generator=torch.Generator().manual_seed(p))
        assert torch.equal(run(stack, x), run(ref, x))
    # While each layer runs, the copies for the next S-1 offloaded layers have been started.
    cycle = list(indices) * 4
    assert in_flight == [set(cycle[n : n + s]) for n in range(9)]
    assert math.isfinite(streamer.stats.host_wait_seconds) and streamer.stats.host_wait_seconds >= 0
    streamer.close()  # lets the reads still in flight land
    assert streamer.stats.bytes_streamed == engine.bytes_copied == streamer.stats.copies * layout.nbytes
    assert file._fd == -1 and not path.exists()


def test_first_copies_wait_for_compute_queued_before_the_streamer():
    """Staging memory fresh from the caching allocator may still be read by queued compute-stream work,
    so even the first copies into it wait on an event recorded on the compute stream."""
    streamer, ops = sim_streamer(make_stack(), (1, 3, 4), 2)
    afters: list = []
    real_copy = ops.copy

    def spy(dst, src, after):
        afters.append(after)
        return real_copy(dst, src, after)

    ops.copy = spy
    streamer.close()  # nothing yet: re-run construction with the spy in place
    stack = make_stack()
    layout = LayerLayout.of(stack[0])
    store = PinnedHostStore(layout, 3, registrar=None)
    WeightStreamer(offload(stack, (1, 3, 4), store), layout, StreamCopyEngine(store.layers, ops), 2, CPU)
    assert len(afters) == 2 and all(isinstance(a, Event) and a.copy < 0 for a in afters), afters
