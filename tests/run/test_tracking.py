"""Trackers: Ray's logger callbacks from the config's tracking section, and any Tune callback passed
to screen(), receive each probe's metrics, the forecast at D* included; live progress names each event."""

from __future__ import annotations

import csv
import math

from ray import tune

from lensray.core.synthetic_zoo import synthetic_zoo
from lensray.run.config import load_config
from lensray.run.screen import screen

RESULTS: list[dict] = []


class Collect(tune.Callback):
    def on_trial_result(self, iteration, trials, trial, result, **info):
        RESULTS.append(dict(result))


def test_csv_tracker_and_a_callback_get_every_probe_with_its_forecast(tmp_path, capfd):
    zoo = synthetic_zoo(4, seed=5)
    config = load_config(None, {"zoo": [{"id": c, "model": c, "size": float(s)} for c, s in zip(zoo.ids, zoo.size)],
                                "grid": {"start": 200, "max_samples": 3200}, "tracking": {"csv": True},
                                "ray": {"num_cpus": 2}, "pruning": {"enabled": False}}, check_task=False)
    RESULTS.clear()
    selection = screen(config, out=str(tmp_path / "out"), backend="replay", replay=zoo, callbacks=[Collect()])
    assert selection["selected"] in zoo.ids
    probes = [r for r in RESULTS if "loss" in r]
    assert len(probes) == 4 * 6  # 4 candidates x D = 0, 200, ..., 3200
    forecast = [r for r in probes if math.isfinite(r.get("predicted_loss", math.nan))]
    assert forecast and all({"pred_lo", "pred_hi", "candidate", "n_samples", "flops"} <= set(r) for r in forecast)
    tables = sorted((tmp_path / "out" / "tune").rglob("progress.csv"))
    assert len(tables) == 4
    rows = [row for t in tables for row in csv.DictReader(t.open())]
    assert len(rows) == 24 and {"candidate", "n_samples", "loss", "predicted_loss"} <= set(rows[0])
    err = capfd.readouterr().err
    assert f"{zoo.ids[0]} D=200 loss" in err and " -> D* " in err and "Traceback" not in err


FORECAST_KEYS = ("n_samples", "loss", "flops", "predicted_loss", "pred_lo", "pred_hi")


def _tiny_run(tmp_path, tracking: dict, n: int = 3):
    """A replay screening of ``n`` synthetic candidates at D = 0, 200, ..., 3200 with ``tracking``; pruning
    off, so every candidate reports every probe whatever the order of the reports."""
    zoo = synthetic_zoo(n, seed=7)
    config = load_config(None, {"name": "tracked", "zoo": [{"id": c, "model": c, "size": float(s)} for c, s in zip(zoo.ids, zoo.size)],
                                "grid": {"start": 200, "max_samples": 3200}, "tracking": tracking,
                                "ray": {"num_cpus": 2}, "pruning": {"enabled": False}}, check_task=False)
    selection = screen(config, out=str(tmp_path / "out"), backend="replay", replay=zoo, progress=False)
    return zoo, selection


def test_mlflow_tracker_gets_each_probe_with_its_forecast(tmp_path, monkeypatch):
    """An MLflow run per candidate in a local file store: every probe's D, loss, FLOPs and the forecast at D*."""
    import pytest

    pytest.importorskip("mlflow", reason="mlflow is not installed (pip install -e '.[tracking]')")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 refuses a folder store otherwise
    uri = (tmp_path / "mlruns").as_uri()
    zoo, selection = _tiny_run(tmp_path, {"mlflow": {"tracking_uri": uri, "experiment_name": "screen"}})
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("screen").experiment_id])
    assert sorted(r.data.params["candidate"] for r in runs) == sorted(zoo.ids)
    for run in runs:
        history = {k: [m.value for m in client.get_metric_history(run.info.run_id, k)] for k in FORECAST_KEYS}
        assert history["n_samples"] == [0, 200, 400, 800, 1600, 3200]
        assert len(history["loss"]) == 6 and all(math.isfinite(v) for v in history["loss"])
        assert all(v > 0 for v in history["flops"][1:])
        forecast = [v for v in history["predicted_loss"] if math.isfinite(v)]
        assert forecast, run.data.params["candidate"]
        assert len(history["pred_lo"]) == len(history["pred_hi"]) == 6
    assert selection["selected"] in zoo.ids


def _wandb_records(path):
    """The protobuf records of a W&B run's transaction log (``run-<id>.wandb``): a file header
    (``:W&B``, magic, version), then 32 KiB blocks of records, each with a 7-byte header (CRC,
    length, type: 1 full, 2 first, 3 middle, 4 last part), a block's tail under 7 bytes zeroed."""
    import struct

    from wandb.proto import wandb_internal_pb2

    raw = path.read_bytes()
    assert raw[:4] == b":W&B", f"{path} is not a W&B transaction log"
    block, pos, parts = 32768, 7, []
    while pos + 7 <= len(raw):
        length, kind = struct.unpack("<HB", raw[pos + 4:pos + 7])
        if block - pos % block < 7 or (length == 0 and kind == 0):
            pos += block - pos % block
            continue
        parts.append(raw[pos + 7:pos + 7 + length])
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(b"".join(parts))
            parts = []
            yield record


def test_wandb_tracker_offline_run_files_carry_each_probe(tmp_path, monkeypatch):
    """W&B in offline mode: a run per candidate under WANDB_DIR, named by the candidate, grouped by
    the config's name, whose history has every probe's D, loss, FLOPs and the forecast at D*."""
    import json

    import pytest

    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[tracking]')")
    for name, value in {"WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path / "wandb"), "WANDB_SILENT": "true"}.items():
        monkeypatch.setenv(name, value)  # before Ray starts: its workers (W&B's logging actors) inherit them
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    (tmp_path / "wandb").mkdir()
    zoo, selection = _tiny_run(tmp_path, {"wandb": {"project": "screen"}})
    logs = sorted((tmp_path / "wandb").rglob("offline-run-*/run-*.wandb"))
    assert len(logs) == len(zoo.ids), logs
    names = []
    for log in logs:
        records = list(_wandb_records(log))
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.project == "screen" and run.run_group == "tracked"
        names.append(run.display_name)
        history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
                   for r in records if r.WhichOneof("record_type") == "history"]
        assert [h.get("n_samples") for h in history] == [0, 200, 400, 800, 1600, 3200], (log, history)
        assert all(math.isfinite(h["loss"]) for h in history) and all(h["flops"] > 0 for h in history[1:])
        assert all({"predicted_loss", "pred_lo", "pred_hi"} <= set(h) for h in history)
        assert any(math.isfinite(h["predicted_loss"]) for h in history)
    assert sorted(names) == sorted(zoo.ids)
    assert selection["selected"] in zoo.ids


def test_a_tracker_that_cannot_log_is_one_input_error_before_ray(tmp_path, monkeypatch):
    """W&B online without a key: a LensrayInputError naming tracking.wandb, before Ray starts and
    before anything is written."""
    import pytest
    import ray

    from lensray.errors import LensrayInputError

    pytest.importorskip("wandb", reason="wandb is not installed (pip install -e '.[tracking]')")
    for name in ("WANDB_MODE", "WANDB_API_KEY", "WANDB_SETUP_API_KEY_HOOK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))  # no netrc, no wandb settings: nobody is logged in
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "wandb-config"))
    zoo = synthetic_zoo(3, seed=7)
    config = load_config(None, {"zoo": [{"id": c, "model": c} for c in zoo.ids], "tracking": {"wandb": {}},
                                "grid": {"start": 200, "max_samples": 3200}}, check_task=False)
    with pytest.raises(LensrayInputError, match=r"^tracking\.wandb: .*API key"):
        screen(config, out=str(tmp_path / "out"), backend="replay", replay=zoo, progress=False)
    assert not ray.is_initialized() and not (tmp_path / "out" / "config.yaml").exists()
