"""The LM head of a packed checkpoint: full precision (default) or 8-bit on request.

How it works
------------
TBT keeps the output projection in full precision (with tied embeddings it projects with the
FP latent matrix the quantized embedding lookup is derived from, docs/numerics.md §2a). For
BART-base that matrix is 50265 × 768, a quarter of the parameters, so ``save_packed(..., lm_head="int8")``
offers a smaller head: per-row symmetric int8,

    s_r = max_k |W[r, k]| / 127   (s_r = 1 for an all-zero row),
    c[r, k] = clamp(round(W[r, k] / s_r), −127, 127)     (round half to even),
    W ≈ s_r · c[r, k],

stored as ``<head>.weight_int8`` (int8 ``(N, K)``) and ``<head>.scale`` (float32 ``(N,)``).
This is post-training quantization of a layer the method trains in FP, so its logits differ
from the FP head by the int8 rounding of W (relative error ≤ 1/254 per weight).

Backends: ``"torch"`` multiplies by the dequantized float matrix (``F.linear(x, s ⊙ c)``,
cached); ``"native"`` runs torch's fbgemm dynamic int8 linear on the same codes (activations
quantized per tensor to 8 bits on the fly by fbgemm, int32 accumulation), which reads 4× fewer
weight bytes per decoding step. When the quantized ops are missing it stays on ``"torch"``.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import Tensor, nn

from tbt.inference.cached import CachedModule, float_linear

__all__ = ["Int8Linear", "LM_HEAD_FORMATS", "quantize_rows_int8", "output_embedding_name"]

logger = logging.getLogger(__name__)

LM_HEAD_FORMATS = ("fp", "int8")


def quantize_rows_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """float ``(N, K)`` → (int8 codes ``(N, K)``, float32 scale ``(N,)``), module formula."""
    w = w.detach().to(torch.float32)
    max_abs = w.abs().amax(dim=1)
    scale = torch.where(max_abs > 0, max_abs / 127, torch.ones_like(max_abs))
    codes = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def output_embedding_name(model: nn.Module) -> str | None:
    """The qualified name of ``model.get_output_embeddings()`` (None if it has none)."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if get is not None else None
    if head is None:
        return None
    return next((n for n, m in model.named_modules() if m is head), None)


def _fbgemm_ok() -> bool:
    ops = getattr(torch.ops, "quantized", None)
    return ops is not None and hasattr(ops, "linear_prepack") and hasattr(ops, "linear_dynamic")


class Int8Linear(CachedModule):
    """``y = x·(s ⊙ c)ᵀ + b`` with per-row int8 codes ``c`` and float32 scales ``s``."""

    CACHES = ("_w_cache", "_packed")  # the dequantized weight, fbgemm's prepacked weight

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8",
                             torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("scale", torch.ones(out_features, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) \
            if bias else None
        self.weight_dtype = dtype
        self.backend = "torch"
        self._w_cache: Tensor | None = None
        self._packed = None

    @classmethod
    def from_float(cls, lin: nn.Linear) -> Int8Linear:
        new = cls(lin.in_features, lin.out_features, lin.bias is not None, lin.weight.dtype)
        codes, scale = quantize_rows_int8(lin.weight)
        new.weight_int8, new.scale = codes, scale
        if lin.bias is not None:
            new.bias = nn.Parameter(lin.bias.detach().clone(), requires_grad=False)
        return new

    def set_backend(self, backend: str, kernel_backend: str | None = None) -> str | None:
        """``"torch"`` or ``"native"`` (fbgemm dynamic int8); returns why not, or None."""
        if backend not in ("torch", "native"):
            raise ValueError(f"backend={backend!r}; choose 'native' or 'torch'")
        self.clear_cache()
        self.backend = "torch"
        if backend == "native":
            if not _fbgemm_ok():
                return "torch.ops.quantized (fbgemm) is not available"
            self.backend = "native"
        return None

    def dequantized_weight(self) -> Tensor:
        if self._w_cache is None:
            self._w_cache = (self.weight_int8.to(torch.float32) * self.scale[:, None]).to(
                self.weight_dtype)
        return self._w_cache

    def _prepacked(self):
        if self._packed is None:
            zeros = torch.zeros(self.out_features, dtype=torch.long)
            with warnings.catch_warnings():  # quantized dtypes are deprecated, still the op
                warnings.simplefilter("ignore", UserWarning)
                qw = torch._make_per_channel_quantized_tensor(
                    self.weight_int8, self.scale.to(torch.float64), zeros, 0)
            bias = None if self.bias is None else self.bias.detach().float()
            self._packed = torch.ops.quantized.linear_prepack(qw, bias)
        return self._packed

    def forward(self, x: Tensor) -> Tensor:
        if self.backend == "native" and x.device.type == "cpu" and not (
                x.requires_grad and torch.is_grad_enabled()):
            x32 = x.detach().to(torch.float32).reshape(-1, self.in_features).contiguous()
            y = torch.ops.quantized.linear_dynamic(x32, self._prepacked(), True)
            return y.view(*x.shape[:-1], self.out_features).to(x.dtype)
        return float_linear(x, self.dequantized_weight(), self.bias)  # weight_dtype

    def packed_bits(self) -> int:
        return self.weight_int8.numel() * 8 + self.scale.numel() * 32

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-row, " \
               f"bias={self.bias is not None}"
