"""`fitllm bench story`'s logic on CPU: a tiny random model behind a real server, few short turns. The report
has every phase and summary row, the story outgrew the context so the server trimmed it, and with the shift
off the trimmed turns still reuse most of their prompt (the cut stays put while the story grows)."""

from __future__ import annotations

import asyncio

from live_server import serve

from benchmarks.story import StoryOptions, measure, table
from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine

TEXT = " ".join(f"t{3 + i % 250}" for i in range(4000))  # the tiny WordLevel tokenizer's words


def test_story_benchmark_report(make_random_checkpoint, tmp_path):
    folder = make_random_checkpoint(tmp_path)
    config = EngineConfig(
        model=str(folder), dtype="float32", max_model_len=256, block_size=8, profile_workspace=False
    )
    opts = StoryOptions(
        contexts=[128], max_length=8, turns=12, concurrent_stories=2, concurrent_turns=2,
        pause_s=0.2, pause_after=2, warm_turns=3,
    )  # fmt: skip
    with serve(AsyncEngine(config), "tiny") as s:
        report = asyncio.run(measure(s.url, TEXT, opts))
    sessions = report["sessions"]
    assert [(x["context"], x["context_shift"]) for x in sessions] == [(128, "default (on)"), (128, "off")]
    for x in sessions:
        turns = x["turns"]
        assert [t["turn"] for t in turns] == list(range(12))
        assert all(t["completion_tokens"] == 8 and t["ttft_s"] > 0 for t in turns)
        assert all(t["prompt_tokens"] + 8 <= 128 for t in turns)
        assert all(t["reused_tokens"] + t["prefilled_tokens"] == t["prompt_tokens"] for t in turns)
        assert not turns[0]["trimmed"] and turns[-1]["trimmed"]  # trimming started within the session
        m = x["summary"]
        assert m["first_trimmed_turn"] is not None and m["ttft_after_over_before"] > 0
    # Shift off: cut in large steps, so the turns after a cut append to a cached prefix again.
    off = [t for t in sessions[1]["turns"] if t["trimmed"]]
    assert max(t["reused_tokens"] / t["prompt_tokens"] for t in off) > 0.5
    c, p = report["concurrency"], report["pause"]
    assert c["stories"] == 2 and c["speedup"] > 0 and c["sequential_turns_per_s"] > 0
    assert p["pause_s"] == 0.2 and p["turns"][2]["paused_s"] == 0.2 and p["pause_over_normal"] > 0
    text = table(report)
    assert text.count("after / before") == 2 and "pause turn / normal turn" in text
    assert "concurrent / sequential per-turn speed" in text
