"""Per-layer MoE statistics for monitoring.

Kept as tensors (no ``.item()``) so a training step pays no host sync for them; the
metrics code reduces and reads them on log steps only. Summaries have bounded
cardinality (a handful of scalars per layer whatever E is), per USER_NEEDS.md.

Shape legend: E experts (global), T tokens in the routing group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from torch import Tensor


@dataclass
class MoEStats:
    """Attributes:
        routed_per_expert_E: int64 [E], top-k assignments per expert before dropping.
        kept_per_expert_E: int64 [E], assignments computed after capacity.
        num_assignments: K * T of this routing group.
        router_entropy: fp32 scalar, mean over tokens of -sum_e p log p (nats).
        aux_loss, z_loss: fp32 scalars, detached, coefficients not applied.
        seq_loss: fp32 scalar, detached: the sequence-wise balance loss (0 when off).
    """

    routed_per_expert_E: Tensor
    kept_per_expert_E: Tensor
    num_assignments: int
    router_entropy: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    seq_loss: Optional[Tensor] = None

    @property
    def num_dropped(self) -> Tensor:
        return self.routed_per_expert_E.sum() - self.kept_per_expert_E.sum()

    @property
    def drop_frac(self) -> Tensor:
        """dropped / (K * T), as MOE_REFERENCE.md counts it."""
        return self.num_dropped.float() / max(self.num_assignments, 1)

    def summary(self) -> dict[str, Tensor]:
        """Bounded-cardinality scalars: load coefficient of variation, max/mean load,
        dead experts (no token routed), drop fraction, entropy and the two losses."""
        load_E = self.routed_per_expert_E.float()
        mean = load_E.mean().clamp_min(1e-9)
        return {
            "load_cv": load_E.std(unbiased=False) / mean,
            "load_max_over_mean": load_E.max() / mean,
            "dead_experts": (self.routed_per_expert_E == 0).sum().float(),
            "drop_frac": self.drop_frac,
            "router_entropy": self.router_entropy,
            "aux_loss": self.aux_loss,
            "z_loss": self.z_loss,
        }
