"""`fitllm bench banned`: the cost of banned strings on a decode step: the same batch decoded with no banned
strings and with 3 on every request (phrases it does not write, so what is measured is the check each token
pays: the phrase search in the held-back text, whole-token release, the sampler's ban lookup; a rewind
costs the recomputed tokens on top, as a preempted request's do).

Both engines are built in one process and timed in alternating rounds (benchmarks/decode_step.py), so the
ratio is what to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from benchmarks.decode_step import add_arguments as add_step_arguments
from benchmarks.decode_step import decoding_engine, timed_rounds

PHRASES = ["shivers down her spine", "barely above a whisper", "a testament to"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_step_arguments(p)


def run(args: argparse.Namespace) -> int:
    from fitllm.args import engine_config_from_args

    cfg = engine_config_from_args(args)
    steps = args.rounds * (args.steps + 2)
    engines = {
        name: decoding_engine(
            dataclasses.replace(cfg), args.text, args.batch, args.prompt_tokens, steps, banned
        )
        for name, banned in (("none", []), ("3 phrases", PHRASES))
    }
    times = {n: [s * 1000 for s in r] for n, r in timed_rounds(engines, args.rounds, args.steps).items()}
    medians = {n: statistics.median(ts) for n, ts in times.items()}
    rewinds = sum(r.banned.num_rewinds for r in engines["3 phrases"].requests.values() if r.banned)
    for name, ts in times.items():
        print(f"{name:10} {medians[name]:7.2f} ms/step  rounds: {', '.join(f'{t:.2f}' for t in ts)}")
    ratio = medians["3 phrases"] / medians["none"]
    print(
        f"3 phrases / none time per step: {ratio:.3f}  (batch {args.batch}, {args.steps} steps x "
        f"{args.rounds} rounds; {rewinds} rewinds)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"ratio": ratio, "ms_per_step": times, "rewinds": rewinds}, indent=2))
    return 0
