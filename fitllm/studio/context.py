"""The studio's context: what the model sees for a story, built the way story writers expect.

- **Memory** (the world, the characters) always comes first and is never trimmed.
- **Author's note** (style or direction for the next scene) is inserted `note_depth` lines before the end of
  the story, where it steers the continuation without sitting in the continuation's way.
- When memory + story + note + the new tokens exceed the context length, the **oldest story text** goes,
  never memory or the note: token by token where a context shift reuses the rest, in steps of
  --smart-context-share of the story's room where it cannot (fitllm/server/story_trim.py), so the next
  turns append to a cached prefix.

Each part is tokenized on its own (as KoboldCpp tokenizes memory apart from the prompt), so trimming is
exact in tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from fitllm.loader.tokenizer import Tokenizer
from fitllm.server.story_trim import story_cut

NOTE_TEMPLATE = "[Author's note: {note}]"


@dataclass(slots=True)
class StoryContext:
    """The prompt ids and how they were made."""

    ids: list[int]
    memory_tokens: int
    note_tokens: int
    story_tokens: int  # of the story, before trimming
    story_tokens_kept: int
    max_new_tokens: int

    @property
    def story_tokens_dropped(self) -> int:
        return self.story_tokens - self.story_tokens_kept

    @property
    def total_tokens(self) -> int:
        """Tokens of memory + note + the whole story (what the counter shows against the context length)."""
        return self.memory_tokens + self.note_tokens + self.story_tokens


def split_for_note(story: str, note_depth: int) -> tuple[str, str]:
    """(text before the note, text after it): the note goes before the last `note_depth` lines."""
    if note_depth <= 0:
        return story, ""
    lines = story.split("\n")
    if len(lines) <= note_depth:
        return "", story
    head = "\n".join(lines[:-note_depth]) + "\n"
    return head, "\n".join(lines[-note_depth:])


def build_story_context(
    tokenizer: Tokenizer,
    memory: str,
    story: str,
    note: str,
    note_depth: int,
    max_context: int,
    max_new_tokens: int,
    share: float = 0.0,
    align: int = 1,
) -> StoryContext:
    """Memory, then the story with the note inside it, trimmed from the oldest story tokens to fit
    `max_context - max_new_tokens` (in steps of `share` of the story's room when it is above 0, else in
    multiples of `align` tokens: story_trim.story_cut). Raises
    ValueError when memory and note alone leave no room."""
    if max_new_tokens < 1:
        raise ValueError(f"max new tokens must be at least 1; got {max_new_tokens}")
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False) if text else []  # noqa: E731
    bos = tokenizer.encode("", add_special_tokens=True)
    mem = encode(memory.rstrip("\n") + "\n" if memory.strip() else "")
    note_ids = encode("\n" + NOTE_TEMPLATE.format(note=note.strip()) + "\n" if note.strip() else "")
    before_text, after_text = split_for_note(story, note_depth if note_ids else 0)
    before, after = encode(before_text), encode(after_text)
    room = max_context - max_new_tokens - len(bos) - len(mem) - len(note_ids)
    if room < 1:
        raise ValueError(
            f"memory ({len(mem)} tokens) and author's note ({len(note_ids)}) leave no room for the story in a "
            f"context of {max_context} with {max_new_tokens} new tokens; shorten them or lower max new tokens"
        )
    story_tokens = len(before) + len(after)
    drop = story_cut(story_tokens, room, share, align)
    # Oldest first: the text before the note, then (if the note sits near the start) the text after it.
    cut_before = min(drop, len(before))
    cut_after = drop - cut_before
    before, after = before[cut_before:], after[cut_after:]
    ids = bos + mem + before + note_ids + after
    if len(ids) == len(bos):
        raise ValueError("the story, memory and note are all empty; write something to continue")
    return StoryContext(ids, len(mem), len(note_ids), story_tokens, len(before) + len(after), max_new_tokens)
