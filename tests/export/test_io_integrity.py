"""Damaged tensor bytes, config files and scales: a FormatError from both readers, never a
wrong answer and never a raw safetensors error (docs/format.md §8, tbt.export.integrity).

The two readers are ``load_packed`` (every tensor, the whole model) and the torch-free
``PackedLinearNP.from_packed_dir`` (one layer's tensors). The properties:

* a changed byte anywhere in the tensor data, or in ``config.json`` /
  ``generation_config.json``, is a FormatError from ``load_packed`` every time; the torch-free
  reader raises for every change to the tensors it reads and to the config files, and a change
  elsewhere leaves its output bit-identical;
* a scale set to NaN, ±Inf or a negative number is a FormatError even when every checksum was
  recomputed after the edit (a crafted or re-signed file); a finite scale >= 0 in such a file
  is used as written (0: the row's output is its bias, as for an all-zero row);
* a file written before tensor checksums still loads, with a warning, and computes the same.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import struct

import numpy as np
import pytest
import torch
from conftest import make_tiny
from packed_resign import read, resign

from tbt.config import QuantConfig
from tbt.export.format import FormatError
from tbt.export.integrity import FILE_DIGESTS_KEY, TENSOR_DIGESTS_KEY
from tbt.export.io import WEIGHTS_NAME, load_packed, save_packed
from tbt.quant.surgery import quantize_model
from tbt.runtime.linear import PackedLinearNP

pytest.importorskip("transformers")
hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

IDS = torch.tensor([[5, 9, 17, 3, 44, 100]])
LAYER = "transformer.h.0.mlp.c_fc"
X = np.random.default_rng(0).standard_normal((3, 32)).astype(np.float32)


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    m = make_tiny("gpt2")
    quantize_model(m, QuantConfig(bits="2-2-8"))
    d = save_packed(m.eval(), tmp_path_factory.mktemp("ck") / "packed")
    with torch.no_grad():
        logits = load_packed(d, backend="torch")(input_ids=IDS).logits
    y = PackedLinearNP.from_packed_dir(d, LAYER, backend="ref")(X)
    return d, logits, y


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _loads_same(d, logits, y) -> str:
    """"error" (FormatError from both readers), "layer-error" (load_packed raises, the layer
    reader computes ``y`` exactly), or "same" (both compute what the clean file computes)."""
    try:
        model = load_packed(d, backend="torch")
    except FormatError:
        model = None
    try:
        got = PackedLinearNP.from_packed_dir(d, LAYER, backend="ref")(X)
    except FormatError:
        got = None
    if model is not None:
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, logits)
    if got is not None:
        np.testing.assert_array_equal(got, y)
    if model is None:
        return "error" if got is None else "layer-error"
    assert got is not None, "the layer reader refused a file that load_packed accepted"
    return "same"


def _layout(raw: bytes) -> tuple[int, dict[str, tuple[int, int]]]:
    """(start of the data section, {tensor: (begin, end) absolute byte offsets})."""
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    return 8 + n, {k: (8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                   for k, v in header.items() if k != "__metadata__"}


def _layer_tensors(d) -> set[str]:
    _, md = read(d)
    info = json.loads(md["tbt.layers"])[LAYER]
    aliases = json.loads(md["tbt.aliases"])
    names = {info["packed"], info["scale"], f"{LAYER}.bias"}
    return {aliases.get(t, t) for t in names}


def test_tensor_bytes_property(packed, tmp_path):
    d, logits, y = packed
    raw = (d / WEIGHTS_NAME).read_bytes()
    start, spans = _layout(raw)
    mine = [spans[t] for t in _layer_tensors(d)]
    dst = _copy(d, tmp_path / "t")
    f = dst / WEIGHTS_NAME
    seen = {"error": 0, "other": 0}

    @hypothesis.settings(max_examples=80, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.tuples(st.integers(start, len(raw) - 1), st.integers(0, 255)),
                               min_size=1, max_size=3))
    def check(edits):
        b = bytearray(raw)
        for pos, val in edits:
            b[pos] = val
        hypothesis.assume(b != raw)
        f.write_bytes(bytes(b))
        with pytest.raises(FormatError, match="does not match its checksum"):
            load_packed(dst, backend="torch")
        hits = any(b[lo:hi] != raw[lo:hi] for lo, hi in mine)
        if hits:
            with pytest.raises(FormatError, match="does not match its checksum"):
                PackedLinearNP.from_packed_dir(dst, LAYER, backend="ref")
            seen["error"] += 1
        else:  # another layer's bytes: this layer is not affected and not refused
            np.testing.assert_array_equal(
                PackedLinearNP.from_packed_dir(dst, LAYER, backend="ref")(X), y)
            seen["other"] += 1

    check()
    assert seen["error"] > 0 and seen["other"] > 0


@pytest.mark.parametrize("name", ["config.json", "generation_config.json"])
def test_config_file_property(packed, tmp_path, name):
    d, _, _ = packed
    raw = (d / name).read_bytes()
    dst = _copy(d, tmp_path / "c")

    @hypothesis.settings(max_examples=25, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.tuples(st.integers(0, len(raw) - 1), st.integers(0, 255)),
                               min_size=1, max_size=3), st.booleans())
    def check(edits, truncate):
        b = bytearray(raw)
        for pos, val in edits:
            b[pos] = val
        if truncate:
            b = b[:edits[0][0]]
        hypothesis.assume(b != raw)
        (dst / name).write_bytes(bytes(b))
        for load in (lambda: load_packed(dst, backend="torch"),
                     lambda: PackedLinearNP.from_packed_dir(dst, LAYER, backend="ref")):
            with pytest.raises(FormatError, match=f"{name} was changed after export"):
                load()

    check()
    (dst / name).unlink()
    with pytest.raises(FormatError, match=f"{name} is missing"):
        load_packed(dst)


def test_unexpected_generation_config(tmp_path):
    """A signed file set records which config files it had: one added later is refused."""
    m = make_tiny("gpt2")
    quantize_model(m, QuantConfig(bits="2-2-8"))
    m.generation_config = None
    d = save_packed(m.eval(), tmp_path / "p")
    assert not (d / "generation_config.json").exists()
    load_packed(d)
    (d / "generation_config.json").write_text('{"max_length": 3}')
    with pytest.raises(FormatError, match="added after export"):
        load_packed(d)


SPECIAL = [math.nan, math.inf, -math.inf, 0.0, -0.0, -1.0, -1e-38, 1e-38, 3.0]


@pytest.mark.parametrize("signed", [False, True], ids=["edited", "resigned"])
def test_scale_value_property(packed, tmp_path, signed):
    d, logits, y = packed
    state, md = read(d)
    scale_name = json.loads(md["tbt.layers"])[LAYER]["scale"]
    bias = state[f"{LAYER}.bias"].numpy()
    old = state[scale_name].clone()
    n = old.numel()
    dst = _copy(d, tmp_path / "s")
    seen = {"refused": 0, "used": 0}

    @hypothesis.settings(max_examples=40, deadline=None, derandomize=True)
    @hypothesis.given(st.integers(0, n - 1),
                      st.one_of(st.sampled_from(SPECIAL),
                                st.floats(-1e6, 1e6, width=32, allow_subnormal=True)))
    def check(row, value):
        scale = old.clone()
        scale[row] = value
        hypothesis.assume(scale[row].numpy().tobytes() != old[row].numpy().tobytes())
        state[scale_name] = scale
        if signed:
            resign(dst, state, md)
        else:  # only the bytes change: the tensor checksum catches any value
            from safetensors.torch import save_file

            save_file(state, str(dst / WEIGHTS_NAME), metadata=md)
        bad = not signed or not math.isfinite(value) or value < 0
        match = "invalid value" if signed else "does not match its checksum"
        if bad:
            for load in (lambda: load_packed(dst, backend="torch"),
                         lambda: PackedLinearNP.from_packed_dir(dst, LAYER, backend="ref")):
                with pytest.raises(FormatError, match=match):
                    load()
            seen["refused"] += 1
            return
        load_packed(dst, backend="torch")
        got = PackedLinearNP.from_packed_dir(dst, LAYER, backend="ref")(X)
        others = np.arange(n) != row
        np.testing.assert_array_equal(got[:, others], y[:, others])
        v, a = np.float64(np.float32(value)), np.float64(old[row].item())
        want = (y[:, row].astype(np.float64) - bias[row]) * (v / a) + bias[row]  # α scales acc
        np.testing.assert_allclose(got[:, row], want, rtol=1e-5, atol=1e-5 * max(1.0, v / a))
        seen["used"] += 1

    check()
    assert seen["refused"] > 0
    assert signed == (seen["used"] > 0)


def test_file_without_tensor_checksums_loads_with_a_warning(packed, tmp_path, caplog):
    d, logits, y = packed
    dst = _copy(d, tmp_path / "old")
    state, md = read(dst)
    del md[TENSOR_DIGESTS_KEY], md[FILE_DIGESTS_KEY]
    resign(dst, state, md)  # the header checksum as the previous tbt wrote it
    with caplog.at_level(logging.WARNING):
        assert _loads_same(dst, logits, y) == "same"
    assert sum("not verified" in r.getMessage() for r in caplog.records) == 2  # both readers
    again = save_packed(load_packed(dst, backend="torch"), tmp_path / "again")  # re-export ...
    assert TENSOR_DIGESTS_KEY in read(again)[1]  # ... adds the checksums, same model
    assert _loads_same(again, logits, y) == "same"
    state[next(iter(state))].view(-1)[0] += 1  # no tensor checksum: nothing catches this ...
    resign(dst, state, md)
    load_packed(dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["n_positions"] = 7  # ... but the value checks and the architecture check still run
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match="does not fit the architecture"):
        load_packed(dst)


@pytest.mark.parametrize("edit", ["drop-one", "not-hex", "extra", "files-unknown", "no-files"])
def test_malformed_digest_entries(packed, tmp_path, edit):
    d, _, _ = packed
    dst = _copy(d, tmp_path / edit)
    state, md = read(dst)
    tensors, files = json.loads(md[TENSOR_DIGESTS_KEY]), json.loads(md[FILE_DIGESTS_KEY])
    first = next(iter(tensors))
    if edit == "drop-one":
        del tensors[first]
    elif edit == "not-hex":
        tensors[first] = "z" * 64
    elif edit == "extra":
        tensors["no.such.tensor"] = tensors[first]
    elif edit == "files-unknown":
        files["modeling_evil.py"] = files["config.json"]
    md[TENSOR_DIGESTS_KEY] = json.dumps(tensors)
    md[FILE_DIGESTS_KEY] = json.dumps(files)
    if edit == "no-files":
        del md[FILE_DIGESTS_KEY]
    from safetensors.torch import save_file

    save_file(state, str(dst / WEIGHTS_NAME), metadata=md)  # header checksum off: caught
    with pytest.raises(FormatError, match="header checksum"):
        load_packed(dst)
    # re-signed: resign would recompute the digests, so sign the header only
    from tbt.export.integrity import CHECKSUM_KEY, header_checksum
    from tbt.export.io import _ST_DTYPES

    md[CHECKSUM_KEY] = header_checksum(md, {k: (_ST_DTYPES[t.dtype], tuple(t.shape))
                                            for k, t in state.items()})
    save_file(state, str(dst / WEIGHTS_NAME), metadata=md)
    for load in (lambda: load_packed(dst), lambda: PackedLinearNP.from_packed_dir(dst, LAYER)):
        with pytest.raises(FormatError, match=TENSOR_DIGESTS_KEY.replace(".", r"\.")
                           if edit in ("drop-one", "not-hex", "extra", "no-files")
                           else FILE_DIGESTS_KEY.replace(".", r"\.")):
            load()


def test_layer_reader_truncated_and_header_corruption(packed, tmp_path):
    """The torch-free reader: never a raw SafetensorError, and it verifies the header."""
    d, logits, y = packed
    raw = (d / WEIGHTS_NAME).read_bytes()
    start, _ = _layout(raw)
    dst = _copy(d, tmp_path / "h")
    f = dst / WEIGHTS_NAME
    for cut in (0, 5, 100, start - 1, start + 3, len(raw) - 1):
        f.write_bytes(raw[:cut])
        with pytest.raises(FormatError, match="truncated or corrupted"):
            PackedLinearNP.from_packed_dir(dst, LAYER)
    seen = {"error": 0, "layer-error": 0, "same": 0}

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.tuples(st.integers(0, start - 1), st.integers(0, 255)),
                               min_size=1, max_size=4))
    def check(edits):
        b = bytearray(raw)
        for pos, val in edits:
            b[pos] = val
        f.write_bytes(bytes(b))
        seen[_loads_same(dst, logits, y)] += 1

    check()
    assert seen["error"] > 0 and seen["layer-error"] == 0


@pytest.mark.parametrize("name", ["AutoModel", "pipeline", "PreTrainedModel", "__class__",
                                  "GPT2Config", "BartForConditionalGeneration", "Evil", "a.b"])
def test_model_class_must_be_a_model_class(packed, tmp_path, monkeypatch, name):
    """``tbt.model_class`` comes from the file: only a transformers model class that takes
    config.json's config is instantiated; anything else is refused before it is called."""
    import transformers

    d, logits, _ = packed
    called = []
    monkeypatch.setattr(transformers, "Evil", lambda *a, **k: called.append(a), raising=False)
    dst = _copy(d, tmp_path / "m")
    state, md = read(dst)
    md["tbt.model_class"] = name
    resign(dst, state, md)
    with pytest.raises(FormatError, match="tbt.model_class"):
        load_packed(dst)
    assert not called
    md["tbt.model_class"] = "NoSuchModelInTransformers"  # tbt's own architectures: Auto class
    resign(dst, state, md)
    with torch.no_grad():
        assert torch.equal(load_packed(dst, backend="torch")(input_ids=IDS).logits, logits)


def test_worked_digests():
    """The worked example of docs/format.md §8 ("Checksums")."""
    from tbt.export.integrity import array_digest

    scale = np.array([1.0, 0.5], np.float32)
    assert scale.tobytes().hex() == "0000803f0000003f"
    assert array_digest(scale) == \
        "b09540ff36f486fafd91acb451c6d92cc0c31ab1e9f4379a9342bc0cc88df1a6"
    assert array_digest(np.array([[0xA4]], np.uint8)) == \
        "88aa3e3b1f22c616b1817981215e7d1e75fa32b22233ebb8477f64600a5ace1f"
    import hashlib  # the same bytes through torch's view, as save_packed hashes them

    from tbt.export.io import _tensor_bytes

    assert hashlib.sha256(b"\x00\x00\x80\x3f\x00\x00\x00\x3f").hexdigest() == \
        array_digest(_tensor_bytes(torch.tensor([1.0, 0.5])))
