"""STOP-only Ray Tune scheduler that prunes candidates which cannot reach the top-k.

The decision rule is a pure function (:func:`prune_decision`) so that it can be tested on
hand-made forecasts without Ray; :class:`CurvePruner` applies it to Tune results.

Rule (stated in full in :func:`prune_decision`): a candidate past the grace is stopped when at
least ``top_k`` other candidates are each confidently better than it at D*, so it cannot reach
the top-k. "Confidently better" compares the two predictions through the interval of their
DIFFERENCE when the forecasts carry the split of their error into a zoo-common and an own part
(the zoo-common part, e.g. the shared steepening that moves every candidate together, cancels
in a comparison), else through the two marginal intervals (optimistic end of the candidate vs
pessimistic end of the rival).
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
    common_half, own_half : float
        Optional split of the interval's half-width in log space, at the same level: the part
        of the prediction error shared by the whole zoo (it moves every candidate alike) and
        the candidate's own part. NaN when unknown: comparisons then use ``lo`` and ``hi``.
    """

    candidate: str
    n_samples: int
    points: int
    loss: float
    lo: float
    hi: float
    common_half: float = math.nan
    own_half: float = math.nan

    @property
    def optimistic(self) -> float:
        """Lower end of the interval; -inf without one (nothing known rules the candidate out)."""
        return self.lo if math.isfinite(self.lo) else -math.inf

    @property
    def pessimistic(self) -> float:
        """Upper end of the interval; +inf without one (nothing known guarantees the candidate)."""
        return self.hi if math.isfinite(self.hi) else math.inf

    @property
    def has_split(self) -> bool:
        """Whether the error split is known (and the loss positive, for log differences)."""
        return (math.isfinite(self.common_half) and math.isfinite(self.own_half) and math.isfinite(self.loss)
                and self.loss > 0)


def difference_interval(rival: Forecast, own: Forecast) -> Optional[tuple[float, float]]:
    """``(log gap, half-width)`` of ``log(own.loss) - log(rival.loss)`` at the forecasts' level.

    The half-width is ``sqrt((c_own - c_rival)^2 + o_own^2 + o_rival^2)`` (``c``: zoo-common
    half-widths, which cancel where the two horizons are alike; ``o``: own half-widths,
    independent). None unless both forecasts carry the split of their error.
    """
    if not (own.has_split and rival.has_split):
        return None
    gap = math.log(own.loss) - math.log(rival.loss)
    return gap, math.sqrt((own.common_half - rival.common_half) ** 2 + own.own_half**2 + rival.own_half**2)


def confidently_better(rival: Forecast, own: Forecast) -> Optional[str]:
    """Whether ``rival`` is predicted better than ``own`` at D* beyond the uncertainty; a short note or None.

    With both error splits known: the log difference ``log(own.loss) - log(rival.loss)`` must
    exceed the half-width of the difference's interval (:func:`difference_interval`). Otherwise:
    ``own.optimistic > rival.pessimistic`` (the marginal intervals do not touch). Equality is not
    enough.
    """
    diff = difference_interval(rival, own)
    if diff is not None:
        gap, half = diff
        return f"{rival.candidate} ({rival.loss:.4g}, log gap {gap:.3g} > {half:.3g})" if gap > half else None
    if math.isfinite(own.optimistic) and math.isfinite(rival.pessimistic) and own.optimistic > rival.pessimistic:
        return f"{rival.candidate} (pessimistic {rival.pessimistic:.4g} < optimistic {own.optimistic:.4g})"
    return None


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

    Rule: a candidate with at least ``grace_points`` observed points (D > 0) is stopped when at
    least ``top_k`` of the *other* candidates that have also passed the grace are each
    confidently better than it at D* (:func:`confidently_better`): then it cannot enter the
    top-k. "Confidently better" is judged

    - on the difference of the two predictions, when both forecasts carry the split of their
      error into a zoo-common and an own part: the log gap must exceed the half-width of the
      difference's interval at the forecasts' level (the zoo-common part cancels between
      candidates at similar distances from D*; it still counts where they differ);
    - else on the marginal intervals: the candidate's optimistic prediction (lower end at D*)
      is worse than the rival's pessimistic prediction (upper end). With marginal intervals
      only, this is the rule "optimistic prediction worse than the ``top_k``-th best
      pessimistic prediction of the others".

    A forecast without an interval (NaN ends and no split, e.g. too few curves to calibrate
    one) never stops its candidate and never counts as a rival; with fewer than ``top_k``
    confidently better rivals nothing is stopped. Equality keeps the candidate.

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
    if own.points < grace_points:
        return None
    ahead = []
    for rival in others:
        if rival.candidate == own.candidate or rival.points < grace_points:
            continue
        note = confidently_better(rival, own)
        if note is not None:
            ahead.append((rival.loss, note))
    if len(ahead) < top_k:
        return None
    notes = ", ".join(note for _, note in sorted(ahead)[:top_k])
    return (
        f"at D={own.n_samples} ({own.points} points) its predicted loss at D*, {own.loss:.4g} (optimistic end "
        f"{own.optimistic:.4g}), was confidently worse than that of {len(ahead)} other candidate(s) (log gap beyond "
        f"the half-width of the difference, zoo-common error cancelled; or interval ends apart); top-{top_k} of "
        f"them: {notes}"
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
    after a grace of ``grace_points`` observed points, a candidate is stopped when at least
    ``top_k`` other candidates are each confidently better than it at D* (on the interval of
    the difference when the forecasts split their error into zoo-common and own parts, else
    optimistic end of the candidate vs pessimistic ends of the rivals). A report at
    ``last_size`` (the candidate's last probe) stops nothing: stopping there saves no compute,
    the candidate simply finishes and is ranked on its full curve. It only ever returns
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
        self._last_size = last_size
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
        if own is None or self._at_last_size(own):
            return TrialScheduler.CONTINUE
        reason = prune_decision(own, self._latest.values(), self._top_k, self._grace)
        if reason is None:
            return TrialScheduler.CONTINUE
        stop = Stop(cid, own.n_samples, reason)
        self.stopped[cid] = stop
        if self._on_stop is not None:
            self._on_stop(stop)
        return TrialScheduler.STOP

    def _at_last_size(self, own: Forecast) -> bool:
        """Whether ``own`` comes from its candidate's last probe (stopping there saves nothing)."""
        last = self._last_size
        if isinstance(last, Mapping):
            last = last.get(own.candidate)
        return last is not None and own.n_samples >= last

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
