"""Weight quantizers with learned parameters: LSQ, ParetoQ's SEQ and TernaryLLM's DLT.

How it works
------------
A stateless method (:mod:`tbt.quant.weight`) is a pure function of the latent weight. The
methods here also *learn* their scale (and DLT a shift), so each quantized layer owns a small
module, a :class:`WeightQuantizer`, created by surgery (:func:`make_weight_quantizer`) from the
registry entry and initialised from that layer's latent weight. It plugs in where a
:class:`~tbt.quant.modules.WeightSpec` goes (``QuantLinear.weight_spec``), so ``QuantLinear``
still computes ``F.linear(act_q(x), weight_q(W), b)``; being an ``nn.Module`` attribute, its
parameters join the model's (optimizer, state dict, checkpoints, packed export).

Every method works on the unit view ``W_u`` ``(U, n)`` of :mod:`tbt.quant.granularity` (one
learned step ``α`` per unit, shape ``(U, 1)``) and on the ratio ``r = W_u/α_c`` with
``α_c = max(α, 1e-5)`` (the guard of every reference code):

==============  ======  =============================================  ==================  =====
method          bits    codes ``k`` (int8)                              value               Qp
==============  ======  =============================================  ==================  =====
``lsq``         1       ``sign(r)`` (0 -> +1)                           ``α·k``             1
``lsq``         2       ``clip(round(r), −1, 1)``                       ``α·k``             1
``lsq``         3..8    ``clip(round(r), −2^(b−1), 2^(b−1)−1)``         ``α·k``             Qp
``seq``         2       ``round(clip(r, ±0.99)·1.5)`` ∈ {−1, 0, 1}      ``(2α/3)·k``        1
``seq-int2``    2       ``2·round(clip(r, ±0.99)·2 − 0.5) + 1``         ``(α/4)·k``         1
                        ∈ {−3, −1, 1, 3} (4 levels, no zero)
``dlt``         2       ``clip(round(r), −1, 1)``                       ``α·k + γ``         1
``dlt-centred``  2      same on ``r = (W_u − γ)/α_c``                   ``α·k + γ``         1
==============  ======  =============================================  ==================  =====

Gradients (:class:`_LearnedStep`, explicit because the α gradient *is* the method), with ``G``
the upstream gradient on the unit view, ``inside = 1[lo ≤ r ≤ hi]`` (``[Qn, Qp]`` for LSQ/DLT,
``±0.99`` for SEQ) and ``s = 1/√(numel(W)·Qp)`` (over the whole matrix even for per-row α, as
ParetoQ's code):

* ``∂L/∂W = G·inside``;
* ``∂L/∂α = s·Σ_unit G·step`` with ``step = k·c − r`` inside (``c`` the level factor of the
  table: 1, 2/3, 1/4) and outside the saturated value: ``k`` for LSQ/DLT (``Qn``/``Qp``),
  ``sign(r)`` for ``seq`` and ``0.75·sign(r)`` for ``seq-int2`` (ParetoQ's ``Qp = (n−shift)/n``;
  for ternary that is 1, not the level 2/3: the released code's choice, kept). Binary LSQ:
  ``step = sign(W)`` everywhere;
* ``∂L/∂γ = Σ_unit G`` (DLT, no gradient scale); ``dlt-centred``: ``Σ_unit G·(1 − inside)``.

Initialisation (from the latent weight at surgery): ``lsq`` ``α₀ = 2·mean|W_u|/√Qp`` (LSQ paper;
binary ``mean|W_u|`` as ParetoQ); ``seq`` and ``dlt`` ``α₀ = max|W_u|`` (ParetoQ; AngelSlim's
DLT re-implementation); ``γ₀ = 0`` (AngelSlim leaves γ uninitialised, docs/related.md §6a).

Exactness: the forward value is ``dequantize(codes, scale, dtype, offset)`` on exactly the
tensors :meth:`WeightQuantizer.codes_and_scale` returns, so the packed export equals the eval-mode
fake-quantized layer bit for bit. ``seq-int2`` codes are not ternary, so the exporter keeps that
layer fake-quantized (``packable=False``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tbt.quant.granularity import check_units, scale_from_units, to_units, unit_shape
from tbt.quant.weight import (PackedLayout, PackedWeight, WeightSpec, check_weight_method,
                              dequantize, register_weight_quantizer)

__all__ = ["WeightQuantizer", "LsqWeightQuantizer", "SeqWeightQuantizer",
           "SeqInt2WeightQuantizer", "DltWeightQuantizer", "DltCentredWeightQuantizer", "make_weight_quantizer", "STEP_EPS"]

STEP_EPS = 1e-5  # α_c = max(α, 1e-5) (ParetoQ, LSQ codes)
SEQ_CLIP = 0.99  # ParetoQ's released clip 1 − 1e-2 (docs/related.md §8: the Eq. 5 trap)


def make_weight_quantizer(cfg: Any, bits: int, weight: Tensor) -> nn.Module:
    """The weight quantizer of one layer under ``cfg`` (a :class:`tbt.QuantConfig`).

    Stateless methods give one shared :class:`~tbt.quant.weight.WeightSpec`; methods with
    state build their module from the spec and the layer's latent ``(out, in)`` ``weight`` (not
    read when it is on the meta device: the values then come from a checkpoint).
    """
    spec = cfg.weight_spec(bits)
    if spec.entry.quantizer is None:
        return spec
    return spec.entry.quantizer.from_spec(spec, weight)


class WeightQuantizer(nn.Module):
    """Base of per-layer weight quantizers (the protocol ``QuantLinear`` and the exporter use).

    Subclasses set ``method`` and implement :meth:`codes_and_scale` and :meth:`forward`; the
    defaults say: not row-local (an embedding quantizes its whole matrix), packable, no
    output bias. ``shape`` is the ``(out, in)`` of the weight it quantizes.
    """

    method = ""
    variant = "-"
    clip = 0.0
    row_local = False
    packable = True

    def __init__(self, bits: int, shape: tuple[int, int], granularity: str,
                 group_size: int = 128, num_shards: int = 1) -> None:
        super().__init__()
        check_weight_method(self.method, bits)
        shape = (int(shape[0]), int(shape[1]))
        check_units(shape, granularity, group_size, num_shards)
        self.bits, self.shape, self.granularity = bits, shape, granularity
        self.group_size, self.num_shards = group_size, num_shards
        self.unit_shape = unit_shape(shape, granularity, group_size, num_shards)

    @classmethod
    def from_spec(cls, spec: WeightSpec, weight: Tensor) -> WeightQuantizer:
        """The quantizer of one layer: ``spec`` (bits, granularity, the method's options) and
        its latent ``(out, in)`` weight (read unless on the meta device)."""
        q = cls(spec.bits, tuple(weight.shape), spec.resolved_granularity, spec.group_size,
                spec.num_shards, **cls.option_kwargs(spec))
        q.to(device=weight.device)
        if not weight.is_meta:
            q.init_from_(weight)
        return q

    @classmethod
    def option_kwargs(cls, spec: WeightSpec) -> dict[str, Any]:
        """Constructor keywords from the method's options (``WeightSpec.option``)."""
        return {}

    def units(self, t: Tensor) -> Tensor:
        """``(out, in)`` -> the ``(U, n)`` unit view."""
        return to_units(t, self.granularity, self.group_size, self.num_shards)

    def exported(self, s: Tensor) -> Tensor:
        """A per-unit ``(U, 1)`` tensor in the exported scale shape."""
        return scale_from_units(s, self.shape, self.granularity, self.num_shards)

    def check_weight(self, w: Tensor) -> None:
        if tuple(w.shape) != self.shape:
            raise ValueError(f"{type(self).__name__} was built for a {self.shape} weight; got "
                             f"{tuple(w.shape)}")

    @torch.no_grad()
    def init_from_(self, w: Tensor) -> None:  # pragma: no cover - every subclass overrides
        """Set the learned tensors from the latent weight (the paper's initialisation)."""

    def codes_and_scale(self, w: Tensor) -> PackedWeight:
        raise NotImplementedError

    def output_bias(self, w: Tensor) -> Tensor | None:
        """Input-independent per-output term added to the layer bias (Tequila), or ``None``."""
        return None

    has_offset = False
    has_output_bias = False

    def packed_layout(self, w: Tensor) -> PackedLayout:
        """Export shapes (the values come from a unit view: always contiguous)."""
        groups = self.shape[1] // self.group_size if self.granularity == "group" else 1
        return PackedLayout(groups, self.has_offset, self.has_output_bias, False)

    def extra_repr(self) -> str:
        gran = self.granularity
        if gran == "group":
            gran = f"group:{self.group_size}"
        elif gran == "shard":
            gran = f"shard:{self.num_shards}"
        return f"method={self.method}, bits={self.bits}, shape={self.shape}, granularity={gran}"


# ---- the learned-step family (LSQ / SEQ / DLT) ------------------------------------------------

@dataclass(frozen=True)
class Grid:
    """Level set on the ratio ``r = W/α_c`` (module table)."""

    kind: str  # "binary" | "round" | "seq" | "seq_int2"
    lo: float  # STE window [lo, hi] (inclusive)
    hi: float
    level: float  # value = code · α · level
    qp_grad: int  # Qp of the gradient scale 1/√(numel·Qp)
    saturated: float  # |∂Ŵ/∂α| / α-units outside the window (0 = use the code k·level)

    def codes(self, r: Tensor) -> Tensor:
        """Integer-valued float codes of ``r`` (a scratch tensor may be modified)."""
        if self.kind == "binary":
            return torch.where(r < 0, -1.0, 1.0).to(r.dtype)
        if self.kind == "round":
            return torch.round(r).clamp_(self.lo, self.hi)
        c = r.clamp(-SEQ_CLIP, SEQ_CLIP)
        if self.kind == "seq":
            return torch.round(c * 1.5)
        return torch.round(c * 2.0 - 0.5) * 2.0 + 1.0  # seq_int2: 2u + 1 ∈ {−3, −1, 1, 3}

    def alpha_step(self, k: Tensor, r: Tensor, inside: Tensor) -> Tensor:
        """``∂Ŵ/∂α`` per weight in α units (module docstring)."""
        if self.kind == "binary":
            return k
        out = k * self.level if self.saturated == 0 else torch.sign(r) * self.saturated
        return torch.where(inside, k * self.level - r, out)


def lsq_grid(bits: int) -> Grid:
    if bits == 1:
        return Grid("binary", -1.0, 1.0, 1.0, 1, 0.0)
    if bits == 2:  # the ternary grid {−1, 0, 1}, TBT's meaning of 2 bits
        return Grid("round", -1.0, 1.0, 1.0, 1, 0.0)
    qp = 2 ** (bits - 1) - 1
    return Grid("round", float(-(qp + 1)), float(qp), 1.0, qp, 0.0)


SEQ_TERNARY = Grid("seq", -SEQ_CLIP, SEQ_CLIP, 2.0 / 3.0, 1, 1.0)
SEQ_INT2 = Grid("seq_int2", -SEQ_CLIP, SEQ_CLIP, 0.25, 1, 0.75)


def _step_forward(q: LearnedStepQuantizer, w: Tensor, alpha: Tensor, shift: Tensor | None):
    """(value, codes k on the unit view, inside mask, α_c, PackedWeight) -- one place.

    Statistics in float32, or float64 for float64 inputs (so gradcheck can run)."""
    q.check_weight(w)
    cdt = torch.promote_types(w.dtype, torch.float32)
    wu = q.units(w.detach().to(cdt))
    a = torch.where(alpha > STEP_EPS, alpha, STEP_EPS).detach().to(cdt)  # α_c (U, 1)
    if q.centred:  # dlt-centred: quantize W − γ, add γ back
        wu = wu - shift.detach().to(cdt)
    r = wu / a
    inside = (r >= q.grid.lo) & (r <= q.grid.hi)
    k = q.grid.codes(r)
    offset = None if shift is None else q.exported(shift.detach().to(cdt))
    packed = PackedWeight(k.reshape(q.shape).to(torch.int8), q.exported(a * q.grid.level), offset)
    value = dequantize(packed.codes, packed.scale, w.dtype, packed.offset)
    return value, k, inside, a, packed


class _LearnedStep(torch.autograd.Function):
    """Fake quantization with learned α (and γ); backward of the module docstring."""

    @staticmethod
    def forward(ctx, w, alpha, shift, q):  # type: ignore[override]
        value, k, inside, a, _ = _step_forward(q, w, alpha, shift)
        ctx.q, ctx.has_shift = q, shift is not None
        ctx.w_dtype, ctx.a_dtype = w.dtype, alpha.dtype
        ctx.save_for_backward(w, a, k.to(torch.int8), inside)
        ctx.shift = None if shift is None else shift.detach().to(a.dtype)
        return value

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        w, a, k, inside = ctx.saved_tensors
        q: LearnedStepQuantizer = ctx.q
        gu = q.units(grad.to(a.dtype))
        grad_w = torch.where(inside, gu, 0.0).reshape(q.shape).to(ctx.w_dtype) \
            if ctx.needs_input_grad[0] else None
        grad_alpha = grad_shift = None
        if ctx.needs_input_grad[1]:
            wu = q.units(w.detach().to(a.dtype))
            r = (wu - ctx.shift) / a if q.centred else wu / a
            step = q.grid.alpha_step(k.to(a.dtype), r, inside)
            scale = 1.0 / math.sqrt(w.numel() * q.grid.qp_grad)
            grad_alpha = ((gu * step).sum(dim=1, keepdim=True) * scale).to(ctx.a_dtype)
        if ctx.has_shift and ctx.needs_input_grad[2]:
            # γ added after the grid: Σ G; centred (also subtracted before): Σ G·(1 − inside)
            gs = torch.where(inside, 0.0, gu) if q.centred else gu
            grad_shift = gs.sum(dim=1, keepdim=True).to(ctx.a_dtype)
        return grad_w, grad_alpha, grad_shift, None


class LearnedStepQuantizer(WeightQuantizer):
    """Shared machinery of the learned-step methods: ``alpha`` ``(U, 1)`` float32 Parameter."""

    grid: Grid
    centred = False

    def __init__(self, bits: int, shape: tuple[int, int], granularity: str,
                 group_size: int = 128, num_shards: int = 1) -> None:
        super().__init__(bits, shape, granularity, group_size, num_shards)
        self.alpha = nn.Parameter(torch.ones(self.unit_shape[0], 1, dtype=torch.float32))

    def forward(self, w: Tensor) -> Tensor:
        shift = getattr(self, "shift", None)
        if torch.is_grad_enabled() and (w.requires_grad or self.alpha.requires_grad):
            return _LearnedStep.apply(w, self.alpha, shift, self)
        return _step_forward(self, w, self.alpha, shift)[0]

    @torch.no_grad()
    def codes_and_scale(self, w: Tensor) -> PackedWeight:
        return _step_forward(self, w, self.alpha, getattr(self, "shift", None))[4]


@register_weight_quantizer("lsq", bits=(1, 2, 3, 4, 5, 6, 7, 8), default_granularity="row")
class LsqWeightQuantizer(LearnedStepQuantizer):
    """LSQ weights (Esser et al. 2020, docs/related.md §5a; ParetoQ's 1/3/4-bit path, §8).

    ``α₀ = 2·mean|W_u|/√Qp`` (binary: ``mean|W_u|``); bits 2 is the ternary grid.
    """

    method = "lsq"

    def __init__(self, bits: int, shape: tuple[int, int], granularity: str,
                 group_size: int = 128, num_shards: int = 1) -> None:
        super().__init__(bits, shape, granularity, group_size, num_shards)
        self.grid = lsq_grid(bits)

    @torch.no_grad()
    def init_from_(self, w: Tensor) -> None:
        mean_abs = self.units(w.detach().to(torch.float32)).abs().mean(dim=1, keepdim=True)
        a0 = mean_abs if self.bits == 1 else 2.0 * mean_abs / math.sqrt(self.grid.qp_grad)
        self.alpha.copy_(a0)


@register_weight_quantizer("seq", bits=(2,), default_granularity="row")
class SeqWeightQuantizer(LearnedStepQuantizer):
    """ParetoQ Stretched Elastic Quant, ternary (docs/related.md §8): levels α·{−2/3, 0, 2/3}.

    ``α₀ = max|W_u|`` (threshold α/3). The released code's ±0.99 clip, not the paper's Eq. 5.
    """

    method = "seq"
    grid = SEQ_TERNARY

    @torch.no_grad()
    def init_from_(self, w: Tensor) -> None:
        self.alpha.copy_(self.units(w.detach().to(torch.float32)).abs().amax(dim=1, keepdim=True))


@register_weight_quantizer("seq-int2", bits=(2,), default_granularity="row", packable=False)
class SeqInt2WeightQuantizer(SeqWeightQuantizer):
    """ParetoQ SEQ, 2-bit: levels α·{±1/4, ±3/4} (no zero), stored as codes {±1, ±3}·α/4."""

    method = "seq-int2"
    grid = SEQ_INT2
    packable = False


@register_weight_quantizer("dlt", bits=(2,), default_granularity="row")
class DltWeightQuantizer(LearnedStepQuantizer):
    """TernaryLLM Dual Learnable Ternarization (docs/related.md §6a, AngelSlim's reading):
    ``Ŵ = α·clip(round(W/α), −1, 1) + γ`` with learned ``α`` and ``γ`` per row or group.

    ``α₀ = max|W_u|``, ``γ₀ = 0``; with ``γ = 0`` it is ``lsq`` ternary with the same α.
    """

    method = "dlt"
    has_offset = True

    def __init__(self, bits: int, shape: tuple[int, int], granularity: str,
                 group_size: int = 128, num_shards: int = 1) -> None:
        super().__init__(bits, shape, granularity, group_size, num_shards)
        self.grid = lsq_grid(2)
        self.shift = nn.Parameter(torch.zeros(self.unit_shape[0], 1, dtype=torch.float32))

    @torch.no_grad()
    def init_from_(self, w: Tensor) -> None:
        self.alpha.copy_(self.units(w.detach().to(torch.float32)).abs().amax(dim=1, keepdim=True))
        self.shift.zero_()



@register_weight_quantizer("dlt-centred", bits=(2,), default_granularity="row")
class DltCentredWeightQuantizer(DltWeightQuantizer):
    """DLT, the "centred" reading of TernaryLLM's abstract (docs/related.md §6a, unverified):
    ``Ŵ = α·clip(round((W − γ)/α), −1, 1) + γ``; ``∂L/∂γ = Σ G·1[outside]`` (the round STE
    cancels γ inside the window), ``r = (W − γ)/α`` everywhere else.

    Init: ``γ₀ = mean(W_u)``, ``α₀`` = TWN's scale of ``W_u − γ₀`` (mean ``|W−γ|`` over
    ``|W−γ| > 0.7·mean|W−γ|``).
    """

    method = "dlt-centred"
    centred = True

    @torch.no_grad()
    def init_from_(self, w: Tensor) -> None:
        wu = self.units(w.detach().to(torch.float32))
        gamma = wu.mean(dim=1, keepdim=True)
        c = (wu - gamma).abs()
        keep = c > 0.7 * c.mean(dim=1, keepdim=True)
        alpha = (c * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
        self.alpha.copy_(alpha)
        self.shift.copy_(gamma)
