"""Text data for distillation and evaluation: load splits, tokenize, pad into batches.

The pipeline has four small steps, each a plain function over plain Python data so that it can
be tested (and replaced) on its own:

1. :func:`load_raw_splits` reads the splits from the hub (``datasets.load_dataset``) or from
   local ``.jsonl/.json/.csv/.parquet/.txt`` files and normalises every row to
   ``{"source": str, "target": str}`` (seq2seq) or ``{"text": str}`` (causal LM). Rows with an
   empty source or target are skipped and counted (logged), never passed on to crash later.
   The translation layout ``{"translation": {"en": ..., "ro": ...}}`` is read with
   ``source_lang``/``target_lang``. A ``source_prefix`` (T5 style ``"summarize: "``) is prepended
   here, so that training and ``evaluate`` feed the model the same input.
2. :func:`tokenize_rows` turns rows into ``input_ids``/``attention_mask``/``labels`` lists. It
   tokenizes without truncation, then cuts over-long sequences itself (keeping the closing
   special token, as the tokenizer's own truncation does) so that it can count them.
3. :func:`make_collator` pads a list of examples to the longest in the batch (dynamic padding,
   docs/recipe.md §3); labels are padded with ``-100`` so the loss ignores them.
4. :func:`build_dataloader` wraps it in a ``DataLoader`` whose shuffling is seeded.

``datasets`` and ``transformers`` are imported inside functions only.
"""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, replace
from typing import Any

logger = logging.getLogger(__name__)

TASKS = ("seq2seq", "causal-lm", "prompt-target")
SPLITS = ("train", "validation", "test")
FILE_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".txt")

# Decoder-only seq2seq (task "prompt-target", :func:`tokenize_prompt_target`): the text the model
# reads before it writes the target. ``{source}`` marks where the source goes; a template that
# starts with ``chat:`` is the user message of the tokenizer's chat template, followed by its
# assistant prompt (``add_generation_prompt``).
DEFAULT_PROMPT_TEMPLATE = "{source}\nSummary:"
CHAT_PREFIX = "chat:"

# Column layout of the paper's datasets on the hub (docs/recipe.md §6). Used when the configured
# columns are still the defaults and the dataset does not have them (e.g. cnn_dailymail).
DATASET_DEFAULTS: dict[str, dict[str, Any]] = {
    "xsum": {"source_column": "document", "target_column": "summary"},
    "cnn_dailymail": {"dataset_config": "3.0.0", "source_column": "article",
                      "target_column": "highlights"},
    "wmt16": {"dataset_config": "ro-en", "source_lang": "en", "target_lang": "ro"},
}


@dataclass(frozen=True)
class DataConfig:
    """Where the text comes from and how long the token sequences may be.

    Exactly one source of data: ``dataset`` (a hub name, loaded with ``datasets``) or local
    files (``train_file``/``validation_file``/``test_file``). Seq2seq rows take their input from
    ``source_column`` and their reference from ``target_column``, or from
    ``translation[source_lang]``/``translation[target_lang]`` when both languages are set.
    Causal-LM rows take ``text_column``. Lengths are in tokens, special tokens included;
    ``max_length`` caps each causal-LM example.

    ``prompt-target`` is seq2seq data for a decoder-only model: each example is
    ``prompt_template`` with the source put in, then the target and eos, and the loss counts
    the target only (:func:`tokenize_prompt_target`). The prompt (template included) is at most
    ``max_source_length`` tokens, the target with its eos at most ``max_target_length``.
    """

    task: str = "seq2seq"
    dataset: str | None = None
    dataset_config: str | None = None
    train_file: str | None = None
    validation_file: str | None = None
    test_file: str | None = None
    source_column: str = "document"
    target_column: str = "summary"
    text_column: str = "text"
    source_lang: str | None = None
    target_lang: str | None = None
    source_prefix: str = ""
    prompt_template: str = DEFAULT_PROMPT_TEMPLATE
    max_source_length: int = 512
    max_target_length: int = 128
    max_length: int = 512
    max_train_samples: int | None = None
    max_eval_samples: int | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        if self.dataset and any(self._files().values()):
            raise ValueError("pass either a hub dataset (--dataset) or local files "
                             "(--train-file/--validation-file/--test-file), not both")
        if (self.source_lang is None) != (self.target_lang is None):
            raise ValueError("translation data needs both --source-lang and --target-lang")
        if "{source}" not in self.prompt_template:
            raise ValueError(f"prompt_template {self.prompt_template!r} has no {{source}}: "
                             "write where the source goes, e.g. '{source}\\nSummary:'")
        for name in ("max_source_length", "max_target_length", "max_length"):
            if getattr(self, name) < 2:
                raise ValueError(f"{name} must be >= 2 tokens, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ValueError(f"{name} must be a positive number of rows, got {v}")

    def _files(self) -> dict[str, str | None]:
        return {"train": self.train_file, "validation": self.validation_file,
                "test": self.test_file}

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DataConfig:
        """Inverse of :meth:`to_dict`; unknown keys raise ``ValueError`` naming them."""
        from dataclasses import fields

        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown DataConfig field(s) {unknown}; known: {sorted(known)}")
        return cls(**d)


# ---------------------------------------------------------------------------------------------
# 1. raw rows
# ---------------------------------------------------------------------------------------------

def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a local file into a list of dict rows (``.txt``: one ``{"text": line}`` per line).

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` for an unsupported
    extension, an unparsable line or an empty file, each naming the file.
    """
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ValueError(f"data file {path!r} is a folder: pass a file in it "
                         f"({', '.join(FILE_EXTENSIONS)})")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"data file {path!r} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_EXTENSIONS:
        raise ValueError(f"{path!r}: unsupported extension {ext or '(none)'!r}; "
                         f"use one of {', '.join(FILE_EXTENSIONS)}")
    records = _READERS[ext](path)
    if not records:
        raise ValueError(f"data file {path!r} is empty (no rows)")
    return records


def _read_jsonl(path: str) -> list[dict[str, Any]]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg}); a .jsonl file "
                                 "holds one JSON object per line") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object, got "
                                 f"{type(row).__name__}")
            rows.append(row)
    return rows


def _read_json(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if not text.strip():
        return []
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return _read_jsonl(path)  # JSON lines saved with a .json name (as `datasets` does)
    if isinstance(data, dict):
        lists = [v for v in data.values() if isinstance(v, list)]
        if "data" in data and isinstance(data["data"], list):
            data = data["data"]
        elif lists and all(len(v) == len(lists[0]) for v in lists) and len(lists) == len(data):
            data = [dict(zip(data, vals, strict=True)) for vals in zip(*data.values(), strict=True)]
        else:
            raise ValueError(f"{path}: expected a list of objects, {{'data': [...]}} or a dict of "
                             "equal-length columns")
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise ValueError(f"{path}: expected a list of JSON objects")
    return data


def _read_csv(path: str) -> list[dict[str, Any]]:
    """Rows of a CSV file with a header line; a malformed file is an error naming the line
    (strict quoting: an unterminated quote would otherwise swallow the rest of the file into
    one field; every row must have as many fields as the header)."""
    rows: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f, strict=True)
        header: list[str] | None = None
        start = 1
        while True:
            try:
                fields = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                what = ("a quoted field opened here is never closed (unterminated quote)"
                        if "unexpected end of data" in str(e) else f"malformed CSV ({e})")
                raise ValueError(f"{path}:{start}: {what}") from None
            line, start = start, reader.line_num + 1
            if not fields or fields == [""]:
                continue  # blank line
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path}:{line}: this row has {len(fields)} fields, the header "
                                 f"has {len(header)} ({', '.join(header)}); quote fields that "
                                 f"contain commas")
            rows.append(dict(zip(header, fields, strict=True)))
    return rows


def _read_parquet(path: str) -> list[dict[str, Any]]:
    import pyarrow.parquet as pq  # a dependency of `datasets`

    return pq.read_table(path).to_pylist()


def _read_txt(path: str) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8") as f:
        return [{"text": line.rstrip("\n")} for line in f if line.strip()]


_READERS: dict[str, Callable[[str], list[dict[str, Any]]]] = {
    ".jsonl": _read_jsonl, ".json": _read_json, ".csv": _read_csv,
    ".parquet": _read_parquet, ".txt": _read_txt,
}


def _resolve_for_dataset(cfg: DataConfig, columns: Sequence[str]) -> DataConfig:
    """Fill in the paper datasets' own columns/languages when cfg still has the defaults."""
    known = DATASET_DEFAULTS.get((cfg.dataset or "").split("/")[-1])
    if not known or cfg.task == "causal-lm":
        return cfg
    defaults = DataConfig()
    if "translation" in columns and cfg.source_lang is None and "source_lang" in known:
        logger.info("%s: using translation %s -> %s", cfg.dataset, known["source_lang"],
                    known["target_lang"])
        return replace(cfg, source_lang=known["source_lang"], target_lang=known["target_lang"])
    if ("source_column" in known and cfg.source_column == defaults.source_column
            and cfg.target_column == defaults.target_column
            and cfg.source_column not in columns):
        logger.info("%s: using columns %s -> %s", cfg.dataset, known["source_column"],
                    known["target_column"])
        return replace(cfg, source_column=known["source_column"],
                       target_column=known["target_column"])
    return cfg


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, list):  # e.g. a list of highlight sentences
        return "\n".join(_as_text(v) for v in value)
    return str(value).strip()


def normalize_rows(records: Iterable[dict[str, Any]], cfg: DataConfig,
                   where: str = "data") -> list[dict[str, str]]:
    """Map raw records to ``{"source", "target"}`` or ``{"text"}`` rows; skip and count empties.

    ``where`` names the file or split in messages. Missing columns raise ``ValueError`` listing
    the columns present.
    """
    records = list(records)
    if not records:
        raise ValueError(f"{where}: no rows")
    present = list(records[0].keys())
    if cfg.task == "causal-lm":
        _require(present, [cfg.text_column], where, "--text-column")
        getters = {"text": lambda r: _as_text(r.get(cfg.text_column))}
    elif cfg.source_lang is not None:
        getters = _translation_getters(records[0], cfg, where)
    else:
        _require(present, [cfg.source_column, cfg.target_column], where,
                 "--source-column/--target-column")
        getters = {"source": lambda r: _as_text(r.get(cfg.source_column)),
                   "target": lambda r: _as_text(r.get(cfg.target_column))}
    rows, skipped = [], 0
    for rec in records:
        row = {k: get(rec) for k, get in getters.items()}
        if not all(row.values()):
            skipped += 1
            continue
        if "source" in row and cfg.source_prefix:
            row["source"] = cfg.source_prefix + row["source"]
        rows.append(row)
    if skipped:
        logger.warning("%s: skipped %d of %d rows with empty text", where, skipped, len(records))
    if not rows:
        raise ValueError(f"{where}: all {len(records)} rows have empty text in the chosen "
                         f"columns ({', '.join(getters)})")
    return rows


def _require(present: Sequence[str], wanted: Sequence[str], where: str, flag: str) -> None:
    missing = [c for c in wanted if c not in present]
    if missing:
        hint = ""
        if "translation" in present:
            hint = "; this looks like translation data: pass --source-lang and --target-lang"
        raise ValueError(f"{where}: column(s) {', '.join(map(repr, missing))} not found; columns "
                         f"present: {', '.join(map(repr, present))}. Choose them with {flag}{hint}")


def _translation_getters(first: dict[str, Any], cfg: DataConfig, where: str) -> dict:
    tr = first.get("translation")
    if not isinstance(tr, dict):
        raise ValueError(f"{where}: --source-lang/--target-lang need rows of the form "
                         '{"translation": {"en": ..., "ro": ...}}; columns present: '
                         f"{', '.join(map(repr, first))}")
    for lang in (cfg.source_lang, cfg.target_lang):
        if lang not in tr:
            raise ValueError(f"{where}: language {lang!r} not in the translation column; "
                             f"languages present: {', '.join(map(repr, tr))}")

    def get(lang: str) -> Callable[[dict[str, Any]], str]:
        return lambda r: _as_text((r.get("translation") or {}).get(lang))

    return {"source": get(cfg.source_lang), "target": get(cfg.target_lang)}


def _cap(rows: list[dict[str, str]], n: int | None) -> list[dict[str, str]]:
    return rows if n is None else rows[:n]


def load_raw_splits(cfg: DataConfig, splits: Sequence[str] = SPLITS) -> dict[str, list[dict]]:
    """Load the requested splits as lists of normalised rows.

    Returns only the splits that have data (a split without a file is left out; a hub dataset
    without that split likewise). ``max_train_samples`` caps ``train``, ``max_eval_samples`` the
    others (the first N rows after skipping empties, so the cap is deterministic).

    Raises:
        ValueError: no data source for any requested split, or a bad file (see
            :func:`read_records`, :func:`normalize_rows`).
        FileNotFoundError: a configured file does not exist.
    """
    for s in splits:
        if s not in SPLITS:
            raise ValueError(f"unknown split {s!r}; use {SPLITS}")
    if cfg.dataset:
        raw = _load_hub(cfg, splits)
    else:
        files = {s: f for s, f in cfg._files().items() if s in splits and f}
        if not files:
            flags = ", ".join(f"--{s}-file" for s in splits)
            raise ValueError(f"no data given for split(s) {', '.join(splits)}: pass {flags} "
                             "or --dataset NAME")
        raw = {s: (read_records(f), f) for s, f in files.items()}
    out = {}
    for split, (records, where) in raw.items():
        rcfg = _resolve_for_dataset(cfg, list(records[0].keys())) if records else cfg
        rows = normalize_rows(records, rcfg, where=where)
        out[split] = _cap(rows, cfg.max_train_samples if split == "train" else cfg.max_eval_samples)
        logger.info("%s: %d rows (%s)", split, len(out[split]), where)
    return out


def _needed_columns(cfg: DataConfig) -> list[str]:
    if cfg.task == "causal-lm":
        return [cfg.text_column]
    if cfg.source_lang is not None:
        return ["translation"]
    return [cfg.source_column, cfg.target_column]


def _load_hub(cfg: DataConfig, splits: Sequence[str]) -> dict[str, tuple[list[dict], str]]:
    import datasets

    name = cfg.dataset
    config = cfg.dataset_config or DATASET_DEFAULTS.get(name.split("/")[-1], {}).get(
        "dataset_config")
    try:
        ds = datasets.load_dataset(name, config)
    except Exception as e:  # network, unknown name, missing config: all surface the same way
        raise ValueError(f"could not load dataset {name!r} (config {config!r}) from the hub: "
                         f"{e}. Offline? Use --train-file/--validation-file/--test-file") from e
    out = {}
    for s in splits:
        if s in ds:
            cols = ds[s].column_names
            needed = _needed_columns(_resolve_for_dataset(cfg, cols))
            part = ds[s].select_columns(needed) if set(needed) <= set(cols) else ds[s]
            out[s] = (part.to_list(), f"{name}[{s}]")
        else:
            logger.warning("dataset %s has no %r split (has: %s)", name, s, ", ".join(ds))
    if not out:
        raise ValueError(f"dataset {name!r} has none of the splits {list(splits)}; "
                         f"it has {list(ds)}")
    return out


# ---------------------------------------------------------------------------------------------
# 2. tokens
# ---------------------------------------------------------------------------------------------

def _truncate(ids: list[int], limit: int, special: set[int]) -> list[int]:
    """Cut ``ids`` to ``limit`` tokens, keeping a closing special token (``</s>``) if present."""
    if len(ids) <= limit:
        return ids
    if ids[-1] in special:
        return ids[: limit - 1] + ids[-1:]
    return ids[:limit]


def _encode(tokenizer: Any, texts: list[str], chunk: int = 1000, target: bool = False
            ) -> list[list[int]]:
    out: list[list[int]] = []
    for i in range(0, len(texts), chunk):
        batch = texts[i:i + chunk]
        # verbose=False: we truncate ourselves below, the "longer than the maximum" warning is noise
        enc = tokenizer(text_target=batch, verbose=False) if target else tokenizer(batch,
                                                                                    verbose=False)
        out.extend(enc["input_ids"])
    return out


def tokenize_rows(rows: Sequence[dict], tokenizer: Any, cfg: DataConfig) -> list[dict]:
    """Tokenize rows into ``input_ids``/``attention_mask``/``labels`` lists (unpadded).

    Seq2seq: ``input_ids`` from ``source`` (≤ ``max_source_length``), ``labels`` from
    ``target`` (≤ ``max_target_length``, tokenized as a target). Causal LM: ``input_ids`` from
    ``text`` (≤ ``max_length``) and ``labels`` a copy of them (the model shifts). Over-long
    sequences are cut (the closing ``</s>`` is kept) and the number cut is logged.
    """
    if cfg.task == "prompt-target":
        return tokenize_prompt_target(rows, tokenizer, cfg)
    special = set(tokenizer.all_special_ids)
    if cfg.task == "causal-lm":
        fields = [("input_ids", "text", cfg.max_length, False)]
    else:
        fields = [("input_ids", "source", cfg.max_source_length, False),
                  ("labels", "target", cfg.max_target_length, True)]
    out: list[dict] = [{} for _ in rows]
    for key, col, limit, target in fields:
        ids = _encode(tokenizer, [r[col] for r in rows], target=target)
        n_cut = sum(len(x) > limit for x in ids)
        if n_cut:
            logger.info("truncated %d of %d %s sequences to %d tokens", n_cut, len(ids), col, limit)
        for ex, x in zip(out, ids, strict=True):
            ex[key] = _truncate(list(x), limit, special)
    for ex in out:
        ex["attention_mask"] = [1] * len(ex["input_ids"])
        if cfg.task == "causal-lm":
            ex["labels"] = list(ex["input_ids"])
    return out


class PromptEncoder:
    """Token ids of ``prompt_template`` with a source put in, for a decoder-only model.

    The template is rendered once with a placeholder and split around it into the text before
    and after the source (for a ``chat:`` template, after the tokenizer's chat template has
    wrapped it with the assistant prompt). A prompt is ``specials + ids(before + source +
    after)``, tokenized as one text; ``specials`` are the tokens the tokenizer itself puts
    before a text (a BOS), none for a chat template (it writes its own), and none after (no
    eos: the model continues). A prompt over the budget has its *source* cut from the end (to
    the tokens that fit, decoded and tokenized again with the template), so the template's
    closing words (``"Summary:"``, the assistant header) always reach the model. Training
    (:func:`tokenize_prompt_target`) and ``tbt evaluate`` both build prompts here, so a model
    is scored on exactly the kind of prompt it was trained on.
    """

    _SLOT = "\x00SOURCE\x00"

    def __init__(self, tokenizer: Any, template: str = DEFAULT_PROMPT_TEMPLATE) -> None:
        if "{source}" not in template:
            raise ValueError(f"prompt template {template!r} has no {{source}}")
        self.tokenizer, self.template = tokenizer, template
        body = template.replace("{source}", self._SLOT)
        if template.startswith(CHAT_PREFIX):
            if not getattr(tokenizer, "chat_template", None):
                raise ValueError(f"prompt template {template!r} asks for the chat template, "
                                 "but the tokenizer has none: give a plain template")
            body = tokenizer.apply_chat_template(
                [{"role": "user", "content": body[len(CHAT_PREFIX):]}],
                add_generation_prompt=True, tokenize=False)
            self.specials: list[int] = []
        else:
            self.specials = _leading_specials(tokenizer)
        before, _, after = body.partition(self._SLOT)
        if self._SLOT in after:
            raise ValueError(f"prompt template {template!r} has {{source}} more than once")
        self.before_text, self.after_text = before, after
        self.before, self.after = self._ids(before), self._ids(after)
        # a target that follows "...Summary:" starts with a space, as it would in running text
        self.target_space = bool(after) and not after[-1].isspace()

    def _ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []

    def _many(self, texts: list[str]) -> list[list[int]]:
        out: list[list[int]] = []
        for i in range(0, len(texts), 1000):
            out.extend(self.tokenizer(texts[i:i + 1000], add_special_tokens=False)["input_ids"])
        return [list(x) for x in out]

    @property
    def overhead(self) -> int:
        """Tokens of the prompt that are not the source (tokenized apart)."""
        return len(self.specials) + len(self.before) + len(self.after)

    def encode(self, sources: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
        """(prompt ids of every source, at most ``max_length`` each; how many sources were cut).

        Raises ``ValueError`` when the template alone does not leave room for one source token.
        """
        room = max_length - self.overhead
        if room < 1:
            raise ValueError(f"the prompt template {self.template!r} takes {self.overhead} "
                             f"tokens, which leaves no room for the source within "
                             f"{max_length} (raise --max-source-length)")
        ids = [self.specials + x for x in self._many([self.before_text + s + self.after_text
                                                     for s in sources])]
        cut = 0
        for i, x in enumerate(ids):
            if len(x) <= max_length:
                continue
            cut += 1
            src = self._ids(sources[i])
            for k in range(min(room, len(src)), 0, -1):
                text = self.tokenizer.decode(src[:k])
                x = self.specials + self._ids(self.before_text + text + self.after_text)
                if len(x) <= max_length:
                    break
            else:  # never reached in practice: the pieces tokenized apart always fit
                x = self.specials + self.before + src[:room] + self.after
            ids[i] = x
        return ids, cut

    def target_ids(self, targets: Sequence[str], max_length: int) -> tuple[list[list[int]], int]:
        """(target ids + eos, at most ``max_length`` each; how many targets were cut)."""
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ValueError("the tokenizer has no eos token to end the targets with")
        pre = " " if self.target_space else ""
        ids = [self._ids(pre + t) for t in targets]
        cut = sum(len(x) > max_length - 1 for x in ids)
        return [x[:max_length - 1] + [eos] for x in ids], cut


def _leading_specials(tokenizer: Any) -> list[int]:
    """The special tokens the tokenizer puts before a text by itself (e.g. ``[bos]``)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return list(full[:i])
    return []


def tokenize_prompt_target(rows: Sequence[dict], tokenizer: Any, cfg: DataConfig
                           ) -> list[dict]:
    """Decoder-only seq2seq examples: ``input_ids = prompt + target + [eos]`` and ``labels``
    ``-100`` on the prompt, the target ids (and eos) after it.

    The prompt is :class:`PromptEncoder` (``cfg.prompt_template``, source cut to fit
    ``max_source_length``); the target is cut to ``max_target_length - 1`` tokens before its eos.
    The model shifts labels itself, so the last prompt position predicts the first target
    token. Truncations are logged.
    """
    enc = PromptEncoder(tokenizer, cfg.prompt_template)
    prompts, n_src = enc.encode([r["source"] for r in rows], cfg.max_source_length)
    targets, n_tgt = enc.target_ids([r["target"] for r in rows], cfg.max_target_length)
    for n, what, limit in ((n_src, "sources", cfg.max_source_length - enc.overhead),
                           (n_tgt, "targets", cfg.max_target_length - 1)):
        if n:
            logger.info("truncated %d of %d %s to %d tokens", n, len(rows), what, limit)
    return [{"input_ids": p + t, "attention_mask": [1] * (len(p) + len(t)),
             "labels": [-100] * len(p) + t} for p, t in zip(prompts, targets, strict=True)]


# ---------------------------------------------------------------------------------------------
# 3./4. batches
# ---------------------------------------------------------------------------------------------

def make_collator(tokenizer: Any, cfg: DataConfig, label_pad_id: int = -100) -> Callable:
    """A collate function: right-pad a list of examples to the longest one in the batch.

    ``input_ids`` are padded with the tokenizer's pad id, ``attention_mask`` with 0, ``labels``
    with ``label_pad_id``. Causal-LM examples without ``labels`` get ``labels = input_ids``
    with the padding set to ``label_pad_id`` (by position, so a pad id equal to eos is safe).
    Returns ``dict[str, LongTensor (B, T)]``.
    """
    import torch

    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        raise ValueError("the tokenizer has no pad token; set one, e.g. "
                         "tokenizer.pad_token = tokenizer.eos_token")
    causal = cfg.task in ("causal-lm", "prompt-target")

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        width = max(len(s) for s in seqs)
        return torch.tensor([list(s) + [value] * (width - len(s)) for s in seqs], dtype=torch.long)

    def collate(examples: Sequence[dict]) -> dict[str, torch.Tensor]:
        ids = [ex["input_ids"] for ex in examples]
        mask = [ex.get("attention_mask") or [1] * len(ex["input_ids"]) for ex in examples]
        if causal:
            labels = [ex.get("labels", ex["input_ids"]) for ex in examples]
        else:
            labels = [ex["labels"] for ex in examples] if "labels" in examples[0] else None
        batch = {"input_ids": pad(ids, pad_id), "attention_mask": pad(mask, 0)}
        if labels is not None:
            batch["labels"] = pad(labels, label_pad_id)
        return batch

    return collate


def build_dataloader(rows_tokenized: Sequence[dict], tokenizer: Any, cfg: DataConfig,
                     batch_size: int, shuffle: bool, seed: int, drop_last: bool = False):
    """A ``DataLoader`` over tokenized rows with dynamic padding; the order depends only on seed."""
    import torch
    from torch.utils.data import DataLoader

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    gen = torch.Generator()
    gen.manual_seed(seed)
    return DataLoader(list(rows_tokenized), batch_size=batch_size, shuffle=shuffle,
                      drop_last=drop_last, collate_fn=make_collator(tokenizer, cfg),
                      generator=gen, num_workers=0)
