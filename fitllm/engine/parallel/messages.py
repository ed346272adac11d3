"""What rank 0 tells the workers, once per step: one pickled message on the gloo group.

A message carries the host-side inputs of whatever runs the model next (a step's `BatchLayout`: token ids,
positions, slot mapping, block tables; a context shift's slots; the start-up's profile step), plus the KV
slab ops rank 0 made since the last message, which every worker replays first, so all ranks' pools hold the
same slabs in the same step. Only rank 0 samples: workers form their shard of the logits of the layout's
sample rows, which rank 0 gathers (fitllm/model/vocab.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch.distributed as dist

from fitllm.distributed import object_group
from fitllm.model.attention.batch import BatchLayout

LOAD_TIMEOUT_S = (
    1800.0  # ranks load their shards side by side before the first message; the slowest may take this long
)


@dataclass(slots=True)
class StepMessage:
    """One broadcast. kind: "setup" (the context, the profile step), "kv_pool" (the pool's shape), "step"
    (a forward over `layout`), "shift" (context shifts), "idle" (slab ops only: the idle engine's heartbeat),
    "stop"."""

    kind: str
    slab_ops: list[tuple] = field(default_factory=list)
    layout: BatchLayout | None = None
    args: dict = field(default_factory=dict)


@dataclass(slots=True)
class BroadcastStats:
    """Host seconds rank 0 spent broadcasting step messages (the per-step overhead of tensor parallelism
    besides the all-reduces)."""

    calls: int = 0
    seconds: float = 0.0


BROADCAST = BroadcastStats()


def broadcast(message: StepMessage) -> None:
    """Rank 0: send `message` to every worker (returns once each has it, or raises after the timeout)."""
    start = time.perf_counter()
    dist.broadcast_object_list([message], src=0, group=object_group())
    BROADCAST.calls += 1
    BROADCAST.seconds += time.perf_counter() - start


def receive() -> StepMessage:
    """A worker: the next message from rank 0 (raises after the group's timeout, or when rank 0 is gone)."""
    box: list[StepMessage | None] = [None]
    dist.broadcast_object_list(box, src=0, group=object_group())
    assert box[0] is not None
    return box[0]
