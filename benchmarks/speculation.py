"""`fitllm bench speculation`: prompt-lookup speculative decoding on vs off, tokens/s and acceptance.

Workloads: the code-edit workload built from this repository's source (benchmarks/code_edit.py; greedy,
each answer ends at EOS, both engines must give the same tokens) and the creative-writing trace (sampled,
seeded, its own max_tokens). For each workload and batch size (concurrency), an engine without and one
with speculation run the same requests stepped alternately in one process (benchmarks/closed_loop.py),
each timed on its own clock, so the machine's noise falls on both: read the ratio. The load average before
and after is printed with it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path

from benchmarks.closed_loop import ClosedLoop, run_alternating
from benchmarks.code_edit import edit_tasks
from benchmarks.hf_baseline import PreparedRequest
from benchmarks.workload import add_workload_arguments, load_workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--edits", type=int, default=8, help="code-edit requests")
    p.add_argument("--edit-max-tokens", type=int, default=384, help="cap on an edit's answer")
    p.add_argument("--creative", type=int, default=16, help="creative-writing requests (the trace's first N)")
    p.add_argument("--batches", default="1,8", help="concurrencies, comma-separated")
    p.add_argument("--workloads", default="edit,creative", help="edit, creative or both")
    p.add_argument("--json", type=Path, default=None, help="write the figures here")
    add_workload_arguments(p)


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def edit_requests(tokenizer, count: int, cap: int) -> list[PreparedRequest]:
    out = []
    for task in edit_tasks(count):
        ids = tokenizer.encode(tokenizer.apply_chat_template(task.messages()), add_special_tokens=False)
        body = len(tokenizer.encode(task.source, add_special_tokens=False))
        out.append(PreparedRequest(task.id, ids, min(cap, body + 64), 0.0, 1.0, None))
    return out


def creative_requests(tokenizer, args) -> list[PreparedRequest]:
    trace = load_workload(args.workload, args.text)[: args.creative]
    return [PreparedRequest(w.id, tokenizer.encode(w.prompt), w.max_tokens, w.temperature, w.top_p, w.seed)
            for w in trace]  # fmt: skip


def compare(engines: dict, requests: list[PreparedRequest], batch: int, greedy_eos: bool) -> dict:
    """Both engines over the same requests, stepped alternately; tokens/s on each one's own clock."""
    stats_before = engines["on"].speculator.stats
    before = dataclasses.replace(stats_before)
    load_before = _load()
    loops = [
        ClosedLoop(e, requests, batch, f"{name}-b{batch}", ignore_eos=not greedy_eos)
        for name, e in engines.items()
    ]
    run_alternating(loops)
    row = {"batch": batch, "requests": len(requests), "load_before": load_before, "load_after": _load()}
    for name, loop in zip(engines, loops, strict=True):
        tokens = sum(len(t) for t in loop.outputs.values())
        row[name] = {"tokens": tokens, "seconds": loop.busy, "tokens_per_s": tokens / loop.busy,
                     "steps": len(loop.step_times)}  # fmt: skip
    s = engines["on"].speculator.stats
    drafts = s.num_draft_tokens - before.num_draft_tokens
    accepted = s.num_accepted_tokens - before.num_accepted_tokens
    row["acceptance_rate"] = accepted / drafts if drafts else 0.0
    row["draft_tokens"], row["accepted_tokens"] = drafts, accepted
    row["verify_steps"] = s.num_verify_steps - before.num_verify_steps
    row["ratio"] = row["on"]["tokens_per_s"] / row["off"]["tokens_per_s"]
    if greedy_eos:  # greedy: the same tokens, up to near-ties the k + 1 token query rounds differently
        off, on = loops[0].outputs, loops[1].outputs
        row["identical"] = f"{sum(off[i] == on[i] for i in off)}/{len(off)}"
        row["first_difference"] = {i: _common_prefix(off[i], on[i]) for i in off if off[i] != on[i]}
    return row


def _common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def run(args: argparse.Namespace) -> int:
    from fitllm.args import engine_config_from_args
    from fitllm.engine.engine import Engine

    cfg = engine_config_from_args(args)
    on_cfg = dataclasses.replace(cfg, speculative_ngram=cfg.speculative_ngram or 3)
    engines = {"off": Engine(dataclasses.replace(cfg, speculative_ngram=0)), "on": Engine(on_cfg)}
    tok = engines["off"].tokenizer
    print(
        f"speculation: --speculative-ngram {on_cfg.speculative_ngram} --speculative-ngram-min "
        f"{on_cfg.speculative_ngram_min} --speculative-tokens {on_cfg.speculative_tokens}; threads "
        f"{__import__('torch').get_num_threads()}"
    )
    rows = []
    workloads = args.workloads.split(",")
    for batch in (int(b) for b in args.batches.split(",")):
        for name in workloads:
            if name == "edit":
                row = compare(engines, edit_requests(tok, args.edits, args.edit_max_tokens), batch, True)
            elif name == "creative":
                row = compare(engines, creative_requests(tok, args), batch, False)
            else:
                raise SystemExit(f"--workloads: unknown workload {name!r} (edit, creative)")
            row["workload"] = name
            rows.append(row)
            print(
                f"{name:8} batch {batch}: off {row['off']['tokens_per_s']:6.1f} tok/s, on "
                f"{row['on']['tokens_per_s']:6.1f} tok/s, ratio {row['ratio']:.3f}; acceptance "
                f"{row['acceptance_rate']:.2f} ({row['accepted_tokens']}/{row['draft_tokens']} in "
                f"{row['verify_steps']} verify steps); steps {row['off']['steps']} vs {row['on']['steps']}"
                + (f"; identical {row['identical']}" if "identical" in row else "")
                + f"; load {row['load_before']} -> {row['load_after']}",
                flush=True,
            )
            if row.get("first_difference"):
                print(f"  greedy outputs part at output token: {row['first_difference']}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return 0
