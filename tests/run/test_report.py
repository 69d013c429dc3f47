"""Report outputs: selection.json schema, report.md sections, curves.png, and no secret in any file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from lensray.run.report import predictor_curves, render_markdown, write_report
from lensray.run.results import COMPUTE_KEYS, RANKING_KEYS, Compute, RankingEntry, Selection
from lensray.run.store import ProbeStore

TARGET = 51_200
SIZES = [0, 200, 400, 800, 1600, 3200]


def _curve(d: np.ndarray, b: float, dl: float, beta: float, e: float) -> np.ndarray:
    return b / (dl + d**beta) + e


@pytest.fixture()
def run(tmp_path):
    """A store with probe results of three finished, one pruned and one failed candidate, and its selection."""
    store = ProbeStore(str(tmp_path / "out"))
    rng = np.random.default_rng(0)
    laws = {"org/alpha": (20.0, 5.0, 0.5, 1.0), "beta": (25.0, 6.0, 0.45, 1.2), "gamma": (18.0, 4.0, 0.4, 1.4),
            "delta": (30.0, 5.0, 0.3, 2.0)}
    for cand, law in laws.items():
        sizes = SIZES[:4] if cand == "delta" else SIZES
        for d, loss in zip(sizes, _curve(np.array(sizes, float), *law) * np.exp(rng.normal(0, 0.005, len(sizes)))):
            store.put(cand, {"n_samples": d, "status": "ok", "test_loss": float(loss), "flops": 6e6 * d})
    store.put("broken", {"n_samples": 0, "status": "failed", "test_loss": None, "error": "no config.json"})

    def row(cand, status, loss=None, lo=None, hi=None, pruned_at=None, error=None, **extra):
        return {"candidate": cand, "status": status, "predicted_loss": loss, "interval": [lo, hi],
                "pruned_at": pruned_at, "params": {"B": 20.0, "D_l": 5.0, "beta": 0.5, "E": 1.0}, "flops": 1e10, "error": error, **extra}

    selection = {
        "selected": "org/alpha",
        "ranking": [
            row("org/alpha", "finished", 1.02, 1.0, 1.05),
            row("beta", "finished", 1.21, 1.18, 1.25),
            row("gamma", "finished", 1.45, 1.40, 1.50),
            row("delta", "pruned", 2.1, 2.0, 2.3, pruned_at=800,
                reason="optimistic loss 2.00 at D* is above the pessimistic loss 1.05 of the top-1"),
            row("broken", "failed", error="model 'broken': no config.json in /x (not a model folder)"),
        ],
        "compute": {"flops_spent": 3.4e10, "flops_full_tuning": 5e13, "saved_fraction": 0.9993,
                    "gpu_seconds": 0.0, "wall_seconds": 42.0},
    }
    return store, selection


def test_writes_all_files_with_the_selection_schema(run):
    store, selection = run
    paths = write_report(store, selection, store.get_all(), TARGET)
    assert set(paths) == {"selection.json", "report.md", "curves.png"}
    data = json.loads(store.read_text("selection.json"))
    assert data["selected"] == "org/alpha"
    assert [r["candidate"] for r in data["ranking"]] == ["org/alpha", "beta", "gamma", "delta", "broken"]
    for r in data["ranking"]:
        assert set(RANKING_KEYS) <= set(r)
        assert r["status"] in ("finished", "pruned", "failed")
        assert isinstance(r["interval"], list) and len(r["interval"]) == 2
    assert set(data["compute"]) == set(COMPUTE_KEYS)
    with open(paths["curves.png"], "rb") as fh:
        png = fh.read()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000


def test_report_explains_pruning_failures_and_bill(run):
    store, selection = run
    write_report(store, selection, store.get_all(), TARGET, title="demo")
    md = store.read_text("report.md")
    assert md.startswith("# demo\n")
    assert "**Selected: `org/alpha`**" in md and "51,200" in md
    for section in ("## Ranking", "## Compute bill", "## Why candidates were stopped", "## Failed candidates",
                    "## Observed test loss"):
        assert section in md
    assert "`delta` stopped after D = 800: optimistic loss 2.00" in md
    assert "`broken`: model 'broken': no config.json" in md
    assert "99.93 %" in md and "5e+13" in md
    table = [line for line in md.splitlines() if line.startswith("| 1 |")]
    assert table and "`org/alpha`" in table[0] and "1.0200" in table[0]


def test_every_candidate_failed(run):
    store, selection = run
    selection = {**selection, "selected": None,
                 "ranking": [r | {"status": "failed", "predicted_loss": None} for r in selection["ranking"]]}
    write_report(store, selection, [], TARGET)
    assert "No candidate selected" in store.read_text("report.md")


def test_supplied_fits_are_drawn_and_table_cells_escaped(run):
    store, selection = run
    grid = np.geomspace(100, TARGET, 50)
    fitted = {"org/alpha": (grid, _curve(grid, 20.0, 5.0, 0.5, 1.0))}
    selection["ranking"][1]["candidate"] = "be|ta"
    write_report(store, selection, store.get_all(), TARGET, fitted=fitted)
    assert "`be\\|ta`" in store.read_text("report.md")


def test_bad_selection_dict_is_refused(run):
    store, selection = run
    with pytest.raises(ValueError, match="compute"):
        Selection.from_dict({"selected": None, "ranking": []})
    bad = {**selection, "ranking": [{k: v for k, v in selection["ranking"][0].items() if k != "interval"}]}
    with pytest.raises(ValueError, match=r"ranking\[0\].*interval"):
        write_report(store, bad, [], TARGET)
    bad = {**selection, "ranking": [selection["ranking"][0] | {"status": "paused"}]}
    with pytest.raises(ValueError, match=r"ranking\[0\]\.status"):
        Selection.from_dict(bad)
    bad = {**selection, "ranking": [selection["ranking"][0] | {"params": [20.0, 0.5]}]}  # unnamed parameters
    with pytest.raises(ValueError, match=r"ranking\[0\]\.params"):
        Selection.from_dict(bad)


def test_selection_round_trips_through_its_dict(run):
    _, selection = run
    typed = Selection.from_dict(selection)
    assert isinstance(typed.ranking[0], RankingEntry) and isinstance(typed.compute, Compute)
    again = typed.to_dict()
    assert Selection.from_dict(again) == typed
    assert again["ranking"][0]["params"] == {"B": 20.0, "D_l": 5.0, "beta": 0.5, "E": 1.0}
    assert again["ranking"][3]["reason"].startswith("optimistic") and "uncharged" not in again["compute"]


def test_markdown_renders_fitted_params_by_name_and_notes(run):
    _, selection = run
    selection["ranking"][0]["params"] = {"B": 20.0, "beta": 0.5}
    selection["ranking"][1]["params"] = None
    selection["predictor"] = "lensllm"
    selection["notes"] = ["lensllm: phase mode"]
    md = render_markdown(Selection.from_dict(selection), [], TARGET, "t")
    assert "B=20, beta=0.5" in md and "| – |" in md
    assert "Predictor `lensllm`: lensllm: phase mode." in md


def test_no_secret_in_any_output(run, monkeypatch):
    """A token in the environment never reaches selection.json, report.md, probes.parquet or curves.png."""
    store, selection = run
    token = "hf_FAKEtoken_do_not_leak_42"
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "aws/FAKE+secret/value")
    store.put("leaky", {"n_samples": 0, "status": "failed", "test_loss": None,
                        "error": f"401 Unauthorized for https://hub/?token={token}"})
    selection["ranking"][-1]["error"] = f"request with Authorization: Bearer {token} failed"
    selection["ranking"][3]["reason"] = f"{token} aws/FAKE+secret/value"
    store.write_text("config.yaml", f"# token: {token}\n")
    write_report(store, selection, store.get_all(), TARGET)
    parquet = store.write_parquet()
    rows = {r["candidate"]: r for r in pq.read_table(parquet).to_pylist()}
    assert rows["leaky"]["error"] == "401 Unauthorized for https://hub/?token=***"
    files = [p for p in Path(store.root).rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"selection.json", "report.md", "curves.png", "probes.parquet", "config.yaml"}
    for path in files:
        data = path.read_bytes()
        assert token.encode() not in data, path
        assert b"aws/FAKE+secret/value" not in data, path
    assert "***" in store.read_text("report.md")


def test_predictor_curves_end_at_the_ranking_prediction(run):
    from lensray.core.curves import Curves
    from lensray.core.selection import get_selector

    store, selection = run
    D = np.array(SIZES, dtype=float)
    laws = [(20.0, 5.0, 0.5, 1.0), (25.0, 6.0, 0.45, 1.2), (18.0, 4.0, 0.4, 1.4), (30.0, 5.0, 0.3, 2.0)]
    L = np.array([_curve(D, *law) for law in laws])
    L[3, 4:] = np.nan  # pruned after D = 800
    curves = Curves(ids=["a", "b", "c", "d"], D=D, L=L, size=np.full(4, np.nan), family=[None] * 4)
    selector = get_selector("lensray")
    final = selector.predict(curves, TARGET).loss
    fitted = predictor_curves(selector, curves, TARGET)
    assert set(fitted) == {"a", "b", "c", "d"}
    for i, cid in enumerate(curves.ids):
        xs, ys = fitted[cid]
        assert xs[0] == (800 if cid == "d" else 3200) and ys[0] == L[i, np.isfinite(L[i])][-1]
        assert xs[-1] == TARGET and ys[-1] == pytest.approx(final[i])
        assert np.all(np.diff(xs) > 0)
    write_report(store, selection, store.get_all(), TARGET, fitted={"org/alpha": fitted["a"]})
    assert store.exists("curves.png")


def test_large_zoo_plot_and_report(tmp_path):
    """300 candidates: the report lists them all and the plot stays readable (top ones in colour)."""
    from lensray.run.report import GREY, TOP_COLOURED, _colours

    store = ProbeStore(str(tmp_path / "big"))
    rng = np.random.default_rng(1)
    probes, ranking = [], []
    for k in range(300):
        cand = f"m{k:03d}"
        law = (rng.uniform(10, 30), rng.uniform(3, 8), rng.uniform(0.3, 0.6), rng.uniform(0.8, 2.0))
        for d, loss in zip(SIZES, _curve(np.array(SIZES, float), *law)):
            probes.append({"candidate": cand, "n_samples": d, "status": "ok", "test_loss": float(loss)})
        pred = float(_curve(np.array([TARGET], float), *law)[0])
        ranking.append({"candidate": cand, "status": "finished", "predicted_loss": pred, "interval": [pred * 0.9, pred * 1.1],
                        "pruned_at": None, "params": None, "flops": 1e9, "error": None})
    ranking.sort(key=lambda r: r["predicted_loss"])
    selection = {"selected": ranking[0]["candidate"], "ranking": ranking,
                 "compute": {"flops_spent": 3e11, "flops_full_tuning": 1e15, "saved_fraction": 0.9997,
                             "gpu_seconds": 10.0, "wall_seconds": 60.0}}
    write_report(store, selection, probes, TARGET)
    md = store.read_text("report.md")
    assert "300 candidates: 300 finished" in md and md.count("| finished |") == 300
    colours = _colours(300)
    assert len(set(colours[:TOP_COLOURED])) == TOP_COLOURED and set(colours[TOP_COLOURED:]) == {GREY}
    assert len(set(_colours(20))) == 20


def test_ranking_panel_lists_predictions_in_ranking_order():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lensray.run.report import _colours, _plot_ranking

    ranking = [
        {"candidate": "a", "status": "finished", "predicted_loss": 1.5, "interval": [1.2, 1.9], "pruned_at": None},
        {"candidate": "b", "status": "finished", "predicted_loss": 1.7, "interval": [None, None], "pruned_at": None},
        {"candidate": "c", "status": "pruned", "predicted_loss": 2.4, "interval": [1.9, 3.1], "pruned_at": 1600},
        {"candidate": "d", "status": "failed", "predicted_loss": None, "interval": [None, None], "pruned_at": None},
    ]
    ranking = [RankingEntry(**r, params=None, flops=0.0, error=None) for r in ranking]
    fig, ax = plt.subplots()
    _plot_ranking(ax, ranking, _colours(len(ranking)), "a", 51200)
    labels = [t.get_text() for t in ax.get_yticklabels()]
    assert labels == ["a (finished)", "b (finished)", "c (pruned at 1,600)"]  # the failed row has no prediction
    assert ax.get_yticklabels()[0].get_fontweight() == "bold" and ax.get_xscale() == "log"
    lines = [ln for ln in ax.get_lines() if len(ln.get_xdata()) == 2 and ln.get_linestyle() == "-"]
    assert sorted(tuple(ln.get_xdata()) for ln in lines) == [(1.2, 1.9), (1.9, 3.1)]  # b has no interval
    hollow = [ln for ln in ax.get_lines() if ln.get_marker() == "o"]
    assert len(hollow) == 1 and hollow[0].get_markerfacecolor() == "white" and hollow[0].get_ydata()[0] == 2
    plt.close(fig)


def test_the_plot_keeps_every_point_in_view_and_names_the_candidates(run, monkeypatch):
    """A zero-shot loss far above the fine-tuned ones is drawn inside the axes (a log loss axis),
    and the legend names the candidates."""
    import matplotlib.figure

    from lensray.run.report import plot_curves
    from lensray.run.results import Selection

    store, selection = run
    probes = [dict(r) for r in store.get_all()]
    probes.append({"candidate": "org/alpha", "n_samples": 0, "status": "ok", "test_loss": 40.0})
    seen = {}
    real_savefig = matplotlib.figure.Figure.savefig

    def savefig(self, *args, **kwargs):
        seen["axes"] = self.axes[0]
        return real_savefig(self, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", savefig)
    plot_curves(Selection.from_dict(selection), probes, TARGET)
    ax = seen["axes"]
    lo, hi = ax.get_ylim()
    losses = [r["test_loss"] for r in probes if r.get("test_loss") is not None]
    assert ax.get_yscale() == "log" and lo <= min(losses) and max(losses) <= hi
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert {"org/alpha", "beta", "gamma", "delta"} <= set(labels)
