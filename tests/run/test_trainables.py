"""The train backend's trials: where a candidate's probes run, and what each trial starts."""

from __future__ import annotations

import pytest

from lensray.run.config import load_config
from lensray.run.store import ProbeStore
from lensray.run.trainables import TRIAL_RESOURCES, trial_resources


def test_a_one_worker_trial_holds_the_probe_resources_a_several_worker_trial_only_drives():
    assert trial_resources({"workers": 1, "cpus": 2, "gpus": 0}) == {"CPU": 2.0}
    assert trial_resources({"workers": 1, "cpus": 1, "gpus": 1}) == {"CPU": 1.0, "GPU": 1.0}
    assert trial_resources({"workers": 2, "cpus": 1, "gpus": 1}) == TRIAL_RESOURCES


@pytest.mark.slow
def test_scouting_starts_no_worker_group_and_at_most_one_process_per_candidate(tmp_path):
    """With the scout stage every candidate runs two trials; its probes run in the trial actors
    (no Ray Train worker group), and a finished trial's actor runs the next candidate, so the
    processes that ran probes are no more than the candidates (2 slots: 2 per stage)."""
    from lensray.run.screen import screen

    tiny = "tiny:{}:n_layer=1,n_embd=16,pretrain=0"
    zoo = [{"id": f"{arch}-{k}", "model": tiny.format(arch)} for k, arch in enumerate(("gpt2", "llama", "opt", "gpt2"))]
    config = load_config({
        "ray": {"num_cpus": 2, "num_gpus": 0}, "target_samples": 51200,
        "grid": {"start": 200, "max_samples": 1600, "zero_shot": False},
        "pruning": {"scout": True, "grace_points": 3, "top_k": len(zoo)},  # no one stopped
        "zoo": zoo,
        "task": {"source": "synthetic", "max_length": 32, "test_size": 32, "validation_size": 8},
        "probe": {"learning_rate": 1.0e-3, "epochs": 1, "micro_batch": 16, "device": "cpu", "eval_batch": 64},
        "storage": {"path": str(tmp_path / "o")}})
    sel = screen(config, progress=False)
    assert [e["status"] for e in sel["ranking"]] == ["finished"] * len(zoo)
    records = ProbeStore(str(tmp_path / "o")).get_all()
    assert sorted((r["candidate"], r["n_samples"]) for r in records) == sorted(
        (c["id"], d) for c in zoo for d in (200, 400, 800, 1600))
    processes = {(r["node_id"], r["pid"]) for r in records}
    per_process = {p: {r["candidate"] for r in records if (r["node_id"], r["pid"]) == p} for p in processes}
    assert len(processes) <= len(zoo)
    assert max(len(c) for c in per_process.values()) > 1  # an actor was reused
