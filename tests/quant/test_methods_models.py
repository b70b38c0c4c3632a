"""Every neighbouring method on a tiny GPT-2 and a tiny Llama: a few training steps without NaN
that move the learned quantizer tensors, and a packed round trip with the same eval logits."""

from __future__ import annotations

import pytest
import torch

from tbt.config import QuantConfig
from tbt.export.convert import convert_model
from tbt.inference.packed import PackedLinear
from tbt.export.io import load_packed, save_packed
from tbt.quant.modules import QuantLinear
from tbt.quant.surgery import quantize_model

from conftest import make_tiny

# (method, bits, extra QuantConfig fields); tiny models: d = 32, ffn 64 -> group_size 16
CASES = [
    ("lsq", "2-2-8", {}),
    ("lsq", "1-1-8", {"granularity": "tensor"}),
    ("seq", "fp-2-8", {}),
    ("dlt", "2-2-8", {"granularity": "group", "group_size": 16}),
    ("dlt", "fp-2-fp", {}),
    ("dlt-centred", "2-2-8", {"granularity": "group", "group_size": 16}),
    ("tequila", "fp-2-8", {"group_size": 16}),
    ("tequila", "2-2-8", {"granularity": "row", "method_options": {"lambda": 0.05}}),
    ("trilm", "fp-2-fp", {"num_shards": 2}),
    ("bitnet-binary", "1-1-8", {}),
    ("tbt", "2-2-8", {"act_method": "absmax-token"}),
    ("tbt", "2-2-2", {"act_method": "elastic-shift"}),
    ("tbt", "2-2-4", {"act_method": "lsq"}),
    ("absmean", "2-2-4", {"act_method": "lsq-plus"}),
]
UNPACKABLE = [("seq-int2", "fp-2-8", {}), ("lsq", "fp-4-8", {})]


def _ids():
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _train(family, method, bits, extra, steps=3):
    m = make_tiny(family)
    quantize_model(m, QuantConfig(bits=bits, method=method, **extra))
    learned = {n: p.detach().clone() for n, p in m.named_parameters()
               if ".weight_spec." in n or ".act_quant." in n or ".tbt_attn." in n}
    m.train()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)
    ids = _ids()
    for _ in range(steps):
        loss = m(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    assert all(torch.isfinite(p).all() for p in m.parameters())
    moved = [n for n, v in learned.items() if not torch.equal(v, m.get_parameter(n).detach())]
    return m.eval(), learned, moved


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("method,bits,extra", CASES, ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_train_and_packed_round_trip(family, method, bits, extra, tmp_path):
    m, learned, moved = _train(family, method, bits, extra)
    if learned:  # the quantizers' own tensors (α, γ, shifts, LSQ+ offsets) are trained
        assert moved, f"no learned quantizer tensor moved: {sorted(learned)[:3]}"
    with torch.no_grad():
        ref = m(input_ids=_ids()).logits
    save_packed(m, tmp_path / "packed")
    loaded = load_packed(tmp_path / "packed", backend="torch")
    assert any(isinstance(x, PackedLinear) for x in loaded.modules())
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, ref)


@pytest.mark.parametrize("method,bits,extra", UNPACKABLE)
def test_unpackable_methods_train_and_stay_fake_quantized(method, bits, extra):
    m, learned, moved = _train("llama", method, bits, extra, steps=2)
    assert moved
    with torch.no_grad():
        ref = m(input_ids=_ids()).logits
    with pytest.raises(ValueError, match="no 1/2-bit"):
        convert_model(m)  # nothing packable: every linear stays a QuantLinear
    assert all(isinstance(x, QuantLinear) for n, x in m.named_modules() if n.endswith("q_proj"))
    with torch.no_grad():
        assert torch.equal(m(input_ids=_ids()).logits, ref)


def test_tequila_bias_is_folded_at_export():
    m, _, _ = _train("llama", "tequila", "fp-2-fp", {"group_size": 16}, steps=1)
    ql = m.get_submodule("model.layers.0.self_attn.q_proj")
    assert ql.bias is None  # Llama has no biases; Tequila adds one at export
    c = convert_model(m)
    pl = c.get_submodule("model.layers.0.self_attn.q_proj")
    w = ql.weight
    pw = ql.weight_spec.codes_and_scale(w)
    assert pl.bias is not None and torch.equal(pl.bias, pw.bias)
    assert pl.scale.shape == (32, 2)  # per group of 16 inputs


@pytest.mark.parametrize("method,bits,extra", [
    ("lsq", "2-2-8", {}), ("dlt", "fp-2-8", {"granularity": "group", "group_size": 16}),
    ("tequila", "fp-2-8", {"group_size": 16}), ("tbt", "2-2-4", {"act_method": "lsq-plus"})])
def test_hf_save_pretrained_round_trip(method, bits, extra, tmp_path):
    # from_pretrained rebuilds the quantizers on the meta model, then loads α/γ/β from the file
    import transformers as tf

    m, _, _ = _train("llama", method, bits, extra, steps=2)
    with torch.no_grad():
        ref = m(input_ids=_ids()).logits
    m.save_pretrained(tmp_path / "hf")
    loaded = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=_ids()).logits, ref)


def test_torch_free_runtime_refuses_grouped_layers(tmp_path):
    from tbt.runtime.linear import PackedLinearNP

    m, _, _ = _train("llama", "dlt", "fp-2-8", {"granularity": "group", "group_size": 16}, 1)
    save_packed(m, tmp_path / "p")
    with pytest.raises(ValueError, match="no runtime kernel format; use load_packed"):
        PackedLinearNP.from_packed_dir(tmp_path / "p", "model.layers.0.self_attn.q_proj")


@pytest.mark.parametrize("method,bits,extra,native", [
    ("seq", "fp-2-8", {}, True), ("lsq", "2-2-8", {}, True), ("trilm", "fp-2-8", {}, True),
    ("bitnet-binary", "fp-1-8", {}, True),
    ("dlt", "fp-2-8", {"granularity": "group", "group_size": 16}, False),
    ("tequila", "fp-2-8", {"group_size": 16}, False)])
def test_native_backend_runs_per_row_methods_and_falls_back_for_groups(
        method, bits, extra, native, tmp_path):
    from tbt.runtime.kernels import native as native_lib

    if not native_lib.available():
        pytest.skip("native kernel library not built")
    m = make_tiny("llama")
    quantize_model(m, QuantConfig(bits=bits, method=method, **extra))
    m.eval()
    with torch.no_grad():
        ref = m(input_ids=_ids()).logits
    save_packed(m, tmp_path / "p")
    loaded = load_packed(tmp_path / "p", backend="native")
    backends = {x.backend for x in loaded.modules() if isinstance(x, PackedLinear)}
    assert backends == ({"native"} if native else {"torch"})
    with torch.no_grad():
        got = loaded(input_ids=_ids()).logits
    # integer accumulation is exact; only the float rescale's rounding order differs
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    if not native:
        assert torch.equal(got, ref)
