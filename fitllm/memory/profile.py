"""Peak bytes of tensors allocated while a function runs: the measured workspace of a profile step.

On CUDA the allocator's own peak counter; on CPU the torch profiler's memory events (exact tensor bytes,
unlike RSS, which misses memory the C allocator reuses without asking the OS). The autograd profiler, not
`torch.profiler.profile`: the same events and the same figure (measured equal on the default model's profile
step), but `torch.profiler` imports torch._dynamo, torch._inductor and triton, which stay in a server's RSS
for good (+150 MiB measured, 70 MiB of it libtriton.so) for a step that runs once at start-up.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def _native_stderr_muted() -> Iterator[None]:
    """Mute file descriptor 2 (the profiler's C++ side prints start/stop lines there no setting turns off)."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def measure_peak_bytes(fn: Callable[[], object], device: torch.device) -> int:
    """Peak of live tensor bytes allocated by `fn` above what was live when it started."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    import gc

    from torch.autograd.profiler import profile

    with _native_stderr_muted(), profile(profile_memory=True) as prof:
        fn()
    # Each op reports the bytes it allocated net of what it freed; in time order they trace live bytes.
    # (The raw allocation events also see peaks inside one op: 17% higher for a bfloat16 step of 2048 tokens
    # at 4096 context. The planner's workspace is calibrated to this per-op figure.)
    events = sorted(
        (e for e in prof.function_events if e.self_cpu_memory_usage), key=lambda e: e.time_range.start
    )
    live = peak = 0
    for event in events:
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    del prof, events
    gc.collect()  # the profiler's events hold reference cycles: free them now, before start-up trims the heap
    return peak
