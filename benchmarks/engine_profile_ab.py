"""A/B of the native engine's step profile between two source trees, on a loaded machine.

Wall times on a shared machine measure the other jobs; the engine's calling-thread CPU times
(``Engine.profile()``) with one kernel thread (``TBT_NUM_THREADS=1``: no spin-waits) are far
more robust. This script alternates the two trees (each in its own worker process, built C
libraries in each tree), ``--rounds`` times, and keeps the minimum CPU time of each part.

Usage::

    python benchmarks/engine_profile_ab.py --dir CHECKPOINT --a OLD/src --b NEW/src \\
        [--batch 1] [--prompt 64] [--new-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time


def worker(args: argparse.Namespace) -> None:
    import numpy as np

    from tbt.runtime.engine import Engine

    e = Engine.from_packed_dir(args.dir)
    prompt = np.random.default_rng(2).integers(3, e.vocab_size, (args.batch, args.prompt))
    best: dict = {}
    for _ in range(3):
        e.reset()
        tok = e.forward(prompt, reserve=args.new_tokens).argmax(-1)[:, None]
        e.profile(True)
        t = time.perf_counter()
        for _ in range(args.new_tokens):
            tok = e.forward(tok).argmax(-1)[:, None]
        run = {"step_ms": (time.perf_counter() - t) / args.new_tokens * 1e3}
        run.update({k: c / args.new_tokens * 1e6 for k, (_, c) in e.profile_result().items()})
        e.profile(False)
        best = {k: min(v, best.get(k, v)) for k, v in run.items()}
    print("RESULT " + json.dumps(best))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dir", required=True, help="a packed decoder-only checkpoint")
    p.add_argument("--a", help="source tree A (its src/ folder)")
    p.add_argument("--b", help="source tree B (its src/ folder)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if not args.a or not args.b:
        p.error("--a and --b name the two source trees")
    res: dict[str, dict] = {}
    for _ in range(args.rounds):
        for name in ("a", "b"):
            env = dict(os.environ, PYTHONPATH=getattr(args, name), TBT_NUM_THREADS="1")
            out = subprocess.run([sys.executable, __file__, "--worker", "--dir", args.dir,
                                  "--batch", str(args.batch), "--prompt", str(args.prompt),
                                  "--new-tokens", str(args.new_tokens)],
                                 env=env, capture_output=True, text=True, check=True)
            line = next(x for x in out.stdout.splitlines() if x.startswith("RESULT "))
            r = json.loads(line[len("RESULT "):])
            res[name] = {k: min(v, res.get(name, {}).get(k, v)) for k, v in r.items()}
    parts = [k for k in res["a"] if k != "step_ms"]
    print(f"batch {args.batch}, prompt {args.prompt}, {args.new_tokens} decoding steps, one "
          f"kernel thread; calling-thread CPU µs per step (min of {3 * args.rounds} runs)\n")
    print("| tree | " + " | ".join(parts) + " | sum | wall ms/step (loaded) |")
    print("|---|" + "---|" * (len(parts) + 2))
    for name in ("a", "b"):
        r = res[name]
        print(f"| {getattr(args, name)} | " + " | ".join(f"{r[k]:.0f}" for k in parts) +
              f" | {sum(r[k] for k in parts):.0f} | {r['step_ms']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
