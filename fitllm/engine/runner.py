"""ModelRunner: turns a SchedulerOutput into one flat batch, runs the model, samples the rows that need it."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from fitllm.config import ModelConfig
from fitllm.engine.batch_layout import PendingTokens, step_layout
from fitllm.engine.compiled_decode import CompiledDecode
from fitllm.engine.context_shift import KeyShift, KVShift, rotate_keys
from fitllm.engine.cuda_graphs import DecodeGraphs, GraphCapturer
from fitllm.engine.parallel.messages import StepMessage
from fitllm.engine.request import Request, SamplingParams
from fitllm.engine.sampler import SampledBatch, Sampler
from fitllm.engine.scheduler import ScheduledRequest, SchedulerOutput
from fitllm.engine.speculation import DraftCheck, sampling_rows
from fitllm.engine.stages import layers_by_device
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.layout import PagedKVLayout
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.kv.swap import KVCopy, make_copies
from fitllm.memory.transfer import to_device_packed
from fitllm.model.attention import AttentionMetadata, BatchLayout, TritonMetadata, metadata_builder
from fitllm.plan.planner import capture_sizes

if TYPE_CHECKING:
    from fitllm.engine.parallel.group import TensorParallelGroup


@dataclass(slots=True)
class StepInputs:
    """One step's flat batch on the device: what the model reads, and which rows are sampled afterwards."""

    input_ids: torch.Tensor
    positions: torch.Tensor
    meta: AttentionMetadata
    sample_index: torch.Tensor  # [sampled requests] int64: the hidden-state row each samples from
    # Rows of input_ids that hold an output placeholder, and the rows of the step in flight's tokens that
    # fill them (async scheduling); empty when every id is known.
    placeholder_rows: torch.Tensor
    placeholder_sources: torch.Tensor


@contextlib.contextmanager
def scratch_prefill(
    model: nn.Module,
    config: ModelConfig,
    device: torch.device,
    num_slots: int,
    num_tokens: int,
    kv_format: KVCacheFormat | None = None,
    backend: str = "torch",
    spans: list[tuple[int, int]] | None = None,
    decodes: list[int] | None = None,
    decode_cap: int | None = None,
) -> Iterator[AttentionMetadata]:
    """Metadata for a prefill over a zeroed scratch KV cache of `num_slots` slots (slot ids wrap around it;
    16 for the Triton backend) stored as `kv_format` (default: the model dtype), bound to every attention
    layer inside the block; the layers' own KV bindings come back after. By default one causal prefill of
    `num_tokens`; `spans` gives several sequences instead, as (new tokens, context) pairs, a context longer
    than its new tokens being a later chunk of a long prompt, and `decodes` the contexts of single-token
    decodes placed before them (grouped as the runner groups them, by `decode_cap`). Used where there is no
    KV pool to ask: the start-up profile step and perplexity scoring. The metadata is `backend`'s, built
    by its builder as for a real step, from the same kind of batch layout over a scratch block table."""
    decodes = decodes or []
    if spans is None:
        spans = [(num_tokens - len(decodes), num_tokens - len(decodes))]
    assert len(decodes) + sum(q for q, _ in spans) == num_tokens and all(0 < q <= c for q, c in spans)
    kvh = config.num_key_value_heads
    if kv_format is None:
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        kv_format = KVCacheFormat("auto", dtype, config.head_dim)
    if backend == "triton":
        assert num_slots == 16, "the Triton scratch prefill wraps its slots around one 16-slot block"
    batch = BatchLayout.scratch(num_slots, spans, decodes)
    meta = metadata_builder(backend, kvh, config.sliding_window, num_slots, decode_cap).build(batch, device)
    layers = model.attention_layers()
    saved = [(attn.kv_slabs, attn.kv_format, attn.kv_layout, attn.layer_index) for attn in layers]
    # One scratch per device: with a layer split each stage's layers write their own device's scratch.
    for stage_device, indices in layers_by_device(model).items():
        scratch = torch.zeros(
            (len(indices), 2, num_slots, kvh, kv_format.entry_width),
            dtype=kv_format.storage_dtype,
            device=stage_device,
        )
        zero = torch.zeros(1, dtype=torch.int64, device=stage_device)
        layout = PagedKVLayout(scratch, zero, num_slots, kvh, kv_format.entry_width)
        for j, i in enumerate(indices):
            attn = layers[i]
            attn.kv_slabs, attn.kv_format, attn.kv_layout, attn.layer_index = (
                [scratch[j]],
                kv_format,
                layout,
                j,
            )
    try:
        yield meta
    finally:
        for attn, (kv, fmt, lay, index) in zip(layers, saved, strict=True):
            attn.kv_slabs, attn.kv_format, attn.kv_layout, attn.layer_index = kv, fmt, lay, index


def profile_spans(num_tokens: int, max_model_len: int) -> list[tuple[int, int]]:
    """Prefill sequences as (new tokens, context) filling `num_tokens` batched tokens: the first a chunk
    that ends a prompt of the whole context (it gathers the most K/V, under the largest mask), the rest
    whole prompts of at most the context each."""
    first = min(num_tokens, max_model_len)
    spans = [(first, max_model_len)]
    left = num_tokens - first
    while left > 0:
        spans.append((min(left, max_model_len), min(left, max_model_len)))
        left -= spans[-1][0]
    return spans


@torch.inference_mode()
def profile_workspace(
    model: nn.Module,
    config: ModelConfig,
    device: torch.device,
    num_tokens: int,
    num_rows: int,
    kv_format: KVCacheFormat | None = None,
    backend: str = "torch",
    max_model_len: int | None = None,
    decode_cap: int | None = None,
    sample: bool = True,
) -> int:
    """Measured workspace of the largest step, before the KV pool exists: `num_tokens` batched tokens
    made of `num_rows - 1` decodes at the full context (each holds gather rows and a mask for all of it,
    gathered in groups of `decode_cap` tokens as the runner does) and prefills shaped as `profile_spans`
    (the first a last chunk of a full context, with its mask), then logits for `num_rows` rows and the
    sampler's float32 working set.

    K/V go to a one-block scratch cache (slot ids wrap around it); the gathered contexts are still as long
    as they would be, so the attention workspace measured is the real one. `sample` False: a
    tensor-parallel worker, which computes its shard of the logits (vocab-parallel head) and never samples.
    """
    from fitllm.memory.profile import measure_peak_bytes

    context = max_model_len or num_tokens
    num_decodes = min(num_rows - 1, num_tokens - 1) if context > 1 else 0
    decodes = [context] * num_decodes
    spans = profile_spans(num_tokens - num_decodes, context)
    ids = torch.zeros(num_tokens, dtype=torch.long, device=device)
    positions = torch.cat(
        [torch.tensor(decodes, dtype=torch.long) - 1, *(torch.arange(c - q, c) for q, c in spans)]
    ).to(device)
    probe = SamplingParams(temperature=0.8, top_p=0.9, max_tokens=1)  # tempered, then a nucleus cut

    def step() -> None:
        # The step's metadata (masks, gather rows) is built inside the measurement, as a real step builds
        # its own, and dies before the sampler runs, as in ModelRunner.execute; so is the small scratch
        # cache, which makes the figure a little high, never low.
        with scratch_prefill(
            model, config, device, 16, num_tokens, kv_format, backend, spans, decodes, decode_cap
        ) as meta:
            hidden = model(ids, positions, meta)
        del meta  # as in ModelRunner.execute, the metadata dies before the sampler runs
        logits = model.compute_logits(hidden[:num_rows])
        if not sample:  # a worker's shard of the logits, gathered to rank 0
            return
        logits = logits.float()
        # The sampler's largest working sets: probabilities and their running sum per row, and a
        # top-p cut as this device makes it (on CUDA one pass over the sorted vocabulary).
        logits.softmax(dim=-1).cumsum(dim=-1)
        Sampler([]).sample(logits, [Request(f"profile-{i}", None, [0], probe) for i in range(num_rows)])

    return measure_peak_bytes(step, device)


def apply_shift(
    storage: KVSlabStorage,
    rotary: nn.Module,
    src: torch.Tensor,
    dst: torch.Tensor,
    delta: torch.Tensor,
    adopted: list[int],
    moved_by: int,
) -> None:
    """One context shift (`KVShift`) on one rank's cache. The copied part first: the K/V of global slots
    `src` (all read before any is written, as the request's new blocks may be sources just evicted), K
    rotated by `delta`, written to slots `dst`; then the K of the `adopted` blocks rotated by `moved_by`
    where they lie (after every earlier shift of the step has read them)."""
    if len(dst):
        rotate = KeyShift(delta, rotary, storage.kv_format, storage.device)
        storage.move_slots(src.to(storage.device), dst.to(storage.device), rotate)
    if adopted:
        tables = rotary.shift_tables(torch.tensor([moved_by]), storage.device)
        for keys in storage.key_runs(adopted):
            rotate_keys(keys, tables, rotary, storage.kv_format)


class ModelRunner:
    """Owns the model and its KV tensors; one `execute` call per engine step."""

    def __init__(
        self,
        model: nn.Module,
        config: ModelConfig,
        kv: KVCacheManager,
        storage: KVSlabStorage,
        sampler: Sampler,
        device: torch.device,
        attention_backend: str = "torch",
        decode_gather_tokens: int | None = None,
    ) -> None:
        self.model = model
        self.attention_backend = attention_backend
        self.config = config
        self.kv = kv
        self.block_size = kv.block_size
        self.sampler = sampler
        self.device = device
        self.storage = storage
        self.tp: TensorParallelGroup | None = None  # rank 0 of a tensor-parallel group: workers follow
        self.graphs: DecodeGraphs | None = None  # captured decode steps (capture_graphs)
        self.compiled: CompiledDecode | None = None  # a compiled CPU decode forward (--compile-decode)
        storage.bind(model.attention_layers())
        # Flash-decoding splits fill the GPU's SMs; the interpreter (CPU) counts as one.
        self._num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        )
        # Turns each step's batch layout into the backend's attention metadata; `decode_gather_tokens` caps
        # the reference backend's decode gathers at what the profile step measured (decode_groups).
        self.metadata = metadata_builder(
            attention_backend,
            config.num_key_value_heads,
            config.sliding_window,
            storage.view_slots,
            decode_gather_tokens,
            self._num_sms,
        )

    @torch.inference_mode()
    def capture_graphs(self, max_num_seqs: int, max_model_len: int, capturer: GraphCapturer) -> DecodeGraphs:
        """Capture decode steps for batches up to `max_num_seqs` and contexts up to `max_model_len`; later
        decode-only steps replay them (Triton backend only)."""
        from fitllm.model.attention.triton_kernels import choose_num_splits

        assert self.attention_backend == "triton", "CUDA graphs need the Triton attention backend"
        kvh = self.config.num_key_value_heads
        self.graphs = DecodeGraphs(
            self.model,
            self.device,
            capture_sizes(max_num_seqs),
            max_blocks=-(-max_model_len // self.block_size),
            block_size=self.block_size,
            sliding_window=self.config.sliding_window or 0,
            num_splits=lambda size: choose_num_splits(size, kvh, max_model_len, self._num_sms),
            capturer=capturer,
        )
        return self.graphs

    @torch.inference_mode()
    def compile_decode(self) -> CompiledDecode:
        """Serve decode-only steps through a compiled forward (`--compile-decode`), its batch-1 graph compiled
        now over a scratch KV cache, so that the first request does not wait for it and a server reports
        ready only once decode is fast (a failed compile leaves decode eager, with one warning)."""
        self.compiled = CompiledDecode(self.model)
        with scratch_prefill(self.model, self.config, self.device, 16, 1, decodes=[8], spans=[]) as meta:
            ids = torch.zeros(1, dtype=torch.long, device=self.device)
            if self.compiled.can_run(meta, 1):  # not where fitllm's C decode loop serves batch 1
                self.compiled.run(ids, torch.tensor([7], device=self.device), meta)
        return self.compiled

    def prepare(self, scheduled: list[ScheduledRequest], pending: PendingTokens | None = None) -> StepInputs:
        """Flat input ids, positions, attention metadata and the row index of each sampled request, from one
        batch layout. The ids, positions, slots and row indices go to the device in one copy."""
        batch = step_layout(scheduled, self.kv, pending)
        if self.tp is not None:
            self.tp.send(StepMessage("step", self.storage.take_journal(), batch))
        input_ids, positions, slots, sample_index, dst, src = to_device_packed(
            [
                batch.input_ids,
                batch.positions,
                batch.slot_mapping,
                batch.sample_rows,
                batch.placeholder_rows,
                batch.placeholder_sources,
            ],
            torch.long,
            self.device,
        )
        meta = self.metadata.build(batch, self.device, slots)
        return StepInputs(input_ids, positions, meta, sample_index, dst, src)

    def swap(self, swap_out: list[KVCopy], swap_in: list[KVCopy], shifts: list[KVShift] = ()) -> float:
        """Make a step's K/V moves before its forward: swap-outs first (a victim's freed blocks may be another
        request's this step), then context shifts, then swap-ins (a shift's source may be a block evicted
        for one). Waits for them; returns the seconds the swaps took."""
        start = time.perf_counter()
        make_copies(self.storage, swap_out, [])
        shift_start = time.perf_counter()
        self.shift(shifts)
        shift_s = time.perf_counter() - shift_start
        make_copies(self.storage, [], swap_in)
        if swap_out or swap_in:  # host buffers; a shift stays on the device
            for device in {part.device for part in self.storage.parts()}:
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
        return time.perf_counter() - start - shift_s

    @torch.inference_mode()
    def shift(self, shifts: list[KVShift]) -> None:
        """Context shifts, in the order admitted (`apply_shift`; under tensor parallelism every rank makes
        the same moves on its own heads)."""
        moves = []
        for shift in shifts:
            dst = shift.positions
            if len(shift.positions):
                dst = self.kv.slots(shift.request_id, shift.end).index_select(0, shift.positions)
            adopted = [b.block_id for _, b in shift.adopted]
            moves.append((shift.src_slots, dst, shift.delta, adopted, shift.moved_by))
        if self.tp is not None and moves:
            args = {
                "shifts": [(src.tolist(), dst.tolist(), d.tolist(), a, by) for src, dst, d, a, by in moves]
            }
            self.tp.send(StepMessage("shift", self.storage.take_journal(), args=args))
        for move in moves:
            for part in self.storage.parts():  # each stage of a layer split shifts its own layers' K/V
                apply_shift(part, self.model.rotary, *move)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, pending: PendingTokens | None = None
    ) -> tuple[list[Request], list[DraftCheck | None] | None, SampledBatch | None]:
        """Queue one step; returns the requests that sample (in row order), what each verifies (None: no
        request has proposals) and their samples, still where the logits are: one row per request, plus one
        per proposed token. `pending` holds the step in flight's tokens, which fill this step's placeholder
        ids."""
        ordered = [s for s in out.scheduled if s.num_new_tokens == 1] + [
            s for s in out.scheduled if s.num_new_tokens > 1
        ]
        step = self.prepare(ordered, pending)
        input_ids, positions, meta = step.input_ids, step.positions, step.meta
        if step.placeholder_rows.numel():
            assert pending is not None
            input_ids.index_copy_(
                0, step.placeholder_rows, pending.tokens.index_select(0, step.placeholder_sources)
            )
        if self.graphs is not None and isinstance(meta, TritonMetadata) and self.graphs.can_run(meta):
            hidden = self.graphs.run(input_ids, positions, meta)
        elif self.compiled is not None and self.compiled.can_run(meta, input_ids.shape[0]):
            hidden = self.compiled.run(input_ids, positions, meta)
        else:
            hidden = self.model(input_ids, positions, meta)
        sample_index = step.sample_index
        # The attention metadata (masks, gather rows) dies here, not after sampling, so the two peaks (the
        # forward's and the sampler's) never add up.
        del step, meta, input_ids, positions
        sampling = [s for s in ordered if s.samples]
        if not sampling:
            return [], None, None
        requests = [s.request for s in sampling]
        logits = self.model.compute_logits(hidden.index_select(0, sample_index))
        if not any(s.draft_token_ids for s in sampling):
            return requests, None, self.sampler.sample(logits, requests)
        checks = [
            DraftCheck.before_sampling(s.request, s.draft_token_ids) if s.draft_token_ids else None
            for s in sampling
        ]
        rows = sampling_rows(requests, [s.draft_token_ids for s in sampling])
        return requests, checks, self.sampler.sample(logits, rows)
