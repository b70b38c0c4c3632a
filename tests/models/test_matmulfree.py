"""MatMul-free LM: MLGRU recurrence, gradients, training, packed export, kernels, generation."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from tbt.models.matmulfree import MatMulFreeConfig, MatMulFreeForCausalLM
from tbt.models.mlgru import mlgru_scan
from tbt.quant.bitlinear import BitLinear, bitlinear_config
from tbt.quant.surgery import quantize_model

VOCAB = 96


def _model(seed=0, quantized=True, **kw):
    torch.manual_seed(seed)
    cfg = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
               eos_token_id=2, bos_token_id=0, pad_token_id=1)
    cfg.update(kw)
    m = MatMulFreeForCausalLM(MatMulFreeConfig(**cfg))
    if quantized:
        quantize_model(m, bitlinear_config())
    return m


def _ids(b=2, t=11, seed=3):
    return torch.randint(3, VOCAB, (b, t), generator=torch.Generator().manual_seed(seed))


# ---- the recurrence --------------------------------------------------------------------------

def _step_by_step(f, i, h0):
    hs, h = [], h0
    for t in range(f.shape[1]):
        h = f[:, t] * h + i[:, t]
        hs.append(h)
    return torch.stack(hs, dim=1)


def test_scan_equals_step_by_step_reference_values_and_gradients():
    g = torch.Generator().manual_seed(0)
    f = torch.rand(3, 9, 5, generator=g, dtype=torch.float64).requires_grad_()
    i = torch.randn(3, 9, 5, generator=g, dtype=torch.float64).requires_grad_()
    h0 = torch.randn(3, 5, generator=g, dtype=torch.float64).requires_grad_()
    w = torch.randn(3, 9, 5, generator=g, dtype=torch.float64)
    got = mlgru_scan(f, i, h0)
    ref = _step_by_step(f, i, h0)
    torch.testing.assert_close(got, ref, rtol=1e-12, atol=1e-12)
    g_got = torch.autograd.grad((got * w).sum(), (f, i, h0))
    g_ref = torch.autograd.grad((ref * w).sum(), (f, i, h0))
    for a, b in zip(g_got, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_scan_gradcheck_float64():
    g = torch.Generator().manual_seed(1)
    f = torch.rand(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    i = torch.randn(2, 5, 3, generator=g, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(mlgru_scan, (f, i, h0))


def test_scan_special_cases():
    i = torch.randn(2, 6, 4)
    assert torch.equal(mlgru_scan(torch.zeros_like(i), i), i)  # f = 0: h_t = i_t
    h0 = torch.randn(2, 4)
    h = mlgru_scan(torch.ones_like(i), torch.zeros_like(i), h0)  # f = 1, i = 0: h constant
    assert torch.equal(h, h0[:, None].expand_as(h))
    with pytest.raises(ValueError, match="B, T, D"):
        mlgru_scan(torch.zeros(2, 3), torch.zeros(2, 3))


def test_mlgru_layer_gradcheck_float64():
    m = _model(quantized=False).double()
    layer, lb = m.layers[1].attn, m.layer_lower_bounds()[1].detach()
    x = torch.randn(2, 4, 32, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 32, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, h0: layer(x, lb, h0)[0], (x, h0))


def test_mlgru_layer_matches_a_float64_reference():
    """The layer's formula written out independently (docs/related.md §17, code order of the gate)."""
    m = _model(quantized=False)
    with torch.no_grad():
        m.lower_bounds.normal_()
    n, layer = 1, m.layers[1].attn
    x = torch.randn(2, 6, 32)
    got, last = layer(x, m.layer_lower_bounds()[n], None)

    def bl(mod, v):  # BitLinear: RMSNorm(eps 1e-8, gain) then linear, float64
        v = v * torch.rsqrt(v.pow(2).mean(-1, keepdim=True) + 1e-8) * mod.norm.weight.double()
        return v @ mod.proj.weight.double().t()

    xd = x.double()
    p = m.lower_bounds.double().softmax(0)
    lb = (p.cumsum(0) - p[0])[n]
    f = lb + (1 - lb) * torch.sigmoid(bl(layer.f_proj, xd))
    i = F.silu(bl(layer.i_proj, xd)) * (1 - f)
    h = _step_by_step(f, i, torch.zeros(2, 32, dtype=torch.float64))
    gproj = bl(layer.g_proj, xd)
    gn = gproj * torch.rsqrt(gproj.pow(2).mean(-1, keepdim=True) + 1e-6)
    gn = gn * layer.g_norm.weight.double()
    ref = bl(layer.o_proj, gn * F.silu(h))
    torch.testing.assert_close(got.double(), ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(last.double(), h[:, -1], rtol=1e-4, atol=1e-5)


def test_lower_bounds_start_at_zero_and_grow_with_depth():
    m = _model(quantized=False, num_hidden_layers=4)
    with torch.no_grad():
        m.lower_bounds.normal_()
    lb = m.layer_lower_bounds()
    assert torch.equal(lb[0], torch.zeros(32))
    assert (lb[1:] - lb[:-1] >= 0).all() and (lb < 1).all()


# ---- the quantized model ---------------------------------------------------------------------

def test_every_projection_is_ternary_bitlinear_including_the_head():
    from tbt.quant.act_methods import AbsmaxTokenQuantizer
    from tbt.quant.modules import QuantLinear

    m = _model()
    bls = [mod for mod in m.modules() if isinstance(mod, BitLinear)]
    assert len(bls) == 6 * 2 + 1
    for b in bls:
        assert isinstance(b.proj, QuantLinear) and b.proj.weight_spec.bits == 2
        assert isinstance(b.proj.act_quant, AbsmaxTokenQuantizer)
        w = b.proj.quantized_weight()
        gamma = b.proj.weight.abs().mean()
        assert set(torch.unique(torch.round(w / gamma)).tolist()) <= {-1.0, 0.0, 1.0}
    assert isinstance(m.lm_head.proj, QuantLinear)


def test_training_steps_lower_the_loss():
    m = _model(seed=0)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3, weight_decay=0.0)
    ids = torch.arange(3, 3 + 24).repeat(2, 1) % VOCAB  # a learnable sequence
    m.train()
    losses = []
    for _ in range(25):
        loss = m(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, map(torch.tensor, losses)))
    assert losses[-1] < 0.7 * losses[0]
    assert m.lower_bounds.grad is not None and m.lower_bounds.grad.abs().sum() > 0


def test_state_carried_equals_full_sequence():
    m = _model().eval()
    ids = _ids()
    with torch.no_grad():
        full = m(input_ids=ids)
        part = m(input_ids=ids[:, :4])
        rest = m(input_ids=ids[:, 4:], state=part.state)
    torch.testing.assert_close(torch.cat([part.logits, rest.logits], 1), full.logits,
                               rtol=1e-5, atol=1e-5)
    for a, b in zip(rest.state, full.state, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _assert_greedy_of(m, out, start, tol=1e-5):
    """Every generated token is an argmax of ``m``'s full-sequence recompute at its position.

    A ternary LM head produces exact logit ties on a random model (logits are sums of a few
    discrete values), and the incremental and full passes may break them by float noise; so a
    token counts as greedy when its recomputed logit is within ``tol`` of the maximum, and it
    must be *the* argmax wherever the top-2 gap exceeds ``tol``.
    """
    with torch.no_grad():
        full = m(input_ids=out[:, :-1]).logits[:, start - 1:].float()  # predicts out[:, start:]
    full[..., 2] = float("-inf")  # EOS was suppressed by min_new_tokens
    tok = out[:, start:]
    picked = full.gather(-1, tok[..., None])[..., 0]
    top2 = full.topk(2, dim=-1).values
    assert (picked >= top2[..., 0] - tol).all()
    clear = top2[..., 0] - top2[..., 1] > tol
    assert clear.float().mean() > 0.5  # the check is not vacuous
    assert torch.equal(tok[clear], full.argmax(-1)[clear])


def test_greedy_generation_is_incremental_and_equals_recompute():
    m = _model(seed=4).eval()
    prompt = _ids(2, 5)
    out = m.generate(prompt, max_new_tokens=12, min_new_tokens=12)
    assert out.shape == (2, 17) and torch.equal(out[:, :5], prompt)
    _assert_greedy_of(m, out, 5)
    # the prompt runs once, then exactly one token per forward (the state is carried)
    lengths = []
    hook = m.embed_tokens.register_forward_hook(
        lambda mod, args, o: lengths.append(args[0].shape[1]))
    m.generate(prompt, max_new_tokens=6, min_new_tokens=6)
    hook.remove()
    assert lengths == [5] + [1] * 5
    with pytest.raises(ValueError, match="greedy"):
        m.generate(prompt, num_beams=2)


# ---- packed export, kernels ------------------------------------------------------------------

def _load_torch(path):
    """``load_packed`` on the exact torch path (the integer-kernel path is close, not equal)."""
    import inspect

    from tbt.export.io import load_packed

    params = inspect.signature(load_packed).parameters
    return load_packed(path, **({"backend": "torch"} if "backend" in params else {}))


def _trained_and_packed(tmp_path):
    from tbt.export.io import save_packed

    m = _model(seed=2)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    ids = _ids(2, 12)
    for _ in range(3):  # move the weights and norm gains off their init
        loss = m(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    m.eval()
    save_packed(m, tmp_path / "mmf")
    return m, _load_torch(tmp_path / "mmf")


def test_packed_export_reproduces_logits_and_generation(tmp_path):
    from tbt.inference.packed import PackedLinear
    from tbt.export.io import read_packed_metadata

    m, loaded = _trained_and_packed(tmp_path)
    assert sum(isinstance(x, PackedLinear) for x in loaded.modules()) == 13
    meta = read_packed_metadata(tmp_path / "mmf")
    assert meta["layers"]["lm_head.proj"]["packing"] == "ternary_2bit"
    ids = _ids(2, 9, seed=8)
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, m(input_ids=ids).logits)
    prompt = ids[:, :3]
    assert torch.equal(loaded.generate(prompt, 8, min_new_tokens=8),
                       m.generate(prompt, 8, min_new_tokens=8))


@pytest.mark.parametrize("backend", ["ref", "auto"])
def test_t2a8_kernels_run_the_packed_model(tmp_path, backend):
    from tbt.inference.packed import PackedLinear, set_backend

    _, loaded = _trained_and_packed(tmp_path)
    ref = copy.deepcopy(loaded)
    assert set_backend(loaded, "native", backend) == {}  # every BitLinear has a kernel
    packed = [x for x in loaded.modules() if isinstance(x, PackedLinear)]
    assert len(packed) == 13 and all(x.backend == "native" for x in packed)
    assert loaded.lm_head.proj.runtime_linear().kernel.name == "t2a8"
    ids = _ids(2, 9, seed=8)
    with torch.no_grad():
        a, b = loaded(input_ids=ids).logits, ref(input_ids=ids).logits
    # integer accumulation is exact; the float epilogue rounds differently (tbt.inference.packed)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4 * b.abs().max().item())
    prompt = ids[:, :4]
    _assert_greedy_of(ref, loaded.generate(prompt, 8, min_new_tokens=8), 4, tol=1e-4)


@pytest.mark.parametrize("bits", [8, 4])
def test_kernel_accumulator_is_exact(bits):
    import numpy as np

    from tbt.export.convert import convert_model
    from tbt.inference.packed import PackedLinear, unpack_codes
    from tbt.runtime.linear import quantize_activation

    m = _model(seed=6).eval()
    convert_model(m)
    pl = m.layers[0].mlp.gate_proj.proj
    assert isinstance(pl, PackedLinear)
    pl.act_quant.bits = bits
    assert pl.set_backend("native", "ref") is None
    rt = pl.runtime_linear()
    x = np.random.default_rng(0).standard_normal((5, 32)).astype(np.float32)
    x[2] = 0.0  # an all-zero token: the 1e-5 floor of max|x|
    act = quantize_activation(x, rt.act)
    q = unpack_codes(pl.packed, pl.packing, pl.k).numpy().astype(np.int64)
    expect = act.codes.astype(np.int64) @ q.T
    assert np.array_equal(rt.kernel.accumulate(rt.weight, act), expect)
    # the numpy per-token codes are torch's: an independent float64 re-derivation of the codes
    # (ties aside, which these random inputs do not hit) and the torch quantizer's values
    qp = 2 ** (bits - 1) - 1
    s64 = qp / np.maximum(np.abs(x.astype(np.float64)).max(axis=1), 1e-5)
    codes64 = np.clip(np.rint(x * s64[:, None]), -qp - 1, qp)
    assert np.array_equal(act.codes, codes64.astype(np.int8))
    with torch.no_grad():
        xq = pl.act_quant(torch.from_numpy(x))
    torch.testing.assert_close(torch.from_numpy(act.dequantize()), xq, rtol=1e-6, atol=1e-7)


def test_config_errors():
    with pytest.raises(ValueError, match="tie_word_embeddings"):
        MatMulFreeConfig(vocab_size=8, hidden_size=8, num_hidden_layers=1, tie_word_embeddings=True)
    with pytest.raises(ValueError, match="hidden_size"):
        MatMulFreeConfig(hidden_size=0)
    assert MatMulFreeConfig(hidden_size=2048).intermediate_size == 5632  # the 1.3B width
    m = _model(quantized=False)
    with pytest.raises(ValueError, match="state"):
        m(input_ids=_ids(), state=(torch.zeros(2, 32),))
