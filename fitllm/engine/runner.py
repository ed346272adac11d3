"""ModelRunner: turns a SchedulerOutput into one flat batch, runs the model, samples the rows that need it."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from fitllm.config import ModelConfig
from fitllm.engine.cuda_graphs import DecodeGraphs, GraphCapturer
from fitllm.engine.request import Request, SamplingParams
from fitllm.engine.sampler import SampledBatch, Sampler
from fitllm.engine.scheduler import ScheduledRequest, SchedulerOutput
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.layout import PagedKVLayout, split_by_slab
from fitllm.memory.kv.manager import KVCacheManager
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.transfer import move, to_device_packed
from fitllm.model.attention import (
    AttentionMetadata,
    DecodeGroup,
    KernelMetadata,
    PrefillSpan,
    head_rows,
)
from fitllm.plan.planner import capture_sizes


@dataclass(slots=True)
class PendingTokens:
    """The tokens sampled by the step in flight, still on the device (async scheduling), by request."""

    tokens: torch.Tensor  # [rows] int64 on the device
    rows: dict[str, int]  # request id -> row of `tokens`


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


def attention_mask(q_pos: torch.Tensor, k_len: int, window: int | None) -> torch.Tensor:
    """[len(q_pos), k_len] bool, True = attend: causal from each query's position, within the sliding
    window if the model has one."""
    k_pos = torch.arange(k_len)
    mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if window is not None:
        mask &= k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - window
    return mask


def decode_groups(contexts: list[int], cap: int | None) -> list[tuple[int, int]]:
    """Split decodes (by their context lengths, in batch order) into contiguous [start, end) groups whose
    padded gather, count x longest context, stays within `cap` tokens (None: one group). A decode whose
    context alone passes the cap is a group of its own: a sequence is never split."""
    if cap is None:
        return [(0, len(contexts))]
    groups, start, longest = [], 0, 0
    for i, c in enumerate(contexts):
        if i > start and (i - start + 1) * max(longest, c) > cap:
            groups.append((start, i))
            start, longest = i, 0
        longest = max(longest, c)
    groups.append((start, len(contexts)))
    return groups


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
    decodes placed before them (grouped as the runner groups them, by `decode_cap`). Used where there is no KV pool to ask: the
    start-up profile step and perplexity scoring. `backend` is the attention backend the metadata is for."""
    decodes = decodes or []
    spans = spans or [(num_tokens - len(decodes), num_tokens - len(decodes))]
    assert len(decodes) + sum(q for q, _ in spans) == num_tokens and all(0 < q <= c for q, c in spans)
    kvh = config.num_key_value_heads
    if kv_format is None:
        dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
        kv_format = KVCacheFormat("auto", dtype, config.head_dim)
    scratch = torch.zeros(
        (config.num_hidden_layers, 2, num_slots, kvh, kv_format.entry_width),
        dtype=kv_format.storage_dtype,
        device=device,
    )
    slots = torch.arange(num_tokens) % num_slots
    if backend == "triton":
        # Every position maps to block 0 of a 16-slot block size: slot = position % 16 wraps the same way.
        assert num_slots == 16, "the Triton scratch prefill wraps its slots around one 16-slot block"
        spans = [(1, c) for c in decodes] + spans  # the kernels take decodes as one-token sequences
        width = -(-max(c for _, c in spans) // 16)
        starts = [0]
        for q, _ in spans:
            starts.append(starts[-1] + q)
        meta = AttentionMetadata(
            kernel=KernelMetadata(
                slot_mapping=slots.to(device),
                block_tables=torch.zeros(len(spans), width, dtype=torch.int32, device=device),
                seq_lens=torch.tensor([c for _, c in spans], dtype=torch.int32, device=device),
                query_start=torch.tensor(starts, dtype=torch.int32, device=device),
                max_query_len=max(q for q, _ in spans),
                block_size=16,
                sliding_window=config.sliding_window or 0,
            )
        )
    else:
        meta = AttentionMetadata(
            slot_mapping=split_by_slab(slots, num_slots).to(device), num_decodes=len(decodes)
        )
        for a, b in decode_groups(decodes, decode_cap) if decodes else []:
            ctx = max(decodes[a:b])
            group_slots = (torch.arange(ctx) % num_slots).expand(b - a, ctx)
            rows = split_by_slab(head_rows(group_slots, kvh), num_slots * kvh).to(device)
            q_pos = torch.tensor(decodes[a:b]) - 1
            mask = attention_mask(q_pos, ctx, config.sliding_window).to(device)
            meta.decode_groups.append(DecodeGroup(a, b - a, ctx, rows, mask))
        start = len(decodes)
        for q, c in spans:
            rows = split_by_slab(head_rows(torch.arange(c) % num_slots, kvh), num_slots * kvh).to(device)
            mask = None
            window = config.sliding_window
            if c > q or (window is not None and c > window):  # when ModelRunner.prepare builds one
                mask = attention_mask(torch.arange(c - q, c), c, window).to(device)
            meta.prefills.append(PrefillSpan(start, q, c, rows, mask))
            start += q
    layout = PagedKVLayout(
        scratch, torch.zeros(1, dtype=torch.int64, device=device), num_slots, kvh, kv_format.entry_width
    )
    layers = model.attention_layers()
    saved = [(attn.kv_slabs, attn.kv_format, attn.kv_layout, attn.layer_index) for attn in layers]
    for i, attn in enumerate(layers):
        attn.kv_slabs, attn.kv_format, attn.kv_layout, attn.layer_index = [scratch[i]], kv_format, layout, i
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
) -> int:
    """Measured workspace of the largest step, before the KV pool exists: `num_tokens` batched tokens
    made of `num_rows - 1` decodes at the full context (each holds gather rows and a mask for all of it,
    gathered in groups of `decode_cap` tokens as the runner does) and prefills shaped as `profile_spans`
    (the first a last chunk of a full context, with its mask), then logits for `num_rows` rows and the
    sampler's float32 working set.

    K/V go to a one-block scratch cache (slot ids wrap around it); the gathered contexts are still as long
    as they would be, so the attention workspace measured is the real one.
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
        logits = model.compute_logits(hidden[:num_rows]).float()
        # The sampler's largest working sets: probabilities and their running sum per row, and a
        # top-p cut as this device makes it (on CUDA one pass over the sorted vocabulary).
        logits.softmax(dim=-1).cumsum(dim=-1)
        Sampler([]).sample(logits, [Request(f"profile-{i}", None, [0], probe) for i in range(num_rows)])

    return measure_peak_bytes(step, device)


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
        # The reference backend's cap on a decode group's padded context tokens (decode_groups); the engine
        # sets it so that no decode step gathers more than the profile step measured.
        self.decode_gather_tokens = decode_gather_tokens
        self.config = config
        self.kv = kv
        self.block_size = kv.block_size
        self.sampler = sampler
        self.device = device
        self.storage = storage
        self.graphs: DecodeGraphs | None = None  # captured decode steps (capture_graphs)
        for i, (attn, slabs) in enumerate(zip(model.attention_layers(), storage.layer_slabs, strict=True)):
            attn.kv_slabs = slabs  # updated in place as slabs come and go
            attn.kv_format = storage.kv_format
            attn.kv_layout, attn.layer_index = storage.layout, i
        # Flash-decoding splits fill the GPU's SMs; the interpreter (CPU) counts as one.
        self._num_sms = (
            torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1
        )
        kvh = config.num_key_value_heads
        self._slab_slots = storage.view_slots
        self._slab_rows = storage.view_slots * kvh

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

    def _block_table(self, request: Request) -> torch.Tensor:
        return torch.tensor(self.kv.block_ids(request.request_id), dtype=torch.long)

    def _slots(self, block_table: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return block_table[positions // self.block_size] * self.block_size + positions % self.block_size

    def prepare(self, scheduled: list[ScheduledRequest], pending: PendingTokens | None = None) -> StepInputs:
        """Flat input ids, positions, attention metadata and the row index of each sampled request. The ids,
        positions and row indices go to the device in one copy."""
        if self.attention_backend == "triton":
            return self.prepare_kernel(scheduled, pending)
        decodes = [s for s in scheduled if s.num_new_tokens == 1]
        prefills = [s for s in scheduled if s.num_new_tokens > 1]
        ids: list[int] = []
        placeholders: list[tuple[int, Request]] = []
        pos_chunks: list[torch.Tensor] = []
        slot_chunks: list[torch.Tensor] = []
        sample_rows: list[int] = []
        meta = AttentionMetadata(slot_mapping=None, num_decodes=len(decodes))

        if decodes:
            contexts = [s.request.num_computed_tokens + 1 for s in decodes]
            offsets = torch.arange(self.block_size)
            for start, end in decode_groups(contexts, self.decode_gather_tokens):
                ctx = torch.tensor(contexts[start:end])
                max_ctx = int(ctx.max())
                width = -(-max_ctx // self.block_size)
                padded = torch.zeros(end - start, width, dtype=torch.long)
                for i, s in enumerate(decodes[start:end]):
                    t = self._block_table(s.request)
                    padded[i, : min(len(t), width)] = t[:width]
                slots = (padded.unsqueeze(-1) * self.block_size + offsets).reshape(end - start, -1)[
                    :, :max_ctx
                ]
                q_pos = ctx - 1
                rows = split_by_slab(head_rows(slots, self.config.num_key_value_heads), self._slab_rows)
                mask = move(attention_mask(q_pos, max_ctx, self.config.sliding_window), self.device)
                meta.decode_groups.append(
                    DecodeGroup(start, end - start, max_ctx, rows.to(self.device), mask)
                )
                pos_chunks.append(q_pos)
                slot_chunks.append(slots.gather(1, q_pos.unsqueeze(1)).squeeze(1))
            for i, s in enumerate(decodes):
                r = s.request
                append_input_ids(r, r.num_computed_tokens, r.num_computed_tokens + 1, ids, placeholders)
                if s.samples:
                    sample_rows.append(i)

        for s in prefills:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            table = self._block_table(r)
            q_pos = torch.arange(start, end)
            context_slots = self._slots(table, torch.arange(end))
            mask = None
            if start > 0 or (self.config.sliding_window is not None and end > self.config.sliding_window):
                mask = move(attention_mask(q_pos, end, self.config.sliding_window), self.device)
            rows = split_by_slab(
                head_rows(context_slots, self.config.num_key_value_heads), self._slab_rows
            ).to(self.device)
            meta.prefills.append(PrefillSpan(len(ids), s.num_new_tokens, end, rows, mask))
            append_input_ids(r, start, end, ids, placeholders)
            pos_chunks.append(q_pos)
            slot_chunks.append(context_slots[start:end])
            if s.samples:
                sample_rows.append(len(ids) - 1)

        meta.slot_mapping = split_by_slab(torch.cat(slot_chunks), self._slab_slots).to(self.device)
        input_ids, positions, sample_index, dst, src = to_device_packed(
            [
                ids,
                torch.cat(pos_chunks).tolist(),
                sample_rows,
                [row for row, _ in placeholders],
                placeholder_sources(placeholders, pending),
            ],
            torch.long,
            self.device,
        )
        return StepInputs(input_ids, positions, meta, sample_index, dst, src)

    def prepare_kernel(
        self, scheduled: list[ScheduledRequest], pending: PendingTokens | None = None
    ) -> StepInputs:
        """`prepare` for the Triton backend: block tables and lengths instead of gather plans. Two copies to
        the device: the int64 fields (ids, positions, slots, row indices) in one buffer, the int32 ones
        (lengths, query starts, block tables) in another."""
        ids: list[int] = []
        placeholders: list[tuple[int, Request]] = []
        positions: list[int] = []
        slots: list[int] = []
        tables: list[list[int]] = []
        seq_lens: list[int] = []
        query_start = [0]
        sample_rows: list[int] = []
        for s in scheduled:
            r = s.request
            start, end = r.num_computed_tokens, r.num_computed_tokens + s.num_new_tokens
            table = self.kv.block_ids(r.request_id)
            tables.append(table)
            # Plain ints: small tensor ops per request dominated (64 decodes: 1.7 ms -> 0.19 ms per step here).
            bs = self.block_size
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, end))
            append_input_ids(r, start, end, ids, placeholders)
            positions.extend(range(start, end))
            seq_lens.append(end)
            query_start.append(len(ids))
            if s.samples:
                sample_rows.append(len(ids) - 1)
        width = max(map(len, tables))
        max_query_len = max(s.num_new_tokens for s in scheduled)
        splits = 1
        if max_query_len == 1:
            from fitllm.model.attention.triton_kernels import choose_num_splits

            splits = choose_num_splits(
                len(scheduled), self.config.num_key_value_heads, max(seq_lens), self._num_sms
            )
        dev, b = self.device, len(seq_lens)
        input_ids, positions_t, slot_mapping, sample_index, dst, src = to_device_packed(
            [
                ids,
                positions,
                slots,
                sample_rows,
                [row for row, _ in placeholders],
                placeholder_sources(placeholders, pending),
            ],
            torch.long,
            dev,
        )
        flat_tables = [i for t in tables for i in t + [0] * (width - len(t))]
        seq_lens_t, query_start_t, flat_tables_t = to_device_packed(
            [seq_lens, query_start, flat_tables], torch.int32, dev
        )
        kernel = KernelMetadata(
            slot_mapping=slot_mapping,
            block_tables=flat_tables_t.view(b, width),
            seq_lens=seq_lens_t,
            query_start=query_start_t,
            max_query_len=max_query_len,
            block_size=self.block_size,
            sliding_window=self.config.sliding_window or 0,
            num_splits=splits,
        )
        meta = AttentionMetadata(num_decodes=sum(s.num_new_tokens == 1 for s in scheduled), kernel=kernel)
        return StepInputs(input_ids, positions_t, meta, sample_index, dst, src)

    @torch.inference_mode()
    def execute(
        self, out: SchedulerOutput, pending: PendingTokens | None = None
    ) -> tuple[list[Request], SampledBatch | None]:
        """Queue one step; returns the requests that sample (in row order) and their samples, still where the
        logits are. `pending` holds the step in flight's tokens, which fill this step's placeholder ids."""
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
        kernel = meta.kernel
        if self.graphs is not None and kernel is not None and self.graphs.can_run(kernel):
            hidden = self.graphs.run(input_ids, positions, kernel)
        else:
            hidden = self.model(input_ids, positions, meta)
        sample_index = step.sample_index
        # The attention metadata (masks, gather rows) dies here, not after sampling, so the two peaks (the
        # forward's and the sampler's) never add up.
        del step, meta, kernel, input_ids, positions
        sampling = [s.request for s in ordered if s.samples]
        if not sampling:
            return [], None
        logits = self.model.compute_logits(hidden.index_select(0, sample_index))
        return sampling, self.sampler.sample(logits, sampling)
