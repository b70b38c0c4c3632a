"""Bad command lines: one line on stderr naming the fix, exit code 2, and nothing destroyed.

Each row of ``BAD`` is a command, and a piece of the one line it must print. The commands run
in-process (``tbt.cli.main``) on a tiny workspace; a few run as real subprocesses to check the
whole of stderr. Occupied folders are hashed before and after a refused command: every byte
must still be there.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "train"))
from train_helpers import make_model_dir, make_workspace  # noqa: E402

from tbt.cli import main  # noqa: E402
from tbt.cli._safety import (LOCK_NAME, check_output_dir, check_output_file,  # noqa: E402
                             owned_run_dir, run_lock, staged_output)


def tree_hash(root) -> str:
    """sha256 over every path, file mode and file content under ``root`` (itself included)."""
    h = hashlib.sha256()
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for name in sorted(files) + [""]:
            p = os.path.join(d, name)
            h.update(os.path.relpath(p, root).encode() + b"\0")
            if name:
                h.update(oct(os.stat(p).st_mode).encode())
                with open(p, "rb") as f:
                    h.update(f.read())
    return h.hexdigest()


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Workspace: data, tokenizer, an FP teacher, a quantized student, its packed export,
    a file, a config file with a wrong type, broken CSVs and a folder with a finished run."""
    import torch
    from transformers import AutoTokenizer

    from tbt import QuantConfig, quantize_model
    from tbt.export.io import save_packed
    from tbt.hf import load_pretrained

    root = tmp_path_factory.mktemp("bad")
    ws = make_workspace(str(root))
    ws["teacher"] = make_model_dir(ws, "bart-tiny", "teacher")
    model, tok = load_pretrained(ws["teacher"])
    quantize_model(model, QuantConfig(bits="2-2-8"))
    with torch.no_grad():  # a finished `tbt train` folder, as far as the commands can tell
        model(input_ids=torch.tensor([[0, 5, 6, 2]]), labels=torch.tensor([[0, 5, 6, 2]]))
    ws["student"] = str(root / "student")
    model.save_pretrained(ws["student"])
    tok.save_pretrained(ws["student"])
    (root / "student" / "log.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    ws["packed"] = str(save_packed(model, root / "packed"))
    AutoTokenizer.from_pretrained(ws["tokenizer"]).save_pretrained(ws["packed"])
    ws["file"] = str(root / "a-file")
    (root / "a-file").write_text("not a folder\n")
    ws["bad_toml"] = str(root / "bad.toml")
    (root / "bad.toml").write_text('lr = "abc"\n')
    ws["quote_csv"] = str(root / "quote.csv")
    (root / "quote.csv").write_text('document,summary\n"alpha beta,gamma\ndelta,eta\ntheta,iota\n')
    ws["ragged_csv"] = str(root / "ragged.csv")
    (root / "ragged.csv").write_text("document,summary\nalpha beta,gamma\ndelta,eta,theta\n")
    ws["occupied"] = str(root / "occupied")
    os.makedirs(ws["occupied"])
    (root / "occupied" / "notes.txt").write_text("the user's own file\n")
    ws["root"] = str(root)
    return ws


def _train(ws, out, *extra):
    return ["train", "--teacher", ws["teacher"], "--bits", "2-2-8", "--train-file", ws["train"],
            "--source-column", "document", "--target-column", "summary", "--max-steps", "2",
            "--batch-size", "8", "--max-source-length", "32", "--max-target-length", "16",
            "--device", "cpu", "--no-progress", "--output-dir", out, *extra]


def _export(ws, out, *extra):
    return ["export", "--model", ws["student"], "--output-dir", out, *extra]


def _tok(ws, out, *extra):
    return ["tokenizer", "train", "--train-file", ws["train"], "--source-column", "document",
            "--vocab-size", "300", "--output-dir", out, *extra]


def _eval(ws, model, out, *extra):
    return ["evaluate", "--model", model, "--test-file", ws["validation"], "--output-dir", out,
            "--device", "cpu", "--no-progress", *extra]


def _new(ws, name):
    return os.path.join(ws["root"], "new", name)


# (id, argv builder, text the one line must contain, folder that must stay byte-identical)
BAD = [
    # 5: --output-dir a file, or read-only (/proc refuses new files even to root)
    ("train-out-file", lambda w: _train(w, w["file"]), "is a file, not a folder", "file"),
    ("tok-out-file", lambda w: _tok(w, w["file"]), "is a file, not a folder", "file"),
    ("export-out-file", lambda w: _export(w, w["file"]), "is a file, not a folder", "file"),
    ("ptq-out-file", lambda w: ["ptq", "--model", w["teacher"], "--method", "rtn",
                                "--output-dir", w["file"]], "is a file, not a folder", "file"),
    ("train-out-readonly", lambda w: _train(w, "/proc/tbt-out"), "/proc is not writable", None),
    ("tok-out-readonly", lambda w: _tok(w, "/proc/tbt-out"), "/proc is not writable", None),
    ("export-out-readonly", lambda w: _export(w, "/proc/tbt-out"), "/proc is not writable",
     None),
    ("train-out-under-file", lambda w: _train(w, os.path.join(w["file"], "sub")),
     "is a file, not a folder", "file"),
    # 5: evaluate on a packed folder; --num-beams 0
    ("evaluate-packed-cuda", lambda w: _eval(w, w["packed"], _new(w, "ev1"), "--device", "cuda"),
     "is a packed checkpoint: it runs on the CPU (--device cpu)", "packed"),
    ("evaluate-beams-0", lambda w: _eval(w, w["student"], _new(w, "ev2"), "--num-beams", "0"),
     "--num-beams 0: must be >= 1", None),
    # 5: a config value of the wrong type
    ("config-wrong-type", lambda w: _train(w, _new(w, "t1"), "--config", w["bad_toml"]),
     "setting lr = 'abc' in config file", None),
    # 5: --tokenizer a missing folder (never the hub)
    ("tokenizer-missing", lambda w: _train(w, _new(w, "t2"), "--tokenizer",
                                           os.path.join(w["root"], "no-such-tok")),
     "no-such-tok: no such folder", None),
    ("tokenizer-missing-dot", lambda w: _train(w, _new(w, "t3"), "--tokenizer", "./no-such-tok"),
     "--tokenizer ./no-such-tok: no such folder", None),
    # 5: --train-file a folder
    ("train-file-folder", lambda w: _data(w, w["root"], "t4"), "is a folder: pass a file in it",
     None),
    # 5: broken CSVs
    ("csv-unterminated-quote", lambda w: _csv(w, "quote_csv", "t5"),
     "quote.csv:2: a quoted field opened here is never closed (unterminated quote)", None),
    ("csv-ragged", lambda w: _csv(w, "ragged_csv", "t6"),
     "ragged.csv:3: this row has 3 fields, the header has 2", None),
    # 3: export into the model's own folder or an occupied one
    ("export-into-model", lambda w: _export(w, w["student"]), "is the --model folder", "student"),
    ("export-into-model-overwrite", lambda w: _export(w, w["student"], "--overwrite"),
     "is the --model folder", "student"),
    ("export-into-occupied", lambda w: _export(w, w["occupied"]),
     "is not empty (it holds notes.txt): choose a new folder, or pass --overwrite", "occupied"),
    ("export-over-packed", lambda w: _export(w, w["packed"]), "pass --overwrite", "packed"),
    ("ptq-into-occupied", lambda w: ["ptq", "--model", w["teacher"], "--method", "rtn",
                                     "--output-dir", w["occupied"]], "pass --overwrite",
     "occupied"),
    ("ptq-into-model", lambda w: ["ptq", "--model", w["teacher"], "--method", "rtn",
                                  "--output-dir", w["teacher"], "--overwrite"],
     "is the --model folder", "teacher"),
    ("tok-into-occupied", lambda w: _tok(w, w["occupied"]), "pass --overwrite", "occupied"),
    ("evaluate-into-occupied", lambda w: _eval(w, w["student"], w["occupied"]),
     "pass --overwrite", "occupied"),
    # 3: train over a trained model, or into the teacher
    ("train-over-model", lambda w: _train(w, w["student"]),
     "is not empty (it holds a trained model: config.json", "student"),
    ("train-into-teacher", lambda w: _train(w, w["teacher"]), "is the --teacher folder",
     "teacher"),
    ("train-into-teacher-overwrite", lambda w: _train(w, w["teacher"], "--overwrite"),
     "is the --teacher folder", "teacher"),
    ("train-contains-data-overwrite", lambda w: _train(w, w["root"], "--overwrite"),
     "contains --teacher", "root"),
    ("train-resume-finished-model", lambda w: _train(w, w["student"], "--resume"),
     "has no checkpoint to continue", "student"),
    ("train-resume-and-overwrite", lambda w: _train(w, w["student"], "--resume", "--overwrite"),
     "give one of them", "student"),
    ("train-into-occupied", lambda w: _train(w, w["occupied"]), "pass --overwrite", "occupied"),
    ("replicate-into-occupied", lambda w: ["replicate", "--quick", "--output-dir", w["occupied"]],
     "holds files not written by tbt replicate: notes.txt", "occupied"),
    # 3: demo and ablate never take over a folder they did not write
    ("demo-into-occupied", lambda w: ["demo", "--quick", "--output-dir", w["occupied"]],
     "holds files not written by this command: notes.txt", "occupied"),
    ("ablate-into-demo", lambda w: ["ablate", "--from-demo", w["occupied"], "--output-dir",
                                    w["occupied"]], "is the --from-demo folder", "occupied"),
    # 2: bench --json never replaces a file silently (checked before measuring anything)
    ("bench-json-exists", lambda w: ["bench", "--quick", "--json",
                                     os.path.join(w["occupied"], "notes.txt")],
     "notes.txt already exists: choose a new file, or pass --overwrite to replace it",
     "occupied"),
    ("bench-json-folder", lambda w: ["bench", "--quick", "--json", w["occupied"]],
     "is a folder, not a file: choose a file path", "occupied"),
]


def _data(w, train_file, out):
    argv = _train(w, _new(w, out))
    argv[argv.index("--train-file") + 1] = train_file
    return argv


def _csv(w, key, out):
    return _data(w, w[key], out)


@pytest.mark.parametrize("argv, needle, keep", [pytest.param(b, n, k, id=i)
                                                for i, b, n, k in BAD])
def test_bad_input_is_one_line_exit_2(ws, argv, needle, keep, capsys):
    argv = argv(ws)
    before = tree_hash(ws[keep]) if keep else None
    rc = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    command = " ".join(argv[:2]) if argv[0] == "tokenizer" else argv[0]
    assert rc == 2, err
    assert len(lines) == 1 and lines[0].startswith(f"tbt {command}: error: "), err
    assert needle in lines[0], lines[0]
    if keep:
        assert tree_hash(ws[keep]) == before, f"{keep} changed"
    assert not os.path.exists(os.path.join(ws["root"], "new"))  # nothing created on refusal


def test_every_issue_item_has_a_row():
    """Items of the issue ("Trust from the first command", parts 3 and 5) -> rows above."""
    ids = {i for i, *_ in BAD}
    for needed in ("train-out-file", "tok-out-file", "export-out-file", "train-out-readonly",
                   "tok-out-readonly", "export-out-readonly", "evaluate-packed-cuda",
                   "evaluate-beams-0", "config-wrong-type", "tokenizer-missing",
                   "train-file-folder", "csv-unterminated-quote", "csv-ragged",
                   "export-into-model", "export-into-occupied", "train-over-model",
                   "train-into-teacher"):
        assert needed in ids


def test_whole_stderr_is_one_line_in_a_real_process(ws):
    """The console script itself: no traceback, no resolved-config dump, one line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    for argv in (_csv(ws, "ragged_csv", "s1"),):  # failed after the config dump before
        proc = subprocess.run([sys.executable, "-m", "tbt", *argv], capture_output=True,
                              text=True, timeout=300, env=env)
        assert proc.returncode == 2, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        assert "Traceback" not in proc.stderr and "resolved config" not in proc.stdout


# ---- a second run into a locked folder -----------------------------------------------------

@pytest.fixture
def live_pid():
    """The pid of a live process that is not this one."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_run_into_a_locked_folder_refuses(ws, tmp_path, live_pid, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / LOCK_NAME).write_text(f"{live_pid}\n{os.uname().nodename}\n")
    before = tree_hash(out)
    for argv in (_train(ws, str(out)), _train(ws, str(out), "--resume"),
                 _train(ws, str(out), "--overwrite"), _export(ws, str(out), "--overwrite")):
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"in use by another tbt run (pid {live_pid}" in lines[0]
        assert tree_hash(out) == before


def test_run_lock_takes_over_a_dead_pid_and_cleans_up(tmp_path, live_pid):
    from tbt.cli import CliError

    d = tmp_path / "d"
    d.mkdir()
    lock = d / LOCK_NAME
    lock.write_text(f"{_dead_pid()}\n{os.uname().nodename}\n")  # left by a kill -9
    with run_lock(str(d)):
        assert lock.read_text().split()[0] == str(os.getpid())
        with pytest.raises(CliError, match=f"pid {os.getpid()}"):  # a second run refuses
            with run_lock(str(d)):
                pass
    assert not lock.exists()
    lock.write_text(f"{live_pid}\n{os.uname().nodename}\n")
    with pytest.raises(CliError, match=f"pid {live_pid}"):
        with run_lock(str(d)):
            pass
    assert lock.read_text().split()[0] == str(live_pid)  # someone else's lock is left alone
    new = tmp_path / "created"
    with run_lock(str(new)):
        assert new.is_dir()
    assert not new.exists()  # created for the lock and still empty: removed again


# ---- --overwrite works; the atomic replacement ----------------------------------------------

def test_export_overwrite_replaces_and_leaves_no_siblings(ws, tmp_path, capsys):
    from tbt.export.io import read_packed_metadata

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(_export(ws, str(out), "--overwrite")) == 0, capsys.readouterr().err
    assert sorted(os.listdir(out)) == sorted(os.listdir(ws["packed"]))
    got, want = read_packed_metadata(out)["layers"], read_packed_metadata(ws["packed"])["layers"]
    assert {k: v["bits"] for k, v in got.items()} == {k: v["bits"] for k, v in want.items()}
    assert os.listdir(tmp_path) == ["out"]  # no temporary or old sibling left behind


def test_tokenizer_overwrite(ws, tmp_path, capsys):
    from transformers import AutoTokenizer

    out = tmp_path / "tok"
    out.mkdir()
    (out / "old.txt").write_text("old")
    assert main(_tok(ws, str(out), "--overwrite")) == 0, capsys.readouterr().err
    assert not (out / "old.txt").exists()
    assert len(AutoTokenizer.from_pretrained(str(out))) == 300


def test_staged_output_failure_leaves_the_folder_as_it_was(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("keep")
    before = tree_hash(out)
    with pytest.raises(RuntimeError):
        with staged_output(str(out), overwrite=True) as tmp:
            with open(os.path.join(tmp, "half.bin"), "wb") as f:
                f.write(b"x")
            raise RuntimeError("killed half-way")
    assert tree_hash(out) == before and os.listdir(tmp_path) == ["out"]


def test_train_overwrite_then_refuse_then_resume_with_a_torn_log(ws, tmp_path, capsys):
    """--overwrite replaces an old run; a torn last log line does not block --resume."""
    out = tmp_path / "run"
    out.mkdir()
    (out / "stale.txt").write_text("from an older run")
    assert main(_train(ws, str(out), "--save-every", "1")) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert main(_train(ws, str(out), "--save-every", "1", "--overwrite")) == 0
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert not (out / LOCK_NAME).exists()
    capsys.readouterr()
    # the finished run's folder is refused without --resume / --overwrite, byte for byte
    before = tree_hash(out)
    assert main(_train(ws, str(out), "--save-every", "1")) == 2
    assert "pass --resume to continue it, --overwrite" in capsys.readouterr().err
    assert tree_hash(out) == before
    # a crash while writing the log: the last line is torn
    with open(out / "log.jsonl", "a", encoding="utf-8") as f:
        f.write('{"step": 3, "loss": 1.2')
    argv = _train(ws, str(out), "--save-every", "1", "--resume")
    argv[argv.index("--max-steps") + 1] = "3"
    assert main(argv) == 0, capsys.readouterr().err
    with open(out / "log.jsonl", encoding="utf-8") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3]


def test_owned_run_dir_reuses_only_its_own_folder(tmp_path):
    from tbt.cli import CliError

    out = tmp_path / "demo"
    with owned_run_dir(str(out), ".tbt-demo"):
        (out / "results.md").write_text("first run")
    with owned_run_dir(str(out), ".tbt-demo"):  # its own earlier output: reused
        (out / "results.md").write_text("second run")
    assert (out / "results.md").read_text() == "second run"
    other = tmp_path / "other"
    other.mkdir()
    (other / "mine.txt").write_text("x")
    with pytest.raises(CliError, match="holds files not written by this command"):
        with owned_run_dir(str(other), ".tbt-demo"):
            pass
    assert os.listdir(other) == ["mine.txt"]
    with owned_run_dir(str(other), ".tbt-demo", overwrite=True):
        assert sorted(os.listdir(other)) == [".tbt-demo", LOCK_NAME]
    failed = tmp_path / "failed"
    with pytest.raises(RuntimeError):
        with owned_run_dir(str(failed), ".tbt-demo"):
            raise RuntimeError("bad input found after the start")
    assert not failed.exists()  # nothing left by a run that wrote nothing


def test_input_inside_output_is_refused_only_where_overwrite_would_delete_it(tmp_path):
    from tbt.cli import CliError

    out = tmp_path / "out"
    (out / "data").mkdir(parents=True)
    data = out / "data" / "train.jsonl"
    data.write_text("{}\n")
    with pytest.raises(CliError, match="--overwrite would delete it"):
        check_output_dir(str(out), overwrite=True, inputs={"--train-file": str(data)})
    check_output_dir(str(out / "sub"), inputs={"--model": str(out)})  # output inside input: ok


def test_path_like_names_never_go_to_the_hub(tmp_path, monkeypatch):
    from tbt._paths import is_path_like

    monkeypatch.chdir(tmp_path)
    (tmp_path / "out").mkdir()
    (tmp_path / "gpt2-local").mkdir()
    local = ["./tok", "../tok", "~/tok", "/abs/tok", "a/b/c", "out/tok", "gpt2-local",
             "dir\\tok", "out/"]
    hub = ["gpt2", "bart-tiny", "facebook/bart-base", "Helsinki-NLP/opus-mt-en-ro"]
    assert [n for n in local if not is_path_like(n)] == []
    assert [n for n in hub if is_path_like(n)] == []


def test_a_real_second_run_refuses_while_the_first_trains(ws, tmp_path, capsys):
    import time

    from train_helpers import tbt_cli

    out = tmp_path / "run"
    argv = _train(ws, str(out))
    argv[argv.index("--max-steps") + 1] = "100000"  # runs until killed
    first = tbt_cli(*argv)
    try:
        deadline = time.time() + 240
        lock = out / LOCK_NAME
        while not (lock.exists() and lock.read_text().split()[:1] == [str(first.pid)]):
            assert first.poll() is None, first.stdout.read()
            assert time.time() < deadline, "the first run never took its lock"
            time.sleep(0.05)
        assert main(argv) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and f"in use by another tbt run (pid {first.pid}" in lines[0]
        assert first.poll() is None  # the first run was not disturbed
    finally:
        first.kill()
        first.wait()


def test_check_output_file_allows_new_files_and_overwrite(tmp_path):
    from tbt.cli import CliError

    new = tmp_path / "sub" / "r.json"  # its folder does not exist yet: fine, it is created
    assert check_output_file(str(new)) == str(new)
    f = tmp_path / "r.json"
    f.write_text("[]")
    with pytest.raises(CliError, match="already exists"):
        check_output_file(str(f))
    assert check_output_file(str(f), overwrite=True) == str(f) and f.read_text() == "[]"

