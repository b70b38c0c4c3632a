"""The neighbouring weight methods (docs/related.md §1b, §5a, §6a, §7, §8, §9; docs/methods.md).

Checks, each against something independent of the code under test:
* float64 numpy re-implementations of every forward, unit by unit with a Python loop;
* the zero fractions of docs/related.md §0 on Gaussian weights (and erf-derived ones);
* SEQ's level counts at |W| = α, where the paper's Eq. 5 (clip ±1) has an extra level;
* DLT with γ = 0 against LSQ-ternary, Tequila with λ = 0 against absmean;
* gradients against float64 autograd surrogates (round_pass), gradcheck and finite differences.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tbt.config import QuantConfig
from tbt.quant.granularity import expand_scale
from tbt.quant.tequila import TequilaQuantizer, dead_zone_bias
from tbt.quant.weight import WEIGHT_METHODS, dequantize, quantize_weight, weight_codes
from tbt.quant.weight_learned import (DltWeightQuantizer, LsqWeightQuantizer,
                                      SeqInt2WeightQuantizer, SeqWeightQuantizer,
                                      make_weight_quantizer)

GRANS = [("row", {}), ("tensor", {}), ("group", {"group_size": 8}), ("shard", {"num_shards": 3})]


def _w(shape=(12, 40), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g) + torch.linspace(-0.3, 0.3, shape[0])[:, None]


def _units_np(x: np.ndarray, gran: str, group_size=8, num_shards=3) -> np.ndarray:
    n, k = x.shape
    if gran == "row":
        return x.copy()
    if gran == "tensor":
        return x.reshape(1, -1)
    if gran == "group":
        return np.stack([x[r, j:j + group_size] for r in range(n) for j in range(0, k, group_size)])
    rows = n // num_shards
    return np.stack([x[s * rows:(s + 1) * rows].reshape(-1) for s in range(num_shards)])


def _scale_np(s_u: np.ndarray, shape, gran: str, num_shards=3) -> np.ndarray:
    """Per-unit scales -> full (N, K) matrix of the scale each weight uses (loop, float64)."""
    n, k = shape
    out = np.empty(shape)
    for r in range(n):
        for j in range(k):
            if gran == "row":
                u = r
            elif gran == "tensor":
                u = 0
            elif gran == "group":
                u = r * (k // 8) + j // 8
            else:
                u = r // (n // num_shards)
            out[r, j] = s_u[u]
    return out


# ---- stateless: bitnet-binary and trilm ---------------------------------------------------------

@pytest.mark.parametrize("gran,kw", GRANS)
def test_bitnet_binary_and_trilm_match_float64(gran, kw):
    w = _w()
    x = w.double().numpy()
    units = _units_np(x, gran, **kw) if kw else _units_np(x, gran)
    for method in ("bitnet-binary", "trilm"):
        bits = 1 if method == "bitnet-binary" else 2
        codes, scale = weight_codes(w, bits, method, granularity=gran, **kw)
        rc, rs = [], []
        for u in units:
            if method == "bitnet-binary":  # sign(W − mean W), β = mean|W| (uncentred)
                rc.append(np.where(u - u.mean() >= 0, 1.0, -1.0))
                rs.append(np.abs(u).mean())
            else:  # γ = ε + mean|W|, round(clip(W/γ, −1, 1))
                gamma = 1e-5 + np.abs(u).mean()
                rc.append(np.rint(np.clip(u / gamma, -1, 1)))
                rs.append(gamma)
        full_codes = np.empty(x.shape)
        if gran == "group":
            full_codes = np.stack(rc).reshape(x.shape)
        elif gran == "row":
            full_codes = np.stack(rc)
        else:
            full_codes = np.concatenate(rc).reshape(x.shape)
        np.testing.assert_array_equal(codes.numpy(), full_codes)
        full_scale = expand_scale(scale, 40).expand(12, 40).numpy()
        np.testing.assert_allclose(full_scale, _scale_np(np.array(rs), x.shape, gran), rtol=2e-6)
        q = quantize_weight(w, bits, method, granularity=gran, **kw)
        assert torch.equal(q, dequantize(codes, scale))


def test_stateless_defaults_and_identity_ste():
    assert WEIGHT_METHODS["bitnet-binary"].default_granularity == "tensor"
    assert WEIGHT_METHODS["trilm"].default_granularity == "shard"
    w = _w().requires_grad_()
    g = torch.randn(12, 40)
    for method, bits in (("bitnet-binary", 1), ("trilm", 2)):
        w.grad = None
        quantize_weight(w, bits, method).backward(g)
        assert torch.equal(w.grad, g)
    # trilm with one shard is per tensor: one distinct scale
    _, s = weight_codes(_w(), 2, "trilm")
    assert s.unique().numel() == 1
    _, s = weight_codes(_w(), 2, "trilm", num_shards=4)
    assert s.unique().numel() == 4 and s.shape == (12, 1)


def test_granularity_errors_name_the_fix():
    with pytest.raises(ValueError, match=r"group_size to divide in_features=40.*granularity='row'"):
        weight_codes(_w(), 2, "trilm", granularity="group", group_size=7)
    with pytest.raises(ValueError, match=r"num_shards to divide out_features=12"):
        weight_codes(_w(), 2, "trilm", num_shards=5)
    with pytest.raises(ValueError, match="keeps per-layer state"):
        quantize_weight(_w(), 2, "seq")


# ---- zero fractions (docs/related.md §0) -------------------------------------------------------

def _zeros(codes: torch.Tensor) -> float:
    return (codes == 0).float().mean().item()


def test_zero_fractions_on_gaussian_weights():
    g = torch.Generator().manual_seed(3)
    w = torch.randn(256, 768, generator=g)
    # BitNet absmean rule round(W/mean|W|) (TriLM, Tequila): threshold 0.399σ -> 31.0 %
    assert abs(_zeros(weight_codes(w, 2, "trilm")[0]) - 0.310) < 0.005
    tq = TequilaQuantizer(2, (256, 768), "group", 128, lam=0.0)
    assert abs(_zeros(tq.codes_and_scale(w).codes) - 0.310) < 0.005
    # ParetoQ SEQ at init (α = max|W_r|, threshold α/3): ≈74 % at in=768, ≈79 % at in=4096
    seq = make_weight_quantizer(QuantConfig(bits="fp-2-fp", method="seq"), 2, w)
    assert abs(_zeros(seq.codes_and_scale(w).codes) - 0.74) < 0.02
    w4k = torch.randn(32, 4096, generator=g)
    seq4k = make_weight_quantizer(QuantConfig(bits="fp-2-fp", method="seq"), 2, w4k)
    assert abs(_zeros(seq4k.codes_and_scale(w4k).codes) - 0.79) < 0.02
    # LSQ ternary at init α = 2·mean|W| -> threshold mean|W| = √(2/π)σ: zeros = erf(1/√π)
    lsq = make_weight_quantizer(QuantConfig(bits="fp-2-fp", method="lsq"), 2, w)
    assert abs(_zeros(lsq.codes_and_scale(w).codes) - math.erf(1 / math.sqrt(math.pi))) < 0.005
    # bitnet-binary has no zero code and splits about half/half
    c, _ = weight_codes(w, 1, "bitnet-binary")
    assert _zeros(c) == 0 and abs((c == 1).float().mean().item() - 0.5) < 0.01


# ---- learned-step methods: forward against float64 --------------------------------------------------

def _ref_learned(x: np.ndarray, method: str, bits: int, alpha: np.ndarray, gamma=None):
    """float64 per unit: returns (codes, value) for units (U, n), alpha (U,)."""
    codes, values = [], []
    for i, u in enumerate(x):
        a = max(alpha[i], 1e-5)
        r = u / a
        if method == "lsq" and bits == 1:
            k, lvl = np.where(r >= 0, 1.0, -1.0), 1.0
        elif method in ("lsq", "dlt"):
            qn, qp = (-1, 1) if bits == 2 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
            k, lvl = np.clip(np.rint(r), qn, qp), 1.0
        elif method == "seq":  # ParetoQ code: round(clip(r, ±0.99)·1.5)/1.5
            k, lvl = np.rint(np.clip(r, -0.99, 0.99) * 1.5), 2.0 / 3.0
        else:  # seq-int2: (round(clip(r)·2 − 0.5) + 0.5)/2 = (2u+1)/4
            k, lvl = 2 * np.rint(np.clip(r, -0.99, 0.99) * 2 - 0.5) + 1, 0.25
        codes.append(k)
        values.append(k * a * lvl + (0.0 if gamma is None else gamma[i]))
    return np.stack(codes), np.stack(values)


LEARNED = [(LsqWeightQuantizer, "lsq", 1), (LsqWeightQuantizer, "lsq", 2),
           (LsqWeightQuantizer, "lsq", 4), (SeqWeightQuantizer, "seq", 2),
           (SeqInt2WeightQuantizer, "seq-int2", 2), (DltWeightQuantizer, "dlt", 2)]


def _module(cls, bits, gran, kw, seed=0):
    q = cls(bits, (12, 40), gran, **kw)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        q.alpha.copy_(0.5 + torch.rand(q.alpha.shape, generator=g))
        if hasattr(q, "shift"):
            q.shift.copy_(0.1 * torch.randn(q.shift.shape, generator=g))
    return q


@pytest.mark.parametrize("gran,kw", GRANS)
@pytest.mark.parametrize("cls,method,bits", LEARNED)
def test_learned_forward_matches_float64(cls, method, bits, gran, kw):
    q = _module(cls, bits, gran, kw)
    w = _w()
    xu = q.units(w.double()).numpy()
    a = q.alpha.detach().double().numpy()[:, 0]
    gam = q.shift.detach().double().numpy()[:, 0] if hasattr(q, "shift") else None
    rc, rv = _ref_learned(xu, method, bits, a, gam)
    r = xu / a[:, None]  # no near-ties, so float32 and float64 round the same way
    for edge in (0.5, 1.5, -0.5, -1.5):
        assert np.abs(np.abs(r * (1.5 if method == "seq" else 1)) - abs(edge)).min() > 1e-4
    pw = q.codes_and_scale(w)
    np.testing.assert_array_equal(q.units(pw.codes).numpy(), rc)
    with torch.no_grad():
        value = q(w)
    np.testing.assert_allclose(q.units(value).double().numpy(), rv, rtol=1e-6, atol=1e-7)
    # the training forward and the exported tensors give the same bits
    wg = w.clone().requires_grad_()
    assert torch.equal(q(wg), dequantize(pw.codes, pw.scale, w.dtype, pw.offset))
    assert torch.equal(value, dequantize(pw.codes, pw.scale, w.dtype, pw.offset))


def _levels(q, w) -> set[float]:
    pw = q.codes_and_scale(w)
    return set(pw.codes.unique().tolist())


def test_seq_level_counts_including_abs_w_equal_alpha():
    # rows spanning [−α, α] with both ends exactly ±α (= max|W_r| at init)
    w = torch.linspace(-1.0, 1.0, 401).repeat(4, 1) * torch.tensor([[0.5], [1.0], [2.0], [3.0]])
    seq = make_weight_quantizer(QuantConfig(bits="fp-2-fp", method="seq"), 2, w)
    assert _levels(seq, w) == {-1, 0, 1}
    seq2 = make_weight_quantizer(QuantConfig(bits="fp-2-fp", method="seq-int2"), 2, w)
    assert _levels(seq2, w) == {-3, -1, 1, 3}
    with torch.no_grad():
        for q in (seq, seq2):
            assert (q(w) / q.alpha).unique().numel() == (3 if q is seq else 4)
    # the paper's Eq. 5 with clip ±1 has an extra level at |W| = α (why the code clips at 0.99)
    r = (w / w.abs().amax(dim=1, keepdim=True)).double()
    eq5 = lambda k: (torch.round(r.clamp(-1, 1) * k / 2 - 0.5) + 0.5)  # noqa: E731
    assert eq5(3).unique().numel() == 4 and eq5(4).unique().numel() == 5


def test_seq_int2_is_not_packable_and_others_are():
    assert not WEIGHT_METHODS["seq-int2"].packable
    assert all(WEIGHT_METHODS[m].packable for m in ("seq", "lsq", "dlt", "tequila", "trilm"))


def test_initialisation_from_the_latent_weight():
    w = _w()
    cfg = QuantConfig(bits="fp-2-fp", method="lsq")
    lsq = make_weight_quantizer(cfg, 2, w)
    torch.testing.assert_close(lsq.alpha, 2 * w.abs().mean(dim=1, keepdim=True))
    lsq1 = make_weight_quantizer(QuantConfig(bits="fp-1-fp", method="lsq"), 1, w)
    torch.testing.assert_close(lsq1.alpha, w.abs().mean(dim=1, keepdim=True))
    lsq4 = make_weight_quantizer(QuantConfig(bits="fp-4-fp", method="lsq"), 4, w)
    torch.testing.assert_close(lsq4.alpha, 2 * w.abs().mean(dim=1, keepdim=True) / math.sqrt(7))
    dlt = make_weight_quantizer(QuantConfig(bits="fp-2-fp", method="dlt", granularity="group",
                                            group_size=8), 2, w)
    torch.testing.assert_close(dlt.alpha, w.reshape(-1, 8).abs().amax(dim=1, keepdim=True))
    assert dlt.shift.shape == (60, 1) and not dlt.shift.any()
    meta = make_weight_quantizer(cfg, 2, torch.empty(12, 40, device="meta"))
    assert meta.alpha.is_meta


# ---- DLT, LSQ and SEQ gradients --------------------------------------------------------------

def _round_pass(t):
    return t + (torch.round(t) - t).detach()


def _surrogate(method, bits, w, alpha, gamma, numel):
    """float64 autograd form of each method's STE (the released codes' gradients)."""
    if method == "seq":  # ParetoQ: ∂/∂α outside the ±0.99 window is ±1, not the level 2/3
        r = w / alpha
        inside = (r.abs() <= 0.99).double()
        q_in = alpha * _round_pass(r.clamp(-0.99, 0.99) * 1.5) / 1.5
        q_out = alpha.detach() * torch.round(r.clamp(-.99, .99) * 1.5).detach() / 1.5 \
            + (alpha - alpha.detach()) * torch.sign(r).detach()
        val = inside * q_in + (1 - inside) * q_out
    elif method == "lsq" and bits == 1:
        window = alpha.detach() * (w / alpha.detach()).clamp(-1, 1)
        val = alpha * torch.where(w >= 0, 1.0, -1.0).double() + window - window.detach()
    else:
        qn, qp = (-1, 1) if bits == 2 else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
        val = alpha * _round_pass((w / alpha).clamp(qn, qp))
    qp_grad = 1 if bits <= 2 else 2 ** (bits - 1) - 1
    s = 1.0 / math.sqrt(numel * qp_grad)
    return val, s, (0 if gamma is None else gamma)


@pytest.mark.parametrize("gran,kw", GRANS[:3])
@pytest.mark.parametrize("cls,method,bits", [c for c in LEARNED if c[1] != "seq-int2"])
def test_learned_gradients_match_float64_surrogate(cls, method, bits, gran, kw):
    q = _module(cls, bits, gran, kw, seed=5)
    w = _w(seed=6) * 1.3
    g = torch.randn(12, 40, generator=torch.Generator().manual_seed(7))
    wg = w.clone().requires_grad_()
    q(wg).backward(g)
    w64 = q.units(w.double()).clone().requires_grad_()
    a64 = q.alpha.detach().double().clone().requires_grad_()
    gam = q.shift.detach().double().clone().requires_grad_() if hasattr(q, "shift") else None
    val, s, shift = _surrogate(method, bits, w64, a64, gam, w.numel())
    # grad scale on α only (value α, gradient × s), γ plain
    (q.units(g.double()) * (val + shift)).sum().backward()
    # G·window: the surrogate's chain rule (α·(1.5/α)/1.5) is 1 only to float64 rounding
    np.testing.assert_allclose(q.units(wg.grad).double().numpy(), w64.grad.numpy(), rtol=1e-12)
    torch.testing.assert_close(q.alpha.grad.double(), a64.grad * s, rtol=1e-5, atol=1e-6)
    if gam is not None:
        # a float32 sum of n values: allow a few ulps of Σ|G| (cancellation in the tensor unit)
        torch.testing.assert_close(q.shift.grad.double(), gam.grad, rtol=0,
                                   atol=1e-7 * g.abs().sum().item())


def test_dlt_with_zero_shift_is_lsq_ternary():
    for gran, kw in GRANS:
        dlt = _module(DltWeightQuantizer, 2, gran, kw, seed=1)
        lsq = LsqWeightQuantizer(2, (12, 40), gran, **kw)
        with torch.no_grad():
            dlt.shift.zero_()
            lsq.alpha.copy_(dlt.alpha)
        w = _w(seed=2)
        g = torch.randn(12, 40, generator=torch.Generator().manual_seed(3))
        w1, w2 = w.clone().requires_grad_(), w.clone().requires_grad_()
        y1, y2 = dlt(w1), lsq(w2)
        assert torch.equal(y1, y2)
        y1.backward(g)
        y2.backward(g)
        assert torch.equal(w1.grad, w2.grad) and torch.equal(dlt.alpha.grad, lsq.alpha.grad)
        # γ learns Σ_unit G
        torch.testing.assert_close(dlt.shift.grad, lsq.units(g).sum(dim=1, keepdim=True))


@pytest.mark.parametrize("cls,method,bits", LEARNED)
def test_alpha_gradcheck_in_saturated_region(cls, method, bits):
    # Every |W/α| beyond the window: the value is α·(saturated level)·sign (+γ), smooth in α
    # and γ, so there the released α rule is the true derivative (times the grad scale s),
    # except SEQ ternary, whose code uses ±1 where the level is ±2/3 (checked by hand).
    from tbt.quant.weight_learned import _LearnedStep

    q = cls(bits, (4, 8), "row")
    sign = torch.where(torch.arange(32) % 2 == 0, 1.0, -1.0).reshape(4, 8).double()
    w = (sign * (20.0 + torch.rand(4, 8, dtype=torch.float64))).requires_grad_()
    alpha = torch.full((4, 1), 2.0, dtype=torch.float64, requires_grad=True)
    unscale = math.sqrt(32 * (7 if bits == 4 else 1))  # 1/s
    if method == "seq":
        _LearnedStep.apply(w, alpha, None, q).sum().backward()
        torch.testing.assert_close(alpha.grad, sign.sum(dim=1, keepdim=True) / unscale)
        assert not w.grad.any()  # outside the window: no weight gradient
        return

    def f(a, *shift):  # value a, gradient × 1/s: undoes the grad scale
        a_eff = a * unscale - (a * unscale - a).detach()
        return _LearnedStep.apply(w.detach(), a_eff, shift[0] if shift else None, q)

    inputs = (alpha,)
    if method == "dlt":
        inputs = (alpha, torch.zeros(4, 1, dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-8)


# ---- Tequila ---------------------------------------------------------------------------------

def _tequila_ref(x: np.ndarray, g: int, lam: float):
    """float64: codes, per-group scale (N, K/g), bias (N,)."""
    n, k = x.shape
    codes = np.zeros_like(x)
    scale = np.zeros((n, k // g))
    bias = np.zeros(n)
    for r in range(n):
        for j in range(k // g):
            u = x[r, j * g:(j + 1) * g]
            s = np.abs(u).mean()
            t = np.where(u >= s / 2, 1.0, np.where(u <= -s / 2, -1.0, 0.0))
            codes[r, j * g:(j + 1) * g] = t
            scale[r, j] = s
            bias[r] += lam * u[t == 0].sum()
    return codes, scale, bias


def test_tequila_matches_float64_and_lambda_zero_is_absmean():
    w = _w(seed=4)
    for lam in (0.0, 1e-3, 0.5):
        q = TequilaQuantizer(2, (12, 40), "group", 8, lam=lam)
        pw = q.codes_and_scale(w)
        rc, rs, rb = _tequila_ref(w.double().numpy(), 8, lam)
        np.testing.assert_array_equal(pw.codes.numpy(), rc)
        np.testing.assert_allclose(pw.scale.numpy(), rs, rtol=2e-6)
        np.testing.assert_allclose(pw.bias.double().numpy(), rb, rtol=1e-5, atol=1e-7)
    # λ = 0: absmean ternary per group (BitNet's rule), bias exactly 0
    q0 = TequilaQuantizer(2, (12, 40), "group", 8, lam=0.0)
    pw = q0.codes_and_scale(w)
    c_abs, s_abs = weight_codes(w, 2, "absmean", granularity="group", group_size=8)
    assert torch.equal(pw.scale, s_abs)
    differ = pw.codes != c_abs
    # the two rules differ only where |w| lies in BitNet's ε band [s/2, (s + 1e-5)/2]
    band = (w.abs() - expand_scale(s_abs, 40) / 2).abs() < 1e-5
    assert not (differ & ~band).any()
    with torch.no_grad():
        assert torch.equal(q0(w), quantize_weight(w, 2, "absmean", granularity="group",
                                                  group_size=8))
    assert not q0.output_bias(w).any()


def test_tequila_gradients():
    w = _w(seed=8).double()
    dead = torch.rand(12, 40, generator=torch.Generator().manual_seed(1)) < 0.4
    assert torch.autograd.gradcheck(lambda x: dead_zone_bias(x, dead, 0.3),
                                    (w.clone().requires_grad_(),))
    # through a layer: ∂L/∂W = G_A (identity STE) + λ·D·Σ_tokens ∂L/∂y
    from tbt.quant.modules import QuantLinear

    lam = 0.25
    lin = torch.nn.Linear(40, 12, bias=True)
    q = TequilaQuantizer(2, (12, 40), "group", 8, lam=lam)
    ql = QuantLinear.from_float(lin, q, None)
    x = torch.randn(5, 40, generator=torch.Generator().manual_seed(2))
    gy = torch.randn(5, 12, generator=torch.Generator().manual_seed(3))
    ql(x).backward(gy)
    d = (q.codes_and_scale(lin.weight).codes == 0).double()
    want = gy.double().t() @ x.double() + lam * d * gy.double().sum(0)[:, None]
    torch.testing.assert_close(lin.weight.grad.double(), want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lin.bias.grad, gy.sum(0))
    # the forward adds λ·Σ_dead W to the bias
    with torch.no_grad():
        pw = q.codes_and_scale(lin.weight)
        y = x @ dequantize(pw.codes, pw.scale).t() + lin.bias + pw.bias
        assert torch.equal(ql(x), torch.nn.functional.linear(
            x, dequantize(pw.codes, pw.scale), lin.bias + pw.bias))
        torch.testing.assert_close(ql(x), y)


@pytest.mark.slow
def test_any_module_can_be_imported_first():
    # the registry loads every built-in method on its first read, whichever module came first
    # (the registry alone too); each entry point in a fresh interpreter, run side by side
    import subprocess
    import sys

    code = ("import tbt.quant.{}\n"
            "from tbt.quant.weight_registry import WEIGHT_METHODS, check_weight_method\n"
            "check_weight_method('twn', 2)\n"
            "assert {{'bitnet-binary', 'trilm', 'lsq', 'seq', 'seq-int2', 'dlt', 'tequila',"
            " 'pbllm'}} <= set(WEIGHT_METHODS), sorted(WEIGHT_METHODS)\n")
    procs = [subprocess.Popen([sys.executable, "-c", code.format(m)], stderr=subprocess.PIPE,
                              text=True)
             for m in ("weight_registry", "weight", "weight_learned", "tequila", "weight_bitnet",
                       "pbllm")]
    for p in procs:
        _, err = p.communicate(timeout=600)  # six torch imports side by side
        assert p.returncode == 0, err


def test_tequila_all_zero_group_is_zero_not_nan():
    w = _w(seed=9)
    w[3, 8:16] = 0.0
    q = TequilaQuantizer(2, (12, 40), "group", 8, lam=0.1)
    pw = q.codes_and_scale(w)
    assert not pw.codes[3, 8:16].any() and pw.scale[3, 1] == 0
    assert torch.isfinite(pw.bias).all() and torch.isfinite(q(w)).all()


def test_dlt_centred_forward_gradients_and_init():
    from tbt.quant.weight_learned import DltCentredWeightQuantizer

    w = _w(seed=11) + 0.4  # a non-zero mean: what the centred reading is for
    q = make_weight_quantizer(QuantConfig(bits="fp-2-fp", method="dlt-centred"), 2, w)
    assert isinstance(q, DltCentredWeightQuantizer)
    x = w.double().numpy()
    gamma = x.mean(axis=1, keepdims=True)
    c = np.abs(x - gamma)
    keep = c > 0.7 * c.mean(axis=1, keepdims=True)
    np.testing.assert_allclose(q.shift.detach().numpy(), gamma, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(q.alpha.detach().numpy()[:, 0],
                               (c * keep).sum(1) / keep.sum(1), rtol=1e-5)
    a, b = q.alpha.detach().double().numpy(), q.shift.detach().double().numpy()
    ref = a * np.clip(np.rint((x - b) / a), -1, 1) + b
    with torch.no_grad():
        np.testing.assert_allclose(q(w).double().numpy(), ref, rtol=1e-6, atol=1e-6)
    # gradients vs the float64 surrogate α·round_pass(clip((W − γ)/α)) + γ
    with torch.no_grad():
        q.alpha.mul_(0.5)  # make some weights clip, so γ's outside-only gradient is non-zero
    wg = w.clone().requires_grad_()
    g = torch.randn(12, 40, generator=torch.Generator().manual_seed(12))
    q(wg).backward(g)
    w64 = w.double().requires_grad_()
    a64 = q.alpha.detach().double().clone().requires_grad_()
    b64 = q.shift.detach().double().clone().requires_grad_()
    s = 1.0 / math.sqrt(w.numel())
    a_eff = a64 * s + (a64 - a64 * s).detach()
    out = a_eff * _round_pass(((w64 - b64) / a_eff).clamp(-1, 1)) + b64
    (g.double() * out).sum().backward()
    np.testing.assert_allclose(wg.grad.double().numpy(), w64.grad.numpy(), rtol=1e-12)
    torch.testing.assert_close(q.alpha.grad.double(), a64.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(q.shift.grad.double(), b64.grad, rtol=0,
                               atol=1e-7 * g.abs().sum().item())
    assert q.shift.grad.abs().sum() > 0
