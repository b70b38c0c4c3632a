"""The MLGRU recurrence ``h_t = f_t ⊙ h_{t−1} + i_t`` with an explicit backward (docs/related.md §17).

The MatMul-free LM's token mixer is element-wise: no attention, no matrix product in time. The
whole recurrence of a sequence is :func:`mlgru_scan`, a ``torch.autograd.Function`` whose forward
loops over time (vectorised over batch and channels) and whose backward runs the adjoint
recurrence backwards in time, so autograd stores three ``(B, T, D)`` tensors instead of a graph
of ``T`` steps:

* ``g_t = ∂L/∂h_t + f_{t+1} ⊙ g_{t+1}`` (``g_{T+1} = 0``);
* ``∂L/∂i_t = g_t``, ``∂L/∂f_t = g_t ⊙ h_{t−1}`` (``h_0`` = the initial state),
  ``∂L/∂h_0 = f_1 ⊙ g_1``.

The released code's ``naive_recurrent_hgrn`` is the same loop; its fused Triton kernel is a
faster schedule of it. The tests compare with a step-by-step Python reference and run
``gradcheck`` in float64.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["mlgru_scan"]


class _MLGRUScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f: Tensor, i: Tensor, h0: Tensor) -> Tensor:  # type: ignore[override]
        h = torch.empty_like(i)  # (B, T, D)
        prev = h0
        for t in range(i.shape[1]):
            prev = torch.addcmul(i[:, t], f[:, t], prev)
            h[:, t] = prev
        ctx.save_for_backward(f, h, h0)
        return h

    @staticmethod
    def backward(ctx, gh: Tensor):  # type: ignore[override]
        f, h, h0 = ctx.saved_tensors
        df, di = torch.empty_like(f), torch.empty_like(gh)
        carry = torch.zeros_like(h0)
        for t in range(gh.shape[1] - 1, -1, -1):
            g = gh[:, t] + carry
            di[:, t] = g
            df[:, t] = g * (h[:, t - 1] if t > 0 else h0)
            carry = g * f[:, t]
        return df, di, carry


def mlgru_scan(f: Tensor, i: Tensor, h0: Tensor | None = None) -> Tensor:
    """All hidden states ``h (B, T, D)`` of ``h_t = f_t ⊙ h_{t−1} + i_t``.

    Args:
        f: forget gates ``(B, T, D)`` (in (0, 1) in the model; any values here).
        i: inputs ``(B, T, D)``, already multiplied by ``1 − f`` in the model.
        h0: the state before the first step ``(B, D)``; ``None`` = zeros.
    """
    if f.shape != i.shape or f.dim() != 3:
        raise ValueError(f"f and i must both be (B, T, D); got {tuple(f.shape)}, {tuple(i.shape)}")
    if h0 is None:
        h0 = i.new_zeros(i.shape[0], i.shape[2])
    f, i = f.contiguous(), i.contiguous()
    return _MLGRUScan.apply(f, i, h0.to(i.dtype))
