"""tbt.train.warmup: the copy-task batches and the one warm-up loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tbt.train.warmup import copy_task_steps, copy_warmup_batch


def test_copy_warmup_batch():
    g = torch.Generator().manual_seed(0)
    b = copy_warmup_batch(4, 300, source_length=10, target_length=3, generator=g)
    assert b["input_ids"].shape == (4, 12) and b["labels"].shape == (4, 5)
    assert (b["input_ids"][:, 0] == 0).all() and (b["input_ids"][:, -1] == 2).all()
    assert torch.equal(b["labels"][:, :4], b["input_ids"][:, :4])  # <s> + 3 copied tokens
    assert (b["labels"][:, -1] == 2).all() and b["attention_mask"].all()
    body = b["input_ids"][:, 1:-1]
    assert body.min() >= 5 and body.max() < 299
    again = copy_warmup_batch(4, 300, source_length=10, target_length=3,
                              generator=torch.Generator().manual_seed(0))
    assert torch.equal(again["input_ids"], b["input_ids"])


def _tiny():
    from tbt.train.presets import build_from_scratch

    torch.manual_seed(0)
    return build_from_scratch("bart-tiny", 64, 1, 0, 2, dropout=0.0, d_model=16,
                              encoder_layers=1, decoder_layers=1)


@pytest.mark.parametrize("softmax_vocab", [None, 40])
def test_first_loss_is_the_cross_entropy_of_the_first_batch(softmax_vocab):
    model = _tiny().eval()
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    losses = copy_task_steps(model, steps=1, batch_size=3, lr=1e-3, vocab=40, source_length=8,
                             target_length=4, seed=7, softmax_vocab=softmax_vocab)
    # independent: the same batch from the same seed, the unchanged model, float64 log-softmax
    model.load_state_dict(ref)
    batch = copy_warmup_batch(3, 40, 8, 4, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(**batch).logits.double().numpy()
    if softmax_vocab is not None:
        logits = logits[..., :softmax_vocab]
    z = logits - logits.max(-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
    labels = batch["labels"].numpy()
    want = -np.take_along_axis(logp, labels[..., None], -1).mean()
    assert losses[0] == pytest.approx(want, rel=1e-5)


def test_stop_ce_ends_after_ten_steps_and_logs_each_step(tmp_path):
    log = tmp_path / "w.jsonl"
    losses = copy_task_steps(_tiny(), steps=30, batch_size=2, lr=1e-3, vocab=40,
                             source_length=6, target_length=3, seed=0, log_path=str(log),
                             stop_ce=float("inf"))
    assert len(losses) == 10  # the first point where a 10-step mean exists
    assert len(log.read_text().splitlines()) == 10
    assert len(copy_task_steps(_tiny(), steps=12, batch_size=2, lr=1e-3, vocab=40,
                               source_length=6, target_length=3, seed=0)) == 12
