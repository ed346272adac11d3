"""Long stories at the front ends: whether a request may reuse a trimmed story's K/V by a context shift, and how
much old story to cut when the context is full.

- **The choice** (`resolve_context_shift`): the body's `context_shift`, else `--context-shift` when it is on or
  off, else the route's default: on for the Kobold routes and the studio (what KoboldCpp users expect), off
  for the OpenAI routes (a shifted cache is close to, not bit-identical with, recomputation).
- **The cut** (`story_cut`): where a shift serves, the oldest story tokens go as KoboldCpp trims them, but in
  whole KV blocks (`ServerState.trim_align`: at most block_size - 1 tokens more): successive cuts then differ by
  whole blocks, so the engine's shift takes the kept blocks over and rotates them in place instead of copying
  them (fitllm/engine/context_shift.py). Where it cannot (shift off for the request, or a model that
  cannot shift: ServedModel.context_shift_unsupported), a token-exact cut would move the story's start every
  turn and the prefix cache, keyed from position 0, would miss all of it: every turn would prefill the whole
  story again. So the story is cut in steps of `share` x its room (KoboldCpp's SmartContext), counted from
  the story's start: the cut stays where it is while the story grows, and the next turns append to a cached
  prefix until the story has grown by a whole step.
"""

from __future__ import annotations

import math

ROUTE_DEFAULTS = {"kobold": True, "studio": True, "openai": False}
DEFAULT_SMART_CONTEXT_SHARE = 0.5


def resolve_context_shift(requested: bool | None, server_flag: str, route: str) -> bool:
    """The request's context shift choice: its own field, else the server's --context-shift (on / off), else
    the route's default (ROUTE_DEFAULTS)."""
    if requested is not None:
        return requested
    if server_flag in ("on", "off"):
        return server_flag == "on"
    return ROUTE_DEFAULTS[route]


def check_share(share: float) -> float:
    """`share` if it is a usable --smart-context-share (0 <= share < 1; 0: always token-exact), else ValueError."""
    if not (isinstance(share, int | float) and math.isfinite(share) and 0 <= share < 1):
        raise ValueError(f"--smart-context-share must be at least 0 and below 1; got {share}")
    return float(share)


def story_cut(story_tokens: int, room: int, share: float, align: int = 1) -> int:
    """How many of the oldest story tokens to drop so that the rest fits `room`: when `share` is 0, the
    overflow rounded up to a multiple of `align` (1: token-exact), else a whole number of steps of `share` x
    `room` (the same cut for every length until the story outgrows it); always leaving at least one token."""
    overflow = story_tokens - room
    if overflow <= 0:
        return 0
    if share <= 0 or room < 2:
        return min(math.ceil(overflow / align) * align, story_tokens - 1) if align > 1 else overflow
    step = max(1, int(share * room))
    return min(math.ceil(overflow / step) * step, story_tokens - 1)
