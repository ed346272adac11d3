"""`fitllm bench ...`: one row per benchmark (subcommand, module, help, whether it takes engine flags).

Each module has `add_arguments(parser)` and `run(args) -> exit code`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

BENCHMARKS: tuple[tuple[str, str, str, bool], ...] = (
    ("throughput", "benchmarks.throughput", "creative-writing workload: fitllm vs transformers", True),
    ("memory", "benchmarks.memory", "static vs elastic KV pool: peak bytes, KV utilization, TPOT", True),
    (
        "tp-broadcast",
        "benchmarks.tp_broadcast",
        "a tensor-parallel step's input broadcast on gloo: pickled message vs one packed tensor, per batch",
        False,
    ),
    ("step", "benchmarks.decode_step", "one decode step's time: static vs elastic KV pool", True),
    (
        "layer-split",
        "benchmarks.layer_split_step",
        "one decode step's time: one device vs split over --layer-split's devices; the hops' share",
        True,
    ),
    (
        "banned",
        "benchmarks.banned_step",
        "one decode step's time: no banned strings vs 3 on every request",
        True,
    ),
    (
        "structured",
        "benchmarks.structured_step",
        "one decode step's time: free vs every request under a JSON grammar vs half; compile and mask costs",
        True,
    ),
    (
        "attention",
        "benchmarks.cpu_attention",
        "one layer's decode attention per context length and batch: the torch backend vs bf16 bmm",
        False,
    ),
    (
        "quant",
        "benchmarks.quant_decode",
        "decode tokens/s per weight quantization and KV dtype, side by side",
        True,
    ),
    (
        "int8-linear",
        "benchmarks.int8_linear",
        "int8 and int4 linears vs bfloat16 by rows per call: each path, and the weight bytes read per second",
        False,
    ),
    (
        "load",
        "benchmarks.load_peak",
        "host memory peak of loading with each quantization vs the bound",
        False,
    ),
    (
        "offload",
        "benchmarks.offload",
        "decode tokens/s as the offloaded share of layers goes 0 -> 100%%, against the prediction",
        True,
    ),
    (
        "roofline",
        "benchmarks.roofline",
        "batch-1 decode tokens/s vs the bandwidth roofline on a random-weight Llama (GPU), fitllm vs transformers",
        False,
    ),
    (
        "fullsize",
        "benchmarks.fullsize",
        "a published config.json in random weights: planned vs measured memory under a budget",
        False,
    ),
    (
        "cpu",
        "benchmarks.cpu",
        "CPU decode, prefill and serving vs llama.cpp on the same GGUF and threads (issue 24's targets)",
        True,
    ),
    (
        "serve",
        "benchmarks.serve_load",
        "load test: every trace request as a concurrent streaming client",
        False,
    ),
    (
        "speculation",
        "benchmarks.speculation",
        "prompt-lookup speculation on vs off: the code-edit workload (greedy) and creative writing, tokens/s "
        "and acceptance at each batch size",
        True,
    ),
    (
        "story",
        "benchmarks.story",
        "long stories through the Kobold stream route as KoboldAI Lite drives it: TTFT after trimming, "
        "shift off, concurrent stories, a pause",
        False,
    ),
    (
        "story-engine",
        "benchmarks.story_engine",
        "one long story's turns at the engine, no server: a trimmed turn's first step and its shift",
        True,
    ),
    (
        "infill",
        "benchmarks.infill",
        "an editor's keystrokes through /infill: prompt tokens cached vs prefilled, time with and without the "
        "prefix cache",
        False,
    ),
)


def add_bench_commands(
    sub: argparse._SubParsersAction, add_engine_args: Callable[[argparse.ArgumentParser], None]
) -> None:
    for name, module_name, help_text, engine_flags in BENCHMARKS:
        module = importlib.import_module(module_name)
        p = sub.add_parser(name, help=help_text)
        module.add_arguments(p)
        if engine_flags:
            add_engine_args(p)
        p.set_defaults(func=module.run)
