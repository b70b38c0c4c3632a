"""Every kernel on every backend this machine runs, held to the numpy reference.

Integer accumulators must be equal; float outputs within 1e-6 relative (they are in fact the
same float32 operations in the same order). The reference itself is checked against a dense
float64 computation and, where torch is installed, its activation quantizers against
tbt.quant.activation.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from tbt.export.format import Packing
from tbt.export.pack import pack_base3, pack_binary, pack_ternary
from tbt.runtime import kernels as K
from tbt.runtime.kernels import native, ref

NATIVE = [b for b in K.available_backends() if b != "ref"]
needs_native = pytest.mark.skipif(not native.available(), reason=native.unavailable_reason()
                                  or "native kernels unavailable")

# (M, N, K): GEMV and GEMM, tile remainders in M and N (tiles are 4 x 4), odd K, K around
# the 256-weight block and the 64-byte popcount word, one large K for accumulator range; t2a8
# and b1a8 pad K to 64: short blocks of 64 (K = 576, SmolLM2), 128 (640) and 192 (700, 150)
SHAPES = [(1, 1, 1), (1, 7, 3), (1, 4, 255), (1, 9, 256), (1, 5, 257), (1, 13, 777),
          (2, 6, 64), (3, 4, 513), (5, 9, 1000), (8, 12, 300), (9, 5, 768), (16, 8, 1024),
          (1, 4, 4096), (8, 16, 11008), (1, 12, 576), (1, 8, 640), (1, 16, 700), (1, 8, 150),
          (5, 12, 576), (4, 9, 700)]
KERNELS = list(K.KERNELS)


def _weights(wf: str, n: int, k: int, rng) -> np.ndarray:
    if wf == "t2":
        return rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, k))


def _acts(af: str, x: np.ndarray, variant: int):
    """A few quantizer settings per activation format (symmetric, asymmetric/offset, ...)."""
    if af == "a8":
        return [ref.quantize_a8(x), ref.quantize_a8(x, signed=False),
                ref.quantize_a8(x, signed=False, per_row=True)][variant % 3]
    if af == "a2":
        return [ref.quantize_a2(x, 0.6), ref.quantize_a2(x, 0.5, signed=False,
                                                         variant="released"),
                ref.quantize_a2(np.abs(x), 0.7, signed=False)][variant % 3]
    return [ref.quantize_a1(x, 0.8), ref.quantize_a1(np.abs(x), 0.4, signed=False),
            ref.quantize_a1(x, 0.3, variant="released")][variant % 3]


def _case(name: str, m: int, n: int, k: int, seed: int):
    wf, af = ref.KERNEL_ACT[name]
    rng = np.random.default_rng(seed)
    q = _weights(wf, n, k, rng)
    packed = pack_ternary(q) if wf == "t2" else pack_binary(q)
    alpha = (rng.random(n) + 0.1).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)
    x = rng.standard_normal((m, k)).astype(np.float32) * 1.5
    return wf, af, q, packed, alpha, bias, _acts(af, x, seed)


def _assert_close(y: np.ndarray, y_ref: np.ndarray) -> None:
    scale = max(float(np.abs(y_ref).max()), 1e-30)
    assert float(np.abs(y - y_ref).max()) <= 1e-6 * scale


# ---- the reference -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("variant", [0, 1, 2])
def test_reference_matches_dense(name, variant):
    wf, af, q, packed, alpha, bias, act = _case(name, 5, 11, 300, seed=variant)
    kern = K.get_kernel(wf, af, "ref")
    w = kern.prepare_weight(packed, 300, alpha)
    acc = kern.accumulate(w, act)
    np.testing.assert_array_equal(acc, act.codes.astype(np.int64) @ q.astype(np.int64).T)
    y = kern(w, act, bias)
    dense = act.dequantize().astype(np.float64) @ (alpha[:, None] * q).T + bias
    np.testing.assert_allclose(y, dense, rtol=1e-5, atol=1e-5 * np.abs(dense).max())
    np.testing.assert_array_equal(  # the named functions are the same computation
        y, getattr(ref, f"gemm_{wf}_{af}")(packed, alpha, 300, act, bias))


def test_base3_weights_feed_ternary_kernels():
    _, af, q, _, alpha, _, act = _case("t2a8", 2, 6, 23, seed=1)
    kern = K.get_kernel("t2", "a8", "ref")
    a = kern(kern.prepare_weight(pack_base3(q), 23, alpha, packing=Packing.TERNARY_BASE3), act)
    b = kern(kern.prepare_weight(pack_ternary(q), 23, alpha), act)
    np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="cannot feed"):
        kern.prepare_weight(pack_binary(np.ones((2, 8), np.int8)), 8, alpha[:2],
                            packing=Packing.BINARY_1BIT)


# ---- every native backend against the reference -----------------------------------------------

@needs_native
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_native_matches_reference(backend, name, shape):
    m, n, k = shape
    seed = m * 1009 + n * 31 + k
    wf, af, _, packed, alpha, bias, act = _case(name, m, n, k, seed)
    r = K.get_kernel(wf, af, "ref")
    wr = r.prepare_weight(packed, k, alpha)
    kern = K.get_kernel(wf, af, backend)
    w = kern.prepare_weight(packed, k, alpha)
    np.testing.assert_array_equal(kern.accumulate(w, act), r.accumulate(wr, act))
    _assert_close(kern(w, act, bias), r(wr, act, bias))
    _assert_close(kern(w, act), r(wr, act))


@needs_native
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("name", KERNELS)
def test_native_extreme_values(backend, name):
    """Codes at their limits everywhere: no saturation or overflow in any path."""
    wf, af = ref.KERNEL_ACT[name]
    m, n, k = 5, 6, 11008
    hi = {"a8": 127, "a2": 1, "a1": 1}[af]
    lo = {"a8": -128, "a2": -1, "a1": -1}[af]
    for wval in (1, -1):
        for aval in (hi, lo):
            q = np.full((n, k), wval, dtype=np.int8)
            packed = pack_ternary(q) if wf == "t2" else pack_binary(q)
            act = ref.QuantizedActivation(af, np.full((m, k), aval, dtype=np.int8),
                                          np.ones(m, np.float32))
            kern = K.get_kernel(wf, af, backend)
            acc = kern.accumulate(kern.prepare_weight(packed, k, np.ones(n, np.float32)), act)
            assert (acc == wval * aval * k).all()


@needs_native
@pytest.mark.parametrize("name", KERNELS)
@pytest.mark.parametrize("m", [1, 9])
def test_threads_and_parallel_split_agree(name, m):
    wf, af, _, packed, alpha, bias, act = _case(name, m, 37, 700, seed=3)
    kern = K.get_kernel(wf, af, "native")
    w = kern.prepare_weight(packed, 700, alpha)
    before = native.get_num_threads()
    try:
        native.set_parallel_threshold(0)  # split even this small call
        outs = []
        for t in (1, 2, 3):
            native.set_num_threads(t)
            for chunks in (0, 1, 3, 8):  # chunks per thread (0: by size)
                native.set_pool_chunks(chunks)
                for _ in range(5):  # repeated calls reuse the pool
                    outs.append(kern(w, act, bias))
        for y in outs[1:]:
            np.testing.assert_array_equal(y, outs[0])
        r = K.get_kernel(wf, af, "ref")
        np.testing.assert_array_equal(outs[0], r(r.prepare_weight(packed, 700, alpha), act, bias))
    finally:
        native.set_parallel_threshold(1 << 18)
        native.set_pool_chunks(0)
        native.set_num_threads(before)


@needs_native
@pytest.mark.parametrize("backend", NATIVE)
@pytest.mark.parametrize("name", KERNELS)
def test_gemm_weight_groups_swept_by_activation_blocks(backend, name):
    """One thread over many weight tiles: the GEMM driver walks groups of weight tiles (about
    128 KiB, 11 tiles at K = 11008) and sweeps every 4-row activation block over each group;
    three groups, the last one partial, and a partial activation block must all land right."""
    m, n, k = 9, 130, 11008
    wf, af, _, packed, alpha, bias, act = _case(name, m, n, k, seed=11)
    r = K.get_kernel(wf, af, "ref")
    kern = K.get_kernel(wf, af, backend)
    before = native.get_num_threads()
    try:
        native.set_num_threads(1)
        acc = kern.accumulate(kern.prepare_weight(packed, k, alpha), act)
    finally:
        native.set_num_threads(before)
    np.testing.assert_array_equal(acc, r.accumulate(r.prepare_weight(packed, k, alpha), act))


@needs_native
def test_native_layouts_follow_the_header_spec():
    """The load-time re-tiling, decoded with the rule written in csrc/tbt_kernels.h."""
    rng = np.random.default_rng(0)
    q = rng.integers(-1, 2, size=(3, 300)).astype(np.int8)
    inter = native.repack_t2_interleaved(q, 512)  # K padded to 2 full blocks of 256
    assert inter.shape == (3, 512 // 4)
    b = inter.reshape(3, 2, 64)  # 2 blocks of 64 bytes
    codes = np.stack([(b >> (2 * s)) & 3 for s in range(4)], axis=2).reshape(3, 512)
    np.testing.assert_array_equal(codes[:, :300].astype(np.int8) - 1, q)
    assert (codes[:, 300:] == 1).all()  # padding = code of zero
    # the t2a8 default: K padded to 320 = one full block + one short block of 16 bytes, whose
    # byte i holds weights 256 + 16s + i at bits 2s
    inter = native.repack_t2_interleaved(q)
    assert inter.shape == (3, 320 // 4)
    np.testing.assert_array_equal(inter[:, :64], native.repack_t2_interleaved(q, 512)[:, :64])
    short = inter[:, 64:]
    codes = np.stack([(short >> (2 * s)) & 3 for s in range(4)], axis=1).reshape(3, 64)
    np.testing.assert_array_equal(codes[:, :300 - 256].astype(np.int8) - 1, q[:, 256:])
    assert (codes[:, 300 - 256:] == 1).all()
    assert short[0, 5] == sum(int(q[0, 256 + 16 * s + 5]) + 1 << 2 * s for s in range(3)) | 1 << 6
    c = native.t2_codes_from_interleaved(inter)
    np.testing.assert_array_equal(c[:, :300].astype(np.int8) - 1, q)
    assert native.padded_k(300, "t2a8") == native.padded_k(300, "b1a8") == 320
    assert native.padded_k(300, "t2a2") == native.padded_k(300, "b1a1") == 512
    planes = native.repack_t2_planes(q)
    nz = np.unpackbits(planes[:, :64], axis=1, bitorder="little")
    neg = np.unpackbits(planes[:, 64:], axis=1, bitorder="little")
    np.testing.assert_array_equal(nz[:, :300].astype(int) * (1 - 2 * neg[:, :300].astype(int)), q)
    assert not nz[:, 300:].any() and not neg[:, 300:].any()


@needs_native
def test_native_errors_are_clear():
    wf, af, _, packed, alpha, _, act = _case("b1a8", 2, 5, 40, seed=0)
    kern = K.get_kernel(wf, af, "native")
    w = kern.prepare_weight(packed, 40, alpha)
    with pytest.raises(ValueError, match="takes a8"):
        kern(w, ref.quantize_a1(np.ones((2, 40)), 1.0))
    with pytest.raises(ValueError, match="prepare it with this kernel"):
        kern(K.get_kernel(wf, af, "ref").prepare_weight(packed, 40, alpha), act)
    with pytest.raises(ValueError, match="in_features mismatch"):
        kern(w, ref.quantize_a8(np.ones((2, 41))))
    with pytest.raises(ValueError, match="bias must be"):
        kern(w, act, np.ones(3, np.float32))
    with pytest.raises(ValueError, match="scale has"):
        kern.prepare_weight(packed, 40, alpha[:2])


def test_registry_and_backend_selection(monkeypatch):
    assert set(K.registered()) == {("t2", "a8"), ("b1", "a8"), ("t2", "a2"), ("b1", "a1")}
    with pytest.raises(KeyError, match="no kernel"):
        K.get_kernel("t2", "a1")
    with pytest.raises(ValueError, match="backend"):
        K.get_kernel("t2", "a8", "cuda")
    monkeypatch.setenv(K.ENV_BACKEND, "ref")
    assert K.get_kernel("t2", "a8").backend == "ref"
    monkeypatch.setenv(K.ENV_BACKEND, "auto")
    assert K.get_kernel("b1", "a1").backend == ("native" if native.available() else "ref")
    for isa in ("scalar", "avx2", "avx512"):
        if isa not in K.available_backends():
            with pytest.raises(RuntimeError):
                K.get_kernel("t2", "a8", isa)


# ---- activation quantizers ----------------------------------------------------------------------

def test_activation_quantizers_codes_and_values():
    x = np.array([[-3.0, -0.26, 0.0, 0.25, 0.75, 2.6]], dtype=np.float32)
    qa = ref.quantize_a8(x)  # clip 2.5: max|x_c| = 2.5 -> s = 50.8
    assert qa.codes.tolist() == [[-127, -13, 0, 13, 38, 127]]  # rint(12.7)=13, rint(38.1)=38
    assert ref.quantize_a2(x, 0.5, variant="released").codes.tolist() == [[-1, -1, 0, 0, 1, 1]]
    # ties to even: 0.25/0.5 = 0.5 -> 0, 0.75/0.5 = 1.5 -> 2 (clipped to 1 when signed)
    un = ref.quantize_a2(np.abs(x), 0.5, signed=False)
    assert (un.codes + 1).tolist() == [[2, 1, 0, 0, 2, 2]]
    np.testing.assert_array_equal(un.dequantize(), [[1.0, 0.5, 0.0, 0.0, 1.0, 1.0]])
    b = ref.quantize_a1(x, 0.5, variant="released")
    assert b.codes.tolist() == [[-1, -1, 1, 1, 1, 1]]  # sign(0) -> +1 (1 bit has no zero)
    ub = ref.quantize_a1(np.abs(x), 0.5, signed=False)
    np.testing.assert_array_equal(ub.dequantize(), [[0.5, 0.5, 0.0, 0.0, 0.5, 0.5]])


@pytest.mark.parametrize("bits", [1, 2])
@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("variant", ["paper", "released"])
def test_elastic_quantizers_match_torch(bits, signed, variant):
    torch = pytest.importorskip("torch")
    from tbt.quant.activation import elastic_quantize

    g = torch.Generator().manual_seed(bits * 10 + signed)
    x = torch.randn(6, 77, generator=g) * 1.3
    if not signed:
        x = torch.nn.functional.gelu(x)
    alpha = torch.tensor(0.41)
    want = elastic_quantize(x, alpha, bits, signed, variant).numpy()
    fn = ref.quantize_a2 if bits == 2 else ref.quantize_a1
    np.testing.assert_array_equal(fn(x.numpy(), 0.41, signed, variant).dequantize(), want)


@pytest.mark.parametrize("signed", [True, False])
def test_minmax_quantizer_matches_torch(signed):
    torch = pytest.importorskip("torch")
    from tbt.quant.activation import minmax_quantize

    x = torch.randn(5, 300, generator=torch.Generator().manual_seed(0)) * 1.4
    want = minmax_quantize(x, 8, signed, 2.5).numpy()
    got = ref.quantize_a8(x.numpy(), 2.5, signed).dequantize()
    # same codes; the value d·a + b differs from torch's a/s (or u/255·r + β) by float rounding
    np.testing.assert_allclose(got, want, rtol=0, atol=4 * np.spacing(np.float32(2.5)))


@pytest.mark.parametrize("signed", [True, False])
def test_minmax_codes_match_torch_over_many_scales(signed):
    # torch computes 127 / max|x| as 127 * (1 / max|x|); a scale one ulp off moves codes at
    # near-ties, so compare the integer codes over many maxima
    torch = pytest.importorskip("torch")
    from tbt.quant.activation import minmax_quantize

    for seed in range(100):
        x = torch.randn(2, 64, generator=torch.Generator().manual_seed(seed)) * (0.1 + seed / 40)
        want = minmax_quantize(x, 8, signed, 2.5).numpy()
        qa = ref.quantize_a8(x.numpy(), 2.5, signed)
        if signed:  # the scale is 1/s with torch's s = 127 * (1/max|x_c|), bit for bit
            xc = np.clip(x.numpy(), np.float32(-2.5), np.float32(2.5))
            s = np.float32(127) * (np.float32(1) / np.abs(xc).max())
            assert (qa.scale == np.float32(1) / s).all(), seed
            np.testing.assert_array_equal(qa.codes, np.rint(xc * s).astype(np.int8))
        np.testing.assert_allclose(qa.dequantize(), want, rtol=0,
                                   atol=4 * np.spacing(np.float32(2.5)))


# ---- the lanes GEMMs (output rows in the vector lanes, AVX-512) and the row tiles ---------------

LANES_SHAPES = [(1, 1, 1), (1, 33, 576), (1, 70, 1000), (2, 1, 1), (2, 5, 3), (3, 17, 255),
                (8, 31, 256), (9, 33, 777), (13, 64, 1000), (2, 36, 576), (9, 33, 700),
                (64, 96, 768), (5, 40, 4096)]


@pytest.mark.skipif(not native.available() or not native.isa_available("avx512"),
                    reason="needs the native kernels and AVX-512")
@pytest.mark.parametrize("name", ["t2a8", "b1a8", "t2a2", "b1a1"])
@pytest.mark.parametrize("m,n,k", LANES_SHAPES)
@pytest.mark.parametrize("path", ["lanes", "rows"])
def test_lanes_and_row_tile_gemms_match_reference(monkeypatch, name, m, n, k, path):
    """Both AVX-512 GEMM paths (the lanes layout, one activation row included, and the 4x4
    row tiles) give the reference's exact accumulators and its float32 epilogue bit for bit."""
    monkeypatch.setattr(native, "LANES_MIN_M", 1 if path == "lanes" else 10**9)
    seed = m * 1000 + n * 10 + k
    wf, af, q, packed, alpha, bias, act = _case(name, m, n, k, seed)
    kern = K.get_kernel(wf, af, "avx512")
    w = kern.prepare_weight(packed, k, alpha)
    acc = kern.accumulate(w, act)
    assert (w.extra.get("lanes") is not None) == (path == "lanes")
    np.testing.assert_array_equal(acc, act.codes.astype(np.int64) @ q.astype(np.int64).T)
    r = K.get_kernel(wf, af, "ref")
    y_ref = r(r.prepare_weight(packed, k, alpha), act, bias)
    np.testing.assert_array_equal(kern(w, act, bias), y_ref)


def test_lanes_layouts_hand_example():
    """Byte positions of the lanes layouts on a hand-built matrix (docs in gemm_lanes_avx512.c)."""
    q = np.zeros((3, 256), dtype=np.int8)
    q[0, 0], q[0, 5], q[2, 19], q[1, 255] = 1, -1, 1, -1  # row 2: kb 1, s 0, i 3
    c = native.t2_codes_from_interleaved(native.repack_t2_interleaved(q))
    np.testing.assert_array_equal(c, q + 1)
    lanes = native.repack_t2_lanes(c)
    assert lanes.shape == (2, 4 * 256)  # N padded to 32 rows = 2 groups of 16
    block = lanes[0, :64]  # group 0, kb 0: row j at bytes 4j..4j+3
    assert block[0] == 2 | 1 << 2 | 1 << 4 | 1 << 6  # row 0, k=0 (s 0, i 0): c=2; others 1
    assert block[1] == 1 | 0 << 2 | 1 << 4 | 1 << 6  # row 0, k=5 = 4*1 + 1: s 1, i 1: c=0
    assert lanes[0, 64 + 4 * 2 + 3] == 2 | 1 << 2 | 1 << 4 | 1 << 6  # row 2, k=19: kb 1, i 3
    assert lanes[0, 15 * 64 + 4 * 1 + 3] == 1 | 1 << 2 | 1 << 4 | 0 << 6  # row 1, k=255: s 3
    bits = native.repack_b1(np.where(q > 0, 1, -1).astype(np.int8))
    bl = native.repack_b1_lanes(bits)
    assert bl.shape == (4, 256)  # 32 rows = 4 groups of 8, Kpad/8 bytes each
    assert bl[0, 0] == 1 and bl[0, 2 * 8 + 2] == 1 << 3  # row 0 bit 0; row 2, k=19: byte 2, bit 3


def test_native_libraries_are_built():
    """Both C extensions are optional in setup.py (a machine without a compiler still
    installs), so a compile error would otherwise pass unnoticed with every native test
    skipped. Where a C compiler exists, the build must have produced and loaded them."""
    import platform
    import shutil

    from tbt.quant import fused

    if os.environ.get("TBT_ALLOW_NO_NATIVE") == "1" or not (shutil.which("cc")
                                                             or shutil.which("gcc")):
        pytest.skip("no C compiler here (or TBT_ALLOW_NO_NATIVE=1)")
    assert native.available(), native.unavailable_reason()
    assert fused.available(), "tbt/quant/_tbt_qops was not built"
    if platform.machine() in ("x86_64", "AMD64"):
        assert native.isa_available("avx2") or not native.cpu_features()["avx2"]
