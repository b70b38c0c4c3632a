"""Quantized attention, hooked in through transformers' ``AttentionInterface``.

TBT quantizes the four inputs of the two attention matmuls (docs/numerics.md §2a):

    Q̂ = q(Q · d^-½)     K̂ = k(K)     V̂ = v(V)
    P  = softmax(Q̂ K̂ᵀ + mask)           (scores and softmax stay in full precision)
    O  = p(P) V̂

``q``, ``k``, ``v`` are signed quantizers and ``p`` is a non-negative one, each with its own α,
one scalar per tensor (all heads share it). They live in an :class:`AttentionQuantizers` module
attached to each attention module as ``module.tbt_attn``; the function below is registered once as
``"tbt_eager"`` and reads them from the ``module`` argument transformers passes in. This keeps the
model's own modeling file untouched (no forks): any architecture whose attention calls
``ALL_ATTENTION_FUNCTIONS`` works (BART, mBART, Marian, T5, GPT-2, Llama, Qwen2, Mistral ...).

During cached decoding transformers hands us the concatenated (unquantized) cache, and K/V are
re-quantized as a whole, which is what the released code does.

The returned attention weights are the full-precision probabilities before dropout and before
quantization: the distillation target of the released code (docs/recipe.md §2).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

ATTN_IMPLEMENTATION = "tbt_eager"


class AttentionQuantizers(nn.Module):
    """The four activation quantizers of one attention module (query, key, value, probs)."""

    def __init__(self, query: nn.Module, key: nn.Module, value: nn.Module, probs: nn.Module) -> None:
        super().__init__()
        self.query, self.key, self.value, self.probs = query, key, value, probs


def _repeat_kv(x: Tensor, n_rep: int) -> Tensor:
    """(B, H_kv, T, D) -> (B, H_kv * n_rep, T, D) for grouped-query attention."""
    if n_rep == 1:
        return x
    b, h, t, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, t, d).reshape(b, h * n_rep, t, d)


def tbt_attention_forward(
    module: nn.Module,
    query: Tensor,  # (B, H, Tq, D)
    key: Tensor,  # (B, H_kv, Tk, D)
    value: Tensor,  # (B, H_kv, Tk, D)
    attention_mask: Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    position_bias: Tensor | None = None,
    **kwargs,
) -> tuple[Tensor, Tensor]:
    """Eager attention with TBT's activation quantizers; same contract as transformers' eager."""
    quant: AttentionQuantizers | None = getattr(module, "tbt_attn", None)
    if scaling is None:
        scaling = query.size(-1) ** -0.5
    q = query * scaling
    k, v = key, value
    if quant is not None:
        q, k, v = quant.query(q), quant.key(k), quant.value(v)
    n_rep = q.shape[1] // k.shape[1]
    k, v = _repeat_kv(k, n_rep), _repeat_kv(v, n_rep)

    scores = torch.matmul(q, k.transpose(2, 3))  # (B, H, Tq, Tk)
    if position_bias is not None:  # T5's relative position bias
        scores = scores + position_bias
    record = getattr(module, "tbt_record", None)
    if record is not None:  # distillation capture (tbt.distill.capture): Q/K/V, mask-free scores
        record(module, query, key, value, scores, attention_mask)
    if attention_mask is not None:
        scores = scores + attention_mask[..., : k.shape[-2]]
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    p = nn.functional.dropout(probs, p=dropout, training=module.training)
    if quant is not None:
        p = quant.probs(p)
    out = torch.matmul(p, v).transpose(1, 2).contiguous()  # (B, Tq, H, D)
    return out, probs


def register_attention() -> str:
    """Register ``"tbt_eager"`` with transformers (idempotent); returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    AttentionInterface.register(ATTN_IMPLEMENTATION, tbt_attention_forward)
    # Our function consumes the same additive float masks as the eager implementation.
    ALL_MASK_ATTENTION_FUNCTIONS.register(ATTN_IMPLEMENTATION, ALL_MASK_ATTENTION_FUNCTIONS["eager"])
    return ATTN_IMPLEMENTATION
