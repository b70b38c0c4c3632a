"""The neighbouring activation quantizers (tbt.quant.act_methods; docs/related.md §1a, §3, §5).

Float64 re-implementations of each forward, the BitNet idempotence property, gradients against
autograd surrogates and gradcheck (float64), registry/config validation.
"""

from __future__ import annotations

import math

import pytest
import torch

from tbt.config import QuantConfig
from tbt.quant.act_methods import (ACT_METHODS, AbsmaxTokenQuantizer, LsqActQuantizer,
                                   LsqPlusQuantizer, ShiftedElasticQuantizer,
                                   absmax_token_quantize, make_act_quantizer)
from tbt.quant.activation import ElasticQuantizer, MinMaxQuantizer, calibrate, elastic_quantize


def _x(shape=(3, 5, 16), seed=0, shift=0.0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.7 + shift


def _round_pass(t):
    return t + (torch.round(t) - t).detach()


# ---- BitNet per-token absmax --------------------------------------------------------------------

@pytest.mark.parametrize("bits", [8, 4, 2])
def test_absmax_token_matches_float64(bits):
    x = _x()
    x64 = x.double()
    qp = 2 ** (bits - 1) - 1
    s = qp / x64.abs().amax(dim=-1, keepdim=True).clamp_min(1e-5)
    ref = torch.clamp(torch.round(x64 * s), -qp - 1, qp) / s
    got = absmax_token_quantize(x, bits)
    torch.testing.assert_close(got.double(), ref, rtol=1e-6, atol=1e-7)
    # per token: each (batch, position) row has at most 2·qp + 1 levels and reaches ±max
    codes = torch.round(got.double() * s)
    assert codes.abs().amax(dim=-1).eq(qp).all()


def test_absmax_token_is_idempotent_and_identity_ste():
    x = _x(seed=1)
    q = AbsmaxTokenQuantizer(8)
    y = q(x)
    yy = q(y)
    # Idempotent: the same integer code per element; the scale 127/max is recomputed from the
    # quantized max (= 127/s up to rounding), so values may move by an ulp, never a level.
    s = 127 / x.abs().amax(dim=-1, keepdim=True)
    assert torch.equal(torch.round(yy * s), torch.round(y * s))
    assert ((yy - y).abs() <= 2 * torch.finfo(torch.float32).eps * y.abs()).all()
    xg = x.clone().requires_grad_()
    g = torch.randn_like(x)
    q(xg).backward(g)
    assert torch.equal(xg.grad, g)  # identity STE, BitNet's x + (q(x) − x).detach()
    z = torch.zeros(2, 4)
    assert torch.equal(q(z), z)  # all-zero token: guarded, no NaN


# ---- BiT: elastic with a learned shift ----------------------------------------------------------

def test_shifted_elastic_forward_and_shift_gradient():
    x = _x(seed=2)
    q = ShiftedElasticQuantizer(2, True, 16, variant="released")
    with torch.no_grad():
        q.shift.copy_(torch.linspace(-0.5, 0.5, 16))
    q.train()
    xg = x.clone().requires_grad_()
    y = q(xg)
    # init on the first batch sees x + b; the value is the elastic quantizer of x + b
    ref = elastic_quantize((x + q.shift).detach(), q.alpha.detach(), 2, True, "released")
    assert torch.equal(y.detach(), ref)
    g = torch.randn_like(x)
    y.backward(g)
    # b gets the x-gradient summed over every dimension but the channel (an addition)
    torch.testing.assert_close(q.shift.grad, xg.grad.sum(dim=(0, 1)))
    assert q.alpha.grad is not None
    # the probabilities site (channels=None) gets a plain elastic quantizer
    cfg = QuantConfig(bits="2-2-2", act_method="elastic-shift")
    assert type(make_act_quantizer(cfg, False, None)) is ElasticQuantizer
    assert isinstance(make_act_quantizer(cfg, True, 16), ShiftedElasticQuantizer)


# ---- LSQ activations -----------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed", [(2, True), (4, True), (4, False), (8, True)])
def test_lsq_act_forward_and_gradients(bits, signed):
    x = _x(seed=3).abs() if not signed else _x(seed=3)
    q = LsqActQuantizer(bits, signed)
    q.train()
    xg = x.clone().requires_grad_()
    y = q(xg)  # first training batch: s₀ = 2·mean|x|/√Qp
    qn, qp = (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)
    torch.testing.assert_close(q.alpha.detach(), 2 * x.abs().mean() / math.sqrt(qp))
    s = q.alpha.detach().double()
    ref = s * torch.clamp(torch.round(x.double() / s), qn, qp)
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    g = torch.randn_like(x)
    y.backward(g)
    # surrogate (Esser et al.): grad_scale + round_pass, float64
    x64 = x.double().requires_grad_()
    a64 = s.clone().requires_grad_()
    scale = 1.0 / math.sqrt(x.numel() * qp)
    a_eff = a64 * scale + (a64 - a64 * scale).detach()
    (g.double() * a_eff * _round_pass(torch.clamp(x64 / a_eff, qn, qp))).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=0, atol=0)
    torch.testing.assert_close(q.alpha.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)


def test_lsq_act_rejects_binary_and_calibrates():
    with pytest.raises(ValueError, match="bits >= 2"):
        LsqActQuantizer(1, True)
    with pytest.raises(ValueError, match=r"act_method='lsq' supports activation bits"):
        QuantConfig(bits="2-2-1", act_method="lsq")
    q = torch.nn.Sequential(LsqActQuantizer(4, True))
    x1, x2 = _x(seed=4), _x(seed=5)
    assert calibrate(q, [x1, x2]) == 1
    want = (2 * x1.abs().mean() + 2 * x2.abs().mean()) / 2 / math.sqrt(7)
    torch.testing.assert_close(q[0].alpha.detach(), want)


# ---- LSQ+ ------------------------------------------------------------------------------------

def test_lsq_plus_forward_init_and_gradients():
    x = _x(seed=6, shift=-0.4)
    q = LsqPlusQuantizer(2)
    q.train()
    xg = x.clone().requires_grad_()
    y = q(xg)
    lo, hi = x.min(), x.max()
    torch.testing.assert_close(q.offset.detach(), lo)
    torch.testing.assert_close(q.alpha.detach(), (hi - lo) / 3)
    s, b = q.alpha.detach().double(), q.offset.detach().double()
    ref = s * torch.clamp(torch.round((x.double() - b) / s), 0, 3) + b
    torch.testing.assert_close(y.double(), ref, rtol=1e-6, atol=1e-6)
    assert y.unique().numel() <= 4
    # gradients vs the float64 surrogate (LSQ+: β gets Σ G·(1 − inside))
    with torch.no_grad():
        q.alpha.mul_(0.6)  # move the grid so that some values clip at both ends
    xg.grad = None
    g = torch.randn_like(x)
    q(xg).backward(g)
    x64 = x.double().requires_grad_()
    s64 = q.alpha.detach().double().clone().requires_grad_()
    b64 = q.offset.detach().double().clone().requires_grad_()
    sc = 1.0 / math.sqrt(x.numel() * 3)
    s_eff = s64 * sc + (s64 - s64 * sc).detach()
    b_eff = b64 * sc + (b64 - b64 * sc).detach()
    out = s_eff * _round_pass(torch.clamp((x64 - b_eff) / s_eff, 0, 3)) + b_eff
    (g.double() * out).sum().backward()
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=0, atol=1e-12)
    torch.testing.assert_close(q.alpha.grad.double(), s64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.offset.grad.double(), b64.grad, rtol=1e-5, atol=1e-6)


def test_lsq_plus_gradcheck_saturated():
    # beyond the top of the grid: x̂ = s·Qp + β, smooth in s and β (true derivative × g)
    from tbt.quant.act_methods import _LsqPlusQuantize

    x = 50.0 + torch.rand(12, dtype=torch.float64)
    s = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    unscale = math.sqrt(12 * 3)

    def f(s_, b_):  # undo the grad scale: value unchanged, gradient × 1/g
        return _LsqPlusQuantize.apply(x, s_ * unscale - (s_ * unscale - s_).detach(),
                                      b_ * unscale - (b_ * unscale - b_).detach(), 3)

    assert torch.autograd.gradcheck(f, (s, b), eps=1e-6, atol=1e-8)


# ---- registry and config --------------------------------------------------------------------------

def test_registry_and_config_choices():
    assert set(ACT_METHODS) == {"elastic", "minmax", "absmax-token", "elastic-shift", "lsq",
                                "lsq-plus", "sign"}
    kinds = {"elastic": ElasticQuantizer, "minmax": MinMaxQuantizer,
             "absmax-token": AbsmaxTokenQuantizer, "lsq": LsqActQuantizer,
             "lsq-plus": LsqPlusQuantizer}
    for name, cls in kinds.items():
        bits = "2-2-8" if name in ("minmax", "absmax-token") else "2-2-4"
        cfg = QuantConfig(bits=bits, act_method=name)
        assert type(make_act_quantizer(cfg, True, 16)) is cls
        assert QuantConfig.from_json(cfg.to_json()) == cfg
    assert make_act_quantizer(QuantConfig(bits="2-2-fp"), True) is None
    with pytest.raises(ValueError, match=r"act_method='bogus' is unknown; choose one of "
                                         r"\['auto', 'absmax-token', 'elastic'"):
        QuantConfig(act_method="bogus")
    with pytest.raises(ValueError, match="act_method='absmax-token' supports activation bits"):
        QuantConfig(bits="2-2-1", act_method="absmax-token")
