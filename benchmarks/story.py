"""`fitllm bench story`: long story sessions through the KoboldCpp streaming API, as KoboldAI Lite drives a server.

Each writer sends, every turn, its memory apart and the whole story so far as the prompt to
`/api/extra/generate/stream` (SSE) with `max_context_length` and `max_length`; the server keeps memory at the
front and trims the oldest story tokens; the continuation is appended to the story for the next turn. The
story starts with the novel's opening, sized so that a few turns fit before trimming starts. Each session's
memory names the session, so no session finds another's blocks in the prefix cache.

Per turn: time to first token (client side), the turn's total time, the prompt's tokens and how many were
reused (prefix cache + shift + host) or prefilled (the stream's last event, server/reuse.py), and whether
the server trimmed the story. Phases: each context with the route's default (context shift on) and with
`context_shift: false`; then N stories written concurrently against the same N one after another; then a
turn after a pause. Summary rows and their targets (issue 20):
- median TTFT once trimming started / before it (turn 0, the cold prefill, excluded): <= 1.5x;
- the turn after the pause / the median of the turns before it: <= 1.5x;
- per-turn speed of N concurrent stories / N sequential ones: >= 2x.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shlex
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from benchmarks.measure import machine_facts
from benchmarks.serve_load import free_port, wait_healthy
from benchmarks.workload import DEFAULT_TEXT

MEMORY = (
    "[Story session {session}] Memory: the narrator is a writer on philosophy living near Woking in 1898. "
    "Martians have landed on Horsell Common in a great cylinder. Write in the style of H. G. Wells.\n"
)
CHAPTER_ONE = "No one would have believed"
WARM_TURNS = 6  # turns that fit before trimming starts


@dataclass(slots=True)
class StoryOptions:
    """What the phases run (flags; --quick makes them small)."""

    contexts: list[int] = field(default_factory=lambda: [1024, 2048])
    max_length: int = 64
    turns: int = 32
    concurrent_stories: int = 4
    concurrent_turns: int = 8
    pause_s: float = 60.0
    pause_after: int = 4
    warm_turns: int = WARM_TURNS
    phases: list[str] = field(default_factory=lambda: list(PHASES))


@dataclass(slots=True)
class Turn:
    """One turn of one session, as the client saw it."""

    turn: int
    ttft_s: float | None
    total_s: float
    prompt_tokens: int
    reused_tokens: int
    prefilled_tokens: int
    shifted_tokens: int
    trimmed: bool
    completion_tokens: int
    paused_s: float = 0.0


class StorySession:
    """One writer: memory, and a story that grows by each continuation, sent whole every turn."""

    def __init__(self, http, url: str, session: int, story: str, context: int, opts: StoryOptions,
                 context_shift: bool | None) -> None:  # fmt: skip
        self.http, self.url, self.session = http, url, session
        self.memory, self.story = MEMORY.format(session=session), story
        self.context, self.opts, self.context_shift = context, opts, context_shift
        self.fixed_tokens: int | None = None  # BOS + memory

    async def count(self, text: str, special: bool = False) -> int:
        r = await self.http.post(
            f"{self.url}/api/extra/tokencount", json={"prompt": text, "special": special}
        )
        r.raise_for_status()
        return r.json()["value"]

    async def turn(self, index: int, paused_s: float = 0.0) -> Turn:
        if self.fixed_tokens is None:
            self.fixed_tokens = await self.count("", special=True) + await self.count(self.memory)
        story_tokens = await self.count(self.story)
        body = {
            "prompt": self.story,
            "memory": self.memory,
            "max_context_length": self.context,
            "max_length": self.opts.max_length,
            "temperature": 0.7,
            "top_p": 0.92,
            "top_k": 100,
            "rep_pen": 1.07,
            "rep_pen_range": 360,
            "sampler_seed": 1000 * self.session + index + 1,
            "use_default_badwordsids": True,  # no early EOS: every turn writes max_length tokens
            "genkey": f"KCPP-story-{self.session}",
        }
        if self.context_shift is not None:
            body["context_shift"] = self.context_shift
        start = time.perf_counter()
        ttft, text, last = None, [], None
        async with self.http.stream("POST", f"{self.url}/api/extra/generate/stream", json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"turn {index}: HTTP {r.status_code}: {(await r.aread())[:300]!r}")
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                event = json.loads(line[6:])
                if event.get("token"):
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    text.append(event["token"])
                if event.get("finish_reason"):
                    last = event
        total = time.perf_counter() - start
        if last is None or last["finish_reason"] == "error" or "prompt_tokens_details" not in last:
            raise RuntimeError(f"turn {index}: the stream ended without its last event: {last}")
        self.story += "".join(text)
        d = last["prompt_tokens_details"]
        return Turn(
            turn=index,
            ttft_s=ttft,
            total_s=total,
            prompt_tokens=last["prompt_tokens"],
            reused_tokens=d["cached_tokens"],
            prefilled_tokens=d["prefilled_tokens"],
            shifted_tokens=d["shifted_tokens"],
            trimmed=last["prompt_tokens"] < self.fixed_tokens + story_tokens,
            completion_tokens=last["completion_tokens"],
            paused_s=paused_s,
        )


async def _opening(http, url: str, text: str, tokens: int) -> str:
    """The novel's opening, about `tokens` tokens long (sized from the server's count of a sample)."""
    sample = text[:4000]  # within any server's prompt limit
    r = await http.post(f"{url}/api/extra/tokencount", json={"prompt": sample, "special": False})
    r.raise_for_status()
    chars_per_token = len(sample) / max(1, r.json()["value"])
    return text[: max(1, int(tokens * chars_per_token))]


async def run_session(http, url: str, text: str, session: int, context: int, opts: StoryOptions, turns: int,
                      context_shift: bool | None = None, pauses: dict[int, float] | None = None) -> list[Turn]:  # fmt: skip
    """One writer's `turns` turns; `pauses`: seconds to wait before a turn (by its index)."""
    memory_tokens = len(MEMORY) // 4  # a rough share: the opening only sets when trimming starts
    start_tokens = context - memory_tokens - opts.max_length * (opts.warm_turns + 1)
    story = await _opening(http, url, text, max(16, start_tokens))
    s = StorySession(http, url, session, story, context, opts, context_shift)
    out = []
    for i in range(turns):
        wait = (pauses or {}).get(i, 0.0)
        if wait:
            await asyncio.sleep(wait)
        t = await s.turn(i, wait)
        out.append(t)
        print(f"story {session} ctx {context} shift {context_shift}: turn {t.turn} ttft {_f(t.ttft_s)} s, "
              f"{t.total_s:.2f} s, prompt {t.prompt_tokens} (reused {t.reused_tokens}, prefilled "
              f"{t.prefilled_tokens}){' trimmed' if t.trimmed else ''}", file=sys.stderr, flush=True)  # fmt: skip
    return out


def _median(values: list[float | None]) -> float | None:
    xs = [v for v in values if v is not None]
    return statistics.median(xs) if xs else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return None if a is None or not b else a / b


def session_summary(turns: list[Turn]) -> dict:
    """Medians before trimming started (the cold first turn excluded) and after."""
    before = [t for t in turns[1:] if not t.trimmed]
    after = [t for t in turns if t.trimmed]
    b, a = _median([t.ttft_s for t in before]), _median([t.ttft_s for t in after])
    return {
        "turns": len(turns),
        "first_trimmed_turn": next((t.turn for t in turns if t.trimmed), None),
        "ttft_before_s": b,
        "ttft_after_s": a,
        "ttft_after_over_before": _ratio(a, b),
        "prefilled_before": _median([t.prefilled_tokens for t in before]),
        "prefilled_after": _median([t.prefilled_tokens for t in after]),
        "reused_after": _median([t.reused_tokens for t in after]),
        "turn_s_after": _median([t.total_s for t in after]),
    }


async def _sessions(http, url: str, text: str, opts: StoryOptions, report: dict, first: int) -> int:
    """Each context with the route's default (shift on) and with `context_shift: false`."""
    session = first
    for context in opts.contexts:
        for shift in (None, False):
            session += 1
            turns = await run_session(http, url, text, session, context, opts, opts.turns, shift)
            report["sessions"].append(
                {"context": context, "context_shift": "default (on)" if shift is None else "off",
                 "summary": session_summary(turns), "turns": [asdict(t) for t in turns]}
            )  # fmt: skip
    return session


async def _concurrency(http, url: str, text: str, opts: StoryOptions, report: dict, first: int) -> int:
    """N stories one after another, then N new ones at once: turns per second of each."""
    context, n, k = opts.contexts[0], opts.concurrent_stories, opts.concurrent_turns
    walls, session = {}, first
    for mode in ("sequential", "concurrent"):
        ids = list(range(session + 1, session + n + 1))
        session += n
        t0 = time.perf_counter()
        if mode == "sequential":
            for i in ids:
                await run_session(http, url, text, i, context, opts, k)
        else:
            await asyncio.gather(*(run_session(http, url, text, i, context, opts, k) for i in ids))
        walls[mode] = time.perf_counter() - t0
    report["concurrency"] = {
        "stories": n, "turns_each": k, "context": context,
        "sequential_turns_per_s": n * k / walls["sequential"],
        "concurrent_turns_per_s": n * k / walls["concurrent"],
        "speedup": walls["sequential"] / walls["concurrent"],
    }  # fmt: skip
    return session


async def _pause(http, url: str, text: str, opts: StoryOptions, report: dict, first: int) -> int:
    """A writer's pause before one turn, against the turns before it (the cold first one excluded)."""
    context, p, session = opts.contexts[0], opts.pause_after, first + 1
    turns = await run_session(http, url, text, session, context, opts, p + 2, pauses={p: opts.pause_s})
    normal = _median([t.ttft_s for t in turns[1:p]])
    report["pause"] = {
        "context": context, "pause_s": opts.pause_s, "after_turn": p,
        "normal_ttft_s": normal, "pause_ttft_s": turns[p].ttft_s,
        "pause_over_normal": _ratio(turns[p].ttft_s, normal),
        "trimmed": any(t.trimmed for t in turns[: p + 1]),
        "turns": [asdict(t) for t in turns],
    }  # fmt: skip
    return session


PHASES = {"sessions": _sessions, "concurrency": _concurrency, "pause": _pause}


async def measure(url: str, text: str, opts: StoryOptions) -> dict:
    """The phases in `opts.phases` against the server at `url`; the report `table` prints."""
    import httpx

    report: dict = {"options": asdict(opts), "sessions": [], "concurrency": None, "pause": None}
    session = 0  # each session's memory names it, so no session hits another's cached blocks
    async with httpx.AsyncClient(timeout=1800, limits=httpx.Limits(max_connections=64)) as http:
        for phase in opts.phases:
            session = await PHASES[phase](http, url, text, opts, report, session)
    return report


def _f(v: float | None, spec: str = ".3f") -> str:
    return "–" if v is None else format(v, spec)


def table(report: dict) -> str:
    """The per-turn tables and the summary rows, as text."""
    lines = []
    for s in report["sessions"]:
        lines.append(f"\ncontext {s['context']}, context shift {s['context_shift']}")
        lines.append(
            f"{'turn':>4} {'ttft_s':>7} {'turn_s':>7} {'prompt':>6} {'reused':>6} {'prefill':>7} trimmed"
        )
        for t in s["turns"]:
            lines.append(
                f"{t['turn']:>4} {_f(t['ttft_s']):>7} {_f(t['total_s']):>7} {t['prompt_tokens']:>6} "
                f"{t['reused_tokens']:>6} {t['prefilled_tokens']:>7} {'yes' if t['trimmed'] else ''}"
            )
    lines.append("\nsummary")
    lines.append(f"{'row':<58} {'value':>9}  target")
    for s in report["sessions"]:
        m = s["summary"]
        name = f"ctx {s['context']} shift {s['context_shift']}"
        lines.append(f"{name + ': TTFT before trimming (s)':<58} {_f(m['ttft_before_s']):>9}")
        lines.append(f"{name + ': TTFT after trimming (s)':<58} {_f(m['ttft_after_s']):>9}")
        lines.append(f"{name + ': after / before':<58} {_f(m['ttft_after_over_before'], '.2f'):>9}x  <= 1.5x")
        lines.append(
            f"{name + ': prefilled / reused after':<58} "
            f"{_f(m['prefilled_after'], '.0f'):>5}/{_f(m['reused_after'], '.0f')}"
        )
    if (p := report["pause"]) is not None:
        lines.append(f"{'pause ' + _f(p['pause_s'], '.0f') + ' s: TTFT normal / after pause (s)':<58} "
                     f"{_f(p['normal_ttft_s'])} / {_f(p['pause_ttft_s'])}")  # fmt: skip
        lines.append(f"{'pause turn / normal turn':<58} {_f(p['pause_over_normal'], '.2f'):>9}x  <= 1.5x")
    if (c := report["concurrency"]) is not None:
        lines.append(f"{'sequential / concurrent turns per s':<58} "
                     f"{_f(c['sequential_turns_per_s'], '.2f')} / {_f(c['concurrent_turns_per_s'], '.2f')}")  # fmt: skip
        lines.append(f"{str(c['stories']) + ' concurrent / sequential per-turn speed':<58} "
                     f"{_f(c['speedup'], '.2f'):>9}x  >= 2x")  # fmt: skip
    return "\n".join(lines)


def add_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("benchmark")
    g.add_argument("--text", type=Path, default=DEFAULT_TEXT, metavar="PATH", help="the story's source text")
    g.add_argument(
        "--contexts", default="1024,2048", help="max_context_length of each session, comma-separated"
    )
    g.add_argument("--turns", type=int, default=32, help="turns per session")
    g.add_argument("--max-length", type=int, default=64, help="tokens written per turn")
    g.add_argument("--concurrent-stories", type=int, default=4, help="stories written at once vs in turn")
    g.add_argument("--concurrent-turns", type=int, default=8, help="turns of each of those stories")
    g.add_argument("--pause-s", type=float, default=60.0, help="the writer's pause before one turn")
    g.add_argument("--pause-after", type=int, default=4, help="turns before the pause")
    g.add_argument(
        "--quick",
        action="store_true",
        help="a run of a few minutes: 1024 only, 12 turns, 3 concurrent turns, a 40 s pause (past the default "
        "--kv-idle-release-s 30)",
    )
    g.add_argument(
        "--server-args",
        default="--max-model-len 2048 --max-num-seqs 8",
        help="flags for `fitllm serve` (e.g. --context-shift off, --smart-context-share 0.5)",
    )
    g.add_argument("--phases", default=",".join(PHASES), help="which phases to run, comma-separated")
    g.add_argument("--url", default=None, help="drive a server already running here instead of starting one")
    g.add_argument("--json", type=Path, metavar="PATH", default=None, help="write the report as JSON")


def options(args: argparse.Namespace) -> StoryOptions:
    opts = StoryOptions(
        contexts=[int(c) for c in args.contexts.split(",") if c.strip()],
        max_length=args.max_length,
        turns=args.turns,
        concurrent_stories=args.concurrent_stories,
        concurrent_turns=args.concurrent_turns,
        pause_s=args.pause_s,
        pause_after=args.pause_after,
        phases=[x.strip() for x in args.phases.split(",") if x.strip()],
    )
    if unknown := set(opts.phases) - set(PHASES):
        raise SystemExit(f"--phases: unknown {sorted(unknown)}; choose from {', '.join(PHASES)}")
    if args.quick:
        opts.contexts, opts.turns, opts.concurrent_turns, opts.pause_s = opts.contexts[:1], 12, 3, 40.0
    return opts


def run(args: argparse.Namespace) -> int:
    from fitllm.eval.perplexity import gutenberg_body

    text = gutenberg_body(args.text.read_text(encoding="utf-8"))
    text = text[max(0, text.find(CHAPTER_ONE)) :]  # the story proper, past the title page and contents
    opts = options(args)
    proc = None
    url = args.url
    if url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "fitllm.cli", "--log-level", "WARNING", "serve", "--port", str(port)]
        proc = subprocess.Popen(cmd + shlex.split(args.server_args))
    try:
        if proc is not None:
            wait_healthy(url, proc)
        report = asyncio.run(measure(url, text, opts))
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(60)
    report |= {"server_args": args.server_args if proc is not None else None, "machine": machine_facts()}
    print(table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
    return 0
