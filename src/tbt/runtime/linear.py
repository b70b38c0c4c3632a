"""Torch-free packed linear layer: float32 numpy in, activation quantization, kernel, float32 out.

How it works
------------
A packed linear layer of a tbt checkpoint is ``y = Q(x)·Wᵀ + b`` with ``W = α_r·q`` (packed
codes, per-row scale) and ``Q`` the layer's *trained* activation quantizer. At inference the
quantizer's output is an affine image of small integer codes (``x̂ = d·a + b``, see
:mod:`tbt.runtime.kernels.ref`), so the product runs on the integer kernels::

    x (..., K) float32 ──reshape──► (M, K) ──quantize (ActSpec)──► QuantizedActivation
        ──kernel (t2a8 | b1a8 | t2a2 | b1a1)──► (M, N) float32 ──reshape──► (..., N)

``M = 1`` is a GEMV (one decoding step), ``M > 1`` a GEMM (prefill, encoder); the same kernel
object does both.

:class:`ActSpec` describes the quantizer (what ``tbt.quant.activation`` trained) and is stored
per layer in the checkpoint (``tbt.layers[name]["act"]``, ``docs/format.md`` §8). The quantizer
functions are a registry keyed by ``(kind, bits)`` (:func:`register_act_quantizer`):

=======================  =======  ===========================================================
``(kind, bits)``         format   quantizer (``tbt.runtime.kernels.ref``; numerics.md §4)
=======================  =======  ===========================================================
``("minmax", 8)``        ``a8``   dynamic per-tensor scale after clipping to ``[−c, c]``;
                                  symmetric (signed) or asymmetric min/max (non-negative)
``("elastic", 2)``       ``a2``   learned α; signed ``{−α, 0, α}`` (paper: centred by the
                                  mean); non-negative ``{0, α, 2α}`` (released: ``+ min(x)``)
``("elastic", 1)``       ``a1``   learned α; signed ``{−α, α}``; non-negative ``{0, α}``
``("absmax-token", b)``  ``a8``   per-token absmax (BitNet b1.58), one scale per row, ``b``
                                  in 2..8; numpy quantizer (no C twin, so no fused call)
=======================  =======  ===========================================================

One tensor is one quantizer call: the whole ``(..., K)`` input shares one scale, one α and one
mean/min, exactly as the torch quantizer, whatever ``M`` (per-token absmax: one scale per row,
as torch). ``shift`` lets a caller hand in the mean (paper, signed) that torch computed, so the
codes are bit-identical to the fake-quantized model's (numpy's float32 mean can differ from
torch's by an ulp, which flips a code only when an input sits exactly on a rounding boundary).

This module imports no torch (docs/architecture.md; ``tests/runtime/test_runtime_linear.py`` runs it
with ``sys.modules["torch"] = None``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from tbt.export.format import WEIGHTS_NAME, FormatError, FormatHeader, Packing, weights_path
from tbt.export.integrity import (
    check_layer_values,
    read_digests,
    verify_array,
    verify_files,
    verify_header,
    warn_unverified,
)
from tbt.runtime.kernels import get_kernel
from tbt.runtime.kernels.ref import (
    ALPHA_EPS,
    QuantizedActivation,
    quantize_a1,
    quantize_a2,
    quantize_a8,
    quantize_a8_absmax,
)

__all__ = ["ActSpec", "PackedLinearNP", "register_act_quantizer", "quantize_activation",
           "kernel_unavailable_reason", "weight_format_of", "WEIGHTS_NAME"]

ACT_KINDS = ("minmax", "elastic", "absmax-token")


@dataclass(frozen=True)
class ActSpec:
    """One activation quantizer, as trained (``tbt.quant.activation``).

    Args:
        kind: ``"minmax"`` (DQ-BART 8-bit, no parameters), ``"elastic"`` (learned α) or
            ``"absmax-token"`` (BitNet b1.58 per-token absmax, no parameters).
        bits: activation bits.
        signed: False for non-negative inputs (after GELU/ReLU).
        clip: ``c`` of the min/max quantizer (activation units; TBT 2.5); unused by elastic.
        variant: ``"paper"`` or ``"released"`` (elastic only).
        alpha: the learned step α (elastic only).
    """

    kind: str
    bits: int
    signed: bool = True
    clip: float | None = None
    variant: str | None = None
    alpha: float | None = None

    def __post_init__(self) -> None:
        if self.kind not in ACT_KINDS:
            raise ValueError(f"ActSpec kind={self.kind!r}; choose one of {list(ACT_KINDS)}")
        if self.kind == "minmax" and not (self.clip and self.clip > 0):
            raise ValueError(f"a minmax ActSpec needs clip > 0 (TBT: 2.5), got {self.clip!r}")
        if self.kind == "elastic" and (self.alpha is None or self.variant is None):
            raise ValueError("an elastic ActSpec needs alpha (the learned step) and variant "
                             "('paper' or 'released')")
        if self.kind == "absmax-token" and not self.signed:
            raise ValueError("an absmax-token ActSpec is signed (symmetric per-token codes)")

    @property
    def fmt(self) -> str | None:
        """The kernel activation format (``a8``/``a2``/``a1``), or None if none covers it."""
        entry = _ACT_QUANTIZERS.get((self.kind, self.bits))
        return None if entry is None else entry[0]

    @property
    def needs_mean(self) -> bool:
        """True when the codes depend on the tensor mean (paper variant, signed, elastic)."""
        return self.kind == "elastic" and self.variant == "paper" and self.signed

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ActSpec:
        return cls(**{k: d[k] for k in ("kind", "bits", "signed", "clip", "variant", "alpha")
                      if k in d})


_ACT_QUANTIZERS: dict[tuple[str, int], tuple[str, Callable[..., QuantizedActivation]]] = {}


def register_act_quantizer(kind: str, bits: int, fmt: str):
    """Decorator: ``fn(x (M, K) float32, spec, shift) -> QuantizedActivation`` for one pair."""
    def deco(fn):
        _ACT_QUANTIZERS[(kind, bits)] = (fmt, fn)
        return fn
    return deco


@register_act_quantizer("minmax", 8, "a8")
def _minmax8(x: np.ndarray, spec: ActSpec, shift: float | None) -> QuantizedActivation:
    return quantize_a8(x, clip=spec.clip, signed=spec.signed)  # torch's ops exactly


def _absmax_token(x: np.ndarray, spec: ActSpec, shift: float | None) -> QuantizedActivation:
    return quantize_a8_absmax(x, spec.bits)


for _bits in range(2, 9):  # the codes of 2..8-bit per-token absmax all fit int8
    register_act_quantizer("absmax-token", _bits, "a8")(_absmax_token)


@register_act_quantizer("elastic", 2, "a2")
def _elastic2(x: np.ndarray, spec: ActSpec, shift: float | None) -> QuantizedActivation:
    return quantize_a2(x, spec.alpha, spec.signed, spec.variant, shift)


@register_act_quantizer("elastic", 1, "a1")
def _elastic1(x: np.ndarray, spec: ActSpec, shift: float | None) -> QuantizedActivation:
    return quantize_a1(x, spec.alpha, spec.signed, spec.variant, shift)


def quantize_activation(x: np.ndarray, spec: ActSpec,
                        shift: float | None = None) -> QuantizedActivation:
    """Quantize ``x`` (float ``(M, K)``, one tensor) as ``spec``'s trained quantizer does."""
    entry = _ACT_QUANTIZERS.get((spec.kind, spec.bits))
    if entry is None:
        raise KeyError(f"no runtime quantizer for {spec.kind} {spec.bits}-bit activations; "
                       f"registered: {sorted(_ACT_QUANTIZERS)}")
    return entry[1](x, spec, shift)


def weight_format_of(packing: Packing | str) -> str:
    """``"t2"`` for the ternary packings, ``"b1"`` for binary."""
    return "t2" if Packing(packing).is_ternary else "b1"


def kernel_unavailable_reason(packing: Packing | str, act: ActSpec | None,
                              backend: str | None = None) -> str | None:
    """None if a kernel runs ``packing`` × ``act`` on ``backend``, else why not (one line)."""
    if act is None:
        return "float activations (no activation quantizer): no integer kernel"
    if act.fmt is None:
        return f"no runtime quantizer for {act.kind} {act.bits}-bit activations"
    try:
        get_kernel(weight_format_of(packing), act.fmt, backend)
    except (KeyError, ValueError, RuntimeError) as e:
        return str(e)
    return None


def fused_act(spec: ActSpec) -> tuple[str, float, str] | None:
    """``(act_kind, act_param, shift_mode)`` of the C quantizer (``tbt_linear``) for ``spec``,
    or None when the C library has no twin of it (per-token absmax: numpy quantizer, C kernel).

    The same quantizers as :func:`quantize_activation` (``tbt.runtime.kernels.ref``): 8-bit
    min/max symmetric or asymmetric with the clip ``c``; elastic with ``α_c = max(α, 1e-5)``,
    minus the tensor mean for the paper's signed quantizers (``"given"``: the caller passes
    the mean) or minus the minimum for the released non-negative ternary one (``"min"``).
    """
    if spec.kind == "absmax-token":
        return None
    if spec.kind == "minmax":
        kind = "minmax-sym" if spec.signed else "minmax-asym"
        return kind, float(np.float32(spec.clip)), "none"
    alpha = float(max(np.float32(spec.alpha), ALPHA_EPS))
    kind = {2: "ternary", 1: "binary"}[spec.bits] + ("" if spec.signed else "-nonneg")
    if spec.signed:
        shift = "given" if spec.variant == "paper" else "none"
    else:
        shift = "min" if (spec.variant == "released" and spec.bits == 2) else "none"
    return kind, alpha, shift


def _binary_columns(packed: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Codes ``q ∈ {−1, 1}`` of columns ``cols`` of a ``binary_1bit`` matrix: int8 (N, |cols|)."""
    bits = (packed[:, cols // 8] >> (cols % 8).astype(np.uint8)) & 1
    return (bits.astype(np.int8) * 2 - 1).astype(np.int8)


class PackedLinearNP:
    """``y = Q(x)·(α ⊙ q)ᵀ + b`` on the integer kernels, numpy in and out (no torch).

    Args:
        packed: uint8 ``(N, row_bytes)``, the normative packed codes.
        in_features: ``K``.
        scale: float ``(N,)`` per-row α.
        bias: float ``(N,)`` or None.
        packing: the codes' :class:`~tbt.export.format.Packing`.
        act: the layer's activation quantizer.
        backend: kernel backend (``tbt.runtime.kernels``; default ``$TBT_KERNEL_BACKEND``/auto).

    Raises:
        ValueError: no kernel fits (float activations, an activation width with no format, or a
            format pair without a kernel); the message says which.
    """

    def __init__(self, packed: np.ndarray, in_features: int, scale: np.ndarray,
                 bias: np.ndarray | None, packing: Packing | str, act: ActSpec | None,
                 backend: str | None = None) -> None:
        packing = Packing(packing)
        reason = kernel_unavailable_reason(packing, act, backend)
        if reason is not None:
            raise ValueError(f"no kernel for {packing.value} weights: {reason}")
        self.act, self.packing = act, packing
        self.kernel = get_kernel(weight_format_of(packing), act.fmt, backend)
        self.in_features = int(in_features)
        self._packed = np.ascontiguousarray(packed, dtype=np.uint8)  # normative bytes (a view)
        self.weight = self.kernel.prepare_weight(self._packed, self.in_features, scale, packing)
        self.out_features = self.weight.n
        self.bias = None if bias is None else np.ascontiguousarray(bias, dtype=np.float32)
        if self.bias is not None and self.bias.shape != (self.out_features,):
            raise ValueError(f"bias has shape {self.bias.shape}, expected ({self.out_features},)")
        self.fused = None  # one C call per forward (quantizer + kernel) on the native kernels
        c_act = fused_act(act)
        if (c_act is not None and getattr(self.kernel, "backend", "ref") != "ref"
                and hasattr(self.kernel, "_lib")):
            from tbt.runtime.kernels.native import FusedLinear

            self.fused = FusedLinear(self.kernel, self.weight, self.bias, *c_act)

    def __repr__(self) -> str:
        return (f"PackedLinearNP(in={self.in_features}, out={self.out_features}, "
                f"kernel={self.kernel.name}/{self.kernel.backend}, act={self.act})")

    def __call__(self, x: np.ndarray, shift: float | None = None) -> np.ndarray:
        """float ``(..., K)`` → float32 ``(..., N)``; ``shift``: the mean torch computed."""
        x = np.asarray(x, dtype=np.float32)
        if x.ndim == 0 or x.shape[-1] != self.in_features:
            raise ValueError(f"input has shape {x.shape}; the last dimension must be "
                             f"in_features={self.in_features}")
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] == 0:
            return np.zeros((*lead, self.out_features), dtype=np.float32)
        if self.fused is not None:
            if self.act.needs_mean and shift is None:
                shift = float(x2.mean(dtype=np.float32))  # as quantize_a2/a1 compute it
            y, zeros = self.fused.run(x2, shift)
            if zeros:
                self.undo_binary_zeros(y, x2, shift)
            return y.reshape(*lead, self.out_features)
        qa = quantize_activation(x2, self.act, shift)
        y = self.kernel.run(self.weight, qa, self.bias)
        if self.act.kind == "elastic" and self.act.bits == 1 and self.act.signed:
            self.undo_binary_zeros(y, x2, shift)
        return y.reshape(*lead, self.out_features)

    def undo_binary_zeros(self, y: np.ndarray, x2: np.ndarray, shift: float | None) -> None:
        """Signed binary: ``a1`` stores an exact ``x̃ = 0`` as +1, torch's ``sign(0) = 0``.

        The kernel's accumulator then holds ``Σ_{k: x̃=0} q[n, k]`` too much; subtract
        ``d_m·α_n·Σ_{k∈Z_m} q[n, k]`` (exact integer sums, read from the packed columns).
        Zeros are common, not measure-zero, after quantized attention (``P̂·V̂`` sums of ±α).
        """
        xs = x2
        if self.act.needs_mean:
            xs = x2 - np.float32(x2.mean(dtype=np.float32) if shift is None else shift)
        zero = xs == 0
        if not zero.any():
            return
        cols = np.flatnonzero(zero.any(axis=0))
        q = _binary_columns(self._packed, cols)  # (N, |cols|) int8 ±1
        c = zero[:, cols].astype(np.float32) @ q.T.astype(np.float32)  # (M, N), exact ints
        d = np.float32(max(np.float32(self.act.alpha), ALPHA_EPS))  # the a1 scale, α_c
        y -= (c * d) * self.weight.scale[None, :]

    @classmethod
    def from_packed_dir(cls, directory: str | os.PathLike, name: str,
                        backend: str | None = None) -> PackedLinearNP:
        """Layer ``name`` (e.g. ``"model.encoder.layers.0.fc1"``) of a ``save_packed`` directory.

        Reads only that layer's tensors with safetensors' numpy reader, with the checks of
        ``load_packed`` (``docs/format.md`` §8, :mod:`tbt.export.integrity`): the format header
        and its checksum, ``config.json``'s checksum, the sha256 of each tensor it reads, and
        finite, non-negative scales. Tensors of other layers are not read, so not verified. A
        file written before tensor checksums loads with a logged warning. Needs the layer's
        ``act`` entry (written by tbt >= the version adding it).

        Raises:
            FormatError: a damaged, truncated or inconsistent file (never a raw safetensors
                error).
            KeyError: ``name`` is not a packed linear layer of the file.
            ValueError: the layer has no integer kernel (float activations, a packed PTQ
                scheme, per-group scales).
        """
        from safetensors import SafetensorError, safe_open

        path = weights_path(directory)
        try:
            with safe_open(str(path), framework="numpy") as f:
                md = f.metadata() or {}
                FormatHeader.from_metadata(md)
                index = {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                         for k in f.keys()}
                verify_header(md, index, path)
                digests, files = read_digests(md, index, path)
                layers, aliases = _layer_table(md, path)
                info = layers.get(name)
                if not isinstance(info, dict) or info.get("kind") != "linear":
                    linears = sorted(k for k, v in layers.items()
                                     if isinstance(v, dict) and v.get("kind") == "linear")
                    raise KeyError(f"{name!r} is not a packed linear layer of {path}; linear "
                                   f"layers: {linears[:8]}{' ...' if len(linears) > 8 else ''}")
                if digests is None:
                    warn_unverified(path)
                verify_files(directory, files)
                if "scheme" in info:
                    raise ValueError(f"layer {name} is a packed PTQ layer (scheme "
                                     f"{info['scheme']!r}, float activations): no integer "
                                     f"kernel; run it with tbt.export.io.load_packed")
                if "act" not in info:
                    raise ValueError(f"layer {name}: the checkpoint records no activation "
                                     f"quantizer (written by an older tbt): export it again")
                if "group_size" in info or "offset" in info:  # docs/methods.md: torch only
                    raise ValueError(f"layer {name}: per-group scales or a weight offset (DLT) "
                                     f"have no runtime kernel format; use load_packed")
                read: dict[str, np.ndarray] = {}

                def get(tensor: str) -> np.ndarray | None:
                    tensor = aliases.get(tensor, tensor)
                    if tensor not in index:
                        return None
                    if tensor not in read:
                        a = f.get_tensor(tensor)
                        verify_array(tensor, a, digests, path)
                        read[tensor] = a
                    return read[tensor]

                return cls._from_entry(name, info, get, backend, path)
        except SafetensorError as e:
            raise FormatError(f"{path} is not a readable safetensors file ({e}): truncated or "
                              f"corrupted") from e

    @classmethod
    def _from_entry(cls, name: str, info: dict, get, backend: str | None,
                    path: Path) -> PackedLinearNP:
        """The layer of a verified ``tbt.layers`` entry; ``get(tensor)`` reads (and checks)."""
        try:
            n, k = (int(v) for v in info["shape"])
            packing = Packing(info["packing"])
            act = info["act"]
            spec = None
            if act is not None:
                act = dict(act)
                if "alpha_tensor" in act:
                    alpha = get(act.pop("alpha_tensor"))
                    if alpha is None or alpha.size != 1:
                        raise FormatError(f"layer {name}: its activation step tensor is "
                                          f"missing or not a scalar")
                    act["alpha"] = float(alpha.reshape(-1)[0])
                spec = ActSpec.from_dict(act)
            packed, scale, bias = get(info["packed"]), get(info["scale"]), get(f"{name}.bias")
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{path}: layer {name}'s entry in tbt.layers is malformed "
                              f"({e!r}): a corrupted file, export it again") from e
        if packed is None or scale is None:
            raise FormatError(f"layer {name}: packed or scale tensor missing from {path}")
        if n < 1 or packed.dtype != np.uint8 or packed.shape != (n, packing.row_bytes(k)):
            raise FormatError(f"layer {name}: packed tensor {packed.dtype} {packed.shape} does "
                              f"not fit {packing.value} ({n}, {k})")
        if scale.shape != (n,) or scale.dtype.kind != "f":
            raise FormatError(f"layer {name}: scale {scale.dtype} {scale.shape}, expected "
                              f"float ({n},)")
        if bias is not None and (bias.shape != (n,) or bias.dtype.kind != "f"):
            raise FormatError(f"layer {name}: bias {bias.dtype} {bias.shape}, expected "
                              f"float ({n},)")
        check_layer_values({name: info}, {}, lambda t: get(t), path, only=name)
        return cls(packed, k, scale, bias, packing, spec, backend)


def _layer_table(md: dict[str, str], path: Path) -> tuple[dict, dict]:
    """``(tbt.layers, tbt.aliases)`` of verified metadata, as dicts (FormatError otherwise)."""
    try:
        layers = json.loads(md["tbt.layers"])
        aliases = json.loads(md.get("tbt.aliases", "{}"))
    except (KeyError, json.JSONDecodeError) as e:
        raise FormatError(f"{path}: packed checkpoint metadata lacks or garbles {e!r}") from e
    if not isinstance(layers, dict) or not isinstance(aliases, dict):
        raise FormatError(f"{path}: tbt.layers and tbt.aliases must be JSON objects")
    return layers, aliases
