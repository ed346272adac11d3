"""Requests, sampling parameters and what the engine hands back for them."""

from __future__ import annotations

import enum
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from fitllm.engine.structured.spec import StructuredOutput

GREEDY_BELOW = 1e-5  # temperatures below this sample greedily (logits / 1e-38 overflow to inf and NaN)
# Every integer field fits a signed 64-bit integer: the sampler builds int64 tensors from them, so a larger
# one would overflow there, inside the step of every request in the batch, instead of being refused here.
INT64_MAX = 2**63 - 1
MAX_LOGPROBS = 20
# The samplers an explicit order can name (KoboldCpp's sampler ids 0-6, in id order: top-k, top-a, top-p with
# min-p, tail-free, typical, temperature with dynamic temperature / smoothing / top-n-sigma, repetition
# penalties). A sampler missing from an order is not applied, as in KoboldCpp.
SAMPLER_NAMES = ("top_k", "top_a", "top_p", "tfs", "typical_p", "temperature", "repetition_penalty")
DRY_DEFAULT_BREAKERS = ("\n", ":", '"', "*")  # KoboldAI Lite's and llama.cpp's default


@dataclass(slots=True)
class SamplingParams:
    """How to pick each next token and when to stop (OpenAI / vLLM semantics)."""

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF style, over prompt and output tokens
    # KoboldCpp style when > 0: repetition and presence penalties look only at the last N tokens of prompt +
    # output, and the older half of that window gets 1 + (repetition_penalty - 1) * slope.
    repetition_penalty_range: int = 0
    repetition_penalty_slope: float = 1.0  # in (0, 1]; KoboldCpp treats 0 (and > 1) as 1, so does fitllm
    temperature_last: bool = (
        False  # top-k / top-p / min-p cut the untempered distribution (KoboldCpp's order)
    )
    presence_penalty: float = 0.0  # OpenAI style, over output tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # n most likely tokens' logprobs besides the sampled one
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False
    # Phrases the output may never contain (case-insensitive): the request is rewound to where one began and
    # samples again there (fitllm/engine/banned.py; KoboldCpp's banned_tokens, TabbyAPI's banned_strings).
    banned_strings: list[str] = field(default_factory=list)
    # Reuse a cached sequence's KV after a span was cut from it, K rotated to the new positions (KoboldCpp's
    # ContextShift). Not bit-identical to recomputing, so it is a choice: None follows the engine's
    # --context-shift; the server's routes resolve their own default (Kobold and studio on, OpenAI off).
    context_shift: bool | None = None
    # The writers' samplers (KoboldCpp / llama.cpp semantics; fitllm/engine/sampling/). Each is off at its
    # default. top_a, typical_p, tfs: truncations; top_n_sigma: KoboldCpp's nsigma (applied with temperature).
    top_a: float = 0.0
    typical_p: float = 1.0
    tfs: float = 1.0
    top_n_sigma: float = 0.0
    smoothing_factor: float = 0.0  # quadratic sampling, applied with temperature
    smoothing_curve: float = 1.0  # 1: KoboldCpp's curve; TabbyAPI / text-generation-webui's cubic term
    dynatemp_range: float = 0.0  # temperature from entropy in [temperature -+ range]
    dynatemp_exponent: float = 1.0
    mirostat: int = 0  # 1 or 2: mirostat v1 / v2 instead of the sampler order (per-request mu)
    mirostat_tau: float = 5.0
    mirostat_eta: float = 0.1
    xtc_threshold: float = 0.1  # XTC is on when xtc_probability > 0 and the threshold <= 0.5
    xtc_probability: float = 0.0
    dry_multiplier: float = 0.0  # DRY is on when > 0
    dry_base: float = 1.75
    dry_allowed_length: int = 2
    dry_penalty_last_n: int = 0  # the last N tokens of prompt + output; 0 or -1: all (KoboldCpp)
    dry_sequence_breakers: list[str] = field(default_factory=lambda: list(DRY_DEFAULT_BREAKERS))
    # An explicit order of SAMPLER_NAMES (KoboldCpp's sampler_order); None: repetition penalties, then
    # temperature first (or last with temperature_last), top-k, top-a, top-p / min-p, tfs, typical.
    sampler_order: list[str] | None = None
    # The output must match this JSON schema / regex / choice / grammar (fitllm/engine/structured/): compiled
    # at admission, a token mask per step, and the request ends when the grammar is complete.
    structured_output: StructuredOutput | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = [s for s in self.stop if s]
        if isinstance(self.banned_strings, str):
            self.banned_strings = [self.banned_strings]
        self.banned_strings = [s for s in self.banned_strings if s]
        if self.top_k == -1:
            self.top_k = 0
        if isinstance(self.sampler_order, tuple):
            self.sampler_order = list(self.sampler_order)
        if isinstance(self.dry_sequence_breakers, tuple):
            self.dry_sequence_breakers = list(self.dry_sequence_breakers)
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""

        def bad(name: str, value: Any, rule: str) -> ValueError:
            return ValueError(f"{name} must be {rule}; got {value!r}")

        def finite(name: str, value: Any) -> None:
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                raise bad(name, value, "a finite number")

        def integer(name: str, lo: int, hi: int, rule: str) -> None:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not lo <= value <= hi:
                raise bad(name, value, rule)

        for name in (
            "temperature",
            "top_p",
            "min_p",
            "repetition_penalty",
            "presence_penalty",
            "frequency_penalty",
        ):
            finite(name, getattr(self, name))
        if self.temperature < 0:
            raise bad("temperature", self.temperature, ">= 0 (0 means greedy)")
        if not 0 < self.top_p <= 1:
            raise bad("top_p", self.top_p, "in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise bad("min_p", self.min_p, "in [0, 1]")
        # vLLM's rule: a top_k past the vocabulary keeps every token (the sampler treats it as off).
        integer("top_k", 0, INT64_MAX, "an integer in [-1, 2**63) (0 or -1: off; past the vocabulary: off)")
        finite("repetition_penalty_slope", self.repetition_penalty_slope)
        integer("repetition_penalty_range", 0, INT64_MAX, "an integer in [0, 2**63) (0: all)")
        if self.repetition_penalty <= 0:
            raise bad("repetition_penalty", self.repetition_penalty, "> 0 (1 means off)")
        if not -2 <= self.presence_penalty <= 2:
            raise bad("presence_penalty", self.presence_penalty, "in [-2, 2]")
        if not -2 <= self.frequency_penalty <= 2:
            raise bad("frequency_penalty", self.frequency_penalty, "in [-2, 2]")
        if self.max_tokens is not None:
            integer("max_tokens", 1, INT64_MAX, "a positive integer below 2**63")
        integer("min_tokens", 0, INT64_MAX, "an integer in [0, 2**63)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", self.min_tokens, f"<= max_tokens ({self.max_tokens})")
        if self.logprobs is not None:
            integer("logprobs", 0, MAX_LOGPROBS, f"an integer in [0, {MAX_LOGPROBS}]")
        if self.seed is not None:
            integer("seed", -(2**63), INT64_MAX, "a 64-bit signed integer")
        if self.logit_bias:
            for tok, bias in self.logit_bias.items():
                finite(f"logit_bias[{tok}]", bias)
        self._validate_writers(bad, finite, integer)
        if self.structured_output is not None and not isinstance(self.structured_output, StructuredOutput):
            raise bad("structured_output", self.structured_output, "a StructuredOutput")

    def _validate_writers(self, bad: Any, finite: Any, integer: Any) -> None:
        """The writers' samplers' fields (ranges as KoboldCpp clamps or rejects them)."""
        for name in (
            "top_a", "typical_p", "tfs", "top_n_sigma", "smoothing_factor", "smoothing_curve", "dynatemp_range",
            "dynatemp_exponent", "mirostat_tau", "mirostat_eta", "xtc_threshold", "xtc_probability",
            "dry_multiplier", "dry_base",
        ):  # fmt: skip
            finite(name, getattr(self, name))
        for name, lo, hi in (("top_a", 0, 1), ("typical_p", 0, 1), ("tfs", 0, 1), ("xtc_probability", 0, 1)):
            if not lo <= getattr(self, name) <= hi:
                raise bad(name, getattr(self, name), f"in [{lo}, {hi}]")
        for name in (
            "top_n_sigma",
            "smoothing_factor",
            "dynatemp_exponent",
            "dry_multiplier",
            "xtc_threshold",
        ):
            if getattr(self, name) < 0:
                raise bad(name, getattr(self, name), ">= 0")
        if self.mirostat not in (0, 1, 2):
            raise bad("mirostat", self.mirostat, "0 (off), 1 or 2")
        if self.dry_multiplier > 0 and self.dry_base <= 0:
            raise bad("dry_base", self.dry_base, "> 0 when dry_multiplier is on")
        integer("dry_allowed_length", 0, INT64_MAX, "an integer in [0, 2**63)")
        integer("dry_penalty_last_n", -1, INT64_MAX, "an integer in [-1, 2**63) (0 or -1: all)")
        breakers = self.dry_sequence_breakers
        if not isinstance(breakers, list) or not all(isinstance(b, str) for b in breakers):
            raise bad("dry_sequence_breakers", breakers, "a list of strings")
        if len(breakers) > 128 or any(len(b) > 40 for b in breakers):  # KoboldCpp's and llama.cpp's caps
            raise bad("dry_sequence_breakers", breakers, "at most 128 strings of at most 40 characters")
        order = self.sampler_order
        if order is not None and (
            not isinstance(order, list)
            or len(set(order)) != len(order)
            or any(s not in SAMPLER_NAMES for s in order)
        ):
            raise bad("sampler_order", order, f"distinct names from {list(SAMPLER_NAMES)}")

    @property
    def greedy(self) -> bool:
        """Temperature 0, or one so small that dividing the logits by it would overflow them (vLLM's rule);
        with dynamic temperature the range decides (KoboldCpp), so it is never greedy."""
        return self.temperature < GREEDY_BELOW and self.dynatemp_range == 0

    @property
    def xtc_on(self) -> bool:
        """XTC as KoboldCpp and llama.cpp gate it: a probability above 0 and a threshold of at most 0.5."""
        return self.xtc_probability > 0 and self.xtc_threshold <= 0.5

    @property
    def needs_chain(self) -> bool:
        """Whether sampling runs the ordered sampler chain (fitllm/engine/sampling/chain.py) rather than the
        fast temperature / top-k / top-p / min-p path: an explicit order or a writers' sampler."""
        return (
            self.sampler_order is not None
            or self.top_a > 0
            or self.typical_p < 1
            or self.tfs < 1
            or self.top_n_sigma > 0
            or self.smoothing_factor > 0
            or self.dynatemp_range != 0
            or self.mirostat in (1, 2)
            or self.xtc_on
        )

    def token_limit(self, num_prompt_tokens: int, max_model_len: int) -> int:
        """The most tokens (prompt + output) a request with these params may reach: max_tokens past its
        prompt, never past the context."""
        if self.max_tokens is None:
            return max_model_len
        return min(max_model_len, num_prompt_tokens + self.max_tokens)

    @property
    def uses_token_history(self) -> bool:
        """Whether sampling reads the previous tokens (the penalties), not only their count."""
        return (
            self.repetition_penalty != 1.0
            or bool(self.presence_penalty or self.frequency_penalty)
            or self.dry_multiplier > 0
        )


class RequestStatus(enum.Enum):
    """Where a request is in its life."""

    WAITING = "waiting"
    RUNNING = "running"
    PREEMPTED = "preempted"
    FINISHED_STOPPED = "stop"
    FINISHED_LENGTH = "length"
    FINISHED_ABORTED = "abort"
    FINISHED_ERROR = "error"  # its rows made a step raise: it alone was stopped (RequestOutput.error)

    @property
    def finished(self) -> bool:
        return self in (
            RequestStatus.FINISHED_STOPPED,
            RequestStatus.FINISHED_LENGTH,
            RequestStatus.FINISHED_ABORTED,
            RequestStatus.FINISHED_ERROR,
        )


@dataclass(slots=True)
class Logprob:
    """Log probability of one candidate token, with its rank among all tokens (1 = most likely)."""

    logprob: float
    rank: int | None  # None where it is not computed (prompt logprobs beyond the top-n)
    decoded_token: str | None = None


@dataclass(slots=True)
class CompletionOutput:
    """Generated text so far (cumulative), plus what is new since the last output (delta)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, Logprob]] | None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass(slots=True)
class CacheReuse:
    """Where a request's prompt K/V came from at its first admission, in tokens: found in the prefix cache,
    reused by a context shift (rotated to new positions), copied back from the host-memory cache tier, or
    computed (prefilled). cached + shifted + from_host + prefilled is the prompt length."""

    cached: int = 0
    shifted: int = 0
    from_host: int = 0
    prefilled: int = 0


@dataclass(slots=True)
class RequestMetrics:
    """Timestamps (time.monotonic) for latency figures."""

    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    finished_time: float | None = None


@dataclass(slots=True)
class RequestOutput:
    """What the engine reports for a request after a step."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    reuse: CacheReuse = field(default_factory=CacheReuse)
    metrics: RequestMetrics | None = None
    error: BaseException | None = None  # set when the request failed (finish reason "error"): why

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache (OpenAI's usage.prompt_tokens_details.cached_tokens)."""
        return self.reuse.cached


class Request:
    """One request's whole state inside the engine (token ids, progress, sampling and text state)."""

    __slots__ = (
        "request_id",
        "prompt",
        "params",
        "priority",
        "arrival_time",
        "token_ids",
        "num_prompt_tokens",
        "num_computed_tokens",
        "num_output_placeholders",
        "status",
        "generator",
        "detokenizer",
        "logprobs",
        "cumulative_logprob",
        "finish_reason",
        "stop_reason",
        "reuse",
        "num_preemptions",
        "metrics",
        "max_total_tokens",
        "banned",
        "num_stale_samples",
        "sampler_state",
        "constraint",
        "_sent_tokens",
    )

    def __init__(
        self,
        request_id: str,
        prompt: str | None,
        prompt_token_ids: list[int],
        params: SamplingParams,
        priority: int = 0,
        arrival_time: float | None = None,
    ) -> None:
        self.request_id = request_id
        self.prompt = prompt
        self.params = params
        self.priority = priority
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.token_ids = list(prompt_token_ids)
        self.num_prompt_tokens = len(prompt_token_ids)
        self.num_computed_tokens = 0
        # Async scheduling: tokens sampled by launched steps, not yet on the host (one per such step: at
        # most 2, between queueing step N+1 and reading step N). Steps are scheduled as if they were there;
        # the input id comes from the device (ModelRunner).
        self.num_output_placeholders = 0
        self.status = RequestStatus.WAITING
        # A seeded request owns its random stream, so its samples do not depend on its batch neighbours.
        self.generator: torch.Generator | None = None
        if params.seed is not None:
            self.generator = torch.Generator().manual_seed(params.seed)
        self.detokenizer = None
        self.logprobs: list[dict[int, Logprob]] | None = [] if params.logprobs is not None else None
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None
        self.reuse = CacheReuse()
        self.num_preemptions = 0
        self.metrics = RequestMetrics(self.arrival_time)
        self.max_total_tokens = 0  # set by Scheduler.add (SamplingParams.token_limit)
        self.banned = None  # BannedStrings when params.banned_strings (set by the engine)
        # Samples in flight when the request was rewound (a banned phrase): dropped when they are read.
        self.num_stale_samples = 0
        # What the writers' samplers carry from step to step (DRY's matches, mirostat's mu); see
        # fitllm/engine/sampling/state.py. Created by the sampler on first use.
        self.sampler_state: Any = None
        # The grammar matcher when params.structured_output (a structured.matcher.Constraint, set by the
        # engine at admission), advanced with each output token.
        self.constraint: Any = None
        self._sent_tokens = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_cached_tokens(self) -> int:
        """Prompt tokens found in the prefix cache at the first admission (see `reuse`)."""
        return self.reuse.cached

    @property
    def num_tokens_with_placeholders(self) -> int:
        """What the scheduler plans with: the known tokens plus those sampled but not yet on the host."""
        return len(self.token_ids) + self.num_output_placeholders

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def prompt_token_ids(self) -> list[int]:
        return self.token_ids[: self.num_prompt_tokens]

    @property
    def sort_key(self) -> tuple[int, float]:
        """Scheduling order: lower priority value first, then earlier arrival."""
        return (self.priority, self.arrival_time)

    def mark_finished(self, status: RequestStatus) -> None:
        """Record why the request ended (the scheduler also frees it; see Scheduler.finish_requests)."""
        self.status = status
        self.finish_reason = status.value
        self.metrics.finished_time = time.monotonic()

    def take_new_token_ids(self, released: int | None = None) -> list[int]:
        """Output token ids not yet reported (of the first `released`: those whose text is out)."""
        end = None if released is None else self.num_prompt_tokens + released
        new = self.token_ids[self.num_prompt_tokens + self._sent_tokens : end]
        self._sent_tokens += len(new)
        return new
