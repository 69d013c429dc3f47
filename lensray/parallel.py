"""Coordination of the ranks of one candidate's worker group (torch.distributed, no Ray).

The training itself is data-parallel inside :class:`lensray.probe.ProbeRunner` (DDP, each
optimiser step's samples split over the ranks, tokens and evaluation sums all-reduced); this
module holds what the Ray Train worker loop of :mod:`lensray.screen` needs around it.
"""

from __future__ import annotations


def agreed(rank: int, flag: bool) -> bool:
    """Rank 0's flag on every rank (one broadcast when several workers run)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return flag
    box = [flag]
    dist.broadcast_object_list(box, src=0)
    return bool(box[0])
