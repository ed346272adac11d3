"""The original ChatGLM checkpoint layout (THUDM's `ChatGLMModel`, `model_type` "chatglm", e.g.
codegeex4-all-9b): its config and weight names translated to transformers' native GLM layout, which fitllm
runs. The checkpoint's own modelling code (`auto_map`) is never imported or executed.

Config: num_layers, multi_query_group_num, kv_channels, ffn_hidden_size, padded_vocab_size, seq_length,
layernorm_epsilon, rope_ratio (theta = 10000 * rope_ratio), add_qkv_bias; rotary on half of each head,
channel pairs interleaved, as transformers' GlmForCausalLM. Weights: the fused query_key_value and
dense_h_to_4h keep their stacking (q, k, v rows; gate then up rows), which fitllm's fused linears split.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import torch

_LAYER = re.compile(r"^transformer\.encoder\.layers\.(\d+)\.(.+)$")
_LAYER_NAMES = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.query_key_value.weight": "self_attn.qkv_proj.weight",
    "self_attention.query_key_value.bias": "self_attn.qkv_proj.bias",
    "self_attention.dense.weight": "self_attn.o_proj.weight",
    "post_attention_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.dense_h_to_4h.weight": "mlp.gate_up_proj.weight",
    "mlp.dense_4h_to_h.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "transformer.embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "transformer.encoder.final_layernorm.weight": "model.norm.weight",
    "transformer.output_layer.weight": "lm_head.weight",
}
_SKIPPED = ("transformer.rotary_pos_emb.inv_freq",)


def is_chatglm(cfg: dict[str, Any]) -> bool:
    return cfg.get("model_type") == "chatglm" or "ChatGLMModel" in (cfg.get("architectures") or [])


def chatglm_to_glm_config(cfg: dict[str, Any]) -> dict[str, Any]:
    """A ChatGLM config.json as the equivalent transformers GLM config."""
    unsupported = [
        (not cfg.get("rmsnorm", True), "rmsnorm false (LayerNorm)"),
        (cfg.get("add_bias_linear", False), "add_bias_linear"),
        (
            cfg.get("apply_residual_connection_post_layernorm", False),
            "apply_residual_connection_post_layernorm",
        ),
        (not cfg.get("post_layer_norm", True), "post_layer_norm false"),
    ]
    for bad, what in unsupported:
        if bad:
            raise ValueError(f"this ChatGLM checkpoint uses {what}, which fitllm does not implement")
    # Missing or bad sizes pass through as they are: ModelConfig checks them and names them as here.
    heads = cfg.get("num_attention_heads")
    kv_heads = cfg.get("multi_query_group_num", heads) if cfg.get("multi_query_attention", False) else heads
    return {
        "architectures": ["GlmForCausalLM"],
        "model_type": "glm",
        "hidden_size": cfg.get("hidden_size"),
        "num_hidden_layers": cfg.get("num_layers"),
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": cfg.get("kv_channels"),  # None: hidden_size / num_attention_heads
        "intermediate_size": cfg.get("ffn_hidden_size"),
        "vocab_size": cfg.get("padded_vocab_size"),
        "rms_norm_eps": cfg.get("layernorm_epsilon", 1e-5),
        "rope_theta": 10000.0 * float(cfg.get("rope_ratio", 1.0)),
        "partial_rotary_factor": 0.5,
        "max_position_embeddings": cfg.get("seq_length", 2048),
        "attention_bias": bool(cfg.get("add_qkv_bias", False)),
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
        "eos_token_id": cfg.get("eos_token_id"),
        "bos_token_id": cfg.get("bos_token_id"),
    }


# How ChatGLM's config.json names the fields ModelConfig checks (for errors).
CHATGLM_FIELD_NAMES = {
    "num_hidden_layers": "num_layers",
    "num_key_value_heads": "multi_query_group_num",
    "head_dim": "kv_channels",
    "intermediate_size": "ffn_hidden_size",
    "vocab_size": "padded_vocab_size",
    "max_position_embeddings": "seq_length",
    "rms_norm_eps": "layernorm_epsilon",
}


def chatglm_weight_name(name: str) -> str | None:
    """The transformers GLM name of a ChatGLM tensor (None: not a weight, skip); ValueError if unknown."""
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    if name in _SKIPPED:
        return None
    m = _LAYER.match(name)
    if m and m.group(2) in _LAYER_NAMES:
        return f"model.layers.{m.group(1)}.{_LAYER_NAMES[m.group(2)]}"
    raise ValueError(f"unexpected tensor {name!r} in a ChatGLM checkpoint")


def rename_chatglm(weights: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in weights:
        new = chatglm_weight_name(name)
        if new is not None:
            yield new, tensor
