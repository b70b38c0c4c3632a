"""The engine's threading and layout knobs, A/B in one process: decode tokens/s per setting.

On a shared 2-core VM a decode run's speed drifts by ±20% from minute to minute (other
tenants' memory traffic), so settings timed in separate processes minutes apart cannot be
compared. This script loads one packed decoder-only checkpoint once and, round after round,
runs the same greedy-free decode (``--prompt`` tokens of prefill, then ``--new-tokens`` steps of
one token) under each setting in turn. It reports each setting's median and best tokens/s
and the median of its per-round ratio to the first setting: the drift hits both sides of a
ratio alike.

A setting is ``THRESHOLD:CHUNKS:LANES``:

* ``THRESHOLD``: ``tbt_set_parallel_threshold`` (GEMMs below this many multiply-adds run on
  one thread; default 2^18 = 262144);
* ``CHUNKS``: ``tbt_set_pool_chunks`` (chunks per thread of a parallel GEMM; 0 = the default
  rule, 2 below 2^23 multiply-adds and 8 above);
* ``LANES``: the smallest M that runs on the lanes layout, set on every layer's plan (1: the
  default of t2a8/b1a8; 2: the row tiles at M = 1).

Usage::

    python benchmarks/bench_engine_knobs.py PACKED_DIR \\
        [--settings 1048576:8:2,262144:0:2,262144:0:1] [--rounds 25]

``PACKED_DIR``: a packed decoder-only folder, e.g. the ``2-2-8-packed`` checkpoint that
``bench_e2e.py --arch llama --workdir W`` or ``bench_peers.py --workdir W`` leaves under
``W/tbt-llama/``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np


def _setting(text: str) -> tuple[int, int, int]:
    try:
        thr, chunks, lanes = (int(v) for v in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected THRESHOLD:CHUNKS:LANES, "
                                         f"e.g. 262144:0:1") from None
    if thr < 0 or chunks < 0 or lanes < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: THRESHOLD, CHUNKS >= 0 and LANES >= 1")
    return thr, chunks, lanes


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("packed", help="packed decoder-only checkpoint folder")
    p.add_argument("--settings", default="1048576:8:2,262144:0:2,262144:0:1",
                   help="comma-separated THRESHOLD:CHUNKS:LANES (the first is the baseline)")
    p.add_argument("--rounds", type=int, default=25, help="rounds (every setting once each)")
    p.add_argument("--prompt", type=int, default=64, help="prefill tokens")
    p.add_argument("--new-tokens", type=int, default=64, help="decode steps per run")
    args = p.parse_args(argv)
    try:
        settings = [_setting(s) for s in args.settings.split(",")]
    except argparse.ArgumentTypeError as e:
        p.error(str(e))
    if args.rounds < 1 or args.prompt < 1 or args.new_tokens < 1:
        p.error("--rounds, --prompt and --new-tokens must be >= 1")

    from tbt.runtime.engine import Engine, EngineError
    from tbt.runtime.kernels import native

    try:
        eng = Engine(args.packed)
    except (EngineError, OSError, ValueError) as e:
        p.error(f"{args.packed}: {e}")
    plans = [lin.fused._plan for row in eng._lins for lin in row.values() if lin is not None]
    if getattr(eng, "_head", None) is not None:
        plans.append(eng._head.fused._plan)
    vocab = int(eng.config["vocab_size"])
    prompt = np.random.default_rng(0).integers(0, vocab, size=(1, args.prompt))
    step = np.ones((1, 1), np.int64)
    rates: dict[tuple[int, int, int], list[float]] = {s: [] for s in settings}
    try:
        for _ in range(args.rounds):
            for s in settings:
                thr, chunks, lanes = s
                native.set_parallel_threshold(thr)
                native.set_pool_chunks(chunks)
                for plan in plans:
                    if plan.w_lanes:
                        plan.lanes_min_m = lanes
                eng.reset()
                eng.forward(prompt, reserve=args.new_tokens + 1)
                t = time.perf_counter()
                for _ in range(args.new_tokens):
                    eng.forward(step)
                rates[s].append(args.new_tokens / (time.perf_counter() - t))
    finally:
        native.set_parallel_threshold(1 << 18)
        native.set_pool_chunks(0)
    base = rates[settings[0]]
    print(f"engine decode, batch 1, {native.get_num_threads()} threads, {args.rounds} rounds of "
          f"{args.new_tokens} steps after a {args.prompt}-token prefill: {args.packed}\n")
    print("| threshold | chunks/thread | lanes from M | median tok/s | best tok/s "
          "| paired ratio to the first |")
    print("|---:|---:|---:|---:|---:|---:|")
    for s in settings:
        r = rates[s]
        ratio = statistics.median(a / b for a, b in zip(r, base, strict=True))
        print(f"| {s[0]} | {s[1] or 'auto'} | {s[2]} | {statistics.median(r):.1f} | "
              f"{max(r):.1f} | {ratio:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
