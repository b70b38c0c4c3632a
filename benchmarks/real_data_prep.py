"""Real offline text pairs for from-scratch training runs (the data is not committed).

Two sources, both real text that ships in package registries:

* ``po``: English -> translated UI strings of a JupyterLab language pack from PyPI, read from
  its compiled gettext catalogues (``.mo``, parsed with the standard library's ``gettext``)::

      pip download --no-deps jupyterlab-language-pack-fr-FR -d /tmp/lp
      python benchmarks/real_data_prep.py po --wheel /tmp/lp/*.whl --output-dir data/fr

  rows ``{"source": English, "target": French}``; message contexts (``ctx\\x04``) dropped,
  plural forms give their singular, strings over 400 characters left out.

* ``debian``: Debian package descriptions, the long description -> its one-line synopsis
  (tens of thousands of real, human-written pairs). Debian ships the long descriptions in
  separate ``Translation-en`` indexes, which container images often switch off
  (``Acquire::Languages "none"``); fetch them with apt's own client, then convert::

      apt-get -o Acquire::Languages=en update
      python benchmarks/real_data_prep.py debian --output-dir data/debian

  rows ``{"document": long description, "summary": synopsis}``; the long description has its
  paragraph marks (``" ."``) turned into blank-line-free text and is cut to 120 words;
  packages whose long description repeats another's (``-dev``/``-doc`` siblings) are kept once,
  so no document appears twice.

Both write ``train/validation/test.jsonl``, split 90/5/5 by a hash of the source (or the
document), so a string never appears in two splits; ``--max-examples`` keeps a deterministic
subset.
"""

from __future__ import annotations

import argparse
import glob
import gettext
import hashlib
import io
import json
import os
import subprocess
import zipfile


def po_pairs(wheel: str, max_chars: int = 400) -> list[dict[str, str]]:
    """(English, translation) pairs from every ``.mo`` catalogue inside a language-pack wheel."""
    pairs, seen = [], set()
    with zipfile.ZipFile(wheel) as z:
        for name in sorted(z.namelist()):
            if not name.endswith(".mo"):
                continue
            cat = gettext.GNUTranslations(io.BytesIO(z.read(name)))._catalog
            for key, value in cat.items():
                if isinstance(key, tuple):  # plural: (msgid, index); keep the singular
                    if key[1] != 0:
                        continue
                    key = key[0]
                src = " ".join(key.split("\x04", 1)[-1].split())
                tgt = " ".join(value.split())
                if not src or not tgt or len(src) > max_chars or len(tgt) > max_chars:
                    continue
                if src in seen:
                    continue
                seen.add(src)
                pairs.append({"source": src, "target": tgt})
    return pairs


LISTS = "/var/lib/apt/lists/*_i18n_Translation-en*"


def debian_pairs(max_words: int = 120, min_words: int = 8) -> list[dict[str, str]]:
    """(long description, synopsis) pairs from apt's ``Translation-en`` indexes."""
    files = sorted(glob.glob(LISTS))
    if not files:
        raise SystemExit(f"no {LISTS}: run `apt-get -o Acquire::Languages=en update` first")
    out = "\n\n".join(subprocess.run(["/usr/lib/apt/apt-helper", "cat-file", f],
                                     capture_output=True, text=True, check=True).stdout
                      for f in files)
    pairs, seen = [], set()
    for stanza in out.split("\n\n"):
        lines = stanza.split("\n")
        for i, line in enumerate(lines):
            if line.startswith("Description-en:"):
                synopsis = line[len("Description-en:"):].strip()
                body = []
                for cont in lines[i + 1:]:
                    if not cont.startswith(" "):
                        break
                    cont = cont.strip()
                    body.append("" if cont == "." else cont)
                words = " ".join(body).split()
                if len(words) < min_words or len(synopsis.split()) < 2:
                    break
                doc = " ".join(words[:max_words])
                if doc.lower() in seen:
                    break
                seen.add(doc.lower())
                pairs.append({"document": doc, "summary": synopsis})
                break
    return pairs


def write_splits(rows: list[dict[str, str]], key: str, output_dir: str,
                 max_examples: int | None) -> dict[str, int]:
    def h(r):
        return hashlib.sha1(r[key].lower().encode()).hexdigest()

    rows = sorted(rows, key=h)
    if max_examples:
        rows = rows[:max_examples]
    splits = {"train": [], "validation": [], "test": []}
    for r in rows:
        b = int(h(r)[8:16], 16) % 100
        splits["validation" if b < 5 else "test" if b < 10 else "train"].append(r)
    os.makedirs(output_dir, exist_ok=True)
    for name, part in splits.items():
        with open(os.path.join(output_dir, f"{name}.jsonl"), "w", encoding="utf-8") as f:
            for r in part:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return {k: len(v) for k, v in splits.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="source", required=True)
    po = sub.add_parser("po", help="JupyterLab language pack wheel -> translation pairs")
    po.add_argument("--wheel", required=True, help="the downloaded .whl (a glob is fine)")
    deb = sub.add_parser("debian", help="apt-cache dumpavail -> description summaries")
    for p in (po, deb):
        p.add_argument("--output-dir", required=True)
        p.add_argument("--max-examples", type=int, default=None)
    args = ap.parse_args()
    if args.source == "po":
        wheels = sorted(glob.glob(args.wheel))
        if not wheels:
            raise SystemExit(f"no wheel matches {args.wheel!r}: pip download --no-deps "
                             "jupyterlab-language-pack-fr-FR -d DIR first")
        rows, key = po_pairs(wheels[0]), "source"
    else:
        rows, key = debian_pairs(), "document"
    sizes = write_splits(rows, key, args.output_dir, args.max_examples)
    print(f"{sum(sizes.values())} pairs -> {args.output_dir} {sizes}")


if __name__ == "__main__":
    main()
