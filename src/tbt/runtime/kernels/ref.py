"""Numpy reference kernels (normative) and the activation quantizers they consume.

How it works
------------
Every kernel computes ``y = x · Wᵀ`` (+ bias) for a packed weight ``W`` (``N × K``, per-row
scale ``α_n``, codes ``q ∈ {−1, 0, 1}`` or ``{−1, 1}``) and a quantized activation ``x``
(``M × K``). The activation is an affine image of small integer codes, one scale and one
offset per row::

    x[m, k] = d_m · a[m, k] + b_m            (b_m = 0 when ``offset`` is None)

so that every TBT activation quantizer is covered exactly (docs/numerics.md §4a, §4c):

==========  ==================================  ====================================  =======
format      codes ``a``                         covers                                kernel
==========  ==================================  ====================================  =======
``a8``      int8                                8-bit symmetric (``b = 0``) and       t2a8,
                                                asymmetric min/max (``a = u − 128``,  b1a8
                                                ``b = β + 128·step``)
``a2``      {−1, 0, 1}                          signed ternary ``{−α, 0, α}``;        t2a2
                                                unsigned ``{m, m+α, m+2α}``
                                                (``a = c − 1``, ``b = m + α``)
``a1``      {−1, 1}                             signed binary ``{−α, α}``;            b1a1
                                                unsigned ``{0, α}`` (``d = b = α/2``)
==========  ==================================  ====================================  =======

Then ``Σ_k q·x = d_m·acc + b_m·wsum_n`` with the exact integer accumulator
``acc[m, n] = Σ_k q[n, k]·a[m, k]`` and ``wsum_n = Σ_k q[n, k]``. The float epilogue, each step
rounded to float32 (this order is normative; the C kernels use the same, unfused)::

    t = float32(acc) * d_m
    t = t + b_m * float32(wsum_n)     # only with an offset
    t = t * α_n
    t = t + bias_n                    # only with a bias

The accumulator is computed here as a float64 BLAS matmul of the integer codes: every product
and partial sum is an integer below 2^53, so the result is exact, and fast.

Activation quantizers follow :mod:`tbt.quant.activation` op for op in float32, with round half
to even (``np.rint``), so their codes equal the fake quantizer's. One deliberate difference:
signed binary maps an exact ``0`` (``sign(0) = 0``) to ``+1``, because 1 bit has no zero
(``docs/format.md``, same rule as binary weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

from tbt.export.format import Packing
from tbt.export.pack import unpack

__all__ = ["ACT_FORMATS", "WEIGHT_FORMATS", "KERNEL_ACT", "QuantizedActivation",
           "PreparedWeight", "quantize_a8", "quantize_a8_absmax", "quantize_a2", "quantize_a1", "accumulate",
           "epilogue", "gemm", "gemm_t2_a8", "gemm_b1_a8", "gemm_t2_a2", "gemm_b1_a1",
           "weight_codes", "RefKernel", "ALPHA_EPS", "ASYM_EPS", "aligned_empty"]

WEIGHT_FORMATS = ("t2", "b1")
ACT_FORMATS = ("a8", "a2", "a1")
KERNEL_ACT = {"t2a8": ("t2", "a8"), "b1a8": ("b1", "a8"), "t2a2": ("t2", "a2"),
              "b1a1": ("b1", "a1")}
_ACT_CODES = {"a8": (-128, 127), "a2": (-1, 1), "a1": (-1, 1)}
ALPHA_EPS = np.float32(1e-5)  # α_c = max(α, 1e-5), as tbt.quant.activation
ASYM_EPS = 1e-8  # DQ-BART AsymQuantizer: range + 1e-8


@dataclass(frozen=True, eq=False)
class QuantizedActivation:
    """Quantized activations ``x = scale[:, None]·codes + offset[:, None]``.

    Attributes:
        fmt: ``"a8"``, ``"a2"`` or ``"a1"``.
        codes: int8 ``(M, K)``; ``a8`` any int8, ``a2`` {−1, 0, 1}, ``a1`` {−1, 1}.
        scale: float32 ``(M,)`` (a per-tensor scale is repeated on every row).
        offset: float32 ``(M,)``, or None for a zero offset.
    """

    fmt: str
    codes: np.ndarray
    scale: np.ndarray
    offset: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.fmt not in ACT_FORMATS:
            raise ValueError(f"activation format {self.fmt!r}; choose one of {ACT_FORMATS}")
        c = self.codes
        if c.dtype != np.int8 or c.ndim != 2 or c.size == 0:
            raise ValueError(f"codes must be int8 (M, K), got {c.dtype} {c.shape}")
        m = c.shape[0]
        for name, v in (("scale", self.scale), ("offset", self.offset)):
            if v is not None and (v.dtype != np.float32 or v.shape != (m,)):
                raise ValueError(f"{name} must be float32 ({m},), got {v.dtype} {v.shape}")
        if self.fmt != "a8":
            lo, hi = _ACT_CODES[self.fmt]
            if c.min() < lo or c.max() > hi or (self.fmt == "a1" and (c == 0).any()):
                raise ValueError(f"{self.fmt} codes must be in "
                                 f"{'{-1, 1}' if self.fmt == 'a1' else '{-1, 0, 1}'}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.codes.shape  # type: ignore[return-value]

    def dequantize(self) -> np.ndarray:
        """float32 ``(M, K)`` values ``scale·codes + offset``."""
        x = self.codes.astype(np.float32) * self.scale[:, None]
        return x if self.offset is None else x + self.offset[:, None]


# ---- activation quantizers -------------------------------------------------------------------

def _rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"activations must be (M, K) or (K,), got shape {x.shape}")
    return x


def _full(v, m: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(v, dtype=np.float32).reshape(-1, 1)[:, 0], (m,)).copy()


def quantize_a8(x: np.ndarray, clip: float = 2.5, signed: bool = True,
                per_row: bool = False) -> QuantizedActivation:
    """8-bit min/max quantization (docs/numerics.md §4c; ``tbt.quant.activation.minmax_quantize``).

    Args:
        x: float ``(M, K)`` or ``(K,)``; computed in float32.
        clip: ``c``; ``x`` is clamped to ``[−c, c]`` first (TBT: 2.5).
        signed: True = ``SymQuantizer`` (``s = 127·(1/max|x_c|)``, codes ``rint(x_c·s)``, scale
            ``1/s``); False = ``AsymQuantizer`` (codes ``u = rint((x_c − β)/r·255)`` with
            ``β = min x_c``, ``r = max x_c − β + 1e-8``; stored as ``a = u − 128``, scale
            ``r/255``, offset ``β + 128·r/255``).
        per_row: one scale (and offset) per row instead of per tensor (TBT: per tensor).

    Returns:
        :class:`QuantizedActivation` with format ``"a8"``.
    """
    xc = np.clip(_rows(x), np.float32(-clip), np.float32(clip))
    m = xc.shape[0]
    axis = 1 if per_row else None
    if signed:
        max_abs = np.abs(xc).max(axis=axis, keepdims=True)
        # torch evaluates ``127 / max_abs`` (a Python number over a tensor) as
        # ``127 · reciprocal(max_abs)``: two roundings, reproduced here so codes match at ties
        inv = (np.float32(1) / np.where(max_abs > 0, max_abs, 1)).astype(np.float32)
        s = np.where(max_abs > 0, np.float32(127) * inv, np.float32(1)).astype(np.float32)
        codes = np.rint(xc * s).astype(np.int8)
        return QuantizedActivation("a8", codes, _full(np.float32(1) / s, m))
    lo = xc.min(axis=axis, keepdims=True)
    rng = (xc.max(axis=axis, keepdims=True) - lo + np.float32(ASYM_EPS)).astype(np.float32)
    u = np.rint((xc - lo) / rng * np.float32(255))
    step = (rng / np.float32(255)).astype(np.float32)
    offset = (lo + step * np.float32(128)).astype(np.float32)
    return QuantizedActivation("a8", (u - 128).astype(np.int8), _full(step, m), _full(offset, m))


ABSMAX_EPS = np.float32(1e-5)  # BitNet: qp / max(|x|).clamp(min=1e-5)


def quantize_a8_absmax(x: np.ndarray, bits: int = 8) -> QuantizedActivation:
    """Per-token absmax quantization (BitNet b1.58; ``tbt.quant.act_methods``, docs/related.md §1a).

    One scale per row: ``s = qp·(1/max(max_k |x|, 1e-5))`` with ``qp = 2^(bits−1) − 1`` (torch
    computes ``qp / t`` as ``qp·reciprocal(t)``; the same two roundings here), codes
    ``clip(rint(x·s), −qp − 1, qp)``, scale ``1/s``. ``bits`` 2..8: the codes fit ``a8``.
    """
    xs = _rows(x)
    qp = np.float32(2 ** (bits - 1) - 1)
    inv = (np.float32(1) / np.maximum(np.abs(xs).max(axis=1), ABSMAX_EPS)).astype(np.float32)
    s = (qp * inv).astype(np.float32)  # (M,)
    codes = np.clip(np.rint(xs * s[:, None]), -qp - 1, qp).astype(np.int8)
    return QuantizedActivation("a8", codes, (np.float32(1) / s).astype(np.float32))


def _alpha_c(alpha: float) -> np.float32:
    return max(np.float32(alpha), ALPHA_EPS)


def _elastic_input(x: np.ndarray, alpha: float, signed: bool, variant: str,
                   shift: float | None) -> tuple[np.ndarray, np.float32, int]:
    """``(x̃, α_c, M)``: float32 rows, centred by the mean (or ``shift``) for the paper's
    signed quantizers, as they are fed to the elastic rounding."""
    if variant not in ("paper", "released"):
        raise ValueError(f"variant={variant!r}; choose 'paper' or 'released'")
    xs, a = _rows(x), _alpha_c(alpha)
    if signed and variant == "paper":
        xs = xs - np.float32(xs.mean(dtype=np.float32) if shift is None else shift)
    return xs, a, xs.shape[0]


def quantize_a2(x: np.ndarray, alpha: float, signed: bool = True, variant: str = "paper",
                shift: float | None = None) -> QuantizedActivation:
    """Ternary elastic quantization (docs/numerics.md §4a; ``tbt.quant.activation``, bits = 2).

    Args:
        x: float ``(M, K)`` or ``(K,)``; the whole array is one tensor (one α).
        alpha: the learned step α (``α_c = max(α, 1e-5)``).
        signed: levels ``{−α, 0, α}`` (True) or non-negative ``{0, α, 2α}`` (False).
        variant: ``"paper"`` (signed inputs centred by ``mean(x)``, mean not added back;
            non-negative unshifted) or ``"released"`` (signed unshifted; non-negative shifted by
            ``m = min(x)`` and ``m`` added back: levels ``{m, m+α, m+2α}``).
        shift: the mean (paper, signed) or min (released, non-negative) to use instead of
            computing it here, e.g. the value torch computed, for bit-identical codes.

    Returns:
        ``"a2"`` activation: codes ``a ∈ {−1, 0, 1}``, scale ``α_c``, offset ``None``
        (signed), ``α_c`` (paper non-negative: ``c = a + 1``) or ``m + α_c`` (released).
    """
    xs, a, m = _elastic_input(x, alpha, signed, variant, shift)
    if signed:
        codes = np.clip(np.rint(xs / a), -1, 1).astype(np.int8)
        return QuantizedActivation("a2", codes, _full(a, m))
    base = np.float32(0)
    if variant == "released":
        base = np.float32(xs.min() if shift is None else shift)
        xs = xs - base
    c = np.clip(np.rint(xs / a), 0, 2)
    return QuantizedActivation("a2", (c - 1).astype(np.int8), _full(a, m),
                               _full(base + a, m))


def quantize_a1(x: np.ndarray, alpha: float, signed: bool = True, variant: str = "paper",
                shift: float | None = None) -> QuantizedActivation:
    """Binary elastic quantization (docs/numerics.md §4a; ``tbt.quant.activation``, bits = 1).

    Signed: codes ``sign(x̃)`` with ``x̃ = x − mean(x)`` (paper; ``shift`` overrides the mean)
    or ``x̃ = x`` (released), and an exact ``x̃ = 0`` mapped to ``+1``; scale ``α_c``.
    Non-negative (both variants, no shift): ``c = clip(rint(x/α_c), 0, 1)``, stored as
    ``a = 2c − 1`` with scale and offset ``α_c/2``, so ``x = α_c·c`` exactly.
    """
    xs, a, m = _elastic_input(x, alpha, signed, variant, shift)
    if signed:
        codes = np.where(xs < 0, -1, 1).astype(np.int8)  # sign(0) -> +1 (1 bit has no 0)
        return QuantizedActivation("a1", codes, _full(a, m))
    c = np.clip(np.rint(xs / a), 0, 1)
    half = np.float32(a / np.float32(2))
    return QuantizedActivation("a1", (2 * c - 1).astype(np.int8), _full(half, m),
                               _full(half, m))


# ---- reference kernels -----------------------------------------------------------------------

def weight_codes(packed: np.ndarray, k: int, packing: Packing | str) -> np.ndarray:
    """int8 codes ``(N, k)`` of a packed matrix (the normative unpack)."""
    return unpack(packed, packing, k)


def accumulate(q: np.ndarray, act: QuantizedActivation) -> np.ndarray:
    """Exact ``acc[m, n] = Σ_k q[n, k]·a[m, k]`` as int32 ``(M, N)``."""
    if q.ndim != 2 or q.shape[1] != act.codes.shape[1]:
        raise ValueError(f"weight codes {q.shape} and activations {act.codes.shape} disagree on K")
    acc = act.codes.astype(np.float64) @ q.astype(np.float64).T  # exact: integers < 2^53
    return acc.astype(np.int32)


def epilogue(acc: np.ndarray, act: QuantizedActivation, wsum: np.ndarray,
             w_scale: np.ndarray, bias: np.ndarray | None = None) -> np.ndarray:
    """The normative float32 epilogue (module docstring) of an int32 ``(M, N)`` accumulator."""
    t = acc.astype(np.float32) * act.scale[:, None]
    if act.offset is not None:
        t = t + act.offset[:, None] * wsum.astype(np.float32)[None, :]
    t = t * np.asarray(w_scale, dtype=np.float32)[None, :]
    if bias is not None:
        t = t + np.asarray(bias, dtype=np.float32)[None, :]
    return t


def gemm(q: np.ndarray, w_scale: np.ndarray, act: QuantizedActivation,
         bias: np.ndarray | None = None) -> np.ndarray:
    """``y = x·Wᵀ + bias`` from int8 weight codes ``q (N, K)``: float32 ``(M, N)``."""
    wsum = q.sum(axis=1, dtype=np.int64).astype(np.int32)
    return epilogue(accumulate(q, act), act, wsum, w_scale, bias)


def _gemm_packed(packing: Packing, act_fmt: str, packed: np.ndarray, w_scale: np.ndarray,
                 k: int, act: QuantizedActivation, bias: np.ndarray | None) -> np.ndarray:
    if act.fmt != act_fmt:
        raise ValueError(f"this kernel takes {act_fmt} activations, got {act.fmt}")
    return gemm(weight_codes(packed, k, packing), w_scale, act, bias)


def gemm_t2_a8(packed, w_scale, k, act, bias=None) -> np.ndarray:
    """Ternary (``ternary_2bit`` bytes ``(N, ceil(k/4))``) × int8 activations → float32 (M, N)."""
    return _gemm_packed(Packing.TERNARY_2BIT, "a8", packed, w_scale, k, act, bias)


def gemm_b1_a8(packed, w_scale, k, act, bias=None) -> np.ndarray:
    """Binary (``binary_1bit`` bytes ``(N, ceil(k/8))``) × int8 activations → float32 (M, N)."""
    return _gemm_packed(Packing.BINARY_1BIT, "a8", packed, w_scale, k, act, bias)


def gemm_t2_a2(packed, w_scale, k, act, bias=None) -> np.ndarray:
    """Ternary weights × ternary (``a2``) activations → float32 (M, N)."""
    return _gemm_packed(Packing.TERNARY_2BIT, "a2", packed, w_scale, k, act, bias)


def gemm_b1_a1(packed, w_scale, k, act, bias=None) -> np.ndarray:
    """Binary weights × binary (``a1``) activations → float32 (M, N)."""
    return _gemm_packed(Packing.BINARY_1BIT, "a1", packed, w_scale, k, act, bias)


# ---- the registry's view of the reference ----------------------------------------------------

@dataclass(frozen=True, eq=False)
class PreparedWeight:
    """A weight matrix in one backend's layout, made once at load by ``Kernel.prepare_weight``.

    ``data`` is backend-specific (the reference keeps int8 codes ``(N, K)``); ``scale`` float32
    ``(N,)``; ``wsum`` int32 ``(N,)`` = Σ_k q[n, k]; ``kpad`` the padded K of the layout.
    """

    kernel: str
    backend: str
    n: int
    k: int
    kpad: int
    data: np.ndarray
    scale: np.ndarray
    wsum: np.ndarray
    extra: dict = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        """Bytes of the weight codes in this layout plus the per-row scales."""
        return int(self.data.nbytes + self.scale.nbytes)

    def copy(self) -> PreparedWeight:
        """An independent copy in fresh 64-byte-aligned memory (e.g. cold-cache benchmarks)."""
        return replace(self, data=_aligned_copy(self.data), scale=_aligned_copy(self.scale),
                       wsum=_aligned_copy(self.wsum), extra={})  # backends re-derive extras


def aligned_empty(shape: tuple[int, ...], dtype=np.uint8, align: int = 64) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts on an ``align``-byte boundary.

    numpy only guarantees 16 bytes (large arrays sit 16 bytes into an mmap'd page), so every
    64-byte vector load would straddle two cache lines.
    """
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    raw = np.empty(nbytes + align, dtype=np.uint8)
    off = -raw.__array_interface__["data"][0] % align
    return raw[off:off + nbytes].view(dtype).reshape(shape)


def _aligned_copy(a: np.ndarray) -> np.ndarray:
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def _packing_for(weight_format: str, packing: Packing | str | None) -> Packing:
    default = Packing.TERNARY_2BIT if weight_format == "t2" else Packing.BINARY_1BIT
    packing = default if packing is None else Packing(packing)
    if packing.is_ternary != (weight_format == "t2"):
        raise ValueError(f"{packing.value} weights cannot feed a {weight_format} kernel")
    return packing


def prepare_codes(weight_format: str, packed: np.ndarray, k: int, scale: np.ndarray,
                  packing: Packing | str | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Validate a packed matrix and return (int8 codes (N, k), float32 scale (N,), int32 wsum)."""
    q = weight_codes(packed, k, _packing_for(weight_format, packing))
    if q.ndim == 1:
        q = q[None, :]
    scale = np.ascontiguousarray(scale, dtype=np.float32).reshape(-1)
    if scale.shape != (q.shape[0],):
        raise ValueError(f"scale has {scale.shape[0]} entries for {q.shape[0]} rows")
    return q, scale, q.sum(axis=1, dtype=np.int64).astype(np.int32)


class RefKernel:
    """Reference backend of one (weight, activation) format pair; see ``tbt.runtime.kernels``."""

    backend = "ref"

    def __init__(self, weight_format: str, act_format: str) -> None:
        self.weight_format, self.act_format = weight_format, act_format
        self.name = weight_format + act_format

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, backend={self.backend!r})"

    def prepare_weight(self, packed: np.ndarray, k: int, scale: np.ndarray,
                       packing: Packing | str | None = None) -> PreparedWeight:
        q, scale, wsum = prepare_codes(self.weight_format, packed, k, scale, packing)
        return PreparedWeight(self.name, self.backend, q.shape[0], int(k), int(k), q, scale,
                              wsum)

    def prepare_act(self, act: QuantizedActivation) -> QuantizedActivation:
        self._check_act(act)
        return act

    def _check_weight(self, w: PreparedWeight) -> None:
        if w.kernel != self.name or w.backend != "ref":
            raise ValueError(f"weight prepared for {w.kernel} ({w.backend}), used with "
                             f"{self.name} (ref): prepare it with this kernel")

    def accumulate(self, w: PreparedWeight, act: QuantizedActivation) -> np.ndarray:
        self._check_weight(w)
        return accumulate(w.data, self.prepare_act(act))

    def run(self, w: PreparedWeight, act: QuantizedActivation, bias: np.ndarray | None = None,
            out: np.ndarray | None = None) -> np.ndarray:
        self._check_weight(w)
        act = self.prepare_act(act)
        y = epilogue(accumulate(w.data, act), act, w.wsum, w.scale, bias)
        if out is not None:
            out[...] = y
            return out
        return y

    __call__ = run

    def _check_act(self, act: QuantizedActivation) -> None:
        if not isinstance(act, QuantizedActivation):
            raise TypeError(f"{self.name} (ref) takes a QuantizedActivation, got {type(act)}")
        if act.fmt != self.act_format:
            raise ValueError(f"kernel {self.name} takes {self.act_format} activations, "
                             f"got {act.fmt}")
