"""The whole engine on the Triton attention backend against the torch reference backend, greedy, on a tiny
random checkpoint: chunked prefill, prefix hits, K/V across many slabs, int8 KV, a sliding window. Without a
GPU the kernels run in Triton's interpreter (conftest.py sets TRITON_INTERPRET=1).

Runs are compared by `assert_greedy_parity`: logits within LOGIT_REL of the largest |logit| and identical
tokens up to the reference's first near-tie, so that a GPU's different rounding cannot fail a correct kernel
(the interpreter computes in float32 and agrees to ~1e-6)."""

from __future__ import annotations

import contextlib
import json
from unittest import mock

import pytest
import torch
from conftest import assert_greedy_parity, make_random_checkpoint, run_all

from fitllm.config import EngineConfig, ModelConfig
from fitllm.engine.engine import Engine
from fitllm.engine.request import SamplingParams
from fitllm.memory.kv.format import kv_bytes_per_token

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

E2E_PARAMS = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
LOGIT_REL = 1e-3  # float32 model; both backends read the same (quantized) cache


def _engine(folder, backend: str, **kw) -> Engine:
    cfg = dict(
        model=str(folder),
        dtype="float32",
        max_model_len=128,
        max_num_batched_tokens=16,  # prompts longer than this are prefilled in chunks
        kv_idle_release_s=0.0,
        attention_backend=backend,
    )
    cfg.update(kw)
    return Engine(EngineConfig(**cfg))


def _generate(eng: Engine, prompts: list[list[int]], stats: dict) -> list[list[int]]:
    def track(e: Engine) -> None:
        stats["peak_slabs"] = max(stats.get("peak_slabs", 0), e.pool.num_slabs)

    logits = stats.setdefault("logits", [])
    return [list(t) for t in run_all(eng, prompts, on_step=track, params=E2E_PARAMS, logits=logits)]


def _scenario(eng: Engine, prompts: list[list[int]], shared: list[list[int]]) -> tuple[list, dict]:
    """One batch of `prompts`, then the `shared`-prefix prompts one after the other (prefix-cache hits);
    stats["logits"] holds each request's logits per sampled token."""
    stats: dict = {}
    tokens = _generate(eng, prompts, stats)
    hits = eng.kv.prefix_hits
    for p in shared:
        tokens += _generate(eng, [p], stats)
    stats["prefix_hits"] = eng.kv.prefix_hits - hits
    return tokens, stats


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("llama"), family="llama")


def _prompts(seed: int, lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 250, (n,), generator=g).tolist() for n in lengths]


def _assert_varied(tokens: list[list[int]]) -> None:
    for t in tokens:
        assert len(t) == E2E_PARAMS.max_tokens and len(set(t)) > 3, f"reference output is degenerate: {t}"


def _slab_bytes(folder, kv_cache_dtype: str, blocks: int, block_size: int = 16) -> int:
    """Bytes of a KV slab of `blocks` blocks of the float32 model in `folder`."""
    cfg = ModelConfig.from_hf_config(json.loads((folder / "config.json").read_text()))
    return blocks * block_size * kv_bytes_per_token(cfg, torch.float32, kv_cache_dtype)


@pytest.mark.parametrize(
    ("kv_cache_dtype", "storage"),
    [("auto", "slabs"), ("int8", "reserved")],
)
def test_engine_triton_matches_torch_greedy(llama, kv_cache_dtype, storage):
    """Greedy tokens are identical under both backends: a batch of prompts crossing block boundaries, one
    longer than the 16-token step (chunked prefill), then two prompts sharing a 40-token prefix (the second
    a prefix-cache hit), over an elastic pool of 2-block slabs (separate tensors, or one reserved region)."""
    prompts = _prompts(1, [5, 17, 33, 50])
    prefix = _prompts(2, [40])[0]
    shared = [prefix + [7, 8, 9], prefix + [10, 11, 12, 13, 14]]
    slab = _slab_bytes(llama, kv_cache_dtype, 2)
    ref_eng = _engine(llama, "torch", kv_cache_dtype=kv_cache_dtype, kv_slab_size=slab)
    ref, ref_stats = _scenario(ref_eng, prompts, shared)
    _assert_varied(ref)
    patch = mock.patch("fitllm.memory.kv.storage.reserve_region", lambda *a: None)
    with patch if storage == "slabs" else contextlib.nullcontext():
        eng = _engine(llama, "triton", kv_cache_dtype=kv_cache_dtype, kv_slab_size=slab)
    assert eng.runner.attention_backend == "triton"
    if DEVICE.type == "cpu":
        assert eng.storage.mode == storage
    got, stats = _scenario(eng, prompts, shared)
    assert stats["peak_slabs"] >= 3, "the pool never spread over several slabs"
    assert stats["prefix_hits"] > 0 and stats["prefix_hits"] == ref_stats["prefix_hits"]
    compared = assert_greedy_parity(got, ref, stats["logits"], ref_stats["logits"], LOGIT_REL)
    assert compared >= 0.5 * sum(map(len, ref)), "near-ties left too little to compare"


def test_engine_triton_matches_torch_with_a_sliding_window(tmp_path):
    """A Mistral model with an 8-token window over prompts several windows long, block size 8."""
    folder = make_random_checkpoint(tmp_path, family="mistral", sliding_window=8, seed=3)
    prompts = _prompts(3, [6, 21, 37])
    ref, ref_stats = _scenario(_engine(folder, "torch", block_size=8), prompts, [])
    _assert_varied(ref)
    eng = _engine(folder, "triton", block_size=8)
    assert eng.model_config.sliding_window == 8
    got, stats = _scenario(eng, prompts, [])
    compared = assert_greedy_parity(got, ref, stats["logits"], ref_stats["logits"], LOGIT_REL)
    assert compared >= 0.5 * sum(map(len, ref)), "near-ties left too little to compare"
    # The window matters: the same model without it continues differently.
    nowin = make_random_checkpoint(tmp_path, family="mistral", sliding_window=None, seed=3, name="nowin")
    full, _ = _scenario(_engine(nowin, "torch", block_size=8), prompts, [])
    assert full != ref
