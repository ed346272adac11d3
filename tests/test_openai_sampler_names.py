"""The OpenAI routes' sampler names (fitllm/server/openai/sampler_fields.py, the README's table) through HTTP:
each honoured name reaches the engine's SamplingParams, each refused one is a 400 naming it, and a field no
server defines is accepted and ignored; SillyTavern's KoboldCpp body to /v1/completions runs as sent."""

from __future__ import annotations

import httpx
import pytest
from live_server import assert_error, serve
from stand_ins import AddTap

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.engine.request import SAMPLER_NAMES
from fitllm.server.app import default_model_name
from fitllm.server.openai.sampler_fields import HONOURED, REFUSED

# name -> (value sent, SamplingParams value expected)
SENT = {
    "typical_p": (0.9, 0.9), "typical": (0.9, 0.9), "tfs": (0.9, 0.9), "tfs_z": (0.9, 0.9),
    "top_a": (0.1, 0.1), "top_n_sigma": (1.5, 1.5), "nsigma": (1.5, 1.5), "mirostat": (2, 2),
    "mirostat_mode": (1, 1), "mirostat_tau": (4.0, 4.0), "mirostat_eta": (0.2, 0.2),
    "dynatemp_range": (0.3, 0.3), "dynatemp_exponent": (1.2, 1.2), "smoothing_factor": (0.2, 0.2),
    "smoothing_curve": (1.5, 1.5), "xtc_threshold": (0.15, 0.15), "xtc_probability": (0.4, 0.4),
    "dry_multiplier": (0.7, 0.7), "dry_base": (1.6, 1.6), "dry_allowed_length": (3, 3),
    "dry_penalty_last_n": (64, 64), "dry_range": (-1, 0), "dry_sequence_breakers": ('["\\n", "*"]', ["\n", "*"]),
    "rep_pen": (1.1, 1.1), "repeat_penalty": (1.1, 1.1), "rep_pen_range": (64, 64),
    "repetition_penalty_range": (64, 64), "repeat_last_n": (64, 64), "rep_pen_slope": (0.5, 0.5),
    "sampler_order": ([6, 5, 0, 1, 2, 3, 4], [SAMPLER_NAMES[i] for i in (6, 5, 0, 1, 2, 3, 4)]),
    "sampler_seed": (42, 42), "temperature_last": (True, True),
}  # fmt: skip
REFUSED_VALUE = {"min_keep": 3, "penalize_nl": True, "ban_eos_token": True, "use_default_badwordsids": True}


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(dtype="bfloat16", max_model_len=256, max_num_seqs=4, seed=0)
    with serve(AsyncEngine(config), default_model_name(None)) as s:
        yield s


def _complete(server, **fields) -> httpx.Response:
    body = {"model": server.name, "prompt": "The Martians", "max_tokens": 1, **fields}
    return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)


def test_every_honoured_name_has_a_case():
    assert set(SENT) == set(HONOURED)


@pytest.mark.parametrize("name", sorted(HONOURED))
def test_honoured_name_reaches_the_engine(server, name):
    sent, want = SENT[name]
    with AddTap(server.engine) as tap:
        r = _complete(server, **{name: sent})
    assert r.status_code == 200, r.text
    assert getattr(tap.params[0], HONOURED[name].field) == want


@pytest.mark.parametrize("name", sorted(REFUSED))
def test_refused_name_is_a_400_naming_it(server, name):
    err = assert_error(_complete(server, **{name: REFUSED_VALUE.get(name, 0.5)}), 400)
    assert err["param"] == name and name.split("_")[0] in err["message"]


def test_neutral_refused_names_unknown_fields_and_agreeing_aliases_are_accepted(server):
    neutral = {"epsilon_cutoff": 0, "skew": 0, "guidance_scale": 1, "negative_prompt": "", "grammar_string": "",
               "banned_strings": [], "ban_eos_token": False, "min_keep": 0}  # fmt: skip
    unknown = {"api_server": "http://x", "truncation_length": 4096, "add_bos_token": True, "foo_bar": [1]}
    with AddTap(server.engine) as tap:
        r = _complete(server, **neutral, **unknown, repetition_penalty=1.2, rep_pen=1.2, repeat_penalty=1.2)
    assert r.status_code == 200, r.text
    assert tap.params[0].repetition_penalty == 1.2


def test_disagreeing_aliases_are_a_400_naming_both(server):
    err = assert_error(_complete(server, repetition_penalty=1.2, rep_pen=1.1), 400)
    assert err["param"] == "rep_pen" and "repetition_penalty" in err["message"]
    err = assert_error(_complete(server, typical_p=0.9, typical=0.8), 400)
    assert err["param"] == "typical"


def test_sillytavern_koboldcpp_body_on_v1_completions_runs_as_sent(server):
    # What SillyTavern's text-completion "KoboldCpp" connection posts (textgen-settings.js), DRY and XTC on.
    body = {
        "prompt": "The Martians landed.", "max_new_tokens": 2, "max_tokens": 2, "temperature": 0.9,
        "top_p": 1, "typical_p": 1, "typical": 1, "sampler_seed": -1, "min_p": 0.05,
        "repetition_penalty": 1.05, "frequency_penalty": 0, "presence_penalty": 0, "top_k": 0, "skew": 0,
        "min_tokens": 0, "add_bos_token": True, "smoothing_factor": 0, "smoothing_curve": 1,
        "dry_allowed_length": 2, "dry_multiplier": 0.8, "dry_base": 1.75,
        "dry_sequence_breakers": '["\\n", ":", "\\"", "*"]', "dry_penalty_last_n": 0,
        "max_tokens_second": 0, "stopping_strings": ["\nYou:"], "stop": ["\nYou:"], "truncation_length": 256,
        "ban_eos_token": False, "skip_special_tokens": True, "top_a": 0, "tfs": 1, "mirostat_mode": 0,
        "mirostat_tau": 5, "mirostat_eta": 0.1, "custom_token_bans": "", "banned_strings": [],
        "api_type": "koboldcpp", "api_server": "http://127.0.0.1:5001", "sampler_order": [6, 0, 1, 3, 4, 2, 5],
        "xtc_threshold": 0.1, "xtc_probability": 0.5, "rep_pen": 1.05, "rep_pen_range": 360,
        "repetition_penalty_range": 360, "seed": -1, "guidance_scale": 1, "negative_prompt": "",
        "grammar_string": "", "repeat_penalty": 1.05, "tfs_z": 1, "repeat_last_n": 360, "n_predict": 2,
        "num_predict": 2, "num_ctx": 256, "mirostat": 0, "ignore_eos": False, "rep_pen_slope": 1,
    }  # fmt: skip
    with AddTap(server.engine) as tap:
        r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    p = tap.params[0]
    assert (p.dry_multiplier, p.dry_sequence_breakers, p.xtc_probability) == (0.8, ["\n", ":", '"', "*"], 0.5)
    assert (p.repetition_penalty, p.repetition_penalty_range, p.min_p) == (1.05, 360, 0.05)
    assert p.sampler_order == [SAMPLER_NAMES[i] for i in (6, 0, 1, 3, 4, 2, 5)]


def test_an_out_of_range_value_is_a_400_under_the_name_sent(server):
    err = assert_error(_complete(server, typical=1.5), 400)
    assert err["param"] == "typical" and err["message"].startswith("typical must be")
    err = assert_error(_complete(server, mirostat_tau="x"), 400)
    assert err["param"] == "mirostat_tau"
