"""BitLinear of the MatMul-free LM (docs/related.md §17): RMSNorm → per-token int8 absmax → absmean ternary.

How it works
------------
The MatMul-free LM's ``FusedBitLinear`` is three steps, each of which tbt already has:

1. its **own** RMSNorm of the input (learnable gain, ε = 1e-8): :class:`BitLinear` holds it as
   ``norm`` (a plain ``torch.nn.RMSNorm``, full precision);
2. per-token int8 absmax of the normalised input,
   ``s_x = 127/max(max_j|x_j|, 1e-5)``, ``x_q = clip(round(x·s_x), −128, 127)/s_x``, identity
   STE: tbt's ``act_method="absmax-token"`` (:mod:`tbt.quant.act_methods`);
3. a ternary weight with **one scale per tensor**, ``γ = mean|W|``,
   ``W_q = γ·clip(round(W/(γ+ε)), −1, 1)``, identity STE: tbt's ``method="absmean"``
   (:mod:`tbt.quant.weight`), no bias.

So :class:`BitLinear` is only ``proj(norm(x))`` with a plain ``nn.Linear`` ``proj``;
:func:`bitlinear_config` is the :class:`~tbt.QuantConfig` that makes
:func:`~tbt.quant.surgery.quantize_model` turn every ``proj`` (the LM head's too: nothing is
skipped) into that quantized linear, and the packed export keeps it ternary with the per-token
quantizer in front, which is the ``t2a8`` kernel's format (ternary × int8, one activation scale
per row). Keeping the norm outside the quantized linear means the packed format needs nothing
new; the only FP pieces are the norm gains, the embedding and the model's own block norms.

Difference to the released code (``docs/matmulfree.md``): absmean divides by
``γ + 1e-5`` where ``FusedBitLinear`` divides by ``max(γ, 1e-5)``; the codes differ only for a
weight within ``1e-5/γ`` relative of a rounding threshold.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

__all__ = ["BitLinear", "bitlinear_config", "BITLINEAR_NORM_EPS"]

BITLINEAR_NORM_EPS = 1e-8  # FusedBitLinear's RMSNorm epsilon (docs/related.md §17)


class BitLinear(nn.Module):
    """``y = proj(RMSNorm(x))``: quantized to a MatMul-free BitLinear by :func:`bitlinear_config`.

    Args:
        in_features, out_features: as ``nn.Linear`` (no bias, as the MatMul-free LM).
        eps: the RMSNorm epsilon (1e-8).
    """

    def __init__(self, in_features: int, out_features: int, eps: float = BITLINEAR_NORM_EPS,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.norm = nn.RMSNorm(in_features, eps=eps, device=device, dtype=dtype)
        self.proj = nn.Linear(in_features, out_features, bias=False, device=device, dtype=dtype)

    @property
    def in_features(self) -> int:
        return self.norm.normalized_shape[0]

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(self.norm(x))


def bitlinear_config(**overrides: Any):
    """The :class:`~tbt.QuantConfig` of MatMul-free BitLinear: ``fp-2-8``, absmean per tensor,
    per-token absmax int8 activations, nothing skipped (LM head ternary), no attention."""
    from tbt.config import QuantConfig

    kw = dict(bits="fp-2-8", method="absmean", granularity="tensor", act_method="absmax-token",
              quantize_attention=False, skip_modules=())
    kw.update(overrides)
    return QuantConfig(**kw)
