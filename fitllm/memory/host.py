"""The process's host memory: what it holds (RSS, anonymous vs file-backed), its peak over a phase, and
giving freed heap back.

On CPU the ledger is cross-checked against these figures (Engine.memory_report); `fitllm eval` and the
benchmarks report the RSS peak of loading (PhaseMemoryProbe).
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import sys
import threading
from dataclasses import dataclass


@dataclass(slots=True)
class HostMemory:
    """Resident bytes of this process (Linux /proc/self/status)."""

    rss: int
    anon: int  # heap, tensors, the KV region's written pages
    file: int  # mapped files' pages (shared libraries, memory-mapped checkpoints)


def _status_bytes(*keys: str) -> list[int | None] | None:
    """`kB` fields of /proc/self/status in bytes (None for one it lacks), or None where /proc is not available."""
    try:
        with open("/proc/self/status") as f:
            status = f.read()
    except OSError:
        return None
    found = (re.search(rf"^{key}:\s+(\d+) kB", status, re.MULTILINE) for key in keys)
    return [int(m.group(1)) * 1024 if m else None for m in found]


def host_memory() -> HostMemory | None:
    """This process's resident memory, or None where /proc is not available."""
    values = _status_bytes("VmRSS", "RssAnon", "RssFile")
    return None if values is None else HostMemory(*(v or 0 for v in values))


def current_rss() -> int:
    """Resident set size now, in bytes (0 if unknown)."""
    memory = host_memory()
    return memory.rss if memory is not None else 0


def _peak_rss() -> int | None:
    """The kernel's RSS high-water mark (VmHWM) in bytes, or None where it is not reported."""
    values = _status_bytes("VmHWM")
    return None if values is None else values[0]


def trim_host_heap() -> None:
    """Hand heap that transients left behind back to the OS (glibc keeps freed chunks otherwise: measured
    about 250 MiB of RSS after loading and profiling the default model)."""
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):  # not glibc
            ctypes.CDLL("libc.so.6").malloc_trim(0)


@dataclass(slots=True)
class IdleHeapTrim:
    """The host heap trimmed once on the first idle turn after work (the engine's and each tensor-parallel
    worker's). Why: glibc keeps the heap a prefill's activations were freed into, so without it the process
    stays at its busiest RSS after a burst (measured on the default model: a 1665-token prefill step left
    101 MiB, 58 of them free heap); once, because an idle engine turns every half second."""

    dirty: bool = False  # work ran since the last trim

    def worked(self) -> None:
        self.dirty = True

    def idle(self) -> None:
        if self.dirty:
            trim_host_heap()
            self.dirty = False


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0: write 5 to clear_refs); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


@dataclass(slots=True)
class PhaseMemory:
    """Resident memory over one phase: at its start, at its end, and the peak in between."""

    start: int
    end: int
    peak: int
    method: str  # "VmHWM" (exact kernel high-water mark, reset at phase start) or "sampled"

    @property
    def growth(self) -> int:
        return self.peak - self.start

    def as_dict(self) -> dict:
        return {
            "start_bytes": self.start,
            "end_bytes": self.end,
            "peak_bytes": self.peak,
            "growth_bytes": self.growth,
            "method": self.method,
        }


class PhaseMemoryProbe:
    """Context manager: the peak RSS of the code inside it.

    Both systems run in one process, so the lifetime peak (ru_maxrss) mixes them; instead the kernel's
    high-water mark is reset at the start of each phase and read at its end. Where that reset is not
    permitted, a thread samples VmRSS every `interval` seconds (may miss short spikes).
    """

    def __init__(self, interval: float = 0.05) -> None:
        self.interval = interval
        self.result: PhaseMemory | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sampled_peak = 0

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            self._sampled_peak = max(self._sampled_peak, current_rss())

    def __enter__(self) -> PhaseMemoryProbe:
        self._start = current_rss()
        self._hwm = _reset_peak() and _peak_rss() is not None
        if not self._hwm:
            self._sampled_peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        end = current_rss()
        if self._hwm:
            peak, method = _peak_rss() or 0, "VmHWM"
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak, method = self._sampled_peak, "sampled"
        self.result = PhaseMemory(self._start, end, max(peak, end, self._start), method)
