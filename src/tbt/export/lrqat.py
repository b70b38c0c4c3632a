"""Merging low-rank QAT (:mod:`tbt.quant.lrqat`) into packed layers (``docs/lrqat.md``).

After training, each :class:`~tbt.quant.lrqat.LRQATLinear` holds integer grid codes
``grid(Z)`` and a scale ``s``: :func:`merge_lrqat` turns it into a plain
:class:`~tbt.inference.packed.PackedLinear` and packs the rest of the model, so
:func:`~tbt.export.io.save_packed` writes an ordinary tbt checkpoint.
"""

from __future__ import annotations

import torch
from torch import nn

from tbt.export.convert import convert_model
from tbt.inference.packed import PackedLinear, pack_codes
from tbt.quant.lrqat import GRIDS, LRQATLinear
from tbt.quant.modules import QuantEmbedding, QuantLinear

__all__ = ["merge_lrqat", "packed_from_lrqat"]


def packed_from_lrqat(mod: LRQATLinear) -> PackedLinear:
    """The merged :class:`~tbt.inference.packed.PackedLinear` of ``mod`` (codes ``grid(Z)``,
    scale s)."""
    new = PackedLinear(mod.in_features, mod.out_features, mod.bits,
                       bias=mod.bias is not None, act_quant=mod.act_quant,
                       dtype=mod.weight_dtype)
    dev = mod.phi.device
    # a learned scale may cross zero; s·q = |s|·(sign(s)·q) keeps every row's values while the
    # packed format's scales stay >= 0 (docs/format.md §8), and the ±1/0 grids are symmetric
    scale = mod.scale.detach().to(torch.float32).reshape(-1)
    flip = torch.where(scale < 0, -1, 1).to(torch.int8)
    new.packed = pack_codes(mod.codes() * flip[:, None], new.packing).to(dev)
    new.scale = scale.abs().clone()
    if mod.bias is not None:
        new.bias = nn.Parameter(mod.bias.detach().clone(), requires_grad=False)
    return new.to(dev)


def merge_lrqat(model: nn.Module) -> nn.Module:
    """Replace every :class:`LRQATLinear` by its merged ``PackedLinear`` and convert the rest.

    Remaining 1/2-bit ``QuantLinear``/``QuantEmbedding`` layers are packed with
    :func:`~tbt.export.convert.convert_model`, so the result is a fully converted model that
    :func:`~tbt.export.io.save_packed` writes as a plain tbt checkpoint. In place; returns it.
    """
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, LRQATLinear)]
    if not found:
        raise ValueError("merge_lrqat found no LRQATLinear (apply_lrqat was not run)")
    for name, mod in found:
        model.set_submodule(name, packed_from_lrqat(mod))
    if any(isinstance(m, (QuantLinear, QuantEmbedding)) and m.weight_spec is not None
           and m.weight_spec.bits in GRIDS for m in model.modules()):
        convert_model(model)
    return model
