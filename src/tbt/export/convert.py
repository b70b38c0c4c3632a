"""Convert a fake-quantized model to packed inference modules (``convert_model``).

How it works
------------
Every :class:`~tbt.quant.modules.QuantLinear` whose weight is 1- or 2-bit becomes a
:class:`~tbt.inference.packed.PackedLinear`: the integer codes of the layer's ``WeightSpec``
(``spec.codes_and_scale``) packed in the format's ``ternary_2bit`` or ``binary_1bit`` packing,
one float32 scale per row (a per-tensor scale is repeated per row, same values), the FP bias,
and the *same* activation-quantizer module, so inference follows the trained quantizers
exactly. :class:`~tbt.quant.modules.QuantEmbedding` becomes a
:class:`~tbt.inference.packed.PackedEmbedding` the same way (``embed_scale`` kept). Embeddings
that shared one latent Parameter (BART's three) share one pair of packed tensors. The tied LM
head is untouched (TBT: it keeps the FP latent matrix) unless training quantized it
(``QuantConfig(skip_modules=())``): then it is a ``QuantLinear`` on the embedding's Parameter
and quantizer, and its ``PackedLinear`` shares the embedding's packed tensors too.

How the packed modules run (the torch path and the integer kernels) is
:mod:`tbt.inference.packed`'s business.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tbt.inference.packed import PackedEmbedding, PackedLinear, pack_codes
from tbt.quant.modules import QuantEmbedding, QuantLinear, WeightSpec

__all__ = ["convert_model", "packed_linear", "packed_embedding"]


def _stored(t: Tensor | None, n: int) -> Tensor | None:
    """A ``(N|1, G)`` scale/offset as stored: float32 ``(N,)`` per row, ``(N, G)`` per group."""
    if t is None:
        return None
    t = t.to(torch.float32).expand(n, t.shape[-1])
    return (t.reshape(-1) if t.shape[-1] == 1 else t).contiguous()


def _codes_scale(w: Tensor,
                 spec: WeightSpec) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(codes, stored scale, stored offset or None, output bias or None) of ``spec`` on ``w``
    (``spec.codes_and_scale``: a stateless WeightSpec or a learned weight-quantizer module)."""
    with torch.no_grad():
        pw = spec.codes_and_scale(w.detach())
    n = w.shape[0]
    return pw.codes, _stored(pw.scale, n), _stored(pw.offset, n), pw.bias


def packed_linear(ql: QuantLinear, skeleton: bool = False) -> PackedLinear:
    """Pack ``ql``'s quantized weight; ``skeleton``: zero buffers to load a checkpoint into
    (the latent weight is never read, so it may be uninitialised memory)."""
    spec = ql.weight_spec
    w = ql.weight.t() if ql.transposed else ql.weight
    layout = spec.packed_layout(w)  # shapes and memory layout, without reading values
    has_bias = ql.bias is not None or layout.has_bias
    new = PackedLinear(ql.in_features, ql.out_features, spec.bits, bias=has_bias,
              act_quant=ql.act_quant, dtype=ql.weight.dtype, w_layout_t=layout.transposed)
    if skeleton:
        n = ql.out_features
        if layout.groups > 1:
            new.scale = torch.zeros(n, layout.groups, dtype=torch.float32)
        if layout.has_offset:
            new.offset = torch.zeros_like(new.scale)
        if has_bias:
            ref = ql.bias if ql.bias is not None else ql.weight
            new.bias = nn.Parameter(torch.zeros(n, dtype=ref.dtype), requires_grad=False)
        return new
    codes, scale, offset, extra = _codes_scale(w, spec)
    new.packed = pack_codes(codes, new.packing).to(w.device)
    new.scale = scale.to(w.device)
    new.offset = None if offset is None else offset.to(w.device)
    if has_bias:  # Tequila's dead-zone term folds into the bias, as effective_bias adds it
        if ql.bias is None:
            b = extra
        else:
            b = ql.bias.detach() if extra is None else ql.bias.detach() + extra
        new.bias = nn.Parameter(b.detach().clone(), requires_grad=False)
    return new


def packed_embedding(qe: QuantEmbedding, shared: tuple | None = None,
                     skeleton: bool = False) -> PackedEmbedding:
    """Pack ``qe``'s quantized weight (``shared``: the packed tensors of a tied matrix already
    packed; ``skeleton``: zero buffers to load a checkpoint into)."""
    new = PackedEmbedding(qe.num_embeddings, qe.embedding_dim, qe.weight_spec.bits,
                          qe.padding_idx, qe.embed_scale, dtype=qe.weight.dtype)
    if skeleton and shared is None:
        layout = qe.weight_spec.packed_layout(qe.weight)
        if layout.groups > 1:
            new.scale = torch.zeros(qe.num_embeddings, layout.groups, dtype=torch.float32)
        if layout.has_offset:
            new.offset = torch.zeros_like(new.scale)
        return new
    if shared is None:
        codes, scale, offset, _ = _codes_scale(qe.weight, qe.weight_spec)  # no bias here
        dev = qe.weight.device
        shared = (pack_codes(codes, new.packing).to(dev), scale.to(dev),
                  None if offset is None else offset.to(dev))
    new.packed, new.scale, new.offset = shared
    return new


def convert_model(model: nn.Module, skeleton: bool = False) -> nn.Module:
    """Replace 1/2-bit ``QuantLinear``/``QuantEmbedding`` by packed modules, in place.

    Layers at other bit widths (FP, ``uniform`` 3..8-bit) stay as they are. ``skeleton``:
    build the packed modules with zero buffers, without quantizing the latent weights (what
    ``load_packed`` loads a checkpoint into). Returns ``model``.
    """
    shared: dict[int, tuple] = {}  # id(latent Parameter) -> (spec, (packed, scale, offset))
    n = 0
    for name, mod in list(model.named_modules()):
        spec = getattr(mod, "weight_spec", None)
        if spec is None or spec.bits not in (1, 2) or not spec.packable:
            continue  # FP, 3..8-bit, or 4-level codes (seq-int2): stay fake-quantized
        if not isinstance(mod, (QuantLinear, QuantEmbedding)):
            continue
        tied = shared.get(id(mod.weight))
        if tied is not None and tied[0] is not spec:
            tied = None  # the same Parameter under another quantizer: packed on its own
        transposed = isinstance(mod, QuantLinear) and mod.transposed
        if isinstance(mod, QuantLinear):
            new = packed_linear(mod, skeleton)
            if tied is not None and not transposed:
                # a quantized LM head tied to the token embedding: same matrix, same quantizer,
                # so the same codes and scales, stored once (save_packed aliases them)
                new.packed, new.scale, new.offset = tied[1]
        else:
            new = packed_embedding(mod, None if tied is None else tied[1], skeleton)
        if tied is None and not transposed:
            shared[id(mod.weight)] = (spec, (new.packed, new.scale, new.offset))
        model.set_submodule(name, new)
        n += 1
    if n == 0:
        raise ValueError("convert_model found no 1/2-bit QuantLinear/QuantEmbedding to pack")
    return model
