"""`fitllm bench quant`: decode tokens/s of each weight quantization (and KV cache dtype) at batch 1 and 16.

Every configuration is built in one process and timed in alternating rounds (none, int8, int4, ...,
then again), so the ratios against the unquantized model are what to read on a shared machine; absolute
tokens/s only mean something on a quiet one. Each step decodes one token for every request of the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from benchmarks.decode_step import decoding_engine, median_split, split_rounds
from benchmarks.step_probe import host_split_text
from benchmarks.workload import DEFAULT_TEXT

DEFAULT_CONFIGS = "none,int8,int4,bnb-int8,bnb-nf4,none+kv-int8,none+kv-fp8"


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--text", type=Path, metavar="PATH", default=DEFAULT_TEXT, help="text the prompts are cut from"
    )
    g.add_argument(
        "--configs",
        default=DEFAULT_CONFIGS,
        help="comma-separated: a --quantization value, int4 optionally with :GROUP_SIZE (int4:64), "
        "then optionally +kv-int8 / +kv-fp8 (--kv-cache-dtype) and +head-model / +head-int8 (--lm-head-dtype)",
    )
    g.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    g.add_argument("--prompt-tokens", type=int, default=200, help="prompt length of each request (roughly)")
    g.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    g.add_argument("--rounds", type=int, default=5, help="alternating rounds over the configurations")
    g.add_argument(
        "--greedy", action="store_true", help="greedy requests (default: temperature 0.8, top-p 0.9)"
    )
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


def _config(args: argparse.Namespace, name: str):
    """The engine config of one --configs entry, METHOD[:GROUP_SIZE][+kv-DTYPE][+head-DTYPE] (as `bench
    load` names int4's group: int4:32); without a group, --quant-group-size or int4's default applies;
    without a kv, --kv-cache-dtype; without a head, --lm-head-dtype."""
    from fitllm.args import engine_config_from_args

    spec, *extras = name.split("+")
    options = {}
    for extra in extras:
        key, _, value = extra.partition("-")
        if key not in ("kv", "head") or not value:
            raise ValueError(f"--configs {name!r}: expected +kv-DTYPE or +head-DTYPE after the method")
        options[key] = value
    kv = options.get("kv")
    method, colon, group = spec.partition(":")
    config = engine_config_from_args(args)
    if colon:
        if method != "int4" or not group.isdigit():
            raise ValueError(
                f"--configs {name!r}: only int4 takes a group size, as int4:GROUP_SIZE (e.g. int4:32)"
            )
        config = dataclasses.replace(config, quant_group_size=int(group))
    return dataclasses.replace(
        config,
        quantization=None if method == "none" else method,
        kv_cache_dtype=kv or config.kv_cache_dtype,
        lm_head_dtype=options.get("head", config.lm_head_dtype),
    )


def run(args: argparse.Namespace) -> int:
    configs = [c.strip() for c in args.configs.split(",") if c.strip()]
    batches = [int(b) for b in args.batches.split(",")]
    result: dict[str, dict] = {}
    for batch in batches:
        engines = {
            name: decoding_engine(
                _config(args, name),
                args.text,
                batch,
                args.prompt_tokens,
                args.rounds * args.steps,
                greedy=args.greedy,
            )
            for name in configs
        }
        splits = split_rounds(engines, args.rounds, args.steps)
        rates = {name: [batch * 1000 / r["step"] for r in rounds] for name, rounds in splits.items()}
        base = statistics.median(rates[configs[0]])
        for name in configs:
            tps = statistics.median(rates[name])
            result.setdefault(name, {})[f"batch_{batch}"] = {
                "tokens_per_s_median": tps,
                "tokens_per_s_rounds": rates[name],
                f"ratio_vs_{configs[0]}": tps / base,
                "weight_bytes": engines[name].ledger.current("weights"),
                "split_ms_median": (split := median_split(splits[name])),
            }
            print(
                f"batch {batch:3}  {name:16} {tps:8.1f} tok/s  x{tps / base:.3f} vs {configs[0]}  "
                f"(per step: forward {split['forward']:.2f}, logits {split['logits']:.2f}, "
                f"sample {split['sample']:.2f}, host {split['host']:.2f} ms: {host_split_text(split)})"
            )
        del engines
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0
