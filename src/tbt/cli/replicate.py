"""``tbt replicate``: the paper's Tables 1 and 3 as a resumable protocol with seeds and CIs."""

from __future__ import annotations

import argparse
import json


def _override(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "replicate", help="the paper's tables as a protocol: converged teacher, FP control, "
                          "TBT/TWN/BWN students and Table 3 over seeds, bootstrap CIs",
        description="Train a full-precision teacher until its validation loss plateaus (or take "
                    "a fine-tuned one), distil an FP control and every requested student from "
                    "it for several seeds, evaluate all on the test split and write one table "
                    "(replicate.md/.json, replicate.png): each row's ROUGE-1 with a paired "
                    "bootstrap 95%% CI over test examples, its gap to the FP control and to the "
                    "teacher, the paper's number (Liu et al., ACL 2023, BART-base XSUM) and "
                    "whether each of the paper's orderings reproduced. Every run has its own "
                    "folder; rerunning the same command skips finished runs and resumes a "
                    "killed one. Default data: the offline docstring corpus (`api` style).")
    d = p.add_argument_group("data (default: the demo's offline docstring corpus)")
    d.add_argument("--train-file", metavar="F")
    d.add_argument("--validation-file", metavar="F",
                   help="needed when the teacher is trained here (early stopping)")
    d.add_argument("--test-file", metavar="F")
    d.add_argument("--source-column", metavar="C", help="(default: document)")
    d.add_argument("--target-column", metavar="C", help="(default: summary)")
    d.add_argument("--dataset", metavar="NAME", help="hub dataset instead of files (GPU runs)")
    d.add_argument("--dataset-config", metavar="C")
    d.add_argument("--style", choices=("lead", "api", "xsum"),
                   help="docstring corpus style (default: api; see `tbt demo --help`)")
    d.add_argument("--max-examples", type=int, metavar="N", help="docstring corpus size cap")
    d.add_argument("--max-source-length", type=int, metavar="N", help="source tokens (96)")
    d.add_argument("--max-target-length", type=int, metavar="N",
                   help="target tokens, also the generation cap (32)")
    d.add_argument("--eval-samples", type=int, metavar="N",
                   help="test examples scored (default 200; recipes: the whole test split)")
    m = p.add_argument_group("teacher")
    m.add_argument("--teacher", metavar="M",
                   help="a fine-tuned full-precision teacher (directory or hub name): "
                        "evaluated, not trained")
    m.add_argument("--model", dest="architecture", metavar="PRESET",
                   help="architecture of the teacher trained from scratch (default bart-tiny; "
                        "bart-small)")
    m.add_argument("--arch-override", dest="model_overrides", action="append",
                   type=_override, metavar="KEY=VALUE",
                   help="change one field of the architecture preset (repeatable), e.g. "
                        "d_model=64")
    m.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer directory (default: the teacher's, or one trained here)")
    m.add_argument("--vocab-size", type=int, metavar="N", help="trained tokenizer size (1000)")
    m.add_argument("--warmup-steps", type=int, metavar="N",
                   help="copy warm-up steps of the from-scratch teacher (300)")
    m.add_argument("--teacher-max-steps", type=int, metavar="N",
                   help="step cap of the teacher (3000)")
    m.add_argument("--teacher-lr", type=float, metavar="X", help="(2e-3)")
    m.add_argument("--teacher-eval-every", type=int, metavar="N",
                   help="teacher validation period in steps (100)")
    m.add_argument("--patience", type=int, metavar="N",
                   help="stop the teacher after N validations without improvement (3)")
    s = p.add_argument_group("students")
    s.add_argument("--students", metavar="LIST",
                   help="comma-separated row keys or groups: tbt, tbt-paper, tbt-released, "
                        "baselines, table3, table3-binary, low-act, all (default: "
                        "tbt,baselines,table3); the FP control always runs. --list-students "
                        "shows the keys")
    s.add_argument("--list-students", action="store_true", help="print the rows and exit")
    s.add_argument("--seeds", metavar="N|LIST",
                   help="a count (3 = seeds 0,1,2; default) or a list (0,4,9)")
    s.add_argument("--max-steps", dest="student_steps", type=int, metavar="N",
                   help="distillation steps per student and for the FP control (300)")
    s.add_argument("--student-lr", type=float, metavar="X",
                   help="(1e-3; recipes: the recipe's rate for each setting)")
    s.add_argument("--batch-size", type=int, metavar="N", help="(16; recipes 8)")
    s.add_argument("--save-every", type=int, metavar="N",
                   help="checkpoint period of every run, for resuming (50)")
    s.add_argument("--recipe", choices=("xsum", "cnn"),
                   help="the paper's runs: hub data and fine-tuned BART-base teacher, the "
                        "recipe's learning rate per setting, loss and generation preset (GPU; "
                        "size with --max-steps)")
    o = p.add_argument_group("run")
    o.add_argument("--output-dir", metavar="DIR",
                   help="default tbt-replicate (--quick: tbt-replicate-quick)")
    o.add_argument("--quick", action="store_true",
                   help="a smoke test: small corpus, 60-step teacher cap, 12-step students, "
                        "the low-act rows, 2 seeds")
    o.add_argument("--num-beams", type=int, metavar="N", help="generation beams (2)")
    o.add_argument("--bootstrap", dest="bootstrap_resamples", type=int, metavar="N",
                   help="bootstrap resamples (2000)")
    o.add_argument("--device", choices=("auto", "cpu", "cuda"), help="(cpu; recipes auto)")
    o.add_argument("--no-bf16", dest="bf16", action="store_false", default=None,
                   help="train in float32 (default on CPU: bfloat16 autocast)")
    o.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                   help="hide progress bars")
    from tbt.cli._safety import add_overwrite_flag

    add_overwrite_flag(p)
    p.set_defaults(func=run)


_SETTINGS = ("train_file", "validation_file", "test_file", "source_column", "target_column",
             "dataset", "dataset_config", "style", "max_examples", "max_source_length",
             "max_target_length", "eval_samples", "teacher",
             "architecture", "model_overrides", "tokenizer", "vocab_size", "warmup_steps",
             "teacher_max_steps", "teacher_lr", "teacher_eval_every", "patience", "students",
             "seeds", "student_steps", "student_lr", "batch_size", "save_every", "recipe",
             "output_dir", "num_beams", "bootstrap_resamples", "device", "bf16", "progress")


def run(args: argparse.Namespace) -> int:
    from tbt.demo.replicate import ROWS, replicate_config, run_replicate

    if args.list_students:
        for r in ROWS:
            print(f"{r.key:22s} {r.name.strip():40s} bits {r.bits:5s} weights {r.method:4s} "
                  f"acts {r.act_method:7s} variant {r.variant:8s} groups {','.join(r.groups)}")
        return 0
    kw = {k: getattr(args, k) for k in _SETTINGS}
    if kw["model_overrides"] is not None:
        kw["model_overrides"] = tuple(kw["model_overrides"])
    rc = replicate_config(args.quick, **kw)
    # never write into a folder this command did not make (its protocol.json marks its own; the
    # same command may run as parallel workers there, so no run lock on the folder itself)
    import os

    from tbt.cli._safety import check_output_dir, clear_dir

    mine = os.path.isfile(os.path.join(rc.output_dir, "protocol.json"))
    check_output_dir(rc.output_dir, overwrite=args.overwrite,
                     inputs={"--teacher": rc.teacher, "--tokenizer": rc.tokenizer,
                             "--train-file": rc.train_file},
                     allow_occupied=mine, what="it holds files not written by tbt replicate:")
    if args.overwrite and not mine and os.path.isdir(rc.output_dir):
        clear_dir(rc.output_dir)
    run_replicate(rc)
    return 0
