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

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from tbt.config import GRANULARITIES, VARIANTS, check_weight_fields  # noqa: F401  (re-exported)
from tbt.quant.granularity import check_units, expand_scale, to_units
from tbt.quant.weight_ops import ABSMEAN_EPS, divisor, mean, round_clip, sign_pm1
from tbt.quant.weight_registry import (  # re-exported: the registry lives there
    WEIGHT_METHODS, Option, PackedLayout, PackedWeight, QuantFn, QuantizedWeight, WeightMethod,
    check_weight_method, register_weight_method, register_weight_quantizer)

__all__ = [
    "GRANULARITIES",
    "Option",
    "WeightSpec",
    "as_spec",
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

TWN_THRESHOLD = 0.7  # Δ = 0.7·mean|W|  (Li & Liu 2016)


# ---- the spec: one bundle from QuantConfig down to the method ----------------------------------

@dataclass(frozen=True)
class WeightSpec:
    """How one weight matrix is quantized: the one bundle passed from
    :class:`tbt.QuantConfig` (:meth:`~tbt.QuantConfig.weight_spec`) down to the method.

    Args:
        bits: 1 (binary), 2 (ternary) or 3..8 (``uniform``); see :func:`check_weight_method`.
        method: a registered weight method (module docstring; ``docs/methods.md``).
        variant: ``"paper"`` (Eq. 8-10, centred) or ``"released"`` (authors' code); ``tbt`` only.
        granularity: ``"row"`` | ``"tensor"`` | ``"group"`` | ``"shard"`` | ``None`` (the
            method's default: ``tensor`` for ``absmean``, ``row`` for the core methods).
        group_size, num_shards: unit sizes of ``group`` / ``shard`` (:mod:`tbt.quant.granularity`).
        options: the method's own settings (``{"clip": 2.5}`` for ``twn``); a mapping or
            ``(name, value)`` pairs, stored with every option of the method, defaults filled in.

    Calling a stateless spec on ``w`` is :func:`quantize_weight`; :meth:`codes_and_scale` is
    what the exporter packs. Construction validates everything but the tensor.
    """

    bits: int
    method: str = "tbt"
    variant: str = "paper"
    granularity: str | None = None
    group_size: int = 128
    num_shards: int = 1
    options: tuple[tuple[str, float], ...] = ()

    def __post_init__(self) -> None:
        check_weight_method(self.method, self.bits)
        check_weight_fields(self.variant, self.granularity, self.group_size, self.num_shards)
        given = self.options if isinstance(self.options, Mapping) else dict(self.options)
        object.__setattr__(self, "options", self.entry.resolve_options(given))

    @property
    def entry(self) -> WeightMethod:
        """The registry entry of :attr:`method`."""
        return WEIGHT_METHODS[self.method]

    @property
    def resolved_granularity(self) -> str:
        return self.granularity or self.entry.default_granularity

    def option(self, name: str) -> float:
        """The value of the method's option ``name`` (its default unless given)."""
        return dict(self.options)[name]

    def __call__(self, w: Tensor) -> Tensor:
        return quantize_weight(w, self)

    def codes_and_scale(self, w: Tensor) -> PackedWeight:
        """What the exporter packs: codes and a per-row (or per-group) float32 scale."""
        codes, scale = weight_codes(w, self)
        return PackedWeight(codes, scale.expand(w.shape[0], scale.shape[1]))

    def output_bias(self, w: Tensor) -> Tensor | None:
        """Stateless methods add no input-independent output term (Tequila does)."""
        return None

    def packed_layout(self, w: Tensor) -> PackedLayout:
        """Export shapes from ``w``'s shape and strides alone (row/tensor keep its layout)."""
        gran = self.resolved_granularity
        groups = w.shape[1] // self.group_size if gran == "group" else 1
        return PackedLayout(groups, False, False,
                            gran in ("row", "tensor") and not w.is_contiguous())

    @property
    def packable(self) -> bool:
        return self.entry.packable

    @property
    def row_local(self) -> bool:
        """True when row r's quantized value depends on row r alone (per-row statistics).

        Then an embedding lookup can quantize just the gathered rows: same values, same
        gradients, and |batch tokens| rows of work instead of |vocab|. BWN centres with a
        per-tensor mean (docs/numerics.md), so it is never row-local.
        """
        return self.resolved_granularity in ("row", "group") and self.method != "bwn"


def as_spec(spec_or_bits: WeightSpec | int, *args: Any, **kwargs: Any) -> WeightSpec:
    """``spec_or_bits`` if it is a :class:`WeightSpec`, else ``WeightSpec(bits, *args, **kw)``."""
    if isinstance(spec_or_bits, WeightSpec):
        if args or kwargs:
            raise TypeError("give either a WeightSpec or its fields, not both")
        return spec_or_bits
    return WeightSpec(spec_or_bits, *args, **kwargs)


# ---- the public functions --------------------------------------------------------------------

def weight_codes(w: Tensor, spec: WeightSpec | int, *args: Any, **kwargs: Any
                 ) -> tuple[Tensor, Tensor]:
    """Integer codes and scale of a weight matrix: exactly what the exporter packs.

    Args:
        w: ``(out, in)`` linear weight or ``(vocab, d)`` embedding, any float dtype.
        spec: a :class:`WeightSpec`, or its fields: ``weight_codes(w, 2, "twn")`` is
            ``weight_codes(w, WeightSpec(2, "twn"))``.

    Returns:
        ``codes``: int8 ``(out, in)``; ``scale``: float32 ``(out, 1)`` per row or shard,
        ``(1, 1)`` per tensor, ``(out, in/g)`` per group. ``dequantize(codes, scale, dtype)`` is
        the quantized weight.
    """
    spec = as_spec(spec, *args, **kwargs)
    _check(w, spec)
    q = _quantize(w, spec, want_mask=False)
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


def quantize_weight(w: Tensor, spec: WeightSpec | int, *args: Any, **kwargs: Any) -> Tensor:
    """Fake-quantized weight for training: same shape and dtype as ``w``, differentiable.

    The value equals ``dequantize(*weight_codes(w, spec), w.dtype)`` bit for bit, with or
    without autograd. Backward is the method's STE: identity, ``1[|(W−μ)/α| < 1]`` for
    ``tbt``/``paper`` (Eq. 10), ``1[−clip < W < clip]`` for ``twn``. ``spec`` as in
    :func:`weight_codes`.
    """
    spec = as_spec(spec, *args, **kwargs)
    _check(w, spec)
    if not (w.requires_grad and torch.is_grad_enabled()):  # eval / no_grad: no STE, no mask
        q = _quantize(w, spec, want_mask=False)
        return dequantize(q.codes, q.scale, w.dtype)
    return _FakeQuantize.apply(w, spec)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, w, spec):  # type: ignore[override]
        q = _quantize(w, spec, want_mask=ctx.needs_input_grad[0])
        ctx.identity = q.ste_mask is None
        if not ctx.identity:
            ctx.save_for_backward(q.ste_mask)
        return dequantize(q.codes, q.scale, w.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        if not ctx.identity:
            (mask,) = ctx.saved_tensors
            grad = grad * mask
        return grad, None


# ---- validation and dispatch -----------------------------------------------------------------

def _check(w: Tensor, spec: WeightSpec) -> None:
    """What the spec cannot know: the tensor, and a method without per-layer state."""
    if spec.entry.fn is None:
        raise ValueError(f"method={spec.method!r} keeps per-layer state (learned scales or a "
                         f"bias); build its module with "
                         f"tbt.quant.weight_learned.make_weight_quantizer or quantize_model "
                         f"instead of calling quantize_weight/weight_codes")
    if not isinstance(w, Tensor) or not w.is_floating_point():
        raise ValueError(f"w must be a floating-point torch.Tensor; got "
                         f"{getattr(w, 'dtype', type(w).__name__)}")
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D, (out, in) or (vocab, d); got shape {tuple(w.shape)}: "
                         f"reshape it to 2-D (e.g. w.flatten(1)) before quantizing")
    check_units(tuple(w.shape), spec.resolved_granularity, spec.group_size, spec.num_shards)


def _quantize(w: Tensor, spec: WeightSpec, *, want_mask: bool) -> QuantizedWeight:
    fn, gran = spec.entry.fn, spec.resolved_granularity
    w32 = w.detach().to(torch.float32)  # statistics in float32 (no copy if already float32)
    if gran in ("row", "tensor"):
        return fn(w32, spec, per_row=gran == "row", want_mask=want_mask)
    # group / shard: the method runs per row of the (U, n) unit view (tbt.quant.granularity)
    q = fn(to_units(w32, gran, spec.group_size, spec.num_shards), spec, per_row=True,
           want_mask=want_mask)
    n = w.shape[0]
    if gran == "group":
        scale = q.scale.reshape(n, -1)
    else:
        scale = q.scale.reshape(spec.num_shards, 1).repeat_interleave(n // spec.num_shards, dim=0)
    mask = None if q.ste_mask is None else q.ste_mask.reshape(w.shape)
    return QuantizedWeight(q.codes.reshape(w.shape), scale, mask)


# ---- the methods -----------------------------------------------------------------------------

@register_weight_method("tbt", bits=(1, 2), default_granularity="row")
def _tbt(w: Tensor, spec: WeightSpec, *, per_row: bool, want_mask: bool) -> QuantizedWeight:
    """TBT statistics-based quantizer (paper Eq. 8-10, or the released code; module docs)."""
    bits = spec.bits
    if spec.variant == "released":  # no centring, identity STE (docs/numerics.md §1a)
        mean_abs = mean(w.abs(), per_row)
        if bits == 1:  # α·sign(W): sign(0) = 0 kept, as in the reference
            return QuantizedWeight(torch.sign(w).to(torch.int8), mean_abs, None)
        alpha = (4.0 / 3.0) * mean_abs
        return QuantizedWeight(round_clip(w / divisor(alpha), 1), alpha, None)
    # paper, Eq. 8 (ternary) / Eq. 9 (binary): μ with the granularity of α, not added back
    centred = w - mean(w, per_row)  # W − μ; scratch, divided in place below
    alpha = mean(centred.abs(), per_row)
    if bits == 1:  # Eq. 9: sign(W − μ), exact 0 -> +1; the ratio is needed only for Eq. 10
        codes = sign_pm1(centred)
        mask = centred.div_(divisor(alpha)).abs() < 1 if want_mask else None
        return QuantizedWeight(codes, alpha, mask)
    alpha = (4.0 / 3.0) * alpha  # Eq. 8
    r = centred.div_(divisor(alpha))  # (W − μ)/α
    mask = r.abs() < 1 if want_mask else None  # Eq. 10, before r is clipped in place
    return QuantizedWeight(round_clip(r, 1), alpha, mask)


@register_weight_method("twn", bits=(2,), default_granularity="row",
                        options={"clip": Option(2.5, gt=0.0, doc="the input clip, weight units")})
def _twn(w: Tensor, spec: WeightSpec, *, per_row: bool, want_mask: bool) -> QuantizedWeight:
    """TWN (TernaryBERT ``TwnQuantizer``): Δ = 0.7·mean|W_c|, α = mean(|W_c| : |W_c| > Δ)."""
    clip = spec.option("clip")
    wc = w.clamp(-clip, clip)
    a = wc.abs()
    keep = a > TWN_THRESHOLD * mean(a, per_row)
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
def _bwn(w: Tensor, spec: WeightSpec, *, per_row: bool, want_mask: bool) -> QuantizedWeight:
    """BWN (BiT ``BwnQuantizer``): sign(W − mean(W)) with a per-tensor mean; scale mean|W|."""
    codes = sign_pm1(w - w.mean())
    return QuantizedWeight(codes, mean(w.abs(), per_row), None)


@register_weight_method("absmean", bits=(2,), default_granularity="tensor")
def _absmean(w: Tensor, spec: WeightSpec, *, per_row: bool, want_mask: bool) -> QuantizedWeight:
    """BitNet b1.58: γ·round(clip(W/(γ+ε), −1, 1)), γ = mean|W|."""
    gamma = mean(w.abs(), per_row)
    return QuantizedWeight(round_clip(w / (gamma + ABSMEAN_EPS), 1), gamma, None)


@register_weight_method("uniform", bits=(3, 4, 5, 6, 7, 8), default_granularity="row")
def _uniform(w: Tensor, spec: WeightSpec, *, per_row: bool, want_mask: bool) -> QuantizedWeight:
    """Symmetric n-bit: scale = max|W|/Qp, codes = clip(round(W/scale), −Qp, Qp)."""
    qp = 2 ** (spec.bits - 1) - 1
    a = w.abs()
    amax = a.amax(dim=1, keepdim=True) if per_row else a.amax().reshape(1, 1)
    scale = amax / qp
    return QuantizedWeight(round_clip(w / divisor(scale), qp), scale, None)
