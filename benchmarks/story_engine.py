"""`fitllm bench story-engine`: one long story's turns at the engine, no server: where a trimmed turn's time goes.

A writer's story (a memory prefix + the novel's opening) grows by each turn's greedy continuation; once memory
+ story + the turn no longer fit the context, the oldest story tokens are cut in whole KV blocks, as the Kobold
route cuts them, and the whole prompt is sent again. Per turn, the first engine step (time to first token at
the engine) and its parts: the context shift's plan (`ContextShifter.plan`), the shift itself
(`ModelRunner.shift`: the kept K rotated), the forward and the host's parts (`benchmarks/step_probe.py`).

Summary: the median first step once trimming started over the median before it (turn 0, the cold prefill,
excluded; issue 20's target for the server's time to first token is <= 1.5x), and the median shift. `fitllm
bench story` measures the same through the server; this one isolates the engine's share and runs in seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from benchmarks.measure import machine_facts
from benchmarks.step_probe import StepProbe
from benchmarks.workload import DEFAULT_TEXT, result_path

MEMORY_TOKENS = 48  # the memory prefix the front end keeps at the start of every prompt
WARM_TURNS = 6  # turns that fit before trimming starts


@dataclass(slots=True)
class EngineTurn:
    """One turn's first step, in milliseconds, and what its prompt reused."""

    turn: int
    trimmed: bool
    first_step_ms: float
    plan_ms: float
    shift_ms: float
    forward_ms: float
    prompt_tokens: int
    shifted_tokens: int
    prefilled_tokens: int


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--text", type=Path, default=DEFAULT_TEXT, help="the story's source text")
    p.add_argument("--turns", type=int, default=24, help="turns written (trimming starts after ~6)")
    p.add_argument("--turn-tokens", type=int, default=64, help="greedy tokens written a turn")
    p.add_argument("--shift", choices=("on", "off"), default="on", help="the requests' context_shift")
    p.add_argument(
        "--json", type=Path, default=None, help="where to write the turns (default bench-results/)"
    )


def story_turns(engine, text: str, turns: int, turn_tokens: int, shift: bool, show=print) -> list[EngineTurn]:
    """Write `turns` turns of one story on `engine` (greedy, `turn_tokens` a turn), trimming its front in
    whole blocks once it outgrows the context; each turn's first step timed and split."""
    from fitllm.engine.request import SamplingParams

    context, block = engine.max_model_len, engine.config.block_size
    params = SamplingParams(temperature=0, max_tokens=turn_tokens, ignore_eos=True, context_shift=shift)
    ids = engine.tokenizer.encode(text[:100_000], add_special_tokens=False)
    room = context - turn_tokens - MEMORY_TOKENS
    memory, story = ids[:MEMORY_TOKENS], ids[MEMORY_TOKENS : MEMORY_TOKENS + room - WARM_TURNS * turn_tokens]
    probe = StepProbe.attach(engine)
    probe.time_part("shift", engine.runner, "shift")
    probe.seconds.setdefault("plan", 0.0)  # stays 0 where no shifter plans
    if engine.scheduler.shifter is not None:
        probe.time_part("plan", engine.scheduler.shifter, "plan")
    show(f"{'turn':>4} {'trim':>4} {'first ms':>9} {'plan':>6} {'shift':>6} {'forward':>8} {'prompt':>7} "
         f"{'shifted':>8} {'prefilled':>9}")  # fmt: skip
    done_turns = []
    for index in range(turns):
        trimmed = len(story) > room
        if trimmed:
            story = story[-(-(len(story) - room) // block) * block :]
        prompt = memory + story
        probe.reset()
        start = time.perf_counter()
        request_id = engine.add_request(prompt, params)
        outputs = engine.step()
        first_ms = (time.perf_counter() - start) * 1000
        ms = {name: s * 1000 for name, s in probe.seconds.items()}
        while engine.has_unfinished_requests():
            outputs += engine.step()
        done = next(o for o in outputs if o.request_id == request_id and o.finished)
        story += list(done.outputs[0].token_ids)
        reuse = done.reuse
        turn = EngineTurn(index, trimmed, first_ms, ms["plan"], ms["shift"], ms["forward"], len(prompt),
                          reuse.shifted, reuse.prefilled)  # fmt: skip
        done_turns.append(turn)
        show(f"{index:>4} {'yes' if trimmed else '':>4} {first_ms:>9.1f} {turn.plan_ms:>6.1f} "
             f"{turn.shift_ms:>6.1f} {turn.forward_ms:>8.1f} {len(prompt):>7} {reuse.shifted:>8} "
             f"{reuse.prefilled:>9}")  # fmt: skip
    return done_turns


def summarize(turns: list[EngineTurn]) -> dict[str, float]:
    """Median first step once trimming started over the median before it (turn 0 excluded), and the median
    shift; empty when the story never trimmed or trimmed from its first warm turn."""
    before = [t.first_step_ms for t in turns[1:] if not t.trimmed]
    after = [t for t in turns if t.trimmed]
    if not before or not after:
        return {}
    median_after = statistics.median(t.first_step_ms for t in after)
    return {
        "first_step_ratio": median_after / statistics.median(before),
        "median_before_ms": statistics.median(before),
        "median_after_ms": median_after,
        "median_shift_ms": statistics.median(t.shift_ms for t in after),
    }


def run(args: argparse.Namespace) -> int:
    from fitllm.args import engine_config_from_args
    from fitllm.engine.engine import Engine

    engine = Engine(engine_config_from_args(args))
    facts = machine_facts()
    print(
        f"fitllm bench story-engine: {engine.config.model or 'the default model'}, context "
        f"{engine.max_model_len}, {args.turn_tokens} tokens a turn, shift {args.shift}, "
        f"{engine.config.quantization or 'no'} quantization; {facts['cpu_model']}, {facts['cpus_usable']} CPUs, "
        f"load {facts['loadavg_start'][0]:.1f}, {facts['date']}"
    )
    turns = story_turns(engine, args.text.read_text(), args.turns, args.turn_tokens, args.shift == "on")
    summary = summarize(turns)
    if summary:
        print(
            f"first step after / before trimming: {summary['first_step_ratio']:.2f}x "
            f"({summary['median_after_ms']:.1f} / {summary['median_before_ms']:.1f} ms), median shift "
            f"{summary['median_shift_ms']:.1f} ms over {sum(t.trimmed for t in turns)} trimmed turns"
        )
    else:
        print("no turn before trimming and after it to compare: raise --turns")
    path = result_path(args.json, "story-engine")
    facts["loadavg_end"] = list(os.getloadavg())
    path.write_text(
        json.dumps({"facts": facts, "summary": summary, "turns": [asdict(t) for t in turns]}, indent=2)
    )
    print(f"wrote {path}")
    return 0
