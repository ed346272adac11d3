"""Sampler fields that other OpenAI-compatible servers take on /v1 (llama.cpp's server, vLLM, TabbyAPI, and
KoboldCpp, whose names SillyTavern's KoboldCpp connection sends to /v1/completions): each is honoured under
its name (HONOURED: the SamplingParams field it sets, and whose semantics) or refused with a 400 naming it
(REFUSED, unless at its neutral value). Front ends send several backends' names for one setting at once
(SillyTavern sends rep_pen, repetition_penalty and repeat_penalty together): names of one field must agree,
or the request is a 400 naming both. The README's table is this module's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from fitllm.engine.request import SAMPLER_NAMES
from fitllm.server.errors import bad_request


def _number(name: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad_request(f"{name} must be a number; got {v!r}", name)
    return float(v)


def _integer(name: str, v: Any) -> int:
    x = _number(name, v)
    if not x.is_integer():
        raise bad_request(f"{name} must be an integer; got {v!r}", name)
    return int(x)


def _window(name: str, v: Any) -> int:
    """A token window: -1 and 0 mean the whole context (KoboldCpp; llama.cpp's -1)."""
    return max(0, _integer(name, v))


def _boolean(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise bad_request(f"{name} must be true or false; got {v!r}", name)
    return v


def _breakers(name: str, v: Any) -> list[str]:
    """A list of strings, or a JSON string of one (text-generation-webui's and SillyTavern's form)."""
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except ValueError:
            v = None
    if not isinstance(v, list) or not all(isinstance(b, str) for b in v):
        raise bad_request(f"{name} must be a list of strings", name)
    return v


def _order(name: str, v: Any) -> list[str]:
    """KoboldCpp's sampler ids (0 top_k, 1 top_a, 2 top_p + min_p, 3 tfs, 4 typical, 5 temperature, 6
    repetition penalties) as SamplingParams names."""
    if not isinstance(v, list) or any(
        isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= 6 for s in v
    ):
        raise bad_request(f"{name} must list distinct sampler ids 0-6; got {v!r}", name)
    if len(set(v)) != len(v):
        raise bad_request(f"{name} must list distinct sampler ids 0-6; got {v!r}", name)
    return [SAMPLER_NAMES[s] for s in v]


def _seed(name: str, v: Any) -> int | None:
    s = _integer(name, v)
    return None if s == -1 else s  # KoboldCpp: -1 is a random seed


def _mirostat(name: str, v: Any) -> int:
    m = _integer(name, v)
    return m if m in (1, 2) else 0  # KoboldCpp and llama.cpp: any other mode is off


def _sigma(name: str, v: Any) -> float:
    return max(0.0, _number(name, v))  # llama.cpp: -1 (any value <= 0) is off


@dataclass(frozen=True, slots=True)
class Alias:
    """A body field other servers honour: the SamplingParams field it sets, how its value is read, and whose
    name and semantics it has."""

    field: str
    read: Callable[[str, Any], Any]
    servers: str


HONOURED: dict[str, Alias] = {
    "typical_p": Alias("typical_p", _number, "llama.cpp, TabbyAPI"),
    "typical": Alias("typical_p", _number, "KoboldCpp"),
    "tfs": Alias("tfs", _number, "KoboldCpp, TabbyAPI"),
    "tfs_z": Alias("tfs", _number, "llama.cpp (older servers)"),
    "top_a": Alias("top_a", _number, "KoboldCpp, TabbyAPI"),
    "top_n_sigma": Alias("top_n_sigma", _sigma, "llama.cpp"),
    "nsigma": Alias("top_n_sigma", _sigma, "KoboldCpp"),
    "mirostat": Alias("mirostat", _mirostat, "llama.cpp, KoboldCpp"),
    "mirostat_mode": Alias("mirostat", _mirostat, "TabbyAPI"),
    "mirostat_tau": Alias("mirostat_tau", _number, "llama.cpp, KoboldCpp, TabbyAPI"),
    "mirostat_eta": Alias("mirostat_eta", _number, "llama.cpp, KoboldCpp, TabbyAPI"),
    "dynatemp_range": Alias("dynatemp_range", _number, "llama.cpp, KoboldCpp"),
    "dynatemp_exponent": Alias("dynatemp_exponent", _number, "llama.cpp, KoboldCpp"),
    "smoothing_factor": Alias("smoothing_factor", _number, "KoboldCpp, TabbyAPI"),
    "smoothing_curve": Alias("smoothing_curve", _number, "TabbyAPI"),
    "xtc_threshold": Alias("xtc_threshold", _number, "llama.cpp, KoboldCpp, TabbyAPI"),
    "xtc_probability": Alias("xtc_probability", _number, "llama.cpp, KoboldCpp, TabbyAPI"),
    "dry_multiplier": Alias("dry_multiplier", _number, "llama.cpp, KoboldCpp, TabbyAPI"),
    "dry_base": Alias("dry_base", _number, "llama.cpp, KoboldCpp, TabbyAPI"),
    "dry_allowed_length": Alias("dry_allowed_length", _integer, "llama.cpp, KoboldCpp, TabbyAPI"),
    "dry_penalty_last_n": Alias("dry_penalty_last_n", _window, "llama.cpp, KoboldCpp"),
    "dry_range": Alias("dry_penalty_last_n", _window, "TabbyAPI"),
    "dry_sequence_breakers": Alias("dry_sequence_breakers", _breakers, "llama.cpp, KoboldCpp, TabbyAPI"),
    "rep_pen": Alias("repetition_penalty", _number, "KoboldCpp"),
    "repeat_penalty": Alias("repetition_penalty", _number, "llama.cpp"),
    "rep_pen_range": Alias("repetition_penalty_range", _window, "KoboldCpp"),
    "repetition_penalty_range": Alias("repetition_penalty_range", _window, "TabbyAPI"),
    "repeat_last_n": Alias("repetition_penalty_range", _window, "llama.cpp"),
    "rep_pen_slope": Alias("repetition_penalty_slope", _number, "KoboldCpp"),
    "sampler_order": Alias("sampler_order", _order, "KoboldCpp"),
    "sampler_seed": Alias("seed", _seed, "KoboldCpp"),
    "temperature_last": Alias("temperature_last", _boolean, "TabbyAPI, vLLM-based Aphrodite"),
}


def banned_phrases(banned_strings: list[str] | None, extra: dict[str, Any]) -> list[str]:
    """The anti-slop phrases of a body: `banned_strings` (TabbyAPI's name, a declared field), else KoboldCpp's
    `banned_tokens` (what SillyTavern's KoboldCpp connection sends to /v1/completions)."""
    if banned_strings is not None:
        return list(banned_strings)
    value = extra.get("banned_tokens")
    return [] if value is None else _breakers("banned_tokens", value)


def _off(neutral: Any) -> Callable[[Any], bool]:
    return lambda v: v is not None and v != neutral and v not in ("", [], {})


# Sampler fields these servers honour that fitllm does not: a 400 naming the field unless neutral.
REFUSED: dict[str, tuple[Callable[[Any], bool], str]] = {
    "epsilon_cutoff": (_off(0), "epsilon_cutoff sampling is not supported"),
    "eta_cutoff": (_off(0), "eta_cutoff sampling is not supported"),
    "skew": (_off(0), "skew (TabbyAPI) is not supported"),
    "repetition_decay": (_off(0), "repetition_decay (TabbyAPI) is not supported"),
    "penalty_range_decay": (_off(0), "penalty_range_decay is not supported"),
    "cfg_scale": (_off(1), "classifier-free guidance (cfg_scale) is not supported"),
    "guidance_scale": (_off(1), "classifier-free guidance (guidance_scale) is not supported"),
    "min_keep": (lambda v: v not in (None, 0, 1), "min_keep above 1 is not supported"),
    "penalize_nl": (_off(False), "penalize_nl is not supported"),
    "samplers": (_off(None), "samplers (llama.cpp's chain) is not supported; send KoboldCpp's sampler_order"),
    "sampler_priority": (_off(None), "sampler_priority is not supported; send KoboldCpp's sampler_order"),
    "min_temp": (_off(None), "min_temp / max_temp (TabbyAPI) are not supported; send dynatemp_range"),
    "max_temp": (_off(None), "min_temp / max_temp (TabbyAPI) are not supported; send dynatemp_range"),
    "dynatemp_low": (_off(None), "dynatemp_low / dynatemp_high are not supported; send dynatemp_range"),
    "dynatemp_high": (_off(None), "dynatemp_low / dynatemp_high are not supported; send dynatemp_range"),
    "custom_token_bans": (_off(None), "custom_token_bans is not supported (use logit_bias)"),
    "ban_eos_token": (_off(False), "ban_eos_token is not supported (use ignore_eos)"),
    "use_default_badwordsids": (_off(False), "use_default_badwordsids is not supported (use ignore_eos)"),
}


def writer_kwargs(extra: dict[str, Any], typed: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """SamplingParams keyword arguments from the body's HONOURED names, and the name each came under (for
    errors); `typed`: the fields the body model declares (temperature, repetition_penalty, seed, ...), which
    aliases of the same field must agree with."""
    out: dict[str, Any] = {}
    named: dict[str, str] = {}
    for field, value in typed.items():
        if value is not None:
            out[field], named[field] = value, field
    for name, alias in HONOURED.items():
        if name not in extra or extra[name] is None:
            continue
        value = alias.read(name, extra[name])
        if value is None:
            continue
        if alias.field in out and out[alias.field] != value:
            first = named[alias.field]
            raise bad_request(
                f"{first} ({out[alias.field]!r}) and {name} ({value!r}) set the same sampler differently",
                name,
            )
        out[alias.field], named[alias.field] = value, name
    return out, named
