"""Bootstrap intervals against float64 references on hand-made scores."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest

from tbt.eval.bootstrap import (bootstrap_ci, bootstrap_indices, paired_bootstrap,
                                per_example_rouge)


def _quantile_ref(values: list[float], q: float) -> float:
    """numpy's default ('linear') quantile, written out: position q·(R−1) in sorted order."""
    v = sorted(values)
    pos = q * (len(v) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(v) - 1)
    return v[lo] + (pos - lo) * (v[hi] - v[lo])


def test_ci_matches_a_plain_python_reference():
    scores = [12.0, 40.5, 33.25, 0.0, 51.0, 27.75, 18.5, 44.0]
    idx = bootstrap_indices(len(scores), 500, seed=3)
    means = [sum(scores[j] for j in row) / len(row) for row in idx.tolist()]
    mean, lo, hi = bootstrap_ci(scores, 0.9, indices=idx)
    assert mean == pytest.approx(sum(scores) / len(scores), abs=1e-12)
    assert lo == pytest.approx(_quantile_ref(means, 0.05), abs=1e-12)
    assert hi == pytest.approx(_quantile_ref(means, 0.95), abs=1e-12)


def test_paired_gap_is_the_bootstrap_of_differences_with_shared_indices():
    a = [30.0, 10.0, 55.0, 42.0, 20.0, 35.0]
    b = [28.0, 9.0, 50.0, 43.0, 15.0, 33.0]
    idx = bootstrap_indices(len(a), 400, seed=1)
    diffs = [x - y for x, y in zip(a, b)]
    ref = [sum(diffs[j] for j in row) / len(row) for row in idx.tolist()]
    gap, lo, hi = paired_bootstrap(a, b, indices=idx)
    assert gap == pytest.approx(sum(diffs) / len(diffs), abs=1e-12)
    assert (lo, hi) == pytest.approx((_quantile_ref(ref, 0.025), _quantile_ref(ref, 0.975)),
                                     abs=1e-12)
    # pairing removes the shared example difficulty: the unpaired spread is far wider
    ma = [sum(a[j] for j in row) / len(row) for row in idx.tolist()]
    mb = [sum(b[j] for j in row) / len(row) for row in bootstrap_indices(len(b), 400, 2)]
    unpaired = sorted(x - y for x, y in zip(ma, mb))
    assert hi - lo < (_quantile_ref(unpaired, 0.975) - _quantile_ref(unpaired, 0.025)) / 3


def test_constant_gap_gives_a_degenerate_interval():
    a = np.array([3.5, 17.0, 60.25, 8.0])
    gap, lo, hi = paired_bootstrap(a + 1.25, a, n_resamples=300, seed=0)
    assert gap == lo == hi == 1.25


def test_resampled_means_follow_the_exact_bootstrap_distribution():
    """n = 3: the 27 ordered resamples are equally likely; compare the Monte Carlo CDF of the
    resampled mean with the exact one computed by enumeration."""
    x = [1.0, 4.0, 10.0]
    exact = [sum(c) / 3 for c in itertools.product(x, repeat=3)]
    idx = bootstrap_indices(3, 40000, seed=7)
    mc = np.asarray(x)[idx].mean(axis=1)
    for t in sorted(set(exact)):
        p_exact = sum(m <= t + 1e-12 for m in exact) / 27
        assert abs(float((mc <= t + 1e-12).mean()) - p_exact) < 0.01, t
    # the interval's ends are values the resampled mean can take, inside [min, max]
    _, lo, hi = bootstrap_ci(x, indices=idx)
    assert min(x) <= lo <= hi <= max(x)
    assert lo == pytest.approx(min(exact, key=lambda m: abs(m - lo)))


def test_input_errors():
    with pytest.raises(ValueError, match="same examples"):
        paired_bootstrap([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="non-empty"):
        bootstrap_ci([])
    with pytest.raises(ValueError, match="do not resample"):
        bootstrap_ci([1.0, 2.0], indices=np.zeros((5, 3), dtype=int))


def test_per_example_rouge_mean_matches_the_corpus_metric():
    from tbt.eval.metrics import rouge

    preds = ["the cat sat on the mat", "a dog barked loudly at night", "nothing matches"]
    refs = ["the cat sat on a mat", "the dog barked at night. It was loud.", "totally other"]
    per = per_example_rouge(preds, refs)
    # hand check of example 0, ROUGE-1: 5 of 6 unigrams shared each way -> F = 5/6
    assert per["rouge1"][0] == pytest.approx(500 / 6, abs=1e-9)
    assert per["rouge1"][2] == 0.0
    corpus = rouge(preds, refs)
    for k in ("rouge1", "rouge2", "rougeLsum"):  # the aggregator's mid is close to the mean
        assert per[k].dtype == np.float64
        assert abs(per[k].mean() - corpus[k]) < 5.0
