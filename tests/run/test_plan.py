"""--plan bills the tokens a run will train on: the task's rows tokenised with each candidate's
tokenizer, times probe.epochs; the probe's own record agrees."""

from __future__ import annotations

import pytest

from lensray.engine.probe import ProbeConfig, ProbeRunner
from lensray.run.config import load_config
from lensray.run.ranking import plan_bill

TASK = {"synthetic_rows": 600, "test_size": 32, "validation_size": 16, "max_length": 48}


pytestmark = pytest.mark.usefixtures("lensray_cache")


def test_plan_tokens_come_from_the_task_and_match_a_probe(tmp_path):
    config = load_config(None, {"zoo": [{"id": "g", "model": "tiny:gpt2:n_layer=1,n_embd=32"},
                                        {"id": "nowhere", "model": str(tmp_path / "missing-model")}],
                                "task": TASK, "probe": {"epochs": 2, "micro_batch": 8, "device": "cpu"},
                                "grid": {"start": 100, "max_samples": 400}, "storage": {"path": str(tmp_path / "o")}},
                         check_task=False)
    plan = plan_bill(config)
    rows = {r["candidate"]: r for r in plan["candidates"]}
    assert rows["g"]["tokens_from"] == "task" and rows["nowhere"]["tokens_from"] == "assumed"
    assert plan["unsized"] == ["nowhere"] and plan["task_unread"] is None
    per_sample = rows["g"]["tokens_per_sample"]
    probe = ProbeRunner("tiny:gpt2:n_layer=1,n_embd=32", config.task, ProbeConfig(**config.probe.model_dump())).run(400)
    assert probe.tokens / 400 == pytest.approx(per_sample, rel=0.1)  # a subset of the rows, 2 epochs
    assert rows["g"]["flops_todo"] == pytest.approx(6 * rows["g"]["size"] * per_sample * (100 + 200 + 400))
    assert plan["flops_full_tuning"] == pytest.approx(6 * rows["g"]["size"] * per_sample * config.target_samples)
