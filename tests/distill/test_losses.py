"""Distillation losses against hand-worked values and float64 loops written from docs/recipe.md §2.

Tolerance: the losses compute in float32 from float32 inputs; the float64 references agree to
1e-6 relative (a few float32 ulps of accumulated rounding over at most a few hundred terms).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from tbt.distill.losses import attention_mse, hidden_mse, soft_cross_entropy, sum_over_layers

RTOL = 1e-6


def gen(seed):
    return torch.Generator().manual_seed(seed)


# ---- soft cross-entropy -------------------------------------------------------------------------

def ref_soft_ce(s, t, temperature=1.0, mask=None):
    """Row by row in float64: −Σ_c softmax(t/T)_c log softmax(s/T)_c, mean over valid rows."""
    s2, t2 = s.double().reshape(-1, s.shape[-1]), t.double().reshape(-1, t.shape[-1])
    keep = [True] * s2.shape[0] if mask is None else mask.reshape(-1).tolist()
    losses = []
    for row_s, row_t, k in zip(s2, t2, keep):
        if not k:
            continue
        p = [math.exp(v / temperature) for v in row_t.tolist()]
        p = [v / sum(p) for v in p]
        lse = math.log(sum(math.exp(v / temperature) for v in row_s.tolist()))
        losses.append(-sum(pc * (sc / temperature - lse) for pc, sc in zip(p, row_s.tolist())))
    return sum(losses) / len(losses)


def test_soft_ce_hand_worked_and_padded_row():
    # row 0: p = (1/2, 1/2), q = (1/4, 3/4): −½ln¼ − ½ln¾ = ½·ln(16/3)
    # row 1: p = (3/4, 1/4), q = (1/2, 1/2): ln 2
    s = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # (B=1, T=2, V=2)
    t = torch.tensor([[[0.0, 0.0], [math.log(3.0), 0.0]]])
    row0, row1 = 0.5 * math.log(16 / 3), math.log(2.0)
    both = (row0 + row1) / 2
    torch.testing.assert_close(soft_cross_entropy(s, t).item(), both, rtol=RTOL, atol=0)
    mask = torch.tensor([[True, False]])  # row 1 is padding
    torch.testing.assert_close(soft_cross_entropy(s, t, mask=mask).item(), row0, rtol=RTOL, atol=0)
    torch.testing.assert_close(soft_cross_entropy(s, t, mask=mask.long()).item(), row0,
                               rtol=RTOL, atol=0)
    assert soft_cross_entropy(s, t, mask=torch.zeros(1, 2, dtype=torch.bool)).item() == 0.0


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("masked", [False, True])
def test_soft_ce_matches_float64(temperature, masked):
    s = torch.randn(3, 5, 17, generator=gen(0)) * 3
    t = torch.randn(3, 5, 17, generator=gen(1)) * 3
    mask = torch.rand(3, 5, generator=gen(2)) < 0.6 if masked else None
    got = soft_cross_entropy(s, t, temperature, mask)
    assert got.dtype == torch.float32 and got.shape == ()
    torch.testing.assert_close(got.item(), ref_soft_ce(s, t, temperature, mask), rtol=RTOL, atol=0)
    if masked:  # the mask really changes the value
        assert abs(got.item() - ref_soft_ce(s, t, temperature)) > 1e-3


def test_soft_ce_half_inputs_computed_in_float32():
    s = torch.randn(4, 33, generator=gen(3)).to(torch.bfloat16)
    t = torch.randn(4, 33, generator=gen(4)).to(torch.float16)
    got = soft_cross_entropy(s, t)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.item(), ref_soft_ce(s.float(), t.float()), rtol=RTOL, atol=0)


def test_soft_ce_gradcheck_and_reference_gradient():
    s = torch.randn(2, 3, 5, generator=gen(5), dtype=torch.float64, requires_grad=True)
    t = torch.randn(2, 3, 5, generator=gen(6), dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.autograd.gradcheck(lambda a: soft_cross_entropy(a, t, 2.0, mask), (s,))
    soft_cross_entropy(s, t, mask=mask).backward()
    # ∂/∂s = (softmax(s) − softmax(t)) / #valid rows on valid rows, 0 on masked ones
    expect = (torch.softmax(s, -1) - torch.softmax(t, -1)).detach() * mask[..., None] / 3
    torch.testing.assert_close(s.grad, expect)


def test_soft_ce_rejects_mismatches():
    with pytest.raises(ValueError, match="shape"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 4))
    with pytest.raises(ValueError, match="mask"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), mask=torch.ones(3))
    with pytest.raises(ValueError, match="temperature"):
        soft_cross_entropy(torch.zeros(2, 3), torch.zeros(2, 3), temperature=0.0)


# ---- hidden-state MSE ---------------------------------------------------------------------------

def test_hidden_mse_hand_worked():
    s = torch.tensor([[[1.0, 2.0], [3.0, 4.0]]])  # (B=1, T=2, D=2)
    t = torch.tensor([[[0.0, 0.0], [3.0, 6.0]]])  # squared errors (1, 4), (0, 4)
    assert hidden_mse(s, t).item() == pytest.approx(9 / 4, rel=RTOL)
    assert hidden_mse(s, t, torch.tensor([[1, 0]])).item() == pytest.approx(5 / 2, rel=RTOL)
    assert hidden_mse(s, t, torch.tensor([[False, True]])).item() == pytest.approx(2.0, rel=RTOL)


def test_hidden_mse_matches_float64_and_mseloss():
    s = torch.randn(3, 6, 8, generator=gen(7))
    t = torch.randn(3, 6, 8, generator=gen(8))
    assert torch.equal(hidden_mse(s, t), nn.MSELoss()(s, t))
    mask = torch.rand(3, 6, generator=gen(9)) < 0.5
    d = (s.double() - t.double()) ** 2
    expect = sum(d[b, i].sum() for b in range(3) for i in range(6) if mask[b, i]) / (8 * mask.sum())
    got = hidden_mse(s, t, mask)
    torch.testing.assert_close(got.double(), expect, rtol=RTOL, atol=0)
    assert abs(got.item() - hidden_mse(s, t).item()) > 1e-3
    s64 = s.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: hidden_mse(a, t.double(), mask), (s64,))


# ---- attention MSE ------------------------------------------------------------------------------

def test_attention_mse_hand_worked():
    s = torch.tensor([[[[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]]]])  # (B=1, H=1, Tq=2, Tk=3)
    t = torch.tensor([[[[1.0, 0.0, 0.0], [0.0, 0.0, 1.0]]]])
    # squared errors: row 0 (.25, .09, .04), row 1 (.01, .01, .04)
    q, k = torch.tensor([[1, 0]]), torch.tensor([[1, 1, 0]])
    assert attention_mse(s, t).item() == pytest.approx(0.44 / 6, rel=RTOL)
    assert attention_mse(s, t, query_mask=q).item() == pytest.approx(0.38 / 3, rel=RTOL)
    assert attention_mse(s, t, key_mask=k).item() == pytest.approx(0.36 / 4, rel=RTOL)
    assert attention_mse(s, t, q, k).item() == pytest.approx(0.34 / 2, rel=RTOL)


def _probs(seed, shape):
    return torch.softmax(torch.randn(shape, generator=gen(seed)) * 2, dim=-1)


def test_attention_mse_matches_float64_loop():
    shape = (2, 3, 4, 5)  # (B, H, Tq, Tk)
    s, t = _probs(10, shape), _probs(11, shape)
    assert torch.equal(attention_mse(s, t), nn.MSELoss()(s, t))
    qm = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]], dtype=torch.bool)
    km = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 0, 0]], dtype=torch.bool)
    total, n = 0.0, 0
    for b in range(2):
        for h in range(3):
            for i in range(4):
                for j in range(5):
                    if qm[b, i] and km[b, j]:
                        total += (s[b, h, i, j].double() - t[b, h, i, j].double()).item() ** 2
                        n += 1
    got = attention_mse(s, t, qm, km)
    torch.testing.assert_close(got.item(), total / n, rtol=RTOL, atol=0)
    assert abs(got.item() - attention_mse(s, t).item()) > 1e-4
    s64 = s.double().requires_grad_()
    assert torch.autograd.gradcheck(lambda a: attention_mse(a, t.double(), qm, km), (s64,))


def test_attention_mse_rejects_bad_shapes():
    with pytest.raises(ValueError):
        attention_mse(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    with pytest.raises(ValueError, match="key_mask"):
        attention_mse(torch.zeros(1, 1, 2, 3), torch.zeros(1, 1, 2, 3), key_mask=torch.ones(1, 2))


# ---- layer sums ---------------------------------------------------------------------------------

def test_sum_over_layers_with_map_and_masks():
    st = [torch.randn(2, 3, 4, generator=gen(20 + i)) for i in range(2)]
    te = [torch.randn(2, 3, 4, generator=gen(30 + i)) for i in range(4)]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    got = sum_over_layers(hidden_mse, st, te, layer_map=[1, 3], mask=mask)
    expect = hidden_mse(st[0], te[1], mask) + hidden_mse(st[1], te[3], mask)
    assert torch.equal(got, expect)
    assert torch.equal(sum_over_layers(hidden_mse, st, te[:2]),
                       hidden_mse(st[0], te[0]) + hidden_mse(st[1], te[1]))
    with pytest.raises(ValueError, match="layer_map"):
        sum_over_layers(hidden_mse, st, te)
    with pytest.raises(ValueError, match="layer_map"):
        sum_over_layers(hidden_mse, st, te, layer_map=[0])
