"""Probe store: atomic writes, partial files ignored, traversal-safe keys, writability, resume, redaction."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import numpy as np
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from lensray.errors import LensrayInputError
from lensray.redact import install_log_redaction, redact
from lensray.run.store import ProbeStore, candidate_key


def _result(n: int, loss: float = 2.0, **extra) -> dict:
    return {"n_samples": n, "status": "ok", "test_loss": loss, "flops": 6.0 * n, **extra}


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def test_put_and_read_back(tmp_path):
    store = ProbeStore(str(tmp_path / "out"))
    for n, loss in [(0, 3.0), (200, 2.5), (400, 2.2)]:
        store.put("org/model-a", _result(n, loss, ntk={"F": 1.5, "eig": np.array([2.0, 1.0])}))
    store.put("b", _result(200, np.float32(1.25)))
    done = store.completed("org/model-a")
    assert sorted(done) == [0, 200, 400]
    assert done[200]["test_loss"] == 2.5 and done[200]["candidate"] == "org/model-a"
    assert done[0]["ntk"] == {"F": 1.5, "eig": [2.0, 1.0]}
    assert [(r["candidate"], r["n_samples"]) for r in store.get_all()] == [
        ("b", 200),
        ("org/model-a", 0),
        ("org/model-a", 200),
        ("org/model-a", 400),
    ]
    assert store.completed("never-ran") == {}


def test_nan_is_stored_as_null_and_bad_n_samples_refused(tmp_path):
    store = ProbeStore(str(tmp_path))
    store.put("a", _result(200, float("nan"), status="diverged"))
    assert store.completed("a")[200]["test_loss"] is None
    with pytest.raises(ValueError, match="n_samples"):
        store.put("a", {"test_loss": 1.0})
    with pytest.raises(ValueError, match="n_samples"):
        store.put("a", {"n_samples": 2.5})


class _FailingFS:
    """Delegates to a real pyarrow filesystem, except for the methods told to fail."""

    def __init__(self, fs, **failing):
        self._fs, self._failing = fs, failing

    def __getattr__(self, name):
        if name in self._failing:

            def fail(*args, **kwargs):
                raise self._failing[name]

            return fail
        return getattr(self._fs, name)


def test_put_is_atomic_and_leaves_no_temp_file(tmp_path):
    store = ProbeStore(str(tmp_path))
    store.put("a", _result(200))
    assert [p.name for p in _files(tmp_path)] == ["200.json"]
    store.fs = _FailingFS(store.fs, move=OSError("simulated crash before the rename"))
    with pytest.raises(OSError, match="simulated"):
        store.put("a", _result(400))
    assert [p.name for p in _files(tmp_path)] == ["200.json"]


def test_partial_corrupt_and_temp_files_are_ignored(tmp_path, caplog):
    store = ProbeStore(str(tmp_path))
    store.put("a", _result(200))
    path = Path(store.put("a", _result(400)))
    folder = path.parent
    full = path.read_text()
    path.write_text(full[: len(full) // 2])  # a crash mid-write (no atomic rename on this backend)
    (folder / "800.json").write_text("")
    (folder / ".1600.json.tmp-deadbeef").write_text(json.dumps(_result(1600)))
    (folder / "3200.json").write_text(json.dumps(_result(6400)))  # name and content disagree
    (folder / "12800.json").write_text(json.dumps({"n_samples": 12800, "candidate": "someone-else"}))
    (folder / "notes.txt").write_text("not a result")
    with caplog.at_level(logging.WARNING, logger="lensray.run.store"):
        done = store.completed("a")
        everything = store.get_all()
    assert sorted(done) == [200]
    assert [r["n_samples"] for r in everything] == [200]
    assert any("400.json" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("evil", ["../../x", "/etc/passwd", "..", ".", "a/../../b", "C:\\win\\x", "", "~root/.ssh"])
def test_candidate_ids_cannot_escape_the_store(tmp_path, evil):
    root = tmp_path / "out"
    store = ProbeStore(str(root))
    path = Path(store.put(evil, _result(200)))
    assert path.resolve().is_relative_to(root.resolve())
    key = candidate_key(evil)
    assert "/" not in key and "\\" not in key and not key.startswith(".") and key not in ("", ".", "..")
    assert path.parent.name == key
    assert [f for f in _files(tmp_path) if not f.resolve().is_relative_to(root.resolve())] == []
    assert store.completed(evil)[200]["candidate"] == evil


def test_distinct_ids_get_distinct_keys():
    ids = ["a/b", "a_b", "a b", "A/B", "a-b", "../a/b"]
    assert len({candidate_key(i) for i in ids}) == len(ids)


@pytest.mark.parametrize("name", ["../x.json", "/tmp/x.json", "a/../../x", ""])
def test_output_names_stay_inside(tmp_path, name):
    store = ProbeStore(str(tmp_path))
    with pytest.raises(ValueError):
        store.write_text(name, "x")


def test_unwritable_location_is_detected_up_front(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("in the way")
    with pytest.raises(LensrayInputError, match=r"^storage\.path: .*a-file/out is not writable"):
        ProbeStore(str(blocker / "out"))


@pytest.mark.parametrize(
    "failing",
    [
        {"open_output_stream": OSError(28, "No space left on device")},
        {"create_dir": PermissionError(13, "Permission denied")},
        {"open_input_stream": OSError(5, "Input/output error")},
        {"delete_file": PermissionError(13, "Permission denied")},
    ],
)
def test_full_or_failing_filesystem_is_detected(tmp_path, failing):
    store = ProbeStore(str(tmp_path / "out"), check=False)
    store.fs = _FailingFS(pafs.LocalFileSystem(), **failing)
    with pytest.raises(LensrayInputError) as info:
        store.check_writable()
    msg = str(info.value)
    assert msg.startswith(f"storage.path: {tmp_path / 'out'} is not writable") and "\n" not in msg
    assert str(next(iter(failing.values())).strerror) in msg


def test_bad_uri_is_an_input_error():
    with pytest.raises(LensrayInputError, match=r"^storage\.path: cannot open"):
        ProbeStore("nosuchscheme://bucket/x")


def test_resume_sees_previous_results_through_a_new_store(tmp_path):
    uri = f"file://{tmp_path}/run"
    first = ProbeStore(uri)
    first.put("a", _result(200))
    first.put("a", _result(400))
    second = ProbeStore(uri)
    assert sorted(second.completed("a")) == [200, 400]
    second.put("a", _result(400, 1.0))  # a re-run probe replaces the old record
    assert second.completed("a")[400]["test_loss"] == 1.0


def test_outputs_and_parquet(tmp_path):
    store = ProbeStore(str(tmp_path))
    store.put("a", _result(0, ntk={"F": 1.0}))
    store.put("a", _result(200, error=None))
    store.put("b", _result(200, status="failed", error="cannot load", test_loss=None))
    path = store.write_parquet()
    table = pq.read_table(path)
    assert table.num_rows == 3
    assert set(table.column_names) >= {"candidate", "n_samples", "test_loss", "status", "ntk", "error"}
    assert json.loads(table.column("ntk")[0].as_py()) == {"F": 1.0}
    store.write_json("selection.json", {"x": np.float64(1.5), "y": float("inf")})
    assert json.loads(store.read_text("selection.json")) == {"x": 1.5, "y": None}
    store.write_text("sub/report.md", "# hi\n")
    assert store.exists("sub/report.md") and store.read_text("missing.txt") is None


def test_redaction_of_secret_env_values(tmp_path, monkeypatch):
    secret = "hf_FAKE_token_0123456789"
    aws = "AKIAFAKEFAKEFAKE1234"
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", aws)
    monkeypatch.setenv("MY_SERVICE_PASSWORD", "hunter2hunter2")
    assert redact(f"x {secret} y {aws} z hunter2hunter2") == "x *** y *** z ***"
    assert redact("nothing secret", environ={"HOME": "/root"}) == "nothing secret"
    store = ProbeStore(str(tmp_path))
    store.put(f"model-{secret}", _result(200, error=f"401 for token {secret}"))
    store.write_text("report.md", f"token={secret}")
    store.write_json("selection.json", {"error": aws})
    store.write_parquet()
    for path in _files(tmp_path):
        data = path.read_bytes()
        assert secret.encode() not in data and aws.encode() not in data, path
    monkeypatch.setenv("DB_PASSWORD", 'pa"ss\\wörd-42')
    store.write_json("quoted.json", {"note": 'login pa"ss\\wörd-42 failed'})
    assert json.loads(store.read_text("quoted.json")) == {"note": "login *** failed"}
    raw = [{"candidate": "x", "n_samples": 1, "error": f"t {secret}", "nested": {"k": aws}, "mixed": 1},
           {"candidate": "y", "n_samples": 2, "error": None, "nested": None, "mixed": f"{secret}"}]
    cells = pq.read_table(store.write_parquet(raw, name="raw.parquet")).to_pylist()
    assert cells[0]["error"] == "t ***" and json.loads(cells[0]["nested"]) == {"k": "***"}
    assert cells[1]["mixed"] == "***" and cells[0]["mixed"] == "1"


def test_log_redaction_covers_every_logger(monkeypatch, caplog):
    secret = "hf_FAKE_log_token_987654321"
    monkeypatch.setenv("HF_TOKEN", secret)
    previous = logging.getLogRecordFactory()
    try:
        install_log_redaction()
        install_log_redaction()  # idempotent: one wrapper
        assert logging.getLogRecordFactory() is not previous
        with caplog.at_level(logging.INFO):
            logging.getLogger("ray.tune").warning("request failed with token %s", secret)
            logging.getLogger("lensray.engine.probe").info(f"loading with {secret}")
        assert [r.getMessage() for r in caplog.records] == ["request failed with token ***", "loading with ***"]
        assert secret not in caplog.text
    finally:
        logging.setLogRecordFactory(previous)


def test_nearly_full_local_disk_is_detected(tmp_path, monkeypatch):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage._replace(free=10 * 2**20))
    with pytest.raises(LensrayInputError, match=r"^storage\.path: .* is nearly full \(10\.0 MiB free"):
        ProbeStore(str(tmp_path / "out"))


def test_uri_backed_store_works_without_a_local_disk():
    """Any pyarrow filesystem URI: here pyarrow's in-memory ``mock://`` filesystem stands in for s3:// or gs://."""
    store = ProbeStore("mock:///bucket/run")
    assert store.root == "bucket/run" and not isinstance(store.fs, pafs.LocalFileSystem)
    store.put("../../escape", _result(200))
    store.put("org/m", _result(400))
    store.write_json("selection.json", {"selected": "org/m"})
    store.write_parquet()
    listed = [i.path for i in store.fs.get_file_info(pafs.FileSelector("", recursive=True)) if i.is_file]
    assert listed and all(p.startswith("bucket/run/") for p in listed)
    assert [r["candidate"] for r in store.get_all()] == ["../../escape", "org/m"]
    assert json.loads(store.read_text("selection.json")) == {"selected": "org/m"}


def test_relative_local_path_is_made_absolute(tmp_path, monkeypatch):
    """Ray workers run in their own working directory: the URI they get must be absolute."""
    from lensray.run.store import ProbeStore

    monkeypatch.chdir(tmp_path)
    store = ProbeStore("runs/rel")
    assert os.path.isabs(store.uri)
    assert store.uri == str(tmp_path / "runs" / "rel")


def test_ok_records_and_the_size_fallback():
    from lensray.run.store import candidate_size, is_ok

    assert is_ok({"status": "ok"}) and is_ok({}) and not is_ok({"status": "diverged"})
    records = [{"candidate": "a", "n_params": None}, {"candidate": "b", "n_params": 7.0e6},
               {"candidate": "a", "n_params": 1.2e8}]
    assert candidate_size("a", 3.0e8, records) == 3.0e8  # the config's (or the table's) size first
    assert candidate_size("a", None, records) == 1.2e8  # else what its probes counted
    assert candidate_size("c", None, records) is None


def test_uri_of_keeps_the_query_after_the_name(tmp_path):
    store = ProbeStore("mock://bucket/run?region=us-east-1", check=False)
    assert store.uri_of("tune") == "mock://bucket/run/tune?region=us-east-1"
    assert ProbeStore("mock://bucket/run/", check=False).uri_of("train") == "mock://bucket/run/train"
    assert ProbeStore(str(tmp_path)).uri_of("tune") == f"{tmp_path}/tune"


@pytest.mark.parametrize("key", ["secret_key", "access_key", "session_token"])
def test_credentials_in_the_uri_are_refused(key):
    with pytest.raises(LensrayInputError, match=f"storage.path: credentials in the URI \\({key}\\)"):
        ProbeStore(f"s3://bucket/run?endpoint_override=127.0.0.1:9&{key}=abcdef", check=False)
