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

    @property
    def num_groups(self) -> int:
        """Process groups ``parallel.groups.build_groups`` creates (on every rank, since
        ``new_group`` is collective over the world): world/ep EP groups + ep EDP groups;
        none in a single process."""
        return 0 if self.world_size == 1 else self.edp_size + self.ep_size

    def ep_rank(self, rank: int) -> int:
        """Position of ``rank`` in its EP group."""
        return rank % self.ep_size

    def ep_group_of(self, rank: int) -> list[int]:
        # Computed, not looked up in ep_groups(): describe(verbose=True) asks for every rank.
        start = rank - self.ep_rank(rank)
        return list(range(start, start + self.ep_size))

    def edp_group_of(self, rank: int) -> list[int]:
        return list(range(self.ep_rank(rank), self.world_size, self.ep_size))

    def local_experts(self, rank: int) -> range:
        """Global ids of the experts ``rank`` owns."""
        first = self.ep_rank(rank) * self.num_local_experts
        return range(first, first + self.num_local_experts)

    def describe(self, verbose: bool = False) -> list[str]:
        """Human-readable layout (``moe_train check`` and the training start-up block).

        The groups are described by their pattern (EP blocks, EDP stride, experts per
        rank, the first and last groups, rank 0's line) in a few lines whatever the world
        size; one line per rank is added only for ``world_size <= PER_RANK_LINES_UP_TO``
        or ``verbose`` (every rank's line with its peers in full made 4,245 lines and
        12.5 MB at 4096 ranks). Rank lists longer than 8 are written ``[a, b, ..., z]``:
        every rank from a to z in steps of b - a (each group is such a run), so even a
        per-rank line has a bounded length.

        Args:
            verbose: one line per rank whatever the world size.
        Returns:
            The lines, without newlines.
        """
        ep, edp, n_local = self.ep_size, self.edp_size, self.num_local_experts
        last = ep - 1
        lines = [f"world {self.world_size} = ep {ep} x edp {edp}; "
                 f"{self.num_experts} experts, {n_local} per rank",
                 f"dense grads: averaged over all {_count(self.world_size, 'rank')} {_ranks(range(self.world_size))}",
                 f"EP groups (token all-to-all): {_count(edp, 'block')} of {_count(ep, 'consecutive rank')}: "
                 + _first_and_last([_ranks(self.ep_group_of(s)) for s in range(0, self.world_size, ep)]),
                 f"EDP groups (expert grads): {_count(ep, 'group')} of {_count(edp, 'rank')} at stride {ep}: "
                 + _first_and_last([_ranks(self.edp_group_of(i)) for i in range(ep)]),
                 f"experts: rank r owns {n_local} * (r % {ep}) .. {n_local} * (r % {ep}) + {n_local - 1}: "
                 f"rank 0 owns {self._experts_text(0)}"
                 + (f", rank {last} owns {self._experts_text(last)}" if last else "")]
        if verbose or self.world_size <= PER_RANK_LINES_UP_TO:
            return lines + [self._rank_line(rank) for rank in range(self.world_size)]
        return lines + [self._rank_line(0),
                        f"(per-rank lines only up to {PER_RANK_LINES_UP_TO} ranks; "
                        "`moe-train check --verbose` prints all of them)"]

    def _experts_text(self, rank: int) -> str:
        experts = self.local_experts(rank)
        return f"{experts.start}..{experts.stop - 1}"

    def _rank_line(self, rank: int) -> str:
        return (f"rank {rank}: experts {self._experts_text(rank)}, "
                f"all-to-all with {_ranks(self.ep_group_of(rank))}, "
                f"expert grads reduced over {_ranks(self.edp_group_of(rank))}")


PER_RANK_LINES_UP_TO = 16  # Topology.describe: above this, the pattern and rank 0 only


def _ranks(ids) -> str:
    """[0, 1, 2] in full up to 8 ranks; a longer arithmetic run as '[0, 8, ..., 4088]'."""
    ids = list(ids)
    if len(ids) > 8 and len({b - a for a, b in zip(ids, ids[1:])}) == 1:
        return f"[{ids[0]}, {ids[1]}, ..., {ids[-1]}]"
    return "[" + ", ".join(map(str, ids)) + "]"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _first_and_last(items: list[str]) -> str:
    """All of up to 3 items; else the first two, '...', the last."""
    return ", ".join(items if len(items) <= 3 else [items[0], items[1], "...", items[-1]])
