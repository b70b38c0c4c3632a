"""Normative numpy packing and unpacking of ternary and binary weight codes.

These functions *are* the format (``docs/format.md``, :mod:`tbt.export.format`); every other
reader or writer (the C runtime's load-time repack included) is tested bit-exact against them.
All of them take or return integer codes of shape ``(N, K)`` (a 1-D array is one row), with the
packing axis last (``in_features``), and packed ``uint8`` arrays of shape ``(N, row_bytes)``.

Worked bytes (first weight = least significant):

* ternary_2bit: ``q = [−1, 0, 1, 1]`` → codes ``[0, 1, 2, 2]`` →
  ``0 | 1<<2 | 2<<4 | 2<<6 = 0xA4``;
* binary_1bit: ``q = [1, −1, −1, 1, 1, 1, −1, 1]`` → bits ``1,0,0,1,1,1,0,1`` (bit 0 first) →
  ``0b10111001 = 0xB9``;
* ternary_base3: ``q = [−1, 0, 1, 1, −1]`` → codes ``[0, 1, 2, 2, 0]`` →
  ``0 + 1·3 + 2·9 + 2·27 + 0·81 = 75 = 0x4B``.
"""

from __future__ import annotations

import numpy as np

from tbt.export.format import BINARY_PAD_BIT, TERNARY_PAD_CODE, FormatError, Packing

__all__ = ["pack_ternary", "unpack_ternary", "pack_binary", "unpack_binary", "pack_base3",
           "unpack_base3", "pack", "unpack", "pack_uint", "unpack_uint"]

_SHIFTS_2BIT = np.array([0, 2, 4, 6], dtype=np.uint8)
_POW3 = np.array([1, 3, 9, 27, 81], dtype=np.uint8)
# trit table: _TRITS[b, i] = i-th base-3 digit of byte b, for the 243 valid bytes
_TRITS = (np.arange(243)[:, None] // np.array([1, 3, 9, 27, 81])[None, :] % 3).astype(np.uint8)


def _as_rows(q: np.ndarray) -> tuple[np.ndarray, bool]:
    q = np.asarray(q)
    if q.ndim not in (1, 2) or q.shape[-1] == 0 or q.size == 0:
        raise ValueError(f"codes of shape {q.shape}: expected (N, K) or (K,) with N, K >= 1")
    if not np.issubdtype(q.dtype, np.integer):
        raise ValueError(f"codes must be integers, got dtype {q.dtype} (quantize first)")
    return (q[None, :], True) if q.ndim == 1 else (q, False)


def _check_values(q: np.ndarray, allowed: tuple[int, ...], what: str) -> None:
    bad = ~np.isin(q, allowed)
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{what} codes must be in {allowed}; found {int(q[idx])} at {idx}")


def _ternary_codes(q: np.ndarray, packing: Packing) -> tuple[np.ndarray, bool, int]:
    """``(codes, one row?, K)``: ``q + 1`` as uint8 ``(N, padded K)``, padded with code 1."""
    q, one = _as_rows(q)
    _check_values(q, (-1, 0, 1), "ternary")
    n, k = q.shape
    codes = np.full((n, packing.padded_k(k)), TERNARY_PAD_CODE, dtype=np.uint8)
    codes[:, :k] = q + 1
    return codes, one, k


def _packed_rows(packed: np.ndarray, k: int, packing: Packing) -> tuple[np.ndarray, bool]:
    packed = np.asarray(packed)
    if packed.dtype != np.uint8:
        raise FormatError(f"packed {packing.value} data must be uint8, got {packed.dtype}")
    if not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k (in_features) must be a positive int, got {k!r}")
    one = packed.ndim == 1
    rows = packed[None, :] if one else packed
    if rows.ndim != 2 or rows.shape[1] != packing.row_bytes(int(k)) or rows.shape[0] < 1:
        raise FormatError(f"{packing.value} with in_features={k} needs (N, "
                          f"{packing.row_bytes(int(k))}) bytes, got {packed.shape}")
    return rows, one


def pack_ternary(q: np.ndarray) -> np.ndarray:
    """Ternary codes ``q ∈ {−1, 0, 1}`` ``(N, K)`` → ``uint8 (N, ceil(K/4))``, 2 bits per weight.

    ``code = q + 1``; weight ``j`` at bits ``2·(j%4)`` of byte ``j//4``; padded with code 1.
    """
    codes, one, k = _ternary_codes(q, Packing.TERNARY_2BIT)
    n, kp = codes.shape
    out = np.bitwise_or.reduce(codes.reshape(n, kp // 4, 4) << _SHIFTS_2BIT, axis=2)
    assert out.shape == (n, Packing.TERNARY_2BIT.row_bytes(k)) and out.dtype == np.uint8  # 2 bpw
    return out[0] if one else out


def unpack_ternary(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_ternary`: ``uint8 (N, ceil(k/4))`` → ``int8 (N, k)`` in {−1, 0, 1}.

    Raises :class:`FormatError` on a wrong shape or the unused code 3 in a weight slot.
    """
    rows, one = _packed_rows(packed, k, Packing.TERNARY_2BIT)
    codes = ((rows[:, :, None] >> _SHIFTS_2BIT) & 3).reshape(rows.shape[0], -1)[:, :k]
    if (codes == 3).any():
        raise FormatError("ternary_2bit data holds code 3 (unused): corrupted weights")
    q = codes.astype(np.int8) - 1
    return q[0] if one else q


def pack_binary(q: np.ndarray, zero: str = "positive") -> np.ndarray:
    """Binary codes ``q ∈ {−1, 1}`` ``(N, K)`` → ``uint8 (N, ceil(K/8))``, 1 bit per weight.

    ``bit = (q > 0)``, weight ``j`` at bit ``j%8`` of byte ``j//8``, padded with 0 bits. An exact
    ``q = 0`` (``sign(0)``) is stored as +1 with ``zero="positive"`` (the format's choice,
    ``docs/format.md``) or raises with ``zero="error"``.
    """
    if zero not in ("positive", "error"):
        raise ValueError(f"zero={zero!r}: choose 'positive' (0 -> +1) or 'error'")
    q, one = _as_rows(q)
    _check_values(q, (-1, 0, 1) if zero == "positive" else (-1, 1), "binary")
    bits = q >= 0  # == (q > 0) after mapping 0 -> +1
    out = np.packbits(bits, axis=1, bitorder="little")  # pads with 0 bits
    n, k = q.shape
    assert out.shape == (n, Packing.BINARY_1BIT.row_bytes(k)) and BINARY_PAD_BIT == 0  # 1 bpw
    return out[0] if one else out


def unpack_binary(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_binary`: ``uint8 (N, ceil(k/8))`` → ``int8 (N, k)`` in {−1, 1}."""
    rows, one = _packed_rows(packed, k, Packing.BINARY_1BIT)
    bits = np.unpackbits(rows, axis=1, count=int(k), bitorder="little")
    q = bits.astype(np.int8) * 2 - 1
    return q[0] if one else q


def pack_base3(q: np.ndarray) -> np.ndarray:
    """Ternary codes ``(N, K)`` → ``uint8 (N, ceil(K/5))``, 5 trits per byte (1.6 bits/weight).

    ``code = q + 1``; byte = Σ_i code_{5b+i}·3^i (i = 0..4) ≤ 242; padded with code 1.
    """
    codes, one, k = _ternary_codes(q, Packing.TERNARY_BASE3)
    n, kp = codes.shape
    out = (codes.reshape(n, kp // 5, 5) * _POW3).sum(axis=2, dtype=np.uint16).astype(np.uint8)
    assert out.shape == (n, Packing.TERNARY_BASE3.row_bytes(k))  # 1.6 bpw
    return out[0] if one else out


def unpack_base3(packed: np.ndarray, k: int) -> np.ndarray:
    """Inverse of :func:`pack_base3`; a byte above 242 raises :class:`FormatError`."""
    rows, one = _packed_rows(packed, k, Packing.TERNARY_BASE3)
    if (rows > 242).any():
        raise FormatError("ternary_base3 byte above 242 (3^5 - 1): corrupted weights")
    q = _TRITS[rows].reshape(rows.shape[0], -1)[:, :k].astype(np.int8) - 1
    return q[0] if one else q


def pack(q: np.ndarray, packing: Packing | str) -> np.ndarray:
    """Pack codes with ``packing`` (a :class:`Packing` or its string value)."""
    packing = Packing(packing)
    if packing is Packing.TERNARY_2BIT:
        return pack_ternary(q)
    if packing is Packing.TERNARY_BASE3:
        return pack_base3(q)
    return pack_binary(q)


def unpack(packed: np.ndarray, packing: Packing | str, k: int) -> np.ndarray:
    """Unpack ``packed`` (``packing``, ``k`` weights per row) into int8 codes ``(N, k)``."""
    packing = Packing(packing)
    if packing is Packing.TERNARY_2BIT:
        return unpack_ternary(packed, k)
    if packing is Packing.TERNARY_BASE3:
        return unpack_base3(packed, k)
    return unpack_binary(packed, k)


def pack_uint(values: np.ndarray, width: int) -> np.ndarray:
    """Unsigned integers ``(n,)`` < ``2^width`` → a ``uint8`` bit stream of ``ceil(n·width/8)``
    bytes: value ``i`` at bits ``i·width .. i·width + width − 1``, least significant bit first,
    the last byte padded with 0 bits (the PTQ side-stores of ``docs/format.md`` §9).

    Worked bytes: ``pack_uint([5, 3], 3)`` = bits ``1,0,1, 1,1,0`` → ``0b00011101 = 0x1D``.
    """
    if not isinstance(width, (int, np.integer)) or not 1 <= width <= 32:
        raise ValueError(f"width must be an int in 1..32, got {width!r}")
    v = np.asarray(values).reshape(-1)
    if v.size and (not np.issubdtype(v.dtype, np.integer) or v.min() < 0 or v.max() >> width):
        raise ValueError(f"values must be integers in [0, 2^{width}); got {v.min()}..{v.max()}")
    bits = (v.astype(np.uint64)[:, None] >> np.arange(width, dtype=np.uint64)) & 1
    return np.packbits(bits.astype(np.uint8).reshape(-1), bitorder="little")


def unpack_uint(packed: np.ndarray, width: int, n: int) -> np.ndarray:
    """Inverse of :func:`pack_uint`: ``n`` values of ``width`` bits as ``int64 (n,)``."""
    packed = np.asarray(packed)
    if packed.dtype != np.uint8 or packed.ndim != 1 or packed.shape[0] != -(-n * width // 8):
        raise FormatError(f"a stream of {n} {width}-bit values needs uint8 "
                          f"({-(-n * width // 8)},), got {packed.dtype} {packed.shape}")
    bits = np.unpackbits(packed, count=n * width, bitorder="little").reshape(n, width)
    return (bits.astype(np.int64) << np.arange(width, dtype=np.int64)).sum(axis=1)
