"""KoboldAI / KoboldCpp request bodies, with KoboldCpp's defaults, and their translation: the context
(memory and prompt trimmed as KoboldCpp trims them) and SamplingParams (its samplers and sampler order).

- `memory` is kept whole at the front; the prompt is trimmed from its oldest tokens so that memory +
  prompt + max_length fit max_context_length (itself capped by --max-model-len), and max_length is capped
  so some context always remains. Token-exact where a context shift reuses the rest; in steps of
  --smart-context-share where it cannot (fitllm/server/story_trim.py).
- `context_shift` (fitllm's field; true / false, absent: --context-shift, else on): whether this request may
  reuse a trimmed story's cached K/V by a context shift.
- Samplers, all KoboldCpp's (gpttype_adapter.cpp SampleLogits; fitllm/engine/sampling/): temperature
  (<= 0: greedy), dynatemp_range / dynatemp_exponent, smoothing_factor, nsigma, top_k (< 1: off), top_a,
  top_p, min_p, tfs, typical, rep_pen over the last rep_pen_range tokens with rep_pen_slope,
  presence_penalty over the same window, mirostat (1 / 2, with mirostat_tau / mirostat_eta), DRY
  (dry_multiplier, dry_base, dry_allowed_length, dry_penalty_last_n, dry_sequence_breakers), XTC
  (xtc_threshold, xtc_probability), in any sampler_order (ids 0-6; an id left out is a sampler not
  applied), logit_bias, sampler_seed, stop_sequence with trim_stop (default on: the stop string is cut from
  the text). Grammars and images are accepted only empty; anything else is a 400 naming the field.
- banned_tokens (KoboldCpp's anti-slop phrases; banned_strings, SillyTavern's name, when it is absent):
  the output never contains them (fitllm/engine/banned.py).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from typing import Any, Protocol

from pydantic import Field

from fitllm.engine.request import SAMPLER_NAMES, SamplingParams
from fitllm.engine.structured.spec import StructuredOutput
from fitllm.loader.tokenizer import Tokenizer
from fitllm.server.body import Body
from fitllm.server.errors import bad_request
from fitllm.server.kobold.jobs import MAX_GENKEY_CHARS
from fitllm.server.story_trim import story_cut

DEFAULT_MAX_LENGTH = 100
DEFAULT_SAMPLER_ORDER = [6, 0, 1, 3, 4, 2, 5]
# SamplingParams fields -> the Kobold fields they come from, so an error names what the client sent.
KOBOLD_NAMES = {
    "repetition_penalty": "rep_pen",
    "repetition_penalty_range": "rep_pen_range",
    "repetition_penalty_slope": "rep_pen_slope",
    "max_tokens": "max_length",
    "seed": "sampler_seed",
    "typical_p": "typical",
    "top_n_sigma": "nsigma",
}
KOBOLD_LOGPROBS = 5  # alternatives per token KoboldCpp reports (its logprobs_max)


class ContextModel(Protocol):
    """What trimming needs of the served model (fitllm/engine/view.py ServedModel)."""

    tokenizer: Tokenizer
    max_model_len: int


class KoboldGenerateRequest(Body):
    """POST /api/v1/generate and /api/extra/generate/stream, with KoboldCpp's defaults."""

    prompt: str = ""
    memory: str = ""
    max_length: int = DEFAULT_MAX_LENGTH
    max_context_length: int | None = None
    temperature: float = 0.75
    top_k: int = 100
    top_p: float = 0.92
    min_p: float = 0.0
    top_a: float = 0.0
    typical: float = 1.0
    tfs: float = 1.0
    nsigma: float = 0.0
    rep_pen: float = 1.0
    rep_pen_range: int = 320
    rep_pen_slope: float = 1.0
    presence_penalty: float = 0.0
    sampler_order: list[int] | None = None
    sampler_seed: int = -1
    stop_sequence: list[str] | None = None
    trim_stop: bool = True
    genkey: str = Field(default="", max_length=MAX_GENKEY_CHARS)
    mirostat: int = 0
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    dynatemp_range: float = 0.0
    dynatemp_exponent: float = 1.0
    smoothing_factor: float = 0.0
    dry_multiplier: float = 0.0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 320
    dry_sequence_breakers: list[str] | str | None = None  # KoboldCpp's default: none
    xtc_probability: float = 0.0
    xtc_threshold: float = 0.2
    grammar: str = ""  # GBNF (llama.cpp's), as KoboldCpp takes it; Lark also reads
    grammar_retain_state: bool = False
    banned_tokens: list[str] | None = None
    banned_strings: list[str] | None = None
    logit_bias: dict[str, float] | None = None
    use_default_badwordsids: bool = False
    ban_eos_token: bool | None = None
    bypass_eos: bool = False
    images: list[Any] | None = None
    logprobs: bool = False  # KoboldAI Lite's token-probability view: the top KOBOLD_LOGPROBS per token
    context_shift: bool | None = None  # None: --context-shift, else on (server/story_trim.py)


class GenkeyRequest(Body):
    genkey: str = Field(default="", max_length=MAX_GENKEY_CHARS)


class TokenCountRequest(Body):
    prompt: str = ""
    special: bool = True


class DetokenizeRequest(Body):
    ids: list[int]


def _reject_unsupported(body: KoboldGenerateRequest) -> None:
    """400 for what fitllm does not implement set to a non-neutral value (never silently ignored)."""
    unsupported = [
        # KoboldCpp keeps a grammar's state from the last generation when this is set (a "continue"); fitllm
        # starts every generation's grammar afresh.
        ("grammar_retain_state", bool(body.grammar and body.grammar_retain_state), "false"),
        ("images", bool(body.images), "empty"),
    ]
    for name, used, neutral in unsupported:
        if used:
            raise bad_request(f"{name} is not supported by fitllm; set it to {neutral} (off)", name)


def sampler_order(order: list[int] | None) -> list[str]:
    """KoboldCpp's sampler ids (0 top_k, 1 top_a, 2 top_p + min_p, 3 tfs, 4 typical, 5 temperature, 6
    repetition penalties) as SamplingParams names, in the client's order; None: KoboldCpp's default."""
    order = DEFAULT_SAMPLER_ORDER if order is None else order
    if len(set(order)) != len(order) or any(not 0 <= s <= 6 for s in order):
        raise bad_request(f"sampler_order must list distinct sampler ids 0-6; got {order}", "sampler_order")
    return [SAMPLER_NAMES[s] for s in order]


def dry_breakers(value: list[str] | str | None) -> list[str]:
    """dry_sequence_breakers as a list: KoboldCpp takes a list; SillyTavern's text-completion presets hold
    a JSON string of one."""
    if value is None:
        return []
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError as exc:
            raise bad_request(
                "dry_sequence_breakers must be a list of strings", "dry_sequence_breakers"
            ) from exc
    if not isinstance(value, list) or not all(isinstance(b, str) for b in value):
        raise bad_request("dry_sequence_breakers must be a list of strings", "dry_sequence_breakers")
    return value


def _reject_non_finite(body: KoboldGenerateRequest) -> None:
    """400 for a NaN or infinite number: the clamps below (max, min) would silently turn NaN into a
    neutral value (a NaN temperature into greedy, a NaN top_p into off), answering another question."""
    numbers = [(n, v) for n in type(body).model_fields if isinstance(v := getattr(body, n), float)]
    numbers += [(f"logit_bias[{k}]", v) for k, v in (body.logit_bias or {}).items()]
    for name, value in numbers:
        if not math.isfinite(value):
            raise bad_request(f"{name} must be a finite number; got {value}", name.split("[")[0])


def sampling_params(
    body: KoboldGenerateRequest, max_length: int, eos_ids: Sequence[int], context_shift: bool | None = None
) -> SamplingParams:
    _reject_non_finite(body)
    _reject_unsupported(body)
    bias: dict[int, float] = {}
    for k, v in (body.logit_bias or {}).items():
        try:
            bias[int(k)] = max(-100.0, min(100.0, float(v)))
        except ValueError as exc:
            raise bad_request("logit_bias keys must be token ids", "logit_bias") from exc
    ban_eos = body.ban_eos_token if body.ban_eos_token is not None else body.use_default_badwordsids
    if ban_eos:
        bias.update(dict.fromkeys(eos_ids, -100.0))
    stops = [s for s in (body.stop_sequence or []) if s]
    try:
        return SamplingParams(
            temperature=max(0.0, body.temperature),
            # KoboldCpp: top_p 0 keeps only the most likely token; above 1, off.
            top_k=1 if body.top_p <= 0 else max(0, body.top_k),
            top_p=min(1.0, body.top_p) if body.top_p > 0 else 1.0,
            min_p=max(0.0, body.min_p),
            repetition_penalty=body.rep_pen,
            repetition_penalty_range=max(1, body.rep_pen_range),
            repetition_penalty_slope=body.rep_pen_slope,
            presence_penalty=body.presence_penalty,
            sampler_order=sampler_order(body.sampler_order),
            top_a=max(0.0, body.top_a),
            typical_p=min(1.0, max(0.0, body.typical)),
            tfs=min(1.0, max(0.0, body.tfs)),
            top_n_sigma=max(0.0, body.nsigma),
            smoothing_factor=max(0.0, body.smoothing_factor),
            dynatemp_range=body.dynatemp_range,
            dynatemp_exponent=max(0.0, body.dynatemp_exponent),
            mirostat=body.mirostat if body.mirostat in (1, 2) else 0,
            mirostat_tau=body.mirostat_tau,
            mirostat_eta=body.mirostat_eta,
            xtc_threshold=body.xtc_threshold,
            xtc_probability=min(1.0, max(0.0, body.xtc_probability)),
            dry_multiplier=max(0.0, body.dry_multiplier),
            dry_base=body.dry_base,
            dry_allowed_length=body.dry_allowed_length,
            dry_penalty_last_n=max(0, body.dry_penalty_last_n),
            dry_sequence_breakers=dry_breakers(body.dry_sequence_breakers),
            seed=body.sampler_seed if body.sampler_seed > 0 else None,
            max_tokens=max_length,
            stop=stops,
            include_stop_str_in_output=not body.trim_stop,
            ignore_eos=bool(ban_eos or body.bypass_eos),
            logit_bias=bias or None,
            logprobs=KOBOLD_LOGPROBS if body.logprobs else None,
            context_shift=context_shift,
            # KoboldCpp: banned_tokens, else SillyTavern's banned_strings.
            banned_strings=list(
                body.banned_tokens if body.banned_tokens is not None else body.banned_strings or []
            ),
            structured_output=StructuredOutput("grammar", body.grammar, "grammar")
            if body.grammar.strip()
            else None,
        )
    except ValueError as exc:
        message = str(exc)
        name = message.split(" ", 1)[0]
        kobold = KOBOLD_NAMES.get(name)
        raise bad_request(message.replace(name, kobold, 1) if kobold else message, kobold) from exc


def build_context(
    model: ContextModel, body: KoboldGenerateRequest, share: float = 0.0, align: int = 1
) -> tuple[list[int], int]:
    """(prompt token ids, max_length): memory whole at the front, then the newest prompt tokens that fit
    max_context_length - max_length (KoboldCpp's trimming), cut in steps of `share` of the room when it is
    above 0, else in multiples of `align` tokens (story_trim.story_cut)."""
    tok = model.tokenizer
    # 0 is a length, not "unset" (KoboldCpp takes it as given), so it is refused below like any short one.
    asked = model.max_model_len if body.max_context_length is None else body.max_context_length
    ctx = min(asked, model.max_model_len)
    if ctx < 8:
        raise bad_request(f"max_context_length must be at least 8; got {ctx}", "max_context_length")
    if body.max_length < 1:
        raise bad_request(f"max_length must be at least 1; got {body.max_length}", "max_length")
    max_length = min(body.max_length, ctx - max(min(ctx - 4, 16), int(0.2 * ctx)))
    bos = tok.encode("", add_special_tokens=True)  # [BOS] for models that start with it, else []
    memory = tok.encode(body.memory, add_special_tokens=False) if body.memory else []
    prompt = tok.encode(body.prompt, add_special_tokens=False)
    room = ctx - max_length - len(bos)
    if len(memory) > room - 1:
        memory = memory[len(memory) - (room - 1) :]  # memory alone overflows: its oldest tokens go
    prompt = prompt[story_cut(len(prompt), room - len(memory), share, align) :]
    ids = bos + memory + prompt
    if len(ids) == len(bos):
        raise bad_request("the prompt is empty", "prompt")
    return ids, max_length
