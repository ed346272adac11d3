"""The memory budget: bytes with units, or a fraction of the device memory that is free now."""

from __future__ import annotations

import torch

from fitllm.units import parse_bytes

# Without --memory-budget, take this share of what is free: room for the rest of the machine.
DEFAULT_FRACTION = 0.8


def free_device_memory(device: torch.device) -> int:
    """Bytes free on the device now (CUDA: mem_get_info; CPU: MemAvailable)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("cannot read MemAvailable from /proc/meminfo")


def resolve_budget(spec: str | int | None, device: torch.device) -> int:
    """'12GiB' -> bytes; '0.6' -> 60% of free memory; None -> DEFAULT_FRACTION of free memory."""
    if spec is None:
        return int(free_device_memory(device) * DEFAULT_FRACTION)
    if isinstance(spec, str):
        try:
            value = float(spec)
        except ValueError:
            value = None
        if value is not None and 0 < value <= 1 and not spec.strip().isdigit():
            return int(free_device_memory(device) * value)
    try:
        return parse_bytes(spec)
    except ValueError as exc:
        raise ValueError(
            f"--memory-budget {spec!r}: give bytes with a unit (e.g. 12GiB) or a fraction of free memory in (0, 1]"
        ) from exc
