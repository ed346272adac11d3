"""What an engine holds, for front ends (EngineStatus) and for people (memory_report)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from fitllm.memory.host import host_memory
from fitllm.memory.kv.host_cache import TAG
from fitllm.memory.ledger import LedgerSnapshot
from fitllm.units import format_bytes

if TYPE_CHECKING:
    from fitllm.engine.engine import Engine


@dataclass(frozen=True, slots=True)
class EngineStatus:
    """What the engine holds now, for front ends that show it (metrics, the studio's memory panel); built
    on the engine thread (fitllm/engine/view.py publishes it), its dicts fresh, never shared."""

    ledger: LedgerSnapshot
    kv_blocks: dict[str, int]  # used / cached / free blocks of the live slabs (disjoint: they sum to all)
    num_blocks: int  # blocks of the live slabs
    block_size: int
    slabs: int
    slab_bytes: int
    requests: dict[str, int]  # running / waiting / swapped
    preemptions: int
    offloaded_layers: int = 0
    offloaded_bytes: int = 0  # decoder layers kept off the device (file or pinned host memory)
    bytes_streamed: int = 0  # copied into staging since start
    # Cached prefix KV kept through idle release (--kv-cache-retention) and the host tier (--kv-host-cache).
    kv_retention_budget_bytes: int = 0
    kv_retained_bytes: int = 0  # cached blocks the last idle release kept off the slabs it gave back
    kv_retained_slabs: int = 0  # idle slabs the last idle release held for cached blocks
    kv_blocks_compacted: int = 0  # cached blocks moved into slabs that stay, since start
    kv_host_cache_bytes: int = 0  # host tier: bytes of evicted prefix blocks held now
    kv_host_blocks_written: int = 0  # host tier: blocks copied to host memory, since start
    kv_host_blocks_read: int = 0  # host tier: blocks copied back to the device on a prefix hit, since start
    spec_draft_tokens: int = 0  # speculation (--speculative-ngram): tokens proposed, since start
    spec_accepted_tokens: int = 0  # of which accepted
    # --layer-split: each device's ledger, as (device index:name, snapshot), stage 0's included (it is
    # `ledger` too); empty without a split.
    devices: tuple[tuple[str, LedgerSnapshot], ...] = ()


def engine_status(engine: Engine) -> EngineStatus:
    """What the engine holds now, by pool, queue and offload."""
    pool, sched, tier, spec = engine.pool, engine.scheduler, engine.host_cache, engine.speculator
    return EngineStatus(
        ledger=engine.ledger.snapshot(),
        devices=tuple((f"{st.index}:{st.device}", st.ledger.snapshot()) for st in engine.stages),
        kv_blocks={
            "used": pool.num_used_blocks,
            "cached": pool.num_cached_blocks,
            # The pool's num_free_blocks counts cached blocks too (both can be handed out); here they are
            # apart, so used + cached + free is the pool (the studio's KV bar draws them side by side).
            "free": pool.num_free_blocks - pool.num_cached_blocks,
        },
        num_blocks=pool.num_blocks,
        block_size=engine.block_size,
        slabs=pool.num_slabs,
        slab_bytes=engine.storage.slab_bytes,
        requests={
            "running": len(sched.running),
            "waiting": sched.num_waiting,
            "swapped": engine.swapper.num_swapped_requests,
        },
        preemptions=sched.num_preemptions,
        offloaded_layers=len(engine.placement.offloaded),
        offloaded_bytes=engine.placement.offloaded_bytes,
        bytes_streamed=0 if engine.streamer is None else engine.streamer.stats.bytes_streamed,
        kv_retention_budget_bytes=pool.retain_blocks * engine.storage.block_bytes,
        kv_retained_bytes=pool.num_retained * engine.storage.block_bytes,
        kv_retained_slabs=len(pool.held_slabs),
        kv_blocks_compacted=pool.num_compacted,
        kv_host_cache_bytes=0 if tier is None else tier.ledger.current(TAG),
        kv_host_blocks_written=0 if tier is None else tier.blocks_written,
        kv_host_blocks_read=0 if tier is None else tier.blocks_read,
        spec_draft_tokens=0 if spec is None else spec.stats.num_draft_tokens,
        spec_accepted_tokens=0 if spec is None else spec.stats.num_accepted_tokens,
    )


def give_back_to_device(device: torch.device) -> None:
    """After KV slabs are released: on CUDA their blocks stay in PyTorch's caching allocator, where the
    device (nvidia-smi, other processes) still counts them, so empty the cache; elsewhere nothing to do."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def memory_report(engine: Engine) -> str:
    """The ledger by tag, the workspace planned vs measured, and the process's resident memory."""
    lines = [engine.ledger.report()]
    for stage in engine.stages:  # a layer split: each device's own ledger, stage 0's the engine's
        head = (
            f"layer split, device {stage.index} ({stage.device}, layers {stage.layers.start}-"
            f"{stage.layers.stop - 1}{'; embedding, LM head' if stage.index == 0 else ''}):"
        )
        if stage.index == 0:
            lines[0] = f"{head}\n{lines[0]}"
        else:
            lines.append(f"{head}\n{stage.ledger.report()}")
    if engine.workspace_measured is not None:
        lines.append(
            f"workspace planned {format_bytes(engine.workspace_planned)}, measured {format_bytes(engine.workspace_measured)}"
        )
    lines.append(
        f"KV: {engine.pool.num_slabs} slab(s) of {format_bytes(engine.storage.slab_bytes)} ({engine.storage.mode}), "
        f"{engine.pool.num_used_blocks} blocks used, {engine.pool.num_cached_blocks} cached, "
        f"{engine.pool.num_free_blocks - engine.pool.num_cached_blocks} free"
    )
    pool, block_bytes = engine.pool, engine.storage.block_bytes
    if pool.retain_blocks:
        lines.append(
            f"KV retention: idle release keeps up to {format_bytes(pool.retain_blocks * block_bytes)} of cached "
            f"prefixes ({format_bytes(pool.num_retained * block_bytes)} at the last release, "
            f"{len(pool.held_slabs)} slab(s) held); {pool.num_compacted} blocks moved so far"
        )
    if engine.host_cache is not None:
        tier = engine.host_cache
        lines.append(
            f"KV host tier: {format_bytes(tier.ledger.current(TAG))} of {format_bytes(tier.ledger.budget)}; "
            f"{tier.blocks_written} blocks written, {tier.blocks_read} read back"
        )
    if engine.streamer is not None:
        p, st = engine.placement, engine.streamer.stats
        lines.append(
            f"offload: {len(p.offloaded)} of {p.num_layers} decoder layers streamed "
            f"({format_bytes(p.offloaded_bytes)} kept off the device, {format_bytes(p.staging_bytes)} staging "
            f"for prefetch {p.prefetch}); {format_bytes(st.bytes_streamed)} streamed so far"
        )
    if engine.graphs is not None:
        lines.append(
            f"CUDA graphs: {len(engine.graphs.sizes)} decode batch sizes up to {engine.graphs.sizes[-1]}, "
            f"pool {format_bytes(engine.graphs.pool_bytes)} (in workspace)"
        )
    if engine.swapper.ledger is not None:
        sw = engine.swapper.ledger
        lines.append(
            f"host swap ({engine.swapper.mode}): {format_bytes(sw.current('kv_swapped'))} of "
            f"{format_bytes(sw.budget)} (peak {format_bytes(sw.snapshot().peak_total)}); "
            f"{engine.swapper.num_swap_outs} swapped out, {engine.swapper.num_recomputes} recomputed"
        )
    if engine.device.type == "cuda":
        allocated = torch.cuda.memory_allocated(engine.device)
        reserved = torch.cuda.memory_reserved(engine.device)
        lines.append(
            f"CUDA allocator: {format_bytes(allocated)} allocated, {format_bytes(reserved)} reserved "
            f"(the ledger holds {format_bytes(engine.ledger.total)}; reserved beyond it is the caching "
            f"allocator's fragmentation and cache: {format_bytes(max(0, reserved - engine.ledger.total))})"
        )
    else:
        host = host_memory()
        if host is not None:
            lines.append(
                f"process RSS: {format_bytes(host.rss)} ({format_bytes(host.anon)} anonymous: the ledger's "
                f"bytes plus the Python and torch runtime and the tokenizer; {format_bytes(host.file)} "
                f"mapped files: libraries)"
            )
    return "\n".join(lines)
