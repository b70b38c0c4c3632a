"""The copy warm-up: a synthetic copy task that starts a from-scratch seq2seq model copying.

A small encoder-decoder trained from random weights on real text first learns the targets'
language model and ignores its input for a long, unpredictable time. A few hundred steps on a
synthetic copy task (random token ids; the target is the first source tokens,
:func:`copy_warmup_batch`) teach it to read the source through cross attention, position by
position, first.

One loop (:func:`copy_task_steps`) runs the task; two callers set it up:

* :func:`copy_warmup`: ``tbt train``'s warm-up of the student (``cfg.copy_warmup_steps``), on
  the run's accelerator, with its softmax over the first ``COPY_WARMUP_VOCAB`` ids and an early
  stop once it copies;
* :func:`copy_warmup_from_scratch`: the teacher's first phase in ``tbt demo`` and
  ``tbt replicate``: a fixed number of steps from a freshly built preset, saved to a folder
  that ``tbt train`` continues from.

``docs/training.md`` ("The copy warm-up" and "Notes: the demo corpus and the copy warm-up") has
the measurements behind these settings.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable
from typing import Any

__all__ = ["copy_warmup_batch", "copy_task_steps", "copy_warmup", "copy_warmup_from_scratch",
           "COPY_WARMUP_VOCAB", "COPY_WARMUP_STOP_CE"]

logger = logging.getLogger(__name__)

# tbt train's warm-up: tokens and softmax over the first 1000 ids (docs/training.md, "The copy
# warm-up", for the runs that chose it); it ends once the last 10 steps average below 0.3
COPY_WARMUP_VOCAB = 1000
COPY_WARMUP_STOP_CE = 0.3


def copy_warmup_batch(batch_size: int, vocab_size: int, source_length: int = 62,
                      target_length: int = 24, generator=None, bos_token_id: int = 0,
                      eos_token_id: int = 2) -> dict:
    """A batch of the synthetic copy task that starts a from-scratch seq2seq model copying.

    Random token ids; labels = ``<s>`` + the first ``target_length`` source tokens + ``</s>``.
    Used for warm-up only, never evaluated.

    Returns ``{"input_ids": (B, source_length + 2), "attention_mask", "labels": (B,
    target_length + 2)}`` long tensors; ``bos_token_id``/``eos_token_id`` (default 0/2, BART's
    and tbt's tokenizers) are ``<s>``/``</s>``, the tokens are drawn from ``[5, vocab_size - 1)``
    (no special tokens, no ``<mask>``).
    """
    import torch

    if target_length > source_length:
        raise ValueError("target_length must be <= source_length")
    body = torch.randint(5, vocab_size - 1, (batch_size, source_length), generator=generator)
    bos = torch.full((batch_size, 1), bos_token_id, dtype=torch.long)
    eos = torch.full((batch_size, 1), eos_token_id, dtype=torch.long)
    ids = torch.cat([bos, body, eos], dim=1)  # (B, S + 2)
    labels = torch.cat([ids[:, : target_length + 1], eos], dim=1)  # (B, T + 2)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}


def copy_task_steps(model, *, steps: int, batch_size: int, lr: float, vocab: int,
                    source_length: int, target_length: int, seed: int, bos_token_id: int = 0,
                    eos_token_id: int = 2, softmax_vocab: int | None = None,
                    device: Any = "cpu", autocast: Callable[[], Any] = contextlib.nullcontext,
                    log_path: str | None = None, stop_ce: float | None = None,
                    progress: bool = False) -> list[float]:
    """Train ``model`` in place on the copy task; returns the cross-entropy of each step run.

    Fresh batches of :func:`copy_warmup_batch` (tokens from ``[5, vocab − 1)``, generator
    seeded by ``seed``), AdamW at the constant ``lr`` (torch's defaults otherwise: eps 1e-8,
    weight decay 0.01) over the parameters that require gradients, clipping at 1, label
    cross-entropy only. ``softmax_vocab``: the cross-entropy over the first ``softmax_vocab``
    logits only (None: all of them). ``autocast()``: the context of the forward. A non-finite
    loss raises :class:`~tbt.train.objective.NonFiniteLossError` before the update.
    ``log_path``: one ``{"step", "ce"}`` JSON line per step. ``stop_ce``: stop once the mean of
    the last 10 steps is below it. The caller sets the model's mode (dropout off).
    """
    import torch
    from tqdm.auto import tqdm

    from tbt.train.objective import NonFiniteLossError

    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    losses: list[float] = []
    log = open(log_path, "w", encoding="utf-8") if log_path else contextlib.nullcontext()
    with log:
        for k in tqdm(range(1, steps + 1), desc="copy warm-up", unit="step",
                      disable=not progress):
            batch = copy_warmup_batch(batch_size, vocab, source_length, target_length,
                                      generator=gen, bos_token_id=bos_token_id,
                                      eos_token_id=eos_token_id)
            batch = {n: v.to(device) for n, v in batch.items()}
            with autocast():
                logits = model(**batch).logits
            if softmax_vocab is not None:
                logits = logits[..., :softmax_vocab]
            logits = logits.float()
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                                     batch["labels"].reshape(-1))
            if not torch.isfinite(loss):
                raise NonFiniteLossError(f"copy warm-up loss is {float(loss.detach())} at "
                                         f"step {k}; lower --copy-warmup-lr")
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
            if log_path:
                log.write(json.dumps({"step": k, "ce": losses[-1]}) + "\n")
                if k % 25 == 0:
                    log.flush()
            if (stop_ce is not None and len(losses) >= 10
                    and sum(losses[-10:]) / 10 < stop_ce):
                break
    return losses


def copy_warmup(student, cfg, acc, log_path: str | None, main: bool = True) -> dict[str, Any]:
    """``tbt train``'s warm-up: ``student`` for up to ``cfg.copy_warmup_steps`` steps of
    :func:`copy_task_steps` on ``acc`` (a :class:`~tbt.train.config.TrainConfig` run's
    accelerator), batch ``cfg.copy_warmup_batch_size``, lr ``cfg.copy_warmup_lr``, tokens and
    softmax over the first ``COPY_WARMUP_VOCAB`` ids, stopping at ``COPY_WARMUP_STOP_CE``;
    dropout off (a full-precision student runs in eval mode). Sources are
    ``min(62, max_source_length − 2)`` tokens, targets their first
    ``min(24, max_target_length − 2)``. Seeded by ``cfg.seed``, so every process computes the
    same weights. Each step's loss goes to ``copy_warmup.jsonl`` next to ``log_path``.

    Returns ``{"steps", "ce_first", "ce_last", "train_time_s", "log"}`` (``steps``: those run;
    ``ce_last``: the mean of the last 10). A ``ce_last`` above 1 nat is logged as a warning:
    the model has not started copying (it still may on the real data).
    """
    t0 = time.time()
    conf = student.config
    vocab = min(conf.vocab_size, COPY_WARMUP_VOCAB)
    src = max(2, min(62, cfg.data.max_source_length - 2))
    tgt = max(1, min(24, src, cfg.data.max_target_length - 2))
    path = None if log_path is None else os.path.join(os.path.dirname(log_path),
                                                        "copy_warmup.jsonl")
    student.to(acc.device)
    student.train(cfg.quant is not None)  # eval mode = no dropout (BART has no batch norm)
    losses = copy_task_steps(
        student, steps=cfg.copy_warmup_steps, batch_size=cfg.copy_warmup_batch_size,
        lr=cfg.copy_warmup_lr, vocab=vocab, source_length=src, target_length=tgt,
        seed=cfg.seed,
        bos_token_id=conf.bos_token_id if conf.bos_token_id is not None else 0,
        eos_token_id=conf.eos_token_id if conf.eos_token_id is not None else 2,
        softmax_vocab=vocab, device=acc.device, autocast=acc.autocast, log_path=path,
        stop_ce=COPY_WARMUP_STOP_CE)
    student.train()
    tail = losses[-10:]
    out = {"steps": len(losses), "ce_first": losses[0], "ce_last": sum(tail) / len(tail),
           "train_time_s": time.time() - t0, "log": path}
    if main:
        print(f"copy warm-up: {out['steps']} steps, cross-entropy {out['ce_first']:.2f} -> "
              f"{out['ce_last']:.2f} ({out['train_time_s']:.0f} s)", flush=True)
        if out["ce_last"] > 1.0:
            logger.warning("the copy warm-up ended at cross-entropy %.2f: the model has not "
                           "started copying yet (raise --copy-warmup-steps)", out["ce_last"])
    return out


def copy_warmup_from_scratch(architecture: str, tok, out_dir: str, *, steps: int,
                             batch_size: int, lr: float, max_source_length: int, seed: int,
                             bf16: bool = False, model_overrides: dict | None = None,
                             progress: bool = False) -> dict[str, Any]:
    """A teacher's first phase (``tbt demo``, ``tbt replicate``): ``steps`` of
    :func:`copy_task_steps` (all ``len(tok)`` ids, softmax over the whole vocabulary, no early
    stop, bf16 autocast if ``bf16``) from a random ``architecture`` preset built with dropout 0
    after ``torch.manual_seed(seed)``; saved to ``out_dir`` with the preset's dropout restored,
    with its tokenizer, for ``tbt train`` to continue. Returns ``{"log": log.jsonl path,
    "train_time_s": s}``."""
    import torch

    from tbt.train.presets import ARCHITECTURES, build_from_scratch

    t0 = time.time()
    torch.manual_seed(seed)
    model = build_from_scratch(architecture, len(tok), tok.pad_token_id, tok.bos_token_id,
                               tok.eos_token_id, **{**dict(model_overrides or {}),
                                                    "dropout": 0.0}).train()
    os.makedirs(out_dir, exist_ok=True)
    log_path = os.path.join(out_dir, "log.jsonl")
    src = min(62, max_source_length - 2)
    copy_task_steps(model, steps=steps, batch_size=batch_size, lr=lr, vocab=len(tok),
                    source_length=src, target_length=min(24, src), seed=seed,
                    autocast=lambda: torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16),
                    log_path=log_path, progress=progress)
    model.config.dropout = ARCHITECTURES[architecture].get("dropout", 0.0)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    return {"log": log_path, "train_time_s": time.time() - t0}
