"""A truncated or corrupted packed file, a wrong version or a shape mismatch: a clear FormatError.

"Clear" means: ``FormatError`` (a ``ValueError``) whose message names the problem, never a
crash, a different exception type or a model that loads and computes something else. The
hypothesis test corrupts random bytes of the safetensors header (the 8-byte length and the JSON
with the tensor index and the ``tbt.*`` metadata): every outcome must be a FormatError, or a
model whose logits equal the original's (a corruption that changes nothing, e.g. in padding).
"""

from __future__ import annotations

import json
import shutil
import struct

import pytest
import torch

from tbt.config import QuantConfig
from tbt.export.format import FormatError
from tbt.export.io import WEIGHTS_NAME, load_packed, read_packed_metadata, save_packed
from tbt.quant.surgery import quantize_model

from conftest import make_tiny
from packed_resign import read, resign

pytest.importorskip("transformers")

IDS = torch.tensor([[5, 9, 17, 3, 44, 100]])


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    m = make_tiny("gpt2")
    quantize_model(m, QuantConfig(bits="2-2-8"))
    d = save_packed(m.eval(), tmp_path_factory.mktemp("ck") / "packed")
    with torch.no_grad():
        logits = load_packed(d, backend="torch")(input_ids=IDS).logits
    return d, logits


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst, dst / WEIGHTS_NAME


def test_truncated_file(packed, tmp_path):
    d, _ = packed
    size = (d / WEIGHTS_NAME).stat().st_size
    for cut in (0, 5, 100, size // 2, size - 1):
        dst, f = _copy(d, tmp_path / f"cut{cut}")
        f.write_bytes((d / WEIGHTS_NAME).read_bytes()[:cut])
        with pytest.raises(FormatError, match="truncated or corrupted"):
            load_packed(dst)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a tbt packed checkpoint"):
        read_packed_metadata(tmp_path)


def test_config_shape_mismatch(packed, tmp_path):
    d, _ = packed
    dst, _ = _copy(d, tmp_path / "cfg")
    cfg = json.loads((dst / "config.json").read_text())
    cfg["n_inner"] = 96  # MLP width 96 instead of 4*32: the packed tensors no longer fit
    (dst / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(FormatError, match=r"config.json was changed after export"):
        load_packed(dst)
    resign(dst)  # the same edit with a recomputed checksum: the architecture check catches it
    with pytest.raises(FormatError, match="does not fit the architecture"):
        load_packed(dst)


def test_wrong_format_version_and_missing_checksum(packed, tmp_path):
    from safetensors.torch import load_file, save_file

    d, _ = packed
    for key, value, match in (("tbt.format.format_version", "7", "newer tbt"),
                              ("tbt.format.format_version", "01", "invalid"),
                              ("tbt.checksum", None, "checksum")):
        dst, f = _copy(d, tmp_path / f"v{len(match)}{value}")
        from safetensors import safe_open

        with safe_open(str(f), "pt") as fh:
            md = dict(fh.metadata())
        if value is None:
            del md[key]
        else:
            md[key] = value
        save_file(load_file(str(f)), str(f), metadata=md)
        with pytest.raises(FormatError, match=match):
            load_packed(dst)


def _header_span(raw: bytes) -> int:
    return 8 + struct.unpack("<Q", raw[:8])[0]


def test_header_corruption_property(packed, tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    d, logits = packed
    raw = (d / WEIGHTS_NAME).read_bytes()
    span = _header_span(raw)
    dst, f = _copy(d, tmp_path / "h")
    seen = {"error": 0, "same": 0}

    @hypothesis.settings(max_examples=60, deadline=None, derandomize=True)
    @hypothesis.given(st.lists(st.tuples(st.integers(0, span - 1), st.integers(0, 255)),
                               min_size=1, max_size=4))
    def check(edits):
        b = bytearray(raw)
        for pos, val in edits:
            b[pos] = val
        f.write_bytes(bytes(b))
        try:
            model = load_packed(dst, backend="torch")
        except FormatError:
            seen["error"] += 1
            return
        with torch.no_grad():
            assert torch.equal(model(input_ids=IDS).logits, logits), edits
        seen["same"] += 1

    check()
    assert seen["error"] > 0


@pytest.mark.parametrize("backend", ["torch", "native"])
def test_corrupted_code_bytes(packed, tmp_path, backend):
    """A changed code byte fails the tensor checksum at load; in a file re-signed after the
    change, an invalid ternary code (3) still fails clearly when the layer first runs."""
    from safetensors.torch import save_file

    d, _ = packed
    dst, f = _copy(d, tmp_path / backend)
    state, md = read(dst)
    name = json.loads(md["tbt.layers"])["transformer.h.0.mlp.c_fc"]["packed"]
    state[name][0, 0] = 0xFF  # four codes 3
    save_file(state, str(f), metadata=md)
    with pytest.raises(FormatError, match=f"tensor {name} does not match its checksum"):
        load_packed(dst, backend=backend, kernel_backend="ref")
    resign(dst, state, md)
    model = load_packed(dst, backend=backend, kernel_backend="ref")
    with pytest.raises(FormatError, match="code 3"), torch.no_grad():
        model(input_ids=IDS)
