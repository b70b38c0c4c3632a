"""``tbt ablate``: the structure of the paper's Table 3, and every weight method at the same bits.

One teacher (trained as in ``tbt demo``, or reused from a demo's output directory), then one
distilled student per row, all with the same data, loss, steps and seed; only the quantizers
differ. Suites (``--suite``, comma-separated):

``table3-2-2-2``
    The paper's ablation of the fully quantized ternary model (Table 3, top half): the TWN
    baseline with non-learned activations (the min/max quantizer at 2 bits), ``+ learned act.``
    (TBT's elastic α), ``+ stats weight`` (TBT's weight quantizer, min/max activations) and
    ``+ both`` (= TBT 2-2-2).
``weights-2-2-8``
    Every ternary weight method at 2-2-8 (8-bit min/max activations for all): TWN, TBT, BitNet
    b1.58 absmean, TriLM per-shard absmean, ParetoQ SEQ, TernaryLLM DLT, Tequila, LSQ.
``weights-1-1-8``
    Every binary weight method at 1-1-8: BWN, TBT, BitNet's centred sign, LSQ.

Each suite's first row is its baseline; the table gives every row's ROUGE and its difference to
that baseline. Output (``--output-dir``): ``ablation.md``, ``ablation.csv``, ``ablation.json``,
``ablation.png`` (ROUGE-1 and ROUGE-Lsum bars per suite) and the training curves.
"""

from __future__ import annotations

import csv
import json
import os
import time
from dataclasses import asdict, replace
from typing import Any

from tbt.demo.demo import (DemoConfig, StudentSpec, _Stages, evaluate_runs, prepare_data,
                            train_students, train_teacher)

S = StudentSpec
SUITES: dict[str, tuple[StudentSpec, ...]] = {
    "table3-2-2-2": (
        S("TWN 2-2-2 (baseline)", "2-2-2", "twn", "minmax"),
        S("+ learned act.", "2-2-2", "twn", "elastic"),
        S("+ stats weight", "2-2-2", "tbt", "minmax"),
        S("+ both (TBT 2-2-2)", "2-2-2", "tbt", "elastic"),
    ),
    "weights-2-2-8": (
        S("TWN 2-2-8", "2-2-8", "twn"),
        S("TBT 2-2-8", "2-2-8", "tbt"),
        S("BitNet b1.58 absmean 2-2-8", "2-2-8", "absmean"),
        S("TriLM absmean/shard 2-2-8", "2-2-8", "trilm"),
        S("ParetoQ SEQ 2-2-8", "2-2-8", "seq"),
        S("TernaryLLM DLT 2-2-8", "2-2-8", "dlt"),
        S("Tequila 2-2-8", "2-2-8", "tequila"),
        S("LSQ ternary 2-2-8", "2-2-8", "lsq"),
    ),
    "weights-1-1-8": (
        S("BWN 1-1-8", "1-1-8", "bwn"),
        S("TBT 1-1-8", "1-1-8", "tbt"),
        S("BitNet binary 1-1-8", "1-1-8", "bitnet-binary"),
        S("LSQ binary 1-1-8", "1-1-8", "lsq"),
    ),
}
DEFAULT_SUITES = ("table3-2-2-2", "weights-2-2-8", "weights-1-1-8")
METRICS = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def parse_suites(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = tuple(s.strip() for s in (spec.split(",") if isinstance(spec, str) else spec)
                  if s.strip())
    unknown = [n for n in names if n not in SUITES]
    if unknown or not names:
        raise ValueError(f"unknown suite(s) {unknown or spec!r}; choose from {sorted(SUITES)} "
                         f"(comma-separated)")
    return names


def _reuse(from_dir: str) -> tuple[dict[str, str], str, str]:
    """(data paths, tokenizer dir, teacher dir) of a finished ``tbt demo`` output directory."""
    paths = {k: os.path.join(from_dir, "data", f"{k}.jsonl")
             for k in ("train", "validation", "test")}
    tok_dir, teacher_dir = os.path.join(from_dir, "tokenizer"), os.path.join(from_dir, "teacher")
    missing = [p for p in (*paths.values(), tok_dir, teacher_dir) if not os.path.exists(p)]
    if missing:
        raise FileNotFoundError(f"--from-demo {from_dir}: missing {missing}; give the output "
                                f"directory of a finished `tbt demo` run")
    return paths, tok_dir, teacher_dir


def run_ablation(dc: DemoConfig, suites: tuple[str, ...] = DEFAULT_SUITES,
                 from_demo: str | None = None) -> dict[str, Any]:
    """Train (or reuse) the teacher, distil every student of ``suites``, evaluate, tabulate."""
    from transformers import AutoTokenizer

    from tbt.demo.plots import plot_training_curves

    out = dc.output_dir
    os.makedirs(out, exist_ok=True)
    stage = _Stages(5)
    if from_demo:
        paths, tok_dir, teacher_dir = _reuse(from_demo)
        tok = AutoTokenizer.from_pretrained(tok_dir, trust_remote_code=False)
        stage(3, f"teacher, data and tokenizer reused from {from_demo}")
        teacher_logs = {"summaries": os.path.join(teacher_dir, "log.jsonl")}
    else:
        paths, tok_dir, tok = prepare_data(dc, stage)
        teacher, teacher_logs = train_teacher(dc, paths, tok_dir, tok, stage)
        teacher_dir = teacher["dir"]
    specs = tuple(sp for s in suites for sp in SUITES[s])
    unique = tuple({sp.name: sp for sp in specs}.values())
    runs = train_students(dc, paths, teacher_dir, unique, stage, k=4)
    stage(5, f"evaluation: {dc.eval_samples} test documents, ROUGE; table and plots")
    results = {r["model"]: r for r in evaluate_runs(dc, runs, tok, paths["test"])}
    rows = []
    for suite in suites:
        base = results[SUITES[suite][0].name]
        for sp in SUITES[suite]:
            r = results[sp.name]
            rows.append({"suite": suite, "model": sp.name, "bits": sp.bits, "method": sp.method,
                         "act_method": sp.act_method, **{m: r[m] for m in METRICS},
                         **{f"d_{m}": r[m] - base[m] for m in METRICS},
                         "gen_len": r["gen_len"], "train_s": r["train_s"]})
    paths_out = _write(out, rows, dc, suites, time.time() - stage.t0, from_demo)
    curves = os.path.join(out, "ablation_curves.png")
    plot_training_curves(teacher_logs, {n: r["result"]["log"] for n, r in runs.items()}, curves)
    plots = [plot_bars(rows, os.path.join(out, "ablation.png")), curves]
    print("\n" + format_table(rows) + f"\n\nwritten: {', '.join(paths_out + plots)}", flush=True)
    return {"rows": rows, "files": paths_out, "plots": plots}


def format_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one block per suite, ROUGE and the difference to the suite's first row."""
    head = ("| suite | model | weights | acts | R-1 | R-2 | R-L | R-Lsum | Δ R-1 | Δ R-Lsum "
            "| gen len |")
    lines = [head, "|" + "---|" * 11]
    for r in rows:
        lines.append(f"| {r['suite']} | {r['model']} | {r['method']} | {r['act_method']} | "
                     f"{r['rouge1']:.2f} | {r['rouge2']:.2f} | {r['rougeL']:.2f} | "
                     f"{r['rougeLsum']:.2f} | {r['d_rouge1']:+.2f} | {r['d_rougeLsum']:+.2f} | "
                     f"{r['gen_len']:.1f} |")
    return "\n".join(lines)


def _write(out: str, rows: list[dict[str, Any]], dc: DemoConfig, suites: tuple[str, ...],
           total_s: float, from_demo: str | None) -> list[str]:
    md, csv_path, js = (os.path.join(out, f"ablation.{e}") for e in ("md", "csv", "json"))
    origin = (f"reused from {from_demo} (its corpus style applies)" if from_demo
              else "trained here")
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"# tbt ablation\n\n{format_table(rows)}\n\nSuites {', '.join(suites)}; "
                f"{dc.student_steps} distillation steps per student; total {total_s:.0f} s. "
                f"Teacher, corpus and tokenizer: {origin}. "
                f"Settings: `{json.dumps(asdict(dc))}`\n")
    with open(csv_path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(js, "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "suites": list(suites), "total_s": total_s,
                   "from_demo": from_demo, "config": asdict(dc)}, f, indent=2)
    return [md, csv_path, js]


def plot_bars(rows: list[dict[str, Any]], path: str) -> str:
    """ROUGE-1 and ROUGE-Lsum bars, one panel per suite."""
    from tbt.demo.plots import _pyplot

    plt = _pyplot()
    suites = list(dict.fromkeys(r["suite"] for r in rows))
    fig, axes = plt.subplots(1, len(suites), figsize=(4.5 * len(suites), 4.2), squeeze=False)
    for ax, suite in zip(axes[0], suites):
        rs = [r for r in rows if r["suite"] == suite]
        xs = range(len(rs))
        ax.bar([x - 0.2 for x in xs], [r["rouge1"] for r in rs], 0.4, label="ROUGE-1")
        ax.bar([x + 0.2 for x in xs], [r["rougeLsum"] for r in rs], 0.4, label="ROUGE-Lsum")
        for x, r in zip(xs, rs):
            ax.annotate(f"{r['rouge1']:.1f}", (x - 0.2, r["rouge1"]), ha="center",
                        va="bottom", fontsize=7)
        ax.set_xticks(list(xs), [r["model"] for r in rs], rotation=35, ha="right", fontsize=8)
        ax.set_title(suite)
        vals = [v for r in rs for v in (r["rouge1"], r["rougeLsum"])]
        ax.set_ylim(max(0.0, min(vals) - 5), max(vals) + 2)  # differences, not the 0-100 range
        ax.set_ylabel("ROUGE (F1 x 100)")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ablation_config(quick: bool, **kw: Any) -> DemoConfig:
    from tbt.demo.demo import demo_config

    dc = demo_config(quick, **kw)
    return dc if "output_dir" in kw and kw["output_dir"] else replace(dc, output_dir="tbt-ablate")


__all__ = ["SUITES", "DEFAULT_SUITES", "ablation_config", "format_table", "parse_suites",
           "plot_bars", "run_ablation"]
