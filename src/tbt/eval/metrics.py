"""Text-generation metrics: ROUGE (summarisation), BLEU/chrF (translation), perplexity (LMs).

ROUGE follows the reference code (docs/recipe.md §6): Google's ``rouge_score`` with the Porter
stemmer, scores aggregated with its ``BootstrapAggregator`` and reported as the ``mid`` F-measure
× 100 for rouge1, rouge2, rougeL and rougeLsum. Before scoring, predictions and references are
stripped and split into sentences joined by ``"\\n"``; ``rougeLsum`` (summary-level LCS, the
"RL" of the paper's tables) uses those newlines as sentence boundaries, the other three ignore
them. The bootstrap draws from numpy's global RNG; we seed it (and restore its state), so the
same inputs give the same numbers on every call.

Sentence splitting: the reference uses ``nltk.sent_tokenize``, which needs the ``punkt`` model,
a download, and tbt must work offline. :func:`split_sentences` is a small rule-based splitter
instead: newlines always end a sentence; ``.``, ``!`` or ``?`` (plus closing quotes/brackets)
followed by whitespace and an upper-case letter, digit or opening quote ends one, except after
a known abbreviation ("Mr.", "e.g.", "U.S.") or a single-letter initial ("J. Smith"). On news
text this gives punkt's boundaries in the ordinary cases; where the two differ (rare
abbreviations, lower-case sentence starts) rougeLsum moves by a small amount and the other three
ROUGE scores do not move at all (their tokenizer drops punctuation and newlines).

BLEU/chrF: ``sacrebleu`` corpus scores with its default ``13a`` tokenization. No Romanian
normalisation is applied unless asked (``romanian=True``: cedilla ş/ţ → comma-below ș/ț, then
diacritics removed, the WMT16 En-Ro recipe of Sennrich et al. used by fairseq's mBART scripts);
say which one you report.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

ROUGE_KEYS = ("rouge1", "rouge2", "rougeL", "rougeLsum")

# Lower-cased, without the final period. Kept short on purpose: a missed abbreviation costs one
# extra sentence boundary in rougeLsum, a wrong one merges two sentences.
_ABBREVIATIONS = frozenset("""
mr mrs ms dr prof sr jr st mt ft gen gov sen rep rev col lt sgt capt cmdr adm hon
inc ltd co corp plc dept univ assn bros no nos vol vols fig figs approx est
jan feb mar apr jun jul aug sep sept oct nov dec mon tue wed thu fri sat sun
e.g i.e etc vs cf al u.s u.k u.n e.u a.m p.m d.c
""".split())

# Candidate boundary: terminal punctuation, optional closing quotes/brackets, whitespace, then
# something that can start a sentence.
_BOUNDARY = re.compile(r"([.!?]+[\"'\u2019\u201d)\]]*)\s+(?=[\"'\u2018\u201c(\[]?[A-Z0-9])")
_WORD_BEFORE = re.compile(r"(\S+)$")


def split_sentences(text: str) -> list[str]:
    """Split ``text`` into sentences offline (see the module docstring for the rules).

    >>> split_sentences("Mr. Smith left. He came back!  Then 3 more.")
    ['Mr. Smith left.', 'He came back!', 'Then 3 more.']
    """
    out: list[str] = []
    for line in text.splitlines():
        line = line.strip()
        if line:
            out.extend(_split_line(line))
    return out


def _split_line(line: str) -> list[str]:
    pieces, start = [], 0
    for m in _BOUNDARY.finditer(line):
        if m.group(1).startswith(".") and _is_abbreviation(line[start:m.start()]):
            continue
        pieces.append(line[start:m.end(1)].strip())
        start = m.end()
    pieces.append(line[start:].strip())
    return [p for p in pieces if p]


def _is_abbreviation(before: str) -> bool:
    m = _WORD_BEFORE.search(before)
    if not m:
        return False
    word = m.group(1).lstrip("\"'(\u2018\u201c[").lower()
    return word in _ABBREVIATIONS or (len(word) == 1 and word.isalpha())


def _check_pairs(predictions: Sequence[str], references: Sequence[str]) -> None:
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        raise ValueError("no predictions to score")


def rouge(predictions: Sequence[str], references: Sequence[str], seed: int = 0
          ) -> dict[str, float]:
    """ROUGE-1/2/L/Lsum F-measure × 100 (stemmed; bootstrap ``mid``, as docs/recipe.md §6).

    Returns:
        ``{"rouge1", "rouge2", "rougeL", "rougeLsum"} -> float`` in [0, 100].
    """
    import numpy as np
    from rouge_score import rouge_scorer, scoring

    _check_pairs(predictions, references)
    scorer = rouge_scorer.RougeScorer(list(ROUGE_KEYS), use_stemmer=True)
    agg = scoring.BootstrapAggregator()
    for pred, ref in zip(predictions, references, strict=True):
        agg.add_scores(scorer.score("\n".join(split_sentences(ref)),
                                    "\n".join(split_sentences(pred))))
    state = np.random.get_state()
    np.random.seed(seed)
    try:
        result = agg.aggregate()
    finally:
        np.random.set_state(state)
    return {k: float(result[k].mid.fmeasure * 100) for k in ROUGE_KEYS}


_RO_CEDILLA = str.maketrans({"\u015f": "\u0219", "\u0163": "\u021b",
                             "\u015e": "\u0218", "\u0162": "\u021a"})
_RO_DIACRITICS = str.maketrans({"\u0219": "s", "\u021b": "t", "\u0218": "S", "\u021a": "T",
                                "\u0103": "a", "\u0102": "A", "\u00e2": "a", "\u00c2": "A",
                                "\u00ee": "i", "\u00ce": "I"})


def normalize_romanian(text: str) -> str:
    """WMT16 Romanian normalisation: ş/ţ (cedilla) → ș/ț (comma), then remove diacritics."""
    return text.translate(_RO_CEDILLA).translate(_RO_DIACRITICS)


def bleu(predictions: Sequence[str], references: Sequence[str], romanian: bool = False
         ) -> dict[str, float]:
    """Corpus BLEU (sacrebleu, ``13a`` tokenization) and chrF, one reference per prediction.

    Returns:
        ``{"bleu": float, "chrf": float}``, both in [0, 100].
    """
    import sacrebleu

    _check_pairs(predictions, references)
    preds, refs = list(predictions), list(references)
    if romanian:
        preds = [normalize_romanian(p) for p in preds]
        refs = [normalize_romanian(r) for r in refs]
    return {"bleu": float(sacrebleu.corpus_bleu(preds, [refs], tokenize="13a").score),
            "chrf": float(sacrebleu.corpus_chrf(preds, [refs]).score)}


def perplexity(model: Any, dataloader: Iterable[dict], device: Any) -> float:
    """exp(mean token negative log-likelihood) over every label that is not ``-100``.

    Tokens are pooled over the whole set (not averaged per batch), so padding and batch size do
    not change the result. Decoder-only models predict ``labels[t+1]`` from position ``t``;
    encoder-decoder models predict ``labels[t]`` (the model shifts its decoder inputs).
    """
    import torch
    import torch.nn.functional as F

    was_training = model.training
    model.eval()
    causal = not getattr(model.config, "is_encoder_decoder", False)
    nll, count = 0.0, 0
    with torch.no_grad():
        for batch in dataloader:
            batch = {k: v.to(device) for k, v in batch.items()}
            labels = batch["labels"]
            logits = model(**batch).logits.float()  # (B, T, V)
            if causal:
                logits, labels = logits[:, :-1], labels[:, 1:]
            nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1),
                                   ignore_index=-100, reduction="sum").item()
            count += int((labels != -100).sum())
    model.train(was_training)
    if count == 0:
        raise ValueError("perplexity: no label tokens to score (every label is -100)")
    return math.exp(nll / count)
