"""End to end through a Ray cluster: start a local head (``ray start --head``, temp dir and
non-default ports), submit a small screening with ``ray job submit``, wait, check the outputs,
stop the head."""

from __future__ import annotations

import json
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
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture()
def ray_head():
    """A local Ray head of this test only; yields the job API address."""
    temp = tempfile.mkdtemp(prefix="lrj", dir="/tmp")  # short: Ray's socket paths have a length limit
    dash = _free_port()
    ports = ["--port", str(_free_port()), "--dashboard-port", str(dash), "--ray-client-server-port", str(_free_port()),
             "--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
             "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
             "--min-worker-port", "0", "--max-worker-port", "0"]
    # Ray's token authentication with a token of this test only (not ~/.ray/auth_token)
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
    head = subprocess.Popen([str(BIN / "ray"), "start", "--head", "--block", "--num-cpus", "2", "--num-gpus", "0",
                             "--include-dashboard", "true", "--disable-usage-stats", "--temp-dir", temp, *ports],
                            stdout=open(Path(temp) / "head.log", "w"), stderr=subprocess.STDOUT, start_new_session=True,
                            env=env)
    address = f"http://127.0.0.1:{dash}"
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(BIN / "ray"), "job", "list", "--address", address], capture_output=True,
                             env=env).returncode:
            assert head.poll() is None, "ray start --head exited: " + (Path(temp) / "head.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "the Ray head did not come up"
            time.sleep(1)
        yield address, env
    finally:
        try:
            os.killpg(head.pid, signal.SIGKILL)  # the head and every process it started (its own session)
        except ProcessLookupError:
            pass
        head.wait(timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_ray_job_submit_screens_and_writes_outputs(ray_head, tmp_path):
    address, env = ray_head
    csv = write_curves_csv(synthetic_zoo(8, seed=4), tmp_path / "zoo.csv")
    out = tmp_path / "out"
    cmd = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(REPO),
           "--", sys.executable, "jobs/screen.py", "--replay", str(csv), "--max-samples", "3200",
           "--target-samples", "1638400", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in (done.stdout + done.stderr).lower()
    selection = json.loads((out / "selection.json").read_text())
    assert selection["selected"] in {e["candidate"] for e in selection["ranking"]}
    assert len(selection["ranking"]) == 8
    for name in ("report.md", "curves.png", "probes.parquet"):
        assert (out / name).is_file()
    assert "selected:" in done.stdout
    assert selection["output"] == str(out) and f"outputs in {out}" in done.stdout  # the absolute URI
    # a relative --out would land in the job's temporary copy of the working dir: refused, exit 2
    refused = subprocess.run([*cmd[:-1], "runs/lost"], capture_output=True, text=True, env=env, timeout=400)
    assert refused.returncode != 0
    assert "error: storage.path: 'runs/lost' is relative, and inside a Ray job" in refused.stdout + refused.stderr
    assert "Traceback" not in refused.stdout + refused.stderr
    token = env["RAY_AUTH_TOKEN"]
    assert all(token not in p.read_text(errors="ignore") for p in out.rglob("*") if p.is_file() and p.suffix != ".png")
