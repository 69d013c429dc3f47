"""LensrayZoo: the incremental forecasts equal LensraySelector.predict on the same curves."""

import numpy as np
import pytest

from lensray.core.curves import Curves
from lensray.core.incremental import LensrayZoo
from lensray.core.selection import LensraySelector
from lensray.core.synthetic_zoo import synthetic_zoo

TARGET = 1_638_400


def _reference(selector, grid, observed):
    """predict on the curves of ``observed``, as the arrays of a ZooForecast."""
    ids = [c for c, p in observed.items() if p]
    col = {d: j for j, d in enumerate(grid)}
    L = np.full((len(ids), len(grid)), np.nan)
    for i, c in enumerate(ids):
        for d, v in observed[c].items():
            L[i, col[d]] = v
    curves = Curves(ids, np.array(grid, float), L)
    pred = selector.predict(curves, TARGET)
    return ids, pred


def _assert_same(zoo, selector, grid, observed):
    got = zoo.forecast()
    ids, pred = _reference(selector, grid, observed)
    assert got.ids == ids
    for a, b in [(got.loss, pred.loss), (got.lo, pred.lo), (got.hi, pred.hi), (got.common, pred.error_split[0]),
                 (got.own, pred.error_split[1])]:
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=0, equal_nan=True)


@pytest.mark.parametrize("level", [0.9, 0.8])
def test_incremental_state_equals_a_full_refit_in_any_order(level):
    """Points arrive in a random order across candidates (within a candidate mostly ascending, some
    out of order, some replaced, the zero-shot point late); candidates fail and come back."""
    zoo_curves = synthetic_zoo(24, seed=5)
    grid = [int(d) for d in zoo_curves.D if d <= 25_600]
    selector = LensraySelector()
    selector.level = level
    zoo = LensrayZoo(selector, grid, TARGET)
    rng = np.random.default_rng(1)
    observed: dict[str, dict[int, float]] = {}
    pending = {c: list(grid[1:]) for c in zoo_curves.ids}
    for c in list(pending)[::5]:  # a few candidates probe one size out of order
        seq = pending[c]
        seq[2], seq[3] = seq[3], seq[2]
    steps = 0
    while any(pending.values()):
        c = str(rng.choice([c for c, p in pending.items() if p]))
        i = zoo_curves.ids.index(c)
        d = pending[c].pop(0)
        loss = float(zoo_curves.L[i, grid.index(d)])
        observed.setdefault(c, {})[d] = loss
        zoo.update(c, d, loss)
        if rng.random() < 0.1:  # the zero-shot point arrives late
            observed[c][0] = float(zoo_curves.L[i, 0])
            zoo.update(c, 0, observed[c][0])
        if rng.random() < 0.03:  # a measurement replaced
            observed[c][d] = loss * 1.01
            zoo.update(c, d, loss * 1.01)
        if rng.random() < 0.02:  # a candidate fails: forgotten, later starts again at the end of the order
            del observed[c]
            zoo.drop(c)
            pending[c] = list(grid[1:])
        steps += 1
        if steps % 4 == 0:
            _assert_same(zoo, selector, grid, observed)
    _assert_same(zoo, selector, grid, observed)


def test_sync_follows_the_mapping_and_its_order():
    curves = synthetic_zoo(10, seed=2)
    grid = [int(d) for d in curves.D if d <= 12_800]
    observed = {c: {d: float(curves.L[i, j]) for j, d in enumerate(grid) if j <= 3 + i % 4}
                for i, c in enumerate(curves.ids)}
    zoo = LensrayZoo(LensraySelector(), grid, TARGET)
    zoo.sync(observed)
    _assert_same(zoo, LensraySelector(), grid, observed)
    shuffled = {c: observed[c] for c in reversed(list(observed)) if c != curves.ids[3]}
    shuffled[curves.ids[0]] = {d: v for d, v in shuffled[curves.ids[0]].items() if d <= 400}  # points taken back
    zoo.sync(shuffled)
    assert zoo.forecast().ids == list(shuffled)
    _assert_same(zoo, LensraySelector(), grid, shuffled)


def test_vectorised_slope_sums_equal_the_per_curve_sum():
    sel = LensraySelector()
    rng = np.random.default_rng(0)
    s = -rng.uniform(0.01, 0.3, 200)
    H = np.concatenate([rng.uniform(-1, 14, 197), [0.0, 3.0, np.nan]])
    cap = np.minimum(-0.2, s)
    got = sel._slope_sums(s, 0.3, cap, H)
    want = [sel._slope_sum(a, 0.3, c, h) for a, c, h in zip(s, cap, H)]
    np.testing.assert_array_equal(got, want)
