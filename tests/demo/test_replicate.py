"""`tbt replicate`: rows, seeds, recipes, the summary against hand computations, and an end-to-end
run on a tiny corpus that is killed with SIGKILL and resumed."""

from __future__ import annotations

import json
import os
import signal
import time

import numpy as np
import pytest

from tbt.demo.replicate import (PAPER_XSUM, ROW_BY_KEY, ROWS, ReplicateConfig, format_table,
                                 parse_seeds, parse_students, replicate_config, summarize)


def test_paper_gaps_are_the_papers():
    fp = PAPER_XSUM["fp"][0]
    gaps = {k: round(PAPER_XSUM[f"tbt-{k}"][0] - fp, 1)
            for k in ("2-2-8", "1-1-8", "2-2-2", "1-1-1")}
    assert gaps == {"2-2-8": -1.4, "1-1-8": -2.9, "2-2-2": -7.6, "1-1-1": -12.2}
    assert PAPER_XSUM["twn-2-2-2"][0] == 12.8 and PAPER_XSUM["bwn-1-1-1"][0] == 1.9


def test_students_and_seeds_parse():
    default = parse_students(None)
    assert default[0] == "fp-control" and "tbt-released-1-1-1" in default
    assert {"twn-2-2-8", "twn-2-2-2", "bwn-1-1-8", "bwn-1-1-1", "t3-learned-act",
            "t3-stats-weight"} <= set(default)
    assert parse_students("bwn-1-1-1,tbt-2-2-2") == ("fp-control", "tbt-2-2-2", "bwn-1-1-1")
    with pytest.raises(ValueError, match="unknown student 'tbt-3-3-3'"):
        parse_students("tbt-3-3-3")
    assert parse_seeds("3") == (0, 1, 2) and parse_seeds("4,9") == (4, 9)
    assert parse_seeds("7,") == (7,)
    for bad in ("0", "1,1", "x"):
        with pytest.raises(ValueError):
            parse_seeds(bad)


def test_rows_that_are_one_run_share_it():
    from tbt.config import QuantConfig
    from tbt.demo.replicate import _run_key

    assert _run_key(ROW_BY_KEY["t3-minmax"]) == "twn-2-2-2"  # Table 3's first row = TWN 2-2-2
    assert _run_key(ROW_BY_KEY["t3-both"]) == "tbt-2-2-2"  # and its last = TBT 2-2-2
    assert _run_key(ROW_BY_KEY["t3b-both"]) == "tbt-1-1-1"
    assert _run_key(ROW_BY_KEY["tbt-released-2-2-2"]) == "tbt-released-2-2-2"
    for r in ROWS:
        if r.bits != "fp":  # every row is a valid quantization
            q = QuantConfig(bits=r.bits, method=r.method, act_method=r.act_method,
                            variant=r.variant)
            assert (q.resolved_act_method, q.method) == (r.run_id[2], r.run_id[1])


def test_recipe_fills_in_the_papers_runs():
    from tbt.train.config import TrainConfig
    from tbt.demo.replicate import _recipe_train_settings, _student_lr, _train_flat

    rc = replicate_config(recipe="xsum", student_steps=100, output_dir="o")
    assert rc.teacher == "Aktsvigun/bart-base_xsum_42" and rc.dataset == "xsum"
    assert rc.generation == "xsum" and rc.max_source_length == 1024
    assert [_student_lr(rc, b) for b in ("2-2-8", "2-2-2", "1-1-8", "1-1-1")] == \
        [3e-4, 3.5e-4, 2.5e-4, 5e-4]
    data = {"flat": dict(dataset=rc.dataset, source_column=rc.source_column,
                         target_column=rc.target_column), "tokenizer": rc.teacher}
    cfg = TrainConfig.from_flat(_train_flat(rc, data, "o/r", teacher=rc.teacher, bits="1-1-1",
                                            method="tbt", variant="released", seed=0,
                                            max_steps=100, lr=_student_lr(rc, "1-1-1"),
                                            **_recipe_train_settings(rc)))
    assert cfg.distill.mask_padding is False and cfg.distill.last_encoder_twice is True
    assert cfg.grad_accum == 2 and cfg.data.dataset == "xsum" and cfg.lr == 5e-4
    assert replicate_config(recipe="xsum", student_lr=1e-4).student_lr == 1e-4  # flag wins


def test_config_errors():
    with pytest.raises(ValueError, match="--test-file"):
        replicate_config(train_file="t.jsonl")
    with pytest.raises(ValueError, match="student_steps"):
        replicate_config(student_steps=0)


def test_protocol_change_is_refused(tmp_path):
    from tbt.demo.replicate import _check_protocol

    rc = replicate_config(output_dir=str(tmp_path))
    _check_protocol(rc)
    _check_protocol(replicate_config(output_dir=str(tmp_path), seeds="5",
                                     students="tbt-2-2-2"))  # more seeds/rows: fine
    with pytest.raises(ValueError, match="student_steps: 300 -> 10"):
        _check_protocol(replicate_config(output_dir=str(tmp_path), student_steps=10))


def _fake(scores: list[float], seed: int = 0) -> dict:
    x = [float(v) for v in scores]
    return {"per_example": {"rouge1": x, "rouge2": [v / 2 for v in x],
                            "rougeLsum": [v - 1 for v in x]},
            "metrics": {"gen_len": 10.0}, "seed": seed}


def test_summary_against_hand_computation():
    """Hand-made per-example scores: means, paired gaps (seeds averaged per example first)
    and the ordering verdicts."""
    rc = ReplicateConfig(students=parse_students("low-act"), seeds=(0, 1),
                         bootstrap_resamples=500)
    rng = np.random.default_rng(0)
    base = rng.uniform(10, 60, size=40)
    teacher = _fake(list(base + 1.0))
    shift = {"fp-control": 0.0, "tbt-2-2-2": -3.0, "twn-2-2-2": -20.0, "tbt-1-1-1": -5.0,
             "bwn-1-1-1": -4.5}
    results = {k: [_fake(list(base + d + 0.5), 0), _fake(list(base + d - 0.5), 1)]
               for k, d in shift.items()}
    s = summarize(rc, teacher, results)
    rows = {r["key"]: r for r in s["rows"]}
    assert list(rows) == ["fp-control", "tbt-2-2-2", "tbt-1-1-1", "twn-2-2-2", "bwn-1-1-1"]
    for k, d in shift.items():
        r = rows[k]
        assert r["score"] == pytest.approx(base.mean() + d, abs=1e-9)
        assert r["ci"][0] < r["score"] < r["ci"][1]
        assert r["seed_scores"] == pytest.approx([base.mean() + d + 0.5,
                                                  base.mean() + d - 0.5])
        assert r["seed_sd"] == pytest.approx(np.std([0.5, -0.5], ddof=1))
        # a constant per-example gap: the paired interval collapses onto it
        assert r["gap_control"] == pytest.approx([d, d, d], abs=1e-9)
        assert r["gap_teacher"] == pytest.approx([d - 1, d - 1, d - 1], abs=1e-9)
        assert r["rouge2"] == pytest.approx((base.mean() + d) / 2)
    assert rows["tbt-2-2-2"]["paper_gap"] == -7.63
    verdicts = {o["claim"]: o["verdict"] for o in s["orderings"]}
    assert verdicts["TBT far ahead of TWN at 2-2-2"] == "reproduced"
    assert verdicts["TBT far ahead of BWN at 1-1-1"] == \
        "not reproduced (a reversal the intervals resolve)"
    assert verdicts["TBT (paper): 2-2-8 >= 1-1-8 >= 2-2-2 >= 1-1-1"].startswith("not run")
    table = format_table(s)
    assert "| TBT 2-2-2 (paper) | 2-2-2 | tbt | auto | paper | 2 |" in table
    assert "-3.00 [-3.00, -3.00]" in table and "TBT far ahead of TWN at 2-2-2**: reproduced" \
        in table


# ---- end to end ------------------------------------------------------------------------------

def _tiny_args(ws_dir: str, out: str) -> list[str]:
    return ["replicate", "--train-file", os.path.join(ws_dir, "train.jsonl"),
            "--validation-file", os.path.join(ws_dir, "val.jsonl"),
            "--test-file", os.path.join(ws_dir, "test.jsonl"), "--vocab-size", "300",
            "--arch-override", "d_model=32", "--arch-override", "encoder_ffn_dim=64",
            "--arch-override", "decoder_ffn_dim=64",
            "--arch-override", "max_position_embeddings=64", "--max-source-length", "32",
            "--max-target-length", "12", "--warmup-steps", "4", "--teacher-max-steps", "9",
            "--teacher-eval-every", "3", "--patience", "2", "--max-steps", "6",
            "--save-every", "2", "--students", "tbt-2-2-2,t3-learned-act", "--seeds", "2",
            "--eval-samples", "8", "--num-beams", "1", "--bootstrap", "200", "--no-progress",
            "--output-dir", out]


@pytest.mark.slow
def test_replicate_end_to_end_killed_and_resumed(tmp_path):
    from conftest import tbt_cli, write_corpus

    ws = str(tmp_path)
    write_corpus(os.path.join(ws, "train.jsonl"), 48, 0)
    write_corpus(os.path.join(ws, "val.jsonl"), 8, 1)
    write_corpus(os.path.join(ws, "test.jsonl"), 8, 2)
    out = str(tmp_path / "out")
    args = _tiny_args(ws, out)
    runs = os.path.join(out, "runs")
    first_done = os.path.join(runs, "fp-control", "seed-0", "result.json")

    proc = tbt_cli(*args)
    deadline = time.time() + 600
    while not os.path.isfile(first_done):  # kill during the second run (or later)
        assert proc.poll() is None, proc.communicate()[0][-3000:]
        assert time.time() < deadline
        time.sleep(0.2)
    time.sleep(1.0)
    proc.send_signal(signal.SIGKILL)
    proc.communicate()
    assert not os.path.isfile(os.path.join(out, "replicate.json"))
    stamp = os.stat(first_done).st_mtime_ns

    proc = tbt_cli(*args)
    log = proc.communicate(timeout=900)[0]
    assert proc.returncode == 0, log[-4000:]
    assert "teacher: done (skipped)" in log
    assert "FP control (distilled, --bits fp), seed 0: done (skipped)" in log
    assert os.stat(first_done).st_mtime_ns == stamp  # a finished run is not redone

    s = json.load(open(os.path.join(out, "replicate.json")))
    assert [r["key"] for r in s["rows"]] == ["fp-control", "tbt-2-2-2", "t3-learned-act"]
    for r in s["rows"]:
        assert r["seeds"] == [0, 1]
        assert r["ci"][0] <= r["score"] <= r["ci"][1]
        g = r["gap_control"]
        assert g[1] <= g[0] <= g[2]
        for seed in (0, 1):
            res = json.load(open(os.path.join(runs, r["run"], f"seed-{seed}", "result.json")))
            assert len(res["per_example"]["rouge1"]) == 8 and res["steps"] == 6
    quant = json.load(open(os.path.join(runs, "t3-learned-act", "seed-1", "tbt_config.json")))
    assert (quant["method"], quant["act_method"], quant["bits"]) == ("twn", "elastic", "2-2-2")
    assert s["teacher"]["steps"] <= 9
    assert "| TBT 2-2-2 (paper) | 2-2-2 | tbt |" in open(os.path.join(out, "replicate.md")).read()
    for png in ("replicate.png", "teacher_curve.png"):
        with open(os.path.join(out, png), "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n"

    # a third run does nothing but rebuild the table
    proc = tbt_cli(*args)
    log = proc.communicate(timeout=600)[0]
    assert proc.returncode == 0 and log.count("done (skipped)") == 1 + 3 * 2


def test_cli_bad_students_is_a_one_line_error(capsys):
    from tbt.cli import main

    assert main(["replicate", "--students", "nope"]) == 2
    err = capsys.readouterr().err
    assert "unknown student 'nope'" in err and "Traceback" not in err


def test_run_lock_leaves_live_owners_alone_and_takes_over_stale_ones(tmp_path):
    import socket
    import subprocess
    import sys

    from tbt._lock import RunLock

    (tmp_path / "run").mkdir()
    path = str(tmp_path / "run" / ".lock")
    lock = RunLock(path)
    assert lock.acquire() and open(path).read().split()[0] == str(os.getpid())
    second = RunLock(path)  # the same process, a second acquisition: refused
    assert not second.acquire() and second.pid == os.getpid()
    lock.release()
    assert not os.path.exists(path)
    with open(path, "w") as f:  # held by a live process (our parent)
        f.write(str(os.getppid()))
    other = RunLock(path)
    assert not other.acquire() and other.pid == os.getppid()
    assert other.owner() == f"pid {os.getppid()}"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with open(path, "w") as f:  # left by a killed command
        f.write(str(dead.pid))
    assert other.acquire() and open(path).read().split()[0] == str(os.getpid())
    other.release()
    # left by an earlier process that had this pid (a restarted container): stale
    with open(path, "w") as f:
        f.write(f"{os.getpid()}\n{socket.gethostname()}\n")
    assert other.acquire()
    other.release()
    with open(path, "w") as f:  # another machine: cannot be checked, left alone
        f.write(f"{os.getppid()}\nsome-other-host\n")
    assert not other.acquire() and other.owner() == f"pid {os.getppid()} on some-other-host"
