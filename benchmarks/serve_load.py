"""`fitllm bench serve`: a bounded load test of the HTTP server, every request of a trace at once.

Starts `fitllm serve` in its own process (so the clients do not share its interpreter), waits for
/health, then opens one streaming /v1/completions client per trace request, all concurrently (64 for the
creative-writing trace). Each client records its time to first token, the gaps between its chunks and
its total time, and checks its stream ended with `data: [DONE]` and real usage. Reported: requests
completed / lost, output tokens/s over the whole run, latency percentiles, and the ledger's peak from
/metrics.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.measure import percentile
from benchmarks.workload import WorkloadRequest, add_workload_arguments, load_workload


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    add_workload_arguments(g)
    g.add_argument(
        "--concurrency", type=int, default=0, help="clients at once (0: every request of the trace)"
    )
    g.add_argument(
        "--server-args",
        default="--max-model-len 2048 --max-num-seqs 64",
        help="flags for `fitllm serve` (engine flags: --memory-budget, --quantization, ...)",
    )
    g.add_argument("--timeout", type=float, default=1800, help="seconds before a client gives up")
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the result as JSON")


@dataclass
class ClientResult:
    id: str
    ok: bool = False
    error: str | None = None
    ttft: float | None = None
    latency: float | None = None
    chunk_gaps: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    prompt_tokens: int = 0
    finish_reason: str | None = None


async def _client(
    http, url: str, req: WorkloadRequest, timeout: float, extra_body: dict | None = None
) -> ClientResult:
    import httpx

    out = ClientResult(req.id)
    body = (extra_body or {}) | {
        "prompt": req.prompt,
        "max_tokens": req.max_tokens,
        "temperature": req.temperature,
        "top_p": req.top_p,
        "seed": req.seed,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start = time.perf_counter()
    last = None
    done = False
    try:
        async with http.stream("POST", f"{url}/v1/completions", json=body, timeout=timeout) as r:
            if r.status_code != 200:
                out.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return out
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                chunk = json.loads(line[6:])
                now = time.perf_counter()
                if chunk.get("usage"):
                    out.completion_tokens = chunk["usage"]["completion_tokens"]
                    out.prompt_tokens = chunk["usage"]["prompt_tokens"]
                for choice in chunk["choices"]:
                    if choice.get("text"):
                        if out.ttft is None:
                            out.ttft = now - start
                        elif last is not None:
                            out.chunk_gaps.append(now - last)
                        last = now
                    out.finish_reason = choice.get("finish_reason") or out.finish_reason
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
        return out
    out.latency = time.perf_counter() - start
    out.ok = done and out.completion_tokens > 0 and out.finish_reason in ("length", "stop")
    if not out.ok and out.error is None:
        out.error = f"stream ended without [DONE] or usage (finish_reason {out.finish_reason})"
    return out


async def _load(
    url: str,
    requests: list[WorkloadRequest],
    concurrency: int,
    timeout: float,
    extra_body: dict | None = None,
) -> list[ClientResult]:
    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as http:

        async def one(req: WorkloadRequest) -> ClientResult:
            async with sem:
                return await _client(http, url, req, timeout, extra_body)

        return await asyncio.gather(*(one(r) for r in requests))


def drive_load(
    url: str,
    requests: list[WorkloadRequest],
    concurrency: int,
    timeout: float,
    extra_body: dict | None = None,
) -> tuple[list[ClientResult], float]:
    """Every request as a streaming /v1/completions client, at most `concurrency` at once (any server that
    speaks the OpenAI completions API; `extra_body` adds fields to every body); returns the clients' results
    and the wall seconds of the whole load."""
    t0 = time.perf_counter()
    results = asyncio.run(_load(url, requests, concurrency, timeout, extra_body))
    return results, time.perf_counter() - t0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(
    url: str, proc: subprocess.Popen, deadline_s: float = 600, name: str = "fitllm serve"
) -> None:
    """Poll `url`/health until it answers 200 (llama-server answers 503 while it loads)."""
    import httpx

    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{name} exited with code {proc.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{name} did not become healthy")


def _metric(url: str, name: str) -> float | None:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    for fam in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        for s in fam.samples:
            if s.name == name and not s.labels:
                return s.value
    return None


def run(args: argparse.Namespace) -> int:
    requests = load_workload(args.workload, args.text)
    concurrency = args.concurrency or len(requests)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "fitllm.cli", "--log-level", "WARNING", "serve", "--port", str(port)]
    cmd += shlex.split(args.server_args)
    proc = subprocess.Popen(cmd)
    try:
        wait_healthy(url, proc)
        results, wall = drive_load(url, requests, concurrency, args.timeout)
        peak = _metric(url, "fitllm_memory_peak_total_bytes")
        budget = _metric(url, "fitllm_memory_budget_bytes")
    finally:
        proc.terminate()
        proc.wait(60)
    ok = [r for r in results if r.ok]
    tokens = sum(r.completion_tokens for r in ok)
    gaps = [g for r in ok for g in r.chunk_gaps]

    def pct(values: list[float]) -> dict[str, float | None]:
        return {f"p{q}": percentile(values, q) for q in (50, 90, 99)}

    summary = {
        "requests": len(results),
        "concurrency": concurrency,
        "completed": len(ok),
        "lost": len(results) - len(ok),
        "wall_s": wall,
        "output_tokens": tokens,
        "output_tokens_per_s": tokens / wall,
        "requests_per_s": len(ok) / wall,
        "ttft_s": pct([r.ttft for r in ok if r.ttft is not None]),
        "inter_chunk_s": pct(gaps),
        "latency_s": pct([r.latency for r in ok if r.latency is not None]),
        "ledger_peak_bytes": peak,
        "budget_bytes": budget,
        "server_args": args.server_args,
        "errors": [f"{r.id}: {r.error}" for r in results if not r.ok][:10],
    }
    print(json.dumps({k: v for k, v in summary.items() if k != "errors"}, indent=2))
    for e in summary["errors"]:
        print("error:", e, file=sys.stderr)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary | {"clients": [asdict(r) for r in results]}, indent=2))
    return 0 if not summary["lost"] else 1
