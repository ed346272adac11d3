"""Context shift (fitllm/engine/context_shift.py): K rotated by the position change equals K computed at the
new position for every rotary variant, the kept run is found token-exactly, and in the engine a shifted
request's cache is exactly the reference (the original pass's K/V, K rotated), its logits those of a forward
over that cache, with shared blocks untouched, batching, preemption and the prefix cache's separation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_random_checkpoint, run_all, tight_engine
from hypothesis import given, settings
from hypothesis import strategies as st
from stand_ins import LogitsTap

from fitllm import Engine, EngineConfig, SamplingParams
from fitllm.engine.context_shift import (
    MIN_SHIFT_BLOCKS,
    KeptRun,
    find_kept_run,
    rotate_keys,
    rotates_by_gemm,
    shift_kv,
)
from fitllm.engine.runner import scratch_prefill
from fitllm.memory.kv.format import KVCacheFormat
from fitllm.model.layers import RotaryEmbedding

# ---- rotation -------------------------------------------------------------------------------------------

LLAMA3 = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,  # small, so the tiny head's frequencies fall in all three bands
}
VARIANTS = {
    "plain": dict(rotary_dim=32, scaling=None, interleaved=False),
    "llama3": dict(rotary_dim=32, scaling=LLAMA3, interleaved=False),
    "linear": dict(rotary_dim=32, scaling={"rope_type": "linear", "factor": 4.0}, interleaved=False),
    "glm-partial-interleaved": dict(rotary_dim=16, scaling=None, interleaved=True),
}
HEAD_DIM = 32


def _rotary(variant: str) -> RotaryEmbedding:
    rot = RotaryEmbedding(max_position=4096, base=10000.0, **VARIANTS[variant])
    rot.build(torch.device("cpu"), torch.float32)
    return rot


def _keys(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 2, HEAD_DIM, generator=torch.Generator().manual_seed(seed))


def _at(rot: RotaryEmbedding, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return rot(positions, torch.zeros_like(k), k)[1]


def _exact_at(rot: RotaryEmbedding, k: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """k rotated to `positions` in float64, written out pair by pair as complex products (the reference:
    rotate-half pairs channel i with i + rotary_dim / 2, interleaved pairs 2j with 2j + 1)."""
    freqs = positions.double().unsqueeze(1) * rot.inv_freq().double().unsqueeze(0)  # [T, rotary_dim / 2]
    turn = torch.polar(torch.ones_like(freqs), freqs).unsqueeze(1)  # [T, 1, rotary_dim / 2]
    x, half = k.double(), rot.rotary_dim // 2
    if rot.interleaved:
        pairs = torch.complex(x[..., 0 : 2 * half : 2], x[..., 1 : 2 * half : 2]) * turn
        rotated = torch.stack((pairs.real, pairs.imag), dim=-1).flatten(-2)
    else:
        pairs = torch.complex(x[..., :half], x[..., half : 2 * half]) * turn
        rotated = torch.cat((pairs.real, pairs.imag), dim=-1)
    return torch.cat((rotated, x[..., 2 * half :]), dim=-1)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize(("p", "d"), [(70, 37), (300, 299), (3000, 2500), (40, 1)])
def test_rotating_by_minus_d_equals_computing_at_p_minus_d(variant, p, d):
    rot = _rotary(variant)
    k = _keys(24)
    positions = torch.arange(p, p + 24)
    shifted = rot.shift(_exact_at(rot, k, positions).float(), torch.full((24,), -d))
    ref = _exact_at(rot, k, positions - d)
    assert torch.allclose(shifted.double(), ref, atol=1e-5, rtol=0), (shifted - ref).abs().max()
    assert not torch.allclose(_exact_at(rot, k, positions), ref, atol=1e-3)  # the shift really moved it
    if variant == "glm-partial-interleaved":  # channels past the rotary part are never touched
        assert torch.equal(shifted[..., 16:], k[..., 16:])
    if p < 100:
        # The model's own float32 tables agree (their angles p * f are rounded once, so only near 0).
        model_shifted = rot.shift(_at(rot, k, positions), torch.full((24,), -d))
        assert torch.allclose(model_shifted, _at(rot, k, positions - d), atol=1e-5, rtol=0)


def test_the_scaled_frequencies_are_applied_once():
    """A shift with scaling equals the unscaled shift by d / factor for linear scaling (scaling twice would
    equal d / factor**2)."""
    lin, plain = _rotary("linear"), _rotary("plain")
    k = _keys(8, seed=3)
    got = lin.shift(k, torch.full((8,), 40))
    assert torch.allclose(got, plain.shift(k, torch.full((8,), 10)), atol=1e-6)
    assert not torch.allclose(got, plain.shift(k, torch.full((8,), 40)), atol=1e-3)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("kv_dtype", ["int8", "fp8"])
def test_quantized_keys_are_decoded_rotated_and_encoded_again(variant, kv_dtype):
    rot, fmt = _rotary(variant), KVCacheFormat(kv_dtype, torch.float32, HEAD_DIM)
    k, v = _keys(20, seed=1), _keys(20, seed=2)
    p, d = torch.arange(200, 220), 123
    kv = torch.stack([fmt.encode(_exact_at(rot, k, p)), fmt.encode(v)]).unsqueeze(0)  # [1 layer, 2, T, H, W]
    v_before = kv[0, 1].clone()
    delta = torch.full((20,), -d)
    delta[:3] = 0  # rows before the cut stay as they are
    unmoved = kv[0, 0, :3].clone()
    shift_kv(kv, delta, rot, fmt)
    got = fmt.decode(kv[0, 0].reshape(-1, fmt.entry_width)).view(20, 2, HEAD_DIM)
    ref = _exact_at(rot, k, p - d).float()
    # Two roundings of the format (the cached K, the shifted K): each within half a step (int8) or one
    # part in 16 (fp8) of the vector's largest value.
    step = ref.abs().amax(-1, keepdim=True) * (1 / 127 if kv_dtype == "int8" else 1 / 16)
    assert ((got - ref).abs()[3:] <= 2 * step[3:] + 1e-6).all()
    assert torch.equal(kv[0, 1], v_before) and torch.equal(kv[0, 0, :3], unmoved)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_16_bit_keys_moved_by_one_delta_go_throughrotates_by_gemm(variant, dtype):
    """`rotate_keys` on 16-bit keys moved alike (a whole-block cut) takes the GEMM path, in place in a strided
    cache view, and gives the float64 rotation within one step of the dtype, equal to `rotate_by`'s float32
    result rounded once almost everywhere; with the high part of the matrix alone it would not be."""
    rot, fmt = _rotary(variant), KVCacheFormat("auto", dtype, HEAD_DIM)
    stored = _exact_at(rot, _keys(3 * 64, seed=5), torch.arange(900, 1092)).view(3, 64, 2, HEAD_DIM)
    cache = torch.zeros(3, 2, 100, 2, HEAD_DIM, dtype=dtype)  # [layers, K/V, slots, heads, width]
    cache[:, 0, 20:84] = stored.to(dtype)
    keys = cache[:, 0, 20:84]  # as `KVSlabStorage.key_runs` gives them
    tables = rot.shift_tables(torch.tensor([-777]), torch.device("cpu"))
    assert rotates_by_gemm(keys, tables, fmt)
    elementwise = keys.clone()
    for layer in elementwise:
        rot.rotate_by(tables, layer, out=layer)
    before = keys.clone()
    rotate_keys(keys, tables, rot, fmt)
    exact = torch.stack([_exact_at(rot, layer.double(), torch.full((64,), -777)) for layer in before])
    step = torch.finfo(dtype).eps  # the significand's last step at 1
    assert (
        (keys.double() - exact).abs() <= exact.abs() * step + exact.abs().amax(-1, keepdim=True) * 1e-6
    ).all()
    assert (keys != elementwise).float().mean() < 0.01
    assert torch.equal(cache[:, 0, :20], torch.zeros_like(cache[:, 0, :20]))  # nothing outside the run
    high_only = torch.mm(
        before[0].reshape(-1, HEAD_DIM), rot.shift_matrix(tables, HEAD_DIM, dtype)[:HEAD_DIM]
    )
    assert (high_only.view_as(keys[0]) != elementwise[0]).float().mean() > 0.05


# ---- matching -------------------------------------------------------------------------------------------


def test_the_kept_run_is_the_longest_token_exact_one_after_the_kept_prefix():
    rng = np.random.default_rng(0)
    memory, story, tail = rng.integers(3, 200, 21), rng.integers(3, 200, 120), rng.integers(3, 200, 7)
    seq = np.concatenate([memory, story])
    prompt = np.concatenate([memory, story[40:100], tail])
    assert find_kept_run(prompt, seq, 32) == KeptRun(21, 40, 60)
    assert find_kept_run(prompt, seq, 61) is None  # shorter than asked
    assert find_kept_run(seq[:100], seq, 32) is None  # a prefix: the prefix cache's case
    # Nothing kept before the cut, and the run ends where one token differs.
    edited = np.concatenate([story[10:50], [250], story[51:]])
    assert find_kept_run(edited, story, 32) == KeptRun(0, 10, 40)


# ---- the engine -----------------------------------------------------------------------------------------

BS = 16
MEMORY = list(range(3, 23))  # 20 tokens: the kept prefix ends inside block 1
STORY = [int(t) for t in np.random.default_rng(7).integers(23, 250, 150)]
CUT = 40  # story tokens trimmed from the front in turn 2 (not whole blocks: every block is copied)
CUT_BLOCKS = 32  # whole blocks: the blocks wholly after the cut are taken over and rotated in place
CUTS = [CUT, CUT_BLOCKS]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("shift"), family="llama", head_dim=32)


def _engine(folder, **kw) -> Engine:
    cfg = dict(model=str(folder), dtype="float32", max_model_len=256, block_size=BS, context_shift="on")
    return Engine(EngineConfig(**(cfg | kw)))


def _params(n: int = 8, shift: bool | None = None) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, context_shift=shift)


def _turns(engine: Engine, cut: int = CUT) -> tuple[list[int], list[int]]:
    """Turn 1 (memory + story, 8 tokens generated) run to its end; returns (its whole sequence, turn 2's
    prompt: memory + the story without its first `cut` tokens + turn 1's output + 3 new tokens)."""
    out = run_all(engine, [MEMORY + STORY], params=_params())[0]
    seq = MEMORY + STORY + out
    return seq, MEMORY + STORY[cut:] + out + [5, 6, 7]


def _slots_kv(engine: Engine, slots: list[int]) -> torch.Tensor:
    s = engine.storage
    out = torch.empty((s.slab_shape[0], 2, len(slots), *s.slab_shape[3:]), dtype=s.dtype)
    s.read_slots(torch.tensor(slots, dtype=torch.int64), out)
    return out


def _cached_kv(engine: Engine, seq: list[int], num_blocks: int) -> torch.Tensor:
    """K/V of seq's first full blocks, found in the prefix cache by their (plain) chain."""
    kv = engine.kv
    hashes = kv.block_hashes("probe", seq[: num_blocks * BS])
    kv.free("probe")
    blocks = [engine.pool.lookup(h) for h in hashes]
    assert all(b is not None for b in blocks)
    return _slots_kv(engine, [b.block_id * BS + i for b in blocks for i in range(BS)])


def _reference(
    engine: Engine, seq: list[int], end: int, a: int, r: int, src_kv: torch.Tensor | None = None
) -> torch.Tensor:
    """The shift's reference for positions [0, end): the original pass's K/V (seq's cached blocks, or
    `src_kv` read from them before an in-place shift rotated them) at q (q < a) or q + r, K decoded,
    rotated by -r with the model's rotary and encoded again."""
    if src_kv is None:
        src_kv = _cached_kv(engine, seq, (end + r) // BS + 1)
    src = torch.tensor([q if q < a else q + r for q in range(end)])
    ref = src_kv.index_select(2, src).clone()
    moved = torch.arange(end) >= a
    rot, fmt = engine.model.rotary, engine.kv_format
    for layer in range(ref.shape[0]):
        rows = ref[layer, 0, moved]  # [n, kv_heads, width]
        k = fmt.decode(rows.reshape(-1, fmt.entry_width)).float().view(len(rows), -1, fmt.head_dim)
        k = rot.shift(k, torch.full((len(k),), -r))
        ref[layer, 0, moved] = fmt.encode(k).view_as(rows)
    return ref


def _decoded(engine: Engine, kv: torch.Tensor) -> torch.Tensor:
    fmt = engine.kv_format
    return fmt.decode(kv.reshape(-1, fmt.entry_width)).float().view(*kv.shape[:-1], fmt.head_dim)


def _forward_over(engine: Engine, cache: torch.Tensor, prompt: list[int]) -> torch.Tensor:
    """Last-token logits of the prompt's tokens past len(cache) computed over exactly `cache`."""
    n, total = cache.shape[2], len(prompt)
    model, cfg, fmt = engine.model, engine.model_config, engine.kv_format
    with scratch_prefill(model, cfg, engine.device, 256, total - n, fmt, spans=[(total - n, total)]) as meta:
        for i, attn in enumerate(model.attention_layers()):
            attn.kv_slabs[0][:, :n] = cache[i]
        hidden = model(torch.tensor(prompt[n:]), torch.arange(n, total), meta)
        return model.compute_logits(hidden[-1:])[0].float()


_CHECKPOINTS: dict[str, object] = {}


def _checkpoint(tmp_path_factory, family: str):
    if family not in _CHECKPOINTS:
        extra = {} if family == "glm" else {"head_dim": 32}
        _CHECKPOINTS[family] = make_random_checkpoint(tmp_path_factory.mktemp(family), family=family, **extra)
    return _CHECKPOINTS[family]


@pytest.mark.parametrize(
    ("family", "kv_dtype"), [("llama", "auto"), ("glm", "auto"), ("qwen2", "auto"), ("llama", "int8")]
)
def test_a_shifted_cache_is_the_reference_and_so_are_its_logits(tmp_path_factory, family, kv_dtype):
    folder = _checkpoint(tmp_path_factory, family)
    eng = _engine(folder, kv_cache_dtype=kv_dtype)
    seq, prompt = _turns(eng)
    rid = eng.add_request(prompt, _params(4))
    with LogitsTap(eng) as tap:
        eng.step()
        first_logits = tap.last[rid]
    req = eng.requests[rid]
    # Memory's first block is a prefix hit; [16, 20) moves by 0, the kept run by -CUT; the remembered
    # sequence has K/V in its full blocks: (20 + 150 + 8 - 1) // 16 * 16 = 176 tokens, so 176 - 60 kept.
    a, start, end = len(MEMORY), BS, 176 - CUT
    assert (req.reuse.cached, req.reuse.shifted) == (start, end - start)
    assert req.reuse.cached + req.reuse.shifted + req.reuse.prefilled == len(prompt)
    ref = _reference(eng, seq, end, a, CUT)
    got = _slots_kv(eng, eng.kv.slots(rid, end).tolist())
    assert torch.equal(got[:, :, :a], ref[:, :, :a])  # hits and the delta-0 rows: the same bytes
    assert torch.equal(got[:, 1], ref[:, 1])  # V is copied as is
    # K within float32 rounding (int8: within one step of each vector's scale).
    tol = 1e-6 if kv_dtype == "auto" else _decoded(eng, ref[:, 0]).abs().amax(-1, keepdim=True) / 127 + 1e-6
    assert ((_decoded(eng, got[:, 0]) - _decoded(eng, ref[:, 0])).abs() <= tol).all()
    expected = _forward_over(eng, ref, prompt)
    assert torch.allclose(first_logits, expected, atol=1e-4, rtol=0), (first_logits - expected).abs().max()
    # ... and they are not what a full recompute gives (the shift is a real approximation here).
    fresh = _engine(folder, context_shift="off", kv_cache_dtype=kv_dtype)
    with LogitsTap(fresh) as tap:
        r2 = fresh.add_request(prompt, _params(1))
        fresh.step()
        assert not torch.allclose(tap.last[r2], expected, atol=1e-3)
    eng.check_integrity()


def test_a_shift_leaves_every_other_block_untouched(tiny):
    eng = _engine(tiny)
    seq, prompt = _turns(eng)
    # Another request shares memory's first block and runs while the shift happens.
    other = eng.add_request(MEMORY + [200] * 30, _params(30, shift=False))
    eng.step()
    before = {b: _slots_kv(eng, list(range(b * BS, b * BS + BS))) for b in range(eng.pool.num_blocks)}
    cached_before = {b.block_id for b in eng.pool.blocks if b.block_hash is not None and b.ref_cnt == 0}
    rid = eng.add_request(prompt, _params(4))
    eng.step()
    assert eng.requests[rid].reuse.shifted > 0
    own = set(eng.kv.block_ids(rid)[1:])  # its new blocks (block 0 is memory's, shared)
    growing = eng.kv.block_ids(other)[-1]  # the other request's tail block takes its decoded token
    checked = 0
    for b, kv in before.items():
        if b in own or b == growing:
            continue
        assert torch.equal(_slots_kv(eng, list(range(b * BS, b * BS + BS))), kv), f"block {b} changed"
        checked += b in cached_before
    assert checked >= 8  # the sources: the previous turn's cached blocks, read and left as they were
    shared = eng.kv.block_ids(other)[0]
    assert shared == eng.kv.block_ids(rid)[0] and eng.pool.blocks[shared].ref_cnt == 2
    eng.check_integrity()


# ---- in place: the cut is a whole number of blocks --------------------------------------------------------


def _cached_blocks(engine: Engine, seq: list[int], num_blocks: int) -> list[int]:
    """Ids of seq's first full blocks in the prefix cache, found by their (plain) chain."""
    hashes = engine.kv.block_hashes("probe", seq[: num_blocks * BS])
    engine.kv.free("probe")
    return [engine.pool.lookup(h).block_id for h in hashes]


@pytest.mark.parametrize(
    ("family", "kv_dtype", "dtype"),
    [("llama", "auto", "float32"), ("glm", "auto", "float32"), ("llama", "int8", "float32"),
     ("llama", "auto", "bfloat16"), ("glm", "auto", "bfloat16")],
)  # fmt: skip
def test_an_in_place_shift_is_the_reference_and_so_are_its_logits(tmp_path_factory, family, kv_dtype, dtype):
    """bfloat16 K moves through `rotate_keys`' GEMM path: within one bfloat16 step of the float32 rotation
    rounded once, and equal to it almost everywhere."""
    folder = _checkpoint(tmp_path_factory, family)
    eng = _engine(folder, kv_cache_dtype=kv_dtype, dtype=dtype)
    seq, prompt = _turns(eng, CUT_BLOCKS)
    r, a, start, end = CUT_BLOCKS, len(MEMORY), BS, 176 - CUT_BLOCKS
    src_ids = _cached_blocks(eng, seq, 11)
    src_kv = _cached_kv(eng, seq, 11)  # read before the shift: in place, it rotates these very blocks
    old_hashes = eng.kv.block_hashes("probe", seq[: 11 * BS])
    eng.kv.free("probe")
    rid = eng.add_request(prompt, _params(4))
    with LogitsTap(eng) as tap:
        eng.step()
        first_logits = tap.last[rid]
    eng.check_integrity()
    req = eng.requests[rid]
    assert (req.reuse.cached, req.reuse.shifted) == (start, end - start)
    # Block 1 holds the cut (rows [16, 20) kept, [20, 32) moved): copied into a new block. Blocks 2..8 are
    # seq's blocks 4..10, taken over where they lie (2 = CUT_BLOCKS / BS blocks further on).
    table = eng.kv.block_ids(rid)
    assert table[2:9] == src_ids[4:11] and table[1] not in src_ids
    ref = _reference(eng, seq, end, a, r, src_kv)
    got = _slots_kv(eng, eng.kv.slots(rid, end).tolist())
    assert torch.equal(got[:, :, :a], ref[:, :, :a])
    assert torch.equal(got[:, 1], ref[:, 1])  # V untouched in place, copied as is elsewhere
    k_ref = _decoded(eng, ref[:, 0])
    if dtype == "bfloat16":
        # One step of bfloat16's 8-bit significand, plus float32 rounding of the vector's largest products
        # (a sum of two that nearly cancel is exact only to those).
        tol = k_ref.abs() / 128 + k_ref.abs().amax(-1, keepdim=True) * 1e-6
        assert (got[:, 0] != ref[:, 0]).float().mean() < 0.01
    else:
        tol = 1e-6 if kv_dtype == "auto" else k_ref.abs().amax(-1, keepdim=True) / 127 + 1e-6
    assert ((_decoded(eng, got[:, 0]) - k_ref).abs() <= tol).all()
    expected = _forward_over(eng, ref, prompt)
    atol, rtol = (1e-4, 0) if dtype == "float32" else (2e-2, 1 / 64)  # bfloat16 logits: two steps
    assert torch.allclose(first_logits, expected, atol=atol, rtol=rtol), (first_logits - expected).abs().max()
    # The taken-over blocks no longer answer to seq's chain (they hold other positions' K now) but to the
    # request's salted one; nothing else was published under the old names.
    assert all(eng.pool.lookup(h) is None for h in old_hashes[4:11])
    salted = eng.kv.block_hashes(rid, prompt)
    assert [eng.pool.blocks[b].block_hash for b in table[2:9]] == salted[2:9]
    assert len(_drain(eng)) == 1  # (integrity checked after every step)


def test_an_in_place_shift_never_mutates_blocks_another_request_holds(tiny):
    eng = _engine(tiny)
    seq, prompt = _turns(eng, CUT_BLOCKS)
    src_ids = _cached_blocks(eng, seq, 11)
    src_kv = _cached_kv(eng, seq, 11)
    # Another live request's prompt starts with seq's first 96 tokens: it holds seq's blocks 0..5.
    other_prompt = seq[:96] + [200] * 10
    other_alone = run_all(_engine(tiny, context_shift="off"), [other_prompt], params=_params(30, shift=False))
    other = eng.add_request(other_prompt, _params(30, shift=False))
    eng.step()
    held = eng.kv.block_ids(other)[:6]
    assert held == src_ids[:6]
    before = {b: _slots_kv(eng, list(range(b * BS, (b + 1) * BS))) for b in held}
    rid = eng.add_request(prompt, _params(8))
    eng.step()
    eng.check_integrity()
    table = eng.kv.block_ids(rid)
    # Blocks 2 and 3 take seq's blocks 4 and 5, which the other request holds: copied. 4..8 in place.
    assert not set(table[1:4]) & set(src_ids)
    assert table[4:9] == src_ids[6:11]
    for b, kv in before.items():
        assert torch.equal(_slots_kv(eng, list(range(b * BS, (b + 1) * BS))), kv), f"shared block {b} changed"
    end = 176 - CUT_BLOCKS
    ref = _reference(eng, seq, end, len(MEMORY), CUT_BLOCKS, src_kv)
    got = _slots_kv(eng, eng.kv.slots(rid, end).tolist())
    assert torch.equal(got[:, 1], ref[:, 1]) and (got[:, 0].float() - ref[:, 0].float()).abs().max() <= 1e-6
    done = {o.request_id: o.outputs[0].token_ids for o in _drain(eng)}
    assert done[other] == other_alone[0]  # its K/V were never touched
    assert done[rid] == _greedy_turn2(tiny, CUT_BLOCKS)[0][:8]  # the same shift as with nothing shared


def test_two_requests_shifting_from_one_sequence_in_one_step(tiny):
    """The first takes the source blocks over in place; the second, admitted in the same step, no longer
    finds them (their hashes went with them) and prefills: each gives its output alone (the first its
    shifted one, the second its plain one), and the pool stays whole after every step."""
    eng = _engine(tiny)
    _, prompt = _turns(eng, CUT_BLOCKS)
    twin = prompt[:-3] + [8, 9]
    first, second = eng.add_request(prompt, _params(8)), eng.add_request(twin, _params(8))
    eng.step()
    assert eng.requests[first].reuse.shifted > 0 and eng.requests[second].reuse.shifted == 0
    assert eng.shifter.num_shifts == 1
    done = {o.request_id: o.outputs[0].token_ids for o in _drain(eng)}
    assert done[first] == _greedy_turn2(tiny, CUT_BLOCKS)[0][:8]
    assert done[second] == run_all(_engine(tiny, context_shift="off"), [twin], params=_params(8))[0]


def _greedy_turn2(folder, cut: int = CUT, **kw) -> tuple[list[int], Engine]:
    eng = _engine(folder, **kw)
    _, prompt = _turns(eng, cut)
    return run_all(eng, [prompt], params=_params(16))[0], eng


@pytest.mark.parametrize("cut", CUTS)
def test_shifted_and_unshifted_requests_batch_together(tiny, cut):
    alone, _ = _greedy_turn2(tiny, cut)
    eng = _engine(tiny)
    _, prompt = _turns(eng, cut)
    unshifted_alone = run_all(_engine(tiny, context_shift="off"), [prompt], params=_params(16))[0]
    outs = run_all(
        eng,
        [prompt, prompt, list(range(30, 90))],
        params=[_params(16), _params(16, shift=False), _params(16, shift=False)],
    )
    assert outs[0] == alone
    assert outs[1] == unshifted_alone
    assert alone != unshifted_alone  # the shift changed the output, so the comparisons tell them apart


def test_shifted_blocks_are_only_hit_by_requests_that_accept_a_shift(tiny):
    eng = _engine(tiny)
    _, prompt = _turns(eng)
    out2 = run_all(eng, [prompt], params=_params(8))[0]
    # The next turn (no further trim) hits every full block turn 2 computed, through the salted chain.
    turn3 = prompt + out2 + [9, 9]
    rid = eng.add_request(turn3, _params(2))
    eng.step()
    req = eng.requests[rid]
    assert req.reuse.cached == (len(prompt) + len(out2) - 1) // BS * BS
    assert req.reuse.shifted == 0
    eng.check_integrity()


def test_plain_requests_never_see_shifted_kv(tiny):
    eng = _engine(tiny)
    _, prompt = _turns(eng)
    run_all(eng, [prompt], params=_params(8))
    got = []
    rid = eng.add_request(prompt, _params(8, shift=False))
    while eng.has_unfinished_requests():
        for o in eng.step():
            if o.finished:
                got = o.outputs[0].token_ids
                assert o.reuse.cached == BS and o.reuse.shifted == 0  # memory's block alone
    ref = run_all(_engine(tiny, context_shift="off"), [prompt], params=_params(8))[0]
    assert got == ref, rid


@pytest.mark.parametrize("cut", CUTS)
@pytest.mark.parametrize("mode", ["swap", "recompute"])
def test_preempting_a_shifted_request_keeps_its_output(tiny, mode, cut):
    alone, _ = _greedy_turn2(tiny, cut)
    eng = _tight(tiny, swap_space=64 << 20, preemption_mode=mode)
    _, prompt = _turns(eng, cut)
    # A long, higher-priority request arrives while the shifted one runs and takes its blocks.
    rid = eng.add_request(prompt, _params(16))
    eng.step()
    assert eng.requests[rid].reuse.shifted > 0
    eng.add_request(list(range(30, 200)), _params(40, shift=False), priority=-1)
    done = {o.request_id: o.outputs[0].token_ids for o in _drain(eng)}
    assert eng.scheduler.num_preemptions > 0
    assert eng.swapper.num_swap_outs > 0  # a shifted request is swapped whatever the mode
    assert done[rid] == alone


def test_a_shifted_request_without_swap_space_is_recomputed_cleanly(tiny):
    """Without host space a preempted shifted request is recomputed: its output may differ from the shifted
    run (its K/V is the recomputation's from then on), but it finishes and the pool stays whole."""
    eng = _tight(tiny, swap_space=0)
    _, prompt = _turns(eng)
    rid = eng.add_request(prompt, _params(16))
    eng.step()
    assert eng.requests[rid].reuse.shifted > 0
    eng.add_request(list(range(30, 200)), _params(40, shift=False), priority=-1)
    done = {o.request_id: o for o in _drain(eng)}
    assert eng.scheduler.num_preemptions > 0 and eng.swapper.num_swap_outs == 0
    assert len(done[rid].outputs[0].token_ids) == 16 and done[rid].reuse.shifted > 0


@pytest.mark.parametrize("cut", CUTS)
def test_async_scheduling_gives_the_same_shifted_output(tiny, cut):
    alone, _ = _greedy_turn2(tiny, cut)
    got, eng = _greedy_turn2(tiny, cut, async_scheduling="on")
    assert eng.async_scheduling and eng.shifter.num_shifts == 1
    assert got == alone


def _drain(eng: Engine) -> list:
    outs = []
    while eng.has_unfinished_requests():
        outs += [o for o in eng.step() if o.finished]
        eng.check_integrity()
    return outs


def _tight(folder, **kw) -> Engine:
    """`_engine` with room for 20 KV blocks beyond weights and workspace, in slabs of 2: preemption."""
    return tight_engine(folder, 20, max_model_len=256, block_size=BS, context_shift="on", **kw)


@pytest.mark.parametrize("family", ["xglm", "mistral-window"])
def test_models_that_cannot_shift_prefill_and_count_it(tmp_path, family):
    if family == "xglm":
        folder = make_random_checkpoint(tmp_path, family="xglm")
    else:
        folder = make_random_checkpoint(tmp_path, family="mistral", sliding_window=64)
    outs = {}
    for setting in ("on", "off"):
        eng = _engine(folder, context_shift=setting)
        _, prompt = _turns(eng)
        outs[setting] = run_all(eng, [prompt], params=_params(8))[0]
        if setting == "on":
            assert eng.shifter.num_fallbacks == 2  # both turns wanted a shift
            assert eng.shifter.num_shifts == 0
        else:
            assert eng.shifter.num_fallbacks == 0
    assert outs["on"] == outs["off"]


def test_the_fallback_count_reaches_the_published_counters(tmp_path):
    """What /metrics reads: the AsyncEngine's snapshot counters carry the engine's fallback count."""
    import asyncio

    from fitllm.engine.async_engine import AsyncEngine

    folder = make_random_checkpoint(tmp_path, family="xglm")
    config = EngineConfig(model=str(folder), dtype="float32", max_model_len=128, block_size=BS)
    async_engine = AsyncEngine(config).start()
    try:
        async_engine.wait_ready(60)
        assert async_engine.served_model.context_shift_unsupported is not None

        async def run(shift):
            async for _ in async_engine.generate(list(range(3, 40)), _params(2, shift)):
                pass

        for shift in (True, False, None):  # --context-shift auto: the engine's own default is off
            asyncio.run(run(shift))
        assert async_engine.counters.context_shift_unsupported == 1
    finally:
        async_engine.shutdown()


def test_min_shift_blocks_is_enforced(tiny):
    eng = _engine(tiny)
    run_all(eng, [MEMORY + STORY], params=_params())
    # Keep only a run shorter than the minimum after the cut: nothing is shifted.
    short = MEMORY + STORY[CUT : CUT + MIN_SHIFT_BLOCKS * BS - 1] + [5, 6, 7]
    rid = eng.add_request(short, _params(1))
    eng.step()
    assert eng.shifter.num_shifts == 0, rid


# ---- randomised workloads with trimmed prompts ------------------------------------------------------------

_PLAIN: dict[tuple[int, ...], list[int]] = {}
HYP_BS = 8


def _plain_reference(folder, prompt: list[int], n: int) -> list[int]:
    """Greedy output of `prompt` alone, shift off, unconstrained."""
    key = tuple(prompt)
    if key not in _PLAIN:
        eng = _engine(folder, max_model_len=128, block_size=HYP_BS, profile_workspace=False)
        _PLAIN[key] = run_all(eng, [prompt], params=_params(16, shift=False))[0]
    return _PLAIN[key][:n]


_story = st.lists(st.integers(3, 249), min_size=70, max_size=90, unique=True)  # the cut is unambiguous
_requests = st.lists(
    st.tuples(
        st.integers(0, 24),  # memory kept (tokens)
        st.one_of(st.integers(1, 30), st.sampled_from([8, 16, 24])),  # story tokens cut (whole blocks too)
        st.lists(st.integers(3, 249), max_size=6),  # new text
        st.integers(4, 16),  # max_tokens
        st.sampled_from([True, False, None]),  # context_shift
        st.integers(0, 1),  # priority
        st.integers(0, 4),  # arrival step
    ),
    min_size=2,
    max_size=6,
)


@settings(max_examples=15, deadline=None)
@given(
    story=_story,
    requests=_requests,
    kv_blocks=st.integers(14, 24),
    mode=st.sampled_from(["swap", "recompute"]),
    swap_blocks=st.sampled_from([0, 64]),
)
def test_random_workloads_with_trimmed_prompts(tiny, story, requests, kv_blocks, mode, swap_blocks):
    """A story run first, then trimmed versions of it (memory kept, a span cut, text added) under a tight
    budget, shifting or not, with preemption: integrity and the budget hold after every step, every request
    finishes with its tokens, each one's reuse adds up to its prompt, and the requests that refuse a shift
    produce exactly their plain output (no shifted block ever reaches them)."""
    probe = _engine(tiny, max_model_len=128, block_size=HYP_BS, profile_workspace=False)
    fixed = probe.ledger.current("weights") + probe.ledger.current("workspace")
    per_block = probe.storage.block_bytes
    eng = _engine(
        tiny,
        max_model_len=128,
        block_size=HYP_BS,
        memory_budget=fixed + kv_blocks * per_block,
        kv_slab_size=2 * per_block,
        profile_workspace=False,
        swap_space=swap_blocks * per_block,
        preemption_mode=mode,
    )
    run_all(eng, [story], params=_params(8))
    prompts = [story[:keep] + story[keep + cut :] + new for keep, cut, new, *_ in requests]
    pending = sorted(range(len(requests)), key=lambda i: requests[i][6])
    ids, done, step = {}, {}, 0
    while pending or eng.has_unfinished_requests():
        while pending and requests[pending[0]][6] <= step:
            i = pending.pop(0)
            _, _, _, n, shift, prio, _ = requests[i]
            ids[i] = eng.add_request(prompts[i], _params(n, shift), priority=prio)
        for out in eng.step():
            if out.finished:
                done[out.request_id] = out
        eng.check_integrity()
        assert eng.ledger.total <= eng.ledger.budget
        step += 1
        assert step < 2000, "requests never finished"
    for i, (_, _, _, n, shift, _, _) in enumerate(requests):
        out = done[ids[i]]
        assert len(out.outputs[0].token_ids) == n
        r = out.reuse
        assert r.cached + r.shifted + r.from_host + r.prefilled == len(prompts[i])
        if shift is False:
            assert r.shifted == 0
            assert out.outputs[0].token_ids == _plain_reference(tiny, prompts[i], n)
    # The first request admitted finds the whole story cached: if it wants a shift and keeps a long enough
    # run, it shifts (so the workloads really exercise shifts).
    first = min(range(len(requests)), key=lambda i: (requests[i][6], requests[i][5], i))
    keep, cut, new, _, shift, _, _ = requests[first]
    run = min(len(story) - keep - cut, len(prompts[first]) - 1 - keep)
    if shift is not False and run >= MIN_SHIFT_BLOCKS * HYP_BS:
        assert done[ids[first]].reuse.shifted >= run


def test_eval_scores_turns_after_shifts_against_recomputation(tiny):
    """`fitllm eval context-shift`'s core on the tiny model: every turn after the first trim is scored both
    ways over the same tokens; the figures are close but not equal (the shift is an approximation)."""
    from fitllm.eval.context_shift import evaluate_shift

    eng = _engine(tiny, max_model_len=128, profile_workspace=False)
    ids = [int(t) for t in np.random.default_rng(3).integers(3, 250, 400)]
    res = evaluate_shift(eng.model, eng.model_config, eng.device, eng.kv_format, ids, 128, 16, 16, 32, 5)
    assert len(res.turns) == 5 and res.num_scored == 80
    assert [t.trims for t in res.turns] == [1, 1, 2, 2, 3]
    assert res.perplexity_shifted != res.perplexity_recomputed
    assert 0.5 < res.perplexity_shifted / res.perplexity_recomputed < 2
    with pytest.raises(ValueError, match="--trim >= --turn"):
        evaluate_shift(eng.model, eng.model_config, eng.device, eng.kv_format, ids, 128, 16, 32, 16, 5)


def test_cli_eval_context_shift(tiny, tmp_path, capsys):
    """`fitllm eval context-shift` end to end on the tiny model (its JSON and table), and its refusals."""
    import json

    from fitllm.cli import main as cli_main

    text = tmp_path / "text.txt"
    text.write_text(" ".join(f"t{i}" for i in np.random.default_rng(5).integers(3, 250, 300).tolist()))
    out = tmp_path / "shift.json"
    argv = ["eval", "context-shift", "--model", str(tiny), "--text", str(text), "--dtype", "float32"]
    argv += ["--context", "128", "--memory", "16", "--turn", "16", "--trim", "32", "--turns", "3"]
    assert cli_main([*argv, "--json", str(out)]) == 0
    r = json.loads(out.read_text())
    assert len(r["turns"]) == 3 and r["perplexity_shifted"] != r["perplexity_recomputed"]
    assert "perplexity over 48 tokens: shifted" in capsys.readouterr().out
    assert cli_main([*argv[:-2], "--trim", "8"]) == 2  # a trim shorter than a turn
    assert "--trim >= --turn" in capsys.readouterr().err
