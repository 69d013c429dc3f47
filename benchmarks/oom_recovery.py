"""Out-of-memory recovery of the probe engine on a real device.

One probe (``lensray.engine.probe.ProbeRunner.run``) with a micro-batch far too large for the
model: the engine retries at half the micro-batch and twice the gradient accumulation until an
attempt fits, so the effective batch (and the optimiser steps) stay those asked for. Prints the
result's fields about it: status, the attempt log, the micro-batch and accumulation of the last
attempt, the number of halvings, and whether the effective batch was kept. Exit code 0 when the
probe recovered (status ok after at least one out-of-memory attempt), else 1.

On a CPU no allocation fails cleanly (``torch.OutOfMemoryError`` is a device error), so a dry
run injects the errors with ``--inject-oom-above N`` (``lensray.engine.probe.FaultInjector``: every
micro-batch larger than N fails).

    python benchmarks/oom_recovery.py --model llama-1b --device cuda --micro-batch 1024 --seq-len 512
    python benchmarks/oom_recovery.py --model llama-1b --tiny --device cpu --micro-batch 64 --seq-len 32 \\
        --inject-oom-above 8
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from lensray.engine.data import TaskConfig, TaskData
from lensray.engine.probe import FaultInjector, ProbeConfig, ProbeRunner
from probe_throughput import build, lm_rows, print_figures, resolve_device


def measure(args: argparse.Namespace) -> dict[str, Any]:
    device = resolve_device(args.device)
    model, tokenizer, kind = build(args.model, args.tiny, device)
    n = args.samples or args.micro_batch  # one optimiser step at the asked micro-batch
    rows = lm_rows(n + args.test_rows, args.seq_len)
    data = TaskData(train=rows[args.test_rows:], validation=[], test=rows[:args.test_rows], n_rows=len(rows))
    probe = ProbeConfig(learning_rate=1e-5, epochs=1, micro_batch=args.micro_batch, grad_accum=1, max_steps=1,
                        device=device.type, bf16=args.bf16, warmup_ratio=0.0, eval_batch=args.test_rows)
    faults = FaultInjector(oom_above=args.inject_oom_above) if args.inject_oom_above is not None else None
    runner = ProbeRunner.from_model(model, tokenizer, kind, data, task=TaskConfig(max_length=args.seq_len),
                                    probe=probe, name=args.model, faults=faults)
    result = runner.run(n)
    ooms = sum(1 for a in result.attempt_log if a["outcome"] == "oom")
    return {
        "model": args.model + (" (tiny)" if args.tiny else ""), "n_params": result.n_params,
        "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
        "fault": "injected" if faults else "real", "seq_len": args.seq_len, "n_samples": n,
        "requested_micro_batch": args.micro_batch, "status": result.status, "error": result.error,
        "micro_batch": result.micro_batch, "grad_accum": result.grad_accum, "halvings": ooms,
        "attempts": result.attempts, "attempt_log": result.attempt_log, "steps": result.steps,
        "effective_batch_kept": result.micro_batch * result.grad_accum == args.micro_batch,
        "recovered": result.status == "ok" and ooms >= 1, "test_loss": result.test_loss,
        "wall_seconds": round(result.wall_seconds, 3), "train_seconds": round(result.train_seconds, 3),
        "peak_memory_gib": round(result.peak_memory_bytes / 2**30, 2),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="llama-1b", help="gpt2-125m, llama-1b, or a candidate id")
    p.add_argument("--tiny", action="store_true", help="the preset's family at a tiny shape (CPU dry runs)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seq-len", type=int, default=512, help="tokens per sample")
    p.add_argument("--micro-batch", type=int, default=1024, help="the micro-batch asked for (far too large)")
    p.add_argument("--samples", type=int, default=None, help="probe size D (default: one step, the micro-batch)")
    p.add_argument("--test-rows", type=int, default=8, help="rows of the test split the probe evaluates")
    p.add_argument("--no-bf16", dest="bf16", action="store_false", help="fp32 on GPU")
    p.add_argument("--inject-oom-above", type=int, default=None,
                   help="inject out-of-memory errors for micro-batches above N (CPU dry runs)")
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = measure(args)
    print_figures(out, args.json)
    return 0 if out["recovered"] else 1


if __name__ == "__main__":
    sys.exit(main())
