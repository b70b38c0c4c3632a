"""BiLLM: 1-bit PTQ with residual binarization of salient columns (Huang et al., RELATED2.md §4).

How it works (per block of ``block_size`` columns, left to right)
-----------------------------------------------------------------
1. **Salient columns**: saliency ``S_ij = w_ij² / d_j²`` (``hessian``; ``d_j`` from the upper
   Cholesky factor of ``H⁻¹``) or ``|w_ij|`` (``magnitude``); columns ranked by ``Σ_i S_ij``.
   The number ``k`` of salient columns is searched in ``1 .. min(max_salient, B) − 1``: the top-k
   columns get order-2 residual binarization, the rest order 2 as well (as in the code's
   search), and the ``k`` with the smallest ``‖W_b − Q_b‖²`` wins.
2. **Bell-shaped split** of the other columns: ``p`` over the 10th..90th percentiles (81
   candidates) of their ``|w|``; the groups ``|w| < p`` (concentrated) and ``|w| ≥ p`` (sparse)
   are binarized separately (order 1), the salient columns keep order 2; the ``p`` with the
   smallest block error wins.
3. **BRAQ** (``braq(x, mask, order)``), per row over the masked entries:
   ``b_k = μ_k + α_k·sign(r_{k−1} − μ_k)``, ``μ_k = mean(r_{k−1})``,
   ``α_k = mean|r_{k−1} − μ_k|``, ``r_k = r_{k−1} − b_k``, ``r_0 = w``; output ``Σ_k b_k``.
4. **Compensation** (``gptq=True``): BiLLM's loop (:func:`tbt.ptq.gptq.gptq_blocks`) -- the
   block is quantized at once and only later blocks absorb its error.

Deviation from the code (docs/ptq.md): the searches minimise the error on ``W`` itself; the
code measures it on the saliency matrix ``S`` under the hessian metric (the paper describes
``W``). The two agree for ``magnitude``.

Storage (honest, per row per block of width ``B`` with ``k`` salient columns): 2 sign bits per
salient weight, 1 sign bit + 1 group bit per other weight, a ``B``-bit column bitmap per block,
and ``(μ, α)`` pairs in float16: 4 pairs (salient order 1 and 2, two groups) when ``k > 0``,
else 2. The paper's convention (``bits_reported``) keeps only the sign bits and the bitmap.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tbt.ptq.gptq import gptq_blocks, inverse_cholesky_upper, prepare_hessian
from tbt.ptq.registry import SCALE_BITS, LayerQuant, LayerStats, register_ptq_method

PERCENTILES = tuple(p / 100 for p in range(10, 91))


@dataclass(frozen=True)
class BiLLMConfig:
    """Args: block_size (columns per block), salient_metric (``hessian``|``magnitude``),
    max_salient (search limit for salient columns per block, the code's 50), gptq, damp."""

    block_size: int = 128
    salient_metric: str = "hessian"
    max_salient: int = 50
    gptq: bool = True
    damp: float = 0.01

    def __post_init__(self) -> None:
        if self.salient_metric not in ("hessian", "magnitude"):
            raise ValueError(f"salient_metric={self.salient_metric!r}; use 'hessian' or "
                             "'magnitude'")
        if self.block_size < 2 or self.max_salient < 2:
            raise ValueError("block_size and max_salient must be >= 2")


def braq(x: Tensor, mask: Tensor, order: int) -> Tensor:
    """Order-``order`` residual binarization of ``x (rows, B)`` over ``mask`` per row; 0 off
    the mask. ``mask`` may carry leading candidate dimensions, e.g. ``(C, 1, B)`` or
    ``(C, rows, B)``: the result is then ``(C, rows, B)``, one binarization per candidate."""
    m = mask.to(x.dtype)
    n = m.sum(-1, keepdim=True).clamp_min(1.0)
    r = x * m
    out = torch.zeros_like(r)
    for _ in range(order):
        mu = (r * m).sum(-1, keepdim=True) / n
        c = r - mu
        alpha = (c.abs() * m).sum(-1, keepdim=True) / n
        b = (mu + alpha * torch.where(c < 0, -1.0, 1.0).to(x.dtype)) * m
        out, r = out + b, r - b
    return out


def _braq1_err(x: Tensor, mask: Tensor) -> Tensor:
    """``‖m ⊙ (x − braq(x, m, 1))‖²`` per candidate without forming the binarization:
    per row ``Σ m x² − n μ² − n α²`` (since ``α = mean|x − μ|`` over the mask)."""
    m = mask.to(x.dtype)
    n = m.sum(-1, keepdim=True)
    mx = m * x
    mu = mx.sum(-1, keepdim=True) / n.clamp_min(1.0)
    alpha = ((x - mu).abs() * m).sum(-1, keepdim=True) / n.clamp_min(1.0)
    per_row = (mx * x).sum(-1, keepdim=True) - n * (mu * mu + alpha * alpha)
    return per_row.sum((-1, -2))


def _sq_err(x: Tensor, q: Tensor) -> Tensor:
    return (x - q).pow(2).sum((-1, -2))  # one error per candidate


def _search_salient(wb: Tensor, order: Tensor, kmax: int, chunk: int) -> int:
    """The ``k`` in ``1..kmax`` minimising the error of order-2 BRAQ on the top-k columns
    plus order-2 BRAQ on the others (all candidates at once, ``chunk`` at a time)."""
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    errs = []
    for k0 in range(1, kmax + 1, chunk):
        ks = torch.arange(k0, min(k0 + chunk, kmax + 1), device=wb.device)
        sal = (rank.unsqueeze(0) < ks.unsqueeze(1)).unsqueeze(1)  # (C, 1, B)
        errs.append(_sq_err(wb, braq(wb, sal, 2) + braq(wb, ~sal, 2)))
    return 1 + int(torch.cat(errs).argmin())


def _split(wb: Tensor, salient: Tensor, q_sal: Tensor, chunk: int) -> tuple[Tensor, float]:
    """Best bell-shaped split of the non-salient entries: ``(Q, p)``."""
    rest = ~salient
    a = wb.abs()
    vals = a[rest]
    if vals.numel() == 0:
        return q_sal, 0.0
    ps = torch.quantile(vals, torch.tensor(PERCENTILES, dtype=vals.dtype, device=vals.device))
    errs = []
    for i in range(0, ps.numel(), chunk):  # the salient part's error is the same for every p
        sparse = rest & (a >= ps[i:i + chunk, None, None])  # (C, rows, B)
        errs.append(_braq1_err(wb, rest & ~sparse) + _braq1_err(wb, sparse))
    p = ps[int(torch.cat(errs).argmin())]
    sparse = rest & (a >= p)
    return q_sal + braq(wb, rest & ~sparse, 1) + braq(wb, sparse, 1), float(p)


def billm_block(wb: Tensor, col_score: Tensor, max_salient: int, chunk: int = 8
                ) -> tuple[Tensor, int, float]:
    """Quantize one block ``(out, B)``: returns ``(Q_b, k salient columns, split p)``.

    The searches and the binarization run in float32 (the result has ``wb``'s dtype)."""
    dtype, wb = wb.dtype, wb.to(torch.float32)
    width = wb.shape[1]
    order = torch.argsort(col_score, descending=True)
    kmax = min(max_salient, width) - 1
    k = _search_salient(wb, order, kmax, chunk) if kmax >= 1 else width
    sal = torch.zeros_like(wb, dtype=torch.bool)
    sal[:, order[:k]] = True
    q, p = _split(wb, sal, braq(wb, sal, 2), chunk)
    return q.to(dtype), k, p


def billm_bits(rows: int, widths: list[int], ks: list[int]) -> tuple[int, int]:
    """(honest bits, paper-convention bits) for blocks of ``widths`` with ``ks`` salient columns."""
    honest = reported = 0
    for width, k in zip(widths, ks, strict=True):
        signs = rows * (2 * k + (width - k))  # 2 planes on salient columns, 1 elsewhere
        group_bits = rows * (width - k)  # which split group each non-salient weight is in
        bitmap = width  # salient-column bitmap of the block
        scales = rows * (8 if k else 4) * SCALE_BITS  # (μ, α) × {sal o1, sal o2, g1, g2}
        honest += signs + group_bits + bitmap + scales
        reported += signs + bitmap
    return honest, reported


@register_ptq_method("billm", BiLLMConfig, needs_gram=True,
                     summary="residual-binarized salient columns, split search, GPTQ (RELATED2 §4)")
def quantize_billm(w: Tensor, stats: LayerStats, cfg: BiLLMConfig) -> LayerQuant:
    need_h = cfg.gptq or cfg.salient_metric == "hessian"
    if need_h and stats.gram is None:
        raise ValueError("BiLLM with gptq=True or salient_metric='hessian' needs calibration data")
    if need_h:
        h, w64 = prepare_hessian(stats.gram, stats.n_tokens, w, cfg.damp)
        u = inverse_cholesky_upper(h)
        d = torch.diagonal(u)
    else:
        w64, u = w.detach().to(torch.float64).clone(), None
        d = torch.ones(w.shape[1], dtype=torch.float64)
    ks: list[int] = []
    splits: list[float] = []

    def quantize_block(b0: int, wb: Tensor) -> Tensor:
        if cfg.salient_metric == "hessian":
            score = (wb.pow(2) / d[b0:b0 + wb.shape[1]].pow(2)).sum(0)
        else:
            score = wb.abs().sum(0)
        q, k, p = billm_block(wb, score, cfg.max_salient)
        ks.append(k)
        splits.append(p)
        return q

    if cfg.gptq:
        q = gptq_blocks(w64, u, quantize_block, cfg.block_size)
    else:
        q = torch.cat([quantize_block(b0, w64[:, b0:b0 + cfg.block_size])
                       for b0 in range(0, w.shape[1], cfg.block_size)], dim=1)
    rows, k = w.shape
    widths = [min(cfg.block_size, k - b0) for b0 in range(0, k, cfg.block_size)]
    bits, reported = billm_bits(rows, widths, ks)
    return LayerQuant(q.to(torch.float32), bits, float(reported),
                      info={"salient_columns": ks, "split": splits})
