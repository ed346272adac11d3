"""Building blocks shared by the decoder families: norms, rotary embeddings, activations (the token table
and LM head: fitllm/model/vocab.py)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from fitllm.model.cpu_norm import rms_norm_kernel
from fitllm.triton_flags import triton_available


class RMSNorm(nn.Module):
    """RMSNorm computed in float32, with an optional fused residual add (as Hugging Face rounds it)."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if _fused(x) and self.weight.dtype == x.dtype and (residual is None or residual.shape == x.shape):
            from fitllm.model.triton_fused import add_rmsnorm

            return add_rmsnorm(x, residual, self.weight, self.eps)  # one kernel on CUDA, same rounding
        # One call on CPU for decode-sized rows (a compiled graph fuses its own norm).
        kernel = rms_norm_kernel()
        if (
            kernel is not None
            and not torch.compiler.is_compiling()
            and kernel.takes(x, residual, self.weight)
        ):
            return kernel(x, residual, self.weight, self.eps)
        if residual is not None:
            x = x + residual
        # One kernel for the float32 mean-square, rsqrt and scale, rounded once to x's dtype: bit-identical
        # to the five ops Hugging Face writes (x.float(), pow, mean, rsqrt, mul, .to), which cost more than
        # the arithmetic at decode sizes.
        return self.weight * F.rms_norm(x, self.weight.shape, eps=self.eps), x


class SiluAndMul(nn.Module):
    """SwiGLU activation over a fused [gate | up] projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _fused(x):
            from fitllm.model.triton_fused import silu_mul

            return silu_mul(x)  # one kernel on CUDA, same rounding
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate) * up


def _fused(x: torch.Tensor) -> bool:
    """Whether `x` takes the fused Triton kernels (fitllm/model/triton_fused.py): contiguous, on CUDA, with
    Triton installed."""
    return x.is_cuda and x.is_contiguous() and triton_available()


def _llama3_inv_freq(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's frequency-dependent rope scaling (long wavelengths stretched, short kept)."""
    factor = scaling["factor"]
    low_freq_factor = scaling.get("low_freq_factor", 1.0)
    high_freq_factor = scaling.get("high_freq_factor", 4.0)
    old_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen = old_len / low_freq_factor
    high_freq_wavelen = old_len / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """Rotary position embedding on the first `rotary_dim` channels of each head, cos/sin tabulated once per
    position. Rotate-half layout (Llama: channel i pairs with i + rotary_dim / 2) or interleaved (GLM:
    channel 2j pairs with 2j + 1)."""

    def __init__(
        self,
        rotary_dim: int,
        max_position: int,
        base: float,
        scaling: dict[str, Any] | None = None,
        interleaved: bool = False,
    ) -> None:
        super().__init__()
        self.rotary_dim = rotary_dim
        self.interleaved = interleaved
        self.max_position = max_position
        self.base = base
        self.scaling = scaling
        # [2, max_position, rotary_dim], built by `build` on the target device: cos, and sin; in the
        # rotate-half layout sin carries rotate-half's sign (-sin on the first half, see `apply`).
        self.cos_sin: torch.Tensor | None = None

    def inv_freq(self) -> torch.Tensor:
        inv_freq = 1.0 / (
            self.base ** (torch.arange(0, self.rotary_dim, 2, dtype=torch.int64).float() / self.rotary_dim)
        )
        if self.scaling is None:
            return inv_freq
        kind = self.scaling["rope_type"]
        if kind == "linear":
            return inv_freq / self.scaling["factor"]
        if kind == "llama3":
            return _llama3_inv_freq(inv_freq, self.scaling)
        if kind == "freq_factors":  # GGUF rope_freqs: one divisor per frequency
            return inv_freq / torch.tensor(self.scaling["factors"], dtype=torch.float32)
        raise ValueError(f"rope scaling type {kind!r} is not supported (supported: linear, llama3)")

    def build(self, device: torch.device, dtype: torch.dtype) -> None:
        """Tabulate cos/sin for every position up to max_position, rounded to the model dtype once."""
        t = torch.arange(self.max_position, dtype=torch.float32)
        freqs = torch.outer(t, self.inv_freq())
        cos, sin = self._cos_sin(freqs)
        self.cos_sin = torch.stack((cos, sin)).to(device=device, dtype=dtype)

    def _cos_sin(self, angles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin rows [T, rotary_dim] of per-frequency `angles` [T, rotary_dim / 2], laid out for
        `apply` (rotate-half: the sin's first half negated, so `apply` needs no rotate_half)."""
        emb = angles.repeat_interleave(2, dim=-1) if self.interleaved else torch.cat((angles, angles), dim=-1)
        sin = emb.sin()
        if not self.interleaved:
            sin[:, : self.rotary_dim // 2].neg_()
        return emb.cos(), sin

    def tables(self, positions: torch.Tensor) -> RotaryTables:
        """The cos/sin rows of a step's positions, gathered once and shared by every layer."""
        assert self.cos_sin is not None, "RotaryEmbedding.build was not called"
        cos = self.cos_sin[0].index_select(0, positions).unsqueeze(1)
        return RotaryTables(cos, self.cos_sin[1].index_select(0, positions).unsqueeze(1))

    def apply(self, tables: RotaryTables, x: torch.Tensor) -> torch.Tensor:
        """`x` [T, H, D] (any heads: a layer's q and k heads side by side take one call) rotated."""
        rd = self.rotary_dim
        if self.interleaved:
            return _apply_rotary(x, tables.cos, tables.sin, rd, _rotate_pairs)
        # rotate_half(x) * sin == roll(x, rd / 2) * signed sin, bit for bit (a sign flip is exact), with
        # each product and the sum rounded where Hugging Face rounds them.
        rot = x if rd == x.shape[-1] else x[..., :rd]
        out = rot * tables.cos + rot.roll(rd // 2, dims=-1) * tables.sin
        return out if rd == x.shape[-1] else torch.cat((out, x[..., rd:]), dim=-1)

    def forward(
        self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q: [T, Hq, D], k: [T, Hk, D]; positions: [T]."""
        tables = self.tables(positions)
        return self.apply(tables, q), self.apply(tables, k)

    def shift(self, k: torch.Tensor, delta: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """Keys already rotated to their positions, moved `delta` positions ([T], negative: earlier) by one
        more rotation (rotations by a and b compose to a + b): a context shift's K. k: [..., T, H, D] in any
        float dtype (leading dims share each row's delta). Computed in float32 and written, rounded once,
        into `out` (default: a new float32 tensor; `k` itself shifts in place); channels past rotary_dim are
        kept. (`shift_tables` + `rotate_by` do the same with the tables shared by several calls.)"""
        return self.rotate_by(self.shift_tables(delta, k.device), k, out)

    def shift_tables(self, delta: torch.Tensor, device: torch.device) -> RotaryTables:
        """cos and sin of a shift by `delta` [T] positions, float32, [rotary_dim / 2] when every row moves
        alike, else [T, 1, rotary_dim / 2]. The angles use the scaled `inv_freq` the tables were built from
        (scaling applied once), in float64, so a shift by thousands of positions adds no angle error of its
        own; they are taken once per distinct delta (a shift has one or two), not per row."""
        values, inverse = torch.unique(delta.cpu(), return_inverse=True)
        angles = values.to(torch.float64).unsqueeze(1) * self.inv_freq().to(torch.float64).unsqueeze(0)
        cos, sin = (t.to(device=device, dtype=torch.float32) for t in (angles.cos(), angles.sin()))
        if len(values) == 1:
            return RotaryTables(cos[0], sin[0])
        inverse = inverse.to(device)
        return RotaryTables(
            cos.index_select(0, inverse).unsqueeze(1), sin.index_select(0, inverse).unsqueeze(1)
        )

    def rotate_by(
        self, tables: RotaryTables, k: torch.Tensor, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """k rotated by `shift_tables`' angles into `out` (see `shift`). Callers with many rows should call
        it on cache-sized pieces (a layer's keys): the float32 temporaries then stay in cache (measured: 30
        layers of 848 keys took 4-7 ms a layer at a time, 20 ms at once)."""
        x = k.float()  # a float32 copy, or k itself when it is float32
        x1, x2 = self._pairs(x)
        # Both halves are computed before either is written, so `out` may be `k`.
        new1 = x1 * tables.cos
        new1.sub_(x2 * tables.sin)
        new2 = x2 * tables.cos
        new2.add_(x1 * tables.sin)
        if out is None:
            out = x if x is not k else k.clone()
        elif out is not k and self.rotary_dim < k.shape[-1]:
            out[..., self.rotary_dim :] = k[..., self.rotary_dim :]
        o1, o2 = self._pairs(out)
        o1.copy_(new1)
        o2.copy_(new2)
        return out

    def shift_matrix(self, tables: RotaryTables, head_dim: int, dtype: torch.dtype) -> torch.Tensor:
        """A shift by one delta (`shift_tables` of a single delta) as a linear map on a head's channels, for
        keys stored in a 16-bit `dtype`: [2 * head_dim, head_dim], the float32 map M split into a high part
        (M rounded to `dtype`) stacked over the low part (the rest, rounded), so that one 16-bit GEMM of
        [k, k] against it gives k @ M with float32 accumulation, rounded once, as `rotate_by` does. One GEMM
        reads and writes each key once; `rotate_by`'s float32 passes cost ~5x more (measured on a 2048-token
        shift, `fitllm bench story-engine`), and the high part alone would skew every shifted key's angle."""
        rows = self.rotate_by(tables, torch.eye(head_dim, device=tables.cos.device).unsqueeze(1)).squeeze(1)
        high = rows.to(dtype)
        return torch.cat((high, (rows - high.float()).to(dtype)))

    def _pairs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the rotated channels' two halves: channel i of the first turns with channel i of the
        second (rotate-half: i and i + rotary_dim / 2; interleaved: 2j and 2j + 1)."""
        rd = self.rotary_dim
        if self.interleaved:
            return x[..., 0:rd:2], x[..., 1:rd:2]
        return x[..., : rd // 2], x[..., rd // 2 : rd]


@dataclass(frozen=True, slots=True)
class RotaryTables:
    """One step's rotary rows, [T, 1, rotary_dim] each (rotate-half layout: sin carries the sign)."""

    cos: torch.Tensor
    sin: torch.Tensor


def _rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """(x0, x1, x2, x3, ...) -> (-x1, x0, -x3, x2, ...)."""
    return torch.stack((-x[..., 1::2], x[..., 0::2]), dim=-1).flatten(-2)


def _apply_rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rotary_dim: int, rotate
) -> torch.Tensor:
    if rotary_dim == x.shape[-1]:
        return x * cos + rotate(x) * sin
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    return torch.cat((rot * cos + rotate(rot) * sin, rest), dim=-1)
