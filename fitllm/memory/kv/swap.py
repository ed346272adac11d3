"""Swap preemption: park a preempted request's K/V in host memory instead of recomputing it later.

Preemption frees a running request's blocks. Its K/V can either be dropped (recompute: the request is
prefilled again from its prompt and the tokens it already generated) or copied to host memory and
copied back when it resumes (swap). Which is cheaper depends on the model and the machine: swapping
moves `kv_bytes_per_token` twice per token over the host link, recomputing runs a prefill over the
tokens not shared with other requests. `choose_preemption` compares the two with running estimates of
both rates (`PreemptionCosts`, refined from every swap and every prefill-heavy step).

The host side has its own budget (`--swap-space`) and its own ledger (tag `kv_swapped`): it is not
device memory, so it never counts against `--memory-budget`. When a request's K/V does not fit there,
it is recomputed; swapping never refuses a preemption.

The swapper decides and keeps the books; it moves no bytes. Each swap is recorded as a `KVCopy` (the
request's slots and its host buffer) in the step's SchedulerOutput, and the runner makes the copies before
the step's forward: swap-outs first (the freed blocks may already be another request's this step), then
swap-ins. A swapped request's bytes are in the `kv_swapped` ledger from its swap-out's record to its
swap-in's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.ledger import MemoryLedger
from fitllm.memory.pinned import host_buffer, pinned_block_bytes

PreemptionMode = Literal["auto", "swap", "recompute"]
PREEMPTION_MODES: tuple[str, ...] = ("auto", "swap", "recompute")


@dataclass(slots=True)
class PreemptionCosts:
    """Running estimates (exponential moving averages) of host copy bandwidth and recompute speed."""

    swap_bytes_per_s: float
    recompute_tokens_per_s: float
    smoothing: float = 0.2  # weight of each new observation

    @staticmethod
    def initial(device: torch.device) -> PreemptionCosts:
        """Conservative first guesses until fitllm has measured its own (host copies are fast on CPU,
        PCIe-bound on CUDA; prefill is slow on CPU)."""
        if device.type == "cuda":
            return PreemptionCosts(swap_bytes_per_s=10e9, recompute_tokens_per_s=10_000.0)
        return PreemptionCosts(swap_bytes_per_s=2e9, recompute_tokens_per_s=500.0)

    def _mix(self, old: float, new: float) -> float:
        return (1 - self.smoothing) * old + self.smoothing * new

    def observe_swap(self, nbytes: int, seconds: float) -> None:
        if nbytes > 0 and seconds > 0:
            self.swap_bytes_per_s = self._mix(self.swap_bytes_per_s, nbytes / seconds)

    def observe_step(self, num_tokens: int, seconds: float) -> None:
        """A step's computed tokens and time; only prefill-heavy steps say how fast recompute is."""
        if num_tokens >= 32 and seconds > 0:
            self.recompute_tokens_per_s = self._mix(self.recompute_tokens_per_s, num_tokens / seconds)


@dataclass(slots=True)
class KVCopy:
    """One request's K/V copy between its device slots and its host buffer (either way), recorded by the
    scheduler and made by the runner before the step's forward."""

    request_id: str
    slots: torch.Tensor  # global slot ids of its tokens, in order (int64, CPU)
    host: torch.Tensor  # [num_layers, 2, len(slots), kv_heads, entry_width]

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()


def make_copies(storage: KVSlabStorage, outs: list[KVCopy], ins: list[KVCopy]) -> None:
    """Make a step's K/V copies between device slots and host buffers: every copy out before any copy in,
    because a block copied out (a preempted request's, an evicted cached one's) may be the very block a
    copy in fills this step."""
    for copy in outs:
        storage.read_slots(copy.slots, copy.host)
    for copy in ins:
        storage.write_slots(copy.slots, copy.host)


def choose_preemption(
    mode: PreemptionMode,
    recompute_tokens: int,
    swap_bytes: int,
    swap_free_bytes: int,
    costs: PreemptionCosts,
) -> Literal["swap", "recompute"]:
    """Swap when allowed, when the K/V fits the host space and when moving it out and back is cheaper
    than recomputing the tokens that would not come back from the prefix cache."""
    if mode == "recompute" or swap_bytes > swap_free_bytes or swap_bytes == 0:
        return "recompute"
    if mode == "swap":
        return "swap"
    swap_s = 2 * swap_bytes / costs.swap_bytes_per_s
    recompute_s = recompute_tokens / costs.recompute_tokens_per_s
    return "swap" if swap_s < recompute_s else "recompute"


class KVSwapper:
    """Moves preempted requests' K/V between the device pool and a budgeted host space."""

    def __init__(
        self,
        storage: KVSlabStorage,
        kv: KVCacheManager,
        space_bytes: int,
        mode: PreemptionMode = "auto",
        costs: PreemptionCosts | None = None,
    ) -> None:
        if mode not in PREEMPTION_MODES:
            raise ValueError(f"--preemption-mode must be one of {', '.join(PREEMPTION_MODES)}; got {mode!r}")
        self.storage = storage
        self.kv = kv
        self.kv_bytes_per_token = storage.bytes_per_token
        self.mode = mode
        self.costs = costs or PreemptionCosts.initial(storage.device)
        self.ledger = MemoryLedger(space_bytes, tags=("kv_swapped",)) if space_bytes > 0 else None
        self._held: dict[str, torch.Tensor] = {}
        self.num_swap_outs = 0
        self.num_swap_ins = 0
        self.num_recomputes = 0

    @property
    def free_bytes(self) -> int:
        return 0 if self.ledger is None else self.ledger.free_bytes()

    @property
    def num_swapped_requests(self) -> int:
        return len(self._held)

    def holds(self, request_id: str) -> bool:
        return request_id in self._held

    def num_swapped_tokens(self, request_id: str) -> int:
        return self._held[request_id].shape[2]

    def preempt(self, request_id: str, num_computed: int, keep: bool = False) -> KVCopy | None:
        """Before the request's blocks are freed: if swapping its computed K/V out is the better choice,
        the copy to make (its host buffer reserved in the ledger); None for recompute. `keep`: the K/V
        cannot be recomputed as it is (a context shift's), so it is swapped whenever the host space holds
        it, whatever the mode."""
        nbytes = num_computed * self.kv_bytes_per_token
        choice = choose_preemption(
            "swap" if keep else self.mode,
            num_computed - self.kv.num_shared_prefix_tokens(request_id, num_computed),
            nbytes,
            self.free_bytes - (self._held_bytes(nbytes) - nbytes),  # the space counts the buffer's rounding
            self.costs,
        )
        if choice == "recompute":
            self.num_recomputes += 1
            return None
        s = self.storage
        host = host_buffer(
            (s.slab_shape[0], 2, num_computed, *s.slab_shape[3:]), s.dtype, pin=s.device.type == "cuda"
        )
        self.ledger.reserve("kv_swapped", self._held_bytes(nbytes))
        self._held[request_id] = host
        self.num_swap_outs += 1
        return KVCopy(request_id, self.kv.slots(request_id, num_computed), host)

    def swap_in(self, request_id: str) -> KVCopy:
        """After the resumed request's blocks are allocated again: the copy that brings its K/V back (its
        host bytes leave the ledger now; the buffer lives until the runner has copied it)."""
        host = self._held.pop(request_id)
        num = host.shape[2]
        self.ledger.release("kv_swapped", self._held_bytes(num * self.kv_bytes_per_token))
        self.num_swap_ins += 1
        return KVCopy(request_id, self.kv.slots(request_id, num), host)

    def discard(self, request_id: str) -> None:
        """Drop a swapped request's host copy (it finished or was aborted while waiting)."""
        host = self._held.pop(request_id, None)
        if host is not None:
            self.ledger.release("kv_swapped", self._held_bytes(host.shape[2] * self.kv_bytes_per_token))

    def _held_bytes(self, nbytes: int) -> int:
        """What a host buffer of `nbytes` really holds: on CUDA it is pinned by PyTorch's caching host
        allocator, which rounds it up to a power of two (fitllm/memory/pinned.py), and the space counts that."""
        return pinned_block_bytes(nbytes) if self.storage.device.type == "cuda" else nbytes
