"""Where each rank runs: its device and its share of the CPU cores."""

from __future__ import annotations

import os
from dataclasses import replace

import torch

from fitllm.config import EngineConfig


def rank_device(device: torch.device, rank: int) -> torch.device:
    """Rank r's device: cuda:r on a GPU host (LOCAL_RANK under torchrun), the CPU otherwise."""
    if device.type != "cuda":
        return device
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))


def rank_threads(config: EngineConfig) -> EngineConfig:
    """On the CPU, ranks share the cores: each gets its share unless --threads says otherwise."""
    if config.num_threads is not None or config.resolve_device().type != "cpu":
        return config
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return replace(config, num_threads=max(1, cores // config.tensor_parallel_size))
