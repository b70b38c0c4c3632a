"""PB-LLM: partial binarization, salient weights kept at 8 bits (Shang et al., docs/related.md §13).

How it works
------------
1. **Salient mask** (unstructured, computed once on the original ``W``): the top
   ``salient_frac`` of the weights by ``|w|`` (``magnitude``) or by the OBS saliency
   ``w_ij² / d_j²`` (``hessian``, ``d_j`` the diagonal of the upper Cholesky factor of ``H⁻¹``).
2. **Binary part** (``~mask``), per row, with the optimal scale *over the binarized entries
   only* (the paper's fix): ``μ = mean(w_B)``, ``α = mean|w_B − μ|``,
   ``q = μ + α·sign(w − μ)`` (``center=False``: ``μ = 0``, ``α = mean|w_B|``). Statistics are
   fixed up front, as in the code (``LowHighGPT``). sign(0) = +1.
3. **Salient part** (``mask``): per-row asymmetric min-max RTN at ``salient_bits``
   (``scale = (max − min)/(2^b − 1)``, ``zero = round(−min/scale)``), parameters from the row.
4. **GPTQ** (``gptq=True``): columns left to right, each column ``mask·q_high + ~mask·q_low``
   of the *updated* weights, error propagated with :func:`tbt.ptq.gptq.gptq_columns`.
   ``gptq=False`` is RTN-PB (no compensation).

Storage (honest): a dense 1-bit plane (``rows·row_bytes(K)·8``), per-row ``α`` (and ``μ``)
and the 8-bit part's ``scale, zero`` (16 bits each), the salient values (``salient_bits``
each) in CSR: a column index of ``ceil(log2 K)`` bits per value and ``rows + 1`` 32-bit row
pointers; values and indices are two bit streams, each padded to a whole byte (what the packed
export stores). ``bits_reported`` is the PB-LLM code's ``calc_memory_consumption`` (8-bit indices):
``N + 8·nnz + 8·nnz + 8·(rows + 1)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from tbt.ptq.gptq import gptq_columns, inverse_cholesky_upper, prepare_hessian
from tbt.ptq.registry import SCALE_BITS, LayerQuant, LayerStats, register_ptq_method
from tbt.ptq.rtn import code_bits

SALIENT_METRICS = ("magnitude", "hessian")


@dataclass(frozen=True)
class PBLLMConfig:
    """Args: salient_frac (0..1), salient_metric (``magnitude``|``hessian``), salient_bits,
    center (``μ + α·sign(w − μ)``), gptq (error compensation), block_size, damp."""

    salient_frac: float = 0.1
    salient_metric: str = "magnitude"
    salient_bits: int = 8
    center: bool = True
    gptq: bool = True
    block_size: int = 128
    damp: float = 0.01

    def __post_init__(self) -> None:
        if not 0.0 <= self.salient_frac <= 1.0:
            raise ValueError(f"salient_frac must be in [0, 1]; got {self.salient_frac}")
        if self.salient_metric not in SALIENT_METRICS:
            raise ValueError(f"salient_metric={self.salient_metric!r}; choose one of "
                             f"{list(SALIENT_METRICS)}")
        if not 2 <= self.salient_bits <= 16:
            raise ValueError(f"salient_bits must be in 2..16; got {self.salient_bits}")


def salient_mask(score: Tensor, frac: float) -> Tensor:
    """Boolean mask of the ``round(frac·N)`` largest entries of ``score`` (ties: lowest index)."""
    n = round(frac * score.numel())
    mask = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
    if n:
        mask[torch.topk(score.flatten(), n, sorted=False).indices] = True
    return mask.view_as(score)


def binary_stats(w: Tensor, keep: Tensor, center: bool) -> tuple[Tensor, Tensor]:
    """Per-row ``(μ, α)`` ``(out, 1)`` over the entries where ``keep``; 0 for an empty row."""
    k = keep.to(w.dtype)
    n = k.sum(1, keepdim=True).clamp_min(1.0)
    mu = (w * k).sum(1, keepdim=True) / n if center else torch.zeros_like(n)
    alpha = ((w - mu).abs() * k).sum(1, keepdim=True) / n
    return mu, alpha


def binarize(w: Tensor, mu: Tensor, alpha: Tensor) -> Tensor:
    """``μ + α·sign(w − μ)`` with sign(0) = +1."""
    return mu + alpha * torch.where(w - mu < 0, -1.0, 1.0).to(w.dtype)


def minmax_params(w: Tensor, bits: int) -> tuple[Tensor, Tensor]:
    """Per-row asymmetric min-max ``(scale, zero)`` ``(out, 1)``; the range always holds 0."""
    lo = w.amin(1, keepdim=True).clamp(max=0.0)
    hi = w.amax(1, keepdim=True).clamp(min=0.0)
    scale = (hi - lo) / (2 ** bits - 1)
    scale = scale.masked_fill(scale == 0, 1.0)
    return scale, torch.round(-lo / scale)


def minmax_quantize(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """``(clamp(round(w/scale) + zero, 0, 2^b − 1) − zero)·scale``."""
    return (torch.clamp(torch.round(w / scale) + zero, 0, 2 ** bits - 1) - zero) * scale


def pbllm_bits(rows: int, k: int, nnz: int, cfg: PBLLMConfig) -> tuple[int, float]:
    """(honest bits, bits under the PB-LLM code's convention) of one matrix."""
    index_bits = max(1, math.ceil(math.log2(k)))
    per_row = (2 if cfg.center else 1) * SCALE_BITS + (2 * SCALE_BITS if nnz else 0)
    stream = lambda width: 8 * -(-nnz * width // 8)  # noqa: E731  (bit stream, byte padded)
    honest = (code_bits(rows, k, 1) + rows * per_row
              + stream(cfg.salient_bits) + stream(index_bits) + (32 * (rows + 1) if nnz else 0))
    reported = rows * k + 8 * nnz + 8 * nnz + 8 * (rows + 1)
    return honest, float(reported)


@register_ptq_method("pbllm", PBLLMConfig, needs_gram=True,
                     summary="partial binarization, salient fraction 8-bit in CSR (docs/related.md §13)")
def quantize_pbllm(w: Tensor, stats: LayerStats, cfg: PBLLMConfig) -> LayerQuant:
    need_h = cfg.gptq or cfg.salient_metric == "hessian"
    if need_h and stats.gram is None:
        raise ValueError("PB-LLM with gptq=True or salient_metric='hessian' needs calibration "
                         "data (the layer Gram matrix)")
    if need_h:
        h, w64 = prepare_hessian(stats.gram, stats.n_tokens, w, cfg.damp)
        u = inverse_cholesky_upper(h)
    else:
        w64, u = w.detach().to(torch.float64).clone(), None
    if cfg.salient_metric == "hessian":
        score = w64.pow(2) / torch.diagonal(u).pow(2)
    else:
        score = w64.abs()
    mask = salient_mask(score, cfg.salient_frac)
    mu, alpha = binary_stats(w64, ~mask, cfg.center)
    scale, zero = minmax_params(w64, cfg.salient_bits)

    def quantize(cols: slice | int, x: Tensor) -> Tensor:
        m = mask[:, cols]
        p = (mu, alpha, scale, zero)
        if x.dim() == 1:  # one column: (out,) statistics
            p = tuple(t.squeeze(1) for t in p)
        low = binarize(x, p[0], p[1])
        return torch.where(m, minmax_quantize(x, p[2], p[3], cfg.salient_bits), low)

    if cfg.gptq:  # the column loop in float32, as GPTQ runs it
        p32 = [t.to(torch.float32) for t in (mu, alpha, scale, zero)]
        mu, alpha, scale, zero = p32
        q = gptq_columns(w64.to(torch.float32), u.to(torch.float32), quantize, cfg.block_size)
    else:
        q = quantize(slice(None), w64)
    nnz = int(mask.sum())
    rows, k = w.shape
    bits, reported = pbllm_bits(rows, k, nnz, cfg)
    tensors = _stored(q, mask, mu, alpha, scale, zero, cfg)
    return LayerQuant(q.to(torch.float32), bits, reported,
                      info={"salient_fraction": nnz / mask.numel()}, tensors=tensors)


def _stored(q: Tensor, mask: Tensor, mu: Tensor, alpha: Tensor, scale: Tensor, zero: Tensor,
            cfg: PBLLMConfig) -> dict[str, Tensor]:
    """What the packed export stores (scheme ``pbllm``, ``docs/format.md`` §9), read off ``Q``:
    ``signs`` int8 (out, in) (``Q ≥ μ`` → +1 off the mask, −1 on it), ``salient_codes`` int32
    (out, in) (``clamp(round(Q/scale) + zero, 0, 2^b − 1)`` on the mask, 0 off it), the mask and
    the per-row ``mu``, ``alpha``, ``scale``, ``zero`` as float32 ``(out,)``. Since
    ``Q = μ ± α`` off the mask and ``(c − zero)·scale`` on it, these rebuild ``Q`` exactly."""
    q64 = q.to(torch.float64)
    signs = torch.where(~mask & (q64 >= mu.to(torch.float64)), 1, -1).to(torch.int8)
    codes = torch.clamp(torch.round(q64 / scale.to(torch.float64)) + zero.to(torch.float64), 0,
                        2 ** cfg.salient_bits - 1)
    return {"salient_mask": mask, "signs": signs,
            "salient_codes": torch.where(mask, codes, 0).to(torch.int32),
            **{n: t.reshape(-1).to(torch.float32) for n, t in
               (("mu", mu), ("alpha", alpha), ("scale", scale), ("zero", zero))}}
