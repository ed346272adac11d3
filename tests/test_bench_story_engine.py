"""`fitllm bench story-engine`'s logic on CPU: a tiny random model, a story that outgrows its context. With the
shift on, every trimmed turn shifts the kept story and prefills at most a block and the turn's last token;
with it off, nothing is shifted and the trimmed turns prefill the story again. The summary compares the
turns before trimming with those after."""

from __future__ import annotations

import pytest

from benchmarks.story_engine import MEMORY_TOKENS, story_turns, summarize
from fitllm import Engine, EngineConfig

TEXT = " ".join(f"t{3 + i % 250}" for i in range(4000))  # the tiny WordLevel tokenizer's words
BLOCK = 8


@pytest.mark.parametrize("shift", [True, False])
def test_story_turns_shift_or_prefill_after_trimming(make_random_checkpoint, tmp_path, shift):
    folder = make_random_checkpoint(tmp_path)
    engine = Engine(EngineConfig(model=str(folder), dtype="float32", max_model_len=256, block_size=BLOCK,
                                 profile_workspace=False, context_shift="on"))  # fmt: skip
    lines = []
    turns = story_turns(engine, TEXT, turns=10, turn_tokens=8, shift=shift, show=lines.append)
    assert len(lines) == 11 and [t.turn for t in turns] == list(range(10))
    assert not any(t.trimmed for t in turns[:6]) and all(t.trimmed for t in turns[7:])
    assert all(t.prompt_tokens + 8 <= 256 and t.first_step_ms > 0 for t in turns)
    trimmed = [t for t in turns if t.trimmed]
    if shift:
        assert all(
            t.shifted_tokens > 0 and t.shift_ms > 0 and t.prefilled_tokens <= BLOCK + 1 for t in trimmed
        )
    else:
        assert all(t.shifted_tokens == 0 and t.shift_ms == 0 for t in turns)
        assert all(t.prefilled_tokens > t.prompt_tokens - MEMORY_TOKENS - BLOCK for t in trimmed)
    summary = summarize(turns)
    assert summary["first_step_ratio"] == summary["median_after_ms"] / summary["median_before_ms"]


def test_summary_needs_turns_on_both_sides_of_the_trim():
    assert summarize([]) == {}
