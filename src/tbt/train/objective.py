"""The distillation objective: named loss terms from one student and one teacher forward.

``loss_terms`` returns ``{"ce": ..., "logits": ..., "hidden": ..., "attn": ...}`` plus the
optional ``"off"``, ``"attn_scores"`` and ``"relation"`` terms (only the terms with a non-zero
weight, and only ``"ce"`` without a teacher); the loop multiplies each by its weight from
:class:`~tbt.train.config.DistillConfig`, sums, and logs every term on its own.
:func:`distill_forward` runs the two forwards (capturing Q/K/V and scores when a term needs
them, :mod:`tbt.distill.capture`) and returns the terms.

Which layers: ``off`` uses the hidden states of ``hidden`` (embedding output and every layer,
through the layer maps); ``attn_scores`` the attentions of ``attn`` (encoder self, decoder
self, cross); ``relation`` the *self*-attentions only (encoder and decoder), at
``relation_layers`` of each stack, summing the Q-Q, K-K and V-V KLs of each layer.

Masks (``mask_padding=True``): encoder positions count where ``attention_mask`` is 1, decoder
positions where the label is not ``-100`` (the decoder input is the shifted label sequence, so
position ``t`` is real iff label ``t`` is), causal-LM positions where ``attention_mask`` is 1.
Attention terms mask both queries and keys (cross attention: decoder queries, encoder keys).

Decoder-only seq2seq (``target_only=True``, the ``prompt-target`` task): the logit term counts
only the positions that predict a target token (position ``t`` where label ``t + 1`` is not
``-100``: the last prompt token and every target token but the eos), the positions the
cross-entropy counts, whatever ``mask_padding`` says. Hidden states and attention keep every real
position, prompt included: the prompt plays the encoder's part, whose states and
self-attention the seq2seq terms distil too.
With ``mask_padding=False`` every term is the plain mean of the released code (docs/recipe.md §2).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch
from torch import Tensor

from tbt.distill.capture import AttentionCapture, capture_attention
from tbt.distill.losses import (
    attention_mse,
    attention_relation_kl,
    attention_score_mse,
    feature_cosine,
    hidden_mse,
    soft_cross_entropy,
    sum_over_layers,
)
from tbt.train.config import DistillConfig

TERMS = ("ce", "logits", "hidden", "attn", "off", "attn_scores", "relation")
WEIGHT_OF = {"ce": "w_ce", "logits": "w_logits", "hidden": "w_hidden", "attn": "w_attn",
             "off": "w_off", "attn_scores": "w_attn_scores", "relation": "w_relation"}


def forward_kwargs(dcfg: DistillConfig, with_teacher: bool) -> dict[str, bool]:
    """What the forwards must return for the terms in use."""
    return {"output_hidden_states": with_teacher and (dcfg.w_hidden > 0 or dcfg.w_off > 0),
            "output_attentions": with_teacher and dcfg.w_attn > 0}


def distill_forward(model: Any, teacher: Any | None, batch: dict[str, Tensor],
                    dcfg: DistillConfig, seq2seq: bool, target_only: bool = False
                    ) -> dict[str, Tensor]:
    """Student forward, teacher forward under ``no_grad``, then :func:`loss_terms`."""
    kw = forward_kwargs(dcfg, teacher is not None)
    capture = teacher is not None and dcfg.needs_capture
    want = dict(scores=dcfg.w_attn_scores > 0, qkv=dcfg.w_relation > 0)
    with (capture_attention(model, **want) if capture else contextlib.nullcontext()) as s_cap:
        s = model(**batch, **kw)
    t = t_cap = None
    if teacher is not None:
        with torch.no_grad(), (capture_attention(teacher, **want) if capture
                               else contextlib.nullcontext()) as t_cap:
            t = teacher(**batch, **kw)
    return loss_terms(s, t, batch, dcfg, seq2seq, captures=(s_cap, t_cap) if capture else None,
                      target_only=target_only)


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
               seq2seq: bool, captures: tuple[AttentionCapture, AttentionCapture] | None = None,
               target_only: bool = False) -> dict[str, Tensor]:
    """The weighted-later loss terms of one micro-batch (0-dim float32 tensors).

    ``captures`` (student, teacher) are needed for ``attn_scores`` and ``relation``.
    ``target_only`` (decoder-only seq2seq): the logit term over target predictions only
    (:func:`target_predictions`).
    """
    terms = {"ce": s.loss.float()}
    if t is None:
        return terms
    pad = dcfg.mask_padding
    src = batch["attention_mask"].bool() if pad else None  # (B, S)
    tgt = (batch["labels"] != -100) if (pad and seq2seq) else src  # (B, T)
    if dcfg.w_logits > 0:
        lmask = target_predictions(batch["labels"]) if target_only and not seq2seq else tgt
        terms["logits"] = soft_cross_entropy(s.logits, t.logits.detach(), dcfg.temperature,
                                             mask=lmask)
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
    if dcfg.w_off > 0:
        if seq2seq:
            terms["off"] = (
                sum_over_layers(feature_cosine, s.encoder_hidden_states, t.encoder_hidden_states,
                                enc_map, mask=src)
                + sum_over_layers(feature_cosine, s.decoder_hidden_states,
                                  t.decoder_hidden_states, dec_map, mask=tgt))
        else:
            terms["off"] = sum_over_layers(feature_cosine, s.hidden_states, t.hidden_states,
                                           dec_map, mask=src)
    if dcfg.needs_capture:
        if captures is None:
            raise ValueError("w_attn_scores / w_relation need the captured attention of both "
                             "models: call distill_forward (or pass captures=)")
        terms.update(_captured_terms(*captures, dcfg, seq2seq, src, tgt))
    return terms


def target_predictions(labels: Tensor) -> Tensor:
    """``(B, T)`` bool: the positions of a decoder-only model whose output predicts a label,
    ``mask[:, t] = labels[:, t + 1] != -100`` (the model shifts labels by one), last column
    False."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def _stacks(seq2seq: bool, src: Tensor | None, tgt: Tensor | None, dcfg: DistillConfig):
    """(stack, layer map, query mask, key mask) of every attention stack of the model."""
    if not seq2seq:
        return [("decoder", dcfg.layer_map, src, src)]
    return [("encoder", dcfg.encoder_layer_map, src, src), ("decoder", dcfg.layer_map, tgt, tgt),
            ("cross", dcfg.layer_map, tgt, src)]


def _captured_terms(s_cap: AttentionCapture, t_cap: AttentionCapture, dcfg: DistillConfig,
                    seq2seq: bool, src: Tensor | None, tgt: Tensor | None) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    scores, relation = [], []
    for stack, lmap, qm, km in _stacks(seq2seq, src, tgt, dcfg):
        ss, ts = s_cap[stack], t_cap[stack]
        if not ss:
            raise ValueError(f"no {stack} attention was captured from the student")
        pairs = _pair_layers(len(ss), len(ts), lmap, stack)
        if dcfg.w_attn_scores > 0:
            scores += [attention_score_mse(ss[i].scores, ts[j].scores, qm, km,
                                           None if not dcfg.mask_padding else ss[i].allowed)
                       for i, j in pairs]
        if dcfg.w_relation > 0 and stack != "cross":
            chosen = _chosen_layers(len(ss), dcfg.relation_layers)
            for i, j in pairs:
                if i in chosen:
                    for x in ("query", "key", "value"):
                        relation.append(attention_relation_kl(
                            getattr(ss[i], x), getattr(ts[j], x), dcfg.relation_heads,
                            query_mask=qm, key_mask=km))
    if scores:
        out["attn_scores"] = sum(scores[1:], scores[0])
    if relation:
        out["relation"] = sum(relation[1:], relation[0])
    return out


def _pair_layers(n_s: int, n_t: int, layer_map: tuple[int, ...] | None, stack: str
                 ) -> list[tuple[int, int]]:
    if layer_map is None:
        if n_s != n_t:
            raise ValueError(f"{n_s} student and {n_t} teacher {stack} attentions: pass a "
                             f"layer map to pair them")
        return [(i, i) for i in range(n_s)]
    if len(layer_map) != n_s or max(layer_map) >= n_t:
        raise ValueError(f"layer map {list(layer_map)} does not fit {n_s} student and {n_t} "
                         f"teacher {stack} attentions")
    return list(enumerate(layer_map))


def _chosen_layers(n: int, layers: tuple[int, ...] | None) -> set[int]:
    if layers is None:
        return set(range(n))
    bad = [i for i in layers if not -n <= i < n]
    if bad:
        raise ValueError(f"relation_layers {bad} out of range for {n} student layers")
    return {i % n for i in layers}


def total_loss(terms: dict[str, Tensor], dcfg: DistillConfig) -> Tensor:
    """``Σ_k w_k · term_k`` over the terms present."""
    parts = [getattr(dcfg, WEIGHT_OF[k]) * v for k, v in terms.items()]
    return sum(parts[1:], parts[0])


def first_non_finite(values: dict[str, float]) -> str | None:
    """Name of the first NaN/inf value in ``values`` (put the terms before the total), or None."""
    for k, v in values.items():
        if not math.isfinite(v):
            return k
    return None


class NonFiniteLossError(RuntimeError):
    """A loss term (or the gradient norm) became NaN/inf; raised before the bad update."""
