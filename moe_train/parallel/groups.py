"""Process groups built from a ``Topology``.

``torch.distributed.new_group`` is collective over the whole world: every rank creates
every group, in the same order, and keeps the ones it belongs to.

These are the only expert groups of a run: ``train/engine.py`` registers them in
DeepSpeed's group registry instead of letting DeepSpeed create a second copy of each
(``Topology.num_groups`` is how many ``new_group`` calls that takes, on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch.distributed as dist

from moe_train.parallel.topology import Topology


@dataclass
class ParallelGroups:
    """The groups one rank belongs to. ``None`` means a single process (no collective).

    Attributes:
        topology: the rank arithmetic these groups were built from.
        dp: every rank (dense gradients, global balance statistics).
        ep: this rank's expert-parallel group (the all-to-all), None when ep = 1.
        edp: this rank's expert-data-parallel group (expert gradients).
        ep_block: this rank's expert-parallel group as created, a group of one rank when
            ep = 1 (where the model's ``ep`` is None: no all-to-all); DeepSpeed's registry
            needs a group there too. None in a single process.
    """

    topology: Topology
    rank: int
    dp: Optional[Any]
    ep: Optional[Any]
    edp: Optional[Any]
    ep_block: Optional[Any] = None


def build_groups(topology: Topology, rank: int) -> ParallelGroups:
    """Creates the EP and EDP groups of ``topology`` (all ranks must call this, once per
    run: every call makes ``topology.num_groups`` more groups)."""
    if topology.world_size == 1:
        return ParallelGroups(topology, 0, None, None, None)
    if not dist.is_initialized() or dist.get_world_size() != topology.world_size:
        raise RuntimeError("build_groups needs an initialised default group of the topology's size")
    ep_group = edp_group = None
    for ranks in topology.ep_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            ep_group = group
    for ranks in topology.edp_groups():
        group = dist.new_group(ranks)
        if rank in ranks:
            edp_group = group
    return ParallelGroups(topology, rank, dist.group.WORLD,
                          ep_group if topology.ep_size > 1 else None, edp_group, ep_block=ep_group)
