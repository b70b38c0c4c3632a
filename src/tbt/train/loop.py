"""The distillation training loop, nanoGPT-style, on accelerate.

``train(cfg)`` reads top to bottom:

1. **models**: the teacher is a full-precision model in eval mode, without gradients, with eager
   attention so it returns its attention probabilities; the student is a copy of the teacher
   (or ``cfg.model``: a checkpoint, or a preset built from scratch) converted in place by
   :func:`tbt.quant.surgery.quantize_model` (``cfg.quant=None``: full-precision training);
2. **data**: rows are tokenized once; micro-batch ``m`` of the run is batch ``m % E`` of epoch
   ``m // E``, and each epoch's order is a permutation drawn from a generator seeded with
   ``(seed, epoch)``, split across processes like ``DistributedSampler``. The data position is
   therefore a single integer, and resuming needs nothing else;
3. **α calibration** on the first micro-batch, averaged over processes, so every replica starts
   from the same α (:func:`tbt.quant.activation.calibrate`);
4. **AdamW** with a linear warmup then linear decay to zero (:func:`build_optimizer`; LR-QAT
   may give its scales their own learning rate, ``--lrqat-scale-lr``);
4b. **copy warm-up** (``cfg.copy_warmup_steps``, the default of the BART presets trained from
   scratch): the seq2seq student first learns the synthetic copy task (:func:`copy_warmup`),
   logged to ``copy_warmup.jsonl``; not on resume (the checkpoint holds its result);
5. **resume** (``cfg.resume``): weights, optimizer, scheduler, RNG states and the step are
   restored from the last checkpoint, so the run continues exactly as if never interrupted;
6. **the loop**: student forward, teacher forward under ``no_grad``, named loss terms
   (:mod:`tbt.train.objective`), a finiteness check *before* the update (a NaN/inf stops the run
   with the step and the term), backward, clipping, step, schedule, a log line per step
   (``log.jsonl``), checkpoints (:mod:`tbt.train.checkpoint`) and validation loss; a seq2seq
   model's validation also measures whether it uses its input (:func:`input_use_check`: the
   loss with the sources deranged across the batch against the true sources), and the run
   ends with a WARNING when it does not;
7. **save**: the final student with ``save_pretrained`` (+ tokenizer, ``tbt_config.json``,
   ``train_config.json``) into ``cfg.output_dir``, file by file atomically.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import random
import time
from typing import Any

import torch

from tbt.train.build import build_models, data_task, load_data, load_tokenizer, save_final
from tbt.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint, truncate_log
from tbt.train.config import TrainConfig
from tbt.train.objective import (NonFiniteLossError, distill_forward, first_non_finite,
                                 total_loss)
from tbt.train.warmup import copy_warmup

logger = logging.getLogger(__name__)


# A seq2seq model "uses its input" when deranging the sources across the batch raises its
# validation cross-entropy by at least INPUT_USE_MARGIN nats per target token and by at least
# INPUT_USE_REL_MARGIN of the true-source cross-entropy. Measured on bart-tiny trained on real
# data (docs/training.md): a model writing the empty string for 82 % of its test sources had a
# gap of 0.14 nats (2.9 % of its loss of 4.97); models writing varied output that copies
# words of the source 0.38 (7.4 %, Debian summaries) and 1.45 (44 %, UI strings).
INPUT_USE_MARGIN = 0.1
INPUT_USE_REL_MARGIN = 0.05
INPUT_USE_ROWS = 64  # training rows checked at the end when there is no validation split


def train(cfg: TrainConfig) -> dict[str, Any]:
    """Train (distil) a student as ``cfg`` says; returns the final losses and paths."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from tqdm.auto import tqdm

    # One process may train several models (the demo) with different precisions: forget the
    # previous run's settings, keep the process group.
    AcceleratorState._reset_state(reset_partial_state=False)
    acc = Accelerator(cpu=cfg.device == "cpu", mixed_precision="bf16" if cfg.bf16 else "no")
    if cfg.device == "cuda" and acc.device.type != "cuda":
        raise ValueError("--device cuda, but no CUDA device is available: use --device cpu")
    if cfg.bf16 and acc.device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError("--bf16: this GPU has no bfloat16 support; train without --bf16")
    main, rank, world = acc.is_main_process, acc.process_index, acc.num_processes
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    ckpt = latest_checkpoint(cfg.output_dir)
    if ckpt is not None and not cfg.resume:
        raise ValueError(f"{cfg.output_dir} holds checkpoints of an earlier run ({ckpt}): pass "
                         "--resume to continue it, or choose another --output-dir")
    os.makedirs(cfg.output_dir, exist_ok=True)
    if main:
        logger.debug("resolved config:\n%s", cfg.to_json())

    from tbt.data import load_raw_splits

    raw = load_raw_splits(cfg.data, ("train", "validation"))  # a bad file fails before models
    tokenizer = load_tokenizer(cfg)
    teacher, student = build_models(cfg, tokenizer)
    seq2seq = bool(student.config.is_encoder_decoder)
    target_only = data_task(cfg, student) == "prompt-target"  # decoder-only seq2seq
    splits, collate = load_data(cfg, tokenizer, student, raw)
    plan = BatchPlan(splits["train"], cfg.batch_size, cfg.seed, rank, world, collate)
    total = cfg.max_steps or math.ceil(cfg.epochs * plan.per_epoch / cfg.grad_accum)
    optimizer = build_optimizer(student, cfg)
    warmup = int(cfg.warmup_ratio * total)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: (s + 1) / (warmup + 1) if s < warmup
        else max(0.0, (total - s) / max(1, total - warmup)))

    student.to(acc.device)
    if teacher is not None:
        teacher.to(acc.device)
    log_path = os.path.join(cfg.output_dir, "log.jsonl")
    quant_json = None if cfg.quant is None else cfg.quant.to_json()
    step, elapsed = 0, 0.0
    val_history: list[float] = []  # validation losses, for early stopping
    if ckpt is not None:
        state = load_checkpoint(ckpt, student, optimizer, scheduler, rank)
        _check_resumable(state, cfg, world, ckpt)
        step, elapsed = state["step"], state["elapsed_s"]
        if main:
            truncate_log(log_path, step)
            print(f"resumed from {ckpt} (step {step}/{total})", flush=True)
        val_history = _val_history(log_path, step)
    else:
        if cfg.resume and main:
            print(f"--resume: no checkpoint in {cfg.output_dir}; starting from step 0")
        if main and os.path.exists(log_path):
            os.remove(log_path)
        if cfg.quant is not None:  # explicit α initialisation, identical on every process
            from tbt.quant.activation import calibrate

            with acc.autocast():
                calibrate(student, [plan.batch(0, acc.device)])
    warm = None
    if cfg.copy_warmup_steps and ckpt is None:
        if not seq2seq:
            raise ValueError(f"copy_warmup_steps={cfg.copy_warmup_steps}: the copy warm-up is "
                             "for encoder-decoder models; pass --copy-warmup-steps 0")
        warm = copy_warmup(student, cfg, acc, log_path if main else None, main)
        elapsed = warm["train_time_s"]
    model, optimizer = acc.prepare(student, optimizer)

    if main:
        n_ex = len(splits["train"])
        print(f"training {total} steps ({n_ex} examples, {plan.per_epoch} micro-batches of "
              f"{cfg.batch_size} per epoch per process, x{cfg.grad_accum} accumulation, "
              f"{world} process(es), {acc.device}, bf16={cfg.bf16})", flush=True)
    bar = tqdm(total=total, initial=step, desc=f"train {cfg.bits}", unit="step",
               disable=not (cfg.progress and main), dynamic_ncols=True)
    micro, t_start, record, val = step * cfg.grad_accum, time.time() - elapsed, {}, {}
    stopped = plateaued(val_history, cfg.early_stop_patience, cfg.early_stop_min_delta)
    while step < total and not stopped:
        model.train()
        sums: dict[str, float] = {}
        for k in range(cfg.grad_accum):
            batch = plan.batch(micro, acc.device)
            sync = acc.no_sync(model) if k < cfg.grad_accum - 1 else contextlib.nullcontext()
            with sync:
                with acc.autocast():
                    terms = _terms(model, teacher, batch, cfg, seq2seq, target_only)
                loss = total_loss(terms, cfg.distill)
                values = _reduced(acc, terms, loss)  # mean over processes: NaN anywhere -> all
                bad = first_non_finite(values)
                if bad is not None:
                    raise NonFiniteLossError(
                        f"loss term {bad!r} is {values[bad]} at step {step + 1} (micro-batch "
                        f"{micro}); stopped before the update. Last checkpoint: "
                        f"{latest_checkpoint(cfg.output_dir) or 'none'}. Lower --lr, raise "
                        f"--grad-accum or check the data")
                acc.backward(loss / cfg.grad_accum)
            for name, v in values.items():
                sums[name] = sums.get(name, 0.0) + v / cfg.grad_accum
            micro += 1
        grad_norm = None
        if cfg.max_grad_norm > 0:
            grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.max_grad_norm))
            if not math.isfinite(grad_norm):
                raise NonFiniteLossError(f"the gradient norm is {grad_norm} at step {step + 1}; "
                                         "stopped before the update. Lower --lr")
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        elapsed = time.time() - t_start
        record = {"step": step, "lr": lr, **sums,
                  "grad_norm": grad_norm, "elapsed_s": round(elapsed, 3)}
        if cfg.eval_every and step % cfg.eval_every == 0 or step == total:
            val = validate(model, teacher, splits.get("validation"), collate, cfg, acc, seq2seq,
                           target_only)
            record.update({f"val_{k}": v for k, v in val.items()})
            if seq2seq or target_only:
                use_rows = splits.get("validation") or (
                    splits["train"][:INPUT_USE_ROWS] if step == total else None)
                if use_rows:
                    use = input_use_check(acc.unwrap_model(model), use_rows, collate,
                                          cfg.batch_size, acc, prompt_target=target_only)
                    if use is not None:
                        record.update({f"input_use_{k}": v for k, v in use.items()})
            if "loss" in val:
                val_history.append(val["loss"])
                stopped = plateaued(val_history, cfg.early_stop_patience,
                                    cfg.early_stop_min_delta)
                if stopped:
                    record["early_stop"] = True
        if main:
            with open(log_path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        bar.update(1)
        if step % cfg.log_every == 0 or step == total:
            bar.set_postfix({k: f"{v:.3g}" for k, v in sums.items()}, refresh=False)
        if cfg.save_every and (step % cfg.save_every == 0 or step == total or stopped):
            state = {"step": step, "micro_batch": micro, "world_size": world,
                     "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                     "seed": cfg.seed, "total_steps": total, "elapsed_s": elapsed}
            save_checkpoint(cfg.output_dir, step, acc.unwrap_model(model), optimizer, scheduler,
                            state, quant_json, cfg.to_json(), rank, acc.wait_for_everyone,
                            cfg.keep_checkpoints)
    bar.close()
    input_use = {k[len("input_use_"):]: v for k, v in record.items()
                 if k.startswith("input_use_")}
    if main and input_use and not input_use["ok"]:
        warn_input_use(input_use)
    if stopped and main:
        best = min(val_history)
        print(f"early stop at step {step}/{total}: validation loss {val_history[-1]:.4f}, best "
              f"{best:.4f} {cfg.early_stop_patience} validation(s) ago or more", flush=True)
    if main:
        save_final(cfg, acc.unwrap_model(model), tokenizer, quant_json)
    acc.wait_for_everyone()
    return {"output_dir": cfg.output_dir, "steps": step, "stopped_early": stopped,
            "train": record, "validation": val,
            "train_time_s": elapsed, "log": log_path, "checkpoint": latest_checkpoint(
                cfg.output_dir), "model": acc.unwrap_model(model), "tokenizer": tokenizer,
            "copy_warmup": warm, "input_use": input_use or None}


def derange(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``batch`` with every example's source (``input_ids``, ``attention_mask``) taken from
    the next example (a cyclic shift: no example keeps its own when ``B >= 2``)."""
    out = dict(batch)
    for k in ("input_ids", "attention_mask"):
        if k in out:
            out[k] = torch.roll(out[k], shifts=1, dims=0)
    return out


def derange_prompts(examples: list[dict]) -> list[dict]:
    """Decoder-only seq2seq examples (``tokenize_prompt_target``: ``input_ids = prompt +
    target``, ``labels`` ``-100`` on the prompt) with every example's prompt taken from the
    one before it (cyclic, as :func:`derange`), its own target and labels kept."""
    parts = []
    for ex in examples:
        labels = ex["labels"]
        n = next((i for i, v in enumerate(labels) if v != -100), len(labels))
        parts.append((list(ex["input_ids"][:n]), list(ex["input_ids"][n:]), list(labels[n:])))
    out = []
    for i, (_, target, labels) in enumerate(parts):
        prompt = parts[i - 1][0]
        out.append({"input_ids": prompt + target, "attention_mask": [1] * (len(prompt) +
                                                                             len(target)),
                    "labels": [-100] * len(prompt) + labels})
    return out


@torch.no_grad()
def input_use_check(model, rows, collate, batch_size: int, acc=None,
                    margin: float = INPUT_USE_MARGIN, rel_margin: float = INPUT_USE_REL_MARGIN,
                    prompt_target: bool = False) -> dict[str, Any] | None:
    """Does a seq2seq ``model`` use its input? Its label cross-entropy on ``rows`` with the
    true sources against the same with the sources deranged across each batch (:func:`derange`;
    ``prompt_target``: a decoder-only model on prompt + target rows, whose prompts are
    deranged instead, :func:`derange_prompts`).

    Both are means over every target token (``-100`` labels excluded), in eval mode. Batches
    of one example are skipped (nothing to swap with); ``None`` if no batch remains.

    Returns ``{"ce": true-source CE, "ce_shuffled": deranged CE, "gap": their difference,
    "ok": gap >= max(margin, rel_margin * ce)}``. A model that ignores its input has ``gap`` 0.
    """
    device = acc.device if acc is not None else next(model.parameters()).device
    autocast = acc.autocast if acc is not None else contextlib.nullcontext
    was_training = model.training
    model.eval()
    sums = {"ce": 0.0, "ce_shuffled": 0.0}
    n_tok = 0
    try:
        for i in range(0, len(rows), batch_size):
            chunk = rows[i:i + batch_size]
            if len(chunk) < 2:
                continue
            batch = {k: v.to(device) for k, v in collate(chunk).items()}
            n = int((batch["labels"] != -100).sum())
            if n == 0:
                continue
            shuffled = ({k: v.to(device) for k, v in collate(derange_prompts(chunk)).items()}
                        if prompt_target else derange(batch))
            for key, b in (("ce", batch), ("ce_shuffled", shuffled)):
                with autocast():
                    sums[key] += float(model(**b).loss.detach()) * n
            n_tok += n
    finally:
        model.train(was_training)
    if n_tok == 0:
        return None
    ce, ce_s = sums["ce"] / n_tok, sums["ce_shuffled"] / n_tok
    return {"ce": ce, "ce_shuffled": ce_s, "gap": ce_s - ce,
            "ok": ce_s - ce >= max(margin, rel_margin * ce)}


def warn_input_use(use: dict[str, Any], file: Any = None) -> None:
    """One WARNING block on stderr: the model does not use its input (:func:`input_use_check`)."""
    import sys

    bar = "=" * 78
    print("\n".join([
        bar, "WARNING: the model does not use its input.",
        f"  validation cross-entropy with the true sources {use['ce']:.3f}, with the sources "
        f"shuffled",
        f"  across the batch {use['ce_shuffled']:.3f}: gap {use['gap']:.3f}, below "
        f"max({INPUT_USE_MARGIN} nats, {INPUT_USE_REL_MARGIN:.0%} of",
        "  the loss). Its output hardly depends on its input (often: the same text or the empty",
        "  string for every source). Train longer, on more data, or with the presets'",
        "  from-scratch defaults and the copy warm-up (--copy-warmup-steps); docs/training.md.",
        bar]), file=file if file is not None else sys.stderr, flush=True)


def plateaued(history: list[float], patience: int, min_delta: float = 0.0) -> bool:
    """Whether the last ``patience`` validation losses all failed to improve on the best one
    before them by more than ``min_delta`` (``patience <= 0``: never)."""
    if patience <= 0 or len(history) <= patience:
        return False
    return min(history[-patience:]) >= min(history[:-patience]) - min_delta


def _val_history(log_path: str, step: int) -> list[float]:
    """The validation losses logged up to ``step`` (restores early stopping on resume)."""
    if not os.path.isfile(log_path):
        return []
    with open(log_path, encoding="utf-8") as f:
        recs = [json.loads(line) for line in f if line.strip()]
    return [r["val_loss"] for r in recs if "val_loss" in r and r.get("step", 0) <= step]


def _terms(model, teacher, batch, cfg: TrainConfig, seq2seq: bool, target_only: bool = False
           ) -> dict[str, torch.Tensor]:
    return distill_forward(model, teacher, batch, cfg.distill, seq2seq, target_only)


def _reduced(acc, terms: dict[str, torch.Tensor], loss: torch.Tensor) -> dict[str, float]:
    vals = torch.stack([v.detach().float() for v in terms.values()] + [loss.detach().float()])
    vals = acc.reduce(vals, reduction="mean") if acc.num_processes > 1 else vals
    return dict(zip([*terms, "loss"], vals.tolist(), strict=True))  # one host sync per micro-batch


@torch.no_grad()
def validate(model, teacher, rows, collate, cfg: TrainConfig, acc, seq2seq: bool,
             target_only: bool = False) -> dict[str, float]:
    """Mean loss terms over the validation rows (every process runs them all; no RNG used)."""
    if not rows:
        return {}
    model.eval()
    sums: dict[str, float] = {}
    n = 0
    for i in range(0, len(rows), cfg.batch_size):
        chunk = rows[i:i + cfg.batch_size]
        batch = {k: v.to(acc.device) for k, v in collate(chunk).items()}
        with acc.autocast():
            terms = _terms(model, teacher, batch, cfg, seq2seq, target_only)
        terms["loss"] = total_loss(terms, cfg.distill)
        for k, v in terms.items():
            sums[k] = sums.get(k, 0.0) + float(v) * len(chunk)
        n += len(chunk)
    model.train()
    return {k: v / n for k, v in sums.items()}


class BatchPlan:
    """Micro-batch ``m`` = batch ``m % per_epoch`` of epoch ``m // per_epoch``; each epoch's
    order depends only on ``(seed, epoch)``, padded by wrapping to a multiple of the number of
    processes and split among them, so every process has ``per_epoch`` batches."""

    def __init__(self, rows: list[dict], batch_size: int, seed: int, rank: int, world: int,
                 collate) -> None:
        self.rows, self.bs, self.seed, self.rank, self.world = rows, batch_size, seed, rank, world
        self.collate = collate
        self.per_epoch = math.ceil(math.ceil(len(rows) / world) / batch_size)
        self._cache: tuple[int, list[int]] | None = None

    def order(self, epoch: int) -> list[int]:
        if self._cache is None or self._cache[0] != epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            perm = torch.randperm(len(self.rows), generator=g).tolist()
            perm += perm[: (-len(perm)) % self.world]
            self._cache = (epoch, perm[self.rank::self.world])
        return self._cache[1]

    def batch(self, m: int, device: Any) -> dict[str, torch.Tensor]:
        epoch, b = divmod(m, self.per_epoch)
        idx = self.order(epoch)[b * self.bs:(b + 1) * self.bs]
        return {k: v.to(device) for k, v in self.collate([self.rows[i] for i in idx]).items()}


def build_optimizer(student: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the student's parameters at ``cfg.lr``.

    With LR-QAT and ``cfg.lrqat_scale_lr`` set, two groups (docs/related.md §16): ``"lrqat_ab"``
    (the low-rank factors A, B) at ``cfg.lr`` and ``"lrqat_scales"`` (row scales, activation
    α: :func:`tbt.quant.lrqat.lrqat_parameters`) at ``cfg.lrqat_scale_lr``; the schedule
    scales both alike. Otherwise one group, as before.
    """
    kw = {"betas": cfg.adam_betas, "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay}
    if cfg.lrqat is None or cfg.lrqat_scale_lr is None:
        return torch.optim.AdamW(student.parameters(), lr=cfg.lr, **kw)
    from tbt.quant.lrqat import lrqat_parameters

    groups = lrqat_parameters(student)
    if not groups["ab"]:
        raise ValueError("lrqat_scale_lr: the student has no LR-QAT factors (apply_lrqat was "
                         "not run)")
    return torch.optim.AdamW([{"params": groups["ab"], "lr": cfg.lr, "name": "lrqat_ab"},
                              {"params": groups["scales"], "lr": cfg.lrqat_scale_lr,
                               "name": "lrqat_scales"}], **kw)


def _check_resumable(state: dict, cfg: TrainConfig, world: int, ckpt: str) -> None:
    for key, now in (("world_size", world), ("batch_size", cfg.batch_size),
                     ("grad_accum", cfg.grad_accum), ("seed", cfg.seed)):
        if state.get(key) != now:
            raise ValueError(f"cannot resume from {ckpt}: it was written with {key}="
                             f"{state.get(key)}, this run has {now}; the data position would "
                             f"not match. Resume with the same setting")
