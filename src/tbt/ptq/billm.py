"""BiLLM: 1-bit PTQ, residual binarization of salient columns (Huang et al., docs/related.md §14).

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

Storage (honest, what the packed export stores): 2 sign bits per salient weight, 1 sign bit +
1 group bit per other weight, a column bitmap, each plane's rows padded to whole bytes, and 4
``(μ, α)`` pairs in float16 per row per block (salient order 1 and 2, two groups). The paper's
convention (``bits_reported``) keeps only the sign bits and the bitmap.
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


def braq(x: Tensor, mask: Tensor, order: int, terms: list | None = None) -> Tensor:
    """Order-``order`` residual binarization of ``x (rows, B)`` over ``mask`` per row; 0 off
    the mask. ``mask`` may carry leading candidate dimensions, e.g. ``(C, 1, B)`` or
    ``(C, rows, B)``: the result is then ``(C, rows, B)``, one binarization per candidate.
    ``terms``: a list that receives ``(μ_k, α_k, sign_k)`` per order (what the packed export
    stores; the output is ``Σ_k (μ_k + α_k·sign_k)`` on the mask)."""
    m = mask.to(x.dtype)
    n = m.sum(-1, keepdim=True).clamp_min(1.0)
    r = x * m
    out = torch.zeros_like(r)
    for _ in range(order):
        mu = (r * m).sum(-1, keepdim=True) / n
        c = r - mu
        alpha = (c.abs() * m).sum(-1, keepdim=True) / n
        sign = torch.where(c < 0, -1.0, 1.0).to(x.dtype)
        b = (mu + alpha * sign) * m
        out, r = out + b, r - b
        if terms is not None:
            terms.append((mu, alpha, sign))
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


def billm_block(wb: Tensor, col_score: Tensor, max_salient: int, chunk: int = 8,
                parts: dict | None = None) -> tuple[Tensor, int, float]:
    """Quantize one block ``(out, B)``: returns ``(Q_b, k salient columns, split p)``.

    The searches and the binarization run in float32 (the result has ``wb``'s dtype).
    ``parts``: a dict that receives the block's stored representation (:func:`_block_parts`)."""
    dtype, wb = wb.dtype, wb.to(torch.float32)
    width = wb.shape[1]
    order = torch.argsort(col_score, descending=True)
    kmax = min(max_salient, width) - 1
    k = _search_salient(wb, order, kmax, chunk) if kmax >= 1 else width
    sal = torch.zeros_like(wb, dtype=torch.bool)
    sal[:, order[:k]] = True
    q, p = _split(wb, sal, braq(wb, sal, 2), chunk)
    if parts is not None:
        parts.update(_block_parts(wb, sal, p))
    return q.to(dtype), k, p


def _block_parts(wb: Tensor, sal: Tensor, p: float) -> dict[str, Tensor]:
    """The block as stored: sign planes, masks and the four ``(μ, α)`` pairs per row.

    ``sign1`` (rows, B): order-1 sign on salient columns, the group's sign elsewhere;
    ``sign2`` (rows, B): order-2 sign (used on salient columns); ``sparse`` (rows, B): ``|w| ≥ p``
    among the non-salient entries; ``salient`` (B,); ``params`` (rows, 4, 2) float32:
    (μ, α) of salient order 1, salient order 2, the concentrated and the sparse group. The
    same calls as :func:`_split`, so ``Q_b`` is rebuilt from them bit for bit."""
    rest = ~sal
    sparse = rest & (wb.abs() >= p) if bool(rest.any()) else torch.zeros_like(rest)
    t_sal: list = []
    t_lo: list = []
    t_hi: list = []
    braq(wb, sal, 2, t_sal)
    braq(wb, rest & ~sparse, 1, t_lo)
    braq(wb, sparse, 1, t_hi)
    sign1 = torch.where(sal, t_sal[0][2], torch.where(sparse, t_hi[0][2], t_lo[0][2]))
    pairs = [t_sal[0], t_sal[1], t_lo[0], t_hi[0]]
    params = torch.stack([torch.cat([mu, al], 1) for mu, al, _ in pairs], 1)  # (rows, 4, 2)
    return {"sign1": sign1.to(torch.int8), "sign2": t_sal[1][2].to(torch.int8),
            "sparse": sparse, "salient": sal[0], "params": params.to(torch.float32)}


def billm_bits(rows: int, widths: list[int], ks: list[int]) -> tuple[int, int]:
    """(honest bits, paper-convention bits) for blocks of ``widths`` with ``ks`` salient columns.

    Honest = what the packed export stores (``docs/format.md`` §9, scheme ``billm``), rows
    padded to whole bytes like every tbt plane: a ``binary_1bit`` plane of all ``K`` signs
    (order 1 on salient columns), a plane of the ``S = Σk`` salient columns' order-2 signs, a
    plane of the ``K − S`` group bits, the ``K``-bit salient-column bitmap, and 4 (μ, α) pairs
    in float16 per row per block. Paper = sign bits + bitmap, no padding, no scales."""
    from tbt.export.format import Packing

    row_bytes = Packing.BINARY_1BIT.row_bytes
    k_all, s_all = sum(widths), sum(ks)
    honest = (rows * 8 * (row_bytes(k_all) + row_bytes(s_all) if s_all else row_bytes(k_all))
              + (rows * 8 * row_bytes(k_all - s_all) if k_all > s_all else 0)
              + 8 * row_bytes(k_all) + rows * len(widths) * 8 * SCALE_BITS)
    reported = sum(rows * (2 * k + (w - k)) + w for w, k in zip(widths, ks, strict=True))
    return honest, reported


@register_ptq_method("billm", BiLLMConfig, needs_gram=True,
                     summary="residual-binarized salient columns, split search, GPTQ (docs/related.md §14)")
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
    blocks: list[dict[str, Tensor]] = []

    def quantize_block(b0: int, wb: Tensor) -> Tensor:
        if cfg.salient_metric == "hessian":
            score = (wb.pow(2) / d[b0:b0 + wb.shape[1]].pow(2)).sum(0)
        else:
            score = wb.abs().sum(0)
        blocks.append({})
        q, k, p = billm_block(wb, score, cfg.max_salient, parts=blocks[-1])
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
                      info={"salient_columns": ks, "split": splits},
                      tensors=_layer_tensors(blocks))


def _layer_tensors(blocks: list[dict[str, Tensor]]) -> dict[str, Tensor]:
    """The blocks' parts as whole-layer tensors (the packed export's ``billm`` scheme):
    ``plane1`` int8 ±1 (out, K), ``plane2`` int8 ±1 (out, S) and ``group`` bool (out, K − S)
    in ascending column order of the salient / other columns, ``salient_cols`` bool (K,),
    ``pairs`` float32 (out, n_blocks, 4, 2)."""
    sal = torch.cat([b["salient"] for b in blocks])
    sign2 = torch.cat([b["sign2"] for b in blocks], 1)
    sparse = torch.cat([b["sparse"] for b in blocks], 1)
    return {"plane1": torch.cat([b["sign1"] for b in blocks], 1), "plane2": sign2[:, sal],
            "group": sparse[:, ~sal], "salient_cols": sal,
            "pairs": torch.stack([b["params"] for b in blocks], 1)}
