"""Run the BitLinears of a packed MatMul-free model on the ``t2a8`` kernels (ternary × int8).

Every projection of a converted MatMul-free model is a
:class:`~tbt.export.convert.PackedLinear` whose input quantizer is the per-token absmax int8
one (``act_method="absmax-token"``). That is the ``a8`` activation format with one scale per
row: codes ``clip(rint(x·s), −128, 127)``, scale ``1/s``, ``s = 127/max(max|x|, 1e-5)`` per
token. :func:`use_kernels` swaps each such layer for a :class:`KernelBitLinear` that quantizes
the input in numpy exactly so, runs the registered kernel
(:func:`tbt.runtime.kernels.get_kernel`, ``"t2"`` × ``"a8"``; native C when built, else the
numpy reference) and applies ``acc·(1/s)·γ`` in float32. The integer accumulator is exact; the
float epilogue multiplies by ``1/s`` where the torch path divides by ``s`` and sums in a
different order, so outputs agree to float32 rounding (tests: relative 1e-5 of the row scale),
not bit for bit.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor, nn

from tbt.export.convert import PackedLinear

__all__ = ["KernelBitLinear", "use_kernels", "quantize_absmax_token_np"]

ABSMAX_EPS = np.float32(1e-5)


def quantize_absmax_token_np(x: np.ndarray, bits: int = 8):
    """Per-token absmax codes of float32 ``(M, K)``: a ``QuantizedActivation("a8", ...)``."""
    from tbt.runtime.kernels import QuantizedActivation

    qp = np.float32(2 ** (bits - 1) - 1)
    x = np.ascontiguousarray(x, dtype=np.float32)
    s = qp / np.maximum(np.abs(x).max(axis=1), ABSMAX_EPS)          # (M,)
    codes = np.clip(np.rint(x * s[:, None]), -qp - 1, qp).astype(np.int8)
    return QuantizedActivation("a8", codes, (np.float32(1) / s).astype(np.float32))


class KernelBitLinear(nn.Module):
    """A ternary ``PackedLinear`` with per-token int8 input, computed by the t2a8 kernel."""

    def __init__(self, packed: PackedLinear, backend: str | None = None) -> None:
        super().__init__()
        from tbt.runtime.kernels import get_kernel

        if packed.bits != 2:
            raise ValueError("KernelBitLinear takes ternary (2-bit) layers; this one is "
                             f"{packed.bits}-bit")
        self.in_features, self.out_features = packed.in_features, packed.out_features
        self.act_bits = getattr(packed.act_quant, "bits", 8)
        self.kernel = get_kernel("t2", "a8", backend)
        self.weight = self.kernel.prepare_weight(packed.packed.cpu().numpy(), packed.k,
                                                 packed.scale.cpu().numpy().astype(np.float32),
                                                 packed.packing)
        self.bias = None if packed.bias is None else packed.bias.detach().cpu().numpy()

    def forward(self, x: Tensor) -> Tensor:
        lead = x.shape[:-1]
        xs = x.detach().to(torch.float32).reshape(-1, self.in_features).cpu().numpy()
        y = self.kernel(self.weight, quantize_absmax_token_np(xs, self.act_bits), self.bias)
        return torch.from_numpy(y).to(x.device, x.dtype).reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, kernel={self.kernel!r}"


def use_kernels(model: nn.Module, backend: str | None = None) -> int:
    """Swap every ternary ``PackedLinear`` with a per-token absmax input quantizer for a
    :class:`KernelBitLinear`, in place; returns how many were swapped (inference only)."""
    from tbt.quant.act_methods import AbsmaxTokenQuantizer

    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, PackedLinear) and mod.bits == 2 \
                and isinstance(mod.act_quant, AbsmaxTokenQuantizer):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child,
                    KernelBitLinear(mod, backend))
            n += 1
    if n == 0:
        raise ValueError("use_kernels found no ternary PackedLinear with per-token absmax "
                         "inputs: convert (or load_packed) a MatMul-free model first")
    return n
