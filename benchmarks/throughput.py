"""`fitllm bench throughput`: the creative-writing workload at N concurrent requests, fitllm vs transformers.

For each concurrency N (and each repeat), fitllm runs the first `--num-requests` workload requests with at
most N in flight (a closed loop: the next request is added as soon as one finishes), then transformers runs
the same requests as consecutive left-padded batches of N through `generate`. Both sides get the same prompt
token ids, each request's own max_tokens and ignore-EOS, in one process, with the same dtype and torch threads.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shlex
import sys
import time
from pathlib import Path

from benchmarks.closed_loop import ClosedLoop, run_closed_loop
from benchmarks.hf_baseline import PreparedRequest, RequestTiming
from benchmarks.measure import MiB, lifetime_peak_rss, machine_facts, percentile
from benchmarks.workload import add_workload_arguments, load_workload, result_path
from fitllm.memory.host import PhaseMemoryProbe

DEFAULT_CONCURRENCY = [1, 8, 32]
QUICK_CONCURRENCY = [1, 2]
QUICK_MAX_TOKENS = 16
TARGET = (32, 2.0)  # at 32 concurrent requests, at least 2x the transformers throughput
# --writers-samplers: DRY and XTC on every request (KoboldAI Lite's DRY defaults; XTC firing half the time),
# against the same requests with plain sampling, alternating; target: within 10% at 32 concurrent requests.
WRITERS = dict(
    dry_multiplier=0.8, dry_base=1.75, dry_allowed_length=2, dry_penalty_last_n=360, xtc_threshold=0.1,
    xtc_probability=0.5,
)  # fmt: skip
WRITERS_TARGET = (32, 0.9)

NOTES = [
    "output tok/s = the requests' own max_tokens summed / wall time of the whole pass (first add to last finish)",
    "TTFT = first token time - time the request was handed to the system; TPOT = (finished - first token) / (tokens - 1); "
    "fitllm's request times are on its engine's clock (time inside add_request and step, i.e. wall time less the "
    "client loop's bookkeeping)",
    "both systems get the same prompt token ids (fitllm's tokenizer, untimed); fitllm's time includes its "
    "incremental detokenization, transformers' has none",
    "fitllm: closed loop, at most N requests added, the next one added when one finishes; prefix cache reset before each pass",
    "transformers: consecutive batches of N, left-padded, one generate call each, every row runs to the batch's "
    "largest max_tokens (min_new_tokens = max_new_tokens, so EOS never ends it early); temperature and top_p are the "
    "batch's means and the call is seeded with its first request's seed (generate takes one of each per call)",
    "transformers TTFT: a streamer timestamps each decoding step; a request's arrival is its batch's start, its first "
    "token the batch's first step, its finish the step that produced its own max_tokens-th token (generous to "
    "transformers: requests of a later batch are not charged for waiting on the earlier one)",
    "pad waste = share of transformers' decoded tokens (batch x its max_new_tokens) beyond the requests' own max_tokens",
    "peak RSS = the process's high-water mark during the pass (both models are resident throughout, so it is "
    "not one system's figure); own RSS = what the system added at load (RSS after minus before) plus its growth "
    "during the pass (peak minus RSS at the pass's start); fitllm's includes its KV pool (elastic: one slab at load, grown by slabs under load)",
    "p99 over fewer than 100 requests is interpolated between the two largest values",
]


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Benchmark flags (the engine flags are added by the CLI)."""
    g = p.add_argument_group("benchmark")
    add_workload_arguments(g)
    g.add_argument(
        "--concurrency",
        type=int,
        nargs="+",
        metavar="N",
        default=None,
        help=f"requests in flight (default: {DEFAULT_CONCURRENCY})",
    )
    g.add_argument(
        "--num-requests",
        type=int,
        metavar="N",
        default=None,
        help="first N workload requests per concurrency (default: max(2 x concurrency, 8), at most the workload's "
        "size; with --quick: the concurrency)",
    )
    g.add_argument(
        "--max-tokens-cap",
        type=int,
        default=None,
        help="cap each request's max_tokens (smoke runs; --quick: 16)",
    )
    g.add_argument("--repeats", type=int, default=1, help="measured passes per concurrency and system")
    g.add_argument("--warmup-tokens", type=int, default=8, help="new tokens of the excluded warm-up pass")
    g.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    g.add_argument(
        "--writers-samplers",
        action="store_true",
        help="also run every pass with DRY + XTC on every request (alternating with plain sampling) and report "
        "the throughput ratio",
    )
    g.add_argument(
        "--quick", action="store_true", help=f"smoke run: concurrency {QUICK_CONCURRENCY}, max_tokens <= 16"
    )
    g.add_argument(
        "--json",
        type=Path,
        metavar="PATH",
        default=None,
        help="result file (default: bench-results/throughput-DATE.json)",
    )


def log(msg: str) -> None:
    """Progress to stderr, so stdout holds only the report."""
    print(msg, file=sys.stderr, flush=True)


def num_requests_for(concurrency: int, args: argparse.Namespace, available: int) -> int:
    if args.num_requests is not None:
        n = args.num_requests
    elif args.quick:
        n = concurrency
    else:
        n = max(2 * concurrency, 8)
    return max(1, min(n, available))


def run_fitllm(
    engine, requests: list[PreparedRequest], concurrency: int, tag: str, on_step=None, sampling=None
) -> tuple[float, list[RequestTiming], dict]:
    """Closed loop over Engine.step() (benchmarks/closed_loop.py); returns the pass's wall seconds, the
    requests' timings and step/preemption counts. `on_step(engine)` runs after every step, untimed;
    `sampling`: SamplingParams fields added to every request."""
    start = time.monotonic()
    loop = run_closed_loop(ClosedLoop(engine, requests, concurrency, tag, on_step, sampling))
    return time.monotonic() - start, loop.timings, loop.extra()


def summarize(
    system: str, concurrency: int, repeat: int, wall: float, timings: list[RequestTiming], mem, extra: dict
) -> dict:
    """One pass's figures (seconds, bytes), with its per-request timings."""
    ttft = [t.ttft for t in timings]
    tpot = [t.tpot for t in timings if t.tpot is not None]
    e2e = [t.finished - t.arrival for t in timings]
    useful = sum(t.output_tokens for t in timings)
    return {
        "system": system,
        "concurrency": concurrency,
        "repeat": repeat,
        "num_requests": len(timings),
        "wall_s": wall,
        "prompt_tokens": sum(t.prompt_tokens for t in timings),
        "output_tokens": useful,
        "output_tok_per_s": useful / wall,
        "ttft_p50_s": percentile(ttft, 50),
        "ttft_p99_s": percentile(ttft, 99),
        "tpot_p50_s": percentile(tpot, 50),
        "tpot_p99_s": percentile(tpot, 99),
        "e2e_p50_s": percentile(e2e, 50),
        "e2e_p99_s": percentile(e2e, 99),
        "memory": mem.as_dict(),
        **extra,
        "requests": [
            {
                "id": t.id,
                "prompt_tokens": t.prompt_tokens,
                "output_tokens": t.output_tokens,
                "cached_tokens": t.cached_tokens,
                "ttft_s": t.ttft,
                "tpot_s": t.tpot,
                "e2e_s": t.finished - t.arrival,
            }
            for t in timings
        ],
    }


def render(console, rows: list[dict], header: list[str], notes: list[str], compare: bool) -> None:
    """The results table (rich); the transformers-only columns only when there was a comparison."""
    from rich.table import Table

    def ms(v: float | None) -> str:
        return "-" if v is None else f"{v * 1000:.0f}"

    columns = [
        ("N", lambda r: str(r["concurrency"]) + (f" #{r['repeat'] + 1}" if r["repeats"] > 1 else "")),
        ("system", lambda r: r["system"]),
        ("reqs", lambda r: str(r["num_requests"])),
        ("out tok", lambda r: str(r["output_tokens"])),
        ("wall s", lambda r: f"{r['wall_s']:.1f}"),
        ("tok/s", lambda r: f"{r['output_tok_per_s']:.1f}"),
        ("TTFT p50 ms", lambda r: ms(r["ttft_p50_s"])),
        ("TTFT p99 ms", lambda r: ms(r["ttft_p99_s"])),
        ("TPOT p50 ms", lambda r: ms(r["tpot_p50_s"])),
        ("TPOT p99 ms", lambda r: ms(r["tpot_p99_s"])),
        ("peak RSS MiB", lambda r: f"{r['memory']['peak_bytes'] / MiB:.0f}"),
        ("own RSS MiB", lambda r: f"{r['own_rss_bytes'] / MiB:.0f}"),
    ]
    if compare:
        columns += [
            ("pad waste", lambda r: f"{r['pad_waste']:.0%}" if "pad_waste" in r else "-"),
            ("fitllm / hf", lambda r: f"{r['ratio']:.2f}x" if "ratio" in r else ""),
        ]
    table = Table(title="fitllm bench throughput", title_justify="left")
    for name, _ in columns:
        table.add_column(name, justify="left" if name == "system" else "right")
    for r in rows:
        table.add_row(*(cell(r) for _, cell in columns))
    for line in header:
        console.print(line, highlight=False)
    console.print(table)
    for line in notes:
        console.print(f"[dim]- {line}[/dim]", highlight=False)


def run(args: argparse.Namespace) -> int:
    """Entry point of `fitllm bench throughput`."""
    from rich.console import Console

    from benchmarks.hf_baseline import load_hf_model, pad_token_id, run_transformers
    from fitllm.args import engine_config_from_args
    from fitllm.engine.engine import Engine

    # Piped output (tee, CI logs) keeps the whole table on one screen width rather than 80 columns.
    console = Console(width=None if sys.stdout.isatty() else 200)
    concurrency = args.concurrency or (QUICK_CONCURRENCY if args.quick else DEFAULT_CONCURRENCY)
    cap = (
        args.max_tokens_cap if args.max_tokens_cap is not None else (QUICK_MAX_TOKENS if args.quick else None)
    )
    if min(concurrency) < 1 or args.repeats < 1 or (cap is not None and cap < 1):
        raise ValueError("--concurrency, --repeats and --max-tokens-cap must be at least 1")
    workload = load_workload(args.workload, args.text)

    with PhaseMemoryProbe() as load_mem:
        t0 = time.monotonic()
        engine = Engine(engine_config_from_args(args))
        fitllm_load_s = time.monotonic() - t0
    facts = machine_facts()  # after the engine, which applies --threads
    facts.update(device=str(engine.device), dtype=str(engine.dtype).removeprefix("torch."))
    if max(concurrency) > engine.config.max_num_seqs:
        log(
            f"warning: --max-num-seqs {engine.config.max_num_seqs} < concurrency {max(concurrency)}: "
            "fitllm will queue the excess"
        )
    prepared = [
        PreparedRequest(
            w.id,
            engine.tokenizer.encode(w.prompt),
            min(w.max_tokens, cap or w.max_tokens),
            w.temperature,
            w.top_p,
            w.seed,
        )
        for w in workload
    ]
    kv_bytes = (  # the live slabs at load: one, for the elastic pool
        engine.pool.num_blocks * engine.block_size * engine.kv_bytes_per_token
    )
    load = {
        "fitllm": {"seconds": fitllm_load_s, "memory": load_mem.result.as_dict(), "kv_pool_bytes": kv_bytes},
    }

    hf_model = pad_id = None
    if not args.no_hf:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        facts["transformers"] = transformers.__version__
        log(f"loading {engine.source.path.name} in transformers ({facts['dtype']})...")
        with PhaseMemoryProbe() as hf_mem:
            t0 = time.monotonic()
            hf_model = load_hf_model(engine.source.path, engine.source.format, engine.dtype, engine.device)
            hf_load_s = time.monotonic() - t0
        pad_id = pad_token_id(hf_model, engine.tokenizer.eos_token_ids)
        load["transformers"] = {"seconds": hf_load_s, "memory": hf_mem.result.as_dict()}

    # Warm-up (excluded): both sides once, two short requests, so lazy initialisation is not timed.
    warm = [
        PreparedRequest(f"warmup-{r.id}", r.prompt_ids, args.warmup_tokens, r.temperature, r.top_p, r.seed)
        for r in prepared[:2]
    ]
    run_fitllm(engine, warm, len(warm), "warmup")
    if args.writers_samplers:
        run_fitllm(engine, warm, len(warm), "warmup-writers", sampling=WRITERS)
    if hf_model is not None:
        run_transformers(hf_model, warm, len(warm), pad_id)

    rows: list[dict] = []
    for rep in range(args.repeats):
        for n in concurrency:
            reqs = prepared[: num_requests_for(n, args, len(prepared))]
            log(f"[pass {rep + 1}/{args.repeats}] N={n}: fitllm, {len(reqs)} requests...")
            with PhaseMemoryProbe() as mem:
                wall, timings, extra = run_fitllm(engine, reqs, n, f"c{n}-r{rep}")
            fit = summarize("fitllm", n, rep, wall, timings, mem.result, extra)
            rows.append(fit)
            if "all_reduce_share" in extra:
                log(
                    f"  tensor parallel: all-reduce {extra['all_reduce_share']:.1%} of step time "
                    f"({extra['all_reduce_s']:.2f} s), step broadcast {extra['broadcast_share']:.1%} "
                    f"({extra['broadcast_s']:.3f} s), logit gather {extra['gather_share']:.1%} "
                    f"({extra['gather_s']:.3f} s) over {extra['steps']} steps"
                )
            if "hop_share" in extra:
                log(
                    f"  layer split: hops {extra['hop_share']:.2%} of step time ({extra['hop_s']:.3f} s, "
                    f"{extra['hop_us_per_step']:.0f} us a step, {extra['hop_copies']} copies of "
                    f"{extra['hop_bytes'] / max(1, extra['hop_copies']) / 1024:.1f} KiB on average) "
                    f"over {extra['steps']} steps"
                )
            if args.writers_samplers:
                log(f"[pass {rep + 1}/{args.repeats}] N={n}: fitllm with DRY + XTC, {len(reqs)} requests...")
                with PhaseMemoryProbe() as mem:
                    wall, timings, extra = run_fitllm(engine, reqs, n, f"w{n}-r{rep}", sampling=WRITERS)
                writers = summarize("fitllm+dry+xtc", n, rep, wall, timings, mem.result, extra)
                writers["vs_plain"] = writers["output_tok_per_s"] / fit["output_tok_per_s"]
                rows.append(writers)
            if hf_model is None:
                continue
            log(f"[pass {rep + 1}/{args.repeats}] N={n}: transformers, {len(reqs)} requests...")
            with PhaseMemoryProbe() as mem:
                hf_run = run_transformers(hf_model, reqs, n, pad_id)
            decoded = hf_run.generated_tokens
            hf = summarize(
                "transformers",
                n,
                rep,
                hf_run.wall,
                hf_run.timings,
                mem.result,
                {
                    "decoded_tokens": decoded,
                    "pad_waste": 1 - sum(r.max_tokens for r in reqs) / decoded,
                    "padded_prompt_tokens": hf_run.padded_prompt_tokens,
                    "batches": [dataclasses.asdict(b) for b in hf_run.batches],
                },
            )
            rows.append(hf)
            fit["ratio"] = fit["output_tok_per_s"] / hf["output_tok_per_s"]
    for r in rows:
        r["repeats"] = args.repeats
        resident = load[r["system"].split("+")[0]]["memory"]
        r["own_rss_bytes"] = resident["end_bytes"] - resident["start_bytes"] + r["memory"]["growth_bytes"]

    facts["loadavg_end"] = list(os.getloadavg())
    facts["lifetime_peak_rss_bytes"] = lifetime_peak_rss()
    n_rule = (
        ("--num-requests " + str(args.num_requests))
        if args.num_requests is not None
        else ("= concurrency (--quick)" if args.quick else "= max(2 x concurrency, 8), at most the workload")
    )
    header = [
        f"[bold]fitllm bench throughput[/bold]  {facts['date']}",
        f"machine: {facts['cpu_model']} ({facts['cpus_usable']} usable of {facts['cpu_count']} CPUs; "
        f"{', '.join(facts['cpu_flags']) or 'no AVX2'}), torch {facts['torch']} with {facts['torch_threads']} threads, "
        f"load average at start {facts['loadavg_start'][0]:.2f}, at end {facts['loadavg_end'][0]:.2f}",
        f"model: {engine.source.path.name} ({engine.source.format}), dtype {facts['dtype']} on {facts['device']}"
        + (f" for both systems, transformers {facts['transformers']}" if hf_model is not None else ""),
        f"workload: {args.workload} ({len(prepared)} requests), requests per pass {n_rule}"
        + (f", max_tokens capped at {cap}" if cap else ", each request's own max_tokens")
        + ", ignore EOS",
        f"load: fitllm {fitllm_load_s:.1f} s, +{load['fitllm']['memory']['growth_bytes'] / MiB:.0f} MiB peak "
        f"(KV pool at load {kv_bytes / MiB:.0f} MiB)"
        + (
            f"; transformers {load['transformers']['seconds']:.1f} s, "
            f"+{load['transformers']['memory']['growth_bytes'] / MiB:.0f} MiB peak"
            if hf_model is not None
            else ""
        ),
    ]
    notes = NOTES if hf_model is not None else [n for n in NOTES if "transformers" not in n]
    render(console, rows, header, notes, compare=hf_model is not None)
    target_n, target_ratio = TARGET
    ratios = [
        r["ratio"] for r in rows if r["system"] == "fitllm" and r["concurrency"] == target_n and "ratio" in r
    ]
    if ratios:
        worst = min(ratios)
        verdict = "met" if worst >= target_ratio else "NOT met"
        console.print(
            f"target at {target_n} concurrent: >= {target_ratio:.0f}x transformers; "
            f"measured {worst:.2f}x (lowest of {len(ratios)}): {verdict}",
            highlight=False,
        )

    writers_ratios = [
        r["vs_plain"] for r in rows if "vs_plain" in r and r["concurrency"] == WRITERS_TARGET[0]
    ]
    for r in rows:
        if "vs_plain" in r:
            console.print(
                f"DRY + XTC at {r['concurrency']} concurrent (pass {r['repeat'] + 1}): "
                f"{r['output_tok_per_s']:.1f} tok/s = {r['vs_plain']:.3f}x plain sampling",
                highlight=False,
            )
    if writers_ratios:
        worst = min(writers_ratios)
        console.print(
            f"target with DRY + XTC at {WRITERS_TARGET[0]} concurrent: >= {WRITERS_TARGET[1]:.2f}x plain; "
            f"measured {worst:.3f}x: {'met' if worst >= WRITERS_TARGET[1] else 'NOT met'}",
            highlight=False,
        )
    path = result_path(args.json, "throughput")
    result = {
        "benchmark": "throughput",
        "command": shlex.join(sys.argv),
        "machine": facts,
        "config": {
            "model": str(engine.source.path),
            "workload": str(args.workload),
            "text": str(args.text),
            "concurrency": concurrency,
            "num_requests_rule": n_rule,
            "max_tokens_cap": cap,
            "repeats": args.repeats,
            "warmup_tokens": args.warmup_tokens,
            "writers_samplers": WRITERS if args.writers_samplers else None,
            "engine": dataclasses.asdict(engine.config),
        },
        "load": load,
        "results": rows,
        "notes": notes,
    }
    path.write_text(json.dumps(result, indent=1, default=str))
    console.print(f"wrote {path}", highlight=False)
    engine.close()  # tensor-parallel workers end here
    return 0
