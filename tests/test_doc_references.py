"""Every file and section the repository's text points at exists in the repository.

A reader of a clone must be able to follow each reference: paths under ``src/``, ``docs/``,
``tests/`` and ``benchmarks/`` (and ``tbt/...`` module paths, which live under ``src/``), bare
``NAME.md`` file names, and ``docs/NAME.md §N`` section references (the section must be a
heading ``## N.`` / ``### Na.`` of that file). Notes kept outside the repository must never be
cited. The checks run on the repository's own text, so they fail on the commit that breaks them.
"""

from __future__ import annotations

import glob
import os
import re

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCANNED = ("src", "docs", "tests", "benchmarks", "README.md")
SUFFIXES = (".py", ".md", ".c", ".h", ".toml", ".txt", ".sh")
TOP_DIRS = ("src", "docs", "tests", "benchmarks")

# Files that tbt *writes* (named in docstrings and help texts), not files of the repository.
OUTPUT_NAMES = {"results.md", "ablation.md", "replicate.md", "gguf_summary.md"}

# Built from pieces so that this file does not match itself.
_OUTSIDE = ["METHOD", "RELATED", "RELATED2", "STYLE", "tbt_reference"]
# the long form (the notes file name with ".md") and the short forms ("§" or "rule" after it)
FORBIDDEN = re.compile(r"\b(?:" + "|".join(_OUTSIDE) + r")(?:\.md\b|\s+(?:§|rule\b))|\.\./"
                       + "shared")

_EDGE = r"(?<![\w./{}<>$-])"
PATH_RE = re.compile(_EDGE + r"((?:" + "|".join(TOP_DIRS) + r")/[\w./*<>{},-]*[\w*/>}]"
                     r"|tbt/[\w/]+\.(?:py|c|h|md)\b)")
BARE_MD_RE = re.compile(_EDGE + r"([\w-]+\.md)\b")
SECTION_RE = re.compile(_EDGE + r"((?:docs/)?[\w-]+\.md)`*((?:(?:\s*[,/–-]\s*|\s+)§\d+[a-z]?)+)")


def _text_files() -> list[str]:
    out = []
    for top in SCANNED:
        path = os.path.join(ROOT, top)
        if os.path.isfile(path):
            out.append(path)
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"
                           and not d.endswith(".egg-info")]
            out += [os.path.join(dirpath, f) for f in filenames if f.endswith(SUFFIXES)]
    return sorted(out)


FILES = _text_files()
# This file plants broken references on purpose (the last test); the other checks skip it.
CHECKED = [p for p in FILES if os.path.abspath(p) != os.path.abspath(__file__)]
REPO_BASENAMES = {os.path.basename(p) for top in TOP_DIRS
                  for p in glob.glob(os.path.join(ROOT, top, "**", "*"), recursive=True)}
REPO_BASENAMES.add("README.md")


def _read(path: str) -> str:
    with open(path, encoding="utf-8") as f:
        return f.read()


def _rel(path: str) -> str:
    return os.path.relpath(path, ROOT)


def _exists(ref: str) -> bool:
    """``ref`` is a repository path; ``*``, ``<name>``, ``{md,json}`` and ``DATE`` are wildcards."""
    if ref.startswith("tbt/"):
        ref = "src/" + ref
    pattern = re.sub(r"<[^>]*>?|\{[^}]*\}?|DATE|\*+", "*", ref.rstrip("/."))
    if "*" in pattern:
        return bool(glob.glob(os.path.join(ROOT, pattern)))
    return os.path.exists(os.path.join(ROOT, pattern))


def _sections(doc: str) -> set[str]:
    heads = re.findall(r"^#{1,6}\s+§?(\d+[a-z]?)[.\s:]", _read(doc), flags=re.M)
    return set(heads)


def _line(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def test_files_are_scanned():
    names = {_rel(p) for p in FILES}
    assert "README.md" in names and "docs/numerics.md" in names
    assert any(n.startswith("src/tbt/") and n.endswith(".py") for n in names)
    assert any(n.startswith("tests/") for n in names) and any(n.startswith("benchmarks/") for n in names)


def test_no_reference_to_notes_outside_the_repository():
    bad = []
    for path in FILES:
        text = _read(path)
        for m in FORBIDDEN.finditer(text):
            bad.append(f"{_rel(path)}:{_line(text, m.start())}: {m.group(0)}")
    assert not bad, "references to files that are not in the repository:\n" + "\n".join(bad)


def test_repository_paths_exist():
    bad = []
    for path in CHECKED:
        text = _read(path)
        for m in PATH_RE.finditer(text):
            ref = m.group(1)
            if not _exists(ref):
                bad.append(f"{_rel(path)}:{_line(text, m.start())}: {ref}")
    assert not bad, "paths that do not exist in the repository:\n" + "\n".join(bad)


def test_markdown_file_names_exist():
    bad = []
    for path in CHECKED:
        text = _read(path)
        for m in BARE_MD_RE.finditer(text):
            name = m.group(1)
            if name not in REPO_BASENAMES and name not in OUTPUT_NAMES:
                bad.append(f"{_rel(path)}:{_line(text, m.start())}: {name}")
    assert not bad, "markdown files that are not in the repository:\n" + "\n".join(bad)


def test_section_references_exist():
    docs = os.path.join(ROOT, "docs")
    bad, checked = [], 0
    for path in CHECKED:
        text = _read(path)
        for m in SECTION_RE.finditer(text):
            name = os.path.basename(m.group(1))
            doc = os.path.join(docs, name)
            if not os.path.isfile(doc):
                continue  # a results file or another repository's file: no numbered sections
            have = _sections(doc)
            for sec in re.findall(r"§(\d+[a-z]?)", m.group(2)):
                checked += 1
                if sec not in have:
                    bad.append(f"{_rel(path)}:{_line(text, m.start())}: docs/{name} §{sec}")
    assert not bad, "section references without a matching heading:\n" + "\n".join(bad)
    assert checked > 50  # the pattern still finds the references


@pytest.mark.parametrize("text, ok", [
    ("see docs/numerics.md §1a", True),
    ("see docs/numerics.md §9z", False),
    ("see docs/no-such-page.md", False),
    ("src/tbt/quant/no_such_module.py", False),
])
def test_the_checks_catch_a_broken_reference(text, ok):
    """The scanners applied to a planted line: a wrong section, file or path is reported."""
    found_ok = True
    for m in PATH_RE.finditer(text):
        found_ok &= _exists(m.group(1))
    for m in SECTION_RE.finditer(text):
        doc = os.path.join(ROOT, "docs", os.path.basename(m.group(1)))
        if os.path.isfile(doc):
            found_ok &= all(s in _sections(doc) for s in re.findall(r"§(\d+[a-z]?)", m.group(2)))
    assert found_ok == ok
    assert FORBIDDEN.search("see " + "METHOD" + ".md §2") and FORBIDDEN.search("../" + "shared/x")
    assert FORBIDDEN.search("(" + "RELATED2" + " §5)") and FORBIDDEN.search("STYLE" + " rule 1")
    assert not FORBIDDEN.search("RELATED work") and not FORBIDDEN.search("the METHOD field")
