"""PB-LLM's QAT variant: binarize all but a frozen salient fraction kept at 8 bits (docs/related.md §13).

How it works
------------
At surgery (``from_config``, from the layer's latent weight ``W``, per tensor):

* the salient set ``S`` is the ``salient_frac`` of entries with the largest ``|W|`` (ties at the
  threshold may add a few; the released QAT code takes the two signed tails instead, [choice]);
* their values are frozen as 8-bit codes: per-row symmetric round-to-nearest
  (``tbt.quant.weight`` ``uniform``, 8 bits) of ``W``, stored dequantized in the buffer
  ``salient_values`` [choice: the released code's 8-bit zero-point is broken, docs/related.md §13].

Every forward: ``Ŵ = S ? salient_values : α·sign(W)`` with ``sign(0) = +1`` and
``α = mean_{not S} |W|`` — one scalar per tensor, the optimal scale of the *binarized* entries
alone (``α* = ‖w_B‖₁/n_B``), detached, recomputed each step (the released code). Backward: the
identity STE on the binarized entries, **zero** on the salient ones (frozen: their latent
weights never move, and their values are the buffer's).

Storage (honest, :func:`pbllm_bits`): 1 bit per binarized weight; per salient entry 8 bits and
a ``ceil(log2(in))``-bit CSR column index; ``out + 1`` 32-bit CSR row pointers; one float32
scale per row for the 8-bit part and one float32 α. There is no packed format for the sparse
side store, so the exporter keeps these layers fake-quantized (``packable=False``).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tbt.quant.weight import (Option, WeightSpec, dequantize, register_weight_quantizer,
                              weight_codes)
from tbt.quant.weight_learned import WeightQuantizer

__all__ = ["PbllmQuantizer", "pbllm_bits", "salient_mask"]


def salient_mask(w: Tensor, frac: float) -> Tensor:
    """Bool ``(out, in)``: the ``frac`` of entries with the largest ``|w|`` (ties included)."""
    n = w.numel()
    k = int(round(frac * n))
    if k <= 0:
        return torch.zeros_like(w, dtype=torch.bool)
    a = w.detach().abs().reshape(-1).to(torch.float32)
    thresh = torch.topk(a, k, sorted=False).values.min()
    return (w.detach().abs().to(torch.float32) >= thresh)


def pbllm_bits(shape: tuple[int, int], n_salient: int) -> int:
    """Bits of one ``(out, in)`` matrix with ``n_salient`` salient entries (module docstring)."""
    out_f, in_f = shape
    index = max(1, math.ceil(math.log2(in_f)))
    return (out_f * in_f - n_salient) + n_salient * (8 + index) + 32 * out_f + 32 + 32 * (out_f + 1)


class _PartialBinarySTE(torch.autograd.Function):
    """Value ``value``; gradient ``G`` on the binarized entries, 0 on the salient ones."""

    @staticmethod
    def forward(ctx, w: Tensor, value: Tensor, salient: Tensor) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(salient)
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (salient,) = ctx.saved_tensors
        return torch.where(salient, 0.0, grad), None, None


@register_weight_quantizer("pbllm", bits=(1,), default_granularity="tensor", packable=False,
                           options={"salient_frac": Option(
                               0.1, ge=0.0, le=1.0,
                               doc="fraction of weights kept frozen at 8 bits (PB-LLM: 0.1)")})
class PbllmQuantizer(WeightQuantizer):
    """PB-LLM QAT (module docstring): frozen 8-bit salient entries, the rest ``α·sign(W)``."""

    method = "pbllm"
    packable = False  # sparse 8-bit side store: no packed format

    def __init__(self, bits: int, shape: tuple[int, int], granularity: str,
                 group_size: int = 128, num_shards: int = 1, salient_frac: float = 0.1) -> None:
        if granularity != "tensor":
            raise ValueError(f"pbllm uses one binary scale per tensor (PB-LLM's QAT); got "
                             f"granularity={granularity!r}: leave it unset or use 'tensor'")
        super().__init__(bits, shape, granularity, group_size, num_shards)
        if not 0.0 <= salient_frac <= 1.0:
            raise ValueError(f"salient_frac must be in [0, 1] (PB-LLM uses 0.1); got "
                             f"{salient_frac!r}")
        self.salient_frac = float(salient_frac)
        self.register_buffer("salient", torch.zeros(shape, dtype=torch.bool))
        self.register_buffer("salient_values", torch.zeros(shape, dtype=torch.float32))

    @classmethod
    def option_kwargs(cls, spec: WeightSpec) -> dict[str, Any]:
        return {"salient_frac": spec.option("salient_frac")}

    @torch.no_grad()
    def init_from_(self, w: Tensor) -> None:
        self.check_weight(w)
        mask = salient_mask(w, self.salient_frac)
        codes, scale = weight_codes(w.detach().to(torch.float32), 8, "uniform")
        self.salient.copy_(mask)
        self.salient_values.copy_(torch.where(mask, dequantize(codes, scale), 0.0))

    def value(self, w: Tensor) -> Tensor:
        """``Ŵ`` in ``w``'s dtype (no gradient)."""
        self.check_weight(w)
        wd = w.detach().to(torch.float32)
        keep = ~self.salient
        n = keep.sum().clamp_min(1)
        alpha = torch.where(keep, wd.abs(), 0.0).sum() / n  # mean |W| over the binarized set
        binary = torch.where(wd < 0, -alpha, alpha)
        return torch.where(self.salient, self.salient_values, binary).to(w.dtype)

    def forward(self, w: Tensor) -> Tensor:
        value = self.value(w)
        if torch.is_grad_enabled() and w.requires_grad:
            return _PartialBinarySTE.apply(w, value, self.salient)
        return value

    def storage_bits(self) -> int:
        return pbllm_bits(self.shape, int(self.salient.sum()))

    def codes_and_scale(self, w: Tensor):
        raise ValueError("pbllm layers have a sparse 8-bit side store that the packed format "
                         "cannot hold; the exporter keeps them fake-quantized")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, salient_frac={self.salient_frac}"
