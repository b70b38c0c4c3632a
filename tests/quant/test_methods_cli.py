"""`tbt train --method ... --act-method ...`: the flags reach QuantConfig, and a short causal-LM
distillation run trains with a learned weight method and a learned activation method."""

from __future__ import annotations

import json
import math
import os

import pytest
from conftest import make_model_dir, make_workspace

from tbt.cli import build_parser
from tbt.cli.train import resolve_settings
from tbt.train.config import TrainConfig

BASE = ["--model", "gpt2-tiny", "--tokenizer", "tok", "--train-file", "t.jsonl",
        "--output-dir", "out", "--max-steps", "2"]


@pytest.mark.parametrize("flags,want", [
    (["--bits", "fp-2-8", "--method", "seq"], {"method": "seq"}),
    (["--bits", "fp-2-8", "--method", "seq-int2"], {"method": "seq-int2"}),
    (["--bits", "2-2-8", "--method", "dlt", "--granularity", "group", "--group-size", "16"],
     {"method": "dlt", "granularity": "group", "group_size": 16}),
    (["--bits", "fp-2-fp", "--method", "tequila", "--tequila-lambda", "0.01"],
     {"method": "tequila", "options": {"lambda": 0.01}}),
    (["--bits", "fp-2-fp", "--method", "trilm", "--num-shards", "2"],
     {"method": "trilm", "num_shards": 2}),
    (["--bits", "1-1-8", "--method", "bitnet-binary"], {"method": "bitnet-binary"}),
    (["--bits", "fp-4-8", "--method", "lsq"], {"method": "lsq"}),
    (["--bits", "2-2-8", "--act-method", "absmax-token"], {"act_method": "absmax-token"}),
    (["--bits", "2-2-2", "--act-method", "elastic-shift"], {"act_method": "elastic-shift"}),
    (["--bits", "2-2-4", "--act-method", "lsq"], {"act_method": "lsq"}),
    (["--bits", "2-2-4", "--act-method", "lsq-plus"], {"act_method": "lsq-plus"}),
])
def test_flags_reach_quant_config(flags, want):
    args = build_parser().parse_args(["train", *BASE, *flags])
    cfg = TrainConfig.from_flat(resolve_settings(args))
    for k, v in want.items():
        assert getattr(cfg.quant, k) == v
    assert TrainConfig.from_json(cfg.to_json()) == cfg


def test_bad_method_flag_says_how_to_fix():
    args = build_parser().parse_args(["train", *BASE, "--bits", "1-1-1", "--act-method", "minmax"])
    with pytest.raises(ValueError, match=r"act_method='minmax' supports activation bits \(2, "):
        TrainConfig.from_flat(resolve_settings(args))
    args = build_parser().parse_args(["train", *BASE, "--bits", "2-2-8", "--method", "tequila",
                                      "--granularity", "group", "--group-size", "0"])
    with pytest.raises(ValueError, match="group_size must be a positive int"):
        TrainConfig.from_flat(resolve_settings(args))


@pytest.mark.slow
@pytest.mark.parametrize("method,act,bits", [("tequila", "lsq-plus", "fp-2-4"),
                                              ("dlt", "absmax-token", "2-2-8")])
def test_short_distillation_run(tmp_path, method, act, bits):
    from tbt.train.loop import train

    ws = make_workspace(str(tmp_path / "ws"))
    teacher = make_model_dir(ws, "gpt2-tiny", "teacher")
    out = str(tmp_path / "out")
    flat = dict(model=teacher, teacher=teacher, train_file=ws["train"],
                source_column="document", target_column="summary", output_dir=out,
                batch_size=4, lr=3e-3, warmup_ratio=0.0, max_length=48, device="cpu",
                progress=False, seed=0, max_steps=3, bits=bits, method=method, act_method=act,
                group_size=16)
    train(TrainConfig.from_flat(flat))
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        log = [json.loads(line) for line in f]
    assert len(log) == 3 and all(math.isfinite(r["loss"]) for r in log)
