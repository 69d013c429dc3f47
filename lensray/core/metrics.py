"""Selection metrics of the benchmark protocol (:mod:`lensray.run.benchmark`).

All metrics compare a method's output on the visible budget with the true losses at D*.

- PearCorr: Pearson correlation between the method's score and the true loss at D*, x100.
- Spearman: rank correlation between the same two vectors (average ranks for ties), x100.
- RelAcc: (L_worst - L_selected) / (L_worst - L_best) at D*, x100, where "selected" is the
  method's rank-1 candidate (ties: the first row, like the reference code's ``argmin``).
- top-1 hit: the selected candidate is a truly best one; regret: L_selected - L_best.
- coverage: fraction (0..1) of candidates whose interval [lo, hi] contains the true loss.

Candidates a method failed to score (``ok`` False or a non-finite score) are excluded from
PearCorr and Spearman, are never selected, and are counted in ``n_failed``; for coverage
they count as not covered (a missing interval covers nothing). A metric that cannot be
computed (fewer than 2 scored candidates, constant scores, nothing selected, a method
without intervals) is NaN.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np
from scipy import stats


class ScoredPrediction(Protocol):
    """What :func:`evaluate` reads from a ``lensray.core.selection.Prediction``."""

    score: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    ok: np.ndarray

    def rank(self) -> np.ndarray: ...


def pearson(score: np.ndarray, truth: np.ndarray) -> float:
    """Pearson correlation x100 over the rows where both values are finite (NaN if undefined)."""
    x, y = _finite_pairs(score, truth)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return float(100.0 * np.corrcoef(x, y)[0, 1])


def spearman(score: np.ndarray, truth: np.ndarray) -> float:
    """Spearman rank correlation x100 over the rows where both values are finite (NaN if undefined)."""
    x, y = _finite_pairs(score, truth)
    if x.size < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan")
    return pearson(stats.rankdata(x), stats.rankdata(y))


def relacc(truth: np.ndarray, selected: int | None) -> float:
    """Relative accuracy x100 of selecting row ``selected``: 100 = truly best, 0 = truly worst."""
    truth = np.asarray(truth, dtype=np.float64)
    if selected is None:
        return float("nan")
    best, worst = np.nanmin(truth), np.nanmax(truth)
    if worst == best:
        return float("nan")
    return float(100.0 * (worst - truth[selected]) / (worst - best))


def regret(truth: np.ndarray, selected: int | None) -> float:
    """True loss of the selected row minus the best true loss (0 = best picked)."""
    truth = np.asarray(truth, dtype=np.float64)
    if selected is None:
        return float("nan")
    return float(truth[selected] - np.nanmin(truth))


def top1_hit(truth: np.ndarray, selected: int | None) -> bool:
    """Whether the selected row has the best true loss."""
    return selected is not None and regret(truth, selected) == 0.0


def coverage(lo: np.ndarray, hi: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of rows with ``lo <= truth <= hi``; a NaN bound covers nothing; NaN if no row has an interval."""
    lo, hi, truth = (np.asarray(a, dtype=np.float64) for a in (lo, hi, truth))
    has = np.isfinite(lo) & np.isfinite(hi)
    if not has.any():
        return float("nan")
    covered = has & (lo <= truth) & (truth <= hi)
    return float(np.count_nonzero(covered) / truth.size)


def selected_index(prediction: ScoredPrediction) -> int | None:
    """Row of the rank-1 candidate among the scored ones (first on ties), None if none was scored."""
    scored = _scored(prediction)
    if not scored.any():
        return None
    rank = np.asarray(prediction.rank(), dtype=np.float64)
    rank = np.where(scored, rank, np.inf)
    return int(np.argmin(rank))


def evaluate(prediction: ScoredPrediction, truth: np.ndarray) -> dict[str, Any]:
    """Every metric of one prediction against the true losses at D*.

    Returns
    -------
    dict
        ``pearson``, ``spearman``, ``relacc`` (x100), ``top1`` (bool), ``regret``,
        ``coverage90`` (0..1), ``selected`` (row index or None), ``n_failed`` and
        ``failed`` (row indices of the candidates the method could not score).
    """
    truth = np.asarray(truth, dtype=np.float64)
    scored = _scored(prediction)
    score = np.where(scored, np.asarray(prediction.score, dtype=np.float64), np.nan)
    sel = selected_index(prediction)
    return {
        "pearson": pearson(score, truth),
        "spearman": spearman(score, truth),
        "relacc": relacc(truth, sel),
        "top1": top1_hit(truth, sel),
        "regret": regret(truth, sel),
        "coverage90": coverage(prediction.lo, prediction.hi, truth),
        "selected": sel,
        "n_failed": int(np.count_nonzero(~scored)),
        "failed": [int(i) for i in np.flatnonzero(~scored)],
    }


def _scored(prediction: ScoredPrediction) -> np.ndarray:
    ok = np.asarray(prediction.ok, dtype=bool)
    return ok & np.isfinite(np.asarray(prediction.score, dtype=np.float64))


def _finite_pairs(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"score has {a.size} values, truth has {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    return a[keep], b[keep]
