"""A layer split's stages and the hops between them (`--layer-split`).

A stage is a device, a run of consecutive decoder layers, the ledger of that device and the KV storage of
those layers. Stage 0 also holds the embedding, the final norm and the LM head, so the sampler and
everything after the forward stay on one device. Between stages the model's own forward loop is untouched:
forward pre-hooks on each stage's layers hand them their device's inputs, and a forward hook on the last
layer hands the hidden state back to stage 0's device. Each hop is one explicit copy of the hidden state
(and of Llama's residual) even between two stages on the same device, so the CPU tests exercise it. The
step's attention metadata and rotary rows are moved once per step per device (cached by identity), not per
layer.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.ledger import MemoryLedger


@dataclass(slots=True)
class Stage:
    """One device's share of a layer split."""

    index: int
    device: torch.device
    layers: range  # decoder layer indices, consecutive
    ledger: MemoryLedger
    storage: KVSlabStorage | None = None  # its layers' KV (set when the pool is built)


def layers_by_device(model: nn.Module) -> dict[torch.device, list[int]]:
    """Decoder layer indices grouped by the device their weights are on, in layer order (one group unless
    the layers are split)."""
    out: dict[torch.device, list[int]] = {}
    for i, layer in enumerate(model.layers):
        device = next(layer.parameters()).device
        out.setdefault(device, []).append(i)
    return out


def move_to(value: Any, device: torch.device, copy: bool) -> Any:
    """`value` with every tensor inside it (through dataclasses, lists, tuples and dicts) on `device`:
    copied when `copy`, else moved only where it is elsewhere."""
    if isinstance(value, torch.Tensor):
        return value.to(device, copy=copy) if copy or value.device != device else value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {f.name: move_to(getattr(value, f.name), device, copy) for f in dataclasses.fields(value)}
        return dataclasses.replace(value, **changes)
    if isinstance(value, list):
        return [move_to(v, device, copy) for v in value]
    if isinstance(value, tuple):
        return tuple(move_to(v, device, copy) for v in value)
    if isinstance(value, dict):
        return {k: move_to(v, device, copy) for k, v in value.items()}
    return value


@dataclass(slots=True)
class HopStats:
    """The hops of a split's forwards so far: hidden-state copies between devices (into each later stage,
    and back to stage 0 after the last layer) and the host seconds they took with the step's metadata
    moves (on CUDA the launch; on the CPU the copy itself). `fitllm bench throughput` reports the share."""

    copies: int = 0
    seconds: float = 0.0
    bytes: int = 0


def _timed(stats: HopStats, fn: Callable[[], Any]) -> Any:
    start = time.perf_counter()
    out = fn()
    stats.seconds += time.perf_counter() - start
    return out


def _nbytes(value: Any) -> int:
    items = value if isinstance(value, tuple) else (value,)
    return sum(t.numel() * t.element_size() for t in items if isinstance(t, torch.Tensor))


class StageHop:
    """The hooks of one stage after the first. Its first layer copies the hidden state (and residual) in
    and moves the step's other inputs (attention metadata, rotary rows) to the stage's device, once per
    step; its other layers get those moved inputs in place of the originals the model's loop passes them
    (looked up by identity: the originals live through the forward)."""

    def __init__(self, stage: Stage, stats: HopStats) -> None:
        self.stage = stage
        self.stats = stats
        self._swap: dict[int, Any] = {}  # id(the step's input) -> its copy on this stage's device

    def _enter_one(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):  # the hidden state and the residual
            self.stats.bytes += value.numel() * value.element_size()
            return value.to(self.stage.device, copy=True)
        if value is None or isinstance(value, int | float | bool | str):
            return value
        moved = self._swap[id(value)] = move_to(value, self.stage.device, copy=False)
        return moved

    def enter(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        start = time.perf_counter()
        self._swap = {}
        self.stats.copies += 1
        out = tuple(self._enter_one(a) for a in args), {k: self._enter_one(v) for k, v in kwargs.items()}
        self.stats.seconds += time.perf_counter() - start
        return out

    def follow(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        start = time.perf_counter()
        swap = self._swap
        out = (
            tuple([swap.get(id(a), a) for a in args]),
            {k: swap.get(id(v), v) for k, v in kwargs.items()} if kwargs else kwargs,
        )
        self.stats.seconds += time.perf_counter() - start
        return out

    def leave(self, *_: Any) -> None:
        self._swap = {}  # the step's inputs may die now

    def install(self, layers: nn.ModuleList) -> list[RemovableHandle]:
        first, *rest = (layers[i] for i in self.stage.layers)
        handles = [first.register_forward_pre_hook(self.enter, with_kwargs=True)]
        handles += [layer.register_forward_pre_hook(self.follow, with_kwargs=True) for layer in rest]
        handles.append(layers[self.stage.layers.stop - 1].register_forward_hook(self.leave))
        return handles


def install_hops(model: nn.Module, stages: list[Stage]) -> HopStats:
    """Hook the model's decoder layers so the forward hops from stage to stage and back to stage 0's
    device after the last layer; returns the hops' running figures."""
    stats = HopStats()
    for stage in stages[1:]:
        StageHop(stage, stats).install(model.layers)
    home = stages[0].device
    last = model.layers[stages[-1].layers.stop - 1]

    def back_home(module: nn.Module, args: tuple, output: Any) -> Any:
        stats.copies += 1
        stats.bytes += _nbytes(output)
        return _timed(stats, lambda: move_to(output, home, copy=True))

    last.register_forward_hook(back_home)
    return stats


def stage_weight_bytes(model: nn.Module, stage: Stage) -> int:
    """The parameter bytes stage `stage` holds: its decoder layers, and on stage 0 everything outside the
    decoder stack too (embedding, final norm, LM head, tables)."""
    layers = set(stage.layers)
    total = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if int(parts[1]) in layers if parts[0] == "layers" else stage.index == 0:
            total += p.numel() * p.element_size()
    return total
