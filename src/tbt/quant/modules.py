"""Quantized layers: thin modules that wire a weight quantizer and an activation quantizer.

``QuantLinear`` keeps a *latent* full-precision weight (the thing the optimizer updates) and, on
every forward, uses its fake-quantized copy ``quantize_weight(W)``; its input first passes through
an activation quantizer (``ElasticQuantizer`` with a learned step α, or the fixed 8-bit
``MinMaxQuantizer``). The bias stays in full precision and is added after the product, as in the
released TBT code (docs/numerics.md §1a).

``QuantEmbedding`` does the same for the token-embedding lookup. With tied embeddings (BART, T5,
GPT-2) the quantized embedding *shares* its latent Parameter with the LM head, which stays a plain
``nn.Linear``: token lookups see the quantized matrix and the output projection the full-precision
one. This is what the released code computes and what docs/numerics.md §2a writes down.

Both modules only wire specs to functions; every formula lives in :mod:`tbt.quant.weight` and
:mod:`tbt.quant.activation`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tbt.quant.weight import WeightSpec


class QuantLinear(nn.Module):
    """``y = F.linear(act_quant(x), quantize_weight(W), b)`` with a latent float ``W``.

    Args:
        in_features, out_features, bias: as ``nn.Linear``.
        weight_spec: how ``W`` is quantized; ``None`` keeps it in full precision.
        act_quant: module applied to the input (``None`` = float activations).
        transposed: the weight is stored ``(in, out)`` like transformers' GPT-2 ``Conv1D``; it is
            quantized per *output* channel all the same, and the state dict keeps that layout.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        weight_spec: WeightSpec | None,
        act_quant: nn.Module | None = None,
        transposed: bool = False,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.transposed = transposed
        shape = (in_features, out_features) if transposed else (out_features, in_features)
        self.weight = nn.Parameter(torch.empty(shape, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(out_features, device=device, dtype=dtype)) if bias else None
        self.weight_spec = weight_spec
        self.act_quant = act_quant

    @classmethod
    def from_float(
        cls, mod: nn.Module, weight_spec: WeightSpec | None, act_quant: nn.Module | None
    ) -> QuantLinear:
        """Wrap an ``nn.Linear`` (or a transformers ``Conv1D``), *sharing* its Parameters."""
        transposed = not isinstance(mod, nn.Linear)  # Conv1D: weight (in, out), y = x @ W + b
        in_f, out_f = (mod.weight.shape if transposed else mod.weight.shape[::-1])
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.in_features, new.out_features, new.transposed = int(in_f), int(out_f), transposed
        new.weight = mod.weight
        new.bias = mod.bias
        new.weight_spec = weight_spec
        new.act_quant = act_quant
        return new

    def quantized_weight(self) -> Tensor:
        """The effective ``(out, in)`` weight of the forward pass."""
        w = self.weight.t() if self.transposed else self.weight
        return w if self.weight_spec is None else self.weight_spec(w)

    def effective_bias(self) -> Tensor | None:
        """``b`` plus the weight quantizer's input-independent output term (Tequila), if any."""
        if self.weight_spec is None:
            return self.bias
        extra = self.weight_spec.output_bias(self.weight.t() if self.transposed else self.weight)
        if extra is None:
            return self.bias
        return extra if self.bias is None else self.bias + extra

    def forward(self, x: Tensor) -> Tensor:
        if self.act_quant is not None:
            x = self.act_quant(x)
        w = self.quantized_weight()
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        return F.linear(x, w, self.effective_bias())

    def extra_repr(self) -> str:
        spec = self.weight_spec
        w = "fp" if spec is None else f"{spec.bits}-bit {spec.method}/{spec.variant}"
        t = ", transposed" if self.transposed else ""
        return f"in={self.in_features}, out={self.out_features}, weight={w}, bias={self.bias is not None}{t}"


class QuantEmbedding(nn.Module):
    """Token-embedding lookup in the quantized matrix (latent float weight, shared if tied).

    Keeps a word-embedding scale (BART's ``embed_scale``) when the wrapped module had one.
    """

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        padding_idx: int | None = None,
        *,
        weight_spec: WeightSpec,
        embed_scale: float | Tensor | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = num_embeddings, embedding_dim
        self.padding_idx = padding_idx
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, device=device, dtype=dtype))
        self.weight_spec = weight_spec
        self.embed_scale = embed_scale

    @classmethod
    def from_float(cls, emb: nn.Embedding, weight_spec: WeightSpec) -> QuantEmbedding:
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_embeddings, new.embedding_dim = emb.num_embeddings, emb.embedding_dim
        new.padding_idx = emb.padding_idx
        new.weight = emb.weight
        new.weight_spec = weight_spec
        scale = getattr(emb, "embed_scale", None)
        if isinstance(scale, Tensor):  # a buffer in some models: keep it a buffer
            new.register_buffer("embed_scale", scale.detach().clone(), persistent=False)
        else:
            new.embed_scale = scale
        return new

    def quantized_weight(self) -> Tensor:
        return self.weight_spec(self.weight)

    def forward(self, input_ids: Tensor) -> Tensor:
        if self.weight_spec.row_local:
            # Quantize only the rows looked up: identical values and gradients (per-row stats).
            rows = F.embedding(input_ids, self.weight, self.padding_idx)  # (..., D)
            out = self.weight_spec(rows.reshape(-1, self.embedding_dim)).view_as(rows)
        else:
            out = F.embedding(input_ids, self.quantized_weight(), self.padding_idx)
        if self.embed_scale is not None:
            out = out * self.embed_scale
        return out

    def extra_repr(self) -> str:
        s = self.weight_spec
        return (f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, "
                f"weight={s.bits}-bit {s.method}/{s.variant}, embed_scale={self.embed_scale}")
