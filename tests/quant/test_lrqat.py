"""LR-QAT on ternary/binary grids: RTN at init, exact merge, gradient routing, training."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny

from tbt.config import QuantConfig
from tbt.export.lrqat import merge_lrqat
from tbt.quant.lrqat import (
    LRQATConfig,
    LRQATLinear,
    apply_lrqat,
    grid_ratio,
    lrqat_parameters,
)
from tbt.quant.modules import QuantLinear, WeightSpec
from tbt.quant.surgery import quantize_model
from tbt.quant.weight import weight_codes

SPECS = [WeightSpec(2, "tbt", "paper"), WeightSpec(2, "tbt", "released"),
         WeightSpec(1, "tbt", "paper"), WeightSpec(2, "absmean"), WeightSpec(1, "bwn")]


def _qlinear(spec, out=24, inp=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    lin = torch.nn.Linear(inp, out)
    with torch.no_grad():
        lin.weight.copy_(torch.randn(out, inp, generator=g) * 0.05)
        lin.bias.copy_(torch.randn(out, generator=g))
    return QuantLinear.from_float(lin, spec, None)


@pytest.mark.parametrize("storage", ["int8", "bfloat16", "float32"])
@pytest.mark.parametrize("spec", SPECS, ids=lambda s: f"{s.bits}{s.method}{s.variant}")
def test_zero_update_is_round_to_nearest(spec, storage):
    ql = _qlinear(spec)
    lr = LRQATLinear.from_quant(ql, LRQATConfig(rank=4, storage=storage))
    codes, scale = weight_codes(ql.weight, spec.bits, spec.method, spec.variant)
    assert torch.equal(lr.codes(), codes)  # A = 0 at init
    with torch.no_grad():
        assert torch.equal(lr.quantized_weight(), ql.quantized_weight())
        x = torch.randn(3, 40)
        assert torch.equal(lr(x), ql(x))
    # also with the gradient path (STE) active: same value
    assert torch.equal(lr.quantized_weight().detach(), ql.quantized_weight().detach())
    assert torch.allclose(lr.scale.detach(), scale.expand(24, 1))


def test_int8_fixed_point_error_bound():
    spec = WeightSpec(2, "tbt", "released")
    ql = _qlinear(spec, 64, 96, seed=3)
    f = 6
    lr = LRQATLinear.from_quant(ql, LRQATConfig(rank=2, storage="int8", frac_bits=f))
    phi, _, codes = grid_ratio(ql.weight, spec)
    err = (lr.phi.double() / 2 ** f - phi.double()).abs()
    nudged = (torch.round(phi.double() * 2 ** f) != lr.phi.double())
    assert err[~nudged].max() <= 2.0 ** -(f + 1)
    assert err.max() <= 2.0 ** -f
    # nudges happen only next to a rounding threshold (|Φ0| within one step of 0.5)
    assert ((phi[nudged].abs() - 0.5).abs() <= 2.0 ** -f).all()


def test_gradients_match_float64_reference():
    torch.manual_seed(0)
    spec = WeightSpec(2, "tbt", "released")
    lr = LRQATLinear.from_quant(_qlinear(spec), LRQATConfig(rank=3, alpha=2.0, storage="float32"))
    with torch.no_grad():
        lr.lora_a.normal_(0, 6.0)  # make A·B matter (and leave the window)
    x, g = torch.randn(5, 40), torch.randn(5, 24)
    (lr(x) * g).sum().backward()
    # reference in float64: Z, codes, STE mask, G_W
    a, b, s = lr.lora_a.double(), lr.lora_b.double(), lr.scale.double()
    z = lr.phi.double() + (2.0 / 3) * (a.detach() @ b.detach())
    codes = z.round().clamp(-1, 1)
    mask = (z.round().abs() <= 1).double()
    gw = g.double().t() @ x.double()                       # dL/dŴ (out, in)
    gz = gw * s.detach() * mask
    assert mask.min() == 0  # some entries sit outside the window: the mask is exercised
    tol = dict(rtol=1e-5, atol=1e-5)  # the layer computes in float32, the reference in float64
    torch.testing.assert_close(lr.scale.grad.double(), (gw * codes).sum(1, keepdim=True), **tol)
    torch.testing.assert_close(lr.lora_a.grad.double(), (2.0 / 3) * gz @ b.detach().t(), **tol)
    torch.testing.assert_close(lr.lora_b.grad.double(), (2.0 / 3) * a.detach().t() @ gz, **tol)
    assert lr.bias.grad is None and not lr.phi.requires_grad


def test_checkpointing_gives_identical_gradients():
    spec = WeightSpec(1, "tbt", "paper")
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(1)  # same Kaiming B, same A, same x
        lr = LRQATLinear.from_quant(_qlinear(spec), LRQATConfig(rank=4, checkpoint=ckpt))
        with torch.no_grad():
            lr.lora_a.normal_(0, 0.3)
        x = torch.randn(4, 40, requires_grad=True)
        lr(x).pow(2).sum().backward()
        grads.append([t.grad.clone() for t in (lr.lora_a, lr.lora_b, lr.scale, x)])
    for g0, g1 in zip(*grads, strict=True):
        assert torch.equal(g0, g1)


def _load_torch(path):
    """``load_packed`` on the exact torch path (the integer-kernel path is close, not equal)."""
    import inspect

    from tbt.export.io import load_packed

    params = inspect.signature(load_packed).parameters
    return load_packed(path, **({"backend": "torch"} if "backend" in params else {}))


def _llama_lrqat(rank=4, bits="2-2-8", **kw):
    m = make_tiny("llama")
    quantize_model(m, QuantConfig(bits=bits))
    apply_lrqat(m, LRQATConfig(rank=rank, **kw))
    return m


def _batch():
    g = torch.Generator().manual_seed(5)
    return torch.randint(3, 128, (2, 12), generator=g)


def test_only_low_rank_and_scales_get_gradients():
    m = _llama_lrqat()
    ids = _batch()
    m.train()
    m(input_ids=ids, labels=ids).loss.backward()
    n_lr = sum(isinstance(x, LRQATLinear) for x in m.modules())
    assert n_lr == 14  # 7 projections x 2 layers; the head stays FP
    with_grad = {n for n, p in m.named_parameters() if p.grad is not None}
    assert with_grad and all(n.endswith(("lora_a", "lora_b", ".scale")) for n in with_grad)
    assert len(with_grad) == 3 * n_lr
    assert not any(n.endswith("proj.weight") for n, _ in m.named_parameters())
    groups = lrqat_parameters(m)
    assert len(groups["ab"]) == 2 * n_lr and len(groups["scales"]) == n_lr


@pytest.mark.parametrize("bits", ["2-2-8", "1-1-8"])
def test_merge_is_exact_and_packs(tmp_path, bits):
    from tbt.inference.packed import PackedLinear
    from tbt.export.io import save_packed

    m = _llama_lrqat(bits=bits)
    torch.manual_seed(2)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, LRQATLinear):
                mod.lora_a.normal_(0, 2.0)
                mod.scale.mul_(1.1)
                mod.scale.view(-1)[:2].neg_()  # a learned scale may cross zero: still exact
    ids = _batch()
    m.eval()
    before_codes = {n: mod.codes() for n, mod in m.named_modules() if isinstance(mod, LRQATLinear)}
    with torch.no_grad():
        ref = m(input_ids=ids).logits
    merged = merge_lrqat(copy.deepcopy(m))
    assert not any(isinstance(x, LRQATLinear) for x in merged.modules())
    assert sum(isinstance(x, PackedLinear) for x in merged.modules()) == 14
    with torch.no_grad():
        assert torch.equal(merged(input_ids=ids).logits, ref)
    # the update changed some trits (a non-trivial merge)
    rtn = make_tiny("llama")
    quantize_model(rtn, QuantConfig(bits=bits))
    n = "model.layers.0.mlp.up_proj"
    w = rtn.get_submodule(n).weight
    assert not torch.equal(before_codes[n], weight_codes(w, int(bits[2]))[0])
    save_packed(merged, tmp_path / "p")
    loaded = _load_torch(tmp_path / "p")
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, ref)


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    m = _llama_lrqat(rank=4, alpha=4.0)
    groups = lrqat_parameters(m)
    opt = torch.optim.AdamW([{"params": groups["ab"], "lr": 2e-2},
                             {"params": groups["scales"], "lr": 1e-3}], weight_decay=0.0)
    ids = _batch()
    m.train()
    losses = []
    for _ in range(12):
        loss = m(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.05


def test_config_errors():
    with pytest.raises(ValueError, match="rank"):
        LRQATConfig(rank=0)
    with pytest.raises(ValueError, match="storage"):
        LRQATConfig(rank=2, storage="fp8")
    with pytest.raises(ValueError, match="fractional"):
        LRQATConfig(rank=2, frac_bits=7)
    with pytest.raises(ValueError, match="quantize the model first"):
        apply_lrqat(make_tiny("llama"), LRQATConfig(rank=2))

