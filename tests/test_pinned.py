"""Page-locked host memory of exactly the planned bytes (fitllm/memory/pinned.py), checked on CPU with a
registrar that records what CUDA would be asked."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fitllm.memory.offload.copy_engine import PinnedHostStore, StreamCopyEngine
from fitllm.memory.offload.layer_layout import LayerLayout
from fitllm.memory.pinned import VIEW_ALIGN, PinnedArena


class Recorder:
    def __init__(self) -> None:
        self.registered: list[tuple[int, int]] = []
        self.unregistered: list[int] = []

    def register(self, ptr: int, nbytes: int) -> None:
        self.registered.append((ptr, nbytes))

    def unregister(self, ptr: int) -> None:
        self.unregistered.append(ptr)


def test_an_arena_registers_exactly_its_bytes_once_page_aligned_and_unregisters_once():
    rec = Recorder()
    arena = PinnedArena(10_000, rec)
    assert len(rec.registered) == 1
    ptr, nbytes = rec.registered[0]
    assert nbytes == 10_000 and ptr % 4096 == 0  # not rounded to 16384 as the caching allocator would
    a, b = arena.take(100), arena.take(5000)
    assert a.data_ptr() == ptr and b.data_ptr() == ptr + VIEW_ALIGN and b.numel() == 5000
    with pytest.raises(MemoryError, match="10000 bytes"):
        arena.take(5000)
    arena.close()
    arena.close()
    assert rec.unregistered == [ptr]


def test_the_offload_store_holds_its_layers_in_one_arena_closed_with_the_copy_engine():
    rec = Recorder()
    layer = nn.Linear(64, 48)
    layout = LayerLayout.of(layer)
    store = PinnedHostStore(layout, 3, rec)
    for i in (1, 4, 6):
        store.write(i, layer)
    assert (
        rec.registered[0][1] == PinnedArena.bytes_for(3, layout.nbytes) < 3 * layout.nbytes + 3 * VIEW_ALIGN
    )
    assert torch.equal(store.layers[1], store.layers[6])  # the same layer packed twice: the same bytes
    engine = StreamCopyEngine(store.layers, ops=None, arena=store.arena)
    engine.close()
    assert rec.unregistered == [rec.registered[0][0]] and store.layers == {}
