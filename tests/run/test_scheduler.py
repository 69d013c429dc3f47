"""The pruning rule on hand-made forecasts, and the STOP-only scheduler inside a small Tune run."""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest

from lensray.core.forecast import Forecast, Stop, confidently_better, prune_decision
from lensray.run.scheduler import CurvePruner, forecast_from_result
from ray.tune.schedulers import TrialScheduler


def fc(cid: str, lo: float, hi: float, points: int = 3, loss: float | None = None, n: int = 800) -> Forecast:
    return Forecast(cid, n, points, (lo + hi) / 2 if loss is None else loss, lo, hi)


def test_stops_when_optimistic_worse_than_best_pessimistic():
    reason = prune_decision(fc("bad", 2.1, 2.5), [fc("good", 1.5, 1.9)], top_k=1)
    assert reason is not None and "good" in reason and "2.1" in reason


def test_overlapping_intervals_continue():
    assert prune_decision(fc("b", 1.8, 2.5), [fc("a", 1.5, 1.9)]) is None


def test_equal_bounds_continue():
    # strictly worse is needed: touching intervals keep the candidate
    assert prune_decision(fc("b", 1.9, 2.5), [fc("a", 1.5, 1.9)]) is None


def test_grace_protects_young_candidates():
    assert prune_decision(fc("bad", 3.0, 3.5, points=2), [fc("good", 1.0, 1.2)], grace_points=3) is None
    assert prune_decision(fc("bad", 3.0, 3.5, points=3), [fc("good", 1.0, 1.2)], grace_points=3) is not None


def test_rivals_need_the_grace_too():
    young = fc("young", 1.0, 1.1, points=1)
    assert prune_decision(fc("bad", 3.0, 3.5), [young]) is None


def test_top_k_uses_kth_best_pessimistic():
    others = [fc("a", 1.0, 1.2), fc("b", 1.1, 1.4), fc("c", 1.5, 2.6)]
    own = fc("x", 1.5, 2.0)
    assert prune_decision(own, others, top_k=2) is not None  # 1.5 > 1.4 (2nd best upper end)
    assert prune_decision(own, others, top_k=3) is None  # 1.5 <= 2.6
    assert prune_decision(own, others[:1], top_k=2) is None  # fewer rivals than k


def test_own_entry_among_others_is_ignored():
    own = fc("x", 2.0, 2.1)
    assert prune_decision(own, [own, fc("x", 1.0, 1.1)]) is None


def test_forecast_without_interval_neither_stops_nor_counts():
    no_interval = Forecast("x", 800, 3, 3.0, math.nan, math.nan)
    assert prune_decision(no_interval, [fc("a", 1.0, 1.1)]) is None
    assert prune_decision(fc("y", 2.0, 2.2), [Forecast("a", 800, 3, 1.0, math.nan, math.nan)]) is None


def split(cid: str, loss: float, common: float, own: float, points: int = 3, n: int = 800) -> Forecast:
    """A forecast with the zoo-common/own split of its log half-width (marginal half = common + own)."""
    half = common + own
    return Forecast(cid, n, points, loss, loss * math.exp(-half), loss * math.exp(half), common, own)


def test_common_mode_error_cancels_in_the_difference():
    own, rival = split("b", 2.0, 0.3, 0.05), split("a", 1.6, 0.3, 0.05)
    assert own.optimistic < rival.pessimistic  # the marginal intervals overlap widely
    marginal = [replace(f, common_half=math.nan, own_half=math.nan) for f in (own, rival)]
    assert prune_decision(marginal[0], marginal[1:]) is None
    reason = prune_decision(own, [rival])  # log gap 0.22 > sqrt(0 + 2 * 0.05^2) = 0.07
    assert reason is not None and "a (1.6" in reason and "optimistic" in reason


def test_own_errors_still_protect_a_close_candidate():
    # log gap 0.095 < sqrt(2) * 0.1: not confidently worse
    assert prune_decision(split("b", 1.76, 0.3, 0.1), [split("a", 1.6, 0.3, 0.1)]) is None


def test_common_parts_at_different_horizons_do_not_cancel():
    # a young candidate's common error is larger than a finished rival's: the excess counts
    rival = split("a", 1.6, 0.1, 0.05, points=8)
    assert confidently_better(rival, split("b", 2.0, 0.1, 0.05)) is not None  # gap 0.22 > 0.07
    assert confidently_better(rival, split("b", 2.0, 0.35, 0.05)) is None  # gap 0.22 < sqrt(0.25^2 + ...)


def test_split_needs_both_sides_else_marginal_intervals():
    rival = fc("a", 1.5, 1.7, loss=1.6)  # no split
    assert prune_decision(split("b", 2.0, 0.3, 0.05), [rival]) is None  # 2.0 e^-0.35 = 1.41 <= 1.7
    assert prune_decision(split("b", 2.0, 0.1, 0.05), [rival]) is not None  # 2.0 e^-0.15 = 1.72 > 1.7


def test_top_k_needs_k_confidently_better_rivals():
    others = [split("a", 1.0, 0.2, 0.02), split("b", 1.05, 0.2, 0.02), split("c", 1.48, 0.2, 0.02)]
    own = split("x", 1.5, 0.2, 0.02)
    assert prune_decision(own, others, top_k=2) is not None
    assert prune_decision(own, others, top_k=3) is None  # c is within the difference's interval


def test_report_at_the_last_probe_size_stops_nothing():
    sched = CurvePruner(known=[fc("done", 1.0, 1.1, points=8)], last_size=800)
    assert sched.on_trial_result(None, None, _result("b", 1.5, 1.9)) == TrialScheduler.CONTINUE
    assert sched.stopped == {}


def test_a_candidates_own_last_size_stops_nothing():
    # a replayed curve whose last grid size is a hole ends at 400: its report there is final
    sched = CurvePruner(known=[fc("done", 1.0, 1.1, points=8)], last_size={"b": 800, "short": 400})
    short = {**_result("short", 1.5, 1.9), "n_samples": 400}
    assert sched.on_trial_result(None, None, short) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, None, {**_result("b", 1.5, 1.9), "n_samples": 400}) == TrialScheduler.STOP
    assert list(sched.stopped) == ["b"]


def test_error_split_adds_up_to_the_predictors_interval():
    import numpy as np
    from scipy import stats

    from lensray.core.curves import Curves
    from lensray.core.selection import LEVEL, LensraySelector

    rng = np.random.default_rng(0)
    D = np.array([0, 200, 400, 800, 1600, 3200, 6400, 12800], dtype=float)
    L = np.exp(1.0 - 0.15 * np.log2(np.maximum(D, 100))[None, :] * rng.uniform(0.5, 1.5, (12, 1))
               + rng.normal(0, 0.01, (12, D.size)))
    L[3, 6:] = np.nan  # a younger candidate: farther from D*, larger errors
    curves = Curves([f"c{i}" for i in range(12)], D, L, np.full(12, np.nan), [None] * 12)
    pred = LensraySelector().predict(curves, 1_638_400)
    common, own = pred.error_split
    sigma = np.log(pred.hi / pred.loss) / stats.norm.ppf(0.5 + LEVEL / 2)
    full = np.arange(12) != 3
    assert np.allclose(np.hypot(common, own)[full], sigma[full])  # no longer curve: the backtests alone
    assert np.hypot(common, own)[3] >= sigma[3] * (1 - 1e-12)  # the origin estimate only widens
    sel = LensraySelector()
    backtest_own = np.sqrt(own**2 - sel._combine(sel.members(curves, 1_638_400))[1] ** 2)  # less the disagreement
    assert backtest_own[3] > backtest_own[0] and common[3] > common[0]


def test_spreads_from_few_curves_are_widened_by_t_over_z():
    import math

    from lensray.core.selection import small_sample_factor

    assert small_sample_factor(1) == pytest.approx(6.3138 / 1.6449, rel=1e-3)  # 2 curves: t_1 / z at 90 %
    factors = [small_sample_factor(d) for d in (1, 2, 4, 29, 10_000)]
    assert all(a > b for a, b in zip(factors, factors[1:])) and factors[-1] == pytest.approx(1.0, abs=1e-3)
    assert math.isinf(small_sample_factor(0))


def _pooled_split(sel, curves, target):
    """The backtest-pooled split alone (``Prediction.error_split`` before its origin widening)."""
    import numpy as np

    from lensray.core.selection import _row_points

    pts = [_row_points(curves, i) for i in range(len(curves))]
    x, y = [np.log2(D) for D, _ in pts], [np.log(L) for _, L in pts]
    zero = np.flatnonzero(curves.D == 0)
    y0 = np.log(curves.L[:, zero[0]]) if zero.size else np.full(len(curves), np.nan)
    return sel._pooled_split(x, y, y0, np.log2(target) - np.array([xi[-1] for xi in x]))


def test_error_split_widens_forecasts_from_few_points_that_proved_unreliable():
    """Curves that cross after their early points: forecasts from 4 points are far less reliable
    than the late backtests say, and the origin estimate widens a 4-point candidate's own part."""
    import numpy as np

    from lensray.core.curves import Curves
    from lensray.core.selection import LensraySelector

    rng = np.random.default_rng(1)
    D = 200.0 * 2.0 ** np.arange(10)
    x = np.log2(D / 200)
    n = 12
    late = rng.uniform(0.02, 0.12, n)  # each curve's late slope, unrelated to its early one
    bend = 1 / (1 + np.exp(-(x - 3)))  # the power phase starts after about 3 doublings
    L = np.exp(0.8 - 0.03 * x[None, :] - late[:, None] * (bend * (x - 3)).clip(0)[None, :]
               + rng.normal(0, 0.003, (n, D.size)))
    L[-1, 4:] = np.nan  # the newcomer: 4 points
    curves = Curves([f"c{i}" for i in range(n)], D, L, np.full(n, np.nan), [None] * n)
    target = int(D[-1]) * 8
    common, own = LensraySelector().predict(curves, target).error_split
    sel = LensraySelector()
    pooled_common, pooled_own = _pooled_split(sel, curves, target)
    pooled_own = np.hypot(pooled_own, sel._combine(sel.members(curves, target))[1])  # + the members' disagreement
    assert own[-1] > 1.2 * pooled_own[-1] and common[-1] > 1.5 * pooled_common[-1]
    assert np.allclose(own[:-1], pooled_own[:-1]) and np.allclose(common[:-1], pooled_common[:-1])


def test_bad_parameters_raise():
    with pytest.raises(ValueError):
        prune_decision(fc("x", 1, 2), [], top_k=0)


def _result(cid: str, lo: float, hi: float, points: int = 3, **extra) -> dict:
    return {"candidate": cid, "n_samples": 800, "points": points, "predicted_loss": (lo + hi) / 2,
            "pred_lo": lo, "pred_hi": hi, **extra}


def test_scheduler_keeps_latest_forecast_and_records_reason():
    stops: list[Stop] = []
    sched = CurvePruner(top_k=1, grace_points=3, on_stop=stops.append)
    assert sched.on_trial_result(None, None, _result("a", 1.0, 1.2)) == TrialScheduler.CONTINUE
    assert sched.on_trial_result(None, None, _result("b", 1.5, 1.9)) == TrialScheduler.STOP
    assert [s.candidate for s in stops] == ["b"] and sched.stopped["b"].n_samples == 800
    # a's later, worse forecast replaces the earlier one: c survives against it
    sched.on_trial_result(None, None, _result("a", 1.6, 2.4, points=4))
    assert sched.on_trial_result(None, None, _result("c", 1.7, 1.8)) == TrialScheduler.CONTINUE
    assert sched.forecasts["a"].points == 4


def test_forecaster_refreshes_all_forecasts_from_the_zoo():
    calls = []

    def forecaster(observed):
        calls.append({c: dict(p) for c, p in observed.items()})
        # a stand-in zoo model: every candidate's last loss, +-0.1
        return {c: Forecast(c, max(p), sum(d > 0 for d in p), p[max(p)], p[max(p)] - 0.1, p[max(p)] + 0.1)
                for c, p in observed.items()}

    sched = CurvePruner(grace_points=3, forecaster=forecaster, observed={"done": {200: 1.0, 400: 0.9, 800: 0.8}})
    for n, loss in [(200, 2.0), (400, 1.9)]:
        assert sched.on_trial_result(None, None, {"candidate": "b", "n_samples": n, "loss": loss}) == "CONTINUE"
    assert calls == []  # nothing to decide before the grace
    assert sched.on_trial_result(None, None, {"candidate": "b", "n_samples": 800, "loss": 1.8}) == "STOP"
    assert calls[-1]["b"] == {200: 2.0, 400: 1.9, 800: 1.8} and "done" in calls[-1]
    assert "done (pessimistic 0.9 " in sched.stopped["b"].reason


def test_failed_candidate_is_no_rival():
    sched = CurvePruner()
    sched.on_trial_result(None, None, _result("a", 1.0, 1.2))
    sched.on_trial_result(None, None, {"candidate": "a", "failed": True})
    assert sched.on_trial_result(None, None, _result("b", 1.5, 1.9)) == TrialScheduler.CONTINUE


def test_a_report_in_flight_after_the_stop_is_stopped_again_without_a_second_record():
    """The race of a trial that reports while its stop travels: one stop record, the first."""
    stops: list[Stop] = []
    sched = CurvePruner(top_k=1, grace_points=3, on_stop=stops.append)
    sched.on_trial_result(None, None, _result("a", 1.0, 1.2))
    assert sched.on_trial_result(None, None, _result("b", 1.5, 1.9)) == TrialScheduler.STOP
    late = {**_result("b", 1.0, 1.1, points=4), "n_samples": 1600}  # a better forecast, in flight
    assert sched.on_trial_result(None, None, late) == TrialScheduler.STOP
    assert [s.n_samples for s in stops] == [800] and sched.stopped["b"].n_samples == 800
    assert sched.forecasts["b"].points == 3  # the late report does not become a rival's yardstick
    assert sched.on_trial_result(None, None, {"candidate": "b", "failed": True}) == TrialScheduler.STOP


def test_a_forecaster_that_raises_stops_no_one_and_ends_nothing(caplog):
    def broken(observed):
        raise np.linalg.LinAlgError("SVD did not converge")

    stops: list[Stop] = []
    sched = CurvePruner(grace_points=3, forecaster=broken, observed={"a": {200: 1.0, 400: 0.9, 800: 0.8}},
                        on_stop=stops.append)
    for n, loss in [(200, 9.0), (400, 8.9), (800, math.nan)]:
        assert sched.on_trial_result(None, None, {"candidate": "b", "n_samples": n, "loss": loss}) == "CONTINUE"
    assert stops == [] and "SVD did not converge" in caplog.text


def test_known_forecasts_from_a_previous_run_count():
    sched = CurvePruner(known=[fc("done", 1.0, 1.1, points=8)])
    assert sched.on_trial_result(None, None, _result("b", 1.5, 1.9)) == TrialScheduler.STOP


def test_scheduler_never_pauses():
    sched = CurvePruner()
    actions = {sched.on_trial_result(None, None, _result(str(i), 1 + i / 10, 1.05 + i / 10)) for i in range(20)}
    assert actions <= {TrialScheduler.CONTINUE, TrialScheduler.STOP}


def test_forecast_from_result_ignores_other_results():
    assert forecast_from_result({"loss": 1.0}) is None


@pytest.fixture(scope="module")
def ray_local(tmp_path_factory):
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield tmp_path_factory.mktemp("tune")
    ray.shutdown()


def _curve_trainable(config: dict) -> None:
    """Report a hand-made forecast per probe: intervals narrow around the candidate's final loss."""
    from ray import tune

    final = config["final"]
    for points, n in enumerate([200, 400, 800, 1600, 3200, 6400], start=1):
        width = 2.0 / points
        tune.report({"candidate": config["candidate"], "n_samples": n, "points": points,
                     "predicted_loss": final, "pred_lo": final - width, "pred_hi": final + width})


def test_tune_run_stops_only_the_hopeless(ray_local):
    from ray import tune

    finals = {"best": 1.0, "close": 1.1, "bad": 3.0, "worse": 4.0}
    sched = CurvePruner(top_k=1, grace_points=3)
    # each trial needs its final loss: pass it through the config
    tuner = tune.Tuner(
        _curve_trainable,
        param_space={"candidate": tune.grid_search(list(finals)),
                     "final": tune.sample_from(lambda spec: finals[spec.config.candidate])},
        tune_config=tune.TuneConfig(scheduler=sched, max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(ray_local), verbose=0),
    )
    results = tuner.fit()
    last = {r.metrics["candidate"]: r.metrics["n_samples"] for r in results}
    assert last["best"] == 6400 and last["close"] == 6400
    assert set(sched.stopped) == {"bad", "worse"}
    assert all(last[c] < 6400 for c in ("bad", "worse"))


def test_zoo_forecaster_splits_the_lensray_error_unless_told_not_to():
    from lensray.core.forecast import zoo_forecaster

    grid = [0, 200, 400, 800, 1600, 3200]
    observed = {f"c{i}": {d: 3.0 - 0.1 * (1 + i / 10) * j for j, d in enumerate(grid)} for i in range(6)}
    observed["c0"][1600] += 0.02  # noise for the backtests
    split_fc = zoo_forecaster("lensray", 0.9, grid, 1_638_400, {}, {})(observed)
    plain = zoo_forecaster("lensray", 0.9, grid, 1_638_400, {}, {}, relative=False)(observed)
    assert all(f.has_split for f in split_fc.values())
    assert not any(f.has_split for f in plain.values())
    assert split_fc["c1"].hi == plain["c1"].hi  # the marginal interval is unchanged
