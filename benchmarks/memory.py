"""`fitllm bench memory`: static versus elastic KV allocation on the creative-writing workload.

The same requests run through two engines in one process, alternating: one with the whole KV pool
allocated up front (`--static-kv`, sized for max_num_seqs full-length requests, as engines that
preallocate do) and one with the elastic pool. Reported per engine: peak ledger bytes and the process's
peak RSS during the pass, average and peak KV utilization (tokens whose K/V is held / token slots
allocated), time per output token and throughput.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

from benchmarks.hf_baseline import PreparedRequest
from benchmarks.measure import MiB, PhaseMemoryProbe, percentile
from benchmarks.throughput import run_fitllm
from benchmarks.workload import add_workload_arguments, load_workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    add_workload_arguments(g)
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    g.add_argument("--num-requests", type=int, default=64, help="first N workload requests")
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


class KVSampler:
    """Per-step KV utilization and ledger peak of one engine."""

    def __init__(self) -> None:
        self.utilization: list[float] = []
        self.slots: list[int] = []

    def __call__(self, engine) -> None:
        held = sum(r.num_computed_tokens for r in engine.scheduler.running)
        slots = engine.pool.num_blocks * engine.block_size
        if held:
            self.slots.append(slots)
            self.utilization.append(held / slots)

    def at_peak(self) -> float:
        """Best utilization while the pool was at its largest (the issue's 'utilization at peak')."""
        top = max(self.slots)
        return max(u for u, s in zip(self.utilization, self.slots, strict=True) if s == top)


def _pass(engine, requests: list[PreparedRequest], concurrency: int, tag: str) -> dict:
    sampler = KVSampler()
    engine.ledger.reset_peak()  # the pass's own peak
    with PhaseMemoryProbe() as mem:
        wall, timings, extra = run_fitllm(engine, requests, concurrency, tag, on_step=sampler)
    tpot = [t.tpot for t in timings if t.tpot is not None]
    out_tokens = sum(t.output_tokens for t in timings)
    util = sampler.utilization
    return {
        "ledger_peak_bytes": engine.ledger.peak_total,
        "ledger_kv_peak_slots": max(sampler.slots),
        "rss_peak_bytes": mem.result.peak,
        "rss_growth_bytes": mem.result.growth,
        "kv_utilization_mean": sum(util) / len(util),
        "kv_utilization_peak": max(util),
        "kv_utilization_at_peak_slots": sampler.at_peak(),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_mean_s": sum(tpot) / len(tpot),
        "output_tok_per_s": out_tokens / wall,
        "wall_s": wall,
        "preemptions": extra["preemptions"],
        "slabs_at_end": engine.pool.num_slabs,
    }


def run(args: argparse.Namespace) -> int:
    from fitllm.cli import engine_config_from_args
    from fitllm.engine.engine import Engine

    base = engine_config_from_args(args)
    engines = {
        "static": Engine(dataclasses.replace(base, static_kv=True)),
        "elastic": Engine(dataclasses.replace(base, static_kv=False)),
    }
    tok = engines["static"].tokenizer
    workload = load_workload(args.workload, args.text)[: args.num_requests]
    prepared = [
        PreparedRequest(w.id, tok.encode(w.prompt), w.max_tokens, w.temperature, w.top_p, w.seed)
        for w in workload
    ]
    warm = [dataclasses.replace(r, id=f"w-{r.id}", max_tokens=4) for r in prepared[:2]]
    for engine in engines.values():
        run_fitllm(engine, warm, 2, "warmup")
    results = {name: _pass(engine, prepared, args.concurrency, name) for name, engine in engines.items()}
    s, e = results["static"], results["elastic"]
    summary = {
        "peak_ledger_reduction": 1 - e["ledger_peak_bytes"] / s["ledger_peak_bytes"],
        "tpot_ratio": e["tpot_mean_s"] / s["tpot_mean_s"],
        "throughput_ratio": e["output_tok_per_s"] / s["output_tok_per_s"],
    }
    print(f"fitllm bench memory  {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"{len(prepared)} requests, {args.concurrency} concurrent, max_model_len {engines['static'].max_model_len}, "
        f"dtype {engines['static'].dtype}"
    )
    header = f"{'pool':8} {'ledger peak':>12} {'RSS growth':>10} {'KV util mean':>13} {'util at peak':>13} {'TPOT p50':>9} {'tok/s':>7} {'preempt':>7}"
    print(header)
    for name, r in results.items():
        rss = r["rss_growth_bytes"] / MiB
        print(
            f"{name:8} {r['ledger_peak_bytes'] / MiB:9.0f} MiB {rss:6.0f} MiB {r['kv_utilization_mean']:13.1%} "
            f"{r['kv_utilization_at_peak_slots']:13.1%} {r['tpot_p50_s'] * 1000:6.1f} ms {r['output_tok_per_s']:7.1f} {r['preemptions']:7d}"
        )
    print(
        f"elastic vs static: peak ledger {summary['peak_ledger_reduction']:.1%} lower, "
        f"TPOT x{summary['tpot_ratio']:.3f}, throughput x{summary['throughput_ratio']:.3f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, **results}, indent=2))
    return 0
