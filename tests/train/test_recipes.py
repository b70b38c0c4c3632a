"""The paper's recipes resolve to valid configs and start on a tiny local model."""

from __future__ import annotations

import json
import os

import pytest

from tbt.train.config import TrainConfig
from tbt.train.presets import ARCHITECTURES, README_LR, RECIPES, build_from_scratch, resolve_recipe
from train_helpers import make_model_dir, make_workspace


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_resolves(name):
    cfg = TrainConfig.from_flat({**resolve_recipe(name), "output_dir": "out"})
    dataset, bits = name.split("-", 1)
    assert cfg.bits == bits and cfg.recipe == name
    assert cfg.quant.method == "tbt" and cfg.quant.variant == "released"
    assert cfg.epochs == 20 and cfg.max_steps is None and cfg.seed == 28
    assert cfg.batch_size * cfg.grad_accum * 8 == 128  # on the paper's 8 processes
    assert cfg.distill.mask_padding is False and cfg.distill.last_encoder_twice
    assert cfg.model and cfg.data.dataset  # hub checkpoint and dataset
    if dataset in README_LR:
        assert cfg.lr == README_LR[dataset][bits]
    else:  # wmt16: the paper's rule
        assert cfg.lr == (2.5e-4 if bits.endswith("-8") else 5e-4)


def test_recipe_table_values():
    assert RECIPES["xsum-2-2-8"]["lr"] == 3e-4 and RECIPES["cnn-2-2-2"]["lr"] == 7e-4
    assert RECIPES["xsum-1-1-1"]["generation"] == "xsum"
    assert RECIPES["cnn-1-1-8"]["dataset_config"] == "3.0.0"
    assert RECIPES["wmt16-2-2-2"]["source_lang"] == "en"
    with pytest.raises(ValueError, match="unknown recipe"):
        resolve_recipe("xsum-3-3-3")


@pytest.mark.parametrize("name", ["bart-tiny", "bart-small", "gpt2-tiny"])
def test_architecture_presets_build(name):
    model = build_from_scratch(name, vocab_size=300)
    assert model.config.vocab_size == 300
    assert model.config.is_encoder_decoder == name.startswith("bart")
    assert name in ARCHITECTURES


@pytest.mark.slow
def test_recipe_starts_on_a_tiny_config(tmp_path):
    """`tbt train --recipe xsum-2-2-2` with the hub pieces replaced by local ones."""
    from tbt.cli import main

    ws = make_workspace(str(tmp_path / "ws"))
    model = make_model_dir(ws, "bart-tiny", "bart")
    out = str(tmp_path / "out")
    rc = main(["train", "--recipe", "xsum-2-2-2", "--model", model, "--train-file", ws["train"],
               "--max-steps", "2", "--output-dir", out, "--device", "cpu", "--no-progress",
               "--batch-size", "4", "--grad-accum", "1"])
    assert rc == 0
    saved = TrainConfig.from_json(open(os.path.join(out, "train_config.json")).read())
    assert saved.recipe == "xsum-2-2-2" and saved.lr == 3.5e-4 and saved.max_steps == 2
    assert saved.data.dataset is None and saved.data.train_file == ws["train"]
    gen = json.load(open(os.path.join(out, "generation_config.json")))
    assert gen["num_beams"] == 6 and gen["max_length"] == 62 and gen["min_length"] == 11
    log = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    assert len(log) == 2 and {"ce", "logits", "hidden", "attn"} <= set(log[0])
