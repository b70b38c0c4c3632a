"""Architectures tbt defines itself (registered with transformers' Auto classes on import).

``tbt.models.matmulfree``: the MatMul-free LM (MLGRU + GLU, ternary BitLinear everywhere).
"""

from __future__ import annotations


def register() -> None:
    """Register every tbt architecture with ``AutoConfig``/``AutoModelForCausalLM`` (idempotent)."""
    import tbt.models.matmulfree  # noqa: F401  (registration side effect)
