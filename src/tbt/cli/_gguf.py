"""``tbt export --format gguf``: the options and the handler (``docs/gguf.md``).

Kept apart from ``tbt.cli.export`` so that the packed-format command stays small; nothing heavy
is imported at module level (``tbt --help`` stays fast).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

GGUF_NAME = "model.gguf"
SUMMARY_NAME = "gguf_summary.md"


def add_gguf_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("GGUF (--format gguf)")
    g.add_argument("--gguf-type", choices=("tq2_0", "tq1_0"), default="tq2_0",
                   help="llama.cpp type of the ternary/binary matrices whose rows are a "
                        "multiple of 256 long: tq2_0 (2.06 bits/weight, default) or tq1_0 (1.69)")
    g.add_argument("--gguf-fallback", choices=("q4_0", "q8_0", "f16"), default="q4_0",
                   help="type of the other ternary/binary matrices (row length not a multiple of "
                        "256, e.g. SmolLM2's 576): q4_0 (default, what llama-quantize falls back "
                        "to), q8_0 or f16; all three hold the codes exactly")
    g.add_argument("--vocab-from", metavar="GGUF",
                   help="copy the tokenizer (every tokenizer.* key) from this GGUF file "
                        "(gguf:smollm2 for SmolLM2's) instead of converting the checkpoint's")
    g.add_argument("--tokenizer-pre", default="default", metavar="NAME",
                   help="llama.cpp pre-tokenizer name for a converted tokenizer (default: "
                        "'default'; 'smollm' for SmolLM2's)")


def run_gguf(args: argparse.Namespace, model, tok, out_dir: Path, final_dir: Path) -> int:
    """Write ``model.gguf`` and its summaries into ``out_dir`` (a staged folder that becomes
    ``final_dir``, the one the messages name)."""
    import copy

    import importlib.util

    from tbt.cli import CliError

    if importlib.util.find_spec("gguf") is None:
        raise CliError("--format gguf needs the `gguf` package: pip install gguf "
                       "(or pip install 'tbt[llm]')")
    from tbt.export.gguf_writer import GGUFExportError, export_gguf

    if args.lm_head == "int8":
        from tbt.export.convert import convert_model
        from tbt.export.io import _quantize_lm_head

        model = convert_model(copy.deepcopy(model))
        _quantize_lm_head(model)
    try:
        res = export_gguf(model, out_dir / GGUF_NAME, tok, ternary_type=args.gguf_type,
                          fallback=args.gguf_fallback, vocab_from=args.vocab_from,
                          tokenizer_pre=args.tokenizer_pre)
    except (GGUFExportError, FileNotFoundError) as e:
        raise CliError(str(e)) from None
    text = res.summary()
    (out_dir / SUMMARY_NAME).write_text(text + "\n")
    (out_dir / "gguf_summary.json").write_text(json.dumps(res.to_dict(), indent=1) + "\n")
    print(text)
    final = final_dir / GGUF_NAME
    print(f"\nGGUF -> {final} (summary: {final_dir / SUMMARY_NAME}); run it with llama.cpp, "
          f"e.g. llama-bench -m {final}")
    return 0
