"""Distillation losses of TBT: pure functions with explicit masks and reductions.

The released recipe (METHOD.md §4) adds, to the label cross-entropy,

* a soft cross-entropy between teacher and student token distributions over **all**
  ``batch × tgt_len`` rows, padding included (:func:`soft_cross_entropy` with ``mask=None``);
* the MSE between teacher and student post-softmax attention probabilities, summed over the
  encoder-self, decoder-self and cross attention of every layer (:func:`attention_mse`);
* the MSE between hidden states (embedding output and every layer), summed over layers with a
  student→teacher layer map (:func:`hidden_mse`, :func:`sum_over_layers`).

Every function takes an optional mask that restricts the mean to valid positions; ``None``
reproduces the reference's unmasked mean (``nn.MSELoss()`` / mean over every row). A masked mean
is ``Σ w·ℓ / Σ w`` (a 0/1 or bool mask; a float mask acts as weights); when nothing is valid it
is 0, not NaN. All arithmetic runs in at least float32 (fp16/bf16 inputs are upcast, float64 stays
float64), and every function returns a 0-dim tensor of that dtype.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["soft_cross_entropy", "hidden_mse", "attention_mse", "sum_over_layers"]


def _f32(t: Tensor) -> Tensor:
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _check_mask(mask: Tensor, shape: torch.Size, what: str) -> None:
    if mask.shape != shape:
        raise ValueError(f"{what} has shape {tuple(mask.shape)}, expected {tuple(shape)}")


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of ``values`` over the positions ``mask`` selects (all if None); 0 if none do."""
    if mask is None:
        return values.mean()
    w = mask.to(values.dtype)
    return (values * w).sum() / w.sum().clamp_min(1.0)  # no boolean indexing: no host sync


def soft_cross_entropy(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    mask: Tensor | None = None,
) -> Tensor:
    """Soft cross-entropy ``−Σ_c softmax(t/T)_c · log_softmax(s/T)_c``, averaged over rows.

    The released code's ``DistributionLoss`` (``KD_loss.py``) at ``T = 1``, which averages over
    every row; no ``T²`` factor is applied.

    Args:
        student_logits: ``(..., V)`` float (any dtype; computed in float32).
        teacher_logits: ``(..., V)``, same shape; treated as a constant target only if the
            caller detaches it (the teacher normally runs under ``no_grad``).
        temperature: ``T > 0``, divides both logits.
        mask: ``(...)`` bool or 0/1 (the logits' shape without ``V``): rows that count, e.g.
            ``labels != -100``. ``None`` = every row (reference behaviour).

    Returns:
        0-dim tensor: the (masked) mean over rows of the per-row cross-entropy.
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    if not temperature > 0:
        raise ValueError(f"temperature={temperature!r} must be > 0")
    if mask is not None:
        _check_mask(mask, student_logits.shape[:-1], "mask")
    p = torch.softmax(_f32(teacher_logits) / temperature, dim=-1)  # (..., V)
    log_q = F.log_softmax(_f32(student_logits) / temperature, dim=-1)  # (..., V)
    rows = -(p * log_q).sum(dim=-1)  # (...)
    return _masked_mean(rows, mask)


def hidden_mse(student: Tensor, teacher: Tensor, mask: Tensor | None = None) -> Tensor:
    """Mean squared error between hidden states, over valid positions × features.

    Args:
        student: ``(B, T, D)`` (any ``(..., D)``).
        teacher: same shape.
        mask: ``(B, T)`` (the shape without ``D``) bool or 0/1, e.g. the attention mask.
            ``None`` = ``nn.MSELoss()`` (mean over every element).

    Returns:
        0-dim tensor ``Σ_{b,t} m_bt Σ_d (s−t)² / (D · Σ_{b,t} m_bt)``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         f"differ in shape")
    sq = (_f32(student) - _f32(teacher)).square()  # (B, T, D)
    if mask is None:
        return sq.mean()
    _check_mask(mask, student.shape[:-1], "mask")
    return _masked_mean(sq.mean(dim=-1), mask)  # per-position mean over D, then masked mean


def attention_mse(
    student: Tensor,
    teacher: Tensor,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """MSE between post-softmax attention probabilities, over valid (query, key) pairs.

    Args:
        student: ``(B, H, Tq, Tk)`` attention probabilities.
        teacher: same shape.
        query_mask: ``(B, Tq)`` bool or 0/1, valid query positions (``None`` = all).
        key_mask: ``(B, Tk)`` bool or 0/1, valid key positions (``None`` = all).

    Returns:
        0-dim tensor: the mean of ``(s − t)²`` over every ``(b, h, q, k)`` with ``q`` and ``k``
        valid; with both masks ``None`` it is ``nn.MSELoss()`` (the reference).
    """
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"expected two (B, H, Tq, Tk) tensors of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    sq = (_f32(student) - _f32(teacher)).square()  # (B, H, Tq, Tk)
    if query_mask is None and key_mask is None:
        return sq.mean()
    b, h, tq, tk = sq.shape
    qm = (torch.ones(b, tq, dtype=sq.dtype, device=sq.device) if query_mask is None
          else query_mask.to(sq.dtype))
    km = (torch.ones(b, tk, dtype=sq.dtype, device=sq.device) if key_mask is None
          else key_mask.to(sq.dtype))
    _check_mask(qm, torch.Size((b, tq)), "query_mask")
    _check_mask(km, torch.Size((b, tk)), "key_mask")
    per_query = (sq * km[:, None, None, :]).sum(dim=-1)  # (B, H, Tq)
    total = (per_query * qm[:, None, :]).sum()
    pairs = h * (qm.sum(dim=-1) * km.sum(dim=-1)).sum()  # valid (b, h, q, k) count
    return total / pairs.clamp_min(1.0)


def sum_over_layers(
    fn: Callable[..., Tensor],
    students: Sequence[Tensor],
    teachers: Sequence[Tensor],
    layer_map: Sequence[int] | None = None,
    **kw,
) -> Tensor:
    """``Σ_i fn(students[i], teachers[layer_map[i]], **kw)``.

    Args:
        fn: a loss of this module, e.g. :func:`hidden_mse`.
        students: per-layer student tensors (e.g. ``hidden_states`` or ``attentions``).
        teachers: per-layer teacher tensors.
        layer_map: for each student layer, the index of its teacher layer; ``None`` = identity
            (then both sequences must have the same length).
        **kw: passed to ``fn`` (masks).
    """
    if layer_map is None:
        if len(students) != len(teachers):
            raise ValueError(f"{len(students)} student and {len(teachers)} teacher layers: "
                             f"pass layer_map to pair them")
        layer_map = range(len(students))
    elif len(layer_map) != len(students):
        raise ValueError(f"layer_map has {len(layer_map)} entries for {len(students)} "
                         f"student layers")
    if len(students) == 0:
        raise ValueError("no layers to sum over")
    terms = [fn(s, teachers[j], **kw) for s, j in zip(students, layer_map)]
    return sum(terms[1:], terms[0])  # left to right, as the reference's `loss += ...`
