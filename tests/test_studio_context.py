"""The studio's context building (fitllm/studio/context.py), without a browser: memory first and never
trimmed, the author's note a few lines before the end, the oldest story tokens dropped to fit."""

from __future__ import annotations

import pytest

from fitllm.loader import open_model
from fitllm.studio.context import NOTE_TEMPLATE, build_story_context, split_for_note


@pytest.fixture(scope="module")
def tok():
    return open_model(None).tokenizer()


def enc(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False) if text else []


def test_note_goes_before_the_last_lines():
    story = "line one\nline two\nline three\nline four"
    assert split_for_note(story, 2) == ("line one\nline two\n", "line three\nline four")
    assert split_for_note(story, 0) == (story, "")
    assert split_for_note("short", 3) == ("", "short")


def test_everything_fits_in_order(tok):
    story = "The ship woke.\nAda looked out.\nStars everywhere.\nShe smiled."
    ctx = build_story_context(tok, "Ada is the captain.", story, "Keep it tense.", 2, 512, 50)
    bos = tok.encode("", add_special_tokens=True)
    note = enc(tok, "\n" + NOTE_TEMPLATE.format(note="Keep it tense.") + "\n")
    want = (
        bos
        + enc(tok, "Ada is the captain.\n")
        + enc(tok, "The ship woke.\nAda looked out.\n")
        + note
        + enc(tok, "Stars everywhere.\nShe smiled.")
    )
    assert ctx.ids == want
    assert ctx.story_tokens_dropped == 0 and ctx.note_tokens == len(note)
    assert ctx.total_tokens == len(want) - len(bos)


def test_long_story_loses_its_oldest_tokens_never_memory_or_note(tok):
    memory = "World: a dying sun. Hero: Ada."
    story = "\n".join(f"Chapter {i}: the fleet moved on, slowly, past moon {i}." for i in range(200))
    ctx = build_story_context(tok, memory, story, "Darker tone.", 3, 300, 80)
    bos = tok.encode("", add_special_tokens=True)
    mem = enc(tok, memory + "\n")
    note = enc(tok, "\n" + NOTE_TEMPLATE.format(note="Darker tone.") + "\n")
    assert len(ctx.ids) == 300 - 80  # exactly fills the room left for new tokens
    assert ctx.ids[: len(bos) + len(mem)] == bos + mem
    head, tail = split_for_note(story, 3)
    tail_ids = enc(tok, tail)
    assert ctx.ids[-len(tail_ids) - len(note) :] == note + tail_ids  # the note and the newest lines intact
    kept_head = ctx.ids[len(bos) + len(mem) : -len(tail_ids) - len(note)]
    head_ids = enc(tok, head)
    assert kept_head == head_ids[-len(kept_head) :]  # the newest part of the older text
    assert ctx.story_tokens_dropped == len(head_ids) - len(kept_head) > 0


def test_note_near_the_start_and_errors(tok):
    # A story shorter than the note depth: the note goes first, and trimming eats the text after it.
    ctx = build_story_context(tok, "", "word " * 400, "Be brief.", 5, 128, 28)
    bos = tok.encode("", add_special_tokens=True)
    note = enc(tok, "\n" + NOTE_TEMPLATE.format(note="Be brief.") + "\n")
    assert len(ctx.ids) == 100 and ctx.ids[len(bos) : len(bos) + len(note)] == note
    with pytest.raises(ValueError, match="no room"):
        build_story_context(tok, "memory " * 200, "story", "", 3, 128, 28)
    with pytest.raises(ValueError, match="empty"):
        build_story_context(tok, "", "", "", 3, 128, 28)
    with pytest.raises(ValueError, match="max new tokens"):
        build_story_context(tok, "", "x", "", 3, 128, 0)
