"""The cluster tests' zoo screened on one node, for the wall times of the multi-node runs.

    python benchmarks/cluster_walls.py [--cpus 2] [--repeat 1]

Screens the zoo of ``tests/run/test_multinode.py`` (same candidates, grid, task, probe and pruning
settings, taken from that file) with ``lensray screen`` on a local one-node Ray of ``--cpus`` CPUs,
``--cpus`` candidates at once (the multi-node tests run two one-CPU worker nodes, two candidates at
once), and prints each run's wall time: the process's and the run's own ``compute.wall_seconds``.
The multi-node figures come from the tests themselves (``-s`` prints them):

    python -m pytest tests/run/test_multinode.py -q -s -k killed      # multi-node: ... run N s
    python -m pytest tests/run/test_multinode.py -q -s -k autoscaler  # autoscaled: first worker after ...
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _test_module():
    spec = importlib.util.spec_from_file_location("test_multinode", REPO / "tests" / "run" / "test_multinode.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def one_node(cpus: int) -> tuple[float, float]:
    """Wall time of one screening on a local Ray of ``cpus`` CPUs: (process, compute.wall_seconds)."""
    nodes = _test_module()
    with tempfile.TemporaryDirectory(prefix="lensray-walls-") as tmp:
        config = nodes._config(Path(tmp), None, ray={"num_cpus": cpus, "max_concurrent_trials": cpus})
        out = Path(tmp) / "out"
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "lensray", "screen", str(config), "--out", str(out)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        selection = json.loads((out / "selection.json").read_text())
        assert [e["status"] for e in selection["ranking"]] == ["finished"] * len(nodes.ZOO)
        return wall, float(selection["compute"]["wall_seconds"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpus", type=int, default=2, help="CPUs of the one node, and candidates at once")
    parser.add_argument("--repeat", type=int, default=1, help="runs")
    args = parser.parse_args(argv)
    for k in range(args.repeat):
        wall, run = one_node(args.cpus)
        print(f"one node, {args.cpus} CPUs: run {run:.1f} s (process {wall:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
