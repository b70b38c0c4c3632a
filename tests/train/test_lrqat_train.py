"""``tbt train`` with LR-QAT: low-rank training of a tiny model ends in a packed checkpoint."""

from __future__ import annotations

import dataclasses
import shutil

import pytest
import torch

from train_helpers import flat_settings, make_model_dir, make_workspace


def test_tbt_train_with_lrqat_writes_a_packed_checkpoint(tmp_path):
    """``TrainConfig(lrqat_rank=...)``: only A, B, scales train; the run ends merged + packed."""
    from tbt.export.convert import PackedLinear
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
