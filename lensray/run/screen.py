"""Screening on Ray: one Tune trial per candidate, probes in Ray Train workers (or replayed), the
:class:`~lensray.run.scheduler.CurvePruner` stops losers, the driver fits, ranks and writes the report.

Data flow. For every candidate a Tune function trainable runs its probes in increasing size
(``0, 200, 400, ... <= grid.max_samples``). Each probe result is written to the
:class:`~lensray.run.store.ProbeStore` the moment it exists, before it is reported; then the
candidate's curve so far is fitted with the configured predictor and the trial reports
``n_samples``, the observed loss, the fitted parameters and the predicted loss at D* with its
interval. The scheduler may STOP the trial after any report; the decision is persisted too.

Stages (``pruning.scout``, on by default): every candidate first runs its probes up to the
grace (the scout stage, where nothing can be stopped anyway); then the candidates continue,
best predicted first, so each continuing candidate is judged against the whole zoo's early
curves and strong rivals finish early. The second stage is a resume of the first: its trials
start from the stored probes.

Backends:

- ``train``: the trainable launches one ``TorchTrainer`` per candidate (Ray Train V2) whose
  workers load the candidate once and loop over its remaining probe sizes, so the worker
  group is started once per candidate, not once per probe; rank 0 persists each result and
  ``TuneReportCallback`` forwards each report to Tune. Stopping the trial kills the trial's
  actor, which owns the Train controller and its workers.
- ``replay``: probes read a recorded curves table instead of fine-tuning and charge
  ``6 * size * tokens_per_sample * D`` FLOPs (size = the table's parameter count).

Resume: the store is the source of truth. Stored probes are never run again; candidates whose
probes are all stored, or that were pruned, start no trial; a partly done candidate continues
from its next size. Tune keeps its own state under ``<out>/tune`` but is never restored.

Failures: a candidate that cannot be loaded, or whose probe diverges or fails after the probe
engine's own retries, ends as ``failed`` with the reason; the others go on. Workers killed
mid-probe are restarted by Ray Train (``FailureConfig(max_failures=...)``) and by Tune for the
trainable; earlier probes are read from the store, not repeated. A worker that runs out of
memory inside a collective (``lensray.engine.probe.CollectiveOutOfMemory``: the other ranks wait in it)
stores the smaller settings to use (``hints/``: half the micro-batch, twice the accumulation)
and raises, so Ray Train tears the worker group down at once and restarts it at those settings
(a restart counts towards ``max_failures``). A ``failed`` decision is not final: ``--resume``
tries the candidate again.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Mapping, Optional

import numpy as np

from lensray.run.config import CandidateConfig, ScreenConfig
from lensray.core.curves import Curves
from lensray.errors import LensrayInputError, one_line
from lensray.core.forecast import Forecast, Stop, confidently_better, difference_interval
from lensray.run.scheduler import TIME_ATTR, CurvePruner
from lensray.redact import install_log_redaction
from lensray.run.store import ProbeStore, candidate_key

log = logging.getLogger(__name__)

Backend = Literal["train", "replay"]
DECISIONS_DIR = "decisions"
HINTS_DIR = "hints"
TRAIN_MAX_FAILURES = 2
"""Worker-group restarts Ray Train allows per candidate (a killed worker, a lost node)."""
TRIAL_RESOURCES = {"memory": 1}
"""What a train-backend trial itself reserves: it only drives its TorchTrainer, whose workers
hold the real resources. Not a CPU share: a 0.01 CPU trial plus two 1-CPU workers does not fit
a 2-CPU laptop. (Tune refuses an empty request, hence one byte of memory.)"""
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_METRICS_ENABLED": "0"}
"""Ray Train settings for short probes: the controller notices a finished run within 0.5 s (default
2 s, which cost ~4 s per candidate here) and exports no Prometheus metrics. Set in the environment
to override."""
TUNE_MAX_FAILURES = 1
"""Restarts Tune allows a trial whose trainable itself crashed."""


# ---------------------------------------------------------------------------------------------
# plan: what the store already holds


@dataclass
class CandidatePlan:
    """One candidate's state at start: stored probes, decision, sizes still to probe."""

    candidate: CandidateConfig
    done: dict[int, dict] = field(default_factory=dict)
    decision: Optional[dict] = None
    todo: list[int] = field(default_factory=list)

    @property
    def needs_trial(self) -> bool:
        """Whether a trial must run: sizes remain and no pruning decision was taken."""
        return bool(self.todo) and not (self.decision and self.decision.get("status") == "pruned")


def decision_name(candidate_id: str) -> str:
    """Store name of a candidate's pruned/failed decision."""
    return f"{DECISIONS_DIR}/{candidate_key(candidate_id)}.json"


def read_decision(store: ProbeStore, candidate_id: str) -> Optional[dict]:
    """The stored pruned/failed decision of a candidate, if any."""
    return _read_candidate_json(store, decision_name(candidate_id), candidate_id, "decision")


def _read_candidate_json(store: ProbeStore, name: str, candidate_id: str, what: str) -> Optional[dict]:
    import json

    text = store.read_text(name)
    if text is None:
        return None
    try:
        record = json.loads(text)
    except ValueError:
        log.warning("ignoring unreadable %s of %s", what, candidate_id)
        return None
    return record if isinstance(record, dict) and record.get("candidate") == candidate_id else None


def memory_hint_name(candidate_id: str) -> str:
    """Store name of the smaller probe settings a candidate restarts with after running out of
    memory inside a collective."""
    return f"{HINTS_DIR}/{candidate_key(candidate_id)}.json"


def memory_settings(store: ProbeStore, candidate_id: str, probe: Mapping[str, Any]) -> tuple[dict, Optional[dict]]:
    """The probe settings to run ``candidate_id`` with, and its stored memory hint (if it applies).

    A hint applies while the configured micro-batch is the one it was derived from (a resume
    with another ``probe.micro_batch`` starts afresh). Its ``settings`` are None when even
    micro-batch 1 ran out of memory.
    """
    hint = _read_candidate_json(store, memory_hint_name(candidate_id), candidate_id, "memory hint")
    if hint is None or hint.get("configured_micro_batch") != probe.get("micro_batch"):
        return dict(probe), None
    return {**probe, **(hint.get("settings") or {})}, hint


def record_collective_oom(store: ProbeStore, candidate_id: str, exc: Any, probe: Mapping[str, Any],
                          previous: Optional[dict]) -> Optional[dict]:
    """Persist the smaller settings to restart with after ``exc`` (a ``CollectiveOutOfMemory``).

    The hint keeps the attempts of the probe at ``exc.n_samples`` across restarts, so its
    record shows every attempt. At micro-batch 1 there is nothing smaller: the hint's
    ``settings`` are None and the candidate is recorded as failed.
    """
    earlier = previous["attempt_log"] if previous and previous.get("n_samples") == exc.n_samples else []
    smaller = exc.smaller()
    reason = str(exc) if smaller else f"{exc}; nothing smaller to retry with (lower task.max_length or use strategy fsdp)"
    hint = {"candidate": candidate_id, "configured_micro_batch": probe.get("micro_batch"), "settings": smaller,
            "n_samples": exc.n_samples, "attempt_log": earlier + exc.attempt_log, "reason": reason,
            "time": time.time()}
    store.write_json(memory_hint_name(candidate_id), hint)
    if smaller is None:
        write_decision(store, candidate_id, "failed", exc.n_samples, reason)
    return hint


def write_decision(store: ProbeStore, candidate_id: str, status: str, n_samples: Optional[int], reason: str) -> None:
    """Persist a candidate's pruned/failed decision (atomic)."""
    store.write_json(
        decision_name(candidate_id),
        {"candidate": candidate_id, "status": status, "n_samples": n_samples, "reason": reason, "time": time.time()},
    )


def make_plan(config: ScreenConfig, store: ProbeStore, grid: list[int],
              gaps: Optional[Mapping[str, set[int]]] = None) -> list[CandidatePlan]:
    """Read the store: what each candidate has done and what remains (``gaps``: sizes a
    candidate has no probe for, e.g. a replayed table's missing cells; never to do)."""
    plans = []
    for cand in config.zoo:
        done = {n: r for n, r in store.completed(cand.id).items() if r.get("status", "ok") == "ok"}
        decision = read_decision(store, cand.id)
        if decision and decision.get("status") != "pruned":
            decision = None  # failures are retried on resume
        skip = (gaps or {}).get(cand.id, set())
        todo = [d for d in grid if d not in done and d not in skip]
        plans.append(CandidatePlan(cand, done, decision, todo))
    return plans


# ---------------------------------------------------------------------------------------------
# fitting one candidate's curve (in the trainable) and all of them (in the driver)


class _LeveledSelector:
    """The configured selector with its intervals re-expressed at ``predictor.level``.

    Selectors give 90 % intervals (``lensray.core.selection.LEVEL``). The interval at another level
    keeps the centre and scales the half-widths in log space by ``z(level) / z(LEVEL)``: exact
    for the log-normal intervals of ``lensray``, a normal approximation for the others. A lower
    level prunes more and risks more (benchmarks/replay_scale.py; BENCHMARKS.md).
    """

    def __init__(self, method: str, level: float) -> None:
        from scipy import stats

        from lensray.core.selection import LEVEL, get_selector

        self._selector = get_selector(method)
        self._scale = float(stats.norm.ppf(0.5 + level / 2) / stats.norm.ppf(0.5 + LEVEL / 2))

    def predict(self, curves: Curves, target: int) -> Any:
        pred = self._selector.predict(curves, target)
        if self._scale != 1.0:
            with np.errstate(divide="ignore", invalid="ignore"):
                log_loss = np.log(pred.loss)
                pred.lo = np.exp(log_loss - self._scale * (log_loss - np.log(pred.lo)))
                pred.hi = np.exp(log_loss + self._scale * (np.log(pred.hi) - log_loss))
        return pred


def _selector(method: str, level: float) -> _LeveledSelector:
    """The configured selector, intervals at the configured level."""
    return _LeveledSelector(method, level)


def forecast(
    method: str,
    level: float,
    candidate: str,
    grid: list[int],
    losses: Mapping[int, float],
    target: int,
    size: float | None = None,
    family: str | None = None,
) -> dict[str, Any]:
    """Fit one candidate's observed points and predict its loss at ``target``.

    Returns the report keys ``points``, ``predicted_loss``, ``pred_lo``, ``pred_hi`` and
    ``params`` (NaN / None when the curve cannot be fitted yet).
    """
    points = sum(1 for d in losses if d > 0)
    out: dict[str, Any] = {"points": points, "predicted_loss": math.nan, "pred_lo": math.nan, "pred_hi": math.nan,
                           "params": None}
    if points < 1:
        return out
    L = np.array([[losses.get(d, np.nan) for d in grid]], dtype=float)
    curves = Curves([candidate], np.array(grid, dtype=float), L,
                    np.array([np.nan if size is None else size], dtype=float), [family])
    try:
        pred = _selector(method, level).predict(curves, target)
    except (LensrayInputError, ValueError, FloatingPointError, np.linalg.LinAlgError) as exc:
        log.debug("no forecast for %s with %d points: %s", candidate, points, exc)
        return out
    out.update(predicted_loss=float(pred.loss[0]), pred_lo=float(pred.lo[0]), pred_hi=float(pred.hi[0]))
    if pred.params is not None:
        out["params"] = [float(v) for v in np.asarray(pred.params)[0].reshape(-1)]
    return out


RELATIVE_PRUNING = True
"""Forecasts of the ``lensray`` predictor carry the split of their error into a zoo-common and an
own part (``lensray.core.selection.lensray_error_split``), so pruning compares candidates on the
interval of their difference (``lensray.run.scheduler.confidently_better``); False: marginal intervals."""


def zoo_forecaster(method: str, level: float, grid: list[int], target: int, sizes: Mapping[str, Optional[float]],
                   families: Mapping[str, Optional[str]], relative: Optional[bool] = None):
    """The scheduler's forecaster: every candidate's points so far, fitted together (zoo context).

    With ``relative`` (default :data:`RELATIVE_PRUNING`) and the ``lensray`` method, each forecast
    also carries the zoo-common and own half-widths of its error at ``level``.
    """
    selector = _selector(method, level)
    split = (RELATIVE_PRUNING if relative is None else relative) and method == "lensray"
    D = np.array(grid, dtype=float)
    col = {d: j for j, d in enumerate(grid)}

    def run(observed: Mapping[str, Mapping[int, float]]) -> dict[str, Forecast]:
        ids = [cid for cid, pts in observed.items() if pts]
        if not ids:
            return {}
        L = np.full((len(ids), len(grid)), np.nan)
        for i, cid in enumerate(ids):
            for d, loss in observed[cid].items():
                if d in col:
                    L[i, col[d]] = loss
        size = np.array([sizes.get(c) or np.nan for c in ids], dtype=float)
        curves = Curves(ids, D, L, size, [families.get(c) for c in ids])
        return forecasts_from(curves, selector.predict(curves, target), level, split)

    return run


def forecasts_from(curves: Curves, pred: Any, level: float, split: bool = True) -> dict[str, Forecast]:
    """A :class:`Forecast` per row of ``curves`` from their prediction ``pred``; with ``split``
    (and a prediction that carries it: ``lensray``) the zoo-common and own half-widths at ``level``."""
    from scipy import stats

    n = len(curves)
    common = own = np.full(n, np.nan)
    if split and pred.error_split is not None:  # lensray.core.selection.lensray_error_split
        z = float(stats.norm.ppf(0.5 + level / 2))
        common, own = (z * v for v in pred.error_split)
    seen = np.isfinite(curves.L)
    out = {}
    for i, cid in enumerate(curves.ids):
        if seen[i].any():
            out[cid] = Forecast(cid, int(curves.D[seen[i]].max()), int(np.sum(seen[i] & (curves.D > 0))),
                                float(pred.loss[i]), float(pred.lo[i]), float(pred.hi[i]), float(common[i]),
                                float(own[i]))
    return out


def curves_from_store(ids: list[str], grid: list[int], records: list[dict], sizes: Mapping[str, float],
                      families: Mapping[str, Optional[str]]) -> Curves:
    """A :class:`Curves` of every candidate's stored ``ok`` probes (NaN where not probed)."""
    col = {d: j for j, d in enumerate(grid)}
    L = np.full((len(ids), len(grid)), np.nan)
    row = {cid: i for i, cid in enumerate(ids)}
    for r in records:
        if r.get("status", "ok") == "ok" and r["candidate"] in row and r["n_samples"] in col and r.get("test_loss"):
            L[row[r["candidate"]], col[r["n_samples"]]] = float(r["test_loss"])
    size = np.array([sizes.get(c) or np.nan for c in ids], dtype=float)
    return Curves(ids, np.array(grid, dtype=float), L, size, [families.get(c) for c in ids])


# ---------------------------------------------------------------------------------------------
# trainables


@dataclass
class TrialContext:
    """What every trial needs, shipped once through the object store (``tune.with_parameters``)."""

    store_uri: str
    grid: list[int]
    target: int
    method: str
    level: float
    done: dict[str, dict[int, float]]
    candidates: dict[str, dict[str, Any]]
    replay: Optional[dict[str, dict[int, float]]] = None
    tokens_per_sample: float = 35.0
    task: Optional[dict] = None
    probe: Optional[dict] = None
    max_failures: int = TRAIN_MAX_FAILURES
    train_storage: Optional[str] = None


def _report_record(ctx: TrialContext, cid: str, record: dict, losses: dict[int, float]) -> dict[str, Any]:
    """The Tune result of one probe: its record's key figures plus the forecast so far."""
    cand = ctx.candidates[cid]
    fc = forecast(ctx.method, ctx.level, cid, ctx.grid, losses, ctx.target, cand.get("size"), cand.get("family"))
    return {
        "candidate": cid,
        TIME_ATTR: int(record["n_samples"]),
        "loss": float(record["test_loss"]),
        "flops": float(record.get("flops") or 0.0),
        "probe_seconds": float(record.get("wall_seconds") or 0.0),
        **fc,
    }


def replay_trainable(config: dict, ctx: TrialContext) -> None:
    """Tune trainable of the replay backend: probes read the recorded curve."""
    from ray import tune

    install_log_redaction()
    cid = config["candidate"]
    store = ProbeStore(ctx.store_uri, check=False)
    losses = dict(ctx.done.get(cid, {}))
    size = ctx.candidates[cid].get("size")  # None: not in the table, so its probes go unbilled
    for d in ctx.grid:
        if d in losses:
            continue
        loss = ctx.replay[cid][d]
        if not math.isfinite(loss):
            continue  # the table has no loss at this size: there is no probe to replay
        tokens = ctx.tokens_per_sample * d
        record = {"n_samples": d, "status": "ok", "test_loss": loss, "tokens": tokens,
                  "flops": None if size is None else 6.0 * size * tokens, "wall_seconds": 0.0, "n_params": size,
                  "backend": "replay", "started_at": time.time()}
        store.put(cid, record)
        losses[d] = loss
        tune.report(_report_record(ctx, cid, record, losses))


def _probe_loop(loop_config: dict) -> None:
    """Ray Train worker loop: load the candidate once, run its remaining probes, report each."""
    import ray.train

    from lensray.engine.data import TaskConfig
    from lensray.engine.parallel import agreed
    from lensray.engine.probe import CollectiveOutOfMemory, ProbeConfig, ProbeRunner

    install_log_redaction()  # a worker process: its log lines are redacted too
    ctx: TrialContext = loop_config["ctx"]
    cid: str = loop_config["candidate"]
    rank = ray.train.get_context().get_world_rank()
    store = ProbeStore(ctx.store_uri, check=False)
    cand = ctx.candidates[cid]
    # re-read the store: after a worker restart the probes finished before the crash are kept
    losses = {n: float(r["test_loss"]) for n, r in store.completed(cid).items() if r.get("status", "ok") == "ok"}
    configured = dict(ctx.probe or {})
    settings, hint = memory_settings(store, cid, configured)  # smaller after an out-of-memory restart
    if hint is not None and hint.get("settings") is None:  # out of memory even at micro-batch 1
        ray.train.report({"candidate": cid, "failed": True, "error": hint["reason"], TIME_ATTR: hint["n_samples"]})
        return
    runner = ProbeRunner(cand["model"], TaskConfig(**(ctx.task or {})), ProbeConfig(**settings),
                         trust_remote_code=cand["trust_remote_code"], allow_pickle=cand["allow_pickle"],
                         strategy=cand["strategy"])
    try:
        runner.load()
    except Exception as exc:  # noqa: BLE001 - any load failure makes the candidate failed, not the run
        reason = f"could not load {cand['model']}: {' '.join(str(exc).split()) or type(exc).__name__}"
        if rank == 0:
            write_decision(store, cid, "failed", None, reason)
        ray.train.report({"candidate": cid, "failed": True, "error": reason})
        return
    for d in ctx.grid:
        if d in losses:
            continue
        if agreed(rank, rank == 0 and (read_decision(store, cid) or {}).get("status") == "pruned"):
            return  # pruned while the last report travelled to Tune: run no further probe
        try:
            result = runner.run(d)
        except CollectiveOutOfMemory as exc:
            # the other ranks wait in the collective this one left: end the worker group now
            # (Ray Train restarts it, at the smaller settings stored here)
            record_collective_oom(store, cid, exc, configured, hint)
            raise
        record = {**result.to_dict(), "n_samples": d, "backend": "train", "started_at": time.time(),
                  "node_id": ray.get_runtime_context().get_node_id()}
        if hint is not None and hint.get("n_samples") == d:  # the attempts before the restart
            record["attempt_log"] = hint["attempt_log"] + record["attempt_log"]
            record["attempts"] = len(record["attempt_log"])
        if result.status != "ok":
            reason = f"probe at D={d} {result.status}: {result.error}"
            if rank == 0:
                write_decision(store, cid, "failed", d, reason)
            ray.train.report({"candidate": cid, "failed": True, "error": reason, TIME_ATTR: d})
            return
        if rank == 0:
            store.put(cid, record)
        losses[d] = float(result.test_loss)
        metrics = _report_record(ctx, cid, record, losses) if rank == 0 else {}
        ray.train.report(metrics)


def train_trainable(config: dict, ctx: TrialContext) -> None:
    """Tune trainable of the train backend: one TorchTrainer for all of a candidate's probes."""
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cid = config["candidate"]
    cand = ctx.candidates[cid]
    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)  # read here and propagated to the controller and workers
    trainer = TorchTrainer(
        _probe_loop,
        train_loop_config={"ctx": ctx, "candidate": cid},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cand["workers"],
            use_gpu=cand["gpus"] > 0,
            resources_per_worker={"CPU": cand["cpus"], **({"GPU": cand["gpus"]} if cand["gpus"] > 0 else {})},
        ),
        run_config=ray.train.RunConfig(
            name=f"train-{candidate_key(cid)}",
            storage_path=ctx.train_storage,
            failure_config=ray.train.FailureConfig(max_failures=ctx.max_failures),
            callbacks=[TuneReportCallback()],
        ),
    )
    trainer.fit()


# ---------------------------------------------------------------------------------------------
# live progress


def _progress_callback(total: int, known: dict[str, str], flops_start: float, full: float, stream=None,
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


def _reaper_callback(every: float = 1.0):
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


# ---------------------------------------------------------------------------------------------
# the screening


def _init_ray(config: ScreenConfig) -> bool:
    """Connect to (or start) Ray; returns True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": True, "logging_level": logging.WARNING}
    if config.ray.address:
        ray.init(address=config.ray.address, **kwargs)
    else:
        ray.init(num_cpus=config.ray.num_cpus, num_gpus=config.ray.num_gpus, include_dashboard=False, **kwargs)
    return True


def max_concurrent(config: ScreenConfig, backend: Backend, resources: Mapping[str, float]) -> int:
    """Trials at once: ``ray.max_concurrent_trials`` when set, else cluster GPUs // GPUs per
    candidate, else CPUs // CPUs per candidate (a replay: CPUs)."""
    if config.ray.max_concurrent_trials is not None:
        return config.ray.max_concurrent_trials
    if backend == "replay":
        return max(1, int(resources.get("CPU", 1)))
    gpus = max((c.gpus * c.workers for c in config.zoo), default=0)
    if gpus > 0 and resources.get("GPU", 0) > 0:
        return max(1, int(resources["GPU"] // gpus))
    cpus = max((c.cpus * c.workers for c in config.zoo), default=1)
    return max(1, int(resources.get("CPU", 1) // cpus))


def _grid(config: ScreenConfig, replay: Optional[Curves]) -> list[int]:
    if replay is None:
        return config.grid_sizes()
    return [int(d) for d in replay.D if d <= config.grid.max_samples]


def replay_gaps(replay: Optional[Curves], grid: list[int]) -> dict[str, set[int]]:
    """Sizes of ``grid`` at which a replayed candidate has no recorded loss (no probe to replay)."""
    if replay is None:
        return {}
    sizes = set(grid)
    gaps = {cid: sizes.intersection(holes) for cid, holes in replay.missing().items()}
    return {cid: g for cid, g in gaps.items() if g}


def screen(
    config: ScreenConfig,
    out: Optional[str] = None,
    resume: bool = False,
    backend: Backend = "train",
    replay: Optional[Curves] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Screen the zoo of ``config`` and select the candidate to fine-tune.

    Parameters
    ----------
    config : ScreenConfig
        Validated configuration (``lensray.run.config.load_config``).
    out : str, optional
        Output folder or URI; default ``config.storage.path``.
    resume : bool
        Continue a run in ``out``: stored probes are not repeated. Without it a folder that
        already holds probe results is refused.
    backend : {"train", "replay"}
        Fine-tune in Ray Train workers, or replay the curves of ``replay``.
    replay : Curves, optional
        Recorded curves (replay backend); their ids must be the zoo's ids.
    progress : bool
        Print progress lines on stderr.

    Returns
    -------
    dict
        The ``selection.json`` content.
    """
    t0 = time.perf_counter()
    if backend not in ("train", "replay"):
        raise LensrayInputError(f"backend: unknown {backend!r}; use 'train' or 'replay'")
    if backend == "replay" and replay is None:
        raise LensrayInputError("replay: a curves table is needed for the replay backend")
    store = ProbeStore(out or config.storage.path)
    if not resume and store.get_all():
        raise LensrayInputError(f"storage.path: {store.uri} already holds probe results; pass --resume or use another --out")
    store.write_text("config.yaml", config.to_yaml())
    grid = _grid(config, replay)
    started = _init_ray(config)
    try:
        import ray

        gaps = replay_gaps(replay, grid)
        plans = make_plan(config, store, grid, gaps)
        stages = scout_stages(config, grid, sum(p.needs_trial for p in plans),
                              max_concurrent(config, backend, ray.cluster_resources()))
        failed: set[str] = set()
        for k, upto in enumerate(stages):
            if k:  # the store has moved on
                plans = make_plan(config, store, grid, gaps)
            plans = [replace(p, todo=[d for d in p.todo if d <= upto]) for p in plans]
            _run_trials(config, store, plans, grid, backend, replay, progress, upto=upto, exclude=failed,
                        by_forecast=upto == grid[-1] and len(stages) > 1, gaps=gaps)
            failed |= {p.candidate.id for p in plans if (read_decision(store, p.candidate.id) or {}).get("status") == "failed"}
    finally:
        if started:
            import ray

            ray.shutdown()
    return finish(config, store, grid, backend, replay, time.perf_counter() - t0)


def plan_bill(config: ScreenConfig, out: Optional[str] = None, replay: Optional[Curves] = None) -> dict[str, Any]:
    """What a run would do, before any Ray work and without writing anything.

    Per candidate: the probes already in the store (a resumed run), the probes still to run and
    their worst-case FLOPs (6 * size * tokens per sample * D summed over them: no candidate
    pruned), with tokens per sample measured by the stored probes, else ``tokens_per_sample``.
    A size not in the config (or the replayed table) is counted from the model's config
    (:func:`lensray.engine.models.parameter_counts`, no weights loaded); candidates whose config cannot
    be had are listed, not billed.

    Returns
    -------
    dict
        ``{"grid", "target", "candidates": [{"candidate", "size", "stored", "todo", "pruned",
        "flops_todo"}], "assumed_tokens_per_sample" (None for a replay, billed at it exactly),
        "flops_todo", "flops_stored", "flops_full_tuning", "unsized"}``.
    """
    store = ProbeStore(out or config.storage.path, check=False)
    grid = _grid(config, replay)
    plans = make_plan(config, store, grid, replay_gaps(replay, grid))
    info = _candidate_info(config, replay)
    if replay is None:
        from lensray.engine.models import parameter_counts

        unknown = [c for c in config.zoo if info[c.id]["size"] is None]
        for c, n in zip(unknown, parameter_counts([(c.source, c.trust_remote_code) for c in unknown])):
            info[c.id]["size"] = None if n is None else float(n)
    records = store.get_all()
    rows, unsized = [], []
    for p in plans:
        cid, size = p.candidate.id, info[p.candidate.id]["size"]
        mine = [r for r in records if r.get("candidate") == cid]
        todo = p.todo if p.needs_trial else []
        tokens = _tokens_per_sample(mine, config.tokens_per_sample)
        rows.append({"candidate": cid, "size": size, "stored": sorted(p.done), "todo": todo,
                     "pruned": bool(p.decision), "flops_todo": 6.0 * size * tokens * sum(todo) if size else None})
        if not size:
            unsized.append(cid)
    return {
        "grid": grid, "target": config.target_samples, "candidates": rows,
        "assumed_tokens_per_sample": None if replay is not None else config.tokens_per_sample, "unsized": unsized,
        "flops_todo": sum(r["flops_todo"] or 0.0 for r in rows),
        "flops_stored": sum(float(r.get("flops") or 0.0) for r in records),
        "flops_full_tuning": _full_tuning(config, info, records),
    }


def _candidate_info(config: ScreenConfig, replay: Optional[Curves]) -> dict[str, dict[str, Any]]:
    info = {}
    sizes = dict(zip(replay.ids, replay.size)) if replay is not None else {}
    for c in config.zoo:
        size = c.size if c.size is not None else sizes.get(c.id)
        info[c.id] = {**c.model_dump(), "model": c.source,
                      "size": None if size is None or not np.isfinite(size) else float(size)}
    return info


def scout_stages(config: ScreenConfig, grid: list[int], candidates: Optional[int] = None,
                 concurrent: Optional[int] = None) -> list[int]:
    """The largest probe size of each stage of the run: ``[scout size, last size]`` or ``[last size]``.

    With ``pruning.scout`` (and pruning on, and a grid longer than the grace) every candidate is
    first probed up to its ``grace_points``-th size D > 0 (the scout stage: nothing can be
    stopped before the grace anyway, and at the grace the usual rule applies); then the
    candidates continue, best predicted first, each judged by the scheduler against the whole
    zoo's early curves. Without scouting, a candidate
    that runs early has few rivals with forecasts and cannot be stopped, whatever it costs.
    When all ``candidates`` that still need probes run at once (``concurrent`` trials or more),
    no candidate waits for a slot, so there is no order to choose and no scout stage: it would
    only start every worker group twice.
    """
    positive = [d for d in grid if d > 0]
    grace = config.pruning.grace_points
    queued = candidates is None or concurrent is None or candidates > concurrent
    if config.pruning.enabled and config.pruning.scout and len(positive) > grace and queued:
        return [positive[grace - 1], grid[-1]]
    return [grid[-1]]


def trial_order(ids: list[str], info: Mapping[str, dict], forecasts: Optional[Mapping[str, Forecast]] = None) -> list[str]:
    """Best predicted loss at D* first when ``forecasts`` are given, else largest known size first.

    Pruning compares each candidate with the ones seen so far, so a strong rival found early
    stops more of the others early. After the scout stage the predictions say which rivals are
    strong; before it, larger checkpoints are more often the strong ones after fine-tuning.
    Ties (and candidates without a forecast) go largest first, unknown sizes last, zoo order
    among equals.
    """
    size = {cid: info[cid].get("size") or 0.0 for cid in ids}

    def predicted(cid: str) -> float:
        f = (forecasts or {}).get(cid)
        return f.loss if f is not None and math.isfinite(f.loss) else math.inf

    return sorted(ids, key=lambda cid: (predicted(cid), -size[cid]))


def _run_trials(config: ScreenConfig, store: ProbeStore, plans: list[CandidatePlan], grid: list[int],
                backend: Backend, replay: Optional[Curves], progress: bool, upto: Optional[int] = None,
                exclude: frozenset[str] | set[str] = frozenset(), by_forecast: bool = False,
                gaps: Optional[Mapping[str, set[int]]] = None) -> None:
    """Run one Tune trial per candidate that still needs probes up to ``upto`` (decisions go to the store).

    ``grid`` is the whole probe grid (the forecasts' columns); trials probe its sizes up to
    ``upto`` (default: all). Candidates in ``exclude`` (failed in an earlier stage) run no trial.
    With ``by_forecast`` the trials start best predicted first (:func:`trial_order`). ``gaps``
    (:func:`replay_gaps`): sizes a candidate has no probe for, so its last probe comes earlier.
    """
    import ray
    from ray import tune

    info = _candidate_info(config, replay)
    sizes = [d for d in grid if upto is None or d <= upto]
    ctx = TrialContext(
        store_uri=store.uri, grid=sizes, target=config.target_samples, method=config.predictor.method,
        level=config.predictor.level,
        done={p.candidate.id: {n: float(r["test_loss"]) for n, r in p.done.items()} for p in plans},
        candidates=info, tokens_per_sample=config.tokens_per_sample,
        task=config.task.model_dump(mode="json"), probe=config.probe.model_dump(mode="json"),
        train_storage=_storage_path(store, "train"),
    )
    if replay is not None:
        col = {int(d): j for j, d in enumerate(replay.D)}
        ctx.replay = {cid: {d: float(replay.L[i, col[d]]) for d in grid} for i, cid in enumerate(replay.ids)}
    runs = [p for p in plans if p.needs_trial and p.candidate.id not in exclude]
    states = {p.candidate.id: ("failed" if p.candidate.id in exclude else "pruned" if p.decision else "done")
              for p in plans if p not in runs}
    for p in runs:
        previous = read_decision(store, p.candidate.id)
        if previous and previous.get("status") == "failed":
            write_decision(store, p.candidate.id, "retried", None, previous.get("reason", ""))
    forecaster = zoo_forecaster(ctx.method, ctx.level, grid, ctx.target, {c: i["size"] for c, i in info.items()},
                                {c: i["family"] for c, i in info.items()})
    todo = trial_order([p.candidate.id for p in runs], info, forecaster(ctx.done) if by_forecast else None)
    spent = sum(float(r.get("flops") or 0.0) for p in plans for r in p.done.values())
    full = _full_tuning(config, info, store.get_all() if backend == "train" else [])
    stage = "" if upto is None or upto >= grid[-1] else f"scout D<={upto:,}: "
    bar = _progress_callback(len(plans), states, spent, full, prefix=stage) if progress else None

    def on_stop(stop: Stop) -> None:
        write_decision(store, stop.candidate, "pruned", stop.n_samples, stop.reason)
        if bar is not None:
            bar.mark_pruned(stop)

    if not todo:
        return
    gaps = gaps or {}
    last = {p.candidate.id: max((d for d in grid if d not in gaps.get(p.candidate.id, ())), default=grid[-1])
            for p in plans}
    scheduler = CurvePruner(config.pruning.top_k, config.pruning.grace_points, forecaster=forecaster,
                            observed=ctx.done, on_stop=on_stop, last_size=last)
    if backend == "replay":
        trainable = tune.with_resources(tune.with_parameters(replay_trainable, ctx=ctx), {"cpu": 1})
    else:
        trainable = tune.with_resources(tune.with_parameters(train_trainable, ctx=ctx),
                                       tune.PlacementGroupFactory([TRIAL_RESOURCES]))
    tuner = tune.Tuner(
        trainable,
        param_space={"candidate": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(
            scheduler=scheduler if config.pruning.enabled else None,
            max_concurrent_trials=max_concurrent(config, backend, ray.cluster_resources()),
            reuse_actors=backend == "replay",
            trial_dirname_creator=_trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{int(time.time())}",
            storage_path=_storage_path(store, "tune"),
            failure_config=tune.FailureConfig(max_failures=TUNE_MAX_FAILURES),
            callbacks=[cb for cb in (bar, _reaper_callback() if backend == "train" else None) if cb is not None],
            verbose=0,
        ),
    )
    with _quiet_tune(), _withheld_credentials():
        results = tuner.fit()
    for res in results:
        cid = (res.config or {}).get("candidate")
        if res.error is not None and cid and (read_decision(store, cid) or {}).get("status") in (None, "retried"):
            write_decision(store, cid, "failed", (res.metrics or {}).get(TIME_ATTR), one_line(res.error, 500))


class _quiet_tune:
    """Context: no Tune result loggers (JSON/CSV/TensorBoard files per trial), no Tune console
    output (lensray prints its own progress lines) and no INFO logs.

    The store holds every result; Tune's per-trial logger files cost time and memory at zoo
    scale (300 candidates: 87 s -> 52 s, driver 540 -> 356 MB; benchmarks/replay_scale.py).
    ``LENSRAY_TUNE_LOGGERS=1`` keeps the loggers (for that measurement).
    """

    def __enter__(self) -> None:
        env = {"RAY_AIR_NEW_OUTPUT": "0"}  # the legacy reporter honours verbose=0
        if os.environ.get("LENSRAY_TUNE_LOGGERS") != "1":
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


WITHHELD_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SECURITY_TOKEN", "AWS_SESSION_TOKEN")
"""Credentials Ray Tune copies from the driver's environment into each trial's runtime env, which
Ray's runtime-env agent writes in plain text to its log. Not copied while trials run: workers of a
local Ray inherit them from the driver that started it; the nodes of a remote cluster use their
own (an instance role, or the nodes' environment)."""


class _withheld_credentials:
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


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: the candidate's sanitised key (no id reaches a path)."""
    return f"trial-{candidate_key(str(trial.config['candidate']))}"


def _storage_path(store: ProbeStore, name: str) -> str:
    return store.uri_of(name)


# ---------------------------------------------------------------------------------------------
# driver: fit all curves, rank, bill, write outputs


def _tokens_per_sample(records: list[dict], default: float) -> float:
    tok = sum(float(r.get("tokens") or 0.0) for r in records if r.get("n_samples", 0) > 0)
    n = sum(int(r["n_samples"]) for r in records if r.get("n_samples", 0) > 0)
    return tok / n if tok > 0 and n > 0 else default


def _full_tuning(config: ScreenConfig, info: Mapping[str, dict], records: list[dict]) -> float:
    """FLOPs of fine-tuning every candidate on D*: sum of 6 * size * tokens/sample * D*."""
    total = 0.0
    for cid, cand in info.items():
        mine = [r for r in records if r.get("candidate") == cid]
        size = cand.get("size") or next((r.get("n_params") for r in mine if r.get("n_params")), None)
        if size:
            total += 6.0 * float(size) * _tokens_per_sample(mine, config.tokens_per_sample) * config.target_samples
    return total


def _explain_finishers(config: ScreenConfig, entries: list[dict], selected: Optional[str],
                       final: Mapping[str, Forecast]) -> None:
    """Set ``reason`` of each finished candidate other than ``selected``: why the pruning rule never
    stopped it, judged on the final curves (the margin to the selected candidate against the
    uncertainty of the difference at the predictor's level). ``final``: the forecasts of the final ranking."""
    others = [e for e in entries if e["status"] == "finished" and e["candidate"] != selected]
    if selected is None or not others:
        return
    if not config.pruning.enabled:
        for e in others:
            e["reason"] = "ran to the end: pruning is off"
        return
    level = f"{100 * config.predictor.level:g} %"
    best = final.get(selected)
    for e in others:
        own = final.get(e["candidate"])
        diff = difference_interval(best, own) if best is not None and own is not None else None
        if diff is not None:
            margin = f"log gap {diff[0]:.3g} against the {level} half-width {diff[1]:.3g} of the difference"
        elif best is not None and own is not None and math.isfinite(own.lo) and math.isfinite(best.hi):
            margin = f"optimistic end {own.lo:.4g} against the pessimistic end {best.hi:.4g} of {selected}"
        else:
            e["reason"] = "never confidently worse than another candidate: no interval to compare"
            continue
        if confidently_better(best, own) is None:
            e["reason"] = f"never confidently worse than {selected}, even with the final curves ({margin})"
        else:
            e["reason"] = (f"confidently worse than {selected} only with the final curves ({margin}), not after any "
                           "earlier probe; a last probe is never stopped (nothing to save)")


def finish(config: ScreenConfig, store: ProbeStore, grid: list[int], backend: Backend, replay: Optional[Curves],
           wall_seconds: float) -> dict[str, Any]:
    """Fit every stored curve, rank the candidates, bill the compute and write the outputs."""
    from lensray.run.report import predictor_curves, write_report

    info = _candidate_info(config, replay)
    records = store.get_all()
    ids = [c.id for c in config.zoo]
    sizes = {cid: info[cid]["size"] or next((r.get("n_params") for r in records
                                            if r["candidate"] == cid and r.get("n_params")), None) for cid in ids}
    curves = curves_from_store(ids, grid, records, sizes, {cid: info[cid]["family"] for cid in ids})
    gaps = replay_gaps(replay, grid)
    selector = _selector(config.predictor.method, config.predictor.level)
    pred = selector.predict(curves, config.target_samples)
    entries = []
    for i, cid in enumerate(ids):
        mine = [r for r in records if r["candidate"] == cid]
        decision = read_decision(store, cid)
        observed = {int(r["n_samples"]) for r in mine if r.get("status", "ok") == "ok"}
        status, reason, pruned_at, error = "finished", None, None, None
        if decision and decision["status"] == "failed":
            status, error = "failed", decision["reason"]
        elif decision and decision["status"] == "pruned":
            status, reason, pruned_at = "pruned", decision["reason"], decision["n_samples"]
        elif not (expected := set(grid) - gaps.get(cid, set())) <= observed:
            status, error = "failed", f"incomplete: {len(observed)} of {len(expected)} probes stored"
        if status != "failed" and not pred.ok[i]:
            status, error = "failed", pred.errors[i] or "curve could not be fitted"
        params = None if pred.params is None else [float(v) for v in np.asarray(pred.params)[i].reshape(-1)]
        entries.append({
            "candidate": cid, "status": status,
            "predicted_loss": float(pred.loss[i]) if status != "failed" else None,
            "interval": [float(pred.lo[i]), float(pred.hi[i])] if status != "failed" else [None, None],
            "pruned_at": pruned_at, "params": params if status != "failed" else None,
            "flops": sum(float(r.get("flops") or 0.0) for r in mine), "error": error, "reason": reason,
            "n_probes": len(observed),
        })
    order = {"finished": 0, "pruned": 1, "failed": 2}
    entries.sort(key=lambda e: (order[e["status"]], e["predicted_loss"] if e["predicted_loss"] is not None
                                and math.isfinite(e["predicted_loss"]) else math.inf))
    spent = sum(e["flops"] for e in entries)
    full = _full_tuning(config, info, records)
    gpu_seconds = sum(float(r.get("wall_seconds") or 0.0) * info[r["candidate"]]["gpus"] * info[r["candidate"]]["workers"]
                      for r in records if r["candidate"] in info)
    selected = next((e["candidate"] for e in entries if e["status"] != "failed"), None)
    _explain_finishers(config, entries, selected, forecasts_from(curves, pred, config.predictor.level, RELATIVE_PRUNING))
    compute = {"flops_spent": spent, "flops_full_tuning": full, "saved_fraction": 1.0 - spent / full if full > 0 else None,
               "gpu_seconds": gpu_seconds, "wall_seconds": wall_seconds}
    probed = {r["candidate"] for r in records}
    uncharged = [cid for cid in ids if not sizes[cid] and cid in probed]
    if uncharged:
        compute["uncharged"] = uncharged  # no parameter count: outside both sides of the bill
    selection = {
        "selected": selected,
        "ranking": entries,
        "compute": compute,
        "backend": backend, "target_samples": config.target_samples, "grid": grid,
        "predictor": config.predictor.method,
    }
    store.write_parquet(records)
    fitted = predictor_curves(selector, curves, config.target_samples)  # the plot shows the ranking's own fits
    write_report(store, selection, records, config.target_samples, fitted=fitted)
    return selection
