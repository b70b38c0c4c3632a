"""Per-example scores and bootstrap confidence intervals over test examples.

A corpus score such as ROUGE-1 is (up to the aggregator) the mean of a per-example score, so its
uncertainty from the choice of test examples is estimated by resampling examples with
replacement (Efron's percentile bootstrap). Two systems scored on the *same* examples are
compared with a **paired** bootstrap: each resample draws one set of example indices and takes
the mean of the per-example differences, so the example-to-example variation that both systems
share (easy and hard documents) cancels out (Koehn 2004, "Statistical significance tests for
machine translation evaluation"). Every interval here uses one index matrix drawn from a seeded
generator, so the same inputs give the same interval, and rows compared with one matrix are
paired with each other too.

The intervals cover the test-set sampling only. Training-seed variation is a separate source:
:mod:`tbt.demo.replicate` averages each example's score over seeds before bootstrapping and
reports the spread of the per-seed scores next to it.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

ROUGE_EXAMPLE_KEYS = ("rouge1", "rouge2", "rougeLsum")


def per_example_rouge(predictions: Sequence[str], references: Sequence[str],
                      keys: Sequence[str] = ROUGE_EXAMPLE_KEYS) -> dict[str, np.ndarray]:
    """ROUGE F-measure × 100 of every (prediction, reference) pair, float64 arrays.

    The same scorer and preprocessing as :func:`tbt.eval.metrics.rouge` (Porter stemmer;
    sentences split and joined by newlines for rougeLsum), so the mean of these scores is the
    statistic whose bootstrap ``mid`` that function reports.
    """
    from rouge_score import rouge_scorer

    from tbt.eval.metrics import split_sentences

    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    scorer = rouge_scorer.RougeScorer(list(keys), use_stemmer=True)
    out = {k: np.empty(len(predictions), dtype=np.float64) for k in keys}
    for i, (pred, ref) in enumerate(zip(predictions, references, strict=True)):
        s = scorer.score("\n".join(split_sentences(ref)), "\n".join(split_sentences(pred)))
        for k in keys:
            out[k][i] = s[k].fmeasure * 100.0
    return out


def bootstrap_indices(n: int, n_resamples: int = 2000, seed: int = 0) -> np.ndarray:
    """``(n_resamples, n)`` example indices drawn uniformly with replacement (seeded)."""
    if n < 1 or n_resamples < 1:
        raise ValueError(f"need n >= 1 and n_resamples >= 1; got n={n}, "
                         f"n_resamples={n_resamples}")
    return np.random.default_rng(seed).integers(0, n, size=(n_resamples, n))


def bootstrap_ci(scores: Sequence[float] | np.ndarray, confidence: float = 0.95,
                 indices: np.ndarray | None = None, n_resamples: int = 2000, seed: int = 0
                 ) -> tuple[float, float, float]:
    """``(mean, low, high)``: the mean of ``scores`` and its percentile bootstrap interval.

    Args:
        scores: one number per test example.
        confidence: the interval's coverage (0.95: the 2.5 % and 97.5 % quantiles of the
            resampled means, numpy's default linear interpolation).
        indices: a ``(R, n)`` index matrix (:func:`bootstrap_indices`); drawn from
            ``n_resamples`` and ``seed`` when ``None``. Pass one matrix to several calls to
            pair them.
    """
    x = np.asarray(scores, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"scores must be a non-empty 1-D sequence; got shape {x.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1); got {confidence}")
    if indices is None:
        indices = bootstrap_indices(x.size, n_resamples, seed)
    if indices.ndim != 2 or indices.shape[1] != x.size:
        raise ValueError(f"indices of shape {indices.shape} do not resample {x.size} examples")
    means = x[indices].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [tail, 1.0 - tail])
    return float(x.mean()), float(lo), float(hi)


def paired_bootstrap(a: Sequence[float] | np.ndarray, b: Sequence[float] | np.ndarray,
                     confidence: float = 0.95, indices: np.ndarray | None = None,
                     n_resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """``(mean(a - b), low, high)``: the gap between two systems scored on the same examples
    (``a[i]`` and ``b[i]`` are example ``i``), with its paired percentile bootstrap interval."""
    xa, xb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if xa.shape != xb.shape:
        raise ValueError(f"paired scores need the same examples: shapes {xa.shape} and "
                         f"{xb.shape}")
    return bootstrap_ci(xa - xb, confidence, indices, n_resamples, seed)


__all__ = ["bootstrap_ci", "bootstrap_indices", "paired_bootstrap", "per_example_rouge"]
