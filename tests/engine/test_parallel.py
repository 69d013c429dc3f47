"""FSDP2 in the probe engine, and faults on one rank only under DDP and FSDP: two gloo ranks on
CPU against one process.

One pair of ranks runs every fsdp scenario (spawning costs seconds, the probes milliseconds);
the parent process runs the same probes alone and compares. The task has an odd test and
validation size and one scenario an odd per-step sample count, so that the ranks' shares
differ and FSDP's equal-number-of-passes rule is exercised.
"""

from __future__ import annotations

import json
import os

import pytest

from lensray.engine.data import TaskConfig, load_task
from lensray.errors import LensrayInputError
from lensray.engine.probe import FaultInjector, ProbeConfig, ProbeRunner

GPT2 = "tiny:gpt2:n_layer=2,n_embd=32"
TASK = TaskConfig(synthetic_rows=800, test_size=63, validation_size=15, max_length=32)
FAST = dict(learning_rate=1e-3, epochs=1, micro_batch=8, device="cpu")
# the probes compared between one process and two fsdp ranks
T5 = "tiny:t5:n_layer=1,n_embd=32"  # seq2seq, embeddings shared by encoder, decoder and head
CASES = {
    "plain": (GPT2, dict()),
    "accum": (GPT2, dict(micro_batch=4, grad_accum=2)),
    "uneven": (GPT2, dict(micro_batch=1, grad_accum=3)),  # 3 samples a step: rank 1 runs 1 pass + 1 zero-weight
    "early_stop": (GPT2, dict(epochs=20, learning_rate=3e-2, patience=1, eval_every=1)),
    "t5": (T5, dict()),
}
N = 64
# Summation order differs (each rank sums its half, the reduce-scatter adds the halves), so
# the loss matches to float32 rounding accumulated over a few steps, not bit for bit.
REL = 1e-6


pytestmark = pytest.mark.usefixtures("lensray_cache")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return load_task(TASK)


def _fsdp_worker(rank: int, world: int, init_file: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    from lensray.engine.parallel import local_snapshot

    os.environ["LENSRAY_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    res: dict = {}
    try:
        for name, (model, kw) in CASES.items():
            res[name] = ProbeRunner(model, TASK, ProbeConfig(**{**FAST, **kw}), strategy="fsdp").load().run(N).to_dict()
        r = ProbeRunner(GPT2, TASK, ProbeConfig(**FAST), strategy="fsdp").load()
        init = local_snapshot(r.model)
        res["zero_before"] = r.run(0).test_loss
        res["first"], res["second"] = r.run(N).test_loss, r.run(N).test_loss
        res["zero_after"] = r.run(0).test_loss
        r.reset()
        res["reset_exact"] = all(bool((v == init[k]).all()) for k, v in local_snapshot(r.model).items())
        res["param_bytes"] = r.parameter_bytes()
        res["optimizer_bytes"] = r.optimizer_state_bytes
        res["n_params"] = r.n_params
        res["sharded"] = all(type(p).__name__ == "DTensor" for p in r.model.parameters())
        oom = ProbeRunner(GPT2, TASK, ProbeConfig(**FAST), strategy="fsdp", faults=FaultInjector(oom_above=2))
        res["oom"] = oom.load().run(N).to_dict()
        nan = ProbeRunner(GPT2, TASK, ProbeConfig(**FAST), strategy="fsdp",
                          faults=FaultInjector(nan_at_step=2, nan_above_lr=7e-4))  # diverges after FSDP's lazy init
        res["nan"] = nan.load().run(N).to_dict()
        try:
            ProbeRunner(GPT2, TASK, ProbeConfig(**FAST, ntk=True), strategy="fsdp").load()
            res["ntk_error"] = None
        except LensrayInputError as exc:
            res["ntk_error"] = str(exc)
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(res, fh)
    finally:
        dist.destroy_process_group()
    # skip interpreter teardown: a gloo thread still winding down there can abort the process
    # ("terminate called without an active exception") after the result is safely written
    os._exit(0)


def _spawn(fn, args: tuple, nprocs: int = 2, timeout: float = 240.0) -> None:
    """``mp.spawn`` that kills the ranks instead of hanging when a collective never completes."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(fn, args=args, nprocs=nprocs, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1.0):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail(f"distributed workers still running after {timeout:.0f} s (collective mismatch?)")


@pytest.fixture(scope="module")
def fsdp(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fsdp")
    cache = str(tmp_path_factory.getbasetemp() / "lensray-cache")
    with pytest.MonkeyPatch.context() as mp:  # module scope: set up before the autouse _cache fixture
        mp.setenv("LENSRAY_CACHE", cache)
        for model in (GPT2, T5):  # build the tiny models once, before the ranks race for them
            ProbeRunner(model, TASK, ProbeConfig(**FAST)).load()
    _spawn(_fsdp_worker, (2, str(tmp / "init"), cache, str(tmp / "out")))
    return [json.loads((tmp / f"out.{rank}").read_text()) for rank in range(2)]


def single(data, model=GPT2, faults=None, **kw):
    return ProbeRunner(model, TASK, ProbeConfig(**{**FAST, **kw}), task_data=data, faults=faults).load()


@pytest.mark.parametrize("case", list(CASES))
def test_fsdp_matches_a_single_process(fsdp, data, case):
    model, kw = CASES[case]
    one = single(data, model, **kw).run(N)
    for rank in fsdp:
        got = rank[case]
        assert got["status"] == "ok" and got["attempts"] == 1
        assert got["steps"] == one.steps and got["tokens"] == one.tokens and got["flops"] == one.flops
        assert got["n_params"] == one.n_params and got["peak_memory_bytes"] > 0
        assert got["test_loss"] == pytest.approx(one.test_loss, rel=REL)
    assert fsdp[0][case]["test_loss"] == fsdp[1][case]["test_loss"]  # reduced: every rank reports the same


def test_early_stopping_under_fsdp_stops_early(fsdp, data):
    planned = single(data, GPT2, **{**CASES["early_stop"][1], "patience": 0}).run(N)
    assert fsdp[0]["early_stop"]["steps"] < planned.steps


def test_fsdp_rank_holds_about_half_the_parameters(fsdp):
    full = fsdp[0]["n_params"] * 4  # float32
    for rank in fsdp:
        assert rank["sharded"]
        assert 0.45 < rank["param_bytes"] / full < 0.55, rank["param_bytes"] / full
        # AdamW: two moments per parameter, sharded like the parameters (+ the step counters)
        assert 0.9 < rank["optimizer_bytes"] / full < 1.1, rank["optimizer_bytes"] / full
    assert sum(rank["param_bytes"] for rank in fsdp) == pytest.approx(full, rel=0.01)


def test_fsdp_probes_start_from_the_pretrained_weights(fsdp, data):
    rank = fsdp[0]
    assert rank["first"] == rank["second"]  # the second probe starts where the first did
    assert rank["zero_before"] == rank["zero_after"]
    assert rank["reset_exact"]
    assert rank["zero_before"] == pytest.approx(single(data).run(0).test_loss, rel=1e-6)


def test_fsdp_out_of_memory_retry(fsdp, data):
    plain = single(data).run(N)
    for rank in fsdp:
        r = rank["oom"]
        assert r["status"] == "ok" and [a["outcome"] for a in r["attempt_log"]] == ["oom", "oom", "ok"]
        assert r["steps"] == plain.steps and r["test_loss"] == pytest.approx(plain.test_loss, rel=REL)


def test_fsdp_nan_retry_at_half_the_learning_rate(fsdp, data):
    half = single(data, learning_rate=5e-4).run(N)
    for rank in fsdp:
        r = rank["nan"]
        assert r["status"] == "ok" and r["learning_rate"] == 5e-4
        assert [a["outcome"] for a in r["attempt_log"]] == ["diverged", "ok"]
        assert r["test_loss"] == pytest.approx(half.test_loss, rel=REL)


def test_fsdp_refuses_ntk_with_a_clear_error(fsdp):
    assert "probe.ntk is not supported with strategy 'fsdp'" in fsdp[0]["ntk_error"]


def test_unknown_strategy_is_a_one_line_input_error():
    with pytest.raises(LensrayInputError, match=r"^strategy 'zero3' is not one of \['ddp', 'fsdp'\]$"):
        ProbeRunner(GPT2, TASK, ProbeConfig(**FAST), strategy="zero3")


def test_fsdp_in_one_process_is_plain_training(data):
    """Without a distributed group both strategies train the same single copy."""
    fsdp = ProbeRunner(GPT2, TASK, ProbeConfig(**FAST), task_data=data, strategy="fsdp").load()
    assert fsdp.run(32).test_loss == single(data).run(32).test_loss
    assert fsdp.parameter_bytes() == fsdp.n_params * 4


def test_transformer_blocks_are_found():
    from lensray.engine.parallel import transformer_blocks

    model = ProbeRunner(T5, TASK, ProbeConfig(**FAST)).load().model  # 1 encoder and 2 decoder blocks
    assert [type(b).__name__ for b in transformer_blocks(model)] == ["T5Block"] * 3


# --------------------------------------------------------------------------- faults on one rank only

# rank 1 alone runs out of memory above micro-batch 2 (the first attempt, at 4) or sees a NaN
# loss at step 2 of the first attempt. The retry runs two micro-batches of 2 per rank and step,
# so it starts with a no_sync pass: DDP's reducer, left by the other rank expecting the backward
# of the abandoned step's synchronising pass, must have been reset or that pass all-reduces alone
RANK_FAULTS = {
    "oom": (dict(micro_batch=4, grad_accum=2), dict(oom_above=2)),
    "nan": (dict(micro_batch=2, grad_accum=4), dict(nan_at_step=2, nan_above_lr=7e-4)),
}


def _rank_fault_worker(rank: int, world: int, init_file: str, cache: str, out: str) -> None:
    import torch.distributed as dist

    os.environ["LENSRAY_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    res: dict = {}
    try:
        for strategy in ("ddp", "fsdp"):
            for name, (kw, fault) in RANK_FAULTS.items():
                r = ProbeRunner(GPT2, TASK, ProbeConfig(**{**FAST, **kw}), strategy=strategy,
                                faults=FaultInjector(**fault, ranks=(1,)))
                res[f"{strategy}_{name}"] = r.load().run(N).to_dict()
            # rank 1 alone runs out of memory in the optimiser step of step 3 (AdamW's state, say)
            res[f"{strategy}_optim"] = _run_with_optimiser_oom(rank, strategy)
        res["ddp_eval"] = _run_with_evaluation_oom(rank)
        with open(f"{out}.{rank}", "w") as fh:
            json.dump(res, fh)
    finally:
        dist.destroy_process_group()
    os._exit(0)  # see _fsdp_worker


def _run_with_optimiser_oom(rank: int, strategy: str) -> dict:
    import torch

    kw = RANK_FAULTS["oom"][0]
    step, calls = torch.optim.AdamW.step, []

    def failing(self, *args, **kwargs):
        calls.append(1)
        if rank == 1 and len(calls) == 3:
            raise torch.OutOfMemoryError("injected out of memory in the optimiser step")
        return step(self, *args, **kwargs)

    torch.optim.AdamW.step = failing
    try:
        return ProbeRunner(GPT2, TASK, ProbeConfig(**{**FAST, **kw}), strategy=strategy).load().run(N).to_dict()
    finally:
        torch.optim.AdamW.step = step


def _run_with_evaluation_oom(rank: int) -> dict:
    """DDP: rank 1 alone runs out of memory measuring the test loss at evaluation batch 64 (not 32)."""
    import torch

    kw = RANK_FAULTS["oom"][0]
    batch_nll = ProbeRunner._batch_nll  # evaluation only; training calls _forward and _nll

    def failing(self, *args, **kwargs):
        if rank == 1 and self._eval_batch > 32:
            raise torch.OutOfMemoryError("injected out of memory while evaluating")
        return batch_nll(self, *args, **kwargs)

    ProbeRunner._batch_nll = failing
    try:
        return ProbeRunner(GPT2, TASK, ProbeConfig(**{**FAST, **kw}), strategy="ddp").load().run(N).to_dict()
    finally:
        ProbeRunner._batch_nll = batch_nll


@pytest.fixture(scope="module")
def rank_faults(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rank_faults")
    cache = str(tmp_path_factory.getbasetemp() / "lensray-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSRAY_CACHE", cache)
        ProbeRunner(GPT2, TASK, ProbeConfig(**FAST)).load()
    # a fault that only one rank leaves the step for used to hang the other in a collective
    _spawn(_rank_fault_worker, (2, str(tmp / "init"), cache, str(tmp / "out")), timeout=120.0)
    return [json.loads((tmp / f"out.{rank}").read_text()) for rank in range(2)]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_out_of_memory_on_one_rank_is_retried_by_every_rank(rank_faults, data, strategy):
    kw, fault = RANK_FAULTS["oom"]
    one = single(data, faults=FaultInjector(**fault), **kw).run(N)  # one process, the same OOM
    assert [(a["outcome"], a["micro_batch"], a["grad_accum"]) for a in one.attempt_log] == [("oom", 4, 2),
                                                                                          ("ok", 2, 4)]
    for rank in rank_faults:
        got = rank[f"{strategy}_oom"]
        assert got["status"] == "ok" and got["attempt_log"] == one.attempt_log
        assert got["steps"] == one.steps and got["tokens"] == one.tokens
        assert got["test_loss"] == pytest.approx(one.test_loss, rel=1e-5)
    assert rank_faults[0][f"{strategy}_oom"]["test_loss"] == rank_faults[1][f"{strategy}_oom"]["test_loss"]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_out_of_memory_in_one_ranks_optimiser_step_is_retried_by_every_rank(rank_faults, data, strategy):
    kw, fault = RANK_FAULTS["oom"]
    one = single(data, faults=FaultInjector(**fault), **kw).run(N)  # the same attempts: oom at 4, ok at 2
    for rank in rank_faults:
        got = rank[f"{strategy}_optim"]
        assert got["status"] == "ok" and got["attempt_log"] == one.attempt_log
        assert got["test_loss"] == pytest.approx(one.test_loss, rel=1e-5)


def test_out_of_memory_in_one_ranks_evaluation_is_retried_by_every_rank_under_ddp(rank_faults, data):
    kw, fault = RANK_FAULTS["oom"]
    one = single(data, faults=FaultInjector(**fault), **kw).run(N)  # oom at micro-batch 4 (eval 64), ok at 2
    for rank in rank_faults:
        got = rank["ddp_eval"]
        assert got["status"] == "ok" and got["attempt_log"] == one.attempt_log
        assert got["test_loss"] == pytest.approx(one.test_loss, rel=1e-5)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_nan_on_one_rank_is_retried_by_every_rank(rank_faults, data, strategy):
    kw, fault = RANK_FAULTS["nan"]
    one = single(data, faults=FaultInjector(**fault), **kw).run(N)
    assert [a["outcome"] for a in one.attempt_log] == ["diverged", "ok"] and one.learning_rate == 5e-4
    for rank in rank_faults:
        got = rank[f"{strategy}_nan"]
        assert got["status"] == "ok" and got["attempt_log"] == one.attempt_log
        assert got["test_loss"] == pytest.approx(one.test_loss, rel=1e-5)


# --------------------------------------------------------------------------- out of memory inside a collective

def _collective_oom_worker(rank: int, world: int, init_file: str, cache: str, out: str, strategy: str) -> None:
    """Rank 1 alone runs out of memory inside a collective (DDP's synchronising backward pass,
    FSDP's first forward pass of a step) at micro-batch 4. It must raise CollectiveOutOfMemory at
    once; its process then ends, as Ray Train ends a worker group whose worker raised. Rank 0,
    left waiting in the collective, must then fail within seconds, not at the group's timeout."""
    import time

    import torch.distributed as dist

    from lensray.engine.probe import CollectiveOutOfMemory

    os.environ["LENSRAY_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    runner = ProbeRunner(GPT2, TASK, ProbeConfig(**{**FAST, **RANK_FAULTS["oom"][0]}), strategy=strategy,
                         faults=FaultInjector(collective_oom_above=2, ranks=(1,))).load()
    start = time.monotonic()
    try:
        runner.run(N)
        res = {"raised": None}
    except CollectiveOutOfMemory as exc:
        res = {"raised": "CollectiveOutOfMemory", "smaller": exc.smaller(), "attempt_log": exc.attempt_log,
               "n_samples": exc.n_samples}
    except RuntimeError as exc:
        res = {"raised": "RuntimeError", "message": str(exc)[:200]}
    res["seconds"] = time.monotonic() - start
    with open(f"{out}.{rank}", "w") as fh:
        json.dump(res, fh)
    os._exit(0)  # no destroy_process_group: the ending process closes its connections


@pytest.fixture(scope="module", params=["ddp", "fsdp"])
def collective_oom(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"collective_oom_{request.param}")
    cache = str(tmp_path_factory.getbasetemp() / "lensray-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LENSRAY_CACHE", cache)
        ProbeRunner(GPT2, TASK, ProbeConfig(**FAST)).load()
    # the process group's timeout is 30 minutes: a rank left waiting must not get anywhere near it
    _spawn(_collective_oom_worker, (2, str(tmp / "init"), cache, str(tmp / "out"), request.param), timeout=120.0)
    return [json.loads((tmp / f"out.{rank}").read_text()) for rank in range(2)]


def test_out_of_memory_inside_a_collective_ends_the_group_at_once(collective_oom):
    waiting, failing = collective_oom
    assert failing["raised"] == "CollectiveOutOfMemory" and failing["n_samples"] == N
    # the settings to restart with: those of the in-place retry (same effective batch)
    assert failing["smaller"] == {"micro_batch": 2, "grad_accum": 4, "eval_batch": 32}
    assert [(a["outcome"], a["micro_batch"], a["grad_accum"]) for a in failing["attempt_log"]] == [("oom", 4, 2)]
    assert waiting["raised"] == "RuntimeError", waiting  # the collective it waited in failed (connection closed)
    assert waiting["seconds"] < 60


def test_faults_on_some_ranks_only(monkeypatch):
    import torch

    monkeypatch.setenv("LENSRAY_FAULTS", "oom_above=2,ranks=1+3")
    faults = FaultInjector.from_env()
    assert faults == FaultInjector(oom_above=2, ranks=(1, 3))
    monkeypatch.setenv("LENSRAY_FAULTS", "collective_oom_above=2,ranks=1")
    assert FaultInjector.from_env() == FaultInjector(collective_oom_above=2, ranks=(1,))
    with pytest.raises(torch.OutOfMemoryError, match="inside a collective"):
        FaultInjector.from_env().in_collective(4, rank=1)
    monkeypatch.setenv("LENSRAY_FAULTS", "oom_above=2,ranks=1+3")
    faults.before_micro_step(4, rank=0)  # not this rank
    with pytest.raises(torch.OutOfMemoryError):
        faults.before_micro_step(4, rank=3)
    assert FaultInjector(nan_at_step=1, ranks=(1,)).poison(1, 1e-3, rank=1)
    assert not FaultInjector(nan_at_step=1, ranks=(1,)).poison(1, 1e-3)  # one process is rank 0
    monkeypatch.setenv("LENSRAY_FAULTS", "oom_above=2,ranks=one")
    with pytest.raises(LensrayInputError, match=r"^LENSRAY_FAULTS: bad value 'one' for 'ranks'$"):
        FaultInjector.from_env()
    monkeypatch.setenv("LENSRAY_FAULTS", "oom_ranks=1")
    with pytest.raises(LensrayInputError, match=r"^LENSRAY_FAULTS: unknown fault 'oom_ranks'$"):
        FaultInjector.from_env()
