"""Weight quantizers (tbt.quant.weight) against docs/numerics.md §1 / docs/related.md §1a, §2.

Three kinds of check:
* hand-worked rows with dyadic numbers (exact in float32), where every code, scale and STE mask
  is computed on paper in the comments;
* an independent float64 numpy re-implementation (`ref_quantize`, written per group with a
  Python loop) compared on random matrices for every method x bits x variant x granularity;
* statistical properties (30/40/30 % split, zero fractions from docs/related.md §0).
"""

from __future__ import annotations

import ast

import numpy as np
import pytest
import torch

from tbt.quant.weight import (
    WEIGHT_METHODS,
    check_weight_method,
    dequantize,
    quantize_weight,
    register_weight_method,
    weight_codes,
)

ALL_METHODS = ["absmean", "bwn", "tbt", "twn", "uniform"]

# (method, bits, variant): every supported point; variant only matters for tbt.
CASES = [
    ("tbt", 2, "paper"), ("tbt", 1, "paper"), ("tbt", 2, "released"), ("tbt", 1, "released"),
    ("twn", 2, "paper"), ("bwn", 1, "paper"), ("absmean", 2, "paper"),
] + [("uniform", b, "paper") for b in range(3, 9)]
CASE_IDS = [f"{m}{b}-{v}" for m, b, v in CASES]
IDENTITY_STE = [c for c in CASES if not (c[0] == "twn" or (c[0] == "tbt" and c[2] == "paper"))]


# ---- independent float64 reference (numpy, one group at a time) ------------------------------

def _ref_group(g: np.ndarray, bits: int, method: str, variant: str, clip: float,
               tensor_mean: float):
    """Quantize one group (a row, or the whole flattened tensor) in float64.

    Returns (codes, scale, grad_mask) for the group, following docs/numerics.md §1a-§1b literally.
    """
    ones = np.ones(g.shape, dtype=bool)
    if method == "tbt" and variant == "released":  # §1a
        if bits == 1:
            alpha = np.abs(g).mean()
            return np.sign(g), alpha, ones  # sign(0) = 0 kept
        alpha = 4.0 / 3.0 * np.abs(g).mean()
        if alpha == 0:
            return np.zeros_like(g), 0.0, ones
        return np.rint(np.clip(g / alpha, -1, 1)), alpha, ones
    if method == "tbt":  # §1b, Eq. 8-10
        c = g - g.mean()
        alpha = np.abs(c).mean() * (4.0 / 3.0 if bits == 2 else 1.0)
        r = c / alpha if alpha > 0 else np.zeros_like(g)
        codes = np.rint(np.clip(r, -1, 1)) if bits == 2 else np.where(r >= 0, 1.0, -1.0)
        return codes, alpha, np.abs(r) < 1
    if method == "twn":  # §1c
        gc = np.clip(g, -clip, clip)
        delta = 0.7 * np.abs(gc).mean()
        big = np.abs(gc) > delta
        alpha = np.abs(gc[big]).mean() if big.any() else 0.0
        codes = np.where(big, np.sign(gc), 0.0)
        return codes, alpha, ~((g >= clip) | (g <= -clip))
    if method == "bwn":  # §1c: per-tensor centring, scale mean|W| of the group
        return np.where(g - tensor_mean >= 0, 1.0, -1.0), np.abs(g).mean(), ones
    if method == "absmean":  # docs/related.md §1a
        gamma = np.abs(g).mean()
        return np.rint(np.clip(g / (gamma + 1e-5), -1, 1)), gamma, ones
    if method == "uniform":
        qp = 2 ** (bits - 1) - 1
        s = np.abs(g).max() / qp
        codes = np.clip(np.rint(g / s), -qp, qp) if s > 0 else np.zeros_like(g)
        return codes, s, ones
    raise AssertionError(method)


def ref_quantize(w: torch.Tensor, bits, method, variant="paper", granularity=None, clip=2.5):
    """float64 codes (out, in), scale (out, 1) or (1, 1), grad mask (out, in)."""
    x = w.detach().double().numpy()
    gran = granularity or ("tensor" if method == "absmean" else "row")
    groups = list(x) if gran == "row" else [x.reshape(-1)]
    out = [_ref_group(g, bits, method, variant, clip, x.mean()) for g in groups]
    codes = np.stack([o[0] for o in out]).reshape(x.shape)
    scale = np.array([o[1] for o in out], dtype=np.float64).reshape(-1, 1)
    mask = np.stack([o[2] for o in out]).reshape(x.shape)
    return codes, scale, mask


def _released_reference_torch(w: torch.Tensor, bits: int) -> torch.Tensor:
    """The released QuantizeLinear forward value (docs/numerics.md §1a), float32, before the STE."""
    if bits == 1:
        alpha = torch.mean(abs(w), dim=1, keepdim=True)
        return alpha * torch.sign(w / alpha)
    alpha = 4 / 3 * torch.mean(abs(w), dim=1, keepdim=True)
    return alpha * torch.round(torch.clamp(w / alpha, -1, 1))


def _rand(shape=(12, 40), seed=0, std=1.0, shift=True) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * std
    if shift:  # distinct row means, so centring matters; values beyond ±2.5 exercise TWN's clip
        w = w + torch.linspace(-0.5, 0.5, shape[0]).unsqueeze(1) * std
    return w


def _fractions(codes: torch.Tensor) -> tuple[float, float, float]:
    n = codes.numel()
    return tuple(((codes == v).sum().item() / n) for v in (-1, 0, 1))  # type: ignore[return-value]


# ---- against the float64 reference -----------------------------------------------------------

@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("method,bits,variant", CASES, ids=CASE_IDS)
def test_codes_scale_value_match_float64_reference(method, bits, variant, granularity):
    w = _rand()
    codes, scale = weight_codes(w, bits, method, variant, granularity)
    rc, rs, _ = ref_quantize(w, bits, method, variant, granularity)
    assert codes.dtype == torch.int8 and codes.shape == w.shape
    assert scale.dtype == torch.float32
    assert scale.shape == ((w.shape[0], 1) if granularity == "row" else (1, 1))
    np.testing.assert_array_equal(codes.numpy(), rc)
    np.testing.assert_allclose(scale.numpy(), rs, rtol=2e-6, atol=0)
    q = quantize_weight(w, bits, method, variant, granularity)
    np.testing.assert_allclose(q.numpy(), rc * rs, rtol=2e-6, atol=0)


@pytest.mark.parametrize("method,bits,variant", CASES, ids=CASE_IDS)
def test_default_granularity(method, bits, variant):
    w = _rand()
    default = "tensor" if method == "absmean" else "row"
    assert WEIGHT_METHODS[method].default_granularity == default
    c0, s0 = weight_codes(w, bits, method, variant)
    c1, s1 = weight_codes(w, bits, method, variant, default)
    assert torch.equal(c0, c1) and torch.equal(s0, s1)
    assert s0.shape == ((12, 1) if default == "row" else (1, 1))


@pytest.mark.parametrize("method,bits", [("twn", 2), ("bwn", 1), ("absmean", 2), ("uniform", 4)])
def test_variant_only_changes_tbt(method, bits):
    w = _rand()
    a = weight_codes(w, bits, method, "paper")
    b = weight_codes(w, bits, method, "released")
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    pa, re = weight_codes(w, 2, "tbt", "paper"), weight_codes(w, 2, "tbt", "released")
    assert not torch.equal(pa[0], re[0])  # ... whereas for tbt it does (shifted rows)


@pytest.mark.parametrize("bits", [1, 2])
def test_released_matches_reference_forward_bit_for_bit(bits):
    w = _rand(std=0.02, shift=False, shape=(64, 96))
    expected = _released_reference_torch(w, bits)
    assert torch.equal(quantize_weight(w, bits, "tbt", "released"), expected)
    assert torch.equal(quantize_weight(w.requires_grad_(), bits, "tbt", "released"), expected)


# ---- hand-worked examples --------------------------------------------------------------------
# Row W = [0.75, -0.25, 0, -1.5]; every number below is exact in float32.

W_HAND = torch.tensor([[0.75, -0.25, 0.0, -1.5]])


def test_hand_tbt_released():
    # ternary: mean|W| = 2.5/4 = 0.625, α = 4/3·0.625 = 0.8333, W/α = [0.9, -0.3, 0, -1.8]
    c, s = weight_codes(W_HAND, 2, "tbt", "released")
    assert c.tolist() == [[1, 0, 0, -1]]
    assert s.item() == pytest.approx(0.625 * 4 / 3, rel=1e-7)
    # binary: α = 0.625, sign(W) with sign(0) = 0 (the reference code's behaviour)
    c, s = weight_codes(W_HAND, 1, "tbt", "released")
    assert c.tolist() == [[1, -1, 0, -1]] and s.item() == 0.625
    assert quantize_weight(W_HAND, 1, "tbt", "released").tolist() == [[0.625, -0.625, 0.0, -0.625]]


def test_hand_tbt_paper_centres_and_does_not_add_mu_back():
    # μ = -0.25; W−μ = [1, 0, 0.25, -1.25]; mean|W−μ| = 0.625
    c, s = weight_codes(W_HAND, 1, "tbt", "paper")  # exact 0 of W−μ -> +1
    assert c.tolist() == [[1, 1, 1, -1]] and s.item() == 0.625
    assert quantize_weight(W_HAND, 1, "tbt", "paper").tolist() == [[0.625, 0.625, 0.625, -0.625]]
    # ternary α = 0.8333: (W−μ)/α = [1.2, 0, 0.3, -1.5]
    c, s = weight_codes(W_HAND, 2, "tbt", "paper")
    assert c.tolist() == [[1, 0, 0, -1]]
    assert s.item() == pytest.approx(0.625 * 4 / 3, rel=1e-7)


def test_hand_paper_ste_masks_eq10():
    # W = [1.75, 0.75, 1.5, 0]: μ = 1, W−μ = [0.75, -0.25, 0.5, -1], mean|W−μ| = 0.625
    w = torch.tensor([[1.75, 0.75, 1.5, 0.0]], requires_grad=True)
    g = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    # binary α = 0.625: r = [1.2, -0.4, 0.8, -1.6] -> mask [0, 1, 1, 0]
    assert weight_codes(w, 1, "tbt", "paper")[0].tolist() == [[1, -1, 1, -1]]
    (quantize_weight(w, 1, "tbt", "paper") * g).sum().backward()
    assert w.grad.tolist() == [[0.0, 2.0, 3.0, 0.0]]
    w.grad = None
    # ternary α = 0.8333: r = [0.9, -0.3, 0.6, -1.2] -> mask [1, 1, 1, 0]
    assert weight_codes(w, 2, "tbt", "paper")[0].tolist() == [[1, 0, 1, -1]]
    (quantize_weight(w, 2, "tbt", "paper") * g).sum().backward()
    assert w.grad.tolist() == [[1.0, 2.0, 3.0, 0.0]]


def test_hand_paper_binary_window_is_open():
    # W = c + 4, c = [0.5, -0.5, 1.5, -1.5, 1, -1]: μ = 4, α = mean|c| = 1, r = c
    w = torch.tensor([[4.5, 3.5, 5.5, 2.5, 5.0, 3.0]], requires_grad=True)
    c, s = weight_codes(w, 1, "tbt", "paper")
    assert c.tolist() == [[1, -1, 1, -1, 1, -1]] and s.item() == 1.0
    quantize_weight(w, 1, "tbt", "paper").sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 0.0, 0.0, 0.0]]  # |r| = 1 exactly: no gradient


def test_hand_twn_clip_threshold_and_grad_mask():
    # clip to ±2.5: [2.5, -0.5, 0.25, -1.25, 2.5, -2.5, -2.25, 0.5]; mean|.| = 12.25/8
    # Δ = 0.7·1.53125 = 1.0719; survivors 2.5, -1.25, 2.5, -2.5, -2.25 -> α = 11/5 = 2.2
    w = torch.tensor([[3.0, -0.5, 0.25, -1.25, 2.5, -2.5, -2.25, 0.5]], requires_grad=True)
    c, s = weight_codes(w, 2, "twn")
    assert c.tolist() == [[1, 0, 0, -1, 1, -1, -1, 0]]
    assert s.item() == pytest.approx(2.2, rel=1e-7)
    (quantize_weight(w, 2, "twn") * 3.0).sum().backward()
    # zero where W >= 2.5 or W <= -2.5 (3.0, 2.5, -2.5), else identity (also where code is 0)
    assert w.grad.tolist() == [[0.0, 3.0, 3.0, 3.0, 0.0, 0.0, 3.0, 3.0]]


def test_hand_twn_custom_clip_changes_stats():
    w = torch.tensor([[1.0, -0.125, 0.0625, 0.5]])
    # clip 0.25: [0.25, -0.125, 0.0625, 0.25], mean = 0.6875/4, Δ = 0.1203; α = 0.625/3
    c, s = weight_codes(w, 2, "twn", options={"clip": 0.25})
    assert c.tolist() == [[1, -1, 0, 1]] and s.item() == pytest.approx(0.625 / 3, rel=1e-7)
    # no clip in effect: mean = 1.6875/4, Δ = 0.2953; α = 0.75
    c, s = weight_codes(w, 2, "twn")
    assert c.tolist() == [[1, 0, 0, 1]] and s.item() == 0.75


def test_hand_bwn_per_tensor_mean_uncentred_scale():
    # tensor mean = (1.5 + 1 + 2 - 0.5)/4 = 1; sign(W - 1) with 0 -> +1; scale mean|W| (not centred)
    w = torch.tensor([[1.5, 1.0], [2.0, -0.5]])
    c, s = weight_codes(w, 1, "bwn")
    assert c.tolist() == [[1, 1], [1, -1]]
    assert s.tolist() == [[1.25], [1.25]]
    c, s = weight_codes(w, 1, "bwn", granularity="tensor")
    assert c.tolist() == [[1, 1], [1, -1]] and s.tolist() == [[1.25]]
    # the row of [1.5, 1.0] alone would centre on 1.25 and give [1, -1]: the mean is global
    assert weight_codes(w[:1], 1, "bwn")[0].tolist() == [[1, -1]]


def test_hand_absmean_eps_and_tensor_scale():
    # γ = mean|W| = 2/4 = 0.5 over the tensor; W/(γ+1e-5) = [0.99998, -0.49999, 1.99996, 0.49999]
    w = torch.tensor([[0.5, -0.25], [1.0, 0.25]])
    c, s = weight_codes(w, 2, "absmean")
    assert c.tolist() == [[1, 0], [1, 0]] and s.tolist() == [[0.5]]
    # ε matters for tiny weights: γ = 1e-6, W/(γ+ε) ≈ 0.09 -> all codes 0
    tiny = torch.full((2, 3), 1e-6)
    assert weight_codes(tiny, 2, "absmean")[0].abs().sum().item() == 0
    assert weight_codes(tiny, 2, "tbt", "released")[0].tolist() == [[1, 1, 1]] * 2  # no ε there


def test_hand_uniform_half_to_even():
    # 3-bit: Qp = 3, scale = max|W|/3 = 1; W/scale = [3, 0.5, 1.5, 2.5, -0.5, -2.5, -1.4, 0]
    w = torch.tensor([[3.0, 0.5, 1.5, 2.5, -0.5, -2.5, -1.4, 0.0]])
    c, s = weight_codes(w, 3, "uniform")
    assert c.tolist() == [[3, 0, 2, 2, 0, -2, -1, 0]] and s.item() == 1.0


def test_ternary_tie_at_half_rounds_to_zero():
    # released: mean|W| = 1.5, α = 4/3·1.5 = 2 (exact in float32), W/α = [0.5, -0.5, 1, 1]
    w = torch.tensor([[1.0, -1.0, 2.0, 2.0]])
    c, s = weight_codes(w, 2, "tbt", "released")
    assert s.item() == 2.0 and c.tolist() == [[0, 0, 1, 1]]
    # paper: W = c + 8 with c = [1, -1, 2, -2]; μ = 8, α = 2, (W−μ)/α = [0.5, -0.5, 1, -1]
    w = torch.tensor([[9.0, 7.0, 10.0, 6.0]])
    c, s = weight_codes(w, 2, "tbt", "paper")
    assert s.item() == 2.0 and c.tolist() == [[0, 0, 1, -1]]
    assert quantize_weight(w, 2, "tbt", "paper").tolist() == [[0.0, 0.0, 2.0, -2.0]]  # no +μ
    # Eq. 10's window is open: |r| = 1 exactly gets no gradient
    w.requires_grad_()
    quantize_weight(w, 2, "tbt", "paper").sum().backward()
    assert w.grad.tolist() == [[1.0, 1.0, 0.0, 0.0]]


# ---- level sets and statistics ---------------------------------------------------------------

@pytest.mark.parametrize("method,bits,variant", CASES, ids=CASE_IDS)
def test_exact_level_sets(method, bits, variant):
    w = _rand(shape=(64, 96))
    codes, scale = weight_codes(w, bits, method, variant)
    levels = set(codes.unique().tolist())
    if bits == 1:
        expected = {-1, 1}
    elif bits == 2:
        expected = {-1, 0, 1}
    else:
        qp = 2 ** (bits - 1) - 1
        assert levels <= set(range(-qp, qp + 1))
        # each row's max |W| lands exactly on ±Qp
        assert torch.equal(codes.abs().amax(dim=1), torch.full((64,), qp, dtype=torch.int8))
        return
    assert levels == expected
    q = quantize_weight(w, bits, method, variant)
    for r in (0, 17, 63):  # values of a row are exactly {-α_r, (0,) +α_r}
        a = scale[r if scale.shape[0] > 1 else 0].item()
        assert set(q[r].unique().tolist()) == {a * k for k in expected}


def test_released_binary_keeps_exact_zero_as_code_zero():
    w = _rand(shape=(4, 8))
    w[1, 3] = 0.0
    c = weight_codes(w, 1, "tbt", "released")[0]
    assert c[1, 3] == 0 and set(c.unique().tolist()) == {-1, 0, 1}
    for method, variant in (("tbt", "paper"), ("bwn", "paper")):  # centred binaries: always ±1
        w2 = w.clone()
        w2[2] = 0.5  # a constant row: centred (paper, per-row μ) it is exactly 0 -> +1
        c = weight_codes(w2, 1, method, variant)[0]
        assert set(c.unique().tolist()) <= {-1, 1}
    c = weight_codes(w2, 1, "tbt", "paper")[0]
    assert c[2].tolist() == [1] * 8


def test_ternary_split_30_40_30_gaussian():
    w = torch.randn(768, 768, generator=torch.Generator().manual_seed(0)) * 0.02
    for variant in ("released", "paper"):
        neg, zero, pos = _fractions(weight_codes(w, 2, "tbt", variant)[0])
        assert zero == pytest.approx(0.404, abs=0.004), variant  # numerics.md §1a: 29.8/40.4/29.8
        assert neg == pytest.approx(0.298, abs=0.004) and pos == pytest.approx(0.298, abs=0.004)
    # docs/related.md §0: absmean 31.0 % zeros, TWN 42.4 %
    assert _fractions(weight_codes(w, 2, "absmean")[0])[1] == pytest.approx(0.310, abs=0.004)
    assert _fractions(weight_codes(w, 2, "twn")[0])[1] == pytest.approx(0.424, abs=0.004)


def test_shifted_mean_released_unbalanced_paper_balanced():
    w = torch.randn(768, 768, generator=torch.Generator().manual_seed(1)) * 0.02 + 0.01
    neg, zero, pos = _fractions(weight_codes(w, 2, "tbt", "released")[0])
    assert (neg, zero, pos) == pytest.approx((0.13, 0.40, 0.47), abs=0.01)  # docs/numerics.md §1a
    neg, zero, pos = _fractions(weight_codes(w, 2, "tbt", "paper")[0])
    assert (neg, zero, pos) == pytest.approx((0.298, 0.404, 0.298), abs=0.005)
    neg, _, pos = _fractions(weight_codes(w, 1, "tbt", "paper")[0])
    assert neg == pytest.approx(0.5, abs=0.01)


def test_paper_mu_is_per_row_with_row_granularity():
    # row-local: quantizing a slice of rows gives that slice of the full result
    w = _rand(shape=(16, 32))
    full_c, full_s = weight_codes(w, 2, "tbt", "paper", "row")
    part_c, part_s = weight_codes(w[5:9], 2, "tbt", "paper", "row")
    assert torch.equal(full_c[5:9], part_c) and torch.equal(full_s[5:9], part_s)
    # per tensor: one μ for the whole matrix (differs from per-row on shifted rows)
    tc, _ = weight_codes(w, 2, "tbt", "paper", "tensor")
    c_tensor_mu = ref_quantize(w, 2, "tbt", "paper", "tensor")[0]
    np.testing.assert_array_equal(tc.numpy(), c_tensor_mu)
    assert not torch.equal(tc, full_c)


# ---- edge cases ------------------------------------------------------------------------------

@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("method,bits,variant", CASES, ids=CASE_IDS)
def test_all_zero_rows_give_zeros_not_nan(method, bits, variant, granularity):
    w = _rand(shape=(3, 8))
    w[1] = 0.0
    w.requires_grad_()
    codes, scale = weight_codes(w, bits, method, variant, granularity)
    q = quantize_weight(w, bits, method, variant, granularity)
    q.sum().backward()
    assert torch.isfinite(scale).all() and torch.isfinite(q).all() and torch.isfinite(w.grad).all()
    if granularity == "row":
        assert scale[1].item() == 0.0 and q[1].abs().sum().item() == 0
        # r = 0/α is taken as 0 (not NaN), so even Eq. 10's window lets the gradient through
        assert torch.equal(w.grad[1], torch.ones(8))
    zero = torch.zeros(4, 6, requires_grad=True)
    qz = quantize_weight(zero, bits, method, variant, granularity)
    qz.sum().backward()
    assert torch.equal(qz, torch.zeros(4, 6)) and torch.equal(zero.grad, torch.ones(4, 6))
    zscale = weight_codes(zero, bits, method, variant, granularity)[1]
    assert torch.equal(zscale, torch.zeros(4 if granularity == "row" else 1, 1))


def test_tiny_row_is_quantized_not_zeroed():
    # the guard is on the divisor, not a floor on the scale: a 1e-30 row still has codes
    # released ternary: mean|W| = 1.25e-30, α = 1.667e-30, W/α = [0.6, -0.6, 0, 1.8]
    w = torch.tensor([[1e-30, -1e-30, 0.0, 3e-30], [1.0, -1.0, 0.5, 0.0]])
    c, s = weight_codes(w, 2, "tbt", "released")
    assert c[0].tolist() == [1, -1, 0, 1] and s[0].item() == pytest.approx(5 / 3 * 1e-30, rel=1e-6)
    # 5-bit uniform: Qp = 15, scale = 2e-31, W/scale = [5, -5, 0, 15]
    c, s = weight_codes(w, 5, "uniform")
    assert c[0].tolist() == [5, -5, 0, 15]


# ---- autograd / STE --------------------------------------------------------------------------

@pytest.mark.parametrize("method,bits,variant", IDENTITY_STE,
                         ids=[f"{m}{b}-{v}" for m, b, v in IDENTITY_STE])
def test_identity_ste(method, bits, variant):
    w = _rand(shape=(8, 16)).requires_grad_()
    g = torch.randn(8, 16, generator=torch.Generator().manual_seed(3))
    (quantize_weight(w, bits, method, variant) * g).sum().backward()
    assert torch.equal(w.grad, g)


@pytest.mark.parametrize("granularity", ["row", "tensor"])
@pytest.mark.parametrize("bits", [1, 2])
def test_paper_ste_mask_matches_reference(bits, granularity):
    w = _rand(shape=(12, 40)).requires_grad_()
    g = torch.randn(12, 40, generator=torch.Generator().manual_seed(4))
    (quantize_weight(w, bits, "tbt", "paper", granularity) * g).sum().backward()
    mask = ref_quantize(w, bits, "tbt", "paper", granularity)[2]
    assert 0.05 < mask.mean() < 0.95  # the mask really clips something
    np.testing.assert_array_equal(w.grad.numpy(), np.where(mask, g.numpy(), 0.0))


def test_twn_ste_mask_matches_reference():
    w = (_rand(shape=(12, 40)) * 2).requires_grad_()
    (quantize_weight(w, 2, "twn") * 1.5).sum().backward()
    mask = ref_quantize(w, 2, "twn")[2]
    assert 0 < (~mask).sum() < mask.size
    np.testing.assert_array_equal(w.grad.numpy(), np.where(mask, 1.5, 0.0))


@pytest.mark.parametrize("method,bits,variant", CASES, ids=CASE_IDS)
def test_value_equals_dequantized_codes_bit_for_bit(method, bits, variant):
    w = _rand(std=0.02, shape=(32, 48))
    expected = dequantize(*weight_codes(w, bits, method, variant), torch.float32)
    assert torch.equal(quantize_weight(w, bits, method, variant), expected)
    with torch.no_grad():
        assert torch.equal(quantize_weight(w.clone().requires_grad_(), bits, method, variant),
                           expected)
    q = quantize_weight(w.clone().requires_grad_(), bits, method, variant)
    assert q.requires_grad and torch.equal(q.detach(), expected)


def test_codes_and_scale_carry_no_graph():
    w = _rand().requires_grad_()
    codes, scale = weight_codes(w, 2)
    assert not codes.requires_grad and not scale.requires_grad


# ---- dtypes ----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method,bits,variant", CASES, ids=CASE_IDS)
def test_half_precision_stats_in_float32(method, bits, variant, dtype):
    w = _rand(std=0.02, shape=(16, 64)).to(dtype).requires_grad_()
    codes, scale = weight_codes(w, bits, method, variant)
    c32, s32 = weight_codes(w.detach().float(), bits, method, variant)
    assert torch.equal(codes, c32) and torch.equal(scale, s32) and scale.dtype == torch.float32
    q = quantize_weight(w, bits, method, variant)
    assert q.dtype == dtype and q.shape == w.shape
    assert torch.equal(q, dequantize(codes, scale, dtype))
    q.float().sum().backward()
    assert w.grad.dtype == dtype


def test_dequantize():
    codes = torch.tensor([[1, 0, -1], [3, -2, 0]], dtype=torch.int8)
    scale = torch.tensor([[0.5], [0.25]])
    out = dequantize(codes, scale, torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert out.tolist() == [[0.5, 0.0, -0.5], [0.75, -0.5, 0.0]]


# ---- validation and registry -----------------------------------------------------------------

BUILTIN_METHODS = ("absmean", "bitnet-binary", "bwn", "dlt", "dlt-centred", "lsq", "pbllm",
                   "seq", "seq-int2", "tbt", "tequila", "trilm", "twn", "uniform")


def test_unknown_method_message():
    # the message lists every registered method, sorted: the core methods and those of
    # tbt.quant.weight_bitnet / weight_learned / tequila / pbllm (and any added later)
    with pytest.raises(ValueError, match=r"method='foo' is unknown; choose one of \[") as e:
        weight_codes(torch.ones(2, 2), 2, method="foo")
    listed = ast.literal_eval(str(e.value).split("choose one of ")[1])
    assert listed == sorted(listed) and set(BUILTIN_METHODS) <= set(listed)
    assert set(listed) == set(WEIGHT_METHODS)


@pytest.mark.parametrize("method,bits,fragment", [
    ("tbt", 3, r"method='tbt' supports bits in \(1, 2\) \(1 = binary, 2 = ternary\); got 3; "
               r"for 3-bit weights use one of \['lsq', 'uniform'\]"),
    # (the lists hold the other methods with those bits; a method added later may join them)
    ("twn", 1, r"supports bits in \(2,\) \(2 = ternary\); got 1; for 1-bit weights use one "
               r"of \['bitnet-binary', 'bwn', 'lsq', 'pbllm', (.*, )?'tbt'"),
    ("bwn", 2, r"got 2; .*\['absmean', 'dlt', 'dlt-centred', 'lsq', 'seq', 'seq-int2', "
               r"(.*, )?'tbt', 'tequila', 'trilm', 'twn'"),
    ("uniform", 2, r"supports bits in \(3, 4, 5, 6, 7, 8\); got 2"),
    ("absmean", 9, r"got 9; weight bits must be 1 \(binary\), 2 \(ternary\) or 3\.\.8"),
    ("tbt", True, r"got True; bits must be an int"),
])
def test_wrong_bits_messages(method, bits, fragment):
    with pytest.raises(ValueError, match=fragment):
        check_weight_method(method, bits)
    with pytest.raises(ValueError, match=fragment):
        quantize_weight(torch.ones(2, 2), bits, method=method)


def test_check_weight_method_what_and_valid():
    with pytest.raises(ValueError, match=r"supports weight bits of bits='2-3-8' in \(1, 2\)"):
        check_weight_method("tbt", 3, what="weight bits of bits='2-3-8'")
    for name, spec in WEIGHT_METHODS.items():
        for b in spec.bits:
            check_weight_method(name, b)  # no raise


@pytest.mark.parametrize("kwargs,fragment", [
    (dict(granularity="col"), r"granularity='col' is unknown; choose one of "
                              r"\['row', 'tensor', 'group', 'shard'\]"),
    (dict(variant="code"), r"variant='code' is unknown; choose one of \['paper', 'released'\]"),
    (dict(method="twn", options={"clip": 0.0}), r"twn option clip must be a number > 0"),
    (dict(method="tbt", options={"clip": 1.0}), r"method='tbt' has no option\(s\) \['clip'\]"),
])
def test_bad_arguments(kwargs, fragment):
    with pytest.raises(ValueError, match=fragment):
        weight_codes(torch.ones(2, 2), 2, **kwargs)
    with pytest.raises(ValueError, match=fragment):
        quantize_weight(torch.ones(2, 2), 2, **kwargs)


@pytest.mark.parametrize(
    "w", [torch.ones(4), torch.ones(2, 3, 4), torch.ones(2, 2, dtype=torch.int8)])
def test_bad_weight(w):
    fragment = r"must be 2-D, \(out, in\)" if w.is_floating_point() else r"floating-point"
    with pytest.raises(ValueError, match=fragment):
        weight_codes(w, 2)
    with pytest.raises(ValueError, match=fragment):
        quantize_weight(w, 2)


def test_registry_contents_and_registration():
    got = {n: (m.bits, m.default_granularity) for n, m in WEIGHT_METHODS.items()}
    core = {"tbt": ((1, 2), "row"), "twn": ((2,), "row"), "bwn": ((1,), "row"),
            "absmean": ((2,), "tensor"), "uniform": ((3, 4, 5, 6, 7, 8), "row")}
    assert {k: got[k] for k in core} == core  # the others: tests/quant/test_methods_weight.py
    with pytest.raises(ValueError, match="already registered"):
        register_weight_method("tbt", (2,), "row")(lambda *a, **k: None)
    with pytest.raises(ValueError, match="default_granularity='col'"):
        register_weight_method("x_bad", (2,), "col")
    with pytest.raises(ValueError, match=r"ints in 1\.\.8"):
        register_weight_method("x_bad", (9,), "row")

    from tbt.quant.weight import QuantizedWeight

    @register_weight_method("x_sign", bits=(1,), default_granularity="tensor")
    def _sign(w, spec, *, per_row, want_mask):
        return QuantizedWeight(torch.sign(w).to(torch.int8), w.abs().amax().reshape(1, 1), None)

    try:
        w = torch.tensor([[0.5, -2.0]])
        assert quantize_weight(w, 1, "x_sign").tolist() == [[2.0, -2.0]]
        with pytest.raises(ValueError, match="x_sign"):
            check_weight_method("nope", 1)
    finally:
        del WEIGHT_METHODS["x_sign"]
