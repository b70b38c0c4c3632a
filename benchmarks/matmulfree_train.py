"""Train the MatMul-free LM from scratch on an offline corpus: ternary BitLinear vs FP.

Corpus: the Python standard library's docstrings (``tbt.demo.corpus``, CPython-version
deterministic), one docstring per ``text`` row. A byte-level BPE is trained on it. Two runs of
``tbt.train.loop.train`` with identical settings and seed:

* ``ternary``: ``--recipe matmulfree-tiny`` (BitLinear everywhere, LM head included);
* ``fp``: the same architecture in full precision (``--model matmulfree-tiny --bits fp``).

Reported: validation cross-entropy and perplexity at the end, training time, and for the
ternary run the packed checkpoint size (``save_packed``) with its logit parity.

    OMP_NUM_THREADS=1 python benchmarks/matmulfree_train.py --steps 300 --out FILE
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time


def _corpus(root: str) -> tuple[str, str]:
    from tbt.demo.corpus import build_docstring_corpus

    paths = build_docstring_corpus(os.path.join(root, "docs"))
    out = {}
    for split in ("train", "validation"):
        out[split] = os.path.join(root, f"{split}.jsonl")
        with open(paths[split], encoding="utf-8") as f, open(out[split], "w") as g:
            for line in f:
                g.write(json.dumps({"text": json.loads(line)["document"]}) + "\n")
    return out["train"], out["validation"]


def main(argv: list[str] | None = None) -> int:
    import torch

    from tbt.train.config import TrainConfig, merge_settings
    from tbt.train.loop import train
    from tbt.train.presets import resolve_recipe
    from tbt.train.tokenizer import train_tokenizer

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--out")
    a = ap.parse_args(argv)
    root = tempfile.mkdtemp(prefix="mmf-train-")
    train_file, val_file = _corpus(root)
    tok = os.path.join(root, "tok")
    train_tokenizer([train_file], ["text"], 2000, tok, model_type="gpt2")
    common = dict(tokenizer=tok, train_file=train_file, validation_file=val_file,
                  text_column="text", task="causal-lm", max_length=a.max_length,
                  max_steps=a.steps, batch_size=a.batch_size, device="cpu", progress=False,
                  seed=0, max_eval_samples=200)
    rows = []
    for name, base in (("ternary (BitLinear)", resolve_recipe("matmulfree-tiny")),
                       ("fp", dict(model="matmulfree-tiny", bits="fp", lr=2e-3,
                                   weight_decay=0.0, warmup_ratio=0.05))):
        out = os.path.join(root, name.split()[0])
        cfg = TrainConfig.from_flat(merge_settings(base, common, {"output_dir": out}))
        t0 = time.time()
        res = train(cfg)
        row = {"run": name, "val_ce": res["validation"]["ce"], "time_s": time.time() - t0,
               "train_ce": res["train"]["ce"]}
        if cfg.quant is not None:
            from tbt.export.io import save_packed

            model = res["model"].eval()
            d = save_packed(model, os.path.join(root, "packed"))
            row["packed_kib"] = sum(f.stat().st_size for f in d.iterdir()) / 1024
            row["fp32_kib"] = sum(p.numel() * 4 for p in model.parameters()) / 1024
        rows.append(row)
    n_train = sum(1 for _ in open(train_file))
    lines = [f"MatMul-free LM matmulfree-tiny (d=128, 2 layers), stdlib docstrings ({n_train} "
             f"train rows), BPE 2000, {a.steps} steps x batch {a.batch_size} x <= "
             f"{a.max_length} tokens, CPU (shared), torch {torch.__version__}", "",
             "| run | final train CE | validation CE | validation PPL | train time s | "
             "packed checkpoint KiB (fp32 params KiB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        size = (f"{r['packed_kib']:.0f} ({r['fp32_kib']:.0f})" if "packed_kib" in r else "-")
        lines.append(f"| {r['run']} | {r['train_ce']:.3f} | {r['val_ce']:.3f} | "
                     f"{math.exp(r['val_ce']):.1f} | {r['time_s']:.0f} | {size} |")
    text = "\n".join(lines)
    print(text)
    if a.out:
        with open(a.out, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
