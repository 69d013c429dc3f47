"""Ray Tune adapter of :func:`lensray.core.forecast.prune_decision`: a STOP-only scheduler."""

from __future__ import annotations

import logging
import pickle
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional

import numpy as np

from lensray.core.forecast import Forecast, Forecaster, ForecastTable, Stop, prune_decision
from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

log = logging.getLogger(__name__)

TIME_ATTR = "n_samples"
"""Tune's time attribute: the size of the candidate's latest probe."""


def forecast_from_result(result: Mapping) -> Optional[Forecast]:
    """Read a :class:`Forecast` from a reported result; None when the keys are absent."""
    try:
        return Forecast(
            candidate=str(result["candidate"]),
            n_samples=int(result[TIME_ATTR]),
            points=int(result["points"]),
            loss=float(result["predicted_loss"]),
            lo=float(result["pred_lo"]),
            hi=float(result["pred_hi"]),
        )
    except (KeyError, TypeError, ValueError):
        return None


class CurvePruner(FIFOScheduler):
    """Stops candidates that :func:`prune_decision` rules out of the top-k.

    Each trial is one candidate; it reports after every probe a result with the keys
    ``candidate``, ``n_samples`` (the time attribute), ``loss`` (the probe's test loss) and its
    own forecast: ``points`` (observed points with D > 0), ``predicted_loss``, ``pred_lo`` and
    ``pred_hi`` (its interval at D*). The scheduler keeps the latest forecast of every
    candidate, finished ones included, and applies :func:`prune_decision` to each new result. A
    report at ``last_size`` (the candidate's last probe) stops nothing: stopping there saves no
    compute, the candidate simply finishes and is ranked on its full curve. It only ever returns
    CONTINUE or STOP, never PAUSE: a paused trial loses its worker group and reloads its
    weights on resume.

    With a ``forecaster`` the scheduler also keeps every candidate's observed points and, when
    a candidate past the grace reports, refreshes all forecasts from the whole zoo's curves
    (predictors that share strength across candidates, and calibrate their intervals on the
    zoo, need that context; one trial only sees its own curve). Without one it uses the
    forecasts the trials report. A forecaster with ``update``/``drop``/``sync``/``forecasts``
    (:class:`lensray.core.forecast.ZooForecaster`) is told each new point instead of being
    handed every curve, and its forecasts are kept as one :class:`ForecastTable` that each
    decision reads at once.

    No single report ends the run: a forecaster that raises is logged and its previous
    forecasts kept (no candidate is stopped on that report), a failed candidate's report drops
    it from the rivals, and a report that arrives after its trial was stopped (in flight while
    the stop travelled) is answered STOP again without a second stop record.

    Parameters
    ----------
    top_k : int
        How many candidates the rule protects.
    grace_points : int
        Observed points (D > 0) before a candidate can be stopped.
    forecaster : callable, optional
        Zoo-context forecasts from observed points (see :data:`Forecaster`).
    observed : mapping, optional
        Points observed before this run (a resumed run): id -> {D: loss}.
    known : iterable of Forecast, optional
        Forecasts of candidates that run in no trial (without a forecaster).
    on_stop : callable, optional
        Called with the :class:`Stop` record the moment a candidate is stopped (to persist it).
    prune : bool
        False: keep the forecasts up to date but stop nothing (pruning off).
    last_size : int or mapping, optional
        The grid's last probe size, or each candidate's own (id -> size; a replayed curve whose
        last grid sizes are holes ends earlier); reports at it (or beyond) are never stopped.
    """

    def __init__(
        self,
        top_k: int = 1,
        grace_points: int = 3,
        forecaster: Optional[Forecaster] = None,
        observed: Mapping[str, Mapping[int, float]] | None = None,
        known: Iterable[Forecast] = (),
        on_stop: Optional[Callable[[Stop], None]] = None,
        last_size: int | Mapping[str, int] | None = None,
        prune: bool = True,
    ) -> None:
        if top_k < 1 or grace_points < 1:
            raise ValueError("top_k and grace_points must be >= 1")
        super().__init__()
        self._top_k = top_k
        self._grace = grace_points
        self._forecaster = forecaster
        self._incremental = all(hasattr(forecaster, a) for a in ("update", "drop", "sync", "forecasts"))
        self._observed: dict[str, dict[int, float]] = {c: dict(p) for c, p in (observed or {}).items()}
        if self._incremental:
            forecaster.sync(self._observed)
        # the latest forecast of each candidate: the last zoo forecast's table, except the
        # candidates in ``_extra`` (forecasts reported, or known, since) and in ``_gone`` (failed)
        self._table = ForecastTable.of(())
        self._extra: dict[str, Forecast] = {f.candidate: f for f in known}
        self._gone: set[str] = set()
        self._on_stop = on_stop
        self._last_size = last_size
        self._prune = prune
        self.stopped: dict[str, Stop] = {}
        self._first_live = 0  # Tune's trials before it have all ended

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        """Accept no metric of Tune's: the scheduler reads its own keys, and a failed candidate's
        report (which has no loss) must not be refused by Tune's metric check."""
        return metric is None and mode in (None, "min")

    @property
    def forecasts(self) -> Mapping[str, Forecast]:
        """Latest forecast per candidate (a read-only snapshot)."""
        return self._rivals()

    def _latest(self, candidate: str) -> Optional[Forecast]:
        if candidate in self._extra:
            return self._extra[candidate]
        if candidate in self._table and candidate not in self._gone:
            return self._table[candidate]
        return None

    def _rivals(self) -> ForecastTable:
        """Every candidate's latest forecast as one table."""
        if not self._extra and not self._gone:
            return self._table
        hidden = {self._table.index[c] for c in (*self._extra, *self._gone) if c in self._table.index}
        keep = np.array([i for i in range(len(self._table)) if i not in hidden], dtype=np.int64) if hidden else \
            np.arange(len(self._table))
        return self._table.take(keep).concat(ForecastTable.of(self._extra.values()))

    def _forget(self, candidate: str) -> None:
        self._extra.pop(candidate, None)
        self._gone.add(candidate)
        self._observed.pop(candidate, None)
        if self._incremental:
            self._forecaster.drop(candidate)

    def _refresh(self, candidate: str) -> Optional[Forecast]:
        """Zoo-context forecasts, when the reporting candidate is past the grace."""
        points = sum(1 for d in self._observed.get(candidate, {}) if d > 0)
        if self._forecaster is None or points < self._grace:
            return self._latest(candidate)
        try:
            if self._incremental:
                table = self._forecaster.forecasts()
            else:
                out = self._forecaster(self._observed)
                table = out if isinstance(out, ForecastTable) else ForecastTable.of(out.values())
        except Exception as exc:  # noqa: BLE001 - a forecast that cannot be made stops no one
            log.warning("forecast after %s's report failed (%s: %s); nothing is stopped on it",
                        candidate, type(exc).__name__, " ".join(str(exc).split())[:200])
            return None
        # the new table replaces what it covers; older forecasts of candidates it lacks stay
        lacking = set(self._table.index).difference(table.index)
        older = {c: f for c in lacking if (f := self._latest(c)) is not None}
        self._extra = {**older, **{c: f for c, f in self._extra.items() if c not in table}}
        self._gone = set()
        self._table = table
        return self._latest(candidate)

    def on_trial_result(self, tune_controller: "TuneController", trial: Trial, result: dict) -> str:
        cid = str(result.get("candidate"))
        if cid in self.stopped:
            return TrialScheduler.STOP  # in flight while the stop travelled: already recorded
        if result.get("failed"):
            # a failed candidate is no rival: its forecast must not stop the others
            self._forget(cid)
            return TrialScheduler.CONTINUE
        if TIME_ATTR in result and result.get("loss") is not None:
            d, loss = int(result[TIME_ATTR]), float(result["loss"])
            if cid not in self._observed and self._incremental:
                self._forecaster.add(cid)
            self._observed.setdefault(cid, {})[d] = loss
            if self._incremental:
                self._forecaster.update(cid, d, loss)
        reported = forecast_from_result(result)
        if reported is not None:
            self._extra[cid] = reported
        own = self._refresh(cid)
        if not self._prune or own is None or self._at_last_size(own):
            return TrialScheduler.CONTINUE
        reason = prune_decision(own, self._rivals(), self._top_k, self._grace)
        if reason is None:
            return TrialScheduler.CONTINUE
        stop = Stop(cid, own.n_samples, reason)
        self.stopped[cid] = stop
        if self._on_stop is not None:
            self._on_stop(stop)
        return TrialScheduler.STOP

    def choose_trial_to_run(self, tune_controller: "TuneController") -> Optional[Trial]:
        """FIFO's choice (the first pending trial, else the first paused one) without rescanning the
        finished trials at the front of Tune's list on every step (they never run again)."""
        trials = tune_controller.get_trials()
        i = self._first_live
        while i < len(trials) and trials[i].status in (Trial.TERMINATED, Trial.ERROR):
            i += 1
        self._first_live = i
        for status in (Trial.PENDING, Trial.PAUSED):
            for j in range(i, len(trials)):
                if trials[j].status == status:
                    return trials[j]
        return None

    def _at_last_size(self, own: Forecast) -> bool:
        """Whether ``own`` comes from its candidate's last probe (stopping there saves nothing)."""
        last = self._last_size
        if isinstance(last, Mapping):
            last = last.get(own.candidate)
        return last is not None and own.n_samples >= last

    def on_trial_error(self, tune_controller: "TuneController", trial: Trial) -> None:
        self._forget(str(trial.config.get("candidate")))

    def debug_string(self) -> str:
        return (
            f"CurvePruner(top_k={self._top_k}, grace_points={self._grace}): "
            f"{len(self.stopped)} stopped of {len(self._rivals())} with forecasts"
        )

    def save(self, checkpoint_path: str) -> None:
        state = {"latest": dict(self._rivals()), "observed": self._observed, "stopped": self.stopped}
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self._observed, self.stopped = state["observed"], state["stopped"]
        self._table, self._extra, self._gone = ForecastTable.of(()), dict(state["latest"]), set()
        if self._incremental:
            self._forecaster.sync(self._observed)
