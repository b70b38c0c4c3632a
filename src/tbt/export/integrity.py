"""Checksums and value checks of a packed checkpoint, shared by both readers (no torch).

A packed checkpoint (``docs/format.md`` §8) carries three kinds of checksum, all sha256 (hex):

* ``tbt.checksum``: the *header*, every other ``tbt.*`` metadata entry plus each tensor's name,
  dtype and shape (:func:`header_checksum`). It covers the two keys below.
* ``tbt.tensor_sha256``: JSON ``{stored tensor name: sha256 of its bytes}``, the bytes exactly
  as they sit in the safetensors data section (little-endian, C order). Verified when a tensor
  is loaded: :func:`tbt.export.io.load_packed` checks every tensor,
  :meth:`tbt.runtime.linear.PackedLinearNP.from_packed_dir` the tensors of its layer.
* ``tbt.file_sha256``: JSON ``{"config.json": sha256, "generation_config.json": sha256}`` of the
  bytes of the files ``save_packed`` wrote next to the weights (those that exist). An edited
  ``config.json`` would otherwise rebuild a different architecture around the same tensors.

The two per-byte keys were added without a format version bump (old readers ignore unknown
``tbt.*`` keys, and their header checksum covers them like any other key). A file written
before them (no ``tbt.tensor_sha256``) still loads, with a logged warning that its tensor bytes
and config files are not verified; exporting it again adds them.

Value checks (:func:`check_layer_values`), for files whose checksums are right but whose
numbers are not (an old file, or one re-signed by hand): a layer's scales must be finite and
``>= 0`` (``0`` is legitimate: an all-zero row, e.g. a padding token's embedding, has scale 0),
offsets and learned activation steps finite, a packed PTQ layer's float tensors finite.

sha256 rather than blake2b: with the SHA extensions of current x86 CPUs, hashlib's sha256 is
the faster of the two (``benchmarks/checksum_cost.py`` measures the load-time cost).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from tbt.export.format import FormatError

__all__ = ["CHECKSUM_KEY", "TENSOR_DIGESTS_KEY", "FILE_DIGESTS_KEY", "SIGNED_FILES",
           "header_checksum", "bytes_digest", "array_digest", "file_digests", "read_digests",
           "verify_header", "verify_files", "verify_array", "check_layer_values",
           "warn_unverified"]

logger = logging.getLogger(__name__)

CHECKSUM_KEY = "tbt.checksum"
TENSOR_DIGESTS_KEY = "tbt.tensor_sha256"
FILE_DIGESTS_KEY = "tbt.file_sha256"
SIGNED_FILES = ("config.json", "generation_config.json")
_HEX = frozenset("0123456789abcdef")


def header_checksum(metadata: Mapping[str, str], index: Mapping[str, tuple[str, tuple]]) -> str:
    """sha256 of every ``tbt.*`` metadata entry (but ``tbt.checksum``) and each tensor's name,
    dtype and shape: the JSON ``{"metadata": {...}, "tensors": {name: [dtype, shape]}}`` with
    sorted keys.

    safetensors checks the byte offsets itself; this makes any other change to the header (a
    flipped digit in a shape, a dtype, an α entry of the layer table ...) a :class:`FormatError`
    instead of a model that loads and computes garbage.
    """
    body = {"metadata": {k: v for k, v in metadata.items()
                         if k.startswith("tbt.") and k != CHECKSUM_KEY},
            "tensors": {k: [d, [int(x) for x in shape]] for k, (d, shape) in index.items()}}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def bytes_digest(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def array_digest(a: np.ndarray) -> str:
    """sha256 of an array's bytes in C order (what safetensors stores, on a little-endian host)."""
    a = np.ascontiguousarray(a)
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def file_digests(directory: str | os.PathLike) -> dict[str, str]:
    """``{name: sha256}`` of the :data:`SIGNED_FILES` present in ``directory``."""
    d = Path(directory)
    return {n: bytes_digest((d / n).read_bytes()) for n in SIGNED_FILES if (d / n).is_file()}


def _is_digest(v: Any) -> bool:
    return isinstance(v, str) and len(v) == 64 and set(v) <= _HEX


def verify_header(metadata: Mapping[str, str], index: Mapping[str, tuple[str, tuple]],
                  path: str | os.PathLike) -> None:
    if metadata.get(CHECKSUM_KEY) != header_checksum(metadata, index):
        raise FormatError(f"{path}: the header checksum ({CHECKSUM_KEY}) does not match its "
                          f"metadata and tensor index: a corrupted file (or one written "
                          f"before tbt stored checksums): export it again")


def read_digests(metadata: Mapping[str, str], tensor_names,
                 path: str | os.PathLike) -> tuple[dict[str, str] | None, dict[str, str] | None]:
    """``(tensor digests, file digests)`` of a file whose header checksum was verified; ``None``
    for a file written before they existed. Raises :class:`FormatError` on a malformed entry
    (not one digest per stored tensor, a file name other than :data:`SIGNED_FILES`)."""
    raw_t, raw_f = metadata.get(TENSOR_DIGESTS_KEY), metadata.get(FILE_DIGESTS_KEY)
    if raw_t is None and raw_f is None:
        return None, None
    try:
        tensors = json.loads(raw_t) if raw_t is not None else None
        files = json.loads(raw_f) if raw_f is not None else None
    except json.JSONDecodeError as e:
        raise FormatError(f"{path}: {TENSOR_DIGESTS_KEY}/{FILE_DIGESTS_KEY} is not JSON "
                          f"({e}): a corrupted file, export it again") from e
    if not isinstance(tensors, dict) or not isinstance(files, dict):
        raise FormatError(f"{path}: {TENSOR_DIGESTS_KEY} and {FILE_DIGESTS_KEY} must both be "
                          f"JSON objects of sha256 digests: export it again")
    names = set(tensor_names)
    if set(tensors) != names or not all(_is_digest(v) for v in tensors.values()):
        extra, missing = sorted(set(tensors) - names), sorted(names - set(tensors))
        raise FormatError(f"{path}: {TENSOR_DIGESTS_KEY} must hold one sha256 per stored tensor "
                          f"(missing {missing[:3]}, unknown {extra[:3]}): export it again")
    if not set(files) <= set(SIGNED_FILES) or not all(_is_digest(v) for v in files.values()):
        raise FormatError(f"{path}: {FILE_DIGESTS_KEY} must map {list(SIGNED_FILES)} to sha256 "
                          f"digests: export it again")
    return tensors, files


def warn_unverified(path: str | os.PathLike) -> None:
    logger.warning("%s was written before tbt stored tensor checksums (%s): its tensor bytes "
                   "and config.json are not verified; export it again to add them",
                   path, TENSOR_DIGESTS_KEY)


def verify_files(directory: str | os.PathLike, digests: Mapping[str, str] | None) -> None:
    """Every signed file exists and has its recorded sha256 (nothing to do for ``None``)."""
    if digests is None:
        return
    d = Path(directory)
    for name in SIGNED_FILES:
        want, f = digests.get(name), d / name
        if want is None:
            if f.is_file():  # a file that was not there at export time now decides the model
                raise FormatError(f"{f} was added after export (the checkpoint records no "
                                  f"checksum for it): remove it, or export again")
            continue
        if not f.is_file():
            raise FormatError(f"{f} is missing (it was written with the checkpoint): restore "
                              f"it, or export again")
        if bytes_digest(f.read_bytes()) != want:
            raise FormatError(f"{f} was changed after export or is corrupted (its sha256 does "
                              f"not match {FILE_DIGESTS_KEY}): restore it, or export again")


def verify_array(name: str, a: np.ndarray, digests: Mapping[str, str] | None,
                 path: str | os.PathLike) -> None:
    """``a`` (tensor ``name`` as loaded) has the sha256 the file records for it."""
    if digests is not None and array_digest(a) != digests[name]:
        raise FormatError(f"{path}: tensor {name} does not match its checksum "
                          f"({TENSOR_DIGESTS_KEY}): a corrupted file, export it again")


def _check(what: str, name: str, a: np.ndarray, nonneg: bool, path) -> None:
    a = np.asarray(a, dtype=np.float64)
    bad = ~np.isfinite(a)
    if nonneg:
        bad |= a < 0
    if bad.any():
        v = a[bad].reshape(-1)[0]
        raise FormatError(f"{path}: {what} {name} holds {int(bad.sum())} invalid value(s) "
                          f"(e.g. {v}; expected finite{' and >= 0' if nonneg else ''}): a "
                          f"corrupted file, export it again")


def check_layer_values(layers: Mapping[str, Any], lm_head: Mapping[str, Any],
                       get: Callable[[str], np.ndarray | None], path: str | os.PathLike,
                       only: str | None = None) -> None:
    """Scales finite and ``>= 0``; offsets, learned activation steps and a packed PTQ layer's
    float tensors finite. ``get(stored name)`` returns the tensor as a float numpy array (or
    None when absent); ``only`` restricts the check to one layer."""
    for name, info in layers.items():
        if only is not None and name != only:
            continue
        if "scheme" in info:  # float tensors of a PTQ layer (docs/format.md §9)
            for role, t in sorted(info.get("tensors", {}).items()):
                a = get(t)
                if a is not None and a.dtype.kind == "f":
                    _check(f"layer {name} ({info['scheme']})", t, a, False, path)
            continue
        _check(f"layer {name} scale", info["scale"], get(info["scale"]), True, path)
        if "offset" in info:
            _check(f"layer {name} offset", info["offset"], get(info["offset"]), False, path)
        alpha = (info.get("act") or {}).get("alpha_tensor")
        if alpha is not None and get(alpha) is not None:
            _check(f"layer {name} activation step", alpha, get(alpha), False, path)
    if only is None and lm_head.get("format") == "int8":
        _check("int8 lm_head scale", lm_head["scale"], get(lm_head["scale"]), True, path)
