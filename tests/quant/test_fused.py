"""The fused C activation quantizers (tbt.quant.fused) against the torch path.

The torch path is itself held to float64 re-implementations of docs/numerics.md §4 in
test_activation.py (which, for float32 CPU inputs, now also runs through the fused kernels). Here: the forward
values and the input gradient are *identical* to the torch path (same float32 operations), the
α gradient agrees to float32 summation rounding, on single- and multi-threaded sizes,
non-contiguous inputs, every level set, both variants.
"""

from __future__ import annotations

import pytest
import torch

from tbt.quant import fused
from tbt.quant.activation import elastic_quantize, minmax_quantize

pytestmark = pytest.mark.skipif(not fused.available(), reason="fused library not built")


def _run(monkeypatch, on: bool, fn, x, *params):
    monkeypatch.setenv("TBT_FUSED_QUANT", "1" if on else "0")
    x = x.detach().clone().requires_grad_(True)
    params = [p.detach().clone().requires_grad_(True) for p in params]
    y = fn(x, *params)
    g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7))
    y.backward(g)
    return y.detach(), x.grad, [p.grad for p in params]


@pytest.mark.parametrize("bits", [1, 2, 3, 6])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("variant", ["paper", "released"])
@pytest.mark.parametrize("shape", [(7, 13), (3, 300, 300)])  # 91 elements / 270k (threads)
def test_elastic_matches_torch_path(monkeypatch, bits, signed, variant, shape):
    gen = torch.Generator().manual_seed(bits * 10 + len(shape))
    x = torch.randn(shape, generator=gen) * 0.8 + (0.0 if signed else 0.6)
    x.view(-1)[:3] = 0.0  # exact zeros (sign(0) = 0 for signed binary)
    alpha = torch.tensor(0.37)
    fn = lambda x, a: elastic_quantize(x, a, bits, signed, variant)  # noqa: E731
    y0, gx0, (ga0,) = _run(monkeypatch, False, fn, x, alpha)
    y1, gx1, (ga1,) = _run(monkeypatch, True, fn, x, alpha)
    assert torch.equal(y0, y1)
    assert torch.equal(gx0, gx1)
    torch.testing.assert_close(ga1, ga0, rtol=1e-4, atol=1e-4 * x.numel() ** 0.5)


def test_elastic_ties_and_window_edges(monkeypatch):
    # ratios exactly at ±0.5, ±1.5 (round half to even) and at the window bounds ±1
    alpha = torch.tensor(0.5)
    x = torch.tensor([0.25, -0.25, 0.75, -0.75, 0.5, -0.5, 0.5000001, 1.0, 2.0])
    fn = lambda x, a: elastic_quantize(x, a, 2, True, "released")  # noqa: E731
    y0, gx0, _ = _run(monkeypatch, False, fn, x, alpha)
    y1, gx1, _ = _run(monkeypatch, True, fn, x, alpha)
    assert y1.tolist() == [0.0, 0.0, 0.5, -0.5, 0.5, -0.5, 0.5, 0.5, 0.5]  # hand-worked
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    # r = x/α = .5 -.5 1.5 -1.5 1 -1 1.0000002 2 4: the STE window -1 <= r <= 1 is inclusive
    assert (gx1 != 0).tolist() == [True, True, False, False, True, True, False, False, False]


def test_non_contiguous_input(monkeypatch):
    x = torch.randn(64, 50).t()  # a transposed view
    alpha = torch.tensor(0.3)
    fn = lambda x, a: elastic_quantize(x, a, 2, True, "paper")  # noqa: E731
    y0, gx0, _ = _run(monkeypatch, False, fn, x, alpha)
    y1, gx1, _ = _run(monkeypatch, True, fn, x, alpha)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("shape", [(5, 9), (2, 400, 400)])
def test_minmax_matches_torch_path(monkeypatch, signed, shape):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(3)) * 1.5
    fn = lambda x: minmax_quantize(x, 8, signed, 2.5)  # noqa: E731
    y0, gx0, _ = _run(monkeypatch, False, fn, x)
    y1, gx1, _ = _run(monkeypatch, True, fn, x)
    assert torch.equal(y0, y1) and torch.equal(gx0, gx1)
    with torch.no_grad():  # eval path too
        assert torch.equal(minmax_quantize(x, 8, signed, 2.5), y1)


@pytest.mark.parametrize("signed", [True, False])
def test_minmax_scale_rounding_matches_torch(monkeypatch, signed):
    # torch computes 127 / max|x| as 127 * (1 / max|x|): a 1-ulp different scale moves codes
    # at near-ties, so compare many small tensors with varied maxima, exactly
    for seed in range(200):
        x = torch.randn(64, generator=torch.Generator().manual_seed(seed)) * (0.1 + seed / 50)
        monkeypatch.setenv("TBT_FUSED_QUANT", "0")
        want = minmax_quantize(x, 8, signed, 2.5)
        monkeypatch.setenv("TBT_FUSED_QUANT", "1")
        assert torch.equal(minmax_quantize(x, 8, signed, 2.5), want), seed


def test_all_zero_minmax_gives_zeros():
    x = torch.zeros(10, requires_grad=True)
    assert torch.equal(minmax_quantize(x, 8, True, 2.5), torch.zeros(10))


def test_other_dtypes_take_the_torch_path(monkeypatch):
    x = torch.randn(40, dtype=torch.bfloat16)
    assert not fused.enabled(x) and fused.enabled(x.float())
    monkeypatch.setenv("TBT_FUSED_QUANT", "0")
    assert not fused.enabled(x.float())
