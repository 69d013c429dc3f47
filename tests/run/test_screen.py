"""Screening pieces that need no Ray: CLI validation before any Ray work, the resume plan,
decisions, the zoo forecaster, the driver's ranking and compute bill, exit codes."""

from __future__ import annotations

import json
import math
import time

import numpy as np
import pytest

from lensray.cli.main import main
from lensray.run.config import load_config
from lensray.core.forecast import zoo_forecaster
from lensray.run.screen import finish, max_concurrent
from lensray.run.store import make_plan, read_decision, write_decision
from lensray.cli.screen import ALL_FAILED, summarise
from lensray.run.store import ProbeStore
from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv

TARGET = 1_638_400


@pytest.fixture()
def zoo_csv(tmp_path):
    return write_curves_csv(synthetic_zoo(6, seed=3), tmp_path / "zoo.csv")


def _no_ray() -> bool:
    import ray

    return not ray.is_initialized()


@pytest.mark.parametrize(
    "argv, field",
    [
        (["--max-samples", "1638400", "--target-samples", "1638400"], "max_samples"),
        (["--target-samples", "1638400"], "--max-samples"),
        (["--max-samples", "400", "--target-samples", "1638400"], "budget"),
    ],
)
def test_replay_bad_arguments_fail_before_ray(zoo_csv, tmp_path, capsys, argv, field):
    code = main(["screen", "--replay", str(zoo_csv), "--out", str(tmp_path / "out"), *argv])
    err = capsys.readouterr().err
    assert code == 2 and field in err and len(err.strip().splitlines()) == 1
    assert _no_ray()


def test_replay_csv_without_candidate_column(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("model,0,200,400,800\nx,3,2,1.5,1.2\n")
    assert main(["screen", "--replay", str(bad), "--max-samples", "800", "--out", str(tmp_path / "o")]) == 2
    assert "config name" in capsys.readouterr().err and _no_ray()


def test_config_errors_fail_before_ray(tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("name: x\nzoo: []\n")
    assert main(["screen", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "zoo" in capsys.readouterr().err and _no_ray()
    cfg.write_text("name: x\ngird: {}\n")
    assert main(["screen", str(cfg), "--out", str(tmp_path / "o")]) == 2
    assert "did you mean 'grid'" in capsys.readouterr().err


def test_replay_zoo_candidate_missing_from_table(zoo_csv, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("zoo: [{id: synth-0000}, {id: not-in-table}]\n")
    code = main(["screen", str(cfg), "--replay", str(zoo_csv), "--max-samples", "3200", "--out", str(tmp_path / "o")])
    assert code == 2 and "not-in-table" in capsys.readouterr().err


def _config(tmp_path, ids=("a", "b", "c")):
    return load_config({"zoo": [{"id": i, "size": 1e8} for i in ids], "storage": {"path": str(tmp_path / "o")},
                        "grid": {"start": 200, "max_samples": 1600}, "target_samples": TARGET,
                        "task": {"source": "synthetic"}}, check_task=False)


def test_plan_skips_stored_probes_and_pruned_candidates(tmp_path):
    config = _config(tmp_path)
    store = ProbeStore(str(tmp_path / "o"))
    grid = config.grid_sizes()
    for d in grid:
        store.put("a", {"n_samples": d, "status": "ok", "test_loss": 2.0})
    for d in grid[:3]:
        store.put("b", {"n_samples": d, "status": "ok", "test_loss": 2.0})
    store.put("c", {"n_samples": 0, "status": "ok", "test_loss": 3.0})
    write_decision(store, "c", "pruned", 0, "hand-made")
    plans = {p.candidate.id: p for p in make_plan(config, store, grid)}
    assert not plans["a"].needs_trial and plans["a"].todo == []
    assert plans["b"].todo == grid[3:] and plans["b"].needs_trial
    assert not plans["c"].needs_trial and plans["c"].decision["reason"] == "hand-made"


def test_failed_decision_is_retried_on_resume(tmp_path):
    config = _config(tmp_path)
    store = ProbeStore(str(tmp_path / "o"))
    write_decision(store, "b", "failed", None, "could not load")
    plans = {p.candidate.id: p for p in make_plan(config, store, config.grid_sizes())}
    assert plans["b"].needs_trial and plans["b"].decision is None
    assert read_decision(store, "b")["status"] == "failed"


def test_decision_of_another_candidate_is_ignored(tmp_path):
    store = ProbeStore(str(tmp_path / "o"))
    write_decision(store, "a", "pruned", 800, "x")
    from lensray.run.store import decision_name

    store.write_text(decision_name("b"), json.dumps({"candidate": "a", "status": "pruned"}))
    assert read_decision(store, "b") is None and read_decision(store, "a")["n_samples"] == 800


def test_zoo_forecaster_uses_every_curve():
    zoo = synthetic_zoo(8, seed=1).budget(6400)
    grid = [int(d) for d in zoo.D]
    observed = {cid: {d: float(zoo.L[i, j]) for j, d in enumerate(grid)} for i, cid in enumerate(zoo.ids)}
    observed["synth-0007"] = {d: observed["synth-0007"][d] for d in grid[:4]}
    fc = zoo_forecaster("lensray", 0.9, grid, TARGET, {}, {})(observed)
    assert set(fc) == set(zoo.ids)
    short = fc["synth-0007"]
    assert short.points == 3 and short.n_samples == 800
    assert all(math.isfinite(f.lo) and f.lo <= f.loss <= f.hi for f in fc.values())


def test_a_calibration_on_two_long_curves_stops_no_one(benchmarks_dir):
    """The report order that made CI stop FLAN's true best at r = 64: every candidate scouted to
    3 points, opt-1.3b at its 4th, Cerebras-GPT-2.7B alone far ahead at 7. The error spreads
    then rest on two curves, and the small-sample widening keeps opt-1.3b (it was stopped on a
    log gap of 0.161 against a half-width of 0.160 before)."""
    from lensray.core.curves import load_curves_csv
    from lensray.core.forecast import difference_interval, prune_decision

    full = load_curves_csv(benchmarks_dir / "flan.csv")
    grid = [int(d) for d in full.D if d <= 25600]
    col = {int(d): j for j, d in enumerate(full.D)}
    best, rival = "facebook/opt-1.3b", "cerebras/Cerebras-GPT-2.7B"
    reach = {best: 1600, rival: 12800}
    observed = {c: {d: float(full.L[i, col[d]]) for d in grid if d <= reach.get(c, 800)}
                for i, c in enumerate(full.ids)}
    fc = zoo_forecaster("lensray", 0.9, grid, TARGET, dict(zip(full.ids, full.size)), {})(observed)
    assert fc[best].points == 4 and fc[rival].points == 7
    gap, half = difference_interval(fc[rival], fc[best])
    assert gap > 0.15 and half > 1.5 * gap  # the rival leads, but the calibration is thin
    assert prune_decision(fc[best], fc.values()) is None


def test_max_concurrent_follows_resources(tmp_path):
    config = _config(tmp_path)
    assert max_concurrent(config, "replay", {"CPU": 2.0}) == 2
    assert max_concurrent(config, "train", {"CPU": 2.0}) == 2
    gpu = load_config({"zoo": [{"id": "a", "gpus": 1, "workers": 2}], "task": {"source": "synthetic"}},
                      check_task=False)
    assert max_concurrent(gpu, "train", {"CPU": 64.0, "GPU": 8.0}) == 4
    gpu.ray.max_concurrent_trials = 3  # the config's cap wins over the cluster's resources
    assert max_concurrent(gpu, "train", {"CPU": 64.0, "GPU": 8.0}) == 3


def test_finish_ranks_bills_and_writes_outputs(tmp_path):
    config = _config(tmp_path, ids=("good", "bad", "cut", "broken"))
    store = ProbeStore(str(tmp_path / "o"))
    grid = config.grid_sizes()
    zoo = synthetic_zoo(3, seed=5)
    col = {int(d): j for j, d in enumerate(zoo.D)}
    for i, cid in enumerate(("good", "bad", "cut")):
        for d in grid if cid != "cut" else grid[:4]:
            store.put(cid, {"n_samples": d, "status": "ok", "test_loss": float(zoo.L[i, col[d]]) * (1 + i),
                            "flops": 6 * 1e8 * 35 * d, "wall_seconds": 0.1})
    write_decision(store, "cut", "pruned", 800, "stopped after the probe at D=800: hand-made")
    write_decision(store, "broken", "failed", None, "could not load broken: no such model")
    sel = finish(config, store, grid, "replay", None, 1.0)
    status = {e["candidate"]: e["status"] for e in sel["ranking"]}
    assert status == {"good": "finished", "bad": "finished", "cut": "pruned", "broken": "failed"}
    assert [e["candidate"] for e in sel["ranking"]][-1] == "broken"
    assert sel["selected"] == sel["ranking"][0]["candidate"]
    spent = 6 * 1e8 * 35 * (2 * sum(grid) + sum(grid[:4]))
    assert sel["compute"]["flops_spent"] == pytest.approx(spent)
    assert sel["compute"]["flops_full_tuning"] == pytest.approx(4 * 6 * 1e8 * 35 * TARGET)
    on_disk = json.loads((tmp_path / "o" / "selection.json").read_text())
    assert on_disk["selected"] == sel["selected"]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "hand-made" in report and "no such model" in report
    # the finished candidate that was not selected: why the rule never stopped it, in the report
    other = next(e for e in sel["ranking"] if e["status"] == "finished" and e["candidate"] != sel["selected"])
    assert other["reason"].startswith(("never confidently worse than", "confidently worse than"))
    assert sel["selected"] in other["reason"]
    assert "## Why the others ran to the end" in report and other["reason"] in report
    assert "log gap" in other["reason"]  # lensray forecasts carry the error split
    for name in ("probes.parquet", "curves.png"):
        assert (tmp_path / "o" / name).stat().st_size > 0


def test_finishers_are_explained_on_marginal_intervals_without_an_error_split(tmp_path):
    """A predictor without the error split (rectified law): the finished candidates' reasons
    compare the marginal interval ends; with pruning off they say so."""
    zoo = synthetic_zoo(4, seed=2)
    col = {int(d): j for j, d in enumerate(zoo.D)}
    for method, pruning, expect in (("rectified", True, "optimistic end"), ("lensray", False, "pruning is off")):
        out = tmp_path / f"{method}-{pruning}"
        config = load_config({"storage": {"path": str(out)}, "predictor": {"method": method},
                              "pruning": {"enabled": pruning}, "grid": {"start": 200, "max_samples": 6400},
                              "zoo": [{"id": cid, "size": 1e8} for cid in zoo.ids]}, check_task=False)
        store, grid = ProbeStore(str(out)), config.grid_sizes()
        for i, cid in enumerate(zoo.ids):
            for d in grid:
                store.put(cid, {"n_samples": d, "status": "ok", "test_loss": float(zoo.L[i, col[d]]), "flops": 1.0})
        sel = finish(config, store, grid, "replay", None, 1.0)
        reasons = [e["reason"] for e in sel["ranking"] if e["status"] == "finished" and e["candidate"] != sel["selected"]]
        assert len(reasons) == 3 and all(expect in r for r in reasons), reasons


def test_summary_exit_codes(capsys):
    row = {"candidate": "a", "status": "failed", "predicted_loss": None, "error": "boom"}
    bill = {"flops_spent": 0.0, "flops_full_tuning": 0.0, "saved_fraction": None, "wall_seconds": 1.0}
    assert summarise({"selected": None, "ranking": [row], "compute": bill}, "out") == ALL_FAILED == 3
    ok = {**row, "candidate": "b", "status": "finished", "predicted_loss": 1.0, "error": None}
    assert summarise({"selected": "b", "ranking": [ok, row], "compute": bill}, "out") == 0
    err = capsys.readouterr().err
    assert "warning: candidate a failed: boom" in err


def test_trial_order_puts_large_known_sizes_first():
    from lensray.run.screen import trial_order

    info = {"a": {"size": 1e8}, "b": {"size": None}, "c": {"size": 7e9}, "d": {"size": 1e8}}
    assert trial_order(["a", "b", "c", "d"], info) == ["c", "a", "d", "b"]


def test_trial_order_after_scouting_puts_the_best_predicted_first():
    from lensray.core.forecast import Forecast
    from lensray.run.screen import trial_order

    info = {"a": {"size": 1e8}, "b": {"size": None}, "c": {"size": 7e9}, "d": {"size": 1e8}}
    casts = {"a": Forecast("a", 800, 3, 1.2, math.nan, math.nan), "b": Forecast("b", 800, 3, 0.9, math.nan, math.nan),
             "d": Forecast("d", 800, 3, math.nan, math.nan, math.nan)}
    # no forecast or a NaN one: after the others, largest first
    assert trial_order(["a", "b", "c", "d"], info, casts) == ["b", "a", "c", "d"]


@pytest.mark.parametrize(
    "pruning, max_samples, stages",
    [
        ({}, 6400, [800, 6400]),
        ({"grace_points": 4}, 6400, [1600, 6400]),
        ({"scout": False}, 6400, [6400]),
        ({"enabled": False}, 6400, [6400]),
        ({}, 800, [800]),  # nothing beyond the grace: one stage
    ],
)
def test_scout_stages(pruning, max_samples, stages):
    from lensray.run.screen import scout_stages

    config = load_config({"zoo": [{"id": "a"}], "pruning": pruning, "target_samples": TARGET,
                          "grid": {"start": 200, "max_samples": max_samples}})
    assert scout_stages(config, config.grid_sizes()) == stages
    assert scout_stages(config, config.grid_sizes(), candidates=5, concurrent=2) == stages
    # every candidate runs at once: no queue, no order to choose, no scout stage
    assert scout_stages(config, config.grid_sizes(), candidates=4, concurrent=4) == stages[-1:]


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_train_workers_train_data_parallel(tmp_path, strategy):
    """A candidate with workers: 2 runs its probes data-parallel (each optimiser step's samples
    split over the ranks, gradients averaged): the same optimiser steps, tokens and loss as one
    process with the same batch (each rank trains on its share of every step, not of a shard);
    with fsdp the parameters are sharded over the two ranks, with the same result."""
    from lensray.engine.data import TaskConfig
    from lensray.engine.probe import ProbeConfig, ProbeRunner
    from lensray.run.screen import screen

    task = {"source": "synthetic", "max_length": 64, "test_size": 64, "validation_size": 16}
    probe = {"learning_rate": 1.0e-3, "epochs": 1, "micro_batch": 8, "device": "cpu", "eval_batch": 64}
    model = "tiny:gpt2:n_layer=2,n_embd=64,pretrain=10"
    config = load_config({"ray": {"num_cpus": 2, "num_gpus": 0}, "target_samples": 51200,
                          "grid": {"start": 200, "max_samples": 800}, "pruning": {"enabled": False},
                          "zoo": [{"id": "ddp", "model": model, "workers": 2, "cpus": 1, "strategy": strategy}],
                          "task": task, "probe": probe, "storage": {"path": str(tmp_path / "o")}})
    sel = screen(config, progress=False)
    assert sel["selected"] == "ddp" and sel["ranking"][0]["status"] == "finished"
    records = {r["n_samples"]: r for r in ProbeStore(str(tmp_path / "o")).get_all()}
    single = ProbeRunner(model, TaskConfig(**task), ProbeConfig(**probe))
    for d in (200, 800):
        one = single.run(d)
        assert records[d]["steps"] == one.steps
        assert records[d]["tokens"] == one.tokens
        assert records[d]["flops"] == pytest.approx(one.flops)
        assert records[d]["test_loss"] == pytest.approx(one.test_loss, rel=1e-4)


def test_memory_hints_after_out_of_memory_inside_a_collective(tmp_path):
    from lensray.engine.probe import CollectiveOutOfMemory
    from lensray.run.store import memory_settings, read_decision, record_collective_oom

    store = ProbeStore(str(tmp_path / "o"))
    probe = {"micro_batch": 8, "grad_accum": 1, "eval_batch": 64, "learning_rate": 1e-3}
    assert memory_settings(store, "m", probe) == (probe, None)
    first = CollectiveOutOfMemory(800, 8, 1, 64, [{"outcome": "oom", "micro_batch": 8}], "injected")
    hint = record_collective_oom(store, "m", first, probe, None)
    settings, read = memory_settings(store, "m", probe)
    assert settings == {**probe, "micro_batch": 4, "grad_accum": 2, "eval_batch": 32} and read == hint
    assert memory_settings(store, "other", probe) == (probe, None)
    assert memory_settings(store, "m", {**probe, "micro_batch": 2}) == ({**probe, "micro_batch": 2}, None)
    # restarted at 4, out of memory again in the same probe, ... down to micro-batch 1: failed
    last = CollectiveOutOfMemory(800, 1, 8, 8, [{"outcome": "oom", "micro_batch": 1}], "injected")
    final = record_collective_oom(store, "m", last, probe, hint)
    assert [a["micro_batch"] for a in final["attempt_log"]] == [8, 1] and final["settings"] is None
    assert memory_settings(store, "m", probe) == (probe, final)
    decision = read_decision(store, "m")
    assert decision["status"] == "failed" and decision["n_samples"] == 800
    assert "nothing smaller to retry with" in decision["reason"]


@pytest.mark.slow
def test_out_of_memory_inside_a_collective_restarts_the_worker_group_smaller(tmp_path, monkeypatch):
    """Rank 1 runs out of memory inside DDP's synchronising backward pass at micro-batch 8: it
    stores the smaller settings and raises, Ray Train tears the group down and restarts it, and
    the probe runs at micro-batch 4 with the same result as one process retrying in place; the
    record keeps both attempts."""
    from lensray.engine.data import TaskConfig
    from lensray.engine.probe import FaultInjector, ProbeConfig, ProbeRunner
    from lensray.run.screen import screen
    from lensray.run.store import memory_hint_name

    task = {"source": "synthetic", "max_length": 64, "test_size": 64, "validation_size": 16}
    probe = {"learning_rate": 1.0e-3, "epochs": 1, "micro_batch": 8, "device": "cpu", "eval_batch": 64}
    model = "tiny:gpt2:n_layer=2,n_embd=64,pretrain=10"
    monkeypatch.setenv("LENSRAY_FAULTS", "collective_oom_above=4,ranks=1")  # inherited by the local Ray's workers
    config = load_config({"ray": {"num_cpus": 2, "num_gpus": 0}, "target_samples": 51200,
                          "grid": {"start": 100, "max_samples": 400}, "pruning": {"enabled": False},
                          "zoo": [{"id": "ddp", "model": model, "workers": 2, "cpus": 1}],
                          "task": task, "probe": probe, "storage": {"path": str(tmp_path / "o")}})
    start = time.monotonic()
    sel = screen(config, progress=False)
    assert time.monotonic() - start < 600  # not the process group's 30-minute timeout
    assert sel["selected"] == "ddp" and sel["ranking"][0]["status"] == "finished"
    store = ProbeStore(str(tmp_path / "o"))
    records = {r["n_samples"]: r for r in store.get_all()}
    assert [(a["outcome"], a["micro_batch"], a["grad_accum"]) for a in records[100]["attempt_log"]] == [
        ("oom", 8, 1), ("ok", 4, 2)]
    assert records[100]["attempts"] == 2
    for d in (200, 400):  # the later probes keep the smaller settings
        assert [(a["outcome"], a["micro_batch"]) for a in records[d]["attempt_log"]] == [("ok", 4)]
    hint = json.loads(store.read_text(memory_hint_name("ddp")))
    assert hint["settings"] == {"micro_batch": 4, "grad_accum": 2, "eval_batch": 32}
    monkeypatch.delenv("LENSRAY_FAULTS")
    one = ProbeRunner(model, TaskConfig(**task), ProbeConfig(**probe), faults=FaultInjector(oom_above=4))
    for d in (100, 400):
        ref = one.run(d)
        assert records[d]["steps"] == ref.steps and records[d]["tokens"] == ref.tokens
        assert records[d]["test_loss"] == pytest.approx(ref.test_loss, rel=1e-4)


def test_predictor_level_scales_the_intervals_in_log_space():
    from lensray.core.selection import get_selector

    zoo = synthetic_zoo(10, seed=2).budget(12800)
    at90 = get_selector("lensray", 0.9).predict(zoo, TARGET)
    at50 = get_selector("lensray", 0.5).predict(zoo, TARGET)
    assert np.allclose(at50.loss, at90.loss)
    ratio = np.log(at50.hi / at50.loss) / np.log(at90.hi / at90.loss)
    assert np.allclose(ratio, 0.6745 / 1.6449, rtol=1e-3)
    assert np.all(at50.lo > at90.lo) and np.all(at50.hi < at90.hi)


@pytest.mark.slow
def test_train_backend_prunes_and_a_stopped_trial_frees_its_workers(tmp_path):
    """One CPU, so candidates run one after the other: the weak one is stopped early against the
    strong one, and the next candidate can only start once the stopped trial's Train workers
    (and their placement group) are gone."""
    from lensray.run.screen import screen

    tiny = "tiny:{}:n_layer={},n_embd={},pretrain={}"
    config = load_config({
        "ray": {"num_cpus": 1, "num_gpus": 0}, "target_samples": 51200,
        "grid": {"start": 200, "max_samples": 3200}, "predictor": {"method": "ats"},
        # strong runs to the end first, then weak1 is stopped at its grace (top 1: one rival suffices)
        "pruning": {"scout": False, "top_k": 1},
        "zoo": [{"id": "strong", "model": tiny.format("llama", 2, 64, 40)},
                {"id": "weak1", "model": tiny.format("gpt2", 1, 16, 0)},
                {"id": "weak2", "model": tiny.format("opt", 1, 16, 0)}],
        "task": {"source": "synthetic", "max_length": 64, "test_size": 64, "validation_size": 16},
        "probe": {"learning_rate": 1.0e-3, "epochs": 1, "micro_batch": 16, "device": "cpu", "eval_batch": 64},
        "storage": {"path": str(tmp_path / "o")}})
    sel = screen(config, progress=False)
    rows = {e["candidate"]: e for e in sel["ranking"]}
    assert sel["selected"] == "strong" and rows["strong"]["status"] == "finished"
    assert rows["weak1"]["status"] == "pruned" and rows["weak1"]["pruned_at"] < 3200
    assert rows["weak1"]["n_probes"] < 6 and "optimistic" in rows["weak1"]["reason"]
    assert rows["weak2"]["status"] in ("finished", "pruned") and rows["weak2"]["n_probes"] >= 4
