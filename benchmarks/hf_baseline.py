"""The transformers side of a comparison: the same checkpoint, static left-padded batches, `generate`."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch


@dataclass(slots=True)
class PreparedRequest:
    """A workload request with its prompt already tokenized (both systems get exactly these ids)."""

    id: str
    prompt_ids: list[int]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None


@dataclass(slots=True)
class RequestTiming:
    """One request's timestamps (time.monotonic) and token counts, the same fields for both systems."""

    id: str
    prompt_tokens: int
    output_tokens: int
    arrival: float
    first_token: float
    finished: float
    cached_tokens: int = 0

    @property
    def ttft(self) -> float:
        return self.first_token - self.arrival

    @property
    def tpot(self) -> float | None:
        """Mean time per output token after the first, as vLLM defines it."""
        if self.output_tokens < 2:
            return None
        return (self.finished - self.first_token) / (self.output_tokens - 1)


@dataclass(slots=True)
class BatchInfo:
    """What one transformers `generate` call computed, and for whom."""

    size: int
    prompt_len_padded: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    seconds: float
    first_token_seconds: float


@dataclass(slots=True)
class HFRun:
    """A whole transformers pass over the requests at one concurrency."""

    wall: float
    timings: list[RequestTiming]
    batches: list[BatchInfo] = field(default_factory=list)

    @property
    def generated_tokens(self) -> int:
        """Tokens computed, padding rows included (batch size x the batch's max_new_tokens)."""
        return sum(b.size * b.max_new_tokens for b in self.batches)

    @property
    def padded_prompt_tokens(self) -> int:
        return sum(b.size * b.prompt_len_padded for b in self.batches)


def load_hf_model(
    source_path: Path, source_format: str, dtype: torch.dtype, device: torch.device
) -> torch.nn.Module:
    """The same checkpoint fitllm serves, through transformers (a GGUF is dequantized to `dtype`)."""
    from transformers import AutoModelForCausalLM

    if source_format == "gguf":
        model = AutoModelForCausalLM.from_pretrained(
            str(source_path.parent), gguf_file=source_path.name, dtype=dtype
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(str(source_path), dtype=dtype)
    return model.to(device).eval()


def pad_token_id(model: torch.nn.Module, fallback: list[int]) -> int:
    """The model's pad id, else its EOS (it only fills masked positions, so any id would do)."""
    for cfg in (model.generation_config, model.config):
        pad = getattr(cfg, "pad_token_id", None)
        if pad is not None:
            return int(pad)
    for cfg in (model.generation_config, model.config):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            return int(eos[0] if isinstance(eos, (list, tuple)) else eos)
    return int(fallback[0]) if fallback else 0


def _step_clock():
    """A streamer that only records when each generated token (one per row, per step) reaches the host."""
    from transformers.generation.streamers import BaseStreamer

    class StepClock(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []
            self._prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self._prompt_seen:  # generate first pushes the prompt itself
                self._prompt_seen = True
                return
            self.times.append(time.monotonic())

        def end(self) -> None:
            pass

    return StepClock()


def generate_batch(
    model: torch.nn.Module, batch: list[PreparedRequest], pad_id: int
) -> tuple[list[RequestTiming], BatchInfo]:
    """One left-padded `generate` call for the batch; every row runs to the batch's largest max_tokens."""
    width = max(len(r.prompt_ids) for r in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, r in enumerate(batch):
        n = len(r.prompt_ids)
        input_ids[i, width - n :] = torch.tensor(r.prompt_ids, dtype=torch.long)
        attention_mask[i, width - n :] = 1
    max_new = max(r.max_tokens for r in batch)
    # generate takes one temperature / top_p per call: use the batch mean; seed the call with its first request.
    temperature = statistics.fmean(r.temperature for r in batch)
    top_p = statistics.fmean(r.top_p for r in batch)
    seed = batch[0].seed
    sampling = (
        {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
        if temperature > 0
        else {"do_sample": False, "temperature": None, "top_p": None, "top_k": None}
    )
    torch.manual_seed(0 if seed is None else seed)
    clock = _step_clock()
    start = time.monotonic()
    out = model.generate(
        input_ids=input_ids.to(model.device),
        attention_mask=attention_mask.to(model.device),
        max_new_tokens=max_new,
        min_new_tokens=max_new,  # EOS is never sampled, as fitllm's ignore_eos: exactly max_new steps
        pad_token_id=pad_id,
        repetition_penalty=1.0,
        streamer=clock,
        **sampling,
    )
    end = time.monotonic()
    steps = out.shape[1] - width
    if steps != max_new or len(clock.times) != max_new:
        raise RuntimeError(
            f"transformers generated {steps} steps ({len(clock.times)} streamed), expected {max_new}"
        )
    timings = [
        RequestTiming(
            id=r.id,
            prompt_tokens=len(r.prompt_ids),
            output_tokens=r.max_tokens,
            arrival=start,
            first_token=clock.times[0],
            # A request's own last token is out at step max_tokens, even though its row keeps computing.
            finished=clock.times[r.max_tokens - 1],
        )
        for r in batch
    ]
    info = BatchInfo(
        len(batch), width, max_new, temperature, top_p, seed, end - start, clock.times[0] - start
    )
    return timings, info


def run_transformers(
    model: torch.nn.Module, requests: list[PreparedRequest], concurrency: int, pad_id: int
) -> HFRun:
    """Static batching: consecutive groups of `concurrency` requests, each group one `generate` call."""
    timings: list[RequestTiming] = []
    batches: list[BatchInfo] = []
    start = time.monotonic()
    for i in range(0, len(requests), concurrency):
        t, b = generate_batch(model, requests[i : i + concurrency], pad_id)
        timings += t
        batches.append(b)
    return HFRun(time.monotonic() - start, timings, batches)
