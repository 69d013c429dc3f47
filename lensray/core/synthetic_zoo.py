"""A synthetic zoo of fine-tuning curves drawn from the rectified scaling law, with noise.

Used to measure the replay pipeline at zoo scale (hundreds of candidates) on a laptop:
``L(D) = B / (D_l + D^beta) + E`` (Lin et al. 2024) with per-candidate parameters drawn so that
the curves resemble the FLAN/WMT19 tables (zero-shot 2.5-6, losses at D* = 1.6M clustered
around 1-2), times log-normal noise on every point.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from lensray.core.curves import Curves

GRID = np.array([0] + [200 * 2**i for i in range(14)], dtype=np.float64)
"""The benchmark tables' sample sizes: 0, 200, 400, ..., 1,638,400."""

FAMILIES = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta")


def synthetic_zoo(n: int = 300, seed: int = 0, noise: float = 0.01) -> Curves:
    """Draw ``n`` candidates' curves on :data:`GRID`.

    Parameters
    ----------
    n : int
        Number of candidates.
    seed : int
        Seed of the generator; the same seed gives the same zoo.
    noise : float
        Standard deviation of the multiplicative log-normal noise on each loss.

    Returns
    -------
    Curves
        ids ``synth-0000`` ..., sizes (parameter counts) and families filled in.
    """
    if n < 1:
        raise ValueError("n must be >= 1")
    rng = np.random.default_rng(seed)
    beta = rng.uniform(0.3, 0.55, n)
    E = rng.uniform(0.9, 1.6, n)
    D_l = np.exp(rng.uniform(np.log(20.0), np.log(300.0), n))
    zero_shot_gap = rng.uniform(1.5, 4.5, n)  # B / D_l: zero-shot loss minus E
    B = zero_shot_gap * D_l
    L = B[:, None] / (D_l[:, None] + GRID[None, :] ** beta[:, None]) + E[:, None]
    L *= np.exp(rng.normal(0.0, noise, L.shape))
    size = np.round(np.exp(rng.uniform(np.log(6e7), np.log(7e9), n)))
    family = [FAMILIES[i] for i in rng.integers(0, len(FAMILIES), n)]
    ids = [f"synth-{i:04d}" for i in range(n)]
    return Curves(ids=ids, D=GRID.copy(), L=L, size=size, family=family, name=f"synthetic{n}")


def write_curves_csv(curves: Curves, path: str | Path) -> Path:
    """Write curves in the benchmark tables' format (``config name``, sizes, ``size``, ``family``),
    with the NTK columns of :mod:`lensray.core.curves` when ``curves.ntk`` is set."""
    path = Path(path)
    sizes = [str(int(d)) for d in curves.D]
    ntk = curves.ntk
    k = 0 if ntk is None else ntk.eigenvalues.shape[1]
    extra = [] if ntk is None else [*(f"ntk_F@{d}" for d in sizes), *(f"ntk_t@{d}" for d in sizes), "ntk_eta",
                                    *(f"ntk_eig_{j + 1}" for j in range(k)), *(f"ntk_coef_{j + 1}" for j in range(k))]
    with path.open("w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        out.writerow(["config name", *sizes, "size", "family", *extra])
        for i, cid in enumerate(curves.ids):
            s = "" if not np.isfinite(curves.size[i]) else str(int(curves.size[i]))
            cells = [] if ntk is None else [_cell(v) for v in (*ntk.F[i], *ntk.t[i], ntk.eta[i], *ntk.eigenvalues[i],
                                                                *ntk.coefficients[i])]
            out.writerow([cid, *(repr(float(v)) for v in curves.L[i]), s, curves.family[i] or "", *cells])
    return path


def _cell(value: float) -> str:
    return repr(float(value)) if np.isfinite(value) else ""
