"""``tbt tokenizer train``: train a BPE or unigram tokenizer offline on local data files."""

from __future__ import annotations

import argparse

from tbt.cli import CliError
from tbt.cli._safety import add_overwrite_flag, check_output_dir, staged_output


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "tokenizer", help="train a tokenizer offline",
        description="Tokenizer tools. `tbt tokenizer train` learns a byte-level BPE or unigram "
                    "vocabulary from local files with BART's special tokens "
                    "(<s>=0 <pad>=1 </s>=2 <unk>=3, <mask> last).")
    sub = parser.add_subparsers(dest="tokenizer_command", metavar="ACTION")
    train = sub.add_parser(
        "train", help="train a tokenizer on columns of local data files",
        description="Train a tokenizer on the text of the chosen columns and save it with "
                    "save_pretrained, so that AutoTokenizer.from_pretrained(DIR) and "
                    "`tbt train --tokenizer DIR` load it.")
    train.add_argument("--train-file", action="append", required=True, metavar="FILE",
                       help="data file (.jsonl/.json/.csv/.parquet/.txt); repeat for several")
    train.add_argument("--source-column", default=None, metavar="C",
                       help="column whose text is learned (e.g. document); use 'translation' "
                            "or 'translation.en' for translation rows")
    train.add_argument("--target-column", default=None, metavar="C",
                       help="second column whose text is learned (e.g. summary)")
    train.add_argument("--text-column", default=None, metavar="C",
                       help="text column for causal-LM data (a .txt file's lines are 'text')")
    train.add_argument("--vocab-size", type=int, required=True, metavar="N",
                       help="total vocabulary size, special tokens included (bpe: >= 261)")
    train.add_argument("--output-dir", required=True, metavar="DIR",
                       help="where tokenizer.json and tokenizer_config.json are written")
    train.add_argument("--kind", choices=("bpe", "unigram"), default="bpe",
                       help="byte-level BPE (BART/GPT-2 style) or unigram (SentencePiece style); "
                            "default: bpe")
    train.add_argument("--model-type", choices=("bart", "gpt2"), default="bart",
                       help="bart: wrap each sequence as <s> ... </s>; gpt2: add no special "
                            "tokens (decoder-only); default: bart")
    train.add_argument("--min-frequency", type=int, default=2, metavar="N",
                       help="BPE: merge only pairs seen at least N times (default: 2)")
    add_overwrite_flag(train)
    train.set_defaults(func=_train)
    parser.set_defaults(func=lambda args: _no_action(parser))


def _no_action(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2


def _train(args: argparse.Namespace) -> int:
    from tbt.train.tokenizer import train_tokenizer

    columns = [c for c in (args.source_column, args.target_column, args.text_column) if c]
    if not columns:
        if all(f.endswith(".txt") for f in args.train_file):
            columns = ["text"]
        else:
            raise CliError("say which columns to learn from: --source-column and/or "
                           "--target-column (or --text-column)")
    out = check_output_dir(args.output_dir, overwrite=args.overwrite,
                           inputs=[("--train-file", f) for f in args.train_file])
    with staged_output(out, overwrite=args.overwrite) as tmp:
        tok = train_tokenizer(args.train_file, columns, args.vocab_size, tmp,
                              kind=args.kind, model_type=args.model_type,
                              min_frequency=args.min_frequency)
    print(f"trained {args.kind} tokenizer: {len(tok)} tokens on columns {columns} "
          f"-> {args.output_dir}")
    return 0
