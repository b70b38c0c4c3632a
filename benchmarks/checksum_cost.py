"""Load-time cost of the packed checkpoint's tensor checksums (docs/format.md §8).

A BART-base-shaped model (the shape of ``bench_e2e.py``: d_model 768, 6+6 layers, FFN 3072,
vocab 50265; random weights, seed 0) quantized 2-2-8 is saved with ``save_packed``, with the LM
head in FP (TBT's default) and in int8. For each file the script times, best of ``--repeat``:

* ``load_packed(DIR, backend="torch")`` on the file as written (every tensor's sha256 and the
  config files' sha256 verified) and on a copy without the per-tensor checksums (the header as
  the previous tbt wrote it: nothing to hash), so the difference is the verification's cost;
* the verification alone: sha256 over every tensor's bytes, as ``load_packed`` does it;
* sha256 and blake2b over the same bytes (the choice of hash);
* ``PackedLinearNP.from_packed_dir`` of one FFN layer, with and without the checksums.

Usage::

    python benchmarks/checksum_cost.py [--quick] [--repeat 3] [--out results/checksum-DATE.md]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_e2e import BASE, QUICK  # noqa: E402  (the shapes of the end-to-end benchmark)

LAYER = "model.encoder.layers.0.fc1"


def _best(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def _strip(src: Path, dst: Path) -> Path:
    """A copy of ``src`` as the previous tbt wrote it: no per-tensor/config checksums."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    from tbt.export.integrity import (CHECKSUM_KEY, FILE_DIGESTS_KEY, TENSOR_DIGESTS_KEY,
                                      header_checksum)
    from tbt.export.io import _ST_DTYPES, WEIGHTS_NAME

    shutil.copytree(src, dst)
    with safe_open(str(dst / WEIGHTS_NAME), "pt") as f:
        md = dict(f.metadata())
    state = load_file(str(dst / WEIGHTS_NAME))
    del md[TENSOR_DIGESTS_KEY], md[FILE_DIGESTS_KEY]
    md[CHECKSUM_KEY] = header_checksum(md, {k: (_ST_DTYPES[t.dtype], tuple(t.shape))
                                            for k, t in state.items()})
    save_file(state, str(dst / WEIGHTS_NAME), metadata=md)
    return dst


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="small shape (smoke run)")
    p.add_argument("--repeat", type=int, default=3, help="timed runs (best kept)")
    p.add_argument("--out", help="also write the Markdown table to this file")
    args = p.parse_args(argv)

    import logging

    import torch
    import transformers as tf
    from safetensors.torch import load_file

    from tbt.config import QuantConfig
    from tbt.export.integrity import array_digest
    from tbt.export.io import WEIGHTS_NAME, _tensor_bytes, load_packed, save_packed
    from tbt.quant.surgery import quantize_model
    from tbt.runtime.linear import PackedLinearNP

    logging.getLogger("tbt").setLevel(logging.ERROR)  # the "not verified" warnings
    torch.manual_seed(0)
    cfg = tf.BartConfig(**(QUICK if args.quick else BASE), pad_token_id=1, bos_token_id=0,
                        eos_token_id=2, decoder_start_token_id=2)
    model = tf.BartForConditionalGeneration(cfg).eval()
    quantize_model(model, QuantConfig(bits="2-2-8"))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for head in ("fp", "int8"):
            d = save_packed(model, Path(tmp) / f"signed-{head}", lm_head=head)
            old = _strip(d, Path(tmp) / f"old-{head}")
            size = (d / WEIGHTS_NAME).stat().st_size
            state = load_file(str(d / WEIGHTS_NAME))
            views = [_tensor_bytes(t) for t in state.values()]
            nbytes = sum(v.nbytes for v in views)
            t_signed = _best(lambda: load_packed(d, backend="torch"), args.repeat)
            t_old = _best(lambda: load_packed(old, backend="torch"), args.repeat)
            t_hash = _best(lambda: [array_digest(v) for v in views], args.repeat)
            t_blake = _best(lambda: [hashlib.blake2b(v).hexdigest() for v in views], args.repeat)
            t_np = _best(lambda: PackedLinearNP.from_packed_dir(d, LAYER, "ref"), args.repeat)
            t_np_old = _best(lambda: PackedLinearNP.from_packed_dir(old, LAYER, "ref"),
                             args.repeat)
            header = 8 + int.from_bytes((d / WEIGHTS_NAME).read_bytes()[:8], "little")
            rows.append((head, size / 1e6, header / 1e3, t_signed, t_old, t_hash,
                         nbytes / t_hash / 1e6, nbytes / t_blake / 1e6, t_np, t_np_old))
    import os

    lines = [f"shape: {json.dumps(QUICK if args.quick else BASE)}, bits 2-2-8, "
             f"torch {torch.__version__}, best of {args.repeat}; {os.cpu_count()} CPUs, load "
             f"average {os.getloadavg()[0]:.1f} at the end",
             "",
             "| LM head | file MB | header kB | load_packed s (checksums) | load_packed s "
             "(no checksums) | sha256 of all tensors s | sha256 MB/s | blake2b MB/s | "
             f"one layer s (checksums) | one layer s (none) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append("| {} | {:.1f} | {:.1f} | {:.3f} | {:.3f} | {:.3f} | {:.0f} | {:.0f} | "
                     "{:.4f} | {:.4f} |".format(*r))
    text = "\n".join(lines)
    print(text)
    if args.out:
        Path(args.out).write_text(f"# Load-time cost of the tensor checksums\n\n"
                                  f"`python benchmarks/checksum_cost.py"
                                  f"{' --quick' if args.quick else ''} --repeat {args.repeat}`"
                                  f"\n\n{text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
