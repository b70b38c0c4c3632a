"""Quantizers (weights and activations), quantized layers and model conversion."""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "quantize_weight": "tbt.quant.weight",
    "weight_codes": "tbt.quant.weight",
    "ElasticQuantizer": "tbt.quant.activation",
    "MinMaxQuantizer": "tbt.quant.activation",
    "calibrate": "tbt.quant.activation",
    "QuantLinear": "tbt.quant.modules",
    "QuantEmbedding": "tbt.quant.modules",
    "quantize_model": "tbt.quant.surgery",
}
__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'tbt.quant' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)
