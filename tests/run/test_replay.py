"""Replay backend end to end on a local Ray: Tune trials, the pruning scheduler, the store and
the outputs (selection.json schema), on a synthetic zoo and on the shared benchmark tables."""

from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from lensray.core.curves import load_curves_csv
from lensray.run.results import Selection
from lensray.run.screen import screen
from lensray.run.config import replay_config
from lensray.run.store import ProbeStore
from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv

TARGET = 1_638_400


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _replay(csv, out, max_samples, resume=False, concurrent=None):
    config, curves = replay_config(csv, overrides={"storage.path": str(out), "grid.max_samples": max_samples,
                                                   "target_samples": TARGET},
                                   warn=lambda line: print(f"warning: {line}", file=sys.stderr))
    config.ray.max_concurrent_trials = concurrent
    return screen(config, resume=resume, backend="replay", replay=curves, progress=False), curves


def test_replay_synthetic_zoo_end_to_end(ray_local, tmp_path):
    csv = write_curves_csv(synthetic_zoo(16, seed=7), tmp_path / "zoo.csv")
    sel, curves = _replay(csv, tmp_path / "out", 6400)
    Selection.from_dict(sel)  # the selection.json schema
    out = tmp_path / "out"
    assert json.loads((out / "selection.json").read_text())["selected"] == sel["selected"]
    for name in ("report.md", "curves.png", "probes.parquet", "config.yaml"):
        assert (out / name).is_file()
    grid = [0, 200, 400, 800, 1600, 3200, 6400]
    records = ProbeStore(str(out)).get_all()
    by = {}
    for r in records:
        by.setdefault(r["candidate"], []).append(r["n_samples"])
    size = dict(zip(curves.ids, curves.size))
    for e in sel["ranking"]:
        probes = sorted(by[e["candidate"]])
        assert probes == grid[: len(probes)]  # nested, in order, nothing skipped
        assert e["flops"] == pytest.approx(sum(6 * size[e["candidate"]] * 35 * d for d in probes))
        if e["status"] == "pruned":
            assert e["pruned_at"] in probes and "optimistic" in e["reason"] and len(probes) >= 4
        else:
            assert e["status"] == "finished" and probes == grid
    # the scout stage: every candidate's probes up to the grace (D <= 800) start before any larger one
    started = {(r["candidate"], r["n_samples"]): r["started_at"] for r in records}
    assert max(t for (_, d), t in started.items() if d <= 800) <= min(t for (_, d), t in started.items() if d > 800)
    bill = sel["compute"]
    assert bill["flops_full_tuning"] == pytest.approx(sum(6 * s * 35 * TARGET for s in curves.size))
    assert bill["saved_fraction"] == pytest.approx(1 - bill["flops_spent"] / bill["flops_full_tuning"])
    assert sel["selected"] in {e["candidate"] for e in sel["ranking"] if e["status"] == "finished"}


def test_replay_skips_missing_losses_and_bills_only_sized_rows(ray_local, tmp_path, capsys):
    zoo = synthetic_zoo(6, seed=4)
    col = {int(d): j for j, d in enumerate(zoo.D)}
    zoo.L[1, col[1600]] = np.nan  # a missing cell under the budget
    zoo.L[2, col[TARGET]] = np.nan  # beyond it: irrelevant to the replay
    zoo.size[3] = np.nan  # no parameter count
    csv = write_curves_csv(zoo, tmp_path / "zoo.csv")
    sel, _ = _replay(csv, tmp_path / "out", 3200)
    err = capsys.readouterr().err
    assert f"row '{zoo.ids[1]}' column '1600'" in err and "1 loss(es) missing" in err
    assert f"no size for 1 candidate(s) ({zoo.ids[3]})" in err
    Selection.from_dict(sel)  # the selection.json schema
    rows = {e["candidate"]: e for e in sel["ranking"]}
    assert all(e["status"] != "failed" for e in sel["ranking"])  # a hole is not a failure
    probes = {(r["candidate"], r["n_samples"]) for r in ProbeStore(str(tmp_path / "out")).get_all()}
    assert (zoo.ids[1], 1600) not in probes
    if rows[zoo.ids[1]]["status"] == "finished":
        assert rows[zoo.ids[1]]["n_probes"] == 5 and (zoo.ids[1], 3200) in probes
    bill = sel["compute"]
    assert bill["uncharged"] == [zoo.ids[3]] and rows[zoo.ids[3]]["flops"] == 0
    sized = [i for i in range(6) if i != 3]
    assert bill["flops_full_tuning"] == pytest.approx(sum(6 * zoo.size[i] * 35 * TARGET for i in sized))
    assert "Not in the bill" in (tmp_path / "out" / "report.md").read_text()
    again, _ = _replay(csv, tmp_path / "out", 3200, resume=True)  # the hole is not owed: nothing reruns
    assert len(ProbeStore(str(tmp_path / "out")).get_all()) == len(probes)
    assert again["selected"] == sel["selected"]


def test_replay_refuses_a_used_output_without_resume(ray_local, tmp_path):
    from lensray.errors import LensrayInputError

    csv = write_curves_csv(synthetic_zoo(4, seed=2), tmp_path / "zoo.csv")
    _replay(csv, tmp_path / "out", 1600)
    with pytest.raises(LensrayInputError, match="--resume"):
        _replay(csv, tmp_path / "out", 1600)
    again, _ = _replay(csv, tmp_path / "out", 1600, resume=True)  # nothing left to run
    assert again["selected"] is not None


@pytest.mark.slow
@pytest.mark.parametrize("table", ["flan", "wmt19"])
def test_replay_benchmark_tables_keep_the_best(ray_local, benchmarks_dir, tmp_path, table):
    # one trial at a time: the order of reports, and so every decision, is deterministic (with
    # several at once it depends on timing; benchmarks/replay_scale.py orderings measures that)
    sel, _ = _replay(benchmarks_dir / f"{table}.csv", tmp_path / table, 25600, concurrent=1)
    Selection.from_dict(sel)  # the selection.json schema
    full = load_curves_csv(benchmarks_dir / f"{table}.csv")
    true = full.loss_at(TARGET)
    best = full.ids[int(np.argmin(true))]
    status = {e["candidate"]: e["status"] for e in sel["ranking"]}
    assert status[best] == "finished"  # pruning safety on both tables at r = 64
    assert sel["compute"]["saved_fraction"] > 0.96
    print(table, sel["selected"], sel["compute"]["saved_fraction"], file=sys.stderr)


def test_hostile_candidate_ids_stay_inside_the_output(ray_local, tmp_path):
    zoo = synthetic_zoo(3, seed=9)
    zoo.ids = ["../../escape", "/abs/path", "ok"]
    csv = write_curves_csv(zoo, tmp_path / "zoo.csv")
    out = tmp_path / "nested" / "out"
    sel, _ = _replay(csv, out, 1600)
    assert {e["candidate"] for e in sel["ranking"]} == set(zoo.ids)
    outside = {p for p in tmp_path.rglob("*") if out not in p.parents and p != out}
    assert outside == {tmp_path / "zoo.csv", tmp_path / "nested"}
    assert not (tmp_path / "escape").exists() and not any(".." in p.name for p in out.rglob("*"))


def test_replay_with_a_config_applies_its_settings(ray_local, tmp_path):
    from lensray.cli.main import main

    csv = write_curves_csv(synthetic_zoo(12, seed=5), tmp_path / "zoo.csv")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("pruning: {enabled: false}\npredictor: {method: rectified}\n")
    code = main(["screen", str(cfg), "--replay", str(csv), "--max-samples", "3200", "--out", str(tmp_path / "o")])
    sel = json.loads((tmp_path / "o" / "selection.json").read_text())
    assert code == 0 and sel["predictor"] == "rectified"
    assert len(sel["ranking"]) == 12 and all(e["status"] == "finished" for e in sel["ranking"])
