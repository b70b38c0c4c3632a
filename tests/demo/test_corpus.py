"""The offline docstring corpus: schema, determinism, split hygiene, example extraction."""

from __future__ import annotations

import json
import os
import sysconfig

import pytest

from tbt.demo.corpus import build_docstring_corpus, make_example

# One stdlib package: enough docstrings for a split, and seconds faster than the whole stdlib.
SMALL = os.path.join(sysconfig.get_paths()["stdlib"], "email")


def read(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def test_make_example_lead_and_xsum():
    doc = """Return the checksum of a file.

    The file is read in blocks of ``size`` bytes, so large files do not fill memory.
    """
    sig = "def pkg.checksum(path, size=4096)"
    body = "The file is read in blocks of ``size`` bytes, so large files do not fill memory."
    assert make_example(sig, doc) == {  # lead (default): docstring first, signature last
        "summary": "Return the checksum of a file.",
        "document": f"Return the checksum of a file. {body}\n{sig}"}
    assert make_example(sig, doc, style="xsum") == {  # xsum: the first sentence is removed
        "summary": "Return the checksum of a file.", "document": f"{sig}\n{body}"}


def test_make_example_filters():
    assert make_example("def f()", "Return x.") is None  # no body, summary too short
    assert make_example("def f()", "Return the value of x.\n\nShort body.") is None  # body < 6
    doctest = ">>> f(1, 2, 3, 4)\n\nA doctest is not a summary at all."
    assert make_example("def f()", doctest) is None
    sig_first = "execl(file, *args)\n\nExecute the executable file with argument list args.\n\n" \
                "It replaces the current process and never returns to the caller."
    ex = make_example("def os.execl(file, *args)", sig_first)
    assert ex["summary"] == "Execute the executable file with argument list args."


def test_corpus_schema_sizes_and_split_hygiene(tmp_path, capsys):
    paths = build_docstring_corpus(str(tmp_path), source=SMALL)
    assert "examples (train" in capsys.readouterr().out
    splits = {s: read(p) for s, p in paths.items()}
    assert set(splits) == {"train", "validation", "test"}
    assert len(splits["train"]) > 100 and splits["validation"] and splits["test"]
    summaries = {}
    for split, rows in splits.items():
        for row in rows:
            assert set(row) == {"document", "summary"}
            assert row["summary"].strip() and row["document"].strip()
            text, signature = row["document"].rsplit("\n", 1)
            assert text.startswith(row["summary"] + " ")  # lead style, with more than the lead
            assert signature.startswith(("def ", "class ", "module "))
            summaries.setdefault(row["summary"].lower(), set()).add(split)
    assert all(len(s) == 1 for s in summaries.values())  # no summary in two splits
    pairs = [(r["document"], r["summary"]) for rows in splits.values() for r in rows]
    assert len(pairs) == len(set(pairs))


def test_corpus_deterministic_and_seeded(tmp_path):
    a = build_docstring_corpus(str(tmp_path / "a"), source=SMALL, max_examples=150)
    b = build_docstring_corpus(str(tmp_path / "b"), source=SMALL, max_examples=150)
    c = build_docstring_corpus(str(tmp_path / "c"), source=SMALL, max_examples=150, seed=1)
    for split in a:
        with open(a[split], "rb") as fa, open(b[split], "rb") as fb:
            assert fa.read() == fb.read()
    assert sum(len(read(p)) for p in a.values()) == 150
    assert read(a["test"]) != read(c["test"])


def test_xsum_style_removes_the_summary(tmp_path):
    paths = build_docstring_corpus(str(tmp_path), source=SMALL, style="xsum", max_examples=60)
    rows = [r for p in paths.values() for r in read(p)]
    assert len(rows) == 60
    assert all(r["summary"] not in r["document"] for r in rows)
    assert all(r["document"].startswith(("def ", "class ", "module ")) for r in rows)


def test_api_style_name_then_sentence(tmp_path):
    sig = "def pkg.mod.checksum(path, size=4096)"
    doc = "Return the checksum of a file.\n\nThe file is read in blocks, so memory stays flat."
    assert make_example(sig, doc, style="api") == {
        "summary": "pkg.mod.checksum: Return the checksum of a file.",
        "document": "pkg.mod.checksum(path, size=4096)\nThe file is read in blocks, so memory "
                    "stays flat."}
    paths = build_docstring_corpus(str(tmp_path), source=SMALL, style="api", max_examples=60)
    for row in (r for p in paths.values() for r in read(p)):
        name, sentence = row["summary"].split(": ", 1)
        assert row["document"].startswith(name) and sentence not in row["document"]


def test_bad_source(tmp_path):
    with pytest.raises(ValueError, match="source must be one of"):
        build_docstring_corpus(str(tmp_path), source="nowhere")
