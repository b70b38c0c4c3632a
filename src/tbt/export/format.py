"""The packed weight format: constants, packings and the versioned header (normative).

How it works
------------
A converted ternary or binary matrix ``W`` (``N = out_features`` rows, ``K = in_features``
columns) is stored as integer *codes* plus one float scale per row (``α_r``, TBT's per-row
granularity, docs/numerics.md §1a), so ``W[r, k] = α_r · q[r, k]`` with ``q ∈ {−1, 0, 1}`` (ternary)
or ``q ∈ {−1, 1}`` (binary). ``docs/format.md`` is the prose version of this module, with a
worked byte example per packing.

* **Axis.** Codes are packed along ``in_features``: row ``r``'s codes are contiguous, row after
  row (C order), so a GEMV streams one row at a time.
* **Packings** (:class:`Packing`):

  =====================  ============  =========================================  ========
  packing                codes / byte  value → code                               bpw
  =====================  ============  =========================================  ========
  ``ternary_2bit``       4             ``code = q + 1`` ∈ {0, 1, 2} (3 unused)    2
  ``ternary_base3``      5             ``code = q + 1``, byte = Σ code_i · 3^i     1.6
  ``binary_1bit``        8             ``bit = (q > 0)``                          1
  =====================  ============  =========================================  ========

* **Bit order** (``lsb_first``): code ``j`` of a row sits in byte ``j // c`` (``c`` codes per
  byte). In that byte, ternary_2bit puts it at bits ``2·(j % 4)`` and ``2·(j % 4) + 1``, and
  binary_1bit at bit ``j % 8``. In ternary_base3 it is the trit of weight ``3^(j % 5)``.
  In every packing the first weight is the least significant.
* **Padding.** Each row is padded from ``K`` up to a multiple of ``c``. Padded slots hold the
  code of zero: ``1`` for the ternary packings, bit ``0`` for binary. Readers ignore padded slots.
  A row takes ``ceil(K / c)`` bytes, with no padding between rows.
* **Binary zero.** ``sign(0) = 0`` has no 1-bit code. The format maps an exact ``q = 0`` to
  ``+1`` (value ``+α``; header field ``binary_zero = "positive"``), then applies
  ``bit = (q > 0)``. This matches :mod:`tbt.quant.weight`'s ``sign(0) = +1`` paths. The
  ``tbt``/released quantizer keeps ``torch.sign`` (0 stays 0), and there the packed model
  deviates on exact-zero latent weights only (measure zero; the tests budget for it).
  :func:`tbt.export.pack.pack_binary` does this mapping, or raises with ``zero="error"``.
* **Scales.** One scale per output row, ``float32`` on disk (``scale_dtype``; ``float16`` is
  allowed by the header for size, and readers widen it to float32). Rounding in every quantizer
  is half to even (``np.rint`` / ``torch.round``); the C runtime uses ``rint`` in the default
  rounding mode, never ``lround``.
* **Layout is ISA-independent.** A SIMD-friendly re-tiling happens when the runtime loads a
  matrix (:mod:`tbt.runtime.kernels`); it never reaches the file.

The header (:class:`FormatHeader`) records all of the above under ``tbt.format.*`` keys of the
safetensors metadata (a ``str → str`` dict). Readers reject a wrong magic, a newer
``format_version``, or any convention they do not implement, with a :class:`FormatError` that
says what was found and what was expected.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path

__all__ = ["MAGIC", "FORMAT_VERSION", "METADATA_PREFIX", "FormatError", "Packing",
           "FormatHeader", "TERNARY_CODE_MAP", "BINARY_CODE_MAP", "TERNARY_PAD_CODE",
           "BINARY_PAD_BIT", "SCALE_DTYPES", "WEIGHTS_NAME", "weights_path"]

MAGIC = "TBTPACK"
FORMAT_VERSION = 1
METADATA_PREFIX = "tbt.format."

TERNARY_CODE_MAP: dict[int, int] = {-1: 0, 0: 1, 1: 2}  # code = q + 1
BINARY_CODE_MAP: dict[int, int] = {-1: 0, 1: 1}  # bit = (q > 0)
TERNARY_PAD_CODE = 1  # the code of q = 0
BINARY_PAD_BIT = 0
SCALE_DTYPES = ("float32", "float16")
WEIGHTS_NAME = "tbt_packed.safetensors"  # the file of a packed checkpoint folder


def weights_path(directory: str | os.PathLike) -> Path:
    """``directory/tbt_packed.safetensors``; FileNotFoundError (one line) if it is not there."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: not a tbt packed checkpoint")
    return path


class FormatError(ValueError):
    """A packed tensor or header that this version of tbt cannot read (clear message, no guess)."""


class Packing(str, Enum):
    """How one matrix's codes are laid out in bytes (module docstring table)."""

    TERNARY_2BIT = "ternary_2bit"
    TERNARY_BASE3 = "ternary_base3"
    BINARY_1BIT = "binary_1bit"

    @property
    def codes_per_byte(self) -> int:
        return {"ternary_2bit": 4, "ternary_base3": 5, "binary_1bit": 8}[self.value]

    @property
    def bits_per_weight(self) -> float:
        return 8 / self.codes_per_byte  # 2, 1.6, 1 (padding excluded)

    @property
    def is_ternary(self) -> bool:
        return self is not Packing.BINARY_1BIT

    def row_bytes(self, k: int) -> int:
        """Bytes of one packed row of ``k`` weights: ``ceil(k / codes_per_byte)``."""
        if k < 1:
            raise ValueError(f"in_features={k} must be >= 1")
        return -(-k // self.codes_per_byte)

    def padded_k(self, k: int) -> int:
        """``k`` rounded up to the packing's block (``codes_per_byte``)."""
        return self.row_bytes(k) * self.codes_per_byte

    def nbytes(self, n: int, k: int) -> int:
        """Bytes of a packed ``(n, k)`` matrix (codes only, scales excluded)."""
        if n < 1:
            raise ValueError(f"out_features={n} must be >= 1")
        return n * self.row_bytes(k)


def _map_str(m: Mapping[int, int]) -> str:
    return ",".join(f"{v}:{c}" for v, c in sorted(m.items()))


@dataclass(frozen=True)
class FormatHeader:
    """File-level conventions of a packed checkpoint (serialised under ``tbt.format.*``).

    Every field has one supported value in format version 1, except ``scale_dtype``. The
    fields exist so that a file states its conventions and a reader can check them, not to be
    configured.
    """

    magic: str = MAGIC
    format_version: int = FORMAT_VERSION
    ternary_code_map: str = _map_str(TERNARY_CODE_MAP)  # "value:code,...": code = q + 1
    binary_code_map: str = _map_str(BINARY_CODE_MAP)  # bit = (q > 0)
    binary_zero: str = "positive"  # an exact q = 0 is stored as +1 (bit 1)
    bit_order: str = "lsb_first"  # first weight in the least significant bits / trit
    axis: str = "in_features"  # a row's codes are contiguous
    padding: str = "zero_code_to_byte"  # K padded to codes_per_byte with the code of 0
    scale_granularity: str = "per_row"
    scale_dtype: str = "float32"
    rounding: str = "half_to_even"

    def __post_init__(self) -> None:
        if self.scale_dtype not in SCALE_DTYPES:
            raise FormatError(f"scale_dtype={self.scale_dtype!r}; supported: {list(SCALE_DTYPES)}")

    def to_metadata(self) -> dict[str, str]:
        """The header as safetensors metadata: ``{"tbt.format.<field>": str}``."""
        return {METADATA_PREFIX + k: str(v) for k, v in asdict(self).items()}

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str] | None) -> FormatHeader:
        """Parse and validate a header; raise :class:`FormatError` on anything unreadable."""
        if not metadata:
            raise FormatError("no metadata: not a tbt packed file (missing tbt.format.* keys)")
        got = {k[len(METADATA_PREFIX):]: v for k, v in metadata.items()
               if isinstance(k, str) and k.startswith(METADATA_PREFIX)}
        magic = got.get("magic")
        if magic != MAGIC:
            raise FormatError(f"tbt.format.magic={magic!r}, expected {MAGIC!r}: "
                              f"not a tbt packed file, or a corrupted header")
        version = _parse_version(got.get("format_version"))
        expected = cls()
        kwargs: dict[str, object] = {"format_version": version}
        for f in fields(cls):
            if f.name in ("magic", "format_version"):
                continue
            if f.name not in got:
                raise FormatError(f"header lacks tbt.format.{f.name}; the file is truncated or "
                                  f"was not written by tbt.export")
            kwargs[f.name] = got[f.name]
            if f.name != "scale_dtype" and got[f.name] != getattr(expected, f.name):
                raise FormatError(f"tbt.format.{f.name}={got[f.name]!r} is not supported "
                                  f"(format version {FORMAT_VERSION} reads "
                                  f"{getattr(expected, f.name)!r})")
        return cls(**kwargs)  # type: ignore[arg-type]


def _parse_version(raw: str | None) -> int:
    if not isinstance(raw, str) or not raw.isascii() or not raw.isdigit():
        raise FormatError(f"tbt.format.format_version={raw!r} is not an integer")
    version = int(raw)
    if version < 1 or raw != str(version):
        raise FormatError(f"tbt.format.format_version={raw!r} is invalid "
                          f"(a positive integer, no leading zeros)")
    if version > FORMAT_VERSION:
        raise FormatError(f"format_version {version} was written by a newer tbt; this one reads "
                          f"up to {FORMAT_VERSION}: upgrade tbt")
    return version
