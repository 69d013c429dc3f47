"""Per-rank memory of the probe engine's two strategies: DDP (replicated) vs FSDP2 (sharded).

Spawns ``--world`` gloo processes on CPU (file:// rendezvous, as tests/engine/test_probe.py), loads a
tiny GPT-2 of a few million parameters once with ``strategy="ddp"`` and once with
``strategy="fsdp"``, runs one probe with each, and prints per rank:
- the bytes of parameter storage the rank holds (a DTensor counts its local shard only),
- the bytes of AdamW state after the probe (exp_avg, exp_avg_sq, step),
- the probe's test loss, steps and tokens (identical up to float rounding between strategies),
- the process's peak RSS (``peak_memory_bytes``; a whole-process figure, shared libraries and
  the full model loaded before sharding included, so not the place to see the 1/world).
Then a single-process probe as the reference loss.

Usage: python benchmarks/fsdp_memory.py [--model TINY_ID] [--world N] [--samples D]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

MODEL = "tiny:gpt2:n_layer=4,n_embd=256,n_head=4"
PROBE = dict(learning_rate=1e-3, epochs=1, micro_batch=8, device="cpu", max_steps=8)
TASK = dict(synthetic_rows=800, test_size=64, validation_size=16, max_length=64)


def _worker(rank: int, world: int, init_file: str, cache: str, out: str, model: str, samples: int) -> None:
    import torch.distributed as dist

    from lensray.engine.data import TaskConfig
    from lensray.engine.probe import ProbeConfig, ProbeRunner

    os.environ["LENSRAY_CACHE"] = cache
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    rows = {}
    try:
        for strategy in ("ddp", "fsdp"):
            runner = ProbeRunner(model, TaskConfig(**TASK), ProbeConfig(**PROBE), strategy=strategy).load()
            params = runner.parameter_bytes()
            start = time.perf_counter()
            result = runner.run(samples)
            rows[strategy] = {"rank": rank, "n_params": runner.n_params, "param_bytes": params,
                              "optimizer_bytes": runner.optimizer_state_bytes, "test_loss": result.test_loss,
                              "steps": result.steps, "tokens": result.tokens, "status": result.status,
                              "peak_rss": result.peak_memory_bytes, "seconds": time.perf_counter() - start}
            del runner
        Path(f"{out}.{rank}").write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()
    os._exit(0)  # skip interpreter teardown (a gloo thread winding down can abort the process)


def main() -> None:
    import torch.multiprocessing as mp

    from lensray.engine.data import TaskConfig
    from lensray.engine.probe import ProbeConfig, ProbeRunner

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--samples", type=int, default=64)
    args = ap.parse_args()
    tmp = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    cache = os.environ.setdefault("LENSRAY_CACHE", str(Path.home() / ".cache" / "lensray"))
    single = ProbeRunner(args.model, TaskConfig(**TASK), ProbeConfig(**PROBE)).load()  # builds the model once
    one = single.run(args.samples)
    full = single.parameter_bytes()
    mp.spawn(_worker, args=(args.world, str(tmp / "init"), cache, str(tmp / "out"), args.model, args.samples),
             nprocs=args.world)
    rows = [json.loads((tmp / f"out.{r}").read_text()) for r in range(args.world)]
    mib = 2 ** 20
    print(f"model {args.model}: {single.n_params:,} parameters, {full / mib:.2f} MiB float32; "
          f"{args.world} gloo ranks on CPU, one probe of D={args.samples} "
          f"(micro_batch {PROBE['micro_batch']}, max_steps {PROBE['max_steps']})")
    print(f"{'strategy':8} {'rank':>4} {'param MiB':>10} {'of full':>8} {'optim MiB':>10} {'of 2x full':>10} "
          f"{'test_loss':>12} {'steps':>5} {'tokens':>7} {'peak RSS MiB':>12} {'probe s':>8}")
    for strategy in ("ddp", "fsdp"):
        for row in (r[strategy] for r in rows):
            print(f"{strategy:8} {row['rank']:>4} {row['param_bytes'] / mib:>10.3f} {row['param_bytes'] / full:>8.3f} "
                  f"{row['optimizer_bytes'] / mib:>10.3f} {row['optimizer_bytes'] / (2 * full):>10.3f} "
                  f"{row['test_loss']:>12.8f} {row['steps']:>5} {row['tokens']:>7} {row['peak_rss'] / mib:>12.1f} "
                  f"{row['seconds']:>8.2f}")
    print(f"{'single':8} {'-':>4} {full / mib:>10.3f} {1.0:>8.3f} {single.optimizer_state_bytes / mib:>10.3f} "
          f"{single.optimizer_state_bytes / (2 * full):>10.3f} {one.test_loss:>12.8f} {one.steps:>5} {one.tokens:>7} "
          f"{one.peak_memory_bytes / mib:>12.1f} {one.wall_seconds:>8.2f}")
    ratio = sum(r["fsdp"]["param_bytes"] for r in rows) / len(rows) / (sum(r["ddp"]["param_bytes"] for r in rows) / len(rows))
    print(f"fsdp / ddp parameter bytes per rank: {ratio:.4f} (1/world = {1 / args.world:.4f})")


if __name__ == "__main__":
    main()
