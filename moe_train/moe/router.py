"""Router: fp32 logits, scores, top-k choice, capacity and dropping, auxiliary losses.

Shape legend:
  T  tokens in the routing group (one rank's micro-batch, flattened)
  D  model width            E  number of experts (global)
  K  experts per token      A  assignments, K * T, in priority order (choice-major)
  N  kept assignments       B  sequences in the group, S tokens each (T = B * S)
  G  expert groups          M  groups kept per token

Semantics follow ../shared/MOE_REFERENCE.md (Switch, GShard, ST-MoE, DeepSeek-V2/V3):
  logits_TE = x_TD.float() @ w_DE.float()   (fp32 whatever the autocast dtype)
  s_TE      = softmax(logits_TE) or sigmoid(logits_TE)          (moe.score_func)
  key_TE    = s_TE; with a selection bias b_E: logits + b (softmax), s + b (sigmoid)
  groups    = keep the M best of G groups by top-2-sum (or max) of key; others -inf
  top-k on key, ties to the lower expert id; gates = s_TE at the chosen experts (never
              key - b), renormalised when normalize_topk, then times route_scale
  capacity  C = clamp(ceil(K * T * cf / E), min_capacity, T); cf = None is dropless
  aux_loss  = E * sum_i f_i * P_i, f counted from the top-k choice before dropping,
              P from s normalised over experts (= softmax probs for softmax scores)
  z_loss    = mean_t logsumexp_j(logits_tj) ** 2
  seq_loss  = mean over sequences of sum_i f_i * P_i (DeepSeek-V3, f from the UNBIASED
              top-k of s, scaled by E / (K * S))
The loss coefficients are applied in one place only: ``moe_train.moe.losses``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from moe_train.moe.config import MoEConfig


@dataclass
class Routing:
    """What the router decided for one routing group; the dispatcher's input.

    Attributes:
        expert_ids_A: int64 [A], expert of each assignment, A = K * T in priority order
            (all first choices by token position, then all second choices, ...).
        token_ids_A: int64 [A], source token of each assignment.
        gates_A: fp32 [A], combine weight of each assignment (differentiable).
        order_A: int64 [A], the assignments sorted by expert (stable, so priority order
            within an expert).
        slot_A: int64 [A], each assignment's 0-based rank inside its expert; it is kept
            when slot < capacity.
        kept_per_expert_E: int64 [E], kept assignments per expert (sums to N).
        routed_per_expert_E: int64 [E], assignments per expert before dropping.
        capacity: slots per expert, or None when dropless.
    Nothing here is read by the host: the kept assignments are a mask on the device
    (``kept_A``), never a list whose length the host must learn (the dispatcher lays them
    out in buffers whose sizes the host knows; moe/dispatcher.py).
        aux_loss, z_loss: fp32 scalars, coefficients NOT applied.
        seq_loss: fp32 scalar, the sequence-wise balance loss (zero, no graph, when
            ``moe.seq_balance_coef`` is 0), coefficient NOT applied.
        entropy: fp32 scalar, detached: mean over tokens of the routing distribution's
            entropy in nats (log E: uniform router; 0: collapsed).
    """

    expert_ids_A: Tensor
    token_ids_A: Tensor
    gates_A: Tensor
    order_A: Tensor
    slot_A: Tensor
    kept_per_expert_E: Tensor
    routed_per_expert_E: Tensor
    capacity: Optional[int]
    aux_loss: Tensor
    z_loss: Tensor
    entropy: Tensor
    seq_loss: Tensor

    @property
    def kept_A(self) -> Optional[Tensor]:
        """bool [A], the assignments that survived capacity; None when dropless (all)."""
        return None if self.capacity is None else self.slot_A < self.capacity

    @property
    def kept_order_N(self) -> Tensor:
        """int64 [N], the kept assignments sorted by expert. A host read (its length is
        data-dependent): for tests and tools, never the training path."""
        kept_A = self.kept_A
        return self.order_A if kept_A is None else self.order_A[kept_A.index_select(0, self.order_A)]

    @property
    def num_dropped(self) -> int:
        """Assignments dropped by capacity, a host int (a read: tests and tools only;
        ``MoEStats.num_dropped`` is the device tensor)."""
        return int(self.routed_per_expert_E.sum() - self.kept_per_expert_E.sum())


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
    column j. Uses k argmax passes (argmax returns the first maximal index). Entries of
    -inf (masked groups) are never chosen while k finite entries remain."""
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
    # Counts from the sorted ids, not torch.bincount (which reads min/max on a GPU):
    # expert e's run in sorted order is [starts_E[e], ends_E[e]).
    sorted_A = expert_ids_A.index_select(0, order_A)
    experts_E = torch.arange(num_experts, device=expert_ids_A.device, dtype=expert_ids_A.dtype)
    starts_E = torch.searchsorted(sorted_A, experts_E)
    counts_E = torch.searchsorted(sorted_A, experts_E, right=True) - starts_E
    slot_sorted_A = torch.arange(order_A.numel(), device=order_A.device) - starts_E.index_select(0, sorted_A)
    slot_A = torch.empty_like(slot_sorted_A).index_copy_(0, order_A, slot_sorted_A)
    return order_A, slot_A, counts_E


class Router(nn.Module):
    """Top-k router with capacity (Switch / GShard), softmax or sigmoid scores, an
    optional selection bias and group-limited routing (DeepSeek-V2/V3).

    Args:
        cfg: the ``moe`` config section.
        d_model: input width D.
        balance_group: process group over which f and P are averaged when
            ``cfg.balance_scope == "global"`` (the data-parallel group); None = local.

    Buffers:
        expert_bias: fp32 [E], only when ``cfg.bias_update_rate > 0``: the selection bias
            b_E, persistent (saved with the model), never trained by the optimizer (the
            update is ``moe_train.moe.balance``), kept fp32 whatever dtype the module is
            cast to (``_apply``).
    """

    def __init__(self, cfg: MoEConfig, d_model: int, balance_group=None):
        super().__init__()
        cfg.validate()  # a layer built without a config file still gets the same checks
        self.cfg = cfg
        self.balance_group = balance_group
        # Dense parameter (replicated, averaged over all DP ranks). Init scaled down 10x, as
        # Switch (section 2.4) recommends, so routing starts near uniform and stable.
        self.w_DE = nn.Parameter(torch.empty(d_model, cfg.num_experts))
        if cfg.has_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        if not self.w_DE.is_meta:  # on the meta device the model initialises it later
            self.reset_parameters()
        self.w_DE.requires_grad_(not cfg.freeze_router)  # not in the optimizer when frozen

    @torch.no_grad()
    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_DE, std=self.w_DE.shape[0] ** -0.5 * 0.1)
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def _apply(self, fn, recurse=True):
        """``module.to(bf16)``, ``.half()``...: the bias follows the device, never the
        dtype (a bf16 bias of magnitude ~1 cannot hold a 1e-3 update)."""
        bias = self._buffers.pop("expert_bias", None)
        try:
            return super()._apply(fn, recurse)
        finally:
            if bias is not None:
                moved = fn(bias)
                self._buffers["expert_bias"] = (  # from the meta device (to_empty): allocate only
                    torch.empty_like(bias, device=moved.device) if bias.is_meta
                    else bias.to(device=moved.device, dtype=torch.float32))

    def logits(self, x_TD: Tensor) -> Tensor:
        """fp32 router logits; multiplicative jitter on the input in training only."""
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            x_TD = x_TD.float()
            if self.training and self.cfg.jitter_eps > 0:
                eps = self.cfg.jitter_eps
                x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
            return x_TD @ self.w_DE.float()

    def select(self, logits_TE: Tensor, scores_TE: Tensor) -> Tensor:
        """The top-k experts of each token, int64 [T, K]: top-k of the selection key
        (scores, or biased as in the module docstring) within the allowed groups."""
        cfg = self.cfg
        key_TE = scores_TE.detach()
        if self.expert_bias is not None:
            base_TE = logits_TE if cfg.score_func == "softmax" else scores_TE
            key_TE = base_TE.detach() + self.expert_bias.to(base_TE.device, torch.float32)
        if cfg.num_groups > 1:
            key_TE = limit_to_groups(key_TE, cfg.num_groups, cfg.groups_per_token, cfg.group_score)
        return topk_ties_low(key_TE, cfg.top_k)[1]

    def forward(self, x_TD: Tensor, seq_len: Optional[int] = None) -> Routing:
        """Routes one group of T tokens; ``seq_len`` S splits it into T / S sequences for
        the sequence-wise balance loss (None: one sequence)."""
        cfg = self.cfg
        num_tokens, num_experts, k = x_TD.shape[0], cfg.num_experts, cfg.top_k
        logits_TE = self.logits(x_TD)
        softmax = cfg.score_func == "softmax"
        scores_TE = torch.softmax(logits_TE, dim=-1) if softmax else torch.sigmoid(logits_TE)
        expert_ids_TK = self.select(logits_TE, scores_TE)
        top_scores_TK = scores_TE.gather(-1, expert_ids_TK)  # UNBIASED gates, with gradient
        gates_TK = top_scores_TK
        if cfg.renormalize:
            denominator = top_scores_TK.sum(dim=-1, keepdim=True)
            gates_TK = top_scores_TK / denominator.clamp_min(torch.finfo(torch.float32).tiny)
        if cfg.route_scale != 1.0:
            gates_TK = gates_TK * cfg.route_scale

        # Priority order: choice-major, so every first choice precedes any second choice.
        expert_ids_A = expert_ids_TK.t().reshape(-1)
        gates_A = gates_TK.t().reshape(-1)
        token_ids_A = torch.arange(num_tokens, device=x_TD.device).repeat(k)
        cf = cfg.capacity_factor if self.training else cfg.eval_capacity_factor
        capacity = expert_capacity(num_tokens, num_experts, k, cf, cfg.min_capacity)
        priority_A = None
        if capacity is not None and cfg.drop_policy == "probs":
            priority_A = top_scores_TK.detach().t().reshape(-1)
        order_A, slot_A, routed_E = rank_within_expert(expert_ids_A, num_experts, priority_A)
        kept_E = routed_E if capacity is None else routed_E.clamp(max=capacity)

        lse_T = self._logsumexp(logits_TE, scores_TE, expert_ids_TK, top_scores_TK)
        # P of the balance losses: a distribution over experts per token.
        dist_TE = scores_TE if softmax else scores_TE / scores_TE.sum(-1, keepdim=True).clamp_min(
            torch.finfo(torch.float32).tiny)
        aux_loss, z_loss = self.losses(lse_T, dist_TE, routed_E, num_tokens * k)
        seq_loss = self.sequence_loss(scores_TE, dist_TE, expert_ids_TK, seq_len)
        with torch.no_grad():
            if softmax:  # entropy_t = lse_t - sum_e p_te * l_te, no T x E log needed
                entropy = (lse_T.sum() - torch.linalg.vecdot(dist_TE, logits_TE).sum()) / max(num_tokens, 1)
            else:
                entropy = -torch.special.xlogy(dist_TE, dist_TE).sum() / max(num_tokens, 1)
        return Routing(expert_ids_A, token_ids_A, gates_A, order_A, slot_A, kept_E, routed_E,
                       capacity, aux_loss, z_loss, entropy, seq_loss)

    def _logsumexp(self, logits_TE: Tensor, scores_TE: Tensor, expert_ids_TK: Tensor,
                   top_scores_TK: Tensor) -> Tensor:
        """logsumexp_j logits_tj. For plain softmax routing from the top-1 column:
        lse = l_e - log p_e for any e, and p_top >= 1/E keeps the log well conditioned
        (saves a separate, unfused pass). With a bias or groups the chosen expert need
        not be the most probable, and sigmoid scores are no probabilities: full pass."""
        cfg = self.cfg
        if cfg.score_func == "softmax" and self.expert_bias is None and cfg.num_groups == 1:
            return logits_TE.gather(1, expert_ids_TK[:, :1]).squeeze(1) - top_scores_TK[:, 0].log()
        return torch.logsumexp(logits_TE, dim=-1)

    def losses(self, lse_T: Tensor, probs_TE: Tensor, routed_E: Tensor,
               num_assignments: int) -> tuple[Tensor, Tensor]:
        """Switch load-balancing loss and ST-MoE z-loss, coefficients not applied.

        f_i = routed_E[i] / (K*T) counts the top-k choices BEFORE capacity dropping (the
        experts actually chosen, bias included); P_i = mean_t probs_TE[t, i] carries the
        gradient (``probs_TE``: softmax probs, or sigmoid scores normalised over experts).
        With balance_scope global, f and P are averaged over ``balance_group`` first (an
        autograd all-reduce for P).
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

    def sequence_loss(self, scores_TE: Tensor, dist_TE: Tensor, expert_ids_TK: Tensor,
                      seq_len: Optional[int]) -> Tensor:
        """DeepSeek-V3 sequence-wise balance loss, coefficient not applied: per sequence,
        sum_i f_i * P_i with f_i = E / (K*S) * #{t: i in the UNBIASED top-k of s_t}
        (no bias, no group limit) and P_i = mean_t s_ti / sum_j s_tj; mean over the
        sequences (1.0 at perfect balance). Zero without graph when its coefficient is 0."""
        cfg = self.cfg
        num_tokens, num_experts, k = scores_TE.shape[0], cfg.num_experts, cfg.top_k
        if cfg.seq_balance_coef == 0 or num_tokens == 0:
            return scores_TE.new_zeros(())
        S = seq_len or num_tokens
        assert num_tokens % S == 0, (num_tokens, S)
        if self.expert_bias is not None or cfg.num_groups > 1:
            expert_ids_TK = topk_ties_low(scores_TE.detach(), k)[1]
        B = num_tokens // S
        counts_BE = torch.zeros(B, num_experts, device=scores_TE.device)
        counts_BE.scatter_add_(1, expert_ids_TK.reshape(B, S * k), torch.ones(B, S * k, device=scores_TE.device))
        f_BE = counts_BE * (num_experts / (k * S))
        P_BE = dist_TE.reshape(B, S, num_experts).mean(dim=1)
        return (f_BE * P_BE).sum(dim=1).mean()


def limit_to_groups(key_TE: Tensor, num_groups: int, groups_per_token: int, group_score: str) -> Tensor:
    """Group-limited routing (DeepSeek-V2/V3): group g holds experts [g*E/G, (g+1)*E/G);
    its score is the sum of its two highest keys (``top2_sum``) or its highest (``max``).
    Keeps each token's ``groups_per_token`` best groups (ties to the lower group id) and
    sets every other key to -inf: never 0, which would pick masked experts once keys go
    negative (DeepSeek-V3 #741).

    Args:
        key_TE: fp32 [T, E] selection keys (no gradient needed).
    Returns:
        [T, E] keys with the experts of the dropped groups at -inf.
    """
    num_tokens, num_experts = key_TE.shape
    per_group = num_experts // num_groups
    key_TGe = key_TE.reshape(num_tokens, num_groups, per_group)
    if group_score == "max":
        score_TG = key_TGe.max(dim=-1).values
    else:
        score_TG = key_TGe.topk(2, dim=-1).values.sum(dim=-1)  # values only: tie order is moot
    best_TM = topk_ties_low(score_TG, groups_per_token)[1]
    keep_TG = torch.zeros_like(score_TG, dtype=torch.bool).scatter_(1, best_TM, True)
    keep_TE = keep_TG.repeat_interleave(per_group, dim=1)
    return key_TE.masked_fill(~keep_TE, float("-inf"))
