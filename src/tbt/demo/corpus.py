"""A real, offline summarisation corpus: Python docstrings and their first sentence.

Every machine that runs tbt has the Python standard library as source code, so the demo can
build a text-summarisation corpus without a network. Each example is one docstring (of a
module, class or function) that has more than one sentence. Three styles:

* ``"lead"`` (default). summary: the docstring's first sentence (its PEP 257 one-line
  summary). document: the whole docstring, whitespace collapsed, then the signature on a last
  line (``def json.decoder.JSONDecoder.raw_decode(self, s, idx=0)``). The summary is the lead
  of the document, as in news summarisation (CNN/DM's lead bias) taken to its limit: the model
  must copy the document until the first sentence ends.
* ``"api"``. summary: ``"<qualified name>: <first sentence>"``, the line an API index shows.
  document: ``name(args)`` then the docstring *without* its first sentence. The name is
  copied, the sentence must be written (abstractive), so the task sits between the other two.
* ``"xsum"``. summary: the first sentence. document: the signature, then the docstring
  without its first sentence, the way XSum was built from BBC articles. About half of the
  summary words occur in the document; the rest must be inferred.

A tiny model trained from random weights learns the summaries' language model first and
ignores its encoder for a long and unpredictable time; the demo's teacher therefore starts with
a short synthetic copy task (:mod:`tbt.train.warmup`). docs/training.md, "Notes: the demo
corpus and the copy warm-up", has the measurements behind this and the ROUGE each style
reaches.

Files are parsed with :mod:`ast` (never imported), walked in sorted order, so the corpus depends
only on the Python version (``source="stdlib"``: 3500 examples on CPython 3.11) or on the
installed packages (``"site-packages"``, ``"all"``, or a directory such as torch's, which tbt
pins: +7.4k examples). Examples are de-duplicated and split into train/validation/test
(85/5/10) by a hash of the lower-cased summary (salted by ``seed``), so equal summaries never
straddle two splits.
"""

from __future__ import annotations

import ast
import hashlib
import json
import logging
import os
import re
import sysconfig
from collections.abc import Iterator

from tbt.eval.metrics import split_sentences

logger = logging.getLogger(__name__)

SOURCES = ("stdlib", "site-packages", "all")
STYLES = ("lead", "api", "xsum")
_SKIP_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idle_test",
                        "__pycache__", "_vendor", "vendored"})
SUMMARY_WORDS = (4, 40)      # inclusive range for the first sentence
DOCUMENT_WORDS = (6, 200)    # body words (beyond the signature); longer bodies are cut to 200
SIGNATURE_CHARS = 160        # a signature longer than this is cut with "..."
VALIDATION_PCT, TEST_PCT = 5, 10  # of the hash buckets 0..99
_SIGNATURE_LINE = re.compile(r"^[\w.]+\(.*\)\s*(->.*)?$")  # "execlpe(file, *args, env)"
_ALPHA_WORD = re.compile(r"[A-Za-z]{2,}")


def _roots(source: str) -> list[str]:
    if source not in SOURCES:
        if os.path.isdir(source):  # any source tree, e.g. one package (tests use this)
            return [source]
        raise ValueError(f"source must be one of {SOURCES} or a directory, got {source!r}")
    paths = sysconfig.get_paths()
    stdlib, site = paths["stdlib"], paths["purelib"]
    return {"stdlib": [stdlib], "site-packages": [site], "all": [stdlib, site]}[source]


def iter_python_files(root: str) -> Iterator[tuple[str, str]]:
    """Yield ``(path, module name)`` of the ``.py`` files under ``root`` in sorted order.

    Test directories and ``test_*.py`` files are skipped (their docstrings describe tests).
    """
    for d, dirs, files in os.walk(root):
        dirs[:] = sorted(x for x in dirs if x not in _SKIP_DIRS and not x.endswith(".dist-info"))
        for f in sorted(files):
            if f.endswith(".py") and not f.startswith("test_"):
                path = os.path.join(d, f)
                rel = os.path.relpath(path, root)[:-3].replace(os.sep, ".")
                yield path, rel.removesuffix(".__init__")


def _signature(node: ast.AST, qualname: str) -> str:
    if isinstance(node, ast.Module):
        return f"module {qualname}"
    if isinstance(node, ast.ClassDef):
        bases = ", ".join(ast.unparse(b) for b in node.bases)
        sig = f"class {qualname}({bases})" if bases else f"class {qualname}"
    else:
        sig = f"def {qualname}({ast.unparse(node.args)})"
    return sig if len(sig) <= SIGNATURE_CHARS else sig[: SIGNATURE_CHARS - 3] + "..."


def iter_docstrings(path: str, module: str) -> Iterator[tuple[str, str]]:
    """Yield ``(signature, docstring)`` for the module, classes and functions of one file."""
    try:
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read(), filename=path)
    except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
        return  # py2 fixtures, odd encodings: not our corpus

    def visit(node: ast.AST, qualname: str) -> Iterator[tuple[str, str]]:
        doc = ast.get_docstring(node, clean=True)
        if doc:
            yield _signature(node, qualname), doc
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield from visit(child, f"{qualname}.{child.name}")

    yield from visit(tree, module)


def _words(text: str) -> int:
    return len(text.split())


def make_example(signature: str, docstring: str, style: str = "lead") -> dict[str, str] | None:
    """Turn one docstring into ``{"document", "summary"}``, or ``None`` if it does not qualify.

    The first paragraph's first sentence is the summary (a leading ``name(args)`` line, as in
    C-style docstrings, is skipped). It must have ``SUMMARY_WORDS`` words and read as prose; the
    remaining text must have at least ``DOCUMENT_WORDS[0]`` words and is cut at
    ``DOCUMENT_WORDS[1]``. Whitespace is collapsed to single spaces.
    """
    paras = [" ".join(p.split()) for p in re.split(r"\n\s*\n", docstring.strip())]
    paras = [p for p in paras if p]
    if paras and _SIGNATURE_LINE.match(paras[0]):
        paras = paras[1:]
    if not paras:
        return None
    first = split_sentences(paras[0])
    if not first:
        return None
    summary = first[0]
    rest = " ".join(first[1:] + paras[1:])
    if not (SUMMARY_WORDS[0] <= _words(summary) <= SUMMARY_WORDS[1]):
        return None
    if len(_ALPHA_WORD.findall(summary)) < 3 or summary.startswith((">>>", "..", ":")):
        return None
    if _words(rest) < DOCUMENT_WORDS[0]:
        return None
    if style == "xsum":
        body = " ".join(rest.split()[: DOCUMENT_WORDS[1]])
        return {"document": f"{signature}\n{body}", "summary": summary}
    if style == "api":
        body = " ".join(rest.split()[: DOCUMENT_WORDS[1]])
        name_args = signature.split(" ", 1)[1]  # drop "def "/"class "/"module "
        name = name_args.split("(", 1)[0]
        return {"document": f"{name_args}\n{body}", "summary": f"{name}: {summary}"}
    body = " ".join(f"{summary} {rest}".split()[: DOCUMENT_WORDS[1]])
    return {"document": f"{body}\n{signature}", "summary": summary}


def _sentence(ex: dict[str, str], style: str) -> str:
    """The bare first sentence (``api`` summaries carry a ``name: `` prefix)."""
    return ex["summary"].split(": ", 1)[1] if style == "api" else ex["summary"]


def _bucket(sentence: str, seed: int) -> tuple[int, str]:
    h = hashlib.sha1(f"{seed}:{sentence.lower()}".encode()).hexdigest()
    return int(h[:8], 16) % 100, h


def collect_examples(source: str = "stdlib", style: str = "lead") -> list[dict[str, str]]:
    """All qualifying, de-duplicated examples in file/traversal order."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    seen: set[tuple[str, str]] = set()
    out = []
    for root in _roots(source):
        for path, module in iter_python_files(root):
            for sig, doc in iter_docstrings(path, module):
                ex = make_example(sig, doc, style)
                if ex is None:
                    continue
                text = ex["document"].rsplit("\n", 1)[0] if style == "lead" else \
                    ex["document"].split("\n", 1)[1]
                key = (_sentence(ex, style).lower(), text.lower())  # without any name:
                if key not in seen:  # same text under two names (aliases, copies): keep one
                    seen.add(key)
                    out.append(ex)
    return out


def build_docstring_corpus(output_dir: str, max_examples: int | None = None, seed: int = 0,
                           source: str = "stdlib", style: str = "lead") -> dict[str, str]:
    """Write ``train/validation/test.jsonl`` (``{"document", "summary"}`` rows) to ``output_dir``.

    Args:
        output_dir: created if needed.
        max_examples: keep at most this many examples in total (the first in hash order, so
            a smaller corpus is a deterministic subset of the split proportions).
        seed: salts the split hash; the same seed gives byte-identical files.
        source: ``"stdlib"`` (default; depends only on the Python version), ``"site-packages"``,
            ``"all"``, or the path of a directory of Python sources.
        style: ``"lead"`` (default: the document starts with the summary), ``"api"`` (summary =
            name + first sentence, the sentence removed from the document) or ``"xsum"`` (the
            first sentence removed; much harder). Measurements: docs/training.md.

    Returns:
        ``{"train": path, "validation": path, "test": path}``.
    """
    examples = collect_examples(source, style)
    keyed = sorted(((_bucket(_sentence(ex, style), seed), i) for i, ex in enumerate(examples)),
                   key=lambda t: t[0][1])
    if max_examples is not None:
        keyed = keyed[:max_examples]
    splits: dict[str, list[dict[str, str]]] = {"train": [], "validation": [], "test": []}
    for (bucket, _), i in sorted(keyed, key=lambda t: t[1]):  # back to traversal order
        split = ("validation" if bucket < VALIDATION_PCT else
                 "test" if bucket < VALIDATION_PCT + TEST_PCT else "train")
        splits[split].append(examples[i])
    os.makedirs(output_dir, exist_ok=True)
    paths = {}
    for split, rows in splits.items():
        paths[split] = os.path.join(output_dir, f"{split}.jsonl")
        with open(paths[split], "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
    sizes = ", ".join(f"{s} {len(r)}" for s, r in splits.items())
    print(f"docstring corpus ({source}, {style}): {sum(map(len, splits.values()))} examples "
          f"({sizes}) -> {output_dir}")
    return paths
