"""KoboldAI / KoboldCpp compatibility (fitllm/server/kobold_api.py) without a server: the context
(memory kept at the front, the prompt trimmed from its oldest tokens, max_length capped as KoboldCpp
does) and the translation of Kobold sampler fields, with the unsupported ones refused by name."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from fitllm.loader import open_model
from fitllm.server.errors import APIError
from fitllm.server.kobold_api import KoboldGenerateRequest, build_context, sampling_params


@pytest.fixture(scope="module")
def state():
    return SimpleNamespace(tokenizer=open_model(None).tokenizer(), max_model_len=256)


def _body(**kw) -> KoboldGenerateRequest:
    return KoboldGenerateRequest(**kw)


def test_short_prompt_is_memory_then_prompt(state):
    tok = state.tokenizer
    ids, max_length = build_context(
        state, _body(prompt=" and then the ship landed.", memory="Mars, 2090.", max_length=20)
    )
    assert max_length == 20
    assert ids == tok.encode("", add_special_tokens=True) + tok.encode(
        "Mars, 2090.", add_special_tokens=False
    ) + tok.encode(" and then the ship landed.", add_special_tokens=False)


def test_long_prompt_keeps_memory_and_the_newest_prompt_tokens(state):
    tok = state.tokenizer
    memory = "Memory: the captain is called Ada."
    prompt = " ".join(f"word{i}" for i in range(400))  # far more than the context
    ids, max_length = build_context(
        state, _body(prompt=prompt, memory=memory, max_length=50, max_context_length=200)
    )
    mem_ids = tok.encode(memory, add_special_tokens=False)
    prompt_ids = tok.encode(prompt, add_special_tokens=False)
    bos = tok.encode("", add_special_tokens=True)
    assert len(ids) + max_length == 200  # exactly fills max_context_length
    assert ids[: len(bos) + len(mem_ids)] == bos + mem_ids  # memory whole, at the front
    tail = ids[len(bos) + len(mem_ids) :]
    assert tail == prompt_ids[-len(tail) :]  # the newest prompt tokens, oldest dropped


def test_context_is_capped_by_max_model_len_and_max_length_leaves_room(state):
    # Asking for more context than the server has: capped at --max-model-len (256). Asking for a
    # max_length that would leave no prompt: KoboldCpp caps it at ctx - max(min(ctx - 4, 16), ctx / 5).
    ids, max_length = build_context(
        state, _body(prompt="x " * 1000, max_length=500, max_context_length=100_000)
    )
    assert max_length == 256 - max(min(252, 16), int(0.2 * 256))
    assert len(ids) + max_length == 256


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("top_a", 0.2),
        ("typical", 0.9),
        ("tfs", 0.95),
        ("nsigma", 1.0),
        ("mirostat", 2),
        ("dynatemp_range", 0.5),
        ("smoothing_factor", 0.3),
        ("dry_multiplier", 0.8),
        ("xtc_probability", 0.5),
        ("grammar", "root ::= 'a'"),
        ("banned_tokens", ["foo"]),
    ],
)
def test_unsupported_samplers_are_refused_by_name(field, value):
    with pytest.raises(APIError) as err:
        sampling_params(_body(prompt="x", **{field: value}), 10, [2])
    assert err.value.status == 400 and err.value.param == field and "not supported" in err.value.message


def test_kobold_lite_defaults_are_accepted_and_mapped():
    # What KoboldAI Lite sends by default: not neutral, and all served.
    lite = dict(
        rep_pen=1.1, rep_pen_range=320, rep_pen_slope=0.7, temperature=0.7, top_p=0.92, top_k=100, top_a=0,
        typical=1, tfs=1, min_p=0, presence_penalty=0, sampler_order=[6, 0, 1, 3, 4, 2, 5], sampler_seed=7,
        stop_sequence=["\nYou:"], use_default_badwordsids=False, n=1, quiet=True,
    )  # fmt: skip
    p = sampling_params(_body(prompt="x", **lite), 120, [2])
    assert (p.temperature, p.top_k, p.top_p, p.repetition_penalty) == (0.7, 100, 0.92, 1.1)
    assert (p.repetition_penalty_range, p.repetition_penalty_slope) == (320, 0.7)
    assert p.temperature_last  # temperature (5) after top-k (0) and top-p (2)
    assert p.seed == 7 and p.max_tokens == 120 and p.stop == ["\nYou:"]
    assert not p.include_stop_str_in_output  # trim_stop defaults on


def test_sampler_order_temperature_first_and_refused_orders():
    first = sampling_params(_body(prompt="x", sampler_order=[6, 5, 0, 1, 3, 4, 2]), 10, [2])
    assert not first.temperature_last
    for order, why in (
        ([0, 6, 1, 3, 4, 2, 5], "first"),
        ([6, 2, 1, 3, 4, 0, 5], "top_k"),
        ([6, 0, 5, 2, 1, 3, 4], "before or after"),
    ):
        with pytest.raises(APIError, match=why):
            sampling_params(_body(prompt="x", sampler_order=order), 10, [2])
    # With top_p off, the top-p position does not matter.
    ok = sampling_params(_body(prompt="x", top_p=1.0, sampler_order=[6, 0, 5, 2, 1, 3, 4]), 10, [2])
    assert ok.temperature_last


def test_eos_banning_and_bias_and_greedy_and_seed():
    p = sampling_params(
        _body(
            prompt="x", use_default_badwordsids=True, logit_bias={"5": 500}, temperature=0, sampler_seed=-1
        ),
        10,
        [2, 3],
    )
    assert p.ignore_eos and p.logit_bias == {5: 100.0, 2: -100.0, 3: -100.0}  # clamped to +-100 as KoboldCpp
    assert p.temperature == 0 and p.seed is None
    q = sampling_params(_body(prompt="x", trim_stop=False, top_k=0, rep_pen_range=0), 10, [2])
    assert q.include_stop_str_in_output and q.top_k == 0 and q.repetition_penalty_range == 1
