"""Checkpoints that lie about their sizes (issue 22, item 7): each is refused early with one error naming
the field (as the file spells it), quickly and without allocating by what it claims; a context_length
the budget could never serve loads at a context that fits instead."""

from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from conftest import write_tokenizer

from fitllm import Engine, EngineConfig
from fitllm.cli import main
from fitllm.loader import open_model

SIZES = dict(layers=2, hidden=64, heads=4, kv=2, inter=128, vocab=64)


def write_gguf(
    path: Path,
    meta: dict | None = None,
    extra_array: int | None = None,
    rope_freqs: int = 0,
    merges: bool = True,
    **sizes,
) -> Path:
    """A tiny float32 Llama GGUF whose tensors have `sizes`; `meta` overrides what its header claims."""
    s = dict(SIZES, **sizes)
    claims = {"block_count": s["layers"], "embedding_length": s["hidden"], "feed_forward_length": s["inter"],
              "head_count": s["heads"], "head_count_kv": s["kv"], "context_length": 256} | (meta or {})  # fmt: skip
    w = gguf.GGUFWriter(str(path), "llama")
    for key, value in claims.items():
        getattr(w, f"add_{key}")(value)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_vocab_size(s["vocab"])
    tokens = ["<s>", "</s>", "a", "b", "ab"] + [f"x{i}" for i in range(s["vocab"] - 5)]
    w.add_tokenizer_model("gpt2")
    w.add_token_list(tokens)
    w.add_token_types([3, 3] + [1] * (len(tokens) - 2))
    if merges:
        w.add_token_merges(["a b"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    if extra_array is not None:
        w.add_array("fitllm.lie", [7, 7, 7])
    rng = np.random.default_rng(0)
    hidden, q, kv, inter = s["hidden"], s["hidden"], s["hidden"] // s["heads"] * s["kv"], s["inter"]
    shapes = {"token_embd": (s["vocab"], hidden), "output_norm": (hidden,), "output": (s["vocab"], hidden)}
    for i in range(s["layers"]):
        shapes |= {f"blk.{i}.attn_q": (q, hidden), f"blk.{i}.attn_k": (kv, hidden), f"blk.{i}.attn_v": (kv, hidden),
                   f"blk.{i}.attn_output": (hidden, q), f"blk.{i}.ffn_gate": (inter, hidden),
                   f"blk.{i}.ffn_up": (inter, hidden), f"blk.{i}.ffn_down": (hidden, inter),
                   f"blk.{i}.attn_norm": (hidden,), f"blk.{i}.ffn_norm": (hidden,)}  # fmt: skip
    if rope_freqs:
        shapes["rope_freqs"] = (rope_freqs,)
    for name, shape in shapes.items():
        w.add_tensor(f"{name}.weight", (0.2 * rng.standard_normal(shape)).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    if extra_array is not None:  # patch the array's element count to the lie
        data = bytearray(path.read_bytes())
        at = data.find(b"fitllm.lie") + len(b"fitllm.lie") + 4 + 4  # key, value type, element type
        data[at : at + 8] = extra_array.to_bytes(8, "little")
        path.write_bytes(bytes(data))
    return path


def write_hf(folder: Path, claims: dict | None = None, **sizes) -> Path:
    """A tiny Llama folder (config.json, safetensors, tokenizer.json) whose config claims `claims`."""
    from safetensors.torch import save_file

    s = dict(SIZES, **sizes)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": s["hidden"],
           "num_hidden_layers": s["layers"], "num_attention_heads": s["heads"], "num_key_value_heads": s["kv"],
           "intermediate_size": s["inter"], "vocab_size": s["vocab"], "max_position_embeddings": 256}  # fmt: skip
    (folder / "config.json").write_text(json.dumps(cfg | (claims or {})))
    hidden, kv, inter = s["hidden"], s["hidden"] // s["heads"] * s["kv"], s["inter"]
    state = {"model.embed_tokens.weight": (s["vocab"], hidden), "model.norm.weight": (hidden,),
             "lm_head.weight": (s["vocab"], hidden)}  # fmt: skip
    for i in range(s["layers"]):
        p = f"model.layers.{i}."
        state |= {p + "self_attn.q_proj.weight": (hidden, hidden), p + "self_attn.k_proj.weight": (kv, hidden),
                  p + "self_attn.v_proj.weight": (kv, hidden), p + "self_attn.o_proj.weight": (hidden, hidden),
                  p + "mlp.gate_proj.weight": (inter, hidden), p + "mlp.up_proj.weight": (inter, hidden),
                  p + "mlp.down_proj.weight": (hidden, inter), p + "input_layernorm.weight": (hidden,),
                  p + "post_attention_layernorm.weight": (hidden,)}  # fmt: skip
    save_file({k: torch.randn(v) * 0.2 for k, v in state.items()}, str(folder / "model.safetensors"))
    write_tokenizer(folder, s["vocab"])
    return folder


def _truncated(path: Path, keep: int) -> Path:
    data = write_gguf(path).read_bytes()
    path.write_bytes(data[:keep])
    return path


def _chatglm_config(tmp: Path) -> Path:
    cfg = {"model_type": "chatglm", "architectures": ["ChatGLMModel"], "hidden_size": 64, "num_layers": 10**6,
           "num_attention_heads": 4, "ffn_hidden_size": 128, "padded_vocab_size": 64}  # fmt: skip
    (tmp / "config.json").write_text(json.dumps(cfg))
    return tmp / "config.json"


# (id, build(tmp_path) -> --model path, what the one-line error must say)
ROWS = [
    ("config-1e6-layers", lambda t: write_hf(t / "m", {"num_hidden_layers": 10**6}), "num_hidden_layers is 1000000"),
    ("config-layers-vs-file", lambda t: write_hf(t / "m", {"num_hidden_layers": 1000}),
     "num_hidden_layers is 1000 but the checkpoint holds tensors for 2 decoder layers"),
    ("config-shape-vs-file", lambda t: write_hf(t / "m", {"intermediate_size": 256}),
     "but the config implies (64, 256) (intermediate_size is 256)"),
    ("config-heads-0", lambda t: write_hf(t / "m", {"num_attention_heads": 0}), "num_attention_heads is 0"),
    ("config-missing-hidden", lambda t: write_hf(t / "m", {"hidden_size": None}), "hidden_size is missing"),
    ("chatglm-1e6-layers", _chatglm_config, "num_layers is 1000000"),
    ("gguf-block-count-2^31", lambda t: write_gguf(t / "m.gguf", {"block_count": 2**31}),
     "llama.block_count is 2147483648"),
    ("gguf-block-count-vs-file", lambda t: write_gguf(t / "m.gguf", {"block_count": 5}),
     "llama.block_count is 5 but the checkpoint holds tensors for 2 decoder layers"),
    ("gguf-head-count-0", lambda t: write_gguf(t / "m.gguf", {"head_count": 0}), "llama.attention.head_count is 0"),
    ("gguf-huge-embedding", lambda t: write_gguf(t / "m.gguf", {"embedding_length": 2**32 - 1}),
     "llama.embedding_length is 4294967295"),
    ("gguf-embedding-vs-file", lambda t: write_gguf(t / "m.gguf", {"embedding_length": 128}),
     "'token_embd.weight' has shape (64, 64), but the config implies (64, 128) (llama.embedding_length is 128"),
    ("gguf-ffn-vs-file", lambda t: write_gguf(t / "m.gguf", {"feed_forward_length": 256}),
     "(llama.feed_forward_length is 256)"),
    ("gguf-rope-freqs-vs-head-dim", lambda t: write_gguf(t / "m.gguf", rope_freqs=5),
     "llama.rope.scaling has 5 rope_freqs factors, but llama.attention.key_length 16 rotates 16 channels and needs 8"),
    ("gguf-truncated-header", lambda t: _truncated(t / "m.gguf", 200), "is not a usable GGUF file"),
    ("gguf-truncated-data", lambda t: _truncated(t / "m.gguf", -1000), "is not a usable GGUF file"),
    ("gguf-array-count-2^40", lambda t: write_gguf(t / "m.gguf", extra_array=2**40),
     "metadata 'fitllm.lie' (1099511627776 elements)"),
]  # fmt: skip


def _peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.parametrize("build, message", [r[1:] for r in ROWS], ids=[r[0] for r in ROWS])
def test_lying_checkpoint_is_one_error_naming_the_field(tmp_path, capsys, build, message):
    model = build(tmp_path)
    before, start = _peak_rss(), time.perf_counter()
    code = main(["plan", "--model", str(model), "--memory-budget", "1GiB"])
    elapsed = time.perf_counter() - start
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("fitllm: error: ") and err.count("\n") == 1, err
    assert message in err
    assert "Traceback" not in err
    assert elapsed < 10
    assert _peak_rss() - before < 256 << 20


def test_truncated_header_names_the_file(tmp_path):
    path = _truncated(tmp_path / "cut.gguf", 200)
    with pytest.raises(ValueError, match="cut.gguf is not a usable GGUF file: .*200 bytes"):
        open_model(str(path))


def test_unusable_gguf_tokenizer_metadata_names_the_file(tmp_path):
    path = write_gguf(tmp_path / "nomerges.gguf", merges=False)
    with pytest.raises(ValueError, match="nomerges.gguf: its tokenizer metadata cannot be used"):
        open_model(str(path)).tokenizer()


def test_corrupt_safetensors_header_names_the_file(tmp_path):
    folder = write_hf(tmp_path / "m")
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(ValueError, match="model.safetensors is not a usable safetensors file"):
        open_model(str(folder))


@pytest.mark.parametrize("command", [["generate", "a b", "--max-tokens", "2"], ["serve", "--port", "0"]])
def test_generate_and_serve_refuse_a_lying_gguf_in_one_line(tmp_path, capsys, command):
    path = write_gguf(tmp_path / "m.gguf", {"block_count": 2**31})
    assert main([*command, "--model", str(path), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err == f"fitllm: error: {path}: llama.block_count is 2147483648; fitllm accepts at most 16384\n"


def test_context_length_2_32_loads_at_a_context_that_fits(tmp_path, caplog):
    """The model's own context (2^32 - 1) cannot be served by the budget: the engine starts at the longest
    context that fits (with a warning naming --max-model-len) instead of tabulating rotary for 2^32 positions."""
    path = write_gguf(tmp_path / "m.gguf", {"context_length": 2**32 - 1})
    before, start = _peak_rss(), time.perf_counter()
    kw = dict(model=str(path), device="cpu", dtype="float32", memory_budget="8MiB", max_num_seqs=4,
              max_num_batched_tokens=64)  # fmt: skip
    with caplog.at_level("WARNING", logger="fitllm"):
        engine = Engine(EngineConfig(**kw))
    assert time.perf_counter() - start < 10
    assert _peak_rss() - before < 512 << 20
    assert 2 <= engine.max_model_len <= (8 << 20) // engine.kv_bytes_per_token
    assert "--max-model-len" in caplog.text
    assert (
        engine.max_model_len <= engine.model.rotary.cos_sin.shape[1] <= (8 << 20) // engine.kv_bytes_per_token
    )
    out = list(engine.stream([2, 3, 4], engine_params()))
    assert len(out[-1].outputs[0].token_ids) == 3
    # An asked-for context is honoured when it can be served, refused naming the flag when it cannot.
    assert Engine(EngineConfig(**kw, max_model_len=128)).max_model_len == 128
    with pytest.raises(ValueError, match="--max-model-len 4294967295 needs .* of KV for one request"):
        Engine(EngineConfig(**kw, max_model_len=2**32 - 1))


def engine_params():
    from fitllm import SamplingParams

    return SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)


def test_good_tiny_checkpoints_pass_the_checks(tmp_path):
    """The control: the same writers with honest headers open, in both formats."""
    assert open_model(str(write_gguf(tmp_path / "m.gguf"))).config.num_hidden_layers == 2
    assert open_model(str(write_hf(tmp_path / "m"))).config.intermediate_size == 128


def test_weights_past_the_budget_are_refused_with_the_planners_numbers(tmp_path):
    """What the (checked) config implies is compared with the budget before the model is allocated."""
    folder = write_hf(tmp_path / "m", vocab=4096)  # embedding and head: 1 MiB each in float32
    config = EngineConfig(model=str(folder), device="cpu", dtype="float32", memory_budget="1MiB")
    with pytest.raises(ValueError, match=r"outside the decoder layers \(embedding, head, norms: 2\.00 MiB\)"):
        Engine(config)
