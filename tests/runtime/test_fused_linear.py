"""tbt_linear (one C call: float32 x -> activation quantizer -> kernel -> y) vs the reference.

The C quantizer must give the codes, scales and offsets of ``tbt.runtime.kernels.ref``'s
``quantize_a8/a2/a1`` bit for bit, including at the rounding ties (x·s on a half integer, x/α on
±0.5 and 1.5) and the clip edges; the whole call must equal ``kernel.run(w, quantize(x), b)``
on the same ISA bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest

from tbt.export.format import Packing
from tbt.export.pack import pack_binary, pack_ternary
from tbt.runtime.kernels import native, ref
from tbt.runtime.linear import ActSpec, PackedLinearNP, fused_act, quantize_activation

pytestmark = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason()
                                or "native kernels unavailable")

ISAS = [isa for isa in ("scalar", "avx2", "avx512") if native.isa_available(isa)]

SPECS = [
    ActSpec("minmax", 8, True, clip=2.5), ActSpec("minmax", 8, False, clip=2.5),
    ActSpec("minmax", 8, True, clip=0.75),
    ActSpec("elastic", 2, True, variant="paper", alpha=0.3),
    ActSpec("elastic", 2, True, variant="released", alpha=0.3),
    ActSpec("elastic", 2, False, variant="paper", alpha=0.25),
    ActSpec("elastic", 2, False, variant="released", alpha=0.3),
    ActSpec("elastic", 1, True, variant="paper", alpha=0.3),
    ActSpec("elastic", 1, True, variant="released", alpha=0.5),
    ActSpec("elastic", 1, False, variant="released", alpha=0.3),
    ActSpec("elastic", 2, True, variant="released", alpha=0.0),  # α_c = 1e-5 floor
]
SHAPES = [(1, 1), (1, 257), (3, 768), (9, 1000), (1, 3072)]


def _ids(s: ActSpec) -> str:
    return f"{s.kind}{s.bits}-{'s' if s.signed else 'u'}-{s.variant or s.clip}-{s.alpha}"


def _inputs(spec: ActSpec, m: int, k: int, rng) -> np.ndarray:
    """Random values plus exact ties of this quantizer and values beyond the clip."""
    x = (rng.standard_normal((m, k)) * 1.3).astype(np.float32)
    if not spec.signed:
        x = np.abs(x) - np.float32(0.1)  # GELU-like: mostly non-negative, a few below 0
    flat = x.reshape(-1)
    n = flat.size
    if spec.kind == "elastic" and spec.alpha:
        a = np.float32(spec.alpha)
        ties = np.array([0.5, -0.5, 1.5, -1.5, 1.0, 0.0, 2.5], np.float32) * a
        flat[rng.integers(0, n, size=min(n, 40))] = rng.choice(ties, size=min(n, 40))
    else:
        flat[rng.integers(0, n, size=min(n, 20))] = rng.choice(
            np.array([3.0, -3.0, 0.0, 2.5, -2.5], np.float32), size=min(n, 20))
        if n > 4 and spec.signed:  # max|x| = 2.54 -> s = 127/2.54 = 50: x = 0.01·j/2 are ties
            flat[0] = np.float32(2.54)
            flat[1:5] = np.array([0.01, 0.03, -0.05, 0.07], np.float32)
    return x


def _layer(spec: ActSpec, n: int, k: int, isa: str, seed: int):
    rng = np.random.default_rng(seed)
    ternary = {"a2": True, "a1": False}.get(spec.fmt, seed % 2 == 0)  # a8: t2a8 and b1a8
    q = rng.integers(-1, 2, size=(n, k)) if ternary else rng.choice([-1, 1], size=(n, k))
    q = q.astype(np.int8)
    packed = pack_ternary(q) if ternary else pack_binary(q)
    packing = Packing.TERNARY_2BIT if ternary else Packing.BINARY_1BIT
    scale = (rng.random(n) + 0.1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    return PackedLinearNP(packed, k, scale, bias, packing, spec, isa), packed, scale, bias, q


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("m,k", SHAPES)
def test_fused_quantizer_equals_reference(isa, spec, m, k):
    rng = np.random.default_rng(m * 7919 + k)
    lin, *_ = _layer(spec, 4, k, isa, seed=k)
    assert lin.fused is not None
    x = _inputs(spec, m, k, rng)
    shift = float(x.mean(dtype=np.float32)) if spec.needs_mean else None
    qa = quantize_activation(x, spec, shift)
    codes, scale, offset, zeros = lin.fused.quantize(x, shift)
    np.testing.assert_array_equal(codes, qa.codes)
    np.testing.assert_array_equal(scale, qa.scale)
    np.testing.assert_array_equal(offset, np.zeros(m, np.float32) if qa.offset is None
                                  else qa.offset)
    if spec.fmt == "a1" and spec.signed:
        xs = x - np.float32(shift) if spec.needs_mean else x
        assert zeros == int((xs == 0).sum())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("spec", SPECS, ids=_ids)
@pytest.mark.parametrize("m,k", [(1, 257), (5, 768), (1, 3072)])
def test_fused_linear_equals_kernel_on_reference_codes(isa, spec, m, k):
    rng = np.random.default_rng(k + m)
    lin, packed, scale, bias, q = _layer(spec, 13, k, isa, seed=m)
    x = _inputs(spec, m, k, rng)
    shift = float(x.mean(dtype=np.float32)) if spec.needs_mean else None
    y_fused, _ = lin.fused.run(x, shift)
    y_steps = lin.kernel.run(lin.weight, quantize_activation(x, spec, shift), lin.bias)
    np.testing.assert_array_equal(y_fused, y_steps)  # same codes, same float32 epilogue
    # and the layer (zero correction of signed binary included) against a float64 product
    y = lin(x)
    qa = quantize_activation(x, spec, shift)
    xq = qa.dequantize().astype(np.float64)
    if spec.fmt == "a1" and spec.signed:  # torch's sign(0) = 0: the layer undoes the +1
        xs = x - np.float32(shift) if spec.needs_mean else x
        xq[xs == 0] = 0.0
    dense = xq @ (scale[:, None] * q).astype(np.float64).T + bias
    np.testing.assert_allclose(y, dense, rtol=2e-5, atol=2e-5 * np.abs(dense).max())


def test_fused_act_mapping():
    assert fused_act(ActSpec("minmax", 8, True, clip=2.5)) == ("minmax-sym", 2.5, "none")
    assert fused_act(ActSpec("minmax", 8, False, clip=2.5))[0] == "minmax-asym"
    assert fused_act(ActSpec("elastic", 2, True, variant="paper", alpha=0.3)) == \
        ("ternary", float(np.float32(0.3)), "given")
    assert fused_act(ActSpec("elastic", 2, False, variant="released", alpha=0.3))[2] == "min"
    assert fused_act(ActSpec("elastic", 1, True, variant="released", alpha=0.0)) == \
        ("binary", float(ref.ALPHA_EPS), "none")


def test_fused_errors():
    spec = ActSpec("elastic", 2, True, variant="paper", alpha=0.3)
    lin, *_ = _layer(spec, 4, 64, ISAS[0], seed=0)
    with pytest.raises(ValueError, match="shift"):
        lin.fused.run(np.ones((1, 64), np.float32))  # the paper's mean must be given
    with pytest.raises(ValueError, match="x must be"):
        lin.fused.run(np.ones((1, 65), np.float32), 0.0)
    with pytest.raises(ValueError, match="do not feed"):
        native.FusedLinear(lin.kernel, lin.weight, None, "minmax-sym", 2.5)
    x, y, work = np.ones((1, 64), np.float32), np.empty((1, 4), np.float32), np.empty(8, np.uint8)
    rc = lin.fused._lib.tbt_linear(lin.fused._plan_p, native._ptr(x), 1, 0.0, native._ptr(work),
                                   work.nbytes, native._ptr(y), None)
    assert rc == -1  # a workspace too small is refused, not overrun


def test_fused_linear_is_thread_safe():
    """ctypes releases the GIL: two Python threads may run one layer at once. Each has its own
    workspace and zero counter, so results equal the serial ones."""
    from concurrent.futures import ThreadPoolExecutor

    spec = ActSpec("elastic", 1, True, variant="released", alpha=0.5)
    lin, *_ = _layer(spec, 64, 512, ISAS[-1], seed=1)
    rng = np.random.default_rng(5)
    xs = [np.round(rng.standard_normal((3, 512)), 1).astype(np.float32) for _ in range(16)]
    want = [lin(x) for x in xs]  # rounded inputs: exact zeros, so the correction path runs
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(lin, xs * 4))
    for i, y in enumerate(got):
        np.testing.assert_array_equal(y, want[i % len(xs)])


@pytest.mark.skipif("avx512" not in ISAS, reason="the lanes GEMMs are AVX-512")
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[3], SPECS[9]], ids=_ids)
def test_fused_gemm_runs_on_the_lanes_layout(monkeypatch, spec):
    """From LANES_MIN_M rows, tbt_linear runs the kernel's lanes layout (as kernel.run does);
    below it, and with lanes off, the row tiles: all bit-identical."""
    rng = np.random.default_rng(9)
    x = _inputs(spec, 9, 768, rng)
    shift = float(x.mean(dtype=np.float32)) if spec.needs_mean else None
    lin, *_ = _layer(spec, 40, 768, "avx512", seed=4)
    y_lanes, _ = lin.fused.run(x, shift)
    assert lin.fused._plan.w_lanes  # attached on the first GEMM
    monkeypatch.setattr(native, "LANES_MIN_M", 10**9)
    rows, *_ = _layer(spec, 40, 768, "avx512", seed=4)
    y_rows, _ = rows.fused.run(x, shift)
    assert not rows.fused._plan.w_lanes
    np.testing.assert_array_equal(y_lanes, y_rows)
    np.testing.assert_array_equal(y_lanes, lin.kernel.run(
        lin.weight, quantize_activation(x, spec, shift), lin.bias))


@pytest.mark.skipif("avx512" not in ISAS, reason="the lanes GEMMs are AVX-512")
@pytest.mark.parametrize("spec", [SPECS[0], SPECS[1], SPECS[3], SPECS[9]], ids=_ids)
@pytest.mark.parametrize("k", [576, 768, 100])
def test_fused_gemv_one_row(monkeypatch, spec, k):
    """Decoding (M = 1): the 8-bit-activation kernels run on the lanes layout (their one-row
    lanes kernel, one accumulator per bit plane), the others on the row tiles; either way the
    output equals the row tiles' and the reference's bit for bit."""
    rng = np.random.default_rng(11)
    x = _inputs(spec, 1, k, rng)
    shift = float(x.mean(dtype=np.float32)) if spec.needs_mean else None
    lin, *_ = _layer(spec, 70, k, "avx512", seed=5)
    y, _ = lin.fused.run(x, shift)
    assert bool(lin.fused._plan.w_lanes) == (native.lanes_min_m(lin.kernel.name) == 1)
    monkeypatch.setattr(native, "LANES_MIN_M", 10**9)
    rows, *_ = _layer(spec, 70, k, "avx512", seed=5)
    y_rows, _ = rows.fused.run(x, shift)
    assert not rows.fused._plan.w_lanes
    np.testing.assert_array_equal(y, y_rows)
    np.testing.assert_array_equal(y, lin.kernel.run(
        lin.weight, quantize_activation(x, spec, shift), lin.bias))
