"""The layer split (`--layer-split`) on the CPU: two simulated devices, both `cpu`, made real anyway.

Each stage has its own ledger and its own KV storage over its own layers, and the hidden state is copied
(an explicit `.to(copy=True)`) from stage to stage. The reference is the unsplit engine on the same float32
checkpoint and the same batch: the stages run the same ops on the same values, so logits are compared
within 1e-6 of the largest |logit| and greedy tokens must be identical. The CUDA test at the end runs the
same comparison over two real GPUs when the machine has them.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import make_random_checkpoint, run_all
from test_tensor_parallel import LENS, tokens

from fitllm import SamplingParams
from fitllm.config import EngineConfig
from fitllm.engine.engine import Engine
from fitllm.engine.stages import stage_weight_bytes
from fitllm.loader import open_model
from fitllm.memory.kv.staged import StagedSlabStorage
from fitllm.memory.kv.storage import KVSlabStorage
from fitllm.plan.layer_split import apportion, balance, plan_layer_split
from fitllm.plan.memory_plan import MemoryPlan

REL = 1e-6
BASE = dict(
    dtype="float32",
    max_model_len=128,
    max_num_batched_tokens=32,  # prompts of 40 and 33 tokens are prefilled in chunks
    max_num_seqs=4,
    profile_workspace=False,
    kv_idle_release_s=0.0,
)
GREEDY = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """Four layers, 4 query heads over 2 KV heads (GQA)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("split"), "llama", num_hidden_layers=4)


def split_budgets(folder, kv_blocks: int, slab_blocks: int, devices: tuple[str, str], **kw) -> dict:
    """Config fields for a two-device split of `folder` (layers 2:2) whose devices each hold exactly
    `kv_blocks` KV blocks beside their weights and workspace, in slabs of `slab_blocks`; and for the
    unsplit engine the same pool (see `unsplit_budget`)."""
    split = ",".join(f"{d}=1GiB" for d in devices)
    probe = Engine(EngineConfig(model=str(folder), layer_split=split, **(BASE | kw)))
    assert [len(s.layers) for s in probe.stages] == [2, 2]
    budgets = []
    for stage in probe.stages:
        fixed = stage.ledger.current("weights") + stage.ledger.current("workspace")
        budgets.append(fixed + kv_blocks * stage.storage.block_bytes)
    slab = slab_blocks * probe.stages[0].storage.block_bytes
    return {
        "layer_split": ",".join(f"{d}={b}" for d, b in zip(devices, budgets, strict=True)),
        "kv_slab_size": slab,
    }


def engines(
    folder, kv_blocks: int | None = None, devices: tuple[str, str] = ("cpu", "cpu"), **kw
) -> tuple[Engine, Engine]:
    """(unsplit on the first device, split over both) engines alike in everything else; with `kv_blocks`,
    both pools hold that many blocks in slabs of two."""
    split = {"layer_split": ",".join(f"{d}=1GiB" for d in devices)}
    unsplit: dict = {"device": devices[0]}
    if kv_blocks is not None:
        split = split_budgets(folder, kv_blocks, 2, devices, **kw)
        probe = Engine(
            EngineConfig(model=str(folder), memory_budget="1GiB", device=devices[0], **(BASE | kw))
        )
        fixed = probe.ledger.current("weights") + probe.ledger.current("workspace")
        per_block = probe.storage.block_bytes
        unsplit.update(memory_budget=fixed + kv_blocks * per_block, kv_slab_size=2 * per_block)
    ref = Engine(EngineConfig(model=str(folder), **(BASE | unsplit | kw)))
    return ref, Engine(EngineConfig(model=str(folder), **(BASE | split | kw)))


def compare(
    ref: Engine, split: Engine, prompts: list[list[int]], vary: bool = True, rel: float = REL
) -> list[list[int]]:
    """Both engines run `prompts` as one batch: the same greedy tokens, logits within REL, the stages'
    ledgers within their budgets after every step. Returns the tokens."""
    want_logits: list = []
    got_logits: list = []
    want = run_all(ref, prompts, params=GREEDY, logits=want_logits)

    def check_stages(engine: Engine) -> None:
        for stage in engine.stages:
            assert stage.ledger.total <= stage.ledger.budget
            assert stage.storage.live == engine.storage.live  # slabs come and go on every stage at once

    got = run_all(split, prompts, params=GREEDY, logits=got_logits, on_step=check_stages)
    assert not vary or all(len(set(w)) > 1 for w in want), "the reference should vary"
    assert got == want
    for rows_ref, rows_split in zip(want_logits, got_logits, strict=True):
        assert len(rows_ref) == len(rows_split) == GREEDY.max_tokens
        for a, b in zip(rows_ref, rows_split, strict=True):
            assert (a - b).abs().max().item() <= rel * a.abs().max().item()
    return got


def test_llama_split_matches_unsplit_with_chunks_and_prefix_hits(llama):
    ref, split = engines(llama, kv_slab_size=32 << 10)  # small slabs: the pool grows and shrinks
    assert [s.layers for s in split.stages] == [range(0, 2), range(2, 4)]
    prompts = [tokens(n, i) for i, n in enumerate(LENS)]
    outs = compare(ref, split, prompts)
    # Idle: slabs given back, the cached blocks kept moved into the slabs that stay, on every stage.
    assert split.release_idle_memory() > 0 and ref.release_idle_memory() > 0
    # The conversations go on: their full blocks come from the prefix cache on every stage.
    assert split.pool.num_cached_blocks > 0
    hits = split.kv.prefix_hits
    compare(ref, split, [p + out + [7] for p, out in zip(prompts, outs, strict=True)])
    assert split.kv.prefix_hits > hits
    # Every forward copied the hidden state to the second device and back: two copies a forward.
    assert split.hops is not None and split.hops.copies > 0 and split.hops.copies % 2 == 0


@pytest.mark.parametrize("mode", ["recompute", "swap"])
def test_llama_split_preempts_like_unsplit(llama, mode):
    """Pools of 12 blocks, grown two at a time, for four requests that need more: preemption (recompute,
    or K/V swapped to host memory and back through every stage's storage) gives the same tokens."""
    ref, split = engines(llama, kv_blocks=12, preemption_mode=mode, swap_space=64 << 20)
    prompts = [tokens(n, 10 + i) for i, n in enumerate([40, 33, 38, 29])]
    compare(ref, split, prompts)
    assert split.scheduler.num_preemptions == ref.scheduler.num_preemptions > 0
    if mode == "swap":
        assert split.swapper.num_swap_outs == ref.swapper.num_swap_outs > 0


@pytest.mark.parametrize("family", ["glm", "xglm"])
def test_other_families_split(tmp_path, family):
    folder = make_random_checkpoint(tmp_path, family)
    ref, split = engines(folder)
    compare(ref, split, [tokens(n, i) for i, n in enumerate(LENS[:3])], vary=family != "xglm")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_quantized_split_matches_unsplit(llama, quantization):
    """Quantized layers on both devices (each device's layers share their own dequantize scratch)."""
    ref, split = engines(llama, quantization=quantization)
    compare(ref, split, [tokens(n, i) for i, n in enumerate(LENS[:3])])


def test_speculative_verification_runs_through_the_split(llama):
    """Prompt-lookup drafts verified in one forward over both devices: the tokens of the unsplit engine."""
    # One-token matches: a random model seldom copies, but its tokens recur in the prompt.
    ref, split = engines(llama, speculative_ngram=2, speculative_ngram_min=1, speculative_tokens=4)
    loop = tokens(12, 1) * 4
    compare(ref, split, [loop, tokens(20, 2) + loop[:20]])
    assert split.speculator.stats.num_draft_tokens > 0


def test_context_shift_rotates_every_stages_kv(llama):
    """Turn 2 of a story, its oldest text cut: the kept K/V is rotated into place on each stage's own
    storage, and the continuation matches the unsplit engine's shifted one."""
    from test_context_shift import CUT, MEMORY, STORY

    ref, split = engines(llama, max_model_len=256, context_shift="on")
    (out,) = run_all(ref, [MEMORY + STORY], params=GREEDY)
    assert run_all(split, [MEMORY + STORY], params=GREEDY) == [out]
    compare(ref, split, [MEMORY + STORY[CUT:] + out + [5, 6, 7]])
    assert split.shifter.num_shifted_tokens == ref.shifter.num_shifted_tokens > 0


def test_prompt_logprobs_and_the_profile_step_run_through_the_split(llama):
    """The scratch prefills (prompt logprobs; the start-up profile step) give each device its own scratch
    K/V for its layers."""
    ref, split = engines(llama, profile_workspace=True)
    assert split.workspace_measured is not None and split.workspace_measured > 0
    prompt = tokens(30, 5)
    want_ids, want = ref.score_prompt(prompt, top_n=3)
    got_ids, got = split.score_prompt(prompt, top_n=3)
    assert got_ids == want_ids and len(got) == len(want) == 29
    for (a, top_a), (b, top_b) in zip(got, want, strict=True):
        assert a == pytest.approx(b, abs=1e-5)
        assert [t for t, _ in top_a] == [t for t, _ in top_b]


def test_each_stage_ledgers_only_its_layers_weights_and_kv(llama):
    _, split = engines(llama, kv_slab_size=32 << 10)  # 4 blocks of two layers' K/V
    model, (first, second) = split.model, split.stages
    layer = sum(p.numel() * p.element_size() for p in model.layers[0].parameters())
    outside = sum(
        p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("layers.")
    )
    assert first.ledger.current("weights") == 2 * layer + outside == stage_weight_bytes(model, first)
    assert second.ledger.current("weights") == 2 * layer
    # Each stage's storage holds its own two layers, in its own ledger; the pool's storage is both.
    assert isinstance(split.storage, StagedSlabStorage)
    assert [p.slab_shape[0] for p in split.storage.parts()] == [2, 2]
    for stage in split.stages:
        assert isinstance(stage.storage, KVSlabStorage) and stage.storage.ledger is stage.ledger
        assert stage.ledger.current("kv") == stage.storage.num_live * stage.storage.slab_bytes
    # The second stage's attention layers read and write the second storage, at their index within it.
    attn = model.attention_layers()
    assert attn[2].kv_slabs is second.storage.layer_slabs[0] and attn[2].layer_index == 0
    assert attn[1].kv_slabs is first.storage.layer_slabs[1]
    # Growing the pool adds a slab on both stages, each ledgering its own share (kv + kv_cached).
    most = []

    def each_step(engine: Engine) -> None:
        for stage in engine.stages:
            held = stage.ledger.current("kv") + stage.ledger.current("kv_cached")
            assert held == stage.storage.num_live * stage.storage.slab_bytes
        most.append(engine.storage.num_live)

    assert split.storage.num_live == 1
    run_all(split, [tokens(120, 3), tokens(100, 4)], params=GREEDY, on_step=each_step)
    assert max(most) > 1
    assert first.storage.slab_bytes == second.storage.slab_bytes  # equal layers, equal shares
    # Idle: the slabs go back on both stages (cached blocks kept by compaction copies on every stage).
    assert split.release_idle_memory() > 0
    each_step(split)
    assert first.storage.live == second.storage.live and split.storage.num_live < max(most)
    split.check_integrity()


def test_staged_storage_moves_slabs_and_blocks_on_every_stage():
    """A slab is added on every stage or none (a refusing ledger leaves the others as they were); block
    copies, slot reads and writes reach every stage's layers."""
    from fitllm.memory.kv.format import KVCacheFormat
    from fitllm.memory.ledger import MemoryLedger

    fmt = KVCacheFormat("auto", torch.float32, 8)
    slab_bytes = [fmt.bytes_per_token(n, 2) * 4 * 2 for n in (1, 2)]  # 2 blocks of 4 tokens a slab
    ledgers = [MemoryLedger(4 * slab_bytes[0]), MemoryLedger(2 * slab_bytes[1])]
    parts = [
        KVSlabStorage(n, 2, fmt, 4, 2, 4, torch.device("cpu"), ledger)
        for n, ledger in zip((1, 2), ledgers, strict=True)
    ]
    staged = StagedSlabStorage(parts)
    assert staged.add(0) and staged.add(1) and staged.num_addable() == 0
    assert not staged.add(2)  # the second stage's budget is full: the first gives its slab 2 back
    assert parts[0].live == parts[1].live == {0, 1}
    assert [lg.current("kv") for lg in ledgers] == [2 * slab_bytes[0], 2 * slab_bytes[1]]
    slots = torch.arange(0, 8)
    data = torch.randn(staged.block_shape(2))
    staged.write_slots(slots, data)
    staged.copy_blocks([0, 1], [2, 3])  # blocks 2 and 3 are slab 1's
    out = torch.empty(staged.block_shape(2))
    staged.read_slots(torch.arange(8, 16), out)
    assert torch.equal(out, data)
    assert torch.equal(parts[1].slab_view(1)[:, :, :8], data[1:])  # stage 1 holds layers 1-2
    staged.remove(1)
    assert parts[0].live == parts[1].live == {0} and ledgers[1].current("kv") == slab_bytes[1]


def test_metrics_show_each_devices_ledger(llama):
    from prometheus_client import CollectorRegistry, generate_latest

    from fitllm.engine.view import EngineCounters, StatusSnapshot
    from fitllm.server.metrics import EngineCollector

    _, split = engines(llama)
    snapshot = StatusSnapshot.of(split, EngineCounters(), 0.0)

    class Published:  # what the collector reads of the AsyncEngine
        ready = True

        def status(self):
            return snapshot

    registry = CollectorRegistry()
    registry.register(EngineCollector(Published()))
    text = generate_latest(registry).decode()
    for stage in split.stages:
        weights = stage.ledger.current("weights")
        name = f"{stage.index}:{stage.device}"
        assert f'fitllm_device_memory_bytes{{device="{name}",tag="weights"}} {float(weights)}' in text


def test_planner_follows_the_budgets(llama):
    """2:1 room gives about 2:1 layers (of 24); budgets that cannot hold the model are refused."""
    config = EngineConfig(model=str(llama), **BASE)
    mc = dataclasses.replace(open_model(str(llama)).config, num_hidden_layers=24)
    plan = MemoryPlan.for_engine(config, mc, torch.device("cpu"), budget=1 << 40)
    outside = plan.weights.total - 24 * plan.weights.per_layer
    ws = [plan.workspace_at(128, sampling=True), plan.workspace_at(128, sampling=False)]
    room = 64 << 20
    budgets = [ws[0] + outside + 2 * room, ws[1] + room]
    stages = plan_layer_split(plan, [torch.device("cpu")] * 2, budgets, 128)
    assert [len(s.layers) for s in stages] == [16, 8]
    assert stages[0].layers.stop == stages[1].layers.start and stages[1].layers.stop == 24
    assert stages[0].kv_tokens == pytest.approx(stages[1].kv_tokens, rel=0.01)  # balanced KV
    assert apportion([3, 1, 0], 8) == [6, 2, 0] and apportion([1, 1], 3) in ([2, 1], [1, 2])
    assert balance([3, 1], [300, 300], 10, 1) == [2, 2]  # whole layers moved while the tightest gains
    with pytest.raises(ValueError, match="--layer-split: device 1 .* leaves room for no decoder layer"):
        plan_layer_split(plan, [torch.device("cpu")] * 2, [budgets[0], ws[1]], 128)
    small = [ws[0] + outside + 3 * plan.weights.per_layer, ws[1] + 3 * plan.weights.per_layer]
    with pytest.raises(ValueError, match="cannot hold its .* layers and one KV block"):
        plan_layer_split(plan, [torch.device("cpu")] * 2, small, 128)


def test_engine_refuses_a_model_that_fits_nowhere(llama):
    with pytest.raises(ValueError, match="--layer-split"):
        Engine(EngineConfig(model=str(llama), layer_split="cpu=300KiB,cpu=300KiB", **BASE))


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"tensor_parallel_size": 2}, "--layer-split and --tensor-parallel-size"),
        ({"cpu_offload_gb": 0.1}, "--cpu-offload-gb"),
        ({"memory_budget": "1GiB"}, "--memory-budget"),
        ({"max_model_len": "auto"}, "--max-model-len auto"),
        ({"async_scheduling": "on"}, "--async-scheduling on"),
        ({"compile_decode": True}, "--compile-decode"),
    ],
)
def test_unsupported_combinations_are_refused(llama, extra, message):
    cfg = dict(BASE, model=str(llama), layer_split="cpu=1GiB,cpu=1GiB")
    cfg.update(extra)
    with pytest.raises(ValueError, match=message):
        Engine(EngineConfig(**cfg))


@pytest.mark.parametrize("text", ["1GiB", "cpu=1GiB,", "gpu:0=1GiB,cpu=1GiB", "cpu=,cpu=1GiB"])
def test_bad_layer_split_flags_are_refused_naming_the_flag(text):
    with pytest.raises(ValueError, match="--layer-split"):
        EngineConfig(layer_split=text)


def test_plan_command_reports_each_device(llama, capsys):
    import json

    from fitllm.cli import main

    args = ["plan", "--model", str(llama), "--dtype", "float32", "--max-model-len", "128", "--json"]
    assert main([*args, "--layer-split", "cpu=600MiB,cpu=600MiB"]) == 0
    body = json.loads(capsys.readouterr().out)
    assert [s["layers"] for s in body["stages"]] == [[0, 2], [2, 4]] and body["fits"]
    assert main([*args, "--layer-split", "cpu=1MiB,cpu=1MiB"]) == 1
    assert "--layer-split" in json.loads(capsys.readouterr().out)["error"]


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs two CUDA devices (the CPU tests above carry the logic)"
)
def test_two_gpus_match_one(llama):
    ref, split = engines(llama, devices=("cuda:0", "cuda:1"))
    assert [s.device for s in split.stages] == [torch.device("cuda:0"), torch.device("cuda:1")]
    assert next(split.model.layers[3].parameters()).device == torch.device("cuda:1")
    assert split.stages[1].storage.layer_slabs[0][0].device == torch.device("cuda:1")
    # Other kernels (graphs and async scheduling on one GPU, eager on two): close, not bit for bit.
    compare(ref, split, [tokens(n, i) for i, n in enumerate(LENS)], rel=1e-4)


def test_bench_layer_split_runs_both_engines_and_reports_the_hops(llama, tmp_path):
    import json

    from fitllm.cli import main

    out = tmp_path / "split.json"
    args = ["bench", "layer-split", "--model", str(llama), "--dtype", "float32", "--max-model-len", "256"]
    args += ["--layer-split", "cpu=1GiB,cpu=1GiB", "--batch", "2", "--prompt-tokens", "20"]
    assert main([*args, "--steps", "2", "--rounds", "1", "--json", str(out)]) == 0
    body = json.loads(out.read_text())
    assert body["stages"] == [["cpu", 0, 2], ["cpu", 2, 4]]
    assert body["hop_us_per_step"] > 0 and body["ratio"] > 0
    assert main(args[:8]) == 2  # without --layer-split there is nothing to compare
