"""Setting up a training run: tokenizer, teacher and student models, data, final save.

Used by :func:`tbt.train.loop.train`; each function does one thing and can be called alone
(the demo and the tests do).
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import replace
from typing import Any

from tbt._paths import check_local_dir
from tbt.train.checkpoint import save_model_dir
from tbt.train.config import TrainConfig
from tbt.hf.gguf import is_gguf, load_gguf_model, load_gguf_tokenizer
from tbt.train.presets import build_from_scratch, is_architecture

logger = logging.getLogger(__name__)

def load_tokenizer(cfg: TrainConfig):
    from tbt.hf import load_tokenizer as load_pretrained_tokenizer  # never runs the folder's code

    src = cfg.tokenizer or cfg.teacher or (None if is_architecture(cfg.model) else cfg.model)
    if src is None:
        raise ValueError(f"--model {cfg.model} is built from scratch: pass --tokenizer DIR "
                         "(train one with `tbt tokenizer train`)")
    flag = "--tokenizer" if cfg.tokenizer else "--teacher" if cfg.teacher else "--model"
    if not is_gguf(src):  # a path-like name never goes to the hub
        check_local_dir(src, flag, "give a tokenizer folder (train one with `tbt tokenizer "
                                   "train`) or a model folder that holds one")
    try:
        tok = load_gguf_tokenizer(src) if is_gguf(src) else load_pretrained_tokenizer(src)
    except (OSError, ValueError) as e:
        raise ValueError(f"could not load a tokenizer from {src!r}: {e}. Pass --tokenizer DIR"
                         ) from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def _load_model(name: str, flag: str = "--model"):
    """A transformers model from a local directory (tbt-quantized or not) or a hub name."""
    import transformers

    from tbt.hf import load_pretrained, register

    if is_gguf(name):  # gguf:PATH, PATH.gguf, gguf:smollm2
        return load_gguf_model(name)
    if os.path.isdir(name):
        return load_pretrained(name, with_tokenizer=False)[0]
    check_local_dir(name, flag, "give a model folder, a GGUF file (gguf:PATH), a hub name or "
                                "a preset (bart-tiny, bart-small, gpt2-tiny)")
    register()
    try:
        config = transformers.AutoConfig.from_pretrained(name, trust_remote_code=False)
        auto = (transformers.AutoModelForSeq2SeqLM if config.is_encoder_decoder
                else transformers.AutoModelForCausalLM)
        return auto.from_pretrained(name, trust_remote_code=False)
    except OSError as e:
        raise ValueError(f"could not load model {name!r}: not a local directory, and the hub "
                         f"failed ({e}). Pass a directory, a GGUF file (gguf:PATH) or a preset "
                         "(bart-tiny, bart-small, gpt2-tiny)") from None


def _quant_of(model) -> Any:
    qc = getattr(model.config, "quantization_config", None)
    return None if qc is None else qc.to_quant_config()


def build_models(cfg: TrainConfig, tokenizer) -> tuple[Any, Any]:
    """(teacher or None, student): the student quantized with ``cfg.quant`` if given."""
    from tbt.quant.surgery import quantize_model

    src = cfg.model or cfg.teacher
    if is_architecture(src):
        student = build_from_scratch(src, len(tokenizer), tokenizer.pad_token_id,
                                     tokenizer.bos_token_id, tokenizer.eos_token_id)
    else:
        student = _load_model(src, "--model" if cfg.model else "--teacher")
    teacher = None
    t_src = cfg.teacher or (None if cfg.quant is None or is_architecture(cfg.model) else cfg.model)
    if cfg.distill.needs_teacher and t_src is not None:
        teacher = copy.deepcopy(student) if t_src == src else _load_model(
            t_src, "--teacher" if cfg.teacher else "--model")
        if _quant_of(teacher) is not None:
            raise ValueError(f"the teacher {t_src} is quantized; pass a full-precision --teacher")
        # eager returns attention probabilities; tbt_eager (FP without quantizers) also lets
        # tbt.distill.capture read Q/K/V and scores for the score and relation terms
        teacher.set_attn_implementation(_fp_attention(cfg))
        teacher.eval().requires_grad_(False)
    elif cfg.quant is not None:
        logger.warning("no teacher: training the quantized student on labels only (--w-ce)")
    have = _quant_of(student)
    if cfg.quant is not None and have is None:
        quantize_model(student, cfg.quant)
    elif have is not None and have != cfg.quant:
        raise ValueError(f"--model {src} is already quantized ({have.bits}, {have.method}); "
                         f"it cannot be trained as bits={cfg.bits}. Start from the FP model")
    elif cfg.quant is None and teacher is not None and (cfg.distill.w_attn > 0
                                                         or cfg.distill.needs_capture):
        student.set_attn_implementation(_fp_attention(cfg))
    if cfg.lrqat is not None:  # LR-QAT: frozen grid-unit weights + low-rank update (lrqat.md)
        from tbt.quant.lrqat import apply_lrqat

        apply_lrqat(student, cfg.lrqat)
    if len(tokenizer) > student.config.vocab_size:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model only "
                         f"{student.config.vocab_size} embeddings: use the model's tokenizer")
    if cfg.generation is not None:
        from tbt.eval.evaluate import GENERATION_PRESETS

        for k, v in GENERATION_PRESETS[cfg.generation].items():
            setattr(student.generation_config, k, v)
    return teacher, student


def _fp_attention(cfg: TrainConfig) -> str:
    """Attention implementation of a full-precision model in a distillation run."""
    if not cfg.distill.needs_capture:
        return "eager"
    from tbt.quant.attention import register_attention

    return register_attention()


def data_task(cfg: TrainConfig, model) -> str:
    """The task the data is tokenized as: ``cfg.data.task``, except that (source, target)
    rows for a decoder-only model become ``prompt-target`` (prompt, then the target; the loss
    on the target only). ``prompt-target`` for an encoder-decoder model is an error."""
    task = cfg.data.task
    if model.config.is_encoder_decoder:
        if task != "seq2seq":
            raise ValueError(f"--model is a seq2seq model but the data task is {task}: "
                             "pass --task seq2seq")
        return task
    return "prompt-target" if task == "seq2seq" else task


def load_data(cfg: TrainConfig, tokenizer, model, raw: dict[str, list[dict]] | None = None
              ) -> tuple[dict[str, list[dict]], Any]:
    """Tokenized ``train`` (and ``validation``) rows and the collate function.

    ``raw``: the splits already read by ``load_raw_splits(cfg.data, ("train", "validation"))``
    (the loop reads them first, so a bad data file fails before any model is loaded).
    A decoder-only model with (source, target) rows trains as ``prompt-target``
    (:func:`data_task`, :func:`tbt.data.tokenize_prompt_target`); prompt and target share the
    model's positions, so the prompt gets at most ``positions - max_target_length`` of them.
    """
    from tbt.data import load_raw_splits, make_collator, tokenize_rows

    limit = getattr(model.config, "max_position_embeddings", None) or 10**9
    dc = replace(cfg.data, task=data_task(cfg, model))
    if raw is None:
        raw = load_raw_splits(dc, ("train", "validation"))
    src_limit = limit
    if dc.task == "prompt-target":
        src_limit = limit - min(dc.max_target_length, limit // 2)
    dc = replace(dc, max_source_length=min(dc.max_source_length, src_limit),
                 max_target_length=min(dc.max_target_length, limit),
                 max_length=min(dc.max_length, limit))
    splits = {s: tokenize_rows(rows, tokenizer, dc) for s, rows in raw.items()}
    return splits, make_collator(tokenizer, dc)


def save_final(cfg: TrainConfig, model, tokenizer, quant_json: str | None) -> None:
    """The trained model into ``cfg.output_dir``: written to a temp dir, moved file by file."""
    tmp = os.path.join(cfg.output_dir, ".tmp-final")
    shutil.rmtree(tmp, ignore_errors=True)
    if cfg.lrqat is not None:  # merge the low-rank update into a plain packed checkpoint
        from tbt.export.io import save_packed
        from tbt.export.lrqat import merge_lrqat

        packed = save_packed(merge_lrqat(model), os.path.join(cfg.output_dir, "packed"),
                             overwrite=True)  # the run owns (and has locked) output_dir
        tokenizer.save_pretrained(packed)
        os.makedirs(tmp)
        for name, text in (("tbt_config.json", quant_json), ("train_config.json", cfg.to_json())):
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
                f.write(text + "\n")
    else:
        save_model_dir(tmp, model, quant_json, cfg.to_json(), tokenizer)
    for name in sorted(os.listdir(tmp)):
        os.replace(os.path.join(tmp, name), os.path.join(cfg.output_dir, name))
    os.rmdir(tmp)
    print(f"saved the trained model to {cfg.output_dir}", flush=True)
