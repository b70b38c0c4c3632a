"""PB-LLM QAT (tbt.quant.pbllm) against a float64 re-implementation of docs/related.md §13."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny

from tbt import QuantConfig, quantize_model
from tbt.quant.pbllm import PbllmQuantizer, pbllm_bits, salient_mask


def _make(w: torch.Tensor, frac: float) -> PbllmQuantizer:
    q = PbllmQuantizer(1, tuple(w.shape), "tensor", salient_frac=frac)
    q.init_from_(w)
    return q


def _reference(w: np.ndarray, frac: float) -> np.ndarray:
    """float64: top-frac |w| kept as per-row symmetric 8-bit RTN, the rest mean|w_B|·sign."""
    w = w.astype(np.float64)
    k = int(round(frac * w.size))
    mask = np.zeros(w.shape, bool)
    if k:
        mask = np.abs(w) >= np.sort(np.abs(w).ravel())[-k]
    step = np.abs(w).max(axis=1, keepdims=True) / 127
    q8 = np.clip(np.round(w / step), -127, 127) * step
    alpha = np.abs(w[~mask]).mean() if (~mask).any() else 0.0
    return np.where(mask, q8, np.where(w < 0, -alpha, alpha))


@pytest.mark.parametrize("frac", [0.0, 0.1, 0.3])
def test_forward_matches_float64_reference(frac):
    w = torch.randn(24, 40, generator=torch.Generator().manual_seed(0)) * 0.05
    q = _make(w, frac)
    np.testing.assert_allclose(q(w).double().numpy(), _reference(w.numpy(), frac), rtol=1e-6,
                               atol=1e-8)
    assert int(q.salient.sum()) == round(frac * w.numel())  # no ties on random weights


def test_fraction_zero_is_plain_binarization_and_scale_is_optimal():
    w = torch.randn(16, 32, generator=torch.Generator().manual_seed(1))
    q = _make(w, 0.0)
    alpha = w.abs().mean()
    torch.testing.assert_close(q(w), torch.where(w < 0, -alpha, alpha))
    # the binarized-set scale beats the all-entries mean on the binarized entries
    q = _make(w, 0.2)
    wb = w[~q.salient]
    best = wb.abs().mean()
    err = lambda a: ((wb - a * wb.sign()) ** 2).sum()  # noqa: E731
    assert err(best) < err(w.abs().mean())


def test_salient_weights_frozen_and_gradient_masked():
    torch.manual_seed(0)
    lin = torch.nn.Linear(32, 16)
    w = lin.weight
    q = _make(w.detach(), 0.25)
    before = q(w.detach()).clone()
    opt = torch.optim.AdamW([w], lr=1e-2)
    for _ in range(3):
        x = torch.randn(8, 32)
        torch.nn.functional.linear(x, q(w)).pow(2).sum().backward()
        assert (w.grad[q.salient] == 0).all() and (w.grad[~q.salient] != 0).any()
        opt.step()
        opt.zero_grad()
    after = q(w.detach())
    assert torch.equal(after[q.salient], before[q.salient])  # bit-identical (frozen)
    assert not torch.equal(after[~q.salient], before[~q.salient])  # the binary part trains


def test_storage_accounting_hand_count():
    # 4x8 matrix, 3 salient: 29 one-bit weights, 3 x (8 + log2 8 = 3) bits, 8-bit row scales
    # 4 x 32, alpha 32, CSR row pointers (4 + 1) x 32
    assert pbllm_bits((4, 8), 3) == 29 + 3 * 11 + 4 * 32 + 32 + 5 * 32
    assert salient_mask(torch.tensor([[1.0, -3.0, 2.0, 0.5]]), 0.5).tolist() == [
        [False, True, True, False]]


def test_tiny_llama_trains_and_exporter_keeps_it_fake_quantized(tmp_path):
    from tbt.export.io import save_packed
    from tbt.hf import load_pretrained

    model = make_tiny("llama")
    quantize_model(model, QuantConfig(bits="fp-1-8", method="pbllm",
                                      method_options={"salient_frac": 0.1}))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    for _ in range(5):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    with pytest.raises(ValueError, match="no 1/2-bit"):  # only unpackable layers
        save_packed(model, tmp_path / "p")
    # the frozen salient set and values travel with save_pretrained -> from_pretrained
    model.eval().save_pretrained(tmp_path / "hf")
    loaded, _ = load_pretrained(tmp_path / "hf")
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, model(input_ids=ids).logits)


def test_bad_salient_frac():
    with pytest.raises(ValueError, match=r"pbllm option salient_frac must be a number >= 0\.0 "
                                         r"and <= 1\.0"):
        QuantConfig(bits="1-1-8", method="pbllm", method_options={"salient_frac": 1.5})
    with pytest.raises(ValueError, match="salient_frac must be a number"):  # an old config key
        QuantConfig.from_dict({"bits": "1-1-8", "method": "pbllm", "salient_frac": 1.5})
    with pytest.raises(ValueError, match="one binary scale per tensor"):
        PbllmQuantizer(1, (4, 4), "row")
