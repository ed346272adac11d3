"""Penalties that read a request's token history: repetition (HF, or KoboldCpp's window with slope), presence
and frequency (`penalty_terms`, applied to the whole vocabulary by the fast path or at their place in the
chain's order), and DRY (`apply_dry`, before any sampler, as KoboldCpp)."""

from __future__ import annotations

import torch

from fitllm.engine.request import Request
from fitllm.engine.sampling.dry import BreakerTable, DryState, dry_penalties
from fitllm.engine.sampling.state import state_of
from fitllm.memory.transfer import to_device


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    """[len(rows), vocab] occurrence counts of each token id."""
    counts = torch.zeros(len(rows) * vocab, dtype=torch.float32, device=device)
    flat = [i * vocab + t for i, ids in enumerate(rows) for t in ids]
    if flat:
        counts.index_add_(0, to_device(flat, torch.long, device), torch.ones(len(flat), device=device))
    return counts.view(len(rows), vocab)


def _penalty_windows(
    requests: list[Request], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(near, far) [len(requests), vocab] masks of the tokens each repetition penalty looks at.

    HF style (range 0): every prompt and output token is near. KoboldCpp style (range N): the last N
    tokens of prompt + output, the newer half near and the older half far."""
    near_rows, far_rows = [], []
    for r in requests:
        n = r.params.repetition_penalty_range
        if n <= 0:
            near_rows.append(r.prompt_token_ids + r.output_token_ids)
            far_rows.append([])
            continue
        window = (r.prompt_token_ids + r.output_token_ids)[-n:]
        split = len(window) - (n - n // 2)  # KoboldCpp splits the full-length window at n // 2
        near_rows.append(window[max(split, 0) :])
        far_rows.append(window[: max(split, 0)])
    return _token_counts(near_rows, vocab, device) > 0, _token_counts(far_rows, vocab, device) > 0


def penalty_terms(
    requests: list[Request], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(factor, subtract) [len(requests), vocab]: a logit x becomes x / factor (x > 0) or x * factor, then
    x - subtract. Repetition (HF: prompt + output; or KoboldCpp's window with slope), presence and frequency
    (OpenAI: output only; presence over the window in KoboldCpp style). None when no request has one."""
    if not any(r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty
               for r in requests):  # fmt: skip
        return None
    out_counts = _token_counts([r.output_token_ids for r in requests], vocab, device)
    near, far = _penalty_windows(requests, vocab, device)
    f32 = torch.float32
    rep = to_device([r.params.repetition_penalty for r in requests], f32, device).unsqueeze(1)
    slope = to_device(
        [s if 0 < (s := r.params.repetition_penalty_slope) <= 1 else 1.0 for r in requests], f32, device
    ).unsqueeze(1)
    rep_far = torch.where(rep > 1, 1 + (rep - 1) * slope, rep)
    factor = torch.where(near, rep, torch.where(far, rep_far, torch.ones_like(out_counts)))
    freq = to_device([r.params.frequency_penalty for r in requests], f32, device).unsqueeze(1)
    pres = to_device([r.params.presence_penalty for r in requests], f32, device).unsqueeze(1)
    windowed = to_device([r.params.repetition_penalty_range > 0 for r in requests], torch.bool, device)
    present = torch.where(windowed.unsqueeze(1), near | far, out_counts > 0)
    return factor, freq * out_counts + pres * present.float()


def apply_penalties(logits: torch.Tensor, requests: list[Request], skip: list[bool] | None = None) -> None:
    """The penalties of `penalty_terms`, in place, on every row but those in `skip` (the sampler chain's,
    which applies them at their place in the request's order)."""
    rows = [
        i
        for i, r in enumerate(requests)
        if (r.params.repetition_penalty != 1.0 or r.params.presence_penalty or r.params.frequency_penalty)
        and not (skip and skip[i])
    ]
    if not rows:
        return
    device = logits.device
    row_index = to_device(rows, torch.long, device)
    sub = logits.index_select(0, row_index)
    factor, subtract = penalty_terms([requests[i] for i in rows], logits.shape[-1], device)
    sub = torch.where(sub > 0, sub / factor, sub * factor) - subtract
    logits.index_copy_(0, row_index, sub)


def apply_dry(logits: torch.Tensor, requests: list[Request], breakers: BreakerTable | None) -> None:
    """DRY's penalties (fitllm/engine/sampling/dry.py), in place, for every row that has it on (greedy
    ones too: KoboldCpp applies DRY before any sampler), sent to the device in one copy."""
    flat: list[int] = []
    values: list[float] = []
    vocab = logits.shape[-1]
    for i, r in enumerate(requests):
        p = r.params
        if p.dry_multiplier <= 0:
            continue
        state = state_of(r)
        if state.dry is None:
            state.dry = DryState()
        state.dry.update(r.token_ids)
        heads = breakers.heads(p.dry_sequence_breakers) if breakers is not None else {}
        pens = dry_penalties(
            state.dry, p.dry_multiplier, p.dry_base, p.dry_allowed_length, p.dry_penalty_last_n, heads
        )
        for t, pen in pens.items():
            if t < vocab:
                flat.append(i * vocab + t)
                values.append(-pen)
    if flat:
        idx = to_device(flat, torch.long, logits.device)
        logits.view(-1).index_add_(0, idx, to_device(values, logits.dtype, logits.device))
