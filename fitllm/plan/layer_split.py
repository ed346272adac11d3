"""Which consecutive decoder layers each device of `--layer-split` holds, from its budget.

Every stage's KV pool grows in lockstep (a slab is added on every stage at once, each holding its own
layers' share of the slab), so the tokens of KV the split holds are the fewest any stage holds: stage i's
room for layers and KV (its budget less workspace, overhead, and on stage 0 the embedding, final norm and
LM head) divided by its layers' cost per token. The layers are apportioned in proportion to that room,
which makes every stage's KV capacity equal, the best the tightest one allows. The engine's start-up and
`fitllm plan` both use `plan_layer_split`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from fitllm.config import EngineConfig, ModelConfig, parse_layer_split
from fitllm.plan.memory_plan import MemoryPlan
from fitllm.units import format_bytes


@dataclass(slots=True)
class StagePlan:
    """One device's planned share: its layers and its memory figures."""

    device: torch.device
    budget: int
    layers: range
    weight_bytes: int  # its decoder layers, and on stage 0 the embedding, final norm and LM head
    workspace: int  # stage 0's includes the logits and sampler; the others' the forward's only
    kv_bytes_per_token: int  # its layers' K and V for one token
    overhead: int = 0  # set aside by `fitllm plan` (the engine ledgers none)

    @property
    def kv_room(self) -> int:
        return self.budget - self.weight_bytes - self.workspace - self.overhead

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV this stage holds in what its budget leaves."""
        return max(0, self.kv_room) // max(1, self.kv_bytes_per_token)


def split_devices(config: EngineConfig, device: torch.device) -> list[tuple[torch.device, str]]:
    """(device, budget spec) per `--layer-split` entry; a bare budget's device is the Nth of `device`'s type
    (cuda:N, or cpu). Every device must be of one type."""
    assert config.layer_split is not None
    out = []
    for n, (name, budget) in enumerate(parse_layer_split(config.layer_split)):
        if name is None:
            name = f"cuda:{n}" if device.type == "cuda" else "cpu"
        out.append((torch.device(name), budget))
    if len({d.type for d, _ in out}) > 1:
        raise ValueError(
            f"--layer-split {config.layer_split!r} mixes device types; give devices of one type (for CPU "
            f"layers beside a GPU use --cpu-offload-gb without --layer-split)"
        )
    return out


def refuse_with_layer_split(config: EngineConfig) -> None:
    """Flags that a layer split does not support, each refused naming both flags."""
    if config.tensor_parallel_size > 1:
        raise ValueError("--layer-split and --tensor-parallel-size > 1 cannot be combined; choose one")
    if config.cpu_offload_gb:
        raise ValueError("--layer-split does not stream layers: leave --cpu-offload-gb at 0")
    if config.memory_budget is not None:
        raise ValueError("--layer-split gives each device its budget: leave --memory-budget unset")
    if config.kv_host_cache:
        raise ValueError("--kv-host-cache is not supported with --layer-split; leave it at 0")
    if config.max_model_len == "auto":
        raise ValueError("--max-model-len auto is not supported with --layer-split; give a number of tokens")
    if config.async_scheduling == "on":
        raise ValueError("--async-scheduling on is not supported with --layer-split; use auto or off")
    if config.compile_decode:
        raise ValueError("--compile-decode is not supported with --layer-split (the hops between devices are "
                         "eager); leave it off")  # fmt: skip


def apportion(rooms: list[int], num_layers: int) -> list[int]:
    """`num_layers` split in proportion to `rooms` (largest remainders; a room of 0 or less gets none)."""
    weights = [max(0, r) for r in rooms]
    total = sum(weights)
    if total == 0:
        return [0] * len(rooms)
    exact = [num_layers * w / total for w in weights]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(rooms)), key=lambda i: exact[i] - counts[i], reverse=True)
    for i in by_remainder[: num_layers - sum(counts)]:
        counts[i] += 1
    return counts


def balance(counts: list[int], rooms: list[int], layer_bytes: int, layer_kv: int) -> list[int]:
    """`counts` after moving single layers between devices while that raises the fewest KV tokens any
    device holds (the pool's capacity): whole layers make the proportional split uneven by up to a layer's
    share of each device's KV."""

    def capacity(c: list[int]) -> float:
        return min((r - n * layer_bytes) / (n * max(1, layer_kv)) for r, n in zip(rooms, c, strict=True))

    best = capacity(counts)
    while True:
        moves = [
            [n - (k == i) + (k == j) for k, n in enumerate(counts)]
            for i in range(len(counts))
            for j in range(len(counts))
            if i != j and counts[i] > 1
        ]
        top = max(moves, key=capacity, default=None)
        if top is None or capacity(top) <= best:
            return counts
        counts, best = top, capacity(top)


def plan_layer_split(
    plan: MemoryPlan, devices: list[torch.device], budgets: list[int], length: int
) -> list[StagePlan]:
    """The stages of a split of `plan`'s model over `devices` with `budgets` at a context of `length`.
    Raises ValueError, naming the flag, when a device would hold no layer or the split cannot hold the
    weights and one KV block per stage."""
    mc, weights = plan.model_config, plan.weights
    num_layers = mc.num_hidden_layers
    per_layer_kv = plan.kv_bytes_per_token // num_layers
    outside = weights.total - num_layers * weights.per_layer  # embedding, final norm, LM head
    workspaces = [plan.workspace_at(length, sampling=i == 0) for i in range(len(devices))]
    fixed = [ws + plan.overhead + (outside if i == 0 else 0) for i, ws in enumerate(workspaces)]
    rooms = [b - f for b, f in zip(budgets, fixed, strict=True)]
    counts = apportion(rooms, num_layers)
    if all(counts):
        counts = balance(counts, rooms, weights.per_layer, per_layer_kv)
    stages, start = [], 0
    for i, (device, budget, n) in enumerate(zip(devices, budgets, counts, strict=True)):
        stages.append(
            StagePlan(
                device,
                budget,
                range(start, start + n),
                n * weights.per_layer + (outside if i == 0 else 0),
                workspaces[i],
                n * per_layer_kv,
                plan.overhead,
            )
        )
        start += n
    block = plan.config.block_size
    need = weights.total + sum(fixed) - outside + block * plan.kv_bytes_per_token
    short = [i for i, s in enumerate(stages) if not s.layers or s.kv_tokens < block]
    if short:
        s = stages[short[0]]
        why = (
            "leaves room for no decoder layer"
            if not s.layers
            else f"cannot hold its {len(s.layers)} layers and one KV block"
        )
        raise ValueError(
            f"--layer-split: device {short[0]} ({s.device})'s budget {format_bytes(s.budget)} {why}; the model needs about "
            f"{format_bytes(need)} in all (weights, each device's workspace, one KV block) and the budgets "
            f"give {format_bytes(sum(budgets))}: raise the budgets, drop that device, or quantize (see "
            f"`fitllm plan --layer-split ...`)"
        )
    return stages


def split_capacity(stages: list[StagePlan], block_size: int) -> int:
    """Tokens of KV the split holds: the tightest stage's, in whole blocks."""
    return min(s.kv_tokens for s in stages) // block_size * block_size


def split_table(stages: list[StagePlan], block_size: int, length: int) -> str:
    """The per-device lines `fitllm plan --layer-split` prints."""
    lines = ["layer split (one process; hidden states hop device to device):"]
    for i, s in enumerate(stages):
        extra = " + embedding, final norm, LM head" if i == 0 else ""
        lines.append(
            f"  {str(s.device):8} layers {s.layers.start:>3}-{s.layers.stop - 1:<3} ({len(s.layers)}{extra}): "
            f"budget {format_bytes(s.budget)}, weights {format_bytes(s.weight_bytes)}, workspace "
            f"{format_bytes(s.workspace)}, KV {format_bytes(s.kv_bytes_per_token)}/token, room for "
            f"{s.kv_tokens} tokens"
        )
    capacity = split_capacity(stages, block_size)
    lines.append(
        f"  KV pool (grows on every device at once): {capacity} tokens, "
        f"{capacity // max(1, length)} full-length ({length}-token) requests"
    )
    return "\n".join(lines)


def layer_split_plan(
    config: EngineConfig, model_config: ModelConfig, device: torch.device, **plan_kw
) -> tuple[list[StagePlan] | str, int]:
    """What `fitllm plan --layer-split` reports: (the stages, or why the split cannot hold the model; the
    context planned for). `plan_kw` go to `MemoryPlan.for_engine` (group size, overhead)."""
    from fitllm.memory.budget import resolve_budget

    refuse_with_layer_split(config)
    pairs = split_devices(config, device)
    budgets = [resolve_budget(spec, d) for d, spec in pairs]
    plan = MemoryPlan.for_engine(config, model_config, pairs[0][0], budget=sum(budgets), **plan_kw)
    length, _ = plan.initial_length(strict=False, warn=False)
    try:
        return plan_layer_split(plan, [d for d, _ in pairs], budgets, length), length
    except ValueError as exc:
        return str(exc), length
