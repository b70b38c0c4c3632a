"""Stateless absmean-family weight methods: BitNet binary and TriLM (Spectra).

Both are registered in :data:`tbt.quant.weight.WEIGHT_METHODS` and so work with
:func:`~tbt.quant.weight.quantize_weight`, :func:`~tbt.quant.weight.weight_codes`, every
granularity of :mod:`tbt.quant.granularity` and the packed export. Each function sees one unit
per row (``per_row=True``) or the whole matrix (``per_row=False``).

``bitnet-binary`` (bits 1; per tensor by default) -- BitNet (Wang et al. 2023, docs/related.md §1b):
centre with ``α = mean(W)``, codes ``sign(W − α)`` with an exact 0 mapped to +1 (one-bit
packable), output scale ``β = mean|W|`` (of the *uncentred* weight, ``‖W‖₁/(nm)``), identity STE.
The paper's per model-parallel group scale is ``granularity="shard"``.

``trilm`` (bits 2; per shard by default, ``num_shards=1`` = per tensor) -- TriLM (Kaushal et al.
2024, docs/related.md §9): ``γ = ε + mean|W|`` per shard, codes ``round(clip(W/γ, −1, 1))``, scale
``γ``, identity STE. Unlike ``absmean`` (BitNet b1.58: divisor ``γ + ε``, scale ``γ``), the ε is
part of the stored scale, as TriLM writes it. ε = 1e-5 [choice: the paper gives no value].
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import Tensor

from tbt.quant.weight_ops import ABSMEAN_EPS, mean, round_clip, sign_pm1
from tbt.quant.weight_registry import QuantizedWeight, register_weight_method

if TYPE_CHECKING:
    from tbt.quant.weight import WeightSpec

TRILM_EPS = ABSMEAN_EPS


@register_weight_method("bitnet-binary", bits=(1,), default_granularity="tensor")
def _bitnet_binary(w: Tensor, spec: WeightSpec, *, per_row: bool, want_mask: bool) -> QuantizedWeight:
    """β·sign(W − mean W), β = mean|W| (docs/related.md §1b)."""
    codes = sign_pm1(w - mean(w, per_row))
    return QuantizedWeight(codes, mean(w.abs(), per_row), None)


@register_weight_method("trilm", bits=(2,), default_granularity="shard")
def _trilm(w: Tensor, spec: WeightSpec, *, per_row: bool, want_mask: bool) -> QuantizedWeight:
    """γ·round(clip(W/γ, −1, 1)), γ = ε + mean|W| (docs/related.md §9)."""
    gamma = mean(w.abs(), per_row) + TRILM_EPS
    return QuantizedWeight(round_clip(w / gamma, 1), gamma, None)
