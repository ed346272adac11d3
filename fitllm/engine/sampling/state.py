"""What a request's writers' samplers carry from one step to the next (`Request.sampler_state`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitllm.engine.sampling.dry import DryState


@dataclass(slots=True)
class SamplerState:
    """DRY's incremental matches, and mirostat's mu (on the device, so reading it never waits for a step;
    it starts at 2 * tau for each request, where KoboldCpp keeps one for the whole process)."""

    dry: DryState | None = None
    mirostat_mu: torch.Tensor | None = None


def state_of(request) -> SamplerState:
    """The request's state, made on first use."""
    if request.sampler_state is None:
        request.sampler_state = SamplerState()
    return request.sampler_state
