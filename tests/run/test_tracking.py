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
                                "ray": {"num_cpus": 2}, "pruning": {"scout": False}}, check_task=False)
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
