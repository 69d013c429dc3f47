"""Selection methods: Prediction shape and ranking, failed rows, the lensray predictor's
properties (exact on power laws, a bounded move under a bump, one runaway member ignored,
intervals that widen where members disagree and cover synthetic zoos), and the figures on the shared tables (AtS reproduces the reference; lensray's
targets), on pseudo-protocols with nearer targets and on synthetic zoos."""

from pathlib import Path

import numpy as np
import pytest
from scipy import stats

from lensray.run.benchmark import run_benchmark
from lensray.core.curves import Curves, load_curves_csv
from lensray.errors import LensrayInputError
from lensray.core.selection import MEMBERS, SELECTORS, LensraySelector, Prediction, get_selector
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


def test_lensray_zoo_steepening_member_stops_at_the_zoo_steepest_slope():
    curves, target = _steepening_zoo(), 1638400.0
    steep = LensraySelector(cap_quantile=0.0).members(curves, target)[:, MEMBERS.index("zoo steepening")]
    tangent = np.log([_tangent_forecast(curves, i, target) for i in range(5)])
    # the steepest curve sets the cap: it keeps its tangent; the others steepen below theirs
    assert steep[4] == pytest.approx(tangent[4], abs=1e-9)
    assert np.all(steep[:4] < tangent[:4] - 1e-3)
    # but never beyond the cap: from its tangent level at the last point, each curve falls by
    # at most the cap slope per doubling
    x = np.log2(curves.D[-3:]) - np.log2(curves.D[-1])
    level = np.array([np.polyfit(x, np.log(curves.L[i, -3:]), 1)[1] for i in range(5)])
    cap = np.polyfit(x, np.log(curves.L[4, -3:]), 1)[0]
    assert np.all(steep >= level + cap * np.log2(target / curves.D[-1]) - 1e-9)


def _power_zoo(n: int = 6) -> Curves:
    """Exact power laws L = c D^-a (no pre-power phase), a zero-shot loss above every curve."""
    rng = np.random.default_rng(7)
    D = 200.0 * 2.0 ** np.arange(8)
    a, c = rng.uniform(0.05, 0.2, n), rng.uniform(3, 8, n)
    L = c[:, None] * D[None, :] ** -a[:, None]
    return Curves([f"p{i}" for i in range(n)], np.concatenate([[0.0], D]), np.column_stack([c * 1.5, L]))


def test_lensray_extrapolates_exact_power_laws_exactly_and_monotonically():
    curves = _power_zoo()
    rng = np.random.default_rng(7)
    a, c = rng.uniform(0.05, 0.2, 6), rng.uniform(3, 8, 6)
    targets = [51200.0, 204800.0, 1638400.0]
    got = np.array([LensraySelector().predict_point(curves, t) for t in targets])
    # three of the four members (both lines, the steepening with no curvature to share) are exact,
    # so their median is, whatever the rectified law makes of a curve it does not describe
    np.testing.assert_allclose(got, c[None, :] * np.array(targets)[:, None] ** -a[None, :], rtol=1e-9)
    assert np.all(np.diff(got, axis=0) < 0)  # further out, lower


def test_lensray_median_ignores_one_runaway_member():
    members = np.array([[0.0, 0.1, 0.2, -50.0], [0.0, 0.1, np.nan, 0.2], [1.0, np.nan, np.nan, np.nan]])
    centre, spread = LensraySelector._combine(members)
    np.testing.assert_allclose(centre, [0.05, 0.1, 1.0])
    assert spread[0] > 20 and spread[1] == pytest.approx(0.1) and spread[2] == 0.0


def test_lensray_forecast_moves_boundedly_under_a_finite_bump():
    """One point in the middle of one curve raised by 20 %: its forecast moves by a fraction of
    that, and no other candidate's forecast moves by more than the zoo-shared parts allow."""
    zoo = synthetic_zoo(30, 3, 0.01).budget(25600)
    target, i, bump = 1638400, 11, np.log(1.2)
    clean = np.log(LensraySelector().predict_point(zoo, target))
    bumped = Curves(zoo.ids, zoo.D, zoo.L.copy(), zoo.size, zoo.family)
    bumped.L[i, -4] *= 1.2
    moved = np.log(LensraySelector().predict_point(bumped, target)) - clean
    assert abs(moved[i]) < 0.5 * bump
    assert np.max(np.abs(np.delete(moved, i))) < 0.05 * bump


def test_lensray_widens_the_interval_of_a_curve_whose_members_disagree():
    zoo = synthetic_zoo(30, 4, 0.01).budget(25600)
    target, i = 1638400, 5
    base = LensraySelector().predict(zoo, target)
    odd = Curves(zoo.ids, zoo.D, zoo.L.copy(), zoo.size, zoo.family)
    odd.L[i, -2:] *= np.array([0.93, 0.88])  # a sudden late drop: the recent line parts from the rest
    pred = LensraySelector().predict(odd, target)
    width = np.log(pred.hi / pred.lo)
    assert width[i] > np.log(base.hi[i] / base.lo[i]) * 1.2
    assert width[i] > np.median(width) * 1.2
    # the own part of the split carries the disagreement: the pruning rule sees it too
    assert pred.error_split[1][i] > np.median(pred.error_split[1]) * 1.2


def test_lensray_error_split_is_the_interval_or_wider():
    zoo = synthetic_zoo(30, 5, 0.01).budget(51200)
    pred = LensraySelector().predict(zoo, 1638400)
    common, own = pred.error_split
    half = np.log(pred.hi / pred.loss)
    z = stats.norm.ppf(0.95)
    assert np.all(z * np.hypot(common, own) >= half * (1 - 1e-9))


def test_lensray_intervals_cover_synthetic_zoos():
    """90 % intervals on rectified-law zoos (30 candidates, 6 seeds) at r = 16, 64, 256."""
    cover = []
    for seed in range(6):
        zoo = synthetic_zoo(30, 200 + seed, 0.01)
        truth = zoo.loss_at(1638400)
        for r in (16, 64, 256):
            pred = LensraySelector().predict(zoo.budget(1638400 // r), 1638400)
            cover.append(np.mean((pred.lo <= truth) & (truth <= pred.hi)))
    assert 0.8 <= np.mean(cover) <= 1.0, np.round(cover, 2)
    assert min(cover) >= 0.6, np.round(cover, 2)


def test_lensray_lone_curve_has_a_forecast_but_no_interval():
    curves, target = _steepening_zoo().take([2]), 1638400.0
    pred = LensraySelector().predict(curves, target)
    members = LensraySelector().members(curves, target)[0]
    assert np.nanmin(members) <= np.log(pred.loss[0]) <= np.nanmax(members)
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


def test_lensray_pearcorr_beats_ats_in_every_cell_and_by_three_points_on_average(figures):
    ours = np.array([r["pearson"] for t in REF_ATS for r in figures[t, "lensray"]])
    ats = np.array([r["pearson"] for t in REF_ATS for r in figures[t, "ats"]])
    assert np.all(ours >= ats), list(zip(ours.round(2), ats.round(2)))  # measured worst cell +0.19
    assert ours.mean() - ats.mean() >= 3.0  # measured +3.98


def test_lensray_relacc_is_at_least_ats_on_average(figures):
    ours = np.mean([r["relacc"] for t in REF_ATS for r in figures[t, "lensray"]])
    ats = np.mean([r["relacc"] for t in REF_ATS for r in figures[t, "ats"]])
    assert ours >= ats


def test_lensray_relacc_target_96(figures):
    # measured 96.6 (FLAN 94.0, WMT19 99.2); FLAN's 93.2 cells pick Cerebras-GPT-2.7B, 2 % behind opt-1.3b
    assert np.mean([r["relacc"] for t in REF_ATS for r in figures[t, "lensray"]]) >= 96.0


def test_lensray_intervals_cover_eighty_percent(figures):
    cov = [r["coverage90"] for t in REF_ATS for r in figures[t, "lensray"]]
    assert np.mean(cov) >= 0.8  # measured 0.93 (FLAN 0.87, WMT19 0.995)
    assert min(cov) >= 0.65  # measured 0.70 (FLAN r = 256: the zoo's curves all steepen more than foreseen)


@pytest.mark.parametrize("table", sorted(REF_ATS))
def test_lensray_beats_ats_on_a_nearer_target_pseudo_protocol(benchmarks_dir, table):
    """Target 819,200 with r = 8..256: validation that never reads the D* = 1,638,400 column."""
    curves = load_curves_csv(benchmarks_dir / f"{table}.csv")
    rows = run_benchmark(curves, RATIOS[:-1], ["ats", "lensray"], target=819200)
    ats = np.array([r["pearson"] for r in rows if r["method"] == "ats"])
    ours = np.array([r["pearson"] for r in rows if r["method"] == "lensray"])
    assert np.all(ours >= ats), list(zip(ours.round(2), ats.round(2)))  # measured worst cell +0.31 (FLAN r = 128)
    assert ours.mean() - ats.mean() >= 2.0  # measured +3.41 FLAN, +3.67 WMT19


def test_lensray_beats_ats_on_synthetic_zoos_on_average():
    gains, cover = [], []
    for seed in range(4):
        rows = run_benchmark(synthetic_zoo(30, seed, 0.01), RATIOS, ["ats", "lensray"])
        ats = [r["pearson"] for r in rows if r["method"] == "ats"]
        ours = [r for r in rows if r["method"] == "lensray"]
        gains.append(np.mean([r["pearson"] for r in ours]) - np.mean(ats))
        cover += [r["coverage90"] for r in ours]
    assert np.mean(gains) > 0.5  # measured +0.52 (seeds: +1.02, +0.24, +0.50, +0.32; the previous predictor +0.96)
    assert np.mean(cover) >= 0.85  # measured 0.995
