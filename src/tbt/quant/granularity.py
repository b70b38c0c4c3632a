"""Scale granularity of a weight quantizer: which weights share one scale (docs/related.md §0).

How it works
------------
Every weight quantizer in :mod:`tbt.quant` computes its statistics (means, maxima, learned steps)
over *units*: sets of weights that share one scale. The four granularities are views of the
``(N, K) = (out, in)`` weight as a ``(U, n)`` matrix whose rows are the units:

============  =========================================  ==============  =======================
granularity   unit                                       ``(U, n)``      exported scale shape
============  =========================================  ==============  =======================
``row``       one output row (TBT, TWN/BWN per filter)   ``(N, K)``      ``(N, 1)``
``tensor``    the whole matrix (BitNet b1.58)            ``(1, N·K)``    ``(1, 1)``
``group``     ``g`` contiguous inputs of one row          ``(N·K/g, g)``  ``(N, K/g)``
              (Tequila g = 128, DLT per group)
``shard``     ``N/S`` contiguous output rows: one         ``(S, N·K/S)``  ``(N, 1)``, each value
              model-parallel shard (TriLM/Spectra)                        repeated ``N/S`` times
============  =========================================  ==============  =======================

A quantizer that works "per row" on the unit view therefore offers all four granularities.
``group`` needs ``g | K`` and ``shard`` needs ``S | N``; :func:`check_units` says so with the
divisors to choose from. Shards split the *output* rows, as a column-parallel linear does; so
a shard scale is also a (repeated) per-row scale and packs in the per-row format.

:func:`expand_scale` turns an exported ``(N, G)`` scale into one that broadcasts against the
``(N, K)`` codes; the fake-quantized weight and the packed export both dequantize through it,
so the two compute the same float32 products.
"""

from __future__ import annotations

from torch import Tensor

from tbt.config import GRANULARITIES

__all__ = ["GRANULARITIES", "check_units", "unit_shape", "to_units", "scale_from_units",
           "expand_scale"]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def check_units(shape: tuple[int, int], granularity: str, group_size: int = 128,
                num_shards: int = 1) -> None:
    """Raise ``ValueError`` unless an ``(N, K)`` weight splits into units of ``granularity``."""
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity={granularity!r} is unknown; choose one of "
                         f"{list(GRANULARITIES)}")
    n, k = shape
    if granularity == "group":
        if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
            raise ValueError(f"group_size must be a positive int; got {group_size!r}")
        if k % group_size:
            raise ValueError(f"granularity='group' needs group_size to divide in_features={k}; "
                             f"got group_size={group_size}: choose one of {_divisors(k)[-6:]} "
                             f"or granularity='row'")
    if granularity == "shard":
        if isinstance(num_shards, bool) or not isinstance(num_shards, int) or num_shards < 1:
            raise ValueError(f"num_shards must be a positive int; got {num_shards!r}")
        if n % num_shards:
            raise ValueError(f"granularity='shard' needs num_shards to divide out_features={n}; "
                             f"got num_shards={num_shards}: choose one of {_divisors(n)[:6]}")


def unit_shape(shape: tuple[int, int], granularity: str, group_size: int = 128,
               num_shards: int = 1) -> tuple[int, int]:
    """``(U, n)``: number of units and weights per unit (module table)."""
    n, k = shape
    if granularity == "row":
        return n, k
    if granularity == "tensor":
        return 1, n * k
    if granularity == "group":
        return n * (k // group_size), group_size
    return num_shards, (n // num_shards) * k  # shard


def to_units(w: Tensor, granularity: str, group_size: int = 128, num_shards: int = 1) -> Tensor:
    """``(N, K)`` -> ``(U, n)`` view (a copy only if ``w`` is not contiguous); rows = units."""
    return w.reshape(unit_shape(tuple(w.shape), granularity, group_size, num_shards))


def scale_from_units(s: Tensor, shape: tuple[int, int], granularity: str,
                     num_shards: int = 1) -> Tensor:
    """A per-unit ``(U, 1)`` tensor -> its exported shape (module table)."""
    n, _ = shape
    if granularity == "row":
        return s.reshape(n, 1)
    if granularity == "tensor":
        return s.reshape(1, 1)
    if granularity == "group":
        return s.reshape(n, -1)
    return s.reshape(num_shards, 1).repeat_interleave(n // num_shards, dim=0)  # shard


def expand_scale(scale: Tensor, k: int) -> Tensor:
    """``(N|1, 1)`` stays (it broadcasts); ``(N, G)`` with ``G > 1`` -> ``(N, K)``, ``K/G`` each."""
    groups = scale.shape[-1]
    if groups == 1:
        return scale
    if k % groups:
        raise ValueError(f"a scale with {groups} groups per row does not divide K={k}")
    return scale.repeat_interleave(k // groups, dim=-1)
