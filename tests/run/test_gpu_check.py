"""The GPU check's screening config and script, checked without a GPU (no Ray started)."""

import importlib
import subprocess
from pathlib import Path


from lensray.run.config import load_config
from lensray.run.ranking import plan_bill
from lensray.run.screen import max_concurrent

REPO = Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "gpu-check.yaml"


def test_gpu_check_config_runs_two_candidates_of_50m_to_1b_at_once_on_one_gpu(tmp_path):
    config = load_config(CONFIG, {"storage.path": str(tmp_path / "out")})
    assert config.ray.num_gpus == 1 and config.probe.device == "cuda" and config.probe.bf16
    assert [c.gpus for c in config.zoo] == [0.5] * 4
    assert max_concurrent(config, "train", {"GPU": 1.0, "CPU": 16.0}) == 2
    plan = plan_bill(config)
    sizes = [r["size"] for r in plan["candidates"]]
    assert all(50e6 <= s <= 1e9 for s in sizes), sizes
    assert plan["grid"] == [0, 200, 400, 800, 1600, 3200]


def test_tiny_variant_of_the_gpu_config_is_a_valid_cpu_screening(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(REPO / "benchmarks"))
    gpu_screen = importlib.import_module("gpu_screen")
    config = gpu_screen.load(str(CONFIG), tiny=True, out=str(tmp_path / "out"))
    assert config.probe.device == "cpu" and config.ray.num_gpus == 0
    assert all(c.gpus == 0 and c.source.startswith(f"tiny:{c.family}:") for c in config.zoo)
    assert config.grid_sizes() == [0, 50, 100, 200]
    assert max(plan_bill(config)["candidates"], key=lambda r: r["size"])["size"] < 5e6


def test_gpu_check_script_parses_and_refuses_unknown_options(tmp_path):
    script = REPO / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    helped = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "--cpu-dry-run" in helped.stdout
    bad = subprocess.run(["bash", str(script), "--bogus", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown option --bogus" in bad.stderr
    bad = subprocess.run(["bash", str(script), "--only", "tp-1b,tp-2b", str(tmp_path)], capture_output=True, text=True)
    assert bad.returncode == 2 and "--only: unknown step 'tp-2b'" in bad.stderr
