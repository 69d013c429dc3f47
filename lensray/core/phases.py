"""Phase detection on fine-tuning curves: pre-power phase (small D, flat) vs power phase.

**AtS** (Accept-then-Stop, Lin et al. 2024), reference-compatible. Points ``D > 0`` in increasing
order ``x_0 < ... < x_{n-1}``, in log-log. With ``p = k, k+1, ...`` the OLS line through the last
``p`` points is fitted; the population standard deviation (ddof = 0) of its residuals gives the
standardised residual ``|r| / std`` of the next smaller point ``x_{n-p-1}``; the walk stops at the
first point above ``delta`` and the line is refitted on the last ``p`` points. Quirks of the
reference code, reproduced on purpose: when no point is rejected the loop ends at ``p = n - 1``, so
the smallest point is never used; with ``n <= k`` points all of them are used.
"""

from __future__ import annotations

import numpy as np

from lensray.errors import LensrayInputError


def _positive_points(D: np.ndarray, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    D = np.asarray(D, dtype=np.float64).reshape(-1)
    L = np.asarray(L, dtype=np.float64).reshape(-1)
    if D.shape != L.shape:
        raise LensrayInputError(f"D has {D.size} sizes but L has {L.size} losses")
    keep = (D > 0) & np.isfinite(L) & (L > 0)
    return D[keep], L[keep]


def _ols(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Slope and intercept of the least-squares line y = a x + b."""
    xm, ym = x.mean(), y.mean()
    sxx = np.sum((x - xm) ** 2)
    a = float(np.sum((x - xm) * (y - ym)) / sxx) if sxx > 0 else 0.0
    return a, float(ym - a * xm)


def ats_transition(D: np.ndarray, L: np.ndarray, k: int = 3, delta: float = 5.0) -> int:
    """Index of the last pre-power point among the points with ``D > 0`` (reference-compatible).

    Parameters
    ----------
    D, L : array (m,)
        Sizes and losses of one curve; points with ``D <= 0`` or a non-finite loss are skipped.
    k : int
        Points of the initial line (the largest ``k``).
    delta : float
        Rejection threshold on the standardised residual.

    Returns
    -------
    int
        ``t`` such that the power phase is the points ``t + 1, ...`` (of the kept points,
        in increasing D); ``-1`` when every point is in the power phase (``n <= k``).
    """
    D, L = _positive_points(D, L)
    n = D.size
    if n <= k:
        return -1
    x, y = np.log(D), np.log(L)
    p = k
    for p in range(k, n):
        a, b = _ols(x[-p:], y[-p:])
        std = np.std(y[-p:] - (a * x[-p:] + b))
        with np.errstate(divide="ignore", invalid="ignore"):
            z = abs(y[-p - 1] - (a * x[-p - 1] + b)) / std
        if z > delta:  # a perfect line (std = 0) rejects any off-line point, like the reference
            break
    return n - p - 1


def ats_line(D: np.ndarray, L: np.ndarray, k: int = 3, delta: float = 5.0) -> tuple[float, float, int]:
    """The AtS power-phase line of one curve: ``(slope, intercept, n_points)`` in natural-log space."""
    D, L = _positive_points(D, L)
    if D.size < 2:
        raise LensrayInputError(f"AtS needs at least 2 points with D > 0, got {D.size}")
    t = ats_transition(D, L, k, delta)
    x, y = np.log(D[t + 1 :]), np.log(L[t + 1 :])
    a, b = _ols(x, y)
    return a, b, x.size
