"""kill -9 in the middle of a run, --resume, and the result equals an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from safetensors.torch import load_file

from tbt.train.checkpoint import (latest_checkpoint, list_checkpoints, save_checkpoint,
                                  truncate_log)
from train_helpers import cli_args, flat_settings, make_model_dir, make_workspace, tbt_cli

STEPS = 24


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(str(tmp_path_factory.mktemp("resume")))
    ws["bart"] = make_model_dir(ws, "bart-tiny", "bart")
    return ws


def _settings(ws, out):
    # dropout on (the RNG state must be restored), 2 epochs (the data position crosses an
    # epoch boundary), accumulation (micro-batch vs optimizer step)
    return flat_settings(ws, out, teacher=ws["bart"], bits="2-2-2", max_steps=STEPS,
                         save_every=4, grad_accum=2, batch_size=6, eval_every=6)


def _records(out):
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in f]


@pytest.mark.slow
def test_kill9_then_resume_equals_uninterrupted_run(ws, tmp_path):
    ref_out, out = str(tmp_path / "ref"), str(tmp_path / "killed")
    ref = tbt_cli("train", *cli_args(_settings(ws, ref_out)))
    victim = tbt_cli("train", *cli_args(_settings(ws, out)))
    deadline = time.time() + 120
    while not any(s >= 8 for s, _ in list_checkpoints(out)):  # at least two checkpoints
        assert victim.poll() is None, victim.stdout.read()
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.02)
    assert victim.poll() is None, "the run finished before it could be killed"
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    killed_at = latest_checkpoint(out)
    assert killed_at is not None and not os.path.isfile(os.path.join(out, "model.safetensors"))

    resumed = tbt_cli("train", *cli_args(_settings(ws, out)), "--resume")
    log_resumed, log_ref = resumed.communicate(timeout=300)[0], ref.communicate(timeout=300)[0]
    assert resumed.returncode == 0, log_resumed
    assert ref.returncode == 0, log_ref
    assert "resumed from" in log_resumed

    a = load_file(os.path.join(ref_out, "model.safetensors"))
    b = load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys()
    assert any(k.endswith("alpha") for k in a)  # learned activation steps are compared too
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, differ[:5]
    assert _records(out) == _records(ref_out)  # every logged loss, step by step


def test_checkpoint_write_is_atomic(tmp_path):
    """A directory left by a crash mid-write is invisible and cleaned by the next save."""
    model = torch.nn.Linear(2, 2)
    model.save_pretrained = lambda path: torch.save(model.state_dict(), f"{path}/weights.pt")
    opt = torch.optim.AdamW(model.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step-000002").mkdir(parents=True)  # a crash while writing step 2
    (root / ".tmp-step-000002" / "partial").write_text("x")
    assert latest_checkpoint(str(tmp_path)) is None
    for step in (2, 4, 6):
        save_checkpoint(str(tmp_path), step, model, opt, sched, {"step": step}, None, "{}",
                        keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 6]
    assert sorted(os.listdir(root)) == ["step-000004", "step-000006"]
    assert not os.path.exists(root / "step-000006" / "partial")


def test_truncate_log_drops_steps_after_the_checkpoint(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("".join(json.dumps({"step": s}) + "\n" for s in range(1, 8)))
    truncate_log(str(path), 4)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]


def test_fresh_run_refuses_a_directory_with_checkpoints(ws, tmp_path):
    from tbt.train.config import TrainConfig
    from tbt.train.loop import train

    out = tmp_path / "old"
    (out / "checkpoints" / "step-000004").mkdir(parents=True)
    (out / "checkpoints" / "step-000004" / "trainer_state.json").write_text("{}")
    cfg = TrainConfig.from_flat(flat_settings(ws, str(out), teacher=ws["bart"], bits="2-2-8",
                                              max_steps=2))
    with pytest.raises(ValueError, match="pass --resume"):
        train(cfg)
