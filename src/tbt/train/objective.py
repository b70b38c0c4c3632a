"""The distillation objective: named loss terms from one student and one teacher forward.

``loss_terms`` returns ``{"ce": ..., "logits": ..., "hidden": ..., "attn": ...}`` (only the
terms with a non-zero weight, and only ``"ce"`` without a teacher); the loop multiplies each by
its weight from :class:`~tbt.train.config.DistillConfig`, sums, and logs every term on its own.

Masks (``mask_padding=True``): encoder positions count where ``attention_mask`` is 1, decoder
positions where the label is not ``-100`` (the decoder input is the shifted label sequence, so
position ``t`` is real iff label ``t`` is), causal-LM positions where ``attention_mask`` is 1.
Attention terms mask both queries and keys (cross attention: decoder queries, encoder keys).
With ``mask_padding=False`` every term is the plain mean of the released code (METHOD.md §4).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from tbt.distill.losses import attention_mse, hidden_mse, soft_cross_entropy, sum_over_layers
from tbt.train.config import DistillConfig

TERMS = ("ce", "logits", "hidden", "attn")


def forward_kwargs(dcfg: DistillConfig, with_teacher: bool) -> dict[str, bool]:
    """What the forwards must return for the terms in use."""
    return {"output_hidden_states": with_teacher and dcfg.w_hidden > 0,
            "output_attentions": with_teacher and dcfg.w_attn > 0}


def _hidden_map(layer_map: tuple[int, ...] | None) -> list[int] | None:
    """Layer map -> hidden-state map: entry 0 is the embedding output, layer i is entry i+1."""
    return None if layer_map is None else [0] + [j + 1 for j in layer_map]


def _last_encoder_twice(s: Tensor, t: Tensor, mask: Tensor | None) -> Tensor:
    """Σ_b MSE(s[b], t[b]): the released code's extra last-encoder term (a sum over examples)."""
    sq = (s.float() - t.float()).square().mean(dim=-1)  # (B, T)
    if mask is None:
        return sq.mean(dim=1).sum()
    m = mask.to(sq.dtype)
    return ((sq * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)).sum()


def loss_terms(s: Any, t: Any | None, batch: dict[str, Tensor], dcfg: DistillConfig,
               seq2seq: bool) -> dict[str, Tensor]:
    """The weighted-later loss terms of one micro-batch (0-dim float32 tensors)."""
    terms = {"ce": s.loss.float()}
    if t is None:
        return terms
    pad = dcfg.mask_padding
    src = batch["attention_mask"].bool() if pad else None  # (B, S)
    tgt = (batch["labels"] != -100) if (pad and seq2seq) else src  # (B, T)
    if dcfg.w_logits > 0:
        terms["logits"] = soft_cross_entropy(s.logits, t.logits.detach(), dcfg.temperature,
                                             mask=tgt)
    dec_map, enc_map = _hidden_map(dcfg.layer_map), _hidden_map(dcfg.encoder_layer_map)
    if dcfg.w_hidden > 0:
        if seq2seq:
            h = (sum_over_layers(hidden_mse, s.encoder_hidden_states, t.encoder_hidden_states,
                                 enc_map, mask=src)
                 + sum_over_layers(hidden_mse, s.decoder_hidden_states, t.decoder_hidden_states,
                                   dec_map, mask=tgt))
            if dcfg.last_encoder_twice:
                h = h + _last_encoder_twice(s.encoder_last_hidden_state,
                                            t.encoder_last_hidden_state, src)
        else:
            h = sum_over_layers(hidden_mse, s.hidden_states, t.hidden_states, dec_map, mask=src)
        terms["hidden"] = h
    if dcfg.w_attn > 0:
        if seq2seq:
            terms["attn"] = (
                sum_over_layers(attention_mse, s.encoder_attentions, t.encoder_attentions,
                                dcfg.encoder_layer_map, query_mask=src, key_mask=src)
                + sum_over_layers(attention_mse, s.decoder_attentions, t.decoder_attentions,
                                  dcfg.layer_map, query_mask=tgt, key_mask=tgt)
                + sum_over_layers(attention_mse, s.cross_attentions, t.cross_attentions,
                                  dcfg.layer_map, query_mask=tgt, key_mask=src))
        else:
            terms["attn"] = sum_over_layers(attention_mse, s.attentions, t.attentions,
                                            dcfg.layer_map, query_mask=src, key_mask=src)
    return terms


def total_loss(terms: dict[str, Tensor], dcfg: DistillConfig) -> Tensor:
    """``Σ_k w_k · term_k`` over the terms present."""
    weights = {"ce": dcfg.w_ce, "logits": dcfg.w_logits, "hidden": dcfg.w_hidden,
               "attn": dcfg.w_attn}
    parts = [weights[k] * v for k, v in terms.items()]
    return sum(parts[1:], parts[0])


def first_non_finite(values: dict[str, float]) -> str | None:
    """Name of the first NaN/inf value in ``values`` (put the terms before the total), or None."""
    for k, v in values.items():
        if not math.isfinite(v):
            return k
    return None
