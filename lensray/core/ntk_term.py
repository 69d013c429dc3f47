"""The LensLLM NTK term of each probe, as data: F(Θ, t) per point and the spectrum to extend it.

A probe of D samples trained ``t`` optimiser steps at learning rate ``η`` from weights whose
sketched NTK on the probe set has eigenvalues ``λ_j`` and coefficients ``c = Vᵀr₀``
(:mod:`lensray.engine.ntk`) has ``F(Θ, t) = Σ_j exp(−2ηλ_j t) c_j²`` (:func:`residual_norm`).
The kernel depends on the pre-trained weights only, so one spectrum serves every probe of a
candidate; ``t`` grows with D.

F at a size without a probe (the target D*) comes from the spectrum at the steps a probe of that
size would take (:meth:`NTKTerms.steps_at`): ``t`` of the largest probe scaled by the sample
ratio (a probe's steps are ``ceil(epochs · D / batch)``), or held where the steps stopped
growing (the last two probes took the same steps: ``probe.max_steps``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def residual_norm(eigenvalues: np.ndarray, coefficients: np.ndarray, eta: float, t: float | np.ndarray) -> float | np.ndarray:
    """``Σ_j exp(−2ηλ_j t) c_j²`` (negative ``λ_j`` count as 0; NaN pairs are padding); vectorised over ``t``."""
    lam = np.asarray(eigenvalues, dtype=np.float64).reshape(-1)
    c2 = np.asarray(coefficients, dtype=np.float64).reshape(-1) ** 2
    keep = np.isfinite(lam) & np.isfinite(c2)
    lam, c2 = np.clip(lam[keep], 0.0, None), c2[keep]
    tt = np.asarray(t, dtype=np.float64)
    out = np.exp(-2.0 * eta * np.multiply.outer(tt, lam)) @ c2
    return float(out) if out.ndim == 0 else out


@dataclass
class NTKTerms:
    """NTK features of ``n`` curves at ``m`` sample sizes (the columns of their :class:`~lensray.core.curves.Curves`).

    Parameters
    ----------
    F : array (n, m)
        F(Θ, t) of the probe at each size; NaN where absent.
    t : array (n, m), optional
        That probe's optimiser steps; NaN where absent (default: all absent).
    eta : array (n,), optional
        The probes' learning rate; NaN where unknown.
    eigenvalues, coefficients : arrays (n, k), optional
        Spectrum of each curve's kernel and ``Vᵀr₀``; NaN-padded; ``k = 0`` when none.
    """

    F: np.ndarray
    t: np.ndarray | None = None
    eta: np.ndarray | None = None
    eigenvalues: np.ndarray | None = None
    coefficients: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.F = np.atleast_2d(np.asarray(self.F, dtype=np.float64))
        n, m = self.F.shape
        self.t = np.full((n, m), np.nan) if self.t is None else np.asarray(self.t, dtype=np.float64)
        self.eta = np.full(n, np.nan) if self.eta is None else np.asarray(self.eta, dtype=np.float64).reshape(-1)
        empty = np.full((n, 0), np.nan)
        self.eigenvalues = empty if self.eigenvalues is None else np.asarray(self.eigenvalues, dtype=np.float64)
        self.coefficients = empty if self.coefficients is None else np.asarray(self.coefficients, dtype=np.float64)
        if self.t.shape != (n, m):
            raise ValueError(f"ntk t has shape {self.t.shape}, expected ({n}, {m})")
        if self.eta.shape != (n,):
            raise ValueError(f"ntk eta has shape {self.eta.shape}, expected ({n},)")
        if self.eigenvalues.ndim != 2 or self.eigenvalues.shape[0] != n or self.coefficients.shape != self.eigenvalues.shape:
            raise ValueError(f"ntk spectrum has shapes {self.eigenvalues.shape} and {self.coefficients.shape}, "
                             f"expected two equal (n={n}, k)")

    @classmethod
    def from_records(cls, D: np.ndarray, rows: list[dict[int, dict]]) -> "NTKTerms | None":
        """From stored probe records: ``rows[i]`` maps a size to the ``ntk`` dict of that probe
        (:meth:`lensray.engine.ntk.NTKFeatures.to_dict`). None when no probe has one."""
        D = np.asarray(D, dtype=np.float64)
        n, m = len(rows), D.size
        if not any(rows):
            return None
        F, t, eta = np.full((n, m), np.nan), np.full((n, m), np.nan), np.full(n, np.nan)
        col = {int(d): j for j, d in enumerate(D)}
        spectra: list[tuple[list, list]] = []
        for i, probes in enumerate(rows):
            spectrum: tuple[list, list] = ([], [])
            for d, ntk in sorted(probes.items()):
                if d not in col or not isinstance(ntk, dict) or ntk.get("F") is None:
                    continue
                F[i, col[d]] = float(ntk["F"])
                t[i, col[d]] = float(ntk.get("steps", np.nan))
                if ntk.get("eigenvalues") and ntk.get("coefficients") and not spectrum[0]:
                    spectrum = (list(ntk["eigenvalues"]), list(ntk["coefficients"]))
                    eta[i] = float(ntk.get("learning_rate", np.nan))
            spectra.append(spectrum)
        k = max(len(s[0]) for s in spectra)
        eig, coef = np.full((n, k), np.nan), np.full((n, k), np.nan)
        for i, (lam, c) in enumerate(spectra):
            eig[i, : len(lam)], coef[i, : len(c)] = lam, c
        return cls(F, t, eta, eig, coef)

    def take(self, rows: np.ndarray) -> "NTKTerms":
        """The curves at positions ``rows``."""
        return NTKTerms(self.F[rows], self.t[rows], self.eta[rows], self.eigenvalues[rows], self.coefficients[rows])

    def columns(self, keep: np.ndarray) -> "NTKTerms":
        """The sizes where ``keep`` (a boolean mask over the columns) holds."""
        return NTKTerms(self.F[:, keep], self.t[:, keep], self.eta.copy(), self.eigenvalues.copy(),
                        self.coefficients.copy())

    def has_spectrum(self) -> np.ndarray:
        """(n,) whether each curve has a spectrum and a learning rate, so F extends to any size."""
        return np.isfinite(self.eta) & np.any(np.isfinite(self.eigenvalues) & np.isfinite(self.coefficients), axis=1)

    def steps_at(self, D: np.ndarray, d: float) -> np.ndarray:
        """(n,) optimiser steps of a probe of ``d`` samples (module docstring); NaN without a positive probe."""
        out = np.full(self.F.shape[0], np.nan)
        for i in range(out.size):
            seen = (D > 0) & np.isfinite(self.t[i]) & (self.t[i] > 0)
            if not seen.any():
                continue
            ds, ts = D[seen], self.t[i, seen]
            hit = np.flatnonzero(ds == d)
            if hit.size:
                out[i] = ts[hit[0]]
            elif ts.size >= 2 and ts[-1] == ts[-2] and d >= ds[-1]:
                out[i] = ts[-1]
            else:
                out[i] = ts[-1] * d / ds[-1]
        return out

    def F_at(self, D: np.ndarray, d: float) -> np.ndarray:
        """(n,) F at size ``d``: the probe's own where ``D`` holds a probe of ``d`` samples with F,
        else from the spectrum at :meth:`steps_at` (NaN without a spectrum)."""
        D = np.asarray(D, dtype=np.float64)
        hit = np.flatnonzero(D == d)
        out = self.F[:, hit[0]].copy() if hit.size else np.full(self.F.shape[0], np.nan)
        todo = np.flatnonzero(~np.isfinite(out) & self.has_spectrum())
        if todo.size:
            t = self.steps_at(D, d)
            for i in todo:
                if np.isfinite(t[i]):
                    out[i] = residual_norm(self.eigenvalues[i], self.coefficients[i], self.eta[i], t[i])
        return out
