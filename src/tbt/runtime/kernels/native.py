"""ctypes binding of the native C kernels (``tbt/runtime/csrc``), with their load-time layouts.

How it works
------------
The package build compiles ``csrc/*.c`` into ``tbt/runtime/_tbt_kernels<suffix>`` (a plain C
library, see ``setup.py``); :func:`load_library` finds it (or the file named by
``$TBT_NATIVE_LIB``) and declares the C signatures. When it is missing, :func:`available` is
False, :func:`unavailable_reason` says why, and ``tbt.runtime.kernels`` falls back to the numpy
reference.

Weights are re-tiled once, at load, from the normative packed bytes into the kernel layouts of
``csrc/tbt_kernels.h``: K padded to a multiple of 256 with zero codes; ternary for int8
activations interleaved so that byte ``i`` of each 64-byte block holds weights
``i, i+64, i+128, i+192`` (one shift and mask gives 64 consecutive codes); ternary for
ternary activations as two bit-planes (non-zero, negative); binary unchanged (LSB-first bits),
only padded. Activations are laid out per call by the C ``tbt_prepare_*`` helpers.

ISA: ``"native"`` lets the library pick the best path for this CPU (AVX-512 VNNI/VPOPCNTDQ,
AVX2, scalar); ``"scalar"``, ``"avx2"`` and ``"avx512"`` force one (tests run each path the CPU
supports).
"""

from __future__ import annotations

import ctypes
import importlib.machinery
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tbt.export.format import Packing
from tbt.runtime.kernels.ref import (
    PreparedWeight,
    QuantizedActivation,
    _packing_for,
    aligned_empty,
    prepare_codes,
)

__all__ = ["KBLOCK", "ISAS", "available", "unavailable_reason", "load_library", "isa_available",
           "resolve_isa", "cpu_features", "threading_model", "set_num_threads",
           "get_num_threads", "set_parallel_threshold", "set_pool_chunks", "NativeKernel",
           "PreparedAct",
           "padded_k", "KTAIL", "aligned_empty", "repack_t2_interleaved", "repack_t2_planes",
           "repack_b1",
           "FusedLinear", "ACT_KINDS", "SHIFT_MODES", "repack_t2_lanes", "repack_b1_lanes",
           "t2_codes_from_interleaved", "repack_t2a2_lanes", "LANES_MIN_M", "lanes_min_m"]

KBLOCK = 256  # TBT_KBLOCK
ISAS = {"native": 0, "scalar": 1, "avx2": 2, "avx512": 3}
_ISA_NAMES = {v: k for k, v in ISAS.items()}
_FORMAT_IDS = {"t2a8": 0, "b1a8": 1, "t2a2": 2, "b1a1": 3}
_FEATURES = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512vnni", "avx512vpopcntdq",
             "popcnt", "fma")
_ABI_VERSION = 4
_ERRORS = {-1: "invalid arguments (shapes, strides or padding)",
           -2: "instruction set not supported by this CPU or build"}

_lib: ctypes.CDLL | None = None
_reason = ""
_loaded = False

_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _candidates() -> list[Path]:
    env = os.environ.get("TBT_NATIVE_LIB")
    if env:
        return [Path(env)]
    here = Path(__file__).resolve().parent.parent  # tbt/runtime
    return [here / f"_tbt_kernels{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES]


def load_library() -> ctypes.CDLL | None:
    """The loaded C library (cached), or None when it is not built or cannot load."""
    global _lib, _reason, _loaded
    if _loaded:
        return _lib
    _loaded = True
    paths = [p for p in _candidates() if p.is_file()]
    if not paths:
        env = os.environ.get("TBT_NATIVE_LIB")
        _reason = (f"TBT_NATIVE_LIB={env} does not exist" if env else
                   "native kernels are not built (no tbt/runtime/_tbt_kernels*.so); reinstall "
                   "with a C compiler: pip install -e . --no-build-isolation")
        return None
    try:
        lib = ctypes.CDLL(str(paths[0]))
    except OSError as e:
        _reason = f"cannot load {paths[0]}: {e}"
        return None
    _declare(lib)
    if lib.tbt_abi_version() != _ABI_VERSION:
        _reason = f"{paths[0]} has ABI {lib.tbt_abi_version()}, expected {_ABI_VERSION}: rebuild"
        return None
    _lib = lib
    threads = os.environ.get("TBT_NUM_THREADS")
    if threads:
        lib.tbt_set_num_threads(int(threads))
    threshold = os.environ.get("TBT_PAR_THRESHOLD")
    if threshold:
        lib.tbt_set_parallel_threshold(int(threshold))
    chunks = os.environ.get("TBT_POOL_CHUNKS")
    if chunks:
        lib.tbt_set_pool_chunks(int(chunks))
    return _lib


def _declare(lib: ctypes.CDLL) -> None:
    c_int = ctypes.c_int
    for name, res, args in (
        ("tbt_abi_version", c_int, []),
        ("tbt_cpu_features", ctypes.c_uint, []),
        ("tbt_isa_available", c_int, [c_int]),
        ("tbt_resolve_isa", c_int, [c_int, c_int]),
        ("tbt_threading", c_int, []),
        ("tbt_set_num_threads", None, [c_int]),
        ("tbt_get_num_threads", c_int, []),
        ("tbt_set_parallel_threshold", None, [_I64]),
        ("tbt_set_pool_chunks", None, [c_int]),
        ("tbt_gemm", c_int, [c_int, c_int, _P, _I64, _P, _P, _P, _I64, _P, _P, _P, _I64, _I64,
                             _I64, _I64, _P, _P]),
        ("tbt_prepare_a8", c_int, [_P, _I64, _I64, _I64, _P]),
        ("tbt_prepare_a2", c_int, [_P, _I64, _I64, _I64, _P]),
        ("tbt_prepare_a1", c_int, [_P, _I64, _I64, _I64, _P]),
        ("tbt_gemm_lanes", c_int, [c_int, c_int, _P, _P, _P, _P, _I64, _P, _P, _P, _I64,
                                   _I64, _I64, _I64, _P, _P]),
        ("tbt_lanes_available", c_int, [c_int, c_int]),
        ("tbt_linear_workspace", _I64, [_P, _I64]),
        ("tbt_linear", c_int, [_P, _P, _I64, ctypes.c_float, _P, _I64, _P, _P]),
        ("tbt_quantize_act", c_int, [_P, _P, _I64, ctypes.c_float, _P, _P, _P, _P]),
    ):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = res, args


def available() -> bool:
    return load_library() is not None


def unavailable_reason() -> str:
    load_library()
    return _reason


def _require() -> ctypes.CDLL:
    lib = load_library()
    if lib is None:
        raise RuntimeError(_reason)
    return lib


def cpu_features() -> dict[str, bool]:
    """CPU features the library detected (``__builtin_cpu_supports``)."""
    bits = _require().tbt_cpu_features()
    return {name: bool(bits >> i & 1) for i, name in enumerate(_FEATURES)}


def isa_available(isa: str) -> bool:
    """True if ``isa`` (``native|scalar|avx2|avx512``) is compiled in and runs on this CPU."""
    lib = load_library()
    return lib is not None and isa in ISAS and bool(lib.tbt_isa_available(ISAS[isa]))


def resolve_isa(kernel: str, isa: str = "native") -> str:
    """The ISA that actually runs ``kernel`` (e.g. ``"t2a8"``) when ``isa`` is requested."""
    got = _require().tbt_resolve_isa(_FORMAT_IDS[kernel], ISAS[isa])
    if got < 0:
        raise RuntimeError(f"{kernel} on {isa}: {_ERRORS.get(got, got)}")
    return _ISA_NAMES[got]


def threading_model() -> str:
    return {0: "none", 1: "openmp", 2: "pthreads"}[_require().tbt_threading()]


def set_num_threads(n: int) -> None:
    """Threads the native kernels split output rows across (``n <= 0``: the default)."""
    _require().tbt_set_num_threads(int(n))


def get_num_threads() -> int:
    return int(_require().tbt_get_num_threads())


def set_parallel_threshold(macs: int) -> None:
    """Calls below ``M·N·Kpad`` multiply-accumulates run on one thread (default 2^18)."""
    _require().tbt_set_parallel_threshold(int(macs))


def set_pool_chunks(n: int) -> None:
    """Chunks per thread of a parallel GEMM; 0 (default): 2 below 2^23 multiply-adds, else 8."""
    _require().tbt_set_pool_chunks(int(n))


# ---- load-time layouts -------------------------------------------------------------------------

def _aligned(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


KTAIL = 64  # TBT_KTAIL: the Kpad granularity of the formats with 8-bit activations
_KTAIL_KERNELS = ("t2a8", "b1a8")


def padded_k(k: int, kernel: str | None = None) -> int:
    """K padded for the kernel layout: a multiple of :data:`KBLOCK` (256), or of :data:`KTAIL`
    (64) for ``t2a8``/``b1a8`` (their rows end with short blocks, ``csrc/tbt_kernels.h``)."""
    g = KTAIL if kernel in _KTAIL_KERNELS else KBLOCK
    return -(-int(k) // g) * g


def _pad(q: np.ndarray, kpad: int, fill: int) -> np.ndarray:
    out = np.full((q.shape[0], kpad), fill, dtype=np.int8)
    out[:, :q.shape[1]] = q
    return out


def repack_t2_interleaved(q: np.ndarray, kpad: int | None = None) -> np.ndarray:
    """Ternary codes ``(N, K)`` → ``uint8 (N, Kpad/4)`` (``Kpad`` default: the t2a8 padding,
    a multiple of 64): byte ``i`` of 64-byte block ``b`` holds ``q + 1`` of weights
    ``256b + 64s + i`` at bits ``2s`` (s = 0..3); after the last full block (``kmain`` =
    ``Kpad`` rounded down to 256), byte ``i`` of 16-byte short block ``c`` holds weights
    ``kmain + 64c + 16s + i``."""
    n = q.shape[0]
    kp = padded_k(q.shape[1], "t2a8") if kpad is None else int(kpad)
    km = kp // 256 * 256
    c = (_pad(q, kp, 0) + 1).astype(np.uint8)
    main = c[:, :km].reshape(n, km // 256, 4, 64)
    tail = c[:, km:].reshape(n, (kp - km) // 64, 4, 16)
    parts = [(x[:, :, 0] | (x[:, :, 1] << 2) | (x[:, :, 2] << 4) | (x[:, :, 3] << 6)).reshape(n, -1)
             for x in (main, tail)]
    return np.ascontiguousarray(np.concatenate(parts, axis=1))


def repack_t2_planes(q: np.ndarray) -> np.ndarray:
    """Ternary codes ``(N, K)`` → ``uint8 (N, Kpad/4)`` = [non-zero plane | negative plane]."""
    qp = _pad(q, padded_k(q.shape[1]), 0)
    return np.concatenate([np.packbits(qp != 0, axis=1, bitorder="little"),
                           np.packbits(qp < 0, axis=1, bitorder="little")], axis=1)


def repack_b1(q: np.ndarray, kpad: int | None = None) -> np.ndarray:
    """Binary codes ``(N, K)`` → ``uint8 (N, Kpad/8)``, bit = (q > 0), zero-padded (``Kpad``
    default: a multiple of 256, the b1a1 padding)."""
    kp = padded_k(q.shape[1]) if kpad is None else int(kpad)
    return np.packbits(_pad(q, kp, -1) > 0, axis=1, bitorder="little")


def t2_codes_from_interleaved(data: np.ndarray) -> np.ndarray:
    """The inverse of :func:`repack_t2_interleaved`: uint8 ``(N, Kpad/4)`` → codes ``c = q + 1``
    ``(N, Kpad)`` (padding columns hold 1)."""
    n, kp = data.shape[0], data.shape[1] * 4
    km = kp // 256 * 256
    shifts = (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]
    main = (data[:, :km // 4].reshape(n, km // 256, 1, 64) >> shifts) & 3
    tail = (data[:, km // 4:].reshape(n, (kp - km) // 64, 1, 16) >> shifts) & 3
    return np.ascontiguousarray(np.concatenate([main.reshape(n, km), tail.reshape(n, kp - km)],
                                               axis=1))


def repack_t2_lanes(c: np.ndarray) -> np.ndarray:
    """Codes ``c = q + 1`` ``(N, Kpad)`` → the t2a8 lanes layout (``gemm_lanes_avx512.c``):
    ``uint8 (G, 4·Kpad)`` for ``G = 2·ceil(N/32)`` groups of 16 rows; in 64-byte block ``kb``
    of a group, byte ``4j + i`` holds row ``16g + j``'s codes at ``K = 16kb + 4s + i`` in bits
    ``2s`` (s = 0..3). Padding rows hold code 1 (zero weight)."""
    n, kp = c.shape
    npad = -(-n // 32) * 32
    full = np.ones((npad, kp), dtype=np.uint8)
    full[:n] = c
    g = full.reshape(npad // 16, 16, kp // 16, 4, 4)  # (group, j, kb, s, i)
    packed = g[:, :, :, 0] | (g[:, :, :, 1] << 2) | (g[:, :, :, 2] << 4) | (g[:, :, :, 3] << 6)
    out = packed.transpose(0, 2, 1, 3)  # (group, kb, j, i)
    return _aligned(np.ascontiguousarray(out).reshape(npad // 16, kp * 4))


def repack_b1_lanes(bits: np.ndarray) -> np.ndarray:
    """The b1 row layout ``uint8 (N, Kpad/8)`` → the b1a1 lanes layout
    (``gemm_lanes_avx512.c``): ``uint8 (G, Kpad)`` for ``G = 4·ceil(N/32)`` groups of 8 rows;
    block ``kb`` (64 bytes) of a group holds row ``8g + j``'s 64-bit word ``kb`` in lane ``j``.
    Padding rows are zero bits."""
    n, nbytes = bits.shape
    npad = -(-n // 32) * 32
    full = np.zeros((npad, nbytes), dtype=np.uint8)
    full[:n] = bits
    words = full.reshape(npad // 8, 8, nbytes // 8, 8)  # (group, j, kb, byte)
    out = np.ascontiguousarray(words.transpose(0, 2, 1, 3))
    return _aligned(out.reshape(npad // 8, nbytes * 8))


def repack_t2a2_lanes(planes: np.ndarray) -> np.ndarray:
    """The t2a2 row layout ``uint8 (N, Kpad/4)`` = [nz | neg] → its lanes layout: ``uint8
    (G, 2·Kpad)``, ``G = 4·ceil(N/32)`` groups of 8 rows; per 64 K (128 bytes) the 8 rows' nz
    words, then their neg words."""
    n, row = planes.shape
    half = row // 2
    nz = repack_b1_lanes(planes[:, :half]).reshape(-1, half // 8, 64)
    neg = repack_b1_lanes(planes[:, half:]).reshape(-1, half // 8, 64)
    return _aligned(np.concatenate([nz, neg], axis=2).reshape(nz.shape[0], 2 * half * 8))


def _b1_bits_as_codes(bits: np.ndarray) -> np.ndarray:
    return np.unpackbits(bits, axis=1, bitorder="little")  # (N, Kpad) of 0/1


_env_lanes = os.environ.get("TBT_LANES_MIN_M")
# GEMMs from this many rows use the lanes layout; None: the per-format default below
LANES_MIN_M: int | None = int(_env_lanes) if _env_lanes else None
# t2a8/b1a8 also at M = 1 (decoding): their lanes kernel keeps one accumulator per bit plane
# there, ~5% faster per SmolLM2 decode step than the row tiles (benchmarks/results/
# engine-pool-2026-12-05.md); the 64-bit-lane formats from M = 2
_LANES_MIN_M_DEFAULT = {"t2a8": 1, "b1a8": 1, "t2a2": 2, "b1a1": 2}


def lanes_min_m(kernel: str) -> int:
    """The smallest M whose GEMM runs on ``kernel``'s lanes layout (``TBT_LANES_MIN_M``
    overrides every format)."""
    return LANES_MIN_M if LANES_MIN_M is not None else _LANES_MIN_M_DEFAULT.get(kernel, 2)


_LANES = {"t2a8": lambda data: repack_t2_lanes(t2_codes_from_interleaved(data)),
          "b1a8": lambda data: repack_t2_lanes(_b1_bits_as_codes(data)),  # codes c = bit
          "b1a1": repack_b1_lanes, "t2a2": repack_t2a2_lanes}


_REPACK = {"t2a8": repack_t2_interleaved,
           "b1a8": lambda q: repack_b1(q, padded_k(q.shape[1], "b1a8")),
           "t2a2": repack_t2_planes, "b1a1": repack_b1}
_ACT_BYTES = {"a8": lambda kp: kp, "a2": lambda kp: kp // 4, "a1": lambda kp: kp // 8}


@dataclass(frozen=True, eq=False)
class PreparedAct:
    """Activations in the kernel layout (``data`` rows of ``stride`` bytes) + scale/offset."""

    fmt: str
    m: int
    k: int
    kpad: int
    data: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None
    ptrs: tuple[int, int, int | None] = (0, 0, None)  # data, scale, offset (cached)

    def __post_init__(self) -> None:
        for name, v in (("scale", self.scale), ("offset", self.offset)):
            if v is not None and (v.dtype != np.float32 or v.shape != (self.m,)
                                  or not v.flags.c_contiguous):
                raise ValueError(f"{name} must be contiguous float32 ({self.m},)")
        if self.data.shape[0] != self.m or not self.data.flags.c_contiguous:
            raise ValueError(f"data must be contiguous with {self.m} rows")
        object.__setattr__(self, "ptrs", (_ptr(self.data), _ptr(self.scale), _ptr(self.offset)))


def _ptr(a: np.ndarray | None) -> int | None:
    return None if a is None else a.__array_interface__["data"][0]


class NativeKernel:
    """One (weight, activation) format pair on the C kernels; ``isa`` as in :data:`ISAS`."""

    def __init__(self, weight_format: str, act_format: str, isa: str = "native") -> None:
        self.weight_format, self.act_format = weight_format, act_format
        self.name = weight_format + act_format
        if isa not in ISAS:
            raise ValueError(f"isa={isa!r}; choose one of {list(ISAS)}")
        self._lib = _require()
        if not self._lib.tbt_isa_available(ISAS[isa]):
            raise RuntimeError(f"ISA {isa!r} is not available on this CPU/build")
        self.isa, self.backend = isa, isa
        self._fmt_id, self._isa_id = _FORMAT_IDS[self.name], ISAS[isa]

    def __repr__(self) -> str:
        return (f"NativeKernel({self.name!r}, isa={self.isa!r} -> "
                f"{resolve_isa(self.name, self.isa)!r})")

    def prepare_weight(self, packed: np.ndarray, k: int, scale: np.ndarray,
                       packing: Packing | str | None = None) -> PreparedWeight:
        """Normative packed bytes ``(N, row_bytes)`` + scale ``(N,)`` → kernel layout."""
        _packing_for(self.weight_format, packing)
        q, scale, wsum = prepare_codes(self.weight_format, packed, k, scale, packing)
        data = _aligned(_REPACK[self.name](q))
        return PreparedWeight(self.name, "native", q.shape[0], int(k), padded_k(k, self.name),
                              data,
                              _aligned(scale), _aligned(wsum))  # one layout for every ISA

    def prepare_act(self, act: QuantizedActivation | PreparedAct) -> PreparedAct:
        """Lay quantized activations out for the kernel (zero-padded rows / bit-planes)."""
        if isinstance(act, PreparedAct):
            if act.fmt != self.act_format:
                raise ValueError(f"kernel {self.name} takes {self.act_format}, got {act.fmt}")
            return act
        if not isinstance(act, QuantizedActivation):
            raise TypeError(f"expected a QuantizedActivation, got {type(act)}")
        if act.fmt != self.act_format:
            raise ValueError(f"kernel {self.name} takes {self.act_format} activations, "
                             f"got {act.fmt}")
        m, k = act.codes.shape
        kp = padded_k(k, self.name)
        codes = np.ascontiguousarray(act.codes)
        out = aligned_empty((m, _ACT_BYTES[act.fmt](kp)), np.int8 if act.fmt == "a8"
                            else np.uint8)
        fn = getattr(self._lib, f"tbt_prepare_{act.fmt}")
        if fn(_ptr(codes), m, k, kp, _ptr(out)) != 0:
            raise ValueError(f"{act.fmt} codes out of range for the format")
        return PreparedAct(act.fmt, m, k, kp, out, np.ascontiguousarray(act.scale),
                           None if act.offset is None else np.ascontiguousarray(act.offset))

    def _call(self, w: PreparedWeight, a: PreparedAct, bias, y, acc) -> None:
        if w.kernel != self.name or w.backend != "native":
            raise ValueError(f"weight prepared for {w.kernel} ({w.backend}), used with "
                             f"{self.name} (native): prepare it with this kernel")
        ptrs = w.extra.get("ptrs")
        if ptrs is None:  # checked and cached once: a prepared weight's arrays never change
            self._check_weight(w)
            ptrs = w.extra["ptrs"] = (_ptr(w.data), _ptr(w.wsum), _ptr(w.scale))
        if w.k != a.k or a.data.shape != (a.m, _ACT_BYTES[a.fmt](w.kpad)):
            raise ValueError(f"in_features mismatch: weight K={w.k}, activations K={a.k}")
        if bias is not None:
            bias = np.ascontiguousarray(bias, dtype=np.float32)
            if bias.shape != (w.n,):
                raise ValueError(f"bias must be ({w.n},), got {bias.shape}")
        wp, wsum_p, scale_p = ptrs
        ap, ascale_p, aoff_p = a.ptrs
        lanes = self.lanes_layout(w, a.m)
        if lanes is not None:
            rc = self._lib.tbt_gemm_lanes(self._fmt_id, self._isa_id, _ptr(lanes), wsum_p,
                                          scale_p, ap, a.data.shape[1], ascale_p, aoff_p,
                                          _ptr(bias), a.m, w.n, w.k, w.kpad, _ptr(y), _ptr(acc))
            if rc != 0:
                raise RuntimeError(f"tbt_gemm_lanes({self.name}, {self.isa}): "
                                   f"{_ERRORS.get(rc, rc)}")
            return
        rc = self._lib.tbt_gemm(self._fmt_id, self._isa_id, wp, w.data.shape[1], wsum_p, scale_p,
                                ap, a.data.shape[1], ascale_p, aoff_p, _ptr(bias), a.m, w.n,
                                w.k, w.kpad, _ptr(y), _ptr(acc))
        if rc != 0:
            raise RuntimeError(f"tbt_gemm({self.name}, {self.isa}): {_ERRORS.get(rc, rc)}")

    def lanes_layout(self, w: PreparedWeight, m: int) -> np.ndarray | None:
        """The lanes layout of a weight for an ``m``-row GEMM (built on first use
        from the row layout, cached in ``w.extra``), or None where the row tiles run: ``m``
        below :func:`lanes_min_m`, another format, or no AVX-512 path for this kernel's ISA."""
        if m < lanes_min_m(self.name) or self.name not in _LANES:
            return None
        lanes = w.extra.get("lanes")
        if lanes is None:
            if not self._lib.tbt_lanes_available(self._fmt_id, self._isa_id):
                w.extra["lanes"] = False
                return None
            lanes = w.extra["lanes"] = _LANES[self.name](w.data)
        return lanes if lanes is not False else None

    def _check_weight(self, w: PreparedWeight) -> None:
        """The C code trusts these sizes: check them before the first call (no out-of-bounds)."""
        row = w.kpad // 8 if self.weight_format == "b1" else w.kpad // 4
        ok = (w.kpad == padded_k(w.k, self.name) and w.data.dtype == np.uint8
              and w.data.shape == (w.n, row) and w.data.flags.c_contiguous
              and w.scale.dtype == np.float32 and w.scale.shape == (w.n,)
              and w.wsum.dtype == np.int32 and w.wsum.shape == (w.n,)
              and w.scale.flags.c_contiguous and w.wsum.flags.c_contiguous)
        if not ok:
            raise ValueError(f"inconsistent prepared weight for {self.name}: data "
                             f"{w.data.dtype}{w.data.shape}, expected uint8({w.n}, {row})")

    def run(self, w: PreparedWeight, act: QuantizedActivation | PreparedAct,
            bias: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """``y = x·Wᵀ + bias``: float32 ``(M, N)`` (written into ``out`` if given)."""
        a = self.prepare_act(act)
        if out is None:
            out = np.empty((a.m, w.n), dtype=np.float32)
        elif out.shape != (a.m, w.n) or out.dtype != np.float32 or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 ({a.m}, {w.n})")
        self._call(w, a, bias, out, None)
        return out

    __call__ = run

    def accumulate(self, w: PreparedWeight, act: QuantizedActivation | PreparedAct) -> np.ndarray:
        """The exact int32 accumulator ``(M, N)`` (tests hold it equal to the reference)."""
        a = self.prepare_act(act)
        y = np.empty((a.m, w.n), dtype=np.float32)
        acc = np.empty((a.m, w.n), dtype=np.int32)
        self._call(w, a, None, y, acc)
        return acc


# ---- one C call per layer: float32 x -> activation quantizer -> kernel -> float32 y ---------

ACT_KINDS = {"minmax-sym": 0, "minmax-asym": 1, "ternary": 2, "ternary-nonneg": 3, "binary": 4,
             "binary-nonneg": 5}  # TBT_ACT_* of tbt_kernels.h
SHIFT_MODES = {"none": 0, "given": 1, "min": 2}  # TBT_SHIFT_*
_KIND_FORMAT = {0: "a8", 1: "a8", 2: "a2", 3: "a2", 4: "a1", 5: "a1"}


class _Plan(ctypes.Structure):
    """``tbt_plan`` of ``tbt_kernels.h`` (same field order and types)."""

    _fields_ = [("fmt", ctypes.c_int32), ("isa", ctypes.c_int32), ("w", _P), ("w_stride", _I64),
                ("wsum", _P), ("w_scale", _P), ("bias", _P), ("N", _I64), ("K", _I64),
                ("Kpad", _I64), ("act_kind", ctypes.c_int32), ("shift_mode", ctypes.c_int32),
                ("act_param", ctypes.c_float), ("reserved", ctypes.c_float),
                ("w_lanes", _P), ("lanes_min_m", _I64)]


class _Workspace:
    """One growing, 64-byte-aligned scratch buffer per thread (tbt_linear's ``work``)."""

    def __init__(self) -> None:
        import threading

        self._local = threading.local()

    def get(self, nbytes: int) -> tuple[int, int]:
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.nbytes < nbytes:
            buf = self._local.buf = aligned_empty((max(int(nbytes), 1 << 16),), np.uint8)
        return _ptr(buf), int(buf.nbytes)


_WORKSPACE = _Workspace()


class FusedLinear:
    """A prepared weight + bias + activation quantizer run by one ``tbt_linear`` call.

    ``act_kind`` (:data:`ACT_KINDS`), ``act_param`` (the clip ``c`` of the 8-bit quantizer or
    ``α_c = max(α, 1e-5)``, rounded to float32) and ``shift_mode`` (:data:`SHIFT_MODES`)
    describe the quantizer; :class:`tbt.runtime.linear.PackedLinearNP` derives them from its
    ``ActSpec``. The C code quantizes with the float32 operations of the numpy reference, so
    the result equals ``kernel.run(w, quantize_*(x), bias)`` exactly (tests hold it to that).
    """

    def __init__(self, kernel: NativeKernel, w: PreparedWeight, bias: np.ndarray | None,
                 act_kind: str, act_param: float, shift_mode: str = "none") -> None:
        if act_kind not in ACT_KINDS or shift_mode not in SHIFT_MODES:
            raise ValueError(f"act_kind={act_kind!r} / shift_mode={shift_mode!r}; choose from "
                             f"{list(ACT_KINDS)} / {list(SHIFT_MODES)}")
        if _KIND_FORMAT[ACT_KINDS[act_kind]] != kernel.act_format:
            raise ValueError(f"{act_kind} activations do not feed kernel {kernel.name}")
        if w.kernel != kernel.name or w.backend != "native":
            raise ValueError(f"weight prepared for {w.kernel} ({w.backend}), not {kernel.name}")
        kernel._check_weight(w)
        self.kernel, self.weight = kernel, w
        self.n, self.k = w.n, w.k
        self.bias = None if bias is None else _aligned(np.asarray(bias, np.float32).reshape(-1))
        if self.bias is not None and self.bias.shape != (w.n,):
            raise ValueError(f"bias must be ({w.n},), got {self.bias.shape}")
        self._lib = kernel._lib
        self._plan = _Plan(kernel._fmt_id, kernel._isa_id, _ptr(w.data), w.data.shape[1],
                           _ptr(w.wsum), _ptr(w.scale), _ptr(self.bias) or 0, w.n, w.k, w.kpad,
                           ACT_KINDS[act_kind], SHIFT_MODES[shift_mode],
                           float(np.float32(act_param)), 0.0, None, 0)
        self._plan_p = ctypes.addressof(self._plan)
        self._lanes_checked = False  # the lanes layout is attached on the first GEMM call
        self._counts_zeros = act_kind == "binary"  # only signed binary codes an exact 0 as +1
        self.act_kind, self.act_param, self.shift_mode = act_kind, act_param, shift_mode

    def __repr__(self) -> str:
        return (f"FusedLinear({self.kernel.name}, n={self.n}, k={self.k}, act={self.act_kind}, "
                f"shift={self.shift_mode})")

    def run_ptr(self, x_ptr: int, m: int, shift: float, y_ptr: int) -> int:
        """Raw call: ``x_ptr`` float32 ``(m, K)`` contiguous, ``y_ptr`` float32 ``(m, N)``.

        Returns the number of exact zeros of a signed binary input (coded +1; the caller
        corrects them, see ``PackedLinearNP``), else 0. The caller keeps both buffers alive.
        """
        lib = self._lib
        if not self._lanes_checked and m >= lanes_min_m(self.kernel.name):
            self._attach_lanes(m)
        work, nbytes = _WORKSPACE.get(lib.tbt_linear_workspace(self._plan_p, m))
        zeros = ctypes.c_int64(0) if self._counts_zeros else None  # per call: thread-safe
        rc = lib.tbt_linear(self._plan_p, x_ptr, m, shift, work, nbytes, y_ptr,
                            None if zeros is None else ctypes.addressof(zeros))
        if rc != 0:
            raise RuntimeError(f"tbt_linear({self.kernel.name}): {_ERRORS.get(rc, rc)}")
        return 0 if zeros is None else zeros.value

    def _attach_lanes(self, m: int) -> None:
        """Give the plan the weight's lanes layout (the kernel's, shared with ``kernel.run``),
        so GEMMs from :func:`lanes_min_m` rows run on it, as :meth:`NativeKernel.run` does."""
        self._lanes_checked = True
        lanes = self.kernel.lanes_layout(self.weight, m)
        if lanes is not None:
            self._plan.w_lanes = _ptr(lanes)
            self._plan.lanes_min_m = lanes_min_m(self.kernel.name)

    def run(self, x: np.ndarray, shift: float | None = None,
            out: np.ndarray | None = None) -> tuple[np.ndarray, int]:
        """float32 ``(M, K)`` → (float32 ``(M, N)``, zero count); ``shift`` for mode "given"."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.k or x.shape[0] < 1:
            raise ValueError(f"x must be float32 (M >= 1, {self.k}), got {x.shape}")
        if self.shift_mode == "given" and shift is None:
            raise ValueError("this quantizer subtracts a given shift (the tensor mean): pass it")
        if out is None:
            out = np.empty((x.shape[0], self.n), dtype=np.float32)
        elif out.shape != (x.shape[0], self.n) or out.dtype != np.float32 \
                or not out.flags.c_contiguous:
            raise ValueError(f"out must be C-contiguous float32 ({x.shape[0]}, {self.n})")
        zeros = self.run_ptr(_ptr(x), x.shape[0], 0.0 if shift is None else shift, _ptr(out))
        return out, zeros

    def quantize(self, x: np.ndarray, shift: float | None = None):
        """The C quantizer alone: (int8 codes (M, K), scale (M,), offset (M,), zero count)."""
        x = np.ascontiguousarray(x, dtype=np.float32)
        m = x.shape[0]
        codes = np.empty((m, self.k), np.int8)
        scale, offset = np.empty(m, np.float32), np.empty(m, np.float32)
        zeros = ctypes.c_int64(0)
        rc = self._lib.tbt_quantize_act(self._plan_p, _ptr(x), m,
                                        0.0 if shift is None else shift, _ptr(codes),
                                        _ptr(scale), _ptr(offset), ctypes.addressof(zeros))
        if rc != 0:
            raise RuntimeError(f"tbt_quantize_act: {_ERRORS.get(rc, rc)}")
        return codes, scale, offset, zeros.value
