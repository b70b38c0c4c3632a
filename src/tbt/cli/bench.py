"""``tbt bench``: GEMV/GEMM latency of tbt's kernels vs torch fp32, bf16 and dynamic int8.

The measurement itself is :mod:`tbt.bench`; ``benchmarks/bench_kernels.py`` is the same
command as a script.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Sequence

from tbt.cli import CliError
from tbt.cli._safety import add_overwrite_flag, check_output_file


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options (strings here: parsing imports numpy, so it waits for the handler)."""
    p.add_argument("--shapes", default=None, metavar="NxK,...",
                   help="weight shapes, out x in features (default: 768x768,3072x768,"
                        "768x3072,4096x4096,11008x4096)")
    p.add_argument("--batch", default=None, metavar="M,...",
                   help="activation rows (default: 1,8,64)")
    p.add_argument("--ops", default=None, metavar="OP,...",
                   help="subset of t2a8,b1a8,t2a2,b1a1,torch_fp32,torch_bf16,torch_int8dyn "
                        "(default: all)")
    p.add_argument("--cache", default="hot,cold", metavar="STATE,...",
                   help="hot, cold or hot,cold (default: both)")
    p.add_argument("--threads", type=int, default=None,
                   help="threads for tbt and torch (default: all CPUs)")
    p.add_argument("--repeat", type=int, default=None,
                   help="timed calls per op and cell (default: as many as fit in --min-time)")
    p.add_argument("--min-time", type=float, default=None,
                   help="seconds of timing per op and cell without --repeat (default 0.3; "
                        "--quick 0.06)")
    p.add_argument("--backend", default="auto",
                   help="tbt kernel backend: auto|native|avx512|avx2|scalar|ref")
    p.add_argument("--json", default=None, metavar="FILE",
                   help="also write every row as a JSON record (op, m, k, n, cache, us, ...); "
                        "an existing FILE is refused without --overwrite")
    add_overwrite_flag(p, help="replace an existing --json file")
    p.add_argument("--quick", action="store_true",
                   help="2 shapes (768x768, 4096x4096), batch 1 and 64, short timing")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and inputs")


def config_from_args(args: argparse.Namespace):
    """A :class:`tbt.bench.BenchConfig`; bad values raise :class:`CliError`."""
    from tbt import bench as B

    try:
        return B.BenchConfig(
            shapes=B.parse_shapes(args.shapes) if args.shapes else
            (B.QUICK_SHAPES if args.quick else B.SHAPES),
            batches=B.parse_ints(args.batch) if args.batch else
            (B.QUICK_BATCHES if args.quick else B.BATCHES),
            ops=B.parse_names(args.ops) if args.ops else B.OPS,
            caches=B.parse_names(args.cache), backend=args.backend, threads=args.threads,
            repeat=args.repeat, min_time=args.min_time or (0.06 if args.quick else 0.3),
            rounds=2 if args.quick else 3, seed=args.seed)
    except ValueError as e:
        raise CliError(str(e)) from None


def run(args: argparse.Namespace) -> int:
    from tbt import bench as B

    cfg = config_from_args(args)
    if args.json is not None:  # before measuring: never minutes of work, then a refusal
        check_output_file(args.json, overwrite=args.overwrite)
        os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    B.run(cfg, args.json)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "bench", help="time the t2a8/b1a8/t2a2/b1a1 kernels against torch, hot and cold",
        description="GEMV/GEMM y = x W^T + b at each shape and batch: tbt's packed kernels "
                    "(t2a8, b1a8, t2a2, b1a1) against torch fp32, bf16 and dynamic int8, with "
                    "weights cache-resident (hot) and streamed from memory (cold). Prints "
                    "median us, GOP/s and effective weight GB/s per op.")
    add_arguments(p)
    p.set_defaults(func=run)


def main(argv: Sequence[str] | None = None) -> int:
    """The command without the ``tbt`` dispatcher (benchmarks/bench_kernels.py)."""
    p = argparse.ArgumentParser(prog="bench_kernels.py",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    args = p.parse_args(argv)
    try:
        return run(args)
    except CliError as e:
        p.error(str(e))
    return 2
