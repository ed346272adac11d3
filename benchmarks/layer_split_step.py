"""`fitllm bench layer-split`: one decode step's time on one device vs split over `--layer-split`'s devices.

Both engines are built in one process from the same engine flags (the unsplit one without `--layer-split`,
on the first split device with the default budget) and measured alternately (`fitllm bench step`'s rounds),
so the ratio is what to read. The split engine's `HopStats` give the hops' own time per step: the hidden
state's copies into each later device and back, and the step's metadata moved to each device. On the CPU
both "devices" are the host, so this is the hop's overhead with no link in the way.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics

from benchmarks import decode_step


def add_arguments(p: argparse.ArgumentParser) -> None:
    decode_step.add_arguments(p)  # batch, prompt length, steps, rounds, --greedy, --json


def run(args: argparse.Namespace) -> int:
    from fitllm.args import engine_config_from_args
    from fitllm.engine.split_startup import split_budgets

    cfg = engine_config_from_args(args)
    if cfg.layer_split is None:
        print("fitllm bench layer-split: give --layer-split (e.g. cpu=4GiB,cpu=4GiB)")
        return 2
    devices, _ = split_budgets(cfg, cfg.resolve_device())
    steps = args.rounds * (args.steps + 2)
    build = dict(text=args.text, batch=args.batch, prompt_tokens=args.prompt_tokens, decode_steps=steps)
    unsplit_cfg = dataclasses.replace(cfg, layer_split=None, device=str(devices[0]))
    engines = {
        "unsplit": decode_step.decoding_engine(unsplit_cfg, greedy=args.greedy, **build),
        "split": decode_step.decoding_engine(cfg, greedy=args.greedy, **build),
    }
    hops = engines["split"].hops
    assert hops is not None
    before = (hops.copies, hops.seconds, hops.bytes)
    rounds = decode_step.split_rounds(engines, args.rounds, args.steps)
    timed = args.rounds * args.steps
    hop_us = 1e6 * (hops.seconds - before[1]) / timed
    copies = (hops.copies - before[0]) / timed
    hop_bytes = (hops.bytes - before[2]) / max(1, hops.copies - before[0])
    result = {
        name: {
            "step_ms_median": statistics.median(r["step"] for r in rs),
            "step_ms_rounds": [r["step"] for r in rs],
            "split_ms_median": decode_step.median_split(rs),
        }
        for name, rs in rounds.items()
    }
    ratio = result["split"]["step_ms_median"] / result["unsplit"]["step_ms_median"]
    hop_share = hop_us / 1000 / result["split"]["step_ms_median"]
    stages = [(str(s.device), s.layers.start, s.layers.stop) for s in engines["split"].stages]
    for name, r in result.items():
        print(f"{name:8} {r['step_ms_median']:7.2f} ms/step  (rounds: {r['step_ms_rounds']})")
    print(
        f"split / unsplit time per step: {ratio:.3f}; hops {hop_us:.0f} us a step ({hop_share:.2%} of it), "
        f"{copies:.0f} copies of {hop_bytes / 1024:.1f} KiB; stages {stages} (batch {args.batch}, "
        f"{args.steps} steps x {args.rounds} rounds)"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        body = {"ratio": ratio, "hop_us_per_step": hop_us, "hop_share": hop_share, "stages": stages}
        args.json.write_text(json.dumps(body | result, indent=2))
    return 0
