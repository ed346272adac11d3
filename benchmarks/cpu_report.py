"""`fitllm bench cpu`'s rows, the issue-24 targets they are held to, and the printed table.

A row is one system's figure for one setting (decode at 128 new tokens, prefill at 512 prompt tokens, the
workload at 8 concurrent clients); each fitllm row is compared with the llama.cpp row of the same setting.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from benchmarks.measure import MiB

PEER_SYSTEMS = ("llama.cpp", "llama-server")

# Issue 24's targets, as ratios of fitllm to llama.cpp in one run. Decode: per weight quantization (the
# key is the --configs name); prefill: per prompt length, for every configuration; serve: per concurrency,
# for every configuration, and only at equal or lower peak RSS than llama-server's.
DECODE_TARGETS = {"int4": 1.0, "int8": 0.8}
PREFILL_TARGETS = {512: 1.0, 2048: 1.0}
SERVE_TARGETS = {8: 1.5, 32: 1.5}


@dataclass(slots=True)
class Row:
    """One system's tokens/s at one setting: the median of its samples, one per round."""

    part: str  # "decode" | "prefill" | "serve"
    size: int  # new tokens (decode), prompt tokens (prefill), concurrent clients (serve)
    system: str  # "fitllm int4", "llama.cpp", "llama-server"
    samples: list[float] = field(default_factory=list)  # tokens/s, one per round
    peak_rss_bytes: int | None = None
    extra: dict = field(default_factory=dict)
    ready_rss_bytes: int | None = None  # serve: the server's RSS once it answers, before any request
    rested_rss_bytes: int | None = None  # serve: its RSS a moment after the load (cpu.REST_S)
    ratio: float | None = None  # fitllm / llama.cpp (fitllm rows with a peer only)
    target: float | None = None
    verdict: str = ""  # "met", "not met", "no peer", or "" where no target applies

    @property
    def tok_per_s(self) -> float | None:
        return statistics.median(self.samples) if self.samples else None

    @property
    def config(self) -> str | None:
        """The fitllm configuration (none / int8 / int4), None for a peer row."""
        return self.system.removeprefix("fitllm ") if self.system.startswith("fitllm ") else None

    def as_dict(self) -> dict:
        return {
            "part": self.part,
            "size": self.size,
            "system": self.system,
            "tok_per_s_median": self.tok_per_s,
            "tok_per_s_samples": self.samples,
            "peak_rss_bytes": self.peak_rss_bytes,
            "ready_rss_bytes": self.ready_rss_bytes,
            "rested_rss_bytes": self.rested_rss_bytes,
            "ratio_vs_llama_cpp": self.ratio,
            "target": self.target,
            "verdict": self.verdict,
            **self.extra,
        }


def _target(row: Row) -> float | None:
    if row.part == "decode":
        return DECODE_TARGETS.get(row.config)
    if row.part == "prefill":
        return PREFILL_TARGETS.get(row.size)
    return SERVE_TARGETS.get(row.size)


def judge(rows: list[Row]) -> list[Row]:
    """Fill each fitllm row's ratio to the peer row of the same part and size, its target and verdict."""
    peers = {(r.part, r.size): r for r in rows if r.system in PEER_SYSTEMS and r.tok_per_s}
    for row in rows:
        if row.config is None:
            continue
        row.target = _target(row)
        peer = peers.get((row.part, row.size))
        if peer is None or not row.tok_per_s:
            row.verdict = "no peer" if row.target is not None else ""
            continue
        row.ratio = row.tok_per_s / peer.tok_per_s
        if row.target is None:
            continue
        met = row.ratio >= row.target
        if row.part == "serve":
            # "at equal or lower memory": both peaks must be known and fitllm's no higher
            met = met and None not in (row.peak_rss_bytes, peer.peak_rss_bytes)
            met = met and row.peak_rss_bytes <= peer.peak_rss_bytes
        row.verdict = "met" if met else "not met"
    return rows


def _setting(row: Row) -> str:
    return {
        "decode": f"batch-1 decode, {row.size} new tokens",
        "prefill": f"prefill, {row.size} prompt tokens",
        "serve": f"{row.size} concurrent clients",
    }[row.part]


def _target_text(row: Row) -> str:
    if row.target is None:
        return ""
    memory = " at <= RSS" if row.part == "serve" else ""
    return f">= {row.target:.1f}x{memory}: {row.verdict}"


def render(console, rows: list[Row], header: list[str], notes: list[str]) -> None:
    """The table: one line per row, grouped by setting, ratios and verdicts on the fitllm lines."""
    from rich.table import Table

    table = Table(title="fitllm bench cpu", title_justify="left")
    for name in (
        "setting",
        "system",
        "tok/s",
        "samples",
        "ready RSS MiB",
        "peak RSS MiB",
        "rested RSS MiB",
        "vs llama.cpp",
        "target",
    ):
        table.add_column(name, justify="left" if name in ("setting", "system", "target") else "right")
    last = None
    for r in rows:
        setting = _setting(r)
        table.add_row(
            setting if setting != last else "",
            r.system,
            "-" if r.tok_per_s is None else f"{r.tok_per_s:.1f}",
            " ".join(f"{s:.0f}" for s in r.samples),
            "" if r.ready_rss_bytes is None else f"{r.ready_rss_bytes / MiB:.0f}",
            "" if r.peak_rss_bytes is None else f"{r.peak_rss_bytes / MiB:.0f}",
            "" if r.rested_rss_bytes is None else f"{r.rested_rss_bytes / MiB:.0f}",
            "" if r.ratio is None else f"{r.ratio:.2f}x",
            _target_text(r),
            end_section=False,
        )
        last = setting
    for line in header:
        console.print(line, highlight=False)
    console.print(table)
    for line in notes:
        console.print(f"[dim]- {line}[/dim]", highlight=False)
