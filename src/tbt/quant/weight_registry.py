"""The weight-method registry: what a method returns and how it is registered.

Every weight method of :mod:`tbt.quant` is one entry of :data:`WEIGHT_METHODS`, keyed by its
``method=`` name: a pure function for a stateless method (:func:`register_weight_method`), or a
per-layer module class for a method with learned tensors or an output bias
(:func:`register_weight_quantizer`). :func:`check_weight_method` validates ``(method, bits)``
pairs with messages that name the valid choices. :mod:`tbt.quant.weight` re-exports every name.

The built-in methods are loaded by one explicit step, :func:`load_builtin_methods` (run on the
first read of :data:`WEIGHT_METHODS`): it imports the modules that define them. A method added
to one of those modules needs nothing else; a new module gets one line there
(``docs/methods.md``, "Adding a weight quantizer"). This module itself does not import torch.
"""

from __future__ import annotations

from collections.abc import Callable
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple

from tbt.config import GRANULARITIES
from tbt.registry import Registry

if TYPE_CHECKING:
    from torch import Tensor

__all__ = ["QuantizedWeight", "PackedWeight", "PackedLayout", "QuantFn", "Option", "WeightMethod",
           "WEIGHT_METHODS", "register_weight_method", "register_weight_quantizer",
           "check_weight_method", "get_weight_method", "load_builtin_methods"]


class QuantizedWeight(NamedTuple):
    """What a registered method returns.

    codes: int8 ``(out, in)``; scale: float32 ``(out, 1)`` or ``(1, 1)``;
    ste_mask: bool ``(out, in)`` where the gradient passes, or ``None`` for the identity STE
    (also ``None`` whenever ``want_mask`` was False).
    """

    codes: Tensor
    scale: Tensor
    ste_mask: Tensor | None


class PackedWeight(NamedTuple):
    """What the exporter packs for one matrix (every method, stateless or learned).

    codes: int8 ``(out, in)``; scale: float32 ``(out, G)`` (``G = 1`` per row, ``in/g`` per
    group; a per-tensor scale is repeated per row); offset: float32 like ``scale``, added after
    the scale (DLT's shift γ), or ``None``; bias: ``(out,)`` input-independent output bias
    (Tequila's dead-zone term, folded into the layer bias at export), or ``None``.
    The weight is ``dequantize(codes, scale, dtype, offset)``.
    """

    codes: Tensor
    scale: Tensor
    offset: Tensor | None = None
    bias: Tensor | None = None


class PackedLayout(NamedTuple):
    """Shapes of what the exporter stores for a weight, known without reading its values.

    groups: scale columns (1, or in/g per group); has_offset / has_bias: a
    :class:`PackedWeight` ``offset`` / ``bias`` is present; transposed: the fake-quantized weight
    is laid out transposed in memory (F.linear's summation order depends on it).
    """

    groups: int
    has_offset: bool
    has_bias: bool
    transposed: bool


# fn(w, spec, *, per_row, want_mask) -> QuantizedWeight; w is a detached float32 2-D tensor,
# spec the validated WeightSpec (bits, variant, options, ...).
QuantFn = Callable[..., QuantizedWeight]


@dataclass(frozen=True)
class Option:
    """A method-specific option (``QuantConfig.method_options``): its default and bounds."""

    default: float
    ge: float | None = None  # value >= ge
    gt: float | None = None  # value > gt
    le: float | None = None  # value <= le
    doc: str = ""

    def check(self, method: str, name: str, value: Any) -> float:
        """``value`` as a float; ``ValueError`` naming the bounds when it is outside them."""
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        v = float(value) if ok else float("nan")
        ok = ok and (self.ge is None or v >= self.ge) and (self.gt is None or v > self.gt) \
            and (self.le is None or v <= self.le)
        if not ok:
            bounds = [f">= {self.ge}" if self.ge is not None else "",
                      f"> {self.gt}" if self.gt is not None else "",
                      f"<= {self.le}" if self.le is not None else ""]
            raise ValueError(f"{method} option {name} must be a number "
                             f"{' and '.join(b for b in bounds if b)} ({self.doc}; default "
                             f"{self.default}); got {value!r}")
        return v


@dataclass(frozen=True)
class WeightMethod:
    """A registry entry: the quantizer ``fn`` and the bits and default granularity it offers.

    ``quantizer`` is set instead of ``fn`` for a method that keeps per-layer state (a module
    class with ``from_spec``); ``packable`` is False when its codes are not ternary/binary
    (the exporter then keeps the layer fake-quantized); ``options`` are the method's own
    settings (name -> :class:`Option`), given as ``QuantConfig(method_options={...})``.
    """

    name: str
    bits: tuple[int, ...]
    default_granularity: str
    fn: QuantFn | None
    quantizer: type | None = None
    packable: bool = True
    options: Mapping[str, Option] = field(default_factory=dict)

    def resolve_options(self, given: Mapping[str, Any] | None) -> tuple[tuple[str, float], ...]:
        """Every option of the method, ``given`` values checked and defaults filled in,
        as sorted ``(name, value)`` pairs; ``ValueError`` naming the valid options."""
        given = dict(given or {})
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            valid = sorted(self.options) or "none"
            raise ValueError(f"method={self.name!r} has no option(s) {unknown}; its options: "
                             f"{valid}")
        return tuple((n, o.check(self.name, n, given[n]) if n in given else float(o.default))
                     for n, o in sorted(self.options.items()))


def load_builtin_methods() -> None:
    """Import the modules that register tbt's own weight methods (the one loading step)."""
    from tbt.quant import pbllm, tequila, weight, weight_bitnet, weight_learned  # noqa: F401


WEIGHT_METHODS: Registry[WeightMethod] = Registry("weight method", load_builtin_methods)
_BIT_NAMES = {1: "binary", 2: "ternary"}


def register_weight_method(
    name: str, bits: tuple[int, ...], default_granularity: str,
    options: Mapping[str, Option] | None = None,
) -> Callable[[QuantFn], QuantFn]:
    """Decorator: register ``fn`` as weight method ``name`` for ``bits`` (each in 1..8).

    ``fn(w, spec, *, per_row, want_mask) -> QuantizedWeight`` receives a detached float32
    ``(out, in)`` tensor (or its unit view) and the validated
    :class:`~tbt.quant.weight.WeightSpec` (``spec.bits``, ``spec.variant``,
    ``spec.option(name)``); it must not sync with the host. ``options``: the method's own
    settings (docs/methods.md, "Adding a weight quantizer").
    """
    bits = _check_registration(name, bits, default_granularity)

    def deco(fn: QuantFn) -> QuantFn:
        WEIGHT_METHODS.add(name, WeightMethod(name, bits, default_granularity, fn,
                                              options=dict(options or {})))
        return fn

    return deco


def register_weight_quantizer(
    name: str, bits: tuple[int, ...], default_granularity: str, packable: bool = True,
    options: Mapping[str, Option] | None = None,
) -> Callable[[type], type]:
    """Decorator: register a per-layer quantizer *class* as weight method ``name``.

    The class needs ``from_spec(spec, weight) -> module`` (surgery calls it once per layer
    with the :class:`~tbt.quant.weight.WeightSpec` and the latent ``(out, in)`` weight) and the module protocol of
    :class:`tbt.quant.weight_learned.WeightQuantizer` (``forward``, ``codes_and_scale``,
    ``output_bias``).
    """
    bits = _check_registration(name, bits, default_granularity)

    def deco(cls: type) -> type:
        WEIGHT_METHODS.add(name, WeightMethod(name, bits, default_granularity, None, cls,
                                              packable, dict(options or {})))
        return cls

    return deco


def _check_registration(name: str, bits, default_granularity: str) -> tuple[int, ...]:
    WEIGHT_METHODS.check_free(name)
    bits = tuple(bits)
    if not bits or any(isinstance(b, bool) or not isinstance(b, int) or not 1 <= b <= 8
                       for b in bits):
        raise ValueError(f"bits must be a non-empty tuple of ints in 1..8 (int8 codes); got {bits}")
    if default_granularity not in GRANULARITIES:
        raise ValueError(f"default_granularity={default_granularity!r}; choose one of "
                         f"{list(GRANULARITIES)}")
    return bits


def check_weight_method(method: str, bits: int, what: str = "bits") -> None:
    """Raise ``ValueError`` (naming the valid choices) unless ``method`` supports ``bits``.

    ``what`` names the bits in the message, e.g. ``"weight bits of bits='2-3-8'"``.
    """
    spec = get_weight_method(method)
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in spec.bits:
        legend = ", ".join(f"{b} = {_BIT_NAMES[b]}" for b in spec.bits if b in _BIT_NAMES)
        others = sorted(n for n, m in WEIGHT_METHODS.items() if bits in m.bits)
        if isinstance(bits, bool) or not isinstance(bits, int):
            hint = "bits must be an int"
        elif not others:
            hint = "weight bits must be 1 (binary), 2 (ternary) or 3..8"
        elif others == ["uniform"]:
            hint = "use method='uniform' for 3..8 bits"
        else:
            hint = f"for {bits}-bit weights use one of {others}"
        raise ValueError(f"method={method!r} supports {what} in {spec.bits}"
                         f"{f' ({legend})' if legend else ''}; got {bits!r}; {hint}")


def get_weight_method(method: str) -> WeightMethod:
    """The registry entry of ``method``; ``ValueError`` naming the choices if unknown."""
    return WEIGHT_METHODS.get_entry(method)
