"""Probes the way the user will fine-tune: LoRA adapters (peft), weights in bf16, gradient checkpointing."""

from __future__ import annotations

import pytest
import torch

from lensray.engine.data import TaskConfig, load_task
from lensray.engine.probe import ProbeConfig, ProbeRunner
from lensray.errors import LensrayInputError

TASK = TaskConfig(synthetic_rows=400, test_size=32, validation_size=16, max_length=32)
FAST = dict(learning_rate=3e-3, epochs=1, micro_batch=8, device="cpu", seed=0)


pytestmark = pytest.mark.usefixtures("lensray_cache")


@pytest.fixture(scope="module")
def data():
    return load_task(TASK)


def run(data, model="tiny:gpt2:n_layer=2,n_embd=64", n=200, **probe):
    runner = ProbeRunner(model, TASK, ProbeConfig(**{**FAST, **probe}), task_data=data).load()
    return runner, runner.run(n)


def test_lora_trains_only_the_adapters_and_bills_what_it_computes(data):
    full_runner, full = run(data)
    lora_runner, lora = run(data, method="lora", lora_rank=4, lora_target_modules=["c_attn"])
    assert lora.status == "ok" and full.status == "ok"
    assert 0 < lora.trainable_params < lora.n_params / 10
    assert full.trainable_params == full.n_params
    base = {k: v for k, v in lora_runner.model.named_parameters() if "lora_" not in k}
    assert all(not p.requires_grad for p in base.values())
    assert lora.tokens == full.tokens  # same subset, same steps
    assert lora.flops == pytest.approx((4 * lora.n_params + 2 * lora.trainable_params) * lora.tokens)
    assert full.flops == pytest.approx(6 * full.n_params * full.tokens)
    assert lora.flops < full.flops
    zero_shot = lora_runner.run(0).test_loss
    assert lora.test_loss < zero_shot  # the adapters learn


def test_lora_probes_start_from_the_same_adapters(data):
    runner, first = run(data, method="lora", lora_rank=4, lora_target_modules=["c_attn"])
    again = runner.run(200)
    assert again.test_loss == pytest.approx(first.test_loss, rel=1e-6)


def test_lora_ntk_features_cover_the_adapters_only(data):
    ntk = dict(ntk=True, ntk_samples=4, ntk_dim=16)
    _, lora = run(data, method="lora", lora_rank=2, lora_target_modules=["c_attn"], **ntk)
    _, full = run(data, **ntk)
    assert lora.status == "ok" and lora.ntk is not None and full.ntk is not None
    # the kernel sums per-sample gradient products over the trained parameters: the adapters' are
    # a small part of the full model's
    assert 0 < lora.ntk["trace"] < full.ntk["trace"] / 10


def test_unknown_lora_targets_are_one_line_errors(data):
    with pytest.raises(LensrayInputError, match="probe.lora_target_modules"):
        run(data, method="lora", lora_target_modules=["no_such_module"])


def test_bf16_weights_and_gradient_checkpointing(data):
    runner, r = run(data, dtype="bf16", gradient_checkpointing=True)
    assert r.status == "ok" and next(runner.model.parameters()).dtype == torch.bfloat16
    assert r.flops == pytest.approx(8 * r.n_params * r.tokens)  # one more forward pass
    runner, r = run(data, method="lora", lora_target_modules=["c_attn"], gradient_checkpointing=True)
    assert r.status == "ok" and r.flops == pytest.approx((6 * r.n_params + 2 * r.trainable_params) * r.tokens)
