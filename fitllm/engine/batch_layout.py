"""A step's `BatchLayout` from the scheduler's output: built once per step, on the host, then turned into
the attention backend's metadata by its builder (fitllm/model/attention/)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitllm.engine.request import Request
from fitllm.engine.scheduler import ScheduledRequest
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.model.attention.batch import BatchLayout


@dataclass(slots=True)
class PendingTokens:
    """The tokens sampled by the step in flight, still on the device (async scheduling), by request."""

    tokens: torch.Tensor  # [rows] int64 on the device
    rows: dict[str, int]  # request id -> row of `tokens`


def placeholder_sources(placeholders: list[tuple[int, Request]], pending: PendingTokens | None) -> list[int]:
    """For each (row, request) placeholder, the row of the step in flight's tokens that holds its id."""
    if not placeholders:
        return []
    assert pending is not None, "an output placeholder without a step in flight"
    return [pending.rows[r.request_id] for _, r in placeholders]


def append_input_ids(
    request: Request, start: int, end: int, ids: list[int], placeholders: list[tuple[int, Request]]
) -> None:
    """Append the request's ids [start, end) to `ids`; one not yet on the host (an output placeholder) gets a
    dummy id and is recorded in `placeholders`, to be filled on the device before the model runs."""
    known = request.token_ids[start:end]
    ids.extend(known)
    for _ in range(end - start - len(known)):
        placeholders.append((len(ids), request))
        ids.append(0)


def step_layout(
    scheduled: list[ScheduledRequest], kv: KVCacheManager, pending: PendingTokens | None = None
) -> BatchLayout:
    """The flat batch of `scheduled` (single-token decodes first): each request's new tokens, positions and
    slots through its block table, and the rows that sample (a verify step's last token and its proposed
    tokens: every row). `pending` holds the step in flight's tokens, which fill the placeholder ids."""
    layout = BatchLayout(kv.block_size, num_decodes=sum(s.num_new_tokens == 1 for s in scheduled))
    placeholders: list[tuple[int, Request]] = []
    for s in scheduled:
        r = s.request
        start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
        layout.add_sequence(kv.block_ids(r.request_id), start, end)
        drafts = s.draft_token_ids
        append_input_ids(r, start, end - len(drafts), layout.input_ids, placeholders)
        layout.input_ids += drafts
        if s.samples:
            n = len(layout.input_ids)
            layout.sample_rows += range(n - 1 - len(drafts), n)
    layout.placeholder_rows = [row for row, _ in placeholders]
    layout.placeholder_sources = placeholder_sources(placeholders, pending)
    return layout
