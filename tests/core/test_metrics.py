"""Metrics on hand-computed examples."""

from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from lensray.core.metrics import coverage, evaluate, pearson, regret, relacc, selected_index, spearman, top1_hit

NAN = float("nan")


@dataclass
class FakePrediction:
    score: np.ndarray
    ok: np.ndarray
    ranks: np.ndarray
    lo: np.ndarray
    hi: np.ndarray

    def rank(self) -> np.ndarray:
        return self.ranks


def fake(score, ranks, ok=None, lo=None, hi=None) -> FakePrediction:
    n = len(score)
    nan = np.full(n, NAN)
    return FakePrediction(
        np.asarray(score, float),
        np.ones(n, bool) if ok is None else np.asarray(ok),
        np.asarray(ranks, float),
        nan if lo is None else np.asarray(lo, float),
        nan if hi is None else np.asarray(hi, float),
    )


def test_pearson_by_hand():
    # dx = dy = (-1.5, -0.5, 0.5, 1.5) up to a swap: sum dx*dy = 4, sum dx^2 = sum dy^2 = 5 -> 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(80.0)
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(100.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-100.0)


def test_pearson_matches_scipy_and_skips_non_finite():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=20), rng.normal(size=20)
    assert pearson(x, y) == pytest.approx(100 * stats.pearsonr(x, y)[0])
    x2 = x.copy()
    x2[[3, 7]] = [NAN, np.inf]
    keep = np.isfinite(x2)
    assert pearson(x2, y) == pytest.approx(100 * stats.pearsonr(x[keep], y[keep])[0])


def test_undefined_correlations_are_nan():
    assert np.isnan(pearson([1, 1, 1], [1, 2, 3]))
    assert np.isnan(pearson([1, NAN, NAN], [1, 2, 3]))
    assert np.isnan(spearman([2, 2, 2], [1, 2, 3]))


def test_spearman_by_hand():
    # ranks (1,2,3,4) vs (1,3,2,4): same as the Pearson example -> 80
    assert spearman([10, 20, 30, 40], [0.1, 3.0, 2.0, 9.0]) == pytest.approx(80.0)
    assert spearman([1, 2, 3], [1, 10, 100]) == pytest.approx(100.0)


def test_relacc_regret_top1_by_hand():
    truth = np.array([2.0, 1.0, 3.0])
    assert relacc(truth, 0) == pytest.approx(50.0)  # (3 - 2) / (3 - 1)
    assert relacc(truth, 1) == pytest.approx(100.0)
    assert relacc(truth, 2) == pytest.approx(0.0)
    assert regret(truth, 0) == pytest.approx(1.0) and regret(truth, 1) == 0.0
    assert top1_hit(truth, 1) and not top1_hit(truth, 0)
    assert np.isnan(relacc(truth, None)) and np.isnan(regret(truth, None)) and not top1_hit(truth, None)
    assert np.isnan(relacc([2.0, 2.0], 0))


def test_coverage_by_hand():
    truth = [2.0, 1.0, 3.0]
    assert coverage([0, 0, NAN], [3, 0.5, NAN], truth) == pytest.approx(1 / 3)
    assert coverage([1, 1, 3], [2, 1, 4], truth) == pytest.approx(1.0)  # bounds inclusive
    assert np.isnan(coverage([NAN] * 3, [NAN] * 3, truth))


def test_selected_follows_rank_not_score():
    # modelsize-style: the score is log(size) (correlated as is), the rank prefers the largest model
    p = fake(score=[1.0, 3.0, 2.0], ranks=[3, 1, 2])
    assert selected_index(p) == 1
    assert selected_index(fake([1.0, 1.0], ranks=[1, 1])) == 0  # ties: first row


def test_evaluate_excludes_failed_rows():
    truth = np.array([1.0, 2.0, 3.0, 4.0, 2.5])
    # row 0 (truly best) failed; rank() puts failed rows last, and even a rank of 1 is ignored
    p = fake(
        score=[NAN, 2.1, 2.9, 4.2, 2.3],
        ranks=[1, 2, 4, 5, 3],
        ok=[False, True, True, True, True],
        lo=[NAN, 2.0, 3.5, 4.0, 2.4],
        hi=[NAN, 2.2, 4.0, 4.5, 2.6],
    )
    m = evaluate(p, truth)
    assert m["n_failed"] == 1
    assert m["selected"] == 1
    assert m["relacc"] == pytest.approx(100 * (4 - 2) / (4 - 1))
    assert m["regret"] == pytest.approx(1.0) and not m["top1"]
    assert m["pearson"] == pytest.approx(pearson([2.1, 2.9, 4.2, 2.3], [2.0, 3.0, 4.0, 2.5]))
    assert m["spearman"] == pytest.approx(100.0)
    assert m["coverage90"] == pytest.approx(3 / 5)  # rows 1, 3, 4; the failed row covers nothing


def test_evaluate_when_everything_failed():
    m = evaluate(fake([NAN, NAN], ranks=[1, 2], ok=[False, False]), np.array([1.0, 2.0]))
    assert m["selected"] is None and m["n_failed"] == 2
    assert np.isnan(m["pearson"]) and np.isnan(m["relacc"]) and np.isnan(m["coverage90"])


def test_ok_row_with_non_finite_score_counts_as_failed():
    m = evaluate(fake([NAN, 1.0, 2.0], ranks=[1, 2, 3]), np.array([1.0, 2.0, 3.0]))
    assert m["n_failed"] == 1 and m["selected"] == 1


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    values=st.lists(
        st.tuples(st.floats(0.5, 10, allow_nan=False), st.floats(0.5, 10, allow_nan=False)), min_size=3, max_size=12
    ),
    seed=st.integers(0, 2**16),
)
def test_metrics_invariant_to_row_order(values, seed):
    score, truth = (np.array(v) for v in zip(*values))
    perm = np.random.default_rng(seed).permutation(len(score))
    ranks = stats.rankdata(score, method="ordinal")
    a = evaluate(fake(score, ranks), truth)
    b = evaluate(fake(score[perm], ranks[perm]), truth[perm])
    for key in ("pearson", "spearman", "relacc", "regret"):
        assert a[key] == pytest.approx(b[key], nan_ok=True, abs=1e-9)
    assert perm[b["selected"]] == a["selected"]
