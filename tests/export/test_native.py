"""PackedLinear on the integer kernels (backend="native") vs the fake-quantized model.

Tolerances. Per layer, on the same input: the activation codes are identical (same float32
ops as the torch quantizer, the mean handed over from torch) and the kernel's integer
accumulator is exact; only the float32 rescale differs (``(acc·d + b·Σq)·α + bias`` in that
order vs a float dot product of already-scaled values), about one rounding, so we allow
``2e-6 · max|y|`` (measured ≤ 4e-7). End to end, the ~1e-7 differences reach the next layer's
quantizer, and quantized attention makes inputs on a lattice (sums of ``p̂·v̂``) where a value
can sit exactly on a .5 rounding tie: one 8-bit code then flips, which in a 32-wide toy model
moves the logits by up to ~1.5e-3 relative (measured: ≤ 3e-7 in 7 of the 9 settings below,
2.4e-5 and 1.5e-3 in the two 8-bit ones where a tie flipped). So the logits get
``1e-2 · max|logits|``, and greedy tokens (10 steps, KV cache) must be identical.

When is greedy decoding identical? When no quantizer input sits *exactly* on a decision
boundary. HF's random init has zero biases, and with binary weights *and* binary activations a
linear output is then a sum of ``±α_x·α_w``: exactly 0 in exact arithmetic when the signs
balance. The kernel returns that exact 0; torch's FMA-accumulated ``F.linear`` returns ±1e-9
residue, and the next signed binary quantizer (released variant: ``sign(x)``, no centring)
maps the residue to ±α. The fake-quantized reference is then decided by float noise, so the
tests give the models non-zero biases (as any trained model has), where tokens are identical,
and test the exact-zero behaviour of the kernel path separately.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from tbt.config import QuantConfig
from tbt.export.convert import convert_model
from tbt.inference.packed import PackedEmbedding, PackedLinear, set_backend
from tbt.export.io import load_packed, save_packed
from tbt.quant.surgery import quantize_model

from conftest import make_tiny

pytest.importorskip("transformers")


def _inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    if family == "gpt2":
        return {"input_ids": ids}
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


def _trained(family: str, bits: str, variant: str = "paper", bias_std: float = 0.02):
    m = make_tiny(family)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, bias_std, generator=torch.Generator().manual_seed(len(name)))
    quantize_model(m, QuantConfig(bits=bits, variant=variant))
    m.train()
    with torch.no_grad():
        m(**_inputs(family))  # initialise every α from data
    return m.eval()


def _logits(m, family):
    with torch.no_grad():
        return m(**_inputs(family)).logits


def _generate(m, family, **kw):
    ids = _inputs(family)["input_ids"]
    with torch.no_grad():
        return m.generate(input_ids=ids, max_new_tokens=10, min_new_tokens=10, do_sample=False,
                          use_cache=True, **kw)


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


@pytest.mark.parametrize(("family", "bits", "variant"), [
    ("bart", "2-2-8", "paper"), ("bart", "1-1-8", "paper"), ("bart", "2-2-2", "paper"),
    ("bart", "1-1-1", "paper"), ("bart", "1-1-1", "released"),
    ("gpt2", "2-2-8", "released"), ("gpt2", "1-1-8", "paper"), ("gpt2", "2-2-2", "released"),
    ("gpt2", "1-1-1", "paper"),
])
def test_native_matches_fake_quant(tmp_path, family, bits, variant):
    m = _trained(family, bits, variant)
    loaded = load_packed(save_packed(m, tmp_path / "ck"), backend="native")
    linears = [x for x in loaded.modules() if isinstance(x, PackedLinear)]
    assert linears and all(x.backend == "native" for x in linears)
    assert all(x.backend == "native" for x in loaded.modules() if isinstance(x, PackedEmbedding))
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    hooks = [mod.register_forward_hook(
        lambda mod, args, out, name=name: seen.setdefault(name, (args[0], out)) and None)
        for name, mod in loaded.named_modules() if isinstance(mod, PackedLinear)]
    got = _logits(loaded, family)
    for h in hooks:
        h.remove()
    assert len(seen) == len(linears)
    for name, (x, y) in seen.items():  # per layer: same input, torch path
        mod = loaded.get_submodule(name)
        mod.backend = "torch"
        with torch.no_grad():
            y_ref = mod(x)
        mod.backend = "native"
        assert _close(y_ref, y) < 2e-6, name
    assert _close(_logits(m, family), got) < 1e-2
    assert torch.equal(_generate(m, family), _generate(loaded, family))  # KV cache, 10 steps


@pytest.mark.parametrize("backend", ["ref", "native"])
def test_gemv_and_gemm_paths_agree(tmp_path, backend):
    """A decoding step (B·T = 1: GEMV) gives the row the full sequence (GEMM) gives."""
    if backend == "native":
        from tbt.runtime.kernels import native

        if not native.available():
            pytest.skip(native.unavailable_reason())
    m = _trained("gpt2", "2-2-8")
    loaded = load_packed(save_packed(m, tmp_path / "ck"), backend="native",
                         kernel_backend=backend)
    lin = loaded.transformer.h[0].mlp.c_fc
    x = torch.randn(1, 7, lin.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = lin(x)
        lin.backend = "torch"
        ref = lin(x)
        lin.backend = "native"
        rows = torch.cat([lin(x[:, t:t + 1]) for t in range(7)], dim=1)
    assert _close(ref, full) < 1e-6
    # one row alone has its own per-tensor scale: compare each with the torch path on that row
    with torch.no_grad():
        lin.backend = "torch"
        ref_rows = torch.cat([lin(x[:, t:t + 1]) for t in range(7)], dim=1)
    assert _close(ref_rows, rows) < 1e-6


def test_beam_search_runs(tmp_path):
    m = _trained("bart", "2-2-8")
    loaded = load_packed(save_packed(m, tmp_path / "ck"), backend="native")
    out = _generate(loaded, "bart", num_beams=3, num_return_sequences=2)
    assert out.shape[0] == 4 and out.shape[1] >= 11
    assert int(out.min()) >= 0 and int(out.max()) < 128
    assert torch.equal(out, _generate(m, "bart", num_beams=3, num_return_sequences=2))


def test_float_activations_fall_back_with_reason(tmp_path, caplog):
    m = _trained("bart", "2-2-fp")
    with caplog.at_level(logging.INFO, logger="tbt.inference.packed"):
        loaded = load_packed(save_packed(m, tmp_path / "ck"), backend="native")
    linears = [x for x in loaded.modules() if isinstance(x, PackedLinear)]
    assert linears and all(x.backend == "torch" for x in linears)
    assert "float activations" in caplog.text
    assert torch.equal(_logits(m, "bart"), _logits(loaded, "bart"))  # torch path: exact
    reasons = set_backend(loaded, "native")
    assert len(reasons) == len(linears)


def test_backend_switch_and_errors():
    m = convert_model(_trained("gpt2", "2-2-2"))
    ref = _logits(m, "gpt2")
    assert set_backend(m, "native", kernel_backend="ref") == {}
    assert _close(ref, _logits(m, "gpt2")) < 1e-3
    set_backend(m, "torch")
    assert torch.equal(ref, _logits(m, "gpt2"))
    with pytest.raises(ValueError, match="backend"):
        set_backend(m, "cuda")


def test_embedding_row_lookup_is_exact():
    m = convert_model(_trained("bart", "2-2-8"))
    emb = m.model.encoder.embed_tokens
    ids = torch.tensor([[5, 1, 127, 5], [0, 3, 3, 64]])
    full = emb(ids)
    emb.set_backend("native")
    assert torch.equal(full, emb(ids)) and emb._w_cache is None


def test_binary_exact_zero_sums():
    """Zero bias, ±1 codes: where Σ q·a = 0 the kernel path is exactly 0 (see module doc)."""
    from tbt.export.format import Packing
    from tbt.export.pack import pack
    from tbt.runtime.linear import ActSpec, PackedLinearNP

    rng = np.random.default_rng(0)
    q = rng.choice(np.array([-1, 1], np.int8), size=(64, 16))
    alpha_w = rng.uniform(0.5, 2.0, 64).astype(np.float32)
    x = rng.choice(np.array([-1.0, 1.0], np.float32), size=(8, 16)) * np.float32(0.3)
    x[:, :4] = 0.0  # exact zeros: sign(0) = 0 has no 1-bit code (the layer corrects it)
    lin = PackedLinearNP(pack(q, Packing.BINARY_1BIT), 16, alpha_w, None, "binary_1bit",
                         ActSpec("elastic", 1, True, variant="released", alpha=0.3), "ref")
    y = lin(x)
    exact = (np.sign(x).astype(np.float64) @ q.T.astype(np.float64)) * 0.3 * alpha_w
    assert (exact == 0).any()
    assert np.array_equal(y == 0, exact == 0)
    np.testing.assert_allclose(y, exact, rtol=1e-6, atol=0)
