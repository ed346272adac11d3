"""The torch reference attention backend: its metadata (`TorchMetadata`), built from a step's `BatchLayout`
by `TorchMetadataBuilder`, and the attention it runs (`torch_attention`).

The runner flattens a step's requests into one token batch ordered decodes first, then prefill chunks.
Decodes (one query token each) are attended in one batched call over K/V gathered through their block
tables and padded to the longest context; each prefill chunk is attended on its own with a causal mask
offset by the tokens it already has in the cache. Gather indices and masks are built once per step and
shared by all layers.

The cache lives in slabs (see fitllm/memory/kv/storage.py); each layer sees a list of per-slab tensors
[2, slab_slots, kv_heads, head_dim]. Slot and row ids are global; the runner splits them by slab once per
step (`SlabSplit`), and with a single slab every read and write is one call. Slot-major means a new
token's K/V is one contiguous write. Reads gather rows of its [num_slots * kv_heads, head_dim] view in (kv_head, request, position)
order: the result is already the [kv_heads, requests, context, head_dim] batch that attention wants, with no
transpose copy (measured 7x faster than gathering slots and permuting). Unpadded decode groups (batch 1) run
through SDPA (float32 bmm for a quantized cache on CPU), padded ones through bmm-softmax-bmm
(`_decode`; benchmarks/cpu_attention.py, `fitllm bench attention`, measures them against the bfloat16 bmm
path).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from fitllm.memory.kv.layout import SlabSplit, split_by_slab
from fitllm.memory.transfer import move
from fitllm.model.attention.batch import BatchLayout, slot_of
from fitllm.model.attention.cpu_decode import decode_attention_kernel


def head_rows(slots: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Row ids into the [num_slots * kv_heads, head_dim] cache view for `slots`, kv-head-major, flattened."""
    heads = torch.arange(num_kv_heads, device=slots.device).view(num_kv_heads, *([1] * slots.dim()))
    return (slots.unsqueeze(0) * num_kv_heads + heads).reshape(-1)


@dataclass(slots=True)
class PrefillSpan:
    """One request's prefill chunk inside the flat batch."""

    query_start: int
    query_len: int
    context_len: int
    context_rows: SlabSplit  # head_rows() of the slots of every token it attends to, oldest first
    mask: torch.Tensor | None  # [query_len, context_len] bool, True = attend; None = plain causal


@dataclass(slots=True)
class DecodeGroup:
    """Decode rows [start, start + num) attended together, their K/V gathered padded to `context`. The
    runner splits a step's decodes into groups of at most its gather cap of padded context tokens, so the
    gathered K/V (the reference backend's largest decode temporary) stays bounded whatever the batch."""

    start: int
    num: int
    context: int
    rows: SlabSplit  # head_rows() of [num, context] slots (padding: 0)
    mask: torch.Tensor  # [num, context] bool, True = attend
    # Whether any key of the gather is masked (padding, sliding window). Known on the host when the group
    # is built, so a group of equal contexts (batch 1 always) attends with no mask at all.
    masked: bool = True
    # Each request's context length (int64 [n]) where the mask is only that (keys [0, length) attend): the
    # CPU kernel's form (cpu_decode.py); None where a sliding window masks more.
    lengths: torch.Tensor | None = None
    # The mask as the scores add it ([n, 1, ctx], 0 / -inf in float32), made by the step's first layer and
    # reused by the others.
    _additive: torch.Tensor | None = None

    def additive_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """`mask` as an additive [n, 1, ctx] mask of `dtype`, built once per step."""
        if self._additive is None or self._additive.dtype != dtype:
            bias = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device)
            self._additive = bias.masked_fill_(~self.mask, float("-inf")).unsqueeze(1)
        return self._additive


@dataclass(slots=True)
class TorchMetadata:
    """A step's flat batch as the reference backend reads it: where new K/V go, and the gather plan."""

    slot_mapping: SlabSplit  # where each new token's K/V is written
    num_decodes: int = 0  # the first num_decodes tokens are single-token decodes, one per request
    decode_groups: list[DecodeGroup] = field(default_factory=list)  # the decodes, attended group by group
    prefills: list[PrefillSpan] = field(default_factory=list)


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


@dataclass(frozen=True, slots=True)
class TorchMetadataBuilder:
    """Turns a `BatchLayout` into `TorchMetadata`: gather rows and masks, built once per step and shared by
    all layers."""

    num_kv_heads: int
    slab_slots: int  # slots per slab: global slot ids are split by slab with it
    sliding_window: int | None
    # Cap on a decode group's padded context tokens (decode_groups); the engine sets it so that no decode
    # step gathers more than the profile step measured.
    decode_cap: int | None = None

    def build(self, layout: BatchLayout, device: torch.device, slot_mapping: torch.Tensor | None = None):
        """The metadata on `device`; `slot_mapping` (the layout's, already on the device) is not needed:
        this backend splits the host copy by slab."""
        kvh, bs, window = self.num_kv_heads, layout.block_size, self.sliding_window
        slab_rows = self.slab_slots * kvh
        slots = split_by_slab(torch.tensor(layout.slot_mapping), self.slab_slots).to(device)
        meta = TorchMetadata(slots, layout.num_decodes)
        contexts = layout.seq_lens[: layout.num_decodes]
        for a, b in decode_groups(contexts, self.decode_cap) if contexts else []:
            max_ctx = max(contexts[a:b])
            width = -(-max_ctx // bs)
            padded = torch.zeros(b - a, width, dtype=torch.long)
            for i, t in enumerate(layout.block_tables[a:b]):
                padded[i, : min(len(t), width)] = torch.tensor(t[:width])
            # Each row's positions 0 .. max_ctx - 1, offset by the row's start in the flattened tables.
            pos = (torch.arange(b - a) * width * bs).unsqueeze(1) + torch.arange(max_ctx)
            group_slots = slot_of(padded.view(-1), pos, bs)
            rows = split_by_slab(head_rows(group_slots, kvh), slab_rows).to(device)
            mask = move(attention_mask(torch.tensor(contexts[a:b]) - 1, max_ctx, window), device)
            windowed = window is not None and max_ctx > window
            masked = min(contexts[a:b]) < max_ctx or windowed
            lengths = None if windowed or device.type != "cpu" else torch.tensor(contexts[a:b])
            meta.decode_groups.append(DecodeGroup(a, b - a, max_ctx, rows, mask, masked, lengths))
        for i in range(layout.num_decodes, len(layout.seq_lens)):
            first, end = layout.query_start[i], layout.seq_lens[i]
            q_len = layout.query_start[i + 1] - first
            context_slots = slot_of(torch.tensor(layout.block_tables[i]), torch.arange(end), bs)
            mask = None
            if end > q_len or (window is not None and end > window):
                mask = move(attention_mask(torch.arange(end - q_len, end), end, window), device)
            rows = split_by_slab(head_rows(context_slots, kvh), slab_rows).to(device)
            meta.prefills.append(PrefillSpan(first, q_len, end, rows, mask))
        return meta


def torch_attention(
    attn, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, meta: TorchMetadata
) -> torch.Tensor:
    """Layer `attn`'s (a PagedAttention) attention through the reference backend: q: [T, Hq, D]; k, v:
    [T, Hk, D] -> [T, Hq, D]."""
    for slab, pos, local in meta.slot_mapping.parts:
        cache = attn.kv_slabs[slab]
        kk, vv = (k, v) if pos is None else (k.index_select(0, pos), v.index_select(0, pos))
        cache[0].index_copy_(0, local, attn.kv_format.encode(kk))
        cache[1].index_copy_(0, local, attn.kv_format.encode(vv))
    groups = meta.decode_groups
    if not meta.prefills and len(groups) == 1 and groups[0].num == q.shape[0]:
        return _decode(attn, q, groups[0])  # a decode-only step in one group: no output copy
    out = torch.empty_like(q)
    for group in groups:
        rows = slice(group.start, group.start + group.num)
        out[rows] = _decode(attn, q[rows], group)
    for span in meta.prefills:
        qs = slice(span.query_start, span.query_start + span.query_len)
        out[qs] = _prefill(attn, q[qs], span)
    return out


def _gather_raw(attn, which: int, rows: SlabSplit) -> torch.Tensor:
    """Rows of K (which=0) or V (1) from the [slab_slots * kv_heads, entry_width] views of the slabs,
    as stored."""
    width = attn.kv_format.entry_width
    if len(rows.parts) == 1:
        slab, _, local = rows.parts[0]
        return attn.kv_slabs[slab][which].view(-1, width).index_select(0, local)
    first = attn.kv_slabs[rows.parts[0][0]]
    out = torch.empty(rows.size, width, dtype=first.dtype, device=first.device)
    for slab, pos, local in rows.parts:
        out.index_copy_(0, pos, attn.kv_slabs[slab][which].view(-1, width).index_select(0, local))
    return out


def _gather_pair(attn, rows: SlabSplit) -> torch.Tensor:
    """Rows of K and V together, [2, len(rows), entry_width] as stored: one gather instead of two."""
    width = attn.kv_format.entry_width
    if len(rows.parts) == 1:
        slab, _, local = rows.parts[0]
        return attn.kv_slabs[slab].view(2, -1, width).index_select(1, local)
    first = attn.kv_slabs[rows.parts[0][0]]
    out = torch.empty(2, rows.size, width, dtype=first.dtype, device=first.device)
    for slab, pos, local in rows.parts:
        out.index_copy_(1, pos, attn.kv_slabs[slab].view(2, -1, width).index_select(1, local))
    return out


def _gather(attn, which: int, rows: SlabSplit) -> torch.Tensor:
    """_gather_raw decoded to [len(rows), head_dim] in the compute dtype."""
    return attn.kv_format.decode(_gather_raw(attn, which, rows))


def _decode_kv(attn, dg: DecodeGroup, dtype: torch.dtype):
    """A quantized cache's decode group: keys and values [kvh * n, ctx, d] as codes converted to `dtype`,
    and their per-vector scales [kvh * n, 1, ctx] float32: the scales are folded into the scores and the
    probabilities instead of multiplying every element of K and V."""
    n, ctx, d = dg.num, dg.context, attn.head_dim
    shape = (attn.num_kv_heads * n, ctx, d)
    out = []
    for which in (0, 1):
        codes, scale = attn.kv_format.split(_gather_raw(attn, which, dg.rows))
        out += [codes.to(dtype).view(shape), scale.view(shape[0], 1, ctx)]
    return out[0], out[2], out[1], out[3]


def _decode(attn, q: torch.Tensor, dg: DecodeGroup) -> torch.Tensor:
    """A decode group's attention: q [n, Hq, D] -> [n, Hq, D]. The gathered rows are in (kv_head,
    request, position) order, so K/V are [kvh, n, ctx, d] with no copy, and the query heads sharing a KV
    head are that head's query rows [kvh, n, group, d]: grouped-query attention needs no K/V repeat.

    A group with no masked key (equal contexts: batch 1 always) takes one SDPA call, whose CPU flash kernel
    beats a bfloat16 bmm-softmax-bmm for a few query rows (`fitllm bench attention`); a quantized cache
    computes it in float32 on CPU instead (bfloat16 bmm is the slow path there). Padded groups keep the
    bmm-softmax-bmm in the model dtype, which measured faster than a masked SDPA for batches."""
    n, kvh, d = dg.num, attn.num_kv_heads, attn.head_dim
    kv_int8 = attn.kv_format.name == "int8"
    if dg.lengths is not None and (kv_int8 or not attn.kv_format.quantized) and len(dg.rows.parts) == 1:
        kernel = decode_attention_kernel()
        slab = attn.kv_slabs[dg.rows.parts[0][0]]
        rows = dg.rows.parts[0][2]
        if kernel is not None:
            q = q.contiguous()  # a batch's q heads are a strided view of the fused q/k projection
            if kernel.takes(q, slab, rows, kvh, kv_int8):
                return kernel(q, slab[0], slab[1], rows, dg.context, dg.lengths, kvh, attn.scale, kv_int8)
    group = attn.num_heads // kvh
    qg = q.view(n, kvh, group, d).transpose(0, 1)
    if attn.kv_format.quantized or dg.masked:
        fast = q.device.type == "cpu" and not dg.masked
        compute = torch.float32 if fast else q.dtype
        out = _decode_bmm(attn, qg.reshape(kvh * n, group, d), dg, compute)
    else:
        kv = attn.kv_format.decode(_gather_pair(attn, dg.rows)).view(2, kvh, n, dg.context, d)
        out = F.scaled_dot_product_attention(qg, kv[0], kv[1], scale=attn.scale)
    return out.reshape(kvh, n, group, d).transpose(0, 1).reshape(n, attn.num_heads, d)


def _decode_bmm(attn, qg: torch.Tensor, dg: DecodeGroup, compute: torch.dtype) -> torch.Tensor:
    """bmm-softmax-bmm in `compute` (softmax in float32, as HF's eager attention): qg [kvh * n, group, d]
    -> [kvh * n, group, d] in q's dtype. A quantized cache's scales are folded into the scores and the
    probabilities instead of multiplying every element of K and V."""
    n, ctx, kvh = dg.num, dg.context, attn.num_kv_heads
    if attn.kv_format.quantized:
        keys, vals, k_scale, v_scale = _decode_kv(attn, dg, compute)
    else:
        kv = attn.kv_format.decode(_gather_pair(attn, dg.rows)).view(2, kvh * n, ctx, attn.head_dim)
        keys, vals, k_scale, v_scale = kv[0], kv[1], None, None
    keys, vals = keys.to(compute), vals.to(compute)  # no-ops unless _decode_kv is replaced (tests)
    scores = torch.bmm(qg.to(compute), keys.transpose(1, 2))
    # Quantized K: q . (s k) = s (q . k), one multiply per score instead of one per element of K.
    scores = (scores * attn.scale).float() if k_scale is None else scores.float() * (k_scale * attn.scale)
    if dg.masked:  # the additive mask [n, 1, ctx] broadcasts over the KV heads
        scores = (scores.view(kvh, n, -1, ctx) + dg.additive_mask(scores.dtype)).view(kvh * n, -1, ctx)
    probs = scores.softmax(dim=-1)
    if v_scale is not None:
        probs *= v_scale  # sum p (s v) = sum (p s) v: the same for V
    return torch.bmm(probs.to(compute), vals).to(qg.dtype)


def _prefill(attn, q: torch.Tensor, span: PrefillSpan) -> torch.Tensor:
    shape = (1, attn.num_kv_heads, span.context_len, attn.head_dim)
    keys = _gather(attn, 0, span.context_rows).view(shape)
    vals = _gather(attn, 1, span.context_rows).view(shape)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1).unsqueeze(0),
        keys,
        vals,
        attn_mask=span.mask,
        is_causal=span.mask is None,
        scale=attn.scale,
        enable_gqa=attn.num_heads != attn.num_kv_heads,
    )
    return out.squeeze(0).transpose(0, 1)
