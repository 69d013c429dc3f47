"""Fine-tuning scaling laws and their batched fitting (numpy/scipy only).

Laws (D = fine-tuning samples, L = test loss):

- ``PowerLaw`` ("vanilla"):   L(D) = (1 / (B D^beta) + E)^alpha, fitted on D > 0 only.
- ``RectifiedLaw`` ("rectified"): L(D) = B / (D_l + D^beta) + E. D = 0 is a real point:
  L(0) = B / D_l + E (the zero-shot loss); it is never replaced by a tiny D.
- ``LensLLMLaw`` ("lensllm"):  L(D) = B / (F + D^beta) + E, see below.

Fitting (identical machinery for every law)
-------------------------------------------
* Loss: least squares on log L, i.e. relative errors; NaN entries of ``L`` are missing points
  (weight 0), per curve.
* Parameters are optimised in an internal, bounded, well-scaled parameterisation:
  rectified uses L = A / (1 + (D / D0)^beta) + E with (log A, log D0, log beta, E), so
  that D0 (the size where the power phase starts) lives on the log-D axis; then
  D_l = D0^beta and B = A D_l. E >= 0 is kept linear so that E = 0 is reachable (a log E
  would crawl towards -inf). Vanilla uses (log B, log beta, log E, log alpha). Positivity
  comes from the logs and box bounds (``_lo``/``_hi`` of each law).
* Starts: a grid over the nonlinear parameters where the linear ones are solved in closed form
  (variable projection: for fixed (D0, beta) the rectified law is linear in (A, E); a 2x2
  weighted non-negative least-squares per grid point, weights 1/L approximating log space).
  The best ``n_starts`` grid points of each curve are refined.
* Refinement: a Levenberg–Marquardt vectorised over all (curve, start) pairs at once, with
  analytic Jacobians, Marquardt diagonal scaling and box bounds handled by projection
  (parameters at a bound whose gradient points outward are frozen for that step).
  The best start per curve wins.
* A curve with fewer valid points than parameters, or whose fit is not finite, gets
  ``fitted_ = converged_ = False``, NaN parameters and NaN predictions; the rest of the batch
  is fitted. A curve still moving at the iteration limit keeps its (best so far) parameters and
  predictions, ``fitted_ = True`` but ``converged_ = False`` (seen only with the vanilla law,
  whose parameters are degenerate along long valleys).
* Also returned: ``n_points_`` (valid points per curve) and ``residuals_`` (log space, NaN
  where missing).

Predictive interval (``predict_interval``)
------------------------------------------
Delta method in log space at the optimum: Cov(theta) = s^2 (J^T J)^+ with
s^2 = SSR / (m - p) (m valid points, p parameters), Var[log L_new(D)] = g(D)^T Cov g(D) + s^2
(parameter uncertainty plus the noise of a new observation), and the interval
exp(log L_hat(D) -/+ t_{(1+level)/2, m-p} sqrt(Var)). It is NaN where m <= p.

LensLLM (Zeng et al., ICML 2025), operational definition
--------------------------------------------------------
F(Theta, t) = ||expm(-eta Theta t) r0||^2 comes from the NTK features (lensray/engine/ntk.py: probe set
of n training samples, r0 their per-token mean NLL, Theta the sketched empirical NTK, t the
probe's optimiser steps, eta its learning rate; F(0) = ||r0||^2). It is a squared norm of
per-sample losses, not a number of samples, so it is put on the D^beta scale by
one scale gamma > 0 **shared by every curve of the batch**: L_i(D) = B_i / (gamma F_i + D^beta_i)
+ E_i. A per-curve scale would make F irrelevant (gamma_i F_i is just a free D_l); one shared
gamma makes the pre-learned data size proportional to F across the zoo, which is the LensLLM
claim. gamma is fitted on the batch's total log-space SSE, profiling out (B, beta, E) of every
curve: short fits on a log-grid of gamma locate the best cell, a bounded Brent search refines
it (each evaluation refits all curves, warm-started), and a final multi-start fit settles the
per-curve parameters.
F may be given per curve, shape (n,), or per point, shape (n, m) (F depends on the probe's
optimiser steps t, which grow with D); in the per-point case ``predict`` needs F at the new D.
Modes: ``fit(D, L, F=...)`` is the "phase" mode; ``fit(D, L)`` is the "prediction" mode where
F_i is a free parameter per curve (the law is then the rectified law with D_l named F).
The interval of the phase mode treats gamma as known.
"""

from __future__ import annotations

import numpy as np
from scipy import optimize, stats

from lensray.errors import LensrayInputError

__all__ = ["ScalingLaw", "PowerLaw", "RectifiedLaw", "LensLLMLaw", "LAWS", "get_law"]

_EXP_MAX = 700.0


# ----------------------------------------------------------------------------- input checks


def _check_inputs(D, L) -> tuple[np.ndarray, np.ndarray]:
    D = np.asarray(D, dtype=float)
    if D.ndim != 1:
        raise LensrayInputError(f"D: expected a 1-D array of sample sizes, got shape {D.shape}")
    if not np.all(np.isfinite(D)) or np.any(D < 0):
        raise LensrayInputError("D: sample sizes must be finite and >= 0")
    L = np.asarray(L, dtype=float)
    if L.ndim == 1:
        L = L[None, :]
    if L.ndim != 2 or L.shape[1] != D.size:
        raise LensrayInputError(f"L: expected shape (n, {D.size}), got {np.shape(L)}")
    bad = np.isinf(L) | (L <= 0)
    if bad.any():
        i, j = np.argwhere(bad)[0]
        raise LensrayInputError(f"L: row {i}, D={D[j]:g}: loss must be positive and finite (NaN = missing)")
    return D, L


# ----------------------------------------------------------------------------- optimiser


def _levenberg_marquardt(model, theta, lo, hi, y, w, max_iter=400, tol=1e-9, gtol=1e-5):
    """Batched, box-bounded Levenberg–Marquardt on sum_j (w_ij (model_ij - y_ij))^2.

    ``model(theta_rows, rows) -> (yhat (k, m), J (k, m, p))`` evaluates the rows listed in
    ``rows`` at parameters ``theta_rows``. A row stops when an accepted step gains less than
    ``tol`` of its cost, when its gradient is ~orthogonal to the residual (``gtol``), or when no
    damping gives a descent step. Returns (theta, cost, stopped_on_a_test), the last False
    for rows still moving at ``max_iter``.
    """
    N, p = theta.shape
    theta = np.clip(theta, lo, hi)
    rows = np.arange(N)
    yhat, J = model(theta, rows)
    r = (yhat - y) * w
    cost = np.einsum("km,km->k", r, r)
    lam = np.full(N, 1e-3)
    done = ~np.isfinite(cost)
    ok = np.zeros(N, dtype=bool)
    eye = np.eye(p)
    for _ in range(max_iter):
        act = np.flatnonzero(~done)
        if act.size == 0:
            break
        Jw = J[act] * w[act, :, None]
        g = np.einsum("kmp,km->kp", Jw, r[act])
        H = np.einsum("kmp,kmq->kpq", Jw, Jw)
        th = theta[act]
        frozen = ((th <= lo + 1e-12) & (g > 0)) | ((th >= hi - 1e-12) & (g < 0))
        free = ~frozen
        mask2 = free[:, :, None] & free[:, None, :]
        H = np.where(mask2, H, 0.0)
        g = np.where(free, g, 0.0)
        d = np.einsum("kpp->kp", H)
        # first-order optimality (MINPACK's gtol): every free Jacobian column ~orthogonal to r
        cosine = np.abs(g) / np.sqrt(d * cost[act, None] + 1e-300)
        stationary = np.max(cosine, axis=1) <= gtol
        ok[act[stationary]] = True
        done[act[stationary]] = True
        scale = np.maximum(d, 1e-12 * (d.max(axis=1, keepdims=True) + 1e-300))
        A = H + (lam[act, None] * scale + (~free) * 1.0)[:, :, None] * eye
        try:
            step = -np.linalg.solve(A, g[:, :, None])[:, :, 0]
        except np.linalg.LinAlgError:
            step = -np.stack([np.linalg.lstsq(a, b, rcond=None)[0] for a, b in zip(A, g)])
        new = np.clip(th + step, lo, hi)
        yn, Jn = model(new, act)
        rn = (yn - y[act]) * w[act]
        cn = np.einsum("km,km->k", rn, rn)
        acc = np.isfinite(cn) & (cn <= cost[act])
        a_idx = act[acc]
        gain = cost[a_idx] - cn[acc]
        theta[a_idx] = new[acc]
        J[a_idx] = Jn[acc]
        r[a_idx] = rn[acc]
        small = gain <= tol * cost[a_idx] + 1e-20
        cost[a_idx] = cn[acc]
        lam[a_idx] = np.maximum(lam[a_idx] / 3.0, 1e-12)
        lam[act[~acc]] *= 4.0
        ok[a_idx[small]] = True
        done[a_idx[small]] = True
        stuck = act[~acc][lam[act[~acc]] > 1e10]
        ok[stuck] = True  # no descent direction left at the finest step: a (local) minimum
        done[stuck] = True
    return theta, cost, ok


# ----------------------------------------------------------------------------- base class


class ScalingLaw:
    """Base class: a law fitted to ``n`` curves at once. See the module docstring."""

    name: str = ""
    param_names: tuple[str, ...] = ()

    def __init__(self, n_starts: int = 4, max_iter: int = 400) -> None:
        self.n_starts = n_starts
        self.max_iter = max_iter

    # --- to implement by each law
    _lo: np.ndarray
    _hi: np.ndarray
    _uses_zero: bool = True

    def _model(self, theta: np.ndarray, D: np.ndarray, rows: np.ndarray, K: np.ndarray | None = None):
        """log L_hat (k, m) and its Jacobian (k, m, p) w.r.t. the internal parameters.

        ``rows`` are the batch rows being evaluated; ``K`` (k, m) is the LensLLM NTK term at D.
        """
        raise NotImplementedError

    def _starts(self, D: np.ndarray, L: np.ndarray, mask: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Initial internal parameters of batch rows ``rows``, shape (len(rows), n_starts, p)."""
        raise NotImplementedError

    def _natural(self, theta: np.ndarray, rows: np.ndarray) -> np.ndarray:
        """Internal parameters of batch rows ``rows`` -> the law's ``param_names`` columns."""
        raise NotImplementedError

    def _new_K(self, D: np.ndarray, F) -> np.ndarray | None:
        """The NTK term at new sizes for ``predict`` (LensLLM only)."""
        if F is not None:
            raise LensrayInputError(f"F: the {self.name} law takes no NTK term")
        return None

    # --- shared machinery
    @property
    def n_params(self) -> int:
        return len(self.param_names)

    def _prepare(self, D, L):
        """Checked inputs with each curve divided by its geometric-mean loss ``_scale``.

        Log-space fits are equivariant to this scaling, so bounds hold in relative units.
        """
        D, L = _check_inputs(D, L)
        mask = np.isfinite(L)
        if not self._uses_zero:
            mask &= (D > 0)[None, :]
        logL = np.where(mask, np.log(np.where(mask, L, 1.0)), 0.0)
        self._scale = np.exp(logL.sum(axis=1) / np.maximum(mask.sum(axis=1), 1))
        return D, L / self._scale[:, None], mask

    def _fit_batch(self, D, L, mask, warm=None):
        """Fit every curve with enough points; returns theta (n, p) NaN where not fitted, flags, cost.

        ``warm`` (n, p): extra start per curve (rows with NaN fall back to the grid starts).
        """
        n, p = L.shape[0], self._lo.size
        y = np.where(mask, np.log(np.where(mask, L, 1.0)), 0.0)
        w = mask.astype(float)
        enough = mask.sum(axis=1) >= p
        theta = np.full((n, p), np.nan)
        conv = np.zeros(n, dtype=bool)
        cost = np.full(n, np.nan)
        idx = np.flatnonzero(enough)
        if idx.size:
            starts = self._starts(D, L[idx], mask[idx], idx)  # (k, S, p)
            if warm is not None:
                w0 = warm[idx]
                w0 = np.where(np.isfinite(w0), w0, starts[:, 0])
                starts = np.concatenate([w0[:, None], starts], axis=1)
            k, S, _ = starts.shape
            rows_of = np.repeat(idx, S)
            th, c, ok = _levenberg_marquardt(
                lambda t, r: self._model(t, D, rows_of[r]),
                starts.reshape(k * S, p).copy(), self._lo, self._hi,
                y[rows_of], w[rows_of], max_iter=self.max_iter,
            )
            c = np.where(np.isfinite(c), c, np.inf).reshape(k, S)
            best = np.argmin(c, axis=1)
            th = th.reshape(k, S, p)[np.arange(k), best]
            ok = ok.reshape(k, S)[np.arange(k), best]
            c = c[np.arange(k), best]
            good = np.isfinite(c) & np.all(np.isfinite(th), axis=1)
            theta[idx[good]] = th[good]
            conv[idx[good]] = ok[good]
            cost[idx[good]] = c[good]
        return theta, conv, cost

    def _finish(self, D, L, mask, theta, conv) -> None:
        n, p = theta.shape
        fitted = np.all(np.isfinite(theta), axis=1)
        self._theta = theta
        self.params_ = np.full((n, self.n_params), np.nan)
        if fitted.any():
            self.params_[fitted] = self._natural(theta[fitted], np.flatnonzero(fitted))
        self.converged_ = conv & fitted
        self.fitted_ = fitted
        m = mask.sum(axis=1)
        self.n_points_ = m
        resid = np.full(L.shape, np.nan)
        cov = np.full((n, p, p), np.nan)
        s2 = np.full(n, np.nan)
        idx = np.flatnonzero(fitted)
        if idx.size:
            yhat, J = self._model(theta[idx], D, idx)
            r = np.where(mask[idx], yhat - np.log(np.where(mask[idx], L[idx], 1.0)), 0.0)
            resid[idx] = np.where(mask[idx], r, np.nan)
            Jm = J * mask[idx][:, :, None]
            H = np.einsum("kmp,kmq->kpq", Jm, Jm)
            dof = m[idx] - p
            ssr = np.einsum("km,km->k", r, r)
            s2_i = np.where(dof > 0, ssr / np.maximum(dof, 1), np.nan)
            cov[idx] = np.linalg.pinv(H, hermitian=True) * s2_i[:, None, None]
            s2[idx] = s2_i
        ssq = np.nansum(np.where(fitted[:, None], resid**2, np.nan), axis=1)
        self.rmse_ = np.where(fitted, np.sqrt(ssq / np.maximum(m, 1)), np.nan)
        self.residuals_ = resid
        self._cov = cov
        self._s2 = s2
        self._dof = m - p

    def fit(self, D, L, F=None) -> "ScalingLaw":
        """Fit the law to each row of ``L`` (n, m) observed at sizes ``D`` (m,); NaN = missing."""
        if F is not None:
            raise LensrayInputError(f"F: the {self.name} law takes no NTK term")
        D, L, mask = self._prepare(D, L)
        theta, conv, _ = self._fit_batch(D, L, mask)
        self._finish(D, L, mask, theta, conv)
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "_theta"):
            raise RuntimeError(f"{type(self).__name__} is not fitted: call fit() first")

    def _predict_log(self, D, F=None):
        self._check_fitted()
        D = np.asarray(D, dtype=float)
        if D.ndim != 1 or np.any(D < 0) or not np.all(np.isfinite(D)):
            raise LensrayInputError("D: expected a 1-D array of finite sizes >= 0")
        n, p = self._theta.shape
        y = np.full((n, D.size), np.nan)
        J = np.full((n, D.size, p), np.nan)
        K = self._new_K(D, F)
        idx = np.flatnonzero(self.fitted_)
        if idx.size:
            with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
                yi, Ji = self._model(self._theta[idx], D, idx, None if K is None else K[idx])
            y[idx], J[idx] = yi, Ji
        if not self._uses_zero:
            y[:, D <= 0] = np.nan
        return y + np.log(self._scale)[:, None], J

    def predict(self, D, F=None) -> np.ndarray:
        """Predicted loss (n, len(D)); NaN for curves that could not be fitted.

        ``F`` (LensLLM fitted with per-point F only): the NTK term at the new D, (n, len(D)).
        """
        y, _ = self._predict_log(D, F)
        return np.exp(y)

    def predict_interval(self, D, level: float = 0.9, F=None) -> tuple[np.ndarray, np.ndarray]:
        """(lo, hi) of the ``level`` predictive interval, each (n, len(D)); see the module docstring."""
        if not 0 < level < 1:
            raise LensrayInputError(f"level: must be in (0, 1), got {level}")
        y, J = self._predict_log(D, F)
        var = np.einsum("kdp,kpq,kdq->kd", J, self._cov, J) + self._s2[:, None]
        dof = self._dof.astype(float)
        tq = np.where(dof > 0, stats.t.ppf(0.5 + level / 2, np.maximum(dof, 1)), np.nan)
        half = tq[:, None] * np.sqrt(np.maximum(var, 0.0))
        with np.errstate(over="ignore"):  # an unidentified direction gives (0, inf)
            return np.exp(y - half), np.exp(y + half)


# ----------------------------------------------------------------------------- helpers


def _wls_two(h, L, mask):
    """Closed-form non-negative weighted LS of L ~ a h + e with weights 1/L (relative error).

    h, L, mask broadcast to (..., m). Returns a, e (...,), both >= 0.
    """
    w2 = np.where(mask, 1.0 / np.where(mask, L, 1.0) ** 2, 0.0)
    Lz = np.where(mask, L, 0.0)
    shh = np.sum(w2 * h * h, -1)
    sh1 = np.sum(w2 * h, -1)
    s11 = np.sum(w2, -1)
    shl = np.sum(w2 * h * Lz, -1)
    s1l = np.sum(w2 * Lz, -1)
    det = shh * s11 - sh1 * sh1
    with np.errstate(divide="ignore", invalid="ignore"):
        a = (s11 * shl - sh1 * s1l) / det
        e = (shh * s1l - sh1 * shl) / det
        a_only = shl / shh
        e_only = s1l / s11
    bad = ~np.isfinite(a) | ~np.isfinite(e)
    neg_e = (e < 0) | bad
    a = np.where(neg_e, a_only, a)
    e = np.where(neg_e, 0.0, e)
    neg_a = ~(a > 0)
    a = np.where(neg_a, 0.0, a)
    e = np.where(neg_a, e_only, e)
    return a, e


def _log_cost(logLhat, L, mask):
    r = np.where(mask, logLhat - np.log(np.where(mask, L, 1.0)), 0.0)
    return np.sum(r * r, -1)


def _top_starts(cost, params, n_starts):
    """cost (n, G), params (n, G, p) -> (n, n_starts, p): the best grid points per curve."""
    cost = np.where(np.isfinite(cost), cost, np.inf)
    k = min(n_starts, cost.shape[1])
    best = np.argsort(cost, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(params, best[:, :, None], axis=1)


def _logD(D):
    with np.errstate(divide="ignore"):
        return np.where(D > 0, np.log(np.where(D > 0, D, 1.0)), -np.inf)


# ----------------------------------------------------------------------------- rectified


class RectifiedLaw(ScalingLaw):
    """L(D) = B / (D_l + D^beta) + E (Lin et al., 2024); D = 0 gives B / D_l + E."""

    name = "rectified"
    param_names = ("B", "D_l", "beta", "E")
    # internal: log A, log D0, log beta, E with L = A / (1 + (D/D0)^beta) + E, in units of _scale
    _lo = np.array([np.log(1e-8), -40.0, np.log(0.01), 0.0])
    _hi = np.array([np.log(1e3), 40.0, np.log(3.0), 1e3])

    def _model(self, theta, D, rows, K=None):
        a, c, b, e = (theta[:, i : i + 1] for i in range(4))
        A, beta, E = np.exp(a), np.exp(b), e
        pos = D > 0
        xc = np.where(pos, _logD(np.where(pos, D, 1.0)) - c, 0.0)  # log(D / D0)
        z = np.where(pos, np.exp(np.minimum(beta * xc, _EXP_MAX)), 0.0)
        h = 1.0 / (1.0 + z)
        M = A * h + E
        y = np.log(M)
        Ah_M = A * h / M
        zh = z * h
        J = np.stack(
            [Ah_M, Ah_M * beta * zh, -Ah_M * zh * xc * beta, np.broadcast_to(1.0 / M, M.shape)], axis=-1
        )
        return y, J

    def _starts(self, D, L, mask, rows):
        x = _logD(D)
        xp = x[D > 0]
        x0, x1 = (xp.min(), xp.max()) if xp.size else (0.0, 0.0)
        cs = np.concatenate([np.linspace(x0 - 2.0, x1 + 2.0, 14), x0 - np.array([4.0, 7.0, 11.0, 16.0, 22.0])])
        bs = np.geomspace(0.03, 2.5, 14)
        cg, bg = np.meshgrid(cs, bs, indexing="ij")
        cg, bg = cg.ravel(), bg.ravel()  # (G,)
        pos = D > 0
        xc = np.where(pos[None, :], np.where(pos, x, 0.0)[None, :] - cg[:, None], 0.0)
        z = np.where(pos[None, :], np.exp(np.minimum(bg[:, None] * xc, _EXP_MAX)), 0.0)
        h = 1.0 / (1.0 + z)  # (G, m)
        Lb, mb = L[:, None, :], mask[:, None, :]
        A, E = _wls_two(h[None], Lb, mb)  # (n, G)
        A = np.clip(A, np.exp(self._lo[0]), np.exp(self._hi[0]))
        E = np.clip(E, self._lo[3], self._hi[3])
        cost = _log_cost(np.log(A[..., None] * h[None] + E[..., None]), Lb, mb)
        n, G = A.shape
        params = np.stack(
            [np.log(A), np.broadcast_to(cg, (n, G)), np.broadcast_to(np.log(bg), (n, G)), E], -1
        )
        return np.clip(_top_starts(cost, params, self.n_starts), self._lo, self._hi)

    def _natural(self, theta, rows):
        a, c, b, e = theta.T
        s = self._scale[rows]
        beta = np.exp(b)
        Dl = np.exp(beta * c)
        return np.stack([s * np.exp(a) * Dl, Dl, beta, s * e], axis=1)


# ----------------------------------------------------------------------------- vanilla


class PowerLaw(ScalingLaw):
    """L(D) = (1 / (B D^beta) + E)^alpha (the "vanilla" law); D = 0 points are ignored."""

    name = "vanilla"
    param_names = ("B", "beta", "E", "alpha")
    # internal: log B, log beta, log E, log alpha
    _lo = np.array([-60.0, np.log(1e-3), -60.0, np.log(0.01)])
    _hi = np.array([60.0, np.log(5.0), 60.0, np.log(100.0)])
    _uses_zero = False

    def _model(self, theta, D, rows, K=None):
        u, b, e, g = (theta[:, i : i + 1] for i in range(4))
        beta, alpha = np.exp(b), np.exp(g)
        x = np.where(D > 0, _logD(np.where(D > 0, D, 1.0)), 0.0)
        v = -(u + beta * x)
        logS = np.logaddexp(v, e)
        y = alpha * logS
        sv = np.exp(v - logS)
        J = np.stack(
            [-alpha * sv, -alpha * sv * x * beta, alpha * np.exp(e - logS), np.broadcast_to(y, sv.shape)], axis=-1
        )
        return y, J

    def _starts(self, D, L, mask, rows):
        pos = (D > 0)[None, :] & mask  # (n, m)
        x = np.where(D > 0, _logD(np.where(D > 0, D, 1.0)), 0.0)
        logL = np.log(np.where(mask, L, 1.0))
        minL = np.min(np.where(pos, L, np.inf), axis=1)  # (n,)
        alphas = np.geomspace(0.05, 20.0, 10)
        fracs = np.array([0.0, 0.3, 0.6, 0.8, 0.9, 0.95, 0.98])
        ag, qg = (a.ravel() for a in np.meshgrid(alphas, fracs, indexing="ij"))  # (G,)
        al = ag[None, :, None]
        ratio = (qg[None, :, None] * minL[:, None, None] / np.where(pos, L, 1.0)[:, None, :]) ** (1.0 / al)
        t = logL[:, None, :] / al + np.log1p(-np.minimum(ratio, 1.0 - 1e-12))  # log(L^(1/a) - E) = -u - beta x
        wgt = np.broadcast_to(pos[:, None, :], t.shape).astype(float)
        cnt = np.maximum(wgt.sum(-1), 1.0)
        xm = (wgt * x).sum(-1) / cnt
        tm = (wgt * t).sum(-1) / cnt
        sxx = (wgt * (x - xm[..., None]) ** 2).sum(-1)
        sxt = (wgt * (x - xm[..., None]) * (t - tm[..., None])).sum(-1)
        beta = np.clip(-sxt / np.where(sxx > 0, sxx, 1.0), 1e-3, 5.0)
        u = -(tm + beta * xm)
        with np.errstate(divide="ignore"):
            e = np.where(qg > 0, np.log(qg[None, :] * minL[:, None]) / ag[None, :], self._lo[2])
        n, G = u.shape
        params = np.clip(
            np.stack([u, np.log(beta), e, np.broadcast_to(np.log(ag), (n, G))], -1), self._lo, self._hi
        )
        yhat, _ = self._model(params.reshape(n * G, 4), D, None)
        cost = _log_cost(yhat.reshape(n, G, -1), L[:, None, :], pos[:, None, :])
        return _top_starts(cost, params, self.n_starts)

    def _natural(self, theta, rows):
        B, beta, E, alpha = np.exp(theta).T
        s = self._scale[rows] ** (1.0 / alpha)  # L = s (..)^alpha = (s^(1/alpha) ..)^alpha
        return np.stack([B / s, beta, E * s, alpha], axis=1)


# ----------------------------------------------------------------------------- lensllm


class LensLLMLaw(RectifiedLaw):
    """L(D) = B / (F + D^beta) + E (Zeng et al., 2025); see the module docstring for F.

    ``fit(D, L, F=...)``: "phase" mode, F from the NTK features, (n,) or (n, m), put on the
    D^beta scale by one fitted scale ``gamma_`` shared by the batch. ``fit(D, L)``:
    "prediction" mode, F_i free (the rectified machinery). ``params_`` columns: B, F (the
    effective gamma F_i, or the fitted F_i; NaN for per-point F), beta, E. ``mode_`` says which.
    """

    name = "lensllm"
    param_names = ("B", "F", "beta", "E")
    gamma_grid = np.linspace(-4.0, 8.0, 13)  # log10 of gamma * median(F)

    # phase-mode internals: log B, log beta, log E, with K = gamma F fixed
    _lo_phase = np.array([-40.0, np.log(0.01), 0.0])
    _hi_phase = np.array([80.0, np.log(3.0), 1e3])

    @property
    def _phase(self) -> bool:
        return getattr(self, "mode_", "prediction") == "phase"

    @property
    def _lo(self):  # type: ignore[override]
        return self._lo_phase if self._phase else RectifiedLaw._lo

    @property
    def _hi(self):  # type: ignore[override]
        return self._hi_phase if self._phase else RectifiedLaw._hi

    def fit(self, D, L, F=None) -> "LensLLMLaw":
        """Fit; ``F`` is the NTK term per curve (n,) or per point (n, m); without it F is free."""
        self.mode_ = "prediction" if F is None else "phase"
        self.gamma_ = np.nan
        D, L, mask = self._prepare(D, L)
        if F is None:
            theta, conv, _ = self._fit_batch(D, L, mask)
            self._finish(D, L, mask, theta, conv)
            return self
        Fm, self._per_curve = _check_F(F, L.shape)
        mask &= np.isfinite(Fm)
        self.F_ = Fm[:, 0].copy() if self._per_curve else Fm.copy()
        logF = np.log(np.where(np.isfinite(Fm) & (Fm > 0), Fm, 1e-300))
        ref = float(np.median(logF[mask])) if mask.any() else 0.0

        def run(log10_g: float, warm=None, n_starts: int = 1, max_iter: int = self.max_iter):
            self._K = np.exp(log10_g * np.log(10.0) - ref + logF)
            saved = self.n_starts, self.max_iter
            self.n_starts, self.max_iter = n_starts, max_iter
            try:
                theta, conv, cost = self._fit_batch(D, L, mask, warm)
            finally:
                self.n_starts, self.max_iter = saved
            return theta, conv, float(np.nansum(cost))

        # coarse: short fits from the best variable-projection start on a log-grid of gamma
        grid = self.gamma_grid
        fits = [run(g, max_iter=25) for g in grid]
        j = int(np.argmin([f[2] for f in fits]))
        # fine: Brent on log10(gamma), every curve warm-started from its coarse fit
        step = grid[1] - grid[0]
        res = optimize.minimize_scalar(
            lambda g: run(g, fits[j][0])[2], bounds=(grid[j] - step, grid[j] + step), method="bounded",
            options={"xatol": 1e-3},
        )
        best = float(res.x)
        theta, conv, _ = run(best, fits[j][0], n_starts=self.n_starts)
        self.gamma_ = float(np.exp(best * np.log(10.0) - ref))
        self._finish(D, L, mask, theta, conv)
        return self

    def _model(self, theta, D, rows, K=None):
        if not self._phase:
            return super()._model(theta, D, rows)
        if K is None:
            K = self._K[rows]
        q, b, e = (theta[:, i : i + 1] for i in range(3))
        B, beta, E = np.exp(q), np.exp(b), e
        pos = D > 0
        x = np.where(pos, _logD(np.where(pos, D, 1.0)), 0.0)
        z = np.where(pos, np.exp(np.minimum(beta * x, _EXP_MAX)), 0.0)
        P = K + z
        BP = B / P
        M = BP + E
        J = np.stack([BP / M, -BP / P * z * x * beta / M, np.broadcast_to(1.0 / M, M.shape)], axis=-1)
        return np.log(M), J

    def _starts(self, D, L, mask, rows):
        if not self._phase:
            return super()._starts(D, L, mask, rows)
        pos = D > 0
        x = np.where(pos, _logD(np.where(pos, D, 1.0)), 0.0)
        bs = np.geomspace(0.02, 2.5, 24)
        z = np.where(pos[None, :], np.exp(np.minimum(bs[:, None] * x[None, :], _EXP_MAX)), 0.0)  # (G, m)
        h = 1.0 / (self._K[rows][:, None, :] + z[None])  # (n, G, m)
        Lb, mb = L[:, None, :], mask[:, None, :]
        B, E = _wls_two(h, Lb, mb)
        B = np.clip(B, np.exp(self._lo_phase[0]), np.exp(self._hi_phase[0]))
        E = np.clip(E, self._lo_phase[2], self._hi_phase[2])
        cost = _log_cost(np.log(B[..., None] * h + E[..., None]), Lb, mb)
        n, G = B.shape
        params = np.stack([np.log(B), np.broadcast_to(np.log(bs), (n, G)), E], -1)
        return np.clip(_top_starts(cost, params, self.n_starts), self._lo, self._hi)

    def _natural(self, theta, rows):
        if not self._phase:
            return super()._natural(theta, rows)
        Fcol = self.gamma_ * self.F_[rows] if self._per_curve else np.full(len(rows), np.nan)
        s = self._scale[rows]
        return np.column_stack([s * np.exp(theta[:, 0]), Fcol, np.exp(theta[:, 1]), s * theta[:, 2]])

    def _new_K(self, D, F):
        if not self._phase:
            return super()._new_K(D, F)
        n, k = self._theta.shape[0], np.asarray(D).size
        if F is None:
            if not self._per_curve:
                raise LensrayInputError("F: fitted with per-point F, so predict needs F at the new D, shape (n, len(D))")
            return np.repeat(self.gamma_ * self.F_[:, None], k, axis=1)
        return self.gamma_ * _check_F(F, (n, k))[0]


def _check_F(F, shape: tuple[int, int]) -> tuple[np.ndarray, bool]:
    """F as (n, m) and whether it was given per curve; NaN = missing."""
    F = np.asarray(F, dtype=float)
    n, m = shape
    if F.shape not in ((n,), (n, m)):
        raise LensrayInputError(f"F: expected shape ({n},) or ({n}, {m}), got {F.shape}")
    if np.any(np.isinf(F)) or np.any(F[np.isfinite(F)] < 0):
        raise LensrayInputError("F: the NTK term must be finite and >= 0 (NaN = missing)")
    if F.ndim == 1:
        return np.repeat(F[:, None], m, axis=1), True
    return F, False


LAWS: dict[str, type[ScalingLaw]] = {"vanilla": PowerLaw, "rectified": RectifiedLaw, "lensllm": LensLLMLaw}


def get_law(name: str, **kwargs) -> ScalingLaw:
    """A new, unfitted law by name: ``vanilla``, ``rectified`` or ``lensllm``."""
    try:
        return LAWS[name](**kwargs)
    except KeyError:
        raise LensrayInputError(f"law: unknown law {name!r} (choose from {', '.join(LAWS)})") from None
