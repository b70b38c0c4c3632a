"""Fused CPU kernels for the activation quantizers' training step (``csrc/qops.c``, ctypes).

On a CPU the torch formulation of :class:`~tbt.quant.activation.ElasticQuantizer` walks its
input about eight times in the forward and seven in the backward; for the largest tensors (the
B·H·T·T attention probabilities) that costs as much as the matmuls. The C library makes each
direction one pass (see the header comment of ``csrc/qops.c``) and is used automatically for
contiguous float32 CPU tensors; everything else (CUDA, bf16/fp16, 7-8-bit codes, a missing
build) takes the torch path. The forward values are bit-identical to the torch path; the α
gradient's sums are accumulated in float64, so α's gradient agrees to float32 rounding.

``TBT_FUSED_QUANT=0`` turns the fused path off (e.g. to compare against it).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import math
import os
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "enabled", "applies", "elastic_forward", "elastic_backward",
           "elastic_step", "elastic_step_backward", "minmax_forward"]

_ABI = 1
_lib: ctypes.CDLL | None = None
_loaded = False
_P, _I64, _F, _I = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int


def _load() -> ctypes.CDLL | None:
    global _lib, _loaded
    if _loaded:
        return _lib
    _loaded = True
    here = Path(__file__).resolve().parent
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = here / f"_tbt_qops{suffix}"
        if path.is_file():
            try:
                lib = ctypes.CDLL(str(path))
            except OSError:
                return None
            if lib.tbt_qops_abi_version() != _ABI:
                return None
            lib.tbt_elastic_fwd_f32.argtypes = [_P, _I64, _P, _P, _I, _I, _I, _I, _P, _P, _I]
            lib.tbt_elastic_bwd_f32.argtypes = [_P, _P, _P, _I64, _P, _P, _I]
            lib.tbt_minmax_fwd_f32.argtypes = [_P, _I64, _I, _I, _F, _F, _P, _P, _I]
            for f in (lib.tbt_elastic_fwd_f32, lib.tbt_elastic_bwd_f32, lib.tbt_minmax_fwd_f32):
                f.restype = _I
            _lib = lib
            return lib
    return None


def available() -> bool:
    """True when the fused library is built and loads."""
    return _load() is not None


def enabled(x: Tensor) -> bool:
    """Whether the fused path applies to ``x``: a float32 CPU tensor, library present, not
    switched off by ``TBT_FUSED_QUANT=0``."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.numel() > 0
            and os.environ.get("TBT_FUSED_QUANT", "1") != "0" and available())


def _check(rc: int, what: str) -> None:
    if rc != 0:
        raise ValueError(f"tbt fused {what}: invalid arguments (rc={rc})")


def elastic_forward(x: Tensor, a: Tensor, offset: Tensor | None, add_back: bool, qn: int,
                    qp: int, use_sign: bool) -> tuple[Tensor, Tensor]:
    """``(y, saved)``: ``y = code·a (+ offset if add_back)`` with ``code`` of
    ``r = (x − offset)/a``; ``saved`` int8 ``code·2 + 1[qn ≤ r ≤ qp]``. ``x`` float32 CPU;
    ``a`` and ``offset`` 0-dim float32 CPU tensors, read by the kernel (no host sync)."""
    x = x.contiguous()
    y = torch.empty_like(x)
    saved = torch.empty(x.shape, dtype=torch.int8)
    rc = _lib.tbt_elastic_fwd_f32(x.data_ptr(), x.numel(), a.data_ptr(),
                                  None if offset is None else offset.data_ptr(), int(add_back),
                                  qn, qp, int(use_sign), y.data_ptr(), saved.data_ptr(),
                                  torch.get_num_threads())
    _check(rc, "elastic forward")
    return y, saved


def elastic_backward(g: Tensor, saved: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(gx, sums)``: ``gx = g·inside`` and float64 ``sums = (Σ g·code, Σ gx·x, Σ gx)``."""
    g, x = g.contiguous(), x.contiguous()
    gx = torch.empty_like(g)
    sums = torch.empty(3, dtype=torch.float64)
    rc = _lib.tbt_elastic_bwd_f32(g.data_ptr(), saved.data_ptr(), x.data_ptr(), g.numel(),
                                  gx.data_ptr(), sums.data_ptr(), torch.get_num_threads())
    _check(rc, "elastic backward")
    return gx, sums


def minmax_forward(x: Tensor, bits: int, signed: bool, clip: float,
                   eps: float) -> tuple[Tensor, Tensor]:
    """``(y, inside)`` of the DQ-BART min/max quantizer; ``inside = 1[−clip < x < clip]``."""
    x = x.contiguous()
    y = torch.empty_like(x)
    inside = torch.empty(x.shape, dtype=torch.bool)
    rc = _lib.tbt_minmax_fwd_f32(x.data_ptr(), x.numel(), bits, int(signed), clip, eps,
                                 y.data_ptr(), inside.data_ptr(), torch.get_num_threads())
    _check(rc, "min/max forward")
    return y, inside


# ---- the elastic quantizer's autograd step (tbt.quant.activation._ElasticQuantize) -----------

def applies(x: Tensor, spec) -> bool:
    """The fused kernel serves ``x`` under ``spec`` (an ``ElasticSpec``): codes fit in 6 bits
    and :func:`enabled`."""
    return spec.qp <= 63 and spec.qn >= -63 and enabled(x)


def elastic_step(x: Tensor, a: Tensor, spec):
    """``(y, saved int8, a, offset 0-dim or None)``: the forward of the elastic quantizer
    through the C kernel, ``a`` = α_c (0-dim float32; CPU float32 ``x``; the offset is torch's
    own min/mean)."""
    offset = x.min() if spec.shift_min else x.mean() if spec.center else None
    y, saved = elastic_forward(x, a, offset, spec.shift_min, spec.qn, spec.qp, spec.use_sign)
    return y, saved, a, offset


def elastic_step_backward(ctx, grad: Tensor):
    """``(∂L/∂x, ∂L/∂α, None)`` from what :func:`elastic_step` saved on ``ctx`` (LSQ rule)."""
    saved, x, a, offset = ctx.saved_tensors
    spec = ctx.spec
    gx, sums = elastic_backward(grad.to(torch.float32), saved, x)
    grad_alpha = None
    if ctx.needs_input_grad[1]:
        grad_alpha = sums[0]  # Σ G·code (signed binary: Σ G·sign(x̃), no range term)
        if not spec.use_sign:
            gx_xs = sums[1] if offset is None else sums[1] - offset.double() * sums[2]
            grad_alpha = grad_alpha - gx_xs / a.double()
        if spec.grad_scale:
            grad_alpha = grad_alpha * (1.0 / math.sqrt(ctx.numel * spec.qp))
        grad_alpha = grad_alpha.to(ctx.alpha_dtype)
    return (gx.to(ctx.x_dtype) if ctx.needs_input_grad[0] else None), grad_alpha, None
