"""Tequila: absmean ternary per group plus the dead-zone bias (Huang et al., docs/related.md §7).

How it works
------------
Tequila's problem is "dead-zone trapping": with absmean ternary weights and an identity STE,
weights just inside ``|w| < Δ`` contribute nothing to the forward pass and get noisy gradients.
The released code (``quant_method="ultraquantv2"``) keeps the standard ternary weight and adds
what the dead-zone weights would have contributed, scaled by a small fixed ``λ``, as an
*input-independent* output bias. Per unit ``u`` (a group of ``g = 128`` contiguous inputs of a row
by default):

* ``s_u = mean|w_u|``, ``Δ_u = s_u/2``;
* ``T = +1`` where ``w ≥ Δ``, ``−1`` where ``w ≤ −Δ``, else ``0`` (the code's ``>=`` ties, no ε);
  ``A = s_u·T``;
* dead zone ``D = {T = 0}``; output bias ``c_r = λ·Σ_{j ∈ D_r} W_rj`` (one value per output row,
  summed over the row's groups), λ = ``QuantConfig.tequila_lambda`` (1e-3, fixed as in v2);
* ``y = x·Aᵀ + c + b``.

Backward: ``∂L/∂W = ∂L/∂A`` (identity STE, every weight) ``+ λ·1[D]·Σ_tokens ∂L/∂y_r`` (the
"direct gradient" that lets trapped weights move; :class:`_DeadZoneBias`); no gradient to ``s``.

At export the bias folds into the layer's bias (``b + c``, a bias is added to bias-free layers),
so the packed layer is a pure ternary matmul with per-group scales; it equals the eval-mode
fake-quantized layer bit for bit. With ``λ = 0`` Tequila is absmean ternary per group (test).
On an embedding the bias has no meaning: only ``A`` is used.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tbt.quant.weight import (Option, PackedWeight, WeightSpec, dequantize,
                              register_weight_quantizer)
from tbt.quant.weight_learned import WeightQuantizer

__all__ = ["TequilaQuantizer", "tequila_codes", "dead_zone_bias"]


def tequila_codes(wu: Tensor) -> tuple[Tensor, Tensor]:
    """Unit view ``(U, n)`` float32 -> (int8 codes ``T`` ``(U, n)``, ``s`` ``(U, 1)``)."""
    s = wu.abs().mean(dim=1, keepdim=True)
    delta = s / 2
    # +1 where w ≥ Δ, −1 where w ≤ −Δ (both only in an all-zero unit, Δ = 0: code 0, value 0)
    codes = (wu >= delta).to(torch.int8) - (wu <= -delta).to(torch.int8)
    return codes, s


class _IdentitySTE(torch.autograd.Function):
    """Forward: the precomputed quantized value; backward: the gradient straight to ``w``."""

    @staticmethod
    def forward(ctx, w: Tensor, value: Tensor) -> Tensor:  # type: ignore[override]
        return value

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


class _DeadZoneBias(torch.autograd.Function):
    """``c = λ·Σ_j W_rj·D_rj`` ``(out,)``; ``∂L/∂W = λ·D·(∂L/∂c)[:, None]``."""

    @staticmethod
    def forward(ctx, w: Tensor, dead: Tensor, lam: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(dead)
        ctx.lam, ctx.w_dtype = lam, w.dtype
        return _bias_value(w, dead, lam)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (dead,) = ctx.saved_tensors
        cdt = torch.promote_types(ctx.w_dtype, torch.float32)
        gw = ctx.lam * dead * grad.to(cdt)[:, None]
        return gw.to(ctx.w_dtype), None, None


def _bias_value(w: Tensor, dead: Tensor, lam: float) -> Tensor:
    """``λ·Σ_j W_rj·D_rj`` in float32 (float64 for float64 weights), cast to ``w.dtype``."""
    cdt = torch.promote_types(w.dtype, torch.float32)
    return (lam * (w.detach().to(cdt) * dead).sum(dim=1)).to(w.dtype)


def dead_zone_bias(w: Tensor, dead: Tensor, lam: float) -> Tensor:
    """Tequila's output bias of an ``(out, in)`` weight with dead-zone mask ``dead`` (bool)."""
    if torch.is_grad_enabled() and w.requires_grad:
        return _DeadZoneBias.apply(w, dead, lam)
    return _bias_value(w, dead, lam)


@register_weight_quantizer("tequila", bits=(2,), default_granularity="group", options={
    "lambda": Option(1e-3, ge=0.0, doc="the dead-zone bias factor λ, fixed (Tequila: 1e-3)")})
class TequilaQuantizer(WeightQuantizer):
    """Absmean ternary per unit with Tequila's dead-zone output bias (module docstring)."""

    method = "tequila"
    has_output_bias = True

    def __init__(self, bits: int, shape: tuple[int, int], granularity: str,
                 group_size: int = 128, num_shards: int = 1, lam: float = 1e-3) -> None:
        super().__init__(bits, shape, granularity, group_size, num_shards)
        if not lam >= 0:
            raise ValueError(f"tequila_lambda must be >= 0; got {lam!r} (the paper uses 1e-3)")
        self.lam = float(lam)

    @classmethod
    def option_kwargs(cls, spec: WeightSpec) -> dict[str, Any]:
        return {"lam": spec.option("lambda")}

    @torch.no_grad()
    def init_from_(self, w: Tensor) -> None:
        """Nothing to learn (v2 fixes λ); the statistics are recomputed every step."""

    def _codes(self, w: Tensor) -> tuple[Tensor, Tensor]:
        self.check_weight(w)
        codes, s = tequila_codes(self.units(w.detach().to(torch.float32)))
        return codes.reshape(self.shape), self.exported(s)

    def forward(self, w: Tensor) -> Tensor:
        codes, scale = self._codes(w)
        value = dequantize(codes, scale, w.dtype)
        if torch.is_grad_enabled() and w.requires_grad:
            return _IdentitySTE.apply(w, value)
        return value

    def output_bias(self, w: Tensor) -> Tensor:
        codes, _ = self._codes(w)
        return dead_zone_bias(w, codes == 0, self.lam)

    @torch.no_grad()
    def codes_and_scale(self, w: Tensor) -> PackedWeight:
        codes, scale = self._codes(w)
        return PackedWeight(codes, scale, None, self.output_bias(w))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, lambda={self.lam}"
