"""WeightStreamer: offloaded decoder layers copied into staging buffers just before they run.

A ring of `prefetch` staging buffers serves the offloaded layers in the order the model runs them. Copy
number n goes to buffer n mod S and carries offloaded layer n mod K (K offloaded layers), so the schedule
is the same every forward pass and wraps from the last offloaded layer of one pass to the first of the
next: while sampling and scheduling run between steps, the next step's first layers are already on
their way.

- Before an offloaded layer runs (a forward pre-hook), compute waits for its copy (only if it is late)
  and the layer's parameters are bound to views of its buffer.
- After it has run (a forward hook), the parameters are unbound (empty, so a stray use fails loudly),
  the buffer is released, and the copy S positions ahead starts into it at once; on CUDA that copy
  waits on the device for an event recorded after the layer's kernels, never on the host.

The staging buffers are allocated once and held in the ledger under `staging`: prefetch x one layer.
When every offloaded layer has its own buffer (prefetch >= K) the layers stay in place and nothing is
copied after the first pass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fitllm.memory.ledger import MemoryLedger
from fitllm.memory.offload.copy_engine import CopyEngine, OffloadFile, PinnedHostStore, make_copy_engine
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.memory.offload.placement import Placement


@dataclass(slots=True)
class StagingBuffer:
    data: torch.Tensor  # uint8, one packed layer
    layer: int | None = None  # the layer whose copy was last started into it
    ready: Any = None  # handle of that copy (None: nothing to wait for)
    free: Any = None  # what the next copy into it must wait for


@dataclass(slots=True)
class StreamerStats:
    bytes_streamed: int = 0
    copies: int = 0
    host_wait_seconds: float = 0.0  # time the engine thread blocked on late copies (CPU tier)
    resyncs: int = 0


class WeightStreamer:
    """Streams the offloaded decoder layers of a model through `prefetch` staging buffers."""

    def __init__(
        self,
        layers: dict[int, nn.Module],
        layout: LayerLayout,
        engine: CopyEngine,
        prefetch: int,
        device: torch.device,
        ledger: MemoryLedger | None = None,
    ) -> None:
        if not layers:
            raise ValueError("nothing to stream")
        if prefetch < 1:
            raise ValueError(f"--offload-prefetch must be at least 1; got {prefetch}")
        self.layers = layers
        self.order = sorted(layers)
        self.layout = layout
        self.engine = engine
        self.device = device
        self.ledger = ledger
        n = min(prefetch, len(self.order))
        self.staging_bytes = n * layout.nbytes
        if ledger is not None:
            ledger.reserve("staging", self.staging_bytes)
        self.buffers = [
            StagingBuffer(torch.empty(layout.nbytes, dtype=torch.uint8, device=device)) for _ in range(n)
        ]
        self.stats = StreamerStats()
        self._next_start = 0  # sequence number of the next copy to start
        self._next_use = 0  # sequence number of the next copy a layer will run from
        self._running: int | None = None  # layer bound to a buffer right now
        self._hooks: list[RemovableHandle] = []
        for index, layer in layers.items():
            self._hooks.append(layer.register_forward_pre_hook(self._pre_hook(index)))
            self._hooks.append(layer.register_forward_hook(self._post_hook(index)))
        for buf in self.buffers:
            # Fresh memory from the caching allocator may still be read by queued compute-stream work:
            # the first copies into it wait for that, like every later one.
            buf.free = engine.release()
        self._start_copies()  # the first pass's first layers start arriving now

    # -- the schedule ---------------------------------------------------------------------------------

    def _layer_of(self, seq: int) -> int:
        return self.order[seq % len(self.order)]

    def _buffer_of(self, seq: int) -> StagingBuffer:
        return self.buffers[seq % len(self.buffers)]

    def _start_copies(self) -> None:
        """Start every copy whose buffer is free: up to S ahead of the next layer to run."""
        while self._next_start < self._next_use + len(self.buffers):
            seq = self._next_start
            buf, layer = self._buffer_of(seq), self._layer_of(seq)
            if buf.layer != layer:  # (with a buffer per layer, the bytes are already there)
                buf.ready = self.engine.start(layer, buf.data, buf.free)
                buf.layer = layer
                self.stats.copies += 1
                self.stats.bytes_streamed += buf.data.numel()
            self._next_start += 1

    def before_layer(self, index: int) -> None:
        """Wait for `index`'s copy (if late) and bind its parameters to the staging buffer."""
        if self._running is not None or self._layer_of(self._next_use) != index:
            self._resync(index)
        buf = self._buffer_of(self._next_use)
        assert buf.layer == index, "the copy schedule and the staging buffers disagree"
        if buf.ready is not None:
            t0 = time.perf_counter()
            self.engine.wait(buf.ready)
            self.stats.host_wait_seconds += time.perf_counter() - t0
            buf.ready = None
        self.layout.bind(self.layers[index], buf.data)
        self._running = index

    def after_layer(self, index: int) -> None:
        """The layer has been issued: unbind it, release its buffer, start the next copy into it."""
        buf = self._buffer_of(self._next_use)
        self.layout.release(self.layers[index], self.device)
        buf.free = self.engine.release()
        self._running = None
        self._next_use += 1
        self._start_copies()

    def _resync(self, index: int) -> None:
        """The model did not run the layer the schedule expected (an earlier forward stopped part way):
        let every copy land, make every buffer wait for compute so far, and restart the schedule at
        `index`."""
        self.stats.resyncs += 1
        if self._running is not None:
            self.layout.release(self.layers[self._running], self.device)
            self._running = None
        for buf in self.buffers:
            if buf.ready is not None:
                self.engine.wait(buf.ready)
                buf.ready = None
            buf.free = self.engine.release()
            buf.layer = None  # contents no longer follow the schedule
        pos = self.order.index(index)
        base = self._next_start + (pos - self._next_start) % len(self.order)
        self._next_start = self._next_use = base
        self._start_copies()

    def _pre_hook(self, index: int):
        def hook(module: nn.Module, args: Any) -> None:
            self.before_layer(index)

        return hook

    def _post_hook(self, index: int):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            self.after_layer(index)

        return hook

    # -- lifetime -------------------------------------------------------------------------------------

    def close(self) -> None:
        """Remove the hooks, let in-flight copies land, free the staging buffers and their ledger bytes."""
        for handle in self._hooks:
            handle.remove()
        self._hooks.clear()
        for buf in self.buffers:
            if buf.ready is not None:
                self.engine.wait(buf.ready)
        self.engine.close()
        self.buffers.clear()
        if self.ledger is not None and self.staging_bytes:
            self.ledger.release("staging", self.staging_bytes)
            self.staging_bytes = 0


def start_streamer(
    model: nn.Module,
    placement: Placement,
    sink: OffloadFile | PinnedHostStore,
    device: torch.device,
    ledger: MemoryLedger,
) -> WeightStreamer:
    """Streams the offloaded layers that `build_model` handed to `sink`."""
    sink.finish()
    layers = {i: model.layers[i] for i in placement.offloaded}
    return WeightStreamer(
        layers, sink.layout, make_copy_engine(sink, device), placement.prefetch, device, ledger
    )
