"""Activation quantizers against an independent float64 reference (docs/numerics.md §4a-§4d).

Tolerances: the implementation computes in float32 and the reference in float64. Codes must be
identical (the test data is checked to keep every ratio at least 1e-5 away from a rounding tie or
a clip bound, far above float32's ~1e-6 relative error at |r| <= 10), so values agree to float32
rounding (rtol 1e-6) and gradient sums to float32 accumulation error (rtol 1e-5).
"""

from __future__ import annotations

import io
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from tbt.quant.activation import (
    ElasticQuantizer,
    MinMaxQuantizer,
    calibrate,
    elastic_quantize,
    minmax_quantize,
)

VARIANTS = ("paper", "released")
CASES = [(b, s, v) for b in (1, 2, 3, 4, 8) for s in (True, False) for v in VARIANTS]


# ---- the float64 reference (docs/numerics.md §4a table, §4b Eq. 11-14) ----------------------

def ref_bounds(bits, signed):
    if bits <= 2:
        return (-1, 1) if signed else (0, bits)
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2 ** bits - 1)


def ref_elastic(x, alpha, grad, bits, signed, variant):
    """(y, ∂L/∂x, ∂L/∂α, r) in float64 for upstream gradient ``grad``."""
    x, grad = x.double(), grad.double()
    a = max(float(alpha), 1e-5)
    qn, qp = ref_bounds(bits, signed)
    released = variant == "released"
    offset = torch.zeros((), dtype=torch.float64)
    if released and not signed and bits != 1:
        offset = x.min()  # released: subtract the min, add it back
        xt, back = x - offset, offset
    elif not released and signed:
        xt, back = x - x.mean(), 0.0  # paper Eq. 11/13: X' = X − mean(X), not added back
    else:
        xt, back = x, 0.0
    r = xt / a
    binary_sign = signed and bits == 1
    code = torch.sign(xt) if binary_sign else torch.clamp(torch.round(r), qn, qp)
    y = a * code + back
    gx = grad * ((r >= qn) & (r <= qp)).double()
    if binary_sign:
        step = torch.sign(xt)
    else:
        step = torch.where(r < qn, float(qn), torch.where(r > qp, float(qp), torch.round(r) - r))
    scale = 1.0 / math.sqrt(x.numel() * qp) if released else 1.0
    return y, gx, scale * (grad * step).sum(), r


def assert_no_ties(r, bits, signed, margin=1e-5):
    """No ratio within ``margin`` of a rounding tie or a clip bound (an exact bound is fine:
    the min element of the released min-shift case has r = 0 in every precision)."""
    qn, qp = ref_bounds(bits, signed)
    frac = r - torch.floor(r)
    assert ((frac - 0.5).abs() > margin).all(), "test data has a rounding tie: change the seed"
    for bound in (qn, qp):
        near = (r - bound).abs() <= margin
        assert (r[near] == bound).all(), "test data sits on a clip bound: change the seed"


def alpha_grad_atol(r, grad):
    """Float32 error budget of Σ G·(round(r) − r): each r carries a few ulps of |r| (the ratio,
    and the float32 mean/min it is taken from), so the sum may be off by ~Σ|G|·(|r|+1)·4·2^-24."""
    return float(4 * 2.0 ** -24 * (grad.double().abs() * (r.abs() + 1)).sum())


def sample(bits, signed, seed=0, shape=(3, 7, 11)):
    """Data spread over the whole code range, plus some clipped values, and a matching α."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g)
    if not signed:
        x = x.abs() + 0.3 * torch.randn(shape, generator=g).clamp(max=0)  # a few negatives
    _, qp = ref_bounds(bits, signed)
    alpha = float(x.abs().max()) / (qp + 1.3)  # the largest |x| are clipped
    return x, alpha


def ref_init(x, bits, signed):
    m = x.double().abs().mean()
    if signed:
        return float(2 * m / math.sqrt(max(2 ** (bits - 1) - 1, 1)))
    return float(4 * m / math.sqrt(2 ** bits - 1))


def ready(bits, signed, variant, alpha):
    q = ElasticQuantizer(bits, signed, variant)
    with torch.no_grad():
        q.alpha.fill_(alpha)
    q._initialized = True
    return q


# ---- forward ------------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed,variant", CASES)
def test_forward_matches_reference(bits, signed, variant):
    x, alpha = sample(bits, signed, seed=bits)
    y_ref, _, _, r = ref_elastic(x, alpha, torch.ones_like(x), bits, signed, variant)
    assert_no_ties(r, bits, signed)
    y = ready(bits, signed, variant, alpha)(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("bits,signed,levels", [
    (1, True, {-1, 1}), (2, True, {-1, 0, 1}), (1, False, {0, 1}), (2, False, {0, 1, 2}),
])
def test_tbt_level_sets(bits, signed, levels, variant):
    x, alpha = sample(bits, signed)
    alpha = 0.3  # every level is hit
    y = ready(bits, signed, variant, alpha)(x).double()
    if variant == "released" and not signed and bits == 2:
        y = y - x.min().double()  # levels {m, m+α, m+2α}
    codes = torch.round(y / torch.tensor(alpha, dtype=torch.float32).double())
    torch.testing.assert_close(codes * torch.tensor(alpha).double(), y, rtol=1e-6, atol=1e-7)
    assert set(codes.unique().long().tolist()) == levels


@pytest.mark.parametrize("bits", [3, 4, 8])
@pytest.mark.parametrize("signed", [True, False])
def test_nbit_codes_are_lsq_range(bits, signed):
    x, alpha = sample(bits, signed, seed=3)
    alpha *= 0.8  # clip at both ends
    qn, qp = ref_bounds(bits, signed)
    for variant in VARIANTS:
        y = ready(bits, signed, variant, alpha)(x).double()
        if variant == "released" and not signed:
            y = y - x.min().double()
        codes = y / torch.tensor(alpha).double()
        assert (codes - codes.round()).abs().max() < 1e-4
        lo, hi = codes.min().round(), codes.max().round()
        assert lo == qn and hi == qp  # clipped at both ends
        assert codes.round().unique().numel() > (qp - qn) // 4  # and spread over the range


def test_hand_worked_signed_ternary_released():
    x = torch.tensor([-1.0, -0.3, -0.2, 0.2, 0.26, 0.8, 0.0])
    q = ready(2, True, "released", 0.5)  # r = -2, -.6, -.4, .4, .52, 1.6, 0
    torch.testing.assert_close(q(x), torch.tensor([-0.5, -0.5, 0.0, 0.0, 0.5, 0.5, 0.0]))


def test_hand_worked_signed_paper_is_zero_meaned_and_not_added_back():
    x = torch.tensor([1.0, 1.2, 2.0, 3.8])  # mean 2 -> X' = -1, -.8, 0, 1.8
    q = ready(2, True, "paper", 0.5)  # r = -2, -1.6, 0, 3.6
    torch.testing.assert_close(q(x), torch.tensor([-0.5, -0.5, 0.0, 0.5]))
    qb = ready(1, True, "paper", 0.5)
    torch.testing.assert_close(qb(x), torch.tensor([-0.5, -0.5, 0.0, 0.5]))  # sign(0) = 0
    torch.testing.assert_close(q(x + 7.0), q(x))  # a shift of the input changes nothing


def test_hand_worked_unsigned_min_shift_released_vs_paper():
    x = torch.tensor([-0.1, 0.0, 0.3, 0.5, 1.2])
    q = ready(2, False, "released", 0.25)  # m = -.1; r = 0, .4, 1.6, 2.4, 5.2 -> 0, 0, 2, 2, 2
    torch.testing.assert_close(q(x), torch.tensor([-0.1, -0.1, 0.4, 0.4, 0.4]))
    p = ready(2, False, "paper", 0.25)  # r = -.4, 0, 1.2, 2, 4.8 -> 0, 0, 1, 2, 2
    torch.testing.assert_close(p(x), torch.tensor([0.0, 0.0, 0.25, 0.5, 0.5]))
    # the min shift makes the released quantizer shift-equivariant, the paper's is not
    torch.testing.assert_close(q(x + 1.0), q(x) + 1.0)
    assert not torch.allclose(p(x + 1.0), p(x) + 1.0)
    xg = x.clone().requires_grad_()
    p(xg).sum().backward()
    assert xg.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]  # window [0, 2α] inclusive (Eq. 12)
    # Eq. 12, no grad scale: Qn = 0 below, round(r) − r = 0, −.2, 0 inside, Qp = 2 above
    torch.testing.assert_close(p.alpha.grad, torch.tensor(1.8), rtol=1e-6, atol=0)


def test_hand_worked_min_shift_gradients():
    x = torch.tensor([-0.1, 0.0, 0.3, 0.5, 1.2], requires_grad=True)
    q = ready(2, False, "released", 0.25)
    q(x).sum().backward()
    # r = 0, .4, 1.6, 2.4, 5.2: window [0, 2] inclusive; m is a constant (its gradient is dropped)
    assert x.grad.tolist() == [1.0, 1.0, 1.0, 0.0, 0.0]
    # round(r) − r inside: 0, −.4, +.4; Qp = 2 above (twice): Σ = 4; grad_scale 1/√(N·Qp) = 1/√10
    torch.testing.assert_close(q.alpha.grad, torch.tensor(4.0 / math.sqrt(10)), rtol=1e-5, atol=0)


def test_alpha_guard():
    x = torch.tensor([-2e-5, 1e-6, 3e-5])
    for value in (0.0, -1.0, 1e-7):
        q = ready(2, True, "released", value)
        torch.testing.assert_close(q(x), torch.tensor([-1e-5, 0.0, 1e-5]))  # α_c = 1e-5
        xg = x.clone().requires_grad_()
        q(xg).sum().backward()
        # r = -2, .1, 3 -> Qn, round(.1)−.1, Qp: the gradient reaches α (the guard does not mask it)
        torch.testing.assert_close(q.alpha.grad, torch.tensor((-1 - 0.1 + 1) / math.sqrt(3)))


# ---- gradients ----------------------------------------------------------------------------------

@pytest.mark.parametrize("bits,signed,variant", CASES)
def test_gradients_match_reference(bits, signed, variant):
    x, alpha = sample(bits, signed, seed=10 + bits)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    _, gx_ref, ga_ref, r = ref_elastic(x, alpha, g, bits, signed, variant)
    assert_no_ties(r, bits, signed)
    q = ready(bits, signed, variant, alpha)
    xg = x.clone().requires_grad_()
    q(xg).backward(g)
    assert torch.equal(xg.grad.double(), gx_ref)  # a mask times G: exact
    torch.testing.assert_close(q.alpha.grad.double(), ga_ref, rtol=0, atol=alpha_grad_atol(r, g))
    assert q.alpha.grad.shape == () and q.alpha.grad.dtype == torch.float32


def _round_pass(t):
    return t + (torch.round(t) - t).detach()


def lsq_surrogate(x, alpha, bits, signed, variant):
    """LSQ written with autograd tricks (Esser et al. 2020: grad_scale + round_pass), float64.

    A second, independent derivation of the same gradients: the explicit backward must agree.
    """
    qn, qp = ref_bounds(bits, signed)
    released = variant == "released"
    scale = 1.0 / math.sqrt(x.numel() * qp) if released else 1.0
    a = alpha * scale + (alpha - alpha * scale).detach()  # value α, gradient × s
    if released and not signed and bits != 1:
        m = x.min().detach()
        return a * torch.clamp(_round_pass(torch.clamp((x - m) / a, qn, qp)), qn, qp) + m
    xt = x - x.mean().detach() if (not released and signed) else x
    if signed and bits == 1:  # value α·sign, α-grad sign(x̃), x-grad window |x̃/α| <= 1
        window = a.detach() * torch.clamp(xt / a.detach(), -1, 1)
        return a * torch.sign(xt).detach() + window - window.detach()
    return a * _round_pass(torch.clamp(xt / a, qn, qp))


@pytest.mark.parametrize("bits,signed,variant", CASES)
def test_gradients_match_lsq_surrogate(bits, signed, variant):
    x, alpha = sample(bits, signed, seed=20 + bits)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    _, _, _, r = ref_elastic(x, alpha, g, bits, signed, variant)
    assert_no_ties(r, bits, signed)
    x64 = x.double().requires_grad_()
    a64 = torch.tensor(alpha, dtype=torch.float32).double().requires_grad_()
    lsq_surrogate(x64, a64, bits, signed, variant).backward(g.double())
    q = ready(bits, signed, variant, alpha)
    xg = x.clone().requires_grad_()
    q(xg).backward(g)
    torch.testing.assert_close(xg.grad.double(), x64.grad, rtol=0, atol=0)
    torch.testing.assert_close(q.alpha.grad.double(), a64.grad, rtol=0, atol=alpha_grad_atol(r, g))


def test_signed_binary_alpha_grad_has_no_range_mask():
    x = torch.tensor([-3.0, -0.5, 0.2, 4.0], requires_grad=True)
    q = ready(1, True, "released", 1.0)
    q(x).backward(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    # Σ G·sign(x)/√N over all four, clipped ones included: (−1 −2 +3 +4)/2
    torch.testing.assert_close(q.alpha.grad, torch.tensor(2.0))
    assert x.grad.tolist() == [0.0, 2.0, 3.0, 0.0]  # the x window still clips


@pytest.mark.parametrize("bits,signed", [(1, True), (2, True), (1, False), (2, False), (4, True)])
def test_gradcheck_paper_in_saturated_region(bits, signed):
    # Outside [Qn, Qp] the quantizer is α·Qn or α·Qp: smooth in α and flat in x, and the STE
    # (∂/∂α = Qn/Qp or sign, ∂/∂x = 0) is the true derivative. Paper variant: no grad scale.
    mag = 3.0 + torch.rand(10, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    x = torch.cat([mag, -mag])  # mean exactly 0, so X' = X; |X| >= 3
    if not signed:
        x = x.abs() + 30.0
    x.requires_grad_()
    qn, qp = ref_bounds(bits, signed)
    alpha = torch.tensor(2.5 / max(-qn, qp), dtype=torch.float64, requires_grad=True)
    fn = lambda x_, a_: elastic_quantize(x_, a_, bits, signed, "paper")  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, alpha), eps=1e-6, atol=1e-8)


# ---- initialisation and the initialized flag -----------------------------------------------------

@pytest.mark.parametrize("bits,signed,variant", CASES)
def test_first_training_batch_initialises(bits, signed, variant):
    x, _ = sample(bits, signed, seed=5)
    q = ElasticQuantizer(bits, signed, variant).train()
    assert q.alpha.shape == () and q.alpha.dtype == torch.float32 and q.alpha.item() == 1.0
    assert q.initialized.dtype == torch.bool and not bool(q.initialized) and not q._initialized
    q(x)
    assert bool(q.initialized) and q._initialized
    torch.testing.assert_close(q.alpha.item(), ref_init(x, bits, signed), rtol=1e-6, atol=0)
    before = q.alpha.detach().clone()
    q(x * 5)  # a second batch does not re-initialise
    assert torch.equal(q.alpha.detach(), before)


def test_init_values_by_hand():
    x = torch.tensor([-3.0, 1.0, 0.0, 2.0])  # mean|x| = 1.5
    expect = {(1, True): 3.0, (2, True): 3.0, (3, True): 3.0 / math.sqrt(3),
              (1, False): 6.0, (2, False): 6.0 / math.sqrt(3), (8, False): 6.0 / math.sqrt(255)}
    for (bits, signed), value in expect.items():
        q = ElasticQuantizer(bits, signed, "released")
        q.init_alpha_(x)
        torch.testing.assert_close(q.alpha.item(), value, rtol=1e-6, atol=0)
        assert q._initialized and bool(q.initialized)


def test_eval_mode_does_not_initialise():
    x, _ = sample(2, True)
    q = ElasticQuantizer(2, True, "released").eval()
    y = q(x)
    assert q.alpha.item() == 1.0 and not q._initialized and not bool(q.initialized)
    torch.testing.assert_close(y, torch.round(x).clamp(-1, 1))  # quantized with α = 1


def test_initialized_flag_survives_state_dict():
    x, _ = sample(2, False)
    q = ElasticQuantizer(2, False, "released").train()
    q(x)
    sd = q.state_dict()
    assert set(sd) == {"alpha", "initialized"} and bool(sd["initialized"])
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    new = ElasticQuantizer(2, False, "released").train()
    new.load_state_dict(torch.load(buf))
    assert new._initialized and torch.equal(new.alpha, q.alpha)
    new(x * 3)  # loaded as initialised: no re-initialisation
    assert torch.equal(new.alpha, q.alpha)
    # assign=True replaces the buffer object; transformers' loader setattr()s it
    for load in (lambda m: m.load_state_dict(sd, assign=True),
                 lambda m: setattr(m, "initialized", torch.tensor(True))):
        m = ElasticQuantizer(2, False, "released")
        load(m)
        assert m._initialized
    # and an uninitialised checkpoint loads as uninitialised
    m = ready(2, False, "released", 0.5)
    m.load_state_dict(ElasticQuantizer(2, False, "released").state_dict())
    assert not m._initialized


def test_no_host_sync_in_training_step(monkeypatch):
    def boom(*_a, **_k):
        raise AssertionError("host sync in the quantizer hot path")

    qs = [ElasticQuantizer(b, s, v).train() for b, s, v in CASES]  # includes the auto-init step
    qs += [MinMaxQuantizer(8, s) for s in (True, False)]
    x, _ = sample(2, True)
    with monkeypatch.context() as mp:
        for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
            mp.setattr(torch.Tensor, name, boom)
        for _ in range(2):
            for q in qs:
                xg = x.clone().requires_grad_()
                q(xg).sum().backward()
    assert all(q._initialized for q in qs if isinstance(q, ElasticQuantizer))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("variant", VARIANTS)
def test_half_precision_inputs(dtype, variant):
    x, alpha = sample(2, False, seed=7)
    x16 = x.to(dtype)
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    q, q32 = ready(2, False, variant, alpha), ready(2, False, variant, alpha)
    xg = x16.clone().requires_grad_()
    y = q(xg)
    y.backward(g)
    x32 = x16.float().requires_grad_()
    y32 = q32(x32)
    y32.backward(g.float())
    assert y.dtype == dtype and xg.grad.dtype == dtype and q.alpha.grad.dtype == torch.float32
    assert torch.equal(y, y32.to(dtype))  # computed in float32, cast once
    assert torch.equal(xg.grad, x32.grad.to(dtype))
    torch.testing.assert_close(q.alpha.grad, q32.alpha.grad, rtol=1e-6, atol=0)
    for s in (True, False):
        mm = MinMaxQuantizer(8, s)
        assert torch.equal(mm(x16), mm(x16.float()).to(dtype))


def test_rejects_bad_arguments_and_repr():
    with pytest.raises(ValueError, match="bits"):
        ElasticQuantizer(9, True)
    with pytest.raises(ValueError, match="variant"):
        ElasticQuantizer(2, True, "code")
    with pytest.raises(ValueError, match="clip"):
        MinMaxQuantizer(8, True, clip=0.0)
    assert repr(ElasticQuantizer(2, False, "released")) == \
        "ElasticQuantizer(bits=2, signed=False, variant='released')"
    assert "bits=8, signed=True, clip=2.5" in repr(MinMaxQuantizer())
    assert list(MinMaxQuantizer().parameters()) == []


# ---- calibrate ----------------------------------------------------------------------------------

class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.q1 = ElasticQuantizer(2, True, "released")
        self.lin = nn.Linear(8, 8)
        self.q2 = ElasticQuantizer(2, False, "paper")
        self.unused = ElasticQuantizer(1, True, "paper")
        self.drop = nn.Dropout(0.5)

    def forward(self, input):
        return self.q2(self.drop(torch.relu(self.lin(self.q1(input)))))


def test_calibrate_counts_restores_modes_and_uses_the_data():
    net = _Net().eval()
    net.drop.train()  # a submodule in another mode must come back as it was
    x = torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
    assert calibrate(net, {"input": x}) == 2  # `unused` never sees data
    assert not net.training and net.drop.training and not net.q1.training
    assert net.q1._initialized and net.q2._initialized and not net.unused._initialized
    assert net.unused.alpha.item() == 1.0
    torch.testing.assert_close(net.q1.alpha.item(), ref_init(x, 2, True), rtol=1e-6, atol=0)
    with torch.no_grad():  # q2 saw relu(lin(q1(x))) with q1's new α (eval: no dropout)
        h = torch.relu(net.lin(net.q1(x)))
    torch.testing.assert_close(net.q2.alpha.item(), ref_init(h, 2, False), rtol=1e-6, atol=0)
    assert net.q1.alpha.requires_grad and net.q1.alpha.grad is None
    assert calibrate(net, [{"input": x}]) == 0  # already initialised
    assert calibrate(net, lambda m: m(x), force=True) == 2


def test_calibrate_averages_batches_in_train_mode_model():
    net = _Net().train()
    xs = [torch.randn(4, 8, generator=torch.Generator().manual_seed(s)) * (s + 1) for s in range(3)]
    assert calibrate(net, ({"input": x} for x in xs)) == 2
    assert net.training and net.drop.training
    expect = sum(ref_init(x, 2, True) for x in xs) / 3
    torch.testing.assert_close(net.q1.alpha.item(), expect, rtol=1e-6, atol=0)


def test_calibrate_failure_restores_alpha():
    net = _Net().train()

    def bad(model):
        model(torch.randn(2, 8))
        raise RuntimeError("data error")

    with pytest.raises(RuntimeError):
        calibrate(net, bad)
    assert net.q1.alpha.item() == 1.0 and not net.q1._initialized and net.q1._calib is None
    assert net.training


# ---- min/max 8-bit ------------------------------------------------------------------------------

def ref_minmax(x, bits, signed, clip):
    xc = x.double().clamp(-clip, clip)
    if signed:
        s = (2 ** (bits - 1) - 1) / xc.abs().max()
        t = xc * s
        return torch.round(t) / s, t
    lo, a = xc.min(), xc.max() - xc.min()
    t = (xc - lo) / (a + 1e-8) * (2 ** bits - 1)
    return torch.round(t) / (2 ** bits - 1) * (a + 1e-8) + lo, t


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("signed", [True, False])
def test_minmax_matches_reference(bits, signed):
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(bits + 1)) * 1.5  # |x| > 2.5 too
    x[0, 0], x[0, 1], x[0, 2] = 2.5, -2.5, 2.4999
    y_ref, t = ref_minmax(x, bits, signed, 2.5)
    frac = t - t.floor()
    assert ((frac - 0.5).abs() > 1e-4).all(), "rounding tie in test data"
    xg = x.clone().requires_grad_()
    y = MinMaxQuantizer(bits, signed, clip=2.5)(xg)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-6, atol=1e-6)
    levels = y.double().unique().numel()
    assert levels <= 2 ** bits and levels > 2 ** bits // 4
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(9))
    y.backward(g)
    inside = (x > -2.5) & (x < 2.5)  # strict: ±2.5 itself gets no gradient
    assert torch.equal(xg.grad, g * inside) and xg.grad[0, 2] == g[0, 2]
    assert xg.grad[0, 0] == 0 and xg.grad[0, 1] == 0


def test_minmax_hand_worked_and_zero():
    x = torch.tensor([-3.0, -1.0, 0.3, 2.0])
    # sym: x_c max|.| = 2.5, s = 127/2.5 = 50.8 -> round(-127, -50.8, 15.24, 101.6)/50.8
    expect = torch.tensor([-127.0, -51.0, 15.0, 102.0]) / 50.8
    torch.testing.assert_close(minmax_quantize(x, 8, True), expect)
    # asym 2-bit: x_c = [-2.5, -1, .3, 2], range 4.5 -> t = 0, 1, 1.8667, 3 -> 0, 1, 2, 3
    expect = torch.tensor([0.0, 1.0, 2.0, 3.0]) / 3 * (4.5 + 1e-8) - 2.5
    torch.testing.assert_close(minmax_quantize(x, 2, False), expect)
    z = torch.zeros(6)
    assert torch.equal(minmax_quantize(z, 8, True), z)  # reference: NaN (0/0); here 0


# ---- torch.distributed: the initial α is averaged over ranks -------------------------------------

_WORKER = textwrap.dedent("""
    import sys, torch, torch.distributed as dist
    from tbt.quant.activation import ElasticQuantizer, calibrate
    rank, store, out = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    dist.init_process_group("gloo", init_method="file://" + store, rank=rank, world_size=2)
    x = torch.randn(64, generator=torch.Generator().manual_seed(100 + rank)) * (1 + 3 * rank)
    q = ElasticQuantizer(2, True, "released").train()
    q(x)  # auto-init on the first training batch
    p = ElasticQuantizer(2, False, "paper")
    n = calibrate(p, [x.abs(), 2 * x.abs()])
    torch.save({"auto": q.alpha.detach(), "calib": p.alpha.detach(), "n": n}, out)
    dist.destroy_process_group()
""")


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available(), reason="no torch.distributed")
def test_distributed_init_is_averaged(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(_WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, str(script), str(r), str(tmp_path / "store"),
                               str(tmp_path / f"out{r}.pt")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0, out.decode()[-2000:]
    res = [torch.load(tmp_path / f"out{r}.pt") for r in range(2)]
    xs = [torch.randn(64, generator=torch.Generator().manual_seed(100 + r)) * (1 + 3 * r)
          for r in range(2)]
    auto = sum(ref_init(x, 2, True) for x in xs) / 2
    calib = sum(ref_init(x.abs(), 2, False) + ref_init(2 * x.abs(), 2, False) for x in xs) / 4
    assert ref_init(xs[0], 2, True) != pytest.approx(auto, rel=0.1)  # the ranks do differ
    for r in res:
        assert torch.equal(r["auto"], res[0]["auto"]) and r["n"] == 1
        torch.testing.assert_close(float(r["auto"]), auto, rtol=1e-6, atol=0)
        torch.testing.assert_close(float(r["calib"]), calib, rtol=1e-6, atol=0)
