"""Selection methods: curves visible under a budget -> predicted loss at D*, interval, rank.

Every method is a :class:`Selector` with ``predict(curves, target) -> Prediction``; the
registry :data:`SELECTORS` maps the names used by the CLI to the classes. A row that a method
cannot score gets ``ok = False``, a NaN score and a one-line reason in ``errors``; the other
rows are still ranked, failed rows last.

Methods (DESIGN.md §2-§3): ``zeroshot`` (loss at D = 0), ``subtuning`` (loss at the largest
visible D), ``modelsize`` (score log size, larger is better), ``vanilla`` (power law on
D > 0), ``rectified`` (rectified law on D = 0 and D > 0), ``ats`` (Accept-then-Stop line),
``lensllm`` (LensLLM law; F from the probes' NTK features when the curves carry them) and ``lensray``
(the project's predictor, :class:`LensraySelector`).
"""

from __future__ import annotations

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
        log ``loss`` (:func:`lensray_error_split`).
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
class LensraySelector(Selector):
    """The project's predictor: power-phase tangent + zoo-shared slope growth, damped and capped.

    Per curve (points D > 0, x = log2 D, y = log L):

    1. **Tangent**: OLS line through the last ``k_tangent`` measured points (the current power-
       phase slope ``s_i <= 0`` and level ``e_i`` at the last point ``x_i``).
    2. **Zoo-shared steepening**: fine-tuning curves steepen in log-log as they leave the
       pre-power phase. Each curve with at least 4 points gives a relative steepening rate
       ``rho_i = y''/y'`` at its last point from a quadratic fit over its last
       ``curvature_window`` points; the zoo rate ``rho`` is their median (one number per zoo:
       sharing strength across candidates; one curve's curvature is too noisy to extrapolate).
       **Shared out by the transition** (the zero-shot point D = 0): the rectified law without its
       floor, ``L = B / (D_l + D^beta)``, places a curve at transition progress ``u = 1 - L/L(0)``
       (the share of its zero-shot loss already gone), where its log-log slope is ``-beta u ln 2``
       and its steepening rate ``d log|s| / d log2 D = |s| (1 - u) / u =: t_i``: a curve that has
       shed most of its zero-shot loss has little steepening left. The zoo still sets how much
       curves steepen; the law only shares it out, ``rho_i = rho clip(t_i / median t, 1/c, c)^w``
       (``|s|`` the least-squares slope over the curvature window; ``w = transition_weight``,
       halfway in log between the zoo-common rate, 0, and the law's own, 1, whose noise fails the
       noisier synthetic zoos; ``c = transition_clip``). A curve without a zero-shot loss, or not
       below it, keeps ``rho``, and so does every curve when fewer than 3 can be placed (a table
       without the D = 0 column gets the zoo rate throughout).
    3. **Damped trend** (as in Holt's damped-trend forecasting): after ``h`` more doublings the
       slope is ``s_i exp(rho_i (phi + phi^2 + ... + phi^h))``, so the steepening fades with
       damping ``phi``; log L at the target is ``e_i`` plus the sum of these slopes over the
       ``H_i = log2(target) - x_i`` doublings (the last, fractional one pro rata).
    4. **Saturation at the zoo's steepest slope**: the power phase has a limiting slope (the
       rectified law's ``-beta``), so steepening stops there. No curve is steepened beyond
       ``s_cap``, the ``cap_quantile`` quantile of the zoo's current tangent slopes (a robust
       "steepest slope measured so far"); a curve already steeper keeps its own slope. A curve
       that is alone in its zoo is therefore extrapolated along its tangent.
    5. **Interval** (90 %): leave-future-out backtests on the visible data: the same predictor
       run with the last ``b`` points hidden predicts the hidden last point of every curve
       (``b`` doublings ahead, ``b = 1, 2, ...`` while ``k_tangent`` points remain); the
       errors of each ``b`` are scaled to the target's distance by ``(H / b)^gamma``
       (``gamma = 1.5``: between slope errors, linear in H, and curvature errors, quadratic)
       and pooled over ``b`` into ``sigma(H_i)``, a zoo-common and an own part (below); the
       interval is ``exp(log L_hat -/+ z_0.95 sigma(H_i))``; NaN when no curve has more than
       ``k_tangent`` points (nothing to backtest). The own part's spread is estimated on the
       curves at hand and widened by ``t_dof / z`` (:func:`small_sample_factor`): a zoo where
       only 2 curves are long enough to backtest cannot claim a narrow interval. The prediction
       also carries the split of this error into a zoo-common and an own part
       (:func:`lensray_error_split`).

    The rank is that of the point prediction (the predictive spread is the same for every
    candidate of a zoo, so the probability of being best orders them alike).

    Defaults are fixed here, identical for every table; nothing looks at columns beyond the
    budget. ``benchmarks/selection_study.py`` holds the evidence for each default (a plateau on
    both shared tables, on pseudo-protocols with nearer targets, on synthetic zoos and on
    random sub-zoos) and the alternatives that were measured and rejected.
    """

    name = "lensray"

    def __init__(
        self,
        k_tangent: int = 3,
        curvature_window: int = 5,
        phi: float = 0.75,
        gamma: float = 1.5,
        cap_quantile: float = 0.05,
        transition_weight: float = 0.5,
        transition_clip: float = 4.0,
    ) -> None:
        self.k_tangent, self.curvature_window, self.phi, self.gamma = k_tangent, curvature_window, phi, gamma
        self.cap_quantile = cap_quantile
        self.transition_weight, self.transition_clip = transition_weight, transition_clip

    # -- point forecast
    def _forecast(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray,
                  xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """log L at ``xt[i]`` (log2 size) for each curve, and (slope, level, own rho) per curve.

        ``y0``: each curve's zero-shot log-loss (NaN when unknown).
        """
        n = len(x)
        k, w = self.k_tangent, self.curvature_window
        count = np.array([xi.size for xi in x])
        X, Y, M = _last_points(x, y, max(k, w))
        a, b = _polyfit_rows(X[:, -k:], Y[:, -k:], M[:, -k:], 1).T
        fitted = count >= k
        s, e = np.where(fitted, np.minimum(a, 0.0), np.nan), np.where(fitted, b, np.nan)
        q2, q1, _ = _polyfit_rows(X[:, -w:], Y[:, -w:], M[:, -w:], 2).T
        curved = fitted & (np.minimum(count, w) >= 4) & (q1 < -1e-3)
        rho = np.where(curved, 2 * q2 / np.where(curved, q1, 1.0), np.nan)
        zoo_rho = float(np.nanmedian(rho)) if np.isfinite(rho).any() else 0.0
        window_slope = _polyfit_rows(X[:, -w:], Y[:, -w:], M[:, -w:], 1)[:, 0]
        last = np.array([yi[-1] if yi.size else np.nan for yi in y])
        rates = self._transition_rates(np.where(fitted, y0 - last, np.nan), window_slope, zoo_rho)
        s_cap = float(np.quantile(s[fitted], self.cap_quantile)) if fitted.any() else 0.0
        out = _nan(n)
        for i in np.flatnonzero(fitted):
            out[i] = e[i] + self._slope_sum(s[i], rates[i], min(s_cap, s[i]), xt[i] - x[i][-1])
        return out, np.column_stack([s, e, rho])

    def _transition_rates(self, gone: np.ndarray, slope: np.ndarray, zoo_rho: float) -> np.ndarray:
        """Each curve's steepening rate: the zoo's ``zoo_rho`` shared out by the transition (step 2).

        ``gone``: log L(0) - log L at the last point (NaN when unknown); ``slope``: the
        least-squares slope over the curvature window.
        """
        with np.errstate(divide="ignore", invalid="ignore"):
            # |s| (1 - u) / u with u = 1 - exp(-gone)
            t = np.where(np.isfinite(gone) & (gone > 0), -np.minimum(slope, 0.0) / np.expm1(gone), np.nan)
        placed = np.isfinite(t) & (t > 0)
        if placed.sum() < 3:
            return np.full(gone.shape, zoo_rho)
        c = self.transition_clip
        ratio = np.where(placed, np.clip(t / np.median(t[placed]), 1 / c, c), 1.0)
        return zoo_rho * ratio**self.transition_weight

    def _slope_sum(self, s: float, rho: float, s_cap: float, H: float) -> float:
        """Sum over the H doublings ahead of the slopes max(s exp(rho (phi + ... + phi^h)), s_cap)."""
        if H <= 0:
            return 0.0
        h = np.arange(1, int(np.ceil(H)) + 1)
        slope = np.maximum(s * np.exp(rho * np.cumsum(self.phi**h)), s_cap)
        weight = np.minimum(1.0, H - (h - 1))  # the last doubling counts pro rata
        return float(np.sum(slope * weight))

    # -- interval scale from leave-future-out backtests
    def _backtests(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray):
        """Yield ``(err, horizon)`` per backtest ``b = 1, 2, ...``: the last ``b`` points hidden.

        ``err`` are the log-loss errors of the kept curves at their last point, ``horizon`` the
        mean distance (doublings) from the hidden-from point to it.
        """
        m_max = max((xi.size for xi in x), default=0)
        for b in range(1, m_max - self.k_tangent + 1):
            keep = [i for i in range(len(x)) if x[i].size - b >= self.k_tangent]
            if len(keep) < 2:
                break
            err, horizon = self._hidden_errors(x, y, y0, keep, [x[i].size - b for i in keep])
            if np.isfinite(err).any():
                yield err, horizon

    def _hidden_errors(self, x: list[np.ndarray], y: list[np.ndarray], y0: np.ndarray, rows: list[int],
                       points: list[int]) -> tuple[np.ndarray, float]:
        """Log-loss errors of ``rows`` at their last point forecast from their first ``points``
        points, and the mean distance (doublings) of those forecasts."""
        xs = [x[i][:m] for i, m in zip(rows, points)]
        pred, _ = self._forecast(xs, [y[i][:m] for i, m in zip(rows, points)], y0[rows],
                                 np.array([x[i][-1] for i in rows]))
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
                      H: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Zoo-common and own parts of the backtest error, scaled to each horizon ``H`` (doublings).

        In backtest ``b`` the errors split into their zoo mean ``c_b`` and residuals ``u_i``; both
        are scaled by ``g_b = (H / horizon_b)^gamma``. The common parts are pooled by root mean
        square over ``b``; the residuals' variance by their degrees of freedom,
        ``sum_b g_b^2 sum_i u_i^2 / sum_b (n_b - 1)``, and its root is widened for the few
        curves it rests on (:func:`small_sample_factor`). NaN when no backtest is possible.
        """
        common, own, dof = [], [], 0
        for err, horizon in self._backtests(x, y, y0):
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
                         common: np.ndarray, own: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The split widened by backtests from each row's own number of points (:func:`lensray_error_split`)."""
        common, own = common.copy(), own.copy()
        for p in {xi.size for xi in x if xi.size >= self.k_tangent}:
            longer = [j for j in range(len(x)) if x[j].size > p]
            if len(longer) < 2:
                continue
            err, h = self._hidden_errors(x, y, y0, longer, [p] * len(longer))
            c, ss, dof = self._parts(err)
            if dof < 1:
                continue
            rows = np.array([xi.size == p for xi in x])
            g = (np.maximum(H[rows], 0.0) / h) ** self.gamma
            common[rows] = np.fmax(common[rows], c * g)
            own[rows] = np.fmax(own[rows], np.sqrt(ss / dof) * small_sample_factor(dof) * g)
        return common, own

    def _predict(self, curves: Curves, target: int) -> Prediction:
        xt = np.log2(_check_target(curves, target))
        n = len(curves)
        x, y, errors = [], [], []
        for i in range(n):
            D, L = _row_points(curves, i)
            x.append(np.log2(D))
            y.append(np.log(L))
            short = D.size < self.k_tangent
            errors.append(f"needs at least {self.k_tangent} measured points with D > 0, has {D.size}" if short else None)
        zero = np.flatnonzero(curves.D == 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            y0 = np.log(curves.L[:, zero[0]]) if zero.size else _nan(n)  # NaN where no positive zero-shot loss
        logL, params = self._forecast(x, y, y0, np.full(n, xt))
        H = np.array([xt - xi[-1] if xi.size else np.nan for xi in x])
        common, own = self._pooled_split(x, y, y0, H)
        half = stats.norm.ppf(0.5 + LEVEL / 2) * np.hypot(common, own)
        loss = np.exp(logL)
        return _prediction(curves, loss, np.exp(logL - half), np.exp(logL + half), errors=errors, params=params,
                           param_names=("slope", "level", "steepening"),
                           error_split=self._widen_by_origin(x, y, y0, H, common, own))


def lensray_error_split(curves: Curves, target: int, selector: LensraySelector | None = None) -> tuple[np.ndarray, np.ndarray] | None:
    """Split the ``lensray`` predictor's log-loss error at ``target`` into a zoo-common and an own part.

    The same leave-future-out backtests as the predictor's interval (the last ``b`` points
    hidden, ``b = 1, 2, ...``): in backtest ``b`` the errors ``err_i`` of the kept curves are
    split into their zoo mean ``c_b`` (what moves every candidate together, e.g. the zoo-shared
    steepening) and the residuals ``u_i = err_i - c_b``. Both parts are scaled to each row's
    distance ``H_i`` like the predictor's interval, ``g_b = (H_i / b)^gamma``, and pooled over
    ``b``: ``sd_common = rms_b(|c_b| g_b)``, ``sd_own^2 = f(dof)^2 sum_b g_b^2 sum_i u_i^2 / dof``
    with ``dof = sum_b (n_b - 1)`` and ``f`` the small-sample factor ``t_dof / z``
    (:func:`small_sample_factor`), so ``sd_common^2 + sd_own^2`` is the square of the
    predictor's own ``sigma(H_i)`` (before the widening below).

    A forecast from few points (early in a curve, before its power phase) is less reliable
    than the same horizon seen from late points, and the backtests above mostly start late. So
    each part is also measured from the row's own **origin**: the curves longer than the row,
    cut to its number of points ``p``, forecast their last point (mean distance ``h``); the
    mean and the spread of those errors (``n - 1`` degrees of freedom, widened by the same
    small-sample factor), scaled by ``(H_i / h)^gamma``, are a second estimate of the common
    and own parts, and each part is the larger of its two estimates (when at least 2 curves are
    longer). Only ever wider: a scheduler comparing on these parts stops a
    candidate early only when early forecasts have proven reliable on the zoo.

    Returns
    -------
    sd_common, sd_own : arrays (n,)
        Standard deviations of the two parts of log L-hat at ``target`` (NaN when no backtest
        is possible or the row has no points).
    """
    return (LensraySelector() if selector is None else selector).predict(curves, target).error_split


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
