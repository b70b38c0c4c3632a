"""Shared pieces of the stateless weight methods (no host syncs, no Python loops over rows).

Every function takes the detached float32 weight (or a unit view of it) that a registered
method receives, and ``per_row``: statistics over each row ``(out, 1)`` or over the whole
tensor ``(1, 1)`` (:func:`tbt.quant.weight_registry.register_weight_method`).
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["ABSMEAN_EPS", "mean", "divisor", "round_clip", "sign_pm1"]

ABSMEAN_EPS = 1e-5  # BitNet b1.58: W / (γ + ε)


def mean(x: Tensor, per_row: bool) -> Tensor:
    """Mean over each row ``(out, 1)`` or over the tensor ``(1, 1)``."""
    return x.mean(dim=1, keepdim=True) if per_row else x.mean().reshape(1, 1)


def divisor(scale: Tensor) -> Tensor:
    """``scale`` safe to divide by.

    A zero scale means every weight it covers is 0 (or exactly μ), so any finite divisor gives
    ratio 0; 1 avoids 0/0 = NaN. NaN scales stay NaN.
    """
    return scale.masked_fill(scale == 0, 1.0)


def round_clip(r: Tensor, qp: int) -> Tensor:
    """int8 ``round(clip(r, −qp, qp))``, half to even; ``r`` is a scratch tensor (in place)."""
    return r.clamp_(-qp, qp).round_().to(torch.int8)


def sign_pm1(x: Tensor) -> Tensor:
    """int8 ±1 sign with ``sign(0) = +1`` (always packable in one bit)."""
    return torch.ones_like(x, dtype=torch.int8).masked_fill_(x < 0, -1)
