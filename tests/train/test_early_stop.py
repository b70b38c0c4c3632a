"""Early stopping on the validation loss: the rule, and a run that stops and resumes stopped."""

from __future__ import annotations

import json
import os

import pytest

from tbt.train.loop import plateaued


def test_plateau_rule():
    assert not plateaued([3.0, 2.0, 2.5], patience=0)
    assert not plateaued([3.0, 2.0], patience=2)  # not enough history
    assert not plateaued([3.0, 2.0, 2.5, 1.9], patience=2)  # a new best within the window
    assert plateaued([3.0, 2.0, 2.5, 2.0], patience=2)  # equal is no improvement
    assert not plateaued([3.0, 2.0, 2.5, 1.95], patience=2, min_delta=0.0)
    assert plateaued([3.0, 2.0, 2.5, 1.95], patience=2, min_delta=0.1)


def test_config_needs_validations():
    from tbt.train.config import TrainConfig

    with pytest.raises(ValueError, match="eval-every"):
        TrainConfig.from_flat(dict(model="bart-tiny", output_dir="o", max_steps=5,
                                   early_stop_patience=2))


@pytest.mark.slow
def test_run_stops_early_and_resume_keeps_it_stopped(tmp_path):
    from train_helpers import TINY, flat_settings, make_workspace

    from tbt.train.config import TrainConfig
    from tbt.train.loop import train

    ws = make_workspace(str(tmp_path / "ws"))
    out = str(tmp_path / "run")
    # lr 0.3 diverges: the validation loss stops improving within a few validations
    flat = flat_settings(ws, out, model="bart-tiny", tokenizer=ws["tokenizer"], max_steps=200,
                         eval_every=2, early_stop_patience=2, save_every=50, lr=0.3,
                         max_grad_norm=0.0)
    import tbt.train.presets as presets

    saved = dict(presets.ARCHITECTURES["bart-tiny"])
    presets.ARCHITECTURES["bart-tiny"].update(TINY["bart-tiny"])
    try:
        res = train(TrainConfig.from_flat(flat))
        assert res["stopped_early"] and res["steps"] < 200
        log = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
        vals = [r["val_loss"] for r in log if "val_loss" in r]
        assert plateaued(vals, 2) and not plateaued(vals[:-1], 2)  # stopped at the first plateau
        assert log[-1].get("early_stop") and log[-1]["step"] == res["steps"]
        again = train(TrainConfig.from_flat(dict(flat, resume=True)))
        assert again["steps"] == res["steps"] and again["stopped_early"]
    finally:
        presets.ARCHITECTURES["bart-tiny"].clear()
        presets.ARCHITECTURES["bart-tiny"].update(saved)
