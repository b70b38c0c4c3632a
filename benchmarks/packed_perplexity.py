"""Perplexity of a packed checkpoint on the rows `tbt ptq` evaluates (same loader), e.g. the
merged LR-QAT run in benchmarks/results/ptq_compare_smollm2-135m.md:

    python benchmarks/packed_perplexity.py OUT/packed --eval-file corpus/test.jsonl \
        [--text-column document] [--eval-samples 32] [--max-length 128] [--backend torch]
"""

from __future__ import annotations

import argparse


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("packed", help="a save_packed directory (with its tokenizer)")
    ap.add_argument("--eval-file", required=True, help="JSONL/text rows, as tbt ptq --eval-file")
    ap.add_argument("--text-column", default="document")
    ap.add_argument("--eval-samples", type=int, default=32)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--backend", default="torch", choices=("torch", "native", "auto"))
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from tbt.cli.ptq import _loader
    from tbt.eval.metrics import perplexity
    from tbt.export.io import load_packed

    tok = AutoTokenizer.from_pretrained(args.packed)
    ns = argparse.Namespace(text_column=args.text_column, source_column=args.text_column,
                            target_column=args.text_column, max_length=args.max_length,
                            batch_size=args.batch_size)
    loader, n = _loader(args.eval_file, args.eval_samples, ns, tok, True)
    model = load_packed(args.packed, backend=args.backend)
    print(f"{n} rows; perplexity {perplexity(model, loader, 'cpu'):.2f}")


if __name__ == "__main__":
    main()
