"""Probes: zero-shot, reproducibility, fresh weights, learning curve, NaN and OOM faults, NTK, CLI."""

from __future__ import annotations

import json
import math

import pytest

from lensray.engine.data import TaskConfig, load_task
from lensray.errors import LensrayInputError
from lensray.engine.probe import FaultInjector, ProbeConfig, ProbeRunner

GPT2 = "tiny:gpt2:n_layer=1,n_embd=32"
TASK = TaskConfig(synthetic_rows=800, test_size=64, validation_size=16, max_length=32)
FAST = dict(learning_rate=1e-3, epochs=1, micro_batch=8, device="cpu")


pytestmark = pytest.mark.usefixtures("lensray_cache")


@pytest.fixture(scope="module")
def data():
    return load_task(TASK)


def runner(data, model=GPT2, faults=None, **probe):
    return ProbeRunner(model, TASK, ProbeConfig(**{**FAST, **probe}), task_data=data, faults=faults).load()


def test_zero_shot_probe_trains_nothing(data):
    r = runner(data).run(0)
    assert r.status == "ok" and r.steps == 0 and r.tokens == 0 and r.flops == 0
    assert 3.0 < r.test_loss < 6.0  # near log(vocab) for an untrained model
    assert r.n_params > 0 and r.attempts == 1 and r.kind == "causal"
    json.dumps(r.to_dict())


def test_probe_accounting(data):
    r = runner(data, grad_accum=2).run(64)
    assert r.status == "ok" and r.steps == math.ceil(64 / 16)
    assert r.learning_rate == 1e-3 and r.micro_batch == 8 and r.grad_accum == 2
    assert r.tokens > 64 * 10 and r.flops == 6.0 * r.n_params * r.tokens
    assert r.wall_seconds > 0 and r.peak_memory_bytes > 0


def test_a_fresh_runner_repeats_a_seeded_probe(data):
    r = ProbeRunner(GPT2, TASK, ProbeConfig(**FAST), task_data=data).run(32, seed=1)
    assert r.status == "ok" and r.seed == 1 and r.test_loss == runner(data).run(32, seed=1).test_loss


def test_max_steps_caps_training(data):
    assert runner(data, max_steps=3, epochs=5).run(200).steps == 3


def test_probe_is_reproducible_and_starts_from_fresh_weights(data):
    a = runner(data)
    first, zero_before = a.run(100, seed=1), a.run(0)
    again = a.run(100, seed=1)
    other = runner(data).run(100, seed=1)
    assert first.test_loss == again.test_loss == other.test_loss
    assert a.run(0).test_loss == zero_before.test_loss
    assert a.run(100, seed=2).test_loss != first.test_loss


def test_loss_decreases_with_data(data):
    r = runner(data, epochs=2)
    losses = [r.run(d).test_loss for d in (0, 100, 400)]
    assert losses[0] > losses[1] > losses[2]


@pytest.mark.parametrize("model", ["tiny:t5:n_layer=1,n_embd=32", "tiny:opt:n_layer=1,n_embd=32"])
def test_other_families_learn(data, model):
    r = runner(data, model=model, epochs=2)
    zero, tuned = r.run(0), r.run(400)
    assert tuned.status == "ok" and tuned.test_loss < zero.test_loss


def test_subset_larger_than_train_split_is_an_input_error(data):
    with pytest.raises(LensrayInputError, match=r"subset size 100000 .*\(720 rows\)"):
        runner(data).run(100_000)


def test_nan_loss_is_retried_once_at_half_the_learning_rate(data):
    faults = FaultInjector(nan_at_step=2, nan_above_lr=7e-4)  # only the first attempt (lr 1e-3) is poisoned
    r = runner(data, faults=faults).run(64)
    assert r.status == "ok" and r.learning_rate == 5e-4 and r.attempts == 2
    assert [a["outcome"] for a in r.attempt_log] == ["diverged", "ok"]
    assert r.attempt_log[0]["step"] == 2
    assert r.test_loss == runner(data, learning_rate=5e-4).run(64).test_loss


def test_nan_loss_twice_is_reported_as_diverged_never_as_a_number(data):
    r = runner(data, faults=FaultInjector(nan_at_step=3)).run(64)
    assert r.status == "diverged" and r.test_loss is None and r.attempts == 2
    assert "step 3" in r.error and "learning rate 0.0005" in r.error
    assert [a["learning_rate"] for a in r.attempt_log] == [1e-3, 5e-4]


def test_real_divergence_at_a_huge_learning_rate(data):
    r = runner(data, learning_rate=1e6, max_grad_norm=None, warmup_ratio=0.0).run(64)
    assert r.status == "diverged" and r.test_loss is None and r.learning_rate == 5e5
    assert [a["outcome"] for a in r.attempt_log] == ["diverged", "diverged"]
    assert f"step {r.attempt_log[-1]['step']}" in r.error


def test_oom_is_retried_with_half_micro_batch_and_double_accumulation(data):
    r = runner(data, faults=FaultInjector(oom_above=2)).run(64)
    assert r.status == "ok" and r.attempts == 3
    assert [(a["micro_batch"], a["grad_accum"], a["outcome"]) for a in r.attempt_log] == [
        (8, 1, "oom"), (4, 2, "oom"), (2, 4, "ok")]
    plain = runner(data).run(64)
    assert r.steps == plain.steps and r.tokens == plain.tokens
    assert r.test_loss == pytest.approx(plain.test_loss, rel=1e-4)  # same effective batch


def test_oom_down_to_micro_batch_one_fails(data):
    r = runner(data, faults=FaultInjector(oom_above=0)).run(64)
    assert r.status == "failed" and r.test_loss is None
    assert [a["micro_batch"] for a in r.attempt_log] == [8, 4, 2, 1]
    assert "out of memory at micro_batch 1" in r.error


def test_out_of_memory_also_shrinks_the_evaluation_batch(data):
    r = runner(data, eval_batch=64, faults=FaultInjector(oom_above=2))
    r.run(32)
    assert r._eval_batch == 16  # 64 * 2 / 8, as for the micro-batch


@pytest.mark.parametrize("schedule, at_end", [("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)])
def test_learning_rate_schedules(schedule, at_end):
    from lensray.engine.probe import _lr_factor

    factors = [_lr_factor(schedule, s, 100, 10) for s in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == 1.0 and max(factors) == 1.0
    assert factors[-1] == pytest.approx(at_end, abs=0.02)
    assert all(a >= b for a, b in zip(factors[10:], factors[11:]))


def test_faults_from_the_environment(monkeypatch):
    monkeypatch.setenv("LENSRAY_FAULTS", "oom_above=2,nan_at_step=3,nan_above_lr=1e-3")
    assert FaultInjector.from_env() == FaultInjector(oom_above=2, nan_at_step=3, nan_above_lr=1e-3)
    monkeypatch.setenv("LENSRAY_FAULTS", "model=tiny:gpt2:n_layer=1,nan_at_step=1; model=tiny:opt,oom_above=0")
    assert FaultInjector.from_env("tiny:opt") == FaultInjector(oom_above=0, model="tiny:opt")
    assert FaultInjector.from_env("tiny:gpt2:n_layer=1").nan_at_step == 1
    assert FaultInjector.from_env("tiny:llama") is None  # no spec for that model
    monkeypatch.setenv("LENSRAY_FAULTS", "meteor=1")
    with pytest.raises(LensrayInputError, match="meteor"):
        FaultInjector.from_env()


def test_early_stopping_stops_and_keeps_the_best_weights(data):
    planned = runner(data, epochs=20, learning_rate=3e-2).run(64)
    stopped = runner(data, epochs=20, learning_rate=3e-2, patience=1, eval_every=1).run(64)
    assert stopped.status == "ok" and stopped.steps < planned.steps


def test_ntk_features_are_attached(data):
    r = runner(data, ntk=True, ntk_samples=8, ntk_dim=512).run(64)
    ntk = r.ntk
    assert ntk is not None and ntk["n_samples"] == 8 and ntk["steps"] == r.steps
    assert ntk["F"] > 0 and ntk["trace"] > 0 and ntk["learning_rate"] == r.learning_rate
    zero = runner(data, ntk=True, ntk_samples=8, ntk_dim=512).run(0).ntk
    assert zero["F"] > ntk["F"]  # no training: F = |r0|^2, the largest


def test_unknown_model_fails_at_load(data):
    with pytest.raises(LensrayInputError, match="does not exist"):
        ProbeRunner("/no/such/model", TASK, ProbeConfig(**FAST), task_data=data).load()


def _cli_yaml(tmp_path, probe="{learning_rate: 1.0e-3, epochs: 1, micro_batch: 8, max_steps: 2}"):
    path = tmp_path / "probe.yaml"
    path.write_text(f"task: {{synthetic_rows: 800, test_size: 64, validation_size: 16, max_length: 32}}\n"
                    f"probe: {probe}\n")
    return str(path)


def test_probe_cli_json_and_bad_sizes(capsys, tmp_path):
    from lensray.cli.main import main

    task = _cli_yaml(tmp_path)
    assert main(["probe", "--model", GPT2, "--task", task, "--sizes", "0,32", "--json", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [p["n_samples"] for p in out["probes"]] == [0, 32] and out["kind"] == "causal"
    assert out["probes"][1]["steps"] == 2 and out["probes"][1]["learning_rate"] == 1e-3
    assert main(["probe", "--model", GPT2, "--sizes", "0,x"]) == 2
    assert "--sizes" in capsys.readouterr().err
    assert main(["probe", "--model", GPT2, "--task", task, "--sizes", "0,99999", "--device", "cpu"]) == 2
    assert "larger than the train split" in capsys.readouterr().err


def test_probe_cli_table(capsys, tmp_path):
    from lensray.cli.main import main

    assert main(["probe", "--model", GPT2, "--task", _cli_yaml(tmp_path), "--sizes", "0,16", "--ntk"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["D", "status", "test_loss"] and "NTK: F=" in out


def test_probe_cli_task_yaml(tmp_path):
    from lensray.cli.probe import load_probe_config

    path = tmp_path / "task.yaml"
    path.write_text("source: synthetic\ntest_size: 32\n")
    assert load_probe_config(str(path)).task.test_size == 32
    settings = load_probe_config(_cli_yaml(tmp_path), {"probe.seed": 3})
    assert settings.task.synthetic_rows == 800 and settings.probe.max_steps == 2 and settings.probe.seed == 3
    path.write_text("task:\n  test_sise: 32\n")
    with pytest.raises(LensrayInputError, match="task.test_sise: unknown key; did you mean 'test_size'"):
        load_probe_config(str(path))
    with pytest.raises(LensrayInputError, match="probe.epochs"):
        load_probe_config(_cli_yaml(tmp_path, probe="{epochs: -1}"))
    with pytest.raises(LensrayInputError, match="probe.sede: unknown key; did you mean 'seed'"):
        load_probe_config(_cli_yaml(tmp_path), {"probe.sede": 3})
    with pytest.raises(LensrayInputError, match="--set prob.seed: lensray probe takes"):
        load_probe_config(_cli_yaml(tmp_path), {"prob.seed": 3})
    with pytest.raises(LensrayInputError, match="neither 'synthetic' nor a YAML file"):
        load_probe_config(str(tmp_path / "none.yaml"))


def test_probe_is_identical_in_a_fresh_process(tmp_path):
    """What a restarted Ray worker relies on: same seed, same result, bit for bit."""
    import os
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "lensray", "probe", "--model", GPT2, "--task", _cli_yaml(tmp_path),
           "--sizes", "32", "--json", "--device", "cpu", "--seed", "3"]
    env = {**os.environ, "LENSRAY_CACHE": os.environ["LENSRAY_CACHE"]}
    losses = [json.loads(subprocess.run(cmd, capture_output=True, text=True, env=env, check=True).stdout)
              ["probes"][0]["test_loss"] for _ in range(2)]
    assert losses[0] == losses[1]


@pytest.mark.slow
def test_synthetic_curve_200_to_3200_decreases():
    """The issue's figure: tiny GPT-2 on CPU, 0..3200 samples (about 20-40 s on 2 cores)."""
    r = ProbeRunner("tiny:gpt2:n_layer=2,n_embd=64", TaskConfig(),
                    ProbeConfig(learning_rate=1e-3, device="cpu")).load()
    losses = [r.run(d).test_loss for d in (0, 200, 400, 800, 1600, 3200)]
    assert all(a > b for a, b in zip(losses, losses[1:])), losses


def _ddp_worker(rank: int, world: int, init_file: str, cache: str, out: str) -> None:
    import os

    import torch.distributed as dist

    os.environ["LENSRAY_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        r = ProbeRunner(GPT2, TASK, ProbeConfig(**FAST)).load()
        result = r.run(64)
        if rank == 0:
            with open(out, "w") as fh:
                json.dump(result.to_dict(), fh)
    finally:
        dist.destroy_process_group()
    # skip interpreter teardown: a gloo thread still winding down there can abort the process
    # ("terminate called without an active exception") after the result is safely written
    os._exit(0)


def test_data_parallel_workers_match_a_single_process(data, tmp_path):
    """Two gloo workers split every optimiser step's samples; the curve point is the same."""
    import os

    import torch.multiprocessing as mp

    out = tmp_path / "rank0.json"
    mp.spawn(_ddp_worker, args=(2, str(tmp_path / "init"), os.environ["LENSRAY_CACHE"], str(out)), nprocs=2)
    ddp = json.loads(out.read_text())
    single = runner(data).run(64)
    assert ddp["status"] == "ok" and ddp["steps"] == single.steps and ddp["tokens"] == single.tokens
    assert ddp["test_loss"] == pytest.approx(single.test_loss, rel=1e-5)
