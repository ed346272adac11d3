"""bitsandbytes methods: LLM.int8() (`bnb-int8`) and NF4 (`bnb-nf4`), for checkpoints and users that
expect them (transformers' `load_in_8bit` / `load_in_4bit`).

bitsandbytes 0.50 runs both on CPU as well as CUDA, through its functional API, which is what these
methods call: fitllm owns the parameters (so the planner counts them on the meta device and the ledger
holds them) and hands bitsandbytes the codes at matmul time.

Both check, when created for a device, that bitsandbytes really runs there (`check_device`): a tiny layer is
quantized and multiplied through the same calls, so an unsupported device fails at start, naming int8/int4.

- `bnb-int8`: per-row absmax int8 (`int8_vectorwise_quant`, from float16 as bitsandbytes does), multiplied
  by `bnb.matmul` with the outlier threshold (6.0, LLM.int8()'s): activation columns above it go through
  a float16 matmul against the dequantized weight columns, the rest through int8.
- `bnb-nf4`: 4-bit NormalFloat codes with one float32 absmax per 64 weights (`quantize_4bit`, statistics
  not nested), multiplied by `bnb.matmul_4bit`. Blocks run along each row, so a row shard quantizes
  exactly as it would inside the whole matrix (fused q/k/v and gate/up load shard by shard) as long as
  the 64-weight blocks do not straddle rows, i.e. in_features % 64 == 0.
"""

from __future__ import annotations

import logging
from types import ModuleType

import torch
from torch import nn

from fitllm.quant.base import QuantMethod

BNB_VERSION = "0.50.2"
INT8_THRESHOLD = 6.0  # LLM.int8()'s outlier threshold
NF4_BLOCK = 64
PROBE_FEATURES = NF4_BLOCK  # the start-up check's layer: one NF4 block per row


def import_bitsandbytes(method: str) -> ModuleType:
    """bitsandbytes, or a ValueError naming the install command (fitllm does not require it)."""
    try:
        import bitsandbytes
    except ImportError as exc:
        raise ValueError(
            f"--quantization {method} needs bitsandbytes, which is not installed: "
            f"`pip install --no-deps bitsandbytes=={BNB_VERSION}` (--no-deps keeps your torch build), "
            "or use --quantization int8 / int4"
        ) from exc
    # It logs a line per matmul about casting inputs to float16, and one at import about optional kernels.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
    return bitsandbytes


class _BnbMethod(QuantMethod):
    """What both bitsandbytes methods share: the import, and the check that it runs on the device."""

    bnb: ModuleType

    def check_device(self, device: torch.device, dtype: torch.dtype) -> None:
        """Quantize and multiply one tiny layer on `device` through this method's own calls; a failure (a
        bitsandbytes build without this device's backend, or too old for it) becomes a ValueError at start
        naming the alternatives, instead of an error midway through loading the model."""
        if device.type == "meta":
            return
        try:
            with torch.device(device):
                layer = nn.Module()
                self.create_weights(layer, PROBE_FEATURES, PROBE_FEATURES)
                self.load_rows(layer, 0, torch.ones(PROBE_FEATURES, PROBE_FEATURES))
                self.finish_loading(layer)
                out = self.apply(layer, torch.ones(1, PROBE_FEATURES, dtype=dtype))
            if not bool(torch.isfinite(out).all()):
                raise RuntimeError("its matmul returned non-finite values")
        except Exception as exc:  # whatever bitsandbytes raises (RuntimeError, NotImplementedError, ...)
            version = getattr(self.bnb, "__version__", "?")
            raise ValueError(
                f"--quantization {self.name}: bitsandbytes {version} does not run on {device} in {dtype} "
                f"({type(exc).__name__}: {exc}); fitllm is tested with bitsandbytes {BNB_VERSION}, "
                "or use --quantization int8 / int4"
            ) from exc


class BnbInt8Method(_BnbMethod):
    """`weight` int8 [out, in] (bitsandbytes' CB) and `weight_scale` float32 [out] (its SCB: row absmax)."""

    name = "bnb-int8"
    derived_params = ("weight_scale",)

    def __init__(self, threshold: float = INT8_THRESHOLD) -> None:
        self.bnb = import_bitsandbytes(self.name)
        self.threshold = threshold

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False
        )
        layer.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor) -> None:
        codes, absmax, _ = self.bnb.functional.int8_vectorwise_quant(rows.to(layer.weight.device).half())
        n = rows.shape[0]
        layer.weight.data.narrow(0, offset, n).copy_(codes)
        layer.weight_scale.data.narrow(0, offset, n).copy_(absmax)

    def finish_loading(self, layer: nn.Module) -> None:
        state = self.bnb.MatmulLtState()
        state.CB, state.SCB = layer.weight.data, layer.weight_scale.data
        state.threshold = self.threshold
        state.has_fp16_weights = False
        state.is_training = False  # its default is True, which skips the outlier decomposition
        layer.bnb_state = state

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return self.bnb.matmul(x, layer.weight, state=layer.bnb_state).to(x.dtype)

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        return layer.weight.data.float() * (layer.weight_scale.data.float() / 127.0)[:, None]

    def describe(self) -> str:
        return f"bnb-int8 (threshold {self.threshold})"


class BnbNF4Method(_BnbMethod):
    """`weight` uint8 [out, in / 2] (two NF4 codes per byte) and `weight_absmax` float32 [out, in / 64]."""

    name = "bnb-nf4"
    derived_params = ("weight_absmax",)

    def __init__(self) -> None:
        self.bnb = import_bitsandbytes(self.name)

    def create_weights(self, layer: nn.Module, out_features: int, in_features: int) -> None:
        if in_features % NF4_BLOCK:
            raise ValueError(
                f"--quantization bnb-nf4 quantizes blocks of {NF4_BLOCK} weights along each row; a layer with "
                f"{in_features} input features does not divide into them: use --quantization int4 or int8"
            )
        layer.weight = nn.Parameter(
            torch.empty(out_features, in_features // 2, dtype=torch.uint8), requires_grad=False
        )
        layer.weight_absmax = nn.Parameter(
            torch.empty(out_features, in_features // NF4_BLOCK, dtype=torch.float32), requires_grad=False
        )

    def load_rows(self, layer: nn.Module, offset: int, rows: torch.Tensor) -> None:
        packed, state = self.bnb.functional.quantize_4bit(
            rows.to(layer.weight.device, torch.bfloat16),
            blocksize=NF4_BLOCK,
            quant_type="nf4",
            compress_statistics=False,
        )
        n, k = rows.shape
        layer.weight.data.narrow(0, offset, n).copy_(packed.view(n, k // 2))
        layer.weight_absmax.data.narrow(0, offset, n).copy_(state.absmax.view(n, k // NF4_BLOCK))

    def finish_loading(self, layer: nn.Module) -> None:
        functional = self.bnb.functional
        n, half = layer.weight.shape
        layer.bnb_state = functional.QuantState(
            absmax=layer.weight_absmax.data.view(-1),
            shape=torch.Size([n, half * 2]),
            dtype=torch.bfloat16,
            blocksize=NF4_BLOCK,
            code=functional.get_4bit_type("nf4", device=layer.weight.device),
            quant_type="nf4",
        )

    def apply(self, layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
        state = layer.bnb_state
        state.dtype = x.dtype  # the output dtype bitsandbytes dequantizes into
        return self.bnb.matmul_4bit(x, layer.weight.view(-1, 1), quant_state=state)  # its packed layout

    def dequantize(self, layer: nn.Module) -> torch.Tensor:
        state = layer.bnb_state
        flat = layer.weight.data.view(-1, 1)
        return self.bnb.functional.dequantize_4bit(flat, state).float()
