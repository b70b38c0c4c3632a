"""tbt: ternary and binary transformer text generators.

Quantization-aware distillation of Hugging Face models into ternary (-1, 0, +1) and binary (+-1)
students (Liu et al., "Binary and Ternary Natural Language Generation", ACL 2023), packed 2-bit and
1-bit checkpoints, and multiplication-free CPU kernels.

``import tbt`` is light: transformers, datasets and accelerate are imported only by the functions
that need them.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

from tbt.quant import _LAZY as _QUANT  # the quantization names (tbt.quant imports nothing)

_LAZY = {
    "QuantConfig": "tbt.config",
    "parse_bits": "tbt.config",
    **_QUANT,
    "soft_cross_entropy": "tbt.distill.losses",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'tbt' has no attribute {name!r}")
    return getattr(importlib.import_module(mod), name)


def __dir__() -> list[str]:
    return sorted(__all__)
