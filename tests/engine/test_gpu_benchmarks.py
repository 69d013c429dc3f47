"""CPU dry runs of the GPU benchmark scripts (benchmarks/probe_throughput.py, oom_recovery.py, ntk_cost.py)
at tiny sizes: each produces its figures through the code path the GPU check runs."""

import importlib
import json
import math
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture
def script(monkeypatch, tmp_path):
    """Import a benchmark script as a module (the scripts import each other by file name)."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    monkeypatch.setenv("LENSRAY_CACHE", str(tmp_path / "cache"))
    return importlib.import_module


def run_json(module, argv, capsys):
    rc = module.main(argv + ["--json"])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


TINY_CPU = ["--tiny", "--device", "cpu"]


def test_throughput_of_a_tiny_preset_in_fp32_on_cpu(script, capsys):
    rc, out = run_json(script("probe_throughput"), ["--model", "llama-1b", *TINY_CPU, "--no-bf16", "--seq-len", "32",
                                                    "--micro-batch", "2", "--steps", "2", "--warmup-steps", "1",
                                                    "--threads", "1"], capsys)
    assert rc == 0
    assert out["model"] == "llama-1b (tiny)" and out["dtype"] == "fp32"
    assert 1_000_000 < out["n_params"] < 10_000_000  # the 32,000-token vocabulary of the preset, tiny layers
    assert out["steps"] == 2 and out["tokens"] == 2 * 2 * 32  # rows of exactly seq_len tokens
    assert out["tokens_per_s"] > 0 and 0 < out["mfu"] < 1.5
    assert out["peak_source"].startswith("measured fp32 matmul peak")


def test_tiny_applies_to_presets_only(script):
    with pytest.raises(SystemExit, match="--tiny applies to the presets"):
        script("probe_throughput").main(["--model", "tiny:gpt2", *TINY_CPU, "--json"])


def test_oom_driver_halves_until_the_injected_limit_and_keeps_the_effective_batch(script, capsys):
    rc, out = run_json(script("oom_recovery"), ["--model", "llama-1b", *TINY_CPU, "--no-bf16", "--seq-len", "16",
                                                "--micro-batch", "16", "--test-rows", "4",
                                                "--inject-oom-above", "4"], capsys)
    assert rc == 0 and out["recovered"] and out["status"] == "ok" and out["fault"] == "injected"
    assert [(a["micro_batch"], a["grad_accum"], a["outcome"]) for a in out["attempt_log"]] == [
        (16, 1, "oom"), (8, 2, "oom"), (4, 4, "ok")]
    assert out["halvings"] == 2 and out["micro_batch"] == 4 and out["grad_accum"] == 4
    assert out["effective_batch_kept"] and out["steps"] == 1 and math.isfinite(out["test_loss"])


def test_oom_driver_exits_1_when_nothing_fits(script, capsys):
    rc, out = run_json(script("oom_recovery"), ["--model", "gpt2-125m", *TINY_CPU, "--seq-len", "16",
                                                "--micro-batch", "4", "--test-rows", "2",
                                                "--inject-oom-above", "0"], capsys)
    assert rc == 1 and not out["recovered"] and out["status"] == "failed"
    assert [a["micro_batch"] for a in out["attempt_log"]] == [4, 2, 1]


def test_ntk_cost_of_a_tiny_preset_on_cpu(script, capsys):
    rc, out = run_json(script("ntk_cost"), ["--model", "gpt2-125m", *TINY_CPU, "--seq-len", "16", "--samples", "4",
                                            "--sketch-dim", "256", "--threads", "1"], capsys)
    assert rc == 0
    assert out["n_samples"] == 4 and out["sketch_dim"] == 256
    assert out["seconds"] > 0 and out["plain_backward_seconds"] > 0
    assert math.isfinite(out["F"]) and out["trace"] > 0 and out["peak_memory_gib"] > 0
    assert out["memory"] == "process peak RSS"
