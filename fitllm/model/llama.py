"""Llama-family decoder (Llama 2/3, Mistral, Qwen2, SmolLM) over the paged KV cache."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from fitllm.config import ModelConfig
from fitllm.model.attention import AttentionMetadata, PagedAttention
from fitllm.model.cpu_decode_layers import CpuDecodeLayers
from fitllm.model.layers import (
    RMSNorm,
    RotaryEmbedding,
    RotaryTables,
    SiluAndMul,
)
from fitllm.model.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fitllm.model.loading import load_parameter
from fitllm.model.vocab import compute_logits, vocab_layers
from fitllm.quant.base import QuantMethod


class LlamaAttention(nn.Module):
    """Grouped-query self-attention with rotary positions and optional q/k/v bias."""

    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, quant: QuantMethod | None = None
    ) -> None:
        super().__init__()
        hd = config.head_dim
        self.qkv_proj = QKVParallelLinear(
            config.hidden_size,
            hd,
            config.num_attention_heads,
            config.num_key_value_heads,
            config.attention_bias,
            quant,
        )
        self.num_heads = self.qkv_proj.num_heads
        self.num_kv_heads = self.qkv_proj.num_kv_heads
        self.head_dim = hd
        # Llama's attention_bias covers o_proj too; Qwen2 and GLM bias only q/k/v.
        o_bias = config.attention_bias and config.model_type not in ("qwen2", "glm")
        self.o_proj = RowParallelLinear(
            config.num_attention_heads * hd, config.hidden_size, bias=o_bias, quant=quant
        )
        self.rotary = rotary
        self.attn = PagedAttention(self.num_heads, self.num_kv_heads, hd, scale=hd**-0.5)

    def forward(self, rope: RotaryTables, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        """rope: the step's rotary rows (`RotaryEmbedding.tables`, gathered once for all layers)."""
        t, hq, hk, d = x.shape[0], self.num_heads, self.num_kv_heads, self.head_dim
        qkv = self.qkv_proj(x).view(t, hq + 2 * hk, d)
        # q and k heads are adjacent in the fused projection: one rotary call rotates both.
        qk = self.rotary.apply(rope, qkv[:, : hq + hk])
        out = self.attn(qk[:, :hq], qk[:, hq:], qkv[:, hq + hk :], meta)
        return self.o_proj(out.reshape(t, hq * d))


class LlamaMLP(nn.Module):
    """SwiGLU feed-forward with fused gate/up projection."""

    def __init__(self, config: ModelConfig, quant: QuantMethod | None = None) -> None:
        super().__init__()
        if config.hidden_act != "silu":
            raise ValueError(f"Llama-family MLP supports hidden_act 'silu', got {config.hidden_act!r}")
        self.gate_up_proj = MergedColumnParallelLinear(
            config.hidden_size, [config.intermediate_size] * 2, bias=config.mlp_bias, quant=quant
        )
        self.down_proj = RowParallelLinear(
            config.intermediate_size, config.hidden_size, bias=config.mlp_bias, quant=quant
        )
        self.act = SiluAndMul()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention + MLP with the residual carried between fused add-norms."""

    def __init__(
        self, config: ModelConfig, rotary: RotaryEmbedding, quant: QuantMethod | None = None
    ) -> None:
        super().__init__()
        self.self_attn = LlamaAttention(config, rotary, quant)
        self.mlp = LlamaMLP(config, quant)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        rope: RotaryTables,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(rope, h, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


# Hugging Face parameter name fragments that fitllm stores fused: (hf fragment, fitllm fragment, shard id).
_STACKED_PARAMS = (
    ("q_proj", "qkv_proj", "q"),
    ("k_proj", "qkv_proj", "k"),
    ("v_proj", "qkv_proj", "v"),
    ("gate_proj", "gate_up_proj", 0),
    ("up_proj", "gate_up_proj", 1),
)


class LlamaForCausalLM(nn.Module):
    """Llama decoder + LM head; `forward` returns hidden states, `compute_logits` only for sampled rows."""

    def __init__(self, config: ModelConfig, quant: QuantMethod | None = None) -> None:
        """quant: how the decoder linears store their weights, and `quant.head` the LM head's (fitllm/quant;
        None: the model dtype)."""
        super().__init__()
        self.config = config
        self.rotary = RotaryEmbedding(
            int(config.head_dim * config.partial_rotary_factor),
            config.max_position_embeddings,
            config.rope_theta,
            config.rope_scaling,
            interleaved=config.rope_interleaved,
        )
        self.embed_tokens, self.lm_head = vocab_layers(config, quant)
        self.layers = nn.ModuleList(
            LlamaDecoderLayer(config, self.rotary, quant) for _ in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self._cpu_decode: list[CpuDecodeLayers | None] = []  # the C decode loop's plan, taken at first use

    def attention_layers(self) -> list[PagedAttention]:
        """The paged-attention module of each layer, in order (the runner binds KV caches to them)."""
        return [layer.self_attn.attn for layer in self.layers]

    def prepare(self, device: torch.device, dtype: torch.dtype, max_position: int) -> None:
        """Build tables that are computed, not loaded (rotary cos/sin)."""
        self.rotary.max_position = max(max_position, 1)
        self.rotary.build(device, dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        h = self.embed_tokens(input_ids)
        residual = None
        rope = self.rotary.tables(positions)
        fused = self._cpu_decode_step(h, rope, meta)
        if fused is not None:
            h, residual = fused
        else:
            for layer in self.layers:
                h, residual = layer(rope, h, residual, meta)
        h, _ = self.norm(h, residual)
        return h

    def _cpu_decode_plan(self) -> CpuDecodeLayers | None:
        """fitllm's C decode loop for this model (fitllm/model/cpu_decode_layers.py), or None where its
        layers are not in the loop's form. Taken at the first CPU step, after loading: it points at the
        loaded weights."""
        if not self._cpu_decode:
            on_cpu = self.layers[0].input_layernorm.weight.device.type == "cpu"
            self._cpu_decode.append(CpuDecodeLayers.build(self) if on_cpu else None)
        return self._cpu_decode[0]

    def decodes_in_c(self, meta: AttentionMetadata, num_tokens: int) -> bool:
        """Whether this step's decoder layers run in fitllm's C loop (a compiled forward then has nothing to
        add: the loop measured ~2x faster than the compiled graph at batch 1)."""
        plan = self._cpu_decode_plan()
        return plan is not None and plan.takes(meta, num_tokens)

    def _cpu_decode_step(
        self, h: torch.Tensor, rope: RotaryTables, meta: AttentionMetadata
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The decoder layers through fitllm's C loop where this step is in its form (a CPU decode of a few
        rows), else None."""
        if h.device.type != "cpu" or torch.compiler.is_compiling():
            return None
        plan = self._cpu_decode_plan()
        return None if plan is None else plan.run(h, rope, meta)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return compute_logits(self.embed_tokens, self.lm_head, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy Hugging Face-named tensors into the (fused, sharded) parameters; returns names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()

        def load_into(name: str, tensor: torch.Tensor, shard: object = None) -> None:
            load_parameter(self, params, name, tensor, shard)
            loaded.add(name)

        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if "rotary_emb.inv_freq" in name:
                continue
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied: the embedding serves as the head
            for hf_frag, frag, shard in _STACKED_PARAMS:
                if f".{hf_frag}." in name:
                    load_into(name.replace(f".{hf_frag}.", f".{frag}."), tensor, shard)
                    break
            else:
                if name not in params:
                    raise ValueError(f"checkpoint tensor {hf_name!r} has no place in {type(self).__name__}")
                load_into(name, tensor)
        return loaded
