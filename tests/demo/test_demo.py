"""`tbt demo --quick` end to end: corpus, tokenizer, teacher, four students, table, plots."""

from __future__ import annotations

import csv
import json
import math
import os

import pytest
import torch

from tbt.demo.demo import STUDENTS, format_results, packed_size_bytes
from conftest import tbt_cli


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory):
    """One `tbt demo --quick` run, shared by the demo and ablation tests: (dir, log).

    It takes minutes (a teacher and four students), so every test that uses it is slow."""
    out = str(tmp_path_factory.mktemp("demo") / "demo")
    proc = tbt_cli("demo", "--quick", "--output-dir", out, "--no-progress")
    log = proc.communicate(timeout=1800)[0]  # ~1 min idle; far longer on a loaded machine
    assert proc.returncode == 0, log[-4000:]
    return out, log


@pytest.mark.slow
def test_demo_quick_end_to_end(quick_demo):
    out, log = quick_demo

    res = json.load(open(os.path.join(out, "results.json")))
    rows = {r["model"]: r for r in res["results"]}
    assert list(rows) == ["FP teacher"] + [sp.name for sp in STUDENTS]
    for r in rows.values():
        for k in ("rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len", "size_mb", "train_s"):
            assert math.isfinite(r[k]) and r[k] >= 0, (r["model"], k, r[k])
    size = {name: r["size_mb"] for name, r in rows.items()}
    # same bits per weight; the headers differ by a few hundred bytes (each activation
    # quantizer's own tensors and their checksums)
    same = lambda a, b: abs(size[a] - size[b]) < 0.01 * size[b]  # noqa: E731
    assert same("TBT 1-1-1", "BWN 1-1-1") and same("TBT 2-2-8", "TWN 2-2-2")
    assert size["BWN 1-1-1"] < size["TBT 2-2-8"] < size["FP teacher"] / 4
    assert "| TBT 2-2-2 | 2-2-2 |" in open(os.path.join(out, "results.md")).read()
    assert "| model | E-W-A | R-1" in log  # the table is printed
    for png in ("training_curves.png", "histograms.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    for sub in ("teacher", "tbt-2-2-8", "tbt-2-2-2", "twn-2-2-2", "tbt-1-1-1", "bwn-1-1-1"):
        assert os.path.isfile(os.path.join(out, sub, "eval", "metrics.json"))
    quant = json.load(open(os.path.join(out, "twn-2-2-2", "tbt_config.json")))
    assert (quant["method"], quant["bits"], quant["act_method"]) == ("twn", "2-2-2", "minmax")
    quant = json.load(open(os.path.join(out, "bwn-1-1-1", "tbt_config.json")))
    assert (quant["method"], quant["bits"], quant["act_method"]) == ("bwn", "1-1-1", "sign")
    teacher_log = [json.loads(x) for x in open(os.path.join(out, "teacher", "log.jsonl"))]
    assert sum("val_loss" in r for r in teacher_log) >= 3  # validated for early stopping


def test_packed_size_counts_bits_and_scales():
    from tbt.config import QuantConfig
    from tbt.quant.surgery import quantize_model

    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.LayerNorm(32))
    fp_bytes = packed_size_bytes(model)
    assert fp_bytes == 4 * (64 * 32 + 32 + 32 + 32)
    quantize_model(model, QuantConfig(bits="2-2-8"))
    # 2 bits per weight + one float32 α per output row; bias and LayerNorm in float32
    assert packed_size_bytes(model) == (64 * 32 * 2 + 32 * 32) // 8 + 4 * (32 + 32 + 32)


def test_results_table_format():
    row = dict(model="TBT 2-2-8", bits="2-2-8", rouge1=30.123, rouge2=10.0, rougeL=28.0,
               rougeLsum=28.5, gen_len=12.34, size_mb=0.5, train_s=61.2)
    table = format_results([row])
    assert table.splitlines()[2] == ("| TBT 2-2-8 | 2-2-8 | 30.12 | 10.00 | 28.00 | 28.50 | "
                                     "12.3 | 0.500 | 61 |")


@pytest.mark.parametrize("quick", [True, False])
def test_demo_presets_are_valid(quick, tmp_path):
    from tbt.demo.demo import demo_config

    dc = demo_config(quick, output_dir=str(tmp_path), seed=None)
    assert dc.seed == 0 and (dc.teacher_steps < 100) == quick


@pytest.mark.slow
def test_ablate_quick_from_demo(quick_demo, tmp_path):
    from tbt.demo.ablate import SUITES
    from tbt.demo.demo import StudentSpec

    out = str(tmp_path / "abl")
    proc = tbt_cli("ablate", "--quick", "--from-demo", quick_demo[0], "--suite", "table3-2-2-2",
                   "--output-dir", out, "--student-steps", "3", "--eval-samples", "8",
                   "--no-progress")
    log = proc.communicate(timeout=400)[0]
    assert proc.returncode == 0, log[-3000:]
    rows = list(csv.DictReader(open(os.path.join(out, "ablation.csv"))))
    assert [r["model"] for r in rows] == [sp.name for sp in SUITES["table3-2-2-2"]]
    base = float(rows[0]["rouge1"])
    for r in rows:
        assert abs(float(r["d_rouge1"]) - (float(r["rouge1"]) - base)) < 1e-9
    assert "| table3-2-2-2 | TWN 2-2-2 (baseline) | twn | minmax |" in log  # printed table
    assert json.load(open(os.path.join(out, "ablation.json")))["suites"] == ["table3-2-2-2"]
    for png in ("ablation.png", "ablation_curves.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    first = os.path.join(out, StudentSpec(rows[0]["model"], "2-2-2").slug, "tbt_config.json")
    cfg = json.load(open(first))
    assert cfg["method"] == "twn" and cfg["act_method"] == "minmax"


@pytest.mark.slow
def test_ablate_from_demo_missing_dir(tmp_path):
    proc = tbt_cli("ablate", "--from-demo", str(tmp_path / "nope"), "--output-dir",
                   str(tmp_path / "o"))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and "give the output directory of a finished" in log
