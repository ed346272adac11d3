"""The `fitllm` command: generate, plan, eval, bench."""

from __future__ import annotations

import argparse
import logging
import math
import sys
from collections.abc import Sequence
from pathlib import Path

from fitllm.args import add_engine_args, add_sampling_args, engine_config_from_args, sampling_params_from_args


def cmd_generate(args: argparse.Namespace) -> int:
    from fitllm.engine.engine import Engine

    params = sampling_params_from_args(args)  # validate before the model loads
    config = engine_config_from_args(args)
    if run_as_torchrun_worker(config):
        return 0
    engine = Engine(config, show_progress=sys.stderr.isatty())
    prompt = args.prompt
    if args.chat:
        prompt = engine.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    if not args.chat:
        sys.stdout.write(args.prompt)
    last = None
    for out in engine.stream(prompt, params):
        sys.stdout.write(out.outputs[0].delta_text)
        sys.stdout.flush()
        last = out
    sys.stdout.write("\n")
    if last is not None and args.verbose:
        c = last.outputs[0]
        m = last.metrics
        elapsed = m.finished_time - m.arrival_time
        print(
            f"[{len(c.token_ids)} tokens, {len(c.token_ids) / elapsed:.1f} tok/s, finish: {c.finish_reason}]",
            file=sys.stderr,
        )
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from fitllm.config import ModelConfig
    from fitllm.loader import open_model
    from fitllm.memory.offload.bandwidth import measure_offload_estimate
    from fitllm.plan.memory_plan import MemoryPlan
    from fitllm.plan.planner import DEFAULT_OVERHEAD
    from fitllm.quant import default_group_size, resolve_config

    engine_config = engine_config_from_args(args)
    path = Path(engine_config.model) if engine_config.model else None
    group_size = engine_config.quant_group_size
    if path is not None and path.suffix == ".json" and path.is_file():
        config, name = ModelConfig.from_hf_config(json.loads(path.read_text())), path.parent.name or path.name
    else:
        source = open_model(engine_config.model)
        engine_config = resolve_config(engine_config, source)  # --quantization auto, from the file
        config, name = source.config, source.path.name
        group_size = group_size or default_group_size(source.config.linear_block_type)
    device = engine_config.resolve_device()
    if engine_config.layer_split is not None:
        return print_layer_split_plan(engine_config, config, device, args.json, group_size)
    # The engine's own plan for these flags (dtype, backend, CUDA graphs decided as it decides them).
    memory = MemoryPlan.for_engine(
        engine_config, config, device, group_size=group_size, overhead=DEFAULT_OVERHEAD
    )
    plan = memory.report(name)
    if plan.placement is not None and plan.placement.offloaded:
        # Offloading: measure the links the prediction needs (a second or so).
        plan = memory.report(name, measure_offload_estimate(device, engine_config.offload_dir))
    print(json.dumps(plan.to_dict(), indent=2) if args.json else plan.table())
    return 0 if plan.fits else 1


def print_layer_split_plan(engine_config, config, device, as_json: bool, group_size: int | None) -> int:
    """`fitllm plan --layer-split`: each device's layers and figures, or why the split cannot hold it."""
    import dataclasses
    import json

    from fitllm.plan.layer_split import layer_split_plan, split_capacity, split_table
    from fitllm.plan.planner import DEFAULT_OVERHEAD

    stages, length = layer_split_plan(
        engine_config, config, device, group_size=group_size, overhead=DEFAULT_OVERHEAD
    )
    block = engine_config.block_size
    fits = not isinstance(stages, str) and split_capacity(stages, block) >= length
    if as_json:
        body = {"max_model_len": length, "fits": fits}
        if isinstance(stages, str):
            body["error"] = stages
        else:
            body["kv_capacity_tokens"] = split_capacity(stages, block)
            body["stages"] = [
                dict(dataclasses.asdict(s), device=str(s.device), layers=[s.layers.start, s.layers.stop])
                for s in stages
            ]
        print(json.dumps(body, indent=2))
    else:
        print(f"does not fit: {stages}" if isinstance(stages, str) else split_table(stages, block, length))
    return 0 if fits else 1


def run_as_torchrun_worker(config) -> bool:
    """Under torchrun every rank runs the same command; ranks above 0 become tensor-parallel workers
    (fitllm/engine/parallel/worker.py) and return True when rank 0 stops them."""
    from fitllm.distributed import rendezvous_from_env

    env = rendezvous_from_env()
    if env is None or env[0] == 0:
        return False
    from fitllm.engine.parallel.ranks import rank_threads
    from fitllm.engine.parallel.worker import run_worker

    if config.tensor_parallel_size != env[1]:
        raise ValueError(
            f"torchrun's WORLD_SIZE={env[1]} differs from --tensor-parallel-size {config.tensor_parallel_size}"
        )
    run_worker(env[0], env[1], rank_threads(config))
    return True


def cmd_serve(args: argparse.Namespace) -> int:
    from fitllm.engine.async_engine import AsyncEngine
    from fitllm.engine.engine import Engine
    from fitllm.loader import open_model
    from fitllm.server.access import AccessPolicy
    from fitllm.server.app import build_app, default_model_name
    from fitllm.server.heavy import ServerLimits
    from fitllm.server.shutdown import draining_server

    config = engine_config_from_args(args)
    if run_as_torchrun_worker(config):
        return 0
    # A checkpoint that cannot load (missing, corrupt, lying sizes) is one error here, before the port
    # opens; the engine then builds from the same opened source.
    source = open_model(config.model)
    engine = AsyncEngine(
        config,
        max_waiting_requests=args.max_waiting_requests,
        engine_factory=lambda cfg: Engine(cfg, source=source),
    )
    name = args.served_model_name or default_model_name(args.model)
    access = AccessPolicy.build(args.allowed_hosts, args.allowed_origins, bound_host=args.host)
    limits = ServerLimits(max_prompt_chars=args.max_prompt_chars, shutdown_timeout_s=args.shutdown_timeout)
    app = build_app(
        engine,
        name,
        args.api_key,
        access=access,
        scheduling_policy=args.scheduling_policy,
        limits=limits,
        smart_context_share=args.smart_context_share,
    )
    print(f"fitllm: serving {name} on http://{args.host}:{args.port} (loading the model...)", file=sys.stderr)
    draining_server(app, host=args.host, port=args.port, log_level=args.log_level.lower()).run()
    return 0 if engine.error is None else 1


def _smart_context_share(text: str) -> float:
    """--smart-context-share's value, or argparse's error naming the flag."""
    from fitllm.server.story_trim import check_share

    try:
        return check_share(float(text))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"must be a number at least 0 and below 1; got {text!r}") from exc


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fitllm", description="fitllm: an LLM engine that fits the memory it is given."
    )
    parser.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING, ERROR")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt, streamed to the terminal")
    gen.add_argument("prompt", help="the text to continue")
    gen.add_argument(
        "--chat", action="store_true", help="wrap the prompt as a user message with the chat template"
    )
    gen.add_argument("-v", "--verbose", action="store_true", help="print token count and speed at the end")
    add_engine_args(gen)
    add_sampling_args(gen)
    gen.set_defaults(func=cmd_generate)

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server (and /metrics, /health)")
    srv.add_argument("--host", default="127.0.0.1", help="interface to bind (0.0.0.0 for all)")
    srv.add_argument("--port", type=int, default=7860, help="TCP port")
    srv.add_argument("--api-key", default=None, help="require Authorization: Bearer KEY on API routes")
    srv.add_argument(
        "--served-model-name", default=None, help="model id in the API (default: the file's name)"
    )
    srv.add_argument(
        "--max-waiting-requests",
        type=int,
        default=256,
        help="queued requests beyond which the server answers 503",
    )
    srv.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="after SIGTERM/SIGINT, how long running requests may finish before they end with an error "
        "(requests not started are refused at once, new ones get 503)",
    )
    srv.add_argument(
        "--max-prompt-chars",
        type=int,
        default=None,
        help="longest prompt in characters, refused (400) before tokenizing "
        "(default: the context length x 32)",
    )
    srv.add_argument(
        "--allowed-hosts",
        action="append",
        metavar="NAME[,NAME...]",
        help="Host names the server answers besides localhost, IP addresses and the --host name "
        "(.example.com: every subdomain; *: any, which turns off the DNS-rebinding guard)",
    )
    srv.add_argument(
        "--allowed-origins",
        action="append",
        metavar="ORIGIN[,ORIGIN...]",
        help="web page origins that may call the API from a browser besides the server's own pages, e.g. "
        "null (a page opened from a file, as KoboldAI Lite's) or http://localhost:5001 (*: any)",
    )
    srv.add_argument(
        "--scheduling-policy",
        choices=["fcfs", "priority"],
        default="fcfs",
        help="fcfs: first come, first served, and a request's priority field is refused; priority: "
        "requests' priority (lower first) orders admission and preemption",
    )
    srv.add_argument(
        "--smart-context-share",
        type=_smart_context_share,
        default=0.5,
        metavar="SHARE",
        help="when a story outgrows the context and no context shift can reuse it (shift off, or a model "
        "that cannot shift), the Kobold routes and the studio cut this share of the story's room at once, "
        "so the next turns append to a cached prefix (KoboldCpp's SmartContext); 0: cut token-exact",
    )
    add_engine_args(srv)
    srv.set_defaults(func=cmd_serve)

    plan = sub.add_parser("plan", help="what a model needs and whether it fits a budget, before loading it")
    add_engine_args(plan)
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(func=cmd_plan)

    bench = sub.add_parser("bench", help="benchmarks (see docs/benchmarks.md)")
    from benchmarks.commands import add_bench_commands

    add_bench_commands(bench.add_subparsers(dest="bench", required=True), add_engine_args)

    ev = sub.add_parser("eval", help="quality evaluation")
    ev_sub = ev.add_subparsers(dest="eval", required=True)
    ppl = ev_sub.add_parser("perplexity", help="sliding-window perplexity over a text file")
    ppl.add_argument(
        "--text", type=Path, required=True, help="UTF-8 text (Project Gutenberg header/footer dropped)"
    )
    ppl.add_argument("--context", type=int, default=1024, help="tokens per window")
    ppl.add_argument("--stride", type=int, default=512, help="tokens between window starts")
    ppl.add_argument("--max-tokens", type=int, default=None, help="score only the first N tokens of the text")
    ppl.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    add_engine_args(ppl)
    ppl.set_defaults(func=cmd_eval_perplexity)
    cs = ev_sub.add_parser(
        "context-shift",
        help="perplexity of a story's continuations after context shifts vs recomputed K/V",
    )
    cs.add_argument(
        "--text", type=Path, required=True, help="UTF-8 text (Project Gutenberg header/footer dropped)"
    )
    cs.add_argument("--context", type=int, default=1024, help="the session's context in tokens")
    cs.add_argument("--memory", type=int, default=64, help="tokens kept at the front (memory)")
    cs.add_argument("--turn", type=int, default=64, help="tokens each turn adds")
    cs.add_argument("--trim", type=int, default=64, help="story tokens dropped after memory at each trim")
    cs.add_argument("--turns", type=int, default=30, help="turns scored after trimming starts")
    cs.add_argument("--json", type=Path, default=None, metavar="PATH", help="also write the result as JSON")
    add_engine_args(cs)
    cs.set_defaults(func=cmd_eval_context_shift)
    return parser


def cmd_eval_context_shift(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from fitllm.engine.context_shift import context_shift_unsupported
    from fitllm.engine.engine import Engine
    from fitllm.eval.context_shift import evaluate_shift
    from fitllm.eval.perplexity import read_text

    if not args.text.is_file():
        print(f"--text {args.text}: no such file", file=sys.stderr)
        return 2
    config = engine_config_from_args(args)
    if config.tensor_parallel_size > 1:
        print("fitllm eval context-shift runs on one device: drop --tensor-parallel-size", file=sys.stderr)
        return 2
    config.max_model_len = max(args.context, 2)
    engine = Engine(config)
    reason = context_shift_unsupported(engine.model_config)
    if reason is not None:
        print(f"this model cannot shift its cache: {reason}", file=sys.stderr)
        return 2
    ids = engine.tokenizer.encode(read_text(args.text))

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} turns", end="", file=sys.stderr, flush=True)

    try:
        result = evaluate_shift(
            engine.model, engine.model_config, engine.device, engine.kv_format, ids,
            args.context, args.memory, args.turn, args.trim, args.turns, progress,
        )  # fmt: skip
    except ValueError as exc:
        print(exc, file=sys.stderr)
        return 2
    print(file=sys.stderr)
    print(
        f"model {engine.source.path.name}, dtype {engine.dtype}, KV cache {engine.kv_format.name}; context "
        f"{args.context}, memory {args.memory}, turn {args.turn}, trim {args.trim}"
    )
    print("turn  trims  ppl shifted  ppl recomputed")
    for t in result.turns:
        print(
            f"{t.turn:4d}  {t.trims:5d}  {math.exp(t.nll_shifted / t.num_tokens):11.3f}  "
            f"{math.exp(t.nll_recomputed / t.num_tokens):14.3f}"
        )
    ratio = result.perplexity_shifted / result.perplexity_recomputed
    print(
        f"perplexity over {result.num_scored} tokens: shifted {result.perplexity_shifted:.4f}, recomputed "
        f"{result.perplexity_recomputed:.4f} (x{ratio:.4f})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = dataclasses.asdict(result) | {
            "perplexity_shifted": result.perplexity_shifted,
            "perplexity_recomputed": result.perplexity_recomputed,
            "model": str(engine.source.path),
            "dtype": str(engine.dtype),
            "kv_cache_dtype": engine.kv_format.name,
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def cmd_eval_perplexity(args: argparse.Namespace) -> int:
    import dataclasses
    import json

    from fitllm.engine.engine import Engine
    from fitllm.engine.scorer import SequenceScorer
    from fitllm.eval.perplexity import perplexity, read_text
    from fitllm.memory.host import PhaseMemoryProbe
    from fitllm.units import format_bytes

    if not args.text.is_file():
        print(f"--text {args.text}: no such file", file=sys.stderr)
        return 2
    config = engine_config_from_args(args)
    config.max_model_len = max(args.context, 2)
    with PhaseMemoryProbe() as load:
        engine = Engine(config)
    ids = engine.tokenizer.encode(read_text(args.text))
    if args.max_tokens is not None:
        ids = ids[: args.max_tokens]
    scorer = SequenceScorer(
        engine.model, engine.kv_config, engine.device, args.context, engine.kv_format, engine.tp
    )

    def progress(done: int, total: int) -> None:
        print(f"\r{done}/{total} tokens", end="", file=sys.stderr, flush=True)

    result = perplexity(scorer, ids, args.stride, progress)
    print(file=sys.stderr)
    weights = engine.ledger.current("weights")
    quant = engine.quant.describe()
    head = engine.quant.head.describe() if engine.quant.head is not None else "model dtype"
    print(
        f"model {engine.source.path.name}, dtype {engine.dtype}, weights {quant}, LM head {head}, "
        f"KV cache {engine.kv_format.name}"
    )
    print(
        f"perplexity {result.perplexity:.4f} over {result.num_scored} tokens "
        f"({result.num_windows} windows of {result.context}, stride {result.stride})"
    )
    print(
        f"resident weights {format_bytes(weights)}; load: RSS peak +{format_bytes(load.result.peak - load.result.start)}, "
        f"after +{format_bytes(load.result.end - load.result.start)} ({load.result.method})"
    )
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        out = dataclasses.asdict(result) | {
            "model": str(engine.source.path),
            "dtype": str(engine.dtype),
            "quantization": engine.quant.name,
            "quant_group_size": getattr(engine.quant, "group_size", None),
            "lm_head_dtype": head,
            "kv_cache_dtype": engine.kv_format.name,
            "weight_bytes": weights,
            "load_rss_peak_growth": load.result.peak - load.result.start,
            "load_rss_growth": load.result.end - load.result.start,
        }
        args.json.write_text(json.dumps(out, indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    from fitllm.loader.checkpoint import CheckpointError

    try:
        return args.func(args)
    except (ValueError, CheckpointError, FileNotFoundError) as exc:
        print(f"fitllm: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
