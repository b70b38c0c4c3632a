"""TrainConfig / DistillConfig: validation, JSON round trip, config files and flag precedence."""

from __future__ import annotations

import json

import pytest

from tbt.cli import build_parser
from tbt.cli.train import resolve_settings
from tbt.config import QuantConfig
from tbt.train.config import DistillConfig, TrainConfig, load_config_file, merge_settings
from tbt.data import DataConfig

BASE = dict(model="bart-tiny", tokenizer="tok", train_file="t.jsonl", output_dir="out",
            max_steps=10)


def _args(*argv):
    return build_parser().parse_args(["train", *argv])


@pytest.mark.parametrize("extra", [
    {},
    {"bits": "2-2-8", "variant": "released", "method": "twn", "w_attn": 0.5,
     "mask_padding": False, "layer_map": "0,1", "bf16": True, "adam_betas": (0.8, 0.99)},
    {"bits": "1-1-1", "epochs": 2.5, "max_steps": None, "generation": "xsum",
     "last_encoder_twice": True, "encoder_layer_map": [1, 1]},
])
def test_json_round_trip(extra):
    cfg = TrainConfig.from_flat({**BASE, **extra})
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    assert TrainConfig.from_flat(cfg.to_flat()) == cfg
    json.loads(cfg.to_json())  # plain JSON


def test_flat_settings_reach_their_owner():
    cfg = TrainConfig.from_flat({**BASE, "bits": "2-2-2", "variant": "released",
                                 "source_column": "article", "w_hidden": 0,
                                 "layer_map": "0, 2"})
    assert cfg.quant == QuantConfig(bits="2-2-2", variant="released")
    assert cfg.data == DataConfig(train_file="t.jsonl", source_column="article")
    assert cfg.distill == DistillConfig(w_hidden=0, layer_map=(0, 2))
    assert cfg.bits == "2-2-2" and TrainConfig.from_flat(BASE).quant is None


@pytest.mark.parametrize("flat,match", [
    ({**BASE, "max_stepz": 3}, "unknown setting 'max_stepz'"),
    ({**BASE, "epochs": 1}, "exactly one of --max-steps N and --epochs N"),
    ({k: v for k, v in BASE.items() if k != "max_steps"}, "exactly one"),
    ({k: v for k, v in BASE.items() if k != "output_dir"}, "output_dir is required"),
    ({**BASE, "model": None}, "no model"),
    ({**BASE, "variant": "paper"}, "only apply to quantized students"),
    ({**BASE, "bits": "3-2"}, "E-W-A"),
    ({**BASE, "w_ce": -1}, "w_ce"),
    ({**BASE, "lr": 0}, "lr"),
    ({**BASE, "device": "tpu"}, "device"),
    ({**BASE, "generation": "nope"}, "generation"),
    ({**BASE, "layer_map": "a,b"}, "layer_map"),
    ({**BASE, "dataset": "xsum"}, "not both"),
])
def test_invalid_settings_say_what_to_fix(flat, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig.from_flat(flat)


def test_newer_version_is_refused():
    d = TrainConfig.from_flat(BASE).to_dict()
    d["version"] = 99
    with pytest.raises(ValueError, match="newer"):
        TrainConfig.from_dict(d)


def test_toml_and_saved_json_stand_in_for_flags(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('model = "bart-tiny"\ntokenizer = "tok"\nbits = "2-2-8"\n'
                    'train-file = "t.jsonl"\nmax_steps = 5\noutput_dir = "o"\nlr = 1e-3\n'
                    '[distill]\nw_attn = 0.0\n')
    cfg = TrainConfig.from_flat(load_config_file(toml))
    assert (cfg.lr, cfg.max_steps, cfg.distill.w_attn, cfg.bits) == (1e-3, 5, 0.0, "2-2-8")
    saved = tmp_path / "train_config.json"
    saved.write_text(cfg.to_json())
    assert TrainConfig.from_flat(load_config_file(saved)) == cfg
    # flags override the file
    args = _args("--config", str(toml), "--lr", "0.01", "--no-mask-padding")
    cfg2 = TrainConfig.from_flat(resolve_settings(args))
    assert cfg2.lr == 0.01 and cfg2.distill.mask_padding is False and cfg2.max_steps == 5


def test_bad_config_files(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("model = \n")
    with pytest.raises(ValueError, match="does not parse"):
        load_config_file(bad)
    yml = tmp_path / "x.yaml"
    yml.write_text("a: 1")
    with pytest.raises(ValueError, match=".toml or .json"):
        load_config_file(yml)


def test_precedence_and_exclusive_settings():
    merged = merge_settings({"epochs": 20, "dataset": "xsum", "lr": 1.0},
                            {"lr": 2.0}, {"max_steps": 3, "train_file": "t.jsonl"})
    assert merged == {"lr": 2.0, "max_steps": 3, "train_file": "t.jsonl"}
    args = _args("--recipe", "xsum-2-2-8", "--max-steps", "7", "--train-file", "t.jsonl",
                 "--output-dir", "o", "--lr", "1e-3")
    cfg = TrainConfig.from_flat(resolve_settings(args))
    assert (cfg.max_steps, cfg.epochs, cfg.data.dataset, cfg.lr) == (7, None, None, 1e-3)
    assert cfg.recipe == "xsum-2-2-8" and cfg.quant.variant == "released"


def test_cli_errors_are_reported_not_raised(capsys):
    from tbt.cli import main

    rc = main(["train", "--model", "bart-tiny", "--output-dir", "o", "--train-file", "t.jsonl"])
    assert rc == 2
    assert "exactly one of --max-steps" in capsys.readouterr().err


def test_skip_modules_flag_quantizes_the_lm_head():
    base = ["--model", "bart-tiny", "--train-file", "t.jsonl", "--output-dir", "o",
            "--bits", "2-2-8", "--max-steps", "3"]
    assert TrainConfig.from_flat(resolve_settings(_args(*base))).quant.skip_modules == ("lm_head",)
    cfg = TrainConfig.from_flat(resolve_settings(_args(*base, "--skip-modules")))
    assert cfg.quant.skip_modules == ()  # nothing skipped: the head is quantized too
    cfg = TrainConfig.from_flat(resolve_settings(_args(*base, "--skip-modules", "lm_head",
                                                       "*fc2")))
    assert cfg.quant.skip_modules == ("lm_head", "*fc2")
