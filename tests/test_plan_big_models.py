"""The planner on the real config.json of the 9B code model the issue names (THUDM/codegeex4-all-9b,
the ChatGLM layout, shipped in tests/fixtures): the figures come from the config through the planner
(the model class built on the meta device), none typed in by hand."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from fitllm.cli import main as cli_main
from fitllm.config import ModelConfig
from fitllm.memory.kv.format import kv_bytes_per_token
from fitllm.plan.memory_plan import make_plan
from fitllm.plan.planner import workspace_bytes
from fitllm.plan.weights import weight_breakdown
from fitllm.quant import get_quant_method

FIXTURES = Path(__file__).parent / "fixtures"
GiB = 1 << 30


@pytest.fixture(scope="module")
def glm9b() -> ModelConfig:
    return ModelConfig.from_hf_config(json.loads((FIXTURES / "codegeex4-all-9b" / "config.json").read_text()))


def test_glm9b_facts(glm9b):
    assert (glm9b.architecture, glm9b.num_hidden_layers, glm9b.num_key_value_heads, glm9b.head_dim) == (
        "GlmForCausalLM",
        40,
        2,
        128,
    )
    assert glm9b.rope_theta == 5_000_000.0 and glm9b.partial_rotary_factor == 0.5
    assert kv_bytes_per_token(glm9b, torch.bfloat16) == 40 * 1024  # 40 KiB per token in 16-bit


def test_glm9b_full_context_does_not_fit_20gib_and_the_planner_says_what_would(glm9b):
    plan = make_plan(glm9b, "codegeex4-all-9b", torch.bfloat16, 20 * GiB, 131072)
    # About 9.4B parameters: 17.5 GiB of bfloat16 weights; one 128k-token request needs 5 GiB of KV.
    assert 17.4 * GiB < plan.weights.total < 17.6 * GiB
    assert plan.kv_bytes_per_request == 5 * GiB
    assert not plan.fits and plan.max_context_that_fits < 131072
    text = "\n".join(plan.suggestions)
    assert f"--max-model-len {plan.max_context_that_fits} fits" in text
    assert "--quantization int8 frees" in text and "--kv-cache-dtype int8 (or fp8)" in text
    # Asked of the planner: int8 or int4 weights make the full context fit; an int8/fp8 KV cache alone
    # about doubles the context that fits (~99k tokens, as the suggestion says) but not to 128k; with
    # int8 weights as well, it fits with room for several full-length requests.
    for kw in ({"quantization": "int8"}, {"quantization": "int4"}):
        assert make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, 131072, **kw).fits, kw
    for kv in ("int8", "fp8"):
        small = make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, 131072, kv_cache_dtype=kv)
        assert small.kv_bytes_per_token == 40 * 2 * 2 * (128 + 4)  # 20.6 KiB: codes + a scale per vector
        assert not small.fits and 1.9 * plan.max_context_that_fits < small.max_context_that_fits < 131072
        both = make_plan(
            glm9b, "glm", torch.bfloat16, 20 * GiB, 131072, quantization="int8", kv_cache_dtype=kv
        )
        assert both.fits and both.kv_capacity_tokens // 131072 >= 3
    # --max-model-len auto: the largest context that fits the budget.
    auto = make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, None)
    assert auto.fits and auto.max_context_that_fits == plan.max_context_that_fits


@pytest.mark.parametrize("path", ["reference", "triton-graphs"])
def test_glm9b_auto_is_the_longest_context_that_fits_with_the_workspace_sized_for_it(glm9b, path):
    """--max-model-len auto on 20 GiB: the workspace (the reference attention's scratch) and the graph pool
    (its block table) are sized at the chosen length, not the model's 131072, and one block more does not
    fit."""
    kw = {"reference_attention": True} if path == "reference" else {"cuda_graphs": True}
    auto = make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, None, **kw)
    length = auto.max_model_len
    assert auto.fits and length == auto.max_context_that_fits and length % 16 == 0
    assert 40_000 < length < 131072
    same = make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, length, **kw)
    assert same.fits and (same.workspace, same.graph_pool) == (auto.workspace, auto.graph_pool)
    over = make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, length + 16, **kw)
    assert not over.fits and over.kv_capacity_tokens < length + 16
    full = make_plan(glm9b, "glm", torch.bfloat16, 20 * GiB, 131072, **kw)
    if path == "reference":
        assert auto.workspace < full.workspace - 300 * (1 << 20)  # 446 MiB at ~47k tokens vs 772 MiB
        assert auto.graph_pool == 0
    else:
        assert auto.graph_pool < full.graph_pool and auto.workspace == full.workspace


def test_fitllm_plan_cli_on_the_fixture(capsys):
    config = str(FIXTURES / "codegeex4-all-9b" / "config.json")
    argv = [
        "plan",
        "--model",
        config,
        "--max-model-len",
        "131072",
        "--memory-budget",
        "20GiB",
        "--dtype",
        "bfloat16",
    ]
    assert cli_main([*argv, "--device", "cpu"]) == 1  # does not fit
    out = capsys.readouterr().out
    assert "17.51 GiB" in out and "40.00 KiB" in out and "5.00 GiB" in out and "NO" in out
    assert cli_main([*argv, "--device", "cpu", "--quantization", "int8"]) == 0


DOCS = Path(__file__).parent.parent / "docs" / "benchmarks.md"
J13, G9 = "fairseq-dense-13B-Janeway", "codegeex4-all-9b"
G9_FULL = (
    f"--model tests/fixtures/{G9}/config.json --max-model-len 131072 --memory-budget 20GiB --dtype bfloat16"
)
# The plan commands docs/benchmarks.md gives (after `fitllm plan`), and what each prints: KV room in tokens,
# largest context for one request, full-length requests at once, whether it fits.
DOCUMENTED_PLANS = {
    f"--model tests/fixtures/{J13}/config.json --memory-budget 24GiB --dtype float16 --device cuda "
    "--max-model-len auto": (816, 816, 1, "yes"),  # by streaming 4 of 40 layers
    f"--model tests/fixtures/{J13}/config.json --memory-budget 24GiB --dtype float16 --device cuda "
    "--quantization int8": (14608, 2048, 7, "yes"),
    f"--model tests/fixtures/{J13}/config.json --memory-budget 24GiB --dtype float16 --device cuda "
    "--quantization int4": (21568, 2048, 10, "yes"),
    f"{G9_FULL} --device cuda": (50304, 50320, 0, "NO"),
    f"{G9_FULL.replace('131072', 'auto')} --device cuda": (50320, 50320, 1, "yes"),
    f"{G9_FULL} --device cuda --quantization int8": (259056, 131072, 1, "yes"),
    f"{G9_FULL} --device cuda --quantization int4": (351536, 131072, 2, "yes"),
    f"{G9_FULL} --device cuda --kv-cache-dtype int8": (97552, 97584, 0, "NO"),
    f"{G9_FULL} --device cuda --kv-cache-dtype fp8": (97552, 97584, 0, "NO"),
    f"{G9_FULL} --device cuda --quantization int8 --kv-cache-dtype int8": (502416, 131072, 3, "yes"),
}  # fmt: skip


def test_the_documented_plan_commands_print_the_documented_figures(capsys, monkeypatch):
    """Each `fitllm plan` command docs/benchmarks.md gives for the two models, run as written (with
    `--device cuda`: the figures are a GPU's, planned on a machine without one), prints the context figures
    its tables give. The 13B float16 plan streams layers, so it predicts decode speed: from assumed
    bandwidths here, since there is no CUDA device to measure (and it must not need one)."""
    monkeypatch.chdir(DOCS.parent.parent)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    docs = DOCS.read_text()
    prefix = ".venv/bin/fitllm plan "
    commands = [line.removeprefix(prefix) for line in docs.splitlines() if line.startswith(prefix)]
    assert commands == list(DOCUMENTED_PLANS)
    for command, (room, largest, at_once, fits) in DOCUMENTED_PLANS.items():
        code = cli_main(["plan", *command.split()])
        out = capsys.readouterr().out
        assert code == (0 if fits == "yes" else 1), command
        got = (
            int(re.search(r"KV room after the above .* = (\d+) tokens", out).group(1)),
            int(re.search(r"largest context that fits \(one request\)\s+(\d+)", out).group(1)),
            int(re.search(r"full-length requests at once \(\d+ tokens\)\s+(\d+)", out).group(1)),
            re.search(r"  fits\s+(\S+)", out).group(1),
        )
        assert got == (room, largest, at_once, fits), command
        for n in (room, largest):
            assert f"{n:,}" in docs, (command, n)  # the tables give these figures
        if J13 in command and "quantization" not in command:
            assert "4 layers: 5, 15, 25, 35" in out
            assert "pinned host -> device assumed (no CUDA device here) at 25.0 GB/s" in out


@pytest.fixture(scope="module")
def janeway13b() -> ModelConfig:
    return ModelConfig.from_hf_config(
        json.loads((FIXTURES / "fairseq-dense-13B-Janeway" / "config.json").read_text())
    )


def test_janeway13b_weights_kv_and_what_fits_24gib_in_int8(janeway13b):
    mc = janeway13b
    assert (mc.architecture, mc.num_hidden_layers, mc.num_attention_heads, mc.head_dim) == (
        "XGLMForCausalLM",
        40,
        40,
        128,
    )
    assert mc.num_key_value_heads == 40 and mc.scale_embedding and mc.tie_word_embeddings
    plans = {
        q: make_plan(mc, "janeway", torch.float16, 24 * GiB, None, quantization=q)
        for q in ("none", "int8", "int4")
    }
    # ~12.8B parameters: 23.9 GiB in float16 (the published fp16 file is ~25.7 GB), ~12.0 GiB in int8 (the
    # tied embedding and LM head held once, as int8).
    fp16 = plans["none"]
    assert 23.8 * GiB < fp16.weights.total < 24.0 * GiB
    # In float16 the weights alone fill the budget: it fits only by streaming layers from host memory
    # (a few of the 40, ~590 MiB each), and the plan says so.
    assert fp16.fits and 0 < len(fp16.placement.offloaded) < 10
    assert fp16.resident_weight_bytes + fp16.placement.offloaded_bytes >= fp16.weights.total
    assert not plans["int8"].placement.offloaded and not plans["int4"].placement.offloaded
    assert 11.9 * GiB < plans["int8"].weights.total < 12.1 * GiB
    # XGLM's projections sit on the layer itself (qkv_proj, out_proj), not in a self_attn module: its
    # attention is 4 d^2 weights + 4 d biases per layer and its MLP 2 d ffn + ffn + d, in float16.
    d, ffn, layers = 5120, 20480, 40
    assert fp16.weights.attention == layers * (4 * d * d + 4 * d) * 2
    assert fp16.weights.mlp == layers * (2 * d * ffn + ffn + d) * 2
    assert plans["int4"].weights.total < 0.6 * plans["int8"].weights.total
    # 800 KiB of KV per token in 16-bit (40 layers x K and V x 40 heads x 128 x 2 bytes).
    assert plans["int8"].kv_bytes_per_token == 800 * 1024
    # On 24 GiB with int8 weights: ~14.6k tokens of context at once, i.e. seven full 2048-token stories.
    int8 = plans["int8"]
    assert int8.fits and int8.max_context_that_fits == 2048
    room = 24 * GiB - int8.fixed_bytes
    assert int8.kv_capacity_tokens == room // (800 * 1024 * 16) * 16
    assert 14_000 < int8.kv_capacity_tokens < 15_000 and int8.kv_capacity_tokens // 2048 == 7


@pytest.mark.parametrize(
    "fixture,shrink",
    [
        ("fairseq-dense-13B-Janeway", dict(d_model=64, num_layers=2, attention_heads=4, ffn_dim=128)),
        (
            "codegeex4-all-9b",
            dict(hidden_size=64, num_layers=2, num_attention_heads=4, kv_channels=16, ffn_hidden_size=96,
                 padded_vocab_size=1024, eos_token_id=[1000], pad_token_id=1000),
        ),
    ],
    ids=["xglm", "chatglm"],
)  # fmt: skip
def test_bench_fullsize_builds_plans_and_measures_the_published_config(tmp_path, fixture, shrink):
    """`fitllm bench fullsize` (issue 7's GPU measurement) on the published config with its sizes shrunk, on
    CPU: it saves the random checkpoint in transformers' native layout (the ChatGLM config as GlmForCausalLM),
    plans it as the engine runs it (here the reference attention's scratch at the context), loads it with
    int8 weights and reports the ledger beside the plan; the weights it holds are the planned bytes, and
    the planned workspace is the engine's."""
    config = json.loads((FIXTURES / fixture / "config.json").read_text())
    config.update(shrink)
    folder = tmp_path / fixture
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    out = tmp_path / "fullsize.json"
    argv = [
        "bench",
        "fullsize",
        "--config",
        str(folder / "config.json"),
        "--checkpoint-dir",
        str(tmp_path / "ck"),
    ]
    argv += [
        "--dtype",
        "float32",
        "--memory-budget",
        "2GiB",
        "--max-model-len",
        "256",
        "--prompt-tokens",
        "40",
    ]
    assert cli_main([*argv, "--decode-tokens", "3", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["model"] == fixture and result["tokens"] == 43 and result["planned"]["fits"]
    assert result["ledger"]["peak_by_tag"]["weights"] == result["planned"]["weights"]
    mc = ModelConfig.from_hf_config(config)
    scratch = weight_breakdown(mc, torch.float32, get_quant_method("int8")).largest_quantized_linear
    reference = workspace_bytes(mc, torch.float32, 2048, 64, scratch, 256)  # at --max-model-len 256
    assert result["planned"]["workspace"] == reference and result["planned"]["graph_pool"] == 0
    assert result["ledger"]["peak_by_tag"]["kv"] >= result["planned"]["kv_for_this_request"]
    assert result["ledger"]["peak_total"] <= result["budget"]


def test_bench_fullsize_refuses_a_request_longer_than_the_context_before_building(tmp_path, capsys):
    """On a GPU the checkpoint takes minutes to build: a request that cannot run is refused first."""
    argv = ["bench", "fullsize", "--config", str(FIXTURES / "fairseq-dense-13B-Janeway" / "config.json")]
    argv += ["--checkpoint-dir", str(tmp_path / "ck"), "--max-model-len", "2048", "--prompt-tokens", "2048"]
    assert cli_main(argv) == 2
    assert "--prompt-tokens" in capsys.readouterr().out
    assert not (tmp_path / "ck").exists()
