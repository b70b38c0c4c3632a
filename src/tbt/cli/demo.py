"""``tbt demo``: corpus, tokenizer, FP teacher, four quantized students, evaluation, plots."""

from __future__ import annotations

import argparse

from tbt.cli._safety import add_overwrite_flag, owned_run_dir

# A demo folder holds this file; `tbt demo` reuses (rewrites) such a folder, and refuses any
# other non-empty one without --overwrite.
DEMO_MARKER = ".tbt-demo"


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="the whole pipeline offline on a CPU: teacher, TBT students, table, plots",
        description="Build a summarisation corpus from Python docstrings, train a tokenizer and "
                    "a small full-precision BART teacher (until its validation loss "
                    "plateaus), distil TBT students at 2-2-8, 2-2-2 and 1-1-1 and the TWN "
                    "2-2-2 and BWN 1-1-1 baselines, evaluate all (ROUGE) and save a table and "
                    "plots. No network needed; a few minutes on 2 idle CPU cores (--quick: a "
                    "smoke test; longer on a busy machine). `tbt replicate` runs the full "
                    "protocol with seeds and confidence intervals.")
    p.add_argument("--quick", action="store_true",
                   help="a small version for a smoke test (about 25 s on 2 idle cores)")
    p.add_argument("--output-dir", default="tbt-demo", metavar="DIR",
                   help="where everything is written (default: tbt-demo)")
    p.add_argument("--teacher-steps", type=int, default=None, metavar="N",
                   help="step cap of the FP teacher on the summaries after its warm-up; it "
                        "stops earlier when the validation loss plateaus (default: 1500; "
                        "quick: 30)")
    p.add_argument("--student-steps", type=int, default=None, metavar="N",
                   help="distillation steps of each student (default: 300; quick: 12)")
    p.add_argument("--eval-samples", type=int, default=None, metavar="N",
                   help="test documents scored (default: 200; quick: 24)")
    p.add_argument("--style", choices=("lead", "api", "xsum"), default=None,
                   help="corpus style: api (name + first sentence, the sentence removed from "
                        "the document: partly abstractive; default), lead (summary = the "
                        "document's first sentence: a copy task near 98 ROUGE), xsum (first "
                        "sentence removed; hardest)")
    p.add_argument("--warmup-steps", type=int, default=None, metavar="N",
                   help="teacher steps on the synthetic copy task first (default: 300)")
    p.add_argument("--variant", choices=("paper", "released"), default=None,
                   help="TBT quantizer variant of the students (default: paper)")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                   help="train in float32 (default: bfloat16 autocast)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="random seed (0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="hide progress bars")
    add_overwrite_flag(p, help=f"use a non-empty --output-dir that is not an earlier demo's "
                               f"(which holds {DEMO_MARKER}): its content is deleted first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tbt.demo.demo import demo_config, run_demo

    dc = demo_config(args.quick, output_dir=args.output_dir, teacher_steps=args.teacher_steps,
                     student_steps=args.student_steps, eval_samples=args.eval_samples,
                     style=args.style, warmup_steps=args.warmup_steps,
                     variant=args.variant, bf16=args.bf16, seed=args.seed,
                     progress=args.progress)
    with owned_run_dir(dc.output_dir, DEMO_MARKER, overwrite=args.overwrite):
        run_demo(dc)
    return 0
