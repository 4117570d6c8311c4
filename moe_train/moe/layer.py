"""The MoE layer: router -> dispatcher -> experts -> combine (+ the shared expert).

Shape legend:
  T  tokens in the routing group (flattened leading dims)   D  model width
  E  experts (global)    L  local experts, E / ep    M  rows for the local experts
  S  sequence length (the last leading dim: x is [..., S, D])

The layer knows no global process group: an expert-parallel group is passed in (None
means all experts are local and the layer runs in a plain Python process).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist
from torch import Tensor, nn

from moe_train.moe.balance import RoutingTally
from moe_train.moe.config import MoEConfig
from moe_train.moe.dispatcher import Dispatcher
from moe_train.moe.experts import GroupedExperts
from moe_train.moe.router import Router
from moe_train.moe.shared import SharedExpert
from moe_train.moe.stats import MoEStats


@dataclass
class MoEOutput:
    """Attributes:
        y: same shape and dtype as the input; zeros for tokens whose every choice was
            dropped (the caller's residual carries them).
        aux_loss, z_loss: fp32 scalars with gradient, coefficients NOT applied (they
            are applied once, in ``moe_train.moe.losses``).
        stats: monitoring tensors, detached.
        seq_loss: fp32 scalar, the sequence-wise balance loss (with gradient when
            ``moe.seq_balance_coef`` > 0, else a constant 0), coefficient NOT applied.
    """

    y: Tensor
    aux_loss: Tensor
    z_loss: Tensor
    stats: MoEStats
    seq_loss: Tensor = None


def mark_expert_params(module: nn.Module, ep_size: int) -> None:
    """Marks parameters as expert parameters the way DeepSpeed recognises them
    (``deepspeed.moe.utils.is_moe_param``: ``allreduce = False``; param groups split by
    ``group_name``), so their gradients reduce over the expert-data-parallel group only."""
    for param in module.parameters():
        param.allreduce = False
        param.group_name = f"ep_size_{ep_size}"


class MoELayer(nn.Module):
    """Switch / top-k mixture-of-experts feed-forward layer, with an optional shared
    expert (``moe.shared_d_ff``): y = combine(routed) + g * shared(x).

    ``tally`` (a ``RoutingTally``, not a module) accumulates the routed counts of the
    training micro-batches of one optimizer step for the selection bias and the routing
    health; the model's outer forward feeds it (``MoETransformer``), never this forward,
    so a recomputation under activation checkpointing counts nothing twice.

    Args:
        cfg: the ``moe`` config section.
        d_model: D.
        ep_group: expert-parallel process group; rank r of it owns global experts
            [r * L, (r + 1) * L). None: all E experts local.
        balance_group: data-parallel group for ``balance_scope: global``.
    """

    def __init__(self, cfg: MoEConfig, d_model: int, ep_group=None, balance_group=None):
        super().__init__()
        ep_size = 1 if ep_group is None else dist.get_world_size(group=ep_group)
        ep_rank = 0 if ep_group is None else dist.get_rank(group=ep_group)
        if cfg.num_experts % ep_size:
            raise ValueError(f"moe.num_experts = {cfg.num_experts}: must be divisible by the "
                             f"expert-parallel size ({ep_size})")
        self.cfg, self.ep_size, self.ep_rank = cfg, ep_size, ep_rank
        self.num_local = cfg.num_experts // ep_size
        self.router = Router(cfg, d_model, balance_group=balance_group)
        self.experts = GroupedExperts(self.num_local, d_model, cfg.d_ff, cfg.activation,
                                      first_global_expert_id=ep_rank * self.num_local,
                                      seed=cfg.seed, impl=cfg.expert_impl)
        mark_expert_params(self.experts, ep_size)
        # Dense: NOT marked, so DeepSpeed reduces it over all ranks like any dense weight.
        self.shared = (SharedExpert(d_model, cfg.shared_d_ff, cfg.activation, cfg.shared_gate == "sigmoid")
                       if cfg.shared_d_ff > 0 else None)
        self.dispatcher = Dispatcher(cfg.num_experts, ep_size, ep_group,
                                     once_per_rank=cfg.dispatch == "once_per_rank", ep_rank=ep_rank,
                                     top_k=cfg.top_k)
        self.tally = RoutingTally(cfg.num_experts)

    def forward(self, x: Tensor) -> MoEOutput:
        x_TD = x.reshape(-1, x.shape[-1])
        seq_len = x.shape[-2] if x.dim() >= 3 else None  # [.., S, D]: sequences of S tokens
        routing = self.router(x_TD, seq_len=seq_len)
        packed = self.experts.resolved_impl(x_TD.device, x_TD.dtype) == "grouped_mm"
        dispatched = self.dispatcher.dispatch(x_TD, routing, packed=packed)
        y_MD = self.experts(dispatched.x_MD, dispatched.tokens_per_expert_L,
                            rows_per_expert=dispatched.rows_per_expert, host_counts=dispatched.host_counts_L)
        # fp32 (gates and the sum over k outputs; the dispatcher's docstring), with the
        # shared output added in fp32 too: the one cast to x's dtype is at the return.
        y_TD = self.dispatcher.combine(y_MD, dispatched, x_TD.shape[0])
        if self.shared is not None:  # every token, dropped or not
            y_TD = y_TD + self.shared(x_TD)
        stats = MoEStats(
            routed_per_expert_E=routing.routed_per_expert_E,
            kept_per_expert_E=routing.kept_per_expert_E,
            num_assignments=routing.expert_ids_A.numel(),
            router_entropy=routing.entropy,
            aux_loss=routing.aux_loss.detach(),
            z_loss=routing.z_loss.detach(),
            seq_loss=routing.seq_loss.detach(),
        )
        return MoEOutput(y_TD.view(x.shape).to(x.dtype), routing.aux_loss, routing.z_loss, stats,
                         routing.seq_loss)
