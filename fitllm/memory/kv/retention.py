"""Which cached prefix blocks idle release keeps (`--kv-cache-retention`), and where they go.

Idle release gives back slabs no request has used for `--kv-idle-release-s`. Their cached blocks (ref 0,
hashed: a finished story's prefix) would go with them, so a writer who pauses to read would re-read the
whole story on the next turn. Instead, before releasing, the pool keeps the most recently used cached
blocks, at most `retain_blocks` of them (the retention budget):

1. Compaction: a kept block on a slab being released is moved (its K/V copied) into a free block of a slab
   that stays: a clean free block first (lowest id, so high slabs keep draining), then a cached block
   beyond the budget (least recently used first). Blocks in use never move.
2. Holding: only when the kept blocks do not fit there are idle slabs held back from release, lowest first,
   as many as needed and never more than the budget's bytes in whole slabs.
3. Kept blocks that still have no room go with their slab, as every cached block did before.

With a budget of 0, or no cached blocks, this is exactly the old release: every idle slab goes, with its
cached blocks. This module only plans; the pool applies the plan (fitllm/memory/kv/block_pool.py).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class ReleasePlan:
    """One idle-release pass: slabs to give back and to hold, blocks to move and to evict."""

    release: list[int] = field(default_factory=list)  # idle slabs given back
    held: list[int] = field(default_factory=list)  # idle slabs kept because kept blocks need them
    moves: list[tuple[int, int]] = field(default_factory=list)  # (source, destination) block ids, MRU first
    # Cached blocks whose hash is dropped: on released slabs and not moved, or destinations overwritten.
    dropped: list[int] = field(default_factory=list)
    retained: int = 0  # kept blocks that were on idle slabs (moved or on held slabs)


def plan_release(
    draining: list[int],
    slab_blocks: int,
    cached_lru: list[int],
    free: list[int],
    retain_blocks: int,
) -> ReleasePlan:
    """Plan the release of the idle, unused slabs `draining` (never slab 0).

    cached_lru: every cached block id of the live slabs, least recently used first; free: every clean free
    block id of the live slabs; retain_blocks: the retention budget in blocks."""
    idle = set(draining)
    keep = set(cached_lru[max(0, len(cached_lru) - retain_blocks) :]) if retain_blocks > 0 else set()
    kept_on = Counter(i // slab_blocks for i in keep if i // slab_blocks in idle)
    need = sum(kept_on.values())  # kept blocks on idle slabs
    # Room on the slabs that stay: clean free blocks and cached blocks beyond the budget.
    room = sum(1 for i in free if i // slab_blocks not in idle)
    room += sum(1 for i in cached_lru if i not in keep and i // slab_blocks not in idle)
    plan = ReleasePlan()
    max_held = retain_blocks // slab_blocks
    for slab in sorted(draining):
        if need <= room or len(plan.held) >= max_held:
            break
        # Holding a slab keeps its own kept blocks in place and adds its other blocks as room.
        plan.held.append(slab)
        need -= kept_on[slab]
        room += slab_blocks - kept_on[slab]
    held = set(plan.held)
    plan.release = [s for s in draining if s not in held]
    gone = set(plan.release)
    destinations = sorted(i for i in free if i // slab_blocks not in gone)
    destinations += [i for i in cached_lru if i not in keep and i // slab_blocks not in gone]
    sources = [i for i in reversed(cached_lru) if i in keep and i // slab_blocks in gone]
    plan.moves = list(zip(sources, destinations, strict=False))
    moved = {src for src, _ in plan.moves}
    overwritten = {dst for _, dst in plan.moves}
    plan.dropped = [
        i for i in cached_lru if (i // slab_blocks in gone and i not in moved) or i in overwritten
    ]
    plan.retained = len(plan.moves) + sum(kept_on[s] for s in plan.held)
    return plan
