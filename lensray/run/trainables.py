"""Tune trainables: one trial per candidate, its probes replayed or run in Ray Train workers.

Each probe result is written to the :class:`~lensray.run.store.ProbeStore` the moment it exists,
before it is reported; the trial reports ``n_samples`` and the observed loss, and the scheduler
(:class:`~lensray.run.scheduler.CurvePruner`) forecasts from the whole zoo's reports.

- ``train``: the trial loads the candidate once and loops over its remaining probe sizes
  (:func:`run_probes`). A one-worker candidate (the usual case) runs in the trial's own actor,
  which Tune places with the candidate's CPUs and GPUs (:func:`trial_resources`; Ray sets its
  ``CUDA_VISIBLE_DEVICES``): no Ray Train controller or worker group is started, and Tune reuses
  a finished trial's actor for the next candidate, so imports are paid once per slot. A
  candidate of several workers (DDP/FSDP) runs one ``TorchTrainer`` (Ray Train V2,
  :func:`probe_loop`); rank 0 persists each result and ``TuneReportCallback`` forwards each
  report to Tune. Stopping a trial kills its actor (and the Train controller it owns).
- ``replay``: probes read a recorded curves table instead of fine-tuning and charge
  ``6 * size * tokens_per_sample * D`` FLOPs (size = the table's parameter count).

Failures: a candidate that cannot be loaded, or whose probe diverges or fails after the probe
engine's own retries, reports ``failed`` with the reason and its decision is stored. A trial
actor killed mid-probe (a lost node) is restarted by Tune (``TUNE_MAX_FAILURES``), Train
workers by Ray Train (``FailureConfig(max_failures=...)``); earlier probes are read from the
store, not repeated. A worker that runs out of memory inside a
collective (``lensray.engine.probe.CollectiveOutOfMemory``: the other ranks wait in it) stores
the smaller settings to use (``hints/``) and raises, so Ray Train restarts the worker group at
those settings.
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from lensray.redact import install_log_redaction
from lensray.run.scheduler import TIME_ATTR
from lensray.run.store import (
    ProbeStore, candidate_key, is_ok, memory_settings, read_decision, record_collective_oom, write_decision,
)

TRAIN_MAX_FAILURES = 2
"""Worker-group restarts Ray Train allows per candidate (a killed worker, a lost node)."""


TRIAL_RESOURCES = {"memory": 1}
"""What a several-worker trial itself reserves: it only drives its TorchTrainer, whose workers
hold the real resources. Not a CPU share: a 0.01 CPU trial plus two 1-CPU workers does not fit
a 2-CPU laptop. (Tune refuses an empty request, hence one byte of memory.)"""


TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_METRICS_ENABLED": "0"}
"""Ray Train settings for short probes: the controller notices a finished run within 0.5 s (default
2 s, which cost ~4 s per candidate here) and exports no Prometheus metrics. Set in the environment
to override."""



@dataclass
class TrialContext:
    """What every trial needs, shipped once through the object store (``tune.with_parameters``)."""

    store_uri: str
    grid: list[int]
    done: dict[str, dict[int, float]]
    candidates: dict[str, dict[str, Any]]
    replay: Optional[dict[str, dict[int, float]]] = None
    tokens_per_sample: float = 35.0
    task: Optional[dict] = None
    probe: Optional[dict] = None
    max_failures: int = TRAIN_MAX_FAILURES
    train_storage: Optional[str] = None


SETUP_KEYS = ("t_entered", "t_imported", "t_loaded")
"""Wall-clock marks (``time.time()``) of a trial's fixed cost, in its first report: trainable
entered (the actor is up), torch, transformers and the engine imported, task and model loaded."""


def trial_resources(cand: dict[str, Any]) -> dict[str, float]:
    """The resources of a train-backend trial of ``cand``: a one-worker probe runs in the trial, so the
    trial holds its CPUs and GPUs; a several-worker trial only drives its Train workers."""
    if cand["workers"] > 1:
        return dict(TRIAL_RESOURCES)
    return {"CPU": float(cand["cpus"]), **({"GPU": float(cand["gpus"])} if cand["gpus"] > 0 else {})}


def _report_record(cid: str, record: dict) -> dict[str, Any]:
    """The Tune result of one probe: its record's key figures (the scheduler forecasts from them)."""
    return {
        "candidate": cid,
        TIME_ATTR: int(record["n_samples"]),
        "loss": float(record["test_loss"]),
        "flops": float(record.get("flops") or 0.0),
        "probe_seconds": float(record.get("wall_seconds") or 0.0),
    }


def _record_failure(store: ProbeStore, cid: str, n_samples: Optional[int], reason: str) -> None:
    """Store ``cid``'s ``failed`` decision, unless the scheduler pruned it first: a probe that fails
    after the stop (it started while the stop travelled) does not undo the stop, and the curve
    up to the stop is still ranked."""
    if (read_decision(store, cid) or {}).get("status") != "pruned":
        write_decision(store, cid, "failed", n_samples, reason)


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
        tune.report(_report_record(cid, record))


def probe_loop(loop_config: dict) -> None:
    """Ray Train worker loop (several workers): :func:`run_probes` with this worker's rank."""
    import ray.train

    run_probes(loop_config["ctx"], loop_config["candidate"], ray.train.get_context().get_world_rank(), ray.train.report)


def run_probes(ctx: TrialContext, cid: str, rank: int, report: Callable[[dict], None]) -> None:
    """Load the candidate once, run its remaining probes, ``report`` each (rank 0 stores it).

    The first report carries the :data:`SETUP_KEYS` marks.
    """
    marks = {"t_entered": time.time()}
    import ray
    import torch  # noqa: F401 - imported here so that the mark below times them
    import transformers  # noqa: F401

    from lensray.engine.data import TaskConfig, load_task
    from lensray.engine.parallel import agreed
    from lensray.engine.probe import CollectiveOutOfMemory, ProbeConfig, ProbeRunner

    install_log_redaction()  # a worker process: its log lines are redacted too
    marks["t_imported"] = time.time()
    store = ProbeStore(ctx.store_uri, check=False)
    cand = ctx.candidates[cid]
    # re-read the store: after a worker restart the probes finished before the crash are kept
    losses = {n: float(r["test_loss"]) for n, r in store.completed(cid).items() if is_ok(r)}
    configured = dict(ctx.probe or {})
    settings, hint = memory_settings(store, cid, configured)  # smaller after an out-of-memory restart
    if hint is not None and hint.get("settings") is None:  # out of memory even at micro-batch 1
        if rank == 0:
            _record_failure(store, cid, hint["n_samples"], hint["reason"])
        report({"candidate": cid, "failed": True, "error": hint["reason"], TIME_ATTR: hint["n_samples"]})
        return
    runner = ProbeRunner(cand["model"], TaskConfig(**(ctx.task or {})), ProbeConfig(**settings),
                         trust_remote_code=cand["trust_remote_code"], allow_pickle=cand["allow_pickle"],
                         strategy=cand["strategy"])
    try:
        runner.data = load_task(runner.task)  # first, so that a task error is not blamed on the model
        runner.load()
    except Exception as exc:  # noqa: BLE001 - any load failure makes the candidate failed, not the run
        what = cand["model"] if runner.data is not None else "the task on this worker"
        reason = f"could not load {what}: {' '.join(str(exc).split()) or type(exc).__name__}"
        if rank == 0:
            _record_failure(store, cid, None, reason)
        report({"candidate": cid, "failed": True, "error": reason})
        return
    marks["t_loaded"] = time.time()
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
                  "node_id": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}
        if hint is not None and hint.get("n_samples") == d:  # the attempts before the restart
            record["attempt_log"] = hint["attempt_log"] + record["attempt_log"]
            record["attempts"] = len(record["attempt_log"])
        if result.status != "ok":
            reason = f"probe at D={d} {result.status}: {result.error}"
            if rank == 0:
                _record_failure(store, cid, d, reason)
            report({"candidate": cid, "failed": True, "error": reason, TIME_ATTR: d})
            return
        if rank == 0:
            store.put(cid, record)
        losses[d] = float(result.test_loss)
        metrics = {**_report_record(cid, record), **marks} if rank == 0 else {}
        marks = {}
        report(metrics)


def _release_memory() -> None:
    """Free the finished candidate's memory: collect its objects, return cached GPU blocks."""
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.empty_cache()


def train_trainable(config: dict, ctx: TrialContext) -> None:
    """Tune trainable of the train backend: a one-worker candidate's probes run here, in the trial
    actor; a several-worker candidate's in one TorchTrainer."""
    cid = config["candidate"]
    cand = ctx.candidates[cid]
    if cand["workers"] == 1:
        from ray import tune

        run_probes(ctx, cid, 0, tune.report)
        _release_memory()  # the actor may run the next candidate
        return
    import ray.train
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    for key, value in TRAIN_ENV.items():
        os.environ.setdefault(key, value)  # read here and propagated to the controller and workers
    trainer = TorchTrainer(
        probe_loop,
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
