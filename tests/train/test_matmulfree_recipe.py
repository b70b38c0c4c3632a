"""``tbt train --recipe matmulfree-tiny``: the MatMul-free LM trains ternary from scratch."""

from __future__ import annotations

import json
import os

import pytest
import torch
from train_helpers import flat_settings, make_workspace


@pytest.mark.slow
def test_recipe_trains_from_scratch_and_reloads(tmp_path):
    from tbt.hf import load_pretrained
    from tbt.models.matmulfree import MatMulFreeForCausalLM
    from tbt.train.config import TrainConfig, merge_settings
    from tbt.train.loop import train
    from tbt.train.presets import resolve_recipe

    ws = make_workspace(str(tmp_path / "ws"))
    out = str(tmp_path / "run")
    # the workspace corpus is document/summary rows: read as "source target" text
    flat = merge_settings(resolve_recipe("matmulfree-tiny"),
                          flat_settings(ws, out, tokenizer=ws["tokenizer"], max_steps=15,
                                        task="seq2seq"))
    cfg = TrainConfig.from_flat(flat)
    assert cfg.quant.act_method == "absmax-token" and cfg.quant.skip_modules == ()
    result = train(cfg)
    model = result["model"]
    assert isinstance(model, MatMulFreeForCausalLM)
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    first, last = sum(r["ce"] for r in log[:3]) / 3, sum(r["ce"] for r in log[-3:]) / 3
    assert last < 0.9 * first, (first, last)
    loaded, tok = load_pretrained(out)
    assert isinstance(loaded, MatMulFreeForCausalLM) and tok is not None
    ids = torch.randint(3, 200, (1, 12))
    with torch.no_grad():
        assert torch.equal(loaded.eval()(input_ids=ids).logits, model.eval()(input_ids=ids).logits)
