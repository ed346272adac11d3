"""The Triton paged-attention backend (fitllm/model/attention/triton_kernels.py) against the torch reference backend.

Without a GPU the kernels run on CPU tensors in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1
before anything imports triton). Kernel cases build their K/V slabs as separate tensors addressed from an
anchor through `PagedKVLayout`, the CUDA layout, with block ids shuffled across slabs so that sequences cross
slabs. The reference side gets the metadata `TorchMetadataBuilder` would build (mirrored by
`reference_metadata`, decodes first, then prefill chunks), and its own copy of the cache, written by the
reference's `index_copy_` of `KVCacheFormat.encode`; the kernel side writes with `write_kv`. Afterwards the
caches must be byte-identical and the outputs equal within tolerance.

The kernel's cache has every slot outside the sequences' contexts poisoned (NaN, or 0xFF bytes: a NaN scale
for int8 and fp8), so a read out of bounds shows as NaN in the output.
"""

from __future__ import annotations

import contextlib
import itertools
import random
from dataclasses import dataclass, replace
from unittest import mock

import pytest
import torch
import triton  # a dev dependency: its absence must fail, not skip
import triton.language as tl
from hypothesis import given, settings
from hypothesis import strategies as st

from fitllm.memory.kv.format import KVCacheFormat
from fitllm.memory.kv.layout import PagedKVLayout, split_by_slab
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.memory.ledger import MemoryLedger
from fitllm.model.attention import PagedAttention, resolve_attention_backend
from fitllm.model.attention import triton_kernels as ta
from fitllm.model.attention.torch_backend import DecodeGroup, PrefillSpan, TorchMetadata, head_rows

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
NUM_LAYERS = 2
ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


# ---- cases: a batch of sequences over shuffled blocks in several slabs ------------------------------------


@dataclass
class Case:
    q_lens: list[int]  # decodes (1) first, then prefill chunks (> 1)
    ctx_lens: list[int]  # keys each sequence attends to, its new tokens included
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 32
    dtype: torch.dtype = torch.float32
    kv_cache_dtype: str = "auto"
    block_size: int = 16
    num_slabs: int = 3
    window: int = 0
    num_splits: int = 1
    layer: int = 1
    seed: int = 0
    # Padding rows of a captured decode batch (CUDA graphs): one query row, length 0, slot -1.
    num_padding: int = 0
    kernel_kv_dtype: str | None = None  # what the kernel is told, if not kv_cache_dtype ("fp8-bits")

    def __post_init__(self) -> None:
        assert len(self.q_lens) == len(self.ctx_lens)
        assert all(1 <= q <= c for q, c in zip(self.q_lens, self.ctx_lens))
        decodes = sum(q == 1 for q in self.q_lens)
        assert all(q == 1 for q in self.q_lens[:decodes]), "decodes first"
        assert self.num_padding == 0 or decodes == len(self.q_lens)


@dataclass
class Built:
    """A case's tensors: the shared starting cache, block tables, new tokens' slots and q/k/v."""

    fmt: KVCacheFormat
    slab_slots: int
    slabs: list[torch.Tensor]  # [NUM_LAYERS, 2, slab_slots, kv_heads, width] each: the starting contents
    used: list[torch.Tensor]  # per slab: bool [slab_slots], slots inside some sequence's context
    tables: list[list[int]]
    slot_mapping: torch.Tensor  # [T] global slots of the new tokens (-1 for padding rows)
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor


def build(case: Case) -> Built:
    g = torch.Generator().manual_seed(case.seed)
    bs, kvh, d = case.block_size, case.num_kv_heads, case.head_dim
    fmt = KVCacheFormat(case.kv_cache_dtype, case.dtype, d)
    needed = sum(-(-c // bs) for c in case.ctx_lens)
    slab_blocks = max(2, -(-(needed + 3) // case.num_slabs))  # a few spare blocks, never in any table
    slab_slots = slab_blocks * bs
    # Finite random contents everywhere (the reference's padded decode gathers read slot 0 onwards).
    slabs = [
        fmt.encode(torch.randn(NUM_LAYERS, 2, slab_slots, kvh, d, generator=g)).contiguous()
        for _ in range(case.num_slabs)
    ]
    perm = torch.randperm(case.num_slabs * slab_blocks, generator=g).tolist()
    tables = []
    for c in case.ctx_lens:
        n = -(-c // bs)
        tables.append(perm[:n])
        perm = perm[n:]
    used = [torch.zeros(slab_slots, dtype=torch.bool) for _ in range(case.num_slabs)]
    slots = []
    for q_len, c, table in zip(case.q_lens, case.ctx_lens, tables):
        pos = torch.arange(c)
        glob = torch.tensor(table)[pos // bs] * bs + pos % bs
        for s in glob.tolist():
            used[s // slab_slots][s % slab_slots] = True
        slots.append(glob[c - q_len :])
    slots.append(torch.full((case.num_padding,), -1, dtype=torch.long))
    tokens = sum(case.q_lens) + case.num_padding
    q = 2 * torch.randn(tokens, case.num_heads, d, generator=g)
    k = torch.randn(tokens, kvh, d, generator=g)
    v = torch.randn(tokens, kvh, d, generator=g)
    return Built(
        fmt, slab_slots, slabs, used, tables, torch.cat(slots), *(x.to(case.dtype) for x in (q, k, v))
    )


def _mask(q_pos: torch.Tensor, k_len: int, window: int) -> torch.Tensor:
    k_pos = torch.arange(k_len)
    mask = k_pos.unsqueeze(0) <= q_pos.unsqueeze(1)
    if window:
        mask &= k_pos.unsqueeze(0) > q_pos.unsqueeze(1) - window
    return mask


def reference_metadata(case: Case, b: Built) -> TorchMetadata:
    """What TorchMetadataBuilder builds for the torch backend (decodes batched and padded, prefills alone)."""
    bs, kvh, window = case.block_size, case.num_kv_heads, case.window
    decodes = sum(q == 1 for q in case.q_lens)
    slot_rows = b.slab_slots * kvh
    meta = TorchMetadata(slot_mapping=split_by_slab(b.slot_mapping, b.slab_slots), num_decodes=decodes)
    if decodes:
        ctx = torch.tensor(case.ctx_lens[:decodes])
        max_ctx = int(ctx.max())
        width = -(-max_ctx // bs)
        padded = torch.zeros(decodes, width, dtype=torch.long)
        for i, t in enumerate(b.tables[:decodes]):
            padded[i, : len(t)] = torch.tensor(t)
        slots = (padded.unsqueeze(-1) * bs + torch.arange(bs)).reshape(decodes, -1)[:, :max_ctx]
        rows = split_by_slab(head_rows(slots, kvh), slot_rows)
        meta.decode_groups.append(DecodeGroup(0, decodes, max_ctx, rows, _mask(ctx - 1, max_ctx, window)))
    start = decodes
    for q_len, end, table in list(zip(case.q_lens, case.ctx_lens, b.tables))[decodes:]:
        pos = torch.arange(end)
        context = torch.tensor(table)[pos // bs] * bs + pos % bs
        mask = None
        if end > q_len or (window and end > window):
            mask = _mask(torch.arange(end - q_len, end), end, window)
        rows = split_by_slab(head_rows(context, kvh), slot_rows)
        meta.prefills.append(PrefillSpan(start, q_len, end, rows, mask))
        start += q_len
    return meta


def kernel_layout(case: Case, b: Built) -> tuple[list[torch.Tensor], PagedKVLayout]:
    """The kernel's cache: separate slab tensors, bound to an anchor of their own, unused slots poisoned."""
    slabs = [s.clone().to(DEVICE) for s in b.slabs]
    for s, used in zip(slabs, b.used):
        unused = (~used).nonzero().squeeze(1).to(DEVICE)
        s.index_fill_(2, unused, 0xFF if s.dtype == torch.uint8 else float("nan"))
    anchor = torch.empty(1, dtype=b.fmt.storage_dtype, device=DEVICE)
    offsets = torch.zeros(case.num_slabs, dtype=torch.int64, device=DEVICE)
    layout = PagedKVLayout(anchor, offsets, b.slab_slots, case.num_kv_heads, b.fmt.entry_width)
    for i, s in enumerate(slabs):
        layout.bind(i, s)
    return slabs, layout


def run_reference(case: Case, b: Built) -> tuple[torch.Tensor, list[torch.Tensor]]:
    real = sum(case.q_lens)
    slabs = [s.clone() for s in b.slabs]
    attn = PagedAttention(case.num_heads, case.num_kv_heads, case.head_dim, case.head_dim**-0.5)
    attn.kv_slabs = [s[case.layer] for s in slabs]
    attn.kv_format = b.fmt
    meta = reference_metadata(case, replace(b, slot_mapping=b.slot_mapping[:real]))  # no padding rows
    out = attn(b.q[:real], b.k[:real], b.v[:real], meta)
    return out, slabs


def run_kernel(case: Case, b: Built) -> tuple[torch.Tensor, list[torch.Tensor]]:
    slabs, layout = kernel_layout(case, b)
    q, k, v = (x.to(DEVICE) for x in (b.q, b.k, b.v))
    ta.write_kv(b.fmt.encode(k), b.fmt.encode(v), b.slot_mapping.to(DEVICE), layout, case.layer)
    tables = b.tables + [[]] * case.num_padding
    block_tables = torch.zeros(len(tables), max(map(len, tables)), dtype=torch.int32)
    for i, t in enumerate(tables):
        block_tables[i, : len(t)] = torch.tensor(t, dtype=torch.int32)
    q_lens = case.q_lens + [1] * case.num_padding
    query_start = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    out = ta.paged_attention(
        q,
        layout,
        case.layer,
        kv_cache_dtype=case.kernel_kv_dtype or case.kv_cache_dtype,
        block_tables=block_tables.to(DEVICE),
        seq_lens=torch.tensor(case.ctx_lens + [0] * case.num_padding, dtype=torch.int32, device=DEVICE),
        query_start=query_start.to(DEVICE),
        max_query_len=max(q_lens),
        block_size=case.block_size,
        scale=case.head_dim**-0.5,
        sliding_window=case.window,
        num_splits=case.num_splits,
    )
    return out.cpu(), [s.cpu() for s in slabs]


def _bytes(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else x.contiguous().view(torch.uint8)


def check_case(case: Case) -> None:
    b = build(case)
    ref, ref_slabs = run_reference(case, b)
    out, ker_slabs = run_kernel(case, b)
    real = sum(case.q_lens)
    assert out.shape == (real + case.num_padding, case.num_heads, case.head_dim) and out.dtype == case.dtype
    assert torch.isfinite(out.float()).all(), f"non-finite output (a read out of bounds?): {case}"
    # The reference is a real signal, so the tolerance below means something.
    assert ref.float().abs().max() > 0.2 and ref.float().std() > 0.05, case
    torch.testing.assert_close(
        out[:real].float(),
        ref.float(),
        atol=ATOL[case.dtype],
        rtol=RTOL[case.dtype],
        msg=lambda m: f"{case}\n{m}",
    )
    if case.num_padding:
        assert not out[real:].float().abs().any(), "padding rows attend to nothing"
    # write_kv landed the same bytes as the reference's index_copy_ of encode(), in every slab and layer,
    # and wrote nothing outside the sequences' slots (they still hold the poison).
    for i, (r, kk, used) in enumerate(zip(ref_slabs, ker_slabs, b.used)):
        assert torch.equal(_bytes(kk[:, :, used]), _bytes(r[:, :, used])), f"slab {i} differs: {case}"
        poison = _bytes(kk[:, :, ~used])
        if kk.dtype == torch.uint8:
            assert (poison == 0xFF).all()
        else:
            assert torch.isnan(kk[:, :, ~used]).all()


# ---- kernel vs reference ---------------------------------------------------------------------------------

HEADS = [(2, 2), (4, 2), (8, 2), (6, 2), (3, 1)]  # GQA 1, 2, 4 and 3 (a group padded to 4 rows)
HEAD_DIMS = [32, 64, 48]
BLOCK_SIZES = [4, 8, 16, 32]
DTYPES = [torch.float32, torch.bfloat16]
KV_DTYPES = ["auto", "int8", "fp8"]


def random_case(seed: int) -> Case:
    """A mixed batch: decodes and prefill chunks (some with a cached prefix), random shapes and formats."""
    rng = random.Random(seed)
    decodes = rng.randint(0, 3)
    prefills = rng.randint(0 if decodes else 1, 3)
    ctx, q_lens = [], []
    for _ in range(decodes):
        ctx.append(rng.randint(1, 90))
        q_lens.append(1)
    for _ in range(prefills):
        q_len = rng.randint(2, 24)
        cached = rng.choice([0, rng.randint(1, 60)])
        ctx.append(cached + q_len)
        q_lens.append(q_len)
    heads, kvh = rng.choice(HEADS)
    return Case(
        q_lens=q_lens,
        ctx_lens=ctx,
        num_heads=heads,
        num_kv_heads=kvh,
        head_dim=rng.choice(HEAD_DIMS),
        dtype=rng.choice(DTYPES),
        kv_cache_dtype=rng.choice(KV_DTYPES),
        block_size=rng.choice(BLOCK_SIZES),
        num_slabs=rng.randint(2, 4),
        window=rng.choice([0, 0, 1, 5, 13, 32]),
        layer=rng.randint(0, NUM_LAYERS - 1),
        seed=seed,
    )


@pytest.mark.parametrize("seed", range(24))
def test_random_mixed_batches_match_reference(seed):
    check_case(random_case(seed))


def test_random_cases_cover_the_grid():
    """The seeded cases above reach every value of every axis (so a change to random_case cannot quietly
    drop one)."""
    cases = [random_case(s) for s in range(24)]
    assert {(c.num_heads, c.num_kv_heads) for c in cases} == set(HEADS)
    assert {c.head_dim for c in cases} == set(HEAD_DIMS)
    assert {c.block_size for c in cases} == set(BLOCK_SIZES)
    assert {c.dtype for c in cases} == set(DTYPES)
    assert {c.kv_cache_dtype for c in cases} == set(KV_DTYPES)
    assert any(c.window for c in cases) and any(not c.window for c in cases)
    assert any(1 in c.q_lens and max(c.q_lens) > 1 for c in cases)  # decodes and prefills in one batch
    assert any(q > 1 and c > q for cs in cases for q, c in zip(cs.q_lens, cs.ctx_lens))  # cached prefix


@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_wide_heads_tile_by_the_wide_rule(kv_cache_dtype):
    """Head dim 256 (Gemma-like) takes tile_shape's other branch (16-key tiles under a 32-slot block for a
    quantized cache, 8 warps for a prefill): decodes, a fresh prefill and a prefill over cached keys in one
    batch still equal the reference."""
    assert ta.tile_shape(256, 32, 24, quantized=kv_cache_dtype != "auto") == (
        (16, 8) if kv_cache_dtype != "auto" else (32, 8)
    )
    check_case(
        Case(
            q_lens=[1, 1, 24, 9],
            ctx_lens=[70, 5, 24, 75],
            num_heads=4,
            num_kv_heads=2,
            head_dim=256,
            dtype=torch.bfloat16,
            kv_cache_dtype=kv_cache_dtype,
            block_size=32,
        )
    )


@pytest.mark.parametrize(
    ("dtype", "kv_cache_dtype", "head_dim", "heads"),
    [
        (torch.float32, "auto", 32, (4, 2)),
        (torch.bfloat16, "auto", 48, (6, 2)),
        (torch.float32, "int8", 64, (8, 2)),
        (torch.bfloat16, "fp8", 32, (3, 1)),
    ],
)
@pytest.mark.parametrize("num_splits", [1, 2, 4, 8])
def test_decode_batches_split_context(num_splits, dtype, kv_cache_dtype, head_dim, heads):
    """Flash decoding: a decode-only batch with one long and some very short sequences (most of whose
    splits are empty), with and without a window."""
    for window in (0, 11):
        check_case(
            Case(
                q_lens=[1, 1, 1, 1],
                ctx_lens=[150, 1, 3, 37],
                num_heads=heads[0],
                num_kv_heads=heads[1],
                head_dim=head_dim,
                dtype=dtype,
                kv_cache_dtype=kv_cache_dtype,
                block_size=8,
                window=window,
                num_splits=num_splits,
                seed=num_splits,
            )
        )


@pytest.mark.parametrize("num_splits", [1, 4])
@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
def test_padding_rows_of_a_captured_decode_batch(num_splits, kv_cache_dtype):
    """Padding rows (length 0, slot -1) next to real decodes: they write nothing, output zeros, no NaN, and
    the real rows are unaffected."""
    check_case(
        Case(
            q_lens=[1, 1, 1],
            ctx_lens=[70, 2, 19],
            kv_cache_dtype=kv_cache_dtype,
            block_size=4,
            num_splits=num_splits,
            num_padding=3,
        )
    )


def test_single_token_prefix_and_long_prefill_chunks():
    """Edges: a decode at position 0 (one key), and chunks longer than one query tile (64 rows)."""
    check_case(Case(q_lens=[1, 70], ctx_lens=[1, 100], num_heads=2, num_kv_heads=2, block_size=32))
    check_case(Case(q_lens=[40, 33], ctx_lens=[40, 90], num_heads=8, num_kv_heads=2, window=20, block_size=4))


@settings(max_examples=15, deadline=None)
@given(
    data=st.fixed_dictionaries(
        {
            "seqs": st.lists(
                st.tuples(st.integers(1, 20), st.integers(0, 50)), min_size=1, max_size=4
            ),  # (query len, cached)
            "heads": st.sampled_from(HEADS),
            "head_dim": st.sampled_from(HEAD_DIMS),
            "dtype": st.sampled_from(DTYPES),
            "kv_cache_dtype": st.sampled_from(KV_DTYPES),
            "block_size": st.sampled_from(BLOCK_SIZES),
            "num_slabs": st.integers(1, 4),
            "window": st.sampled_from([0, 1, 4, 17]),
            "layer": st.integers(0, NUM_LAYERS - 1),
            "seed": st.integers(0, 2**16),
        }
    )
)
def test_hypothesis_batches_match_reference(data):
    seqs = sorted(data.pop("seqs"), key=lambda s: s[0] > 1)  # decodes first
    heads = data.pop("heads")
    decode_only = all(q == 1 for q, _ in seqs)
    check_case(
        Case(
            q_lens=[q for q, _ in seqs],
            ctx_lens=[q + c for q, c in seqs],
            num_heads=heads[0],
            num_kv_heads=heads[1],
            num_splits=2 if decode_only else 1,
            **data,
        )
    )


def test_tolerance_catches_a_one_key_difference():
    """The comparison is sharp enough: dropping a single key of one sequence (as an off-by-one in the
    causal bound would) moves the output past the tolerance."""
    case = Case(q_lens=[1, 6], ctx_lens=[40, 30])
    b = build(case)
    ref, _ = run_reference(case, b)
    out, _ = run_kernel(case, b)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    short = Case(q_lens=[1, 6], ctx_lens=[40, 30], window=39)  # the decode loses its oldest key only
    out_short, _ = run_kernel(short, b)
    assert (out_short[0] - ref[0]).abs().max() > 100 * ATOL[torch.float32]
    torch.testing.assert_close(out_short[1:], ref[1:], atol=1e-5, rtol=1e-5)


def test_num_splits_needs_decode_only_and_a_power_of_two():
    case = Case(q_lens=[3], ctx_lens=[5])
    b = build(case)
    _, layout = kernel_layout(case, b)
    common = dict(
        kv_cache_dtype="auto",
        block_tables=torch.tensor([b.tables[0]], dtype=torch.int32),
        seq_lens=torch.tensor([5], dtype=torch.int32),
        query_start=torch.tensor([0, 3], dtype=torch.int32),
        block_size=16,
        scale=1.0,
    )
    with pytest.raises(ValueError, match="decode-only"):
        ta.paged_attention(b.q, layout, 0, max_query_len=3, num_splits=2, **common)
    with pytest.raises(ValueError, match="power of two"):
        ta.paged_attention(b.q[:1], layout, 0, max_query_len=1, num_splits=3, **common)


# ---- write_kv ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kv_cache_dtype", KV_DTYPES)
@pytest.mark.parametrize("layer", range(3))
def test_write_kv_lands_each_row_at_its_slot_and_skips_minus_one(kv_cache_dtype, layer):
    layers, kvh, d, slab_slots, num_slabs = 3, 2, 48, 12, 3
    fmt = KVCacheFormat(kv_cache_dtype, torch.float32, d)
    g = torch.Generator().manual_seed(layer)
    slabs = [
        fmt.encode(torch.randn(layers, 2, slab_slots, kvh, d, generator=g)).to(DEVICE)
        for _ in range(num_slabs)
    ]
    before = [s.clone() for s in slabs]
    anchor = torch.empty(1, dtype=fmt.storage_dtype, device=DEVICE)
    layout = PagedKVLayout(
        anchor, torch.zeros(4, dtype=torch.int64, device=DEVICE), slab_slots, kvh, fmt.entry_width
    )
    for i in (2, 0, 1):  # bound out of order; offsets may be negative
        layout.bind(i, slabs[i])
    slots = torch.tensor([25, -1, 3, 14, -1, 35, 0, 23, 12])  # slabs 2, -, 0, 1, -, 2, 0, 1, 1
    k = fmt.encode(torch.randn(len(slots), kvh, d, generator=g))
    v = fmt.encode(torch.randn(len(slots), kvh, d, generator=g))
    ta.write_kv(k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), layout, layer)
    expected = [s.clone() for s in before]
    for row, slot in enumerate(slots.tolist()):
        if slot >= 0:
            expected[slot // slab_slots][layer, 0, slot % slab_slots] = k[row]
            expected[slot // slab_slots][layer, 1, slot % slab_slots] = v[row]
    for got, want in zip(slabs, expected):
        assert torch.equal(_bytes(got.cpu()), _bytes(want.cpu()))  # other layers and slots untouched
    # No rows at all: a no-op.
    ta.write_kv(k[:0].to(DEVICE), v[:0].to(DEVICE), slots[:0].to(DEVICE), layout, layer)
    assert all(torch.equal(_bytes(got.cpu()), _bytes(want.cpu())) for got, want in zip(slabs, expected))


@pytest.mark.parametrize("mode", ["reserved", "slabs"])
def test_write_kv_through_the_storage_layout(mode):
    """KVSlabStorage's own layout (one region, or separate slabs bound as they are added) puts every row
    where the storage's slab views say it is."""
    fmt = KVCacheFormat("int8", torch.float32, 8)
    patch = mock.patch("fitllm.memory.kv.storage.reserve_region", lambda *a: None)
    with patch if mode == "slabs" else contextlib.nullcontext():
        storage = KVSlabStorage(3, 2, fmt, 4, 2, 3, DEVICE, MemoryLedger(1 << 30))  # 8 slots per slab
    if DEVICE.type == "cpu":
        assert storage.mode == mode
    for slab in (0, 2, 1):
        assert storage.add(slab)
    slots = torch.tensor([17, 2, 9, -1, 23, 0, 8])
    g = torch.Generator().manual_seed(0)
    k = fmt.encode(torch.randn(len(slots), 2, 8, generator=g))
    v = fmt.encode(torch.randn(len(slots), 2, 8, generator=g))
    for layer in range(3):
        ta.write_kv(k.to(DEVICE), v.to(DEVICE), slots.to(DEVICE), storage.layout, layer)
    valid = slots >= 0
    out = torch.empty(3, 2, int(valid.sum()), 2, fmt.entry_width, dtype=torch.uint8, device=DEVICE)
    storage.read_slots(slots[valid].to(DEVICE), out)
    for layer in range(3):
        assert torch.equal(out[layer, 0].cpu(), k[valid]) and torch.equal(out[layer, 1].cpu(), v[valid])
    # Every other slot is still zero.
    written = {int(s) for s in slots[valid]}
    others = torch.tensor([s for s in range(24) if s not in written])
    rest = torch.empty(3, 2, len(others), 2, fmt.entry_width, dtype=torch.uint8, device=DEVICE)
    storage.read_slots(others.to(DEVICE), rest)
    assert not rest.any()


# ---- choose_num_splits and resolve_attention_backend ---------------------------------------------------


def test_choose_num_splits():
    """The rule: powers of two up to 64, at least MIN_KEYS_PER_SPLIT keys each, about two programs per SM,
    never more splits for more sequences; every split then has keys to read."""
    assert ta.MIN_KEYS_PER_SPLIT < 256
    for sms in (1, 8, 80, 132):
        for ctx in (1, 100, 127, 128, 657, 4096, 1 << 17):
            for kvh in (1, 2, 8):
                prev = None
                for seqs in (1, 2, 3, 8, 64, 256):
                    s = ta.choose_num_splits(seqs, kvh, ctx, sms)
                    assert 1 <= s <= 64 and s & (s - 1) == 0
                    assert s == 1 or ctx >= ta.MIN_KEYS_PER_SPLIT * s
                    programs = seqs * kvh * s
                    # Fewer than two waves only where a cap stops it: 64 splits, or too few keys to split more.
                    assert programs >= 2 * sms or s == 64 or ctx < 2 * ta.MIN_KEYS_PER_SPLIT * s
                    assert s == 1 or seqs * kvh * (s // 2) < 2 * sms  # no split past the target
                    if prev is not None:
                        assert s <= prev, "more sequences must not mean more splits"
                    prev = s
    assert ta.choose_num_splits(1, 1, 127, 132) == 1  # too short to split
    assert ta.choose_num_splits(1, 1, 128, 132) == 2
    assert ta.choose_num_splits(1, 1, 1 << 20, 132) == 64  # capped
    # Issue 23: batch 1 at 657 tokens, 8 KV heads, an H100's 132 SMs ran 16 programs; now 64.
    assert ta.choose_num_splits(1, 8, 657, 132) == 8
    assert ta.choose_num_splits(1, 8, 8192, 132) * 8 >= 2 * 132  # a lone long sequence fills the GPU twice
    assert ta.choose_num_splits(4096, 8, 8192, 132) == 1  # a big batch fills it already
    assert ta.choose_num_splits(1, 8, 8192, 1) == 1  # the interpreter counts as one SM


def test_resolve_attention_backend(monkeypatch):
    cpu = torch.device("cpu")
    assert resolve_attention_backend("auto", cpu) == "torch"
    assert resolve_attention_backend("torch", cpu) == "torch"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert resolve_attention_backend("triton", cpu) == "triton"
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="--attention-backend torch"):
        resolve_attention_backend("triton", cpu)
    with pytest.raises(ValueError, match="--attention-backend"):
        resolve_attention_backend("flash", cpu)
    assert resolve_attention_backend("auto", torch.device("cuda")) == "triton"
    no_triton = mock.patch("importlib.util.find_spec", lambda name: None)
    with no_triton, pytest.raises(ValueError, match="--attention-backend torch"):
        resolve_attention_backend("triton", cpu)
    with no_triton:
        assert resolve_attention_backend("auto", torch.device("cuda")) == "torch"


# ---- fp8 decoded from its bits (GPUs before sm_89) -------------------------------------------------------


@triton.jit
def _decode_row_kernel(row_ptr, out_ptr, D: tl.constexpr, KV_QUANT: tl.constexpr):
    d = tl.arange(0, D)
    row_off = tl.zeros([1], tl.int64)
    codes, scale = ta._load_kv_tile(row_ptr, row_off, row_off == 0, d, D, KV_QUANT, tl.float32)
    tl.store(out_ptr + d[None, :], codes * scale[:, None])


@pytest.mark.parametrize("kv_quant", [2, 3])
def test_fp8_codes_decode_like_torch_for_all_256_bytes(kv_quant):
    """Native fp8 conversion (2) and the bit decoder (3) agree with torch's float8_e4m3fn on every byte
    but the two NaN patterns, subnormals and signs included."""
    codes = torch.arange(256, dtype=torch.uint8)
    row = torch.cat([codes, torch.tensor([1.0]).view(torch.uint8)]).to(DEVICE)
    out = torch.empty(1, 256, device=DEVICE)
    _decode_row_kernel[(1,)](row, out, D=256, KV_QUANT=kv_quant)
    want = codes.view(torch.float8_e4m3fn).float()
    finite = ~torch.isnan(want)
    assert finite.sum() == 254
    assert torch.equal(out.cpu()[0][finite], want[finite])


@pytest.mark.parametrize("seed", range(3))
def test_fp8_bit_decoder_matches_reference_attention(seed):
    """The whole kernel with fp8 decoded from bits ("fp8-bits") against the reference's fp8 path."""
    case = Case(
        q_lens=[1, 1, 6],
        ctx_lens=[20, 45, 30],
        kv_cache_dtype="fp8",
        kernel_kv_dtype="fp8-bits",
        block_size=8,
        seed=seed,
    )
    check_case(case)


def _same_split(a, b) -> bool:
    return a.size == b.size and [
        (s, None if p is None else p.tolist(), x.tolist()) for s, p, x in a.parts
    ] == [(s, None if p is None else p.tolist(), x.tolist()) for s, p, x in b.parts]


@pytest.mark.parametrize(
    "case",
    [
        Case(q_lens=[1, 1, 1, 9, 20], ctx_lens=[5, 40, 17, 9, 64], block_size=8),
        Case(q_lens=[1, 70], ctx_lens=[1, 100], num_heads=2, num_kv_heads=2, block_size=32),
        Case(q_lens=[40, 33], ctx_lens=[40, 90], num_heads=8, num_kv_heads=2, window=20, block_size=4),
    ],
)
def test_builders_turn_one_layout_into_each_backends_metadata(case):
    """One BatchLayout of a case: the torch builder gives the reference metadata, the Triton builder the
    kernels' block tables and lengths, and both write to the case's slots."""
    from fitllm.model.attention import BatchLayout, metadata_builder

    b = build(case)
    layout = BatchLayout(case.block_size, num_decodes=sum(q == 1 for q in case.q_lens))
    for q, c, table in zip(case.q_lens, case.ctx_lens, b.tables, strict=True):
        layout.add_sequence(table, c - q, c)
    assert layout.slot_mapping == b.slot_mapping.tolist()
    window = case.window or None
    cpu = torch.device("cpu")
    got = metadata_builder("torch", case.num_kv_heads, window, b.slab_slots).build(layout, cpu)
    ref = reference_metadata(case, b)
    assert got.num_decodes == ref.num_decodes and _same_split(got.slot_mapping, ref.slot_mapping)
    assert len(got.decode_groups) == len(ref.decode_groups)
    for g, r in zip(got.decode_groups, ref.decode_groups, strict=True):
        assert (g.start, g.num, g.context) == (r.start, r.num, r.context) and _same_split(g.rows, r.rows)
        assert torch.equal(g.mask, r.mask)
    for g, r in zip(got.prefills, ref.prefills, strict=True):
        assert (g.query_start, g.query_len, g.context_len) == (r.query_start, r.query_len, r.context_len)
        assert _same_split(g.context_rows, r.context_rows)
        assert (g.mask is None) == (r.mask is None) and (g.mask is None or torch.equal(g.mask, r.mask))
    kernel = metadata_builder("triton", case.num_kv_heads, window, b.slab_slots).build(layout, cpu)
    assert kernel.slot_mapping.tolist() == b.slot_mapping.tolist()
    assert kernel.seq_lens.tolist() == case.ctx_lens and kernel.max_query_len == max(case.q_lens)
    assert kernel.query_start.tolist() == [0, *itertools.accumulate(case.q_lens)]
    width = max(map(len, b.tables))
    assert kernel.block_tables.tolist() == [t + [0] * (width - len(t)) for t in b.tables]
    assert kernel.num_splits == 1 and kernel.sliding_window == case.window
