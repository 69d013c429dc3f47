"""Replay screening at zoo scale, and pruning safety on the benchmark tables.

    python benchmarks/replay_scale.py scale [--n 300] [--max-samples 25600] [--tune-loggers] [--marginal] [--no-scout]
    python benchmarks/replay_scale.py tables [--tables ../shared/benchmarks] [--level 0.9] [--marginal] [--no-scout]
    python benchmarks/replay_scale.py orderings [--tables ../shared/benchmarks] [--seeds 40] [--concurrent 2] [--target N] [--subzoo N] [--top-k K] [--grace G]
    python benchmarks/replay_scale.py known-rivals [--tables ../shared/benchmarks] [--level 0.9] [--top-k K] [--grace G]

``scale`` replays a synthetic zoo (lensray.core.synthetic_zoo: rectified-law curves with noise) through
the whole pipeline (local Ray, one Tune trial per candidate, the pruning scheduler, the store,
the report) and prints the wall time, the driver's peak memory, where the driver's time went
(zoo forecasts of the scheduler vs the rest) and the time per scheduler decision (each
``CurvePruner.on_trial_result``, forecast included: mean, 99th percentile, largest). ``--tune-loggers`` turns Tune's per-trial
JSON/CSV/TensorBoard logger callbacks back on (off by default in lensray.run.screen) to measure them.

``tables`` replays both shared tables at the seven budget ratios r (max_samples = D*/r) and
prints, per cell, the selected candidate's RelAcc, the saved compute fraction and whether the
candidate truly best at D* was stopped (pruning safety).

``orderings`` measures how much those figures depend on the order in which concurrent trials
report. With several trials at once the scheduler judges each report against whatever the
others have reported so far, which depends on timing. It drives the real scheduler
(lensray.run.scheduler.CurvePruner with lensray.run.screen's zoo forecaster, scout stages and trial
order) without Ray: ``--concurrent`` trials run at once and, at every step, a random one of
them reports its next probe. Per cell it prints over ``--seeds`` random orders how often the
true best was stopped, the saved fraction (mean, min) and the mean RelAcc.

``known-rivals`` judges each candidate as if every rival had already run to the budget: at each
of its own probe sizes in turn, with the rivals' complete curves in the zoo, it is charged up to
the first size at which the rule stops it. Per cell it prints that saved fraction, the
candidates the rule never stops in this state ranked by their share of the bill, and whether it
would stop the true best. It is not a bound on a real run (there, a candidate judged against
short rival curves is forecast and calibrated on a different zoo, and may be stopped earlier);
it shows which candidates no amount of rival information lets the rule stop.

``--marginal`` prunes on the marginal intervals instead of the intervals of the differences
(``pruning.relative: false``), the rule before the zoo-common error was split off.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from lensray.core.metrics import relacc

TARGET = 1_638_400
RATIOS = (8, 16, 32, 64, 128, 256, 512)


def _replay(csv: Path, out: Path, max_samples: int, level: float | None = None, scout: bool = True,
            marginal: bool = False, forecaster=None, tune_loggers: bool = False) -> tuple[dict, object]:
    from lensray.core.forecast import zoo_forecaster
    from lensray.run.screen import screen

    config = None
    pruning = ([] if scout else ["scout: false"]) + (["relative: false"] if marginal else [])
    lines = ([f"predictor: {{method: lensray, level: {level}}}"] if level is not None else []) + \
        ([f"pruning: {{{', '.join(pruning)}}}"] if pruning else [])
    if lines:  # settings through a config file, as a user would
        config = out.parent / "settings.yaml"
        config.write_text("\n".join(lines) + "\n")
    config, curves = _replay_config(csv, out, max_samples, config)
    return screen(config, backend="replay", replay=curves, progress=False, forecaster=forecaster or zoo_forecaster,
                  tune_loggers=tune_loggers), curves


def _replay_config(csv: Path, out: Path, max_samples: int, settings: Path | None = None,
                   target: int = TARGET) -> tuple:
    """The config and curves of ``lensray screen --replay csv [settings]``, as the CLI builds them."""
    from lensray.run.config import replay_config

    return replay_config(csv, settings, {"storage.path": str(out), "grid.max_samples": max_samples,
                                         "target_samples": target})


class _Timed:
    """A :class:`lensray.core.forecast.ZooForecaster` that adds its seconds and forecasts to ``spent``."""

    def __init__(self, inner, spent: dict) -> None:
        self.inner, self.spent = inner, spent

    def _time(self, fn, *args, count: bool = False):
        t0 = time.perf_counter()
        try:
            return fn(*args)
        finally:
            self.spent["seconds"] += time.perf_counter() - t0
            self.spent["calls"] += count

    def update(self, *args):
        return self._time(self.inner.update, *args)

    def add(self, *args):
        return self._time(self.inner.add, *args)

    def drop(self, *args):
        return self._time(self.inner.drop, *args)

    def sync(self, *args):
        return self._time(self.inner.sync, *args)

    def forecasts(self):
        return self._time(self.inner.forecasts, count=True)

    def __call__(self, observed):
        return self._time(self.inner, observed, count=True)


def _timed_forecaster():
    """A zoo-forecaster factory for ``screen`` that counts the driver's seconds spent in zoo forecasts."""
    from lensray.core.forecast import zoo_forecaster

    spent = {"seconds": 0.0, "calls": 0}

    def factory(*args, **kwargs):
        return _Timed(zoo_forecaster(*args, **kwargs), spent)

    return spent, factory


def _timed_decisions():
    """Times every ``CurvePruner.on_trial_result`` of this process (the scheduler's decisions)."""
    from lensray.run.scheduler import CurvePruner

    times: list[float] = []
    decide = CurvePruner.on_trial_result

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return decide(self, *args, **kwargs)
        finally:
            times.append(time.perf_counter() - t0)

    CurvePruner.on_trial_result = timed
    return times


def scale(args: argparse.Namespace) -> dict:
    import ray

    from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv

    spent, factory = _timed_forecaster()
    decisions = _timed_decisions()
    with tempfile.TemporaryDirectory() as tmp:
        csv = write_curves_csv(synthetic_zoo(args.n, seed=args.seed), Path(tmp) / "zoo.csv")
        t0 = time.perf_counter()
        ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        t_init = time.perf_counter() - t0
        sel, curves = _replay(csv, Path(tmp) / "out", args.max_samples, scout=not args.no_scout,
                            marginal=args.marginal, forecaster=factory, tune_loggers=args.tune_loggers)
        wall = time.perf_counter() - t0
        ray.shutdown()
    status = [e["status"] for e in sel["ranking"]]
    true = curves.loss_at(TARGET)
    best = curves.ids[int(np.argmin(true))]
    return {
        "candidates": args.n, "max_samples": args.max_samples, "cpus": args.cpus, "tune_loggers": args.tune_loggers,
        "marginal": args.marginal, "scout": not args.no_scout,
        "wall_seconds": round(wall, 2), "ray_init_seconds": round(t_init, 2),
        "forecast_seconds": round(spent["seconds"], 2), "forecast_calls": spent["calls"],
        "decisions": len(decisions), "decision_ms_mean": round(1e3 * float(np.mean(decisions or [0])), 3),
        "decision_ms_p99": round(1e3 * float(np.quantile(decisions or [0], 0.99)), 3),
        "decision_ms_max": round(1e3 * max(decisions or [0]), 3),
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "finished": status.count("finished"), "pruned": status.count("pruned"), "failed": status.count("failed"),
        "saved_fraction": round(sel["compute"]["saved_fraction"], 5),
        "relacc": round(relacc(true, curves.ids.index(sel["selected"])), 2),
        "best_pruned": dict(zip((e["candidate"] for e in sel["ranking"]), status))[best] == "pruned",
    }


def tables(args: argparse.Namespace) -> list[dict]:
    import ray

    from lensray.core.curves import load_curves_csv

    rows = []
    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    try:
        for table in ("flan", "wmt19"):
            csv = Path(args.tables) / f"{table}.csv"
            full = load_curves_csv(csv)
            true = full.loss_at(TARGET)
            best = full.ids[int(np.argmin(true))]
            for r in RATIOS:
                with tempfile.TemporaryDirectory() as tmp:
                    t0 = time.perf_counter()
                    sel, _ = _replay(csv, Path(tmp) / "out", TARGET // r, args.level, not args.no_scout, args.marginal)
                    wall = time.perf_counter() - t0
                rank = {e["candidate"]: e for e in sel["ranking"]}
                rows.append({
                    "table": table, "ratio": r, "max_samples": TARGET // r, "selected": sel["selected"],
                    "relacc": round(relacc(true, full.ids.index(sel["selected"])), 2),
                    "saved_fraction": round(sel["compute"]["saved_fraction"], 5),
                    "pruned": sum(e["status"] == "pruned" for e in sel["ranking"]),
                    "best": best, "best_pruned": rank[best]["status"] == "pruned",
                    "best_reason": rank[best].get("reason"), "wall_seconds": round(wall, 1),
                })
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    finally:
        ray.shutdown()
    return rows


def _interleaved(config, curves, grid: list[int], forecaster, seed: int, concurrent: int) -> tuple[set, dict]:
    """One screening in a random report order: the stopped candidates and every observed curve."""
    import random

    from lensray.run.scheduler import CurvePruner, TrialScheduler
    from lensray.run.screen import scout_stages, trial_order

    rng = random.Random(seed)
    ids = list(curves.ids)
    col = {int(d): j for j, d in enumerate(curves.D)}
    info = {c: {"size": float(s)} for c, s in zip(ids, curves.size)}
    observed: dict[str, dict[int, float]] = {}
    stopped: set = set()
    for stage, upto in enumerate(scout_stages(config, grid, len(ids), concurrent)):
        live = [c for c in ids if c not in stopped]
        queue = trial_order(live, info, forecaster(observed) if stage else None)
        pruner = CurvePruner(config.pruning.top_k, config.pruning.grace_points, forecaster=forecaster,
                             observed=observed, last_size=grid[-1])
        running: list[tuple[str, list[int]]] = []
        while queue or running:
            while queue and len(running) < concurrent:
                cid = queue.pop(0)
                running.append((cid, [d for d in grid if d <= upto and d not in observed.get(cid, {})]))
            cid, todo = running[rng.randrange(len(running))]
            if todo:
                d = todo.pop(0)
                loss = float(curves.L[ids.index(cid), col[d]])
                observed.setdefault(cid, {})[d] = loss
                if pruner.on_trial_result(None, None, {"candidate": cid, "n_samples": d, "loss": loss}) == \
                        TrialScheduler.STOP:
                    stopped.add(cid)
                    todo.clear()
            if not todo:
                running.remove(next(r for r in running if r[0] == cid))
    return stopped, observed


def _cells(args: argparse.Namespace, target: int):
    """(table, r, config, curves) of each table and budget ratio, as ``lensray screen --replay`` builds
    them with D* = ``target``, with ``--top-k`` and ``--grace`` applied to the pruning settings."""
    for table in ("flan", "wmt19"):
        for r in RATIOS:
            config, curves = _replay_config(Path(args.tables) / f"{table}.csv", Path(tempfile.gettempdir()) / "unused",
                                            target // r, target=target)
            config.pruning.top_k = args.top_k or config.pruning.top_k
            config.pruning.grace_points = args.grace or config.pruning.grace_points
            config.pruning.relative = not getattr(args, "marginal", False)
            yield table, r, config, curves


def orderings(args: argparse.Namespace) -> list[dict]:
    from lensray.core.forecast import zoo_forecaster

    rows = []
    for table, r, config, curves in _cells(args, args.target):
        config.pruning.scout = not args.no_scout
        grid = [int(d) for d in curves.D if d <= args.target // r]
        full, forecaster = curves, None
        t0 = time.perf_counter()
        hits, saved, acc = 0, [], []
        for seed in range(args.seeds):
            if args.subzoo or forecaster is None:  # one forecaster per zoo
                if args.subzoo:
                    pick = np.random.default_rng([seed, r]).choice(len(full), args.subzoo, replace=False)
                    curves = full.take(np.sort(pick))
                true = curves.loss_at(args.target)
                best = curves.ids[int(np.argmin(true))]
                size = dict(zip(curves.ids, curves.size))
                forecaster = zoo_forecaster(config.predictor.method, config.predictor.level, grid, args.target,
                                            size, {c: None for c in curves.ids}, config.pruning.relative)
            stopped, observed = _interleaved(config, curves, grid, forecaster, seed, args.concurrent)
            fc = forecaster(observed)
            chosen = min((c for c in curves.ids if c not in stopped), key=lambda c: fc[c].loss)
            hits += best in stopped
            spent = sum(size[c] * sum(pts) for c, pts in observed.items())
            saved.append(1 - spent / (sum(size.values()) * args.target))
            acc.append(relacc(true, curves.ids.index(chosen)))
        rows.append({"table": table, "ratio": r, "orders": args.seeds, "concurrent": args.concurrent,
                     "best_stopped": hits, "saved_mean": round(float(np.mean(saved)), 5),
                     "saved_min": round(float(np.min(saved)), 5), "relacc_mean": round(float(np.mean(acc)), 2),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def known_rivals(args: argparse.Namespace) -> list[dict]:
    from lensray.core.forecast import prune_decision
    from lensray.core.forecast import zoo_forecaster

    rows = []
    for table, r, config, curves in _cells(args, TARGET):
        top_k, grace = config.pruning.top_k, config.pruning.grace_points
        level = config.predictor.level if args.level is None else args.level
        grid = [int(d) for d in curves.D if d <= TARGET // r]
        size = dict(zip(curves.ids, curves.size))
        forecaster = zoo_forecaster(config.predictor.method, level, grid, TARGET, size, {c: None for c in curves.ids},
                                    config.pruning.relative)
        col = {int(d): j for j, d in enumerate(curves.D)}
        full = {c: {d: float(curves.L[i, col[d]]) for d in grid} for i, c in enumerate(curves.ids)}
        true = curves.loss_at(TARGET)
        best = curves.ids[int(np.argmin(true))]
        spent, kept = {}, []
        for cid in curves.ids:
            stop_at = None
            for d in grid[grace:]:  # the first probe after the grace's points (the grid starts at D = 0)
                observed = {**full, cid: {e: v for e, v in full[cid].items() if e <= d}}
                fc = forecaster(observed)
                if prune_decision(fc[cid], fc.values(), top_k, grace) is not None:
                    stop_at = d
                    break
            spent[cid] = size[cid] * sum(e for e in grid if e <= (stop_at or grid[-1]))
            if stop_at is None:
                kept.append(cid)
        total = sum(spent.values())
        share = sorted(((spent[c] / total, c) for c in kept), reverse=True)
        rows.append({"table": table, "ratio": r, "top_k": top_k, "level": level, "grace": grace,
                     "saved_known_rivals": round(1 - total / (sum(size.values()) * TARGET), 5),
                     "never_stopped": len(kept), "best_stoppable": best not in kept,
                     "largest_kept": ", ".join(f"{c} {s:.0%}" for s, c in share[:3])})
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def _print_table(header: dict[str, str], rows: list[dict], footer: str) -> None:
    """A markdown table: ``header`` maps each column's title to a format of one row field (text
    fields left-aligned, numbers right-aligned)."""
    text = [isinstance(rows[0][fmt.strip("{}").split(":")[0]], str) if rows else True for fmt in header.values()]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join("---" if t else "---:" for t in text) + "|")
    for row in rows:
        print("| " + " | ".join(fmt.format(**row) for fmt in header.values()) + " |")
    print(footer)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("scale", help="replay a synthetic zoo through the whole pipeline")
    p.add_argument("--n", type=int, default=300, help="candidates in the synthetic zoo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-samples", type=int, default=25600)
    p.add_argument("--cpus", type=int, default=2)
    p.add_argument("--tune-loggers", action="store_true", help="keep Tune's per-trial logger callbacks")
    t = sub.add_parser("tables", help="pruning safety and figures on the shared tables at seven budgets")
    t.add_argument("--tables", default=str(Path(__file__).resolve().parents[2] / "shared" / "benchmarks"))
    t.add_argument("--cpus", type=int, default=2)
    t.add_argument("--level", type=float, default=None, help="predictor.level (default: the config's, 0.9)")
    o = sub.add_parser("orderings", help="pruning safety over random report orders of concurrent trials (no Ray)")
    o.add_argument("--tables", default=t.get_default("tables"))
    o.add_argument("--seeds", type=int, default=40, help="random report orders per cell")
    o.add_argument("--concurrent", type=int, default=2, help="trials at once")
    o.add_argument("--top-k", type=int, default=0, help="pruning.top_k (0: the config default)")
    o.add_argument("--grace", type=int, default=0, help="pruning.grace_points (0: the config default)")
    o.add_argument("--subzoo", type=int, default=0,
                   help="each order screens a random sub-zoo of this many rows (0: the whole table)")
    o.add_argument("--target", type=int, default=TARGET,
                   help="D* (a smaller one, e.g. 819200, checks safety against a column the defaults were not made on)")
    c = sub.add_parser("known-rivals", help="what the rule stops when every rival has run to the budget (no Ray)")
    c.add_argument("--tables", default=t.get_default("tables"))
    c.add_argument("--level", type=float, default=None, help="predictor.level (default: the config's, 0.9)")
    c.add_argument("--top-k", type=int, default=0, help="pruning.top_k (0: the config default)")
    c.add_argument("--grace", type=int, default=0, help="pruning.grace_points (0: the config default)")
    for sp in (p, t, o, c):
        sp.add_argument("--marginal", action="store_true", help="prune on marginal intervals (the earlier rule)")
        sp.add_argument("--no-scout", action="store_true", help="pruning.scout: false (no scout stage)")
    args = parser.parse_args(argv)
    if args.mode == "scale":
        print(json.dumps(scale(args)))
    elif args.mode == "orderings":
        rows = orderings(args)
        _print_table({"table": "{table}", "r": "{ratio}", "orders": "{orders}", "true best stopped": "{best_stopped}",
                      "saved (mean)": "{saved_mean:.4f}", "saved (min)": "{saved_min:.4f}",
                      "RelAcc (mean)": "{relacc_mean:.1f}"}, rows,
                     f"true best stopped in {sum(r['best_stopped'] for r in rows)} of "
                     f"{sum(r['orders'] for r in rows)} orders ({args.concurrent} trials at once)")
    elif args.mode == "known-rivals":
        rows = known_rivals(args)
        _print_table({"table": "{table}", "r": "{ratio}", "saved": "{saved_known_rivals:.4f}",
                      "never stopped": "{never_stopped}", "largest of them (share of the bill)": "{largest_kept}",
                      "true best stoppable": "{best_stoppable}"}, rows,
                     f"top_k {rows[0]['top_k']}, level {rows[0]['level']}, grace {rows[0]['grace']}")
    else:
        rows = [{**r, "stopped": "YES" if r["best_pruned"] else "no"} for r in tables(args)]
        _print_table({"table": "{table}", "r": "{ratio}", "D_max": "{max_samples}", "selected": "{selected}",
                      "RelAcc": "{relacc:.1f}", "saved": "{saved_fraction:.4f}", "pruned": "{pruned}",
                      "true best pruned": "{stopped}"}, rows,
                     f"true best stopped in {sum(r['best_pruned'] for r in rows)} of {len(rows)} cells")
    return 0


if __name__ == "__main__":
    sys.exit(main())
