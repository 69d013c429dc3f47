"""The scheduler with the incremental zoo forecaster decides as with a full refit on every report."""

import math
import random

import numpy as np
import pytest

from lensray.core.curves import load_curves_csv
from lensray.core.forecast import full_refit_forecaster, zoo_forecaster
from lensray.run.scheduler import CurvePruner, TrialScheduler

TARGET = 1_638_400
FIELDS = ("loss", "lo", "hi", "common_half", "own_half")


def _same_forecasts(a, b) -> None:
    assert set(a) == set(b)
    for cid in b:
        fa, fb = a[cid], b[cid]
        assert (fa.n_samples, fa.points) == (fb.n_samples, fb.points)
        for f in FIELDS:
            u, v = getattr(fa, f), getattr(fb, f)
            assert (math.isnan(u) and math.isnan(v)) or u == pytest.approx(v, rel=1e-9, abs=0), (cid, f, u, v)


@pytest.mark.parametrize("table,ratio", [("flan", 64), ("wmt19", 64), ("flan", 512)])
def test_incremental_and_full_refit_give_the_same_forecasts_and_stops(benchmarks_dir, table, ratio):
    curves = load_curves_csv(benchmarks_dir / f"{table}.csv")
    grid = [int(d) for d in curves.D if d <= TARGET // ratio]
    ids = list(curves.ids)
    args = ("lensray", 0.9, grid, TARGET, dict(zip(ids, curves.size)), {c: None for c in ids}, True)
    pruners = [CurvePruner(1, 3, forecaster=f(*args), last_size=grid[-1])
               for f in (zoo_forecaster, full_refit_forecaster)]
    col = {int(d): j for j, d in enumerate(curves.D)}
    rng = random.Random(7)
    queue = sorted(ids, key=lambda c: -curves.size[ids.index(c)])  # largest first, as trial_order before forecasts
    running: list[tuple[str, list[int]]] = []
    stops = 0
    while queue or running:
        while queue and len(running) < 2:
            cid = queue.pop(0)
            running.append((cid, [d for d in grid if np.isfinite(curves.L[ids.index(cid), col[d]])]))
        cid, todo = running[rng.randrange(len(running))]
        if todo:
            d = todo.pop(0)
            result = {"candidate": cid, "n_samples": d, "loss": float(curves.L[ids.index(cid), col[d]])}
            inc, ref = (p.on_trial_result(None, None, dict(result)) for p in pruners)
            assert inc == ref, (cid, d)
            _same_forecasts(pruners[0].forecasts, pruners[1].forecasts)
            if inc == TrialScheduler.STOP:
                stops += 1
                todo.clear()
        if not todo:
            running.remove(next(r for r in running if r[0] == cid))
    assert {c: s.reason for c, s in pruners[0].stopped.items()} == {c: s.reason for c, s in pruners[1].stopped.items()}
    assert stops == len(pruners[1].stopped) > 0
