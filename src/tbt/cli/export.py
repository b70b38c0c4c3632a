"""``tbt export``: a trained (fake-quantized) checkpoint -> a packed 2-bit/1-bit checkpoint."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from tbt.cli import CliError
from tbt.cli._safety import add_overwrite_flag, check_output_dir, staged_output


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "export", help="pack a trained ternary/binary checkpoint (2/1-bit codes + row scales)",
        description="Load a checkpoint written by `tbt train` (its config.json carries the "
                    "quantization_config) and write it with tbt.export.save_packed: ternary "
                    "weights at 2 bits (4 per byte), binary at 1 bit, per-row float32 scales, "
                    "the activation quantizers' parameters and the full-precision parts, in "
                    "safetensors with a versioned header (docs/format.md). `tbt inspect OUT` "
                    "shows the result; tbt.export.io.load_packed(OUT) runs it.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="trained quantized checkpoint directory (e.g. a `tbt train` output)")
    p.add_argument("--output-dir", required=True, metavar="DIR", help="packed checkpoint")
    p.add_argument("--lm-head", choices=("fp", "int8"), default="fp",
                   help="output projection: fp (default: as trained; TBT's tied FP matrix, or "
                        "packed when the model was trained with --skip-modules and the head "
                        "quantized: it then shares the embedding's codes) or int8 (per-row "
                        "symmetric int8 of an FP head, ~4x smaller, post-training)")
    add_overwrite_flag(p)
    p.add_argument("--format", choices=("packed", "gguf"), default="packed",
                   help="packed: tbt's checkpoint (default); gguf: a GGUF file for llama.cpp, "
                        "decoder-only Llama/Mistral/Qwen2 models (docs/gguf.md)")
    from tbt.cli._gguf import add_gguf_arguments

    add_gguf_arguments(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tbt.export.io import save_packed
    from tbt.hf import load_pretrained

    if not os.path.isdir(args.model):
        raise CliError(f"--model {args.model}: no such directory")
    out = check_output_dir(args.output_dir, overwrite=args.overwrite,
                           inputs={"--model": args.model})
    model, tok = load_pretrained(args.model)
    if getattr(model.config, "quantization_config", None) is None:
        raise CliError(f"--model {args.model} is not quantized (no quantization_config in its "
                       "config.json): train it with `tbt train --bits 2-2-8 ...` first")
    with staged_output(out, overwrite=args.overwrite) as tmp:
        if args.format == "gguf":
            from tbt.cli._gguf import run_gguf

            return run_gguf(args, model, tok, Path(tmp), Path(out))
        save_packed(model, tmp, lm_head=args.lm_head)
        if tok is not None:  # keep the tokenizer next to the packed weights
            tok.save_pretrained(tmp)
    print(f"packed checkpoint -> {out} (tbt inspect {out})")
    return 0
