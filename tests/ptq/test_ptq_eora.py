"""EoRA (docs/related.md §15): closed form, full-rank exactness, monotone in rank, invariances."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from tbt.ptq.eora import (EoRAConfig, LowRankAdapter, adapter_from_delta, eora_factors,
                          weighted_error)


def _setup(out=12, k=10, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, k, generator=g, dtype=torch.float64)
    x = x * torch.linspace(0.2, 3, k, dtype=torch.float64)
    w = torch.randn(out, k, generator=g, dtype=torch.float64)
    wq = torch.sign(w) * w.abs().mean(1, keepdim=True)
    return x, w, wq


def test_full_rank_reconstructs_layer_output():
    x, w, wq = _setup()
    b, a = eora_factors(w - wq, x.t() @ x, rank=10)
    torch.testing.assert_close(x @ (wq + b @ a).t(), x @ w.t(), atol=1e-9, rtol=1e-9)


def test_error_falls_with_rank_and_equals_tail_singular_values():
    x, w, wq = _setup()
    c = x.t() @ x
    d = w - wq
    # independent reference: whitening by the Cholesky factor of C gives the same singular values
    lch = torch.linalg.cholesky(c)
    sv = torch.linalg.svdvals(d @ lch)
    errs = []
    for r in range(1, 11):
        b, a = eora_factors(d, c, r)
        e = float(((x @ (d - b @ a).t()) ** 2).sum())
        assert e == pytest.approx(float((sv[r:] ** 2).sum()), rel=1e-8, abs=1e-9)
        errs.append(e)
    assert all(e2 < e1 for e1, e2 in zip(errs, errs[1:-1]))
    assert errs[-1] < 1e-12 * errs[0]


def test_beats_plain_svd_identity_equals_svd_and_scale_invariant():
    x, w, wq = _setup(seed=1)
    c, d = x.t() @ x, w - wq
    for r in (1, 3, 6):
        b, a = eora_factors(d, c, r)
        u, s, vh = torch.linalg.svd(d, full_matrices=False)
        svd = (u[:, :r] * s[:r]) @ vh[:r]
        assert weighted_error(d - b @ a, c) <= weighted_error(d - svd, c) + 1e-9
        bi, ai = eora_factors(d, torch.eye(10, dtype=torch.float64), r)
        torch.testing.assert_close(bi @ ai, svd)
        b7, a7 = eora_factors(d, 7.0 * c, r)
        torch.testing.assert_close(b7 @ a7, b @ a)


def test_adapter_module_computes_base_plus_low_rank():
    x, w, wq = _setup()
    base = nn.Linear(10, 12)
    with torch.no_grad():
        base.weight.copy_(wq.float())
    f = adapter_from_delta(w - wq, x.t() @ x, EoRAConfig(rank=3, adapter_dtype="float32"))
    a, b = f["a"], f["b"]
    ad = LowRankAdapter(base, **f)
    xin = torch.randn(2, 5, 10)
    ref = base(xin) + (xin.double() @ a.double().t() @ b.double().t()).float()
    torch.testing.assert_close(ad(xin), ref, atol=1e-5, rtol=1e-5)
    # int8 storage: per-row codes and scales, within half a step per entry of the float factors
    q = adapter_from_delta(w - wq, x.t() @ x, EoRAConfig(rank=3, adapter_dtype="int8"))
    assert q["a"].dtype == torch.int8 and q["a_scale"].shape == (3, 1)
    a8, b8 = LowRankAdapter(base, **q).factors()
    assert ((a8 - a).abs() <= q["a_scale"] / 2 + 1e-7).all()
    assert ((b8 - b).abs() <= q["b_scale"] / 2 + 1e-7).all()
    with pytest.raises(ValueError, match="need their per-row scales"):
        LowRankAdapter(base, q["a"], q["b"])


def test_rank_must_be_positive():
    with pytest.raises(ValueError, match="--rank"):
        EoRAConfig(rank=0)
