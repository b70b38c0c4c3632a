"""Sequential calibration: the cached-block path equals re-running the model; other families."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny

from tbt.ptq import EoRAConfig, PTQConfig, quantize_model_ptq
from tbt.ptq.calib import (BlockCalibrator, FullForwardCalibrator, linear_groups,
                           make_calibrator, set_weight)


def _batches(n=3, seed=0, seq2seq=False):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        ids = torch.randint(3, 128, (2, 10), generator=g)
        mask = torch.ones_like(ids)
        mask[1, 7:] = 0  # a padded row: its padding must not enter the Gram matrices
        b = {"input_ids": ids, "attention_mask": mask}
        if seq2seq:
            b["labels"] = torch.randint(3, 128, (2, 6), generator=g)
        out.append(b)
    return out


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_block_path_equals_full_forward_path(family):
    model = make_tiny(family).eval()
    batches = _batches()
    groups = linear_groups(model)
    fast = make_calibrator(model, groups, batches)
    assert isinstance(fast, BlockCalibrator)
    slow = FullForwardCalibrator(model, batches)
    n_real = sum(int(b["attention_mask"].sum()) for b in batches)
    for i, group in enumerate(groups):
        a, b = fast.grams(group), slow.grams(group)
        for name, _ in group:
            assert a[name].n_tokens == b[name].n_tokens == n_real
            torch.testing.assert_close(a[name].gram, b[name].gram, rtol=1e-6, atol=1e-8)
        for _, mod in group:  # "quantize" the block, then move on: both must see the change
            w = mod.weight if isinstance(mod, torch.nn.Linear) else mod.weight.t()
            set_weight(mod, torch.sign(w) * w.abs().mean())
        fast.advance(i)


def test_gram_is_the_sum_over_real_tokens():
    model = make_tiny("llama").eval()
    batches = _batches(n=1)
    group = linear_groups(model)[0]
    name, q = group[0]
    seen = []
    h = q.register_forward_pre_hook(lambda m, a: seen.append(a[0].detach()))
    with torch.no_grad():
        model(**batches[0])
    h.remove()
    x = seen[0][batches[0]["attention_mask"].bool()].double()  # (tokens, in)
    got = FullForwardCalibrator(model, batches).grams(group)[name]
    torch.testing.assert_close(got.gram, x.t() @ x)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["bart", "gpt2", "qwen2"])
def test_other_families_run(family):
    model = make_tiny(family).eval()
    batches = _batches(seq2seq=family == "bart")
    rep = quantize_model_ptq(model, PTQConfig(method="billm", eora=EoRAConfig(rank=2)), batches)
    assert len(rep.layers) == len(sum(linear_groups(make_tiny(family)), []))
    assert all(r["out_rel_err_eora"] <= r["out_rel_err"] + 1e-9 for r in rep.layers)
    with torch.no_grad():
        out = model(**batches[0])
    assert torch.isfinite(out.logits).all()
