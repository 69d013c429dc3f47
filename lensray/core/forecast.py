"""Forecasts of each candidate's loss at D* and the pruning rule that compares them.

Rule (:func:`prune_decision`): a candidate past the grace is stopped when at least ``top_k``
other candidates are each confidently better than it at D* (:func:`confidently_better`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping as MappingABC
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
from scipy import stats

from lensray.core.curves import Curves
from lensray.core.selection import get_selector


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
    others : iterable of Forecast, or ForecastTable
        The latest forecasts of the other candidates (finished ones included); a
        :class:`ForecastTable` is judged in one vectorised pass.
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
    if isinstance(others, ForecastTable):
        return _prune_decision_table(own, others, top_k, grace_points)
    ahead = []
    for rival in others:
        if rival.candidate == own.candidate or rival.points < grace_points:
            continue
        note = confidently_better(rival, own)
        if note is not None:
            ahead.append((rival.loss, note))
    if len(ahead) < top_k:
        return None
    return _reason(own, len(ahead), top_k, ahead)


@dataclass
class ForecastTable(MappingABC):
    """Forecasts of many candidates as arrays (one entry per candidate, in ``ids`` order); a
    read-only mapping id -> :class:`Forecast`. :func:`prune_decision` judges a candidate against
    all of them at once."""

    ids: list[str]
    n_samples: np.ndarray
    points: np.ndarray
    loss: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    common_half: np.ndarray
    own_half: np.ndarray
    index: dict[str, int] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.index = {cid: i for i, cid in enumerate(self.ids)}

    @classmethod
    def of(cls, forecasts: Iterable[Forecast]) -> "ForecastTable":
        """The table of some :class:`Forecast` objects."""
        fs = list(forecasts)
        col = lambda name, dtype=float: np.array([getattr(f, name) for f in fs], dtype=dtype)  # noqa: E731
        return cls([f.candidate for f in fs], col("n_samples", np.int64), col("points", np.int64), col("loss"),
                   col("lo"), col("hi"), col("common_half"), col("own_half"))

    def take(self, rows: np.ndarray) -> "ForecastTable":
        """The rows ``rows`` (positions), in that order."""
        return ForecastTable([self.ids[i] for i in rows], *(getattr(self, a)[rows] for a in _TABLE_ARRAYS))

    def concat(self, other: "ForecastTable") -> "ForecastTable":
        """This table's rows, then ``other``'s."""
        return ForecastTable(self.ids + other.ids, *(np.concatenate([getattr(self, a), getattr(other, a)])
                                                     for a in _TABLE_ARRAYS))

    def __getitem__(self, cid: str) -> Forecast:
        i = self.index[cid]
        return Forecast(cid, int(self.n_samples[i]), int(self.points[i]), float(self.loss[i]), float(self.lo[i]),
                        float(self.hi[i]), float(self.common_half[i]), float(self.own_half[i]))

    def __contains__(self, cid: object) -> bool:
        return cid in self.index

    def __iter__(self):
        return iter(self.ids)

    def __len__(self) -> int:
        return len(self.ids)


_TABLE_ARRAYS = ("n_samples", "points", "loss", "lo", "hi", "common_half", "own_half")


def _confidently_better_all(own: Forecast, rivals: ForecastTable) -> np.ndarray:
    """:func:`confidently_better` of every row of ``rivals`` against ``own``, as a boolean array."""
    with np.errstate(invalid="ignore", divide="ignore"):
        split = (np.isfinite(rivals.common_half) & np.isfinite(rivals.own_half) & np.isfinite(rivals.loss)
                 & (rivals.loss > 0))
        better = np.zeros(len(rivals), dtype=bool)
        if own.has_split:
            gap = math.log(own.loss) - np.log(np.where(split, rivals.loss, 1.0))
            half = np.sqrt((own.common_half - rivals.common_half) ** 2 + own.own_half**2 + rivals.own_half**2)
            better = split & (gap > half)
            marginal = ~split
        else:
            marginal = np.ones(len(rivals), dtype=bool)
        if math.isfinite(own.optimistic):
            pessimistic = np.where(np.isfinite(rivals.hi), rivals.hi, np.inf)
            better |= marginal & np.isfinite(pessimistic) & (own.optimistic > pessimistic)
    return better


def _prune_decision_table(own: Forecast, rivals: ForecastTable, top_k: int, grace_points: int) -> Optional[str]:
    """:func:`prune_decision` against a :class:`ForecastTable` (the same rule and reason, vectorised)."""
    eligible = rivals.points >= grace_points
    i = rivals.index.get(own.candidate)
    if i is not None:
        eligible[i] = False
    ahead = np.flatnonzero(eligible & _confidently_better_all(own, rivals))
    if ahead.size < top_k:
        return None
    loss = rivals.loss[ahead]
    kth = np.partition(np.where(np.isnan(loss), np.inf, loss), top_k - 1)[top_k - 1]
    first = ahead[~(loss > kth)]  # the top-k by loss, ties and NaN included: sorted below as the scalar rule does
    notes = [(float(rivals.loss[j]), confidently_better(rivals[rivals.ids[j]], own)) for j in first]
    return _reason(own, int(ahead.size), top_k, [n for n in notes if n[1] is not None])


def _reason(own: Forecast, ahead: int, top_k: int, notes: list[tuple[float, str]]) -> str:
    top = ", ".join(note for _, note in sorted(notes)[:top_k])
    return (
        f"at D={own.n_samples} ({own.points} points) its predicted loss at D*, {own.loss:.4g} (optimistic end "
        f"{own.optimistic:.4g}), was confidently worse than that of {ahead} other candidate(s) (log gap beyond "
        f"the half-width of the difference, zoo-common error cancelled; or interval ends apart); top-{top_k} of "
        f"them: {top}"
    )


Forecaster = Callable[[Mapping[str, Mapping[int, float]]], Mapping[str, Forecast]]
"""Observed losses of every candidate (id -> {D: loss}) -> a forecast per candidate."""


class ZooForecaster:
    """The scheduler's forecaster: every candidate's points so far, fitted together (zoo context).

    Called with the observed losses (id -> {D: loss}) it returns a forecast per candidate (a
    :data:`Forecaster`). It also keeps those points itself: :meth:`update` and :meth:`drop`
    record one change, :meth:`forecasts` forecasts the points recorded. With the ``lensray``
    method that state is a :class:`lensray.core.incremental.LensrayZoo`, which refits only what
    a new probe changes; other methods refit the zoo's curves on every call. Either way the
    forecasts are those of the method's ``predict`` on the curves so far.

    With ``relative`` and the ``lensray`` method, each forecast also carries the zoo-common and
    own half-widths of its error at ``level``, so :func:`confidently_better` compares two
    candidates on the interval of their difference; else on their marginal intervals.
    """

    def __init__(self, method: str, level: float, grid: Sequence[int], target: int,
                 sizes: Mapping[str, Optional[float]], families: Mapping[str, Optional[str]],
                 relative: bool = True) -> None:
        from lensray.core.incremental import LensrayZoo

        self.selector = get_selector(method, level)
        self.level, self.grid, self.target = level, list(grid), target
        self.sizes, self.families = sizes, families
        self.split = relative and method == "lensray"
        self._zoo = LensrayZoo(self.selector, self.grid, target) if method == "lensray" else None
        self._observed: dict[str, dict[int, float]] = {}

    def update(self, candidate: str, D: int, loss: float) -> None:
        """Record ``candidate``'s loss at size ``D``."""
        if self._zoo is not None:
            self._zoo.update(candidate, D, loss)
        else:
            self._observed.setdefault(candidate, {})[int(D)] = float(loss)

    def add(self, candidate: str) -> None:
        """Give ``candidate`` its place in the zoo's order before its first point."""
        if self._zoo is not None:
            self._zoo.add(candidate)
        else:
            self._observed.setdefault(candidate, {})

    def drop(self, candidate: str) -> None:
        """Forget ``candidate`` and its points."""
        if self._zoo is not None:
            self._zoo.drop(candidate)
        else:
            self._observed.pop(candidate, None)

    def sync(self, observed: Mapping[str, Mapping[int, float]]) -> None:
        """Make the recorded points (and the zoo's order) those of ``observed``."""
        if self._zoo is not None:
            self._zoo.sync(observed)
        else:
            self._observed = {c: dict(p) for c, p in observed.items()}

    def forecasts(self) -> ForecastTable:
        """A forecast of every candidate with a point, from the points recorded."""
        if self._zoo is None:
            return ForecastTable.of(self._refit(self._observed).values())
        zf = self._zoo.forecast()
        common = own = np.full(len(zf.ids), np.nan)
        if self.split:
            z = float(stats.norm.ppf(0.5 + self.level / 2))
            common, own = z * zf.common, z * zf.own
        return ForecastTable(zf.ids, zf.n_samples, zf.points, zf.loss, zf.lo, zf.hi, common, own)

    def __call__(self, observed: Mapping[str, Mapping[int, float]]) -> Mapping[str, Forecast]:
        self.sync(observed)
        return self.forecasts()

    def _refit(self, observed: Mapping[str, Mapping[int, float]]) -> dict[str, Forecast]:
        """The forecasts of ``selector.predict`` on the curves of ``observed``, refitted from scratch."""
        grid = self.grid
        ids = [cid for cid, pts in observed.items() if pts]
        if not ids:
            return {}
        col = {d: j for j, d in enumerate(grid)}
        L = np.full((len(ids), len(grid)), np.nan)
        for i, cid in enumerate(ids):
            for d, loss in observed[cid].items():
                if d in col:
                    L[i, col[d]] = loss
        size = np.array([self.sizes.get(c) or np.nan for c in ids], dtype=float)
        curves = Curves(ids, np.array(grid, dtype=float), L, size, [self.families.get(c) for c in ids])
        return forecasts_from(curves, self.selector.predict(curves, self.target), self.level, self.split)


def zoo_forecaster(method: str, level: float, grid: list[int], target: int, sizes: Mapping[str, Optional[float]],
                   families: Mapping[str, Optional[str]], relative: bool = True) -> ZooForecaster:
    """The scheduler's forecaster (:class:`ZooForecaster`)."""
    return ZooForecaster(method, level, grid, target, sizes, families, relative)


def full_refit_forecaster(method: str, level: float, grid: list[int], target: int,
                          sizes: Mapping[str, Optional[float]], families: Mapping[str, Optional[str]],
                          relative: bool = True) -> Forecaster:
    """A :data:`Forecaster` that refits the whole zoo on every call (the reference of :class:`ZooForecaster`)."""
    return ZooForecaster(method, level, grid, target, sizes, families, relative)._refit


def forecasts_from(curves: Curves, pred: Any, level: float, split: bool = True) -> dict[str, Forecast]:
    """A :class:`Forecast` per row of ``curves`` from their prediction ``pred``; with ``split``
    (and a prediction that carries it: ``lensray``) the zoo-common and own half-widths at ``level``."""
    n = len(curves)
    common = own = np.full(n, np.nan)
    if split and pred.error_split is not None:  # the lensray predictor's zoo-common and own parts
        z = float(stats.norm.ppf(0.5 + level / 2))
        common, own = (z * v for v in pred.error_split)
    seen = np.isfinite(curves.L)
    out = {}
    for i, cid in enumerate(curves.ids):
        if seen[i].any():
            out[cid] = Forecast(cid, int(curves.D[seen[i]].max()), int(np.sum(seen[i] & (curves.D > 0))),
                                float(pred.loss[i]), float(pred.lo[i]), float(pred.hi[i]), float(common[i]),
                                float(own[i]))
    return out
