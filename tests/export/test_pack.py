"""The packed format: normative pack/unpack round trips, worked bytes, sizes, header checks."""

from __future__ import annotations

import numpy as np
import pytest

from tbt.export.format import (FORMAT_VERSION, MAGIC, METADATA_PREFIX, FormatError, FormatHeader,
                               Packing)
from tbt.export.pack import (pack, pack_base3, pack_binary, pack_ternary, unpack, unpack_base3,
                             unpack_binary, unpack_ternary)

# K around every block size: 4 (ternary), 5 (base-3), 8 (binary), 32/64 (SIMD words), 256
KS = (1, 2, 3, 4, 5, 6, 7, 8, 9, 13, 31, 32, 33, 63, 64, 65, 100, 255, 256, 257, 1000)
TERNARY = (Packing.TERNARY_2BIT, Packing.TERNARY_BASE3)


def _codes(packing: Packing, n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if packing.is_ternary:
        return rng.integers(-1, 2, size=(n, k)).astype(np.int8)
    return rng.choice(np.array([-1, 1], dtype=np.int8), size=(n, k))


@pytest.mark.parametrize("packing", list(Packing))
@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("n", [1, 3])
def test_round_trip(packing, k, n):
    q = _codes(packing, n, k, seed=k * 7 + n)
    packed = pack(q, packing)
    assert packed.dtype == np.uint8
    assert packed.shape == (n, packing.row_bytes(k)) == (n, -(-k // packing.codes_per_byte))
    assert packed.nbytes == packing.nbytes(n, k)
    np.testing.assert_array_equal(unpack(packed, packing, k), q)


@pytest.mark.parametrize("packing", list(Packing))
def test_one_row_and_one_column(packing):
    q = _codes(packing, 1, 11)[0]  # 1-D: one row
    packed = pack(q, packing)
    assert packed.ndim == 1
    np.testing.assert_array_equal(unpack(packed, packing, 11), q)
    col = _codes(packing, 6, 1)  # one column: every row is one padded byte
    np.testing.assert_array_equal(unpack(pack(col, packing), packing, 1), col)


def test_worked_bytes():
    """The examples of docs/format.md, byte for byte."""
    assert pack_ternary(np.array([-1, 0, 1, 1])).tolist() == [0xA4]
    assert pack_binary(np.array([1, -1, -1, 1, 1, 1, -1, 1])).tolist() == [0xB9]
    assert pack_base3(np.array([-1, 0, 1, 1, -1])).tolist() == [0x4B]
    # padding: ternary and base-3 pad with the code of 0 (1), binary with 0 bits
    assert pack_ternary(np.array([1, 1, 1, 1, -1])).tolist() == [0xAA, 0x54]
    assert pack_binary(np.array([1] * 9)).tolist() == [0xFF, 0x01]
    assert pack_base3(np.array([1, 1, 1, 1, 1, -1])).tolist() == [242, 0 + 1 * 3 + 9 + 27 + 81]


def test_bits_per_weight():
    assert [p.bits_per_weight for p in Packing] == [2.0, 1.6, 1.0]
    # a 768 x 768 BART projection: 147456 / 122880 (1.6 bpw, padded to 5) / 73728 bytes
    assert Packing.TERNARY_2BIT.nbytes(768, 768) == 768 * 192
    assert Packing.TERNARY_BASE3.nbytes(768, 768) == 768 * 154
    assert Packing.BINARY_1BIT.nbytes(768, 768) == 768 * 96


def test_binary_zero_maps_to_plus_one():
    q = np.array([[0, -1, 1, 0]])
    np.testing.assert_array_equal(unpack_binary(pack_binary(q), 4), [[1, -1, 1, 1]])
    with pytest.raises(ValueError, match="binary codes must be in"):
        pack_binary(q, zero="error")


@pytest.mark.parametrize("fn", [pack_ternary, pack_base3, pack_binary])
def test_rejects_bad_codes(fn):
    with pytest.raises(ValueError, match="codes must be in"):
        fn(np.array([[0, 2, 1]]))
    with pytest.raises(ValueError, match="integers"):
        fn(np.array([[0.0, 1.0]]))
    with pytest.raises(ValueError, match="expected"):
        fn(np.zeros((2, 0), dtype=np.int8))


def test_unpack_detects_corruption_and_bad_shapes():
    with pytest.raises(FormatError, match="code 3"):
        unpack_ternary(np.array([[0xFF]], dtype=np.uint8), 4)
    with pytest.raises(FormatError, match="above 242"):
        unpack_base3(np.array([[243]], dtype=np.uint8), 5)
    with pytest.raises(FormatError, match="needs"):
        unpack_ternary(np.zeros((2, 3), dtype=np.uint8), 4)  # K=4 needs 1 byte per row
    with pytest.raises(FormatError, match="uint8"):
        unpack_binary(np.zeros((2, 1), dtype=np.int16), 8)
    # a padding slot's content is ignored (readers only read K codes)
    assert unpack_ternary(np.array([[0b11_01_10_00]], dtype=np.uint8), 3).tolist() == [[-1, 1, 0]]


# ---- header ------------------------------------------------------------------------------------

def test_header_round_trip():
    h = FormatHeader()
    md = h.to_metadata()
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in md.items())
    assert md[METADATA_PREFIX + "magic"] == MAGIC
    assert md[METADATA_PREFIX + "format_version"] == str(FORMAT_VERSION)
    assert md[METADATA_PREFIX + "ternary_code_map"] == "-1:0,0:1,1:2"
    assert FormatHeader.from_metadata({**md, "other": "kept"}) == h
    h16 = FormatHeader(scale_dtype="float16")
    assert FormatHeader.from_metadata(h16.to_metadata()) == h16


@pytest.mark.parametrize("change,match", [
    ({"magic": "GGUF"}, "magic"),
    ({"format_version": str(FORMAT_VERSION + 1)}, "newer tbt"),
    ({"format_version": "one"}, "not an integer"),
    ({"format_version": "0"}, "invalid"),
    ({"bit_order": "msb_first"}, "bit_order"),
    ({"ternary_code_map": "-1:1,0:0,1:2"}, "ternary_code_map"),
    ({"scale_dtype": "int8"}, "scale_dtype"),
])
def test_header_rejects(change, match):
    md = FormatHeader().to_metadata()
    md.update({METADATA_PREFIX + k: v for k, v in change.items()})
    with pytest.raises(FormatError, match=match):
        FormatHeader.from_metadata(md)


def test_header_rejects_missing_and_empty():
    md = FormatHeader().to_metadata()
    del md[METADATA_PREFIX + "axis"]
    with pytest.raises(FormatError, match="lacks tbt.format.axis"):
        FormatHeader.from_metadata(md)
    with pytest.raises(FormatError, match="not a tbt packed file"):
        FormatHeader.from_metadata({})
    with pytest.raises(FormatError, match="not a tbt packed file"):
        FormatHeader.from_metadata(None)


def test_header_random_corruption_never_crashes():
    """Property: any single corrupted header value parses to the same header or raises
    FormatError (never another exception, never a silently different header)."""
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    good = FormatHeader().to_metadata()
    keys = sorted(good)

    @hypothesis.settings(max_examples=200, deadline=None)
    @hypothesis.given(st.sampled_from(keys), st.binary(max_size=24), st.integers(0, 40))
    def check(key, junk, pos):
        md = dict(good)
        raw = bytearray(md[key].encode())
        raw[min(pos, len(raw)):min(pos, len(raw)) + 1] = junk
        md[key] = raw.decode("utf-8", errors="replace")
        try:
            h = FormatHeader.from_metadata(md)
        except FormatError:
            return
        assert h.to_metadata() == md  # accepted only if it still says exactly the same

    check()
