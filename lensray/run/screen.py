"""A screening from start to finish: plan from the store, run the trials in stages, rank, write.

The store is the source of truth. Stored probes are never run again; candidates whose probes
are all stored, or that were pruned, start no trial; a partly done candidate continues from its
next size; a ``failed`` decision is retried on ``--resume``. Tune keeps its own state under
``<out>/tune`` but is never restored.

A run has one stage, or two with ``pruning.scout`` (:func:`scout_stages`); the second is a
resume of the first.
"""

from __future__ import annotations

import logging
import math
import os
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Literal, Mapping, Optional, Sequence

from lensray.core.curves import Curves
from lensray.core.forecast import Forecast, Forecaster, Stop, zoo_forecaster
from lensray.errors import LensrayInputError, one_line
from lensray.run.callbacks import (
    ForecastMetrics, PlacementGroupReaper, Progress, quiet_tune, ray_output_to, remove_orphan_placement_groups,
    tracking_callbacks, withheld_credentials,
)
from lensray.run.config import ScreenConfig
from lensray.run.ranking import candidate_info, full_tuning, rank
from lensray.run.scheduler import TIME_ATTR, CurvePruner
from lensray.run.store import (
    CandidatePlan, ProbeStore, candidate_key, make_plan, probe_grid, read_decision, replay_gaps, write_decision,
)
from lensray.run.trainables import TrialContext, replay_trainable, train_trainable, trial_resources

log = logging.getLogger(__name__)

Backend = Literal["train", "replay"]
TUNE_MAX_FAILURES = 1
"""Restarts Tune allows a trial whose trainable itself crashed."""


def _init_ray(config: ScreenConfig, store: ProbeStore) -> bool:
    """Connect to (or start) Ray; returns True when this call started it.

    Ray's own output (start-up notices, warnings, messages the cluster pushes) goes to ``ray.log``
    in a local output folder, else to ``lensray-ray-<pid>.log`` in ``$RAY_TMPDIR`` (else the
    temporary folder), not to the user's terminal (:class:`~lensray.run.callbacks.ray_output_to`).
    """
    import ray

    if ray.is_initialized():
        return False
    temp = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir())
    path = store.path("ray.log") if "://" not in store.uri else str(temp / f"lensray-ray-{os.getpid()}.log")
    kwargs: dict[str, Any] = {"log_to_driver": False, "configure_logging": False}
    with ray_output_to(path):
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


def screen(
    config: ScreenConfig,
    out: Optional[str] = None,
    resume: bool = False,
    backend: Backend = "train",
    replay: Optional[Curves] = None,
    progress: bool = True,
    forecaster: Callable[..., Forecaster] = zoo_forecaster,
    tune_loggers: bool = False,
    callbacks: Sequence[Any] = (),
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
    forecaster : callable
        Builds the scheduler's zoo forecaster; called as :func:`~lensray.core.forecast.zoo_forecaster`.
    tune_loggers : bool
        Keep Tune's per-trial result logger files (off: the store holds every result).
    callbacks : sequence of ray.tune.Callback
        More Tune callbacks (trackers), after those of ``config.tracking``; each probe's result
        carries the candidate, ``n_samples``, ``loss``, ``flops`` and, once forecast,
        ``predicted_loss``, ``pred_lo`` and ``pred_hi``.

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
    trackers = [*tracking_callbacks(config.tracking, config.name), *callbacks]  # one that cannot log: before Ray, nothing written
    unavailable = unavailable_sources(config) if backend == "train" else {}
    store.write_text("config.yaml", config.to_yaml())
    for cid, reason in unavailable.items():  # failed before Ray starts; retried by a later --resume
        write_decision(store, cid, "failed", None, reason)
    grid = probe_grid(config, replay)
    started = _init_ray(config, store)
    try:
        import ray

        gaps = replay_gaps(replay, grid)
        run = _Run(config, store, grid, backend, replay, gaps, progress, forecaster, tune_loggers, trackers, t0)
        plans = make_plan(config, store, grid, gaps)
        stages = scout_stages(config, grid, sum(p.needs_trial for p in plans),
                              max_concurrent(config, backend, ray.cluster_resources()))
        failed: set[str] = set(unavailable)
        for k, upto in enumerate(stages):
            if k:  # the store has moved on
                plans = make_plan(config, store, grid, gaps)
            plans = [replace(p, todo=[d for d in p.todo if d <= upto]) for p in plans]
            _run_trials(run, plans, upto, exclude=failed, by_forecast=upto == grid[-1] and len(stages) > 1)
            failed |= {p.candidate.id for p in plans if (read_decision(store, p.candidate.id) or {}).get("status") == "failed"}
    finally:
        if started:
            import ray

            ray.shutdown()
    return finish(config, store, grid, backend, replay, time.perf_counter() - t0)


def unavailable_sources(config: ScreenConfig) -> dict[str, str]:
    """Candidates whose source cannot be had, with the reason (:func:`lensray.engine.models.source_problem`),
    checked in the driver before Ray starts: each is ``failed`` and runs no trial. When no
    candidate can be had, LensrayInputError (exit 2) naming the first: there is nothing to screen."""
    from lensray.engine.models import hub_offline, source_problem

    hub = [c for c in config.zoo if not c.source.startswith("tiny:") and not Path(c.source).expanduser().exists()]
    offline = hub_offline() if hub else False  # once: an unreachable hub costs a connect timeout
    out = {c.id: reason for c in config.zoo
           if (reason := source_problem(c.source, c.trust_remote_code, c.allow_pickle, offline)) is not None}
    for cid, reason in out.items():
        log.warning("candidate %s fails before Ray starts: %s", cid, reason)
    if config.zoo and len(out) == len(config.zoo):
        first = config.zoo[0]
        more = f" (and the {len(out) - 1} other candidate(s))" if len(out) > 1 else ""
        raise LensrayInputError(f"zoo[0].model: {out[first.id]}{more}; no candidate can be loaded")
    return out


def scout_stages(config: ScreenConfig, grid: list[int], candidates: Optional[int] = None,
                 concurrent: Optional[int] = None) -> list[int]:
    """The largest probe size of each stage of the run: ``[scout size, last size]`` or ``[last size]``.

    With ``pruning.scout`` (and pruning on, and a grid longer than the grace) every candidate is
    first probed up to its ``grace_points``-th size D > 0 (the scout stage: nothing can be
    stopped before the grace anyway, and at the grace the usual rule applies); then the
    candidates continue, best predicted first, each judged by the scheduler against the whole
    zoo's early curves, so strong rivals finish early. Without scouting, a candidate that runs
    early has few rivals with forecasts and cannot be stopped, whatever it costs.
    When all ``candidates`` that still need probes run at once (``concurrent`` trials or more),
    no candidate waits for a slot, so there is no order to choose and no scout stage: it would
    only load every candidate twice.
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


@dataclass
class _Run:
    """What every stage of one screening shares."""

    config: ScreenConfig
    store: ProbeStore
    grid: list[int]  # the whole probe grid: the forecasts' columns
    backend: Backend
    replay: Optional[Curves]
    gaps: Mapping[str, set[int]]  # sizes a candidate has no probe for (replay_gaps)
    progress: bool
    make_forecaster: Callable[..., Forecaster]
    tune_loggers: bool
    callbacks: list[Any]
    t0: float  # the run's one clock


def _run_trials(run: _Run, plans: list[CandidatePlan], upto: int, exclude: set[str], by_forecast: bool) -> None:
    """Run one Tune trial per candidate that still needs probes up to ``upto`` (decisions go to the store).

    Candidates in ``exclude`` (failed in an earlier stage) run no trial. With ``by_forecast`` the
    trials start best predicted first (:func:`trial_order`).
    """
    import ray
    from ray import tune

    config, store, grid, backend, replay, gaps = run.config, run.store, run.grid, run.backend, run.replay, run.gaps
    info = candidate_info(config, replay)
    sizes = [d for d in grid if d <= upto]
    ctx = TrialContext(
        store_uri=store.uri, grid=sizes,
        done={p.candidate.id: {n: float(r["test_loss"]) for n, r in p.done.items()} for p in plans},
        candidates=info, tokens_per_sample=config.tokens_per_sample,
        task=config.task.model_dump(mode="json"), probe=config.probe.model_dump(mode="json"),
        train_storage=store.uri_of("train"),
    )
    if replay is not None:
        col = {int(d): j for j, d in enumerate(replay.D)}
        ctx.replay = {cid: {d: float(replay.L[i, col[d]]) for d in grid} for i, cid in enumerate(replay.ids)}
    runs = [p for p in plans if p.needs_trial and p.candidate.id not in exclude]
    running = {p.candidate.id for p in runs}
    states = {p.candidate.id: ("failed" if p.candidate.id in exclude else "pruned" if p.decision else "done")
              for p in plans if p.candidate.id not in running}
    for p in runs:
        previous = read_decision(store, p.candidate.id)
        if previous and previous.get("status") == "failed":
            write_decision(store, p.candidate.id, "retried", None, previous.get("reason", ""))
    forecaster = run.make_forecaster(config.predictor.method, config.predictor.level, grid, config.target_samples,
                                 {c: i["size"] for c, i in info.items()}, {c: i["family"] for c, i in info.items()},
                                 config.pruning.relative)
    todo = trial_order([p.candidate.id for p in runs], info, forecaster(ctx.done) if by_forecast else None)
    spent = sum(float(r.get("flops") or 0.0) for p in plans for r in p.done.values())
    full = full_tuning(config, info, store.get_all() if backend == "train" else [])
    stage = "" if upto >= grid[-1] else f"scout D<={upto:,}: "
    left = {p.candidate.id: sum(p.todo) for p in runs}
    bar = Progress(left, states, run.t0, spent, full, prefix=stage) if run.progress else None

    def on_stop(stop: Stop) -> None:
        write_decision(store, stop.candidate, "pruned", stop.n_samples, stop.reason)
        if bar is not None:
            bar.mark_pruned(stop)

    if not todo:
        return
    last = {p.candidate.id: max((d for d in grid if d not in gaps.get(p.candidate.id, ())), default=grid[-1])
            for p in plans}
    scheduler = CurvePruner(config.pruning.top_k, config.pruning.grace_points, forecaster=forecaster,
                            observed=ctx.done, on_stop=on_stop, last_size=last,
                            prune=config.pruning.enabled)
    if backend == "replay":
        trainable = tune.with_resources(tune.with_parameters(replay_trainable, ctx=ctx), {"cpu": 1})
    else:
        trainable = tune.with_resources(
            tune.with_parameters(train_trainable, ctx=ctx),
            lambda spec: tune.PlacementGroupFactory([trial_resources(info[spec["candidate"]])]))
    tuner = tune.Tuner(
        trainable,
        param_space={"candidate": tune.grid_search(todo)},
        tune_config=tune.TuneConfig(
            scheduler=scheduler,
            max_concurrent_trials=max_concurrent(config, backend, ray.cluster_resources()),
            reuse_actors=True,  # a finished trial's actor (imports done) runs the next candidate
            trial_dirname_creator=_trial_dirname,
            trial_name_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=f"tune-{int(time.time())}",
            storage_path=store.uri_of("tune"),
            failure_config=tune.FailureConfig(max_failures=TUNE_MAX_FAILURES),
            callbacks=[ForecastMetrics(lambda: scheduler.forecasts), *([bar] if bar else []),
                       *([PlacementGroupReaper()] if backend == "train" else []), *run.callbacks],
            verbose=0,
        ),
    )
    with quiet_tune(run.tune_loggers), withheld_credentials():
        results = tuner.fit()
    if backend == "train":
        remove_orphan_placement_groups()  # groups of trials stopped after the reaper's last look
    for res in results:
        cid = (res.config or {}).get("candidate")
        if res.error is not None and cid and (read_decision(store, cid) or {}).get("status") in (None, "retried"):
            write_decision(store, cid, "failed", (res.metrics or {}).get(TIME_ATTR), one_line(res.error, 500))


def _trial_name(trial: Any) -> str:
    """Tune's name of a trial, which trackers give their runs: the candidate's id."""
    return str(trial.config["candidate"])


def _trial_dirname(trial: Any) -> str:
    """Tune's folder of a trial: the candidate's sanitised key (no id reaches a path)."""
    return f"trial-{candidate_key(str(trial.config['candidate']))}"


def finish(config: ScreenConfig, store: ProbeStore, grid: list[int], backend: Backend, replay: Optional[Curves],
           wall_seconds: float) -> dict[str, Any]:
    """Rank the candidates (:func:`~lensray.run.ranking.rank`) and write the outputs.

    ``compute.wall_seconds`` is the wall time of the first run that finished in ``store``; a
    ``--resume`` of a finished run keeps it and appends its own to ``compute.resume_wall_seconds``
    (a run killed before it finished leaves no time behind: its resume starts the count).
    ``output`` is the store's absolute URI.
    """
    from lensray.run.report import predictor_curves, write_report

    earlier = _finished_compute(store)
    selection, selector, curves, records = rank(config, store, grid, backend, replay, wall_seconds)
    if earlier is not None and earlier.get("wall_seconds") is not None:
        selection.compute.wall_seconds = float(earlier["wall_seconds"])
        selection.compute.resume_wall_seconds = [*earlier.get("resume_wall_seconds", []), wall_seconds]
    selection.output = store.uri
    store.write_parquet(records)
    fitted = predictor_curves(selector, curves, config.target_samples)  # the plot shows the ranking's own fits
    write_report(store, selection, records, config.target_samples, fitted=fitted)
    return selection.to_dict()


def _finished_compute(store: ProbeStore) -> Optional[dict]:
    """The ``compute`` of the ``selection.json`` an earlier finished run left in ``store``, if readable."""
    import json

    text = store.read_text("selection.json")
    try:
        compute = json.loads(text)["compute"] if text else None
    except (ValueError, KeyError, TypeError):
        return None
    return compute if isinstance(compute, dict) else None
