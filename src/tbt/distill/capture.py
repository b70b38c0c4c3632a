"""Capturing what the attention computes: Q, K, V and the pre-softmax scores, per layer.

``output_attentions`` gives the attention *probabilities* only. TernaryBERT's score loss needs
the logits before the softmax, and MiniLM / BitDistill's relation loss needs Q, K and V. Both are
read inside tbt's ``"tbt_eager"`` attention function (:mod:`tbt.quant.attention`), which calls
``module.tbt_record(...)`` when an attention module carries one. :func:`capture_attention` sets
that attribute on every attention module of a model for the duration of one forward and collects
one :class:`AttentionRecord` per call, sorted into stacks by the module's name:

* ``"cross"``: encoder-decoder attention (BART/mBART/Marian ``encoder_attn``, T5
  ``EncDecAttention``);
* ``"encoder"``: any other attention under an ``encoder`` module;
* ``"decoder"``: the rest (the decoder of a seq2seq model, every layer of a causal LM).

Within a stack, records are in call order, i.e. layer order. The model must use the
``"tbt_eager"`` implementation (a quantized student does; :func:`tbt.train.build.build_models`
switches the teacher and a full-precision student to it when these terms are on). A full
precision model with no ``tbt_attn`` quantizers computes exactly what the eager attention does.

What is recorded (shapes as transformers hands them to the attention function):

* ``query`` ``(B, H, Tq, D)``, ``key``/``value`` ``(B, H_kv, Tk, D)``: after the projections
  and rotary embeddings, before the scaling and before TBT's attention-input quantizers;
* ``scores`` ``(B, H, Tq, Tk)``: ``q̂ k̂ᵀ`` (+ T5's position bias), the logits the softmax sees,
  without the additive mask;
* ``allowed`` ``(B, 1, Tq, Tk)`` bool: the pairs the additive mask leaves open (causal and key
  padding), ``None`` when the model passed no mask.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

STACKS = ("encoder", "decoder", "cross")
_CROSS_NAMES = ("encoder_attn", "EncDecAttention", "crossattention")


@dataclass
class AttentionRecord:
    """One attention call; unrequested fields are ``None``."""

    query: Tensor | None
    key: Tensor | None
    value: Tensor | None
    scores: Tensor | None
    allowed: Tensor | None


def stack_of(name: str) -> str:
    """``"cross"``, ``"encoder"`` or ``"decoder"`` for an attention module's qualified name."""
    parts = name.split(".")
    if any(p in _CROSS_NAMES for p in parts):
        return "cross"
    return "encoder" if "encoder" in parts else "decoder"


class AttentionCapture:
    """Collects :class:`AttentionRecord` objects per stack (see the module docstring)."""

    def __init__(self, scores: bool = True, qkv: bool = True) -> None:
        self.want_scores, self.want_qkv = scores, qkv
        self.records: dict[str, list[AttentionRecord]] = {k: [] for k in STACKS}

    def record(self, stack: str, module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
               scores: Tensor, attention_mask: Tensor | None) -> None:
        allowed = None
        if self.want_scores and attention_mask is not None:
            mask = attention_mask[..., : scores.shape[-1]]  # (B, 1, Tq, Tk) additive
            allowed = mask > torch.finfo(mask.dtype).min / 2 if mask.is_floating_point() else mask
        qkv = (query, key, value) if self.want_qkv else (None, None, None)
        self.records[stack].append(AttentionRecord(*qkv, scores if self.want_scores else None,
                                                   allowed))

    def __getitem__(self, stack: str) -> list[AttentionRecord]:
        return self.records[stack]


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """Qualified name -> module for every attention module (the ones surgery quantizes)."""
    from tbt.quant.surgery import _is_attention

    return {n: m for n, m in model.named_modules() if _is_attention(m)}


@contextlib.contextmanager
def capture_attention(model: nn.Module, scores: bool = True, qkv: bool = True
                      ) -> Iterator[AttentionCapture]:
    """Record every attention call of ``model`` inside the block (see module docstring).

    Raises:
        ValueError: on leaving the block, if the model has attention modules but none reported
            (its attention implementation is not ``"tbt_eager"``).
    """
    cap = AttentionCapture(scores, qkv)
    mods = attention_modules(model)
    if not mods:
        raise ValueError(f"{type(model).__name__} has no attention modules to capture")
    for name, mod in mods.items():
        mod.tbt_record = functools.partial(cap.record, stack_of(name))
    try:
        yield cap
    finally:
        for mod in mods.values():
            del mod.tbt_record
    if not any(cap.records.values()):
        impl = getattr(getattr(model, "config", None), "_attn_implementation", None)
        raise ValueError(f"no attention call was captured: the model's attention "
                         f"implementation is {impl!r}; capturing scores or Q/K/V needs "
                         f"'tbt_eager' (tbt.quant.attention.register_attention(), then "
                         f"model.set_attn_implementation('tbt_eager'))")
