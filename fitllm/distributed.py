"""The one place that owns process-group state: the tensor-parallel group, its shapes and its collectives.

World size is 1 unless `init_tp_group` joined a group (rank 0's engine and its workers,
fitllm/engine/parallel/), or `planning_as` asks what one rank of a larger group would hold (the planner
builds the model on the meta device under it, so `fitllm plan --tensor-parallel-size N` counts one rank's
shard).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import Iterator
from datetime import timedelta
from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

if TYPE_CHECKING:
    from fitllm.config import ModelConfig

RENDEZVOUS_TIMEOUT_S = 600.0  # how long ranks may take to start and meet
_planning: tuple[int, int] | None = None  # (world size, rank) while planning one rank's shard
_object_group: dist.ProcessGroup | None = None  # gloo: each step's host-side inputs (CPU objects)


@dataclasses.dataclass(slots=True)
class CollectiveStats:
    """Time spent in the row-parallel all-reduces (host time: on CUDA the launch, on CPU/gloo the whole
    reduce); `fitllm bench throughput` reports it as a share of the step."""

    calls: int = 0
    seconds: float = 0.0


ALL_REDUCE = CollectiveStats()
GATHER = CollectiveStats()  # the vocab-parallel LM head's logits gathered to rank 0


def get_tp_world_size() -> int:
    """Tensor-parallel world size (1: no parallelism)."""
    if _planning is not None:
        return _planning[0]
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def get_tp_rank() -> int:
    """This process's rank in the tensor-parallel group."""
    if _planning is not None:
        return _planning[1]
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return 0


@contextlib.contextmanager
def planning_as(world_size: int, rank: int = 0) -> Iterator[None]:
    """Within the block, layers are built as rank `rank` of `world_size` builds them (meta-device planning);
    a no-op inside a real group, whose own size wins."""
    global _planning
    if dist.is_available() and dist.is_initialized():
        yield
        return
    saved, _planning = _planning, (world_size, rank)
    try:
        yield
    finally:
        _planning = saved


def local_kv_heads(num_kv_heads: int, world_size: int) -> int:
    """KV heads one rank holds: an equal share, or one replicated head when there are fewer heads than
    ranks (GLM-4-9B has 2); ranks then share a head in contiguous runs."""
    if num_kv_heads >= world_size:
        return num_kv_heads // world_size
    return 1


def kv_head_start(rank: int, num_kv_heads: int, world_size: int) -> int:
    """The first checkpoint KV head rank `rank` holds (of `local_kv_heads` consecutive ones)."""
    if num_kv_heads >= world_size:
        return rank * (num_kv_heads // world_size)
    return rank * num_kv_heads // world_size


def check_tp_shape(config: ModelConfig, world_size: int) -> None:
    """Refuse a model whose heads or MLP do not split over `world_size` ranks, naming the sizes that would."""
    if world_size == 1:
        return
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    problems = []
    if heads % world_size:
        problems.append(f"{heads} attention heads")
    if (kv >= world_size and kv % world_size) or (kv < world_size and world_size % kv):
        problems.append(f"{kv} KV heads (they split evenly, or ranks share each one equally)")
    if config.intermediate_size % world_size:
        problems.append(f"an MLP of {config.intermediate_size}")
    if problems:
        fits = [n for n in range(1, heads + 1) if not _shape_problem(config, n)]
        raise ValueError(
            f"--tensor-parallel-size {world_size} cannot split {' and '.join(problems)} evenly; "
            f"sizes that can: {', '.join(map(str, fits[:8]))}"
        )


def _shape_problem(config: ModelConfig, n: int) -> bool:
    kv = config.num_key_value_heads
    return bool(
        config.num_attention_heads % n
        or (kv >= n and kv % n)
        or (kv < n and n % kv)
        or config.intermediate_size % n
    )


def rank_kv_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """`config` as one rank's KV cache sees it: its own KV heads (the pool, the attention metadata and the
    planner's KV bytes per token are all per rank)."""
    if world_size == 1:
        return config
    return dataclasses.replace(
        config, num_key_value_heads=local_kv_heads(config.num_key_value_heads, world_size)
    )


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel layer across ranks (a no-op at world size 1)."""
    if _planning is None and dist.is_available() and dist.is_initialized():
        start = time.perf_counter()
        dist.all_reduce(x)
        ALL_REDUCE.calls += 1
        ALL_REDUCE.seconds += time.perf_counter() - start
    return x


def tp_gather(x: torch.Tensor) -> list[torch.Tensor] | None:
    """Every rank's `x` (alike in shape) collected on rank 0, in rank order; None on the other ranks."""
    start = time.perf_counter()
    x = x.contiguous()
    parts = [torch.empty_like(x) for _ in range(get_tp_world_size())] if get_tp_rank() == 0 else None
    dist.gather(x, parts, dst=0)
    GATHER.calls += 1
    GATHER.seconds += time.perf_counter() - start
    return parts


def tp_backend(device: torch.device) -> str:
    """NCCL between GPUs, gloo on CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_tp_group(rank: int, world_size: int, device: torch.device, timeout_s: float) -> None:
    """Join the tensor-parallel group through torchrun's rendezvous variables (MASTER_ADDR, MASTER_PORT;
    rank and world size given, as RANK / WORLD_SIZE say under torchrun). Collectives that wait longer than
    `timeout_s` for a rank raise instead of hanging. Each step's host-side inputs travel on a gloo group
    (pickled objects stay on the CPU, never a device copy plus a sync)."""
    global _object_group
    timeout = timedelta(seconds=timeout_s)
    backend = tp_backend(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # The rendezvous waits as long as spawning and importing may take; collectives get `timeout_s`.
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world_size,
        # Under torchrun its agent already serves the store on MASTER_PORT: every rank is a client.
        is_master=rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True",
        timeout=timedelta(seconds=RENDEZVOUS_TIMEOUT_S),
    )
    dist.init_process_group(backend, store=store, rank=rank, world_size=world_size, timeout=timeout)
    _object_group = dist.new_group(backend="gloo", timeout=timeout) if backend != "gloo" else None


def object_group() -> dist.ProcessGroup | None:
    """The group step messages are broadcast on (None: the default group, already gloo)."""
    return _object_group


def destroy_tp_group() -> None:
    """Leave the group (a no-op outside one)."""
    global _object_group
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _object_group = None


def rendezvous_from_env() -> tuple[int, int] | None:
    """(rank, world size) when torchrun (or a user) launched this process into a group; None otherwise."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return None


def tp_barrier(timeout_s: float) -> None:
    """Every rank meets here within `timeout_s` (gloo's monitored barrier, which names a rank that does not
    come); raises RuntimeError otherwise."""
    dist.monitored_barrier(group=_object_group, timeout=timedelta(seconds=timeout_s))
