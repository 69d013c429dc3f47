"""Object storage over the S3 protocol: an S3 API server (moto) on 127.0.0.1, ``storage.path``
an ``s3://`` URI with an endpoint override, credentials from the environment only. A replayed
screening is killed mid-run and resumed; a small fine-tuning screening writes there too; the
results are read back from the bucket with pyarrow."""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from lensray.core.synthetic_zoo import synthetic_zoo, write_curves_csv

pytestmark = pytest.mark.slow
BUCKET = "lensray-screens"
TARGET = 1_638_400
GRID = [0, 200, 400, 800, 1600, 3200, 6400]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3():
    """A moto S3 server on a free local port with one bucket; yields (endpoint, env, filesystem).

    ``env``: the screenings' environment, credentials only there, Ray's temp dir its own."""
    server_mod = pytest.importorskip("moto.server", reason="moto[server] (dev extra)")
    import pyarrow.fs as pafs

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    temp = tempfile.mkdtemp(prefix="lrs", dir="/tmp")  # Ray's temp dir (short: socket path limit)
    key, secret = "AKIA" + secrets.token_hex(8).upper(), secrets.token_urlsafe(30)
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_") and k != "RAY_ADDRESS"}
    env.update(AWS_ACCESS_KEY_ID=key, AWS_SECRET_ACCESS_KEY=secret, AWS_DEFAULT_REGION="us-east-1",
               RAY_TMPDIR=temp)
    fs = pafs.S3FileSystem(access_key=key, secret_key=secret, endpoint_override=f"127.0.0.1:{port}", scheme="http",
                           region="us-east-1", allow_bucket_creation=True)
    fs.create_dir(BUCKET)
    try:
        yield f"127.0.0.1:{port}", env, fs
    finally:
        server.stop()
        shutil.rmtree(temp, ignore_errors=True)


def _uri(endpoint: str, prefix: str) -> str:
    return f"s3://{BUCKET}/{prefix}?endpoint_override={endpoint}&scheme=http"


def _start(args: list[str], log: Path, env: dict) -> subprocess.Popen:
    with open(log, "w") as fh:
        return subprocess.Popen([sys.executable, "-m", "lensray", "screen", *args], stdout=fh, stderr=subprocess.STDOUT,
                                start_new_session=True, env=env)


def _objects(fs, prefix: str) -> dict[str, tuple[bytes, float]]:
    """Probe objects under ``prefix``: bytes and modification time."""
    import pyarrow.fs as pafs

    found = {}
    for info in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}/probes", recursive=True, allow_not_found=True)):
        if info.type == pafs.FileType.File and info.base_name.endswith(".json"):
            with fs.open_input_stream(info.path) as inp:
                found[info.path] = (inp.read(), info.mtime.timestamp())
    return found


def _assert_no_secret(env: dict, logs: list[Path], fs, prefix: str) -> None:
    """Neither the captured logs, nor Ray's own logs (its temp dir), nor an object under ``prefix``
    holds the secret key."""
    import pyarrow.fs as pafs

    secret = env["AWS_SECRET_ACCESS_KEY"]
    ray_logs = [p for p in Path(env["RAY_TMPDIR"]).rglob("*") if p.is_file() and not p.is_socket()
                and p.suffix in (".log", ".out", ".err", ".txt", ".json")]
    assert ray_logs, "Ray wrote no logs where expected"
    for path in logs + ray_logs:
        assert secret not in path.read_text(errors="ignore"), path
    for info in fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", recursive=True)):
        if info.type == pafs.FileType.File:
            with fs.open_input_stream(info.path) as inp:
                assert secret.encode() not in inp.read(), info.path


def test_s3_screening_killed_and_resumed_loses_and_repeats_nothing(s3, tmp_path):
    import pyarrow.parquet as pq

    endpoint, env, fs = s3
    csv = write_curves_csv(synthetic_zoo(12, seed=11), tmp_path / "zoo.csv")
    common = ["--replay", str(csv), "--max-samples", str(GRID[-1]), "--target-samples", str(TARGET)]
    uri = _uri(endpoint, "replay")
    proc = _start([*common, "--out", uri], tmp_path / "run.log", env)
    end = time.monotonic() + 120
    while len(_objects(fs, "replay")) < 15:
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < end, "no probes reached the bucket"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not fs.get_file_info(f"{BUCKET}/replay/selection.json").is_file  # killed mid-run
    before = _objects(fs, "replay")

    resumed = _start([*common, "--out", uri, "--resume"], tmp_path / "resume.log", env)
    assert resumed.wait(timeout=240) == 0, (tmp_path / "resume.log").read_text()[-3000:]
    after = _objects(fs, "replay")
    assert all(after[name] == seen for name, seen in before.items())  # no probe rewritten, none lost
    assert len(after) > len(before)

    with fs.open_input_file(f"{BUCKET}/replay/probes.parquet") as inp:
        table = pq.read_table(inp)
    with fs.open_input_stream(f"{BUCKET}/replay/selection.json") as inp:
        selection = json.loads(inp.read())
    assert table.num_rows == len(after)
    rows = table.to_pylist()
    assert len(selection["ranking"]) == 12 and selection["selected"]
    for entry in selection["ranking"]:
        sizes = sorted(r["n_samples"] for r in rows if r["candidate"] == entry["candidate"])
        assert sizes == GRID[: len(sizes)]
        assert entry["status"] == "pruned" or (entry["status"] == "finished" and sizes == GRID)
    for name in ("report.md", "curves.png", "config.yaml"):
        assert fs.get_file_info(f"{BUCKET}/replay/{name}").is_file
    _assert_no_secret(env, [tmp_path / "run.log", tmp_path / "resume.log"], fs, "replay")


def test_s3_fine_tuning_screening_writes_probes_and_ray_state_to_the_bucket(s3, tmp_path):
    import pyarrow.fs as pafs
    import pyarrow.parquet as pq
    import yaml

    endpoint, env, fs = s3
    config = {
        "name": "s3", "ray": {"num_cpus": 2, "num_gpus": 0}, "target_samples": 51200,
        "storage": {"path": _uri(endpoint, "train")},
        "grid": {"start": 200, "factor": 2, "max_samples": 800, "zero_shot": True},
        "zoo": [{"id": "a", "model": "tiny:gpt2:n_layer=2,n_embd=64,pretrain=10"},
                {"id": "b", "model": "tiny:llama:n_layer=2,n_embd=64,pretrain=10", "workers": 2, "cpus": 1}],
        "task": {"source": "synthetic", "max_length": 64, "test_size": 64, "validation_size": 16},
        "probe": {"learning_rate": 1.0e-3, "epochs": 1, "micro_batch": 16, "device": "cpu", "eval_batch": 64},
    }
    (tmp_path / "s3.yaml").write_text(yaml.safe_dump(config))
    done = subprocess.run([sys.executable, "-m", "lensray", "screen", str(tmp_path / "s3.yaml")], capture_output=True,
                          text=True, env=env, timeout=300)
    (tmp_path / "out.log").write_text(done.stdout + done.stderr)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    with fs.open_input_file(f"{BUCKET}/train/probes.parquet") as inp:
        table = pq.read_table(inp)
    rows = table.to_pylist()
    assert sorted((r["candidate"], r["n_samples"]) for r in rows) == [(c, n) for c in "ab" for n in (0, 200, 400, 800)]
    assert all(r["backend"] == "train" and r["test_loss"] > 0 for r in rows)
    # Tune (every trial) and Ray Train (the two-worker candidate b) keep their state in the same bucket,
    # not on the driver's disk
    for name in ("tune", "train"):
        assert fs.get_file_info(pafs.FileSelector(f"{BUCKET}/train/{name}", recursive=True)), name
    _assert_no_secret(env, [tmp_path / "out.log"], fs, "train")
