"""Router: fp32 logits, top-k choice, capacity and dropping, auxiliary losses.

Shape legend:
  T  tokens in the routing group (one rank's micro-batch, flattened)
  D  model width            E  number of experts (global)
  K  experts per token      A  assignments, K * T, in priority order (choice-major)
  N  kept assignments

Semantics follow ../shared/MOE_REFERENCE.md (Switch, GShard, ST-MoE):
  logits_TE = x_TD.float() @ w_DE.float()   (fp32 whatever the autocast dtype)
  probs_TE  = softmax(logits_TE); top-k on probs, ties to the lower expert id
  capacity  C = clamp(ceil(K * T * cf / E), min_capacity, T); cf = None is dropless
  aux_loss  = E * sum_i f_i * P_i, f counted from the top-k choice before dropping
  z_loss    = mean_t logsumexp_j(logits_tj) ** 2
The loss coefficients are applied in one place only: ``moe_train.moe.losses``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moe_train.config import MoEConfig


@dataclass
class Routing:
    """What the router decided for one routing group; the dispatcher's input.

    Attributes:
        expert_ids_A: int64 [A], expert of each assignment, A = K * T in priority order
            (all first choices by token position, then all second choices, ...).
        token_ids_A: int64 [A], source token of each assignment.
        gates_A: fp32 [A], combine weight of each assignment (differentiable).
        kept_order_N: int64 [N], indices into the A assignments that survived capacity,
            sorted by expert (stable, so priority order within an expert).
        kept_per_expert_E: int64 [E], kept assignments per expert (sums to N).
        routed_per_expert_E: int64 [E], assignments per expert before dropping.
        capacity: slots per expert, or None when dropless.
        aux_loss, z_loss: fp32 scalars, coefficients NOT applied.
        entropy: fp32 scalar, detached: mean over tokens of the routing distribution's
            entropy in nats (log E: uniform router; 0: collapsed).
    """

    expert_ids_A: Tensor
    token_ids_A: Tensor
    gates_A: Tensor
    kept_order_N: Tensor
    kept_per_expert_E: Tensor
    routed_per_expert_E: Tensor
    capacity: Optional[int]
    aux_loss: Tensor
    z_loss: Tensor
    entropy: Tensor

    @property
    def num_dropped(self) -> int:
        """Assignments dropped by capacity (a host int: boolean masking already synced)."""
        return self.expert_ids_A.numel() - self.kept_order_N.numel()


def expert_capacity(num_tokens: int, num_experts: int, top_k: int,
                    capacity_factor: Optional[float], min_capacity: int) -> Optional[int]:
    """Slots per expert for one routing group: ceil(K*T*cf/E) floored at ``min_capacity``
    and never above T (an expert can hold every token at most once). None = dropless."""
    if capacity_factor is None:
        return None
    capacity = math.ceil(top_k * num_tokens * capacity_factor / num_experts)
    return min(max(capacity, min_capacity), num_tokens)


def topk_ties_low(probs_TE: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Top-k over experts with ties broken towards the lower expert id, independent of
    ``torch.topk``'s unspecified tie order. Returns (values_TK, indices_TK), choice j in
    column j. Uses k argmax passes (argmax returns the first maximal index)."""
    if k == 1:
        values_T1, indices_T1 = probs_TE.max(dim=-1, keepdim=True)
        return values_T1, indices_T1
    masked_TE = probs_TE.detach().clone()
    indices = []
    for _ in range(k):
        idx_T1 = masked_TE.argmax(dim=-1, keepdim=True)
        indices.append(idx_T1)
        masked_TE.scatter_(-1, idx_T1, float("-inf"))
    indices_TK = torch.cat(indices, dim=-1)
    return probs_TE.gather(-1, indices_TK), indices_TK


def rank_within_expert(expert_ids_A: Tensor, num_experts: int,
                       priority_A: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Orders assignments by expert, keeping ``priority`` order inside each expert.

    Args:
        expert_ids_A: int64 [A] expert of each assignment.
        priority_A: optional [A] float key, higher first (the ``probs`` policy); ties and
            the ``position`` policy fall back to the assignment index.
    Returns:
        order_A: assignment indices grouped by expert, then by priority.
        slot_A: for each assignment, its 0-based rank inside its expert.
        counts_E: assignments per expert.
    """
    if priority_A is None:
        order_A = torch.argsort(expert_ids_A, stable=True)
    else:
        # Two stable sorts: by priority (descending) first, then by expert; ties keep
        # the assignment index order, so the result is deterministic.
        by_priority_A = torch.argsort(priority_A, descending=True, stable=True)
        order_A = by_priority_A[torch.argsort(expert_ids_A[by_priority_A], stable=True)]
    counts_E = torch.bincount(expert_ids_A, minlength=num_experts)
    starts_E = torch.cumsum(counts_E, 0) - counts_E
    slot_sorted_A = torch.arange(order_A.numel(), device=order_A.device) - starts_E[expert_ids_A[order_A]]
    slot_A = torch.empty_like(slot_sorted_A)
    slot_A[order_A] = slot_sorted_A
    return order_A, slot_A, counts_E


class Router(nn.Module):
    """Top-k softmax router with capacity (Switch / GShard).

    Args:
        cfg: the ``moe`` config section.
        d_model: input width D.
        balance_group: process group over which f and P are averaged when
            ``cfg.balance_scope == "global"`` (the data-parallel group); None = local.
    """

    def __init__(self, cfg: MoEConfig, d_model: int, balance_group=None):
        super().__init__()
        cfg.validate()  # a layer built without a config file still gets the same checks
        self.cfg = cfg
        self.balance_group = balance_group
        # Dense parameter (replicated, averaged over all DP ranks). Init scaled down 10x, as
        # Switch (section 2.4) recommends, so routing starts near uniform and stable.
        self.w_DE = nn.Parameter(torch.empty(d_model, cfg.num_experts))
        nn.init.normal_(self.w_DE, std=d_model ** -0.5 * 0.1)

    def logits(self, x_TD: Tensor) -> Tensor:
        """fp32 router logits; multiplicative jitter on the input in training only."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and self.cfg.jitter_eps > 0:
                eps = self.cfg.jitter_eps
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
            return x_TD @ self.w_DE.float()

    def forward(self, x_TD: Tensor) -> Routing:
        cfg = self.cfg
        num_tokens, num_experts, k = x_TD.shape[0], cfg.num_experts, cfg.top_k
        logits_TE = self.logits(x_TD)
        probs_TE = torch.softmax(logits_TE, dim=-1)
        top_probs_TK, expert_ids_TK = topk_ties_low(probs_TE, k)
        # logsumexp from the top-1 column: lse = l_e - log p_e for any e, and p_top >= 1/E
        # keeps the log well conditioned. Saves a separate (unfused, slow on CPU) pass.
        lse_T = logits_TE.gather(1, expert_ids_TK[:, :1]).squeeze(1) - top_probs_TK[:, 0].log()
        gates_TK = top_probs_TK
        if cfg.renormalize:
            gates_TK = top_probs_TK / top_probs_TK.sum(dim=-1, keepdim=True).clamp_min(1e-20)

        # Priority order: choice-major, so every first choice precedes any second choice.
        expert_ids_A = expert_ids_TK.t().reshape(-1)
        gates_A = gates_TK.t().reshape(-1)
        token_ids_A = torch.arange(num_tokens, device=x_TD.device).repeat(k)
        cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        capacity = expert_capacity(num_tokens, num_experts, k, cf, cfg.min_capacity)
        priority_A = None
        if capacity is not None and cfg.drop_policy == "probs":
            priority_A = top_probs_TK.detach().t().reshape(-1)
        order_A, slot_A, routed_E = rank_within_expert(expert_ids_A, num_experts, priority_A)
        if capacity is None:
            kept_order_N, kept_E = order_A, routed_E
        else:
            kept_order_N = order_A[slot_A[order_A] < capacity]
            kept_E = routed_E.clamp(max=capacity)

        aux_loss, z_loss = self.losses(lse_T, probs_TE, routed_E, num_tokens * k)
        with torch.no_grad():  # entropy_t = lse_t - sum_e p_te * l_te, no T x E log needed
            entropy = (lse_T.sum() - torch.linalg.vecdot(probs_TE, logits_TE).sum()) / max(num_tokens, 1)
        return Routing(expert_ids_A, token_ids_A, gates_A, kept_order_N, kept_E, routed_E,
                       capacity, aux_loss, z_loss, entropy)

    def losses(self, lse_T: Tensor, probs_TE: Tensor, routed_E: Tensor,
               num_assignments: int) -> tuple[Tensor, Tensor]:
        """Switch load-balancing loss and ST-MoE z-loss, coefficients not applied.

        f_i = routed_E[i] / (K*T) counts the top-k choices BEFORE capacity dropping;
        P_i = mean_t probs_TE[t, i] carries the gradient. With balance_scope global, f and
        P are averaged over ``balance_group`` first (an autograd all-reduce for P).
        """
        f_E = routed_E.to(torch.float32) / max(num_assignments, 1)
        num_tokens = max(probs_TE.shape[0], 1)  # a rank may route zero tokens: no NaN
        P_E = probs_TE.sum(dim=0) / num_tokens
        if self.cfg.balance_scope == "global" and self.balance_group is not None:
            from moe_train.parallel.comm import all_reduce_mean

            f_E = all_reduce_mean(f_E.detach(), self.balance_group)
            P_E = all_reduce_mean(P_E, self.balance_group)
        aux_loss = self.cfg.num_experts * torch.sum(f_E * P_E)
        z_loss = lse_T.square().sum() / num_tokens  # lse_T: logsumexp_j logits_tj
        return aux_loss, z_loss
