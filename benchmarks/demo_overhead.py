"""What Ray costs on the demo: lensray's real screen beside the same probes run without Ray.

In one run: (1) the tiny models of the config are built into the cache (timed, then excluded:
both sides load them from the cache); (2) the config is screened by ``lensray.run.screen.screen``
with a local Ray (train backend, the config's pruning); (3) the probes that screen ran, the same
(candidate, D) pairs, run one after another in this process with ``lensray.engine.probe`` only.
It prints both wall times, their ratio, and each trial's fixed cost from the setup marks of its
first report (``lensray.run.trainables.SETUP_KEYS``):

- entry: Tune reports the trial started (driver clock; the trial actor is up by then) -> the
  trainable is entered (its arguments unpickled);
- imports: torch, transformers and the probe engine imported in the actor (0 in a reused
  actor, or where Ray's start of the actor imported them already);
- load: task encoded and model loaded from the cache;
- probes: the probes' own ``wall_seconds``;
- rest: the remainder of the trial (reports, store writes, the end of the trial).

Outside the trials: before the first (Ray start, Tune set-up, the first actors' start) and after
the last (ranking, report).

Usage: python benchmarks/demo_overhead.py [CONFIG] [--out DIR]   (default configs/demo.yaml)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass, field

from ray import tune

from lensray.run.config import load_config
from lensray.run.trainables import SETUP_KEYS


@dataclass
class TrialTimes:
    """One trial's clock: Tune's start and end (driver) and the setup marks of its first report."""

    candidate: str
    started: float
    ended: float = float("nan")
    marks: dict[str, float] = field(default_factory=dict)


class SetupClock(tune.Callback):
    """Collects :class:`TrialTimes` for every trial."""

    def __init__(self) -> None:
        self.trials: dict[str, TrialTimes] = {}

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        self.trials[trial.trial_id] = TrialTimes(trial.config["candidate"], time.time())

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        times = self.trials[trial.trial_id]
        if not times.marks and all(k in result for k in SETUP_KEYS):
            times.marks = {k: float(result[k]) for k in SETUP_KEYS}

    def _end(self, trial) -> None:
        self.trials[trial.trial_id].ended = time.time()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._end(trial)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._end(trial)


def build_models(config) -> float:
    """Build the config's tiny models into the cache; returns the seconds it took."""
    from lensray.engine.models import ensure_tiny

    t0 = time.perf_counter()
    for cand in config.zoo:
        if cand.source.startswith("tiny:"):
            ensure_tiny(cand.source)
    return time.perf_counter() - t0


def sequential(config, pairs: dict[str, list[int]]) -> tuple[float, dict[str, float]]:
    """The probes ``pairs`` (candidate -> sizes) one after another without Ray; wall and its parts."""
    t0 = time.perf_counter()
    import torch  # noqa: F401 - timed: a plain process pays its imports too
    import transformers  # noqa: F401

    from lensray.engine.data import TaskConfig, load_task
    from lensray.engine.probe import ProbeConfig, ProbeRunner
    from lensray.run.ranking import candidate_info

    parts = {"imports": time.perf_counter() - t0, "load": 0.0, "probes": 0.0}
    info = candidate_info(config, None)
    task = config.task.model_dump(mode="json")
    probe = config.probe.model_dump(mode="json")
    for cid, sizes in pairs.items():
        t = time.perf_counter()
        cand = info[cid]
        runner = ProbeRunner(cand["model"], TaskConfig(**task), ProbeConfig(**probe),
                             trust_remote_code=cand["trust_remote_code"], allow_pickle=cand["allow_pickle"],
                             strategy=cand["strategy"])
        runner.data = load_task(runner.task)
        runner.load()
        parts["load"] += time.perf_counter() - t
        for d in sizes:
            parts["probes"] += runner.run(d).wall_seconds
    return time.perf_counter() - t0, parts


def fresh_imports() -> float:
    """Seconds a fresh Python process takes to import torch, transformers and the probe engine."""
    import subprocess
    import sys

    code = "import time; t = time.perf_counter(); import torch, transformers, lensray.engine.probe; " \
           "print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--out", default=None, help="screen output folder (default: a temporary one)")
    args = parser.parse_args()

    from lensray.run.screen import screen
    from lensray.run.store import ProbeStore

    config = load_config(args.config)
    build = build_models(config)
    out = args.out or tempfile.mkdtemp(prefix="demo-overhead-")
    clock = SetupClock()
    t0 = time.time()
    selection = screen(config, out=out, progress=False, callbacks=[clock])
    t1 = time.time()
    ray_wall = t1 - t0

    records = [r for r in ProbeStore(out).get_all() if r.get("status") == "ok"]
    pairs: dict[str, list[int]] = {}
    for r in sorted(records, key=lambda r: (r["candidate"], r["n_samples"])):
        pairs.setdefault(r["candidate"], []).append(int(r["n_samples"]))
    probe_s = {cid: sum(float(r["wall_seconds"]) for r in records if r["candidate"] == cid) for cid in pairs}
    seq_wall, seq = sequential(config, pairs)

    print(f"config {args.config}: {len(config.zoo)} candidates, {len(records)} probes run by the screen "
          f"(selected {selection['selected']}); tiny model build (cache, excluded) {build:.1f} s")
    print(f"screen with Ray (local, train backend): {ray_wall:7.1f} s")
    print(f"same probes, one process, no Ray:       {seq_wall:7.1f} s  (imports {seq['imports']:.1f} s, "
          f"load {seq['load']:.1f} s, probes {seq['probes']:.1f} s)")
    print(f"ratio Ray / sequential:                 {ray_wall / seq_wall:7.2f}x")
    print(f"(this process had imported torch for the build; a fresh process needs {fresh_imports():.1f} s "
          f"for its imports, counted in neither wall)")
    print("\nper trial (s):  candidate      entry  imports  load   probes  rest   trial")
    fixed = []
    for t in sorted(clock.trials.values(), key=lambda t: t.started):
        if not t.marks:
            print(f"  {t.candidate:<14} (no probe reported)")
            continue
        entry = t.marks["t_entered"] - t.started
        imports = t.marks["t_imported"] - t.marks["t_entered"]
        load = t.marks["t_loaded"] - t.marks["t_imported"]
        wall = t.ended - t.started
        # the probes this trial ran: the candidate's, when it ran one trial (no scout stage)
        probes = probe_s.get(t.candidate, 0.0) if sum(x.candidate == t.candidate for x in clock.trials.values()) == 1 \
            else float("nan")
        rest = wall - entry - imports - load - probes
        if probes == probes:  # known
            fixed.append(wall - probes)
        print(f"  {t.candidate:<14} {entry:5.1f} {imports:8.1f} {load:5.1f} {probes:8.1f} {rest:6.1f} {wall:7.1f}")
    if fixed:
        print(f"fixed cost per trial (all but the probes): mean {sum(fixed) / len(fixed):.1f} s, max {max(fixed):.1f} s")
    if clock.trials:
        first = min(t.started for t in clock.trials.values())
        last = max(t.ended for t in clock.trials.values())
        print(f"before the first trial (Ray start, Tune set-up, first actors' start): {first - t0:.1f} s; "
              f"after the last (ranking, report): {t1 - last:.1f} s")


if __name__ == "__main__":
    main()
