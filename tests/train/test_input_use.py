"""The input-use check (true vs deranged sources) on constructed models, and the copy warm-up
and the check inside train()."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from tbt.train.loop import (INPUT_USE_MARGIN, INPUT_USE_REL_MARGIN, derange, derange_prompts,
                            input_use_check)

V, S = 12, 6  # vocabulary, sequence length


class Toy(torch.nn.Module):
    """A seq2seq stand-in. ``use_input``: the logits at target position t are ``scale`` on the
    source token at position t (a perfect copier); otherwise one fixed distribution."""

    def __init__(self, use_input: bool, scale: float = 3.0) -> None:
        super().__init__()
        self.use_input, self.scale = use_input, scale
        self.bias = torch.nn.Parameter(torch.linspace(0, 1, V))

    def forward(self, input_ids, attention_mask=None, labels=None, **kw):
        b, t = labels.shape
        if self.use_input:
            logits = self.scale * torch.nn.functional.one_hot(input_ids[:, :t], V).float()
        else:
            logits = self.bias.expand(b, t, V)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), labels.reshape(-1),
                                                 ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def _rows(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        src = rng.integers(0, V, S).tolist()
        rows.append({"input_ids": src, "labels": list(src)})  # copy task: target = source
    return rows


def _collate(rows):
    ids = torch.tensor([r["input_ids"] for r in rows])
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids),
            "labels": torch.tensor([r["labels"] for r in rows])}


def _reference(rows, batch_size: int, scale: float) -> tuple[float, float]:
    """float64 CE of the perfect copier with the true and the cyclically shifted sources."""
    lse = math.log(math.exp(scale) + V - 1)
    true, shuf, n = 0.0, 0.0, 0
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        if len(chunk) < 2:
            continue
        srcs = [r["input_ids"] for r in chunk]
        shifted = srcs[-1:] + srcs[:-1]  # torch.roll(shifts=1): row j gets row j-1's source
        for r, s in zip(chunk, shifted):
            for y, x_true, x_shuf in zip(r["labels"], r["input_ids"], s):
                true += lse - scale * (y == x_true)
                shuf += lse - scale * (y == x_shuf)
                n += 1
    return true / n, shuf / n


def test_derange_moves_every_source():
    batch = _collate(_rows(5))
    d = derange(batch)
    assert torch.equal(d["labels"], batch["labels"])
    for j in range(5):
        assert torch.equal(d["input_ids"][j], batch["input_ids"][(j - 1) % 5])


def test_a_model_that_copies_its_input_passes():
    rows = _rows(21)  # batches of 8, 8, 5
    use = input_use_check(Toy(True), rows, _collate, batch_size=8)
    ref_true, ref_shuf = _reference(rows, 8, 3.0)
    assert use["ce"] == pytest.approx(ref_true, rel=1e-5)
    assert use["ce_shuffled"] == pytest.approx(ref_shuf, rel=1e-5)
    assert use["gap"] > INPUT_USE_MARGIN and use["ok"] is True
    # a weak copier (scale 0.2): the gap passes the absolute margin but not a relative one of
    # 10 % of the loss
    ref_true, ref_shuf = _reference(rows, 8, 0.2)
    assert INPUT_USE_MARGIN < ref_shuf - ref_true < 0.1 * ref_true
    weak = input_use_check(Toy(True, scale=0.2), rows, _collate, batch_size=8, rel_margin=0.1)
    assert weak["gap"] == pytest.approx(ref_shuf - ref_true, rel=1e-4)
    assert weak["ok"] is False
    ok = (ref_shuf - ref_true) >= INPUT_USE_REL_MARGIN * ref_true  # the default margin
    assert input_use_check(Toy(True, scale=0.2), rows, _collate, batch_size=8)["ok"] is ok


def test_a_model_that_ignores_its_input_fails():
    rows = _rows(17)  # the last batch has one row: skipped
    use = input_use_check(Toy(False), rows, _collate, batch_size=8)
    assert use["gap"] == 0.0 and use["ok"] is False
    assert input_use_check(Toy(True), rows[:1], _collate, batch_size=8) is None


class CausalToy(Toy):
    """A decoder-only stand-in: at every position the logits are ``scale`` on the sequence's
    first token (``use_input``) or one fixed distribution; the loss shifts the labels by one,
    as transformers' causal LMs do."""

    def forward(self, input_ids, attention_mask=None, labels=None, **kw):
        b, t = input_ids.shape
        if self.use_input:
            logits = self.scale * torch.nn.functional.one_hot(input_ids[:, :1], V).float()
            logits = logits.expand(b, t, V)
        else:
            logits = self.bias.expand(b, t, V)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, V),
                                                 labels[:, 1:].reshape(-1), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def _prompt_rows(n: int, seed: int = 1) -> list[dict]:
    """prompt (1-4 tokens) + target (2-3 copies of the prompt's first token), labels on the
    target only (tbt.data.tokenize_prompt_target's layout)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        p = rng.integers(0, V, int(rng.integers(1, 5))).tolist()
        t = [p[0]] * int(rng.integers(2, 4))
        rows.append({"input_ids": p + t, "attention_mask": [1] * (len(p) + len(t)),
                     "labels": [-100] * len(p) + t})
    return rows


def _pad_collate(rows):
    w = max(len(r["input_ids"]) for r in rows)
    return {"input_ids": torch.tensor([r["input_ids"] + [0] * (w - len(r["input_ids"]))
                                      for r in rows]),
            "attention_mask": torch.tensor([r["attention_mask"] + [0] * (w - len(r["input_ids"]))
                                           for r in rows]),
            "labels": torch.tensor([r["labels"] + [-100] * (w - len(r["labels"])) for r in rows])}


def test_derange_prompts_hand_example():
    rows = [{"input_ids": [1, 2, 7, 7], "labels": [-100, -100, 7, 7]},
            {"input_ids": [3, 8], "labels": [-100, 8]},
            {"input_ids": [4, 5, 6, 9, 9, 9], "labels": [-100, -100, -100, 9, 9, 9]}]
    d = derange_prompts(rows)
    assert [r["input_ids"] for r in d] == [[4, 5, 6, 7, 7], [1, 2, 8], [3, 9, 9, 9]]
    assert [r["labels"] for r in d] == [[-100, -100, -100, 7, 7], [-100, -100, 8],
                                        [-100, 9, 9, 9]]
    assert [r["attention_mask"] for r in d] == [[1] * 5, [1] * 3, [1] * 4]


def test_decoder_only_check_against_a_float64_reference():
    rows = _prompt_rows(19)  # batches of 8, 8, 3
    use = input_use_check(CausalToy(True), rows, _pad_collate, batch_size=8, prompt_target=True)
    lse = math.log(math.exp(3.0) + V - 1)
    true = shuf = 0.0
    n = 0
    for i in range(0, len(rows), 8):
        chunk = rows[i:i + 8]
        firsts = [r["input_ids"][0] for r in chunk]
        for j, r in enumerate(chunk):
            for y in (v for v in r["labels"] if v != -100):
                true += lse - 3.0 * (y == firsts[j])
                shuf += lse - 3.0 * (y == firsts[j - 1])  # the previous example's prompt
                n += 1
    assert use["ce"] == pytest.approx(true / n, rel=1e-5)
    assert use["ce_shuffled"] == pytest.approx(shuf / n, rel=1e-5)
    assert use["ok"] is True
    ignore = input_use_check(CausalToy(False), rows, _pad_collate, batch_size=8,
                             prompt_target=True)
    assert ignore["gap"] == pytest.approx(0.0, abs=1e-6) and ignore["ok"] is False


def test_bart_with_its_cross_attention_cut_ignores_its_input():
    """A real BART whose cross-attention outputs are zeroed cannot see the source: the check
    finds the two losses equal; the same model in train mode is restored afterwards."""
    from tbt.train.presets import build_from_scratch

    torch.manual_seed(0)
    model = build_from_scratch("bart-tiny", V, d_model=16, encoder_layers=1, decoder_layers=1,
                               encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
                               decoder_attention_heads=2, max_position_embeddings=32)
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.encoder_attn.out_proj.weight.zero_()
            layer.encoder_attn.out_proj.bias.zero_()
    model.train()
    use = input_use_check(model, _rows(16), _collate, batch_size=8)
    assert use["ce"] == use["ce_shuffled"] and use["ok"] is False
    assert model.training


def test_train_runs_the_copy_warmup_and_logs_the_check(tmp_path, capsys):
    from tbt.hf import load_pretrained
    from tbt.train.config import TrainConfig
    from tbt.train.loop import train

    from train_helpers import TINY, flat_settings, make_model_dir, make_workspace

    ws = make_workspace(str(tmp_path / "ws"))
    start = make_model_dir(ws, "bart-tiny", "bart")
    assert TINY["bart-tiny"]["d_model"] == 32
    out = str(tmp_path / "run")
    cfg = TrainConfig.from_flat(flat_settings(ws, out, model=start, bits="fp", max_steps=2,
                                              copy_warmup_steps=25, copy_warmup_batch_size=8))
    before = {k: v.clone() for k, v in load_pretrained(start)[0].state_dict().items()}
    result = train(cfg)
    warm = [json.loads(x) for x in open(os.path.join(out, "copy_warmup.jsonl"))]
    assert [r["step"] for r in warm] == list(range(1, 26))
    assert result["copy_warmup"]["steps"] == 25
    # random targets over min(vocab, 1000) = 300 ids: the loss falls from ~log(300)
    assert result["copy_warmup"]["ce_last"] < result["copy_warmup"]["ce_first"]
    assert any(not torch.equal(before[k], v) for k, v in result["model"].state_dict().items()
               if k in before)
    last = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))][-1]
    use = result["input_use"]
    assert {k: last[f"input_use_{k}"] for k in use} == use
    assert use["ok"] == (use["ce_shuffled"] - use["ce"]
                         >= max(INPUT_USE_MARGIN, INPUT_USE_REL_MARGIN * use["ce"]))
    assert use["ce"] == pytest.approx(last["val_ce"], rel=1e-4)  # same rows, same loss
    err = capsys.readouterr().err
    assert ("WARNING: the model does not use its input" in err) == (not use["ok"])
    saved = TrainConfig.from_json(open(os.path.join(out, "train_config.json")).read())
    assert saved.copy_warmup_steps == 25


def test_resume_does_not_repeat_the_copy_warmup(tmp_path):
    from tbt.train.config import TrainConfig
    from tbt.train.loop import train

    from train_helpers import flat_settings, make_model_dir, make_workspace

    ws = make_workspace(str(tmp_path / "ws"))
    start = make_model_dir(ws, "bart-tiny", "bart")
    out = str(tmp_path / "run")
    kw = dict(model=start, bits="fp", copy_warmup_steps=4, copy_warmup_batch_size=4,
              save_every=1)
    first = train(TrainConfig.from_flat(flat_settings(ws, out, max_steps=1, **kw)))
    assert first["copy_warmup"]["steps"] == 4
    warm_log = open(os.path.join(out, "copy_warmup.jsonl")).read()
    again = train(TrainConfig.from_flat(flat_settings(ws, out, max_steps=2, resume=True, **kw)))
    assert again["copy_warmup"] is None and again["steps"] == 2
    assert open(os.path.join(out, "copy_warmup.jsonl")).read() == warm_log
