"""GGUF files: metadata -> config dict, tensors dequantized one at a time under Hugging Face names."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

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


def _field(reader: Any, key: str, default: Any = None) -> Any:
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def read_gguf(path: Path) -> Any:
    """Open a GGUF file (memory-mapped)."""
    import gguf

    return gguf.GGUFReader(str(path))


def gguf_to_hf_config(reader: Any) -> dict[str, Any]:
    """Translate GGUF metadata into a config.json-shaped dict for ModelConfig.from_hf_config."""
    arch = _field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        from fitllm.model.registry import supported_architectures

        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; fitllm supports: {', '.join(supported_architectures())}"
        )

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden = get("embedding_length")
    heads = get("attention.head_count")
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(_field(reader, "tokenizer.ggml.tokens"))
    cfg: dict[str, Any] = {
        "model_type": "mistral" if arch == "mistral" else arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": get("attention.key_length") or get("rope.dimension_count") or hidden // heads,
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
            "factors": np.asarray(freqs.data, dtype=np.float32).tolist(),
        }
    return cfg


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation back to Hugging Face's rotate-half layout."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def iter_gguf_weights(
    reader: Any, cfg: dict[str, Any], as_blocks: bool = False
) -> Iterator[tuple[str, torch.Tensor | GGUFBlocks]]:
    """Yield (Hugging Face name, float32 tensor) per GGUF tensor, dequantized one at a time; with
    `as_blocks`, matrices of a 32-element block type (Q8_0, Q4_0, Q4_1) come as GGUFBlocks instead (codes
    and scales: the model keeps them, or dequantizes them a chunk of rows at a time)."""
    from gguf.quants import dequantize

    arch = _field(reader, "general.architecture")
    for t in reader.tensors:
        m = _BLOCK_RE.match(t.name)
        if m:
            layer, kind, suffix = m.groups()
            if kind not in _LAYER_NAMES:
                raise ValueError(f"GGUF tensor {t.name!r} is not part of a Llama-family layer")
            name = f"model.layers.{layer}.{_LAYER_NAMES[kind]}.{suffix}"
        elif t.name in _GLOBAL_NAMES:
            name = _GLOBAL_NAMES[t.name]
        elif t.name.startswith("rope_freqs"):
            continue  # read into the config's rope_scaling by gguf_to_hf_config
        else:
            raise ValueError(f"unexpected GGUF tensor {t.name!r}")
        shape = tuple(int(d) for d in reversed(t.shape))
        permuted = arch in _PERMUTED_ARCHS and m and m.group(2) in ("attn_q", "attn_k")
        heads = cfg["num_attention_heads"] if m and m.group(2) == "attn_q" else cfg["num_key_value_heads"]
        if as_blocks and t.tensor_type.name in BLOCK_TYPES and len(shape) == 2:
            blocks = read_blocks(t.data, t.tensor_type.name, shape)
            if permuted:
                blocks = blocks.index_rows(_unpermute(torch.arange(shape[0]), heads))
            yield name, blocks
            continue
        array = np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(shape)
        if not array.flags.writeable:  # unquantized tensors are views of the read-only memory map
            array = array.copy()
        tensor = torch.from_numpy(array)
        if permuted:
            tensor = _unpermute(tensor, heads)
        yield name, tensor
