"""Injected faults, with pruning on (the default): a driver SIGKILLed mid-run and resumed, a
candidate that cannot be loaded, the process running its probes killed mid-run, probes that diverge or run
out of memory, and every candidate failing. Each screening runs in a subprocess with its own
local Ray, so that the test can kill it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from lensray.cli.screen import ALL_FAILED
from lensray.run.store import ProbeStore, candidate_key
from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv

pytestmark = pytest.mark.slow
TARGET = 1_638_400
GOOD_MODEL = "tiny:gpt2:n_layer=2,n_embd=64,pretrain=10"
TASK = {"source": "synthetic", "max_length": 64, "test_size": 64, "validation_size": 16}
PROBE_PROCESSES = ("ImplicitFunc", "RayTrainWorker")  # a trial actor (one-worker probes), a Train worker
PROBE = {"learning_rate": 1.0e-3, "epochs": 1, "micro_batch": 16, "device": "cpu", "eval_batch": 64}


def _start(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "lensray", "screen", *args], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True)


def _files(out: Path) -> dict[str, bytes]:
    return {str(p.relative_to(out)): p.read_bytes() for p in (out / "probes").rglob("*.json")}


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 240.0) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, "the screening ended before the fault could be injected"
        assert time.monotonic() < end, "timed out waiting to inject the fault"
        time.sleep(0.02)


def test_driver_killed_then_resumed_repeats_and_loses_nothing(tmp_path):
    csv = write_curves_csv(synthetic_zoo(30, seed=11), tmp_path / "zoo.csv")
    common = ["--replay", str(csv), "--max-samples", "6400", "--target-samples", str(TARGET)]
    ref = _start([*common, "--out", str(tmp_path / "ref")], tmp_path / "ref.log")
    assert ref.wait(timeout=300) == 0, (tmp_path / "ref.log").read_text()

    out = tmp_path / "run"
    proc = _start([*common, "--out", str(out)], tmp_path / "run.log")
    _wait_for(lambda: (out / "probes").is_dir() and sum(1 for _ in (out / "probes").rglob("*.json")) >= 25, proc)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not (out / "selection.json").exists()  # killed mid-run
    before = _files(out)

    resumed = _start([*common, "--out", str(out), "--resume"], tmp_path / "resume.log")
    assert resumed.wait(timeout=300) == 0, (tmp_path / "resume.log").read_text()
    after = _files(out)
    assert all(after[name] == data for name, data in before.items())  # no probe repeated, none lost
    selection = json.loads((out / "selection.json").read_text())
    reference = json.loads((tmp_path / "ref" / "selection.json").read_text())
    assert selection["selected"] == reference["selected"]
    grid = [0, 200, 400, 800, 1600, 3200, 6400]
    records = ProbeStore(str(out)).get_all()
    for e in selection["ranking"]:
        sizes = sorted(r["n_samples"] for r in records if r["candidate"] == e["candidate"])
        assert sizes == grid[: len(sizes)]
        assert e["status"] in ("finished", "pruned") and (e["status"] == "pruned" or sizes == grid)


@pytest.fixture(scope="module")
def faulty_run(tmp_path_factory):
    """One train-backend screening: a candidate that cannot load, and a worker killed mid-run."""
    import yaml

    tmp = tmp_path_factory.mktemp("faults")
    config = {
        "name": "faults", "ray": {"num_cpus": 2, "num_gpus": 0}, "target_samples": 51200,
        "grid": {"start": 200, "factor": 2, "max_samples": 1600, "zero_shot": True},
        "zoo": [{"id": "good", "model": GOOD_MODEL}, {"id": "missing", "model": str(tmp / "no-such-model")}],
        "task": TASK, "probe": PROBE,
    }
    (tmp / "faults.yaml").write_text(yaml.safe_dump(config))
    out = tmp / "out"
    proc = _start([str(tmp / "faults.yaml"), "--out", str(out)], tmp / "run.log")
    first = out / "probes" / candidate_key("good") / "200.json"
    _wait_for(first.exists, proc)
    workers = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if any(name in " ".join(p.cmdline()) for name in PROBE_PROCESSES)]
    before = _files(out)
    for worker in workers:
        worker.kill()
    code = proc.wait(timeout=400)
    return {"code": code, "log": (tmp / "run.log").read_text(), "out": out, "before": before,
            "killed": len(workers), "config": config}


def test_unloadable_candidate_fails_and_the_others_finish(faulty_run):
    assert faulty_run["code"] == 0, faulty_run["log"]
    selection = json.loads((faulty_run["out"] / "selection.json").read_text())
    rows = {e["candidate"]: e for e in selection["ranking"]}
    assert rows["missing"]["status"] == "failed" and "could not load" in rows["missing"]["error"]
    assert rows["good"]["status"] == "finished" and selection["selected"] == "good"
    assert "warning: candidate missing failed" in faulty_run["log"]
    assert "could not load" in (faulty_run["out"] / "report.md").read_text()


def test_killed_worker_is_retried_without_repeating_probes(faulty_run):
    from lensray.engine.data import TaskConfig
    from lensray.engine.probe import ProbeConfig, ProbeRunner

    assert faulty_run["killed"] >= 1
    after = _files(faulty_run["out"])
    assert all(after[name] == data for name, data in faulty_run["before"].items())
    records = {r["n_samples"]: r for r in ProbeStore(str(faulty_run["out"])).get_all() if r["candidate"] == "good"}
    assert sorted(records) == [0, 200, 400, 800, 1600]
    # the same losses as an undisturbed run with the same seed
    runner = ProbeRunner(GOOD_MODEL, TaskConfig(**TASK), ProbeConfig(**PROBE))
    for d in (400, 1600):
        assert runner.run(d).test_loss == pytest.approx(records[d]["test_loss"], rel=1e-6)


@pytest.mark.parametrize("pruning", [True, False], ids=["pruning", "no-pruning"])
def test_diverging_probes_fail_their_candidates_and_exit_nonzero_when_all_fail(tmp_path, pruning):
    import yaml

    config = {
        "ray": {"num_cpus": 2, "num_gpus": 0}, "target_samples": 51200,
        "grid": {"start": 200, "factor": 2, "max_samples": 800, "zero_shot": True},
        "zoo": [{"id": "a", "model": GOOD_MODEL}, {"id": "b", "model": GOOD_MODEL.replace("n_embd=64", "n_embd=32")}],
        "task": TASK, "probe": PROBE, "pruning": {"enabled": pruning},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = tmp_path / "out"
    env = {**os.environ, "LENSRAY_FAULTS": "nan_at_step=1"}  # every attempt of every probe diverges
    done = subprocess.run([sys.executable, "-m", "lensray", "screen", str(tmp_path / "c.yaml"), "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == ALL_FAILED, done.stdout[-2000:] + done.stderr[-2000:]
    assert f"error: every candidate failed (2 of 2; reasons above and in report.md); outputs in {out}\n" in done.stderr
    selection = json.loads((out / "selection.json").read_text())
    for row in selection["ranking"]:
        assert row["status"] == "failed" and "D=200 diverged" in row["error"] and "learning rate" in row["error"]
    stored = ProbeStore(str(out)).get_all()
    assert sorted(r["n_samples"] for r in stored) == [0, 0]  # zero-shot kept; no diverged probe stored as a result
    assert "D=200 diverged" in (out / "report.md").read_text()  # the outputs are written all the same


def _left_running(pid: int, grace: float = 30.0) -> list[str]:
    """Processes of the session a screening subprocess led (its Ray included) still alive ``grace``
    seconds after it exited (Ray's own processes take a few seconds to go)."""
    procs = []
    for p in psutil.process_iter(["pid"]):
        try:
            if os.getsid(p.pid) == pid:
                procs.append(p)
        except (ProcessLookupError, psutil.Error):
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    left = []
    for p in alive:
        try:
            if p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline())[:120])
        except psutil.Error:
            pass
    return left


def _corrupt_folder(root: Path) -> Path:
    """A model folder that passes the driver's checks (config, safetensors name) but cannot load."""
    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 1, "n_embd": 32, "n_head": 4}))
    (root / "model.safetensors").write_bytes(b"not a safetensors file")
    return root


@pytest.fixture(scope="module")
def pruned_faults(tmp_path_factory):
    """One screening with pruning on in which each fault is injected once: an OOM that is retried at a
    smaller micro-batch, a diverging probe, an OOM even at micro-batch 1, weights that cannot load
    in the worker, and a hub id that is not cached while offline; then a --resume of it."""
    import yaml

    tmp = tmp_path_factory.mktemp("pruned-faults")
    good, nan, oom = "tiny:gpt2:n_layer=2", "tiny:gpt2:n_layer=1", "tiny:gpt2:n_embd=32"
    config = {
        "name": "pruned-faults", "ray": {"num_cpus": 2, "num_gpus": 0}, "target_samples": 51200,
        "grid": {"start": 200, "factor": 2, "max_samples": 800, "zero_shot": True},
        "zoo": [{"id": "good", "model": good}, {"id": "nan", "model": nan}, {"id": "oom", "model": oom},
                {"id": "corrupt", "model": str(_corrupt_folder(tmp / "corrupt"))},
                {"id": "hub", "model": "nonexistent-org/no-model"}],
        "task": TASK, "probe": PROBE,  # pruning: the default (on)
    }
    (tmp / "c.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "LENSRAY_FAULTS": f"model={good},oom_above=8;model={nan},nan_at_step=1;model={oom},oom_above=0"}
    out, runs = tmp / "out", {}
    for name, extra in (("first", []), ("resume", ["--resume"])):
        with open(tmp / f"{name}.log", "w") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "lensray", "screen", str(tmp / "c.yaml"), "--out", str(out),
                                     *extra], stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            code = proc.wait(timeout=400)
        runs[name] = {"code": code, "log": (tmp / f"{name}.log").read_text(), "left": _left_running(proc.pid),
                      "selection": json.loads((out / "selection.json").read_text()), "files": _files(out),
                      "report": (out / "report.md").read_text()}
    return runs


def test_each_fault_under_pruning_fails_only_its_candidate(pruned_faults):
    first = pruned_faults["first"]
    assert first["code"] == 0, first["log"][-3000:]
    assert "Traceback" not in first["log"]
    rows = {e["candidate"]: e for e in first["selection"]["ranking"]}
    assert first["selection"]["selected"] == "good" and rows["good"]["status"] == "finished"
    assert rows["good"]["n_probes"] == 4
    expected = {"nan": "probe at D=200 diverged", "oom": "probe at D=200 failed",
                "corrupt": "could not load", "hub": "not in the local Hugging Face cache"}
    for cid, words in expected.items():
        assert rows[cid]["status"] == "failed" and words in rows[cid]["error"], rows[cid]
        assert rows[cid]["error"][:80] in first["report"]
        assert f"warning: candidate {cid} failed" in first["log"]
    assert "out of memory" in rows["oom"]["error"]
    out = Path(first["selection"]["output"])
    assert out.is_absolute() and f"outputs in {out}" in first["log"]
    retried = json.loads((out / "probes" / candidate_key("good") / "200.json").read_text())
    assert retried["attempts"] > 1 and retried["micro_batch"] == 8  # the OOM was retried; nothing lost
    zero_shots = {r["candidate"] for r in ProbeStore(str(out)).get_all() if r["n_samples"] == 0}
    assert zero_shots == {"good", "nan", "oom"}  # probes before a failure are kept
    assert first["left"] == [], "processes left running after the run: " + str(first["left"])


def test_resume_under_pruning_repeats_nothing_and_keeps_the_wall_time(pruned_faults):
    first, resumed = pruned_faults["first"], pruned_faults["resume"]
    assert resumed["code"] == 0, resumed["log"][-3000:]
    assert "Traceback" not in resumed["log"]
    assert all(resumed["files"][name] == data for name, data in first["files"].items())  # no probe repeated
    assert [(e["candidate"], e["status"]) for e in resumed["selection"]["ranking"]] == \
        [(e["candidate"], e["status"]) for e in first["selection"]["ranking"]]  # the failed ones retried, failed again
    compute = resumed["selection"]["compute"]
    assert compute["wall_seconds"] == first["selection"]["compute"]["wall_seconds"]
    assert len(compute["resume_wall_seconds"]) == 1 and "later --resume run(s)" in resumed["report"]
    assert resumed["left"] == []
