"""The training loop: short runs lower the loss, log every term, stop on NaN, save models."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tbt.train.config import TrainConfig
from tbt.train.loop import NonFiniteLossError, train
from train_helpers import flat_settings, make_model_dir, make_workspace


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    ws = make_workspace(str(tmp_path_factory.mktemp("loop")))
    ws["bart"] = make_model_dir(ws, "bart-tiny", "bart")
    ws["gpt2"] = make_model_dir(ws, "gpt2-tiny", "gpt2")
    return ws


def _log(out: str) -> list[dict]:
    with open(os.path.join(out, "log.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _mean(xs):
    return sum(xs) / len(xs)


@pytest.mark.slow
@pytest.mark.parametrize("family,bits", [("bart", "2-2-8"), ("gpt2", "2-2-2")])
def test_twenty_steps_lower_the_loss(ws, tmp_path, family, bits):
    out = str(tmp_path / "run")
    cfg = TrainConfig.from_flat(flat_settings(ws, out, teacher=ws[family], bits=bits,
                                              max_steps=20, bf16=True))
    result = train(cfg)
    log = _log(out)
    assert [r["step"] for r in log] == list(range(1, 21))
    for r in log:  # every term logged on its own, all finite
        for term in ("ce", "logits", "hidden", "attn", "loss", "grad_norm"):
            assert term in r and torch.isfinite(torch.tensor(r[term])), (term, r)
    # The soft cross-entropy is bounded below by the (random) teacher's entropy, so the total
    # falls slowly; the label cross-entropy falls clearly.
    for term, factor in (("loss", 1.0), ("ce", 0.97)):
        first, last = _mean([r[term] for r in log[:3]]), _mean([r[term] for r in log[-3:]])
        assert last < factor * first, (term, first, last)
    assert "val_loss" in log[-1]
    # the saved student reloads quantized, with trained α, and the configs sit next to it
    from tbt.hf import load_pretrained
    from tbt.quant.activation import ElasticQuantizer, MinMaxQuantizer

    model, tok = load_pretrained(out)
    assert tok is not None
    assert model.config.quantization_config.to_quant_config().bits == bits
    kinds = (ElasticQuantizer,) if bits.endswith("-2") else (MinMaxQuantizer,)
    assert any(isinstance(m, kinds) for m in model.modules())
    for name in ("tbt_config.json", "train_config.json"):
        assert os.path.isfile(os.path.join(out, name))
    saved = TrainConfig.from_json(open(os.path.join(out, "train_config.json")).read())
    assert saved == cfg
    sd, live = model.state_dict(), result["model"].state_dict()
    assert all(torch.equal(sd[k], live[k]) for k in sd)


@pytest.mark.slow
def test_full_precision_training_from_a_preset(ws, tmp_path):
    out = str(tmp_path / "fp")
    cfg = TrainConfig.from_flat(flat_settings(ws, out, model="bart-tiny", bits="fp",
                                              tokenizer=ws["tokenizer"], max_steps=20))
    train(cfg)
    log = _log(out)
    assert set(log[0]) >= {"ce", "loss"} and "logits" not in log[0]  # no teacher: labels only
    assert _mean([r["loss"] for r in log[-3:]]) < _mean([r["loss"] for r in log[:3]])


@pytest.mark.slow
def test_grad_accumulation_and_term_weights(ws, tmp_path):
    out = str(tmp_path / "acc")
    cfg = TrainConfig.from_flat(flat_settings(ws, out, teacher=ws["bart"], bits="1-1-8",
                                              max_steps=2, grad_accum=2, w_hidden=0, w_attn=0,
                                              mask_padding=False))
    result = train(cfg)
    r = _log(out)[-1]
    assert "hidden" not in r and "attn" not in r
    assert r["loss"] == pytest.approx(r["ce"] + r["logits"], rel=1e-5)
    assert result["steps"] == 2


def test_nan_stops_with_step_and_term(ws, tmp_path):
    from tbt.hf import load_pretrained

    teacher, tok = load_pretrained(ws["bart"])
    with torch.no_grad():
        teacher.model.decoder.layernorm_embedding.weight[0] = float("nan")
    bad = str(tmp_path / "nan_teacher")
    teacher.save_pretrained(bad)
    tok.save_pretrained(bad)
    cfg = TrainConfig.from_flat(flat_settings(ws, str(tmp_path / "nan"), model=ws["bart"],
                                              teacher=bad, bits="2-2-8", max_steps=3))
    with pytest.raises(NonFiniteLossError, match=r"'logits' is nan at step 1"):
        train(cfg)


@pytest.mark.parametrize("family", ["bart", "gpt2"])
def test_masked_terms_ignore_padding(ws, family):
    """mask_padding=True: appending padding changes no term; False (released): it does."""
    import copy

    from tbt.hf import load_pretrained
    from tbt.train.config import DistillConfig
    from tbt.train.objective import forward_kwargs, loss_terms

    teacher, _ = load_pretrained(ws[family])
    teacher.set_attn_implementation("eager")
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # a different student, so every term is non-zero
        for p in student.parameters():
            p.add_(0.05 * torch.randn_like(p))
    teacher.eval(), student.eval()
    seq2seq = family == "bart"
    ids = torch.tensor([[0, 17, 25, 33, 41, 2]])
    labels = torch.tensor([[0, 19, 27, 2]]) if seq2seq else ids.clone()
    pad = 1
    padded = {"input_ids": torch.cat([ids, torch.full((1, 3), pad)], 1),
              "attention_mask": torch.cat([torch.ones(1, 6), torch.zeros(1, 3)], 1).long(),
              "labels": torch.cat([labels, torch.full((1, 2 if seq2seq else 3), -100)], 1)}
    plain = {"input_ids": ids, "attention_mask": torch.ones(1, 6).long(), "labels": labels}
    for mask_padding in (True, False):
        dcfg = DistillConfig(mask_padding=mask_padding)
        kw = forward_kwargs(dcfg, True)
        terms = [loss_terms(student(**b, **kw), teacher(**b, **kw), b, dcfg, seq2seq)
                 for b in (plain, padded)]
        for name in ("logits", "hidden", "attn"):
            a, b = float(terms[0][name].detach()), float(terms[1][name].detach())
            if mask_padding:
                assert a == pytest.approx(b, rel=1e-5), name
            else:
                assert a != pytest.approx(b, rel=1e-6), name
