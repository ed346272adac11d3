"""XGLM (fairseq-dense, e.g. KoboldAI/fairseq-dense-13B-Janeway) over the paged KV cache.

Transformers' `XGLMForCausalLM`: token embeddings scaled by sqrt(d_model), plus sinusoidal positions
(tensor2tensor layout: sin of every frequency, then cos, over half_dim - 1 spaced log-frequencies) read at
position + 2 (fairseq's padding offset); pre-LayerNorm decoder layers (multi-head attention with biases,
then fc1 -> GELU -> fc2 with biases); a final LayerNorm; the LM head tied to the token embeddings.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from fitllm.config import ModelConfig
from fitllm.model.attention import AttentionMetadata, PagedAttention
from fitllm.model.linear import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from fitllm.model.loading import load_parameter
from fitllm.model.vocab import compute_logits, vocab_layers
from fitllm.quant.base import QuantMethod

POSITION_OFFSET = 2  # fairseq's learned-position padding offset, kept by XGLM's sinusoidal table


def sinusoidal_positions(num_positions: int, dim: int) -> torch.Tensor:
    """[num_positions, dim] float32: sin(p * f_i) then cos(p * f_i), f_i = 10000^(-i / (dim / 2 - 1))."""
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32) * -(math.log(10000) / (half - 1)))
    angles = torch.arange(num_positions, dtype=torch.float32).unsqueeze(1) * freqs.unsqueeze(0)
    table = torch.cat([angles.sin(), angles.cos()], dim=1)
    if dim % 2:
        table = torch.cat([table, torch.zeros(num_positions, 1)], dim=1)
    return table


class LayerNorm(nn.Module):
    """LayerNorm with weight and bias, computed in float32."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(hidden_size), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps).to(
            x.dtype
        )


class XGLMDecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, quant: QuantMethod | None) -> None:
        super().__init__()
        d, heads, hd = config.hidden_size, config.num_attention_heads, config.head_dim
        self.self_attn_layer_norm = LayerNorm(d, config.rms_norm_eps)
        self.qkv_proj = QKVParallelLinear(d, hd, heads, heads, True, quant)
        self.out_proj = RowParallelLinear(heads * hd, d, bias=True, quant=quant)
        self.num_heads, self.head_dim = self.qkv_proj.num_heads, hd
        self.attn = PagedAttention(self.num_heads, self.num_heads, hd, scale=hd**-0.5)
        self.final_layer_norm = LayerNorm(d, config.rms_norm_eps)
        self.fc1 = ColumnParallelLinear(d, config.intermediate_size, bias=True, quant=quant)
        self.fc2 = RowParallelLinear(config.intermediate_size, d, bias=True, quant=quant)
        self.approximate = "tanh" if config.hidden_act in ("gelu_new", "gelu_pytorch_tanh") else "none"

    def forward(self, x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(self.self_attn_layer_norm(x)).chunk(3, dim=-1)
        shape = (t, self.num_heads, self.head_dim)
        attn = self.attn(q.reshape(shape), k.reshape(shape), v.reshape(shape), meta)
        x = x + self.out_proj(attn.reshape(t, -1))
        h = F.gelu(self.fc1(self.final_layer_norm(x)), approximate=self.approximate)
        return x + self.fc2(h)


class XGLMForCausalLM(nn.Module):
    """XGLM decoder + tied LM head; `forward` returns hidden states, `compute_logits` for sampled rows."""

    def __init__(self, config: ModelConfig, quant: QuantMethod | None = None) -> None:
        super().__init__()
        self.config = config
        self.embed_scale = math.sqrt(config.hidden_size) if config.scale_embedding else 1.0
        self.embed_tokens, self.lm_head = vocab_layers(config, quant)
        self.layers = nn.ModuleList(XGLMDecoderLayer(config, quant) for _ in range(config.num_hidden_layers))
        self.layer_norm = LayerNorm(config.hidden_size, config.rms_norm_eps)
        self.positions: torch.Tensor | None = None  # built by `prepare` (computed, not loaded)

    def attention_layers(self) -> list[PagedAttention]:
        return [layer.attn for layer in self.layers]

    def prepare(self, device: torch.device, dtype: torch.dtype, max_position: int) -> None:
        """The sinusoidal table up to max_position (+ the offset), rounded to the model dtype once."""
        table = sinusoidal_positions(max(max_position, 1) + POSITION_OFFSET, self.config.hidden_size)
        self.positions = table.to(device=device, dtype=dtype)

    def forward(
        self, input_ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata
    ) -> torch.Tensor:
        assert self.positions is not None, "XGLMForCausalLM.prepare was not called"
        h = self.embed_tokens(input_ids) * self.embed_scale
        h = h + self.positions.index_select(0, positions + POSITION_OFFSET)
        for layer in self.layers:
            h = layer(h, meta)
        return self.layer_norm(h)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return compute_logits(self.embed_tokens, self.lm_head, hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Hugging Face XGLM names (q/k/v fused into qkv_proj); returns the parameter names loaded."""
        params = dict(self.named_parameters())
        loaded: set[str] = set()
        for hf_name, tensor in weights:
            name = hf_name.removeprefix("model.")
            if name == "lm_head.weight" and self.lm_head is None:
                continue  # tied to the embedding
            if "embed_positions" in name:
                continue  # sinusoidal: computed, not loaded
            shard = None
            for proj, qkv in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v")):
                if f".self_attn.{proj}." in name:
                    name, shard = name.replace(f".self_attn.{proj}.", ".qkv_proj."), qkv
                    break
            name = name.replace(".self_attn.out_proj.", ".out_proj.")
            if name not in params:
                raise ValueError(f"checkpoint tensor {hf_name!r} has no place in XGLMForCausalLM")
            load_parameter(self, params, name, tensor, shard)
            loaded.add(name)
        return loaded
