"""``tbt bench`` (tbt.bench): a tiny real run of the CLI, its JSON records, its errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tbt import bench as B

N, K = 64, 256


def _expected_weight_bytes(op: str, n: int, k: int) -> int:
    """Bytes of one weight in its own format, written out independently of the benchmark."""
    kpad = -(-k // 256) * 256  # native kernel layout: K padded to 256
    per_row = {"t2a8": kpad // 4, "t2a2": kpad // 4, "b1a8": kpad // 8, "b1a1": kpad // 8,
               "torch_fp32": 4 * k, "torch_bf16": 2 * k, "torch_int8dyn": k}[op]
    return n * per_row + 4 * n  # + one float32 scale (tbt) / bias or scale (torch) per row


@pytest.mark.slow
def test_cli_tiny_run_writes_valid_json(tmp_path):
    pytest.importorskip("torch")
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "tbt", "bench", "--shapes", f"{N}x{K}",
                           "--batch", "1", "--repeat", "2", "--json", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    records = json.loads(out.read_text())
    assert {(r["op"], r["cache"]) for r in records} == {(o, c) for o in B.OPS for c in B.CACHES}
    assert len(records) == len(B.OPS) * len(B.CACHES)
    llc = B.llc_bytes()
    for r in records:
        assert (r["m"], r["n"], r["k"]) == (1, N, K)
        for field in ("us", "gops", "weight_gbps", "min_us", "cpu_us"):
            assert isinstance(r[field], (int, float)) and r[field] > 0, (r["op"], field)
        assert r["samples"] == 2 and r["min_us"] <= r["us"]
        assert r["weight_bytes"] == _expected_weight_bytes(r["op"], N, K)
        assert r["gops"] == pytest.approx(2 * N * K / r["us"] / 1e3, rel=1e-3)
        assert r["weight_gbps"] == pytest.approx(r["weight_bytes"] / r["us"] / 1e3, rel=1e-3)
        if r["cache"] == "hot":
            assert r["copies"] == 1 and not r["evict"]
        else:  # cold: the copies alone exceed twice the LLC, or the evictor streams it
            assert r["evict"] or r["copies"] * r["weight_bytes"] >= 2 * llc
            assert r["evict"] == (r["copies"] * r["weight_bytes"] < 2 * llc)
    for op in B.OPS:  # the table printed every row
        assert op in proc.stdout


@pytest.mark.slow
def test_cli_rejects_bad_input_with_a_fix():
    for args, msg in ((["--shapes", "4096"], "NxK"), (["--ops", "t2a9"], "choose from"),
                      (["--batch", "1,x"], "comma-separated integers"),
                      (["--cache", "warm"], "hot, cold")):
        proc = subprocess.run([sys.executable, "-m", "tbt", "bench", *args],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode != 0
        assert msg in proc.stderr, (args, proc.stderr)


def test_config_and_parsers():
    assert B.parse_shapes("4096x4096, 768X3072") == ((4096, 4096), (768, 3072))
    assert B.parse_ints("1,8,64") == (1, 8, 64)
    with pytest.raises(ValueError, match="positive"):
        B.BenchConfig(batches=(0,))
    with pytest.raises(ValueError, match="at least 1"):
        B.BenchConfig(repeat=0)


def test_table_speedup_is_fp32_time_over_op_time():
    rows = [{"op": op, "m": 1, "n": 8, "k": 16, "cache": "hot", "us": us, "gops": 1.0,
             "weight_gbps": 1.0} for op, us in (("t2a8", 2.0), ("torch_fp32", 50.0))]
    lines = B.format_table(rows).splitlines()
    assert "vs fp32" in lines[0] and len(lines) == 3
    assert lines[1].split()[-1] == "25.0x" and lines[2].split()[-1] == "1.0x"
    rows[0]["cpu_us"] = 1.5  # the CPU time column follows when the record has it
    assert B.format_table(rows).splitlines()[1].split()[-2:] == ["25.0x", "1.5"]


def test_tbt_ops_run_without_torch():
    code = ("import sys; sys.modules['torch'] = None\n"
            "from tbt import bench as B\n"
            "r = B.run(B.BenchConfig(shapes=((8, 300),), batches=(2,), ops=B.TBT_OPS,"
            " caches=('hot',), repeat=2), show=False)\n"
            "assert [x['op'] for x in r] == list(B.TBT_OPS) and all(x['us'] > 0 for x in r)\n"
            "print('ok')\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
