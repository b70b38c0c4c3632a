"""``tbt demo``: the whole TBT pipeline, offline, on a CPU, in minutes.

1. build a real summarisation corpus offline: Python standard-library docstrings, the
   ``api`` style by default (summary = ``name: first sentence``, the sentence removed from the
   document, so it must be written, not copied; a from-scratch teacher lands far below the
   ceiling, where quantization has room to hurt; :func:`tbt.demo.corpus.build_docstring_corpus`);
2. train a byte-level BPE tokenizer on it;
3. train a small full-precision BART teacher from scratch (``--bits fp``): a short warm-up on
   a synthetic copy task (random whole-word tokens, the target is their first part; see
   :func:`tbt.train.warmup.copy_warmup_batch` for why), then the summaries until the
   validation loss stops improving (``teacher_patience`` validations, a step cap);
4. distil five students from it (same loss and steps): TBT at 2-2-8, and at the low
   activation bits where the paper's baselines collapse, TBT 2-2-2 against TWN 2-2-2 and
   TBT 1-1-1 against BWN 1-1-1 (the baselines with non-learned activations: min/max at 2 bits,
   ``sign`` at 1 bit);
5. evaluate all five on the test split (ROUGE-1/2/L/Lsum, generated length);
6. print and save a table (``results.md``, ``results.json``) with the size each model would
   have packed (weights at their bits plus per-row scales, the rest in float32; see
   :func:`packed_size_bytes`) and the training time; save the figures (training curves;
   weight and activation histograms of one layer, FP vs quantized).

Everything lands in ``--output-dir`` (default ``tbt-demo``). ``--quick`` shrinks every stage
for a smoke test (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import re
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class StudentSpec:
    """One distilled student: its name, E-W-A bits, weight and activation methods, and any
    other ``TrainConfig.from_flat`` keys (e.g. ``(("tequila_lambda", 1e-3),)``)."""

    name: str
    bits: str
    method: str = "tbt"
    act_method: str = "auto"
    options: tuple[tuple[str, Any], ...] = ()

    @property
    def slug(self) -> str:
        """Directory name: ``"+ both (TBT 2-2-2)"`` -> ``"both-tbt-2-2-2"``."""
        return re.sub(r"[^a-z0-9.]+", "-", self.name.lower()).strip("-")


STUDENTS = (
    StudentSpec("TBT 2-2-8", "2-2-8"),
    StudentSpec("TBT 2-2-2", "2-2-2"),
    StudentSpec("TWN 2-2-2", "2-2-2", method="twn", act_method="minmax"),
    StudentSpec("TBT 1-1-1", "1-1-1"),
    StudentSpec("BWN 1-1-1", "1-1-1", method="bwn", act_method="sign"),
)
HIST_LAYER = "model.encoder.layers.0.fc1"


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of the demo; :meth:`full` (default) and :meth:`quick` are the two presets."""

    output_dir: str = "tbt-demo"
    max_examples: int | None = None  # corpus size (None = every qualifying docstring)
    vocab_size: int = 1000  # the copy warm-up was measured to work at 1000 (docs/training.md)
    architecture: str = "bart-tiny"
    model_overrides: tuple[tuple[str, Any], ...] = ()  # architecture config fields (tests)
    max_source_length: int = 96
    max_target_length: int = 32
    batch_size: int = 16
    style: str = "api"  # corpus style (tbt.demo.corpus: lead, api, xsum)
    warmup_steps: int = 300  # teacher warm-up on the synthetic copy task
    warmup_batch_size: int = 32
    warmup_lr: float = 1e-3
    teacher_steps: int = 1500  # cap; the teacher stops when its validation loss plateaus
    teacher_lr: float = 2e-3
    teacher_eval_every: int = 100
    teacher_patience: int = 3
    student_steps: int = 300
    student_lr: float = 1e-3
    variant: str = "paper"
    eval_samples: int = 200
    num_beams: int = 2
    bf16: bool = True
    seed: int = 0
    progress: bool = True

    @classmethod
    def full(cls, **kw: Any) -> DemoConfig:
        return cls(**kw)

    @classmethod
    def quick(cls, **kw: Any) -> DemoConfig:
        small = dict(max_examples=800, vocab_size=600, max_source_length=64,
                     max_target_length=24, batch_size=16, warmup_steps=30,
                     warmup_batch_size=8, teacher_steps=30, teacher_eval_every=10,
                     teacher_patience=2,
                     student_steps=12,
                     eval_samples=24, num_beams=1)
        return cls(**{**small, **kw})


def packed_size_bytes(model: torch.nn.Module) -> int:
    """Bytes of ``model`` stored packed: every quantized weight at its bits plus one float32
    scale per row (or per tensor), every other parameter and buffer in float32.

    Each Parameter is counted once: a tied LM head shares the embedding matrix and is counted
    at the embedding's bits, the paper's accounting (its Table 1 sizes). A runtime that keeps
    the released code's full-precision output projection needs that matrix in float32 too.
    """
    from tbt.quant.modules import QuantEmbedding, QuantLinear
    from tbt.quant.weight import WEIGHT_METHODS

    seen: set[int] = set()
    bits = 0
    for mod in model.modules():
        spec = getattr(mod, "weight_spec", None)
        if isinstance(mod, (QuantLinear, QuantEmbedding)) and spec is not None:
            w = mod.weight
            if id(w) in seen:
                continue
            seen.add(id(w))
            rows = mod.out_features if isinstance(mod, QuantLinear) else mod.num_embeddings
            gran = spec.granularity or WEIGHT_METHODS[spec.method].default_granularity
            bits += w.numel() * spec.bits + 32 * (rows if gran == "row" else 1)
    for t in list(model.parameters()) + list(model.buffers()):
        if id(t) not in seen and t.is_floating_point():
            seen.add(id(t))
            bits += 32 * t.numel()
    return (bits + 7) // 8


def _train_cfg(dc: DemoConfig, paths: dict[str, str], out: str, **kw: Any):
    from tbt.train.config import TrainConfig

    flat = dict(train_file=paths["train"], validation_file=paths["validation"],
                source_column="document", target_column="summary", output_dir=out,
                batch_size=dc.batch_size, max_source_length=dc.max_source_length,
                max_target_length=dc.max_target_length, max_eval_samples=64, bf16=dc.bf16,
                device="cpu", seed=dc.seed, progress=dc.progress, warmup_ratio=0.05)
    flat.setdefault("eval_every", max(1, kw["max_steps"] // 6))  # six validation points
    flat.update(kw)
    return TrainConfig.from_flat(flat)


def _evaluate(model, tok, rows, dc: DemoConfig, out: str) -> dict[str, Any]:
    from tbt.eval.evaluate import evaluate

    gen = dict(num_beams=dc.num_beams, max_length=dc.max_target_length, min_length=5,
               no_repeat_ngram_size=3)
    return evaluate(model, tok, rows, metrics=("rouge",), gen_kwargs=gen, batch_size=32,
                    device="cpu", output_dir=out, max_source_length=dc.max_source_length,
                    progress=dc.progress)


def format_results(rows: list[dict[str, Any]]) -> str:
    """A Markdown table of the demo's results."""
    head = ("| model | E-W-A | R-1 | R-2 | R-L | R-Lsum | gen len | size MB (packed) "
            "| train s |")
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['model']} | {r['bits']} | {r['rouge1']:.2f} | {r['rouge2']:.2f} | "
                     f"{r['rougeL']:.2f} | {r['rougeLsum']:.2f} | {r['gen_len']:.1f} | "
                     f"{r['size_mb']:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


class _Stages:
    """Numbered progress lines with the elapsed time."""

    def __init__(self, total: int) -> None:
        self.t0, self.total = time.time(), total

    def __call__(self, k: int, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] [{k}/{self.total}] {msg}", flush=True)


def prepare_data(dc: DemoConfig, stage: _Stages) -> tuple[dict[str, str], str, Any]:
    """Stages 1-2: the docstring corpus and its tokenizer; ``(paths, tokenizer_dir, tok)``."""
    from tbt.demo.corpus import build_docstring_corpus
    from tbt.train.tokenizer import train_tokenizer

    out = dc.output_dir
    stage(1, f"corpus: Python docstrings -> first sentence, style {dc.style} ({out}/data)")
    paths = build_docstring_corpus(os.path.join(out, "data"), dc.max_examples, dc.seed,
                                   style=dc.style)
    stage(2, f"tokenizer: byte-level BPE, {dc.vocab_size} tokens")
    tok_dir = os.path.join(out, "tokenizer")
    tok = train_tokenizer([paths["train"]], ["document", "summary"], dc.vocab_size, tok_dir)
    return paths, tok_dir, tok


def copy_warmup(dc: DemoConfig, tok, out_dir: str) -> dict[str, Any]:
    """The teacher's first phase: :func:`tbt.train.warmup.copy_warmup_from_scratch` with the
    demo's settings (``dc.warmup_*``, ``dc.architecture``, ``dc.seed``)."""
    from tbt.train.warmup import copy_warmup_from_scratch

    return copy_warmup_from_scratch(
        dc.architecture, tok, out_dir, steps=dc.warmup_steps, batch_size=dc.warmup_batch_size,
        lr=dc.warmup_lr, max_source_length=dc.max_source_length, seed=dc.seed, bf16=dc.bf16,
        model_overrides=dict(dc.model_overrides), progress=dc.progress)


def train_teacher(dc: DemoConfig, paths: dict[str, str], tok_dir: str, tok,
                  stage: _Stages) -> tuple[dict[str, Any], dict[str, str]]:
    """Stage 3: the FP teacher from scratch; ``(run, {phase: log path})``."""
    from tbt.train.loop import train

    stage(3, f"teacher: full-precision {dc.architecture} from scratch, {dc.warmup_steps} "
             f"steps of copy warm-up, then the summaries until the validation loss plateaus "
             f"(patience {dc.teacher_patience} x {dc.teacher_eval_every} steps, cap "
             f"{dc.teacher_steps})")
    # The warm-up teaches the encoder-decoder to copy through cross attention; without it a
    # tiny model first learns the summaries' language model and ignores its input for a long
    # time (tbt.demo.corpus documents the measurements).
    warm_dir = os.path.join(dc.output_dir, "teacher-warmup")
    teacher_dir = os.path.join(dc.output_dir, "teacher")
    warm = copy_warmup(dc, tok, warm_dir)
    teacher = train(_train_cfg(dc, paths, teacher_dir, model=warm_dir, tokenizer=tok_dir,
                               bits="fp", max_steps=dc.teacher_steps, lr=dc.teacher_lr,
                               eval_every=dc.teacher_eval_every,
                               early_stop_patience=dc.teacher_patience,
                               max_eval_samples=500))
    teacher["train_time_s"] += warm["train_time_s"]
    run = dict(bits="fp", dir=teacher_dir, result=teacher)
    return run, {"warm-up": warm["log"], "summaries": teacher["log"]}


def train_students(dc: DemoConfig, paths: dict[str, str], teacher_dir: str,
                   students: tuple[StudentSpec, ...], stage: _Stages,
                   k: int = 4) -> dict[str, dict[str, Any]]:
    """Stage ``k``: distil each student from the teacher (same data, loss and steps)."""
    from tbt.train.loop import train

    runs = {}
    for i, sp in enumerate(students, 1):
        stage(k, f"student {i}/{len(students)}: {sp.name} (weights {sp.method}, activations "
                 f"{sp.act_method}), {dc.student_steps} steps of distillation")
        sdir = os.path.join(dc.output_dir, sp.slug)
        cfg = _train_cfg(dc, paths, sdir, teacher=teacher_dir, bits=sp.bits, method=sp.method,
                         act_method=sp.act_method, variant=dc.variant,
                         max_steps=dc.student_steps, lr=dc.student_lr, **dict(sp.options))
        runs[sp.name] = dict(bits=sp.bits, dir=sdir, result=train(cfg), spec=sp)
    return runs


def evaluate_runs(dc: DemoConfig, runs: dict[str, dict[str, Any]], tok,
                  test_file: str) -> list[dict[str, Any]]:
    """ROUGE, generated length, packed size and train time of every run (table rows)."""
    from tbt.data import DataConfig, load_raw_splits

    test = load_raw_splits(DataConfig(test_file=test_file, max_eval_samples=dc.eval_samples),
                           ("test",))["test"]
    results = []
    for name, run in runs.items():
        model = run["result"]["model"]
        m = _evaluate(model, tok, test, dc, os.path.join(run["dir"], "eval"))
        results.append({"model": name, "bits": run["bits"], **{k: m[k] for k in (
            "rouge1", "rouge2", "rougeL", "rougeLsum", "gen_len")},
            "size_mb": packed_size_bytes(model) / 1e6,
            "train_s": run["result"]["train_time_s"]})
    return results


def run_demo(dc: DemoConfig) -> dict[str, Any]:
    """Run every stage; returns ``{"results": [row per model], "plots": [...], ...}``."""
    from tbt.data import DataConfig, load_raw_splits
    from tbt.demo.plots import layer_tensors, save_all

    stage = _Stages(6)
    out = dc.output_dir
    os.makedirs(out, exist_ok=True)
    paths, tok_dir, tok = prepare_data(dc, stage)
    teacher, teacher_logs = train_teacher(dc, paths, tok_dir, tok, stage)
    runs = {"FP teacher": teacher, **train_students(dc, paths, teacher["dir"], STUDENTS, stage)}

    stage(5, f"evaluation: {dc.eval_samples} test documents, ROUGE")
    results = evaluate_runs(dc, runs, tok, paths["test"])

    stage(6, "table and plots")
    test = load_raw_splits(DataConfig(test_file=paths["test"], max_eval_samples=16),
                           ("test",))["test"]
    batch = _plot_batch(tok, test, dc)
    tensors = {name: layer_tensors(run["result"]["model"], HIST_LAYER, batch)
               for name, run in runs.items() if name != "FP teacher"}
    student_logs = {n: r["result"]["log"] for n, r in runs.items() if n != "FP teacher"}
    plots = save_all(out, teacher_logs, student_logs, tensors, HIST_LAYER)
    table = format_results(results)
    total = time.time() - stage.t0
    with open(os.path.join(out, "results.md"), "w", encoding="utf-8") as f:
        f.write(f"# tbt demo results\n\n{table}\n\nTotal time {total:.0f} s. Settings: "
                f"`{json.dumps(asdict(dc))}`\n")
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"results": results, "total_s": total, "config": asdict(dc)}, f, indent=2)
    print(f"\n{table}\n\ntotal {total:.0f} s; plots: {', '.join(plots)}", flush=True)
    return {"results": results, "plots": plots, "total_s": total, "output_dir": out}


def _plot_batch(tok, rows: list[dict], dc: DemoConfig) -> dict[str, torch.Tensor]:
    """One padded batch of test documents (for the activation histograms)."""
    enc = tok([r["source"] for r in rows[:16]], padding=True, truncation=True,
              max_length=dc.max_source_length, return_tensors="pt")
    labels = tok(text_target=[r["target"] for r in rows[:16]], padding=True, truncation=True,
                 max_length=dc.max_target_length, return_tensors="pt")["input_ids"]
    labels[labels == tok.pad_token_id] = -100
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
            "labels": labels}


def demo_config(quick: bool, **kw: Any) -> DemoConfig:
    kw = {k: v for k, v in kw.items() if v is not None}
    return DemoConfig.quick(**kw) if quick else DemoConfig.full(**kw)


__all__ = ["DemoConfig", "STUDENTS", "StudentSpec", "demo_config", "evaluate_runs",
           "prepare_data", "train_students", "train_teacher", "format_results", "packed_size_bytes",
           "run_demo"]
