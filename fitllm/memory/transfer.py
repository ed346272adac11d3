"""Host-to-device copies that do not make the host wait for the device.

A plain `torch.tensor(values, device="cuda")` or `cpu_tensor.to("cuda")` copies from pageable memory and then
synchronises the stream, so the host waits for every kernel already queued. With async scheduling the
queue holds the step in flight, so one such copy while preparing the next step would undo the overlap.
These helpers stage through pinned memory and copy with `non_blocking=True` (PyTorch's caching host
allocator keeps the pinned block alive until its copy has run). On CPU they are plain tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(values: Sequence | torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """`values` (a list or a CPU tensor) as a `dtype` tensor on `device`, without a host-device sync."""
    host = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def to_device_packed(
    groups: Sequence[Sequence[int]], dtype: torch.dtype, device: torch.device
) -> list[torch.Tensor]:
    """Each list of `groups` as a `dtype` tensor on `device`, all through one copy: views of one buffer.
    A step's small index lists would otherwise cost one pinned staging and one copy call each."""
    flat = to_device([v for group in groups for v in group], dtype, device)
    views, start = [], 0
    for group in groups:
        views.append(flat[start : start + len(group)])
        start += len(group)
    return views


def move(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A CPU tensor on `device` (its own dtype), without a host-device sync."""
    return to_device(tensor, tensor.dtype, device)
