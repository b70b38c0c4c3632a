"""Convert a fake-quantized model to packed inference modules (``convert_model``).

How it works
------------
Every :class:`~tbt.quant.modules.QuantLinear` whose weight is 1- or 2-bit becomes a
:class:`PackedLinear`: the integer codes of :func:`tbt.quant.weight.weight_codes` packed along
``in_features`` in the format's ``ternary_2bit`` or ``binary_1bit`` packing (``uint8`` buffer
``packed``, ``ceil(K/4)`` or ``ceil(K/8)`` bytes per row), one float32 scale per row
(``scale``; a per-tensor scale is repeated per row, same values), the FP bias, and the *same*
activation-quantizer module, so inference follows the trained quantizers exactly.
:class:`~tbt.quant.modules.QuantEmbedding` becomes :class:`PackedEmbedding` the same way
(``embed_scale`` kept). Embeddings that shared one latent Parameter (BART's three) share one
pair of packed tensors. The tied LM head is untouched: it keeps the FP latent matrix.

The forward unpacks the codes once, dequantizes them exactly as the fake quantizer does
(``dequantize(codes, scale, dtype)``) and caches the float weight in a non-persistent attribute
(cleared on ``load_state_dict`` and ``.to()``). In eval mode a converted model's logits equal the
fake-quantized model's bit for bit (float32), except on an exact-zero latent weight of the
``tbt``/``released`` binary quantizer, which the format stores as ``+α`` (``docs/format.md`` §4).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbt.export.format import Packing
from tbt.export.pack import pack, unpack
from tbt.quant.modules import QuantEmbedding, QuantLinear, WeightSpec
from tbt.quant.weight import dequantize, weight_codes

__all__ = ["PackedLinear", "PackedEmbedding", "convert_model", "packing_for_bits",
           "pack_codes", "unpack_codes"]


def packing_for_bits(bits: int) -> Packing:
    if bits == 2:
        return Packing.TERNARY_2BIT
    if bits == 1:
        return Packing.BINARY_1BIT
    raise ValueError(f"no packing for {bits}-bit weights (1 or 2 only)")


def pack_codes(codes: Tensor, packing: Packing) -> Tensor:
    """int8 codes ``(N, K)`` -> uint8 ``(N, row_bytes)`` (the normative numpy packer)."""
    return torch.from_numpy(np.ascontiguousarray(pack(codes.cpu().numpy(), packing)))


def unpack_codes(packed: Tensor, packing: Packing, k: int) -> Tensor:
    """uint8 ``(N, row_bytes)`` -> int8 codes ``(N, K)`` on ``packed``'s device."""
    q = unpack(packed.detach().cpu().numpy(), packing, k)
    return torch.from_numpy(np.ascontiguousarray(q)).to(packed.device)


def _codes_scale(w: Tensor, spec: WeightSpec) -> tuple[Tensor, Tensor]:
    with torch.no_grad():
        codes, scale = weight_codes(w.detach(), spec.bits, spec.method, spec.variant,
                                    spec.granularity, spec.clip)
    return codes, scale.to(torch.float32).expand(w.shape[0], 1).reshape(-1).contiguous()


class _PackedBase(nn.Module):
    """Shared pieces: packed codes + per-row scale buffers and the lazily cached float weight."""

    packing: Packing
    k: int

    def _init_packed(self, packed: Tensor, scale: Tensor, bits: int, dtype: torch.dtype) -> None:
        self.bits = bits
        self.packing = packing_for_bits(bits)
        self.weight_dtype = dtype
        self.register_buffer("packed", packed)
        self.register_buffer("scale", scale)
        self._w_cache: Tensor | None = None

    def dequantized_weight(self) -> Tensor:
        """The float ``(N, K)`` weight, ``dequantize(codes, scale[:, None], weight_dtype)``."""
        if self._w_cache is None or self._w_cache.device != self.packed.device:
            codes = unpack_codes(self.packed, self.packing, self.k)
            w = dequantize(codes, self.scale.to(torch.float32)[:, None], self.weight_dtype)
            if getattr(self, "w_layout_t", False):  # same memory layout as the fake-quant weight
                w = w.t().contiguous().t()
            self._w_cache = w
        return self._w_cache

    def clear_cache(self) -> None:
        self._w_cache = None

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._w_cache = None

    def _apply(self, fn, *args, **kwargs):
        self._w_cache = None
        return super()._apply(fn, *args, **kwargs)

    def packed_bits(self) -> int:
        """Bits of the packed codes (padding included) plus the scales."""
        return self.packed.numel() * 8 + self.scale.numel() * self.scale.element_size() * 8


class PackedLinear(_PackedBase):
    """``y = F.linear(act_quant(x), α ⊙ unpack(codes), b)``: a converted 1/2-bit ``QuantLinear``."""

    def __init__(self, in_features: int, out_features: int, bits: int, *, bias: bool = True,
                 act_quant: nn.Module | None = None, dtype: torch.dtype = torch.float32,
                 w_layout_t: bool = False) -> None:
        super().__init__()
        self.in_features, self.out_features, self.k = in_features, out_features, in_features
        packing = packing_for_bits(bits)
        self._init_packed(torch.zeros(out_features, packing.row_bytes(in_features), dtype=torch.uint8),
                          torch.zeros(out_features, dtype=torch.float32), bits, dtype)
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype), requires_grad=False) \
            if bias else None
        self.act_quant = act_quant
        self.w_layout_t = w_layout_t

    @classmethod
    def from_quant(cls, ql: QuantLinear) -> PackedLinear:
        spec = ql.weight_spec
        w = ql.weight.t() if ql.transposed else ql.weight
        with torch.no_grad():
            layout_t = not ql.quantized_weight().is_contiguous()
        new = cls(ql.in_features, ql.out_features, spec.bits, bias=ql.bias is not None,
                  act_quant=ql.act_quant, dtype=ql.weight.dtype, w_layout_t=layout_t)
        codes, scale = _codes_scale(w, spec)
        new.packed = pack_codes(codes, new.packing).to(w.device)
        new.scale = scale.to(w.device)
        if ql.bias is not None:
            new.bias = nn.Parameter(ql.bias.detach().clone(), requires_grad=False)
        return new

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.dequantized_weight()
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.packing.value}, "
                f"bias={self.bias is not None}")


class PackedEmbedding(_PackedBase):
    """Token lookup in ``α ⊙ unpack(codes)`` (times ``embed_scale``): a converted ``QuantEmbedding``."""

    def __init__(self, num_embeddings: int, embedding_dim: int, bits: int,
                 padding_idx: int | None = None, embed_scale: float | Tensor | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.k = num_embeddings, embedding_dim, embedding_dim
        self.padding_idx = padding_idx
        packing = packing_for_bits(bits)
        self._init_packed(torch.zeros(num_embeddings, packing.row_bytes(embedding_dim), dtype=torch.uint8),
                          torch.zeros(num_embeddings, dtype=torch.float32), bits, dtype)
        if isinstance(embed_scale, Tensor):
            self.register_buffer("embed_scale", embed_scale.detach().clone(), persistent=False)
        else:
            self.embed_scale = embed_scale

    @classmethod
    def from_quant(cls, qe: QuantEmbedding, shared: tuple[Tensor, Tensor] | None = None
                   ) -> PackedEmbedding:
        new = cls(qe.num_embeddings, qe.embedding_dim, qe.weight_spec.bits, qe.padding_idx,
                  qe.embed_scale, dtype=qe.weight.dtype)
        if shared is None:
            codes, scale = _codes_scale(qe.weight, qe.weight_spec)
            shared = (pack_codes(codes, new.packing).to(qe.weight.device), scale.to(qe.weight.device))
        new.packed, new.scale = shared
        return new

    def forward(self, input_ids: Tensor) -> Tensor:
        out = F.embedding(input_ids, self.dequantized_weight(), self.padding_idx)
        if self.embed_scale is not None:
            out = out * self.embed_scale
        return out

    def extra_repr(self) -> str:
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"{self.packing.value}, embed_scale={self.embed_scale}")


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new)


def convert_model(model: nn.Module) -> nn.Module:
    """Replace 1/2-bit ``QuantLinear``/``QuantEmbedding`` by packed modules, in place.

    Layers at other bit widths (FP, ``uniform`` 3..8-bit) stay as they are. Returns ``model``.
    """
    shared: dict[int, tuple[Tensor, Tensor]] = {}
    n = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantLinear) and mod.weight_spec is not None \
                and mod.weight_spec.bits in (1, 2):
            _set_submodule(model, name, PackedLinear.from_quant(mod))
            n += 1
        elif isinstance(mod, QuantEmbedding) and mod.weight_spec.bits in (1, 2):
            new = PackedEmbedding.from_quant(mod, shared.get(id(mod.weight)))
            shared[id(mod.weight)] = (new.packed, new.scale)
            _set_submodule(model, name, new)
            n += 1
    if n == 0:
        raise ValueError("convert_model found no 1/2-bit QuantLinear/QuantEmbedding to pack")
    return model
