"""`fitllm bench step`: time of one decode step for a batch of running requests, static vs elastic KV pool.

Both engines are built in one process and measured alternately, so the ratio is what to read; the absolute
milliseconds depend on the machine. Prompts are cut from the novel so that the batch's KV spans several
slabs of the elastic pool (the case where its reads could cost more than the static pool's).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path

from benchmarks.step_probe import host_split_text
from benchmarks.workload import DEFAULT_TEXT


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--text", type=Path, metavar="PATH", default=DEFAULT_TEXT, help="text the prompts are cut from"
    )
    g.add_argument("--batch", type=int, default=32, help="running requests decoded together")
    g.add_argument("--prompt-tokens", type=int, default=250, help="prompt length of each request (roughly)")
    g.add_argument("--steps", type=int, default=10, help="decode steps timed per round")
    g.add_argument("--rounds", type=int, default=3, help="alternating rounds (static, elastic)")
    g.add_argument(
        "--greedy", action="store_true", help="greedy requests (default: temperature 0.8, top-p 0.9)"
    )
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


def decoding_engine(
    cfg,
    text: Path,
    batch: int,
    prompt_tokens: int,
    decode_steps: int,
    banned_strings: list[str] | None = None,
    greedy: bool = False,
    structured: list | None = None,
):
    """An Engine with `batch` requests (prompts of about `prompt_tokens` cut from `text`) prefilled and two
    steps into decoding, with room for `decode_steps` more: every later step is a pure decode step.
    Requests sample (temperature 0.8, top-p 0.9, seeded) unless `greedy`; every request bans
    `banned_strings` (fitllm bench banned); request i is constrained by `structured[i % len(structured)]`
    (a StructuredOutput or None; fitllm bench structured)."""
    from fitllm.engine.engine import Engine
    from fitllm.engine.request import SamplingParams

    engine = Engine(cfg)
    ids = engine.tokenizer.encode(text.read_text(encoding="utf-8")[10000:200000])
    for i in range(batch):
        start = i * 50
        engine.add_request(
            ids[start : start + prompt_tokens + 7 * i],
            SamplingParams(
                temperature=0.0 if greedy else 0.8,
                top_p=1.0 if greedy else 0.9,
                max_tokens=decode_steps + 8,
                ignore_eos=True,
                seed=None if greedy else i,
                banned_strings=list(banned_strings or []),
                structured_output=structured[i % len(structured)] if structured else None,
            ),
        )
    while any(r.num_computed_tokens < r.num_prompt_tokens for r in engine.requests.values()):
        engine.step()
    for _ in range(2):
        engine.step()
    return engine


def _engine(args: argparse.Namespace, static: bool):
    from fitllm.args import engine_config_from_args

    cfg = dataclasses.replace(engine_config_from_args(args), static_kv=static)
    decode_steps = args.rounds * (args.steps + 2)
    return decoding_engine(cfg, args.text, args.batch, args.prompt_tokens, decode_steps, greedy=args.greedy)


def timed_rounds(engines: dict, rounds: int, steps: int) -> dict[str, list[float]]:
    """Seconds per step of each engine, `rounds` times, the engines taking turns (so a shared machine's
    noise falls on all of them alike)."""
    times: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                engine.step()
            times[name].append((time.perf_counter() - t0) / steps)
    return times


def split_rounds(engines: dict, rounds: int, steps: int) -> dict[str, list[dict[str, float]]]:
    """As `timed_rounds`, each round's milliseconds per step split into forward, logits, sample and the
    host's rest (benchmarks/step_probe.py)."""
    from benchmarks.step_probe import StepProbe, timed_steps

    probes = {name: StepProbe.attach(engine) for name, engine in engines.items()}
    out: dict[str, list[dict[str, float]]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, engine in engines.items():
            out[name].append(timed_steps(engine, probes[name], steps))
    return out


def median_split(rounds: list[dict[str, float]]) -> dict[str, float]:
    """Each part's median over the rounds."""
    return {k: statistics.median(r[k] for r in rounds) for k in rounds[0]}


def run(args: argparse.Namespace) -> int:
    engines = {"static": _engine(args, True), "elastic": _engine(args, False)}
    splits = split_rounds(engines, args.rounds, args.steps)
    result = {
        name: {
            "step_ms_median": statistics.median(r["step"] for r in rounds),
            "step_ms_rounds": [r["step"] for r in rounds],
            "split_ms_median": median_split(rounds),
            "slabs": engines[name].pool.num_slabs,
            "storage": engines[name].storage.mode,
            "kv_bytes": engines[name].storage.bytes_allocated,
        }
        for name, rounds in splits.items()
    }
    ratio = result["elastic"]["step_ms_median"] / result["static"]["step_ms_median"]
    for name, r in result.items():
        split = r["split_ms_median"]
        print(
            f"{name:8} {r['step_ms_median']:7.1f} ms/step  ({r['slabs']} slab(s), {r['storage']}, "
            f"KV {r['kv_bytes'] / 2**20:.0f} MiB)  forward {split['forward']:.2f}  logits {split['logits']:.2f}  "
            f"sample {split['sample']:.2f}  host {split['host']:.2f} ms ({host_split_text(split)})"
        )
    print(
        f"elastic / static time per step: {ratio:.3f}  (batch {args.batch}, {args.steps} steps x {args.rounds} rounds)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ratio": ratio, **result}, indent=2))
    return 0
