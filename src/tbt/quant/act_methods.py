"""Activation-quantizer registry (``QuantConfig.act_method``) and the neighbouring methods.

How it works
------------
``make_act_quantizer(cfg, signed, channels)`` builds the quantizer of one activation site from
the registry entry ``ACT_METHODS[cfg.resolved_act_method]``; ``channels`` is the size of the
last dimension where the site has one fixed (a linear's ``in_features``, an attention head's
``head_dim`` for Q/K/V; ``None`` for the attention probabilities). Every quantizer is a module
kept as is by the packed export, so a packed model quantizes its inputs exactly as in training.

=================  ======  =================================================================
``act_method``     bits    quantizer
=================  ======  =================================================================
``elastic``        1..8    TBT learned step α per tensor (:class:`~tbt.quant.activation.ElasticQuantizer`)
``minmax``         2..8    DQ-BART dynamic min/max with clip (:class:`~tbt.quant.activation.MinMaxQuantizer`);
                           below 8 bits the non-learned baseline of the paper's ablation (Table 3)
``absmax-token``   2..8    BitNet b1.58 per-token absmax (related.md §1a), identity STE
``elastic-shift``  1..8    BiT: elastic on ``x + b`` with a learned per-channel shift ``b`` (§3)
``lsq``            2..8    LSQ (Esser et al. 2020, §5a): plain learned step, no centring/min shift
``lsq-plus``       1..8    LSQ+ (§5b): learned step ``s`` and offset ``β``, unsigned grid
``sign``           1       non-learned binary: ``mean|x|·sign(x)`` per tensor (the BWN rule on
                           activations), the 1-bit baseline where ``minmax`` has no 1-bit grid
=================  ======  =================================================================

``absmax-token``: ``s = Qp/max(max_last_dim|x|, 1e-5)`` per token (every index but the last),
``x_q = clip(round(x·s), −Qp−1, Qp)/s``, ``Qp = 2^(b−1)−1`` (127 for int8); identity STE (BitNet:
``x + (q(x) − x).detach()``, here as an explicit function so that the value is exactly ``x_q``).
On an attention head the "token" is one (batch, head, position) row [choice].

``elastic-shift``: BiT adds ``LearnableBias`` (init 0) before every quantized linear input and
on Q, K, V, not on the probabilities; the shift is per input channel (per ``head_dim`` channel,
shared by the heads, on Q/K/V [choice]) and gets the ordinary gradient of an addition. The
elastic quantizer after it is TBT's, with ``QuantConfig.variant``.

``lsq``: ``x̂ = s·clip(round(x/s), Qn, Qp)`` with the LSQ grid (signed ``−2^(b−1)..2^(b−1)−1``,
unsigned ``0..2^b−1``), gradients ``∂/∂x = G·1[Qn ≤ x/s ≤ Qp]``, ``∂/∂s = Σ G·(code − r·inside)``
times ``1/√(numel(x)·Qp)``, ``s₀ = 2·mean|x|/√Qp`` (the LSQ paper's rule, both signs).

``lsq-plus``: ``x̂ = s·clip(round((x − β)/s), 0, 2^b−1) + β`` at every site (the unsigned grid
with an offset covers signed inputs too), ``∂/∂s`` as LSQ, ``∂/∂β = Σ G·(1 − inside)``, both
times ``1/√(numel(x)·Qp)``; init from the first batch ``β₀ = min x``,
``s₀ = (max x − min x)/(2^b − 1)`` (the paper's min/max option, not its MSE search).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from tbt.registry import Registry
from tbt.quant.activation import (ALPHA_EPS, ElasticQuantizer, ElasticSpec, MinMaxQuantizer,
                                  _all_reduce_sum_, _compute_dtype, _elastic_value,
                                  _ElasticQuantize, _warn_uninitialized, _world_size)

__all__ = ["ACT_METHODS", "ActMethod", "register_act_method", "check_act_method",
           "make_act_quantizer", "AbsmaxTokenQuantizer", "ShiftedElasticQuantizer",
           "LsqActQuantizer", "LsqPlusQuantizer", "absmax_token_quantize"]

AbsMAX_EPS = 1e-5  # BitNet: 127 / max(|x|).clamp(min=1e-5)

# factory(cfg, bits, signed, channels) -> module
ActFactory = Callable[[Any, int, bool, "int | None"], nn.Module]


@dataclass(frozen=True)
class ActMethod:
    name: str
    bits: tuple[int, ...]
    factory: ActFactory


ACT_METHODS: Registry[ActMethod] = Registry("activation method", reserved=("auto",))


def register_act_method(name: str, bits: tuple[int, ...]) -> Callable[[ActFactory], ActFactory]:
    """Decorator: ``factory(cfg, bits, signed, channels) -> nn.Module`` as ``act_method=name``."""
    ACT_METHODS.check_free(name)

    def deco(factory: ActFactory) -> ActFactory:
        ACT_METHODS.add(name, ActMethod(name, tuple(bits), factory))
        return factory

    return deco


def check_act_method(name: str, bits: int | None) -> None:
    """``ValueError`` naming the choices unless ``name`` (or ``auto``) supports ``bits``."""
    if name == "auto":
        return
    entry = ACT_METHODS.get_entry(name, "act_method")
    if bits is not None and bits not in entry.bits:
        fits = [n for n, m in ACT_METHODS.items() if bits in m.bits]
        raise ValueError(f"act_method={name!r} supports activation bits {entry.bits}; got "
                         f"{bits}: use one of {fits} for {bits}-bit activations")


def make_act_quantizer(cfg: Any, signed: bool, channels: int | None = None) -> nn.Module | None:
    """The activation quantizer of one site under ``cfg`` (``None`` = float activations)."""
    if cfg.act_bits is None:
        return None
    return ACT_METHODS[cfg.resolved_act_method].factory(cfg, cfg.act_bits, signed, channels)


@register_act_method("elastic", bits=(1, 2, 3, 4, 5, 6, 7, 8))
def _elastic(cfg, bits, signed, channels):
    return ElasticQuantizer(bits, signed=signed, variant=cfg.variant)


@register_act_method("minmax", bits=(2, 3, 4, 5, 6, 7, 8))
def _minmax(cfg, bits, signed, channels):
    return MinMaxQuantizer(bits=bits, signed=signed, clip=cfg.act_clip)


# ---- BitNet per-token absmax ----------------------------------------------------------------

def _absmax_value(x: Tensor, bits: int) -> Tensor:
    xc = x.to(_compute_dtype(x.dtype))
    qp = 2 ** (bits - 1) - 1
    s = qp / xc.abs().amax(dim=-1, keepdim=True).clamp_min(AbsMAX_EPS)  # (..., 1)
    return torch.round(xc * s).clamp_(-qp - 1, qp) / s


class _IdentitySTE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, bits: int) -> Tensor:  # type: ignore[override]
        return _absmax_value(x, bits).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        return grad, None


def absmax_token_quantize(x: Tensor, bits: int = 8) -> Tensor:
    """BitNet b1.58 per-token absmax fake quantization (module docstring); same shape/dtype."""
    if torch.is_grad_enabled() and x.requires_grad:
        return _IdentitySTE.apply(x, bits)
    return _absmax_value(x, bits).to(x.dtype)


class AbsmaxTokenQuantizer(nn.Module):
    """Per-token symmetric absmax quantizer, no parameters (BitNet b1.58, docs/related.md §1a)."""

    def __init__(self, bits: int = 8) -> None:
        super().__init__()
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ValueError(f"bits={bits!r}: per-token absmax takes an int in 2..8 (BitNet: 8)")
        self.bits = bits

    def forward(self, x: Tensor) -> Tensor:
        return absmax_token_quantize(x, self.bits)

    def runtime_spec(self):
        """How the packed runtime quantizes this input (:class:`tbt.runtime.linear.ActSpec`)."""
        from tbt.runtime.linear import ActSpec

        return ActSpec("absmax-token", self.bits, True)

    def extra_repr(self) -> str:
        return f"bits={self.bits}"


@register_act_method("absmax-token", bits=(2, 3, 4, 5, 6, 7, 8))
def _absmax(cfg, bits, signed, channels):
    return AbsmaxTokenQuantizer(bits)


# ---- BiT: elastic with a learned per-channel shift -------------------------------------------

class ShiftedElasticQuantizer(ElasticQuantizer):
    """BiT's elastic binarization: ``EQ(x + b)``, ``b`` ``(channels,)`` learned, init 0 (§3)."""

    def __init__(self, bits: int, signed: bool, channels: int, variant: str = "paper") -> None:
        super().__init__(bits, signed, variant)
        self.shift = nn.Parameter(torch.zeros(int(channels), dtype=torch.float32))

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x + self.shift.to(x.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, channels={self.shift.numel()}"


@register_act_method("elastic-shift", bits=(1, 2, 3, 4, 5, 6, 7, 8))
def _elastic_shift(cfg, bits, signed, channels):
    if channels is None:  # attention probabilities: BiT has no shift there
        return ElasticQuantizer(bits, signed=signed, variant=cfg.variant)
    return ShiftedElasticQuantizer(bits, signed, channels, variant=cfg.variant)


# ---- LSQ and LSQ+ ------------------------------------------------------------------------------

def lsq_spec(bits: int, signed: bool) -> ElasticSpec:
    """The LSQ grid as an elastic spec: no sign, no centring, no min shift, grad scale on."""
    if signed:
        qn, qp = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    else:
        qn, qp = 0, 2 ** bits - 1
    return ElasticSpec(bits, signed, "lsq", qn, qp, use_sign=False, shift_min=False,
                       center=False, grad_scale=True)


class _LearnedInit(ElasticQuantizer):
    """An elastic quantizer whose data-dependent init is :meth:`_init_values` (LSQ, LSQ+)."""

    def _init_values(self, x: Tensor) -> Tensor:  # (k,) float32 values of the learned tensors
        raise NotImplementedError

    def _set_values(self, v: Tensor) -> None:
        self.alpha.copy_(v[0])

    @torch.no_grad()
    def init_alpha_(self, x: Tensor) -> None:
        v = self._init_values(x).to(self.alpha.device)
        if _world_size() > 1:
            v = _all_reduce_sum_(v.clone()) / _world_size()
        self._set_values(v)
        self._initialized = True

    def _calibration_step(self, x: Tensor) -> None:
        c = self._calib
        v = self._init_values(x).to(c.total.device)
        c.total = c.total + v[0]
        c.count += 1
        self._calib_rest = v[1:] if c.count == 1 else self._calib_rest + v[1:]
        with torch.no_grad():
            self._set_values(torch.cat([(c.total / c.count).reshape(1), self._calib_rest / c.count]))

    def _quantize(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        if self._calib is not None:
            self._calibration_step(x)
        elif not self._initialized:
            if self.training:
                self.init_alpha_(x)
            else:
                _warn_uninitialized()
        return self._quantize(x)


class LsqActQuantizer(_LearnedInit):
    """LSQ activations (module docstring); ``calibrate`` initialises it like the elastic ones."""

    def __init__(self, bits: int, signed: bool) -> None:
        if bits < 2:
            raise ValueError("LSQ activations need bits >= 2 (a signed 1-bit LSQ grid is empty); "
                             "use act_method='elastic' for binary activations")
        super().__init__(bits, signed, "released")
        self.spec, self.variant = lsq_spec(bits, signed), "lsq"

    def _init_values(self, x: Tensor) -> Tensor:
        mean_abs = x.detach().to(_compute_dtype(x.dtype)).abs().mean()
        return (2.0 * mean_abs / math.sqrt(self.spec.qp)).to(torch.float32).reshape(1)

    def _quantize(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad):
            return _ElasticQuantize.apply(x, self.alpha, self.spec)
        return _elastic_value(x, self.alpha, self.spec)[0].to(x.dtype)


@register_act_method("lsq", bits=(2, 3, 4, 5, 6, 7, 8))
def _lsq(cfg, bits, signed, channels):
    return LsqActQuantizer(bits, signed)


def _lsq_plus_parts(x: Tensor, s: Tensor, beta: Tensor, qp: int):
    xc = x.to(_compute_dtype(x.dtype))
    sc = torch.where(s > ALPHA_EPS, s, ALPHA_EPS).to(xc.dtype)
    r = (xc - beta.to(xc.dtype)) / sc
    code = torch.round(r).clamp_(0, qp)
    return xc, r, code, sc


class _LsqPlusQuantize(torch.autograd.Function):
    """``s·clip(round((x−β)/s), 0, Qp) + β``; LSQ+ gradients (module docstring)."""

    @staticmethod
    def forward(ctx, x, s, beta, qp):  # type: ignore[override]
        _, r, code, sc = _lsq_plus_parts(x, s, beta, qp)
        ctx.save_for_backward(r, code, (r >= 0) & (r <= qp))
        ctx.x_dtype, ctx.qp = x.dtype, qp
        return (code * sc + beta.to(sc.dtype)).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        r, code, inside = ctx.saved_tensors
        g = grad.to(r.dtype)
        scale = 1.0 / math.sqrt(r.numel() * ctx.qp)
        gx = torch.where(inside, g, 0.0).to(ctx.x_dtype)
        gs = ((g * (code - r * inside)).sum() * scale).to(torch.float32)
        gb = ((g * (~inside)).sum() * scale).to(torch.float32)
        return gx, gs, gb, None


class LsqPlusQuantizer(_LearnedInit):
    """LSQ+ (module docstring): ``alpha`` is the step ``s``, ``offset`` the learned ``β``."""

    def __init__(self, bits: int) -> None:
        super().__init__(bits, False, "released")
        self.variant, self.qp = "lsq-plus", 2 ** bits - 1
        self.offset = nn.Parameter(torch.tensor(0.0, dtype=torch.float32))

    def _init_values(self, x: Tensor) -> Tensor:
        xc = x.detach().to(_compute_dtype(x.dtype))
        lo, hi = xc.amin(), xc.amax()
        return torch.stack([(hi - lo) / self.qp, lo]).to(torch.float32)

    def _set_values(self, v: Tensor) -> None:
        self.alpha.copy_(v[0])
        self.offset.copy_(v[1])

    def _quantize(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or self.alpha.requires_grad
                                        or self.offset.requires_grad):
            return _LsqPlusQuantize.apply(x, self.alpha, self.offset, self.qp)
        _, _, code, sc = _lsq_plus_parts(x, self.alpha, self.offset, self.qp)
        return (code * sc + self.offset.to(sc.dtype)).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, grid=0..{self.qp}, offset=learned"


@register_act_method("lsq-plus", bits=(1, 2, 3, 4, 5, 6, 7, 8))
def _lsq_plus(cfg, bits, signed, channels):
    return LsqPlusQuantizer(bits)


# ---- non-learned binary activations ---------------------------------------------------------

class _SignQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, clip: float) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x)
        ctx.clip = clip
        return _sign_value(x).to(x.dtype)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (x,) = ctx.saved_tensors
        return grad * (x.abs() <= ctx.clip).to(grad.dtype), None


def _sign_value(x: Tensor) -> Tensor:
    xc = x.to(_compute_dtype(x.dtype))
    s = xc.abs().mean()
    return torch.where(xc >= 0, s, -s)


class SignQuantizer(nn.Module):
    """``x ↦ mean|x|·sign(x)`` (``sign(0) = +1``), the scale taken from the whole tensor on
    every call (BWN's rule, Rastegari et al. 2016, applied to activations): a 1-bit quantizer
    with nothing learned, the binary counterpart of the ``minmax`` baseline. The gradient passes
    straight through where ``|x| <= clip`` (``cfg.act_clip``) and is 0 elsewhere; the scale is
    treated as a constant. On non-negative sites (after GELU) the sign keeps which
    pre-activations were positive."""

    def __init__(self, clip: float = 2.5) -> None:
        super().__init__()
        self.clip = float(clip)

    def forward(self, x: Tensor) -> Tensor:
        if torch.is_grad_enabled() and x.requires_grad:
            return _SignQuantize.apply(x, self.clip)
        return _sign_value(x).to(x.dtype)

    def extra_repr(self) -> str:
        return f"bits=1, scale=mean|x|, clip={self.clip}"


@register_act_method("sign", bits=(1,))
def _sign(cfg, bits, signed, channels):
    return SignQuantizer(cfg.act_clip)
