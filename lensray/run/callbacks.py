"""Tune callbacks of a screening: live progress lines, the placement-group reaper, quiet Tune."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any

from lensray.core.forecast import Stop

def progress_callback(total: int, known: dict[str, str], flops_start: float, full: float, stream=None,
                       every: float = 2.0, prefix: str = ""):
    """A Tune callback printing progress lines on stderr: running / pruned / done / failed, compute.

    A line is printed at most every 0.5 s when candidates finish, stop or fail, at most every
    ``every`` seconds otherwise, and once at the end.
    """
    from ray import tune

    class Progress(tune.Callback):
        def __init__(self) -> None:
            self.state: dict[str, str] = dict(known)
            self.flops = flops_start
            self.t0 = time.perf_counter()
            self.last_counts: tuple = (None,) * 4
            self.last_time = -math.inf

        def _line(self, force: bool = False) -> None:
            counts = tuple(sum(1 for v in self.state.values() if v == s) for s in ("running", "pruned", "done", "failed"))
            now = time.perf_counter()
            wait = every if counts[1:] == self.last_counts[1:] else min(every, 0.5)
            if not force and now - self.last_time < wait:
                return
            self.last_counts, self.last_time = counts, now
            share = f" ({100 * self.flops / full:.2f}% of full tuning)" if full > 0 else ""
            print(f"[{now - self.t0:7.1f}s] {prefix}running {counts[0]} | pruned {counts[1]} | done {counts[2]} | "
                  f"failed {counts[3]} | of {total} | compute {self.flops:.3g} FLOPs{share}",
                  file=stream or sys.stderr, flush=True)

        def on_trial_start(self, iteration, trials, trial, **info) -> None:
            self.state[trial.config["candidate"]] = "running"
            self._line()

        def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
            self.flops += float(result.get("flops") or 0.0)
            if result.get("failed"):
                self.state[trial.config["candidate"]] = "failed"
            self._line()

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            cid = trial.config["candidate"]
            if self.state.get(cid) == "running":
                self.state[cid] = "done"
            self._line()

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self.state[trial.config["candidate"]] = "failed"
            self._line()

        def on_experiment_end(self, trials, **info) -> None:
            self._line(force=True)

        def mark_pruned(self, stop: Stop) -> None:
            self.state[stop.candidate] = "pruned"
            self._line()

    return Progress()


def remove_orphan_placement_groups() -> int:
    """Remove this job's placement groups whose creating actor is dead; returns how many.

    A stopped trial's actor dies, and with it the Train controller it owns, but the worker
    placement group the controller created lives on while the job does (ray#54305). Ray Train's
    own PlacementGroupCleaner needs the State API, which fails when several Ray instances run on
    one machine, so the driver reaps them itself (through the GCS table: creator_actor_dead).
    """
    import ray
    from ray._private.state import state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    live = (gcs_pb2.PlacementGroupTableData.PENDING, gcs_pb2.PlacementGroupTableData.CREATED,
            gcs_pb2.PlacementGroupTableData.RESCHEDULING)
    removed = 0
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        by_actor = pg.creator_actor_id.strip(b"\xff") != b""  # a nil ActorID is all 0xff: created by a driver
        if (by_actor and pg.creator_actor_dead and not pg.is_detached and pg.state in live
                and pg.creator_job_id.hex() == job):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    return removed


def reaper_callback(every: float = 1.0):
    """A Tune callback that frees orphaned worker placement groups of stopped trials."""
    from ray import tune

    class Reaper(tune.Callback):
        def __init__(self) -> None:
            self.last = -math.inf
            self.removed = 0

        def on_step_begin(self, iteration, trials, **info) -> None:
            now = time.perf_counter()
            if now - self.last >= every:
                self.last = now
                self.removed += remove_orphan_placement_groups()

    return Reaper()


class quiet_tune:
    """Context: no Tune result loggers (JSON/CSV/TensorBoard files per trial), no Tune console
    output (lensray prints its own progress lines) and no INFO logs.

    The store holds every result; Tune's per-trial logger files cost time and memory at zoo
    scale (300 candidates: 87 s -> 52 s, driver 540 -> 356 MB; benchmarks/replay_scale.py).
    ``loggers=True`` keeps the loggers (for that measurement).
    """

    def __init__(self, loggers: bool = False) -> None:
        self._loggers = loggers

    def __enter__(self) -> None:
        env = {"RAY_AIR_NEW_OUTPUT": "0"}  # the legacy reporter honours verbose=0
        if not self._loggers:
            env["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
        self._saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        self._logger = logging.getLogger("ray.tune")
        self._level = self._logger.level
        self._logger.setLevel(logging.ERROR)

    def __exit__(self, *exc: Any) -> None:
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._logger.setLevel(self._level)
