"""The PTQ method registry and the per-layer result every method returns.

A post-training method maps one weight matrix ``W`` (``(out, in)``, float32) -- and, for the
GPTQ-style methods, the layer's calibration statistics -- to a :class:`LayerQuant`: the
dequantized weight ``w_hat`` that the model computes with, the exact number of bits its
storage needs (codes + scales + masks + indices, nothing left out), and method-specific
details for the report. Methods register with :func:`register_ptq_method` (no if-ladders) and
declare their frozen config class, so the CLI and the benchmark build any method by name.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from torch import Tensor

from tbt.registry import Registry

SCALE_BITS = 16  # every scale/offset is counted as float16 (docs/ptq.md, "bits per weight")

__all__ = ["SCALE_BITS", "LayerQuant", "LayerStats", "PTQMethod", "PTQ_METHODS",
           "register_ptq_method", "get_ptq_method", "make_method_config"]


@dataclass
class LayerStats:
    """What a method may use besides ``W``: the layer's input Gram matrix and its token count.

    ``gram`` is ``Σ_t x_t x_tᵀ`` over the calibration tokens, float64 ``(in, in)``; ``None``
    when the run collected none (calibration-free methods only).
    """

    gram: Tensor | None = None
    n_tokens: int = 0


@dataclass
class LayerQuant:
    """One quantized layer.

    Attributes:
        w_hat: float32 ``(out, in)``, the weight the quantized layer computes with.
        bits: total storage of the layer in bits under the method's honest accounting.
        bits_reported: the same under the method paper's/code's own convention (``None`` when
            it is the same number), so both can be printed.
        info: JSON-able details (iterations, errors, searched ``k``/``p``, salient fraction).
        tensors: what an exporter would store (codes, scales, masks), name -> tensor.
    """

    w_hat: Tensor
    bits: int
    bits_reported: float | None = None
    info: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, Tensor] = field(default_factory=dict)


QuantizeFn = Callable[[Tensor, LayerStats, Any], LayerQuant]


@dataclass(frozen=True)
class PTQMethod:
    """A registry entry: name, config class, whether it needs the Gram matrix, and ``fn``."""

    name: str
    config_cls: type
    needs_gram: bool
    fn: QuantizeFn
    summary: str


def load_builtin_methods() -> None:
    """Import the modules that register tbt's own PTQ methods (the one loading step)."""
    from tbt.ptq import billm, pbllm, ptqtp, rtn  # noqa: F401


PTQ_METHODS: Registry[PTQMethod] = Registry("PTQ method", load_builtin_methods)


def register_ptq_method(name: str, config_cls: type, needs_gram: bool, summary: str
                        ) -> Callable[[QuantizeFn], QuantizeFn]:
    """Decorator: register ``fn(w, stats, cfg) -> LayerQuant`` as PTQ method ``name``."""
    PTQ_METHODS.check_free(name)

    def deco(fn: QuantizeFn) -> QuantizeFn:
        PTQ_METHODS.add(name, PTQMethod(name, config_cls, needs_gram, fn, summary))
        return fn

    return deco


def get_ptq_method(name: str) -> PTQMethod:
    """The registry entry of ``name``; ``ValueError`` naming the choices if unknown."""
    return PTQ_METHODS.get_entry(name)


def make_method_config(name: str, options: dict[str, Any]) -> Any:
    """Build method ``name``'s config from ``options``, ignoring keys that are ``None``.

    Raises ``ValueError`` naming the options the method does not have.
    """
    method = get_ptq_method(name)
    known = {f.name for f in fields(method.config_cls)}
    given = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"PTQ method {name!r} has no option(s) {unknown}; its options are "
                         f"{sorted(known)}")
    return method.config_cls(**given)
