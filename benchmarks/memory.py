"""`fitllm bench memory`: static versus elastic KV allocation on the creative-writing workload.

The same requests run through two engines in one process: one with the whole KV pool allocated up front
(`--static-kv`, sized for max_num_seqs full-length requests, as engines that preallocate do) and one with
the elastic pool. Two kinds of pass:

- memory passes, one engine at a time: peak ledger bytes, the process's RSS growth during the pass,
  average and peak KV utilization (tokens whose K/V is held / token slots allocated);
- timing passes, both engines stepped alternately (benchmarks/closed_loop.py), each request timed on its
  own engine's clock: time per output token and throughput, side by side under the same machine noise.
  Both engines schedule the same requests identically, so their step i does the same work; the paired
  step-time ratio is reported besides the TPOT ratio.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
from pathlib import Path

from benchmarks.closed_loop import ClosedLoop, run_alternating
from benchmarks.hf_baseline import PreparedRequest
from benchmarks.measure import MiB, percentile
from benchmarks.throughput import run_fitllm
from benchmarks.workload import add_workload_arguments, load_workload
from fitllm.memory.host import PhaseMemoryProbe


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    add_workload_arguments(g)
    g.add_argument("--concurrency", type=int, default=16, help="requests in flight")
    g.add_argument("--num-requests", type=int, default=64, help="first N workload requests")
    g.add_argument("--timing-rounds", type=int, default=2, help="alternating timing passes")
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


class KVSampler:
    """Per-step KV utilization of one engine, read from Engine.last_step (right after the model ran, so a
    request finishing in that step still counts the tokens it attended to)."""

    def __init__(self) -> None:
        self.utilization: list[float] = []
        self.slots: list[int] = []

    def __call__(self, engine) -> None:
        stats = engine.last_step
        if stats is not None and stats.kv_tokens:
            self.slots.append(stats.kv_slots)
            self.utilization.append(stats.kv_utilization)

    def at_peak(self) -> float:
        """Utilization in the step where the pool first reached its largest size (the memory peak)."""
        return self.utilization[self.slots.index(max(self.slots))]

    def while_at_peak(self) -> float:
        """Mean utilization over every step the pool spent at its largest size."""
        top = max(self.slots)
        at = [u for u, s in zip(self.utilization, self.slots, strict=True) if s == top]
        return sum(at) / len(at)


def _memory_pass(engine, requests: list[PreparedRequest], concurrency: int, tag: str) -> dict:
    sampler = KVSampler()
    engine.ledger.reset_peak()  # the pass's own peak
    with PhaseMemoryProbe() as mem:
        _, _, extra = run_fitllm(engine, requests, concurrency, tag, on_step=sampler)
    util = sampler.utilization
    return {
        "ledger_peak_bytes": engine.ledger.peak_total,
        "ledger_kv_peak_slots": max(sampler.slots),
        "rss_peak_bytes": mem.result.peak,
        "rss_growth_bytes": mem.result.growth,
        "kv_utilization_mean": sum(util) / len(util),
        "kv_utilization_peak": max(util),
        "kv_utilization_at_peak": sampler.at_peak(),
        "kv_utilization_while_at_peak": sampler.while_at_peak(),
        "preemptions": extra["preemptions"],
        "slabs_at_end": engine.pool.num_slabs,
    }


def _timing_pass(engines: dict, requests: list[PreparedRequest], concurrency: int, tag: str) -> dict:
    loops = {
        name: ClosedLoop(engine, requests, concurrency, f"{tag}-{name}") for name, engine in engines.items()
    }
    run_alternating(list(loops.values()))
    out = {}
    for name, loop in loops.items():
        tpot = [t.tpot for t in loop.timings if t.tpot is not None]
        out[name] = {
            "tpot_mean_s": sum(tpot) / len(tpot),
            "tpot_p50_s": percentile(tpot, 50),
            "output_tok_per_s": sum(t.output_tokens for t in loop.timings) / loop.busy,
            "busy_s": loop.busy,
            "steps": len(loop.step_times),
        }
    s, e = loops["static"].step_times, loops["elastic"].step_times
    out["same_schedule"] = len(s) == len(e)
    if len(s) == len(e):
        out["paired_step_ratio"] = sum(e) / sum(s)
    return out


def run(args: argparse.Namespace) -> int:
    from fitllm.args import engine_config_from_args
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
    results = {
        name: _memory_pass(engine, prepared, args.concurrency, name) for name, engine in engines.items()
    }
    rounds = [_timing_pass(engines, prepared, args.concurrency, f"t{i}") for i in range(args.timing_rounds)]
    for name in engines:
        for key in ("tpot_mean_s", "tpot_p50_s", "output_tok_per_s"):
            results[name][key] = sum(r[name][key] for r in rounds) / len(rounds)
    s, e = results["static"], results["elastic"]
    summary = {
        "peak_ledger_reduction": 1 - e["ledger_peak_bytes"] / s["ledger_peak_bytes"],
        "tpot_ratio": e["tpot_mean_s"] / s["tpot_mean_s"],
        "tpot_ratio_per_round": [r["elastic"]["tpot_mean_s"] / r["static"]["tpot_mean_s"] for r in rounds],
        "paired_step_ratio_per_round": [r.get("paired_step_ratio") for r in rounds],
        "throughput_ratio": e["output_tok_per_s"] / s["output_tok_per_s"],
    }
    print(f"fitllm bench memory  {datetime.datetime.now().astimezone().isoformat(timespec='seconds')}")
    print(
        f"{len(prepared)} requests, {args.concurrency} concurrent, max_model_len {engines['static'].max_model_len}, "
        f"dtype {engines['static'].dtype}, KV slabs of {engines['elastic'].storage.slab_bytes / MiB:.1f} MiB; "
        f"timing: {args.timing_rounds} alternating round(s)"
    )
    header = (
        f"{'pool':8} {'ledger peak':>12} {'RSS growth':>10} {'KV util mean':>13} {'util at peak':>13} "
        f"{'while at peak':>14} {'TPOT mean':>10} {'tok/s':>7} {'preempt':>7}"
    )
    print(header)
    for name, r in results.items():
        rss = r["rss_growth_bytes"] / MiB
        print(
            f"{name:8} {r['ledger_peak_bytes'] / MiB:9.0f} MiB {rss:6.0f} MiB {r['kv_utilization_mean']:13.1%} "
            f"{r['kv_utilization_at_peak']:13.1%} {r['kv_utilization_while_at_peak']:14.1%} {r['tpot_mean_s'] * 1000:7.1f} ms {r['output_tok_per_s']:7.1f} {r['preemptions']:7d}"
        )
    per_round = ", ".join(f"x{x:.3f}" for x in summary["tpot_ratio_per_round"])
    paired = ", ".join("-" if x is None else f"x{x:.3f}" for x in summary["paired_step_ratio_per_round"])
    print(
        f"elastic vs static: peak ledger {summary['peak_ledger_reduction']:.1%} lower, "
        f"TPOT x{summary['tpot_ratio']:.3f} (rounds: {per_round}; paired steps: {paired}), "
        f"throughput x{summary['throughput_ratio']:.3f}"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary": summary, **results, "timing_rounds": rounds}, indent=2))
    return 0
