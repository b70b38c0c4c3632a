"""Weight quantizers: binary, ternary and n-bit codes with one float32 scale per row or tensor.

How it works
------------
Every quantizer here maps a 2-D latent float weight ``W`` -- ``(out, in)`` for a linear layer,
``(vocab, d)`` for an embedding -- to integer **codes** (int8, same shape) and a float32
**scale** (``(out, 1)`` per row, ``(1, 1)`` per tensor). The quantized weight is
``codes * scale``. :func:`weight_codes` returns the pair (exactly what the exporter packs),
:func:`dequantize` multiplies it back, and :func:`quantize_weight` is the training-time
"fake-quantized" weight: the same value, made differentiable with the method's
straight-through estimator (STE). The value of :func:`quantize_weight` is computed as
``dequantize(*weight_codes(W))`` and the gradient is attached by a ``torch.autograd.Function``
whose backward returns ``grad`` or ``grad * mask``. The common ``W + (Q - W).detach()`` trick is
avoided on purpose: it differs from ``Q`` by up to 1 ulp, which would break the contract that
a trained model and its packed export compute the same numbers.

Statistics (means, scales, ratios) are computed in float32 whatever the input dtype; the
result is cast back to ``W.dtype``. No scale receives a gradient (all are statistics of the
detached weight, as in every reference implementation). Scales are never clamped away from 0:
an all-zero row has scale 0 and codes 0, and the *divisor* is guarded instead, so it quantizes
to zeros instead of NaN (the authors' released code divides 0 by 0 and gets NaN).

Methods (``method=``) are registered in :data:`WEIGHT_METHODS` by :func:`register_weight_method`:
``tbt`` (bits 1, 2; ``variant="paper"`` or ``"released"``), ``twn``, ``bwn``, ``absmean`` and
``uniform`` (3..8 bits) here; ``bitnet-binary`` and ``trilm`` in :mod:`tbt.quant.weight_bitnet`.
Their formulas, STEs, default granularities and every choice where paper and code differ are in
docs/numerics.md §1 (the table, §1a-§1c); the granularities in docs/methods.md. ``variant``
only changes ``tbt``. Binary codes are always ±1 except for ``tbt``/``released``, which keeps
``sign(0) = 0`` to match the reference bit for bit.

Methods with learned parameters (``lsq``, ``seq``, ``seq-int2``, ``dlt``) and Tequila's
dead-zone bias (``tequila``) are per-layer modules (:mod:`tbt.quant.weight_learned`,
:mod:`tbt.quant.tequila`) registered with :func:`register_weight_quantizer`;
:func:`quantize_weight` refuses them (build them with ``make_weight_quantizer`` or
``quantize_model``).
"""

from __future__ import annotations

import torch
from torch import Tensor

from tbt.quant.granularity import GRANULARITIES, check_units, expand_scale, to_units
from tbt.quant.weight_registry import (  # re-exported: the registry lives there
    WEIGHT_METHODS, PackedLayout, PackedWeight, QuantFn, QuantizedWeight, WeightMethod,
    check_weight_method, register_weight_method, register_weight_quantizer)

__all__ = [
    "GRANULARITIES",
    "PackedLayout",
    "PackedWeight",
    "QuantFn",
    "register_weight_quantizer",
    "VARIANTS",
    "QuantizedWeight",
    "WEIGHT_METHODS",
    "WeightMethod",
    "check_weight_method",
    "dequantize",
    "quantize_weight",
    "register_weight_method",
    "weight_codes",
]

VARIANTS = ("paper", "released")
ABSMEAN_EPS = 1e-5  # BitNet b1.58: W / (γ + ε)  (docs/related.md §1a)
TWN_THRESHOLD = 0.7  # Δ = 0.7·mean|W|  (Li & Liu 2016)


# ---- the public functions --------------------------------------------------------------------

def weight_codes(
    w: Tensor,
    bits: int,
    method: str = "tbt",
    variant: str = "paper",
    granularity: str | None = None,
    clip: float = 2.5,
    *,
    group_size: int = 128,
    num_shards: int = 1,
) -> tuple[Tensor, Tensor]:
    """Integer codes and scale of a weight matrix: exactly what the exporter packs.

    Args:
        w: ``(out, in)`` linear weight or ``(vocab, d)`` embedding, any float dtype.
        bits: 1 (binary), 2 (ternary) or 3..8 (``uniform``); see :func:`check_weight_method`.
        method: ``tbt`` | ``twn`` | ``bwn`` | ``absmean`` | ``uniform`` (docs/numerics.md §1).
        variant: ``"paper"`` (Eq. 8-10, centred) or ``"released"`` (authors' code); ``tbt`` only.
        granularity: ``"row"`` | ``"tensor"`` | ``"group"`` | ``"shard"`` | ``None`` (the
            method's default: ``tensor`` for ``absmean``, ``row`` for the core methods).
        clip: TWN's input clip in weight units (``twn`` only).
        group_size, num_shards: unit sizes of ``group`` / ``shard`` (:mod:`tbt.quant.granularity`).

    Returns:
        ``codes``: int8 ``(out, in)``; ``scale``: float32 ``(out, 1)`` per row or shard,
        ``(1, 1)`` per tensor, ``(out, in/g)`` per group. ``dequantize(codes, scale, dtype)`` is
        the quantized weight.
    """
    q = _run(w, bits, method, variant, granularity, clip, (group_size, num_shards),
             want_mask=False)
    return q.codes, q.scale


def dequantize(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32,
               offset: Tensor | None = None) -> Tensor:
    """``(codes.float32 * scale [+ offset]).to(dtype)``: codes ``(out, in)`` int8, scale and
    offset ``(out|1, 1)`` or ``(out, G)`` per group (:func:`tbt.quant.granularity.expand_scale`)."""
    k = codes.shape[-1]
    w = codes.to(torch.float32) * expand_scale(scale, k)
    if offset is not None:
        w = w + expand_scale(offset, k)
    return w.to(dtype)


def quantize_weight(
    w: Tensor,
    bits: int,
    method: str = "tbt",
    variant: str = "paper",
    granularity: str | None = None,
    clip: float = 2.5,
    *,
    group_size: int = 128,
    num_shards: int = 1,
) -> Tensor:
    """Fake-quantized weight for training: same shape and dtype as ``w``, differentiable.

    The value equals ``dequantize(*weight_codes(w, ...), w.dtype)`` bit for bit, with or
    without autograd. Backward is the method's STE: identity, ``1[|(W−μ)/α| < 1]`` for
    ``tbt``/``paper`` (Eq. 10), ``1[−clip < W < clip]`` for ``twn``. Arguments as in
    :func:`weight_codes`.
    """
    units = (group_size, num_shards)
    _validate(w, bits, method, variant, granularity, clip, units)
    if not (w.requires_grad and torch.is_grad_enabled()):  # eval / no_grad: no STE, no mask
        q = _quantize(w, bits, method, variant, granularity, clip, units, want_mask=False)
        return dequantize(q.codes, q.scale, w.dtype)
    return _FakeQuantize.apply(w, bits, method, variant, granularity, clip, units)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, bits, method, variant, granularity, clip, units):  # type: ignore[override]
        q = _quantize(w, bits, method, variant, granularity, clip, units,
                      want_mask=ctx.needs_input_grad[0])
        ctx.identity = q.ste_mask is None
        if not ctx.identity:
            ctx.save_for_backward(q.ste_mask)
        return dequantize(q.codes, q.scale, w.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.identity:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None, None, None, None, None, None


# ---- validation and dispatch -----------------------------------------------------------------

def _validate(w, bits, method, variant, granularity, clip, units=(128, 1)) -> None:
    check_weight_method(method, bits)
    if WEIGHT_METHODS[method].fn is None:
        raise ValueError(f"method={method!r} keeps per-layer state (learned scales or a bias); "
                         f"build its module with tbt.quant.weight_learned.make_weight_quantizer "
                         f"or quantize_model instead of calling quantize_weight/weight_codes")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; choose one of {list(VARIANTS)}")
    if granularity is not None and granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; choose one of "
                         f"{list(GRANULARITIES)} or None (the method's default)")
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point torch.Tensor; got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D, (out, in) or (vocab, d); got shape {tuple(w.shape)}: "
                         f"reshape it to 2-D (e.g. w.flatten(1)) before quantizing")
    if not clip > 0:
        raise ValueError(f"clip must be positive (weight units); got {clip!r}")
    check_units(tuple(w.shape), granularity or WEIGHT_METHODS[method].default_granularity, *units)


def _run(w, bits, method, variant, granularity, clip, units, *, want_mask) -> QuantizedWeight:
    _validate(w, bits, method, variant, granularity, clip, units)
    return _quantize(w, bits, method, variant, granularity, clip, units, want_mask=want_mask)


def _quantize(w, bits, method, variant, granularity, clip, units=(128, 1), *,
              want_mask) -> QuantizedWeight:
    spec = WEIGHT_METHODS[method]
    gran = granularity or spec.default_granularity
    w32 = w.detach().to(torch.float32)  # statistics in float32 (no copy if already float32)
    if gran in ("row", "tensor"):
        return spec.fn(w32, bits, per_row=gran == "row", variant=variant, clip=clip,
                       want_mask=want_mask)
    # group / shard: the method runs per row of the (U, n) unit view (tbt.quant.granularity)
    group_size, num_shards = units
    q = spec.fn(to_units(w32, gran, group_size, num_shards), bits, per_row=True,
                variant=variant, clip=clip, want_mask=want_mask)
    n = w.shape[0]
    if gran == "group":
        scale = q.scale.reshape(n, -1)
    else:
        scale = q.scale.reshape(num_shards, 1).repeat_interleave(n // num_shards, dim=0)
    mask = None if q.ste_mask is None else q.ste_mask.reshape(w.shape)
    return QuantizedWeight(q.codes.reshape(w.shape), scale, mask)


# ---- shared pieces (no host syncs, no Python loops over rows) --------------------------------

def _mean(x: Tensor, per_row: bool) -> Tensor:
    """Mean over each row ``(out, 1)`` or over the tensor ``(1, 1)``."""
    return x.mean(dim=1, keepdim=True) if per_row else x.mean().reshape(1, 1)


def _divisor(scale: Tensor) -> Tensor:
    # A zero scale means every weight it covers is 0 (or exactly μ), so any finite divisor gives
    # ratio 0; 1 avoids 0/0 = NaN. NaN scales stay NaN.
    return scale.masked_fill(scale == 0, 1.0)


def _round_clip(r: Tensor, qp: int) -> Tensor:
    """int8 ``round(clip(r, −qp, qp))``, half to even; ``r`` is a scratch tensor (in place)."""
    return r.clamp_(-qp, qp).round_().to(torch.int8)


def _sign_pm1(x: Tensor) -> Tensor:
    """int8 ±1 sign with ``sign(0) = +1`` (always packable in one bit)."""
    return torch.ones_like(x, dtype=torch.int8).masked_fill_(x < 0, -1)


# ---- the methods -----------------------------------------------------------------------------

@register_weight_method("tbt", bits=(1, 2), default_granularity="row")
def _tbt(w: Tensor, bits: int, *, per_row: bool, variant: str, clip: float,
         want_mask: bool) -> QuantizedWeight:
    """TBT statistics-based quantizer (paper Eq. 8-10, or the released code; module docs)."""
    if variant == "released":  # no centring, identity STE (docs/numerics.md §1a)
        mean_abs = _mean(w.abs(), per_row)
        if bits == 1:  # α·sign(W): sign(0) = 0 kept, as in the reference
            return QuantizedWeight(torch.sign(w).to(torch.int8), mean_abs, None)
        alpha = (4.0 / 3.0) * mean_abs
        return QuantizedWeight(_round_clip(w / _divisor(alpha), 1), alpha, None)
    # paper, Eq. 8 (ternary) / Eq. 9 (binary): μ with the granularity of α, not added back
    centred = w - _mean(w, per_row)  # W − μ; scratch, divided in place below
    alpha = _mean(centred.abs(), per_row)
    if bits == 1:  # Eq. 9: sign(W − μ), exact 0 -> +1; the ratio is needed only for Eq. 10
        codes = _sign_pm1(centred)
        mask = centred.div_(_divisor(alpha)).abs() < 1 if want_mask else None
        return QuantizedWeight(codes, alpha, mask)
    alpha = (4.0 / 3.0) * alpha  # Eq. 8
    r = centred.div_(_divisor(alpha))  # (W − μ)/α
    mask = r.abs() < 1 if want_mask else None  # Eq. 10, before r is clipped in place
    return QuantizedWeight(_round_clip(r, 1), alpha, mask)


@register_weight_method("twn", bits=(2,), default_granularity="row")
def _twn(w: Tensor, bits: int, *, per_row: bool, variant: str, clip: float,
         want_mask: bool) -> QuantizedWeight:
    """TWN (TernaryBERT ``TwnQuantizer``): Δ = 0.7·mean|W_c|, α = mean(|W_c| : |W_c| > Δ)."""
    wc = w.clamp(-clip, clip)
    a = wc.abs()
    keep = a > TWN_THRESHOLD * _mean(a, per_row)
    kept = a * keep
    if per_row:
        total, count = kept.sum(dim=1, keepdim=True), keep.sum(dim=1, keepdim=True)
    else:
        total, count = kept.sum().reshape(1, 1), keep.sum().reshape(1, 1)
    alpha = total / count.clamp_min(1)  # no survivor -> α = 0, not 0/0
    codes = (torch.sign(wc) * keep).to(torch.int8)
    mask = (w.abs() < clip) if want_mask else None  # zero grad where W ≥ clip or W ≤ −clip
    return QuantizedWeight(codes, alpha, mask)


@register_weight_method("bwn", bits=(1,), default_granularity="row")
def _bwn(w: Tensor, bits: int, *, per_row: bool, variant: str, clip: float,
         want_mask: bool) -> QuantizedWeight:
    """BWN (BiT ``BwnQuantizer``): sign(W − mean(W)) with a per-tensor mean; scale mean|W|."""
    codes = _sign_pm1(w - w.mean())
    return QuantizedWeight(codes, _mean(w.abs(), per_row), None)


@register_weight_method("absmean", bits=(2,), default_granularity="tensor")
def _absmean(w: Tensor, bits: int, *, per_row: bool, variant: str, clip: float,
             want_mask: bool) -> QuantizedWeight:
    """BitNet b1.58: γ·round(clip(W/(γ+ε), −1, 1)), γ = mean|W|."""
    gamma = _mean(w.abs(), per_row)
    return QuantizedWeight(_round_clip(w / (gamma + ABSMEAN_EPS), 1), gamma, None)


@register_weight_method("uniform", bits=(3, 4, 5, 6, 7, 8), default_granularity="row")
def _uniform(w: Tensor, bits: int, *, per_row: bool, variant: str, clip: float,
             want_mask: bool) -> QuantizedWeight:
    """Symmetric n-bit: scale = max|W|/Qp, codes = clip(round(W/scale), −Qp, Qp)."""
    qp = 2 ** (bits - 1) - 1
    a = w.abs()
    amax = a.amax(dim=1, keepdim=True) if per_row else a.amax().reshape(1, 1)
    scale = amax / qp
    return QuantizedWeight(_round_clip(w / _divisor(scale), qp), scale, None)


# Methods defined in sibling modules register themselves on import (they import this module's
# registry, so they come last): BitNet binary and TriLM, the learned-step family (which imports
# Tequila once its base class exists). Any of them may be imported first.
from tbt.quant import weight_bitnet, weight_learned  # noqa: E402, F401
