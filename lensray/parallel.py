"""Data parallelism inside one probe: the ranks of a worker group train one candidate together.

torch.distributed only (no Ray): the Ray Train workers of :mod:`lensray.screen` call
:func:`data_parallel` after loading the candidate, once the default process group exists.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class RankShard:
    """A task whose subsets are this rank's equal share of the nested subsets (padded by wrap-around)."""

    def __init__(self, data: Any, rank: int, world: int) -> None:
        self._data, self._rank, self._world = data, rank, world

    def subset(self, n_samples: int, seed: int = 0) -> list:
        rows = self._data.subset(n_samples, seed)
        if not rows:
            return rows
        per_rank = -(-len(rows) // self._world)
        return [rows[(self._rank + self._world * i) % len(rows)] for i in range(per_rank)]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._data, name)


def data_parallel(runner: Any, rank: int, world: int, strategy: str) -> None:
    """Data parallelism across the Train workers, as DDP does it: each rank trains on its shard
    and every gradient is averaged over the ranks (all-reduce) as soon as it is accumulated.

    The probe engine owns the training loop, so instead of wrapping the model in
    ``DistributedDataParallel`` (whose ``module.`` state-dict prefix would break the engine's
    weight resets) the same all-reduce runs in per-parameter post-accumulate hooks. The
    effective batch is ``micro_batch * grad_accum * world``. The weights stay identical on every
    rank, so every rank measures the same test loss. ``fsdp`` is not sharded yet: it runs this.
    """
    import torch.distributed as dist

    if strategy != "ddp":
        log.warning("strategy %r: parameters are not sharded; running data-parallel (DDP-style)", strategy)

    def average(param: Any) -> None:
        dist.all_reduce(param.grad)
        param.grad.div_(world)

    runner.data = RankShard(runner.data, rank, world)
    for param in runner.model.parameters():
        if param.requires_grad:
            param.register_post_accumulate_grad_hook(average)


def sum_over_ranks(value: float, device: Any) -> float:
    """``value`` summed over the ranks of the default process group."""
    import torch
    import torch.distributed as dist

    box = torch.tensor([float(value)], dtype=torch.float64, device=device)
    dist.all_reduce(box)
    return float(box.item())


def agreed(rank: int, flag: bool) -> bool:
    """Rank 0's flag on every rank (one broadcast when several workers run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
