"""The degenerate-output detector on hand-made predictions, and its place in evaluate()."""

from __future__ import annotations

import json

import pytest

from tbt.eval.evaluate import degenerate_output, warn_degenerate


def test_all_empty_is_degenerate():
    f = degenerate_output(["", " ", "\n", ""], ["un", "deux", "trois", "quatre"])
    assert f["verdict"] == "degenerate"
    assert f["empty_frac"] == 1.0 and f["mean_words"] == 0.0
    assert f["distinct_frac"] == 0.25  # all four normalise to ""
    assert any("empty" in r for r in f["reasons"])


def test_one_sentence_for_most_inputs_is_degenerate():
    preds = ["the file  manager"] * 6 + ["open", "close it", "save the file", "quit"]
    refs = [f"reference {i}" for i in range(10)]
    f = degenerate_output(preds, refs)
    assert f["verdict"] == "degenerate"
    assert f["top_prediction"] == "the file manager"  # whitespace collapsed before comparing
    assert f["top_prediction_frac"] == pytest.approx(0.6)
    assert f["distinct_frac"] == pytest.approx(5 / 10)
    assert f["empty_frac"] == 0.0
    # mean words: 6*3 + 1 + 2 + 3 + 1 = 25 over 10
    assert f["mean_words"] == pytest.approx(2.5)


def test_varied_predictions_are_ok_at_the_thresholds():
    preds = ["a b", "c", "d e f", "a b"]  # top share exactly 0.5: not more than half
    f = degenerate_output(preds, ["w", "x", "y", "z"])
    assert f["verdict"] == "ok" and f["reasons"] == []
    assert f["top_prediction_frac"] == 0.5 and f["distinct_frac"] == 0.75
    assert f["mean_words"] == pytest.approx(2.0)
    # half empty is not "most"; the mean of (0 + 0 + 2 + 2) / 4 = 1 word is not below 1
    assert degenerate_output(["", "", "x y", "z w"])["verdict"] == "ok"


def test_near_empty_mean_length_is_degenerate():
    f = degenerate_output(["", "", "x", "y"])  # 2 of 4 empty, mean 0.5 words
    assert f["empty_frac"] == 0.5 and f["mean_words"] == 0.5
    assert f["verdict"] == "degenerate" and len(f["reasons"]) == 1


def test_repeated_references_excuse_repeated_predictions():
    refs = ["Cancel"] * 7 + ["Open", "Save", "Quit"]
    preds = ["Cancel"] * 6 + ["Open", "Save", "Exit", "Quit"]
    assert degenerate_output(preds, refs)["verdict"] == "ok"  # 60% <= 70% of the references
    assert degenerate_output(preds)["verdict"] == "degenerate"  # no references to compare


def test_warning_block_on_stderr(capsys):
    warn_degenerate(degenerate_output(["x", "y"]))  # ok: nothing printed
    assert capsys.readouterr().err == ""
    warn_degenerate(degenerate_output(["", ""]))
    err = capsys.readouterr().err
    assert err.count("WARNING") == 1 and "100.0% of the predictions are empty" in err
    with pytest.raises(ValueError):
        degenerate_output([])


def test_evaluate_writes_the_finding(tmp_path, capsys, monkeypatch):
    import tbt.eval.evaluate as E

    def fake_generate(model, tok, sources, kw, bs, device, progress, msl, template=None):
        return ["le même texte"] * len(sources), [5] * len(sources)

    class M:
        def to(self, device):
            return self

    monkeypatch.setattr(E, "_generate", fake_generate)
    rows = [{"source": f"s{i}", "target": f"cible numéro {i}"} for i in range(5)]
    result = E.evaluate(M(), None, rows, metrics=("bleu",), output_dir=str(tmp_path))
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["degenerate"]["verdict"] == "degenerate"
    assert saved["degenerate"]["top_prediction_frac"] == 1.0
    assert result["degenerate"] == saved["degenerate"]
    cap = capsys.readouterr()
    assert "WARNING: degenerate output" in cap.err and "degenerate  degenerate" in cap.out
