"""KV cache dtypes (`--kv-cache-dtype`): how K and V are stored, and their bytes per token.

`auto` keeps K and V in the model dtype. `int8` and `fp8` (e4m3) store each head vector (one token, layer,
K or V, KV head) as `head_dim` one-byte codes followed by its float32 scale, packed into one uint8 row of
`head_dim + 4` bytes. Packing the scale into the row keeps the cache a single tensor per slab, so the slab
storage, the ledger, swapping and gathers handle a quantized cache exactly as a float one, and the bytes
the planner reports are the bytes the pool allocates. Attention encodes new K/V on write and decodes the
rows it gathers (`KVCacheFormat`).

Scales: int8 is symmetric, s = max|x| / 127; fp8 uses s = max|x| / 448 (e4m3's largest normal value), so
each vector fills the format's range whatever the layer's magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # a type only: config.py asks this module to check --kv-cache-dtype
    from fitllm.config import ModelConfig

KV_CACHE_DTYPES = ("auto", "int8", "fp8")
SCALE_BYTES = 4  # one float32 scale per (token, layer, K/V, kv head)
_CODE_DTYPES = {"int8": torch.int8, "fp8": getattr(torch, "float8_e4m3fn", None)}
_CODE_MAX = {"int8": 127.0, "fp8": 448.0}


def check_kv_cache_dtype(name: str) -> None:
    if name not in KV_CACHE_DTYPES:
        raise ValueError(f"--kv-cache-dtype must be one of {', '.join(KV_CACHE_DTYPES)}; got {name!r}")
    if name == "fp8" and _CODE_DTYPES["fp8"] is None:
        raise ValueError(
            f"--kv-cache-dtype fp8 needs torch.float8_e4m3fn, which torch {torch.__version__} lacks; "
            "use --kv-cache-dtype int8"
        )


def kv_bytes_per_token(config: ModelConfig, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> int:
    """Bytes one token's K and V take across all layers: the one figure the planner, the engine, the slab
    storage and the swapper use (`KVCacheFormat.bytes_per_token`)."""
    fmt = KVCacheFormat(kv_cache_dtype, dtype, config.head_dim)
    return fmt.bytes_per_token(config.num_hidden_layers, config.num_key_value_heads)


@dataclass(frozen=True)
class KVCacheFormat:
    """One KV cache dtype for head vectors of `head_dim` computed in `dtype`."""

    name: str
    dtype: torch.dtype
    head_dim: int

    def __post_init__(self) -> None:
        check_kv_cache_dtype(self.name)
        if self.quantized and self.head_dim % SCALE_BYTES:
            # The scale is read as a float32 view of each row's tail: rows must stay 4-byte aligned.
            raise ValueError(
                f"--kv-cache-dtype {self.name} needs a head_dim divisible by 4; got {self.head_dim}: "
                "use --kv-cache-dtype auto"
            )

    @property
    def quantized(self) -> bool:
        return self.name != "auto"

    @property
    def storage_dtype(self) -> torch.dtype:
        """The element type of the cache tensors."""
        return torch.uint8 if self.quantized else self.dtype

    @property
    def entry_width(self) -> int:
        """Elements of storage_dtype per head vector."""
        return self.head_dim + SCALE_BYTES if self.quantized else self.head_dim

    @property
    def vector_bytes(self) -> int:
        """Bytes of one head vector (one token, layer, K or V, KV head) as stored."""
        return self.entry_width * self.storage_dtype.itemsize

    def bytes_per_token(self, num_layers: int, num_kv_heads: int) -> int:
        """Bytes one token's K and V take across `num_layers` layers of `num_kv_heads` KV heads."""
        return num_layers * 2 * num_kv_heads * self.vector_bytes

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """[..., head_dim] in any float dtype -> [..., entry_width] of storage_dtype."""
        if not self.quantized:
            return x.to(self.dtype)
        xf = x.float()
        scale = (xf.abs().amax(dim=-1, keepdim=True) / _CODE_MAX[self.name]).clamp_(min=1e-12)
        codes = xf / scale
        if self.name == "int8":
            codes = codes.round_().clamp_(-127, 127).to(torch.int8)
        else:
            codes = codes.to(_CODE_DTYPES["fp8"])
        return torch.cat([codes.view(torch.uint8), scale.view(torch.uint8)], dim=-1)

    def split(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Quantized [N, entry_width] rows -> (codes [N, head_dim] as int8 / float8 views, scales [N, 1])."""
        return rows[:, : self.head_dim].view(_CODE_DTYPES[self.name]), rows[:, self.head_dim :].view(
            torch.float32
        )

    def decode(self, rows: torch.Tensor) -> torch.Tensor:
        """[N, entry_width] of storage_dtype -> [N, head_dim] in dtype."""
        if not self.quantized:
            return rows.to(self.dtype)
        codes, scale = self.split(rows)
        # In float32, rounded once to the model dtype (a bfloat16 scale alone would add 0.4% error).
        return (codes.float() * scale).to(self.dtype)
