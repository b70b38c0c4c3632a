"""``tbt train`` with LR-QAT: low-rank training of a tiny model ends in a packed checkpoint."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch
from train_helpers import flat_settings, make_model_dir, make_workspace


@pytest.mark.slow
def test_tbt_train_with_lrqat_writes_a_packed_checkpoint(tmp_path):
    """``TrainConfig(lrqat_rank=...)``: only A, B, scales train; the run ends merged + packed."""
    from tbt.inference.packed import PackedLinear
    from tbt.train.config import TrainConfig
    from tbt.train.loop import train

    ws = make_workspace(str(tmp_path / "ws"))
    start = make_model_dir(ws, "gpt2-tiny", "gpt2")
    out = str(tmp_path / "run")
    cfg = TrainConfig.from_flat(flat_settings(ws, out, model=start, bits="2-2-8", max_steps=6,
                                              w_logits=0, w_hidden=0, w_attn=0, lrqat_rank=4,
                                              lrqat_alpha=4.0, lrqat_checkpoint=True,
                                              save_every=3, keep_checkpoints=3))
    assert TrainConfig.from_json(cfg.to_json()) == cfg
    result = train(cfg)
    model = result["model"]
    # mid-run checkpoints hold the LR-QAT layers: resuming from step 3 gives the same result
    shutil.rmtree(f"{out}/checkpoints/step-000006")
    again = train(dataclasses.replace(cfg, resume=True))["model"].state_dict()
    assert all(torch.equal(v, again[k]) for k, v in model.state_dict().items())
    assert sum(isinstance(m, PackedLinear) for m in model.modules()) == 8
    loaded = _load_torch(f"{out}/packed")
    ids = torch.randint(3, 100, (1, 10))
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, model.eval()(input_ids=ids).logits
    # same weights and ops; with 2+ torch threads the GEMM may split sums differently between two
    # model instances (bit-equal with 1 thread), so float32 rounding is the tolerance
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="ternary or binary"):
        TrainConfig.from_flat(flat_settings(ws, out, model=start, max_steps=1, lrqat_rank=4))


def _load_torch(path):
    """``load_packed`` on the exact torch path (the integer-kernel path is close, not equal)."""
    import inspect

    from tbt.export.io import load_packed

    params = inspect.signature(load_packed).parameters
    return load_packed(path, **({"backend": "torch"} if "backend" in params else {}))


def test_lrqat_scale_lr_gives_the_scales_their_own_learning_rate(tmp_path):
    """``--lrqat-scale-lr``: the optimizer ``train`` builds has the A·B group at ``lr`` and the
    scale group at the scale LR (docs/related.md §16), recorded in train_config.json and kept by the
    schedule; without it, one group at ``lr`` (no change)."""
    import json

    from tbt.cli import build_parser
    from tbt.cli.train import resolve_settings
    from tbt.quant.lrqat import lrqat_parameters
    from tbt.train.build import build_models, load_tokenizer
    from tbt.train.config import TrainConfig
    from tbt.train.loop import build_optimizer, train

    args = build_parser().parse_args(["train", "--output-dir", "x", "--lrqat-scale-lr", "0.05"])
    assert resolve_settings(args)["lrqat_scale_lr"] == 0.05  # the flag reaches the settings
    ws = make_workspace(str(tmp_path / "ws"))
    start = make_model_dir(ws, "gpt2-tiny", "gpt2")
    out = str(tmp_path / "run")
    flat = flat_settings(ws, out, model=start, bits="2-2-8", max_steps=2, lr=1e-3, w_logits=0,
                         w_hidden=0, w_attn=0, lrqat_rank=2, save_every=1)
    cfg = TrainConfig.from_flat({**flat, "lrqat_scale_lr": 0.05})
    _, student = build_models(cfg, load_tokenizer(cfg))
    opt = build_optimizer(student, cfg)
    groups = {g["name"]: g for g in opt.param_groups}
    assert {n: g["lr"] for n, g in groups.items()} == {"lrqat_ab": 1e-3, "lrqat_scales": 0.05}
    want = lrqat_parameters(student)
    assert [id(p) for p in groups["lrqat_ab"]["params"]] == [id(p) for p in want["ab"]]
    assert [id(p) for p in groups["lrqat_scales"]["params"]] == [id(p) for p in want["scales"]]
    assert want["ab"] and want["scales"]
    one = build_optimizer(student, TrainConfig.from_flat(flat))  # default: the main lr
    assert len(one.param_groups) == 1 and one.param_groups[0]["lr"] == 1e-3

    train(cfg)
    with open(f"{out}/train_config.json") as f:
        assert json.load(f)["lrqat_scale_lr"] == 0.05
    state = torch.load(f"{out}/checkpoints/step-000001/optimizer.pt", weights_only=False)
    base = {g["name"]: g["initial_lr"] for g in state["param_groups"]}
    assert base == {"lrqat_ab": 1e-3, "lrqat_scales": 0.05}
    lrs = [g["lr"] for g in state["param_groups"]]
    assert lrs[1] / lrs[0] == pytest.approx(50.0)  # the schedule scales both alike
    with pytest.raises(ValueError, match="--lrqat-rank"):
        TrainConfig.from_flat({**flat, "lrqat_rank": 0, "lrqat_scale_lr": 0.05})
