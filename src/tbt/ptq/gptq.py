"""GPTQ machinery shared by PB-LLM and BiLLM: the Hessian proxy, its inverse Cholesky factor,
and column/block error propagation (docs/related.md §11, §13, §14).

For one linear with calibration inputs ``X`` (``N`` tokens × ``in``), the layer-output error of
a weight change is measured by ``H = 2·XᵀX/N``. GPTQ quantizes columns left to right; after
column ``j`` is rounded, its error ``e_j = (w_j − q_j)/d_j`` is spread over the columns not yet
quantized, ``W[:, j+1:] −= e_j ⊗ U[j, j+1:]``, where ``U`` is the upper Cholesky factor of
``H⁻¹`` and ``d_j = U[j, j]`` (the OBS update in its Cholesky form). Dead inputs (a zero
diagonal of ``H``) get ``H_jj = 1`` and a zero weight column; ``damp·mean(diag H)`` is added to
the diagonal, as GPTQ does.

Two loops are offered: :func:`gptq_columns` (standard GPTQ/PB-LLM: updates within a block of
columns after every column, and across blocks lazily) and :func:`gptq_blocks` (BiLLM's code:
each block is quantized at once from its weights as they stand, and only *later* blocks are
compensated).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def prepare_hessian(gram: Tensor, n_tokens: int, w: Tensor, damp: float = 0.01
                    ) -> tuple[Tensor, Tensor]:
    """``(H, W)``: damped float64 ``H = 2·gram/N``, float64 ``W`` copy with dead columns zeroed."""
    if n_tokens < 1:
        raise ValueError("the Hessian needs calibration tokens: pass --calib-file with text")
    h = gram.to(torch.float64) * (2.0 / n_tokens)
    w = w.detach().to(torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diagonal(h).mean() * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return h, w


def inverse_cholesky_upper(h: Tensor) -> Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``UᵀU = H⁻¹``), float64."""
    lower = torch.linalg.cholesky(h)
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def gptq_columns(w: Tensor, u: Tensor, quantize_column: Callable[[int, Tensor], Tensor],
                 block: int = 128) -> Tensor:
    """GPTQ: ``quantize_column(j, w_j) -> q_j`` column by column with error propagation.

    ``w`` float64 ``(out, in)`` is consumed (updated in place); returns ``Q`` ``(out, in)``.
    """
    out, k = w.shape
    q = torch.zeros_like(w)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        w1, u1 = w[:, b0:b1].clone(), u[b0:b1, b0:b1]
        err = torch.zeros_like(w1)
        for i in range(b1 - b0):
            col = w1[:, i]
            qc = quantize_column(b0 + i, col)
            q[:, b0 + i] = qc
            e = (col - qc) / u1[i, i]
            w1[:, i:] -= e.unsqueeze(1) * u1[i, i:].unsqueeze(0)
            err[:, i] = e
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q


def gptq_blocks(w: Tensor, u: Tensor, quantize_block: Callable[[int, Tensor], Tensor],
                block: int = 128) -> Tensor:
    """BiLLM's loop: ``quantize_block(b0, W[:, b0:b1]) -> Q_block``, then only later blocks are
    compensated, ``W[:, b1:] −= E·U[b0:b1, b1:]`` with ``E = (W_b − Q_b)/diag(U_b)``."""
    out, k = w.shape
    q = torch.zeros_like(w)
    for b0 in range(0, k, block):
        b1 = min(b0 + block, k)
        qb = quantize_block(b0, w[:, b0:b1])
        q[:, b0:b1] = qb
        err = (w[:, b0:b1] - qb) / torch.diagonal(u)[b0:b1]
        w[:, b1:] -= err @ u[b0:b1, b1:]
    return q
