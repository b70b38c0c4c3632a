"""Kernel benchmark: tbt t2a8 / b1a8 / t2a2 / b1a1 against torch fp32, bf16 and dynamic int8.

    python benchmarks/bench_kernels.py                          # 5 shapes x batch 1, 8, 64
    python benchmarks/bench_kernels.py --quick                  # < 1 min smoke run
    python benchmarks/bench_kernels.py --shapes 4096x4096 --batch 1,64 --json out.json

Every op computes ``y = x·Wᵀ + b`` for ``W`` of shape ``N × K`` (``--shapes NxK``) and ``M``
rows of activations (``--batch``), all in one process:

* ``t2a8``, ``b1a8``, ``t2a2``, ``b1a1`` -- tbt's kernels (``tbt.runtime.kernels``, backend
  ``--backend``, default the best native ISA) on weights prepared once and activations already
  quantized and laid out. In the runtime the quantizer is fused into the op that produces the
  activation. The activation work of a call (O(M·K)) is not timed.
* ``torch_fp32`` / ``torch_bf16`` -- ``torch.nn.functional.linear`` on float32 / bfloat16
  tensors.
* ``torch_int8dyn`` -- ``torch.ao.quantization.quantize_dynamic`` of an ``nn.Linear``
  (fbgemm int8 weights; it quantizes the float activations inside the call).

Two weight states are timed. ``hot``: one weight copy, called repeatedly, so it stays in cache
when it fits. ``cold``: calls rotate through enough copies to exceed twice the last-level cache,
so weights stream from memory. Each (shape, batch, cache) cell measures its ops round-robin in
several rounds, so drift in machine load hits them alike. Reported: median µs per call, GOP/s
(``2·M·N·K``) and effective weight GB/s (bytes of the weight in its own format, scales included,
per call).

``run(shapes, batches, json_path)`` is the importable entry point (a ``tbt bench`` command can
call it). It returns the records and writes them as a JSON list when ``json_path`` is given.
Each record has fields ``op, m, k, n, cache, us`` plus ``gops, weight_gbps, weight_bytes,
min_us, samples, threads, backend``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np

SHAPES: tuple[tuple[int, int], ...] = ((768, 768), (3072, 768), (768, 3072), (4096, 4096),
                                       (11008, 4096))  # (N, K) = (out_features, in_features)
BATCHES = (1, 8, 64)
QUICK_SHAPES = ((768, 768), (4096, 4096))
QUICK_BATCHES = (1, 64)
TBT_OPS = ("t2a8", "b1a8", "t2a2", "b1a1")
TORCH_OPS = ("torch_fp32", "torch_bf16", "torch_int8dyn")
OPS = TBT_OPS + TORCH_OPS
CACHES = ("hot", "cold")
MAX_COPIES = 1024


def llc_bytes() -> int:
    """Size of the last-level cache from sysfs (Linux), else 32 MiB."""
    best = 0
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            size = (d / "size").read_text().strip().upper()
            mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(size[-1], 1)
            best = max(best, int(size.rstrip("KMG")) * mult)
        except (OSError, ValueError):
            continue
    return best or 32 << 20


# ---- op builders ---------------------------------------------------------------------------------
# weights_*(op, n, k, rng, ..., cache) -> (weight_bytes, state): built once per shape and cache
# state and reused for every batch; calls_*(op, state, m, rng) -> [one call per weight copy].

def _copies(weight_bytes: int, cache: str) -> int:
    if cache == "hot":
        return 1
    return max(1, min(MAX_COPIES, math.ceil(2 * llc_bytes() / max(weight_bytes, 1))))


def weights_tbt(op: str, n: int, k: int, rng, backend: str, cache: str):
    from tbt.export.pack import pack_binary, pack_ternary
    from tbt.runtime import kernels

    wf, af = op[:2], op[2:]
    kern = kernels.get_kernel(wf, af, backend)
    if wf == "t2":
        packed = pack_ternary(rng.integers(-1, 2, size=(n, k), dtype=np.int8))
    else:
        packed = pack_binary(rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, k)))
    w = kern.prepare_weight(packed, k, (rng.random(n) + 0.5).astype(np.float32))
    ws = [w] + [w.copy() for _ in range(_copies(w.nbytes, cache) - 1)]
    return w.nbytes, (kern, ws, rng.standard_normal(n).astype(np.float32))


def calls_tbt(op: str, state, m: int, rng) -> list[Callable[[], object]]:
    from tbt.runtime import kernels

    kern, ws, bias = state
    x = rng.standard_normal((m, ws[0].k)).astype(np.float32)
    qa = {"a8": lambda: kernels.quantize_a8(x),
          "a2": lambda: kernels.quantize_a2(x, 0.5, signed=False, variant="released"),
          "a1": lambda: kernels.quantize_a1(x, 0.5)}[op[2:]]()
    act = kern.prepare_act(qa)
    out = np.empty((m, ws[0].n), dtype=np.float32)
    return [lambda w=w: kern.run(w, act, bias, out) for w in ws]


def weights_torch(op: str, n: int, k: int, rng, cache: str):
    import warnings

    import torch

    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    elem = {"torch_fp32": 4, "torch_bf16": 2, "torch_int8dyn": 1}[op]
    nbytes = n * k * elem + n * 4  # weight + bias / per-row scales
    mods = []
    for _ in range(_copies(nbytes, cache)):
        lin = torch.nn.Linear(k, n)
        with torch.no_grad():
            lin.weight.normal_(0, 0.02, generator=g)
        if op == "torch_fp32":
            mods.append((lin.weight.detach(), lin.bias.detach()))
        elif op == "torch_bf16":
            mods.append((lin.weight.detach().bfloat16(), lin.bias.detach().bfloat16()))
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # torch.ao.quantization deprecation notice
                mods.append(torch.ao.quantization.quantize_dynamic(
                    torch.nn.Sequential(lin), {torch.nn.Linear}, dtype=torch.qint8))
    return nbytes, (g, mods)


def calls_torch(op: str, state, m: int, rng) -> list[Callable[[], object]]:
    import torch

    g, mods = state
    k = mods[0][0].shape[1] if op != "torch_int8dyn" else mods[0][0].in_features
    x = torch.randn(m, k, generator=g)
    if op == "torch_int8dyn":
        return [lambda q=q: q(x) for q in mods]
    if op == "torch_bf16":
        x = x.bfloat16()
    return [lambda wt=wt, bt=bt: torch.nn.functional.linear(x, wt, bt) for wt, bt in mods]


# ---- timing ------------------------------------------------------------------------------------

def _time_burst(calls: Sequence[Callable[[], object]], start: int, budget_s: float,
                max_calls: int) -> tuple[list[float], int]:
    """Call round-robin from ``start`` for about ``budget_s``; per-call µs samples."""
    samples: list[float] = []
    i, end = start, time.perf_counter() + budget_s
    while len(samples) < max_calls and (len(samples) < 3 or time.perf_counter() < end):
        f = calls[i % len(calls)]
        t0 = time.perf_counter_ns()
        f()
        samples.append((time.perf_counter_ns() - t0) / 1e3)
        i += 1
    return samples, i


def measure_cell(cells: dict[str, tuple[int, list]], rounds: int, min_time: float,
                 max_calls: int) -> dict[str, tuple[int, list[float]]]:
    """``{op: (weight_bytes, calls)}`` -> ``{op: (weight_bytes, µs samples)}``: warm each op (a
    pass over its copies), then time the ops round-robin in ``rounds`` rounds."""
    state = {}
    for op, (nbytes, calls) in cells.items():
        for f in calls[: min(len(calls), 64)] if len(calls) > 1 else calls * 3:
            f()
        state[op] = (nbytes, calls, 0, [])
    for _ in range(rounds):
        for op, (nbytes, calls, pos, samples) in state.items():
            got, pos = _time_burst(calls, pos, min_time / rounds, max_calls // rounds + 1)
            state[op] = (nbytes, calls, pos, samples + got)
    return {op: (nbytes, samples) for op, (nbytes, _, _, samples) in state.items()}


def _record(op, m, n, k, cache, nbytes, samples, threads, backend) -> dict:
    us = float(np.median(samples))
    return {"op": op, "m": m, "k": k, "n": n, "cache": cache, "us": round(us, 3),
            "gops": round(2 * m * n * k / us / 1e3, 2), "weight_gbps": round(nbytes / us / 1e3, 2),
            "weight_bytes": int(nbytes), "min_us": round(float(np.min(samples)), 3),
            "samples": len(samples), "threads": threads, "backend": backend}


def run(shapes: Iterable[tuple[int, int]] = SHAPES, batches: Iterable[int] = BATCHES,
        json_path: str | os.PathLike | None = None, *, ops: Sequence[str] = OPS,
        caches: Sequence[str] = CACHES, backend: str = "auto", threads: int | None = None,
        min_time: float = 0.3, rounds: int = 3, max_calls: int = 2000, seed: int = 0,
        show: bool = True, metric: str = "us") -> list[dict]:
    """Benchmark ``ops`` over ``shapes`` (N, K) × ``batches`` (M) × ``caches``.

    Args:
        min_time: seconds of timing per op and cell (split over ``rounds``).
        backend: tbt kernel backend (``auto``, ``native``, ``avx512``, ``avx2``, ``scalar``,
            ``ref``).
        threads: threads for tbt and torch (default: all CPUs).
        metric: what the printed table shows: ``us``, ``gops`` or ``weight_gbps``.

    Returns:
        the records (see the module docstring), also written to ``json_path`` as a JSON list.
    """
    from tbt.runtime import kernels

    threads = threads or os.cpu_count() or 1
    kernels.set_num_threads(threads)
    tbt_backend = "native" if backend == "auto" and kernels.native.available() else backend
    if tbt_backend == "auto":
        tbt_backend = "ref"
    torch_ops = [op for op in ops if op in TORCH_OPS]
    if torch_ops:
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            print("torch not installed: skipping", ", ".join(torch_ops))
            ops = [op for op in ops if op not in TORCH_OPS]
    isa = (kernels.native.resolve_isa("t2a8", tbt_backend) if tbt_backend != "ref" else "ref")
    rng = np.random.default_rng(seed)
    records: list[dict] = []
    if show:
        print(f"tbt kernels ({tbt_backend} -> {isa}), {threads} threads, LLC "
              f"{llc_bytes() >> 20} MiB, {platform.processor() or platform.machine()}")
    for n, k in shapes:
        for cache in caches:
            weights = {op: weights_tbt(op, n, k, rng, tbt_backend, cache) if op in TBT_OPS
                       else weights_torch(op, n, k, rng, cache) for op in ops}
            for m in batches:
                cells = {op: (nbytes, (calls_tbt if op in TBT_OPS else calls_torch)(
                    op, st, m, rng)) for op, (nbytes, st) in weights.items()}
                for op, (nbytes, samples) in measure_cell(cells, rounds, min_time,
                                                          max_calls).items():
                    records.append(_record(op, m, n, k, cache, nbytes, samples, threads,
                                           isa if op in TBT_OPS else "torch"))
                if show:
                    _print_row(records[-len(cells):], metric, header=len(records) == len(cells))
            del weights  # free the cold copies before the next shape
    if json_path is not None:
        Path(json_path).write_text(json.dumps(records, indent=1) + "\n")
        if show:
            print(f"wrote {len(records)} records to {json_path}")
    return records


def _print_row(rows: list[dict], metric: str, header: bool) -> None:
    ops = [r["op"] for r in rows]
    if header:
        unit = {"us": "median µs", "gops": "GOP/s", "weight_gbps": "weight GB/s"}[metric]
        print(f"{'N x K':>12} {'M':>3} {'cache':>5} " + " ".join(f"{op:>13}" for op in ops)
              + f"  t2a8 vs fp32   ({unit})")
    r0 = rows[0]
    cells = " ".join(f"{r[metric]:>13.1f}" for r in rows)
    by = {r["op"]: r["us"] for r in rows}
    speed = (f"{by['torch_fp32'] / by['t2a8']:>11.1f}x" if {"t2a8", "torch_fp32"} <= set(by)
             else "")
    print(f"{r0['n']:>5} x {r0['k']:<5} {r0['m']:>3} {r0['cache']:>5} {cells}  {speed}", flush=True)


def _parse_shapes(s: str) -> list[tuple[int, int]]:
    out = []
    for part in s.split(","):
        n, _, k = part.strip().lower().partition("x")
        out.append((int(n), int(k)))
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", type=_parse_shapes, default=None,
                   help="comma-separated NxK (out x in features), e.g. 4096x4096,768x3072")
    p.add_argument("--batch", type=lambda s: [int(v) for v in s.split(",")], default=None,
                   help="comma-separated M (rows of activations), e.g. 1,8,64")
    p.add_argument("--ops", type=lambda s: s.split(","), default=list(OPS),
                   help=f"comma-separated subset of {','.join(OPS)}")
    p.add_argument("--cache", type=lambda s: s.split(","), default=list(CACHES),
                   help="hot, cold or hot,cold")
    p.add_argument("--backend", default="auto",
                   help="tbt kernel backend: auto|native|avx512|avx2|scalar|ref")
    p.add_argument("--threads", type=int, default=None, help="threads (default: all CPUs)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timing per op and cell (default 0.3; --quick 0.06)")
    p.add_argument("--metric", choices=["us", "gops", "weight_gbps"], default="us",
                   help="what the printed table shows")
    p.add_argument("--json", default=None, help="write every record to this JSON file")
    p.add_argument("--quick", action="store_true",
                   help="2 shapes (768x768, 4096x4096), batch 1 and 64, short timing")
    args = p.parse_args(argv)
    shapes = args.shapes or (QUICK_SHAPES if args.quick else SHAPES)
    batches = args.batch or (QUICK_BATCHES if args.quick else BATCHES)
    min_time = args.min_time or (0.06 if args.quick else 0.3)
    bad = sorted(set(args.ops) - set(OPS)) + sorted(set(args.cache) - set(CACHES))
    if bad:
        p.error(f"unknown ops/cache values {bad}")
    return run(shapes, batches, args.json, ops=args.ops, caches=args.cache,
               backend=args.backend, threads=args.threads, min_time=min_time,
               rounds=2 if args.quick else 3, metric=args.metric)


if __name__ == "__main__":
    main()
