"""The LM head option of save_packed: FP (default) or per-row symmetric int8."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import make_tiny

from tbt.config import QuantConfig
from tbt.export.io import WEIGHTS_NAME, load_packed, read_packed_metadata, save_packed
from tbt.export.lm_head import Int8Linear, quantize_rows_int8
from tbt.quant.surgery import quantize_model

pytest.importorskip("transformers")


def _trained(family="bart", bits="2-2-8"):
    m = make_tiny(family)
    quantize_model(m, QuantConfig(bits=bits))
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    m.train()
    with torch.no_grad():
        m(input_ids=ids, **({} if family == "gpt2" else {"decoder_input_ids": ids[:, :5]}))
    return m.eval(), ids


def test_quantize_rows_int8_hand_example():
    w = torch.tensor([[0.5, -1.27, 0.005, 0.015], [0.0, 0.0, 0.0, 0.0], [2.0, -2.0, 1.0, 0.0]])
    codes, scale = quantize_rows_int8(w)
    assert torch.allclose(scale, torch.tensor([0.01, 1.0, 2.0 / 127]))
    # 0.5/0.01 = 50, -127, 0.5 -> 0 (half to even), 1.5 -> 2 (half to even)
    assert codes[0].tolist() == [50, -127, 0, 2]
    assert codes[1].tolist() == [0, 0, 0, 0]
    assert codes[2].tolist() == [127, -127, 64, 0]  # 63.5 -> 64 (even)
    w64 = w.double()
    ref = np.clip(np.rint(w64.numpy() / scale.double().numpy()[:, None]), -127, 127)
    assert np.array_equal(codes.numpy(), ref.astype(np.int8))


@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_int8_head_round_trip(tmp_path, family):
    m, ids = _trained(family)
    kw = {} if family == "gpt2" else {"decoder_input_ids": ids[:, :5]}
    d_fp = save_packed(m, tmp_path / "fp")
    d_8 = save_packed(m, tmp_path / "int8", lm_head="int8")
    assert read_packed_metadata(d_fp)["lm_head"]["format"] == "fp"
    meta = read_packed_metadata(d_8)
    assert meta["lm_head"]["format"] == "int8" and meta["lm_head"]["name"] == "lm_head"
    head = m.get_output_embeddings().weight  # tied FP latent (128 x 32)
    saved = (d_fp / WEIGHTS_NAME).stat().st_size - (d_8 / WEIGHTS_NAME).stat().st_size
    assert saved >= head.numel() * 3 - 1024  # fp32 -> int8 (+ 4-byte scales), header noise
    assert isinstance(m.get_output_embeddings(), torch.nn.Linear)  # the input is untouched

    loaded = load_packed(d_8, backend="torch")
    assert isinstance(loaded.get_output_embeddings(), Int8Linear)
    with torch.no_grad():
        out = m(input_ids=ids, output_hidden_states=True, **kw)
        got = loaded(input_ids=ids, **kw).logits
    hidden = (out.hidden_states if family == "gpt2" else out.decoder_hidden_states)[-1]
    codes, scale = quantize_rows_int8(head)
    want = hidden.double() @ (codes.double() * scale.double()[:, None]).T  # float64 reference
    if family == "bart":
        want = want + m.final_logits_bias.double()
    assert torch.allclose(got.double(), want, rtol=1e-5, atol=1e-6)
    # int8 vs FP head: the rounding of W alone (relative error <= 1/254 per weight)
    assert float((got - out.logits).abs().max()) < 0.02 * float(out.logits.abs().max())

    native = load_packed(d_8, backend="native")
    assert native.get_output_embeddings().backend == "native"
    with torch.no_grad():
        got_native = native(input_ids=ids, **kw).logits
    # fbgemm also quantizes the head's input to 8 bits per tensor (7-bit range on x86)
    assert float((got_native - got).abs().max()) < 0.03 * float(got.abs().max())
    copy.deepcopy(native)  # caches (kernel layouts, fbgemm weights) are not copied


def test_bad_lm_head_option(tmp_path):
    m, _ = _trained("gpt2")
    with pytest.raises(ValueError, match="lm_head"):
        save_packed(m, tmp_path / "x", lm_head="int4")


def test_inspect_counts_the_head(tmp_path, capsys):
    from tbt.cli import main

    m, _ = _trained("bart")
    assert main(["inspect", str(save_packed(m, tmp_path / "a", lm_head="int8"))]) == 0
    out = capsys.readouterr().out
    assert "lm_head: int8" in out and "128x32" in out
    assert main(["inspect", str(save_packed(m, tmp_path / "b"))]) == 0
    assert "lm_head: fp" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["bart", "gpt2"])
@pytest.mark.parametrize("bits", ["2-2-8", "1-1-8"])
def test_quantized_tied_head_shares_the_embedding_codes(tmp_path, family, bits):
    """skip_modules=() quantizes the tied LM head with the embedding's quantizer: the packed
    checkpoint stores its codes once (aliases), logits match the fake-quantized model and the
    head runs on the integer kernels."""
    m = make_tiny(family)
    quantize_model(m, QuantConfig(bits=bits, skip_modules=()))
    head = m.get_output_embeddings()
    assert head.weight is m.get_input_embeddings().weight  # still tied
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(1))
    kw = {} if family == "gpt2" else {"decoder_input_ids": ids[:, :5]}
    m.train()
    with torch.no_grad():
        m(input_ids=ids, **kw)
    m.eval()
    d = save_packed(m, tmp_path / "q")
    meta = read_packed_metadata(d)
    assert meta["lm_head"] == {"name": "lm_head", "format": "packed"}
    table = meta["layers"]
    emb = m.get_input_embeddings()
    emb_name = next(n for n, mod in m.named_modules() if mod is emb)
    assert table["lm_head"]["packed"] == table[emb_name]["packed"]  # one stored copy
    d_fp = save_packed(make_fp_quant(family, bits, m), tmp_path / "fp")  # FP head, same rest
    head_bytes = head.weight.numel() * 4
    size = (d / WEIGHTS_NAME).stat().st_size
    assert (d_fp / WEIGHTS_NAME).stat().st_size - size >= head_bytes - 4096
    with pytest.raises(ValueError, match="already quantized"):
        save_packed(m, tmp_path / "x", lm_head="int8")

    with torch.no_grad():
        want = m(input_ids=ids, **kw).logits
    for backend in ("torch", "native"):
        loaded = load_packed(d, backend=backend)
        got_head = loaded.get_output_embeddings()
        assert got_head.packed is loaded.get_input_embeddings().packed  # shared after load
        assert got_head.backend == backend
        with torch.no_grad():
            got = loaded(input_ids=ids, **kw).logits
        tol = 0 if backend == "torch" else 1e-5 * float(want.abs().max())
        assert float((got - want).abs().max()) <= tol
        gen = dict(max_new_tokens=6, min_new_tokens=6, do_sample=False)
        with torch.no_grad():
            a = m.generate(input_ids=ids[:1], **gen)
            b = loaded.generate(input_ids=ids[:1], **gen)
        assert torch.equal(a, b)


def make_fp_quant(family, bits, like):
    """The same model quantized with the default FP head (latent weights copied)."""
    m = make_tiny(family)
    quantize_model(m, QuantConfig(bits=bits))
    m.load_state_dict(like.state_dict(), strict=False)
    return m.eval()
