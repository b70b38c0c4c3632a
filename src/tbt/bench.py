"""Kernel benchmark: tbt's t2a8 / b1a8 / t2a2 / b1a1 against torch fp32, bf16 and dynamic int8.

How it works
------------
Every op computes ``y = x·Wᵀ + b`` for a weight ``W`` of ``N × K`` (out × in features) and
``M`` rows of activations, all in one process, side by side:

* ``t2a8``, ``b1a8``, ``t2a2``, ``b1a1``: :mod:`tbt.runtime.kernels` (backend ``backend``,
  default the best native ISA) on weights prepared once and activations already quantized and
  laid out (in the runtime the quantizer is fused into the op that produces the activation, so
  the O(M·K) activation work is not timed). Each call is the full Python ``kernel.run``.
* ``torch_fp32`` / ``torch_bf16``: ``torch.nn.functional.linear`` on float32 / bfloat16.
* ``torch_int8dyn``: ``torch.ao.quantization.quantize_dynamic`` of an ``nn.Linear`` (fbgemm int8
  weights; it quantizes the float activations inside the call).

Weight states (``cache``). ``hot``: one weight copy called again and again (one untimed call
starts every burst, so another op's traffic does not leave it cold). ``cold``: calls rotate
through copies covering twice the last-level cache, so weights stream from DRAM; when fewer
copies than that exist (:data:`MAX_COPIES`, small matrices) a buffer of twice the LLC is
streamed, untimed, after every pass over the copies. The ops of a (shape, batch, cache) cell
are timed round-robin in a few rounds, so drift in machine load hits them alike.

Reported per row: median µs per call (``us``), ``gops = 2·M·N·K / us / 1e3`` and the effective
weight bandwidth ``weight_gbps = weight_bytes / us / 1e3`` (bytes of the weight in its own
format, per-row scales included). ``cpu_us`` is the median CPU time of the process per call
(all its threads): on a shared machine, wall time also counts the time the OS ran other
processes instead, while with one thread ``cpu_us`` is what the call itself cost. torch never
imports at module level: the tbt ops run without
it (docs/architecture.md).
"""

from __future__ import annotations

import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["SHAPES", "BATCHES", "OPS", "TBT_OPS", "TORCH_OPS", "CACHES", "QUICK_SHAPES",
           "QUICK_BATCHES", "BenchConfig", "run", "format_table", "parse_shapes", "parse_ints",
           "parse_names", "llc_bytes", "RECORD_FIELDS"]

SHAPES: tuple[tuple[int, int], ...] = ((768, 768), (3072, 768), (768, 3072), (4096, 4096),
                                       (11008, 4096))  # (N, K) = (out_features, in_features)
BATCHES = (1, 8, 64)
QUICK_SHAPES = ((768, 768), (4096, 4096))
QUICK_BATCHES = (1, 64)
TBT_OPS = ("t2a8", "b1a8", "t2a2", "b1a1")
TORCH_OPS = ("torch_fp32", "torch_bf16", "torch_int8dyn")
OPS = TBT_OPS + TORCH_OPS
CACHES = ("hot", "cold")
MAX_COPIES = 64  # smaller matrices: the evictor streams 2x LLC after each pass over them
RECORD_FIELDS = ("op", "m", "k", "n", "cache", "us", "gops", "weight_gbps", "weight_bytes",
                 "p10_us", "min_us", "cpu_us", "samples", "threads", "backend", "copies",
                 "evict")


@dataclass(frozen=True)
class BenchConfig:
    """What to measure. ``repeat``: timed calls per op and cell (None: time-based, ``min_time``
    seconds per op and cell, at most ``max_calls`` calls)."""

    shapes: tuple[tuple[int, int], ...] = SHAPES
    batches: tuple[int, ...] = BATCHES
    ops: tuple[str, ...] = OPS
    caches: tuple[str, ...] = CACHES
    backend: str = "auto"
    threads: int | None = None
    repeat: int | None = None
    min_time: float = 0.3
    max_calls: int = 2000
    rounds: int = 3
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [o for o in self.ops if o not in OPS]
        if bad or not self.ops:
            raise ValueError(f"unknown ops {bad or '(none given)'}; choose from {','.join(OPS)}")
        bad = [c for c in self.caches if c not in CACHES]
        if bad or not self.caches:
            raise ValueError(f"unknown cache states {bad or '(none)'}; use hot, cold or hot,cold")
        if not self.shapes or any(n < 1 or k < 1 for n, k in self.shapes):
            raise ValueError(f"shapes must be positive NxK pairs like 4096x4096, got "
                             f"{self.shapes}")
        if not self.batches or any(m < 1 for m in self.batches):
            raise ValueError(f"batch sizes must be positive integers like 1,8,64, got "
                             f"{self.batches}")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads}: give a positive count (or omit it for "
                             f"all CPUs)")
        if self.repeat is not None and self.repeat < 1:
            raise ValueError(f"repeat={self.repeat}: give at least 1 timed call per op")
        if self.min_time <= 0 or self.max_calls < 1 or self.rounds < 1:
            raise ValueError("min_time must be > 0, max_calls and rounds >= 1")


# ---- parsing (shared by ``tbt bench`` and benchmarks/bench_kernels.py) -------------------------

def parse_shapes(s: str) -> tuple[tuple[int, int], ...]:
    """``"4096x4096,768x3072"`` → ``((4096, 4096), (768, 3072))`` (N x K)."""
    out = []
    for part in s.split(","):
        n, sep, k = part.strip().lower().partition("x")
        if not sep or not n.isdigit() or not k.isdigit():
            raise ValueError(f"shape {part!r}: write NxK (out x in features), e.g. 4096x4096")
        out.append((int(n), int(k)))
    return tuple(out)


def parse_ints(s: str) -> tuple[int, ...]:
    """``"1,8,64"`` → ``(1, 8, 64)``."""
    try:
        return tuple(int(v) for v in s.split(","))
    except ValueError:
        raise ValueError(f"{s!r}: write comma-separated integers, e.g. 1,8,64") from None


def parse_names(s: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in s.split(",") if v.strip())


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


# ---- op builders: weights(op, n, k, rng, cfg, copies) -> (bytes, state) once per shape and
# cache state; calls(op, state, m, rng) -> one zero-argument call per weight copy ---------------

def _copies(weight_bytes: int, cache: str) -> int:
    if cache == "hot":
        return 1
    return max(1, min(MAX_COPIES, math.ceil(2 * llc_bytes() / max(weight_bytes, 1))))


def _weights_tbt(op: str, n: int, k: int, rng, backend: str, copies: int):
    from tbt.export.pack import pack_binary, pack_ternary
    from tbt.runtime import kernels

    wf, af = op[:2], op[2:]
    kern = kernels.get_kernel(wf, af, backend)
    if wf == "t2":
        packed = pack_ternary(rng.integers(-1, 2, size=(n, k), dtype=np.int8))
    else:
        packed = pack_binary(rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, k)))
    w = kern.prepare_weight(packed, k, (rng.random(n) + 0.5).astype(np.float32))
    ws = [w] + [w.copy() for _ in range(copies - 1)]
    return w.nbytes, (kern, ws, rng.standard_normal(n).astype(np.float32))


def _calls_tbt(op: str, state, m: int, rng) -> list[Callable[[], object]]:
    from tbt.runtime import kernels

    kern, ws, bias = state
    x = rng.standard_normal((m, ws[0].k)).astype(np.float32)
    qa = {"a8": lambda: kernels.quantize_a8(x),
          "a2": lambda: kernels.quantize_a2(x, 0.5, signed=False, variant="released"),
          "a1": lambda: kernels.quantize_a1(x, 0.5)}[op[2:]]()
    act = kern.prepare_act(qa)
    out = np.empty((m, ws[0].n), dtype=np.float32)
    return [lambda w=w: kern.run(w, act, bias, out) for w in ws]


_TORCH_ELEM = {"torch_fp32": 4, "torch_bf16": 2, "torch_int8dyn": 1}


def _torch_bytes(op: str, n: int, k: int) -> int:
    return n * k * _TORCH_ELEM[op] + n * 4  # weight + bias / per-row scales


def _weights_torch(op: str, n: int, k: int, rng, backend: str, copies: int):
    import warnings

    import torch

    g = torch.Generator().manual_seed(int(rng.integers(1 << 30)))
    mods = []
    for _ in range(copies):
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
    return _torch_bytes(op, n, k), (g, k, mods)


def _calls_torch(op: str, state, m: int, rng) -> list[Callable[[], object]]:
    import torch

    g, k, mods = state
    x = torch.randn(m, k, generator=g)
    if op == "torch_int8dyn":
        return [lambda q=q: q(x) for q in mods]
    if op == "torch_bf16":
        x = x.bfloat16()
    return [lambda wt=wt, bt=bt: torch.nn.functional.linear(x, wt, bt) for wt, bt in mods]


# op -> (weight builder, call builder, bytes of one weight before it is built)
_BUILDERS: dict[str, tuple[Callable, Callable]] = {
    **{op: (_weights_tbt, _calls_tbt) for op in TBT_OPS},
    **{op: (_weights_torch, _calls_torch) for op in TORCH_OPS},
}


def _planned_bytes(op: str, n: int, k: int) -> int:
    if op in TORCH_OPS:
        return _torch_bytes(op, n, k)
    g = 64 if op in ("t2a8", "b1a8") else 256  # native.padded_k
    kpad = -(-k // g) * g
    return n * kpad // (4 if op.startswith("t2") else 8) + 4 * n


# ---- timing ------------------------------------------------------------------------------------

class _Evictor:
    """Streams (reads and writes) a buffer of twice the LLC: afterwards no weight is cached."""

    def __init__(self) -> None:
        self.buf = np.zeros(2 * llc_bytes() // 8, dtype=np.int64)

    def __call__(self) -> None:
        np.add(self.buf, 1, out=self.buf)


@dataclass
class _OpState:
    calls: list
    nbytes: int
    evict: Callable[[], None] | None
    pos: int = 0
    samples: list | None = None
    cpu: list | None = None


def _burst(st: _OpState, cache: str, budget_s: float, max_calls: int, min_calls: int) -> None:
    """Timed calls round-robin over the copies for about ``budget_s`` (at least ``min_calls``,
    at most ``max_calls``); cold: evict after each full pass when the copies do not."""
    if cache == "hot":
        st.calls[0]()  # untimed: the previous op's traffic may have evicted this weight
    got, end = 0, time.perf_counter() + budget_s
    while got < max_calls and (got < min_calls or time.perf_counter() < end):
        i = st.pos % len(st.calls)
        if i == 0 and st.evict is not None:
            st.evict()
        f = st.calls[i]
        c0 = time.process_time_ns()
        t0 = time.perf_counter_ns()
        f()
        t1 = time.perf_counter_ns()
        st.samples.append((t1 - t0) / 1e3)
        st.cpu.append((time.process_time_ns() - c0) / 1e3)
        st.pos += 1
        got += 1


def _measure_cell(cells: dict[str, _OpState], cache: str, cfg: BenchConfig) -> None:
    for st in cells.values():  # warm up: code paths, pool threads, page faults of the outputs,
        for f in (st.calls * 3)[:max(3, len(st.calls))]:  # and each copy's lazily built layouts
            f()
        st.samples, st.cpu = [], []
    rounds = min(cfg.rounds, cfg.repeat) if cfg.repeat else cfg.rounds
    for r in range(rounds):
        for st in cells.values():
            if cfg.repeat:  # exactly `repeat` calls in all, spread over the rounds
                n = cfg.repeat // rounds + (r < cfg.repeat % rounds)
                _burst(st, cache, 0.0, n, n)
            else:
                _burst(st, cache, cfg.min_time / rounds, cfg.max_calls // rounds + 1, 3)


def _sig(x: float, digits: int = 5) -> float:
    return float(f"{x:.{digits}g}")  # significant digits: small rates stay non-zero


def _record(op: str, m: int, n: int, k: int, cache: str, st: _OpState, threads: int,
            backend: str) -> dict:
    s = np.asarray(st.samples)
    us = float(np.median(s))
    return {"op": op, "m": m, "k": k, "n": n, "cache": cache, "us": _sig(us),
            "gops": _sig(2 * m * n * k / us / 1e3), "weight_gbps": _sig(st.nbytes / us / 1e3),
            "weight_bytes": int(st.nbytes), "p10_us": _sig(float(np.percentile(s, 10))),
            "min_us": _sig(float(s.min())), "cpu_us": _sig(float(np.median(st.cpu))),
            "samples": int(s.size), "threads": threads,
            "backend": backend, "copies": len(st.calls), "evict": st.evict is not None}


def _setup(cfg: BenchConfig) -> tuple[list[str], int, str, str]:
    """Threads for tbt and torch; the ops that can run; tbt backend and the ISA it resolves to."""
    from tbt.runtime import kernels

    threads = cfg.threads or os.cpu_count() or 1
    kernels.set_num_threads(threads)
    ops = list(cfg.ops)
    if any(op in TORCH_OPS for op in ops):
        try:
            import torch
            torch.set_num_threads(threads)
        except ImportError:
            print("torch is not installed: skipping", ", ".join(o for o in ops if o in TORCH_OPS))
            ops = [op for op in ops if op not in TORCH_OPS]
    backend = cfg.backend
    if backend == "auto":
        backend = "native" if kernels.native.available() else "ref"
    isa = kernels.native.resolve_isa("t2a8", backend) if backend != "ref" else "ref"
    return ops, threads, backend, isa


def run(cfg: BenchConfig = BenchConfig(), json_path: str | os.PathLike | None = None, *,
        show: bool = True) -> list[dict]:
    """Benchmark ``cfg.ops`` over ``cfg.shapes`` × ``cfg.batches`` × ``cfg.caches``.

    Returns the records (fields :data:`RECORD_FIELDS`), also written to ``json_path`` as a JSON
    list; prints the table cell by cell when ``show``.
    """
    ops, threads, backend, isa = _setup(cfg)
    rng = np.random.default_rng(cfg.seed)
    llc = llc_bytes()
    evictor: _Evictor | None = None
    records: list[dict] = []
    if show:
        print(f"tbt kernels ({backend} -> {isa}), {threads} threads, LLC {llc >> 20} MiB, "
              f"{platform.processor() or platform.machine()}, load {_load()}", flush=True)
    for n, k in cfg.shapes:
        for cache in cfg.caches:
            weights = {}
            for op in ops:
                copies = _copies(_planned_bytes(op, n, k), cache)
                weights[op] = (copies, *_BUILDERS[op][0](op, n, k, rng, backend, copies))
            for m in cfg.batches:
                cells = {}
                for op, (copies, nbytes, state) in weights.items():
                    needs_evict = cache == "cold" and copies * nbytes < 2 * llc
                    if needs_evict and evictor is None:
                        evictor = _Evictor()
                    cells[op] = _OpState(_BUILDERS[op][1](op, state, m, rng), nbytes,
                                         evictor if needs_evict else None)
                _measure_cell(cells, cache, cfg)
                rows = [_record(op, m, n, k, cache, st, threads,
                                isa if op in TBT_OPS else "torch") for op, st in cells.items()]
                records += rows
                if show:
                    print(format_table(rows, header=len(records) == len(rows)), flush=True)
            del weights  # free the cold copies before the next shape
    if json_path is not None:
        Path(json_path).write_text(json.dumps(records, indent=1) + "\n")
        if show:
            print(f"wrote {len(records)} records to {json_path}")
    return records


def _load() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def format_table(rows: Sequence[dict], header: bool = True) -> str:
    """One line per record: shape, batch, cache, op, µs, GOP/s, weight GB/s, speed-up vs fp32
    (of the same shape, batch and cache, when it is among ``rows``), CPU µs."""
    fp32 = {(r["n"], r["k"], r["m"], r["cache"]): r["us"] for r in rows
            if r["op"] == "torch_fp32"}
    lines = [f"{'N x K':>11} {'M':>3} {'cache':>5} {'op':<13} {'us':>10} {'GOP/s':>9} "
             f"{'weight GB/s':>11} {'vs fp32':>8} {'cpu us':>10}"] if header else []
    for r in rows:
        ref = fp32.get((r["n"], r["k"], r["m"], r["cache"]))
        speed = f"{ref / r['us']:>7.1f}x" if ref else f"{'':>8}"
        lines.append(f"{r['n']:>5}x{r['k']:<5} {r['m']:>3} {r['cache']:>5} {r['op']:<13} "
                     f"{r['us']:>10.1f} {r['gops']:>9.1f} {r['weight_gbps']:>11.2f} {speed}"
                     + (f" {r['cpu_us']:>10.1f}" if "cpu_us" in r else ""))
    return "\n".join(lines)
