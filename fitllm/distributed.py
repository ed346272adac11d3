"""The one place that owns process-group state. World size is 1 until a tensor-parallel issue sets it up."""

from __future__ import annotations

import torch


def get_tp_world_size() -> int:
    """Tensor-parallel world size (1: no parallelism)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size()
    return 1


def get_tp_rank() -> int:
    """This process's rank in the tensor-parallel group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return 0


def tp_all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum partial results of a row-parallel layer across ranks (a no-op at world size 1)."""
    if get_tp_world_size() > 1:
        torch.distributed.all_reduce(x)
    return x
