"""`tbt export`: a saved fake-quantized model -> packed checkpoint with the same eval logits."""

from __future__ import annotations

import subprocess
import sys

import torch
from conftest import make_tiny


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "tbt", *args], capture_output=True, text=True,
                          timeout=300)


def test_export_round_trip(tmp_path):
    from tbt import QuantConfig, quantize_model
    from tbt.export.io import load_packed

    model = make_tiny("bart")
    quantize_model(model, QuantConfig(bits="2-2-8"))
    model.save_pretrained(tmp_path / "trained")
    proc = _cli("export", "--model", str(tmp_path / "trained"), "--output-dir",
                str(tmp_path / "packed"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    packed = load_packed(tmp_path / "packed", backend="torch").eval()
    ids = torch.randint(3, 128, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = model.eval()(input_ids=ids, decoder_input_ids=ids).logits
        got = packed(input_ids=ids, decoder_input_ids=ids).logits
    assert torch.equal(got, want)
    assert "bits per parameter" in _cli("inspect", str(tmp_path / "packed")).stdout


def test_export_rejects_an_fp_model(tmp_path):
    make_tiny("bart").save_pretrained(tmp_path / "fp")
    proc = _cli("export", "--model", str(tmp_path / "fp"), "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "is not quantized" in proc.stderr
    proc = _cli("export", "--model", str(tmp_path / "nope"), "--output-dir", str(tmp_path / "o"))
    assert proc.returncode == 2 and "no such directory" in proc.stderr
