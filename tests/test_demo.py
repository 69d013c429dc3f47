"""The README's main command: the embedded demo config, run as a user runs it (relative --out)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_config_end_to_end_with_relative_output(tmp_path):
    env = dict(os.environ, LENSRAY_CACHE=str(tmp_path / "cache"), HF_TOKEN="hf_demo_secret_do_not_leak")
    res = subprocess.run(
        [sys.executable, "-m", "lensray", "screen", str(REPO / "configs" / "demo.yaml"), "--out", "out"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    out = tmp_path / "out"
    for name in ("selection.json", "report.md", "curves.png", "probes.parquet", "config.yaml"):
        assert (out / name).is_file(), name
    selection = json.loads((out / "selection.json").read_text())
    statuses = {row["candidate"]: row["status"] for row in selection["ranking"]}
    assert len(statuses) == 5 and "failed" not in statuses.values()
    assert selection["selected"] in statuses
    assert 0 < selection["compute"]["saved_fraction"] < 1
    # every probe landed inside the output folder (not in a Ray worker's working directory)
    stored = sorted(p.relative_to(out) for p in (out / "probes").rglob("*.json"))
    assert len(stored) == pq.read_table(out / "probes.parquet").num_rows >= 5 * 4
    for path in out.rglob("*"):
        if path.is_file() and path.suffix in (".json", ".md", ".yaml", ".parquet"):
            assert b"hf_demo_secret_do_not_leak" not in path.read_bytes(), path
