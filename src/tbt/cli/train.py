"""``tbt train``: distil a full-precision model into a ternary/binary student (or train FP).

Settings come from three layers, later ones winning: ``--recipe NAME`` (the paper's runs,
:mod:`tbt.train.presets`), ``--config FILE`` (TOML or JSON, flat names like the flags, or the
nested ``train_config.json`` a run saves), and the flags given on the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import os

from tbt.cli import CliError
from tbt.cli._safety import add_overwrite_flag, check_output_dir, clear_dir, entries, run_lock


def _float_pair(s: str) -> tuple[float, float]:
    parts = s.replace(",", " ").split()
    if len(parts) != 2:
        raise argparse.ArgumentTypeError(f"expected two numbers like '0.9,0.999', got {s!r}")
    return float(parts[0]), float(parts[1])


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train", help="distil a model into a ternary/binary student (or train full precision)",
        argument_default=argparse.SUPPRESS,
        description="Train a quantized student by distillation from a full-precision teacher "
                    "(TBT, Liu et al. 2023), or a full-precision model with --bits fp. "
                    "Precedence: flags > --config file > --recipe > defaults; a preset "
                    "--model trained from scratch (bart-tiny, ...) has its own defaults "
                    "(docs/training.md).")
    src = p.add_argument_group("models and settings")
    src.add_argument("--model", metavar="M",
                     help="student start: hub name, local checkpoint, GGUF file (gguf:PATH, "
                          "PATH.gguf, gguf:smollm2), or preset for training from scratch "
                          "(bart-tiny, bart-small, gpt2-tiny); default: a copy of --teacher")
    src.add_argument("--teacher", metavar="DIR",
                     help="full-precision teacher, a directory or GGUF file (default with "
                          "quantized --bits: a copy of --model, the TBT recipe; with --bits fp: "
                          "none, labels only)")
    src.add_argument("--tokenizer", metavar="DIR",
                     help="tokenizer directory (default: the teacher's, else the model's)")
    src.add_argument("--recipe", metavar="NAME",
                     help="a paper run, e.g. xsum-2-2-8, cnn-1-1-1, wmt16-2-2-2 (see "
                          "tbt.train.presets.RECIPES)")
    src.add_argument("--config", metavar="FILE",
                     help="TOML/JSON file of settings (flag names with _ or -); flags override it")
    src.add_argument("--output-dir", metavar="DIR",
                     help="where the model, log.jsonl and checkpoints/ are written (required)")
    src.add_argument("--resume", action="store_true",
                     help="continue from the last checkpoint in --output-dir")
    add_overwrite_flag(src, help="start afresh in a non-empty --output-dir: its content is "
                                 "deleted when the run starts (never allowed when it is the "
                                 "--teacher, --model or --tokenizer folder)")
    q = p.add_argument_group("quantization")
    q.add_argument("--bits", metavar="E-W-A",
                   help="embedding-weight-activation bits, e.g. 2-2-8, 1-1-1, or fp (default)")
    q.add_argument("--method", metavar="NAME",
                   help="weight quantizer: tbt (default), twn, bwn, absmean, uniform, "
                        "bitnet-binary, trilm, lsq, seq, seq-int2, dlt, dlt-centred, tequila, "
                        "pbllm (docs/methods.md)")
    q.add_argument("--variant", choices=("paper", "released"),
                   help="paper equations (default) or the authors' released code")
    q.add_argument("--granularity", choices=("row", "tensor", "group", "shard"),
                   help="weight scale per output row, per tensor, per group of --group-size "
                        "inputs or per shard of rows (default: the method's)")
    q.add_argument("--group-size", type=int, metavar="G",
                   help="inputs per scale with --granularity group (default 128)")
    q.add_argument("--num-shards", type=int, metavar="S",
                   help="row shards with --granularity shard (TriLM; default 1)")
    q.add_argument("--tequila-lambda", type=float, metavar="L",
                   help="Tequila's dead-zone bias factor (default 1e-3)")
    q.add_argument("--salient-frac", type=float, metavar="F",
                   help="--method pbllm: fraction of weights kept frozen at 8 bits, the rest "
                        "binarized (PB-LLM QAT; default 0.1)")
    q.add_argument("--act-method", metavar="NAME",
                   help="activation quantizer: auto (default: minmax for 8 bits, else "
                        "elastic), elastic, minmax, absmax-token, elastic-shift, lsq, lsq-plus")
    q.add_argument("--skip-modules", nargs="*", metavar="PATTERN",
                   help="fnmatch patterns of layers kept in full precision (default: lm_head, "
                        "TBT). Give the flag with no pattern to quantize the LM head too: tied "
                        "to the token embedding it then shares its ternary/binary codes, and "
                        "the packed checkpoint stores no separate head (tbt export)")
    lr = p.add_argument_group("LR-QAT (low-rank QAT, docs/lrqat.md)")
    lr.add_argument("--lrqat-rank", type=int, metavar="R",
                    help="train only a rank-R update inside the rounding of frozen int8 "
                         "grid-unit weights, plus the row scales (0 = full QAT, default)")
    lr.add_argument("--lrqat-alpha", type=float, metavar="X",
                    help="update scaling alpha/R (alpha default 1, as the paper)")
    lr.add_argument("--lrqat-storage", choices=("int8", "bfloat16", "float32"),
                    help="storage of the frozen weight in grid units (int8 fixed point)")
    lr.add_argument("--lrqat-checkpoint", action="store_true",
                    help="recompute the LR-QAT weights in backward (activation checkpointing)")
    lr.add_argument("--lrqat-scale-lr", type=float, metavar="LR",
                    help="learning rate of the scales (row scales, activation alpha); A and B "
                         "keep --lr (default: --lr for both)")
    d = p.add_argument_group("data")
    d.add_argument("--task", choices=("seq2seq", "causal-lm", "prompt-target"),
                   help="seq2seq (source -> target rows) or causal-lm (plain text: .txt lines or "
                        "a text column); a decoder-only model given seq2seq rows trains as "
                        "prompt-target: the prompt, then the target, the loss on the target only")
    d.add_argument("--prompt-template", metavar="T",
                   help="decoder-only seq2seq: the prompt, {source} marking the source "
                        "(default '{source}\\nSummary:'); 'chat:...' puts it in the "
                        "tokenizer's chat template as the user message")
    d.add_argument("--train-file", metavar="F",
                   help="training data (.jsonl/.json/.csv/.parquet/.txt)")
    d.add_argument("--validation-file", metavar="F", help="validation data (loss is logged)")
    d.add_argument("--dataset", metavar="NAME", help="hub dataset instead of local files")
    d.add_argument("--dataset-config", metavar="C", help="hub dataset configuration")
    d.add_argument("--source-column", metavar="C", help="input column (default: document)")
    d.add_argument("--target-column", metavar="C", help="output column (default: summary)")
    d.add_argument("--text-column", metavar="C", help="causal-LM text column (default: text)")
    d.add_argument("--source-lang", metavar="L", help="translation source language, e.g. en")
    d.add_argument("--target-lang", metavar="L", help="translation target language, e.g. ro")
    d.add_argument("--source-prefix", metavar="S", help='prefix for every source ("summarize: ")')
    d.add_argument("--max-source-length", type=int, metavar="N", help="source tokens (512)")
    d.add_argument("--max-target-length", type=int, metavar="N", help="target tokens (128)")
    d.add_argument("--max-length", type=int, metavar="N", help="causal-LM tokens (512)")
    d.add_argument("--max-train-samples", type=int, metavar="N", help="use the first N rows")
    d.add_argument("--max-eval-samples", type=int, metavar="N",
                   help="validate on the first N rows")
    o = p.add_argument_group("optimisation")
    o.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps")
    o.add_argument("--epochs", type=float, metavar="N", help="passes over the training set")
    o.add_argument("--lr", type=float, metavar="X",
                   help="peak learning rate (2.5e-4; a preset from scratch: 1e-3)")
    o.add_argument("--weight-decay", type=float, metavar="X",
                   help="AdamW weight decay (0; a preset from scratch: 0.01)")
    o.add_argument("--warmup-ratio", type=float, metavar="X",
                   help="linear warmup share (0.05; a preset from scratch: 0.25)")
    o.add_argument("--adam-betas", type=_float_pair, metavar="B1,B2", help="(0.9,0.999)")
    o.add_argument("--adam-eps", type=float, metavar="X", help="AdamW epsilon (1e-6)")
    o.add_argument("--batch-size", type=int, metavar="N",
                   help="examples per process (8; a preset from scratch: 32)")
    o.add_argument("--copy-warmup-steps", type=int, metavar="N",
                   help="first train a seq2seq model N steps on a synthetic copy task so it "
                        "learns to read its input, stopping early once it copies (0 = off; "
                        "default 400 for bart-tiny / "
                        "bart-small from scratch without --teacher, else 0)")
    o.add_argument("--copy-warmup-lr", type=float, metavar="X",
                   help="copy warm-up learning rate, constant (1e-3)")
    o.add_argument("--copy-warmup-batch-size", type=int, metavar="N",
                   help="copy warm-up batch (32)")
    o.add_argument("--grad-accum", type=int, metavar="N",
                   help="micro-batches per optimizer step (1)")
    o.add_argument("--max-grad-norm", type=float, metavar="X", help="clip (1.0; 0 = off)")
    o.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    o.add_argument("--device", choices=("auto", "cpu", "cuda"), help="default: auto")
    o.add_argument("--seed", type=int, metavar="N", help="random seed (28, as the paper)")
    o.add_argument("--save-every", type=int, metavar="N",
                   help="checkpoint every N steps (0 = none; the last step is always saved "
                        "when N > 0)")
    o.add_argument("--keep-checkpoints", type=int, metavar="N", help="most recent kept (2)")
    o.add_argument("--eval-every", type=int, metavar="N",
                   help="validation loss every N steps (0 = at the end only)")
    o.add_argument("--early-stop-patience", type=int, metavar="N",
                   help="stop when the validation loss has not improved for N validations in "
                        "a row (needs --eval-every; the step cap still applies; 0 = off)")
    o.add_argument("--early-stop-min-delta", type=float, metavar="X",
                   help="the validation-loss improvement that counts for early stopping (0)")
    o.add_argument("--log-every", type=int, metavar="N", help="progress-bar update period (1)")
    o.add_argument("--generation", metavar="PRESET",
                   help="generation preset stored with the model (xsum, cnn_dailymail, wmt16)")
    o.add_argument("--no-progress", dest="progress", action="store_false",
                   help="hide progress bars")
    loss = p.add_argument_group("distillation loss")
    loss.add_argument("--w-ce", type=float, metavar="W", help="label cross-entropy weight (1)")
    loss.add_argument("--w-logits", type=float, metavar="W", help="logit KD weight (1)")
    loss.add_argument("--w-hidden", type=float, metavar="W", help="hidden-state MSE weight (1)")
    loss.add_argument("--w-attn", type=float, metavar="W", help="attention MSE weight (1)")
    loss.add_argument("--temperature", type=float, metavar="T", help="logit KD temperature (1)")
    loss.add_argument("--no-mask-padding", dest="mask_padding", action="store_false",
                      help="average losses over padding too (the released code)")
    loss.add_argument("--mask-padding", dest="mask_padding", action="store_true",
                      help="average losses over real tokens only (default)")
    loss.add_argument("--last-encoder-twice", dest="last_encoder_twice", action="store_true",
                      help="add the released code's extra last-encoder-state term")
    loss.add_argument("--no-last-encoder-twice", dest="last_encoder_twice",
                      action="store_false", help="do not (default)")
    loss.add_argument("--layer-map", metavar="I,J,...",
                      help="teacher layer of each student decoder layer (default: identity)")
    loss.add_argument("--encoder-layer-map", metavar="I,J,...",
                      help="teacher layer of each student encoder layer (default: identity)")
    more = p.add_argument_group(
        "more distillation terms (off by default; see docs/distillation.md)")
    more.add_argument("--w-off", type=float, metavar="W",
                      help="TernaryLLM OFF: 1 - cosine between hidden states, the layers of "
                           "--w-hidden (0)")
    more.add_argument("--w-attn-scores", type=float, metavar="W",
                      help="TernaryBERT: MSE between pre-softmax attention scores, the "
                           "attentions of --w-attn (0)")
    more.add_argument("--w-relation", type=float, metavar="W",
                      help="MiniLM/BitDistill: Q-Q, K-K, V-V self-attention relation KL (0)")
    more.add_argument("--relation-layers", metavar="I,J,...",
                      help="student layers of the relation term, negative from the end "
                           "(default: -1, the last layer; 'all' = every layer)")
    more.add_argument("--relation-heads", type=int, metavar="A",
                      help="relation heads the Q/K/V features are split into (default: the "
                           "model's heads)")
    p.set_defaults(func=run_train)


_NOT_SETTINGS = {"func", "command", "verbose", "config", "recipe", "overwrite"}


def resolve_settings(args: argparse.Namespace) -> dict:
    """Flat settings: recipe < config file < flags (only flags actually given are present)."""
    from tbt.train.config import load_config_file, merge_settings
    from tbt.train.presets import resolve_recipe

    given = {k: v for k, v in vars(args).items() if k not in _NOT_SETTINGS}
    file_settings = load_config_file(args.config) if getattr(args, "config", None) else {}
    recipe = getattr(args, "recipe", None) or file_settings.get("recipe")
    return merge_settings(resolve_recipe(recipe) if recipe else {}, file_settings, given)


# what an interrupted run leaves before its first checkpoint (safe to start again over)
_RUN_LEFTOVERS = {"log.jsonl", "checkpoints", ".tmp-final"}


def check_train_output(cfg, overwrite: bool) -> None:
    """Refuse (one line) an --output-dir this run would wrongly write into or destroy.

    Called before the lock (cheap checks) and again under it (the folder's content).
    """
    from tbt.train.checkpoint import latest_checkpoint

    out = cfg.output_dir
    if overwrite and cfg.resume:
        raise CliError("--resume continues the run in --output-dir, --overwrite starts it "
                       "afresh: give one of them")
    inputs = [("--model", cfg.model), ("--teacher", cfg.teacher),
              ("--tokenizer", cfg.tokenizer), ("--train-file", cfg.data.train_file),
              ("--validation-file", cfg.data.validation_file)]
    check_output_dir(out, overwrite=overwrite, inputs=inputs, allow_occupied=True)
    found = entries(out)
    if not found or overwrite:
        return
    ckpt = latest_checkpoint(out)
    if cfg.resume:
        if ckpt is not None or set(found) <= _RUN_LEFTOVERS:
            return
        raise CliError(f"--resume: {out} has no checkpoint to continue (it holds "
                       f"{_shown(found)}); pass --overwrite to train it afresh, or choose "
                       "another --output-dir")
    if ckpt is not None:
        raise CliError(f"{out} holds checkpoints of an earlier run ({ckpt}): pass --resume to "
                       "continue it, --overwrite to start afresh, or choose another "
                       "--output-dir")
    kind = "a trained model: " if "config.json" in found or "packed" in found else ""
    raise CliError(f"--output-dir {out} is not empty (it holds {kind}{_shown(found)}): choose "
                   "a new folder, or pass --overwrite to replace its content")


def _shown(names: list[str]) -> str:
    return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")


def run_train(args: argparse.Namespace) -> int:
    from tbt.train.config import TrainConfig
    from tbt.train.loop import NonFiniteLossError, train

    cfg = TrainConfig.from_flat(resolve_settings(args))
    overwrite = bool(getattr(args, "overwrite", False))
    # under torchrun every process runs this: the first one checks and locks the folder
    first = int(os.environ.get("RANK", "0")) == 0
    if first:
        check_train_output(cfg, overwrite)
    with run_lock(cfg.output_dir) if first else contextlib.nullcontext():
        if first:
            check_train_output(cfg, overwrite)  # again, now that no other run can write
            if overwrite:
                clear_dir(cfg.output_dir)
        try:
            result = train(cfg)
        except NonFiniteLossError as e:
            raise CliError(str(e)) from None
    val = result["validation"].get("loss")
    print(f"done: {result['steps']} steps in {result['train_time_s']:.1f}s; final train loss "
          f"{result['train'].get('loss', float('nan')):.4f}"
          + (f", validation loss {val:.4f}" if val is not None else "")
          + f" -> {result['output_dir']}")
    return 0
