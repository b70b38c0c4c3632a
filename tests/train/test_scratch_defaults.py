"""From-scratch defaults of the architecture presets: how they resolve, and who wins."""

from __future__ import annotations

import pytest

from tbt.cli import build_parser
from tbt.cli.train import resolve_settings
from tbt.train.config import TrainConfig
from tbt.train.presets import SCRATCH_DEFAULTS, scratch_defaults

BASE = dict(tokenizer="tok", train_file="t.jsonl", output_dir="out", max_steps=10)
FINE_TUNING = TrainConfig(output_dir="o", model="m", max_steps=1)  # the dataclass defaults


def _cfg(**kw) -> TrainConfig:
    return TrainConfig.from_flat({**BASE, **kw})


@pytest.mark.parametrize("preset", ["bart-tiny", "bart-small"])
def test_seq2seq_preset_from_scratch_gets_its_defaults_and_the_copy_warmup(preset):
    cfg = _cfg(model=preset, bits="fp")
    assert (cfg.lr, cfg.batch_size, cfg.warmup_ratio, cfg.weight_decay) == (1e-3, 32, 0.25, 0.01)
    assert cfg.copy_warmup_steps == 400
    assert (FINE_TUNING.lr, FINE_TUNING.batch_size, FINE_TUNING.copy_warmup_steps) == \
        (2.5e-4, 8, 0)  # the fine-tuning defaults are unchanged


def test_user_values_win_over_preset_defaults():
    cfg = _cfg(model="bart-tiny", lr=2.5e-4, batch_size=8, copy_warmup_steps=0)
    assert (cfg.lr, cfg.batch_size, cfg.copy_warmup_steps) == (2.5e-4, 8, 0)
    assert (cfg.warmup_ratio, cfg.weight_decay) == (0.25, 0.01)  # the rest still the preset's
    # dashes, as a config file may spell them
    assert TrainConfig.from_flat({**BASE, "model": "bart-tiny", "copy-warmup-steps": 5}
                                 ).copy_warmup_steps == 5


def test_fine_tuning_a_checkpoint_or_distilling_keeps_the_plain_defaults():
    for kw in (dict(model="some/checkpoint-dir"), dict(teacher="teacher-dir", bits="2-2-8"),
               dict(model="student-dir", teacher="teacher-dir", bits="2-2-8")):
        cfg = _cfg(**kw)
        assert (cfg.lr, cfg.batch_size, cfg.warmup_ratio, cfg.weight_decay,
                cfg.copy_warmup_steps) == (2.5e-4, 8, 0.05, 0.0, 0), kw


def test_preset_distilled_from_a_teacher_has_no_copy_warmup():
    cfg = _cfg(model="bart-tiny", teacher="teacher-dir", bits="2-2-8")
    assert cfg.copy_warmup_steps == 0 and cfg.lr == 1e-3  # still trained from scratch
    assert "copy_warmup_steps" not in scratch_defaults({"model": "bart-tiny", "teacher": "t"})
    assert scratch_defaults({"model": "gpt2-tiny"}).get("copy_warmup_steps") is None


def test_recipe_values_win_and_round_trip_keeps_the_resolved_values():
    from tbt.train.presets import resolve_recipe

    cfg = TrainConfig.from_flat({**resolve_recipe("matmulfree-tiny"), **BASE})
    assert cfg.lr == 2e-3 and cfg.copy_warmup_steps == 0
    cfg = _cfg(model="bart-tiny")
    again = TrainConfig.from_json(cfg.to_json())  # train_config.json: the resolved values
    assert again == cfg and again.lr == 1e-3 and again.copy_warmup_steps == 400
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg


def test_cli_flags_win_and_help_names_the_warmup():
    argv = ["train", "--model", "bart-small", "--output-dir", "o", "--train-file", "t.jsonl",
            "--max-steps", "3", "--lr", "5e-4", "--copy-warmup-steps", "50"]
    cfg = TrainConfig.from_flat(resolve_settings(build_parser().parse_args(argv)))
    assert (cfg.lr, cfg.copy_warmup_steps, cfg.batch_size) == (5e-4, 50, 32)
    assert set(SCRATCH_DEFAULTS) >= {"bart-tiny", "bart-small", "gpt2-tiny"}


def test_bad_warmup_settings_are_one_line_errors():
    with pytest.raises(ValueError, match="copy_warmup_steps"):
        _cfg(model="bart-tiny", copy_warmup_steps=-1)
    with pytest.raises(ValueError, match="copy_warmup_lr"):
        _cfg(model="bart-tiny", copy_warmup_lr=0.0)
