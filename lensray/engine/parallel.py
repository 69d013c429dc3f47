"""Coordination of the ranks of one candidate's worker group (torch.distributed, no Ray).

The training itself is data-parallel inside :class:`lensray.engine.probe.ProbeRunner` (DDP or FSDP2,
each optimiser step's samples split over the ranks, tokens and evaluation sums all-reduced);
this module holds what the Ray Train worker loop of :mod:`lensray.run.screen` needs around it, and
the FSDP2 helpers of the probe engine (sharding a model, rank-local snapshots and sizes).
"""

from __future__ import annotations

from typing import Any, Iterable


def agreed(rank: int, flag: bool) -> bool:
    """Rank 0's flag on every rank (one broadcast when several workers run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])


# --------------------------------------------------------------------------- FSDP2 (fully_shard)


def transformer_blocks(model: Any) -> list[Any]:
    """The repeated blocks of ``model`` that FSDP shards one by one (outermost first).

    Hugging Face models name their block classes in ``_no_split_modules`` (``GPT2Block``,
    ``T5Block``, ...); other models fall back to the members of their ``nn.ModuleList``s.
    Blocks nested inside another block are left to the outer one.
    """
    import torch.nn as nn

    names = set(getattr(model, "_no_split_modules", None) or ())
    blocks = [m for m in model.modules() if m is not model and type(m).__name__ in names]
    if not blocks:
        blocks = [m for lst in model.modules() if isinstance(lst, nn.ModuleList) for m in lst]
    inside: set[int] = set()
    for b in blocks:
        inside.update(id(m) for m in b.modules() if m is not b)
    return [b for b in blocks if id(b) not in inside]


def fully_shard_model(model: Any, device: Any, world: int) -> int:
    """Shard ``model``'s parameters over the ``world`` ranks of the default group with FSDP2.

    Each transformer block (:func:`transformer_blocks`) becomes one FSDP unit, then the root
    takes the rest (embeddings, final norm, tied head). Parameters become ``DTensor``s
    sharded on dim 0 and are moved to ``device``; every unit reshards after forward, so
    between steps a rank holds only its shard. The module is changed in place; returns the
    number of blocks sharded on their own.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world,))
    blocks = transformer_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    return len(blocks)


def _local(t: Any) -> Any:
    """The rank-local part of ``t`` (a ``DTensor``'s shard, else ``t`` itself)."""
    return t.to_local() if hasattr(t, "to_local") else t


def local_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of rank-local storage of ``tensors`` (a DTensor counts its shard only); each storage once."""
    seen: set[int] = set()
    total = 0
    for t in tensors:
        if id(t) in seen:
            continue
        seen.add(id(t))
        local = _local(t)
        total += local.numel() * local.element_size()
    return total


def local_snapshot(model: Any, device: Any = None) -> dict[str, Any]:
    """Copies of the rank-local parameter shards and buffers of ``model`` (on ``device``, default: theirs)."""
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        local = _local(t).detach()
        out[name] = local.to(device, copy=True) if device is not None else local.clone()
    return out


def restore_snapshot(model: Any, snapshot: dict[str, Any]) -> None:
    """Copy a :func:`local_snapshot` back into ``model``'s parameter shards and buffers, in place.

    In-place copies into the local shards are what the optimiser step does too, so FSDP's
    all-gathers see the restored values; no collective is needed.
    """
    import torch

    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            _local(t).copy_(snapshot[name])


def reset_fsdp_iteration(model: Any) -> None:
    """Clear FSDP's per-iteration state after an error inside a forward or backward pass.

    ``reset_iter_state`` needs FSDP's lazy initialisation (the first forward pass) to have
    happened; before it there is nothing to reset.
    """
    if model._get_fsdp_state()._is_root:  # None until the first forward pass
        model.reset_iter_state()
