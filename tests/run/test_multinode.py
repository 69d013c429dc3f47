"""Screenings on a Ray cluster of several nodes on this machine: a head (no CPUs: it runs no probe)
and worker nodes started with ``ray start`` on 127.0.0.1 (temp dir, token and ports of this test
only), storage on a local folder all nodes share.

- Several nodes: candidates run on both workers; one worker node is killed (SIGKILL of its
  raylet and every process it started) in the middle of a candidate's probes. The candidate goes
  on on the other node, no finished probe is repeated, none is lost, and the losses and the
  ranking equal those of the same probes run without Ray.
- Autoscaling: Ray's own autoscaler on its fake multi-node provider (``cluster/fake-multinode.yaml``,
  node types mirroring ``cluster/aws-gpu.yaml``: a head with no CPU, workers from zero) adds
  workers for the queued trials, the screening completes on them, and the idle workers are
  removed; no placement group or actor is left.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest
import yaml

from lensray.run.store import ProbeStore, candidate_key

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
GRID = [0, 200, 400, 800]
ZOO = [{"id": "gpt2", "model": "tiny:gpt2:n_layer=2,n_embd=64,pretrain=10"},
       {"id": "llama", "model": "tiny:llama:n_layer=2,n_embd=64,pretrain=10"},
       {"id": "opt", "model": "tiny:opt:n_layer=2,n_embd=64,pretrain=10"}]
TASK = {"source": "synthetic", "max_length": 64, "test_size": 64, "validation_size": 16}
PROBE = {"learning_rate": 1.0e-3, "epochs": 1, "micro_batch": 16, "device": "cpu", "eval_batch": 64}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _node_ports() -> list[str]:
    """Ports of one node that default to fixed numbers (other Ray instances may run here); the
    others Ray picks at random."""
    socks = [socket.socket() for _ in range(3)]
    for sock in socks:  # held open together: three distinct ports
        sock.bind(("127.0.0.1", 0))
    ports = [str(sock.getsockname()[1]) for sock in socks]
    for sock in socks:
        sock.close()
    return ["--dashboard-agent-listen-port", ports[0], "--metrics-export-port", ports[1],
            "--runtime-env-agent-port", ports[2], "--min-worker-port", "0", "--max-worker-port", "0"]


def _env(temp: str) -> dict[str, str]:
    """The cluster's environment: token authentication with a token of this test only."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_TOKEN_PATH")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32), RAY_TMPDIR=temp)
    return env


class Node:
    """One ``ray start --block`` process in its own session and the processes it starts."""

    def __init__(self, args: list[str], env: dict, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen([str(BIN / "ray"), "start", "--block", "--disable-usage-stats", *args],
                                     stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)

    def node_id(self) -> str | None:
        """The node id its raylet was started with (None until the raylet runs)."""
        try:
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                for arg in child.cmdline():
                    if arg.startswith("--node_id="):
                        return arg.split("=", 1)[1]
        except psutil.Error:
            pass
        return None

    def runs_train_worker(self) -> bool:
        try:
            return any(name in " ".join(p.cmdline()) for name in ("ImplicitFunc", "RayTrainWorker")
                       for p in psutil.Process(self.proc.pid).children(recursive=True))
        except psutil.Error:
            return False

    def kill(self) -> None:
        """SIGKILL the node's every process (Ray's workers leave its process group)."""
        try:
            tree = psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.Error:
            tree = []
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for proc in tree:
            try:
                proc.kill()
            except psutil.Error:
                pass
        self.proc.wait(timeout=30)


def _wait_cpus(address: str, env: dict, cpus: float, nodes: list[Node], timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while True:
        status = subprocess.run([str(BIN / "ray"), "status", "--address", address], capture_output=True, text=True,
                                env=env).stdout
        if re.search(rf"/{cpus:.1f} CPU", status):
            return
        for node in nodes:
            assert node.proc.poll() is None, node.log.read_text()[-2000:]
        assert time.monotonic() < end, f"the cluster did not reach {cpus} CPUs:\n{status}"
        time.sleep(1)


@pytest.fixture()
def cluster():
    """A head with no CPUs and two worker nodes of one CPU each; yields (address, env, workers)."""
    temp = tempfile.mkdtemp(prefix="lrm", dir="/tmp")  # short: Ray's socket paths have a length limit
    env = _env(temp)
    port = _free_port()
    head = Node(["--head", "--port", str(port), "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard", "false",
                 "--ray-client-server-port", str(_free_port()), "--temp-dir", temp, *_node_ports()], env,
                Path(temp) / "head.log")
    nodes = [head]
    try:
        address = f"127.0.0.1:{port}"
        for k, name in enumerate(("a", "b"), start=1):  # one after the other: nodes on one machine
            nodes.append(Node(["--address", address, "--num-cpus", "1", "--num-gpus", "0",  # share socket names
                               "--resources", json.dumps({f"node_{name}": 1}), *_node_ports()], env,
                              Path(temp) / f"worker-{name}.log"))
            _wait_cpus(address, env, float(k), nodes)
        yield address, env, nodes[1:]
    finally:
        for node in reversed(nodes):
            node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def _config(tmp: Path, address: str, **extra) -> Path:
    config = {"name": "nodes", "ray": {"address": address}, "target_samples": 51200,
              "grid": {"start": 200, "factor": 2, "max_samples": GRID[-1], "zero_shot": True},
              "zoo": ZOO, "task": TASK, "probe": PROBE,
              "pruning": {"enabled": True, "top_k": len(ZOO)},  # nobody stopped: the ranking is comparable
              **extra}
    path = tmp / "nodes.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _start(config: Path, out: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "lensray", "screen", str(config), "--out", str(out)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True, env=env)


def _probe_files(out: Path) -> dict[str, tuple[bytes, float]]:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime) for p in (out / "probes").rglob("*.json")}


def _reference_ranking(config: Path, tmp: Path) -> tuple[dict, list]:
    """The same probes run in this process without Ray, ranked by the same code."""
    from lensray.engine.data import TaskConfig
    from lensray.engine.probe import ProbeConfig, ProbeRunner
    from lensray.run.config import load_config
    from lensray.run.screen import finish

    store = ProbeStore(str(tmp / "reference"))
    for cand in ZOO:
        runner = ProbeRunner(cand["model"], TaskConfig(**TASK), ProbeConfig(**PROBE))
        for d in GRID:
            store.put(cand["id"], {**runner.run(d).to_dict(), "n_samples": d, "backend": "train"})
    losses = {(r["candidate"], r["n_samples"]): r["test_loss"] for r in store.get_all()}
    return losses, finish(load_config(config), store, GRID, "train", None, 0.0)["ranking"]


def test_worker_node_killed_mid_probe_loses_and_repeats_nothing(cluster, tmp_path):
    address, env, workers = cluster
    config = _config(tmp_path, address)
    out = tmp_path / "out"
    t0 = time.monotonic()
    proc = _start(config, out, env, tmp_path / "run.log")
    store = ProbeStore(str(out), check=False)
    ids = {w.node_id(): w for w in workers}
    assert None not in ids

    def busy_victim():
        """A worker node whose candidate has stored a probe but not its last one, and is probing."""
        records = store.get_all()
        done = {(r["candidate"], r["n_samples"]) for r in records}
        for r in records:
            node = ids.get(r.get("node_id"))
            if node is not None and (r["candidate"], GRID[-1]) not in done and node.runs_train_worker():
                return r["candidate"], node
        return None

    end = time.monotonic() + 240
    while (victim := busy_victim()) is None:
        assert proc.poll() is None, (tmp_path / "run.log").read_text()[-3000:]
        assert time.monotonic() < end, "no candidate was probing on a worker node"
        time.sleep(0.05)
    candidate, node = victim
    killed_id = node.node_id()
    node.kill()
    before = _probe_files(out)  # after the kill: a probe the node stored just before it counts as its
    t_kill = time.monotonic() - t0
    assert proc.wait(timeout=400) == 0, (tmp_path / "run.log").read_text()[-3000:]
    wall = time.monotonic() - t0

    after = _probe_files(out)
    assert all(after[name] == seen for name, seen in before.items())  # nothing rewritten
    records = store.get_all()
    assert sorted((r["candidate"], r["n_samples"]) for r in records) == sorted((c["id"], d) for c in ZOO for d in GRID)
    # the candidates ran across both worker nodes; the killed one's candidate finished elsewhere
    assert {r["node_id"] for r in records} == set(ids)
    mine = [r for r in records if r["candidate"] == candidate]
    assert any(r["node_id"] == killed_id for r in mine)
    assert all(r["node_id"] != killed_id for r in mine if f"probes/{candidate_key(candidate)}/{r['n_samples']}.json"
               not in before)

    losses, ranking = _reference_ranking(config, tmp_path)
    for r in records:
        assert r["test_loss"] == pytest.approx(losses[(r["candidate"], r["n_samples"])], rel=1e-6)
    selection = json.loads((out / "selection.json").read_text())
    assert [e["candidate"] for e in selection["ranking"]] == [e["candidate"] for e in ranking]
    assert [e["status"] for e in selection["ranking"]] == [e["status"] for e in ranking] == ["finished"] * len(ZOO)
    for got, want in zip(selection["ranking"], ranking):
        assert got["predicted_loss"] == pytest.approx(want["predicted_loss"], rel=1e-6)
    print(f"\nmulti-node: killed node of {candidate} at {t_kill:.1f} s, run {wall:.1f} s")


WATCH = """
import json, sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
while True:
    nodes = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["Resources"].get("CPU", 0) > 0]
    print(json.dumps({"t": time.time(), "workers": nodes}), flush=True)
    time.sleep(0.5)
"""
LEFT = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
groups = [g["state"] for g in ray.util.placement_group_table().values() if g["state"] != "REMOVED"]
actors = [a["Name"] or a["ActorClassName"] for a in ray._private.state.actors().values() if a["State"] != "DEAD"]
total, free = ray.cluster_resources(), ray.available_resources()
held = {k: v - free.get(k, 0) for k, v in total.items() if k != "object_store_memory" and free.get(k, 0) != v}
print(json.dumps({"groups": groups, "actors": actors, "held": held}))
"""


def _worker_log(path: Path) -> list[tuple[float, list[str]]]:
    """The watcher's lines: (time, alive worker node ids)."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return [(line["t"], line["workers"]) for line in lines]


def test_autoscaler_adds_workers_for_queued_trials_and_removes_them_when_idle(tmp_path):
    temp = tempfile.mkdtemp(prefix="lra", dir="/tmp")
    env = {**_env(temp), "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1"}
    port = _free_port()
    address = f"127.0.0.1:{port}"
    fake = yaml.safe_load((REPO / "cluster" / "fake-multinode.yaml").read_text())
    fake["provider"]["gcs_address"] = address  # the fake nodes join this head, not 127.0.0.1:6379
    (Path(temp) / "autoscaling.yaml").write_text(yaml.safe_dump(fake))
    head = Node(["--head", "--port", str(port), "--num-cpus", "0", "--num-gpus", "0", "--include-dashboard", "false",
                 "--ray-client-server-port", str(_free_port()), "--temp-dir", temp,
                 "--autoscaling-config", str(Path(temp) / "autoscaling.yaml"), *_node_ports()], env,
                Path(temp) / "head.log")
    watch_log = tmp_path / "watch.log"
    procs: list[subprocess.Popen] = []
    try:
        end = time.monotonic() + 120
        while "ray.head.default" not in subprocess.run([str(BIN / "ray"), "status", "--address", address],
                                                       capture_output=True, text=True, env=env).stdout:
            assert head.proc.poll() is None and time.monotonic() < end, head.log.read_text()[-2000:]
            time.sleep(1)
        procs.append(subprocess.Popen([sys.executable, "-c", WATCH, address], stdout=open(watch_log, "w"),
                                      stderr=subprocess.STDOUT, start_new_session=True, env=env))
        end = time.monotonic() + 60
        while not _worker_log(watch_log):
            assert procs[0].poll() is None and time.monotonic() < end, watch_log.read_text()[-2000:]
            time.sleep(0.5)
        assert _worker_log(watch_log)[-1][1] == []  # from zero
        # the cluster has no CPU yet: trials at once come from the autoscaler's limit
        config = _config(tmp_path, address, ray={"address": address, "max_concurrent_trials": fake["max_workers"]})
        out = tmp_path / "out"
        t0 = time.time()
        procs.append(_start(config, out, env, tmp_path / "run.log"))
        assert procs[1].wait(timeout=240) == 0, (tmp_path / "run.log").read_text()[-3000:]
        wall = time.time() - t0

        seen = _worker_log(watch_log)
        peak = max(len(workers) for _, workers in seen)
        assert peak == fake["max_workers"]  # one worker per queued trial, up to the limit
        first = min(t for t, workers in seen if workers) - t0
        records = ProbeStore(str(out), check=False).get_all()
        assert sorted((r["candidate"], r["n_samples"]) for r in records) == sorted((c["id"], d) for c in ZOO
                                                                                  for d in GRID)
        added = {w for _, workers in seen for w in workers}
        assert {r["node_id"] for r in records} <= added and len({r["node_id"] for r in records}) >= 2
        selection = json.loads((out / "selection.json").read_text())
        assert [e["status"] for e in selection["ranking"]] == ["finished"] * len(ZOO)

        end = time.monotonic() + 90
        while _worker_log(watch_log)[-1][1]:
            assert time.monotonic() < end, "idle workers were not removed"
            time.sleep(1)
        gone = _worker_log(watch_log)[-1][0] - t0 - wall
        left = subprocess.run([sys.executable, "-c", LEFT, address], capture_output=True, text=True, env=env,
                              timeout=60)
        # nothing of the run's: no placement group, no actor, no resource held. Ray Train's cluster-wide
        # AutoscalingCoordinator (a detached, zero-CPU actor every Train run of the cluster shares) may
        # stay; one-worker candidates start no Ray Train run, so it is usually absent
        state = json.loads(left.stdout.strip().splitlines()[-1])
        assert state["groups"] == [] and state["held"] == {}, (state, left.stderr[-2000:])
        assert set(state["actors"]) <= {"AutoscalingCoordinator"}, (state, left.stderr[-2000:])
        print(f"\nautoscaled: first worker after {first:.1f} s, run {wall:.1f} s, workers gone {gone:.1f} s later")
    except BaseException:
        monitor = Path(temp) / "session_latest" / "logs" / "monitor.log"
        if monitor.is_file():
            print(monitor.read_text()[-4000:])
        raise
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
        head.kill()
        # the fake provider's nodes are the head's autoscaler's processes: any still alive named this temp dir
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if temp in " ".join(proc.info["cmdline"] or []):
                    proc.kill()
            except psutil.Error:
                pass
        shutil.rmtree(temp, ignore_errors=True)
