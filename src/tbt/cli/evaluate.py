"""``tbt evaluate``: generate on a test set and score it (ROUGE, BLEU/chrF or perplexity)."""

from __future__ import annotations

import argparse
import json

from tbt.cli import CliError
from tbt.cli._safety import add_overwrite_flag, check_local_dir, check_output_dir, staged_output

_GEN_FLAGS = ("num_beams", "max_length", "min_length", "length_penalty", "no_repeat_ngram_size")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate", help="generate on a test set and score it",
        description="Load a model directory (full precision or tbt), generate one output per "
                    "test source, score it and write DIR/metrics.json and DIR/predictions.jsonl.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="model directory written by `tbt train` / save_pretrained, or a GGUF "
                        "file (gguf:PATH, PATH.gguf, gguf:smollm2)")
    p.add_argument("--tokenizer", default=None, metavar="DIR",
                   help="tokenizer directory, if the model directory has none")
    p.add_argument("--output-dir", required=True, metavar="DIR",
                   help="where metrics.json and predictions.jsonl are written")
    data = p.add_argument_group("data")
    data.add_argument("--test-file", default=None, metavar="F",
                      help="local test file (.jsonl/.json/.csv/.parquet/.txt)")
    data.add_argument("--dataset", default=None, metavar="NAME",
                      help="hub dataset (xsum, cnn_dailymail, wmt16) instead of --test-file")
    data.add_argument("--dataset-config", default=None, metavar="C",
                      help="hub dataset configuration, e.g. 3.0.0 or ro-en")
    data.add_argument("--split", choices=("test", "validation"), default="test",
                      help="hub split to evaluate on (default: test)")
    data.add_argument("--source-column", default="document", metavar="C",
                      help="column holding the model input (default: document)")
    data.add_argument("--target-column", default="summary", metavar="C",
                      help="column holding the reference output (default: summary)")
    data.add_argument("--text-column", default="text", metavar="C",
                      help="text column for causal-LM perplexity (default: text)")
    data.add_argument("--source-lang", default=None, metavar="L",
                      help="translation rows: source language key, e.g. en")
    data.add_argument("--target-lang", default=None, metavar="L",
                      help="translation rows: target language key, e.g. ro")
    data.add_argument("--source-prefix", default="", metavar="S",
                      help='text put before every source, e.g. "summarize: " for T5')
    data.add_argument("--prompt-template", default=None, metavar="T",
                      help="decoder-only models: the prompt, {source} marking the source "
                           "(default: the one the model was trained with, from its "
                           "train_config.json, else '{source}\\nSummary:'; 'chat:...' uses "
                           "the tokenizer's chat template)")
    data.add_argument("--max-samples", type=int, default=None, metavar="N",
                      help="evaluate only the first N rows")
    data.add_argument("--max-source-length", type=int, default=None, metavar="N",
                      help="truncate sources to N tokens (default: the model's limit; "
                           "decoder-only: the whole prompt, default the training run's)")
    gen = p.add_argument_group("generation (a preset, then these overrides)")
    gen.add_argument("--preset", default=None,
                     choices=("xsum", "cnn_dailymail", "wmt16", "default"),
                     help="generation settings of a paper dataset (default: the --dataset's "
                          "preset if it has one, else 'default': 4 beams, max length 128)")
    gen.add_argument("--num-beams", type=int, default=None, metavar="N", help="beam width")
    gen.add_argument("--max-length", "--max-target-length", dest="max_length", type=int,
                     default=None, metavar="N",
                     help="maximum output length in tokens (decoder-only: new tokens after the "
                          "prompt, default the training run's --max-target-length)")
    gen.add_argument("--min-length", type=int, default=None, metavar="N",
                     help="minimum output length in tokens (decoder-only: new tokens)")
    gen.add_argument("--length-penalty", type=float, default=None, metavar="X",
                     help="beam-search length penalty (>1 favours longer outputs)")
    gen.add_argument("--no-repeat-ngram-size", type=int, default=None, metavar="N",
                     help="forbid repeating any N-gram (default: the model's setting)")
    run = p.add_argument_group("scoring and device")
    run.add_argument("--metrics", nargs="+", default=None,
                     choices=("rouge", "bleu", "perplexity"),
                     help="what to compute (default: bleu for translation data, else rouge)")
    run.add_argument("--batch-size", type=int, default=16, metavar="N",
                     help="sources generated per batch (default: 16)")
    run.add_argument("--device", default=None, choices=("cpu", "cuda"),
                     help="default: cuda when available, else cpu")
    run.add_argument("--engine", choices=("native", "torch"), default="native",
                     help="a packed encoder-decoder folder (tbt export: BART, mBART, Marian) "
                          "runs on the native engine by default; torch: the transformers model "
                          "on the packed layers (load_packed)")
    run.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    add_overwrite_flag(run, help="replace the content of a non-empty --output-dir (e.g. an "
                                 "earlier evaluation's metrics.json)")
    p.set_defaults(func=run_evaluate)


def _gen_kwargs(args: argparse.Namespace) -> dict:
    from tbt.eval.evaluate import GENERATION_PRESETS, resolve_preset

    name = args.preset
    if name is None and args.dataset:
        key = args.dataset.split("/")[-1]
        name = key if key in GENERATION_PRESETS else None
    kw = resolve_preset(name)
    for flag in _GEN_FLAGS:
        value = getattr(args, flag)
        if value is not None:
            kw[flag] = value
    return kw


def _check_args(args: argparse.Namespace) -> None:
    """Everything that can be checked before loading a model (one-line errors)."""
    import os

    from tbt.export.io import WEIGHTS_NAME

    if not args.test_file and not args.dataset:
        raise CliError("nothing to evaluate on: pass --test-file F or --dataset NAME")
    for flag in ("num_beams", "max_length", "batch_size"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise CliError(f"--{flag.replace('_', '-')} {value}: must be >= 1")
    for flag in ("min_length", "no_repeat_ngram_size", "max_samples", "max_source_length"):
        value = getattr(args, flag)
        if value is not None and value < 0:
            raise CliError(f"--{flag.replace('_', '-')} {value}: must be >= 0")
    from tbt.hf.gguf import is_gguf

    if not is_gguf(args.model):  # a GGUF file is resolved (with a one-line error) when loaded
        check_local_dir(args.model, "--model", "give a model folder written by `tbt train`")
        if os.path.isfile(os.path.join(args.model, WEIGHTS_NAME)) and args.device == "cuda":
            raise CliError(f"--model {args.model} is a packed checkpoint: it runs on the CPU "
                           "(--device cpu)")
    if args.tokenizer:
        check_local_dir(args.tokenizer, "--tokenizer",
                        "give a tokenizer folder (tbt tokenizer train) or a model folder")
    check_output_dir(args.output_dir, overwrite=args.overwrite,
                     inputs={"--model": args.model, "--tokenizer": args.tokenizer,
                             "--test-file": args.test_file},
                     what="e.g. an earlier evaluation:")


class _EngineModel:
    """The native encoder-decoder engine behind the few members of a transformers model that
    tbt.eval.evaluate uses (config, eval/train/to, generate on torch tensors)."""

    def __init__(self, engine) -> None:
        from types import SimpleNamespace

        self.engine = engine
        self.config = SimpleNamespace(is_encoder_decoder=True,
                                      max_position_embeddings=engine.max_positions)
        self.training = False

    def eval(self):
        return self

    def train(self, mode: bool = True):
        return self

    def to(self, device):
        return self

    def generate(self, input_ids, attention_mask=None, max_length=None, max_new_tokens=None,
                 **kw):
        import torch

        if max_new_tokens is None:  # transformers: max_length counts the decoder start token
            max_new_tokens = (max_length or 21) - 1
        mask = None if attention_mask is None else attention_mask.cpu().numpy()
        out = self.engine.generate(input_ids.cpu().numpy(), mask, max_new_tokens, **kw)
        return torch.from_numpy(out)


def _load_model(args: argparse.Namespace):
    import os

    from tbt.export.io import WEIGHTS_NAME
    from tbt.hf import load_pretrained, load_tokenizer
    from tbt.hf.gguf import is_gguf, load_gguf_model, load_gguf_tokenizer

    if is_gguf(args.model):
        try:
            model, tok = load_gguf_model(args.model), load_gguf_tokenizer(args.model)
        except (FileNotFoundError, ImportError) as e:
            raise CliError(str(e)) from None
    elif os.path.isfile(os.path.join(args.model, WEIGHTS_NAME)):
        import json as _json

        from tbt.export.io import load_packed
        from tbt.runtime.engine_s2s import SEQ2SEQ_MODEL_TYPES

        with open(os.path.join(args.model, "config.json")) as f:
            mtype = _json.load(f).get("model_type")
        if args.engine == "native" and mtype in SEQ2SEQ_MODEL_TYPES:
            from tbt.runtime.engine_s2s import Seq2SeqEngine

            model = _EngineModel(Seq2SeqEngine(args.model))
            print(f"packed {mtype} checkpoint: the native engine (--engine torch for the "
                  f"transformers model)")
        else:
            model = load_packed(args.model)
        tok_dir = args.tokenizer or args.model
        try:
            tok = load_tokenizer(tok_dir)
        except (OSError, ValueError) as e:
            raise CliError(f"no tokenizer in {tok_dir} ({type(e).__name__}): pass "
                           f"--tokenizer DIR") from None
        return model, tok
    else:
        model, tok = load_pretrained(args.model)
    if args.tokenizer:
        tok = load_tokenizer(args.tokenizer)
    if tok is None:
        raise CliError(f"{args.model} has no tokenizer: pass --tokenizer DIR")
    return model, tok


def run_evaluate(args: argparse.Namespace) -> int:
    import torch

    from tbt.eval.evaluate import evaluate
    from tbt.data import DataConfig, load_raw_splits

    _check_args(args)
    metrics = args.metrics or (["bleu"] if args.source_lang else ["rouge"])
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise CliError("--device cuda, but no CUDA device is available: use --device cpu")
    model, tok = _load_model(args)
    causal = not getattr(model.config, "is_encoder_decoder", False)
    task = "causal-lm" if causal and metrics == ["perplexity"] else "seq2seq"
    cfg = DataConfig(task=task, dataset=args.dataset, dataset_config=args.dataset_config,
                     test_file=args.test_file if args.split == "test" else None,
                     validation_file=args.test_file if args.split == "validation" else None,
                     source_column=args.source_column, target_column=args.target_column,
                     text_column=args.text_column, source_lang=args.source_lang,
                     target_lang=args.target_lang, source_prefix=args.source_prefix,
                     max_eval_samples=args.max_samples)
    rows = load_raw_splits(cfg, splits=(args.split,))[args.split]
    gen_kwargs = _gen_kwargs(args)
    template, max_source = None, args.max_source_length
    if causal and task == "seq2seq":  # decoder-only seq2seq: prompt as in training
        template, max_source, max_target = _prompt_settings(args)
        if args.max_length is None and max_target is not None:
            gen_kwargs["max_length"] = max_target  # new tokens
        print(f"prompt template {template!r}")
    print(f"evaluating {args.model} on {len(rows)} rows; metrics {metrics}; "
          f"generation {json.dumps(gen_kwargs)}; device {device}")
    with staged_output(args.output_dir, overwrite=args.overwrite) as tmp:
        evaluate(model, tok, rows, metrics=metrics, gen_kwargs=gen_kwargs,
                 batch_size=args.batch_size, device=device, output_dir=tmp,
                 task="causal-lm" if causal else "seq2seq",
                 max_source_length=max_source, progress=not args.no_progress,
                 prompt_template=template)
    return 0


def _prompt_settings(args: argparse.Namespace) -> tuple[str, int | None, int | None]:
    """(prompt template, prompt length cap, answer length) of a decoder-only model: the flags,
    else the training run's ``train_config.json`` next to the model, else the defaults."""
    import os

    from tbt.data import DEFAULT_PROMPT_TEMPLATE

    saved: dict = {}
    path = os.path.join(args.model, "train_config.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            saved = json.load(f).get("data") or {}
    if saved.get("task", "seq2seq") not in ("seq2seq", "prompt-target"):
        saved = {}  # trained on plain text: no prompt settings to reuse
    template = args.prompt_template or saved.get("prompt_template") or DEFAULT_PROMPT_TEMPLATE
    if "{source}" not in template:
        raise CliError(f"--prompt-template {template!r} has no {{source}}: write where the "
                       "source goes, e.g. '{source}\\nSummary:'")
    max_source = args.max_source_length or saved.get("max_source_length")
    return template, max_source, saved.get("max_target_length")
