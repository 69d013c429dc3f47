"""Hostile and broken inputs: each gives one ``error: ...`` line naming the field, file or row and
exit code 2 before Ray starts; a damaged stored record is set aside and probed again."""

import json
import time

import pytest

from lensray.cli.main import main
from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv
from lensray.run.store import DAMAGED_MARK, ProbeStore, candidate_key

TINY = "tiny:gpt2:n_layer=1,n_embd=32"


@pytest.fixture(autouse=True)
def _no_ray(monkeypatch, tmp_path):
    """Every case here is refused before Ray; starting it fails the test."""
    monkeypatch.setenv("LENSRAY_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args, **kwargs):
        raise AssertionError("Ray was started")

    monkeypatch.setattr("lensray.run.screen._init_ray", refuse)


def _one_error(capsys, *words):
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def table(tmp_path):
    return write_curves_csv(synthetic_zoo(3, seed=2), tmp_path / "t.csv")


def _config(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_replay_config_whose_grid_is_an_integer(tmp_path, table, capsys):
    cfg = _config(tmp_path, "grid: 5\n")
    assert main(["screen", cfg, "--replay", str(table), "--max-samples", "3200", "--plan"]) == 2
    _one_error(capsys, "grid:", "mapping")


def _store_with(tmp_path, table, record):
    from lensray.core.curves import load_curves_csv

    curves = load_curves_csv(str(table), allow_missing=True)
    store = ProbeStore(str(tmp_path / "out"))
    for cid in curves.ids:
        store.put(cid, {"n_samples": 200, "status": "ok", "test_loss": 2.5, "tokens": 7000, "flops": 1e9})
    bad = curves.ids[0]
    path = tmp_path / "out" / "probes" / candidate_key(bad) / "200.json"
    path.write_text(json.dumps({"candidate": bad, "n_samples": 200, **record}))
    return store, curves, path


@pytest.mark.parametrize("record", [
    {"status": "ok", "test_loss": "abc"},
    {"status": "ok", "test_loss": None},
    {"status": "ok", "test_loss": -1.0},
    {"status": "ok", "test_loss": 2.0, "tokens": "many"},
    {"status": "ok", "test_loss": 2.0, "flops": "lots"},
], ids=["loss-string", "loss-null", "loss-negative", "tokens-string", "flops-string"])
def test_damaged_probe_record_is_set_aside_and_probed_again(tmp_path, table, record, caplog, capsys):
    from lensray.run.config import load_config
    from lensray.run.store import make_plan

    store, curves, path = _store_with(tmp_path, table, record)
    root = tmp_path / "out"
    before = {p.relative_to(root) for p in root.rglob("*.json")}
    # a plan reads the store but writes nothing: the damaged file stays, and is counted as to run
    assert main(["screen", "--replay", str(table), "--max-samples", "3200", "--plan", "--out", str(root)]) == 0
    assert path.is_file() and "Traceback" not in capsys.readouterr().err
    # a run sets it aside with a warning naming the file; the other candidates' probes stay
    config = load_config({"zoo": [{"id": c} for c in curves.ids], "grid": {"max_samples": 3200}}, check_task=False)
    with caplog.at_level("WARNING"):
        plans = make_plan(config, store, [0, 200, 400], None)
    assert 200 in plans[0].todo and all(200 not in p.todo for p in plans[1:])
    assert not path.exists()
    aside = list(path.parent.glob(f"200.json{DAMAGED_MARK}*"))
    assert len(aside) == 1 and json.loads(aside[0].read_text())["n_samples"] == 200
    assert str(path) in caplog.text and "set aside" in caplog.text
    assert {p.relative_to(root) for p in root.rglob("*.json")} == before - {path.relative_to(root)}


def test_damaged_records_leave_ranking_and_bill_well_defined(tmp_path, table):
    from lensray.run.ranking import curves_from_store, tokens_per_sample

    store, curves, _ = _store_with(tmp_path, table, {"status": "ok", "test_loss": "abc", "tokens": "x"})
    records = store.get_all()
    assert {r["candidate"] for r in records} == set(curves.ids[1:])
    grid = [200]
    c = curves_from_store(list(curves.ids), grid, records, {}, {})
    assert c.L[0, 0] != c.L[0, 0] and (c.L[1:, 0] == 2.5).all()
    assert tokens_per_sample(records, 35.0) == 35.0


@pytest.mark.parametrize("model", ["tiny:gpt2:n_layer=abc", "tiny:gpt2:n_layer=-1", "tiny:gpt2:seed=x"])
def test_bad_tiny_model_option(model, capsys):
    assert main(["probe", "--model", model, "--sizes", "0"]) == 2
    _one_error(capsys, repr(model), "option")


def test_bad_tiny_model_option_in_a_config_is_refused_before_ray(tmp_path, capsys):
    cfg = _config(tmp_path, "zoo: [{id: a, model: 'tiny:gpt2:n_layer=abc'}]\ngrid: {max_samples: 800}\n")
    assert main(["screen", cfg, "--out", str(tmp_path / "out")]) == 2
    _one_error(capsys, "zoo[0].model", "n_layer")


def test_unknown_device(capsys):
    assert main(["probe", "--model", TINY, "--sizes", "0", "--device", "tpu"]) == 2
    _one_error(capsys, "probe.device", "tpu")


@pytest.mark.parametrize("value", [".inf", ".nan", "-.inf", "1.0e9"])
def test_non_finite_or_huge_epochs_in_a_task_file(tmp_path, value, capsys):
    task = _config(tmp_path, f"task: {{source: synthetic}}\nprobe: {{epochs: {value}}}\n", "t.yaml")
    assert main(["probe", "--model", TINY, "--task", task, "--sizes", "0,100"]) == 2
    _one_error(capsys, "probe.epochs")


@pytest.mark.parametrize("template", ["{0}", "{}", "{input!z}", "{input:%%}", "{input.upper}", "{input:{w}}",
                                      "{input", "{nothere}"])
def test_bad_template(tmp_path, template, capsys):
    cfg = _config(tmp_path, f"zoo: [{{id: a, model: '{TINY}'}}]\ngrid: {{max_samples: 800}}\n"
                            f"task: {{template: {json.dumps(template)}}}\n")
    assert main(["screen", cfg, "--plan"]) == 2
    _one_error(capsys, "task.template")


def test_good_template_is_used(tmp_path):
    from lensray.engine.data import TaskConfig, load_task

    data = load_task(TaskConfig(template="Q: {input!s:>12}\nA:", synthetic_rows=400, test_size=16, validation_size=4))
    assert data.train[0].prompt.startswith("Q: ") and data.train[0].prompt.endswith("\nA:")


def test_huge_synthetic_task_is_refused_with_the_bound(tmp_path, capsys):
    from lensray.engine.data import MAX_SYNTHETIC_ROWS

    cfg = _config(tmp_path, f"zoo: [{{id: a, model: '{TINY}'}}]\ntask: {{synthetic_rows: {10**12}}}\n")
    t0 = time.perf_counter()
    assert main(["screen", cfg, "--out", str(tmp_path / "out")]) == 2
    assert time.perf_counter() - t0 < 10
    _one_error(capsys, "task.synthetic_rows", str(MAX_SYNTHETIC_ROWS))


@pytest.mark.parametrize("target", ["", "   ", None])
def test_task_whose_every_target_is_empty(tmp_path, target, capsys):
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"input": f"q{i}", "target": target}) + "\n" for i in range(300)))
    cfg = _config(tmp_path, f"zoo: [{{id: a, model: '{TINY}'}}]\ngrid: {{max_samples: 100, start: 10}}\n"
                            f"task: {{source: {rows}, test_size: 16, validation_size: 4, max_bad_fraction: 1}}\n")
    assert main(["screen", cfg, "--out", str(tmp_path / "out")]) == 2
    _one_error(capsys, str(rows), "target")


@pytest.mark.parametrize("uri", ["gs://lensray-no-such-bucket-x/run", "s3://lensray-no-such-bucket-x/run"])
def test_unreachable_bucket_fails_fast(tmp_path, table, uri, capsys, monkeypatch):
    monkeypatch.setattr("lensray.run.store.REACH_TIMEOUT_S", 2.0)
    for extra in (["--plan"], []):
        t0 = time.perf_counter()
        assert main(["screen", "--replay", str(table), "--max-samples", "3200", "--out", uri, *extra]) == 2
        assert time.perf_counter() - t0 < 15
        _one_error(capsys, "storage.path", f"cannot reach {uri}")
