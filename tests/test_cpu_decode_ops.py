"""The CPU decode path's hand-fused ops (issue 24) against the references they replace: RMSNorm and rotary
against transformers' Llama code bit for bit, decode attention over the paged cache (PyTorch's path and
fitllm's kernel, decode_attention.c) against a float64 softmax, and the sampler's greedy shortcut against the full
pipeline."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding, apply_rotary_pos_emb

from fitllm.engine.request import Request, SamplingParams
from fitllm.engine.sampler import Sampler
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.model.attention import BatchLayout, PagedAttention, cpu_decode, metadata_builder
from fitllm.model.attention import torch_backend as tb
from fitllm.model.layers import RMSNorm, RotaryEmbedding

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", [True, False])
def test_rmsnorm_with_residual_matches_transformers(dtype, kernel, monkeypatch):
    """PyTorch's path is Hugging Face's bit for bit. fitllm's kernel (rms_norm.c; float32 and bfloat16,
    decode-sized calls) rounds at the same points and differs only in the float32 sum of squares' order:
    the residual bit for bit, the normed rows within a last-place step or a few where that sum's rounding
    tips."""
    from fitllm.model import cpu_norm

    built = cpu_norm.rms_norm_kernel()
    if kernel and built is None:
        pytest.skip("fitllm's CPU kernels are not built here (no AVX-512 or no C compiler)")
    calls = []
    if kernel:
        original = cpu_norm.RMSNormKernel.__call__
        monkeypatch.setattr(
            cpu_norm.RMSNormKernel, "__call__", lambda self, *a: calls.append(1) or original(self, *a)
        )
    else:
        monkeypatch.setattr(cpu_norm, "_kernel", [None])
    g = torch.Generator().manual_seed(3)
    hf = LlamaRMSNorm(576, eps=1e-5)
    hf.weight.data = (1 + 0.5 * torch.randn(576, generator=g)).to(dtype)
    ours = RMSNorm(576, 1e-5)
    ours.weight.data = hf.weight.data.clone()
    x = (4 * torch.randn(7, 576, generator=g)).to(dtype)
    res = torch.randn(7, 576, generator=g).to(dtype)
    for residual in (res, None):
        got, got_res = ours(x, residual)
        want_res = x if residual is None else x + residual
        want = hf(want_res)
        assert torch.equal(got_res, want_res)
        if kernel and dtype != torch.float16:
            # bfloat16: one step of its own rounding; float32 (no rounding between the ops to absorb it): the
            # sum's last-place step carried through rsqrt and two products, a few float32 steps.
            steps = 1 if dtype == torch.bfloat16 else 4
            bound = steps * torch.finfo(dtype).eps * want.float().abs().clamp(min=torch.finfo(dtype).tiny)
            assert ((got.float() - want.float()).abs() <= bound).all()
        else:
            assert torch.equal(got, want)
    assert len(calls) == (2 if kernel and dtype != torch.float16 else 0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_of_q_and_k_heads_together_is_transformers_bit_for_bit(dtype):
    """One `apply` over q and k heads side by side (as LlamaAttention calls it, the step's rows gathered
    once) gives what transformers' rotate-half gives for q and k separately."""
    cfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, rope_theta=100000.0)
    hf_rope = LlamaRotaryEmbedding(cfg)
    rope = RotaryEmbedding(64, 4096, 100000.0)
    rope.build(torch.device("cpu"), dtype)
    g = torch.Generator().manual_seed(5)
    positions = torch.tensor([0, 1, 17, 300, 4095])
    qk = (3 * torch.randn(5, 12, 64, generator=g)).to(dtype)  # 9 query heads then 3 KV heads
    cos, sin = hf_rope(qk, positions.unsqueeze(0))
    want_q, want_k = apply_rotary_pos_emb(
        qk[:, :9].transpose(0, 1).unsqueeze(0), qk[:, 9:].transpose(0, 1).unsqueeze(0), cos, sin
    )
    got = rope.apply(rope.tables(positions), qk)
    assert torch.equal(got[:, :9], want_q.squeeze(0).transpose(0, 1))
    assert torch.equal(got[:, 9:], want_k.squeeze(0).transpose(0, 1))
    # The compatibility entry point agrees with the fused one.
    q2, k2 = rope(positions, qk[:, :9], qk[:, 9:])
    assert torch.equal(q2, got[:, :9]) and torch.equal(k2, got[:, 9:])


def _decode_case(contexts: list[int], kv_dtype: str, dtype: torch.dtype, window: int | None, seed: int):
    """A bound layer over a cache of shuffled blocks, the decode group of `contexts`, queries, and the
    float64 K/V each request attends to (as stored, decoded)."""
    heads, kvh, d, bs = 8, 2, 32, 16
    g = torch.Generator().manual_seed(seed)
    blocks = sum(-(-c // bs) for c in contexts) + 3
    order = torch.randperm(blocks, generator=g).tolist()
    layout = BatchLayout(bs, num_decodes=len(contexts))
    for c in contexts:
        n = -(-c // bs)
        table, order = order[:n], order[n:]
        layout.add_sequence(table, c - 1, c)
    fmt = KVCacheFormat(kv_dtype, dtype, d)
    attn = PagedAttention(heads, kvh, d, d**-0.5)
    attn.kv_slabs = [fmt.encode(torch.randn(2, blocks * bs, kvh, d, generator=g).to(dtype))]
    attn.kv_format = fmt
    meta = metadata_builder("torch", kvh, window, blocks * bs).build(layout, torch.device("cpu"))
    q = torch.randn(len(contexts), heads, d, generator=g).to(dtype)
    kv = fmt.decode(attn.kv_slabs[0].view(-1, fmt.entry_width)).view(2, blocks * bs, kvh, d).double()
    return attn, q, meta, layout, kv


@pytest.mark.parametrize("kv_dtype", ["auto", "int8"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("contexts", "window"), [([37], None), ([5, 40, 17, 33], None), ([50, 20], 24)])
@pytest.mark.parametrize("kernel", [True, False])
def test_decode_attention_matches_a_float64_softmax(kv_dtype, dtype, contexts, window, kernel, monkeypatch):
    """Both CPU paths: fitllm's kernel where it is built and the group is in its form (a float or int8 cache,
    no sliding window cutting the context), PyTorch's otherwise."""
    built = cpu_decode.decode_attention_kernel()
    if kernel and built is None:
        pytest.skip("fitllm's CPU kernels are not built here (no AVX-512 or no C compiler)")
    calls = []
    if kernel:
        monkeypatch.setattr(cpu_decode.DecodeAttentionKernel, "__call__", _counted(calls))
    else:
        monkeypatch.setattr(cpu_decode, "_kernel", [None])
    attn, q, meta, layout, kv = _decode_case(contexts, kv_dtype, dtype, window, seed=len(contexts))
    (group,) = meta.decode_groups
    assert group.masked == (len(set(contexts)) > 1 or window is not None and max(contexts) > window)
    got = tb._decode(attn, q, group)
    windowed = window is not None and max(contexts) > window
    assert len(calls) == (1 if kernel and not windowed else 0)  # int8 caches too
    for i, c in enumerate(contexts):
        pos = torch.arange(c)
        keep = pos > c - 1 - window if window else pos >= 0
        slots = torch.tensor([layout.block_tables[i][p // 16] * 16 + p % 16 for p in range(c)])[keep]
        k, v = kv[0, slots], kv[1, slots]  # [ctx, kvh, d]
        qi = q[i].double().view(2, 4, 32)  # query heads grouped by their KV head
        probs = (torch.einsum("hgd,chd->hgc", qi, k) * attn.scale).softmax(-1)
        want = torch.einsum("hgc,chd->hgd", probs, v).reshape(8, 32)
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(got[i].double(), want, rtol=tol, atol=tol)


def _counted(calls: list):
    """DecodeAttentionKernel.__call__, recording each call."""
    original = cpu_decode.DecodeAttentionKernel.__call__

    def call(self, *args, **kwargs):
        calls.append(args[0].shape)
        return original(self, *args, **kwargs)

    return call


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(
    ("n", "heads", "kvh", "d", "context"),
    [(1, 9, 3, 64, 300), (3, 8, 2, 128, 37), (2, 4, 4, 80, 17), (1, 32, 2, 128, 700), (2, 16, 1, 256, 40),
     (3, 6, 2, 72, 33), (4, 6, 6, 64, 1), (3, 9, 3, 64, 1500), (2, 4, 2, 72, 1030)],
)  # fmt: skip
def test_decode_attention_kernel_against_float64(dtype, n, heads, kvh, d, context):
    """The kernel over shuffled cache rows and unequal lengths: every head dim it specializes (64, 80, 128,
    256) and one it does not (72), one to 16 query heads per KV head, contexts shorter than a 16-row block
    and longer than a piece (PIECE_ROWS, 1024: attended in pieces and merged), one piece's worth and a tail.
    float32 to float32's rounding; bfloat16 to its output's (the products and sums are float32 inside)."""
    kernel = cpu_decode.decode_attention_kernel()
    if kernel is None:
        pytest.skip("fitllm's CPU kernels are not built here (no AVX-512 or no C compiler)")
    g = torch.Generator().manual_seed(n * d + context)
    slots = n * context + 50
    cache = torch.randn(2, slots, kvh, d, generator=g).to(dtype)
    order = torch.randperm(slots, generator=g)[: n * context].view(n, context)
    lengths = torch.randint(1, context + 1, (n,), generator=g)
    lengths[0] = context
    q = (2 * torch.randn(n, heads, d, generator=g)).to(dtype)
    got = kernel(q, cache[0], cache[1], tb.head_rows(order.reshape(-1), kvh), context, lengths, kvh, d**-0.5)
    assert got.shape == q.shape and got.dtype == dtype
    for r in range(n):
        keep = order[r, : int(lengths[r])]
        k, v = cache[0, keep].double(), cache[1, keep].double()  # [len, kvh, d]
        qr = q[r].double().view(kvh, heads // kvh, d)
        probs = (torch.einsum("hgd,chd->hgc", qr, k) * d**-0.5).softmax(-1)
        want = torch.einsum("hgc,chd->hgd", probs, v).reshape(heads, d)
        err = (got[r].double() - want).abs()
        rel = 1e-5 if dtype == torch.float32 else 2.0**-8
        assert (err <= rel * want.abs() + 1e-5).all(), err.max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_kernel_rows_do_not_depend_on_their_batch(dtype):
    """A request's output is the same bits alone and in a batch, whatever its length against the pieces a
    long context is split into (the split follows the request's own length, not the batch or threads)."""
    kernel = cpu_decode.decode_attention_kernel()
    if kernel is None:
        pytest.skip("fitllm's CPU kernels are not built here (no AVX-512 or no C compiler)")
    g = torch.Generator().manual_seed(7)
    n, heads, kvh, d, context = 4, 9, 3, 64, 1400
    cache = torch.randn(2, n * context, kvh, d, generator=g).to(dtype)
    order = torch.randperm(n * context, generator=g).view(n, context)
    lengths = torch.tensor([1400, 300, 513, 1025])
    q = torch.randn(n, heads, d, generator=g).to(dtype)
    batch = kernel(q, cache[0], cache[1], tb.head_rows(order.reshape(-1), kvh), context, lengths, kvh, 0.125)
    for r in range(n):
        rows = tb.head_rows(order[r], kvh)
        alone = kernel(
            q[r : r + 1].contiguous(), cache[0], cache[1], rows, context, lengths[r : r + 1], kvh, 0.125
        )
        assert torch.equal(alone[0], batch[r]), r


@pytest.mark.parametrize(("n", "heads", "kvh", "d", "context"), [(1, 9, 3, 64, 300), (3, 8, 2, 72, 1100)])
def test_decode_attention_kernel_reads_an_int8_cache(n, heads, kvh, d, context):
    """`--kv-cache-dtype int8`: rows of int8 codes and a float32 scale, as KVCacheFormat encodes them. The
    kernel's output equals a float64 softmax over the decoded rows to bfloat16's rounding (a head dim of 72
    takes the masked path, a context past a piece the merge)."""
    from fitllm.memory.kv.format import KVCacheFormat

    kernel = cpu_decode.decode_attention_kernel()
    if kernel is None:
        pytest.skip("fitllm's CPU kernels are not built here (no AVX-512 or no C compiler)")
    fmt = KVCacheFormat("int8", torch.bfloat16, d)
    g = torch.Generator().manual_seed(d + context)
    slots = n * context + 8
    raw = torch.randn(2, slots, kvh, d, generator=g).bfloat16()
    cache = fmt.encode(raw)  # [2, slots, kvh, d + 4] uint8
    order = torch.randperm(slots, generator=g)[: n * context].view(n, context)
    lengths = torch.randint(1, context + 1, (n,), generator=g)
    lengths[0] = context
    q = (2 * torch.randn(n, heads, d, generator=g)).bfloat16()
    rows = tb.head_rows(order.reshape(-1), kvh)
    assert kernel.takes(q, cache[0], rows, kvh, kv_int8=True)
    got = kernel(q, cache[0], cache[1], rows, context, lengths, kvh, d**-0.5, kv_int8=True)
    codes, scales = fmt.split(cache.reshape(-1, d + 4))
    decoded = (codes.double() * scales.double()).view(
        2, slots, kvh, d
    )  # exact: the kernel's float32 products
    for r in range(n):
        keep = order[r, : int(lengths[r])]
        k, v = decoded[0, keep].double(), decoded[1, keep].double()
        qr = q[r].double().view(kvh, heads // kvh, d)
        probs = (torch.einsum("hgd,chd->hgc", qr, k) * d**-0.5).softmax(-1)
        want = torch.einsum("hgc,chd->hgd", probs, v).reshape(heads, d)
        err = (got[r].double() - want).abs()
        assert (err <= 2.0**-7 * want.abs() + 1e-3).all(), err.max()


def _request(i: int, **params) -> Request:
    return Request(f"r{i}", None, [1, 2, 3], SamplingParams(max_tokens=4, **params))


def test_plain_greedy_rows_take_the_argmax_shortcut_and_others_the_pipeline():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    sampler = Sampler([0])
    plain = sampler(logits, [_request(i, temperature=0.0) for i in range(3)])
    assert plain.token_ids == logits.float().argmax(-1).tolist() and plain.logprobs == [None] * 3
    # A row that asks for more (logprobs, a bias) is served by the whole pipeline, for every row.
    asks = [_request(0, temperature=0.0, logprobs=2), _request(1, temperature=0.0, logit_bias={7: 100.0})]
    full = sampler(logits[:2], asks)
    assert full.token_ids[0] == plain.token_ids[0] and full.logprobs[0] is not None
    assert full.token_ids[1] == 7


def test_greedy_rows_with_banned_strings_or_dry_never_take_the_shortcut():
    """The shortcut is the argmax of the raw logits: a greedy row whose token a ban forbids (a banned phrase's
    first token at this position) or DRY penalises must go through the pipeline, or a rewind would loop."""
    from fitllm.engine.sampler import _plain_greedy

    assert _plain_greedy(_request(0, temperature=0.0))
    assert not _plain_greedy(_request(0, temperature=0.0, banned_strings=["dragon"]))
    assert not _plain_greedy(_request(0, temperature=0.0, dry_multiplier=0.8))
