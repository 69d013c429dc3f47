"""Research script: ``lensray`` vs AtS on curve tables, and the sensitivity of lensray's knobs.

Usage::

    python benchmarks/selection_study.py [TABLE.csv ...]     # default: ../shared/benchmarks/{flan,wmt19}.csv

Prints, per table and budget ratio, PearCorr / RelAcc of AtS and lensray and lensray's 90 %
interval coverage; then, for each knob of :class:`lensray.selection.LensraySelector` varied
alone around its default, the mean PearCorr gain over AtS per table and the worst cell. A knob
is only worth its default when the gain is a plateau on every table, not a peak on one.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

from lensray.benchmark import run_benchmark
from lensray.curves import load_curves_csv
from lensray.selection import AtSSelector, LensraySelector

RATIOS = [8, 16, 32, 64, 128, 256, 512]
KNOBS = {
    "phi": [0.6, 0.7, 0.75, 0.8, 0.9],
    "curvature_window": [4, 5, 6, 100],
    "k_tangent": [3, 4],
    "gamma": [1.0, 1.25, 1.5, 2.0],
}


def _rows(curves, selector) -> list[dict]:
    return run_benchmark(curves, RATIOS, [selector])


def main(paths: list[Path]) -> None:
    tables = [load_curves_csv(p) for p in paths]
    ats = {c.name: _rows(c, AtSSelector()) for c in tables}
    start = time.perf_counter()
    ours = {c.name: _rows(c, LensraySelector()) for c in tables}
    seconds = time.perf_counter() - start
    print(f"{'table':>8} {'ratio':>5} | {'PearCorr AtS':>12} {'lensray':>8} | {'RelAcc AtS':>10} {'lensray':>8} | cover90")
    for c in tables:
        for a, o in zip(ats[c.name], ours[c.name]):
            print(f"{c.name:>8} {a['ratio']:>5} | {a['pearson']:12.1f} {o['pearson']:8.1f} | "
                  f"{a['relacc']:10.1f} {o['relacc']:8.1f} | {o['coverage90']:.3f}")
    pa = np.array([r["pearson"] for c in tables for r in ats[c.name]])
    po = np.array([r["pearson"] for c in tables for r in ours[c.name]])
    ra = np.mean([r["relacc"] for c in tables for r in ats[c.name]])
    ro = np.mean([r["relacc"] for c in tables for r in ours[c.name]])
    cov = np.mean([r["coverage90"] for c in tables for r in ours[c.name]])
    print(f"mean PearCorr AtS {pa.mean():.2f} lensray {po.mean():.2f} (gain {po.mean() - pa.mean():+.2f}, "
          f"worst cell {np.min(po - pa):+.2f}); mean RelAcc AtS {ra:.2f} lensray {ro:.2f}; coverage {cov:.3f}; "
          f"lensray fit time {seconds:.2f} s for {len(tables) * len(RATIOS)} cells")

    print("\nknob sensitivity (one knob varied, others at default): mean PearCorr gain over AtS / worst cell")
    for knob, values in KNOBS.items():
        for v in values:
            parts = []
            for c in tables:
                rows = _rows(c, LensraySelector(**{knob: v}))
                gain = np.array([r["pearson"] for r in rows]) - np.array([r["pearson"] for r in ats[c.name]])
                cover = np.mean([r["coverage90"] for r in rows])
                parts.append(f"{c.name} {gain.mean():+5.2f} / {gain.min():+5.2f} cov {cover:.2f}")
            print(f"  {knob:>16} = {v:<5} " + " | ".join(parts))


if __name__ == "__main__":
    default = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
    args = [Path(a) for a in sys.argv[1:]] or [default / "flan.csv", default / "wmt19.csv"]
    main(args)
