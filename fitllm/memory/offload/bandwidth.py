"""Measured transfer bandwidths for the offload cost model (a fraction of a second each)."""

from __future__ import annotations

import os
import tempfile
import time

import torch

from fitllm.memory.offload.placement import OffloadEstimate

PROBE_BYTES = 64 << 20

# A plan for CUDA made where there is no CUDA device (`fitllm plan --device cuda` on a laptop) cannot
# measure the links, and must not need the device: it assumes a 24 GiB consumer GPU's, and says so.
# PCIe 4.0 x16 moves ~25 GB/s from pinned memory in practice; an RTX 3090 / 4090 reads ~0.94-1.0 TB/s.
ASSUMED_CUDA_HOST_TO_DEVICE = 25e9
ASSUMED_CUDA_MEMORY = 1e12


def _best_seconds(fn, repeats: int = 3, sync=None) -> float:
    fn()  # warm: page cache, allocator, CUDA context
    best = float("inf")
    for _ in range(repeats):
        if sync:
            sync()
        t0 = time.perf_counter()
        fn()
        if sync:
            sync()
        best = min(best, time.perf_counter() - t0)
    return best


def file_read_bandwidth(folder: str | None = None, nbytes: int = PROBE_BYTES) -> float:
    """Bytes/s of the CPU tier's read: preadv from a file (in the page cache, as offloaded layers are
    after their first pass when RAM allows) into a buffer."""
    buf = torch.zeros(nbytes, dtype=torch.uint8)
    view = memoryview(buf.numpy())
    fd, path = tempfile.mkstemp(prefix="fitllm-bw-", dir=folder)
    try:
        os.unlink(path)
        os.pwrite(fd, view, 0)

        def read() -> None:
            done = 0
            while done < nbytes:
                done += os.preadv(fd, [view[done:]], done)

        return nbytes / _best_seconds(read)
    finally:
        os.close(fd)


def memory_bandwidth(device: torch.device, nbytes: int = PROBE_BYTES) -> float:
    """Bytes/s a device-to-device copy moves (read plus write), as the rate weights are read at."""
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else None
    return 2 * nbytes / _best_seconds(lambda: dst.copy_(src), sync=sync)


def host_to_device_bandwidth(device: torch.device, nbytes: int = 256 << 20) -> float:
    """Bytes/s of the CUDA tier's copy: pinned host memory to the device."""
    src = torch.ones(nbytes, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty(nbytes, dtype=torch.uint8, device=device)
    return nbytes / _best_seconds(
        lambda: dst.copy_(src, non_blocking=True), sync=lambda: torch.cuda.synchronize(device)
    )


def measure_offload_estimate(device: torch.device, offload_dir: str | None = None) -> OffloadEstimate:
    """The bandwidths of `device`'s offload tier, measured; for CUDA without a CUDA device here, assumed
    (`ASSUMED_CUDA_*`, marked "assumed" in the estimate's description)."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return OffloadEstimate(
            ASSUMED_CUDA_HOST_TO_DEVICE, ASSUMED_CUDA_MEMORY, "pinned host", "assumed (no CUDA device here)"
        )
    if device.type == "cuda":
        return OffloadEstimate(host_to_device_bandwidth(device), memory_bandwidth(device), "pinned host")
    return OffloadEstimate(file_read_bandwidth(offload_dir), memory_bandwidth(device), "file")
