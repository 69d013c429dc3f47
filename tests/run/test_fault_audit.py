"""Faults, bad input and untrusted models: the checks the other fault tests leave
out. Bad input and a bad output location fail with one line and exit 2 before Ray starts (a file
task too small for the grid, an unwritable or full --out, YAML tags in a replay config); a
truncated probe file is probed again on resume, never read; secret environment values reach no
output, log or console line; the driver installs log redaction and draws the predictor's own
extrapolations in the plot; report.md explains every stop by its rule."""

from __future__ import annotations

import io
import json
import logging
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lensray.cli.main import main
from lensray.run.config import load_config
from lensray.run.screen import finish
from lensray.run.store import make_plan, write_decision
from lensray.cli.screen import summarise
from lensray.run.store import ProbeStore
from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv

TARGET = 1_638_400
SECRET = "hf_AUDIT_fake_token_5f3e9a"
AWS = "AKIAAUDITFAKE0000KEY"


@pytest.fixture()
def no_ray(monkeypatch):
    """Make any attempt to start or join Ray fail the test."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started before the input was validated")

    monkeypatch.setattr(ray, "init", refuse)


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def _small_config(tmp_path: Path, **extra) -> Path:
    import yaml

    data = {"zoo": [{"id": "a", "model": "tiny:gpt2:n_layer=1,n_embd=32"}], "target_samples": 51200,
            "grid": {"start": 200, "factor": 2, "max_samples": 1600}, **extra}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


# ---- items 1 and 9 in the driver's load path: every way a candidate cannot (or must not) load ---------


def _unloadable(root: Path) -> dict[str, tuple[str, Path | None]]:
    """Model folders that must not load: corrupt weights, unknown architecture, a pickle checkpoint,
    a repository that needs its own code (with the sentinel its code would create)."""
    import torch

    from lensray.engine.models import load_candidate

    model, tok, _ = load_candidate("tiny:gpt2:n_layer=1,n_embd=32")
    folders = {name: root / name for name in ("corrupt", "arch", "pickle", "remote")}
    for name in ("corrupt", "pickle"):
        model.save_pretrained(folders[name])
        tok.save_pretrained(folders[name])
    (folders["corrupt"] / "model.safetensors").write_bytes(b"not a safetensors file")
    (folders["pickle"] / "model.safetensors").unlink()
    torch.save(model.state_dict(), folders["pickle"] / "pytorch_model.bin")
    folders["arch"].mkdir()
    (folders["arch"] / "config.json").write_text(json.dumps({"model_type": "no_such_arch"}))
    (folders["arch"] / "model.safetensors").write_bytes(b"")
    folders["remote"].mkdir()
    sentinel = root / "SENTINEL"
    (folders["remote"] / "config.json").write_text(json.dumps({
        "model_type": "lensray_evil", "architectures": ["EvilModel"],
        "auto_map": {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}}))
    (folders["remote"] / "evil.py").write_text(f"open({str(sentinel)!r}, 'w').write('code ran')\n")
    (folders["remote"] / "model.safetensors").write_bytes(b"")
    return {name: (str(path), sentinel if name == "remote" else None) for name, path in folders.items()}


def test_each_unloadable_candidate_is_failed_with_its_reason_and_the_run_goes_on(tmp_path, monkeypatch, capsys):
    """The train worker's load path (lensray.run.trainables.probe_loop, Ray Train's context faked): each
    refused candidate ends ``failed`` with its reason in selection.json, report.md and a warning
    line; the good candidate is selected and the exit code is 0."""
    import ray.train

    from lensray.run.ranking import candidate_info
    from lensray.run.trainables import TrialContext, probe_loop

    bad = _unloadable(tmp_path)
    config = load_config({"zoo": [{"id": "good", "size": 1e8}, *({"id": n, "model": m} for n, (m, _) in bad.items())],
                          "grid": {"start": 200, "max_samples": 800}, "target_samples": TARGET,
                          "task": {"synthetic_rows": 400, "test_size": 32, "validation_size": 8, "max_length": 32}},
                          check_task=False)
    store = ProbeStore(str(tmp_path / "o"))
    grid = config.grid_sizes()
    zoo = synthetic_zoo(1, seed=4)
    col = {int(d): j for j, d in enumerate(zoo.D)}
    for d in grid:  # the good candidate's probes, as its worker would have stored them
        store.put("good", {"n_samples": d, "status": "ok", "test_loss": float(zoo.L[0, col[d]])})

    class Context:
        def get_world_rank(self):
            return 0

        def get_world_size(self):
            return 1

    reports = []
    monkeypatch.setattr(ray.train, "get_context", Context, raising=False)
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reports.append(metrics), raising=False)
    ctx = TrialContext(store_uri=store.uri, grid=grid, done={},
                       candidates=candidate_info(config, None), task=config.task.model_dump(mode="json"),
                       probe=config.probe.model_dump(mode="json"))
    for name in bad:
        probe_loop({"ctx": ctx, "candidate": name})
    assert [r["failed"] for r in reports] == [True] * len(bad)
    assert not bad["remote"][1].exists(), "code from the model repository ran"

    selection = finish(config, store, grid, "train", None, 1.0)
    assert summarise(selection, store.uri) == 0
    err = capsys.readouterr().err
    rows = {e["candidate"]: e for e in selection["ranking"]}
    report = (tmp_path / "o" / "report.md").read_text()
    expected = {"corrupt": "cannot be loaded", "arch": "no_such_arch", "pickle": "allow_pickle",
                "remote": "trust_remote_code"}
    for name, words in expected.items():
        row = rows[name]
        assert row["status"] == "failed" and row["error"].startswith(f"could not load {bad[name][0]}"), row
        assert words in row["error"] and f"warning: candidate {name} failed: could not load" in err
        assert row["error"].split(": ", 1)[1][:60] in report
    assert selection["selected"] == "good" and rows["good"]["status"] == "finished"


# ---- item 7: a file task whose train split is smaller than max_samples ---------------------------


def test_file_task_smaller_than_max_samples_exits_2_before_ray(tmp_path, capsys, no_ray):
    rows = tmp_path / "task.jsonl"
    rows.write_text("".join(json.dumps({"input": f"q{i}", "target": f"a{i}"}) + "\n" for i in range(400)))
    task = {"source": str(rows), "test_size": 64, "validation_size": 16}
    assert main(["screen", str(_small_config(tmp_path, task=task)), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: grid.max_samples: 1600 is larger than the train split of task") and "(320 rows)" in line
    assert not (tmp_path / "out").exists()
    missing = {**task, "source": str(tmp_path / "nope.jsonl")}
    assert main(["screen", str(_small_config(tmp_path, task=missing)), "--out", str(tmp_path / "out")]) == 2
    assert _one_error_line(capsys).startswith("error: task.source file") and not (tmp_path / "out").exists()


# ---- item 6: an unwritable or full output location, found before any probe -----------------------


@pytest.mark.parametrize("fault", ["unwritable", "full"])
@pytest.mark.parametrize("form", ["train", "replay"])
def test_bad_output_location_exits_2_before_ray(tmp_path, capsys, monkeypatch, no_ray, fault, form):
    out = tmp_path / "out"
    if fault == "unwritable":
        (tmp_path / "a-file").write_text("in the way")
        out = tmp_path / "a-file" / "out"
    else:
        usage = shutil.disk_usage(tmp_path)
        monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=2**20))
    if form == "train":
        argv = [str(_small_config(tmp_path, task={"source": "synthetic"}))]
    else:
        argv = ["--replay", str(write_curves_csv(synthetic_zoo(4, seed=2), tmp_path / "zoo.csv")), "--max-samples", "3200"]
    assert main(["screen", *argv, "--out", str(out)]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: storage.path: {out}")
    assert ("not writable" if fault == "unwritable" else "nearly full") in line
    assert not out.exists() or not any(out.rglob("*.json"))  # no probe ran


# ---- item 6: a partially written probe file is never read as a result -----------------------------


def test_truncated_probe_file_is_probed_again_on_resume(tmp_path):
    config = load_config({"zoo": [{"id": "a", "size": 1e8}], "grid": {"start": 200, "max_samples": 1600},
                          "target_samples": TARGET}, check_task=False)
    store = ProbeStore(str(tmp_path / "o"))
    grid = config.grid_sizes()
    paths = {d: Path(store.put("a", {"n_samples": d, "status": "ok", "test_loss": 3.0 - d / 1e3})) for d in grid}
    text = paths[800].read_text()
    paths[800].write_text(text[: len(text) // 2])  # the crash while writing that atomic rename prevents
    (plan,) = make_plan(config, store, grid)
    assert plan.todo == [800] and plan.needs_trial and 800 not in plan.done


# ---- item 10: replay configs are read with the safe loader too -------------------------------------


def test_replay_config_with_a_python_tag_is_refused(tmp_path, capsys, no_ray):
    marker = tmp_path / "pwned"
    cfg = tmp_path / "evil.yaml"
    cfg.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    csv = write_curves_csv(synthetic_zoo(4, seed=2), tmp_path / "zoo.csv")
    assert main(["screen", str(cfg), "--replay", str(csv), "--max-samples", "3200", "--out", str(tmp_path / "o")]) == 2
    assert _one_error_line(capsys).startswith("error: config: ") and not marker.exists()


# ---- item 11 and the driver's wiring: secrets, log redaction, the plot's curves --------------------


def _all_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def test_secret_in_a_failure_reason_reaches_no_output(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS)
    config = load_config({"zoo": [{"id": "ok", "size": 1e8}, {"id": "gated", "size": 1e8}],
                          "grid": {"start": 200, "max_samples": 1600}, "target_samples": TARGET}, check_task=False)
    store = ProbeStore(str(tmp_path / "o"))
    grid = config.grid_sizes()
    zoo = synthetic_zoo(1, seed=4)
    col = {int(d): j for j, d in enumerate(zoo.D)}
    for d in grid:
        store.put("ok", {"n_samples": d, "status": "ok", "test_loss": float(zoo.L[0, col[d]]), "note": f"t={SECRET}"})
    write_decision(store, "gated", "failed", None, f"could not load: 401 for token {SECRET} with key {AWS}")
    selection = finish(config, store, grid, "replay", None, 1.0)
    assert summarise(selection, store.uri) == 0
    printed = capsys.readouterr()
    assert "warning: candidate gated failed: could not load: 401 for token ***" in printed.err
    for text in (printed.out, printed.err, *(b.decode("latin-1") for b in _all_bytes(tmp_path / "o").values())):
        assert SECRET not in text and AWS not in text
    cells = pq.read_table(tmp_path / "o" / "probes.parquet").to_pylist()
    assert cells and all(SECRET not in json.dumps(c, default=str) for c in cells)


def test_driver_installs_log_redaction_before_validating(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    assert main(["screen", str(tmp_path / "missing.yaml")]) == 2
    assert getattr(logging.getLogRecordFactory(), "_lensray_redacting", False)
    record = logging.getLogRecordFactory()("x", logging.WARNING, __file__, 1, "token %s", (SECRET,), None)
    assert record.getMessage() == "token ***"


def test_plot_draws_the_predictors_own_extrapolation(tmp_path, monkeypatch):
    import lensray.run.report as report

    seen = {}
    original = report.write_report

    def spy(store, selection, probes, target, fitted=None, **kwargs):
        seen["fitted"] = fitted
        return original(store, selection, probes, target, fitted=fitted, **kwargs)

    monkeypatch.setattr(report, "write_report", spy)
    zoo = synthetic_zoo(4, seed=6)
    config = load_config({"zoo": [{"id": c, "size": float(s)} for c, s in zip(zoo.ids, zoo.size)],
                          "grid": {"start": 200, "max_samples": 3200}, "target_samples": TARGET}, check_task=False)
    store = ProbeStore(str(tmp_path / "o"))
    grid = config.grid_sizes()
    col = {int(d): j for j, d in enumerate(zoo.D)}
    for i, cid in enumerate(zoo.ids):
        for d in grid:
            store.put(cid, {"n_samples": d, "status": "ok", "test_loss": float(zoo.L[i, col[d]])})
    selection = finish(config, store, grid, "replay", None, 1.0)
    fitted = seen["fitted"]
    assert fitted is not None and set(fitted) == set(zoo.ids)
    for row in selection["ranking"]:
        D, loss = fitted[row["candidate"]]
        assert D[0] == max(grid) and D[-1] == TARGET
        assert loss[-1] == pytest.approx(row["predicted_loss"], rel=1e-9)  # the plot ends at the ranked prediction


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def test_secrets_reach_no_file_log_or_console_line_end_to_end(ray_local, tmp_path, monkeypatch, capfd, caplog):
    """A replay screening (pruning on) whose config names a model by a URL carrying the token: every
    file under the output (config.yaml and Tune's folders included), stdout, stderr and the log
    records stay clean."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", AWS)
    zoo = synthetic_zoo(12, seed=5)
    csv = write_curves_csv(zoo, tmp_path / "zoo.csv")
    cfg = tmp_path / "c.yaml"
    private = f"https://user:{SECRET}@models.example/org/m?aws={AWS}"
    cfg.write_text(json.dumps({"zoo": [{"id": c, **({"model": private} if i == 3 else {})}
                                       for i, c in enumerate(zoo.ids)]}))
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        code = main(["screen", str(cfg), "--replay", str(csv), "--max-samples", "3200", "--out", str(out)])
        logging.getLogger("lensray.audit").warning("loading %s", private)  # the driver installed redaction
    printed = capfd.readouterr()
    assert code == 0, printed.err[-2000:]
    selection = json.loads((out / "selection.json").read_text())
    assert len(selection["ranking"]) == 12 and all(e["status"] != "failed" for e in selection["ranking"])
    assert "models.example" in (out / "config.yaml").read_text()
    leaks = [name for name, data in _all_bytes(out).items() if SECRET.encode() in data or AWS.encode() in data]
    assert leaks == []
    assert [r.getMessage() for r in caplog.records if r.name == "lensray.audit"][-1].startswith("loading https://user:***@")
    for text in (printed.out, printed.err, caplog.text):
        assert SECRET not in text and AWS not in text
    # item 8: every stop is explained in report.md by the scheduler's rule, at the size it happened
    report = (out / "report.md").read_text()
    pruned = [row for row in selection["ranking"] if row["status"] == "pruned"]
    assert pruned, "the zoo is built so that pruning stops someone"
    for row in pruned:
        assert row["reason"] and f"stopped after D = {row['pruned_at']}: " in report


def test_candidate_id_carrying_a_secret_is_refused_before_ray(tmp_path, monkeypatch, capsys, no_ray):
    """Ids are written to every output by design, so an id holding a secret value cannot be screened."""
    monkeypatch.setenv("HF_TOKEN", SECRET)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(json.dumps({"zoo": [{"id": "fine"}, {"id": f"org/m-{SECRET}"}], "target_samples": 51200,
                               "grid": {"start": 200, "max_samples": 1600}}))
    assert main(["screen", str(cfg), "--out", str(tmp_path / "o")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: zoo[1].id: holds the value of a secret") and SECRET not in line


# ---- faults under pruning: the driver's checks before Ray, the pruned-while-probing race ----------


class _RankZero:
    def get_world_rank(self):
        return 0

    def get_world_size(self):
        return 1


def test_a_probe_failing_after_its_stop_leaves_the_candidate_pruned(tmp_path, monkeypatch):
    """The race: the scheduler stops a candidate (its decision is stored) while its worker already runs
    the next probe, which then diverges. The stop stands, the curve up to it is ranked, and the
    probes stored before the failure are kept."""
    import ray.train

    from lensray.engine.probe import ProbeResult, ProbeRunner
    from lensray.run.ranking import candidate_info
    from lensray.run.store import read_decision
    from lensray.run.trainables import TrialContext, probe_loop

    config = load_config({"zoo": [{"id": "good", "size": 1e8}, {"id": "late", "model": "tiny:gpt2:n_layer=1", "size": 1e8}],
                          "grid": {"start": 200, "max_samples": 1600}, "target_samples": TARGET,
                          "task": {"synthetic_rows": 400, "test_size": 32, "validation_size": 8}}, check_task=False)
    store = ProbeStore(str(tmp_path / "o"))
    grid = config.grid_sizes()
    zoo = synthetic_zoo(2, seed=4)
    col = {int(d): j for j, d in enumerate(zoo.D)}
    for d in grid:
        store.put("good", {"n_samples": d, "status": "ok", "test_loss": float(zoo.L[0, col[d]])})

    def run(self, d, seed=None):
        if d == grid[-1]:  # the stop after D = 800 arrives while this probe runs
            write_decision(store, "late", "pruned", 800, "confidently worse than good")
            return ProbeResult(self.model_id, d, "diverged", None, 1, 1e-3, 0, 0.0, 0.0, 0, 1,
                               error="loss became nan at step 1 (learning rate 0.0005)")
        return ProbeResult(self.model_id, d, "ok", float(zoo.L[1, col[d]]), 1, 1e-3, 10, 1.0, 0.0, 0, 1)

    reports = []
    monkeypatch.setattr(ProbeRunner, "load", lambda self: self)
    monkeypatch.setattr(ProbeRunner, "run", run)
    monkeypatch.setattr(ray.train, "get_context", _RankZero, raising=False)
    monkeypatch.setattr(ray.train, "report", lambda metrics, **kw: reports.append(metrics), raising=False)
    ctx = TrialContext(store_uri=store.uri, grid=grid, done={}, candidates=candidate_info(config, None),
                       task=config.task.model_dump(mode="json"), probe=config.probe.model_dump(mode="json"))
    probe_loop({"ctx": ctx, "candidate": "late"})
    assert reports[-1]["failed"] and "diverged" in reports[-1]["error"]
    assert read_decision(store, "late")["status"] == "pruned"
    assert sorted(store.completed("late")) == grid[:-1]  # nothing lost
    selection = finish(config, store, grid, "train", None, 1.0)
    row = {e["candidate"]: e for e in selection["ranking"]}["late"]
    assert row["status"] == "pruned" and row["pruned_at"] == 800 and row["predicted_loss"] is not None


def test_every_candidate_unavailable_exits_2_before_ray(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = _small_config(tmp_path, zoo=[{"id": "gone", "model": str(tmp_path / "gone")},
                                       {"id": "hub", "model": "nonexistent-org/no-model"}])
    assert main(["screen", str(cfg), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"error: zoo[0].model: could not load {tmp_path / 'gone'}: model path")
    assert line.endswith("(and the 1 other candidate(s)); no candidate can be loaded")
    assert not any((tmp_path / "out").rglob("*.json"))


def test_unreachable_hub_dataset_exits_2_naming_task_source_before_ray(tmp_path, capsys, monkeypatch, no_ray):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets"))
    cfg = _small_config(tmp_path, task={"source": "nonexistent-org/no-dataset"})
    assert main(["screen", str(cfg), "--out", str(tmp_path / "out")]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: task.source 'nonexistent-org/no-dataset' could not be loaded: ")
    assert not (tmp_path / "out").exists()


def test_relative_output_inside_a_ray_job_is_refused(tmp_path, capsys, monkeypatch, no_ray):
    from lensray.run.config import JOB_ENV

    csv = str(write_curves_csv(synthetic_zoo(4, seed=2), tmp_path / "zoo.csv"))
    replay = ["screen", "--replay", csv, "--max-samples", "3200", "--plan"]
    monkeypatch.chdir(tmp_path)
    assert main([*replay, "--out", "runs/x"]) == 0  # outside a job a relative path is the user's own
    capsys.readouterr()
    monkeypatch.setenv(JOB_ENV, json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    assert main([*replay, "--out", "runs/x"]) == 2
    line = _one_error_line(capsys)
    assert line.startswith("error: storage.path: 'runs/x' is relative, and inside a Ray job") and "absolute" in line
    assert main([*replay]) == 2  # the replay's default output is relative too
    capsys.readouterr()
    assert main([*replay, "--out", str(tmp_path / "abs")]) == 0


def test_resume_of_a_finished_run_keeps_its_wall_time_and_adds_its_own(tmp_path):
    zoo = synthetic_zoo(3, seed=6)
    config = load_config({"zoo": [{"id": c, "size": float(s)} for c, s in zip(zoo.ids, zoo.size)],
                          "grid": {"start": 200, "max_samples": 3200}, "target_samples": TARGET}, check_task=False)
    store = ProbeStore(str(tmp_path / "o"))
    grid = config.grid_sizes()
    col = {int(d): j for j, d in enumerate(zoo.D)}
    for i, cid in enumerate(zoo.ids):
        for d in grid:
            store.put(cid, {"n_samples": d, "status": "ok", "test_loss": float(zoo.L[i, col[d]])})
    first = finish(config, store, grid, "replay", None, 116.0)
    assert first["compute"]["wall_seconds"] == 116.0 and "resume_wall_seconds" not in first["compute"]
    assert first["output"] == str(tmp_path / "o")
    finish(config, store, grid, "replay", None, 0.3)
    third = finish(config, store, grid, "replay", None, 0.5)
    assert third["compute"]["wall_seconds"] == 116.0 and third["compute"]["resume_wall_seconds"] == [0.3, 0.5]
    assert json.loads((tmp_path / "o" / "selection.json").read_text())["compute"] == third["compute"]
    report = (tmp_path / "o" / "report.md").read_text()
    assert "| wall time | 116.0 s |" in report and "| wall time of 2 later --resume run(s) | 0.8 s (0.3 s, 0.5 s) |" in report
    printed = io.StringIO()
    assert summarise(third, third["output"], stream=printed) == 0
    assert f"wall 116.0 s (+ 0.8 s resumed); outputs in {tmp_path / 'o'}" in printed.getvalue()
