"""STOP-only Ray Tune scheduler that prunes candidates which cannot reach the top-k.

The decision rule is a pure function (:func:`prune_decision`) so that it can be tested on
hand-made forecasts without Ray; :class:`CurvePruner` applies it to Tune results.
"""

from __future__ import annotations

import math
import pickle
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, Optional

from ray.tune.experiment import Trial
from ray.tune.schedulers.trial_scheduler import FIFOScheduler, TrialScheduler

if TYPE_CHECKING:
    from ray.tune.execution.tune_controller import TuneController

TIME_ATTR = "n_samples"
"""Tune's time attribute: the size of the candidate's latest probe."""


@dataclass(frozen=True)
class Forecast:
    """A candidate's latest prediction of its loss at the target size D*.

    Parameters
    ----------
    candidate : str
        Candidate id.
    n_samples : int
        Size of the latest probe behind this forecast.
    points : int
        Observed points with D > 0 (the zero-shot point does not count towards the grace).
    loss : float
        Predicted loss at D* (NaN when the curve could not be fitted).
    lo, hi : float
        Lower (optimistic) and upper (pessimistic) ends of its interval at D*; NaN when the
        predictor gives none (then the forecast can neither stop its candidate nor stop others).
    """

    candidate: str
    n_samples: int
    points: int
    loss: float
    lo: float
    hi: float

    @property
    def optimistic(self) -> float:
        """Lower end of the interval; -inf without one (nothing known rules the candidate out)."""
        return self.lo if math.isfinite(self.lo) else -math.inf

    @property
    def pessimistic(self) -> float:
        """Upper end of the interval; +inf without one (nothing known guarantees the candidate)."""
        return self.hi if math.isfinite(self.hi) else math.inf


@dataclass(frozen=True)
class Stop:
    """Why and when a candidate was stopped."""

    candidate: str
    n_samples: int
    reason: str


def prune_decision(
    own: Forecast, others: Iterable[Forecast], top_k: int = 1, grace_points: int = 3
) -> Optional[str]:
    """Decide whether a candidate should stop; return the reason, or None to continue.

    Rule: a candidate with at least ``grace_points`` observed points (D > 0) and a finite
    optimistic prediction is stopped when that optimistic prediction (the lower end of its
    interval at D*) is strictly worse (higher loss) than the ``top_k``-th best pessimistic
    prediction (upper ends of the intervals) among the *other* candidates that have also
    passed the grace. Then at least ``top_k`` others are, even in the worst case for them and
    the best case for this candidate, predicted better than it: it cannot enter the top-k.
    A forecast without an interval (NaN ends, e.g. too few curves to calibrate one) never stops
    its candidate and never counts as a rival; with fewer than ``top_k`` qualified rivals
    nothing is stopped. Equal bounds keep the candidate.

    Parameters
    ----------
    own : Forecast
        The candidate under decision.
    others : iterable of Forecast
        The latest forecasts of the other candidates (finished ones included).
    top_k : int
        How many candidates must survive at the least.
    grace_points : int
        Observed points (D > 0) a candidate needs before it can be stopped or count as a rival.

    Returns
    -------
    str or None
        A one-line, human-readable reason when the candidate should stop.
    """
    if top_k < 1 or grace_points < 1:
        raise ValueError("top_k and grace_points must be >= 1")
    if own.points < grace_points or not math.isfinite(own.optimistic):
        return None
    rivals = sorted(
        (o for o in others if o.candidate != own.candidate and o.points >= grace_points and math.isfinite(o.pessimistic)),
        key=lambda o: o.pessimistic,
    )
    if len(rivals) < top_k:
        return None
    kth = rivals[top_k - 1]
    if own.optimistic <= kth.pessimistic:
        return None
    ahead = ", ".join(f"{o.candidate} ({o.pessimistic:.4g})" for o in rivals[:top_k])
    return (
        f"at D={own.n_samples} ({own.points} points) its optimistic loss at D* (lower end of its interval), "
        f"{own.optimistic:.4g}, was worse than the pessimistic loss (upper end) of the top-{top_k} other "
        f"candidate(s): {ahead}"
    )


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


Forecaster = Callable[[Mapping[str, Mapping[int, float]]], Mapping[str, Forecast]]
"""Observed losses of every candidate (id -> {D: loss}) -> a forecast per candidate."""


class CurvePruner(FIFOScheduler):
    """Stops candidates whose optimistic prediction at D* cannot reach the top-k.

    Each trial is one candidate; it reports after every probe a result with the keys
    ``candidate``, ``n_samples`` (the time attribute), ``loss`` (the probe's test loss) and its
    own forecast: ``points`` (observed points with D > 0), ``predicted_loss``, ``pred_lo`` and
    ``pred_hi`` (its interval at D*). The scheduler keeps the latest forecast of every
    candidate, finished ones included, and applies :func:`prune_decision` to each new result:
    after a grace of ``grace_points`` observed points, a candidate is stopped when its
    optimistic prediction (lower end of its interval) is worse than the ``top_k``-th best
    pessimistic prediction (upper ends) among the other candidates. It only ever returns
    CONTINUE or STOP, never PAUSE: a paused trial loses its worker group and reloads its
    weights on resume.

    With a ``forecaster`` the scheduler also keeps every candidate's observed points and, when
    a candidate past the grace reports, refreshes all forecasts from the whole zoo's curves
    (predictors that share strength across candidates, and calibrate their intervals on the
    zoo, need that context; one trial only sees its own curve). Without one it uses the
    forecasts the trials report.

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
    """

    def __init__(
        self,
        top_k: int = 1,
        grace_points: int = 3,
        forecaster: Optional[Forecaster] = None,
        observed: Mapping[str, Mapping[int, float]] | None = None,
        known: Iterable[Forecast] = (),
        on_stop: Optional[Callable[[Stop], None]] = None,
    ) -> None:
        if top_k < 1 or grace_points < 1:
            raise ValueError("top_k and grace_points must be >= 1")
        super().__init__()
        self._top_k = top_k
        self._grace = grace_points
        self._forecaster = forecaster
        self._observed: dict[str, dict[int, float]] = {c: dict(p) for c, p in (observed or {}).items()}
        self._latest: dict[str, Forecast] = {f.candidate: f for f in known}
        self._on_stop = on_stop
        self.stopped: dict[str, Stop] = {}
        self._metric = "predicted_loss"

    def set_search_properties(self, metric: Optional[str], mode: Optional[str], **spec) -> bool:
        """Accept Tune's metric/mode only when they agree with the scheduler's (loss, min)."""
        return metric in (None, self._metric) and mode in (None, "min")

    @property
    def forecasts(self) -> dict[str, Forecast]:
        """Latest forecast per candidate."""
        return dict(self._latest)

    def _refresh(self, candidate: str) -> Optional[Forecast]:
        """Zoo-context forecasts, when the reporting candidate is past the grace."""
        points = sum(1 for d in self._observed.get(candidate, {}) if d > 0)
        if self._forecaster is None or points < self._grace:
            return self._latest.get(candidate)
        self._latest.update(self._forecaster(self._observed))
        return self._latest.get(candidate)

    def on_trial_result(self, tune_controller: "TuneController", trial: Trial, result: dict) -> str:
        cid = str(result.get("candidate"))
        if result.get("failed"):
            # a failed candidate is no rival: its forecast must not stop the others
            self._latest.pop(cid, None)
            self._observed.pop(cid, None)
            return TrialScheduler.CONTINUE
        if TIME_ATTR in result and result.get("loss") is not None:
            self._observed.setdefault(cid, {})[int(result[TIME_ATTR])] = float(result["loss"])
        reported = forecast_from_result(result)
        if reported is not None:
            self._latest[cid] = reported
        own = self._refresh(cid)
        if own is None:
            return TrialScheduler.CONTINUE
        reason = prune_decision(own, self._latest.values(), self._top_k, self._grace)
        if reason is None:
            return TrialScheduler.CONTINUE
        stop = Stop(cid, own.n_samples, reason)
        self.stopped[cid] = stop
        if self._on_stop is not None:
            self._on_stop(stop)
        return TrialScheduler.STOP

    def on_trial_error(self, tune_controller: "TuneController", trial: Trial) -> None:
        cid = str(trial.config.get("candidate"))
        self._latest.pop(cid, None)
        self._observed.pop(cid, None)

    def debug_string(self) -> str:
        return (
            f"CurvePruner(top_k={self._top_k}, grace_points={self._grace}): "
            f"{len(self.stopped)} stopped of {len(self._latest)} with forecasts"
        )

    def save(self, checkpoint_path: str) -> None:
        state = {"latest": self._latest, "observed": self._observed, "stopped": self.stopped}
        with open(checkpoint_path, "wb") as fh:
            pickle.dump(state, fh)

    def restore(self, checkpoint_path: str) -> None:
        with open(checkpoint_path, "rb") as fh:
            state = pickle.load(fh)
        self._latest, self._observed, self.stopped = state["latest"], state["observed"], state["stopped"]
