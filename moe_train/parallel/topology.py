"""Pure rank arithmetic: who shares experts with whom. No torch.distributed here, so
every layout can be tested (and printed by ``moe_train check``) for any world size.

Layout (the same as DeepSpeed's ``_get_expert_parallel_ranks`` without tensor or
pipeline parallelism, so a DeepSpeed engine built on top agrees with us):

  data-parallel (DP) group:   all ranks; dense gradients are averaged over it.
  expert-parallel (EP) groups: consecutive blocks of ``ep`` ranks, [0..ep), [ep..2ep)...;
      together a block holds all E experts, rank i of a block owns experts
      [i * E/ep, (i + 1) * E/ep).
  expert-data-parallel (EDP) groups: ranks at the same position of every EP block,
      {i, i + ep, i + 2ep, ...}; they hold the same experts, and expert gradients are
      averaged over this group only.

Example, world 8, ep 4: EP [0,1,2,3] [4,5,6,7]; EDP [0,4] [1,5] [2,6] [3,7].
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Topology:
    """Args:
        world_size: number of ranks.
        ep_size: expert-parallel size; must divide ``world_size``.
        num_experts: E; must be divisible by ``ep_size``.
    """

    world_size: int
    ep_size: int
    num_experts: int

    def __post_init__(self):
        if self.world_size < 1:
            raise ValueError(f"world size = {self.world_size}: must be >= 1")
        if self.ep_size < 1 or self.world_size % self.ep_size:
            raise ValueError(f"parallel.expert_parallel_size = {self.ep_size}: must divide the "
                             f"world size ({self.world_size}); launch a multiple of it or change it")
        if self.num_experts % self.ep_size:
            raise ValueError(f"moe.num_experts = {self.num_experts}: must be divisible by "
                             f"parallel.expert_parallel_size ({self.ep_size})")

    @property
    def edp_size(self) -> int:
        """Ranks holding the same experts: world / ep."""
        return self.world_size // self.ep_size

    @property
    def num_local_experts(self) -> int:
        return self.num_experts // self.ep_size

    def ep_groups(self) -> list[list[int]]:
        return [list(range(s, s + self.ep_size)) for s in range(0, self.world_size, self.ep_size)]

    def edp_groups(self) -> list[list[int]]:
        return [list(range(i, self.world_size, self.ep_size)) for i in range(self.ep_size)]

    def ep_rank(self, rank: int) -> int:
        """Position of ``rank`` in its EP group."""
        return rank % self.ep_size

    def ep_group_of(self, rank: int) -> list[int]:
        return self.ep_groups()[rank // self.ep_size]

    def edp_group_of(self, rank: int) -> list[int]:
        return self.edp_groups()[self.ep_rank(rank)]

    def local_experts(self, rank: int) -> range:
        """Global ids of the experts ``rank`` owns."""
        first = self.ep_rank(rank) * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def describe(self) -> list[str]:
        """Human-readable layout, one line per rank (used by ``moe_train check``)."""
        lines = [f"world {self.world_size} = ep {self.ep_size} x edp {self.edp_size}; "
                 f"{self.num_experts} experts, {self.num_local_experts} per rank",
                 "dense grads: averaged over all ranks " + str(list(range(self.world_size)))]
        for rank in range(self.world_size):
            experts = self.local_experts(rank)
            lines.append(f"rank {rank}: experts {experts.start}..{experts.stop - 1}, "
                         f"all-to-all with {self.ep_group_of(rank)}, "
                         f"expert grads reduced over {self.edp_group_of(rank)}")
        return lines
