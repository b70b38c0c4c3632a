"""Distillation losses of TBT: pure functions with explicit masks and reductions.

The released recipe (docs/recipe.md §2) adds, to the label cross-entropy,

* a soft cross-entropy between teacher and student token distributions over **all**
  ``batch × tgt_len`` rows, padding included (:func:`soft_cross_entropy` with ``mask=None``);
* the MSE between teacher and student post-softmax attention probabilities, summed over the
  encoder-self, decoder-self and cross attention of every layer (:func:`attention_mse`);
* the MSE between hidden states (embedding output and every layer), summed over layers with a
  student→teacher layer map (:func:`hidden_mse`, :func:`sum_over_layers`).

Three further terms come from the methods tbt compares against (docs/related.md §4a, §6b, §10):

* :func:`feature_cosine`: TernaryLLM's Outlier-Friendly Feature distillation (OFF), the mean of
  ``1 − cos(h_S, h_T)`` over positions. Cosine is scale-invariant, so a few outlier channels of
  large magnitude do not dominate it as they dominate the MSE;
* :func:`attention_score_mse`: TernaryBERT's MSE between the *pre-softmax* attention scores
  ``Q Kᵀ/√d`` (not the probabilities), over the (query, key) pairs the model may attend to;
* :func:`attention_relation_kl`: MiniLM(v2) / BitDistill's self-attention *relation*
  distillation, ``KL(softmax(X_T X_Tᵀ/√d_r) ‖ softmax(X_S X_Sᵀ/√d_r))`` for ``X`` = Q, K, V
  regrouped into ``A`` relation heads (:func:`relation_logits`); the relation is ``T × T``, so
  student and teacher may differ in width and head count.

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

__all__ = ["soft_cross_entropy", "hidden_mse", "attention_mse", "feature_cosine",
           "attention_score_mse", "relation_logits", "attention_relation_kl", "sum_over_layers"]


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
    return _pair_mean(sq, query_mask, key_mask)


def _pair_mean(values: Tensor, query_mask: Tensor | None, key_mask: Tensor | None,
               pair_mask: Tensor | None = None) -> Tensor:
    """Mean of ``values`` ``(B, H, Tq, Tk)`` over the pairs whose query, key and pair are valid.

    ``pair_mask`` is ``(B, 1 or H, Tq, Tk)`` (e.g. causal); masked-out values never reach the sum
    (``where``, not a product, so an inf there cannot turn into NaN).
    """
    if query_mask is None and key_mask is None and pair_mask is None:
        return values.mean()
    b, h, tq, tk = values.shape
    w = torch.ones((b, 1, tq, tk), dtype=values.dtype, device=values.device)
    if query_mask is not None:
        _check_mask(query_mask, torch.Size((b, tq)), "query_mask")
        w = w * query_mask.to(values.dtype)[:, None, :, None]
    if key_mask is not None:
        _check_mask(key_mask, torch.Size((b, tk)), "key_mask")
        w = w * key_mask.to(values.dtype)[:, None, None, :]
    if pair_mask is not None:
        if pair_mask.dim() != 4 or pair_mask.shape[0] != b or pair_mask.shape[2:] != (tq, tk) \
                or pair_mask.shape[1] not in (1, h):
            raise ValueError(f"pair_mask has shape {tuple(pair_mask.shape)}, expected "
                             f"({b}, 1 or {h}, {tq}, {tk})")
        w = w * pair_mask.to(values.dtype)
    w = w.expand(b, h, tq, tk)
    total = torch.where(w > 0, values * w, values.new_zeros(())).sum()
    return total / w.sum().clamp_min(1.0)


def feature_cosine(student: Tensor, teacher: Tensor, mask: Tensor | None = None,
                   eps: float = 1e-8) -> Tensor:
    """TernaryLLM's OFF term: ``1 − cos(s, t)`` per position, averaged over valid positions.

    ``cos(s, t) = s·t / (max(‖s‖, ε) · max(‖t‖, ε))`` over the feature axis
    (docs/related.md §6b; the paper maximises the features' mutual information through their cosine similarity; the
    ``1 − cos`` form and the layer set are tbt's reading, see docs/distillation.md).

    Args:
        student: ``(B, T, D)`` hidden states (any ``(..., D)``).
        teacher: same shape (same width: cosine compares feature by feature).
        mask: ``(B, T)`` bool or 0/1 valid positions; ``None`` = every position.
        eps: floor of each norm, so an all-zero vector gives cos 0 (loss 1), not NaN.

    Returns:
        0-dim tensor in ``[0, 2]``.
    """
    if student.shape != teacher.shape:
        raise ValueError(f"student {tuple(student.shape)} and teacher {tuple(teacher.shape)} "
                         f"differ in shape (OFF compares features of equal width)")
    s, t = _f32(student), _f32(teacher)
    dot = (s * t).sum(dim=-1)  # (B, T)
    norms = s.norm(dim=-1).clamp_min(eps) * t.norm(dim=-1).clamp_min(eps)
    if mask is not None:
        _check_mask(mask, student.shape[:-1], "mask")
    return _masked_mean(1.0 - dot / norms, mask)


def attention_score_mse(
    student: Tensor,
    teacher: Tensor,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
    pair_mask: Tensor | None = None,
) -> Tensor:
    """TernaryBERT's attention-score term: MSE between the pre-softmax logits ``Q Kᵀ/√d``.

    docs/related.md §4a: ``Σ_l MSE(A_l^S, A_l^T)`` with ``A`` the attention *scores*. The
    scores here exclude the additive mask (transformers fills masked pairs with the dtype's minimum, whose
    difference is meaningless); instead ``pair_mask`` says which pairs the model may attend to
    (causal and padding masks). TernaryBERT adds a -10000 mask to both, which cancels in the
    difference, so its loss counts masked pairs too: pass no masks for that.

    Args:
        student: ``(B, H, Tq, Tk)`` scores (position biases included, mask excluded).
        teacher: same shape.
        query_mask: ``(B, Tq)`` valid queries; key_mask: ``(B, Tk)`` valid keys;
        pair_mask: ``(B, 1 or H, Tq, Tk)`` bool, pairs allowed by the attention mask.

    Returns:
        0-dim tensor: mean of ``(s − t)²`` over every valid ``(b, h, q, k)``.
    """
    if student.shape != teacher.shape or student.dim() != 4:
        raise ValueError(f"expected two (B, H, Tq, Tk) score tensors of one shape, got "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}")
    sq = (_f32(student) - _f32(teacher)).square()  # (B, H, Tq, Tk)
    return _pair_mean(sq, query_mask, key_mask, pair_mask)


def relation_logits(x: Tensor, heads: int | None = None) -> Tensor:
    """Self-relation logits ``X_a X_aᵀ / √d_r`` of one of Q, K, V (MiniLMv2).

    The ``H`` heads of size ``D`` are concatenated into ``H·D`` features per position and split
    again into ``A = heads`` relation heads of ``d_r = H·D / A`` features (``A = H`` keeps the
    model's heads).

    Args:
        x: ``(B, H, T, D)`` queries, keys or values as the attention receives them.
        heads: ``A``; ``None`` = ``H``. Must divide ``H·D``.

    Returns:
        ``(B, A, T, T)`` logits (float32 or wider).
    """
    if x.dim() != 4:
        raise ValueError(f"expected (B, H, T, D) queries/keys/values, got {tuple(x.shape)}")
    b, h, t, d = x.shape
    a = h if heads is None else heads
    if a < 1 or (h * d) % a:
        raise ValueError(f"relation heads={a} must divide the {h}x{d}={h * d} features; pick "
                         f"a divisor (e.g. {h})")
    d_r = h * d // a
    xr = _f32(x).transpose(1, 2).reshape(b, t, a, d_r).transpose(1, 2)  # (B, A, T, d_r)
    return torch.matmul(xr, xr.transpose(-1, -2)) / d_r ** 0.5  # (B, A, T, T)


def attention_relation_kl(
    student: Tensor,
    teacher: Tensor,
    heads: int | None = None,
    query_mask: Tensor | None = None,
    key_mask: Tensor | None = None,
) -> Tensor:
    """MiniLMv2 / BitDistill relation distillation for one of Q, K, V of one layer.

    ``R = softmax(relation_logits(X))`` over valid keys; the loss is
    ``KL(R_T ‖ R_S) = Σ_k R_T (log R_T − log R_S)`` per (b, relation head, query), averaged
    over valid queries and relation heads (docs/related.md §10). Masked keys get probability 0
    in both and add nothing.

    Args:
        student: ``(B, H_s, T, D_s)``; teacher: ``(B, H_t, T, D_t)``: same B and T; widths may
            differ when ``heads`` divides both ``H_s·D_s`` and ``H_t·D_t``.
        heads: relation heads ``A``; ``None`` = the tensors' own head count (then ``H_s = H_t``).
        query_mask, key_mask: ``(B, T)`` bool or 0/1; ``None`` = all positions.

    Returns:
        0-dim tensor >= 0.
    """
    if student.dim() != 4 or teacher.dim() != 4 or student.shape[0] != teacher.shape[0] \
            or student.shape[2] != teacher.shape[2]:
        raise ValueError(f"expected (B, H, T, D) student and teacher tensors with the same B "
                         f"and T, got {tuple(student.shape)} and {tuple(teacher.shape)}")
    if heads is None and student.shape[1] != teacher.shape[1]:
        raise ValueError(f"student has {student.shape[1]} heads, teacher {teacher.shape[1]}: "
                         f"set relation_heads to a number that divides both widths")
    log_s = relation_logits(student, heads)  # (B, A, T, T)
    log_t = relation_logits(teacher, heads)
    b, _, t, _ = log_s.shape
    if key_mask is not None:
        _check_mask(key_mask, torch.Size((b, t)), "key_mask")
        km = key_mask.bool()[:, None, None, :]  # (B, 1, 1, T)
        neg = torch.finfo(log_s.dtype).min
        log_s, log_t = log_s.masked_fill(~km, neg), log_t.masked_fill(~km, neg)
    log_s = F.log_softmax(log_s, dim=-1)
    log_t = F.log_softmax(log_t, dim=-1)
    kl = log_t.exp() * (log_t - log_s)  # (B, A, T, T)
    if key_mask is not None:
        kl = torch.where(km, kl, kl.new_zeros(()))
    rows = kl.sum(dim=-1)  # (B, A, T)
    if query_mask is None:
        return rows.mean()
    _check_mask(query_mask, torch.Size((b, t)), "query_mask")
    qm = query_mask.to(rows.dtype)[:, None, :].expand_as(rows)
    return (rows * qm).sum() / qm.sum().clamp_min(1.0)


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
