"""Research script: the ``lensray`` predictor against AtS and the rectified law, by leave-one-table-out.

Usage::

    python benchmarks/predictor_study.py [--quick] [TABLE.csv ...]
    # default tables: ../shared/benchmarks/{flan,wmt19}.csv, plus benchmarks/data/validation_zoo.csv if present

Each table is scored at its own D* (its largest sample size) and at every budget ratio of
8, 16, ..., 512 that leaves at least 3 points with D > 0. Prints

1. **protocol**: per table and ratio, PearCorr and RelAcc of AtS, rectified and lensray
   (defaults), lensray's 90 % interval coverage and median width relative to the spread of the
   true losses (median of ``hi - lo`` over the candidates / standard deviation of the true
   losses at D*); per table the means and worst cells;
2. **leave-one-table-out**: for each table, the knob setting chosen on the *other* tables
   (:func:`plateau_pick`: the middle of a plateau of the objective "mean PearCorr + mean RelAcc
   over their cells", not a peak), scored on the held-out table, side by side with AtS and rectified (which have no knobs here); the held-out
   mean, worst cell and whether the chosen setting is the default;
3. **stress tests**: into one candidate's visible curve at a time (every candidate, ratios 16,
   64, 256) inject a persistent step (x1.05 from the last 3 points on), a plateau (2 middle
   points held at the level before them), a bump (one point 3 from the end x1.10), a spike at
   the last point (x1.05) or heavier noise (log-normal, sd 0.02 on every point); report per
   method the median and largest move of that candidate's forecast (log L at D*, in units of
   the injected log size) and how often the pick changes to a worse model (and the mean RelAcc
   lost when it does). ``--quick`` skips them.

Knob grid (2.): ``phi`` 0.5 ... 1.0, ``cap_quantile`` 0 ... 0.2, ``window`` 4 ... 8 (5 levels each)
(``k`` = 3 is AtS's k; ``gamma`` only scales intervals). Point forecasts only (the members'
median, :meth:`lensray.core.selection.LensraySelector.predict_point`): the ranking does not depend on
the intervals.

Structures measured on FLAN and WMT19 while designing the predictor (mean PearCorr gain over AtS
/ worst cell, mean RelAcc over their 14 cells; AtS: RelAcc 95.6): the previous default (one
damped zoo-steepening extrapolator, its rate shared out by the zero-shot point) +6.41 / +0.09,
97.1, but RelAcc 81.3 on a table from the same source it was never tuned on; the zoo
steepening alone +5.61 / +0.09, 95.7; the rectified law alone -7.09 / -14.68, 88.7; a Theil-Sen
line through the last 3 points +3.29 / -0.92, 95.7; the median of AtS, rectified and that line
+2.84 / -0.54, 96.2 (lines alone do not steepen); the median of the 3-point line, rectified and
the zoo steepening +5.24 / +0.12, 96.1 (but three of its members read the last 3 points
only); with a 5-point Theil-Sen line added +4.15 / +0.13, 96.7, and with the 6-point window
the leave-one-table-out plateau picks (the default) +3.98 / +0.19, 96.6; the mean instead of
the median of such members +3.3 to +3.8 with worse worst cells (a runaway member moves a
mean, not a median).
"""

from __future__ import annotations

import itertools
import sys
import time
from pathlib import Path

import numpy as np

from lensray.core.curves import Curves, load_curves_csv
from lensray.core.metrics import pearson, relacc
from lensray.core.selection import AtSSelector, LensraySelector, RectifiedSelector

RATIOS = [8, 16, 32, 64, 128, 256, 512]
GRID = {"phi": [0.5, 0.6, 0.75, 0.9, 1.0], "cap_quantile": [0.0, 0.02, 0.05, 0.1, 0.2], "window": [4, 5, 6, 7, 8]}
DEFAULT = {"phi": 0.75, "cap_quantile": 0.05, "window": 6}
STRESS_RATIOS = [16, 64, 256]


# ----------------------------------------------------------------------------- cells
def cells(curves: Curves) -> list[tuple[int, Curves]]:
    """(ratio, visible curves) for every ratio leaving >= 3 points with D > 0 below the table's D*."""
    target = int(curves.D.max())
    out = []
    for r in RATIOS:
        if np.count_nonzero((curves.D > 0) & (curves.D <= target // r)) >= 3:
            out.append((r, curves.budget(target // r)))
    return out


def point_logloss(method, visible: Curves, target: int) -> np.ndarray:
    """log of a method's point forecast at ``target`` (lensray: the members' median only)."""
    if isinstance(method, LensraySelector):
        return np.log(method.predict_point(visible, target))
    return np.log(method.predict(visible, target).loss)


def scores(logloss: np.ndarray, truth: np.ndarray) -> tuple[float, float]:
    """PearCorr and RelAcc of a forecast (x100); NaN forecasts are never picked."""
    pick = int(np.nanargmin(logloss)) if np.isfinite(logloss).any() else None
    return pearson(np.exp(logloss), truth), relacc(truth, pick)


# ----------------------------------------------------------------------------- 1. protocol
def _interval(pred, truth: np.ndarray) -> tuple[float, float]:
    """Coverage of the 90 % intervals (NaN without any) and their median width / sd(true loss)."""
    has = np.isfinite(pred.lo) & np.isfinite(pred.hi)
    if not has.any():
        return float("nan"), float("nan")
    inside = has & (pred.lo <= truth) & (truth <= pred.hi)
    return float(np.mean(inside)), float(np.median((pred.hi - pred.lo)[has]) / np.std(truth))


def protocol(tables: list[Curves]) -> None:
    print("1. protocol: PearCorr / RelAcc per cell; 90 % interval coverage / median width over sd(true loss) of "
          "lensray, its own-error part's width, and AtS's and rectified's coverage")
    print(f"{'table':>14} {'r':>4} | {'AtS':>11} {'rectified':>11} {'lensray':>11} | cover width own | AtS  rect")
    methods = {"ats": AtSSelector(), "rectified": RectifiedSelector(), "lensray": LensraySelector()}
    z = 1.6448536269514722
    for c in tables:
        target = int(c.D.max())
        truth = c.loss_at(target)
        res = {m: [] for m in methods}
        cov = {m: [] for m in methods}
        width, own = [], []
        start = time.perf_counter()
        for r, v in cells(c):
            line = f"{c.name:>14} {r:>4} |"
            for m, sel in methods.items():
                pred = sel.predict(v, target)
                p, a = scores(np.log(pred.loss), truth)
                res[m].append((p, a))
                line += f" {p:5.1f}/{a:5.1f}"
                cv, wd = _interval(pred, truth)
                cov[m].append(cv)
                if m == "lensray":
                    width.append(wd)
                    own.append(np.nanmedian(2 * z * pred.loss * pred.error_split[1]) / np.std(truth))
            print(line + f" | {cov['lensray'][-1]:5.2f} {width[-1]:5.2f} {own[-1]:4.2f} | {cov['ats'][-1]:4.2f} "
                  f"{cov['rectified'][-1]:4.2f}")
        for m in methods:
            p, a = np.array(res[m]).T
            print(f"  {c.name} {m:>9}: PearCorr mean {p.mean():5.1f} worst {p.min():5.1f} | RelAcc mean {a.mean():5.1f} "
                  f"worst {a.min():5.1f} | coverage mean {np.nanmean(cov[m]):.3f}")
        g = np.array([o[0] - a[0] for o, a in zip(res["lensray"], res["ats"])])
        print(f"  {c.name} lensray - AtS PearCorr: mean {g.mean():+5.2f} worst cell {g.min():+5.2f}; coverage mean "
              f"{np.nanmean(cov['lensray']):.3f} min {np.nanmin(cov['lensray']):.2f}; width median "
              f"{np.nanmedian(width):.2f} (own part {np.nanmedian(own):.2f}); {time.perf_counter() - start:.1f} s")


# ----------------------------------------------------------------------------- 2. leave-one-table-out
def settings() -> list[dict]:
    return [dict(zip(GRID, v)) for v in itertools.product(*GRID.values())]


def _neighbours(a: dict, b: dict) -> bool:
    return all(abs(GRID[k].index(a[k]) - GRID[k].index(b[k])) <= 1 for k in GRID)


def grid_scores(tables: list[Curves]) -> dict[str, dict[int, np.ndarray]]:
    """Per table, per setting index: array (cells, 2) of PearCorr and RelAcc."""
    out = {}
    for c in tables:
        target = int(c.D.max())
        truth = c.loss_at(target)
        vis = cells(c)
        out[c.name] = {}
        for j, s in enumerate(settings()):
            sel = LensraySelector(**s)
            out[c.name][j] = np.array([scores(point_logloss(sel, v, target), truth) for _, v in vis])
    return out


def plateau_pick(names: list[str], grid: dict[str, dict[int, np.ndarray]]) -> int:
    """The middle of the best plateau on ``names``: among the settings whose grid neighbourhood
    is complete (no knob at the end of its range), the one whose worst neighbour (itself
    included) has the highest objective (mean over ``names`` of mean PearCorr + mean RelAcc)."""
    sets = settings()
    obj = np.array([np.mean([grid[t][j].mean(axis=0).sum() for t in names]) for j in range(len(sets))])
    inner = [j for j, s in enumerate(sets) if all(0 < GRID[k].index(s[k]) < len(GRID[k]) - 1 for k in GRID)]
    floor = {j: min(obj[i] for i, s in enumerate(sets) if _neighbours(s, sets[j])) for j in inner}
    return max(inner, key=lambda j: floor[j])


def loto(tables: list[Curves]) -> None:
    print("\n2. leave-one-table-out: knobs chosen on the other tables (plateau of mean PearCorr + mean RelAcc), "
          "scored on the held-out one")
    grid = grid_scores(tables)
    sets = settings()
    base = {}
    for c in tables:
        target = int(c.D.max())
        truth = c.loss_at(target)
        base[c.name] = {m: np.array([scores(point_logloss(sel, v, target), truth) for _, v in cells(c)])
                        for m, sel in (("ats", AtSSelector()), ("rectified", RectifiedSelector()))}
    names = [c.name for c in tables]
    print(f"{'held out':>14} | {'chosen on the others':>38} | {'PearCorr mean/worst':>22} | {'RelAcc mean/worst':>22}")
    held = []
    for t in names:
        j = plateau_pick([u for u in names if u != t], grid)
        ours = grid[t][j]
        held.append(ours)
        tag = "(default)" if sets[j] == DEFAULT else ""
        print(f"{t:>14} | {str(sets[j]):>38} {tag}")
        for m, arr in (("lensray", ours), ("ats", base[t]["ats"]), ("rectified", base[t]["rectified"])):
            print(f"{'':>14} | {m:>38} | {arr[:, 0].mean():9.1f} / {arr[:, 0].min():9.1f} | "
                  f"{arr[:, 1].mean():9.1f} / {arr[:, 1].min():9.1f}")
    allc = np.concatenate(held)
    ats = np.concatenate([base[t]["ats"] for t in names])
    rect = np.concatenate([base[t]["rectified"] for t in names])
    print(f"  held-out cells pooled: PearCorr lensray {allc[:, 0].mean():5.1f} AtS {ats[:, 0].mean():5.1f} rectified "
          f"{rect[:, 0].mean():5.1f}; RelAcc lensray {allc[:, 1].mean():5.1f} AtS {ats[:, 1].mean():5.1f} rectified "
          f"{rect[:, 1].mean():5.1f}; worst held-out cell lensray - AtS PearCorr {(allc[:, 0] - ats[:, 0]).min():+.2f}")
    j = plateau_pick(names, grid)
    print(f"  plateau on all tables: {sets[j]} {'(the default)' if sets[j] == DEFAULT else '(NOT the default)'}")
    print("  objective (mean PearCorr + mean RelAcc) per table over the grid: default / best / worst setting")
    for t in names:
        obj = [grid[t][jj].mean(axis=0).sum() for jj in range(len(sets))]
        print(f"    {t:>14}: {obj[sets.index(DEFAULT)]:6.1f} / {max(obj):6.1f} {sets[int(np.argmax(obj))]} / "
              f"{min(obj):6.1f} {sets[int(np.argmin(obj))]}")
    print("  per phi (window 5, cap 0.05), PearCorr / RelAcc per table:")
    for phi in GRID["phi"]:
        jj = sets.index(dict(DEFAULT, phi=phi))
        print(f"    phi {phi:4}: " + " ".join(f"{t} {grid[t][jj][:, 0].mean():5.1f}/{grid[t][jj][:, 1].mean():5.1f}"
                                            for t in names))


# ----------------------------------------------------------------------------- 3. stress tests
def _inject(L: np.ndarray, kind: str, rng: np.random.Generator) -> tuple[np.ndarray, float]:
    """A perturbed copy of one visible row (D = 0 first) and the injected log size."""
    out = L.copy()
    m = L.size - 1  # points with D > 0 are out[1:]
    if kind == "step":
        out[-3:] *= 1.05
        return out, np.log(1.05)
    if kind == "plateau":
        j = m - 3  # hold points j+1, j+2 (of the D > 0 ones) at point j's level
        out[j + 1 : j + 3] = out[j]
        return out, float(np.max(np.log(out[j + 1 : j + 3] / L[j + 1 : j + 3])))
    if kind == "bump":
        out[-3] *= 1.10
        return out, np.log(1.10)
    if kind == "spike":
        out[-1] *= 1.05
        return out, np.log(1.05)
    if kind == "noise":
        out[1:] *= np.exp(rng.normal(0.0, 0.02, m))
        return out, 0.02
    raise ValueError(kind)


def stress(tables: list[Curves], every: int = 1) -> None:
    print("\n3. stress tests: one candidate's visible curve perturbed; its forecast's move (log L at D*, in units of "
          "the injected log size), median / max; picks gone worse (of cases), mean RelAcc lost then")
    kinds = ["step", "plateau", "bump", "spike", "noise"]
    methods = {"ats": AtSSelector(), "rectified": RectifiedSelector(), "lensray": LensraySelector()}
    for c in tables:
        target = int(c.D.max())
        truth = c.loss_at(target)
        vis = [(r, v) for r, v in cells(c) if r in STRESS_RATIOS]
        for kind in kinds:
            line = f"{c.name:>14} {kind:>8}:"
            for m, sel in methods.items():
                moves, worse, lost = [], 0, []
                n_cases = 0
                for r, v in vis:
                    if np.count_nonzero(v.D > 0) < 5:
                        continue
                    clean = point_logloss(sel, v, target)
                    _, acc0 = scores(clean, truth)
                    rng = np.random.default_rng(r)
                    for i in range(0, len(v), every):
                        L = v.L.copy()
                        L[i], size = _inject(v.L[i], kind, rng)
                        pert = point_logloss(sel, Curves(v.ids, v.D, L, v.size, v.family, v.name), target)
                        moves.append(abs(pert[i] - clean[i]) / size)
                        _, acc = scores(pert, truth)
                        n_cases += 1
                        if acc < acc0 - 1e-9:
                            worse += 1
                            lost.append(acc0 - acc)
                if not moves:
                    break
                line += (f"  {m} {np.median(moves):5.2f}/{np.max(moves):6.2f} worse {worse:3d}/{n_cases}"
                         f" ({np.mean(lost) if lost else 0.0:4.1f})")
            if n_cases:
                print(line)


def main(paths: list[Path], quick: bool) -> None:
    tables = [load_curves_csv(p) for p in paths]
    protocol(tables)
    loto(tables)
    if not quick:
        stress(tables)


if __name__ == "__main__":
    args = sys.argv[1:]
    quick = "--quick" in args
    files = [Path(a) for a in args if a != "--quick"]
    if not files:
        shared = Path(__file__).resolve().parents[2] / "shared" / "benchmarks"
        files = [shared / "flan.csv", shared / "wmt19.csv"]
        zoo = Path(__file__).resolve().parent / "data" / "validation_zoo.csv"
        if zoo.exists():
            files.append(zoo)
    main(files, quick)
