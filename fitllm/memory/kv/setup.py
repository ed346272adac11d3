"""Sizing the KV pool at start: slab size and count from the budget left after weights and workspace."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from fitllm.config import EngineConfig, ModelConfig, cdiv
from fitllm.memory.kv.block_pool import BlockPool
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.staged import StagedSlabStorage
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.ledger import MemoryLedger
from fitllm.units import format_bytes

log = logging.getLogger("fitllm")


def kv_pool_shape(
    config: EngineConfig, per_block: int, max_model_len: int, free: int, device: torch.device
) -> tuple[int, int]:
    """(blocks per slab, slabs at most) of a KV pool over `free` bytes with blocks of `per_block` bytes:
    elastic by default, one up-front slab with --static-kv or --kv-cache-memory. The plan sizes it the same."""
    # Blocks beyond max_num_seqs full contexts could never be used at once.
    wanted = config.max_num_seqs * cdiv(max_model_len, config.block_size)
    if config.static_kv or config.kv_cache_memory is not None:
        kv_bytes = config.kv_cache_memory
        if kv_bytes is None:
            kv_bytes = min(wanted * per_block, free)
        return kv_bytes // per_block, 1
    # A budget tighter than one slab gets a smaller slab rather than a refusal.
    slab_bytes = min(config.resolve_kv_slab_size(device), free)
    slab_blocks = min(max(1, slab_bytes // per_block), wanted)
    return slab_blocks, cdiv(wanted, slab_blocks)


def kv_cache_retention(config: EngineConfig, per_token: int, max_model_len: int, kv_room: int) -> int:
    """Bytes of cached prefix KV idle release may keep (`--kv-cache-retention`). Default: one full context's
    KV (one story survives a pause), at most a quarter of the room left for KV; 0 without prefix caching.
    The plan shows the same figure."""
    if not config.enable_prefix_caching:
        return 0
    if config.kv_cache_retention is not None:
        return config.kv_cache_retention
    return min(max_model_len * per_token, max(kv_room, 0) // 4)


@dataclass(slots=True)
class KVStage:
    """A run of decoder layers whose KV one device holds in its own ledger (the whole model, or one stage
    of a `--layer-split`)."""

    num_layers: int
    device: torch.device
    ledger: MemoryLedger


def build_kv_pool(
    config: EngineConfig,
    mc: ModelConfig,
    kv_format: KVCacheFormat,
    max_model_len: int,
    device: torch.device,
    ledger: MemoryLedger,
    stages: list[KVStage] | None = None,
) -> tuple[KVSlabStorage | StagedSlabStorage, BlockPool]:
    """The KV slab storage (first slab allocated, in the ledger) and the block pool over it: elastic by
    default, one up-front slab with --static-kv or --kv-cache-memory. With `stages` (a layer split), one
    storage per stage over its layers and in its ledger, as one `StagedSlabStorage` whose slabs are added on
    every stage at once: slabs as many blocks as the tightest stage allows. Errors name the flag to change."""
    stages = stages or [KVStage(mc.num_hidden_layers, device, ledger)]
    kvh = mc.num_key_value_heads
    shapes, retained = [], []
    for stage in stages:
        per_token = kv_format.bytes_per_token(stage.num_layers, kvh)
        per_block = per_token * config.block_size
        kv_room = stage.ledger.free_bytes()
        shapes.append(kv_pool_shape(config, per_block, max_model_len, kv_room, stage.device))
        retained.append(kv_cache_retention(config, per_token, max_model_len, kv_room) // per_block)
        if shapes[-1][0] < 1:
            where = f" on {stage.device}" if len(stages) > 1 else ""
            raise ValueError(
                f"no room for one KV block{where} ({format_bytes(per_block)}): raise --kv-cache-memory or "
                f"{'--layer-split' if len(stages) > 1 else '--memory-budget'} (see `fitllm plan`)"
            )
    # The stage with the fewest blocks per slab also needs the most slabs: its shape serves every stage.
    slab_blocks, max_slabs = min(shapes)
    parts = [
        KVSlabStorage(
            stage.num_layers,
            kvh,
            kv_format,
            config.block_size,
            slab_blocks,
            max_slabs,
            stage.device,
            stage.ledger,
        )
        for stage in stages
    ]
    storage = parts[0] if len(parts) == 1 else StagedSlabStorage(parts)
    if not storage.add(0):
        refused = next(p for p in parts if not p.ledger.can_reserve(p.slab_bytes))
        flag = "--layer-split" if len(parts) > 1 else "--memory-budget"
        raise ValueError(
            f"the first KV slab ({format_bytes(refused.slab_bytes)}) does not fit in {flag} "
            f"{format_bytes(refused.ledger.budget)} of {refused.device} after weights and workspace "
            f"({format_bytes(refused.ledger.total)}); raise the budget, or lower --kv-slab-size or "
            f"--kv-cache-memory"
        )
    pool = BlockPool(
        slab_blocks,
        enable_caching=config.enable_prefix_caching,
        max_slabs=max_slabs,
        allocator=storage,
        idle_release_s=config.kv_idle_release_s,
        retain_blocks=min(retained),
        copy_blocks=storage.copy_blocks,
    )
    log.info(
        "KV pool: slabs of %d blocks x %d tokens (%s each%s), up to %d slabs; %s",
        slab_blocks,
        config.block_size,
        format_bytes(storage.slab_bytes),
        f", over {len(parts)} devices" if len(parts) > 1 else "",
        max_slabs,
        "static" if max_slabs == 1 else "elastic",
    )
    return storage, pool
