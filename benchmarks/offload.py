"""`fitllm bench offload`: decode tokens/s as the offloaded share of decoder layers goes 0 -> 100%, against
the cost model's prediction.

One engine per offloaded fraction (--cpu-offload-gb set to that share of the layers), all built in one
process and timed in alternating rounds, so the ratios against the resident engine are what to read on
a shared machine. The prediction (fitllm/memory/offload/placement.py) takes two measured inputs: the transfer
bandwidth of the tier (a file read on CPU, pinned host -> device on CUDA), measured here, and the compute
of one layer, which is the fully resident engine's measured step time over its layer count at the same
batch. Each step decodes one token for every request of the batch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
from pathlib import Path

from benchmarks.decode_step import decoding_engine, timed_rounds
from benchmarks.workload import DEFAULT_TEXT

GIB = 1 << 30


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument(
        "--text", type=Path, metavar="PATH", default=DEFAULT_TEXT, help="text the prompts are cut from"
    )
    g.add_argument("--fractions", default="0,0.25,0.5,0.75,1", help="comma-separated offloaded shares")
    g.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    g.add_argument("--prompt-tokens", type=int, default=200, help="prompt length of each request (roughly)")
    g.add_argument("--steps", type=int, default=8, help="decode steps timed per round")
    g.add_argument("--rounds", type=int, default=5, help="alternating rounds over the fractions")
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


def _layers_bytes(cfg) -> int:
    """Resident bytes of all decoder layers for this configuration (from the planner)."""
    from fitllm.config import resolve_dtype
    from fitllm.loader import open_model
    from fitllm.plan.weights import weight_breakdown
    from fitllm.quant import get_quant_method

    source = open_model(cfg.model)
    quant = get_quant_method(
        cfg.quantization,
        cfg.quant_group_size,
        source.config.linear_block_type,
        lm_head_dtype=cfg.lm_head_dtype,
    )
    w = weight_breakdown(source.config, resolve_dtype(cfg.dtype, cfg.resolve_device()), quant)
    return source.config.num_hidden_layers * w.per_layer


def run(args: argparse.Namespace) -> int:
    from fitllm.args import engine_config_from_args
    from fitllm.memory.offload.bandwidth import measure_offload_estimate
    from fitllm.memory.offload.placement import predicted_tokens_per_s

    base = engine_config_from_args(args)
    # The resident engine comes first: its step time is the compute the prediction needs.
    fractions = [0.0] + [f for f in map(float, args.fractions.split(",")) if f != 0]
    layers_bytes = _layers_bytes(base)
    estimate = measure_offload_estimate(base.resolve_device(), base.offload_dir)
    print(f"transfer ({estimate.tier} -> device): {estimate.transfer / 1e9:.2f} GB/s measured")
    result: dict = {
        "transfer_bytes_per_s": estimate.transfer,
        "tier": estimate.tier,
        "copies_overlap_compute": estimate.overlap,
        "runs": {},
    }
    for batch in [int(b) for b in args.batches.split(",")]:
        engines = {
            f: decoding_engine(
                dataclasses.replace(base, cpu_offload_gb=f * layers_bytes / GIB),
                args.text,
                batch,
                args.prompt_tokens,
                args.rounds * args.steps,
            )
            for f in fractions
        }
        streamed0 = {f: _streamed(e) for f, e in engines.items()}
        wait0 = {f: _host_wait(e) for f, e in engines.items()}
        seconds = timed_rounds(engines, args.rounds, args.steps)
        resident_step = statistics.median(seconds[0.0])
        num_layers = engines[0.0].placement.num_layers
        for f, engine in engines.items():
            step = statistics.median(seconds[f])
            placement = engine.placement
            predicted = predicted_tokens_per_s(
                placement, estimate.transfer, resident_step / num_layers, batch, estimate.overlap
            )
            streamed = (_streamed(engine) - streamed0[f]) / sum(seconds[f]) / args.steps
            row = {
                "offloaded_layers": len(placement.offloaded),
                "num_layers": num_layers,
                "tokens_per_s_median": batch / step,
                "tokens_per_s_rounds": [batch / s for s in seconds[f]],
                "predicted_tokens_per_s": predicted,
                "ratio_vs_resident": resident_step / step,
                "bytes_streamed_per_s": streamed,
                "resident_weight_bytes": engine.ledger.current("weights"),
                "staging_bytes": engine.ledger.current("staging"),
                "host_wait_s_per_step": (_host_wait(engine) - wait0[f]) / (args.rounds * args.steps),
            }
            result["runs"].setdefault(f"batch_{batch}", {})[f"{f:g}"] = row
            print(
                f"batch {batch:3}  offloaded {len(placement.offloaded):3}/{num_layers} "
                f"{row['tokens_per_s_median']:8.1f} tok/s (x{row['ratio_vs_resident']:.3f} resident)  "
                f"predicted {predicted:8.1f}  streamed {streamed / 1e9:6.2f} GB/s"
            )
        for engine in engines.values():
            if engine.streamer is not None:
                engine.streamer.close()
        del engines
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _streamed(engine) -> int:
    return 0 if engine.streamer is None else engine.streamer.stats.bytes_streamed


def _host_wait(engine) -> float:
    return 0.0 if engine.streamer is None else engine.streamer.stats.host_wait_seconds
