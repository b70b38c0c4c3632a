"""Train a subword tokenizer offline on the training files, BART-compatible.

When no pretrained tokenizer can be downloaded (the offline demo, a new domain), tbt trains one
with the ``tokenizers`` library on the text of the chosen columns:

* ``kind="bpe"``: byte-level BPE, as BART/RoBERTa/GPT-2 use. Every byte is in the base alphabet,
  so nothing is ever unknown; vocab_size must leave room for the 256 byte symbols.
* ``kind="unigram"``: a SentencePiece-style unigram LM over Metaspace ("▁") pieces with NFKC
  normalisation, as mBART/T5 use.

Special tokens have BART's ids: ``<s>=0, <pad>=1, </s>=2, <unk>=3`` and ``<mask>`` last, so a
tiny BART config with the usual ``bos/pad/eos = 0/1/2`` matches. ``model_type="bart"`` wraps
every sequence as ``<s> … </s>`` (pairs: ``<s> A </s></s> B </s>``), as ``BartTokenizer`` does;
``model_type="gpt2"`` adds nothing (decoder-only prompts must not end in ``</s>``).

The trained ``tokenizers.Tokenizer`` is wrapped in a transformers fast tokenizer and written
with ``save_pretrained``; the returned object is the one ``AutoTokenizer.from_pretrained`` reads
back, so what the caller gets is exactly what later commands load. (Building a
``BartTokenizerFast(vocab_file=..., merges_file=...)`` by hand is the known trap: it silently
gives an empty vocabulary. Always load from the directory.)
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Sequence
from typing import Any

from tbt.data import read_records

logger = logging.getLogger(__name__)

SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")  # ids 0..3; "<mask>" is appended last
MASK_TOKEN = "<mask>"
KINDS = ("bpe", "unigram")
MODEL_TYPES = ("bart", "gpt2")
_BYTE_ALPHABET = 256


def iter_texts(files: Sequence[str], columns: Sequence[str]) -> Iterator[str]:
    """Yield the non-empty texts of ``columns`` in ``files`` (file order, then row order).

    ``columns`` may name ``translation`` (every language of a translation row) or
    ``translation.<lang>``; a ``.txt`` file's lines are the column ``text``. A missing column
    raises ``ValueError`` listing the columns present.
    """
    for path in files:
        records = read_records(path)
        present = list(records[0])
        for col in columns:
            if col.split(".")[0] not in present:
                raise ValueError(f"{path}: column {col!r} not found; columns present: "
                                 f"{', '.join(map(repr, present))}")
        for rec in records:
            for col in columns:
                yield from _column_texts(rec, col)


def _column_texts(rec: dict[str, Any], col: str) -> Iterator[str]:
    head, _, lang = col.partition(".")
    value = rec.get(head)
    if isinstance(value, dict):
        value = [value.get(lang)] if lang else list(value.values())
    for v in value if isinstance(value, list) else [value]:
        if v is not None and str(v).strip():
            yield str(v)


def _build(kind: str, vocab_size: int, min_frequency: int):
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    specials = list(SPECIAL_TOKENS)
    if kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size - 1, min_frequency=min_frequency, special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    else:
        tok = Tokenizer(models.Unigram())
        tok.normalizer = normalizers.NFKC()
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.UnigramTrainer(vocab_size=vocab_size - 1, special_tokens=specials,
                                          unk_token="<unk>", show_progress=False)
    return tok, trainer


def _post_processor(model_type: str):
    from tokenizers import processors

    if model_type == "gpt2":
        return None
    return processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>",
        special_tokens=[("<s>", 0), ("</s>", 2)])


def train_tokenizer(files: list[str], columns: list[str], vocab_size: int, output_dir: str,
                    kind: str = "bpe", model_type: str = "bart", min_frequency: int = 2,
                    model_max_length: int = 1024):
    """Train a tokenizer on ``columns`` of ``files`` and save it to ``output_dir``.

    Args:
        files: local data files (see :func:`tbt.data.read_records` for formats).
        columns: columns whose text is learned, e.g. ``["document", "summary"]``.
        vocab_size: total vocabulary size, special tokens included (``<mask>`` is the last id;
            the BPE trainer may stop short of it on a tiny corpus).
        output_dir: written with ``save_pretrained``.
        kind: ``"bpe"`` (byte-level) or ``"unigram"``.
        model_type: ``"bart"`` (``<s> … </s>`` around each sequence) or ``"gpt2"`` (none).
        min_frequency: BPE merges need a pair seen at least this often.
        model_max_length: stored in ``tokenizer_config.json``.

    Returns:
        The ``PreTrainedTokenizerFast`` loaded back with ``AutoTokenizer.from_pretrained``.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type must be one of {MODEL_TYPES}, got {model_type!r}")
    floor = _BYTE_ALPHABET + len(SPECIAL_TOKENS) + 1 if kind == "bpe" else 32
    if vocab_size < floor:
        raise ValueError(f"vocab_size {vocab_size} is too small for {kind}: use at least {floor}"
                         + (" (256 byte symbols + 5 special tokens)" if kind == "bpe" else ""))
    if not files:
        raise ValueError("no training files: pass --train-file")
    if not columns:
        raise ValueError("no columns: pass --source-column/--target-column (or --text-column)")

    tok, trainer = _build(kind, vocab_size, min_frequency)
    n = 0

    def counted() -> Iterator[str]:
        nonlocal n
        for t in iter_texts(files, columns):
            n += 1
            yield t

    tok.train_from_iterator(counted(), trainer)
    if n == 0:
        raise ValueError(f"the columns {columns} of {files} hold no text to train on")
    tok.add_special_tokens([MASK_TOKEN])
    post = _post_processor(model_type)
    if post is not None:
        tok.post_processor = post
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        unk_token="<unk>", mask_token=MASK_TOKEN, cls_token="<s>", sep_token="</s>",
        model_max_length=model_max_length)
    os.makedirs(output_dir, exist_ok=True)
    wrapped.save_pretrained(output_dir)
    logger.info("trained a %s tokenizer (%d tokens) on %d texts -> %s", kind,
                tok.get_vocab_size(), n, output_dir)
    return AutoTokenizer.from_pretrained(output_dir, trust_remote_code=False)
