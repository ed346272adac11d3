"""Tensor parallelism on the CPU over gloo: rank 0 in this process, workers spawned by it.

The reference is the same engine at world size 1 on the same float32 checkpoint, run through the same
batch: every sampled row's logits within 1e-5 of the largest |logit| (the ranks sum partial products in
another order, so not bit for bit) and greedy tokens identical. Engines with workers are few and tiny:
each start spawns processes on a 2-core machine.
"""

from __future__ import annotations

import os
import signal
import time

import httpx
import pytest
import torch
from conftest import make_random_checkpoint, run_all
from live_server import serve

from fitllm import SamplingParams
from fitllm.config import EngineConfig
from fitllm.distributed import get_tp_world_size, planning_as
from fitllm.engine.async_engine import AsyncEngine
from fitllm.engine.engine import Engine
from fitllm.loader import open_model
from fitllm.model.linear import QKVParallelLinear, RowParallelLinear
from fitllm.model.vocab import VocabEmbedding
from fitllm.plan.memory_plan import MemoryPlan
from fitllm.quant.int4 import Int4Method
from fitllm.quant.int8 import Int8Method, quantize_int8

REL = 1e-5
LENS = [5, 40, 17, 33]  # crossing 16-token blocks; 40 and 33 are prefilled in chunks of 32
VOCAB = 253  # splits into padded shards: 2 ranks hold 128 rows each, 4 ranks 64 (the last 61 real)


def tokens(n: int, seed: int) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(3, 250, (n,), generator=gen).tolist()


def pool_limits(cfg: dict, slabs: int, slab_blocks: int = 4) -> dict:
    """--kv-slab-size and --memory-budget for `slabs` slabs of `slab_blocks` blocks beside the engine's
    weights and planned workspace, for this rank's shard (so each world size holds the same blocks)."""
    config = EngineConfig(**cfg)
    plan = MemoryPlan.for_engine(config, open_model(config.model).config, torch.device("cpu"), budget=1 << 40)
    slab = slab_blocks * config.block_size * plan.kv_bytes_per_token
    fixed = plan.weights.total + plan.workspace_at(config.max_model_len)
    return {"kv_slab_size": slab, "memory_budget": fixed + slabs * slab}


def engine_pair(folder, tp: int, slabs: int | None = None, **kw) -> tuple[Engine, Engine]:
    """(world size 1, world size `tp`) engines alike in everything else, their KV pools the same blocks."""
    base = dict(
        model=str(folder),
        dtype="float32",
        max_model_len=128,
        max_num_batched_tokens=32,
        max_num_seqs=4,
        profile_workspace=False,
        kv_idle_release_s=0.0,
        tp_timeout_s=20.0,
    )
    base.update(kw)
    engines = []
    for size in (1, tp):
        cfg = dict(base, tensor_parallel_size=size)
        if slabs is not None:
            cfg.update(pool_limits(cfg, slabs))
        engines.append(Engine(EngineConfig(**cfg)))
    return engines[0], engines[1]


def compare(
    ref: Engine, tp: Engine, prompts: list[list[int]], max_tokens: int = 16, vary: bool = True
) -> int:
    """Both engines run `prompts` as one batch; returns the steps compared. `vary`: each reference output
    holds more than one token (a tiny random XGLM repeats one token whatever its init: there the logits of
    every step carry the comparison)."""
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    ref_logits: list = []
    tp_logits: list = []
    want = run_all(ref, prompts, params=params, logits=ref_logits)
    got = run_all(tp, prompts, params=params, logits=tp_logits)
    assert not vary or all(len(set(w)) > 1 for w in want), "the reference should vary"
    assert got == want
    steps = 0
    for rows_ref, rows_tp in zip(ref_logits, tp_logits, strict=True):
        assert len(rows_ref) == len(rows_tp) == max_tokens
        for a, b in zip(rows_ref, rows_tp, strict=True):
            assert (a - b).abs().max().item() <= REL * a.abs().max().item()
            steps += 1
    return steps


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("tp"), "llama", vocab_size=VOCAB)


@pytest.fixture(scope="module")
def llama_tied(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp-tied")
    return make_random_checkpoint(folder, "llama", vocab_size=VOCAB, tie_word_embeddings=True)


def vocab_rows(engine: Engine) -> list[int]:
    """Rows of rank 0's token table and (untied) LM head."""
    model = engine.model
    return [m.weight.shape[0] for m in (model.embed_tokens, model.lm_head) if m is not None]


def test_llama_two_ranks_batch_chunks_prefix_hits_preemption_and_slabs(llama):
    """Two ranks against one, through an elastic pool of 4-block slabs that grows, is given back when idle
    and is too small for the whole batch (preemption), with chunked prefills and prefix-cache hits: the
    workers follow rank 0's slab ops step by step, or their K/V would differ."""
    ref, tp = engine_pair(llama, 2, slabs=2)
    try:
        assert tp.kv_config.num_key_value_heads == 1 and ref.kv_config.num_key_value_heads == 2
        assert vocab_rows(ref) == [VOCAB, VOCAB] and vocab_rows(tp) == [128, 128]  # rank 1: 125 + padding
        assert tp.pool.capacity_blocks == ref.pool.capacity_blocks == 8
        prompts = [tokens(n, i) for i, n in enumerate(LENS)]
        compare(ref, tp, prompts)
        assert tp.scheduler.num_preemptions == ref.scheduler.num_preemptions > 0
        for engine in (ref, tp):
            engine.release_idle_memory()
        assert tp.pool.num_slabs == ref.pool.num_slabs
        # Again, each prompt extended: its first blocks come from the prefix cache.
        hits = tp.kv.prefix_hits
        compare(ref, tp, [p + tokens(9, 10 + i) for i, p in enumerate(prompts)])
        assert tp.kv.prefix_hits > hits and tp.kv.prefix_hits == ref.kv.prefix_hits
    finally:
        tp.close()
    assert tp.tp.exit_codes == [0], "the worker should end on rank 0's stop message"


def test_four_ranks_share_two_kv_heads(llama):
    """Four ranks, two KV heads: each head is replicated on the two ranks whose query heads read it. The
    vocabulary's 253 ids in shards of 64 rows: the last rank's lookups and logits carry 3 padding rows;
    prompt logprobs (a scoring prefill) gather every rank's logits too."""
    ref, tp = engine_pair(llama, 4)
    try:
        assert tp.kv_config.num_key_value_heads == 1
        assert vocab_rows(tp) == [64, 64]
        compare(ref, tp, [tokens(n, i) for i, n in enumerate(LENS[:2])])
        # Prompt logprobs: a scoring prefill whose logits every rank forms and rank 0 gathers.
        prompt = tokens(30, 7)
        (ids, want), (_, got) = (engine.score_prompt(prompt, top_n=3) for engine in (ref, tp))
        assert ids == prompt and len(got) == len(want) == 29
        for (lp_ref, top_ref), (lp_tp, top_tp) in zip(want, got, strict=True):
            assert abs(lp_ref - lp_tp) <= 1e-4 and [i for i, _ in top_ref] == [i for i, _ in top_tp]
    finally:
        tp.close()


def test_context_shift_moves_every_ranks_kv(llama):
    """Turn 2 of a story, its oldest text cut: the kept K/V is rotated into place on each rank (rank 0
    sends the slots), and the continuation matches world size 1's shifted one."""
    from test_context_shift import CUT, MEMORY, STORY

    ref, tp = engine_pair(llama, 2, max_model_len=256, context_shift="on")
    try:
        params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
        (out,) = run_all(ref, [MEMORY + STORY], params=params)
        assert run_all(tp, [MEMORY + STORY], params=params) == [out]
        compare(ref, tp, [MEMORY + STORY[CUT:] + out + [5, 6, 7]])
        assert tp.shifter.num_shifted_tokens == ref.shifter.num_shifted_tokens > 0
    finally:
        tp.close()


@pytest.mark.parametrize("family", ["glm", "xglm"])
def test_other_families_two_ranks(tmp_path, family):
    """GLM (untied head) and XGLM (tied, embeddings scaled after the vocab-parallel lookup)."""
    folder = make_random_checkpoint(tmp_path, family, vocab_size=VOCAB)
    ref, tp = engine_pair(folder, 2)
    try:
        assert vocab_rows(tp) == ([128] if family == "xglm" else [128, 128])
        compare(ref, tp, [tokens(n, i) for i, n in enumerate(LENS[:3])], vary=family != "xglm")
    finally:
        tp.close()


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_shards(llama, llama_tied, quantization):
    """int8 row-parallel shards keep their row's one scale, int4 groups lie inside a shard: the ranks'
    partial products add up to world size 1's quantized product. The LM head is int8 (--lm-head-dtype
    auto) and vocab-parallel, one scale per vocabulary row: tied to the embedding under int8 (lookups
    dequantize the shard's rows), untied under int4."""
    folder = llama_tied if quantization == "int8" else llama
    ref, tp = engine_pair(folder, 2, quantization=quantization, quant_group_size=32)
    try:
        head = tp.model.embed_tokens if quantization == "int8" else tp.model.lm_head
        assert head.weight.dtype == torch.int8 and head.weight.shape[0] == 128
        assert (tp.model.lm_head is None) == (quantization == "int8")
        compare(ref, tp, [tokens(n, i) for i, n in enumerate(LENS[:2])])
    finally:
        tp.close()


def test_ranks_shards_cover_the_checkpoint():
    """Built as each rank of 4 builds them (no processes): q heads split, 2 KV heads each held by the two
    ranks whose query heads read it, int8 row-parallel shards with the whole row's scale."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n * 2, 8, generator=gen) for n in (4, 2, 2))  # head_dim 2
    w = torch.randn(6, 8, generator=gen)
    full_codes, full_scale = quantize_int8(w)
    codes = []
    for rank in range(4):
        with planning_as(4, rank):
            qkv = QKVParallelLinear(8, 2, 4, 2, bias=False)
            row = RowParallelLinear(8, 6, quant=Int8Method())
        for shard, tensor in (("q", q), ("k", k), ("v", v)):
            qkv.weight_loader(qkv.weight, tensor, shard)
        row.weight_loader(row.weight, w)
        head = rank // 2  # ranks 0, 1 read KV head 0; ranks 2, 3 head 1
        assert torch.equal(
            qkv.weight,
            torch.cat([q[2 * rank : 2 * rank + 2], k[2 * head : 2 * head + 2], v[2 * head : 2 * head + 2]]),
        )
        assert torch.equal(row.weight_scale, full_scale.to(row.weight_scale.dtype))
        codes.append(row.weight)
    assert torch.equal(torch.cat(codes, dim=1), full_codes)


@pytest.mark.parametrize("method", [None, Int8Method(chunked=True)], ids=["float32", "int8"])
def test_vocab_shards_cover_the_table(method):
    """Built as each rank of 4 builds them (no processes), vLLM's layout: 253 ids in contiguous shards of
    64 rows (the last 61 real, 3 zero padding rows). Each rank's lookup holds the rows of its own ids and
    zeros elsewhere, so their sum (the all-reduce) is world size 1's lookup; its logits are world size 1's
    columns of its ids (int8: each vocabulary row keeps its own scale)."""
    gen = torch.Generator().manual_seed(0)
    table, hidden = torch.randn(VOCAB, 16, generator=gen), torch.randn(3, 16, generator=gen)
    ids = torch.tensor([0, 63, 64, 200, 252, 191, 192])
    whole = VocabEmbedding(VOCAB, 16, method)
    whole.weight_loader(whole.weight, table)
    lookups, logits = [], []
    for rank in range(4):
        with planning_as(4, rank):
            shard = VocabEmbedding(VOCAB, 16, method)
        shard.weight_loader(shard.weight, table)
        assert shard.weight.shape[0] == 64 and shard.shard.start == 64 * rank
        assert shard.shard.real == (61 if rank == 3 else 64)
        lookups.append(shard(ids))  # planning: no all-reduce
        logits.append(shard.quant.apply(shard, hidden)[:, : shard.shard.real])
        if rank == 3:
            assert not shard.quant.dequantize(shard)[61:].any()
    assert torch.equal(sum(lookups), whole(ids))
    assert all((part != 0).any(dim=1).sum() == ((ids // 64) == r).sum() for r, part in enumerate(lookups))
    torch.testing.assert_close(torch.cat(logits, dim=1), whole.project(hidden), rtol=1e-5, atol=1e-5)


def test_int4_group_straddling_shards_is_refused():
    with planning_as(2), pytest.raises(ValueError, match=r"--quant-group-size 64 would make int4 groups"):
        RowParallelLinear(64, 32, quant=Int4Method(64))
    with planning_as(2):
        assert get_tp_world_size() == 2
        assert RowParallelLinear(64, 32, quant=Int4Method(32)).in_features == 32


def test_plan_is_per_gpu(llama):
    """`fitllm plan --tensor-parallel-size 2`: one rank's weights (attention and MLP halved, the embedding
    and head one padded vocabulary shard each) and KV bytes per token halved."""
    config = open_model(str(llama)).config
    one, two = (
        MemoryPlan.for_engine(
            EngineConfig(model=str(llama), dtype="float32", tensor_parallel_size=n),
            config,
            torch.device("cpu"),
            budget=1 << 30,
        )
        for n in (1, 2)
    )
    assert two.kv_bytes_per_token * 2 == one.kv_bytes_per_token
    assert two.weights.mlp * 2 == one.weights.mlp
    table = config.hidden_size * 4
    assert one.weights.embedding == one.weights.lm_head == VOCAB * table
    assert two.weights.embedding == two.weights.lm_head == 128 * table
    assert two.weights.attention < one.weights.attention
    assert "embedding and LM head split by vocabulary rows" in two.report("tiny").table()


def test_heads_that_do_not_split_are_refused(llama):
    """By the engine before any worker starts, and by the plan, naming the sizes that do split."""
    message = r"--tensor-parallel-size 3 cannot split 4 attention heads .*sizes that can: 1, 2, 4"
    with pytest.raises(ValueError, match=message):
        Engine(EngineConfig(model=str(llama), dtype="float32", tensor_parallel_size=3))
    config = EngineConfig(model=str(llama), tensor_parallel_size=3)
    with pytest.raises(ValueError, match=message):
        MemoryPlan.for_engine(config, open_model(str(llama)).config, torch.device("cpu"), budget=1 << 30)


def test_start_up_failure_ends_the_workers(llama):
    """Rank 0 refusing its budget after the workers started: the error is rank 0's, and no worker is left
    waiting in a start-up collective."""
    import multiprocessing

    config = EngineConfig(model=str(llama), dtype="float32", memory_budget="200KiB", tensor_parallel_size=2)
    with pytest.raises(ValueError, match="--memory-budget"):
        Engine(config)
    assert not multiprocessing.active_children()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGSTOP], ids=["dies", "hangs"])
def test_lost_worker_makes_health_503_and_shutdown_ends_workers(llama, sig):
    """A worker killed is seen by the watchdog at once; one stopped (hung) by the idle heartbeat's barrier
    within --tp-timeout-s. Either way /health answers 503 naming the rank, requests are refused, and
    shutdown ends the worker."""
    timeout_s = 4.0
    config = EngineConfig(
        model=str(llama),
        dtype="float32",
        max_model_len=128,
        profile_workspace=False,
        tensor_parallel_size=2,
        tp_timeout_s=timeout_s,
    )
    engine = AsyncEngine(config)
    with serve(engine, "tiny") as s:
        assert httpx.get(f"{s.url}/health").status_code == 200
        body = {"model": "tiny", "prompt": "t5 t6 t7", "max_tokens": 4, "temperature": 0}
        assert httpx.post(f"{s.url}/v1/completions", json=body).status_code == 200
        (pid,) = engine.engine.tp.pids
        os.kill(pid, sig)
        start = time.monotonic()
        try:
            while httpx.get(f"{s.url}/health").status_code != 503:
                assert time.monotonic() - start < timeout_s + 3, "/health still answers 200"
                time.sleep(0.1)
            status = httpx.get(f"{s.url}/health").json()["status"]
            assert "worker" in status and (sig == signal.SIGSTOP or "rank 1" in status)
            assert httpx.post(f"{s.url}/v1/completions", json=body, timeout=30).status_code >= 500
        finally:
            if sig == signal.SIGSTOP:
                os.kill(pid, signal.SIGKILL)
    engine.shutdown()
    assert not engine.alive
    assert engine.engine.tp.exit_codes == [-signal.SIGKILL]


def test_torchrun_launches_every_rank_with_the_same_command(llama):
    """The several-host launch on one host: torchrun starts both ranks with one `fitllm generate` command;
    rank 1 becomes a worker, rank 0 prints what world size 1 prints, and both exit 0."""
    import shutil
    import subprocess
    import sys

    fitllm = shutil.which("fitllm", path=os.path.dirname(sys.executable))
    args = [
        "generate", "--model", str(llama), "--dtype", "float32", "--max-model-len", "128",
        "--temperature", "0", "--max-tokens", "8", "t5 t6 t7",
    ]  # fmt: skip
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    one = subprocess.run([fitllm, *args], capture_output=True, text=True, env=env, timeout=120)
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        "--no-python",
    ]
    two = subprocess.run(
        [*torchrun, fitllm, *args, "--tensor-parallel-size", "2"],
        capture_output=True,
        text=True,
        env=env,
        timeout=180,
    )
    assert two.returncode == 0, two.stderr[-3000:]
    assert one.returncode == 0 and one.stdout.strip()
    assert two.stdout.strip() == one.stdout.strip()
