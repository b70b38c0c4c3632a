"""``tbt replicate``: the paper's Tables 1 and 3 as a protocol, on any corpus, resumable.

The claim under test (Liu et al., "Binary and Ternary Natural Language Generation", ACL 2023,
Tables 1 and 3, BART-base on XSUM): ternary/binary students distilled with TBT stay close to
their full-precision teacher (ROUGE-1 gaps −1.4 at 2-2-8, −2.9 at 1-1-8, −7.6 at 2-2-2, −12.2 at
1-1-1), the TWN/BWN baselines collapse at low activation bits (TWN 2-2-2 12.8, BWN 1-1-1 1.9 vs
TBT 36.2 / 31.7), and each of TBT's two quantizers adds something (Table 3).

Protocol (:func:`run_replicate`), every stage in its own folder under ``output_dir``:

1. **data**: local train/validation/test files, a hub dataset (``--dataset``, ``--recipe``), or
   the demo's offline docstring corpus (:mod:`tbt.demo.corpus`, default); a tokenizer is
   trained when the teacher is trained from scratch;
2. **teacher** (``teacher/``): trained to convergence: the demo's copy warm-up, then
   full-precision training until the validation loss has not improved for ``patience``
   validations (:func:`tbt.train.loop.plateaued`), under a step cap; its curve is plotted
   (``teacher_curve.png``). A given ``--teacher`` (a fine-tuned checkpoint or hub name) is only
   evaluated;
3. **FP control** (``runs/fp-control/seed-S``): the same distillation as the students from that
   teacher, same steps and seeds, ``--bits fp``. Gaps are reported against it (what
   quantization costs under this budget) and against the teacher;
4. **students** (``runs/KEY/seed-S``, :data:`ROWS`): TBT at 2-2-8, 1-1-8, 2-2-2 and 1-1-1 in
   both quantizer variants (``paper``, ``released``), the TWN/BWN baselines (min/max
   activations, the paper's baseline), and Table 3's rows (TWN 2-2-2 with min/max activations,
   + learned activations, + statistics-based weights, + both; at 1 bit the non-learned
   activation is ``sign``, :mod:`tbt.quant.act_methods`); rows that are the same run
   (Table 3's first and last row are TWN 2-2-2 and TBT 2-2-2) share it;
5. **evaluation** of every run on the test split: per-example ROUGE
   (:func:`tbt.eval.bootstrap.per_example_rouge`), written with the run's metrics to
   ``result.json``, the file that marks a run done;
6. **table** (``replicate.md``, ``replicate.json``, ``replicate.png``): each row's score (the
   mean over seeds of the per-example mean F1 × 100) with a 95 % paired bootstrap interval over
   test examples (each example's score averaged over seeds first), the spread over seeds, the
   gap to the FP control and to the teacher (paired intervals), next to the paper's numbers
   (:data:`PAPER_XSUM`), and one line per ordering of the paper saying whether it reproduced.

Resuming: a run whose ``result.json`` exists is skipped; any other run is (re)started with the
training loop's ``--resume`` (checkpoints every ``save_every`` steps), so a killed command
continues where it stopped. The settings that change results are stored in
``protocol.json``; rerunning into the same folder with different ones is refused (students and
seeds may be added). Several copies of one command may run at once as workers: each run is
claimed with a lock file holding the owner's PID (stale locks of killed commands are taken
over), and data, tokenizer and teacher are prepared under one lock.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field, fields, replace
from typing import Any

import numpy as np

from tbt._lock import RunLock

# ---- the paper's numbers ---------------------------------------------------------------------

PAPER_CITATION = ('Liu et al., "Binary and Ternary Natural Language Generation", ACL 2023, '
                  'Tables 1 and 3 (BART-base, XSUM)')
# ROUGE-1 / ROUGE-2 / ROUGE-L of BART-base on XSUM, from the paper's Tables 1 and 3.
PAPER_XSUM: dict[str, tuple[float, float, float]] = {
    "fp": (43.84, 20.79, 35.71),
    "tbt-2-2-8": (42.40, 19.54, 34.51),
    "tbt-1-1-8": (40.96, 18.37, 33.30),
    "tbt-2-2-2": (36.21, 14.38, 29.07),
    "tbt-1-1-1": (31.68, 11.19, 25.29),
    "twn-2-2-8": (39.99, 17.13, 31.99),
    "twn-2-2-2": (12.80, 1.21, 11.40),
    "bwn-1-1-8": (1.90, 0.01, 1.78),
    "bwn-1-1-1": (1.90, 0.01, 1.78),
    "t3-learned-act": (15.05, 1.38, 12.13),
    "t3-stats-weight": (13.79, 0.87, 12.74),
    "t3b-learned-act": (1.90, 0.01, 1.78),
    "t3b-stats-weight": (10.96, 0.29, 10.00),
}


@dataclass(frozen=True)
class Row:
    """One row of the table: ``key`` (CLI name and folder), display ``name``, the run settings,
    ``paper``: its key in :data:`PAPER_XSUM` (``None``: the paper has no such row)."""

    key: str
    name: str
    bits: str
    method: str = "tbt"
    act_method: str = "auto"
    variant: str = "paper"
    paper: str | None = None
    groups: tuple[str, ...] = ()

    @property
    def run_id(self) -> tuple[str, str, str, str]:
        """Rows with equal run ids are one training run (TWN/BWN ignore the variant)."""
        variant = self.variant if self.method == "tbt" else "-"
        act = self.act_method
        if act == "auto":
            act = "fp" if self.bits == "fp" else ("minmax" if self.bits.endswith("-8")
                                                  else "elastic")
        return (self.bits, self.method, act, variant)


def _fixed_act(bits: str) -> str:
    """The non-learned activation quantizer of the baselines: min/max (DQ-BART) from 2 bits
    up, ``sign`` (``mean|x|·sign(x)``) at 1 bit, where min/max has no grid."""
    return "sign" if bits.endswith("-1") else "minmax"


def _rows() -> tuple[Row, ...]:
    rows = [Row("fp-control", "FP control (distilled, --bits fp)", "fp", "-", "-", "-", "fp",
                ("control",))]
    for variant in ("paper", "released"):
        tag = "" if variant == "paper" else "released-"
        for bits in ("2-2-8", "1-1-8", "2-2-2", "1-1-1"):
            rows.append(Row(f"tbt-{tag}{bits}", f"TBT {bits} ({variant})", bits, "tbt", "auto",
                            variant, f"tbt-{bits}", ("tbt", f"tbt-{variant}")))
    for method, settings in (("twn", ("2-2-8", "2-2-2")), ("bwn", ("1-1-8", "1-1-1"))):
        for bits in settings:  # the paper's baselines: non-learned activations
            rows.append(Row(f"{method}-{bits}", f"{method.upper()} {bits}", bits, method,
                            _fixed_act(bits), "paper", f"{method}-{bits}", ("baselines",)))
    for tag, bits, base in (("t3", "2-2-2", "twn"), ("t3b", "1-1-1", "bwn")):
        group = "table3" if tag == "t3" else "table3-binary"
        act = _fixed_act(bits)
        rows += [
            Row(f"{tag}-minmax", f"{base.upper()} {bits} + {act} act. (Table 3)", bits, base,
                act, "paper", f"{base}-{bits}", (group,)),
            Row(f"{tag}-learned-act", f"  + learned act. ({bits})", bits, base, "elastic",
                "paper", f"{tag}-learned-act", (group,)),
            Row(f"{tag}-stats-weight", f"  + stats weight ({bits})", bits, "tbt", act,
                "paper", f"{tag}-stats-weight", (group,)),
            Row(f"{tag}-both", f"  + both (= TBT {bits} paper)", bits, "tbt", "elastic",
                "paper", f"tbt-{bits}", (group,)),
        ]
    return tuple(rows)


ROWS: tuple[Row, ...] = _rows()
ROW_BY_KEY = {r.key: r for r in ROWS}
DEFAULT_GROUPS = ("tbt", "baselines", "table3")
GROUPS = ("tbt", "tbt-paper", "tbt-released", "baselines", "table3", "table3-binary", "low-act")


def parse_students(spec: str | None) -> tuple[str, ...]:
    """Row keys from a comma-separated list of keys and groups (``None``: the default groups:
    TBT in both variants, the TWN/BWN baselines and Table 3). ``low-act`` = the 2-2-2 and
    1-1-1 rows of TBT (paper variant), TWN and BWN. The FP control is always included."""
    items = [s.strip() for s in (spec or ",".join(DEFAULT_GROUPS)).split(",") if s.strip()]
    keys: list[str] = []
    for item in items:
        if item == "all":
            keys += [r.key for r in ROWS]
        elif item == "low-act":
            keys += ["tbt-2-2-2", "twn-2-2-2", "tbt-1-1-1", "bwn-1-1-1"]
        elif item in GROUPS:
            keys += [r.key for r in ROWS if item in r.groups]
        elif item in ROW_BY_KEY:
            keys.append(item)
        else:
            raise ValueError(f"unknown student {item!r}; give row keys ({', '.join(ROW_BY_KEY)}) "
                             f"or groups ({', '.join(GROUPS)}, all), comma-separated")
    keys = ["fp-control"] + [k for k in dict.fromkeys(keys) if k != "fp-control"]
    return tuple(k for k in ROW_BY_KEY if k in keys)  # table order


def parse_seeds(spec: str | int | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``"3"`` (or 3) = three seeds 0, 1, 2; ``"0,5,7"`` = those seeds."""
    if isinstance(spec, (list, tuple)):
        seeds = tuple(int(s) for s in spec)
    else:
        text = str(spec).strip()
        try:
            seeds = (tuple(int(s) for s in text.split(",") if s.strip()) if "," in text
                     else tuple(range(int(text))))
        except ValueError:
            raise ValueError(f"--seeds {spec!r}: give a count (3) or a list (0,1,2)") from None
    if not seeds or len(set(seeds)) != len(seeds) or min(seeds) < 0:
        raise ValueError(f"--seeds {spec!r}: need at least one seed, distinct and >= 0")
    return seeds


# ---- configuration ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ReplicateConfig:
    """Every setting of a replication; :meth:`quick` is the smoke-test preset.

    Data: local files (``train_file`` ...), a hub ``dataset``, or the docstring corpus
    (``style``, ``max_examples``). Teacher: ``teacher`` (a fine-tuned FP checkpoint or hub name,
    evaluated only) or trained from scratch as ``architecture`` (+ ``model_overrides``).
    ``recipe`` (``xsum``/``cnn``): the paper's runs (hub data and teacher, learning rate per
    setting, generation preset, released loss); see ``docs/training.md``.
    """

    output_dir: str = "tbt-replicate"
    students: tuple[str, ...] = parse_students(None)
    seeds: tuple[int, ...] = (0, 1, 2)
    # data
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    source_column: str = "document"
    target_column: str = "summary"
    dataset: str | None = None
    dataset_config: str | None = None
    style: str = "api"
    max_examples: int | None = None
    vocab_size: int = 1000
    max_source_length: int = 96
    max_target_length: int = 32
    # teacher
    teacher: str | None = None
    tokenizer: str | None = None
    architecture: str = "bart-tiny"
    model_overrides: tuple[tuple[str, Any], ...] = ()
    warmup_steps: int = 300
    teacher_max_steps: int = 3000
    teacher_lr: float = 2e-3
    teacher_eval_every: int = 100
    patience: int = 3
    teacher_seed: int = 0
    # students
    student_steps: int = 300
    student_lr: float | None = 1e-3  # None: the recipe's learning rate for each setting
    batch_size: int = 16
    save_every: int = 50
    recipe: str | None = None
    # evaluation
    eval_samples: int | None = 200
    num_beams: int = 2
    generation: str | None = None  # a GENERATION_PRESETS name; None = the demo's settings
    bootstrap_resamples: int = 2000
    bf16: bool = True
    device: str = "cpu"
    progress: bool = True

    # the settings that do not change any run's result (may differ on a rerun)
    VOLATILE = ("output_dir", "students", "seeds", "progress", "bootstrap_resamples")

    @classmethod
    def quick(cls, **kw: Any) -> ReplicateConfig:
        small = dict(max_examples=800, vocab_size=600, max_source_length=64,
                     max_target_length=24, warmup_steps=30, teacher_max_steps=60,
                     teacher_eval_every=20, patience=2, student_steps=12, save_every=6,
                     eval_samples=24, num_beams=1, seeds=(0, 1),
                     students=parse_students("low-act"), output_dir="tbt-replicate-quick")
        return cls(**{**small, **kw})

    def protocol(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if k not in self.VOLATILE}


def replicate_config(quick: bool = False, **kw: Any) -> ReplicateConfig:
    """The default (or ``quick``) config with the non-``None`` values of ``kw``; a
    ``recipe`` fills in the paper's data, teacher, lengths and generation first."""
    kw = {k: v for k, v in kw.items() if v is not None}
    if "students" in kw and isinstance(kw["students"], str):
        kw["students"] = parse_students(kw["students"])
    if "seeds" in kw:
        kw["seeds"] = parse_seeds(kw["seeds"])
    recipe = kw.get("recipe")
    if recipe is not None:
        kw = {**recipe_defaults(recipe), **kw}
    names = {f.name for f in fields(ReplicateConfig)}
    unknown = set(kw) - names
    if unknown:
        raise ValueError(f"unknown replicate settings {sorted(unknown)}")
    rc = ReplicateConfig.quick(**kw) if quick else ReplicateConfig(**kw)
    if sum(x is not None for x in (rc.train_file, rc.dataset)) > 1:
        raise ValueError("give either local files (--train-file ...) or --dataset, not both")
    if rc.train_file and not rc.test_file:
        raise ValueError("--train-file needs --test-file (and --validation-file for the "
                         "teacher's early stopping)")
    if rc.teacher is None and (rc.train_file or rc.dataset) and not rc.validation_file and \
            not rc.dataset:
        raise ValueError("training a teacher needs --validation-file (early stopping)")
    for name in ("student_steps", "teacher_max_steps", "teacher_eval_every", "save_every",
                 "bootstrap_resamples", "num_beams", "batch_size"):
        if getattr(rc, name) < 1:
            raise ValueError(f"{name}={getattr(rc, name)} must be >= 1")
    return rc


def recipe_defaults(name: str) -> dict[str, Any]:
    """``xsum`` / ``cnn``: the paper's data, fine-tuned BART-base teacher, lengths and
    generation preset (:data:`tbt.train.presets.RECIPES`); students then take each setting's
    learning rate from the recipe (``student_lr=None``)."""
    from tbt.train.presets import RECIPES

    key = f"{name}-2-2-8"
    if name not in ("xsum", "cnn") or key not in RECIPES:
        raise ValueError(f"--recipe {name!r}: choose xsum or cnn (the paper's BART-base "
                         f"summarisation runs)")
    r = RECIPES[key]
    return dict(dataset=r["dataset"], dataset_config=r.get("dataset_config"),
                source_column=r["source_column"], target_column=r["target_column"],
                teacher=r["model"], max_source_length=r["max_source_length"],
                max_target_length=r["max_target_length"], generation=r["generation"],
                student_lr=None, batch_size=r["batch_size"], bf16=False, device="auto",
                eval_samples=None)


# ---- the runs --------------------------------------------------------------------------------

def _atomic_json(path: str, obj: Any) -> None:
    from tbt.train.checkpoint import write_json

    os.makedirs(os.path.dirname(path), exist_ok=True)
    write_json(path, obj)


def _read_json(path: str) -> Any:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


class _Log:
    def __init__(self) -> None:
        self.t0 = time.time()

    def __call__(self, msg: str) -> None:
        print(f"[{time.time() - self.t0:6.0f}s] {msg}", flush=True)


def _check_protocol(rc: ReplicateConfig) -> None:
    path = os.path.join(rc.output_dir, "protocol.json")
    now = json.loads(json.dumps(rc.protocol()))
    if os.path.isfile(path):
        before = _read_json(path)
        diff = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if diff:
            changes = ", ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in diff)
            raise ValueError(f"{rc.output_dir} holds a replication with other settings "
                             f"({changes}); rerun with the same settings or choose another "
                             f"--output-dir")
    else:
        _atomic_json(path, now)


def prepare_data(rc: ReplicateConfig, log: _Log) -> dict[str, Any]:
    """Data paths (or the hub dataset) and the tokenizer directory."""
    from tbt.demo.corpus import build_docstring_corpus

    data: dict[str, Any] = {}
    if rc.dataset:
        data["flat"] = dict(dataset=rc.dataset, dataset_config=rc.dataset_config)
    else:
        if rc.train_file:
            paths = {"train": rc.train_file, "validation": rc.validation_file,
                     "test": rc.test_file}
        else:
            ddir = os.path.join(rc.output_dir, "data")
            paths = {k: os.path.join(ddir, f"{k}.jsonl") for k in ("train", "validation", "test")}
            if not os.path.isfile(os.path.join(ddir, "done")):
                log(f"data: the docstring corpus, style {rc.style} ({ddir})")
                paths = build_docstring_corpus(ddir, rc.max_examples, 0, style=rc.style)
                open(os.path.join(ddir, "done"), "w").close()
        data["flat"] = {f"{k}_file": v for k, v in paths.items() if v and k != "test"}
        data["test_file"] = paths["test"]
    data["flat"].update(source_column=rc.source_column, target_column=rc.target_column,
                        max_source_length=rc.max_source_length,
                        max_target_length=rc.max_target_length)
    tok_dir = rc.tokenizer or rc.teacher
    if tok_dir is None:
        tok_dir = os.path.join(rc.output_dir, "tokenizer")
        if not os.path.isfile(os.path.join(tok_dir, "done")):
            from tbt.train.tokenizer import train_tokenizer

            log(f"tokenizer: byte-level BPE, {rc.vocab_size} tokens")
            if not rc.train_file and not rc.dataset:
                files = [paths["train"]]
            elif rc.train_file:
                files = [rc.train_file]
            else:
                raise ValueError("a teacher trained from scratch on a hub dataset needs "
                                 "--tokenizer DIR")
            train_tokenizer(files, [rc.source_column, rc.target_column], rc.vocab_size, tok_dir)
            open(os.path.join(tok_dir, "done"), "w").close()
    data["tokenizer"] = tok_dir
    return data


def _test_rows(rc: ReplicateConfig, data: dict[str, Any]) -> list[dict]:
    from tbt.data import DataConfig, load_raw_splits

    if rc.dataset:
        dcfg = DataConfig(dataset=rc.dataset, dataset_config=rc.dataset_config,
                          source_column=rc.source_column, target_column=rc.target_column,
                          max_eval_samples=rc.eval_samples)
    else:
        dcfg = DataConfig(test_file=data["test_file"], source_column=rc.source_column,
                          target_column=rc.target_column, max_eval_samples=rc.eval_samples)
    rows = load_raw_splits(dcfg, ("test",)).get("test")
    if not rows:
        raise ValueError("no test examples: give --test-file (or a dataset with a test split)")
    return rows


def _gen_kwargs(rc: ReplicateConfig) -> dict[str, Any]:
    from tbt.eval.evaluate import resolve_preset

    if rc.generation:
        return resolve_preset(rc.generation)
    return dict(num_beams=rc.num_beams, max_length=rc.max_target_length, min_length=5,
                no_repeat_ngram_size=3)


def evaluate_run(rc: ReplicateConfig, model, tok, test: list[dict], run_dir: str,
                 extra: dict[str, Any]) -> dict[str, Any]:
    """Generate on the test rows, score every example, write ``run_dir/result.json`` last."""
    from tbt.eval.bootstrap import per_example_rouge
    from tbt.eval.evaluate import evaluate

    device = "cuda" if rc.device != "cpu" and _cuda() else "cpu"
    m = evaluate(model, tok, test, metrics=("rouge",), gen_kwargs=_gen_kwargs(rc),
                 batch_size=32, device=device, output_dir=os.path.join(run_dir, "eval"),
                 max_source_length=rc.max_source_length, progress=rc.progress)
    with open(os.path.join(run_dir, "eval", "predictions.jsonl"), encoding="utf-8") as f:
        preds = [json.loads(line)["prediction"] for line in f]
    per = per_example_rouge(preds, [r["target"] for r in test])
    result = {"metrics": m, "per_example": {k: v.tolist() for k, v in per.items()}, **extra}
    _atomic_json(os.path.join(run_dir, "result.json"), result)
    return result


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def _train_flat(rc: ReplicateConfig, data: dict[str, Any], out: str, **kw: Any) -> dict:
    flat = dict(data["flat"], output_dir=out, tokenizer=data["tokenizer"],
                batch_size=rc.batch_size, max_eval_samples=64, bf16=rc.bf16, device=rc.device,
                progress=rc.progress, warmup_ratio=0.05, save_every=rc.save_every,
                resume=True)
    flat.update(kw)
    return flat


def train_teacher(rc: ReplicateConfig, data: dict[str, Any], tok, test: list[dict],
                  log: _Log) -> dict[str, Any]:
    """The teacher (``teacher/``): trained to convergence from scratch, or a given one; its
    ``result.json`` (test scores, steps, whether it stopped early)."""
    from tbt.train.config import TrainConfig
    from tbt.train.loop import train

    tdir = os.path.join(rc.output_dir, "teacher")
    done = os.path.join(tdir, "result.json")
    if os.path.isfile(done):
        log("teacher: done (skipped)")
        return _read_json(done)
    if rc.teacher is not None:
        from tbt.hf import load_pretrained

        log(f"teacher: {rc.teacher} (given; evaluated only)")
        model = load_pretrained(rc.teacher, with_tokenizer=False)[0]
        return evaluate_run(rc, model, tok, test, tdir, {"dir": rc.teacher, "given": True})
    from tbt.demo.demo import DemoConfig, copy_warmup

    warm = os.path.join(rc.output_dir, "teacher-warmup")
    if not os.path.isfile(os.path.join(warm, "done")):
        log(f"teacher: {rc.warmup_steps} steps of copy warm-up ({rc.architecture})")
        dc = DemoConfig(architecture=rc.architecture, model_overrides=rc.model_overrides,
                        warmup_steps=rc.warmup_steps, max_source_length=rc.max_source_length,
                        bf16=rc.bf16, seed=rc.teacher_seed, progress=rc.progress)
        copy_warmup(dc, tok, warm)
        open(os.path.join(warm, "done"), "w").close()
    log(f"teacher: full precision until the validation loss plateaus (patience "
        f"{rc.patience} x {rc.teacher_eval_every} steps, cap {rc.teacher_max_steps} steps)")
    cfg = TrainConfig.from_flat(_train_flat(
        rc, data, tdir, model=warm, bits="fp", max_steps=rc.teacher_max_steps,
        lr=rc.teacher_lr, seed=rc.teacher_seed, eval_every=rc.teacher_eval_every,
        early_stop_patience=rc.patience, save_every=rc.teacher_eval_every,
        max_eval_samples=500))
    res = train(cfg)
    return evaluate_run(rc, res["model"], tok, test, tdir,
                        {"dir": tdir, "given": False, "steps": res["steps"],
                         "stopped_early": bool(res["stopped_early"]),
                         "train_time_s": res["train_time_s"]})


def _run_key(row: Row) -> str:
    """The folder of a row's runs: the first row (in table order) with the same run id."""
    for r in ROWS:
        if r.run_id == row.run_id:
            return r.key
    return row.key  # pragma: no cover


def _student_lr(rc: ReplicateConfig, bits: str) -> float:
    if rc.student_lr is not None:
        return rc.student_lr
    from tbt.train.presets import PAPER_LR, README_LR

    if bits == "fp":
        return PAPER_LR[8]
    return README_LR.get(rc.recipe or "", {}).get(bits, PAPER_LR[int(bits.split("-")[-1])])


def _recipe_train_settings(rc: ReplicateConfig) -> dict[str, Any]:
    """The recipe's optimisation and loss settings (not its data, bits, lr, seed, length)."""
    if rc.recipe is None:
        return {}
    from tbt.train.presets import RECIPES

    r = RECIPES[f"{rc.recipe}-2-2-8"]
    keep = ("grad_accum", "weight_decay", "warmup_ratio", "adam_eps", "w_ce", "w_logits",
            "w_hidden", "w_attn", "mask_padding", "last_encoder_twice", "generation")
    return {k: r[k] for k in keep if k in r}


def train_and_evaluate(rc: ReplicateConfig, data: dict[str, Any], tok, test: list[dict],
                       teacher_dir: str, row: Row, seed: int, log: _Log, label: str
                       ) -> dict[str, Any] | None:
    """One student (or the FP control) for one seed: ``runs/KEY/seed-S/result.json``;
    ``None`` when another live process holds the run's lock (it is left to that process)."""
    run_dir = os.path.join(rc.output_dir, "runs", _run_key(row), f"seed-{seed}")
    done = os.path.join(run_dir, "result.json")
    if os.path.isfile(done):
        log(f"{label}: {row.name}, seed {seed}: done (skipped)")
        return _read_json(done)
    os.makedirs(run_dir, exist_ok=True)
    lock = RunLock(os.path.join(run_dir, ".lock"))
    if not lock.acquire():
        log(f"{label}: {row.name}, seed {seed}: running in {lock.owner()} (left to it)")
        return None
    try:
        return _train_and_evaluate(rc, data, tok, test, teacher_dir, row, seed, log, label,
                                   run_dir)
    finally:
        lock.release()


def _train_and_evaluate(rc, data, tok, test, teacher_dir, row, seed, log, label, run_dir):
    from tbt.train.config import TrainConfig
    from tbt.train.loop import train

    log(f"{label}: {row.name}, seed {seed}: {rc.student_steps} distillation steps")
    kw: dict[str, Any] = dict(teacher=teacher_dir, bits=row.bits, seed=seed,
                              max_steps=rc.student_steps, lr=_student_lr(rc, row.bits),
                              eval_every=max(1, rc.student_steps // 4),
                              **_recipe_train_settings(rc))
    if row.bits != "fp":
        kw.update(method=row.method, act_method=row.act_method, variant=row.variant)
    res = train(TrainConfig.from_flat(_train_flat(rc, data, run_dir, **kw)))
    return evaluate_run(rc, res["model"], tok, test, run_dir,
                        {"row": row.key, "seed": seed, "steps": res["steps"],
                         "train_time_s": res["train_time_s"]})


# ---- the table -------------------------------------------------------------------------------

METRIC = "rouge1"


def _verdict(gap: tuple[float, float, float]) -> str:
    d, lo, hi = gap
    if d >= 0:
        return "yes" if lo > 0 else "yes on the means, within noise (CI includes 0)"
    return "no, reversed (CI excludes 0)" if hi < 0 else "no on the means, within noise"


def summarize(rc: ReplicateConfig, teacher: dict[str, Any],
              results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """Rows with means, intervals and gaps; the orderings; everything JSON-able."""
    from tbt.eval.bootstrap import bootstrap_ci, bootstrap_indices, paired_bootstrap

    t_scores = np.asarray(teacher["per_example"][METRIC], dtype=np.float64)
    n = t_scores.size
    idx = bootstrap_indices(n, rc.bootstrap_resamples, seed=0)
    per_row: dict[str, np.ndarray] = {}
    rows = []
    control_key = "fp-control"
    for key in rc.students:
        runs = results.get(key)
        if not runs:
            continue
        per_seed = np.stack([np.asarray(r["per_example"][METRIC], dtype=np.float64)
                             for r in runs])  # (seeds, n)
        per_row[key] = per_seed.mean(axis=0)
    control = per_row.get(control_key)
    for key in rc.students:
        if key not in per_row:
            continue
        row, runs, x = ROW_BY_KEY[key], results[key], per_row[key]
        mean, lo, hi = bootstrap_ci(x, indices=idx)
        seed_means = [float(np.mean(r["per_example"][METRIC])) for r in runs]
        out = dict(key=key, name=row.name, bits=row.bits, method=row.method,
                   act_method=row.act_method, variant=row.variant, run=_run_key(row),
                   seeds=[r["seed"] for r in runs], score=mean, ci=[lo, hi],
                   seed_scores=seed_means,
                   seed_sd=float(np.std(seed_means, ddof=1)) if len(runs) > 1 else None,
                   rouge2=float(np.mean([np.mean(r["per_example"]["rouge2"]) for r in runs])),
                   rougeLsum=float(np.mean([np.mean(r["per_example"]["rougeLsum"])
                                            for r in runs])),
                   gen_len=float(np.mean([r["metrics"]["gen_len"] for r in runs])),
                   gap_teacher=list(paired_bootstrap(x, t_scores, indices=idx)))
        out["gap_control"] = (list(paired_bootstrap(x, control, indices=idx))
                              if control is not None else None)
        if row.paper is not None:
            p, fp = PAPER_XSUM[row.paper][0], PAPER_XSUM["fp"][0]
            out["paper_r1"], out["paper_gap"] = p, round(p - fp, 2)
        rows.append(out)

    def gap(a: str, b: str) -> tuple[float, float, float] | None:
        if a in per_row and b in per_row:
            return paired_bootstrap(per_row[a], per_row[b], indices=idx)
        return None

    orderings = []

    def check(claim: str, pairs: list[tuple[str, str]], paper: list[float]) -> None:
        gaps = [gap(a, b) for a, b in pairs]
        if any(g is None for g in gaps):
            orderings.append({"claim": claim, "verdict": "not run (rows missing)",
                              "pairs": []})
            return
        verdicts = [_verdict(g) for g in gaps]
        if all(v == "yes" for v in verdicts):
            overall = "reproduced"
        elif all(v.startswith("yes") for v in verdicts):
            overall = "reproduced on the means, not resolved by the intervals"
        elif any(v.startswith("no, reversed") for v in verdicts):
            overall = "not reproduced (a reversal the intervals resolve)"
        else:
            overall = "not reproduced on the means (within noise)"
        orderings.append({"claim": claim, "verdict": overall, "pairs": [
            {"a": a, "b": b, "gap": list(g), "verdict": v, "paper_gap": pg}
            for (a, b), g, v, pg in zip(pairs, gaps, verdicts, paper)]})

    P = {k: v[0] for k, v in PAPER_XSUM.items()}
    for tag, variant in (("", "paper"), ("released-", "released")):
        chain = [f"tbt-{tag}{b}" for b in ("2-2-8", "1-1-8", "2-2-2", "1-1-1")]
        check(f"TBT ({variant}): 2-2-8 >= 1-1-8 >= 2-2-2 >= 1-1-1",
              list(zip(chain, chain[1:])),
              [round(P[f"tbt-{a}"] - P[f"tbt-{b}"], 2) for a, b in
               (("2-2-8", "1-1-8"), ("1-1-8", "2-2-2"), ("2-2-2", "1-1-1"))])
    check("TBT far ahead of TWN at 2-2-2", [("tbt-2-2-2", "twn-2-2-2")],
          [round(P["tbt-2-2-2"] - P["twn-2-2-2"], 2)])
    check("TBT far ahead of BWN at 1-1-1", [("tbt-1-1-1", "bwn-1-1-1")],
          [round(P["tbt-1-1-1"] - P["bwn-1-1-1"], 2)])
    check("Table 3 (2-2-2): each TBT quantizer helps, both most",
          [("t3-learned-act", "t3-minmax"), ("t3-stats-weight", "t3-minmax"),
           ("t3-both", "t3-learned-act"), ("t3-both", "t3-stats-weight")],
          [round(P["t3-learned-act"] - P["twn-2-2-2"], 2),
           round(P["t3-stats-weight"] - P["twn-2-2-2"], 2),
           round(P["tbt-2-2-2"] - P["t3-learned-act"], 2),
           round(P["tbt-2-2-2"] - P["t3-stats-weight"], 2)])
    if any(k.startswith("t3b-") for k in per_row):
        check("Table 3 (1-1-1): each TBT quantizer helps, both most",
              [("t3b-learned-act", "t3b-minmax"), ("t3b-stats-weight", "t3b-minmax"),
               ("t3b-both", "t3b-learned-act"), ("t3b-both", "t3b-stats-weight")],
              [round(P["t3b-learned-act"] - P["bwn-1-1-1"], 2),
               round(P["t3b-stats-weight"] - P["bwn-1-1-1"], 2),
               round(P["tbt-1-1-1"] - P["t3b-learned-act"], 2),
               round(P["tbt-1-1-1"] - P["t3b-stats-weight"], 2)])
    return {"metric": METRIC, "n_test": int(n), "resamples": rc.bootstrap_resamples,
            "teacher": {"score": float(t_scores.mean()),
                        "ci": list(bootstrap_ci(t_scores, indices=idx)[1:]),
                        "steps": teacher.get("steps"),
                        "stopped_early": teacher.get("stopped_early"),
                        "dir": teacher.get("dir"),
                        "rouge2": float(np.mean(teacher["per_example"]["rouge2"])),
                        "rougeLsum": float(np.mean(teacher["per_example"]["rougeLsum"]))},
            "rows": rows, "orderings": orderings, "paper": {"citation": PAPER_CITATION,
                                                           "bart_base_xsum": PAPER_XSUM}}


def _pm(g: list[float] | None) -> str:
    if g is None:
        return "–"
    return f"{g[0]:+.2f} [{g[1]:+.2f}, {g[2]:+.2f}]"


def format_table(s: dict[str, Any]) -> str:
    """The Markdown table and the ordering lines of :func:`summarize`'s result."""
    t = s["teacher"]
    stop = ("" if t["steps"] is None else
            f", {t['steps']} steps, {'early-stopped' if t['stopped_early'] else 'step cap'}")
    lines = [f"Teacher (FP{stop}): R-1 {t['score']:.2f} [{t['ci'][0]:.2f}, {t['ci'][1]:.2f}], "
             f"R-2 {t['rouge2']:.2f}, R-Lsum {t['rougeLsum']:.2f}; {s['n_test']} test examples, "
             f"{s['resamples']} bootstrap resamples.", "",
             "| row | E-W-A | weights | acts | variant | seeds | R-1 [95% CI] | seed sd "
             "| Δ R-1 vs FP control [95% CI] | Δ R-1 vs teacher [95% CI] | paper R-1 "
             "| paper Δ vs FP | R-2 | R-Lsum | gen len |",
             "|" + "---|" * 15]
    for r in s["rows"]:
        sd = "–" if r["seed_sd"] is None else f"{r['seed_sd']:.2f}"
        paper = (f"{r['paper_r1']:.2f} | {r['paper_gap']:+.2f}" if "paper_r1" in r
                 else "– | –")
        lines.append(
            f"| {r['name']} | {r['bits']} | {r['method']} | {r['act_method']} | {r['variant']} "
            f"| {len(r['seeds'])} | {r['score']:.2f} [{r['ci'][0]:.2f}, {r['ci'][1]:.2f}] "
            f"| {sd} | {_pm(r['gap_control'])} | {_pm(r['gap_teacher'])} | {paper} "
            f"| {r['rouge2']:.2f} | {r['rougeLsum']:.2f} | {r['gen_len']:.1f} |")
    lines += ["", "Orderings of the paper (gap = first − second row, R-1, paired 95% CI; "
              "paper gap in brackets):", ""]
    for o in s["orderings"]:
        pairs = "; ".join(f"{p['a']} − {p['b']} {_pm(p['gap'])} (paper {p['paper_gap']:+.2f})"
                          for p in o["pairs"])
        lines.append(f"* **{o['claim']}**: {o['verdict']}." + (f" {pairs}." if pairs else ""))
    return "\n".join(lines)


def plot(s: dict[str, Any], path: str) -> str:
    """Left: each row's R-1 gap to the FP control with its 95% CI; right: the paper's gap to
    FP BART-base for the same rows."""
    from tbt.demo.plots import _pyplot

    plt = _pyplot()
    rows = [r for r in s["rows"] if r["key"] != "fp-control"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.42 * len(rows) + 1.8), sharey=True)
    ys = list(range(len(rows)))[::-1]
    gaps = [r["gap_control"] or r["gap_teacher"] for r in rows]
    axes[0].barh(ys, [g[0] for g in gaps],
                 xerr=[[g[0] - g[1] for g in gaps], [g[2] - g[0] for g in gaps]],
                 color=["C0" if r["method"] == "tbt" else "C3" for r in rows], capsize=3)
    axes[0].set_title("this run: Δ R-1 vs FP control (95% CI)")
    axes[1].barh(ys, [r.get("paper_gap", float("nan")) for r in rows],
                 color=["C0" if r["method"] == "tbt" else "C3" for r in rows])
    axes[1].set_title("paper (BART-base, XSUM): Δ R-1 vs FP")
    axes[0].set_yticks(ys, [r["name"].strip() for r in rows], fontsize=8)
    for ax in axes:
        ax.axvline(0, color="k", lw=0.8)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel("ROUGE-1 points")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_teacher(log_path: str, path: str) -> str | None:
    """The teacher's training CE (smoothed) and validation loss, the stopping step marked."""
    from tbt.demo.plots import _pyplot, _smooth, read_log

    if not os.path.isfile(log_path):
        return None
    log = read_log(log_path)
    if not log:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot([r["step"] for r in log], _smooth([r["loss"] for r in log], 20), label="train")
    val = [(r["step"], r["val_loss"]) for r in log if "val_loss" in r]
    if val:
        ax.plot(*zip(*val), "o--", label="validation")
        best = min(val, key=lambda t: t[1])
        ax.axvline(best[0], color="0.5", ls=":", label=f"best validation (step {best[0]})")
    ax.set_xlabel("optimizer step (after the copy warm-up)")
    ax.set_ylabel("label cross-entropy")
    ax.set_title("FP teacher: trained until the validation loss plateaus")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- the whole protocol ----------------------------------------------------------------------

def run_replicate(rc: ReplicateConfig) -> dict[str, Any]:
    """Run (or resume) every stage; returns :func:`summarize`'s result plus the files."""
    from transformers import AutoTokenizer

    log = _Log()
    os.makedirs(rc.output_dir, exist_ok=True)
    _check_protocol(rc)
    # data, tokenizer and teacher: one process at a time (others wait for them)
    stage_lock = RunLock(os.path.join(rc.output_dir, ".teacher.lock"))
    while not stage_lock.acquire():
        log(f"data and teacher are being prepared by {stage_lock.owner()}; waiting")
        time.sleep(15)
    try:
        data = prepare_data(rc, log)
        tok = AutoTokenizer.from_pretrained(data["tokenizer"])
        test = _test_rows(rc, data)
        teacher = train_teacher(rc, data, tok, test, log)
    finally:
        stage_lock.release()
    teacher_dir = teacher["dir"]
    # one run per distinct run id and seed, in table order
    todo: dict[str, Row] = {}
    for key in rc.students:
        todo.setdefault(_run_key(ROW_BY_KEY[key]), ROW_BY_KEY[key])
    results_by_run: dict[str, list[dict[str, Any]]] = {}
    total = len(todo) * len(rc.seeds)
    k = 0
    for seed in rc.seeds:  # seed-major: a stopped command leaves whole seeds of every row
        for run_key, row in todo.items():
            k += 1
            train_and_evaluate(rc, data, tok, test, teacher_dir, row, seed, log,
                               f"run {k}/{total}")
    for run_key in todo:  # every result on disk now, those of other workers included
        for seed in rc.seeds:
            path = os.path.join(rc.output_dir, "runs", run_key, f"seed-{seed}", "result.json")
            if os.path.isfile(path):
                results_by_run.setdefault(run_key, []).append(_read_json(path))
    pending = total - sum(len(v) for v in results_by_run.values())
    if pending:
        log(f"{pending} run(s) still running in other processes: this table leaves them out; "
            f"rerun the command when they are done")
    results = {key: results_by_run.get(_run_key(ROW_BY_KEY[key]), []) for key in rc.students}
    s = summarize(rc, teacher, results)
    s["settings"] = json.loads(json.dumps(asdict(rc)))
    s["wall_s"] = time.time() - log.t0
    table = format_table(s)
    md, js = (os.path.join(rc.output_dir, f"replicate.{e}") for e in ("md", "json"))
    plots = [plot(s, os.path.join(rc.output_dir, "replicate.png"))]
    tp = plot_teacher(os.path.join(rc.output_dir, "teacher", "log.jsonl"),
                      os.path.join(rc.output_dir, "teacher_curve.png"))
    if tp:
        plots.append(tp)
    with open(md, "w", encoding="utf-8") as f:
        f.write(f"# tbt replicate\n\n{table}\n\nPaper numbers: {PAPER_CITATION}. Scores are "
                f"mean per-example ROUGE F1 x 100 over {s['n_test']} test examples, averaged "
                f"over seeds {list(rc.seeds)}; intervals: paired percentile bootstrap over test "
                f"examples (each example averaged over seeds first). This command took "
                f"{s['wall_s']:.0f} s (runs already done were skipped). Settings: "
                f"`{json.dumps(s['settings'])}`\n")
    _atomic_json(js, s)
    print(f"\n{table}\n\nwritten: {md}, {js}, {', '.join(plots)}", flush=True)
    return {**s, "files": [md, js, *plots]}


__all__ = ["PAPER_CITATION", "PAPER_XSUM", "ROWS", "ReplicateConfig", "Row", "format_table",
           "parse_seeds", "parse_students", "recipe_defaults", "replicate_config",
           "run_replicate", "summarize"]
