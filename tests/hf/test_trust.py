"""No tbt command runs code shipped in a model, packed or checkpoint folder.

* A ``config.json`` or ``tokenizer_config.json`` with an ``auto_map`` is refused with a
  one-line error by every loading path (``tbt.hf.load_pretrained``/``load_tokenizer``,
  ``load_packed``, ``tbt evaluate``, ``tbt ptq``), and transformers never asks "run the custom
  code? [y/N]": ``input`` is replaced by a recorder that would answer "y", and the folder's
  modules write a marker file when imported.
* A checkpoint's ``.pt`` files are unpickled with ``weights_only=True``: a crafted RNG state
  whose unpickling would write a marker file is refused, and the marker never appears.
"""

from __future__ import annotations

import builtins
import io
import json
import sys

import pytest
import torch
from conftest import make_tiny

pytest.importorskip("transformers")

EVIL = "open({marker!r}, 'w').write('ran')\n"


@pytest.fixture
def no_prompt(monkeypatch):
    """``input`` records its calls and says "y"; stdin is empty."""
    calls: list[str] = []

    def fake_input(prompt=""):
        calls.append(prompt)
        return "y"

    monkeypatch.setattr(builtins, "input", fake_input)
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    return calls


def _add_auto_map(d, marker, file="config.json", model_type="evil"):
    """Give folder ``d`` custom code (modules that write ``marker`` on import)."""
    cfg = json.loads((d / file).read_text()) if (d / file).exists() else {}
    if file == "config.json":
        cfg["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig",
                           "AutoModelForCausalLM": "modeling_evil.EvilModel"}
        if model_type:
            cfg["model_type"] = model_type  # unknown to transformers: it would prompt
    else:
        cfg["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (d / file).write_text(json.dumps(cfg))
    for mod in ("configuration_evil", "modeling_evil", "tokenization_evil"):
        (d / f"{mod}.py").write_text(EVIL.format(marker=str(marker)))


def _one_line(e: BaseException) -> str:
    msg = str(e)
    assert "\n" not in msg and "auto_map" in msg and "never" in msg, msg
    return msg


@pytest.fixture
def model_dir(tmp_path):
    d = tmp_path / "model"
    make_tiny("gpt2").save_pretrained(d)
    return d


@pytest.mark.parametrize("model_type", ["evil", None])
def test_load_pretrained_refuses_auto_map(model_dir, tmp_path, no_prompt, model_type):
    from tbt.hf import load_pretrained

    marker = tmp_path / "ran"
    _add_auto_map(model_dir, marker, model_type=model_type)
    with pytest.raises(ValueError) as e:
        load_pretrained(model_dir)
    _one_line(e.value)
    assert not no_prompt and not marker.exists()


def test_tokenizer_auto_map_refused(model_dir, tmp_path, no_prompt):
    from tbt.hf import load_pretrained, load_tokenizer

    marker = tmp_path / "ran"
    _add_auto_map(model_dir, marker, file="tokenizer_config.json")
    for load in (lambda: load_tokenizer(model_dir), lambda: load_pretrained(model_dir)):
        with pytest.raises(ValueError) as e:
            load()
        _one_line(e.value)
    assert not no_prompt and not marker.exists()


def test_load_packed_refuses_auto_map(tmp_path, no_prompt):
    from packed_resign import resign

    from tbt.config import QuantConfig
    from tbt.export.format import FormatError
    from tbt.export.io import load_packed, save_packed
    from tbt.quant.surgery import quantize_model

    m = make_tiny("gpt2")
    quantize_model(m, QuantConfig(bits="2-2-8"))
    d = save_packed(m.eval(), tmp_path / "packed")
    marker = tmp_path / "ran"
    for file in ("config.json", "tokenizer_config.json"):
        _add_auto_map(d, marker, file=file)
        resign(d)  # config.json's checksum matches: only the auto_map check can refuse it
        with pytest.raises(FormatError) as e:
            load_packed(d)
        _one_line(e.value)
        (d / file).write_text((d / file).read_text().replace('"auto_map"', '"no_map"'))
    assert not no_prompt and not marker.exists()


def _cli(argv, capsys):
    from tbt.cli import main

    capsys.readouterr()  # drop what the set-up printed
    rc = main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    return rc, err


def test_cli_evaluate_and_ptq_refuse_auto_map(model_dir, tmp_path, no_prompt, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil"
    make_tiny("gpt2").save_pretrained(evil)
    _add_auto_map(evil, marker)
    evil_tok = tmp_path / "evil_tok"
    evil_tok.mkdir()
    _add_auto_map(evil_tok, marker, file="tokenizer_config.json")
    data = tmp_path / "t.jsonl"
    data.write_text(json.dumps({"document": "a b", "summary": "a"}) + "\n")
    out = tmp_path / "out"
    runs = [["evaluate", "--model", evil, "--test-file", data, "--output-dir", out],
            ["evaluate", "--model", model_dir, "--tokenizer", evil_tok, "--test-file", data,
             "--output-dir", out],
            ["ptq", "--model", evil, "--method", "rtn", "--output-dir", out],
            ["ptq", "--model", model_dir, "--tokenizer", evil_tok, "--method", "rtn",
             "--output-dir", out]]
    for argv in runs:
        rc, err = _cli(argv, capsys)
        assert rc == 2, (argv, err)
        lines = [x for x in err.splitlines() if x.startswith("tbt ")]  # (no progress bars)
        assert "Traceback" not in err and len(lines) == 1 and "auto_map" in lines[0], err
        assert lines[0].startswith(f"tbt {argv[0]}: error: ")
    assert not no_prompt and not marker.exists()


class _Bomb:
    """Unpickling this runs ``exec``: it writes the marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (EVIL.format(marker=self.marker),))


def test_resume_refuses_a_pickle_bomb(tmp_path):
    from tbt.train.checkpoint import load_checkpoint, save_checkpoint

    model = make_tiny("gpt2")

    def fresh():
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        return opt, torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)

    opt, sched = fresh()
    path = save_checkpoint(str(tmp_path / "run"), 3, model, opt, sched, {"step": 3}, None, "{}")
    after_save = torch.rand(4)
    torch.rand(7)
    opt, sched = fresh()
    assert load_checkpoint(path, model, opt, sched)["step"] == 3  # the genuine files load ...
    assert torch.equal(torch.rand(4), after_save)  # ... and restore the RNG

    marker = tmp_path / "ran"
    for name in ("rng_state_0.pt", "optimizer.pt"):
        good = (tmp_path / "run" / "checkpoints").glob(f"*/{name}")
        f = next(good)
        backup = f.read_bytes()
        torch.save({"torch": torch.get_rng_state(), "python": _Bomb(marker)}, f)
        with pytest.raises(ValueError, match="refuses to unpickle") as e:
            load_checkpoint(path, model, *fresh())
        assert "\n" not in str(e.value) and name in str(e.value)
        assert not marker.exists()
        torch.load(f, weights_only=False)  # the file is a live bomb: unpickled, it runs
        assert marker.exists()
        marker.unlink()
        f.write_bytes(backup)
