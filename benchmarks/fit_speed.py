"""Speed and in-sample accuracy of the batched scaling-law fits on the benchmark tables.

For each table and law it times the 210 fits of the selection protocol (30 curves x 7 budget
ratios r: points with D <= D*/r, plus D = 0) fitted as one batch (the columns a budget hides are
NaN), and reports fits per second; then it fits every curve on all its points and reports the
mean log-space RMSE (15 points; and 14 points, D = 0 dropped, the protocol of the reference
fitter's published RMSE, Lin et al. src/draw.py fig4).

Usage: python benchmarks/fit_speed.py [TABLE.csv ...] [--repeat N]
(default tables: $LENSRAY_BENCHMARKS or ../shared/benchmarks, flan.csv and wmt19.csv)
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np

from lensray.core.curves import load_curves_csv
from lensray.core.laws import LAWS

RATIOS = (8, 16, 32, 64, 128, 256, 512)
TARGET = 1_638_400


def budget_batch(D: np.ndarray, L: np.ndarray) -> np.ndarray:
    """All (curve, ratio) budgets as one (n * 7, m) batch, hidden columns NaN."""
    rows = []
    for r in RATIOS:
        Lr = L.copy()
        Lr[:, D > TARGET / r] = np.nan
        rows.append(Lr)
    return np.concatenate(rows, axis=0)


def best_time(fn, repeat: int) -> float:
    best = np.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure(path: Path, repeat: int) -> None:
    curves = load_curves_csv(path)
    D, L = curves.D.astype(float), curves.L
    n = L.shape[0]
    batch = budget_batch(D, L)
    per_ratio = np.split(batch, len(RATIOS))
    print(f"{path.name}: {n} curves x {len(RATIOS)} ratios = {batch.shape[0]} budget fits")
    L14 = L.copy()
    L14[:, D == 0] = np.nan
    for name, cls in LAWS.items():
        one = best_time(lambda: cls().fit(D, batch), repeat)
        seven = best_time(lambda: [cls().fit(D, Lr) for Lr in per_ratio], repeat)
        ok = int(cls().fit(D, batch).converged_.sum())
        full, no_zero = cls().fit(D, L), cls().fit(D, L14)
        print(
            f"  {name:9s} one batch {one:6.3f} s ({batch.shape[0] / one:5.0f} fits/s) | 7 batches {seven:6.3f} s"
            f" ({batch.shape[0] / seven:5.0f} fits/s) | converged {ok}/{batch.shape[0]}"
            f" | mean log-RMSE all points {np.nanmean(full.rmse_):.4f}, D>0 only {np.nanmean(no_zero.rmse_):.4f}"
        )
    # LensLLM "phase" mode needs NTK features, which the tables lack. For timing only, F is a
    # stand-in: the zero-shot loss squared (F(t=0) = ||r0||^2 if per-sample losses were equal).
    F0 = L[:, 0] ** 2
    seven = best_time(lambda: [LAWS["lensllm"]().fit(D, Lr, F=F0) for Lr in per_ratio], repeat)
    full = LAWS["lensllm"]().fit(D, L, F=F0)
    print(
        f"  lensllm phase mode, stand-in F = L(0)^2 (not NTK features): 7 batches {seven:6.3f} s"
        f" ({batch.shape[0] / seven:5.0f} fits/s) | mean log-RMSE all points {np.nanmean(full.rmse_):.4f}"
    )


def main() -> None:
    default_dir = Path(os.environ.get("LENSRAY_BENCHMARKS", Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="*", type=Path, default=[default_dir / "flan.csv", default_dir / "wmt19.csv"])
    p.add_argument("--repeat", type=int, default=3, help="timing repeats (the best is reported)")
    args = p.parse_args()
    print(f"numpy {np.__version__}, {os.cpu_count()} CPUs, threads: OMP={os.environ.get('OMP_NUM_THREADS', 'default')}")
    for path in args.tables:
        measure(path, args.repeat)


if __name__ == "__main__":
    main()
