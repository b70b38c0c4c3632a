"""PTQTP: post-training quantization to two ternary trit-planes (Xiao et al., docs/related.md §12).

How it works
------------
Each row (or each group of ``G`` columns of a row) ``w`` is approximated by two scaled trit
planes, ``ŵ = α¹·t¹ + α²·t²`` with ``t¹, t² ∈ {−1, 0, 1}^G`` -- up to 9 levels per group.
The objective is the plain Frobenius error ``‖w − ŵ‖²``: no calibration data.

1. **Init (progressive)**: ``t¹ = round(clip(w / mean|w|, −1, 1))`` (absmean ternary),
   ``α¹ = ⟨w, t¹⟩ / ⟨t¹, t¹⟩`` (its least-squares scale); the residual ``r = w − α¹t¹`` gives
   ``t²`` and ``α²`` the same way.
2. **Alternate** up to ``iters`` times, until the relative error improves by less than ``tol``:

   a. *scales*: with ``T = [t¹ t²]`` fixed, the ridge solution
      ``α = (TᵀT + λI)⁻¹ Tᵀw`` (a 2×2 system per group, closed form in float64; a singular
      system -- an empty or repeated plane -- gets the one-plane least-squares fit);
   b. *trits*: with ``α`` fixed, each element independently takes the best of the 9 pairs
      ``(t¹, t²)`` -- exact, since the error is separable per element (computed as 3
      candidates: the best ``t²`` for each ``t¹`` is a clipped rounding).

   ``λ`` starts at ``ridge`` and is multiplied by ``ridge_decay`` each iteration ("progressive
   regularization"; the paper's schedule is not published). With ``λ = 0`` both steps are exact
   minimisations, so the error never increases; with ``λ > 0`` an iteration that would increase
   it is undone and ``λ`` is set to 0 from then on, so the recorded error is non-increasing in
   every case.

Storage: two ternary planes in tbt's ``ternary_2bit`` packing (``2·row_bytes(K)·8`` bits per
row) plus two float16 scales per group -- about 4 bpw, not the "2 × 1.58" of the paper's title
(≈3.2 bpw in a base-3 packing).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tbt.export.ptq_layers import dequantize_planes
from tbt.ptq.registry import SCALE_BITS, LayerQuant, LayerStats, register_ptq_method
from tbt.ptq.rtn import code_bits


@dataclass(frozen=True)
class PTQTPConfig:
    """Args: group_size (columns per scale pair; ``None`` = whole row), iters (max
    alternations), tol (stop when the relative error falls by less), ridge (initial λ),
    ridge_decay (λ multiplier per iteration)."""

    group_size: int | None = None
    iters: int = 50
    tol: float = 1e-6
    ridge: float = 0.0
    ridge_decay: float = 0.5

    def __post_init__(self) -> None:
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None (per row); got {self.group_size}")
        if self.iters < 0 or self.tol < 0 or self.ridge < 0 or not 0 <= self.ridge_decay <= 1:
            raise ValueError("need iters >= 0, tol >= 0, ridge >= 0 and 0 <= ridge_decay <= 1")


def _ternarize_ls(x: Tensor) -> tuple[Tensor, Tensor]:
    """Absmean ternary codes of each row of ``x`` and their least-squares scale ``(n, 1)``."""
    m = x.abs().mean(dim=1, keepdim=True)
    t = (x / m.masked_fill(m == 0, 1.0)).clamp_(-1, 1).round_()
    nn = (t * t).sum(dim=1, keepdim=True)
    return t, (x * t).sum(dim=1, keepdim=True) / nn.clamp_min(1.0)


def solve_scales(x: Tensor, t1: Tensor, t2: Tensor, lam: float = 0.0) -> Tensor:
    """Ridge scales ``(n, 2)``: ``argmin_α ‖x − α₁t¹ − α₂t²‖² + λ‖α‖²`` per row.

    The 2×2 normal equations are solved in closed form (Cramer). A singular system (a plane
    that is empty or a multiple of the other) falls back to the one-plane least-squares fit
    of the non-empty plane, ``α = (⟨t, x⟩/(⟨t, t⟩ + λ), 0)``, which reaches the same minimum.
    """
    a11, a22, a12 = (t1 * t1).sum(1) + lam, (t2 * t2).sum(1) + lam, (t1 * t2).sum(1)
    b1, b2 = (t1 * x).sum(1), (t2 * x).sum(1)
    det = a11 * a22 - a12 * a12
    ok = det.abs() > 1e-9 * (a11 * a22).clamp_min(1e-300)
    safe = det.masked_fill(~ok, 1.0)
    s1, s2 = (a22 * b1 - a12 * b2) / safe, (a11 * b2 - a12 * b1) / safe
    use1 = a11 > lam  # plane 1 not empty: fit it alone; else plane 2
    f1 = torch.where(use1, b1 / a11.clamp_min(1e-300), torch.zeros_like(b1))
    f2 = torch.where(use1, torch.zeros_like(b2), b2 / a22.clamp_min(1e-300))
    return torch.stack([torch.where(ok, s1, f1), torch.where(ok, s2, f2)], -1)


def search_trits(x: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """Per element the best of the 9 pairs ``(t¹, t²)`` for scales ``alpha (n, 2)``.

    For each ``t¹ ∈ {−1, 0, 1}`` the best ``t²`` is ``clip(round((x − α¹t¹)/α²), −1, 1)``
    (``0`` when ``α² = 0``), so 3 candidates instead of 9 cover the exact optimum.
    """
    dtype = x.dtype
    x, alpha = x.to(torch.float32), alpha.to(torch.float32)  # picks trits only: float32 is enough
    a1, a2 = alpha[:, :1], alpha[:, 1:]
    inv = torch.where(a2 == 0, torch.zeros_like(a2), 1.0 / a2.masked_fill(a2 == 0, 1.0))
    best_err = best_t1 = best_t2 = None
    for t in (0.0, -1.0, 1.0):
        r = x - a1 * t
        t2 = (r * inv).clamp_(-1, 1).round_()
        err = (r - a2 * t2).abs_()
        if best_err is None:
            best_err, best_t1, best_t2 = err, torch.zeros_like(x), t2
        else:
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_t1 = best_t1.masked_fill(better, t)
            best_t2 = torch.where(better, t2, best_t2)
    return best_t1.to(dtype), best_t2.to(dtype)


def ptqtp(w: Tensor, cfg: PTQTPConfig = PTQTPConfig()
          ) -> tuple[Tensor, Tensor, Tensor, list[float]]:
    """Two-trit-plane approximation of ``w (out, in)``.

    Returns:
        ``t1, t2``: int8 ``(out, in)``; ``alpha``: float32 ``(out, n_groups, 2)``;
        ``history``: relative error ``‖w − ŵ‖²/‖w‖²`` after the init and each iteration
        (non-increasing).
    """
    out, k = w.shape
    g = cfg.group_size or k
    if k % g:
        raise ValueError(f"in_features={k} is not a multiple of group_size={g}; pick a divisor "
                         f"of {k} or group_size=None (per row)")
    x = w.detach().to(torch.float64).reshape(out * (k // g), g)  # (n, G) one row per group
    norm = float((x * x).sum()) or 1.0
    t1, a1 = _ternarize_ls(x)
    t2, a2 = _ternarize_ls(x - a1 * t1)
    alpha = torch.cat([a1, a2], dim=1)

    def err(t1_, t2_, al):
        r = x - al[:, :1] * t1_ - al[:, 1:] * t2_
        return float((r * r).sum()) / norm

    history = [err(t1, t2, alpha)]
    lam = cfg.ridge
    for _ in range(cfg.iters):
        new_alpha = solve_scales(x, t1, t2, lam)
        n1, n2 = search_trits(x, new_alpha)
        e = err(n1, n2, new_alpha)
        if e > history[-1]:  # λ > 0 (or a float32 near-tie): undo, continue unregularized
            if lam == 0:
                break
            lam = 0.0
            continue
        improved = history[-1] - e
        t1, t2, alpha = n1, n2, new_alpha
        history.append(e)
        lam *= cfg.ridge_decay
        if improved <= cfg.tol * max(history[0], 1e-30):
            break
    shape = (out, k)
    return (t1.reshape(shape).to(torch.int8), t2.reshape(shape).to(torch.int8),
            alpha.reshape(out, k // g, 2).to(torch.float32), history)


@register_ptq_method("ptqtp", PTQTPConfig, needs_gram=False,
                     summary="two ternary trit-planes, alternating ridge/trit search (docs/related.md §12)")
def quantize_ptqtp(w: Tensor, stats: LayerStats, cfg: PTQTPConfig) -> LayerQuant:
    t1, t2, alpha, history = ptqtp(w, cfg)
    rows, k = w.shape
    bits = 2 * code_bits(rows, k, 2) + alpha.numel() * SCALE_BITS
    info = {"iterations": len(history) - 1, "rel_error_init": history[0],
            "rel_error_final": history[-1]}
    return LayerQuant(dequantize_planes(t1, t2, alpha), bits, info=info,
                      tensors={"plane1": t1, "plane2": t2, "alpha": alpha})
