"""Every sampler preset SillyTavern ships for the KoboldAI / KoboldCpp API and KoboldAI Lite's built-in presets
(tests/fixtures/kobold_presets.json), sent through HTTP in the body each front end builds: accepted, and the
sampler settings the engine runs are the preset's (read where requests enter the engine)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from live_server import serve
from stand_ins import AddTap

from fitllm.config import EngineConfig
from fitllm.engine.async_engine import AsyncEngine
from fitllm.engine.request import SAMPLER_NAMES
from fitllm.server.app import default_model_name

PRESETS = json.loads((Path(__file__).parent / "fixtures" / "kobold_presets.json").read_text())
PROMPT = "The Martians landed on Horsell Common, and the crowd gathered at the pit.\n"


@pytest.fixture(scope="module")
def server():
    config = EngineConfig(dtype="bfloat16", max_model_len=256, max_num_seqs=4, seed=0)
    with serve(AsyncEngine(config), default_model_name(None)) as s:
        yield s


def sillytavern_body(preset: dict) -> dict:
    """SillyTavern's getKoboldGenerationData (public/scripts/kai-settings.js) with a KoboldCpp that has every
    flag it checks (stop sequences, streaming, min-p, mirostat, grammar, default badwordsids)."""
    s = PRESETS["sillytavern_defaults"] | preset
    return {
        "prompt": PROMPT, "gui_settings": False, "sampler_order": s["sampler_order"], "max_context_length": 256,
        "max_length": 2, "rep_pen": s["rep_pen"], "rep_pen_range": s["rep_pen_range"],
        "rep_pen_slope": s["rep_pen_slope"], "temperature": s["temp"], "tfs": s["tfs"], "top_a": s["top_a"],
        "top_k": s["top_k"], "top_p": s["top_p"], "min_p": s["min_p"], "typical": s["typical"],
        "use_world_info": False, "singleline": False, "stop_sequence": ["\nYou:"], "streaming": False,
        "can_abort": True, "mirostat": s["mirostat"], "mirostat_tau": s["mirostat_tau"],
        "mirostat_eta": s["mirostat_eta"], "use_default_badwordsids": s["use_default_badwordsids"],
        "grammar": s["grammar"], "api_server": "http://127.0.0.1:5001/api",
    }  # fmt: skip


def lite_body(preset: dict) -> dict:
    """KoboldAI Lite's submit payload (klite.embd) for a KoboldCpp >= 1.74: its params, flattened with the
    prompt, the memory / trim_stop of >= 1.49 and the extra fields of >= 1.37 (DRY and XTC are sent only
    when on, and no Lite preset turns them on)."""
    return {
        "prompt": PROMPT, "n": 1, "max_context_length": 256, "max_length": 2, "rep_pen": preset["rep_pen"],
        "temperature": preset["temp"], "top_p": preset["top_p"], "top_k": preset["top_k"],
        "top_a": preset["top_a"], "typical": preset["typical"], "tfs": preset["tfs"],
        "rep_pen_range": preset["rep_pen_range"], "rep_pen_slope": preset["rep_pen_slope"],
        "sampler_order": preset["sampler_order"], "memory": "", "trim_stop": True, "min_p": preset["min_p"],
        "dynatemp_range": preset["dynatemp_range"], "dynatemp_exponent": preset["dynatemp_exponent"],
        "smoothing_factor": preset["smoothing_factor"], "banned_tokens": [], "render_special": False,
        "presence_penalty": preset["presence_penalty"], "logit_bias": {}, "quiet": True,
        "stop_sequence": ["\nYou:"], "use_default_badwordsids": False, "bypass_eos": False,
    }  # fmt: skip


def _expected(body: dict) -> dict:
    """The SamplingParams a body's samplers should become (KoboldCpp's reading of each field)."""
    return {
        "temperature": max(0.0, body["temperature"]),
        # KoboldCpp's top_p 0 keeps the most likely token only: fitllm's top_k 1 (and top_p off)
        "top_k": 1 if body["top_p"] <= 0 else max(0, body["top_k"]),
        "top_p": 1.0 if body["top_p"] <= 0 else min(1.0, body["top_p"]),
        "min_p": body["min_p"],
        "top_a": body["top_a"],
        "typical_p": min(1.0, body["typical"]),
        "tfs": min(1.0, body["tfs"]),
        "repetition_penalty": body["rep_pen"],
        "repetition_penalty_range": max(1, body["rep_pen_range"]),
        "repetition_penalty_slope": body["rep_pen_slope"],
        "sampler_order": [SAMPLER_NAMES[i] for i in body["sampler_order"]],
        "mirostat": body.get("mirostat", 0) if body.get("mirostat", 0) in (1, 2) else 0,
        "mirostat_tau": body.get("mirostat_tau", 5.0),
        "mirostat_eta": body.get("mirostat_eta", 0.1),
        "dynatemp_range": body.get("dynatemp_range", 0.0),
        "dynatemp_exponent": body.get("dynatemp_exponent", 1.0),
        "smoothing_factor": body.get("smoothing_factor", 0.0),
        "presence_penalty": body.get("presence_penalty", 0.0),
    }


CASES = [("sillytavern", n) for n in PRESETS["sillytavern_kobold"]] + [
    ("lite", n) for n in PRESETS["kobold_lite"]
]


@pytest.mark.parametrize(("front_end", "name"), CASES, ids=[f"{f}:{n}" for f, n in CASES])
def test_preset_is_accepted_and_runs_as_sent(server, front_end, name):
    if front_end == "sillytavern":
        body = sillytavern_body(PRESETS["sillytavern_kobold"][name])
    else:
        body = lite_body(PRESETS["kobold_lite"][name])
    with AddTap(server.engine) as tap:
        r = httpx.post(f"{server.url}/api/v1/generate", json=body, timeout=120)
    assert r.status_code == 200, r.text
    assert isinstance(r.json()["results"][0]["text"], str)
    (params,) = tap.params
    want = _expected(body)
    assert params.sampler_order == want.pop("sampler_order")
    assert {k: getattr(params, k) for k in want} == pytest.approx(want)


def test_the_presets_cover_what_the_issue_names():
    st = PRESETS["sillytavern_kobold"]
    # Refused before the writers' samplers: repetition penalty off but placed after temperature, and top_a.
    assert st["Universal-Creative"]["sampler_order"][0] == 5 and st["Universal-Creative"]["rep_pen"] == 1
    assert st["Titanic"]["top_a"] > 0
    assert {"Universal-Light", "Universal-Super-Creative", "Miro Gold"} <= set(st)
    assert PRESETS["kobold_lite"]["Basic DynaTemp"]["dynatemp_range"] > 0
    assert PRESETS["kobold_lite"]["Basic SmoothSample"]["smoothing_factor"] > 0
