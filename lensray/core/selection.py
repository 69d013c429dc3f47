"""Selection methods: curves visible under a budget -> predicted loss at D*, interval, rank.

Every method is a :class:`Selector` with ``predict(curves, target) -> Prediction``; the
registry :data:`SELECTORS` maps the names used by the CLI to the classes. A row that a method
cannot score gets ``ok = False``, a NaN score and a one-line reason in ``errors``; the other
rows are still ranked, failed rows last.

Methods (DESIGN.md §2-§3): ``zeroshot`` (loss at D = 0), ``subtuning`` (loss at the largest
visible D), ``modelsize`` (score log size, larger is better), ``vanilla`` (power law on
D > 0), ``rectified`` (rectified law on D = 0 and D > 0), ``ats`` (Accept-then-Stop line),
``lensllm`` (LensLLM law; F from the probes' NTK features when the curves carry them) and ``lensray``
(the project's predictor, :class:`LensraySelector`: the median of two robust lines, the
rectified law and a zoo-shared steepening).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import numpy as np
from scipy import stats

from lensray.core.curves import Curves
from lensray.errors import LensrayInputError
from lensray.core.phases import ats_line

LEVEL = 0.9
"""Level of every predictive interval."""


def small_sample_factor(dof: int) -> float:
    """``t_dof / z`` at :data:`LEVEL`: how much wider an interval must be whose standard deviation
    was estimated with ``dof`` degrees of freedom (inf below 1). A spread measured on 2 curves
    (dof 1) gives 3.8, on 5 curves 1.29, on 30 curves 1.03."""
    if dof < 1:
        return float("inf")
    q = 0.5 + LEVEL / 2
    return float(stats.t.ppf(q, dof) / stats.norm.ppf(q))


@dataclass
class Prediction:
    """Output of a selection method for ``n`` candidates.

    Attributes
    ----------
    ids : list of str
        Candidate ids, in the input order.
    loss : array (n,)
        Predicted loss at the target size; NaN where the method has none or could not fit.
    lo, hi : array (n,)
        90 % predictive interval of the loss; NaN where the method has none.
    score : array (n,)
        The value correlated with the true loss by PearCorr (usually ``loss``).
    ok : array (n,) of bool
        Whether the row was scored.
    errors : list of (str or None)
        Why a row was not scored.
    params : array (n, p) or None
        Fitted parameters per row, when the method has any.
    param_names : tuple of str or None
        The names of the ``p`` columns of ``params`` (:meth:`named_params`).
    higher_is_better : bool
        Rank by descending score (``modelsize``); default ascending (a loss).
    error_split : (array (n,), array (n,)) or None
        ``lensray`` only: standard deviations of the zoo-common and own parts of the error of
        log ``loss`` (:meth:`LensraySelector._pooled_split`, widened by ``_widen_by_origin``).
    notes : list of str
        What the method wants a reader to know about this fit (e.g. how the LensLLM F was had).
    """

    ids: list[str]
    loss: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    score: np.ndarray
    ok: np.ndarray
    errors: list[str | None]
    params: np.ndarray | None = None
    higher_is_better: bool = field(default=False)
    error_split: tuple[np.ndarray, np.ndarray] | None = None
    param_names: tuple[str, ...] | None = None
    notes: list[str] = field(default_factory=list)

    def named_params(self, i: int) -> dict[str, float] | None:
        """Row ``i``'s fitted parameters by name (``p1, p2, ...`` when the method names none)."""
        if self.params is None:
            return None
        row = np.asarray(self.params, dtype=np.float64)[i].reshape(-1)
        names = self.param_names if self.param_names and len(self.param_names) == row.size else \
            tuple(f"p{j + 1}" for j in range(row.size))
        return {name: float(v) for name, v in zip(names, row)}

    def rank(self) -> np.ndarray:
        """Rank of each row, 1 = best; failed rows come last; ties keep the input order."""
        score = np.asarray(self.score, dtype=np.float64)
        scored = np.asarray(self.ok, dtype=bool) & np.isfinite(score)
        key = np.where(scored, -score if self.higher_is_better else score, np.inf)
        order = np.argsort(key, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        return rank

    def selected(self) -> str:
        """Id of the rank-1 candidate.

        Raises
        ------
        LensrayInputError
            If no candidate could be scored.
        """
        scored = np.asarray(self.ok, dtype=bool) & np.isfinite(np.asarray(self.score, dtype=np.float64))
        if not scored.any():
            reasons = "; ".join(f"{i}: {e}" for i, e in zip(self.ids, self.errors) if e)
            raise LensrayInputError(f"no candidate could be scored ({reasons})")
        return self.ids[int(np.argmin(self.rank()))]


class Selector:
    """A selection method: ``predict(curves, target)`` scores every row of ``curves``.

    ``level`` is the level of its intervals. Methods compute them at :data:`LEVEL`; another
    level keeps the centre and scales the half-widths in log space by ``z(level) / z(LEVEL)``
    (exact for log-normal intervals, a normal approximation for the others).
    """

    name: str = ""
    level: float = LEVEL

    def predict(self, curves: Curves, target: int) -> Prediction:
        """Score every row of ``curves`` at ``target`` samples, intervals at ``level``."""
        pred = self._predict(curves, target)
        scale = float(stats.norm.ppf(0.5 + self.level / 2) / stats.norm.ppf(0.5 + LEVEL / 2))
        if scale != 1.0:
            with np.errstate(divide="ignore", invalid="ignore"):
                log_loss = np.log(pred.loss)
                pred.lo = np.exp(log_loss - scale * (log_loss - np.log(pred.lo)))
                pred.hi = np.exp(log_loss + scale * (np.log(pred.hi) - log_loss))
        return pred

    def _predict(self, curves: Curves, target: int) -> Prediction:
        raise NotImplementedError


# ----------------------------------------------------------------------------- helpers
def _nan(n: int) -> np.ndarray:
    return np.full(n, np.nan)


def _check_target(curves: Curves, target: int) -> float:
    if not np.isfinite(target) or target <= 0:
        raise LensrayInputError(f"target: must be a positive sample size, got {target}")
    if curves.D.size and target < curves.D.max():
        raise LensrayInputError(f"target: {target} is below the largest visible size {curves.D.max():g}")
    return float(target)


def _prediction(curves: Curves, loss, lo=None, hi=None, score=None, errors=None, params=None, **kw) -> Prediction:
    """A Prediction where rows with a non-finite score are marked failed (reason kept or generic)."""
    n = len(curves)
    loss = np.asarray(loss, dtype=np.float64)
    score = loss if score is None else np.asarray(score, dtype=np.float64)
    errors = [None] * n if errors is None else list(errors)
    ok = np.isfinite(score)
    for i in np.flatnonzero(~ok):
        errors[i] = errors[i] or "could not be scored"
    ok &= np.array([e is None for e in errors], dtype=bool)
    return Prediction(
        list(curves.ids), loss, _nan(n) if lo is None else np.asarray(lo, float),
        _nan(n) if hi is None else np.asarray(hi, float), np.where(ok, score, np.nan), ok, errors, params, **kw,
    )


def _column(curves: Curves, d: float, what: str) -> np.ndarray:
    hit = np.flatnonzero(curves.D == d)
    if hit.size == 0:
        raise LensrayInputError(f"column '{d:g}' ({what}) is required but absent from the curves table")
    return curves.L[:, hit[0]].copy()


def _row_points(curves: Curves, i: int) -> tuple[np.ndarray, np.ndarray]:
    """Measured points of row ``i`` with D > 0."""
    keep = (curves.D > 0) & np.isfinite(curves.L[i])
    return curves.D[keep], curves.L[i, keep]


def _last_points(x: list[np.ndarray], y: list[np.ndarray], w: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The last ``w`` points of each curve, right-aligned in ``(n, w)`` arrays: x relative to the
    curve's last point, y, and a mask of the slots that hold a point."""
    n = len(x)
    X, Y, M = np.zeros((n, w)), np.zeros((n, w)), np.zeros((n, w), dtype=bool)
    for i in range(n):
        m = min(w, x[i].size)
        if m:
            X[i, w - m :], Y[i, w - m :], M[i, w - m :] = x[i][-m:] - x[i][-1], y[i][-m:], True
    return X, Y, M


def _polyfit_rows(X: np.ndarray, Y: np.ndarray, M: np.ndarray, deg: int) -> np.ndarray:
    """Least-squares polynomial of degree ``deg`` per row over its masked points, coefficients
    highest first (as ``np.polyfit``); NaN for rows with fewer than ``deg + 1`` points. One
    batched solve of the normal equations (x spans a few doublings, so they are well conditioned)."""
    V = np.stack([X**p for p in range(deg, -1, -1)], axis=-1) * M[..., None]
    ok = M.sum(axis=1) > deg
    coef = np.full((X.shape[0], deg + 1), np.nan)
    if ok.any():
        A = np.einsum("nwi,nwj->nij", V[ok], V[ok])
        rhs = np.einsum("nwi,nw->ni", V[ok], np.where(M[ok], Y[ok], 0.0))
        coef[ok] = np.linalg.solve(A, rhs[..., None])[..., 0]
    return coef


# ----------------------------------------------------------------------------- baselines
class ZeroShotSelector(Selector):
    """Rank by the zero-shot loss (column D = 0)."""

    name = "zeroshot"

    def _predict(self, curves: Curves, target: int) -> Prediction:
        _check_target(curves, target)
        loss = _column(curves, 0.0, "zero-shot loss")
        errors = [None if np.isfinite(v) else "no zero-shot loss (D = 0)" for v in loss]
        return _prediction(curves, loss, errors=errors)


class SubTuningSelector(Selector):
    """Rank by the loss after fine-tuning on the largest visible size D_max."""

    name = "subtuning"

    def _predict(self, curves: Curves, target: int) -> Prediction:
        _check_target(curves, target)
        d_max = float(curves.D.max())
        loss = _column(curves, d_max, "loss at the budget")
        errors = [None if np.isfinite(v) else f"no loss measured at D = {d_max:g}" for v in loss]
        return _prediction(curves, loss, errors=errors)


class ModelSizeSelector(Selector):
    """Rank by parameter count, larger first; the score is log(size) (as in the reference)."""

    name = "modelsize"

    def _predict(self, curves: Curves, target: int) -> Prediction:
        _check_target(curves, target)
        size = curves.require_size(self.name)
        with np.errstate(divide="ignore", invalid="ignore"):
            score = np.where(size > 0, np.log(size), np.nan)
        errors = [None if np.isfinite(s) else "unknown size" for s in score]
        return _prediction(curves, _nan(len(curves)), score=score, errors=errors, higher_is_better=True)


class AtSSelector(Selector):
    """Accept-then-Stop (Lin et al. 2024): the power-phase line of :func:`lensray.core.phases.ats_line`.

    The interval is the ordinary least-squares prediction interval of that line at ``target``
    (NaN when the line has fewer than 3 points).
    """

    name = "ats"

    def __init__(self, k: int = 3, delta: float = 5.0) -> None:
        self.k, self.delta = k, delta

    def _predict(self, curves: Curves, target: int) -> Prediction:
        xt = np.log(_check_target(curves, target))
        n = len(curves)
        loss, lo, hi, params = _nan(n), _nan(n), _nan(n), np.full((n, 2), np.nan)
        errors: list[str | None] = [None] * n
        for i in range(n):
            D, L = _row_points(curves, i)
            if D.size < 2:
                errors[i] = f"needs at least 2 measured points with D > 0, has {D.size}"
                continue
            a, b, p = ats_line(D, L, self.k, self.delta)
            params[i] = a, b
            loss[i] = np.exp(a * xt + b)
            if p >= 3:
                x = np.log(D[-p:])
                s = np.sqrt(np.sum((np.log(L[-p:]) - (a * x + b)) ** 2) / (p - 2))
                se = s * np.sqrt(1 + 1 / p + (xt - x.mean()) ** 2 / np.sum((x - x.mean()) ** 2))
                half = stats.t.ppf(0.5 + LEVEL / 2, p - 2) * se
                lo[i], hi[i] = loss[i] * np.exp(-half), loss[i] * np.exp(half)
        return _prediction(curves, loss, lo, hi, errors=errors, params=params, param_names=("slope", "intercept"))


class LawSelector(Selector):
    """Fit a scaling law of :mod:`lensray.core.laws` to every curve and extrapolate to ``target``."""

    law_name = ""

    def _predict(self, curves: Curves, target: int) -> Prediction:
        from lensray.core.laws import get_law

        t = np.array([_check_target(curves, target)])
        law = get_law(self.law_name).fit(curves.D, curves.L)
        with np.errstate(over="ignore", invalid="ignore"):
            loss = law.predict(t)[:, 0]
            lo, hi = (a[:, 0] for a in law.predict_interval(t, LEVEL))
        return _prediction(curves, loss, lo, hi, errors=self._errors(law), params=law.params_,
                           param_names=law.param_names)

    def _errors(self, law) -> list[str | None]:
        return [None if f else f"{self.law_name} law could not be fitted" for f in law.fitted_]


class VanillaSelector(LawSelector):
    """Vanilla power law L = (1/(B D^beta) + E)^alpha fitted on the points D > 0."""

    name = law_name = "vanilla"


class RectifiedSelector(LawSelector):
    """Rectified scaling law L = B/(D_l + D^beta) + E fitted on D = 0 and D > 0."""

    name = law_name = "rectified"


class LensLLMSelector(LawSelector):
    """LensLLM law L = B/(F + D^beta) + E.

    **Phase** mode when every curve with a measured point carries the NTK features of its probes
    (``curves.ntk``: F at each measured size, and F at the target, from the probe there or the
    kernel's spectrum, :meth:`lensray.core.ntk_term.NTKTerms.F_at`): F per point, put on the
    D^beta scale by one ``gamma`` shared by the zoo (:class:`lensray.core.laws.LensLLMLaw`).
    Parameters: ``B, F, beta, E`` with ``F = gamma F_ntk`` the effective F at the target, plus
    ``gamma`` and ``F_ntk`` (the probes' own F(Θ, t) at the target). Otherwise **prediction** mode
    (F fitted per curve, parameters ``B, F, beta, E``) and a note saying which row and size lacked
    the features.
    """

    name = law_name = "lensllm"

    def _predict(self, curves: Curves, target: int) -> Prediction:
        from lensray.core.laws import get_law

        t = np.array([_check_target(curves, target)])
        F_target, why = self._ntk_at_target(curves, float(t[0]))
        if F_target is None:
            pred = super()._predict(curves, target)
            pred.notes.append(f"lensllm: F fitted per candidate (prediction mode): {why}")
            return pred
        law = get_law(self.law_name).fit(curves.D, curves.L, F=curves.ntk.F)
        with np.errstate(over="ignore", invalid="ignore"):
            loss = law.predict(t, F=F_target[:, None])[:, 0]
            lo, hi = (a[:, 0] for a in law.predict_interval(t, LEVEL, F=F_target[:, None]))
        params = law.params_.copy()
        params[:, law.param_names.index("F")] = law.gamma_ * F_target
        params = np.column_stack([params, np.full(len(curves), law.gamma_), F_target])
        note = (f"lensllm: phase mode, F = gamma F(Θ, t) from the probes' NTK features, gamma = {law.gamma_:.4g} "
                "shared by the zoo")
        return _prediction(curves, loss, lo, hi, errors=self._errors(law), params=params,
                           param_names=(*law.param_names, "gamma", "F_ntk"), notes=[note])

    @staticmethod
    def _ntk_at_target(curves: Curves, target: float) -> tuple[np.ndarray | None, str]:
        """F at the target per row when every row with a measured point has F wherever it has a loss
        and F extends to the target; else None and the first reason why not."""
        if curves.ntk is None:
            return None, "the curves carry no NTK features"
        F_target = curves.ntk.F_at(curves.D, target)
        for i, cid in enumerate(curves.ids):
            measured = np.isfinite(curves.L[i])
            if not measured.any():
                continue
            lacking = np.flatnonzero(measured & ~np.isfinite(curves.ntk.F[i]))
            if lacking.size:
                return None, f"no NTK F for '{cid}' at D={curves.D[lacking[0]]:g}"
            if not np.isfinite(F_target[i]):
                return None, (f"no NTK F for '{cid}' at the target D={target:g} (needs its kernel's spectrum and "
                              "the probes' steps)")
        return F_target, ""


# ----------------------------------------------------------------------------- lensray
def _theil_sen_rows(X: np.ndarray, Y: np.ndarray, M: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Theil-Sen line per row over its masked points: slope = median of the pairwise slopes,
    intercept = median of ``y - slope x``; NaN for rows with fewer than 2 points. A single odd
    point among ``w >= 5`` moves neither median beyond the spread of the others."""
    w = X.shape[1]
    i, j = np.triu_indices(w, 1)
    pair = M[:, i] & M[:, j]
    with np.errstate(divide="ignore", invalid="ignore"):
        slopes = np.where(pair, (Y[:, j] - Y[:, i]) / (X[:, j] - X[:, i]), np.nan)
    has = pair.any(axis=1)
    slope, icpt = np.full(X.shape[0], np.nan), np.full(X.shape[0], np.nan)
    if has.any():
        slope[has] = np.nanmedian(slopes[has], axis=1)
        icpt[has] = np.nanmedian(np.where(M[has], Y[has] - slope[has, None] * X[has], np.nan), axis=1)
    return slope, icpt


def _nanmedian_rows(a: np.ndarray) -> np.ndarray:
    """``np.nanmedian(a, axis=1)`` of a 2-D array, value for value (the mean of the two middle
    values of the sorted non-NaN ones, or the middle one), without its masked-array machinery."""
    count = np.sum(~np.isnan(a), axis=1)
    srt = np.sort(a, axis=1)  # NaN last
    high = np.maximum(count // 2, 0)
    low = np.where(count % 2 == 1, high, high - 1)
    pick = np.stack([np.maximum(low, 0), high], axis=1)
    pair = np.take_along_axis(srt, np.minimum(pick, a.shape[1] - 1), axis=1)
    with np.errstate(invalid="ignore"):
        out = (pair[:, 0] + pair[:, 1]) / 2.0
    return np.where(count > 0, out, np.nan)


MEMBERS = ("recent line", "window line", "rectified law", "zoo steepening")
"""The extrapolators combined by :class:`LensraySelector`, in the order of its ``params`` columns."""


class LensraySelector(Selector):
    """The project's predictor: the median of four extrapolators that fail differently.

    Per curve (points D > 0, x = log2 D, y = log L), four forecasts of log L at the target:

    1. **Recent line**: Theil-Sen line through the last ``k`` points (the current power-phase
       slope; never rising). Too pessimistic for curves still steepening.
    2. **Window line**: Theil-Sen line through the last ``window`` points. Robust to one odd
       point (a bump, a spike) but lags a steepening curve.
    3. **Rectified law** ``L = B / (D_l + D^beta) + E`` fitted on every visible point, D = 0
       included (:class:`lensray.core.laws.RectifiedLaw`). Global: one odd stretch hardly moves
       it, but it fails where the curve's shape departs from the law (early budgets, steps).
    4. **Zoo steepening**: the recent line's slope ``s_i`` (least squares, last ``k`` points)
       steepened by the zoo-shared rate ``rho`` (median over the curves of ``y''/y'`` of a
       quadratic over the last ``window`` points: one curve's curvature is too noisy to
       extrapolate, the zoo's is not), damped as in Holt's damped trend (after ``h`` more
       doublings the slope is ``s_i exp(rho (phi + ... + phi^h))``) and never steeper than
       the ``cap_quantile`` quantile of the zoo's current slopes (the power phase has a
       limiting slope; a curve already steeper keeps its own). Captures the steepening the
       lines miss; runs away when the zoo's curvature does not hold for a curve.

    The forecast is the **median** of the members (the mean of the middle two; members that
    could not be computed are left out): any one member running away is ignored, two must fail
    the same way to move it. One odd stretch of a curve moves the forecast by at most the
    spread of the members it leaves untouched.

    **Interval** (90 %): ``exp(log L_hat -/+ z_0.95 sigma_i)`` with ``sigma_i^2 = common^2 +
    own^2 + disagreement_i^2``:

    - leave-future-out backtests on the visible data give the zoo-common and own parts: the
      same predictor, run with the last ``b`` points hidden, predicts the hidden last point of
      every curve (``b = 1, 2, ...`` while ``k`` points remain); each backtest's errors split
      into their zoo mean and the residuals about it, both scaled to the target's distance by
      ``(H / b)^gamma`` (``gamma`` = 1.5: between slope errors, linear in H, and curvature
      errors, quadratic) and pooled over ``b``; the residual spread is widened for the few
      curves it rests on (:func:`small_sample_factor`). NaN when nothing can be backtested;
    - the candidate's own **disagreement**: the standard deviation of its members' forecasts.
      It widens the interval of a curve whose slope is unstable (the two lines part) or
      whose shape the law and the lines read differently, and is part of the own error.

    The prediction carries the split (zoo-common, own including the disagreement) for the
    pruning rule (``Prediction.error_split``). The rank is that of the point forecast.

    Defaults are fixed here, identical for every table; nothing looks at columns beyond the
    budget. They were chosen by leave-one-table-out on a plateau (``benchmarks/predictor_study.py``).
    """

    name = "lensray"

    def __init__(self, k: int = 3, window: int = 6, phi: float = 0.75, cap_quantile: float = 0.05,
                 gamma: float = 1.5) -> None:
        if not 2 <= k <= window:
            raise ValueError(f"need 2 <= k <= window, got k={k}, window={window}")
        self.k, self.window, self.phi, self.cap_quantile, self.gamma = k, window, phi, cap_quantile, gamma

    # -- point forecast
    def _members(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray, xt: np.ndarray,
                 rect: np.ndarray | None = None) -> np.ndarray:
        """Each member's log L at ``xt[i]`` (log2 size), shape (n, 4) in :data:`MEMBERS` order; NaN
        where a member cannot be computed or the curve has fewer than ``k`` points.

        ``y0``: each curve's zero-shot log-loss (NaN when unknown); ``rect``: the rectified
        member when already computed (:meth:`_rectified_memo`).
        """
        count = np.array([xi.size for xi in x], dtype=np.int64)
        if not (count >= self.k).any():
            return np.full((len(x), len(MEMBERS)), np.nan)
        h = xt - np.array([xi[-1] if xi.size else np.nan for xi in x])  # doublings ahead
        rect = self._rectified(x, y, y0, xt) if rect is None else rect
        return self._members_from(self.line_stats(x, y), count, h, rect)

    def line_stats(self, x: list[np.ndarray], y: list[np.ndarray]) -> np.ndarray:
        """Per curve the fits behind the line members, shape (n, 8): the Theil-Sen slope and
        intercept of the last ``k`` and of the last ``window`` points, the least-squares slope and
        intercept of the last ``k`` points and the quadratic's ``x^2`` and ``x`` coefficients over
        the last ``window`` points (x relative to the curve's last point). Each row depends on its
        curve's points only, so a curve's row for its first ``p`` points never changes."""
        k, w = self.k, self.window
        X, Y, M = _last_points(x, y, w)
        out = np.full((len(x), 8), np.nan)
        for col, (lo, hi) in enumerate(((w - k, w), (0, w))):
            out[:, 2 * col], out[:, 2 * col + 1] = _theil_sen_rows(X[:, lo:hi], Y[:, lo:hi], M[:, lo:hi])
        out[:, 4], out[:, 5] = _polyfit_rows(X[:, -k:], Y[:, -k:], M[:, -k:], 1).T
        out[:, 6], out[:, 7] = _polyfit_rows(X, Y, M, 2).T[:2]
        return out

    def _members_from(self, stats: np.ndarray, count: np.ndarray, h: np.ndarray, rect: np.ndarray) -> np.ndarray:
        """The members (n, 4) of curves with ``count`` points, their :meth:`line_stats` ``stats``,
        ``h`` doublings from their last point to the target and the rectified member ``rect``.
        The zoo steepening's ``rho`` and slope cap are shared by the rows given."""
        k, w = self.k, self.window
        fitted = count >= k
        out = np.full((count.size, len(MEMBERS)), np.nan)
        if not fitted.any():
            return out
        for col in (0, 1):
            s = np.minimum(stats[:, 2 * col], 0.0)
            out[:, col] = np.where(fitted, stats[:, 2 * col + 1] + s * h, np.nan)
        out[:, 2] = rect
        a, e, q2, q1 = stats[:, 4], stats[:, 5], stats[:, 6], stats[:, 7]
        s = np.where(fitted, np.minimum(a, 0.0), np.nan)
        curved = fitted & (np.minimum(count, w) >= 4) & (q1 < -1e-3)
        rho = float(np.median(2 * q2[curved] / q1[curved])) if curved.any() else 0.0
        s_cap = float(np.quantile(s[fitted], self.cap_quantile))
        out[fitted, 3] = e[fitted] + self._slope_sums(s[fitted], rho, np.minimum(s_cap, s[fitted]), h[fitted])
        out[~fitted] = np.nan
        return out

    @staticmethod
    def _rectified(x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray, xt: np.ndarray) -> np.ndarray:
        """Rectified-law forecast of log L at ``xt`` per curve, fitted on its points and D = 0."""
        from lensray.core.laws import RectifiedLaw

        sizes = np.unique(np.concatenate([np.round(np.exp2(xi)) for xi in x] + [np.zeros(1)]))
        col = {d: j for j, d in enumerate(sizes)}
        L = np.full((len(x), sizes.size), np.nan)
        L[:, 0] = np.exp(y0)
        for i, (xi, yi) in enumerate(zip(x, y)):
            L[i, [col[d] for d in np.round(np.exp2(xi))]] = np.exp(yi)
        out = _nan(len(x))
        enough = np.sum(np.isfinite(L), axis=1) >= 5
        if enough.any():
            law = RectifiedLaw().fit(sizes, L[enough])
            grid = np.unique(np.exp2(xt[enough]))
            with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
                pred = law.predict(grid)
                out[enough] = np.log(pred[np.arange(pred.shape[0]), np.searchsorted(grid, np.exp2(xt[enough]))])
        return out

    def _slope_sum(self, s: float, rho: float, s_cap: float, H: float) -> float:
        """Sum over the H doublings ahead of the slopes max(s exp(rho (phi + ... + phi^h)), s_cap)."""
        if not H > 0:
            return 0.0
        h = np.arange(1, int(np.ceil(H)) + 1)
        slope = np.maximum(s * np.exp(rho * np.cumsum(self.phi**h)), s_cap)
        weight = np.minimum(1.0, H - (h - 1))  # the last doubling counts pro rata
        return float(np.sum(slope * weight))

    def _slope_sums(self, s: np.ndarray, rho: float, s_cap: np.ndarray, H: np.ndarray) -> np.ndarray:
        """:meth:`_slope_sum` of every row at once (the same sums, term by term and in the same order)."""
        out = np.zeros(s.shape)
        ahead = H > 0
        if not ahead.any():
            return out
        n = np.ceil(H[ahead]).astype(np.int64)
        h = np.arange(1, int(n.max()) + 1)
        growth = np.exp(rho * np.cumsum(self.phi**h))
        terms = np.maximum(s[ahead, None] * growth, s_cap[ahead, None]) * np.minimum(1.0, H[ahead, None] - (h - 1))
        sums = np.empty(n.size)
        for length in np.unique(n):  # one reduction per length: numpy sums a row of that length as a 1-D array
            rows = np.flatnonzero(n == length)
            sums[rows] = np.sum(terms[rows, :length], axis=1)
        out[ahead] = sums
        return out

    @staticmethod
    def _combine(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The median of each row's finite members and their standard deviation (0 for one member)."""
        finite = np.isfinite(members)
        with np.errstate(invalid="ignore"), warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            centre = _nanmedian_rows(members)
            spread = np.where(finite.sum(axis=1) > 1, np.nanstd(members, axis=1, ddof=1), 0.0)
        return centre, np.where(finite.any(axis=1), spread, np.nan)

    def _forecast(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray,
                  xt: np.ndarray, rect: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """log L at ``xt[i]`` per curve (the members' median), and the members, (n, 4)."""
        members = self._members(x, y, y0, xt, rect)
        return self._combine(members)[0], members

    def _truncations(self, x: list[np.ndarray]) -> list[tuple[int, int]]:
        """Every (row, number of points) that the backtests of :meth:`_pooled_split` and
        :meth:`_widen_by_origin` forecast to the row's last point."""
        sizes = [xi.size for xi in x]
        out = set()
        for b in range(1, max(sizes, default=0) - self.k + 1):
            keep = [i for i, m in enumerate(sizes) if m - b >= self.k]
            if len(keep) < 2:
                break
            out.update((i, sizes[i] - b) for i in keep)
        for p in {m for m in sizes if m >= self.k}:
            longer = [j for j, m in enumerate(sizes) if m > p]
            if len(longer) >= 2:
                out.update((j, p) for j in longer)
        return sorted(out)

    def _rectified_memo(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray) -> dict[tuple[int, int], float]:
        """The rectified member of every backtest (row, points) -> log L at the row's last point,
        fitted in one batch (one law fit per prediction instead of one per backtest)."""
        jobs = self._truncations(x)
        if not jobs:
            return {}
        got = self._rectified([x[i][:m] for i, m in jobs], [y[i][:m] for i, m in jobs],
                              np.array([y0[i] for i, _ in jobs]), np.array([x[i][-1] for i, _ in jobs]))
        return dict(zip(jobs, got))

    # -- interval scale from leave-future-out backtests
    def _backtests(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray, memo: dict | None = None):
        """Yield ``(err, horizon)`` per backtest ``b = 1, 2, ...``: the last ``b`` points hidden.

        ``err`` are the log-loss errors of the kept curves at their last point, ``horizon`` the
        mean distance (doublings) from the hidden-from point to it.
        """
        m_max = max((xi.size for xi in x), default=0)
        for b in range(1, m_max - self.k + 1):
            keep = [i for i in range(len(x)) if x[i].size - b >= self.k]
            if len(keep) < 2:
                break
            err, horizon = self._hidden_errors(x, y, y0, keep, [x[i].size - b for i in keep], memo)
            if np.isfinite(err).any():
                yield err, horizon

    def _hidden_errors(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray, rows: list[int],
                       points: list[int], memo: dict | None = None) -> tuple[np.ndarray, float]:
        """Log-loss errors of ``rows`` at their last point forecast from their first ``points``
        points, and the mean distance (doublings) of those forecasts; ``memo``: the rectified
        member by (row, points) (:meth:`_rectified_memo`)."""
        xs = [x[i][:m] for i, m in zip(rows, points)]
        rect = None if memo is None else np.array([memo[i, m] for i, m in zip(rows, points)])
        pred, _ = self._forecast(xs, [y[i][:m] for i, m in zip(rows, points)], y0[rows],
                                 np.array([x[i][-1] for i in rows]), rect)
        err = np.array([y[i][-1] for i in rows]) - pred
        return err, float(np.mean([x[i][-1] - xi[-1] for i, xi in zip(rows, xs)]))

    @staticmethod
    def _parts(err: np.ndarray) -> tuple[float, float, int]:
        """The zoo-common part ``|mean|`` of forecast errors, the sum of squared residuals about
        it, and their degrees of freedom (finite errors - 1)."""
        finite = err[np.isfinite(err)]
        if finite.size == 0:
            return float("nan"), 0.0, -1
        c = float(finite.mean())
        return abs(c), float(np.sum((finite - c) ** 2)), finite.size - 1

    def _pooled_split(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray,
                      H: np.ndarray, memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Zoo-common and own parts of the backtest error, scaled to each horizon ``H`` (doublings).

        In backtest ``b`` the errors split into their zoo mean ``c_b`` and residuals ``u_i``; both
        are scaled by ``g_b = (H / horizon_b)^gamma``. The common parts are pooled by root mean
        square over ``b``; the residuals' variance by their degrees of freedom,
        ``sum_b g_b^2 sum_i u_i^2 / sum_b (n_b - 1)``, and its root is widened for the few
        curves it rests on (:func:`small_sample_factor`). NaN when no backtest is possible.
        """
        return self._pool(list(self._backtests(x, y, y0, memo)), H)

    def _pool(self, backtests: list[tuple[np.ndarray, float]], H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The pooled split of :meth:`_pooled_split` from the backtests' ``(err, horizon)``."""
        common, own, dof = [], [], 0
        for err, horizon in backtests:
            g = (np.maximum(H, 0.0) / horizon) ** self.gamma
            c, ss, k = self._parts(err)
            common.append(c * g)
            own.append(ss * g**2)
            dof += k
        if dof < 1:
            return np.full(H.shape, np.nan), np.full(H.shape, np.nan)
        own_sd = np.sqrt(np.sum(own, axis=0) / dof) * small_sample_factor(dof)
        return np.sqrt(np.mean(np.square(common), axis=0)), own_sd

    def _widen_by_origin(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray, H: np.ndarray,
                         common: np.ndarray, own: np.ndarray, memo: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The split widened by backtests from each row's own number of points (see the class docstring)."""
        origins = []
        for p in {xi.size for xi in x if xi.size >= self.k}:
            longer = [j for j in range(len(x)) if x[j].size > p]
            if len(longer) >= 2:
                origins.append((p, *self._hidden_errors(x, y, y0, longer, [p] * len(longer), memo)))
        return self._widen(origins, np.array([xi.size for xi in x]), H, common, own)

    def _widen(self, origins: list[tuple[int, np.ndarray, float]], count: np.ndarray, H: np.ndarray,
               common: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The split of :meth:`_widen_by_origin` from each origin's ``(points, err, horizon)``;
        ``count``: each row's number of points."""
        common, own = common.copy(), own.copy()
        for p, err, h in origins:
            c, ss, dof = self._parts(err)
            if dof < 1:
                continue
            rows = count == p
            g = (np.maximum(H[rows], 0.0) / h) ** self.gamma
            common[rows] = np.fmax(common[rows], c * g)
            own[rows] = np.fmax(own[rows], np.sqrt(ss / dof) * small_sample_factor(dof) * g)
        return common, own

    def _points(self, curves: Curves) -> tuple[list[np.ndarray], list[np.ndarray], np.ndarray]:
        """Per curve log2 D and log L of the points D > 0, and the zero-shot log-loss (NaN if none)."""
        x, y = [], []
        for i in range(len(curves)):
            D, L = _row_points(curves, i)
            x.append(np.log2(D))
            y.append(np.log(L))
        zero = np.flatnonzero(curves.D == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            y0 = np.log(curves.L[:, zero[0]]) if zero.size else _nan(len(curves))
        return x, y, y0

    def members(self, curves: Curves, target: int) -> np.ndarray:
        """Each member's forecast of log L at ``target``, shape (n, 4) in :data:`MEMBERS` order
        (the point forecast is their median; no interval is computed)."""
        xt = np.log2(_check_target(curves, target))
        x, y, y0 = self._points(curves)
        return self._members(x, y, y0, np.full(len(curves), xt))

    def predict_point(self, curves: Curves, target: int) -> np.ndarray:
        """The point forecast of :meth:`predict` (loss at ``target`` per row) without its interval."""
        return np.exp(self._combine(self.members(curves, target))[0])

    def _predict(self, curves: Curves, target: int) -> Prediction:
        xt = np.log2(_check_target(curves, target))
        x, y, y0 = self._points(curves)
        errors = [f"needs at least {self.k} measured points with D > 0, has {xi.size}" if xi.size < self.k else None
                  for xi in x]
        members = self._members(x, y, y0, np.full(len(curves), xt))
        logL, spread = self._combine(members)
        H = np.array([xt - xi[-1] if xi.size else np.nan for xi in x])
        memo = self._rectified_memo(x, y, y0)
        common, own = self._pooled_split(x, y, y0, H, memo)
        half = stats.norm.ppf(0.5 + LEVEL / 2) * np.sqrt(common**2 + own**2 + spread**2)
        common_w, own_w = self._widen_by_origin(x, y, y0, H, common, own, memo)
        return _prediction(curves, np.exp(logL), np.exp(logL - half), np.exp(logL + half), errors=errors,
                           params=members, param_names=MEMBERS, error_split=(common_w, np.hypot(own_w, spread)))




SELECTORS: dict[str, type[Selector]] = {
    cls.name: cls
    for cls in (
        ZeroShotSelector, SubTuningSelector, ModelSizeSelector, VanillaSelector, RectifiedSelector,
        AtSSelector, LensLLMSelector, LensraySelector,
    )
}


def get_selector(name: str, level: float = LEVEL) -> Selector:
    """A selector by registry name, its intervals at ``level``.

    Raises
    ------
    LensrayInputError
        For an unknown name.
    """
    try:
        selector = SELECTORS[name]()
    except KeyError:
        raise LensrayInputError(f"method: unknown selection method {name!r} (choose from {', '.join(SELECTORS)})") from None
    if not 0 < level < 1:
        raise LensrayInputError(f"level: must lie strictly between 0 and 1, got {level}")
    selector.level = level
    return selector
