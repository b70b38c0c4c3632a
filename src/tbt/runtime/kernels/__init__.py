"""Kernel registry: ``(weight_format, act_format)`` → implementation, per backend (torch-free).

How it works
------------
A kernel computes ``y = x·Wᵀ + bias`` for packed weights and quantized activations; it is named
by what it multiplies: ``t2a8`` (ternary × int8), ``b1a8`` (binary × int8), ``t2a2`` (ternary ×
ternary, bit-planes + popcount), ``b1a1`` (binary × binary, XNOR-popcount). GEMV is ``M = 1``,
GEMM ``M > 1``; the same kernel object does both. Use it in three steps::

    k = get_kernel("t2", "a8")                         # backend: env TBT_KERNEL_BACKEND or auto
    w = k.prepare_weight(packed, in_features, alpha)    # once, at load (re-tiles for the backend)
    y = k(w, quantize_a8(x), bias)                      # float32 (M, N)

``k.prepare_act(qa)`` lays activations out once when they feed several matrices (q/k/v), and
``k.accumulate(w, qa)`` returns the exact int32 accumulator.

Backends: ``"ref"`` (numpy, normative: :mod:`.ref`), ``"native"`` (C, best ISA for this CPU),
``"scalar"``/``"avx2"``/``"avx512"`` (C, one forced path), ``"auto"`` (native when built, else
ref). New implementations register with :func:`register_kernel` (docs/architecture.md: no ``if``
ladders).

Environment: ``TBT_KERNEL_BACKEND`` (default backend), ``TBT_NUM_THREADS`` (native threads;
default all CPUs), ``TBT_PAR_THRESHOLD`` (calls below this many ``M·N·Kpad`` multiply-adds run
on one thread; default 2^18), ``TBT_NATIVE_LIB`` (path of the C library to load instead of the
built one).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, Protocol

import numpy as np

from tbt.runtime.kernels import native
from tbt.runtime.kernels.ref import (ACT_FORMATS, KERNEL_ACT, WEIGHT_FORMATS, PreparedWeight,
                                     QuantizedActivation, RefKernel, quantize_a1, quantize_a2,
                                     quantize_a8)

__all__ = ["Kernel", "get_kernel", "register_kernel", "available_backends", "registered",
           "default_backend", "set_num_threads", "get_num_threads", "KERNELS", "KERNEL_BACKENDS",
           "NATIVE_ISAS", "ENV_BACKEND", "QuantizedActivation", "PreparedWeight",
           "quantize_a8", "quantize_a2", "quantize_a1", "WEIGHT_FORMATS", "ACT_FORMATS"]

ENV_BACKEND = "TBT_KERNEL_BACKEND"
NATIVE_ISAS = ("native", "scalar", "avx2", "avx512")
KERNEL_BACKENDS = ("auto", "ref", *NATIVE_ISAS)  # kernel_backend= (load_packed: backend=)
KERNELS = tuple(KERNEL_ACT)  # ("t2a8", "b1a8", "t2a2", "b1a1")


class Kernel(Protocol):
    """What every registered implementation provides (see the module docstring)."""

    name: str
    backend: str
    weight_format: str
    act_format: str

    def prepare_weight(self, packed: np.ndarray, k: int, scale: np.ndarray,
                       packing: Any = None) -> PreparedWeight: ...
    def prepare_act(self, act: QuantizedActivation) -> Any: ...
    def run(self, w: PreparedWeight, act: Any, bias: np.ndarray | None = None,
            out: np.ndarray | None = None) -> np.ndarray: ...
    def accumulate(self, w: PreparedWeight, act: Any) -> np.ndarray: ...
    def __call__(self, w: PreparedWeight, act: Any, bias: np.ndarray | None = None,
                 out: np.ndarray | None = None) -> np.ndarray: ...


_REGISTRY: dict[tuple[str, str], dict[str, Callable[[], Kernel]]] = {}
_INSTANCES: dict[tuple[str, str, str], Kernel] = {}


def register_kernel(weight_format: str, act_format: str, backend: str):
    """Decorator: register ``factory() -> Kernel`` for a format pair and backend name."""
    def deco(factory: Callable[[], Kernel]) -> Callable[[], Kernel]:
        _REGISTRY.setdefault((weight_format, act_format), {})[backend] = factory
        _INSTANCES.pop((weight_format, act_format, backend), None)
        return factory
    return deco


def _register_builtins() -> None:
    for wf, af in KERNEL_ACT.values():
        register_kernel(wf, af, "ref")(lambda wf=wf, af=af: RefKernel(wf, af))
        for isa in NATIVE_ISAS:
            register_kernel(wf, af, isa)(
                lambda wf=wf, af=af, isa=isa: native.NativeKernel(wf, af, isa))


_register_builtins()


def registered() -> dict[tuple[str, str], tuple[str, ...]]:
    """Every registered format pair and its backend names."""
    return {key: tuple(v) for key, v in _REGISTRY.items()}


def default_backend() -> str:
    """``$TBT_KERNEL_BACKEND`` or ``"auto"``."""
    return os.environ.get(ENV_BACKEND, "").strip().lower() or "auto"


def available_backends() -> list[str]:
    """Backends that run here: ``"ref"`` plus each native ISA the build and CPU support."""
    return ["ref", *[isa for isa in NATIVE_ISAS if native.isa_available(isa)]]


def get_kernel(weight_format: str, act_format: str, backend: str | None = None) -> Kernel:
    """The kernel for ``(weight_format, act_format)``, e.g. ``("t2", "a8")``, on ``backend``.

    Raises:
        KeyError: no kernel for the pair (the message lists those that exist).
        ValueError: unknown backend.
        RuntimeError: a native backend was asked for and is not built or not supported here.
    """
    key = (weight_format, act_format)
    if key not in _REGISTRY:
        raise KeyError(f"no kernel for weight format {weight_format!r} x activation format "
                       f"{act_format!r}; registered: {sorted(_REGISTRY)}")
    backend = (backend or default_backend()).lower()
    if backend == "auto":
        backend = "native" if native.available() else "ref"
    if backend not in _REGISTRY[key]:
        raise ValueError(f"backend {backend!r} unknown for {key}; choose one of "
                         f"{['auto', *_REGISTRY[key]]}")
    if backend in NATIVE_ISAS and not native.available():
        raise RuntimeError(f"backend {backend!r}: {native.unavailable_reason()}")
    inst = _INSTANCES.get((*key, backend))
    if inst is None:
        inst = _INSTANCES[(*key, backend)] = _REGISTRY[key][backend]()
    return inst


def set_num_threads(n: int) -> None:
    """Thread count of the native kernels (no effect on the numpy reference)."""
    if native.available():
        native.set_num_threads(n)


def get_num_threads() -> int:
    return native.get_num_threads() if native.available() else 1
