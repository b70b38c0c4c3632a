"""Activation quantizers: the learned-step (elastic) quantizer of TBT and the 8-bit min/max one.

How it works
------------
:class:`ElasticQuantizer` maps a tensor ``x`` (any shape) to ``α·code`` with one learned scalar
``α`` per tensor (the whole batch, every head) and integer codes in ``[Qn, Qp]``:

=================  ===============  ====================  ===================================
bits, signed       levels           ``Qn, Qp``            note
=================  ===============  ====================  ===================================
1, signed          ``{−α, α}``      −1, 1                 ``sign``; an exact 0 stays 0
2, signed          ``{−α, 0, α}``   −1, 1
1, non-negative    ``{0, α}``       0, 1
2, non-negative    ``{0, α, 2α}``   0, 2                  released: ``+ min(x)`` (below)
3..8, signed       LSQ              −2^(b−1), 2^(b−1)−1
3..8, non-neg.     LSQ              0, 2^b−1              released: ``+ min(x)``
=================  ===============  ====================  ===================================

``code = clamp(round(r), Qn, Qp)`` with ``r = x̃/α_c``, ``α_c = max(α, 1e-5)``, ``round`` half to
even (``torch.round``) and ``x̃`` the tensor actually quantized (see the variants). The gradient is
the LSQ straight-through estimator, written out in :class:`_ElasticQuantize` because the α
gradient *is* the method:

* ``∂L/∂x = G·1[Qn ≤ r ≤ Qp]`` (bounds inclusive);
* ``∂L/∂α = s·Σ G·{Qn if r < Qn; Qp if r > Qp; round(r) − r otherwise}``, except signed binary:
  ``s·Σ G·sign(x̃)`` with no range mask. ``s`` is the gradient scale of the variant.

Variants (``variant=``)
-----------------------
``"released"`` -- the authors' code (``ElasticQuantBinarizerSigned/Unsigned``,
docs/numerics.md §4a), to float rounding. ``x̃ = x``, except for non-negative inputs with b ≥ 2,
where ``x̃ = x − m`` with ``m = min(x)`` (a per-tensor constant: no gradient flows through it, and
it stays a tensor, so there is no host sync) and the output is ``α_c·code + m``.
``s = 1/√(N·Qp)`` (``N = numel(x)``): ``1/√N`` for b ≤ 2 signed and b = 1 non-negative, ``1/√(2N)`` for b = 2 non-negative.

``"paper"`` -- Liu et al. 2023, §2.3, Eq. 11-14 (docs/numerics.md §4b). Choices the paper
leaves open are marked [choice] (docs/numerics.md §4b lists them too):

* signed inputs are zero-meaned, ``x̃ = X' = X − mean(X)``, with the mean over the whole tensor
  (the granularity of α) [choice]. The mean is **not** added back (the paper's equations do not).
  The mean is a statistic without gradient [choice], exactly like ``μ`` in the paper's weight STE
  (Eq. 10) and in :mod:`tbt.quant.weight`; so ``∂L/∂x = G·1[|X'| ≤ α]``.
* non-negative inputs: ``α·round(clip(X/α, 0, 2))`` / ``{0, α}``, no min shift.
* α gradient: Eq. 12 (ternary) / Eq. 14 (binary), i.e. the LSQ rule above with ``s = 1``
  (no gradient scaling). The x-gradient window is the one of Eq. 12/14's indicators, inclusive
  [choice: the paper writes only the α gradient for activations].
* ``α_c = max(α, 1e-5)`` guards the division as in the released code [choice: paper silent].
* ``sign(0) = 0`` for the signed binary case, as ``torch.sign`` and the released code [choice].
* b = 3..8 follow the same rules (centred signed, unshifted non-negative, ``s = 1``) [choice:
  the paper covers only 1 and 2 bits].

Initialisation (both variants; the paper describes none, docs/numerics.md §4d): α starts at 1.0
and is set from the first batch the quantizer sees in training mode, or explicitly by
:func:`calibrate`: ``2·mean|x|/√max(2^(b−1)−1, 1)`` (signed) or ``4·mean|x|/√(2^b−1)`` (non-negative), on the raw
``x`` (not ``x − m`` nor ``X'``). Under ``torch.distributed`` the initial α is averaged over ranks
(the released code lets replicas diverge). The ``initialized`` flag is a persistent buffer, so a
loaded checkpoint never re-initialises; its Python mirror keeps the per-step check free of syncs.

:class:`MinMaxQuantizer` is the non-learned 8-bit quantizer of the W·A8 settings (DQ-BART's
``SymQuantizer`` / ``AsymQuantizer``, docs/numerics.md §4c): clip to ``[−c, c]``, dynamic per-tensor
scale, STE ``1[−c < x < c]``.

All arithmetic runs in at least float32 whatever the input dtype, and the result is cast back
to ``x.dtype``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, NamedTuple

import torch
from torch import Tensor, nn

from tbt.config import VARIANTS
from tbt.quant import fused as _fused

if TYPE_CHECKING:
    from tbt.runtime.linear import ActSpec

__all__ = ["ElasticQuantizer", "MinMaxQuantizer", "calibrate", "elastic_quantize",
           "minmax_quantize", "initial_alpha", "elastic_spec", "ElasticSpec", "VARIANTS",
           "ALPHA_EPS"]

logger = logging.getLogger(__name__)

ALPHA_EPS = 1e-5  # α_c = max(α, 1e-5), released code's guard
ASYM_EPS = 1e-8  # DQ-BART AsymQuantizer: range + 1e-8


class ElasticSpec(NamedTuple):
    """Resolved constants of one elastic quantizer (what an exporter needs to reproduce it)."""

    bits: int
    signed: bool
    variant: str
    qn: int
    qp: int
    use_sign: bool  # signed binary: code = sign(x̃)
    shift_min: bool  # released non-negative b ≥ 2: x̃ = x − min(x), min added back
    center: bool  # paper signed: x̃ = x − mean(x), mean not added back
    grad_scale: bool  # released: ∂L/∂α · 1/√(N·Qp)


@lru_cache(maxsize=None)
def elastic_spec(bits: int, signed: bool, variant: str = "paper") -> ElasticSpec:
    """Level set and gradient rules for ``bits`` ∈ 1..8, ``signed``, ``variant`` (module table)."""
    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 8:
        raise ValueError(f"bits={bits!r}: an elastic activation quantizer takes an int in 1..8 "
                         f"(1 = binary, 2 = ternary, 3..8 = LSQ)")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is unknown; choose one of {list(VARIANTS)}")
    signed = bool(signed)
    if bits <= 2:
        qn, qp = (-1, 1) if signed else (0, bits)  # TBT level sets
    else:
        qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    released = variant == "released"
    return ElasticSpec(bits, signed, variant, qn, qp, use_sign=signed and bits == 1,
                       shift_min=released and not signed and bits >= 2,
                       center=not released and signed, grad_scale=released)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # fp16/bf16 -> fp32, fp64 stays


def _elastic_codes(
    x: Tensor, alpha: Tensor, spec: ElasticSpec
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """(x̃ in the compute dtype, code = clamp(round(x̃/α_c), Qn, Qp) or sign(x̃), α_c, offset)."""
    xc = x.to(_compute_dtype(x.dtype))
    a = torch.where(alpha > ALPHA_EPS, alpha, ALPHA_EPS).to(xc.dtype)  # α_c
    offset = xc.min() if spec.shift_min else xc.mean() if spec.center else None  # 0-dim, no sync
    xs = xc if offset is None else xc - offset
    code = torch.sign(xs) if spec.use_sign else torch.round(xs / a).clamp_(spec.qn, spec.qp)
    return xs, code, a, offset


def _elastic_output(code: Tensor, a: Tensor, offset: Tensor | None, spec: ElasticSpec) -> Tensor:
    y = code * a
    if spec.shift_min:
        y = y + offset  # released: the min is added back; the paper's mean is not
    return y


def _elastic_value(
    x: Tensor, alpha: Tensor, spec: ElasticSpec
) -> tuple[Tensor, Tensor, Tensor | None]:
    """(y in the compute dtype, α_c, offset) -- the forward of every case in one place."""
    _, code, a, offset = _elastic_codes(x, alpha, spec)
    return _elastic_output(code, a, offset, spec), a, offset


class _ElasticQuantize(torch.autograd.Function):
    """LSQ-style fake quantization with the α gradient of the chosen variant (module docstring).

    The backward needs no ratio ``r``: with ``inside = 1[Qn ≤ r ≤ Qp]`` and ``code`` the clamped
    rounded ratio, the LSQ step is ``code − r·inside`` (``round(r) − r`` inside, ``Qn``/``Qp``
    outside), so ``Σ G·step = Σ G·code − Σ (G·inside)·x̃ / α_c``. The forward saves ``code``
    (int8) and ``inside`` (bool) next to ``x``, and the backward is one masked copy plus three
    reductions instead of recomputing the ratio and two nested ``where``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, alpha: Tensor, spec: ElasticSpec):  # type: ignore[override]
        ctx.spec, ctx.alpha_dtype, ctx.x_dtype, ctx.numel = spec, alpha.dtype, x.dtype, x.numel()
        ctx.fused = _fused.applies(x, spec)
        if ctx.fused:  # one C pass; same values (tbt.quant.fused)
            y, saved, a, offset = _fused.elastic_step(x, _alpha_c(alpha), spec)
            ctx.save_for_backward(saved, x.contiguous(), a, offset)
            return y
        xs, code, a, offset = _elastic_codes(x, alpha, spec)
        y = _elastic_output(code, a, offset, spec)
        r = xs / a
        inside = (r >= spec.qn) & (r <= spec.qp)  # inclusive STE window
        code_dtype = torch.int8 if spec.qp <= 127 else torch.int16
        ctx.save_for_backward(code.to(code_dtype), inside, x, a, offset)
        return y.to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        if ctx.fused:
            return _fused.elastic_step_backward(ctx, grad)
        code, inside, x, a, offset = ctx.saved_tensors
        spec: ElasticSpec = ctx.spec
        g = grad.to(a.dtype)
        gx = torch.where(inside, g, 0.0)  # ∂L/∂x̃ = G·1[Qn ≤ r ≤ Qp]
        grad_alpha = None
        if ctx.needs_input_grad[1]:
            g_flat = g.reshape(-1)
            grad_alpha = torch.dot(g_flat, code.reshape(-1).to(g.dtype))  # Σ G·code
            if not spec.use_sign:  # signed binary: Σ G·sign(x̃), no range term
                gx_flat = gx.reshape(-1)
                gx_xs = torch.dot(gx_flat, x.reshape(-1).to(g.dtype))  # Σ G·inside·x
                if offset is not None:  # x̃ = x − offset
                    gx_xs = gx_xs - offset * gx_flat.sum()
                grad_alpha = grad_alpha - gx_xs / a
            if spec.grad_scale:
                grad_alpha = grad_alpha * (1.0 / math.sqrt(ctx.numel * spec.qp))
            grad_alpha = grad_alpha.to(ctx.alpha_dtype)
        grad_x = gx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None
        return grad_x, grad_alpha, None


def _alpha_c(alpha: Tensor) -> Tensor:
    """α_c = max(α, 1e-5) as a detached 0-dim float32 tensor (the fused kernels read it)."""
    return torch.where(alpha > ALPHA_EPS, alpha, ALPHA_EPS).to(torch.float32).detach()


def elastic_quantize(x: Tensor, alpha: Tensor, bits: int, signed: bool,
                     variant: str = "paper") -> Tensor:
    """Fake-quantize ``x`` (any shape, float) with the learned step ``alpha`` (0-dim).

    Returns a tensor of ``x``'s shape and dtype; differentiable in ``x`` and ``alpha`` through
    the STE of the variant (module docstring). Under ``no_grad`` (or when nothing needs a
    gradient) the same value is computed without building the autograd node.
    """
    spec = elastic_spec(bits, signed, variant)
    if torch.is_grad_enabled() and (x.requires_grad or alpha.requires_grad):
        return _ElasticQuantize.apply(x, alpha, spec)
    if _fused.applies(x, spec):
        return _fused.elastic_step(x, _alpha_c(alpha), spec)[0]
    return _elastic_value(x, alpha, spec)[0].to(x.dtype)


def initial_alpha(x: Tensor, bits: int, signed: bool) -> Tensor:
    """Data-dependent initial step (0-dim float32): ``2·mean|x|/√max(2^(b−1)−1, 1)`` if signed,
    ``4·mean|x|/√(2^b−1)`` otherwise (released code, docs/numerics.md §4d; raw ``x``)."""
    mean_abs = x.detach().to(_compute_dtype(x.dtype)).abs().mean()
    if signed:
        a = 2.0 * mean_abs / math.sqrt(max(2 ** (bits - 1) - 1, 1))
    else:
        a = 4.0 * mean_abs / math.sqrt(2 ** bits - 1)
    return a.to(torch.float32)


def _world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce_sum_(t: Tensor) -> Tensor:
    if _world_size() > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)
    return t


_warned_uninitialized = False


@dataclass
class _Calibration:
    """Per-quantizer state while :func:`calibrate` runs."""

    total: Tensor  # Σ α₀ over the batches seen (0-dim float32)
    count: int  # batches seen
    before: Tensor  # α before calibration, restored on failure or if no batch reached it


class ElasticQuantizer(nn.Module):
    """Learned-step activation quantizer (TBT Eq. 11-14 / the released code), one α per tensor.

    Args:
        bits: 1 (binary), 2 (ternary) or 3..8 (LSQ).
        signed: ``True`` for inputs of either sign (levels symmetric around 0), ``False`` for
            non-negative ones (softmax probabilities, GELU/ReLU outputs).
        variant: ``"paper"`` or ``"released"`` (module docstring).

    ``alpha`` is a 0-dim float32 Parameter starting at 1.0. ``initialized`` (0-dim bool buffer,
    saved in the state dict) says whether it was set from data; in training mode an uninitialised
    quantizer initialises itself on its first forward (:meth:`init_alpha_`), in eval mode it never
    does (use :func:`calibrate`).
    """

    def __init__(self, bits: int, signed: bool, variant: str = "paper") -> None:
        super().__init__()
        self.spec = elastic_spec(bits, signed, variant)
        self.bits, self.signed, self.variant = self.spec.bits, self.spec.signed, variant
        self.alpha = nn.Parameter(torch.tensor(1.0, dtype=torch.float32))
        self.register_buffer("initialized", torch.tensor(False), persistent=True)
        self._flag = False  # Python mirror of the buffer ...
        self._flag_of: Tensor | None = self.initialized  # ... valid while the buffer is this object
        self._calib: _Calibration | None = None  # set while calibrate() runs

    # -- the initialised flag: a Python bool, re-read only when the buffer object changes ---------
    @property
    def _initialized(self) -> bool:
        buf = self._buffers["initialized"]
        if buf is not self._flag_of:  # replaced (HF loading, .to(device), load_state_dict(assign))
            if buf.is_meta:
                return False
            self._flag, self._flag_of = bool(buf), buf  # one sync, once per replacement
        return self._flag

    @_initialized.setter
    def _initialized(self, value: bool) -> None:
        buf = self._buffers["initialized"]
        buf.fill_(bool(value))
        self._flag, self._flag_of = bool(value), buf

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._flag_of = None  # the buffer was copied in place: re-read it on next use

    # -- initialisation ---------------------------------------------------------------------------
    @torch.no_grad()
    def init_alpha_(self, x: Tensor) -> None:
        """Set α from ``x`` (:func:`initial_alpha`), averaged over ranks; mark it initialised.

        Under ``torch.distributed`` every rank must call it (it all-reduces); it is called at the
        same point of the same forward on every replica, so the calls line up.
        """
        a0 = initial_alpha(x, self.bits, self.signed).to(self.alpha.device)
        world = _world_size()
        if world > 1:
            a0 = _all_reduce_sum_(a0.clone()) / world
        self.alpha.copy_(a0)
        self._initialized = True

    def _calibration_step(self, x: Tensor) -> None:
        # calibrate(): accumulate α₀ over batches and run with the running mean meanwhile
        c = self._calib
        c.total = c.total + initial_alpha(x, self.bits, self.signed).to(c.total.device)
        c.count += 1
        with torch.no_grad():
            self.alpha.copy_(c.total / c.count)

    def forward(self, x: Tensor) -> Tensor:
        if self._calib is not None:
            self._calibration_step(x)
        elif not self._initialized:
            if self.training:
                self.init_alpha_(x)  # the paper's behaviour: α from the first training batch
            else:
                _warn_uninitialized()
        return elastic_quantize(x, self.alpha, self.bits, self.signed, self.variant)

    def runtime_spec(self) -> ActSpec:
        """How the packed runtime quantizes this input (:class:`tbt.runtime.linear.ActSpec`).

        Read on this class only, not on subclasses (they compute something else).
        """
        from tbt.runtime.linear import ActSpec

        return ActSpec("elastic", self.bits, self.signed, variant=self.variant,
                       alpha=float(self.alpha.detach().float()))

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, variant={self.variant!r}"


def _warn_uninitialized() -> None:
    global _warned_uninitialized
    if not _warned_uninitialized:
        _warned_uninitialized = True
        logger.warning("an ElasticQuantizer runs in eval mode with α never initialised (α = 1.0); "
                       "call tbt.quant.calibrate(model, batch) or train first")


# ---- 8-bit min/max quantizer (DQ-BART) ---------------------------------------------------------

def _minmax_value(x: Tensor, bits: int, signed: bool, clip: float) -> Tensor:
    xc = x.to(_compute_dtype(x.dtype)).clamp(-clip, clip)
    if signed:  # SymQuantizer: s = Qp / max|x_c|, y = round(x_c·s)/s
        max_abs = xc.abs().amax()
        # all-zero tensor: any finite s maps it to 0 (the reference divides by 0 and gets NaN)
        s = torch.where(max_abs > 0, (2 ** (bits - 1) - 1) / max_abs, 1.0)
        return torch.round(xc * s) / s
    levels = 2 ** bits - 1  # AsymQuantizer: β = min, range a (+1e-8)
    lo = xc.amin()
    rng = xc.amax() - lo + ASYM_EPS
    return torch.round((xc - lo) / rng * levels) / levels * rng + lo


class _MinMaxQuantize(torch.autograd.Function):
    """Dynamic min/max fake quantization; STE ``1[−c < x < c]`` (strict)."""

    @staticmethod
    def forward(ctx, x: Tensor, bits: int, signed: bool, clip: float):  # type: ignore[override]
        if _fused.enabled(x):  # one C pass for the statistics, one for the values
            y, inside = _fused.minmax_forward(x, bits, signed, clip, ASYM_EPS)
            ctx.save_for_backward(inside)
            return y
        ctx.save_for_backward((x > -clip) & (x < clip))  # 1 byte per element
        return _minmax_value(x, bits, signed, clip).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad, 0.0), None, None, None


def minmax_quantize(x: Tensor, bits: int = 8, signed: bool = True, clip: float = 2.5) -> Tensor:
    """DQ-BART min/max fake quantization of ``x`` (any shape; docs/numerics.md §4c)."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _MinMaxQuantize.apply(x, bits, signed, clip)
    if _fused.enabled(x):
        return _fused.minmax_forward(x, bits, signed, clip, ASYM_EPS)[0]
    return _minmax_value(x, bits, signed, clip).to(x.dtype)


class MinMaxQuantizer(nn.Module):
    """Non-learned ``bits``-bit activation quantizer with clip ``clip`` and a per-tensor scale.

    ``signed=True``: ``SymQuantizer`` (levels ``k·max|x_c|/(2^(b−1)−1)``); ``signed=False``:
    ``AsymQuantizer`` (``2^b`` levels from ``min x_c`` to ``max x_c``). No parameters.
    """

    def __init__(self, bits: int = 8, signed: bool = True, clip: float = 2.5) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 16:
            raise ValueError(f"bits={bits!r}: a min/max quantizer takes an int in 2..16 (8 in TBT)")
        if not clip > 0:
            raise ValueError(f"clip={clip!r} must be > 0 (activation units; TBT uses 2.5)")
        self.bits, self.signed, self.clip = bits, bool(signed), float(clip)

    def forward(self, x: Tensor) -> Tensor:
        return minmax_quantize(x, self.bits, self.signed, self.clip)

    def runtime_spec(self) -> ActSpec:
        """How the packed runtime quantizes this input (:class:`tbt.runtime.linear.ActSpec`)."""
        from tbt.runtime.linear import ActSpec

        return ActSpec("minmax", self.bits, self.signed, clip=self.clip)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, clip={self.clip}"


# ---- explicit calibration ----------------------------------------------------------------------

def _run_batches(model: nn.Module, batches: Any) -> None:
    if callable(batches) and not isinstance(batches, Mapping):
        batches(model)
        return
    if isinstance(batches, (Mapping, Tensor)):
        batches = [batches]
    for batch in batches:
        model(**batch) if isinstance(batch, Mapping) else model(batch)


def calibrate(model: nn.Module, batches: Iterable | Mapping | Callable[[nn.Module], Any],
              force: bool = False) -> int:
    """Initialise α of every :class:`ElasticQuantizer` in ``model`` from data, explicitly.

    Every quantizer not yet initialised (every one if ``force``) records ``initial_alpha`` of
    each input it sees while the model runs, under ``torch.no_grad()`` and in eval mode (no
    dropout), on ``batches``: a dict of keyword arguments (one batch), an iterable of such dicts
    (or of tensors, passed positionally), or a callable ``f(model)`` that runs the model. Each
    quantizer's α becomes the mean of its per-batch values (while the batches run it uses the
    running mean), averaged over ranks under ``torch.distributed`` (one all-reduce in all; every
    rank must call this). The train/eval mode of every submodule is restored afterwards.

    Returns:
        the number of quantizers initialised (those that saw at least one input on some rank).
    """
    quants = [m for m in model.modules()
              if isinstance(m, ElasticQuantizer) and (force or not m._initialized)]
    for q in quants:
        zero = torch.zeros((), dtype=torch.float32, device=q.alpha.device)
        q._calib = _Calibration(zero, 0, q.alpha.detach().clone())
    modes = [(m, m.training) for m in model.modules()]
    done = False
    try:
        model.eval()
        with torch.no_grad():
            _run_batches(model, batches)
        done = True
    finally:
        for m, training in modes:
            m.training = training
        states = [q._calib for q in quants]
        for q in quants:
            q._calib = None
        if not done:  # an exception: put every α back as it was
            with torch.no_grad():
                for q, st in zip(quants, states):
                    q.alpha.copy_(st.before)
    return _finish_calibration(quants, states)


@torch.no_grad()
def _finish_calibration(quants: list[ElasticQuantizer], states: list[_Calibration]) -> int:
    if not quants:
        return 0
    dev = quants[0].alpha.device
    f32 = torch.float32
    stats = torch.stack([torch.stack([st.total.to(dev, f32),
                                      torch.tensor(st.count, dtype=f32, device=dev)])
                         for st in states])  # (K, 2): Σ α₀, count
    _all_reduce_sum_(stats)
    alphas = stats[:, 0] / stats[:, 1].clamp_min(1.0)  # mean over batches and ranks
    counts = stats[:, 1].tolist()  # one sync per calibrate() call
    n = 0
    for q, st, a, count in zip(quants, states, alphas, counts):
        if count > 0:
            q.alpha.copy_(a)
            q._initialized = True
            n += 1
        else:
            q.alpha.copy_(st.before)  # never reached on any rank: left as it was
    return n
