"""MemoryLedger: every byte fitllm holds on the compute device, by tag, against one budget."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from fitllm.units import format_bytes

TAGS = ("weights", "workspace", "staging", "kv", "kv_cached")


class BudgetExceeded(RuntimeError):
    """A reservation that would take the ledger past its budget (callers evict, preempt or wait)."""


@dataclass(slots=True)
class LedgerSnapshot:
    """Current and peak bytes per tag, and the budget."""

    budget: int
    current: dict[str, int] = field(default_factory=dict)
    peak: dict[str, int] = field(default_factory=dict)
    total: int = 0
    peak_total: int = 0


class MemoryLedger:
    """Registers reservations under tags; refuses any that would exceed the budget.

    Thread-safe, because the server's metrics thread reads it while the engine thread writes.
    """

    def __init__(self, budget: int, tags: tuple[str, ...] = TAGS) -> None:
        """tags: the device tags by default; the host swap space keeps its own ledger with `kv_swapped`."""
        if budget <= 0:
            raise ValueError(f"the memory budget must be positive; got {budget}")
        self.budget = budget
        self.tags = tags
        self._current = dict.fromkeys(tags, 0)
        self._peak = dict.fromkeys(tags, 0)
        self._total = 0
        self._peak_total = 0
        self._lock = threading.Lock()

    @property
    def total(self) -> int:
        return self._total

    @property
    def peak_total(self) -> int:
        return self._peak_total

    def free_bytes(self) -> int:
        """Budget not yet reserved."""
        return self.budget - self._total

    def can_reserve(self, nbytes: int) -> bool:
        return self._total + nbytes <= self.budget

    def reserve(self, tag: str, nbytes: int) -> None:
        """Account `nbytes` under `tag`; raises BudgetExceeded (and changes nothing) if it does not fit."""
        if tag not in self._current:
            raise KeyError(f"unknown ledger tag {tag!r}; tags: {', '.join(self.tags)}")
        if nbytes < 0:
            raise ValueError("reserve a non-negative number of bytes")
        with self._lock:
            if self._total + nbytes > self.budget:
                raise BudgetExceeded(
                    f"{tag}: {format_bytes(nbytes)} more would exceed the budget "
                    f"({format_bytes(self._total)} of {format_bytes(self.budget)} in use)"
                )
            self._current[tag] += nbytes
            self._total += nbytes
            self._peak[tag] = max(self._peak[tag], self._current[tag])
            self._peak_total = max(self._peak_total, self._total)

    def release(self, tag: str, nbytes: int) -> None:
        """Give back bytes reserved under `tag`."""
        with self._lock:
            if nbytes > self._current[tag]:
                raise ValueError(f"{tag}: releasing {nbytes} B but only {self._current[tag]} B are held")
            self._current[tag] -= nbytes
            self._total -= nbytes

    def move(self, src: str, dst: str, nbytes: int) -> None:
        """Re-tag bytes (e.g. a finished request's blocks kv -> kv_cached); the total is unchanged."""
        with self._lock:
            if nbytes > self._current[src]:
                raise ValueError(f"{src}: moving {nbytes} B but only {self._current[src]} B are held")
            self._current[src] -= nbytes
            self._current[dst] += nbytes
            self._peak[dst] = max(self._peak[dst], self._current[dst])

    def reset_peak(self) -> None:
        """Start peak tracking afresh from the current figures (e.g. per benchmark pass)."""
        with self._lock:
            self._peak = dict(self._current)
            self._peak_total = self._total

    def current(self, tag: str) -> int:
        return self._current[tag]

    def snapshot(self) -> LedgerSnapshot:
        with self._lock:
            return LedgerSnapshot(
                self.budget, dict(self._current), dict(self._peak), self._total, self._peak_total
            )

    def report(self) -> str:
        """One line per tag: current and peak, then the total against the budget."""
        snap = self.snapshot()
        lines = [
            f"{tag:<10} {format_bytes(snap.current[tag]):>12}  (peak {format_bytes(snap.peak[tag])})"
            for tag in self.tags
        ]
        lines.append(
            f"{'total':<10} {format_bytes(snap.total):>12}  (peak {format_bytes(snap.peak_total)}) "
            f"of budget {format_bytes(snap.budget)}"
        )
        return "\n".join(lines)
