"""IncrementalDetokenizer on the default model's tokenizer: stop strings across token boundaries, held-back
text, UTF-8 safe streaming, special tokens. Expected text comes from the tokenizer's own decode."""

from __future__ import annotations

import pytest

from fitllm.engine.detokenizer import IncrementalDetokenizer


@pytest.fixture(scope="module")
def tok():
    from fitllm.loader import open_model

    return open_model(None).tokenizer()


PROMPT = "Story:"
TEXT = " The quick brown fox jumps over the lazy dog. Then it ran into the forest."


def stream(tok, text: str, stop: list[str], include: bool = False, prompt: str = PROMPT):
    """Feed text's tokens one at a time; returns (stop found, final text, deltas, per-token pieces)."""
    prompt_ids = tok.encode(prompt)
    ids = tok.encode(text, add_special_tokens=False)
    det = IncrementalDetokenizer(tok, prompt_ids, stop, True, include)
    deltas, found = [], None
    for i, t in enumerate(ids):
        found = det.add_token(t)
        finished = found is not None or i == len(ids) - 1
        deltas.append(det.take_delta(finished))
        if found is not None:
            break
    return found, det.text, deltas, ids


def token_spans(tok, text: str) -> list[tuple[int, int]]:
    """Character span of each token of text (byte-level BPE over ASCII: pieces concatenate)."""
    ids = tok.encode(text, add_special_tokens=False)
    spans, pos = [], 0
    for t in ids:
        piece = tok.decode([t])
        assert text[pos : pos + len(piece)] == piece
        spans.append((pos, pos + len(piece)))
        pos += len(piece)
    assert pos == len(text)
    return spans


def _check_stream(text_before_stop: str, found, final, deltas, stop):
    assert found == stop
    assert final == text_before_stop
    assert "".join(deltas) == text_before_stop
    streamed = ""
    for d in deltas:
        streamed += d
        assert text_before_stop.startswith(streamed)


@pytest.mark.parametrize("span_tokens", [2, 3])
@pytest.mark.parametrize("include", [False, True])
def test_stop_string_across_token_boundaries(tok, span_tokens, include):
    spans = token_spans(tok, TEXT)
    # Start inside token 3 and end inside token 3 + span_tokens - 1: no boundary lines up with the stop.
    first, last = spans[3], spans[3 + span_tokens - 1]
    assert first[1] - first[0] >= 3 and last[1] - last[0] >= 3
    a, b = first[0] + 2, last[1] - 1
    stop = TEXT[a:b]
    assert TEXT.count(stop) == 1
    found, final, deltas, _ = stream(tok, TEXT, [stop], include)
    expected = TEXT[:b] if include else TEXT[:a]
    _check_stream(expected, found, final, deltas, stop)
    # Nothing of the stop string was ever streamed before the end (the final flush included).
    if not include:
        for k in range(1, len(stop) + 1):
            assert not "".join(deltas).endswith(stop[:k])


def test_no_stop_streams_everything(tok):
    found, final, deltas, ids = stream(tok, TEXT, [])
    assert found is None
    assert final == TEXT == "".join(deltas)
    assert sum(1 for d in deltas if d) >= len(ids) - 1  # without stop strings nothing is held back


def test_stop_not_in_text_holds_back_then_flushes(tok):
    found, final, deltas, _ = stream(tok, TEXT, ["zebra crossing"])
    assert found is None and final == TEXT and "".join(deltas) == TEXT
    assert all(len(d) == 0 for d in deltas[:2])  # the first characters were held back


@pytest.mark.parametrize(
    "stops, expected_stop",
    [
        (["lazy", "quick"], "quick"),
        (["quick", "lazy"], "quick"),
        (["umps", "jum"], "jum"),  # both complete within the same token
        (["ps", "jumps"], "jumps"),
        (["own fox", "fox jumps over"], "own fox"),
    ],
)
def test_earliest_stop_string_wins(tok, stops, expected_stop):
    found, final, deltas, _ = stream(tok, TEXT, stops)
    _check_stream(TEXT[: TEXT.index(expected_stop)], found, final, deltas, expected_stop)


def test_stop_string_completed_first_in_time_wins(tok):
    # "own" completes with " brown" while "quick brown fox" needs " fox": the first found stops generation.
    found, final, deltas, _ = stream(tok, TEXT, ["quick brown fox", "own"])
    _check_stream(TEXT[: TEXT.index("own")], found, final, deltas, "own")


UNICODE_TEXT = " Café crème, naïve résumé: 日本語のテキスト 🎉👍🏽 emoji 中文 ok ✓ Ωμέγα"


def test_utf8_safe_streaming(tok):
    prompt_ids = tok.encode(PROMPT)
    ids = tok.encode(UNICODE_TEXT, add_special_tokens=False)
    # The text really splits characters across tokens.
    assert any("\ufffd" in tok.decode([t]) for t in ids)
    det = IncrementalDetokenizer(tok, prompt_ids, [], True, False)
    deltas = []
    for i, t in enumerate(ids):
        assert det.add_token(t) is None
        d = det.take_delta(i == len(ids) - 1)
        assert "\ufffd" not in d
        assert "\ufffd" not in det.text
        deltas.append(d)
    full = tok.decode(prompt_ids + ids)[len(tok.decode(prompt_ids)) :]
    assert full == UNICODE_TEXT
    assert "".join(deltas) == full == det.text


@pytest.mark.parametrize("stop", ["日本", "🎉👍", "ïve r", "✓ Ω"])
def test_stop_string_inside_multibyte_text(tok, stop):
    found, final, deltas, _ = stream(tok, UNICODE_TEXT, [stop])
    _check_stream(UNICODE_TEXT[: UNICODE_TEXT.index(stop)], found, final, deltas, stop)
    assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_skips_special_tokens(tok):
    eos = tok.eos_token_ids[0]
    ids = tok.encode(" hello", add_special_tokens=False) + [eos]
    skip = IncrementalDetokenizer(tok, tok.encode(PROMPT), [], True, False)
    keep = IncrementalDetokenizer(tok, tok.encode(PROMPT), [], False, False)
    for t in ids:
        skip.add_token(t)
        keep.add_token(t)
    assert skip.text == " hello"
    assert keep.text == " hello" + tok.decode([eos], skip_special_tokens=False)


@pytest.mark.parametrize("text", ["日本語の文章：東京は", "emoji 🙂🚀 mixed ñ", "plain ascii"])
def test_token_bytes_rebuild_text_split_inside_characters(tok, text):
    """Each token's own bytes (the OpenAI logprobs' `bytes`) concatenate to the text's UTF-8, also where
    a token holds part of a character and decodes alone to U+FFFD."""
    ids = tok.encode(text, add_special_tokens=False)
    assert b"".join(tok.token_bytes(i) for i in ids) == text.encode()
    if not text.isascii():
        assert any(tok.decode([i]) == "\ufffd" for i in ids)  # the case this is for
    eos = tok.eos_token_ids[0]
    assert tok.token_bytes(eos) == tok.eos_token.encode()  # special tokens are their text


def test_token_bytes_of_sentencepiece_pieces():
    """SentencePiece vocabularies: <0xNN> byte pieces are that byte, U+2581 is a space."""
    from tokenizers import Tokenizer as FastTokenizer
    from tokenizers import models

    from fitllm.loader.tokenizer import Tokenizer

    vocab = {"<unk>": 0, "\u2581the": 1, "<0xE6>": 2, "cat": 3}
    backend = FastTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    sp = Tokenizer(backend=backend, eos_token_ids=[], bos_token_id=None, chat_template=None)
    assert [sp.token_bytes(i) for i in (1, 2, 3)] == [b" the", b"\xe6", b"cat"]
