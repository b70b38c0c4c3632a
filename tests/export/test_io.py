"""Packed export: convert_model, save_packed/load_packed round trips, tbt inspect."""

from __future__ import annotations

import copy
import json

import pytest
import torch

from tbt.export.convert import convert_model
from tbt.inference.packed import PackedEmbedding, PackedLinear
from tbt.export.format import FormatError, Packing
from tbt.export.io import (CHECKSUM_KEY, WEIGHTS_NAME, _checksum, load_packed,
                          read_packed_metadata, save_packed)
from tbt.quant.modules import QuantEmbedding, QuantLinear
from tbt.quant.surgery import quantize_model

from conftest import make_tiny


def _inputs(family: str) -> dict:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 128, (2, 9), generator=g)
    if family == "gpt2":
        return {"input_ids": ids}
    return {"input_ids": ids, "decoder_input_ids": ids[:, :5]}


def _trained(family: str, bits: str, variant: str = "paper"):
    from tbt.config import QuantConfig

    m = make_tiny(family)
    quantize_model(m, QuantConfig(bits=bits, variant=variant))
    m.train()
    with torch.no_grad():
        m(**_inputs(family))  # initialise every α from data
    return m.eval()


def _logits(m, family):
    with torch.no_grad():
        return m(**_inputs(family)).logits


def _generate(m, family):
    kw = _inputs(family)
    with torch.no_grad():
        return m.generate(input_ids=kw["input_ids"], max_new_tokens=6, min_new_tokens=6,
                          do_sample=False, num_beams=1)


@pytest.mark.parametrize(("family", "variant"), [("bart", "paper"), ("gpt2", "released")])
def test_convert_model_exact(family, variant):
    m = _trained(family, "2-2-8", variant)
    c = convert_model(copy.deepcopy(m)).eval()
    assert not any(isinstance(x, (QuantLinear, QuantEmbedding)) for x in c.modules())
    assert any(isinstance(x, PackedLinear) for x in c.modules())
    assert torch.equal(_logits(m, family), _logits(c, family))
    # the cache is rebuilt after load_state_dict
    c.load_state_dict(c.state_dict())
    assert torch.equal(_logits(m, family), _logits(c, family))


def test_tied_lm_head_stays_fp():
    m = _trained("bart", "2-2-8")
    latent = m.model.shared.weight
    c = convert_model(m)
    assert c.lm_head.weight is latent and c.lm_head.weight.dtype == torch.float32
    embs = [x for x in c.modules() if isinstance(x, PackedEmbedding)]
    assert len(embs) == 3 and all(e.packed is embs[0].packed for e in embs)


@pytest.mark.parametrize("bits", ["2-2-8", "2-2-2", "1-1-1"])
@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_round_trip(tmp_path, family, bits):
    m = _trained(family, bits)
    out = save_packed(m, tmp_path / "packed")
    assert not any(isinstance(x, (PackedLinear, PackedEmbedding)) for x in m.modules())
    loaded = load_packed(out, backend="torch")  # the exact path (native: test_native.py)
    assert torch.equal(_logits(m, family), _logits(loaded, family))
    assert torch.equal(_generate(m, family), _generate(loaded, family))

    meta = read_packed_metadata(out)
    assert meta["header"].format_version == 1
    packing = Packing.TERNARY_2BIT if bits.startswith("2") else Packing.BINARY_1BIT
    assert meta["layers"]
    for name, info in meta["layers"].items():
        n, k = info["shape"]
        assert info["packing"] == packing.value
        dtype, shape = meta["tensors"][info["packed"]]
        assert dtype == "U8" and shape == (n, -(-k // packing.codes_per_byte))
    # much smaller than the FP model
    fp_bytes = sum(p.numel() * 4 for p in m.parameters())
    packed_codes = sum(meta["tensors"][i["packed"]][1][0] * meta["tensors"][i["packed"]][1][1]
                       for i in meta["layers"].values())
    quantized_fp = sum(i["shape"][0] * i["shape"][1] * 4 for i in meta["layers"].values())
    assert packed_codes * (16 if packing is Packing.TERNARY_2BIT else 32) <= quantized_fp * 1.2
    raw = (out / WEIGHTS_NAME).read_bytes()  # the tensor data, without the JSON header (whose
    header = 8 + int.from_bytes(raw[:8], "little")  # checksums dominate a model this small)
    assert len(raw) - header < fp_bytes / 2


@pytest.mark.parametrize(("family", "bits"), [("bart", "fp-2-8"), ("gpt2", "2-2-fp")])
def test_mixed_precision(tmp_path, family, bits):
    m = _trained(family, bits)  # FP (tied) embeddings / FP activations
    c = convert_model(copy.deepcopy(m))
    assert any(isinstance(x, PackedEmbedding) for x in c.modules()) == bits.startswith("2")
    loaded = load_packed(save_packed(m, tmp_path / "ck"), backend="torch")
    assert torch.equal(_logits(m, family), _logits(loaded, family))


def test_save_refuses_occupied_and_overwrites_atomically(tmp_path):
    m = _trained("gpt2", "2-2-8")
    d = tmp_path / "ck"
    save_packed(m, d)
    before = {p.name: p.read_bytes() for p in d.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_packed(m, d)  # an occupied folder is never replaced silently
    assert {p.name: p.read_bytes() for p in d.iterdir()} == before
    (tmp_path / "file").write_text("the user's file\n")
    with pytest.raises(FileExistsError, match="is a file"):
        save_packed(m, tmp_path / "file")
    assert (tmp_path / "file").read_text() == "the user's file\n"
    save_packed(m, d, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck", "file"]  # nothing left aside
    assert torch.equal(_logits(m, "gpt2"), _logits(load_packed(d, backend="torch"), "gpt2"))


def test_bad_header_rejected(tmp_path):
    from safetensors.torch import load_file, save_file

    m = _trained("gpt2", "1-1-1")
    d = save_packed(m, tmp_path / "ck")
    meta = read_packed_metadata(d)
    from safetensors import safe_open

    with safe_open(str(d / WEIGHTS_NAME), "pt") as f:
        md = dict(f.metadata())
    md["tbt.format.format_version"] = "2"
    save_file(load_file(str(d / WEIGHTS_NAME)), str(d / WEIGHTS_NAME), metadata=md)
    with pytest.raises(FormatError, match="newer"):
        load_packed(d)
    md["tbt.format.format_version"] = "1"
    layers = meta["layers"]
    first = next(iter(layers))
    layers[first]["packing"] = "ternary_9bit"
    md["tbt.layers"] = json.dumps(layers)
    with pytest.raises(FormatError, match="checksum"):  # an edited header is caught ...
        save_file(load_file(str(d / WEIGHTS_NAME)), str(d / WEIGHTS_NAME), metadata=md)
        load_packed(d)
    md[CHECKSUM_KEY] = _checksum(md, meta["tensors"])  # ... and so is a well-formed bad one
    save_file(load_file(str(d / WEIGHTS_NAME)), str(d / WEIGHTS_NAME), metadata=md)
    with pytest.raises(FormatError, match="unknown packing"):
        load_packed(d)


def test_inspect_cli(tmp_path, capsys):
    from tbt.cli import main

    m = _trained("bart", "2-2-8")
    d = save_packed(m, tmp_path / "ck")
    assert main(["inspect", str(d)]) == 0
    out = capsys.readouterr().out
    assert "TBTPACK" in out and "ternary_2bit" in out and "bits per parameter" in out
    assert "model.encoder.layers.0.self_attn.q_proj" in out
