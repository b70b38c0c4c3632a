"""The copy warm-up: a synthetic copy task that starts a from-scratch seq2seq model copying.

A small encoder-decoder trained from random weights on real text first learns the summaries'
language model and ignores its input for a long, unpredictable time. A few hundred steps on a
synthetic copy task (random token ids; the target is the first source tokens) teach it to read
the source through cross attention, position by position, first. ``docs/training.md``
("Notes: the demo corpus and the copy warm-up") has the measurements behind the settings.
"""

from __future__ import annotations

__all__ = ["copy_warmup_batch"]


def copy_warmup_batch(batch_size: int, vocab_size: int, source_length: int = 62,
                      target_length: int = 24, generator=None, bos_token_id: int = 0,
                      eos_token_id: int = 2) -> dict:
    """A batch of the synthetic copy task that starts a from-scratch seq2seq model copying.

    Random token ids; labels = ``<s>`` + the first ``target_length`` source tokens + ``</s>``.
    Training on it first teaches position-to-position cross attention, which a small BART
    trained from random weights on real text takes hundreds to thousands of steps to find. A
    warm-up for the demo's teacher only, never evaluated; the settings in which it was measured
    to work (and those in which it did not) are in docs/training.md, "Notes: the demo corpus
    and the copy warm-up".

    Returns ``{"input_ids": (B, source_length + 2), "attention_mask", "labels": (B,
    target_length + 2)}`` long tensors; ``bos_token_id``/``eos_token_id`` (default 0/2, BART's
    and tbt's tokenizers) are ``<s>``/``</s>``, the tokens are drawn from ``[5, vocab_size - 1)``
    (no special tokens, no ``<mask>``). :func:`tbt.train.loop.copy_warmup` passes
    ``vocab_size = min(len(tokenizer), COPY_WARMUP_VOCAB)``.
    """
    import torch

    if target_length > source_length:
        raise ValueError("target_length must be <= source_length")
    body = torch.randint(5, vocab_size - 1, (batch_size, source_length), generator=generator)
    bos = torch.full((batch_size, 1), bos_token_id, dtype=torch.long)
    eos = torch.full((batch_size, 1), eos_token_id, dtype=torch.long)
    ids = torch.cat([bos, body, eos], dim=1)  # (B, S + 2)
    labels = torch.cat([ids[:, : target_length + 1], eos], dim=1)  # (B, T + 2)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
