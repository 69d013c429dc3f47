"""The final ranking with NTK features: probe records -> Curves.ntk -> the LensLLM phase fit ->
named parameters in selection.json and report.md; ``probe.ntk`` follows the predictor; NTK
columns in the replay and the benchmark."""

from __future__ import annotations

import json

import numpy as np
import pytest

from lensray.cli.main import main
from lensray.core.curves import load_curves_csv
from lensray.core.ntk_term import residual_norm
from lensray.core.synthetic_zoo import write_curves_csv
from lensray.run.benchmark import run_benchmark
from lensray.run.config import load_config
from lensray.run.ranking import rank
from lensray.run.results import Selection
from lensray.run.screen import finish
from lensray.run.store import ProbeStore

TARGET = 409_600


def _store_with_ntk(tmp_path, ids, grid, seed=0):
    """Probe records of a LensLLM-law zoo whose every probe carries its NTK features."""
    rng = np.random.default_rng(seed)
    store = ProbeStore(str(tmp_path / "o"))
    spectra = {}
    for cid in ids:
        eig, coef = np.geomspace(0.1, 1e-4, 6) * rng.uniform(0.5, 2), rng.normal(0, 1, 6)
        B, beta, E = rng.uniform(50, 200), rng.uniform(0.3, 0.5), rng.uniform(0.8, 1.5)
        spectra[cid] = (eig, coef)
        for d in grid:
            t = float(np.ceil(3 * d / 16))
            F = residual_norm(eig, coef, 1e-3, t)
            ntk = {"F": F, "steps": t, "learning_rate": 1e-3, "eigenvalues": eig.tolist(),
                   "coefficients": coef.tolist(), "trace": float(eig.sum())}
            store.put(cid, {"n_samples": d, "status": "ok", "test_loss": B / (5.0 * F + d**beta) + E,
                            "flops": 6e6 * d, "ntk": ntk})
    return store, spectra


def test_ranking_fits_lensllm_on_the_probes_ntk_and_names_the_parameters(tmp_path):
    ids = ("a", "b", "c", "d")
    config = load_config({"storage": {"path": str(tmp_path / "o")}, "predictor": {"method": "lensllm"},
                          "target_samples": TARGET, "grid": {"start": 200, "max_samples": 6400},
                          "zoo": [{"id": cid, "size": 1e8} for cid in ids]}, check_task=False)
    grid = config.grid_sizes()
    store, spectra = _store_with_ntk(tmp_path, ids, grid)
    selection, _, curves, _ = rank(config, store, grid, "train", None, 1.0)
    assert isinstance(selection, Selection) and curves.ntk is not None
    assert "phase mode" in selection.notes[0]
    t_target = np.ceil(3 * 6400 / 16) * TARGET / 6400  # the largest probe's steps, scaled to D*
    for entry in selection.ranking:
        eig, coef = spectra[entry.candidate]
        params = entry.params
        assert params["F_ntk"] == pytest.approx(residual_norm(eig, coef, 1e-3, t_target), rel=1e-12)
        assert params["F"] == pytest.approx(params["gamma"] * params["F_ntk"], rel=1e-12)
        assert params["gamma"] == pytest.approx(5.0, rel=1e-2)
    sel = finish(config, store, grid, "train", None, 1.0)
    on_disk = json.loads((tmp_path / "o" / "selection.json").read_text())
    assert on_disk == json.loads(json.dumps(sel)) and set(on_disk["ranking"][0]["params"]) == {
        "B", "F", "beta", "E", "gamma", "F_ntk"}
    report = (tmp_path / "o" / "report.md").read_text()
    assert "Predictor `lensllm`: lensllm: phase mode" in report and "gamma=" in report and "F_ntk=" in report


def test_ranking_without_ntk_records_fits_F_free_and_says_so(tmp_path):
    ids = ("a", "b", "c")
    config = load_config({"storage": {"path": str(tmp_path / "o")}, "predictor": {"method": "lensllm"},
                          "target_samples": TARGET, "grid": {"start": 200, "max_samples": 3200},
                          "zoo": [{"id": cid, "size": 1e8} for cid in ids]}, check_task=False)
    grid = config.grid_sizes()
    store, _ = _store_with_ntk(tmp_path, ids, grid)
    record = store.completed("b")[800]
    store.put("b", {**record, "ntk": None})  # one probe lost its features
    selection, _, _, _ = rank(config, store, grid, "train", None, 1.0)
    assert selection.notes == ["lensllm: F fitted per candidate (prediction mode): no NTK F for 'b' at D=800"]
    assert all(set(e.params) == {"B", "F", "beta", "E"} for e in selection.ranking)


@pytest.mark.parametrize("method, explicit, expect", [("lensllm", None, True), ("lensray", None, False),
                                                      ("lensllm", False, False), ("ats", True, True)])
def test_probe_ntk_follows_the_predictor(method, explicit, expect):
    probe = {} if explicit is None else {"ntk": explicit}
    config = load_config({"predictor": {"method": method}, "probe": probe, "zoo": [{"id": "m"}]}, check_task=False)
    assert config.probe.ntk is expect
    assert load_config(config.model_dump(mode="json"), check_task=False).probe.ntk is expect  # config.yaml keeps it


def test_replay_refuses_a_malformed_ntk_column_before_ray(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("config name,0,200,400,800,ntk_F@0,ntk_F@200,ntk_F@400,ntk_F@800\n"
                   "a,3,2,1.5,1.2,9,8,7,6\nb,3,2.1,1.6,1.3,9,8,seven,6\n")
    code = main(["screen", "--replay", str(bad), "--max-samples", "800", "--target-samples", "51200",
                 "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "row 'b' (line 3), column 'ntk_F@400'" in err and "Traceback" not in err


def test_benchmark_passes_the_ntk_columns_to_lensllm(tmp_path):
    from tests.core.test_ntk_term import _lensllm_zoo

    zoo, _ = _lensllm_zoo(6, seed=0)
    curves = load_curves_csv(write_curves_csv(zoo, tmp_path / "zoo.csv"))
    rows = run_benchmark(curves, ratios=[64, 128], methods=["lensllm"], target=1_638_400)
    assert all(r["pearson"] > 99.9 and r["n_failed"] == 0 for r in rows)  # the law that drew the table, F given
    curves.ntk = None
    free = run_benchmark(curves, ratios=[64, 128], methods=["lensllm"], target=1_638_400)
    assert [r["pearson"] for r in free] != [r["pearson"] for r in rows]


@pytest.mark.slow
def test_train_screening_fits_lensllm_on_its_probes_ntk(tmp_path):
    """A real screening (train backend, tiny models) with predictor lensllm and probe.ntk left
    unset: every probe computes the NTK features, and each candidate's F in selection.json is
    gamma times the F(Θ, t) of its own stored spectrum at the steps of a probe on D*."""
    from lensray.run.screen import screen

    tiny = "tiny:{}:n_layer=1,n_embd=32,pretrain={}"
    config = load_config({
        "ray": {"num_cpus": 2, "num_gpus": 0}, "target_samples": 51200, "predictor": {"method": "lensllm"},
        "grid": {"start": 100, "max_samples": 400}, "pruning": {"enabled": False},
        "zoo": [{"id": "gpt2", "model": tiny.format("gpt2", 20)}, {"id": "llama", "model": tiny.format("llama", 5)}],
        "task": {"source": "synthetic", "max_length": 48, "test_size": 32, "validation_size": 8},
        "probe": {"learning_rate": 1.0e-3, "epochs": 1, "micro_batch": 16, "device": "cpu", "eval_batch": 32,
                  "ntk_samples": 8, "ntk_dim": 1024},
        "storage": {"path": str(tmp_path / "o")}})
    assert config.probe.ntk is True
    sel = screen(config, progress=False)
    assert "phase mode" in sel["notes"][0]
    records = ProbeStore(str(tmp_path / "o")).get_all()
    assert len(records) == 8 and all(r["ntk"] and r["ntk"]["F"] > 0 for r in records)
    by = {e["candidate"]: e for e in sel["ranking"]}
    assert {e["status"] for e in by.values()} == {"finished"}
    own = {}
    for cid, entry in by.items():
        last = next(r for r in records if r["candidate"] == cid and r["n_samples"] == 400)["ntk"]
        t_target = last["steps"] * 51200 / 400
        own[cid] = residual_norm(np.array(last["eigenvalues"]), np.array(last["coefficients"]), last["learning_rate"],
                                 t_target)
        assert entry["params"]["F_ntk"] == pytest.approx(own[cid], rel=1e-9)
        assert entry["params"]["F"] == pytest.approx(entry["params"]["gamma"] * own[cid], rel=1e-9)
    assert own["gpt2"] != pytest.approx(own["llama"], rel=1e-3)  # each candidate's own kernel


def test_a_replay_ranks_with_its_tables_ntk_columns(tmp_path):
    """Replayed probes are the table's, so their NTK features are the table's columns up to the budget."""
    from tests.core.test_ntk_term import _lensllm_zoo

    zoo, _ = _lensllm_zoo(6, seed=0)
    replay = load_curves_csv(write_curves_csv(zoo, tmp_path / "zoo.csv"))
    config = load_config({"storage": {"path": str(tmp_path / "o")}, "predictor": {"method": "lensllm"},
                          "grid": {"start": 200, "max_samples": 25600},
                          "zoo": [{"id": cid} for cid in replay.ids]}, check_task=False)
    grid = [int(d) for d in replay.D if d <= 25600]
    store = ProbeStore(str(tmp_path / "o"))
    for i, cid in enumerate(replay.ids):
        for j, d in enumerate(grid):
            store.put(cid, {"n_samples": d, "status": "ok", "test_loss": float(replay.L[i, j]), "backend": "replay"})
    selection, _, curves, _ = rank(config, store, grid, "replay", replay, 1.0)
    assert curves.ntk.F.shape == (6, len(grid)) and "phase mode" in selection.notes[0]
    F_target = replay.budget(25600).ntk.F_at(np.array(grid, float), config.target_samples)
    by = {e.candidate: e.params["F_ntk"] for e in selection.ranking}
    assert [by[cid] for cid in replay.ids] == pytest.approx(list(F_target), rel=1e-12)


def test_summary_prints_the_predictors_notes(capsys):
    from lensray.cli.screen import summarise

    row = {"candidate": "a", "status": "finished", "predicted_loss": 1.0, "error": None}
    bill = {"flops_spent": 0.0, "flops_full_tuning": 0.0, "saved_fraction": None, "wall_seconds": 1.0}
    notes = ["lensllm: F fitted per candidate (prediction mode): no NTK F for 'a' at D=400"]
    assert summarise({"selected": "a", "ranking": [row], "compute": bill, "notes": notes}, "out") == 0
    assert f"note: {notes[0]}" in capsys.readouterr().err
