"""Kernel benchmark, the script form of ``tbt bench`` (same options; see tbt.bench).

    python benchmarks/bench_kernels.py                          # 5 shapes x batch 1, 8, 64
    python benchmarks/bench_kernels.py --quick                  # < 1 min smoke run
    python benchmarks/bench_kernels.py --shapes 4096x4096 --batch 1,64 --json out.json

Importable: ``tbt.bench.run(BenchConfig(...), json_path)`` returns the records.
"""

from __future__ import annotations

import sys

from tbt.cli.bench import main

if __name__ == "__main__":
    sys.exit(main())
