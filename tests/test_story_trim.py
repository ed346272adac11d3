"""Trimming a growing story (fitllm/server/story_trim.py) in the Kobold route's and the studio's contexts, on
the default model's tokenizer: token-exact where a shift serves; where it cannot, cut in steps so that turn
after turn the prompt starts at the same story token (its prefix stays cached) until the story has grown by
a whole step; never more tokens than the context; memory whole at the front."""

from __future__ import annotations

import pytest

from fitllm.loader import open_model
from fitllm.server.kobold.protocol import KoboldGenerateRequest, build_context
from fitllm.server.story_trim import check_share, resolve_context_shift, story_cut
from fitllm.studio.context import build_story_context

MEMORY = "Memory: the narrator is a philosopher in Woking, 1898. The Martians came in cylinders."
CTX, MAX_LENGTH = 512, 32


@pytest.fixture(scope="module")
def tok():
    return open_model(None).tokenizer()


def growing_story(turns: int, words_per_turn: int = 8) -> list[str]:
    """The story as a front end sends it each turn: everything so far, grown at the end."""
    text, out = "", []
    for t in range(turns):
        text += "".join(f" word{t}x{i}" for i in range(words_per_turn))
        out.append(text)
    return out


def test_resolve_context_shift_body_then_flag_then_route():
    for route, default in (("kobold", True), ("studio", True), ("openai", False)):
        assert resolve_context_shift(None, "auto", route) is default
        for flag in ("on", "off"):
            assert resolve_context_shift(None, flag, route) is (flag == "on")
            assert resolve_context_shift(True, flag, route) is True
            assert resolve_context_shift(False, flag, route) is False


def test_story_cut_steps():
    assert story_cut(100, 120, 0.5) == 0
    assert story_cut(130, 100, 0.0) == 30  # token-exact
    assert story_cut(130, 100, 0.0, 16) == 32  # whole blocks
    assert story_cut(100, 100, 0.0, 16) == 0
    assert story_cut(110, 100, 0.0, 16) == 16
    assert story_cut(20, 1, 0.0, 16) == 19  # at least one token stays
    assert [story_cut(n, 100, 0.5) for n in (101, 149, 150, 151, 199, 200, 201)] == [
        50,
        50,
        50,
        100,
        100,
        100,
        150,
    ]
    for n in range(101, 400):
        cut = story_cut(n, 100, 0.3)
        assert n - 100 <= cut and 0 < n - cut <= 100
    for bad in (-0.1, 1.0, float("nan")):
        with pytest.raises(ValueError, match="smart-context-share"):
            check_share(bad)


class ModelStub:
    """What build_context reads of the served model."""

    def __init__(self, tok) -> None:
        self.tokenizer, self.max_model_len = tok, 1024


def _kobold_turns(tok, share: float, align: int = 1) -> list[tuple[list[int], int]]:
    bos = tok.encode("", add_special_tokens=True)
    mem = tok.encode(MEMORY, add_special_tokens=False)
    out = []
    for story in growing_story(40):
        body = KoboldGenerateRequest(
            prompt=story, memory=MEMORY, max_length=MAX_LENGTH, max_context_length=CTX
        )
        ids, max_length = build_context(ModelStub(tok), body, share, align)
        assert max_length == MAX_LENGTH and len(ids) + max_length <= CTX
        assert ids[: len(bos) + len(mem)] == bos + mem  # memory whole at the front
        full = tok.encode(story, add_special_tokens=False)
        kept = ids[len(bos) + len(mem) :]
        assert kept == full[len(full) - len(kept) :]  # the newest story tokens
        out.append((kept, len(full) - len(kept)))
    return out


def _check_steps(turns: list[tuple[list[int], int]], room: int, share: float) -> None:
    """Cuts are whole steps; while the cut stays, each turn's prompt extends the last one (a cached prefix)."""
    step = int(share * room)
    cuts = [cut for _, cut in turns]
    assert cuts[-1] > 2 * step  # the story outgrew the context several times over
    assert all(c % step == 0 for c in cuts) and cuts == sorted(cuts)
    stays = 0
    for (prev, pcut), (cur, cut) in zip(turns, turns[1:], strict=False):
        if cut == pcut:
            stays += 1
            assert cur[: len(prev)] == prev
        else:
            assert cut == pcut + step  # one step at a time (a turn adds far less than a step)
    assert stays >= 2 * len(set(cuts))  # several turns per cut


def test_kobold_trims_in_steps_without_a_shift_and_exact_with_one(tok):
    bos = tok.encode("", add_special_tokens=True)
    room = CTX - MAX_LENGTH - len(bos) - len(tok.encode(MEMORY, add_special_tokens=False))
    _check_steps(_kobold_turns(tok, 0.5), room, 0.5)
    exact = _kobold_turns(tok, 0.0)
    assert all(len(kept) == room for kept, cut in exact if cut)  # token-exact: the context exactly full
    # With a shift the route cuts whole KV blocks: every cut, and so every turn's shift, is whole blocks,
    # and the context is full to within a block.
    blocks = _kobold_turns(tok, 0.0, 16)
    cuts = [cut for _, cut in blocks]
    assert sum(1 for c in cuts if c) >= 10 and all(c % 16 == 0 for c in cuts) and cuts == sorted(cuts)
    assert all(room - 16 < len(kept) <= room for kept, cut in blocks if cut)


@pytest.mark.parametrize("note", ["", "Keep it tense."])
def test_studio_trims_in_steps_without_a_shift(tok, note):
    turns = []
    for story in growing_story(40):
        story = story.replace("x5 ", "x5\n")  # lines, so the note has somewhere to go
        ctx = build_story_context(tok, MEMORY, story, note, 3, CTX, MAX_LENGTH, 0.5)
        assert len(ctx.ids) + MAX_LENGTH <= CTX
        bos = tok.encode("", add_special_tokens=True)
        mem = tok.encode(MEMORY + "\n", add_special_tokens=False)
        assert ctx.ids[: len(bos) + len(mem)] == bos + mem
        head = ctx.ids[len(bos) + len(mem) :]
        if note:  # the part before the note is what a later turn can find cached
            note_ids = tok.encode("\n[Author's note: Keep it tense.]\n", add_special_tokens=False)
            at = next(i for i in range(len(head)) if head[i : i + len(note_ids)] == note_ids)
            head = head[:at]
        turns.append((head, ctx.story_tokens_dropped))
    room = CTX - MAX_LENGTH - len(tok.encode("", add_special_tokens=True)) - len(mem)
    room -= ctx.note_tokens
    step = int(0.5 * room)
    cuts = [c for _, c in turns]
    assert cuts[-1] >= 2 * step and all(c % step == 0 for c in cuts)
    same = [(p, c) for (p, pc), (c, cc) in zip(turns, turns[1:], strict=False) if pc == cc and pc]
    assert len(same) >= 10 and all(c[: len(p)] == p for p, c in same)
