"""Measuring helpers shared by benchmarks: machine facts, resident memory per phase, percentiles."""

from __future__ import annotations

import datetime
import os
import platform
import resource
import threading
from dataclasses import dataclass
from pathlib import Path

MiB = 1 << 20


def _status_kib(field: str) -> int | None:
    """A `kB` field of /proc/self/status (VmRSS, VmHWM), or None where there is no procfs."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def current_rss() -> int:
    """Resident set size now, in bytes (0 if unknown)."""
    kib = _status_kib("VmRSS")
    return (kib or 0) * 1024


def lifetime_peak_rss() -> int:
    """The process's peak RSS since start (getrusage ru_maxrss, KiB on Linux), in bytes."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


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
        self._hwm = _reset_peak() and _status_kib("VmHWM") is not None
        if not self._hwm:
            self._sampled_peak = self._start
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        end = current_rss()
        if self._hwm:
            peak, method = (_status_kib("VmHWM") or 0) * 1024, "VmHWM"
        else:
            self._stop.set()
            if self._thread is not None:
                self._thread.join()
            peak, method = self._sampled_peak, "sampled"
        self.result = PhaseMemory(self._start, end, max(peak, end, self._start), method)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default); None for no values."""
    if not values:
        return None
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (or platform's guess)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_flags() -> list[str]:
    """The SIMD features that decide CPU matmul speed (AVX2, AVX-512, bf16, AMX)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_bf16", "amx_tile")
                return [f for f in wanted if f in flags]
    except OSError:
        pass
    return []


def machine_facts() -> dict:
    """What a reader needs to compare figures across runs: CPU, cores, threads, versions, load, date."""
    import torch

    facts = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "cpu_model": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }
    try:
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
        facts["memory_total_bytes"] = mem_kib * 1024
    except (OSError, ValueError, IndexError):
        pass
    return facts
