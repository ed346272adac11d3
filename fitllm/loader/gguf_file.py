"""GGUF files: metadata -> config dict, tensors dequantized one at a time under Hugging Face names."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fitllm.loader.gguf_reader import GGUFFile
from fitllm.quant.gguf_blocks import BLOCK_TYPES, GGUFBlocks, read_blocks

# GGUF tensor name (after blk.N.) -> Hugging Face name within model.layers.N.
_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")
# llama.cpp permutes q/k rows of Llama checkpoints for its interleaved rope; other families are stored as is.
_PERMUTED_ARCHS = ("llama",)


def _field(reader: GGUFFile, key: str, default: Any = None) -> Any:
    return reader.fields.get(key, default)


def read_gguf(path: Path) -> GGUFFile:
    """Open a GGUF file (its metadata and tensor index; no mapping, see gguf_reader.py); a truncated or
    corrupt one is one CheckpointError naming it."""
    return GGUFFile(path)


def gguf_field_names(arch: str) -> dict[str, str]:
    """How a GGUF file of `arch` names the config fields (for errors)."""
    keys = {
        "hidden_size": "embedding_length",
        "num_hidden_layers": "block_count",
        "num_attention_heads": "attention.head_count",
        "num_key_value_heads": "attention.head_count_kv",
        "head_dim": "attention.key_length",
        "intermediate_size": "feed_forward_length",
        "vocab_size": "vocab_size",
        "rms_norm_eps": "attention.layer_norm_rms_epsilon",
        "rope_theta": "rope.freq_base",
        "max_position_embeddings": "context_length",
        "rope_scaling": "rope.scaling",
    }
    return {field: f"{arch}.{key}" for field, key in keys.items()}


def gguf_tensor_shapes(reader: GGUFFile) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Hugging Face name -> (GGUF name, shape in PyTorch order) of every tensor, from the tensor infos."""
    out = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is not None:
            out[name] = (t.name, tuple(int(d) for d in reversed(t.shape)))
    return out


def _hf_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor (None: not a weight); ValueError if unknown."""
    m = _BLOCK_RE.match(gguf_name)
    if m:
        layer, kind, suffix = m.groups()
        if kind not in _LAYER_NAMES:
            raise ValueError(f"GGUF tensor {gguf_name!r} is not part of a Llama-family layer")
        return f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    if gguf_name.startswith("rope_freqs"):
        return None  # read into the config's rope_scaling by gguf_to_hf_config
    raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")


def gguf_to_hf_config(reader: GGUFFile) -> dict[str, Any]:
    """Translate GGUF metadata into a config.json-shaped dict for ModelConfig.from_hf_config."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        from fitllm.model.registry import supported_architectures

        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; fitllm supports: {', '.join(supported_architectures())}"
        )

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    # Sizes pass through unchecked: ModelConfig checks them, named by gguf_field_names.
    heads = get("attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens") or ()) or None
    cfg: dict[str, Any] = {
        "model_type": "mistral" if arch == "mistral" else arch,
        "hidden_size": get("embedding_length"),
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        # None: hidden_size / num_attention_heads
        "head_dim": get("attention.key_length") or get("rope.dimension_count"),
        "intermediate_size": get("feed_forward_length"),
        "vocab_size": vocab,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon", 1e-6),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": get("context_length", 2048),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
    }
    scaling_type = get("rope.scaling.type")
    if scaling_type == "linear":
        cfg["rope_scaling"] = {"rope_type": "linear", "factor": get("rope.scaling.factor")}
    freqs = next((t for t in reader.tensors if t.name == "rope_freqs.weight"), None)
    if freqs is not None:
        # Llama 3.1-style GGUFs store the per-frequency divisors llama.cpp applies, not the scaling config.
        cfg["rope_scaling"] = {
            "rope_type": "freq_factors",
            "factors": np.asarray(reader.read(freqs), dtype=np.float32).tolist(),
        }
    return cfg


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation back to Hugging Face's rotate-half layout."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iter_gguf_weights(
    reader: GGUFFile, cfg: dict[str, Any], as_blocks: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
    """Yield (Hugging Face name, float32 tensor) per GGUF tensor, dequantized one at a time; with
    `as_blocks`, matrices of a 32-element block type (Q8_0, Q4_0, Q4_1) come as GGUFBlocks instead (codes
    and scales: the model keeps them, or dequantizes them a chunk of rows at a time)."""
    from gguf.quants import dequantize

    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            continue
        m = _BLOCK_RE.match(t.name)
        shape = tuple(int(d) for d in reversed(t.shape))
        permuted = arch in _PERMUTED_ARCHS and m and m.group(2) in ("attn_q", "attn_k")
        heads = cfg["num_attention_heads"] if m and m.group(2) == "attn_q" else cfg["num_key_value_heads"]
        if as_blocks and t.tensor_type.name in BLOCK_TYPES and len(shape) == 2:
            blocks = read_blocks(reader.read(t), t.tensor_type.name, shape)
            if permuted:
                blocks = blocks.index_rows(_unpermute(torch.arange(shape[0]), heads))
            yield name, blocks
            continue
        array = np.asarray(dequantize(reader.read(t), t.tensor_type), dtype=np.float32).reshape(shape)
        tensor = torch.from_numpy(array)
        if permuted:
            tensor = _unpermute(tensor, heads)
        yield name, tensor
