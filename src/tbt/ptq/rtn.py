"""RTN: round-to-nearest with one of tbt's stateless weight quantizers, no training, no data.

``Ŵ = dequantize(*weight_codes(W, bits, method, variant, granularity))`` -- exactly the codes
and scales :func:`tbt.quant.weight.weight_codes` gives (BitNet b1.58 absmean by default:
``γ·round(clip(W/(γ+ε), −1, 1))``, ``γ = mean|W|``, docs/related.md §1a), so an RTN model *is* a
``quantize_model``'d model with its latent weights untouched, and ``save_packed`` stores it as
it stands (ternary_2bit / binary_1bit codes, one float32 scale per row).

Storage (bits): ``rows · (row_bytes(K)·8 + 16)`` for 1/2-bit codes -- the packed format's
bytes, row padding included, and one float16 scale per row (the header's ``scale_dtype =
float16``; ``save_packed`` writes float32 today, 16 more bits per row); ``rows · (bits·K + 16)``
for the 3..8-bit ``uniform`` codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from tbt.ptq.registry import SCALE_BITS, LayerQuant, LayerStats, register_ptq_method
from tbt.quant.weight import check_weight_method, dequantize, weight_codes


@dataclass(frozen=True)
class RTNConfig:
    """Args: bits (1 binary, 2 ternary, 3..8 uniform); method: a tbt weight method
    (``absmean`` BitNet b1.58, ``tbt``, ``twn``, ``bwn``, ``uniform``); variant (``tbt`` only);
    granularity ``row``/``tensor``/``None`` (the method's default)."""

    bits: int = 2
    method: str = "absmean"
    variant: str = "paper"
    granularity: str | None = None

    def __post_init__(self) -> None:
        check_weight_method(self.method, self.bits)
        if self.granularity not in (None, "row", "tensor"):
            raise ValueError(f"granularity={self.granularity!r}; use 'row', 'tensor' or None")


def code_bits(rows: int, k: int, bits: int) -> int:
    """Bits of ``rows`` rows of ``k`` codes at ``bits`` bits in tbt's packed layout."""
    if bits in (1, 2):
        from tbt.export.format import Packing

        packing = Packing.BINARY_1BIT if bits == 1 else Packing.TERNARY_2BIT
        return rows * packing.row_bytes(k) * 8
    return rows * k * bits


@register_ptq_method("rtn", RTNConfig, needs_gram=False,
                     summary="round-to-nearest with a tbt weight quantizer (absmean default)")
def quantize_rtn(w: Tensor, stats: LayerStats, cfg: RTNConfig) -> LayerQuant:
    codes, scale = weight_codes(w, cfg.bits, cfg.method, cfg.variant, cfg.granularity)
    w_hat = dequantize(codes, scale, torch.float32)
    rows, k = w.shape
    bits = code_bits(rows, k, cfg.bits) + rows * SCALE_BITS
    return LayerQuant(w_hat, bits, info={"zeros": float((codes == 0).float().mean())},
                      tensors={"codes": codes, "scale": scale.reshape(-1)})
