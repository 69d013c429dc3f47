"""Forecasts of each candidate's loss at D* and the pruning rule that compares them.

Rule (:func:`prune_decision`): a candidate past the grace is stopped when at least ``top_k``
other candidates are each confidently better than it at D* (:func:`confidently_better`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional

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


Forecaster = Callable[[Mapping[str, Mapping[int, float]]], Mapping[str, Forecast]]
"""Observed losses of every candidate (id -> {D: loss}) -> a forecast per candidate."""


def zoo_forecaster(method: str, level: float, grid: list[int], target: int, sizes: Mapping[str, Optional[float]],
                   families: Mapping[str, Optional[str]], relative: bool = True) -> Forecaster:
    """The scheduler's forecaster: every candidate's points so far, fitted together (zoo context).

    With ``relative`` and the ``lensray`` method, each forecast also carries the zoo-common and
    own half-widths of its error at ``level``, so :func:`confidently_better` compares two
    candidates on the interval of their difference; else on their marginal intervals.
    """
    selector = get_selector(method, level)
    split = relative and method == "lensray"
    D = np.array(grid, dtype=float)
    col = {d: j for j, d in enumerate(grid)}

    def run(observed: Mapping[str, Mapping[int, float]]) -> dict[str, Forecast]:
        ids = [cid for cid, pts in observed.items() if pts]
        if not ids:
            return {}
        L = np.full((len(ids), len(grid)), np.nan)
        for i, cid in enumerate(ids):
            for d, loss in observed[cid].items():
                if d in col:
                    L[i, col[d]] = loss
        size = np.array([sizes.get(c) or np.nan for c in ids], dtype=float)
        curves = Curves(ids, D, L, size, [families.get(c) for c in ids])
        return forecasts_from(curves, selector.predict(curves, target), level, split)

    return run


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
