"""`fitllm bench structured`: the cost of structured output on a decode step: the same batch decoded free,
with every request under a JSON grammar, and half and half; plus the grammar work alone (compile, and the
mask fill + apply per step at this batch).

The grammar is JSON lines of a small object, repeated far past the steps timed (a regex), so no request
finishes inside the measurement: each step pays one mask per constrained row. Free requests in a batch pay
one scan of the batch for constrained rows; "free" here runs the same code a branch without structured
output would, except that scan, so the free rows of "mixed" against "free" is the figure for requests without
a constraint. All engines are built in one process and timed in alternating rounds, each step split into forward, logits,
sample and host time (benchmarks/decode_step.py, step_probe.py): the masks are in "sample".
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time

from benchmarks.decode_step import add_arguments as add_step_arguments
from benchmarks.decode_step import decoding_engine, median_split, split_rounds

# A JSON object per line, many lines: the masks of a JSON document (keys, strings, digits, punctuation).
JSON_LINES = r'(\{"name": "[A-Za-z ]{1,16}", "age": [0-9]{1,2}, "tags": \["[a-z]{1,8}"(, "[a-z]{1,8}"){0,2}\]\}\n){500}'


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_step_arguments(p)


def grammar_costs(engine, spec, batch: int, steps: int = 50) -> dict[str, float]:
    """Compile time (a cache miss), and the masks of `batch` rows per step (fill, then apply to random
    logits) while each matcher follows a valid document, in microseconds."""
    import torch

    from fitllm.engine.structured.masks import apply_constraints

    engine.grammars._cache.clear()
    t0 = time.perf_counter()
    engine.grammars.compile(spec)
    compile_ms = (time.perf_counter() - t0) * 1e3

    class Row:  # what the sampler reads of a request
        def __init__(self, constraint):
            self.constraint = constraint

    rows = [Row(engine.grammars.constraint(spec)) for _ in range(batch)]
    line = '{"name": "Ada", "age": 36, "tags": ["math", "poet"]}\n' * 20
    ids = engine.tokenizer.encode(line, add_special_tokens=False)[:steps]
    logits = torch.randn(batch, engine.model_config.vocab_size)
    fill = total = 0.0
    for tok in ids:
        t0 = time.perf_counter()
        engine.sampler.masks.fill(rows, logits.shape[1])
        t1 = time.perf_counter()
        apply_constraints(engine.sampler.masks, logits, rows, None)
        t2 = time.perf_counter()
        fill, total = fill + t1 - t0, total + t2 - t0
        for r in rows:
            r.constraint.accept(tok)
    return {"compile_ms": compile_ms, "fill_us": fill / len(ids) * 1e6, "mask_us": total / len(ids) * 1e6}


def run(args: argparse.Namespace) -> int:
    from fitllm.args import engine_config_from_args
    from fitllm.engine.structured.spec import StructuredOutput

    cfg = engine_config_from_args(args)
    spec = StructuredOutput("regex", JSON_LINES)
    steps = args.rounds * (args.steps + 2)
    kinds = {"free": None, "json": [spec], "mixed": [spec, None]}
    engines = {
        name: decoding_engine(
            dataclasses.replace(cfg), args.text, args.batch, args.prompt_tokens, steps, greedy=args.greedy,
            structured=structured,
        )
        for name, structured in kinds.items()
    }  # fmt: skip
    splits = split_rounds(engines, args.rounds, args.steps)
    times = {n: [r["step"] for r in rounds] for n, rounds in splits.items()}
    medians = {n: statistics.median(ts) for n, ts in times.items()}
    parts = {n: median_split(rounds) for n, rounds in splits.items()}
    for name, ts in times.items():
        p = parts[name]
        print(
            f"{name:6} {medians[name]:8.2f} ms/step (forward {p['forward']:.2f}, logits {p['logits']:.2f}, "
            f"sample {p['sample']:.2f}, host {p['host']:.2f})  rounds: {', '.join(f'{t:.2f}' for t in ts)}"
        )
    costs = {b: grammar_costs(engines["json"], spec, b) for b in (1, args.batch)}
    for b, c in costs.items():
        print(
            f"grammar alone, batch {b}: compile {c['compile_ms']:.1f} ms; per step fill {c['fill_us']:.0f} us, "
            f"fill + apply {c['mask_us']:.0f} us"
        )
    result = {
        "json_over_free": medians["json"] / medians["free"],
        "mixed_over_free": medians["mixed"] / medians["free"],
        "ms_per_step": times,
        "split_ms_median": parts,
        "grammar_costs": costs,
    }
    print(
        f"json / free {result['json_over_free']:.3f}, mixed / free {result['mixed_over_free']:.3f}  (batch "
        f"{args.batch}, {args.steps} steps x {args.rounds} rounds, {'greedy' if args.greedy else 'sampled'})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
