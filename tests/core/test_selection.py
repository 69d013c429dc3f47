"""Selection methods: Prediction shape and ranking, failed rows, lensray's saturation and
intervals, and the figures on the shared tables (AtS reproduces the reference; lensray's
targets), on pseudo-protocols with nearer targets and on synthetic zoos."""

from pathlib import Path

import numpy as np
import pytest

from lensray.run.benchmark import run_benchmark
from lensray.core.curves import Curves, load_curves_csv
from lensray.errors import LensrayInputError
from lensray.core.selection import SELECTORS, LensraySelector, Prediction, get_selector
from lensray.core.synthetic_zoo import synthetic_zoo

TARGET = 204800
RATIOS = [8, 16, 32, 64, 128, 256, 512]
REF_ATS = {  # the authors' public AtS code on the shared tables: PearCorr, RelAcc per ratio
    "flan": ([90.9, 73.1, 65.5, 61.1, 52.2, 50.5, 45.6], [93.6, 93.2, 93.2, 93.2, 85.3, 93.2, 93.2]),
    "wmt19": ([98.9, 97.0, 97.7, 86.0, 78.0, 73.4, 61.5], [99.1, 99.1, 99.6, 99.1, 99.1, 99.1, 99.1]),
}


def _zoo(n: int = 6, seed: int = 0) -> Curves:
    """Rectified-law curves with small seeded noise, sizes 0, 200, ..., 25600."""
    rng = np.random.default_rng(seed)
    D = np.concatenate([[0.0], 200.0 * 2.0 ** np.arange(8)])
    B = rng.uniform(20, 60, n)
    Dl = rng.uniform(5, 40, n)
    beta = rng.uniform(0.3, 0.5, n)
    E = rng.uniform(0.5, 1.0, n)
    L = B[:, None] / (Dl[:, None] + D[None, :] ** beta[:, None]) + E[:, None]
    L *= np.exp(rng.normal(0, 0.004, L.shape))
    return Curves([f"m{i}" for i in range(n)], D, L, size=rng.uniform(1e8, 1e9, n))


@pytest.mark.parametrize("name", sorted(SELECTORS))
def test_every_selector_returns_a_prediction_of_the_right_shape(name):
    curves = _zoo()
    pred = get_selector(name).predict(curves, TARGET)
    n = len(curves)
    assert isinstance(pred, Prediction) and pred.ids == curves.ids
    for arr in (pred.loss, pred.lo, pred.hi, pred.score, pred.ok):
        assert np.shape(arr) == (n,)
    assert len(pred.errors) == n
    assert pred.ok.all() and np.isfinite(pred.score).all()
    assert sorted(pred.rank()) == list(range(1, n + 1))
    assert pred.selected() in curves.ids


@pytest.mark.parametrize("name", ["subtuning", "ats", "rectified", "lensray"])
def test_failed_rows_are_ranked_last_and_reported(name):
    curves = _zoo()
    curves.L[2, 2:] = np.nan  # only D = 0 and D = 200 measured
    pred = get_selector(name).predict(curves, TARGET)
    assert not pred.ok[2] and pred.errors[2]
    assert pred.rank()[2] == len(curves)
    assert pred.ok[[0, 1, 3, 4, 5]].all()
    assert sorted(pred.rank()[[0, 1, 3, 4, 5]]) == [1, 2, 3, 4, 5]


def test_rank_orders_by_score_and_size_ranks_larger_first():
    pred = Prediction(["a", "b", "c"], np.array([2.0, 1.0, 2.0]), *(np.full(3, np.nan),) * 2,
                      np.array([2.0, 1.0, 2.0]), np.ones(3, bool), [None] * 3)
    assert list(pred.rank()) == [2, 1, 3] and pred.selected() == "b"
    size = get_selector("modelsize").predict(_zoo(), TARGET)
    assert size.selected() == _zoo().ids[int(np.argmax(_zoo().size))]


def test_nothing_scored_and_unknown_method_raise_input_errors():
    pred = Prediction(["a"], np.array([np.nan]), np.array([np.nan]), np.array([np.nan]), np.array([np.nan]),
                      np.array([False]), ["too few points"])
    with pytest.raises(LensrayInputError, match="too few points"):
        pred.selected()
    with pytest.raises(LensrayInputError, match="unknown selection method 'nope'"):
        get_selector("nope")
    with pytest.raises(LensrayInputError, match="target"):
        get_selector("ats").predict(_zoo(), 100)


def test_lensray_intervals_contain_the_predictions_and_widen_with_distance():
    curves = _zoo(10, seed=3)
    near = LensraySelector().predict(curves, 51200)
    far = LensraySelector().predict(curves, 1638400)
    for p in (near, far):
        assert np.all(p.lo < p.loss) and np.all(p.loss < p.hi)
    assert np.all(np.log(far.hi / far.lo) > np.log(near.hi / near.lo))


def _steepening_zoo() -> Curves:
    """Curves whose log-log slope grows by 10 % per doubling, from different starting slopes."""
    x = np.arange(8.0)  # log2(D / 200)
    start = np.array([-0.02, -0.04, -0.06, -0.08, -0.10])
    slope = start[:, None] * 1.1 ** x[None, :]
    logL = 1.5 + np.concatenate([np.zeros((5, 1)), np.cumsum(slope[:, 1:], axis=1)], axis=1)
    D = 200.0 * 2.0**x
    return Curves([f"m{i}" for i in range(5)], np.concatenate([[0.0], D]),
                  np.column_stack([np.full(5, 4.0), np.exp(logL)]))


def _tangent_forecast(curves: Curves, i: int, target: float, k: int = 3) -> float:
    x, y = np.log2(curves.D[-k:]), np.log(curves.L[i, -k:])
    a, b = np.polyfit(x, y, 1)
    return float(np.exp(a * np.log2(target) + b))


def test_lensray_steepens_curves_up_to_the_zoo_steepest_slope_only():
    curves, target = _steepening_zoo(), 1638400.0
    pred = LensraySelector(cap_quantile=0.0).predict(curves, target)
    tangent = np.array([_tangent_forecast(curves, i, target) for i in range(5)])
    # the steepest curve sets the cap: it keeps its tangent; the others steepen below theirs
    assert pred.loss[4] == pytest.approx(tangent[4], rel=1e-9)
    assert np.all(pred.loss[:4] < tangent[:4] * (1 - 1e-3))
    # but never beyond the cap: from its tangent level at the last point, each curve falls by
    # at most the cap slope per doubling
    x = np.log2(curves.D[-3:]) - np.log2(curves.D[-1])
    level = np.array([np.polyfit(x, np.log(curves.L[i, -3:]), 1)[1] for i in range(5)])
    cap = np.polyfit(x, np.log(curves.L[4, -3:]), 1)[0]
    assert np.all(np.log(pred.loss) >= level + cap * np.log2(target / curves.D[-1]) - 1e-9)


def test_lensray_shares_the_zoo_steepening_out_by_the_zero_shot_point():
    """A curve that has shed more of its zero-shot loss is further along its transition and
    steepens less; without the D = 0 column (or with fewer than 3 placeable curves) every curve
    gets the zoo rate."""
    curves, target = _steepening_zoo(), 1638400.0
    base = LensraySelector().predict(curves, target)
    far = Curves(curves.ids, curves.D, curves.L.copy())
    far.L[2, 0] = 40.0  # row 2: the same fine-tuning curve, ten times the zero-shot loss
    got = LensraySelector().predict(far, target)
    assert got.loss[2] > base.loss[2] * (1 + 1e-3)
    assert got.loss[2] < _tangent_forecast(curves, 2, target)  # the zoo rate is shared out, not switched off
    flat = LensraySelector(transition_weight=0.0)
    no_zero = curves.take(range(5))
    no_zero = Curves(no_zero.ids, no_zero.D[1:], no_zero.L[:, 1:])
    np.testing.assert_allclose(LensraySelector().predict(no_zero, target).loss,
                               flat.predict(curves, target).loss, rtol=1e-12)
    # a zero-shot loss that is not above the curve places nothing: two rows left, fewer than 3
    low = Curves(curves.ids, curves.D, curves.L.copy())
    low.L[[0, 1, 2], 0] = 0.1
    np.testing.assert_allclose(LensraySelector().predict(low, target).loss, flat.predict(low, target).loss,
                               rtol=1e-12)


def test_lensray_extrapolates_a_lone_curve_along_its_tangent():
    curves, target = _steepening_zoo().take([2]), 1638400.0
    pred = LensraySelector().predict(curves, target)
    assert pred.loss[0] == pytest.approx(_tangent_forecast(curves, 0, target), rel=1e-9)
    assert np.isnan(pred.lo[0]) and np.isnan(pred.hi[0])  # one curve: no zoo backtest


def test_lensray_is_invariant_to_row_order():
    curves = _zoo(8, seed=5)
    perm = np.random.default_rng(1).permutation(8)
    a = LensraySelector().predict(curves, TARGET)
    b = LensraySelector().predict(curves.take(perm), TARGET)
    np.testing.assert_allclose(b.loss, a.loss[perm], rtol=1e-12)
    np.testing.assert_allclose(b.hi, a.hi[perm], rtol=1e-12)


# ---- figures on the shared tables -------------------------------------------------------------
@pytest.fixture(scope="module")
def figures(benchmarks_dir: Path) -> dict:
    """(table, method) -> per-ratio rows of the benchmark protocol."""
    out = {}
    for table in REF_ATS:
        rows = run_benchmark(load_curves_csv(benchmarks_dir / f"{table}.csv"), RATIOS, ["ats", "lensray"])
        for method in ("ats", "lensray"):
            out[table, method] = [r for r in rows if r["method"] == method]
    return out


@pytest.mark.parametrize("table", sorted(REF_ATS))
def test_ats_reproduces_the_reference_in_every_cell(figures, table):
    rows = figures[table, "ats"]
    np.testing.assert_allclose([r["pearson"] for r in rows], REF_ATS[table][0], atol=0.5)
    np.testing.assert_allclose([r["relacc"] for r in rows], REF_ATS[table][1], atol=0.5)


def test_lensray_pearcorr_beats_ats_in_every_cell_and_by_five_points_on_average(figures):
    ours = np.array([r["pearson"] for t in REF_ATS for r in figures[t, "lensray"]])
    ats = np.array([r["pearson"] for t in REF_ATS for r in figures[t, "ats"]])
    assert np.all(ours >= ats), list(zip(ours.round(2), ats.round(2)))
    assert ours.mean() - ats.mean() >= 5.0


def test_lensray_relacc_is_at_least_ats_on_average(figures):
    ours = np.mean([r["relacc"] for t in REF_ATS for r in figures[t, "lensray"]])
    ats = np.mean([r["relacc"] for t in REF_ATS for r in figures[t, "ats"]])
    assert ours >= ats


def test_lensray_relacc_target_97(figures):
    # measured 97.1 (FLAN 95.0, WMT19 99.2); FLAN r = 32 picks opt-1.3b over Cerebras-GPT-2.7B by a
    # predicted 1.5355 against 1.5356, so 0.5 of it rests on a near tie (the other pick scores 96.6)
    assert np.mean([r["relacc"] for t in REF_ATS for r in figures[t, "lensray"]]) >= 97.0


def test_lensray_intervals_cover_eighty_percent(figures):
    cov = [r["coverage90"] for t in REF_ATS for r in figures[t, "lensray"]]
    assert np.mean(cov) >= 0.8  # measured 0.93
    assert min(cov) >= 0.65  # measured 0.70 (FLAN r = 128, 256: the zoo's curves all steepen more than foreseen)


@pytest.mark.parametrize("table", sorted(REF_ATS))
def test_lensray_beats_ats_on_a_nearer_target_pseudo_protocol(benchmarks_dir, table):
    """Target 819,200 with r = 8..256: validation that never reads the D* = 1,638,400 column."""
    curves = load_curves_csv(benchmarks_dir / f"{table}.csv")
    rows = run_benchmark(curves, RATIOS[:-1], ["ats", "lensray"], target=819200)
    ats = np.array([r["pearson"] for r in rows if r["method"] == "ats"])
    ours = np.array([r["pearson"] for r in rows if r["method"] == "lensray"])
    assert np.all(ours >= ats), list(zip(ours.round(2), ats.round(2)))  # measured worst cell +0.05 (WMT19 r = 16)
    assert ours.mean() - ats.mean() >= 2.0  # measured +4.4 on average over both tables


def test_lensray_beats_ats_on_synthetic_zoos_on_average():
    gains, cover = [], []
    for seed in range(4):
        rows = run_benchmark(synthetic_zoo(30, seed, 0.01), RATIOS, ["ats", "lensray"])
        ats = [r["pearson"] for r in rows if r["method"] == "ats"]
        ours = [r for r in rows if r["method"] == "lensray"]
        gains.append(np.mean([r["pearson"] for r in ours]) - np.mean(ats))
        cover += [r["coverage90"] for r in ours]
    assert np.mean(gains) > 0.5  # measured +0.96
    assert np.mean(cover) >= 0.85  # measured 0.94
