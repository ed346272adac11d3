"""`fitllm bench roofline` on CPU at its tiny size: the benchmark itself (the GPU figures come from the same
code), and the bytes-per-token its roofline divides by."""

from __future__ import annotations

import json

import pytest

from benchmarks.roofline import SIZES, decode_bytes_per_token
from fitllm.cli import main as cli_main


def test_an_untied_embedding_is_not_read_per_token():
    # 8B-like: 16 GB of weights of which 1 GB is the untied input embedding; 128 KiB of K/V per token.
    untied = decode_bytes_per_token(16_000, 1_000, False, context=10.0, kv_bytes_per_token=5)
    tied = decode_bytes_per_token(16_000, 1_000, True, context=10.0, kv_bytes_per_token=5)
    assert untied == 15_000 + 50
    assert tied == 16_000 + 50  # a tied table is the LM head, read whole every step


def test_bench_roofline_runs_fitllm_and_transformers_on_cpu(tmp_path):
    out = tmp_path / "roofline.json"
    argv = ["bench", "roofline", "--size", "tiny", "--device", "cpu", "--dtype", "float32"]
    argv += ["--quantizations", "none,int8", "--prompt-tokens", "8", "--decode-tokens", "2"]
    argv += ["--checkpoint-dir", str(tmp_path / "ckpt"), "--json", str(out)]
    assert cli_main(argv) == 0
    data = json.loads(out.read_text())
    assert data["size"] == "tiny" and data["device"] == "cpu" and data["date"] and data["bandwidth"] > 0
    rows = {(r["system"], r["quantization"]): r for r in data["rows"]}
    assert set(rows) == {("fitllm", "none"), ("fitllm", "int8"), ("transformers", "none")}
    tiny = SIZES["tiny"]
    hidden, layers, vocab = tiny["hidden_size"], tiny["num_hidden_layers"], tiny["vocab_size"]
    kv_per_token = 2 * layers * tiny["num_key_value_heads"] * (hidden // tiny["num_attention_heads"]) * 4
    context = 8 + 3 / 2
    # Both systems read the same float32 weights (less the untied embedding) and the same K/V per token.
    assert rows["fitllm", "none"]["bytes_per_token"] == pytest.approx(
        rows["transformers", "none"]["bytes_per_token"]
    )
    # Every weight once, float32, except the untied input embedding: the LM head, the layers, the norms.
    kv_width = tiny["num_key_value_heads"] * (hidden // tiny["num_attention_heads"])
    per_layer = (
        2 * hidden * hidden + 2 * hidden * kv_width + 3 * hidden * tiny["intermediate_size"] + 2 * hidden
    )
    read = vocab * hidden + layers * per_layer + hidden
    assert rows["fitllm", "none"]["bytes_per_token"] == pytest.approx(4 * read + context * kv_per_token)
    assert rows["fitllm", "int8"]["bytes_per_token"] < rows["fitllm", "none"]["bytes_per_token"]
    for r in data["rows"]:
        assert r["tokens_per_s"] > 0 and r["fraction_of_roofline"] > 0
        assert r["roofline_tokens_per_s"] == pytest.approx(data["bandwidth"] / r["bytes_per_token"])
