"""PTQTP (docs/related.md §12): monotone error, exact 9-way search, exact recovery of two planes."""

from __future__ import annotations

import itertools

import pytest
import torch

from tbt.ptq.ptqtp import PTQTPConfig, dequantize_planes, ptqtp, search_trits, solve_scales


def _two_planes(out=16, k=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    t1 = torch.randint(-1, 2, (out, k), generator=g).double()
    t2 = torch.randint(-1, 2, (out, k), generator=g).double()
    a1 = 0.5 + torch.rand(out, 1, generator=g, dtype=torch.float64)  # 0.5..1.5
    a2 = (0.15 + 0.1 * torch.rand(out, 1, generator=g, dtype=torch.float64)) * a1  # < a1/4
    return a1 * t1 + a2 * t2


@pytest.mark.parametrize("seed", range(5))
def test_exact_recovery_of_two_plane_weights(seed):
    w = _two_planes(seed=seed).float()
    t1, t2, alpha, hist = ptqtp(w)
    assert set(t1.unique().tolist()) <= {-1, 0, 1} and set(t2.unique().tolist()) <= {-1, 0, 1}
    assert hist[-1] < 1e-12
    torch.testing.assert_close(dequantize_planes(t1, t2, alpha), w, atol=1e-6, rtol=0)


@pytest.mark.parametrize("ridge", [0.0, 5.0])
@pytest.mark.parametrize("group", [None, 16])
def test_error_never_increases(ridge, group):
    w = torch.randn(24, 64, generator=torch.Generator().manual_seed(1))
    _, _, _, hist = ptqtp(w, PTQTPConfig(group_size=group, iters=30, tol=0.0, ridge=ridge))
    assert len(hist) > 2
    assert all(b <= a + 1e-15 for a, b in zip(hist, hist[1:]))
    assert hist[-1] < hist[0]


def test_final_error_matches_reconstruction_and_beats_one_plane():
    w = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    t1, t2, alpha, hist = ptqtp(w, PTQTPConfig(group_size=32))
    w_hat = dequantize_planes(t1, t2, alpha).double()
    rel = float((w.double() - w_hat).pow(2).sum() / w.double().pow(2).sum())
    assert rel == pytest.approx(hist[-1], rel=1e-5)
    # one plane (absmean ternary with its LS scale) is worse than two planes
    m = w.abs().mean(1, keepdim=True)
    t = (w / m).clamp(-1, 1).round()
    a = (w * t).sum(1, keepdim=True) / (t * t).sum(1, keepdim=True)
    one = float((w - a * t).pow(2).sum() / w.pow(2).sum())
    assert hist[-1] < 0.5 * one


def test_trit_search_is_the_brute_force_optimum():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(5, 7, generator=g, dtype=torch.float64)
    alpha = torch.rand(5, 2, generator=g, dtype=torch.float64)
    t1, t2 = search_trits(x, alpha)
    for i, j in itertools.product(range(5), range(7)):
        best = min((abs(x[i, j] - alpha[i, 0] * a - alpha[i, 1] * b), a, b)
                   for a in (-1, 0, 1) for b in (-1, 0, 1))
        got = abs(x[i, j] - alpha[i, 0] * t1[i, j] - alpha[i, 1] * t2[i, j])
        assert float(got) == pytest.approx(float(best[0]), abs=1e-12)


def test_scale_solve_is_least_squares_and_ridge_shrinks():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(6, 20, generator=g, dtype=torch.float64)
    t1 = torch.randint(-1, 2, (6, 20), generator=g).double()
    t2 = torch.randint(-1, 2, (6, 20), generator=g).double()
    got = solve_scales(x, t1, t2)
    for r in range(6):
        ref = torch.linalg.lstsq(torch.stack([t1[r], t2[r]], 1), x[r:r + 1].t()).solution
        torch.testing.assert_close(got[r], ref.squeeze(1))
    assert bool((solve_scales(x, t1, t2, 100.0).norm(dim=1) < got.norm(dim=1)).all())
    # a repeated plane is singular: the pseudo-inverse still gives the LS fit
    same = solve_scales(x, t1, t1)
    ls = (x * t1).sum(1) / (t1 * t1).sum(1)
    torch.testing.assert_close(same.sum(1), ls)


def test_group_size_must_divide():
    with pytest.raises(ValueError, match="multiple of group_size"):
        ptqtp(torch.randn(4, 30), PTQTPConfig(group_size=16))
