"""Tune callbacks of a screening: forecasts in the results, live progress, trackers, the
placement-group reaper, a quiet Tune, and Ray's own output kept out of the terminal."""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from typing import Any, Callable, Mapping, Optional

from ray import tune

from lensray.core.forecast import Forecast, Stop
from lensray.errors import LensrayInputError, one_line
from lensray.run.config import TrackingConfig


class ForecastMetrics(tune.Callback):
    """Adds the scheduler's latest forecast of the reporting candidate to its result, in place:
    ``predicted_loss``, ``pred_lo`` and ``pred_hi`` (its interval at D*; NaN before the first
    forecast). Listed first,
    so that the progress lines and every tracker after it see them."""

    def __init__(self, forecasts: Callable[[], Mapping[str, Forecast]]) -> None:
        self._forecasts = forecasts

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        if result.get("failed"):
            return
        own = self._forecasts().get(str(result.get("candidate")))
        if own is not None and own.n_samples == result.get("n_samples"):
            result.update(predicted_loss=own.loss, pred_lo=own.lo, pred_hi=own.hi)
        else:  # not forecast yet (before the grace): the keys are there, so that tables have their columns
            result.update(predicted_loss=math.nan, pred_lo=math.nan, pred_hi=math.nan)


class Progress(tune.Callback):
    """Live progress on stderr: one line per probe, stop and failure, with the run's totals.

    Each probe's line names the candidate, its D, its loss and (once forecast) its predicted loss
    at D* with the interval; a stop gives its reason. The totals (running, pruned, done, failed,
    compute spent against full tuning, an ETA from the samples still to probe) follow each event
    on a rich progress bar in a terminal, as a line at most every ``every`` seconds elsewhere.

    Parameters
    ----------
    todo : mapping
        Samples each candidate still has to probe (id -> sum of its remaining sizes).
    known : mapping
        States of the candidates that run no trial (``pruned``, ``done``, ``failed``).
    t0 : float
        ``time.perf_counter()`` at the start of the run: one clock for every stage.
    flops_start, full : float
        Compute already spent (stored probes) and the FLOPs of full tuning.
    """

    def __init__(self, todo: Mapping[str, int], known: Mapping[str, str], t0: float, flops_start: float,
                 full: float, prefix: str = "", stream: Any = None, every: float = 5.0) -> None:
        self.state: dict[str, str] = {**known, **{c: "queued" for c in todo}}
        self.left = {c: int(n) for c, n in todo.items()}
        self.total = max(1, sum(self.left.values()))
        self.t0, self.flops, self.full, self.prefix, self.every = t0, flops_start, full, prefix, every
        self._stream = stream
        self._last = -math.inf
        self._console: Any = None
        self._bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its callbacks with the run config: no console, bar or stream travels
        return {**self.__dict__, "_stream": None, "_console": None, "_bar": None}

    @property
    def console(self) -> Any:
        if self._console is None:
            from rich.console import Console

            self._console = Console(file=self._stream or sys.stderr, highlight=False, soft_wrap=True)
        return self._console

    @property
    def bar(self) -> Any:
        if self._bar is None:
            from rich.progress import BarColumn, Progress as Bar, TextColumn, TimeRemainingColumn

            self._bar = Bar(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                            TimeRemainingColumn(), console=self.console, transient=False,
                            disable=not self.console.is_terminal)
            self._task = self._bar.add_task("", total=self.total)
        return self._bar

    def _say(self, text: str) -> None:
        self.console.print(f"[{time.perf_counter() - self.t0:7.1f}s] {self.prefix}{text}", markup=False)

    def _totals(self, force: bool = False) -> None:
        counts = {s: sum(1 for v in self.state.values() if v == s) for s in ("running", "pruned", "done", "failed")}
        share = f" ({100 * self.flops / self.full:.2f}% of full tuning)" if self.full > 0 else ""
        text = (f"running {counts['running']} | pruned {counts['pruned']} | done {counts['done']} | failed "
                f"{counts['failed']} | of {len(self.state)} | compute {self.flops:.3g} FLOPs{share}")
        if not self.bar.disable:
            self.bar.update(self._task, completed=self.total - sum(self.left.values()), description=text)
            return
        now = time.perf_counter()
        if force or now - self._last >= self.every:
            self._last = now
            done = self.total - sum(self.left.values())
            elapsed = now - self.t0
            eta = f" | ETA {_duration(elapsed * (self.total - done) / done)}" if 0 < done < self.total else ""
            self._say(text + eta)

    def _end(self, cid: str, state: str) -> None:
        self.state[cid] = state
        self.left[cid] = 0

    def on_experiment_end(self, trials, **info) -> None:
        self._totals(force=True)
        self.bar.stop()

    def on_trial_start(self, iteration, trials, trial, **info) -> None:
        if not self.bar.live.is_started and not self.bar.disable:
            self.bar.start()
        self.state[trial.config["candidate"]] = "running"
        self._totals()

    def on_trial_result(self, iteration, trials, trial, result, **info) -> None:
        cid = str(result.get("candidate"))
        if result.get("failed"):
            self._end(cid, "failed")
            self._say(f"{cid} failed: {result.get('error')}")
        elif result.get("n_samples") is not None and result.get("loss") is not None:
            n = int(result["n_samples"])
            self.flops += float(result.get("flops") or 0.0)
            self.left[cid] = max(0, self.left.get(cid, 0) - n)
            line = f"{cid} D={n:,} loss {float(result['loss']):.4f}"
            pred = result.get("predicted_loss")
            if pred is not None and math.isfinite(pred):
                line += f" -> D* {pred:.4f}"
                lo, hi = result.get("pred_lo", math.nan), result.get("pred_hi", math.nan)
                if math.isfinite(lo) and math.isfinite(hi):
                    line += f" [{lo:.4f}, {hi:.4f}]"
            self._say(line)
        self._totals()

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        cid = trial.config["candidate"]
        if self.state.get(cid) == "running":
            self._end(cid, "done")
            self._say(f"{cid} done")
        self._totals()

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        cid = trial.config["candidate"]
        self._end(cid, "failed")
        self._say(f"{cid} failed: its trial crashed (see report.md)")
        self._totals()

    def mark_pruned(self, stop: Stop) -> None:
        self._end(stop.candidate, "pruned")
        self._say(f"{stop.candidate} stopped at D={stop.n_samples:,}: {stop.reason}")
        self._totals()


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


def tracking_callbacks(tracking: TrackingConfig, run_name: str) -> list[tune.Callback]:
    """Ray's logger callbacks for the trackers of ``tracking``, each set up here, in the driver
    before Ray starts: a tracker that cannot log (its package missing, an MLflow store that
    refuses, no W&B key outside offline mode) is a LensrayInputError naming it. A W&B run's group
    is ``tracking.wandb.group``, else ``run_name``."""
    import importlib.util

    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback

    out: list[tune.Callback] = []
    if tracking.csv:
        out.append(CSVLoggerCallback())
    if tracking.json_lines:
        out.append(JsonLoggerCallback())
    if tracking.tensorboard:
        out.append(TBXLoggerCallback())
    for name, settings in (("mlflow", tracking.mlflow), ("wandb", tracking.wandb)):
        if settings is None:
            continue
        if importlib.util.find_spec(name) is None:
            raise LensrayInputError(f"tracking.{name}: the {name} package is not installed "
                                    f"(pip install {name}, or lensray[tracking])")
        if name == "mlflow":
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            callback: tune.Callback = MLflowLoggerCallback(
                tracking_uri=settings.tracking_uri, experiment_name=settings.experiment_name, save_artifact=False)
        else:
            from ray.air.integrations.wandb import WandbLoggerCallback

            callback = WandbLoggerCallback(project=settings.project, group=settings.group or run_name)
        try:
            callback.setup()
        except Exception as exc:  # noqa: BLE001 - any failure of the tracker's own set-up is the user's to fix
            raise LensrayInputError(f"tracking.{name}: {one_line(exc, 400)}") from None
        out.append(callback)
    return out


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


class PlacementGroupReaper(tune.Callback):
    """Frees orphaned worker placement groups of stopped trials (:func:`remove_orphan_placement_groups`),
    at most every ``every`` seconds."""

    def __init__(self, every: float = 1.0) -> None:
        self.every = every
        self.last = -math.inf
        self.removed = 0

    def on_step_begin(self, iteration, trials, **info) -> None:
        now = time.perf_counter()
        if now - self.last >= self.every:
            self.last = now
            self.removed += remove_orphan_placement_groups()


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


class ray_output_to:
    """Context around the driver's ``ray.init``: Ray's own output goes to the log file ``path``,
    not to the terminal.

    Two routes reach a terminal otherwise. Ray's loggers (``ray`` and its children): ``ray.init``
    clears the ``ray`` logger's handlers first, so a record of its start-up (the token
    authentication notice, a ``/dev/shm`` warning) finds no handler and Python's last-resort
    handler prints it on stderr; inside the context the last resort writes ``ray.*`` records to
    the file (others still reach stderr), and on exit the file handler is the ``ray`` logger's
    only one. And the messages the cluster pushes to the driver, which Ray prints on stdout as
    ``(raylet) ...`` from a thread while connected (a warning that many worker processes
    started): they go to the file, and those that are not warnings (a node or raylet died) also
    to stderr, as one line ``ray: ...``. Workers' output is not forwarded (``log_to_driver=False``).
    """

    def __init__(self, path: str) -> None:
        self.path = path

    def __enter__(self) -> "ray_output_to":
        ray_log = logging.getLogger("ray")
        for handler in list(ray_log.handlers):  # Ray's own prints to the terminal; an earlier run's file
            ray_log.removeHandler(handler)
            if getattr(handler, "_lensray", False):
                handler.close()
        self.handler = logging.FileHandler(self.path, delay=True)
        self.handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s -- %(message)s"))
        self.handler._lensray = True  # type: ignore[attr-defined]
        ray_log.propagate = False
        self._last_resort = logging.lastResort
        logging.lastResort = _RayRecordsTo(self.handler, self._last_resort)
        try:
            import ray._private.worker as worker
        except ImportError:  # another Ray layout: its pushed messages print as Ray prints them
            return self
        printer = getattr(worker, "print_to_stdstream", None)
        if callable(printer) and not isinstance(printer, _PushedMessages):
            worker.print_to_stdstream = _PushedMessages(printer)
        return self

    def __exit__(self, *exc: Any) -> None:
        logging.lastResort = self._last_resort
        ray_log = logging.getLogger("ray")
        ray_log.handlers.clear()
        ray_log.addHandler(self.handler)
        ray_log.propagate = False


class _RayRecordsTo(logging.Handler):
    """Last-resort handler: records of the ``ray`` loggers to ``handler``, others to ``fallback``."""

    def __init__(self, handler: logging.Handler, fallback: Optional[logging.Handler]) -> None:
        super().__init__(logging.NOTSET)
        self.target, self.fallback = handler, fallback

    def handle(self, record: logging.LogRecord) -> bool:  # type: ignore[override]
        if record.name == "ray" or record.name.startswith("ray."):
            return bool(self.target.handle(record))
        if self.fallback is not None and record.levelno >= self.fallback.level:
            return bool(self.fallback.handle(record))
        return False


class _PushedMessages:
    """Stands in for ``ray._private.worker.print_to_stdstream`` (how the driver prints what the
    cluster pushes to it): while the ``ray`` logger has lensray's file handler, each message is
    logged there, and one that is not a warning is also printed on stderr; otherwise Ray's own."""

    def __init__(self, original: Callable[..., None]) -> None:
        self.original = original

    def __call__(self, data: dict, ignore_prefix: bool = False) -> None:
        ray_log = logging.getLogger("ray")
        if not any(getattr(h, "_lensray", False) for h in ray_log.handlers):
            self.original(data, ignore_prefix=ignore_prefix)
            return
        for message in data.get("lines", []):
            text = str(message).rstrip()
            ray_log.warning("(%s) %s", data.get("pid"), text)
            if text and not text.lower().startswith("warning"):
                from lensray.redact import redact

                print(f"ray: {redact(one_line(text, limit=300))} (more in the run's ray.log)", file=sys.stderr)


WITHHELD_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
"""Credentials Ray Tune copies from the driver's environment into each trial's runtime env, which
Ray's runtime-env agent writes in plain text to its log. Not copied while trials run: workers of a
local Ray inherit them from the driver that started it; the nodes of a remote cluster use their
own (an instance role, or the nodes' environment)."""


class withheld_credentials:
    """Context: Ray Tune does not copy the :data:`WITHHELD_ENV` variables into trial runtime envs
    (the driver keeps them; ``ray.tune.execution.class_cache.ENV_VARS_TO_PROPAGATE`` restored on exit)."""

    def __enter__(self) -> None:
        try:
            from ray.tune.execution.class_cache import ENV_VARS_TO_PROPAGATE as names
        except ImportError:  # another Ray layout: nothing to withhold
            names = set()
        self._names = names
        self._saved = names.intersection(WITHHELD_ENV)
        names.difference_update(self._saved)

    def __exit__(self, *exc: Any) -> None:
        self._names.update(self._saved)
