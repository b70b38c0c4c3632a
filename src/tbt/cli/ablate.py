"""``tbt ablate``: the paper's Table 3 ablation and every weight method at the same bits."""

from __future__ import annotations

import argparse

from tbt.cli._safety import add_overwrite_flag, owned_run_dir

ABLATE_MARKER = ".tbt-ablate"  # an ablation folder holds it (see tbt.cli.demo.DEMO_MARKER)


def register(subparsers: argparse._SubParsersAction) -> None:
    from tbt.demo.ablate import DEFAULT_SUITES, SUITES

    suites = "; ".join(f"{k}: {', '.join(sp.name for sp in v)}" for k, v in SUITES.items())
    p = subparsers.add_parser(
        "ablate", help="ablation table: TWN/BWN baselines, + learned act., + stats weights, "
                       "+ both, and the neighbouring weight methods at the same bits",
        description="Distil one student per row from the same FP teacher (trained as in "
                    "`tbt demo`, or reused with --from-demo), with the same data, loss and "
                    "steps; only the quantizers differ. Prints and saves a table "
                    "(ablation.md/.csv/.json) with each row's ROUGE and its difference to its "
                    f"suite's baseline (first row), and plots. Suites: {suites}.")
    p.add_argument("--suite", default=",".join(DEFAULT_SUITES), metavar="NAMES",
                   help=f"comma-separated suites (default: {','.join(DEFAULT_SUITES)})")
    p.add_argument("--from-demo", metavar="DIR", default=None,
                   help="reuse the corpus, tokenizer and teacher of a finished `tbt demo "
                        "--output-dir DIR` run instead of training a teacher")
    p.add_argument("--output-dir", default=None, metavar="DIR",
                   help="where everything is written (default: tbt-ablate)")
    p.add_argument("--quick", action="store_true", help="the small demo preset (smoke test)")
    p.add_argument("--student-steps", type=int, default=None, metavar="N",
                   help="distillation steps of each student (default: the demo's, 300)")
    p.add_argument("--eval-samples", type=int, default=None, metavar="N",
                   help="test documents scored (default: 200)")
    p.add_argument("--style", choices=("lead", "api", "xsum"), default=None,
                   help="corpus style when the teacher is trained here (see `tbt demo --help`)")
    p.add_argument("--variant", choices=("paper", "released"), default=None,
                   help="TBT quantizer variant (default: paper)")
    p.add_argument("--seed", type=int, default=None, metavar="N", help="random seed (0)")
    p.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="hide progress bars")
    add_overwrite_flag(p, help=f"use a non-empty --output-dir that is not an earlier "
                               f"ablation's (which holds {ABLATE_MARKER}): its content is "
                               f"deleted first")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from tbt.demo.ablate import ablation_config, parse_suites, run_ablation

    suites = parse_suites(args.suite)
    dc = ablation_config(args.quick, output_dir=args.output_dir,
                         student_steps=args.student_steps, eval_samples=args.eval_samples,
                         style=args.style, variant=args.variant, seed=args.seed,
                         progress=args.progress)
    with owned_run_dir(dc.output_dir, ABLATE_MARKER, overwrite=args.overwrite,
                       inputs={"--from-demo": args.from_demo}):
        run_ablation(dc, suites, from_demo=args.from_demo)
    return 0
