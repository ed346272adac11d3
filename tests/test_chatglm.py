"""The original ChatGLM checkpoint layout (fitllm/loader/chatglm.py): a random transformers GLM model saved
the way THUDM publishes GLM-4 (ChatGLMModel config, fused query_key_value, dense_h_to_4h, output_layer)
loads in fitllm with the logits of transformers' own model, and bitwise the logits of the native layout."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import build_random_model, hf_greedy, run_engine, write_tokenizer
from safetensors.torch import save_file

from fitllm import Engine, EngineConfig
from fitllm.loader.chatglm import chatglm_weight_name


def save_chatglm(model, folder) -> None:
    """Write `model` (transformers GlmForCausalLM) in the ChatGLM layout, with a ChatGLM config.json."""
    c = model.config
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    out = {
        "transformer.embedding.word_embeddings.weight": sd.pop("model.embed_tokens.weight"),
        "transformer.encoder.final_layernorm.weight": sd.pop("model.norm.weight"),
        "transformer.output_layer.weight": sd.pop("lm_head.weight"),
        "transformer.rotary_pos_emb.inv_freq": torch.ones(c.head_dim // 4),  # present in real files
    }
    for i in range(c.num_hidden_layers):
        p, q = f"model.layers.{i}.", f"transformer.encoder.layers.{i}."
        a = p + "self_attn."
        out[q + "self_attention.query_key_value.weight"] = torch.cat(
            [sd.pop(a + f"{x}_proj.weight") for x in "qkv"]
        )
        out[q + "self_attention.query_key_value.bias"] = torch.cat(
            [sd.pop(a + f"{x}_proj.bias") for x in "qkv"]
        )
        out[q + "self_attention.dense.weight"] = sd.pop(a + "o_proj.weight")
        out[q + "input_layernorm.weight"] = sd.pop(p + "input_layernorm.weight")
        out[q + "post_attention_layernorm.weight"] = sd.pop(p + "post_attention_layernorm.weight")
        out[q + "mlp.dense_h_to_4h.weight"] = sd.pop(p + "mlp.gate_up_proj.weight")
        out[q + "mlp.dense_4h_to_h.weight"] = sd.pop(p + "mlp.down_proj.weight")
    assert not sd, f"unmapped: {list(sd)}"
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in out.items()}, str(folder / "model.safetensors"))
    theta = c.rope_parameters["rope_theta"]
    config = {
        "architectures": ["ChatGLMModel"],
        "model_type": "chatglm",
        "auto_map": {"AutoModel": "modeling_chatglm.ChatGLMForConditionalGeneration"},  # never executed
        "num_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "multi_query_attention": True,
        "multi_query_group_num": c.num_key_value_heads,
        "kv_channels": c.head_dim,
        "ffn_hidden_size": c.intermediate_size,
        "padded_vocab_size": c.vocab_size,
        "seq_length": c.max_position_embeddings,
        "layernorm_epsilon": c.rms_norm_eps,
        "rope_ratio": theta / 10000.0,
        "add_qkv_bias": True,
        "add_bias_linear": False,
        "rmsnorm": True,
        "post_layer_norm": True,
        "apply_residual_connection_post_layernorm": False,
        "original_rope": True,
        "eos_token_id": c.eos_token_id,
        "tie_word_embeddings": False,
    }
    (folder / "config.json").write_text(json.dumps(config))
    write_tokenizer(folder, c.vocab_size)


def test_chatglm_layout_loads_with_transformers_logits(tmp_path):
    model = build_random_model(
        "glm",
        seed=23,
        rope_parameters={"rope_type": "default", "rope_theta": 50_000.0, "partial_rotary_factor": 0.5},
    )
    folder = tmp_path / "chatglm"
    save_chatglm(model, folder)
    engine = Engine(EngineConfig(model=str(folder), dtype="float32", max_model_len=128, max_num_seqs=4))
    mc = engine.model_config
    assert (mc.architecture, mc.rope_theta, mc.head_dim, mc.partial_rotary_factor) == (
        "GlmForCausalLM",
        50_000.0,
        16,
        0.5,
    )
    prompt = list(range(5, 40))
    tokens, logits = run_engine(engine, prompt, 17)  # a prefill and 16 decode steps
    ref_tokens, ref_logits = hf_greedy(model, prompt, 12)
    assert tokens[:12] == ref_tokens and len(set(ref_tokens)) > 3  # varied, so the match means something
    for a, b in zip(logits, ref_logits, strict=False):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max() + 1e-5
    # The weight-name map is exact: the same model saved in transformers' native GLM layout loads in fitllm
    # with bitwise the same logits, at the prefill and every decode step.
    native = tmp_path / "native"
    model.save_pretrained(native)
    write_tokenizer(native, model.config.vocab_size)
    engine = Engine(EngineConfig(model=str(native), dtype="float32", max_model_len=128, max_num_seqs=4))
    native_tokens, native_logits = run_engine(engine, prompt, 17)
    assert native_tokens == tokens and len(native_logits) == len(logits) == 17
    for step, (a, b) in enumerate(zip(logits, native_logits, strict=True)):
        assert torch.equal(a, b), f"step {step}: max difference {(a - b).abs().max()}"


def test_chatglm_names_and_refusals():
    assert (
        chatglm_weight_name("transformer.encoder.layers.7.mlp.dense_h_to_4h.weight")
        == "model.layers.7.mlp.gate_up_proj.weight"
    )
    assert chatglm_weight_name("transformer.rotary_pos_emb.inv_freq") is None
    with pytest.raises(ValueError, match="unexpected tensor"):
        chatglm_weight_name("transformer.prefix_encoder.embedding.weight")
    from fitllm.config import ModelConfig

    base = {
        "model_type": "chatglm",
        "num_layers": 2,
        "hidden_size": 64,
        "num_attention_heads": 4,
        "ffn_hidden_size": 128,
        "padded_vocab_size": 256,
    }
    with pytest.raises(ValueError, match="add_bias_linear"):
        ModelConfig.from_hf_config(base | {"add_bias_linear": True})
    mc = ModelConfig.from_hf_config(
        base | {"multi_query_attention": True, "multi_query_group_num": 2, "rope_ratio": 500}
    )
    assert (mc.num_key_value_heads, mc.rope_theta, mc.rope_interleaved) == (2, 5_000_000.0, True)


def test_custom_code_is_never_run(tmp_path):
    """A ChatGLM folder with only its Python tokenizer: a clear message, not an import of that file; an
    unknown architecture with auto_map: refused, saying why."""
    from fitllm.config import ModelConfig
    from fitllm.loader import open_model

    model = build_random_model("glm", seed=5)
    folder = tmp_path / "custom"
    save_chatglm(model, folder)
    (folder / "tokenizer.json").unlink()
    marker = tmp_path / "executed"
    (folder / "tokenization_chatglm.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    (folder / "tokenizer.model").write_text("not a real tokenizer")
    source = open_model(str(folder))
    with pytest.raises(FileNotFoundError, match="never executes") as err:
        source.tokenizer()
    assert "--tokenizer" in str(err.value) and "tokenization_chatglm.py" in str(err.value)
    assert "convert_slow_tokenizer" in str(err.value)  # a slow tokenizer's save_pretrained writes none
    assert not marker.exists()
    with pytest.raises(ValueError, match="never executes code from a checkpoint"):
        ModelConfig.from_hf_config(
            {"architectures": ["MysteryLM"], "auto_map": {"AutoModel": "x.Y"}, "model_type": "mystery"}
        )


def test_tiktoken_tokenizer_model_only_says_what_works_and_the_recipe_does(tmp_path, monkeypatch):
    """GLM-4 publishes tokenizer.model as a tiktoken BPE file read by its own Python (whose slow tokenizer's
    save_pretrained writes no tokenizer.json). A ChatGLM folder with only tokenizer.model: the message says
    to pass --tokenizer or convert with transformers' TikTokenConverter, and the conversion it gives, run as
    written (tiktoken's file reader stood in for, as tiktoken is not installed here), yields a tokenizer.json
    fitllm loads through --tokenizer."""
    import base64
    import re
    import shutil
    from pathlib import Path

    from transformers.convert_slow_tokenizer import TikTokenConverter

    from fitllm.loader import open_model

    folder = tmp_path / "glm4"
    save_chatglm(build_random_model("glm", seed=5), folder)
    (folder / "tokenizer.json").unlink()
    tokens = [bytes([b]) for b in range(256)] + [b"he", b"ll", b"hell", b"hello", b" w", b" wor"]
    (folder / "tokenizer.model").write_text(
        "".join(f"{base64.b64encode(t).decode()} {rank}\n" for rank, t in enumerate(tokens))
    )
    specials = ["<|endoftext|>", "[gMASK]", "<sop>", "<|user|>"]
    added = {str(len(tokens) + i): {"content": t, "special": True} for i, t in enumerate(specials)}
    (folder / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": added}))
    source = open_model(str(folder))
    with pytest.raises(FileNotFoundError) as err:
        source.tokenizer()
    message = str(err.value)
    assert "tiktoken BPE file" in message and "--tokenizer DIR" in message and "'-hf'" in message
    assert "TikTokenConverter" in message and "trust_remote_code" not in message

    out = tmp_path / "converted"
    out.mkdir()
    code = re.search(r'python -c "(.*?)"', message).group(1).replace("OUT/", f"{out}/")

    def read_tiktoken(path: str) -> dict[bytes, int]:  # tiktoken.load.load_tiktoken_bpe's format
        lines = Path(path).read_bytes().splitlines()
        return {base64.b64decode(t): int(r) for t, r in (line.split() for line in lines if line)}

    monkeypatch.setattr(TikTokenConverter, "load_tiktoken_bpe", staticmethod(read_tiktoken))
    monkeypatch.chdir(folder)
    exec(code, {})
    shutil.copy(folder / "tokenizer_config.json", out)
    tok = source.tokenizer(str(out))
    ids = tok.encode("hello world", add_special_tokens=False)
    assert ids[0] == tokens.index(b"hello") and tok.decode(ids) == "hello world"
    assert tok.encode("<|user|>", add_special_tokens=False) == [len(tokens) + 3]
