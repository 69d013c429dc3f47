"""One probe: fine-tune a candidate on D samples of a task and measure its held-out test loss.

``ProbeRunner`` loads a candidate once, keeps a CPU copy of its pre-trained weights, and runs
any number of probes, each from a fresh copy of those weights. D = 0 measures the zero-shot
test loss. The test loss is the mean negative log-likelihood per target token over the
task's fixed test split (prompt and padding tokens carry no loss).

Faults are reported in the probe's result, not raised:
- a NaN / infinite loss is retried once at half the learning rate, then gives status
  ``"diverged"`` (step and learning rate in ``error``, ``test_loss`` None);
- ``torch.OutOfMemoryError`` is retried with half the micro-batch and twice the gradient
  accumulation (the same effective batch, hence the same result), down to micro-batch 1; then
  status ``"failed"``.
Tests inject faults with ``FaultInjector`` (or env ``LENSRAY_FAULTS="oom_above=2,nan_at_step=3,
nan_above_lr=1e-3"``, optionally ``ranks=1+3``, or for one candidate only ``model=<its model id>``;
specs for several candidates are joined with ``;``).

Several workers (an initialised ``torch.distributed`` group): strategy ``"ddp"`` replicates the
model, ``"fsdp"`` shards parameters, gradients and AdamW state with FSDP2 (one unit per
transformer block; the NTK features, which need whole per-sample gradients, are refused).
Either way each optimiser step's samples are split over the workers, so a probe's steps,
tokens and loss do not depend on their number. The workers retry in lockstep: before the next
collective that a fault on one rank would skip, every rank all-reduces two flags (some rank out
of memory; some loss not finite) in ``ProbeRunner._agree`` and all raise the same error. Under
DDP that is the all-reduce before the last micro-batch's backward (the others run under
``no_sync``): no extra collective. Under FSDP, whose every pass all-gathers, it is before the
step's first forward pass and after each micro-batch's loss. A local fault in the optimiser
step is carried to the next agreement (at the end, the token count's reduction).

An out-of-memory error inside a collective (DDP's last backward; with FSDP any forward or
backward pass and the gradient clipping) cannot be agreed on: the other ranks wait in the
collective. It raises :class:`CollectiveOutOfMemory` with smaller settings; the Ray Train
worker loop (:mod:`lensray.run.trainables`) stores them and raises, Ray Train restarts the
whole group, and the new group resumes at the smaller micro-batch. Nothing waits for the
process group's timeout.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import math
import os
import resource
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from lensray.engine.data import Encoded, TaskConfig, TaskData, collate, count_tokens, encode, load_task
from lensray.errors import LensrayInputError, one_line


MAX_EPOCHS = 1000
"""Most passes over a subset a probe may make."""


class ProbeConfig(BaseModel):
    """Hyper-parameters of one probe fine-tune (the same for every candidate and size).

    Numbers must be finite (``.inf`` and ``.nan`` are refused) and within the stated bounds.
    """

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    learning_rate: float = Field(3e-4, gt=0, description="peak learning rate of AdamW")
    epochs: float = Field(3.0, gt=0, le=MAX_EPOCHS, description=f"passes over the subset (fractions allowed, at most {MAX_EPOCHS})")
    schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="learning-rate decay after warmup")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="share of the steps with linear warmup")
    micro_batch: int = Field(16, ge=1, description="samples per forward/backward pass")
    grad_accum: int = Field(1, ge=1, description="micro-batches per optimiser step")
    max_steps: int | None = Field(None, ge=1, description="cap on optimiser steps per probe (None: no cap)")
    patience: int = Field(0, ge=0, description="early stopping: evaluations without validation improvement "
                                               "before stopping (0: off); the best weights are restored")
    eval_every: int | None = Field(None, ge=1, description="optimiser steps between validation evaluations "
                                                           "(default: once per epoch)")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    max_grad_norm: float | None = Field(1.0, gt=0, description="gradient clipping norm (None: off)")
    bf16: bool = Field(True, description="bf16 autocast on GPU (ignored on CPU)")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="'auto' picks cuda when available")
    seed: int = Field(0, description="default seed: subset, data order, dropout")
    eval_batch: int = Field(64, ge=1, description="samples per batch when measuring test/validation loss")
    cpu_threads: int | None = Field(None, ge=1, description="torch threads on CPU (default: 1 below 20M "
                                                             "parameters, where threading only adds overhead, "
                                                             "else all cores)")
    ntk: bool | None = Field(None, description="also compute the NTK features (lensray.engine.ntk); null: in a "
                             "screening, on when predictor.method is lensllm (its F), else off")
    ntk_samples: int = Field(32, ge=2, description="probe-set size n of the NTK Gram matrix")
    ntk_dim: int | None = Field(None, ge=16, description="sketch dimension k of the per-sample gradients "
                                                          "(default: lensray.engine.ntk's)")
    method: Literal["full", "lora"] = Field("full", description="fine-tune every weight, or LoRA adapters only "
                                                                "(peft; the base weights frozen)")
    lora_rank: int = Field(8, ge=1, description="LoRA rank r")
    lora_alpha: float = Field(16.0, gt=0, description="LoRA scaling alpha (the update is scaled by alpha / r)")
    lora_dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    lora_target_modules: list[str] | None = Field(None, description="module names that get adapters (default: "
                                                                     "peft's choice for the architecture)")
    dtype: Literal["fp32", "bf16", "auto"] = Field("fp32", description="dtype the weights are loaded in; 'auto': "
                                                                       "the checkpoint's own")
    gradient_checkpointing: bool = Field(False, description="recompute activations in the backward pass (less "
                                                            "memory, one more forward pass of compute)")


@dataclass
class ProbeResult:
    """Outcome of one probe.

    Attributes
    ----------
    status:
        ``"ok"``; ``"diverged"`` (NaN/inf loss twice, the second time at half the learning
        rate); ``"failed"`` (out of memory down to micro-batch 1).
    test_loss:
        Mean NLL per target token on the task's test split; None unless ``status == "ok"``.
    steps, learning_rate, micro_batch, grad_accum:
        Optimiser steps, peak learning rate and batch shape of the last attempt.
    tokens, flops:
        Training tokens processed (padding excluded, prompt included) and the FLOPs spent on them,
        ``(4 + 2 * gradient_checkpointing) * n_params + 2 * trainable_params`` per token: forward,
        backward through the activations (and a recomputed forward), weight gradients of the
        trained parameters only (6 * n_params for a full fine-tune).
    n_params, trainable_params:
        Parameters of the model (adapters included) and those trained.
    wall_seconds, train_seconds:
        The whole probe (retries, evaluation, NTK) and the training loop of the last attempt.
    peak_memory_bytes:
        Peak GPU memory allocated during the probe, or the process's peak RSS on CPU.
    ntk:
        ``lensray.engine.ntk.NTKFeatures.to_dict()`` at this probe's learning rate and steps, when asked.
    error:
        Why the probe is not ok (with the step and learning rate for a divergence).
    attempts, attempt_log:
        Number of training attempts and one dict per attempt
        (``learning_rate, micro_batch, grad_accum, outcome ("ok"|"diverged"|"oom"), step``).
    """

    model: str
    n_samples: int
    status: Literal["ok", "diverged", "failed"]
    test_loss: float | None
    steps: int
    learning_rate: float
    tokens: int
    flops: float
    wall_seconds: float
    peak_memory_bytes: int
    n_params: int
    train_seconds: float = 0.0
    trainable_params: int = 0
    ntk: dict[str, Any] | None = None
    error: str | None = None
    attempts: int = 1
    attempt_log: list[dict[str, Any]] = field(default_factory=list)
    seed: int = 0
    micro_batch: int = 0
    grad_accum: int = 0
    kind: str = ""

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-serialisable dict."""
        return asdict(self)


@dataclass
class FaultInjector:
    """Test hook: raise OOM for micro-batches above a size, or make the loss NaN.

    ``oom_above`` raises where the ranks agree on faults (before a micro-step's forward pass);
    ``collective_oom_above`` inside a collective (the synchronising backward pass under DDP, the
    first forward pass of a step under FSDP; never in one process, which runs no collective): it
    ends the probe with :class:`CollectiveOutOfMemory`.

    ``nan_at_step`` poisons the loss at that optimiser step (1-based) of every attempt whose
    learning rate exceeds ``nan_above_lr`` (all attempts when it is None). ``ranks`` limits
    both faults to those ranks of the torch.distributed group (None: every rank; a single
    process is rank 0). In ``LENSRAY_FAULTS`` several ranks are joined with ``+``
    (``"oom_above=4,ranks=1+3"``). ``model`` limits a spec to the runner of that model id (the
    id must hold no ``,`` or ``;``); ``LENSRAY_FAULTS`` may hold several specs joined by ``;``,
    and a runner takes the first that applies to its model.
    """

    oom_above: int | None = None
    collective_oom_above: int | None = None
    nan_at_step: int | None = None
    nan_above_lr: float | None = None
    ranks: tuple[int, ...] | None = None
    model: str | None = None

    @classmethod
    def from_env(cls, model: str | None = None) -> "FaultInjector | None":
        """The spec of ``LENSRAY_FAULTS`` that applies to ``model`` (None: the first spec)."""
        for spec in os.environ.get("LENSRAY_FAULTS", "").split(";"):
            if not spec.strip():
                continue
            faults = cls._parse(spec)
            if model is None or faults.model is None or faults.model == model:
                return faults
        return None

    @classmethod
    def _parse(cls, spec: str) -> "FaultInjector":
        kw: dict[str, Any] = {}
        for item in spec.split(","):
            key, _, value = item.partition("=")
            key = key.strip()
            if key not in ("oom_above", "collective_oom_above", "nan_at_step", "nan_above_lr", "ranks", "model"):
                raise LensrayInputError(f"LENSRAY_FAULTS: unknown fault {key!r}")
            try:
                if key == "model":
                    kw[key] = value.strip()
                elif key == "ranks":
                    kw[key] = tuple(int(r) for r in value.split("+"))
                else:
                    kw[key] = float(value) if key == "nan_above_lr" else int(value)
            except ValueError:
                raise LensrayInputError(f"LENSRAY_FAULTS: bad value {value.strip()!r} for {key!r}") from None
        return cls(**kw)

    def _here(self, rank: int) -> bool:
        return self.ranks is None or rank in self.ranks

    def before_micro_step(self, micro_batch: int, rank: int = 0) -> None:
        import torch

        if self.oom_above is not None and micro_batch > self.oom_above and self._here(rank):
            raise torch.OutOfMemoryError(f"injected out of memory at micro_batch {micro_batch}")

    def in_collective(self, micro_batch: int, rank: int = 0) -> None:
        import torch

        if self.collective_oom_above is not None and micro_batch > self.collective_oom_above and self._here(rank):
            raise torch.OutOfMemoryError(f"injected out of memory inside a collective at micro_batch {micro_batch}")

    def poison(self, step: int, learning_rate: float, rank: int = 0) -> bool:
        return (self.nan_at_step is not None and step == self.nan_at_step and self._here(rank)
                and (self.nan_above_lr is None or learning_rate > self.nan_above_lr))


class _Diverged(Exception):
    def __init__(self, step: int, value: float):
        super().__init__(f"loss became {value} at step {step}")
        self.step = step


class _InCollective(Exception):
    """Out of memory on this rank inside a collective (raised by ``ProbeRunner._collective``)."""


class CollectiveOutOfMemory(RuntimeError):
    """This rank ran out of memory inside a collective: the probe cannot be retried in place.

    The other ranks wait in the collective this rank left (see the module docstring), so the
    worker group must end; restart it with :meth:`smaller` settings. ``attempt_log`` holds the
    probe's attempts so far, this one last (outcome ``"oom"``).
    """

    def __init__(self, n_samples: int, micro_batch: int, grad_accum: int, eval_batch: int,
                 attempt_log: list[dict[str, Any]], detail: str):
        super().__init__(f"out of memory inside a collective at D={n_samples}, micro_batch {micro_batch} "
                         f"(grad_accum {grad_accum}): {detail}")
        self.n_samples, self.micro_batch, self.grad_accum, self.eval_batch = n_samples, micro_batch, grad_accum, eval_batch
        self.attempt_log = attempt_log

    def smaller(self) -> dict[str, int] | None:
        """Half the micro-batch and evaluation batch, twice the accumulation (the same effective
        batch, as the in-place retry: :func:`_halved`); None at micro-batch 1."""
        if self.micro_batch <= 1:
            return None
        micro_batch, grad_accum = _halved(self.micro_batch, self.grad_accum)
        return {"micro_batch": micro_batch, "grad_accum": grad_accum, "eval_batch": max(1, self.eval_batch // 2)}


def _halved(micro_batch: int, grad_accum: int) -> tuple[int, int]:
    """The settings after an out-of-memory error: half the micro-batch, twice the accumulation."""
    return max(1, micro_batch // 2), grad_accum * 2


def _lr_factor(schedule: str, step: int, total: int, warmup: int) -> float:
    """Multiplier of the peak learning rate at optimiser step ``step`` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _peak_memory(device: Any) -> int:
    import torch

    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # process peak RSS (Linux: KiB)


def _distributed() -> tuple[int, int]:
    """(world size, rank) of the initialised torch.distributed group, else (1, 0)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def _state_bytes(opt: Any) -> int:
    """Bytes of this rank's optimiser state (with FSDP: the shards of the moments)."""
    from lensray.engine.parallel import local_bytes

    return local_bytes(v for state in opt.state.values() for v in state.values() if hasattr(v, "numel"))


def _all_reduce_sum(values: list[float], device: Any) -> list[float]:
    import torch
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


STRATEGIES = ("ddp", "fsdp")


def _with_lora(model: Any, kind: str, probe: ProbeConfig) -> Any:
    """``model`` with LoRA adapters (peft) on ``probe.lora_target_modules``; the base weights frozen."""
    from peft import LoraConfig, TaskType, get_peft_model

    config = LoraConfig(r=probe.lora_rank, lora_alpha=probe.lora_alpha, lora_dropout=probe.lora_dropout,
                        target_modules=probe.lora_target_modules,
                        task_type=TaskType.SEQ_2_SEQ_LM if kind == "seq2seq" else TaskType.CAUSAL_LM)
    try:
        with warnings.catch_warnings():  # GPT-2's Conv1D layers: peft sets fan_in_fan_out itself, and says so
            warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
            model = get_peft_model(model, config)
    except ValueError as exc:  # no target module found, or the architecture needs them named
        raise LensrayInputError(f"probe.lora_target_modules: {one_line(exc, 300)}") from None
    if probe.gradient_checkpointing:
        model.enable_input_require_grads()  # frozen embeddings: checkpointed blocks still need an input gradient
    return model


class ProbeRunner:
    """Runs probes of one candidate on one task.

    Parameters
    ----------
    model:
        Hub id, local folder or ``tiny:`` id (see ``lensray.engine.models``).
    task, probe:
        Task and probe configurations.
    trust_remote_code, allow_pickle:
        Per-candidate opt-ins (see ``lensray.engine.models.load_candidate``).
    task_data:
        An already loaded task (shared between runners); loaded from ``task`` when None.
    faults:
        Fault injection for tests; defaults to ``FaultInjector.from_env(model)``.
    strategy:
        ``"ddp"`` (replicated parameters) or ``"fsdp"`` (sharded with FSDP2); it matters only
        when a torch.distributed group of several ranks is initialised (see the module docstring).
    """

    def __init__(self, model: str, task: TaskConfig | None = None, probe: ProbeConfig | None = None,
                 trust_remote_code: bool = False, allow_pickle: bool = False,
                 task_data: TaskData | None = None, faults: FaultInjector | None = None,
                 strategy: str = "ddp"):
        if strategy not in STRATEGIES:
            raise LensrayInputError(f"strategy {strategy!r} is not one of {list(STRATEGIES)}")
        self.strategy = strategy
        self.model_id = model
        self.task = task or TaskConfig()
        self.probe = probe or ProbeConfig()
        self.trust_remote_code = trust_remote_code
        self.allow_pickle = allow_pickle
        self.data = task_data
        self.faults = faults if faults is not None else FaultInjector.from_env(model)
        self._model: Any = None
        self._ntk_cache: dict[int, Any] = {}
        self._eval_batch = self.probe.eval_batch  # shrinks with the micro-batch after an out-of-memory error
        self._oom_carried = False  # see _train

    # ------------------------------------------------------------------ setup

    def load(self) -> "ProbeRunner":
        """Load the candidate and the task; raises LensrayInputError before any training."""
        from lensray.engine.models import load_candidate

        if self._model is not None:
            return self
        if self.data is None:
            self.data = load_task(self.task)
        dtype = {"fp32": "float32", "bf16": "bfloat16", "auto": "auto"}[self.probe.dtype]
        return self._attach(*load_candidate(self.model_id, self.trust_remote_code, self.allow_pickle, dtype=dtype))

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, kind: Literal["causal", "seq2seq"], task_data: TaskData,
                   task: TaskConfig | None = None, probe: ProbeConfig | None = None, name: str = "model",
                   faults: FaultInjector | None = None, strategy: str = "ddp") -> "ProbeRunner":
        """A runner around an already built model (benchmarks, models built in memory)."""
        runner = cls(name, task, probe, task_data=task_data, faults=faults, strategy=strategy)
        return runner._attach(model, tokenizer, kind)

    def _attach(self, model: Any, tokenizer: Any, kind: Literal["causal", "seq2seq"]) -> "ProbeRunner":
        import torch

        self.tokenizer, self.kind = tokenizer, kind
        want = self.probe.device
        if want == "cuda" and not torch.cuda.is_available():
            raise LensrayInputError("probe.device is 'cuda' but no GPU is available")
        on_gpu = want == "cuda" or (want == "auto" and torch.cuda.is_available())
        self.device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
        self.world, self.rank = _distributed()
        self._ddp = None
        self._fsdp = self.world > 1 and self.strategy == "fsdp"
        if self.probe.method == "lora":
            if self._fsdp:
                raise LensrayInputError("probe.method 'lora' runs with strategy 'ddp' (or one worker), not 'fsdp'")
            model = _with_lora(model, kind, self.probe)
        if self.probe.gradient_checkpointing:
            if not getattr(model, "supports_gradient_checkpointing", False):
                raise LensrayInputError(f"probe.gradient_checkpointing: {self.model_id} does not support it")
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x names it so
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.n_params = sum(p.numel() for p in model.parameters())
        self.trainable_params = sum(p.numel() for p in model.parameters() if p.requires_grad)
        self.flops_per_token = ((4 + 2 * self.probe.gradient_checkpointing) * self.n_params
                                + 2 * self.trainable_params)
        if self._fsdp:
            from lensray.engine.parallel import fully_shard_model, local_snapshot

            if self.probe.ntk:
                raise LensrayInputError("probe.ntk is not supported with strategy 'fsdp' on several workers "
                                        "(per-sample gradients of sharded parameters); use strategy 'ddp'")
            fully_shard_model(model, self.device, self.world)  # in place; moves the shards to the device
            self._model = model
            self._init_state = local_snapshot(model, torch.device("cpu"))  # this rank's shards only
        else:
            self._init_state = {k: v.detach().clone().cpu() for k, v in model.state_dict().items()}
            self._model = model.to(self.device)
        if self.world > 1 and not self._fsdp:
            from torch.nn.parallel import DistributedDataParallel

            # no buffer sync in forward passes: every rank loads the same buffers and training does not
            # change them; syncing them would put a collective into forward passes that an
            # out-of-memory error may cut short on one rank only (newer torch: forward_sync_buffers)
            sync = inspect.signature(DistributedDataParallel.__init__).parameters
            no_sync_buffers = {"forward_sync_buffers" if "forward_sync_buffers" in sync else "broadcast_buffers": False}
            self._ddp = DistributedDataParallel(self._model, device_ids=[self.device.index] if on_gpu else None,
                                                find_unused_parameters=True, **no_sync_buffers)
        self.optimizer_state_bytes = 0
        self.pad_id = tokenizer.pad_token_id
        limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
        self.max_length = min(self.task.max_length, limit) if limit else self.task.max_length
        self._test = encode(self.data.test, tokenizer, kind, self.max_length)
        self._val = encode(self.data.validation, tokenizer, kind, self.max_length)
        return self

    @property
    def model(self) -> Any:
        """The loaded model (weights of the last probe)."""
        return self.load()._model

    def reset(self) -> None:
        """Restore the pre-trained weights (with FSDP: this rank's shards of them)."""
        self._restore(self._init_state)

    def parameter_bytes(self) -> int:
        """Bytes of parameter storage held by this rank (with FSDP: its shards only)."""
        from lensray.engine.parallel import local_bytes

        return local_bytes(self.load()._model.parameters())

    def _free_memory(self) -> None:
        """Drop gradients and cached GPU blocks after a failed attempt."""
        import gc

        import torch

        self._model.zero_grad(set_to_none=True)
        self._oom_carried = False
        if self._ddp is not None:
            # a step given up after the synchronising forward pass leaves DDP's reducer expecting
            # that pass's backward; without a reset the next no_sync backward would all-reduce
            # (Reducer._reset_state: torch >= 2.2)
            reset = getattr(self._ddp.reducer, "_reset_state", None)
            if reset is not None:
                reset()
        if self._fsdp:
            from lensray.engine.parallel import reset_fsdp_iteration

            reset_fsdp_iteration(self._model)  # an error inside forward/backward leaves FSDP mid-iteration
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @contextlib.contextmanager
    def _collective(self, micro_batch: int | None = None) -> Any:
        """Code that runs collectives on several ranks: an out-of-memory error in it raises
        ``_InCollective`` (no retry in place: the other ranks wait in the collective). With
        ``micro_batch`` the ``collective_oom_above`` fault is injected here."""
        import torch

        try:
            if self.faults and micro_batch is not None:
                self.faults.in_collective(micro_batch, self.rank)
            yield
        except torch.OutOfMemoryError as exc:
            if self.world == 1:
                raise
            raise _InCollective(str(exc)) from exc

    def _autocast(self) -> Any:
        import torch

        on_gpu = self.device.type == "cuda" and self.probe.bf16
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=on_gpu)

    # ------------------------------------------------------------------ loss

    def _batch_nll(self, batch: dict[str, Any], module: Any = None) -> tuple[Any, Any]:
        """(sum of target-token NLL, number of target tokens) of one collated batch.

        ``module`` is what runs the forward pass (the DDP wrapper while training on several
        workers); the model itself by default.
        """
        return self._nll(*self._forward(batch, module))

    def _forward(self, batch: dict[str, Any], module: Any = None) -> tuple[Any, Any]:
        """(logits, labels) of one collated batch, aligned for the loss (the forward pass)."""
        module = module or self._model
        batch = {k: v.to(self.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with self._autocast():
            if self.kind == "seq2seq":
                dec = self._model.prepare_decoder_input_ids_from_labels(labels=labels)
                logits = module(**batch, decoder_input_ids=dec).logits
            else:
                logits = module(**batch).logits[:, :-1]
                labels = labels[:, 1:]
        return logits, labels

    @staticmethod
    def _nll(logits: Any, labels: Any) -> tuple[Any, Any]:
        """(sum of target-token NLL, number of target tokens): the loss, outside the model."""
        import torch.nn.functional as F

        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), labels.reshape(-1),
                              ignore_index=-100, reduction="sum")
        return nll, (labels != -100).sum()  # tensors: no host sync while training

    def evaluate(self, encoded: list[Encoded]) -> float:
        """Mean NLL per target token of ``encoded`` under the current weights.

        With several data-parallel workers each evaluates its share and the sums are reduced;
        with FSDP every rank runs the same number of forward passes (a rank with fewer batches
        runs extra ones whose result is dropped), since each forward gathers the parameters.
        """
        import torch

        self._model.eval()
        total, count, oom = 0.0, 0, self._oom_carried
        size = self._eval_batch
        mine = encoded[self.rank :: self.world]
        passes = math.ceil(len(encoded[0 :: self.world]) / size) if self._fsdp else math.ceil(len(mine) / size)
        with torch.no_grad():
            for i in range(0, 0 if oom else passes * size, size):
                batch = mine[i : i + size]
                try:  # under FSDP the others wait in the forward's all-gathers: no agreement possible
                    with self._collective() if self._fsdp else contextlib.nullcontext():
                        nll, n = self._batch_nll(collate(batch or encoded[:1], self.pad_id, self.kind))
                except torch.OutOfMemoryError:
                    # without FSDP the passes are local: stop here and tell the others in the
                    # reduction below
                    if self.world == 1:
                        raise
                    oom = True
                    break
                if batch:
                    total += float(nll)
                    count += int(n)
        if self.world > 1:
            total, count, oom = _all_reduce_sum([total, count, float(oom)], self.device)
            if oom:
                raise torch.OutOfMemoryError(f"out of memory while evaluating on {oom:.0f} rank(s)")
        return total / max(count, 1)

    def test_loss(self) -> float:
        """Test loss of the current weights."""
        return self.evaluate(self.load()._test)

    # ------------------------------------------------------------------ training

    def _plan(self, n: int, micro_batch: int, grad_accum: int) -> tuple[int, int]:
        """(optimiser steps, steps per epoch) for ``n`` samples."""
        per_step = micro_batch * grad_accum
        per_epoch = math.ceil(n / per_step)
        steps = math.ceil(self.probe.epochs * n / per_step)
        if self.probe.max_steps is not None:
            steps = min(steps, self.probe.max_steps)
        return steps, per_epoch

    def _train(self, train: list[Encoded], lr: float, micro_batch: int, grad_accum: int,
               seed: int) -> tuple[int, int, float]:
        """Fine-tune the current weights; returns (optimiser steps, tokens processed, seconds)."""
        import torch

        p = self.probe
        per_step = micro_batch * grad_accum
        if per_step < self.world:
            raise LensrayInputError(f"probe: micro_batch * grad_accum = {per_step} is smaller than the {self.world} "
                                    "data-parallel workers")
        steps, per_epoch = self._plan(len(train), micro_batch, grad_accum)
        gen = torch.Generator().manual_seed(seed)
        order: list[int] = []
        while len(order) < steps * per_step:
            order += torch.randperm(len(train), generator=gen).tolist()
        torch.manual_seed(seed)
        trained = [q for q in self._model.parameters() if q.requires_grad]
        decay = [q for q in trained if q.ndim >= 2]
        no_decay = [q for q in trained if q.ndim < 2]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": p.weight_decay},
                                 {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                                fused=self.device.type == "cuda")
        start = time.perf_counter()
        warmup = int(p.warmup_ratio * steps)
        eval_every = p.eval_every or per_epoch
        best, best_state, since_best = math.inf, None, 0
        tokens = 0
        done = 0
        module = self._ddp or self._model
        self._oom_carried = False  # this rank ran out of memory after the step's last agreement
        self._model.train()
        for step in range(steps):
            for group in opt.param_groups:
                group["lr"] = lr * _lr_factor(p.schedule, step, steps, warmup)
            chunk = [train[i] for i in order[step * per_step : (step + 1) * per_step]]
            n_target = sum(sum(1 for x in (e.decoder_labels or e.labels) if x != -100) for e in chunk)
            mine = chunk[self.rank :: self.world]  # this worker's share of the step's samples
            micros = [mine[m : m + micro_batch] for m in range(0, len(mine), micro_batch)]
            if self._fsdp:  # as many passes on every rank: the short ones repeat a sample at weight 0
                most = math.ceil(len(chunk[0 :: self.world]) / micro_batch)
                micros += [[]] * (most - len(micros))
            opt.zero_grad(set_to_none=True)
            tokens += self._step(module, micros, mine, n_target, step + 1, lr, micro_batch)
            if p.max_grad_norm is not None and self._fsdp:  # all-reduces the shards' norms
                with self._collective():
                    torch.nn.utils.clip_grad_norm_(self._model.parameters(), p.max_grad_norm)
            try:  # local: an out-of-memory error here (AdamW's state, say) waits for the next agreement
                if p.max_grad_norm is not None and not self._fsdp:
                    torch.nn.utils.clip_grad_norm_(self._model.parameters(), p.max_grad_norm)
                opt.step()
            except torch.OutOfMemoryError:
                if self.world == 1:
                    raise
                self._oom_carried = True
            done = step + 1
            if p.patience and self._val and (done % eval_every == 0 or done == steps):
                if self._fsdp:  # the evaluation's forward passes all-gather
                    self._agree(False, torch.ones((), dtype=torch.bool, device=self.device), done)
                val = self.evaluate(self._val)
                self._model.train()
                if not math.isfinite(val):
                    raise _Diverged(done, val)
                if val < best:
                    best, since_best = val, 0
                    best_state = self._snapshot()
                else:
                    since_best += 1
                    if since_best >= p.patience:
                        break
        if best_state is not None:
            self._restore(best_state)
        self.optimizer_state_bytes = _state_bytes(opt)
        self._model.eval()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.world > 1:
            tokens, oom = _all_reduce_sum([tokens, float(self._oom_carried)], self.device)
            if oom:
                raise torch.OutOfMemoryError(f"out of memory on {oom:.0f} rank(s) in the optimiser step")
            tokens = int(tokens)
        return done, tokens, time.perf_counter() - start

    def _step(self, module: Any, micros: list[list[Encoded]], mine: list[Encoded], n_target: int, step: int,
              lr: float, micro_batch: int) -> int:
        """Forward and backward passes of optimiser step ``step`` (1-based); returns the tokens trained on.

        Raises ``torch.OutOfMemoryError`` or ``_Diverged``; on several ranks every rank raises
        the same, agreed in ``_agree`` before the next collective that an out-of-memory error
        on one rank would skip (see the module docstring); ``_InCollective`` on a rank that
        runs out of memory inside a collective.
        """
        import torch

        shared = self.world > 1
        oom = self._oom_carried  # from the previous optimiser step: skip this one's work
        finite = torch.ones((), dtype=torch.bool, device=self.device)
        batches: list[dict[str, Any]] = []
        try:  # local on every strategy: injected faults, collation, copies to the device
            for micro in [] if oom else micros:
                if self.faults:
                    self.faults.before_micro_step(micro_batch, self.rank)
                batches.append({k: v.to(self.device) for k, v in collate(micro or mine[:1], self.pad_id,
                                                                             self.kind).items()})
        except torch.OutOfMemoryError:
            if not shared:
                raise
            oom, batches = True, []
        tokens = 0
        if self._fsdp:
            # every forward and backward pass all-gathers (and every backward reduce-scatters):
            # agree before the first forward, and after each loss before its backward
            self._agree(oom, finite, step)
            for j, (micro, batch) in enumerate(zip(micros, batches)):
                with self._collective(micro_batch if j == 0 else None):
                    logits, labels = self._forward(batch, module)
                try:
                    loss = self._scaled_loss(logits, labels, micro, n_target, step, lr)
                    finite &= torch.isfinite(loss.detach())
                except torch.OutOfMemoryError:
                    oom, loss = True, None
                del logits, labels
                self._agree(oom, finite, step)
                with self._collective():
                    loss.backward()
                tokens += count_tokens(micro)
            return tokens
        pending = None  # DDP: the last micro-batch's loss, whose backward all-reduces the gradients
        for j, (micro, batch) in enumerate(zip(micros, batches)):
            last = j == len(micros) - 1
            try:
                with contextlib.nullcontext() if last or self._ddp is None else self._ddp.no_sync():
                    loss = self._scaled_loss(*self._forward(batch, module), micro, n_target, step, lr)
                    finite &= torch.isfinite(loss.detach())
                    if last and shared:
                        pending = loss
                        break
                    loss.backward()
            except torch.OutOfMemoryError:
                if not shared:
                    raise
                oom, loss = True, None
                break
            tokens += count_tokens(micro)
        self._agree(oom, finite, step)  # one host sync per step; one tiny all-reduce on several ranks
        if pending is not None:
            with self._collective(micro_batch):  # its bucket all-reduces: no agreement possible in advance
                pending.backward()
            tokens += count_tokens(micros[-1])
        return tokens

    def _scaled_loss(self, logits: Any, labels: Any, micro: list[Encoded], n_target: int, step: int,
                     lr: float) -> Any:
        """A micro-batch's training loss: its share of the step's mean target-token NLL."""
        nll, _ = self._nll(logits, labels)
        # DDP and FSDP average gradients over workers: scale so that the sum is the step's mean
        loss = nll * (self.world / max(n_target, 1) if micro else 0.0)
        if self.faults and self.faults.poison(step, lr, self.rank):
            loss = loss * float("nan")
        return loss

    def _agree(self, oom: bool, finite: Any, step: int) -> None:
        """Raise on every rank if any rank ran out of memory or saw a non-finite loss in ``step``.

        ``oom``: this rank's local out-of-memory error; ``finite``: a device bool tensor, all of
        this rank's losses so far finite. One all-reduce of two numbers on several ranks (none
        on one) and one host sync.
        """
        import torch

        if self.world == 1:
            bad_oom, bad_loss = oom, not bool(finite)
        else:
            import torch.distributed as dist

            flags = torch.zeros(2, dtype=torch.float32, device=self.device)
            flags[0] = float(oom or self._oom_carried)
            flags[1] = (~finite).float()
            dist.all_reduce(flags)
            bad_oom, bad_loss = flags.tolist()
        if bad_oom:
            raise torch.OutOfMemoryError(f"out of memory on {bad_oom:.0f} rank(s) in step {step}")
        if bad_loss:
            raise _Diverged(step, float("nan"))

    def _snapshot(self) -> dict[str, Any]:
        """A copy of the current weights on the device (with FSDP: this rank's shards)."""
        if self._fsdp:
            from lensray.engine.parallel import local_snapshot

            return local_snapshot(self._model)
        return {k: v.detach().clone() for k, v in self._model.state_dict().items()}

    def _restore(self, state: dict[str, Any]) -> None:
        """Load ``state`` (a :meth:`_snapshot`, or the pre-trained weights) into the model."""
        if self._fsdp:
            from lensray.engine.parallel import restore_snapshot

            restore_snapshot(self._model, state)
        else:
            self._model.load_state_dict(state)

    def _ntk_kernel(self, seed: int) -> Any:
        """NTK features (``lensray.engine.ntk.NTKFeatures``) of the pre-trained weights on the fixed probe set.

        The probe set is the first ``ntk_samples`` rows of the train pool under the task's
        split seed: the same X for every probe size. The kernel depends only on the
        pre-trained weights, so it is computed once per seed; each probe evaluates F at its
        own learning rate and step count.
        """
        from lensray.engine.ntk import ntk_features

        if seed not in self._ntk_cache:
            self.reset()
            n = min(self.probe.ntk_samples, len(self.data.train))
            enc = encode(self.data.subset(n, seed=self.task.split_seed), self.tokenizer, self.kind, self.max_length)
            kw = {"sketch_dim": self.probe.ntk_dim} if self.probe.ntk_dim else {}
            self._ntk_cache[seed] = ntk_features(self._model, collate(enc, self.pad_id, self.kind),
                                                 learning_rate=self.probe.learning_rate, steps=0, n_samples=n,
                                                 seed=seed, device=self.device, **kw)
        return self._ntk_cache[seed]

    def run(self, n_samples: int, seed: int | None = None) -> ProbeResult:
        """Fine-tune a fresh copy of the pre-trained weights on ``n_samples`` and measure the test loss.

        Raises LensrayInputError for a subset larger than the train split; faults during
        training are reported in the result (see the module docstring).
        """
        import torch

        self.load()
        threads = torch.get_num_threads()
        if self.device.type == "cpu":
            torch.set_num_threads(self.probe.cpu_threads or (1 if self.n_params < 20_000_000 else os.cpu_count() or 1))
        try:
            return self._run(n_samples, self.probe.seed if seed is None else seed)
        finally:
            torch.set_num_threads(threads)

    def _run(self, n_samples: int, seed: int) -> ProbeResult:
        import torch

        subset = self.data.subset(n_samples, seed)
        train = encode(subset, self.tokenizer, self.kind, self.max_length)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start = time.perf_counter()
        kernel, ntk_error = None, None
        if self.probe.ntk:
            try:
                kernel = self._ntk_kernel(seed)
            except FloatingPointError as exc:
                ntk_error = f"ntk: {exc}"
        lr, mb, ga = self.probe.learning_rate, self.probe.micro_batch, self.probe.grad_accum
        log: list[dict[str, Any]] = []
        halved_lr = False
        status, error, steps, tokens, loss, train_seconds = "ok", None, 0, 0, None, 0.0
        while True:
            self.reset()
            self._eval_batch = max(1, self.probe.eval_batch * mb // self.probe.micro_batch)
            try:
                steps, tokens, train_seconds = self._train(train, lr, mb, ga, seed) if n_samples else (0, 0, 0.0)
                loss = self.test_loss()
                if not math.isfinite(loss):
                    raise _Diverged(steps, loss)
                log.append({"learning_rate": lr, "micro_batch": mb, "grad_accum": ga, "outcome": "ok", "step": steps})
                status, error = "ok", None
                break
            except _Diverged as exc:
                log.append({"learning_rate": lr, "micro_batch": mb, "grad_accum": ga, "outcome": "diverged",
                            "step": exc.step})
                status, loss = "diverged", None
                error = f"loss not finite at step {exc.step} with learning rate {lr:g}"
                if halved_lr:
                    break
                lr, halved_lr = lr / 2, True
            except _InCollective as exc:
                log.append({"learning_rate": lr, "micro_batch": mb, "grad_accum": ga, "outcome": "oom", "step": None})
                raise CollectiveOutOfMemory(n_samples, mb, ga, self._eval_batch, log, str(exc)) from None
            except torch.OutOfMemoryError:
                log.append({"learning_rate": lr, "micro_batch": mb, "grad_accum": ga, "outcome": "oom", "step": None})
                status, loss = "failed", None
                error = f"out of memory at micro_batch {mb} (grad_accum {ga})"
                if mb == 1:
                    break
                mb, ga = _halved(mb, ga)
            self._free_memory()  # outside the except block: its traceback no longer pins the tensors
        ntk = None
        if kernel is not None and status == "ok":
            ntk = dataclasses.replace(kernel, learning_rate=lr, steps=steps).to_dict()
        elif ntk_error and status == "ok":
            error = ntk_error
        wall = time.perf_counter() - start
        return ProbeResult(
            model=self.model_id, n_samples=n_samples, status=status, test_loss=loss, steps=steps,
            learning_rate=lr, tokens=tokens, flops=float(self.flops_per_token * tokens), wall_seconds=wall,
            train_seconds=train_seconds, trainable_params=self.trainable_params,
            peak_memory_bytes=_peak_memory(self.device), n_params=self.n_params, ntk=ntk, error=error,
            attempts=len(log), attempt_log=log, seed=seed, micro_batch=mb, grad_accum=ga, kind=self.kind,
        )

