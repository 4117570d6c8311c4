"""The MoE section of the config: one MoE layer's routing, capacity, losses and experts.

Semantics: MOE_REFERENCE.md. ``MoELayer(cfg.moe, ...)`` takes this section only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from moe_train.config_checks import choice, fail

ACTIVATIONS = ("gelu", "relu", "swiglu")
DROP_POLICIES = ("position", "probs")
BALANCE_SCOPES = ("local", "global")
EXPERT_IMPLS = ("auto", "grouped_mm", "bmm")  # moe_train.moe.experts.IMPLS
SCORE_FUNCS = ("softmax", "sigmoid")
SHARED_GATES = ("none", "sigmoid")
GROUP_SCORES = ("top2_sum", "max")
DISPATCH_MODES = ("per_assignment", "once_per_rank")


@dataclass
class MoEConfig:
    """One MoE layer: routing, capacity, losses, experts. Semantics: MOE_REFERENCE.md."""

    num_experts: int = 8
    top_k: int = 1
    d_ff: int = 2048  # expert hidden width F
    activation: str = "gelu"
    capacity_factor: Optional[float] = 1.25  # training; null = dropless
    eval_capacity_factor: Optional[float] = 2.0  # evaluation; null = dropless
    min_capacity: int = 4
    drop_policy: str = "position"
    normalize_topk: Optional[bool] = None  # None: on for top_k > 1, off for top_k = 1
    jitter_eps: float = 0.0  # multiplicative router-input jitter in training (Switch: 1e-2)
    aux_loss_coef: float = 1e-2
    z_loss_coef: float = 1e-3
    balance_scope: str = "local"
    expert_impl: str = "auto"  # auto: one kernel per (device, dtype, alignment), not per batch
    seed: int = 1234  # expert weights are seeded by (seed, global expert id)
    # Scores, gates and scale (MOE_REFERENCE.md "Score functions, gates and scale").
    score_func: str = "softmax"  # or sigmoid (DeepSeek-V3)
    route_scale: float = 1.0  # multiplies the gates after normalize_topk (DeepSeek-V3: 2.5)
    # Shared experts: one dense FFN of this width beside the routed ones (0 = none).
    shared_d_ff: int = 0
    shared_gate: str = "none"  # none (DeepSeek) or sigmoid: one fp32 scalar per token (Qwen)
    # Selection bias (auxiliary-loss-free balancing): rate u of the per-step sign update.
    bias_update_rate: float = 0.0  # 0 = off; DeepSeek-V3 1e-3
    bias_freeze_step: Optional[int] = None  # no bias update after this optimizer step
    seq_balance_coef: float = 0.0  # DeepSeek-V3 sequence-wise balance loss (1e-4)
    # Group-limited routing: each token picks among the experts of its best groups.
    num_groups: int = 1  # 1 = off
    groups_per_token: int = 1
    group_score: str = "top2_sum"  # or max (DeepSeek-V2)
    # per_assignment: one row per kept assignment in the all-to-all; once_per_rank: one
    # row per (token, destination rank), expanded there (k > 1 with ep > 1 only).
    dispatch: str = "per_assignment"
    # The router's weights stay at their initialisation (a control: how much does learned
    # routing add? benchmarks/moe_payoff.py); gradients still flow through the gates to x.
    freeze_router: bool = False

    def validate(self) -> None:
        if self.num_experts < 1:
            fail("moe.num_experts", self.num_experts, "must be >= 1")
        if not 1 <= self.top_k <= min(8, self.num_experts):
            fail("moe.top_k", self.top_k,
                 f"must be between 1 and min(8, moe.num_experts = {self.num_experts})")
        if self.d_ff <= 0:
            fail("moe.d_ff", self.d_ff, "must be > 0")
        choice("moe.activation", self.activation, ACTIVATIONS)
        choice("moe.drop_policy", self.drop_policy, DROP_POLICIES)
        choice("moe.balance_scope", self.balance_scope, BALANCE_SCOPES)
        choice("moe.expert_impl", self.expert_impl, EXPERT_IMPLS)
        for name in ("capacity_factor", "eval_capacity_factor"):
            value = getattr(self, name)
            if value is not None and not (value > 0 and math.isfinite(value)):
                fail(f"moe.{name}", value, "must be > 0, or null for dropless routing")
        if self.min_capacity < 0:
            fail("moe.min_capacity", self.min_capacity, "must be >= 0")
        if not 0.0 <= self.jitter_eps < 1.0:
            fail("moe.jitter_eps", self.jitter_eps, "must be in [0, 1)")
        for name in ("aux_loss_coef", "z_loss_coef"):
            if getattr(self, name) < 0:
                fail(f"moe.{name}", getattr(self, name), "must be >= 0")
        self._validate_routing_options()

    def _validate_routing_options(self) -> None:
        """Score function, shared experts, selection bias, groups, dispatch."""
        choice("moe.score_func", self.score_func, SCORE_FUNCS)
        choice("moe.shared_gate", self.shared_gate, SHARED_GATES)
        choice("moe.group_score", self.group_score, GROUP_SCORES)
        choice("moe.dispatch", self.dispatch, DISPATCH_MODES)
        if not (self.route_scale > 0 and math.isfinite(self.route_scale)):
            fail("moe.route_scale", self.route_scale, "must be > 0")
        if self.shared_d_ff < 0:
            fail("moe.shared_d_ff", self.shared_d_ff, "must be >= 0 (0 = no shared expert)")
        if self.shared_gate != "none" and self.shared_d_ff == 0:
            fail("moe.shared_gate", self.shared_gate, "needs a shared expert (moe.shared_d_ff > 0)")
        for name in ("bias_update_rate", "seq_balance_coef"):
            value = getattr(self, name)
            if not (value >= 0 and math.isfinite(value)):
                fail(f"moe.{name}", value, "must be >= 0")
        if self.bias_freeze_step is not None and self.bias_freeze_step < 0:
            fail("moe.bias_freeze_step", self.bias_freeze_step, "must be >= 0, or null (never frozen)")
        E, G, M = self.num_experts, self.num_groups, self.groups_per_token
        if G < 1 or E % G:
            fail("moe.num_groups", G, f"must be >= 1 and divide moe.num_experts ({E})")
        if M < 1:
            fail("moe.groups_per_token", M, "must be >= 1")
        if M > G:
            fail("moe.groups_per_token", M, f"must be <= moe.num_groups ({G})")
        if M * (E // G) < self.top_k:
            fail("moe.groups_per_token", M,
                 f"keeps {M} x {E // G} = {M * (E // G)} experts per token (moe.num_experts / "
                 f"moe.num_groups = {E // G} per group), fewer than moe.top_k ({self.top_k})")
        if G > 1 and self.group_score == "top2_sum" and E // G < 2:
            fail("moe.group_score", self.group_score,
                 f"needs at least 2 experts per group (moe.num_experts / moe.num_groups = {E // G}); "
                 f"use max")

    @property
    def has_bias(self) -> bool:
        """Whether the routers hold a selection bias (``expert_bias``)."""
        return self.bias_update_rate > 0

    @property
    def renormalize(self) -> bool:
        """Whether the k gate weights are renormalised to sum to one."""
        return self.top_k > 1 if self.normalize_topk is None else self.normalize_topk
