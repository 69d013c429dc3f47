"""The building blocks of benchmarks/validation_zoo.py on a miniature zoo (seconds)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

from lensray.core.curves import load_curves_csv

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def vz():
    spec = importlib.util.spec_from_file_location("validation_zoo", REPO / "benchmarks" / "validation_zoo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["validation_zoo"] = module
    spec.loader.exec_module(module)
    return module


PAGE = r""".TH LS "1"
.SH NAME
ls \- list directory contents
.SH DESCRIPTION
.TP
\fB\-a\fR, \fB\-\-all\fR
do not ignore entries starting with .
.TP
.B \-\-color
colorize the output; more text here.
.TP
FILE
not an option
"""


def test_man_options_parses_roff(vz):
    rows = vz.man_options(PAGE, "ls")
    assert rows == [{"input": "ls -a, --all", "target": "do not ignore entries starting with ."},
                    {"input": "ls --color", "target": "colorize the output;"}]


def test_grid_and_ranking_change(vz):
    assert vz.grid(800) == [0, 200, 400, 800]
    losses = np.array([[3.0, 2.0, 1.0], [2.5, 2.2, 1.5]])
    change = vz.ranking_change(losses, ["a", "b"], [0, 200, 400])
    assert change["best"] == {"0": "b", "200": "a", "400": "a"}
    assert change["spearman_vs_target"]["0"] == pytest.approx(-1.0)


def test_two_candidates_probes_resume_and_table(vz, tmp_path):
    from lensray.engine.data import TaskConfig, load_task
    from lensray.engine.probe import ProbeConfig

    text = ("Permission is hereby granted, free of charge, to any person obtaining a copy of this software "
            "and associated documentation files. ") * 20
    rows = [{"input": f"cmd{i % 7} --opt{i}", "target": f"set option {i} of the command"} for i in range(80)]
    vz.write_jsonl(rows, tmp_path / "task.jsonl")
    task = TaskConfig(source=str(tmp_path / "task.jsonl"), template="{input}: ", max_length=48, test_size=16,
                      validation_size=0)
    data = load_task(task)
    probe = ProbeConfig(epochs=1, micro_batch=8, device="cpu", cpu_threads=1, ntk=True, ntk_samples=4, ntk_dim=64)
    sizes = [0, 8, 16, 32]
    done = []
    for spec in (vz.Spec("gpt2", "S", "licences", 3, 1), vz.Spec("opt", "S", "pydoc", 2, 2)):
        info = vz.build_candidate(spec, text, tmp_path / "models" / spec.name)
        assert (tmp_path / "models" / spec.name / "model.safetensors").is_file()
        probes = vz.run_probes(spec.name, tmp_path / "models" / spec.name, sizes, tmp_path, task, data, probe,
                               log=lambda *a, **k: None)
        assert [p["n_samples"] for p in probes] == sizes and all(p["status"] == "ok" for p in probes)
        done.append({"info": info, "probes": probes})

    # resume: every probe is on disk, so nothing runs again
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "probes").rglob("*.json")}
    lines = []
    vz.run_probes(done[0]["info"]["name"], tmp_path / "models" / done[0]["info"]["name"], sizes, tmp_path, task,
                  data, probe, log=lambda *a, **k: lines.append(a))
    assert lines == [] and stamps == {p: p.stat().st_mtime_ns for p in (tmp_path / "probes").rglob("*.json")}

    header, table = vz.curves_rows(done, sizes)
    vz.write_csv(tmp_path / "zoo.csv", header, table)
    curves = load_curves_csv(tmp_path / "zoo.csv")
    assert curves.ids == [d["info"]["name"] for d in done]
    assert list(curves.D) == sizes
    assert list(curves.size) == [d["info"]["n_params"] for d in done]
    assert curves.family == ["gpt2", "opt"]
    np.testing.assert_allclose(curves.L, [[p["test_loss"] for p in d["probes"]] for d in done], rtol=1e-5)
    for col in ("ntk_F@0", "ntk_F@32", "ntk_t@32", "ntk_eta", "ntk_eig_4", "ntk_coef_4"):
        assert col in header
    # F at D = 0 is the squared norm of the probe set's losses; F from the stored spectrum matches each probe's
    row = dict(zip(header, table[0]))
    eig = np.array([float(row[f"ntk_eig_{j}"]) for j in range(1, 5)])
    coef = np.array([float(row[f"ntk_coef_{j}"]) for j in range(1, 5)])
    for d, p in zip(sizes, done[0]["probes"]):
        f = np.sum(np.exp(-2 * float(row["ntk_eta"]) * eig * float(row[f"ntk_t@{d}"])) * coef**2)
        assert float(row[f"ntk_F@{d}"]) == pytest.approx(f, rel=1e-4)
        assert p["ntk"]["steps"] == p["steps"]
    assert float(row["ntk_F@0"]) == pytest.approx(done[0]["probes"][0]["ntk"]["residual_norm2"], rel=1e-5)
    assert json.loads((tmp_path / "models" / done[0]["info"]["name"] / "zoo.json").read_text())["pretrain_steps"] == 3

    # the NTK columns read back per point, and every law fits both curves from them
    d_ntk, F = vz.ntk_columns(tmp_path / "zoo.csv")
    assert d_ntk == sizes
    np.testing.assert_allclose(F, [[p["ntk"]["F"] for p in d["probes"]] for d in done], rtol=1e-5)
    report = vz.fit_rmse(tmp_path / "zoo.csv")
    assert set(report) == {"rectified", "lensllm, NTK F per point", "lensllm, NTK F per curve (D = 0)",
                           "lensllm, F free"}
    assert all(r["n_fitted"] == 2 and np.isfinite(r["mean"]) for r in report.values())
